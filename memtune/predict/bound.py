"""A lower bound of a step's peak memory without tracing it: the model state alone.

At the optimizer step the weights, every gradient and the optimizer state are alive together (torch's
optimizers read the gradients in place and allocate their state, lazily, inside `step`), so their bytes bound
`torch.cuda.max_memory_allocated` from below, and so the reserved memory and the fits verdict. The search uses
it to skip, without a trace, configurations whose state alone is over the budget (a 7B model's full
fine-tuning on a 24 GiB card): each is counted as "too big (state alone)". Every term errs low: no activations,
no temporaries, no allocator rounding, an adapter's own parameters left out, the quantised base's 16-bit rest
counted in 16 bits (peft's prepare_model_for_kbit_training casts it to fp32).
"""

from __future__ import annotations

from memtune.config import DTYPE_BYTES, TrainConfig
from memtune.predict.throughput import ModelShape

QUANTIZED_BYTES = {4: 0.5, 8: 1.0}
"""Bytes per weight of a bitsandbytes base: two nf4/fp4 values per byte, one int8 (block scales left out)."""


def optimizer_state_bytes(config: TrainConfig, trained: int) -> int:
    """Optimizer state on the GPU for `trained` parameters of full fine-tuning: AdamW's two moments in the
    weights' dtype (fused and foreach alike, torch/optim/adamw.py: zeros_like(param)), bitsandbytes' and
    torchao's two 8-bit states (torchao's 4-bit ones: half a byte each; their block scales left out), nothing in
    torch's pool for a paged optimizer (CUDA unified memory) and, as a lower bound, for Adafactor's factored
    moments."""
    if config.optimizer in ("adamw_torch_fused", "adamw_torch"):
        return 2 * trained * DTYPE_BYTES[config.weights_dtype]
    if config.optimizer in ("adamw_bnb_8bit", "adamw_torch_8bit"):
        return 2 * trained
    if config.optimizer == "adamw_torch_4bit":
        return trained  # two 4-bit moments (torchao OptimState4bit: numel / 2 uint8 codes each)
    return 0


def state_lower_bound(shape: ModelShape, config: TrainConfig) -> int:
    """Bytes of weights + gradients + optimizer state that one GPU holds at the optimizer step of `config`;
    0 with CPU offload (the state lives on the host). FSDP over N GPUs shards all three; DDP replicates them;
    DeepSpeed ZeRO partitions them by stage (`zero_state_lower_bound`)."""
    if config.offload != "none":
        return 0
    if config.quantization is not None:
        body = shape.matmul_parameters - shape.vocab_size * shape.hidden_size  # the LM head stays in 16 bits
        weights = int(body * QUANTIZED_BYTES[config.quantization.bits]) + (shape.num_parameters - body) * 2
    else:
        weights = shape.num_parameters * DTYPE_BYTES[config.weights_dtype]
    if config.deepspeed and config.zero is not None:
        return zero_state_lower_bound(shape, config)
    state = weights
    if config.adapter is None:  # full fine-tuning: a gradient per weight, in the weights' dtype, and the state
        state += shape.num_parameters * DTYPE_BYTES[config.weights_dtype]
        state += optimizer_state_bytes(config, shape.num_parameters)
    shards = config.world_size if config.sharded else 1
    return state // shards


def zero_state_lower_bound(shape: ModelShape, config: TrainConfig) -> int:
    """`state_lower_bound` of a DeepSpeed ZeRO plan without offload, per GPU over N = world size ranks: the 16-bit
    weights b*P (ZeRO-3: b*P/N), the gradients b*T (ZeRO-2 and 3: b*T/N) and the fp32 master and Adam moments
    12*T/N (ZeRO's own rules, docs/deepspeed-zero.md §2; DeepSpeed's estimate_zero2/3_model_states_mem_needs give
    the same terms). b is the dtype DeepSpeed casts the model to (the autocast dtype), T the trained parameters
    (LoRA's adapters counted as none: a floor)."""
    assert config.zero is not None
    b = DTYPE_BYTES[config.amp if config.amp != "none" else config.weights_dtype]
    ranks, stage = config.world_size, config.zero.stage
    params = shape.num_parameters
    trained = params if config.adapter is None else 0
    weights = b * params // (ranks if stage == 3 else 1)
    gradients = b * trained // (ranks if stage >= 2 else 1)
    return weights + gradients + 12 * trained // ranks
