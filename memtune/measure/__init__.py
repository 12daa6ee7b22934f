"""What the GPU really does: the probe (`probe`), real trial steps with memory given back afterwards
(`verify`, `sharded` for several processes) and what every trial shares (`memory`). Touches CUDA.
"""
