"""Predictions without a GPU: one step traced on fake tensors (`trace`;
`liger` stands in for Liger-Kernel's fused loss there), replayed through a model of the
caching allocator (`allocator`) into a peak (`estimate`, with `ddp` and `fsdp` for several GPUs), and
the tokens/s model (`throughput`). Pure: no CUDA memory is used.
"""
