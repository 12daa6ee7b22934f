"""The one training step that is traced, measured and run: the model build, checkpointing and adapters
(`step`), the chunked and Liger losses (`loss`), and FSDP2/DDP wrapping as accelerate prepares it (`parallel`).
"""
