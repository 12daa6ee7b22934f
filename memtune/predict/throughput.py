"""Predicted training speed (tokens/s) of a configuration: a FLOP + memory-traffic + kernel-launch model.

The search ranks configurations that fit by this number, so what matters most is the *ratio*
between two configurations of the same model: fp32 vs bf16 tensor cores, the recomputation of
gradient checkpointing, the poor GPU utilisation of small micro-batches, the cost of chunking
the loss and of offloading to the CPU.

One micro-batch of `t` tokens takes

    max(layer_flops / (peak_flops[dtype] * efficiency) + layer_bytes / memory_bandwidth,  kernels * kernel_seconds)
      + head_flops / (peak_flops[dtype] * efficiency) + logits_bytes / memory_bandwidth

where flops, the layers' bytes and kernels are counted on the model itself (`flop_count`, `predict.flops`: torch's
FlopCounterMode on the trace's fake-tensor step, torch/utils/flop_counter.py, causal attention corrected for the
kernel the card runs; a shallow model of each layer type, scaled to the depth):
- flops: forward and backward as the step runs them (no weight gradients for frozen LoRA weights); checkpointing
  adds the checkpointed layers' forward once more (Chen et al. 2016); a chunked loss recomputes the LM head; Liger's
  fused loss computes the head's gradients in forward: no more FLOPs than the standard loss, less logits traffic
  (`liger_logits_traffic`, an assumption; `liger_weight_bytes_per_chunk`, fitted on the H200). Where the count
  fails (or a shape is built without `count`), the closed form stands in: 2 * (matmul parameters) per token forward
  (Kaplan et al. 2020, "Scaling Laws", Sec. 2.1), causal attention 2 * layers * seq_len * hidden, backward 2x
  forward (1x for frozen weights), a Llama layer's traffic and kernels (`flops.closed_form`).
- layer_bytes: what the layers' elementwise kernels read and write (norms, activations, casts, rotary embeddings,
  eager attention's s^2 scores; `flops.TRAFFIC`), times `traffic_factor`; logits_bytes: the fp32 logits, softmax
  and their gradient over the vocabulary (`logits_traffic` per token per entry).
- kernels: every kernel the layers launch, each costing the host `kernel_seconds` (dispatch, autocast, the
  model's Python): the GPU waits for the host when the kernels are small. This is what makes small micro-batches
  slow; the layers take the longer of the two, the host running ahead of the GPU. The LM head and the loss are a
  few large kernels, timed by their work.
The optimizer step reads and writes ~16 bytes per trained parameter (fused AdamW, fp32 state).

The coefficients were fitted (benchmarks/calibrate_throughput.py) to 143 measured steps on an
NVIDIA H200 (the accuracy cases and the oracle grid: fp32/bf16, checkpointing, LoRA, chunked loss,
accumulation); for another card they are scaled by its datasheet peak FLOPS and bandwidth (`kernel_seconds`,
host-bound, is not). Its expected error is `SPEED_ERROR_BAND`. After a verification trial, the measured tokens/s
of the chosen plan is reported next to this prediction.

Several GPUs (`ddp_sync_seconds`, `fsdp_micro_batch_seconds`): every GPU runs the single-GPU
micro-batches on its share of the batch; what the strategy adds is communication, the part of it
that computation does not hide, and work of its own. Collectives are timed as ring algorithms over
the card's GPU-GPU link:
bytes * factor / (interconnect_bytes_per_second * collective_efficiency), factor 2 (N-1)/N for an
all-reduce and (N-1)/N for an all-gather or a reduce-scatter (NCCL's "bus bandwidth" definition).
- DDP (gradient buckets, all-reduced as they fill during the backward of the last micro-batch; the
  others run under no_sync): exposed = max(all-reduce - backward, last bucket's all-reduce), the last
  bucket holding the parameters used first (the input embedding), which are ready only at the end;
  plus the Reducer's two copies of every gradient (into its bucket, divided by N, and back into
  .grad), memory-bound; the optimizer updates the full replica on every GPU.
- FSDP2 (full sharding): each micro-batch all-gathers every unit in forward and again in backward
  (the LM-head unit, kept gathered after forward, once), in the parameter dtype (the amp dtype under
  mixed precision); the last micro-batch reduce-scatters the gradients. Prefetch overlaps them with
  compute: exposed = max(collectives - micro-batch compute, first all-gather [+ last reduce-scatter]),
  the first and last units being the embedding-sized ones. Plus `fsdp_unit_seconds` per unit and
  micro-batch (hooks, copy-in/copy-out, stream waits); the optimizer steps 1/N of the parameters.

Several machines (`TrainConfig.num_nodes` > 1): the collectives span world_size = nodes x GPUs ranks, so the
factors above take world_size for N, and a ring that leaves a machine carries, across the machine's network
ports together, the same factor x bytes that each GPU's link carries (NCCL runs one ring per channel, each
crossing the network once per machine): the slowest link sets the time, min(GPU-GPU link, the machine's network
rate `inter_node_bytes_per_second`), at the same `collective_efficiency`. The network rate is an ASSUMPTION,
not measured by memtune: 400 Gb/s per machine by default (one InfiniBand NDR / RoCE ConnectX-7 port,
`config.DEFAULT_INTER_NODE_GBPS`; --inter-node-gbps overrides it, e.g. 3200 for a DGX-class node with a
400 Gb/s port per GPU). Not modelled: NCCL's tree and NVLink SHARP algorithms (faster all-reduce across
machines at scale), congestion, and network latency (~microseconds per hop, small beside these messages).
One machine is timed exactly as before.

DeepSpeed ZeRO (`zero_step_seconds`): the same collectives and host copies, from what DeepSpeed does; its
assumptions are listed there; not calibrated.

Assumed, not calibrated: `interconnect_bytes_per_second` (datasheet NVLink rates per direction; PCIe
cards: the host copy rate) and that DDP adds nothing per layer. Measured on one 2 x H200 host:
`collective_efficiency` (NCCL bus bandwidth / link rate). Fitted:
`fsdp_unit_seconds`, to the 2-GPU FSDP2 steps measured on H200 (benchmarks/results/fsdp_2gpu_h200.json).
benchmarks/ddp.py measures DDP and FSDP side by side (and the all-reduce bandwidth) to check both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from memtune.config import DEFAULT_INTER_NODE_GBPS, DTYPE_BYTES, GpuCard, TrainConfig, gpu_card
from memtune.errors import UsageError
from memtune.predict import flops
from memtune.predict.flops import FlopCount
from memtune.predict.liger import liger_num_chunks

SPEED_ERROR_BAND = 0.25
"""The speed model's expected relative error of tokens/s: the 80th percentile of |predicted / measured - 1| over the
143 H200 steps it was fitted to (benchmarks/calibrate_throughput.py: 25.9%; median 9.0%, max 54.6%). On 66 steps of
11 architectures it was not fitted to (benchmarks/results/speed_heldout_h200.json, benchmarks/speed_error.py) the
80th percentile was 18.8% (median 7.5%, max 41.6%). Two candidates whose predicted tokens/s differ by less than
this are too close to call on the prediction alone."""

DDP_BUCKET_BYTES = 25 * 1024 * 1024
"""DistributedDataParallel's bucket_cap_mb default (25 MiB), which Trainer and accelerate keep."""
FSDP_UNIT_SECONDS = 2.83e-3
"""Fitted: the median, over the 6 FSDP2 2-GPU steps measured on H200 (benchmarks/results/fsdp_2gpu_h200.json:
Qwen2.5-0.5B, Llama-3.2-1B wrapped by accelerate and by memtune, Qwen2.5-1.5B, Llama-3.2-1B accumulating,
Llama-3.1-8B), of (measured step - this model's step without the term) / (FSDP units x micro-batches),
measured steps read as `measure.memory.Measurement` does (the median of the steps after the first). The six
ranged from 0.36 (8B) to 6.1 ms: a rough term, which also absorbs the single-GPU model's own error on
those steps. `python benchmarks/ddp.py --fit-fsdp-unit FILE...` recomputes it from measured FSDP steps."""


@dataclass(frozen=True)
class GpuSpeed:
    """Datasheet rates of a card and the fitted efficiency coefficients of the model above."""

    name: str
    bf16_flops: float
    """Dense bf16/fp16 tensor-core FLOP/s (datasheet, without sparsity)."""
    fp32_flops: float
    """fp32 FLOP/s without TF32 (torch's default for float32 matmuls)."""
    memory_bytes_per_second: float
    pcie_bytes_per_second: float = 25e9
    """Host<->device copy rate for offloaded state and activations (PCIe 4/5 x16, pinned, effective): an assumption
    unless `memtune fit` measured this GPU's (`measure.probe.host_copy_rate`, the slower direction)."""
    # Fitted to 143 measured H200 steps (benchmarks/calibrate_throughput.py on tests/data/ground_truth_h200.json
    # and benchmarks/results/oracle_h200.json, FLOPs, traffic and kernels counted by predict.flops): median |error|
    # 9.0%, 80th percentile 25.9% (SPEED_ERROR_BAND), max 54.6%. bf16_efficiency and logits_traffic sit at the fit's
    # bounds: the calibration's small models, mostly launch-bound, do not identify them.
    bf16_efficiency: float = 0.75
    """Share of the dense bf16 peak the step's matmuls reach: held at 0.75, what the best H100/H200 GEMMs reach."""
    fp32_efficiency: float = 0.7025
    logits_traffic: float = 16.0
    """Bytes moved per token per vocabulary entry (fp32 logits, softmax, their gradient): held at 16, the fp32 logits
    and their gradient each written and read once."""
    traffic_factor: float = 2.495
    """Multiplies the bytes the layers' elementwise kernels move (`flops.TRAFFIC`): 1 / the share of the card's
    bandwidth they reach (~40%: small, unfused kernels)."""
    kernel_seconds: float = 3.431e-5
    """Host time per kernel the layers launch (`FlopCount.launches_forward`): PyTorch's dispatch, autocast and
    transformers' Python around each op, independent of size. The layers take the longer of the GPU's work and the
    host's launches: what makes small micro-batches slow."""
    chunk_seconds: float = 2.861e-4
    """Per loss chunk (memtune.loss.CHUNK_TOKENS tokens) beyond its counted head recompute: its launches, upcast and
    loss."""
    liger_logits_traffic: float = 10.0
    """Liger's fused loss: bytes moved per token per vocabulary entry, in place of `logits_traffic`: 16-bit logits
    written by the head matmul (2), read and overwritten with their gradient by the cross-entropy kernel (4), read
    by the input- and weight-gradient matmuls (4). Not calibrated: an assumption until benchmarks/fused_loss.py is
    measured (fp32 logits, fp32 training without autocast, count twice: see `micro_batch_seconds`)."""
    liger_weight_bytes_per_chunk: float = 27.0
    """Liger's fused loss, per chunk (`predict.liger.liger_chunk_size` tokens): bytes moved per LM-head parameter at
    the card's bandwidth. Each chunk casts the head's weight for its matmul, reads it again for the input gradient
    and reads and writes the fp32 weight gradient (addmm into grad_weight): the weight's size in traffic, every
    chunk, and Liger's chunks are small (32 tokens for Qwen2.5-0.5B at 4 x 1024). Fitted on the H200
    (benchmarks/results/fused_loss_h200.json: Qwen2.5-0.5B, Llama-3.2-1B at 4 x 1024 and 4 x 2048, Gemma-2-2B at
    4 x 1024; the per-chunk time over the standard loss's measured step scaled by the model's own ratio, 21-29
    bytes, median 27): Liger measured 0.53-1.02x the standard loss's tokens/s and 0.59-1.02x the chunked loss's."""
    cpu_optimizer_params_per_second: float = 1.7e10
    """CPU AdamW rate for offloaded optimizer state (FSDP2 CPU offload: torch's fused AdamW on the host's cores).
    Fitted on the H200 host (16 cores): Llama-3.2-1B and -3B, 2 x 2048, checkpointing, offload on one GPU, measured
    steps 0.53 and 1.30 s (results/fsdp_2gpu_h200.json), the rest of the step predicted at the measured 55.2 GB/s host
    rate; the two give 20 and 17 billion parameters/s, the lower kept. The assumption it replaces, 4e8, predicted
    those steps 6.7-7.0x too slow (1,151 tokens/s for 7,602 measured, results/loss_2gpu_h200.json). Other hosts'
    memory bandwidth differs: unmeasured."""
    nvme_bytes_per_second: float = 3e9
    """Rate of DeepSpeed's NVMe offload (ZeRO-Infinity swapping through its async I/O op), each direction: an
    assumption, unmeasured (the GPU machine had no libaio, docs/deepspeed-zero.md §6): a PCIe 4 x4 NVMe drive reads
    5-7 GB/s sequentially, and the swapper reaches part of it."""
    interconnect_bytes_per_second: float = 25e9
    """GPU-to-GPU rate, one direction: datasheet NVLink rates for SXM cards (_CARDS); for PCIe cards the
    host copy rate above. An assumption (cards of one host, no NVLink bridge, no network)."""
    collective_efficiency: float = 0.6
    """Share of the link rate NCCL's ring collectives reach on large messages (bus bandwidth / link rate).
    Measured once, on 2 x H200 (benchmarks/ddp.py, 256 MiB messages): all-reduce 289-296 GB/s, all-gather
    241-244 GB/s of the 450 GB/s assumed, 0.54-0.66. Other hosts and cards: unmeasured."""
    inter_node_bytes_per_second: float = DEFAULT_INTER_NODE_GBPS * 1e9 / 8
    """Network rate of one machine, one direction, for plans over several machines (`TrainConfig.num_nodes`): an
    assumption (module docstring), `--inter-node-gbps` x 1e9 / 8."""
    fsdp_unit_seconds: float = FSDP_UNIT_SECONDS
    """FSDP2's own time per sharded unit (a decoder layer) per micro-batch, beyond its collectives."""
    nf4_seconds_per_parameter: float = 6.31e-12
    """A 4-bit base's extra time per quantised parameter per pass over the layers (forward, backward and the
    checkpointed recompute each dequantise every weight: bitsandbytes' MatMul4Bit). Fitted on one H200 step:
    Mistral-7B, LoRA r16 all-linear, 2 x 1024, checkpointing, 4-bit nf4 base 0.417 s vs bf16 base 0.285 s
    (benchmarks/results/lowbit_mistral_lora_h200.json), over 3 passes of 6.98e9 parameters. Memory-bound:
    scaled to other cards by their memory bandwidth."""
    int8_seconds_per_parameter: float = 4.54e-11
    """The same for an 8-bit LLM.int8 base (MatMul8bitLt: the input quantised to int8 in 16 bits, the int8
    matmul, and in backward the weight dequantised whole): 1.235 s vs 0.285 s on the same step. One point (at
    2,048 tokens per micro-batch), so how it grows with the tokens is not known; memory-bound scaling."""

    def scaled(self, **changes: Any) -> GpuSpeed:
        return replace(self, **changes)


# Datasheet numbers: NVIDIA H100 SXM / H200 / A100 / L40S / RTX 4090 / A10 / L4 / T4 product pages.
# NVLink: 900 GB/s (H100 SXM, H200) and 600 GB/s (A100 SXM) in both directions together, half each way.
_CARDS = {
    "H200": dict(bf16_flops=989e12, fp32_flops=67e12, memory_bytes_per_second=4.8e12,
                 interconnect_bytes_per_second=450e9, pcie_bytes_per_second=55e9),  # host link measured: 55.2 GB/s
    "H100": dict(bf16_flops=989e12, fp32_flops=67e12, memory_bytes_per_second=3.35e12,
                 interconnect_bytes_per_second=450e9),
    "A100": dict(bf16_flops=312e12, fp32_flops=19.5e12, memory_bytes_per_second=2.0e12,
                 interconnect_bytes_per_second=300e9),
    "L40S": dict(bf16_flops=362e12, fp32_flops=91.6e12, memory_bytes_per_second=0.864e12),
    "A6000": dict(bf16_flops=155e12, fp32_flops=38.7e12, memory_bytes_per_second=0.768e12),
    "RTX4090": dict(bf16_flops=165e12, fp32_flops=82.6e12, memory_bytes_per_second=1.0e12),
    "RTX3090": dict(bf16_flops=71e12, fp32_flops=35.6e12, memory_bytes_per_second=0.936e12),
    "A10": dict(bf16_flops=125e12, fp32_flops=31.2e12, memory_bytes_per_second=0.6e12),
    "L4": dict(bf16_flops=121e12, fp32_flops=30.3e12, memory_bytes_per_second=0.3e12),
    "T4": dict(bf16_flops=65e12, fp32_flops=8.1e12, memory_bytes_per_second=0.32e12),
}


H200_BANDWIDTH = _CARDS["H200"]["memory_bytes_per_second"]
"""The card the memory-bound terms fitted on H200 steps are scaled from."""


def gpu_speed(name: str) -> GpuSpeed:
    """The speed model for a card, by (a part of) its name; unknown cards get the H100's. A name `--gpu` knows
    (`config.GPU_CARDS`, aliases too) takes that card's datasheet rates; its links come from its family here."""
    key = name.upper().replace(" ", "").replace("NVIDIA", "").replace("GEFORCE", "").replace("-", "")
    try:
        known: GpuCard | None = gpu_card(name)
    except UsageError:
        known = None
    for card, rates in _CARDS.items():
        if card in key:
            speed = GpuSpeed(name=card, **rates)
            break
    else:
        if known is None:
            return GpuSpeed(name=f"{name} (rated as H100)", **_CARDS["H100"])
        speed = GpuSpeed(name=known.name, **_CARDS["H100"])  # links as the H100's: NVLink, PCIe
    if known is None:
        return speed
    return speed.scaled(name=known.name, bf16_flops=known.half_flops, fp32_flops=known.fp32_flops,
                        memory_bytes_per_second=known.memory_bytes_per_second)


@dataclass(frozen=True)
class ModelShape:
    """What the speed model needs to know about a model."""

    num_parameters: int
    num_layers: int
    hidden_size: int
    vocab_size: int
    tied_embeddings: bool
    parameter_tensors: int | None = None
    """Parameter tensors of the model, tied ones once: what a full fine-tune's optimizer loops over
    (`parameter_tensors`); None: a Llama layout is assumed (9 per layer, embedding, final norm and head)."""
    model_config: Any = field(default=None, compare=False, hash=False, repr=False)
    """The transformers config, when FLOPs are counted on the model (`flop_count`); None: the closed form."""
    note: Callable[[str], None] | None = field(default=None, compare=False, hash=False, repr=False)
    """Told, once per count, when the count failed and the closed form stood in."""

    @property
    def matmul_parameters(self) -> int:
        # The input embedding is a lookup (no FLOPs); tied, the same matrix is the LM head's matmul.
        embedding = self.vocab_size * self.hidden_size
        return self.num_parameters if self.tied_embeddings else self.num_parameters - embedding

    @classmethod
    def of(cls, model_config: Any, num_parameters: int, *, count: bool = False,
           note: Callable[[str], None] | None = None) -> ModelShape:
        """The shape of `model_config`; `count`: FLOPs counted on the model (`predict.flops`), told `note` when the
        count fails."""
        return cls(
            num_parameters=num_parameters,
            num_layers=int(model_config.num_hidden_layers),
            hidden_size=int(model_config.hidden_size),
            vocab_size=int(model_config.vocab_size),
            tied_embeddings=bool(getattr(model_config, "tie_word_embeddings", False)),
            parameter_tensors=parameter_tensors(model_config),
            model_config=model_config if count else None,
            note=note,
        )


LAYER_TENSORS = {
    "llama": 9, "mistral": 9, "mixtral": 9, "granite": 9, "gemma": 9, "qwen2": 12, "qwen3": 11, "qwen3_moe": 11,
    "qwen2_moe": 16, "gemma2": 11, "gemma3_text": 13, "olmo": 7, "olmo2": 11, "cohere": 8, "phi3": 6, "phi": 14,
    "stablelm": 11, "starcoder2": 16, "opt": 16, "gpt_neox": 10, "falcon": 6, "gpt2": 12, "gptj": 10,
}
"""Parameter tensors (weights, biases, norms) of one decoder layer by `model_type`, without the biases that
`attention_bias` / `mlp_bias` switch on, as transformers 5.24 builds them (counted on the meta device:
tests/test_optimizers.py). Llama: 7 projections and 2 RMSNorms; Qwen2: the same and q/k/v biases; Gemma2: 4
norms; Phi-3: fused qkv_proj and gate_up_proj; GPT-2: 4 Conv1D and 2 LayerNorms, each with a bias. Another
model_type is counted as Llama."""
OUTER_TENSORS = {"gpt2": 4, "opt": 4, "gpt_neox": 3, "falcon": 3, "starcoder2": 3, "phi": 3, "stablelm": 3,
                 "gptj": 3, "olmo": 1}
"""Parameter tensors outside the layers and the LM head (default 2: the embedding and the final norm's weight);
GPT-2 and OPT add position embeddings, LayerNorms add a bias, OLMo's final norm has no parameters."""
HEAD_TENSORS = {"phi": 2, "gptj": 2}
"""Parameter tensors of an untied LM head (default 1; Phi and GPT-J give it a bias)."""
ATTENTION_BIAS_TENSORS = {"gpt_neox": 2}
"""Biases that `attention_bias=True` adds per layer (default 4: q, k, v, o; GPT-NeoX: query_key_value, dense)."""


def parameter_tensors(model_config: Any) -> int:
    """Parameter tensors of the causal LM `model_config` describes, tied ones once, from its config fields (no model
    is built: `sources.source_parameters` reads a catalog model's count from its file). What an optimizer that loops
    over tensors pays per step (`PER_TENSOR_SECONDS`)."""
    model_type = getattr(model_config, "model_type", "")
    per_layer = LAYER_TENSORS.get(model_type, 9)
    per_layer += ATTENTION_BIAS_TENSORS.get(model_type, 4) * bool(getattr(model_config, "attention_bias", False))
    per_layer += 3 * bool(getattr(model_config, "mlp_bias", False))  # gate, up, down
    tied = bool(getattr(model_config, "tie_word_embeddings", False))
    outer = OUTER_TENSORS.get(model_type, 2) + (0 if tied else HEAD_TENSORS.get(model_type, 1))
    return int(model_config.num_hidden_layers) * per_layer + outer


def trained_parameters(shape: ModelShape, config: TrainConfig) -> int:
    """Parameters the optimizer updates: all of them, or LoRA's A and B (r * (in + out) per adapted matmul)."""
    if config.adapter is None:
        return shape.num_parameters
    if config.adapter.kind == "prefix":
        return config.adapter.num_virtual_tokens * shape.num_layers * 2 * shape.hidden_size
    # all-linear on a transformer block: ~7 matmuls whose in+out sum to ~ (4h + 3*(h+ffn))/... ; a
    # per-layer 12*h*r is the usual approximation for attention + MLP (about 1% of weights at r=16).
    return 12 * shape.num_layers * shape.hidden_size * config.adapter.rank


def flop_count(shape: ModelShape, config: TrainConfig) -> FlopCount:
    """FLOPs, traffic and kernels per token of `config`'s micro-batch: counted on the model (`predict.flops`) when
    the shape carries its config (`ModelShape.of(..., count=True)`), else, or when the count fails, the closed form
    (`flops.closed_form`)."""
    def fallback(note: str = "") -> FlopCount:
        return flops.closed_form(shape.num_layers, shape.hidden_size, shape.vocab_size, shape.matmul_parameters,
                                 config.seq_len, config.adapter is not None, note=note,
                                 autocast_casts=config.amp != "none" and config.weights_dtype == "fp32")

    if shape.model_config is None:
        return fallback()
    return flops.flop_count(shape.model_config, config, fallback, note=shape.note)


def micro_batch_seconds(shape: ModelShape, config: TrainConfig, speed: GpuSpeed) -> tuple[float, float]:
    """(seconds of one micro-batch's forward and backward on one GPU, the backward's share of them).

    TRL's trainers (`config.trainer`): DPO runs the chosen and the rejected row of every pair (`sequence_rows`) and,
    unless the reference log-probs are precomputed, one more forward of them through the reference (a frozen copy or
    the adapter disabled: the same FLOPs, under no_grad); SFT and DPO compute the loss through TRL's fused LM head,
    tile by tile, whose logits traffic is taken as Liger's (`liger_logits_traffic`, an assumption, not fitted)."""
    tokens = config.micro_batch_size * config.seq_len * sequence_rows(config)
    head = shape.vocab_size * shape.hidden_size
    body = shape.matmul_parameters - head
    count = flop_count(shape, config)
    forward, backward = count.forward, count.backward
    checkpointed = config.checkpointed_layers(shape.num_layers) / max(1, shape.num_layers)
    recompute = count.layers_forward * checkpointed  # the checkpointed layers' forward, once more (Chen et al. 2016)
    chunk_recompute = count.head_forward if config.loss == "chunked" else 0.0  # the head, in the chunk's backward
    reference = 1.0 if config.trainer == "dpo" and not config.precompute_ref_log_probs else 0.0  # its forward
    layer_flops = tokens * (count.layers_forward * (1 + reference) + count.layers_backward + recompute)
    head_flops = tokens * (count.head_forward * (1 + reference) + count.head_backward + chunk_recompute)

    half = config.amp != "none" or config.weights_dtype != "fp32"
    rate = speed.bf16_flops * speed.bf16_efficiency if half else speed.fp32_flops * speed.fp32_efficiency
    logits = tokens * shape.vocab_size * speed.logits_traffic
    if config.loss == "liger" or config.trainer != "causal-lm":
        # Liger computes the head's input and weight gradients in forward, chunk by chunk (recipe.loss): the same
        # matmuls as the standard loss, no recomputation; its logits stay in the head's compute dtype. TRL's fused
        # head (predict/trl_step.py) works through the logits in tiles as well.
        logits = tokens * shape.vocab_size * speed.liger_logits_traffic * (1 if half else 2) * (1 + reference)
    # the layers' elementwise kernels (flops.TRAFFIC): per token, and autocast's weight casts per micro-batch; the
    # recomputed forward moves its bytes again
    layer_bytes = (tokens * (count.bytes_forward * (1 + checkpointed + reference) + count.bytes_backward)
                   + count.fixed_bytes_forward * (1 + checkpointed + reference) + count.fixed_bytes_backward)
    layers = layer_flops / rate + speed.traffic_factor * layer_bytes / speed.memory_bytes_per_second
    # The host launches the layers' kernels ahead of the GPU; whichever of the two is slower sets their pace. The
    # LM head and the loss over the vocabulary are a few large kernels the GPU works through after them.
    launches = speed.kernel_seconds * (count.launches_forward * (1 + checkpointed + reference)
                                       + count.launches_backward)
    micro = max(layers, launches) + head_flops / rate + logits / speed.memory_bytes_per_second
    if config.quantization is not None:
        passes = 2 + checkpointed
        per_parameter = speed.nf4_seconds_per_parameter if config.quantization.bits == 4 \
            else speed.int8_seconds_per_parameter
        micro += passes * body * per_parameter * H200_BANDWIDTH / speed.memory_bytes_per_second
    if config.loss == "chunked":
        from memtune.recipe.loss import CHUNK_TOKENS

        micro += -(-tokens // CHUNK_TOKENS) * speed.chunk_seconds
    if config.loss == "liger":
        chunks = liger_num_chunks(tokens, shape.vocab_size, shape.hidden_size)
        micro += chunks * speed.liger_weight_bytes_per_chunk * head / speed.memory_bytes_per_second
    # Offloaded activations: each checkpointed layer's input goes to pinned host memory in forward and comes back
    # for the recomputation, both copies on the compute stream (save_on_cpu), so nothing hides them.
    micro += 2 * offloaded_activation_bytes(shape, config) / speed.pcie_bytes_per_second
    # Backward (recomputation included) by its share of the FLOPs: what DDP's all-reduce can hide behind.
    # Liger runs the head's backward matmuls (input and, trained, weight gradient) in forward: not in backward.
    in_forward = count.head_backward if config.loss == "liger" else 0.0
    backward_share = (backward - in_forward + recompute + chunk_recompute) / (
        forward * (1 + reference) + backward + recompute + chunk_recompute)
    return micro, micro * backward_share


def sequence_rows(config: TrainConfig) -> int:
    """Sequence rows per example: 2 for TRL's DPO (the chosen and the rejected completion of a pair, run as one batch
    by dpo_trainer.py `concatenated_forward`), 1 otherwise."""
    return 2 if config.trainer == "dpo" else 1


def offloaded_activation_bytes(shape: ModelShape, config: TrainConfig) -> int:
    """Bytes one micro-batch copies to the host and back with `offload_activations`: each checkpointed layer's
    input, the residual stream, tokens x hidden in the weights' dtype (fp32 under mixed precision and for a
    quantised base, whose other weights peft makes fp32). Only the hidden states: transformers' checkpointed
    layers take the rotary embeddings and the mask as keyword arguments, bound into the checkpointed function
    (modeling_layers.py `GradientCheckpointingLayer`), which the checkpoint does not save (the trace's
    `Trace.host_bytes` counts what it does save, in pinned blocks). 0 without offload."""
    if not config.offload_activations:
        return 0
    element = 4 if config.quantization is not None else DTYPE_BYTES[config.weights_dtype]
    tokens = config.micro_batch_size * config.seq_len
    return config.checkpointed_layers(shape.num_layers) * tokens * shape.hidden_size * element


def step_seconds(shape: ModelShape, config: TrainConfig, speed: GpuSpeed, evicted_bytes: int | None = None) -> float:
    """Predicted seconds of one optimizer step (all micro-batches of one GPU, and the optimizer).
    `evicted_bytes`: see `optimizer_seconds`."""
    micro, backward = micro_batch_seconds(shape, config, speed)
    trained = trained_parameters(shape, config)
    optimizer = optimizer_seconds(shape, config, speed, evicted_bytes)
    if config.deepspeed:
        return zero_step_seconds(shape, config, speed, micro, backward, optimizer)
    if config.replicated:
        return config.grad_accum_steps * micro + ddp_sync_seconds(shape, config, speed, backward) + optimizer
    if not config.sharded:
        return config.grad_accum_steps * micro + optimizer
    # FSDP2: sharded over world_size GPUs, every machine's (or one GPU with CPU offload).
    first, last = fsdp_micro_batch_seconds(shape, config, speed, micro)
    optimizer /= config.world_size  # each GPU steps its shard
    if config.offload != "none":
        # FSDP CPU offload: parameters are copied in for forward and backward of every micro-batch,
        # gradients copied out, and AdamW runs on the CPU.
        weight_bytes = shape.num_parameters * DTYPE_BYTES[config.weights_dtype] / config.world_size
        copies = 2 * weight_bytes / speed.pcie_bytes_per_second
        first, last = first + copies, last + copies
        optimizer = trained / config.world_size / speed.cpu_optimizer_params_per_second
        optimizer += trained * 4 / config.world_size / speed.pcie_bytes_per_second
    return (config.grad_accum_steps - 1) * first + last + optimizer


OPTIMIZER_STEP_BYTES = {
    # "Bytes" per trained parameter of one step at the card's memory bandwidth, p = the weights' bytes per
    # element. Fused AdamW reads p, grad, m, v and writes p, m, v (m, v in the weights' dtype; torch
    # _fused_adamw_): 8 x p, the 32 bytes per fp32 parameter the H200 calibration used
    # (benchmarks/calibrate_throughput.py). The others are fitted to the optimizer step measured alone on an
    # H200 (benchmarks/results/optimizer_step_h200.json: Llama-3.2-1B fp32 and bf16, Qwen2.5-0.5B fp32, time =
    # a x parameters + b x tensors), so a constant stands for per-element compute that is not memory traffic.
    "adamw_torch_fused": lambda p: 8 * p,
    # foreach AdamW: ~6 more passes over the state (torch/optim/adamw.py _multi_tensor_adamw): 97-102 B per
    # fp32 parameter measured.
    "adamw_torch": lambda p: 24 * p,
    # bitsandbytes 8-bit blockwise AdamW maps every state element through its 256-entry quantisation map both
    # ways: ~133 B per parameter in fp32, 126 in bf16, nearly independent of the weights' dtype.
    "adamw_bnb_8bit": lambda p: 2 * p + 120,
    "paged_adamw_8bit": lambda p: 2 * p + 130,  # 137 B fitted (state resident, not evicted)
    "paged_adamw_32bit": lambda p: 3 * p + 58,  # 70 B fitted in fp32
    # Adafactor (transformers.optimization): grad**2, row/column means, the rsqrt update, its RMS and clipping:
    # 33 B per fp32 parameter fitted.
    "adafactor": lambda p: 2 * p + 25,
    # torchao AdamW8bit / AdamW4bit: one compiled kernel per parameter reads p, grad and the two coded moments
    # and writes p and the moments (torchao/optim/adam.py single_param_adam): 3 p + 4 (8-bit) or 3 p + 2. Their
    # step is dominated by the per-tensor cost below; the fit gave no stable per-element term.
    "adamw_torch_8bit": lambda p: 3 * p + 4,
    "adamw_torch_4bit": lambda p: 3 * p + 2,
}
"""Cost of one optimizer step per trained parameter, in bytes at the card's memory bandwidth."""
PER_TENSOR_SECONDS = {"adamw_bnb_8bit": 32e-6, "paged_adamw_8bit": 53e-6, "paged_adamw_32bit": 90e-6,
                      "adafactor": 220e-6, "adamw_torch_8bit": 500e-6, "adamw_torch_4bit": 500e-6}
"""Fixed cost per parameter tensor and step, where the optimizer loops over tensors in Python, fitted on the
H200 with the bytes above: bitsandbytes launches one kernel per tensor and synchronises the device after each
(Optimizer8bit.step: sync_gpu; paged ones also prefetch); Adafactor runs ~20 small ops per tensor; torchao
calls a torch.compile'd function per tensor (Dynamo's guards and a kernel launch each: 460-630 us measured).
Host-bound, so not scaled by the card."""
PAGED_STATE_BYTES = {"paged_adamw_8bit": 2, "paged_adamw_32bit": 8}
"""State bytes per parameter that paged optimizers keep in unified memory (two uint8 or two fp32 states)."""
TENSORS_PER_LAYER = 9
"""Parameter tensors of a Llama-style decoder layer (7 projections, 2 norms): where a shape does not count them."""


def optimizer_seconds(shape: ModelShape, config: TrainConfig, speed: GpuSpeed,
                      evicted_bytes: int | None = None) -> float:
    """Predicted seconds of one optimizer step on one GPU (the full replica: FSDP's caller divides by GPUs):
    the step's memory traffic (`OPTIMIZER_STEP_BYTES`) at the card's bandwidth, plus a per-tensor cost
    for the optimizers that loop over tensors in Python (`PER_TENSOR_SECONDS`). For fused AdamW on fp32
    weights this is 32 bytes per parameter, as before the optimizer was a choice.

    A paged optimizer's state that the driver evicted to the host pages in and out again every step:
    `evicted_bytes` of it (None: all of it, as when nothing is known of the card's room; 0 when the pool's
    peak and the state fit together). H200, Llama-3.2-3B with paged_adamw_8bit on a 40 GiB ballast-capped
    card: 13,835 tokens/s where the pool left room for the state, the 4 x 4 plan whose pool filled the card
    slowed from 11,305 to 6,346 (benchmarks/results/lowbit_search_3b_40gib_*)."""
    trained = trained_parameters(shape, config)
    element_bytes = 4 if config.adapter is not None else DTYPE_BYTES[config.weights_dtype]
    traffic = trained * OPTIMIZER_STEP_BYTES[config.optimizer](element_bytes) / speed.memory_bytes_per_second
    seconds = traffic + trained_tensors(shape, config) * PER_TENSOR_SECONDS.get(config.optimizer, 0.0)
    if config.optimizer in PAGED_STATE_BYTES:
        # Evicted paged state (CUDA unified memory) is paged in and out again, both ways over the host link
        # (bitsandbytes prefetches it per tensor).
        paged = trained * PAGED_STATE_BYTES[config.optimizer]
        seconds += 2 * (paged if evicted_bytes is None else min(paged, evicted_bytes)) / speed.pcie_bytes_per_second
    return seconds


def trained_tensors(shape: ModelShape, config: TrainConfig) -> int:
    """Parameter tensors the optimizer updates: every one of the model (`ModelShape.parameter_tensors`), LoRA's A
    and B of each targeted module in each layer ("all-linear": 7 projections, a Llama layer's), or peft's one
    prefix embedding (PrefixEncoder without a projection)."""
    adapter = config.adapter
    if adapter is None:
        if shape.parameter_tensors is not None:
            return shape.parameter_tensors
        return shape.num_layers * TENSORS_PER_LAYER + 3  # + embedding, final norm, head
    if adapter.kind == "prefix":
        return 1
    targets = 7 if isinstance(adapter.target_modules, str) else len(adapter.target_modules)
    return shape.num_layers * 2 * targets


def collective_seconds(num_bytes: float, factor: float, speed: GpuSpeed, num_nodes: int = 1) -> float:
    """A ring collective moving `factor` x `num_bytes` over each GPU's link (factor 2(N-1)/N for an
    all-reduce, (N-1)/N for an all-gather or reduce-scatter, N the ranks of all machines). Over several machines
    the machine's network carries the same, and the slower of the two links sets the time (module docstring)."""
    link = speed.interconnect_bytes_per_second
    if num_nodes > 1:
        link = min(link, speed.inter_node_bytes_per_second)
    return factor * num_bytes / (link * speed.collective_efficiency)


def gradient_bytes_per_parameter(config: TrainConfig) -> int:
    """Gradients have the trained parameters' dtype: the storage dtype for full fine-tuning (fp32 under
    mixed precision), fp32 for adapters (peft keeps them in fp32 by default, autocast_adapter_dtype)."""
    return 4 if config.adapter is not None else DTYPE_BYTES[config.weights_dtype]


def ddp_sync_seconds(shape: ModelShape, config: TrainConfig, speed: GpuSpeed, backward_seconds: float) -> float:
    """What DDP adds to a step: the all-reduce the last micro-batch's backward cannot hide, and the
    Reducer's copies of every gradient into its bucket and back (read + write each, memory-bound)."""
    gpus, nodes = config.world_size, config.num_nodes
    per_parameter = gradient_bytes_per_parameter(config)
    gradient_bytes = trained_parameters(shape, config) * per_parameter
    ring = 2 * (gpus - 1) / gpus
    all_reduce = collective_seconds(gradient_bytes, ring, speed, nodes)
    # The last bucket holds the parameters used first in forward, whose gradients are ready last: the
    # input embedding for full fine-tuning (one bucket of its own when larger than the cap).
    first_used = shape.vocab_size * shape.hidden_size * per_parameter if config.adapter is None else 0
    last_bucket = min(gradient_bytes, max(DDP_BUCKET_BYTES, first_used))
    exposed = max(all_reduce - backward_seconds, collective_seconds(last_bucket, ring, speed, nodes))
    copies = 4 * gradient_bytes / speed.memory_bytes_per_second
    return exposed + copies


def fsdp_units(shape: ModelShape) -> int:
    """FSDP units of accelerate's wrapping: one per decoder layer, the input embedding (when untied) and
    the tail (final norm and LM head); the root holds no parameters of its own."""
    return shape.num_layers + (1 if shape.tied_embeddings else 2)


def fsdp_micro_batch_seconds(
    shape: ModelShape, config: TrainConfig, speed: GpuSpeed, micro: float
) -> tuple[float, float]:
    """Seconds of a micro-batch under FSDP2: (one that accumulates without syncing, the last, which also
    reduce-scatters the gradients)."""
    gpus, nodes = config.world_size, config.num_nodes
    factor = (gpus - 1) / gpus
    param_bytes = 2 if config.amp != "none" else DTYPE_BYTES[config.weights_dtype]  # MixedPrecisionPolicy param_dtype
    head = shape.vocab_size * shape.hidden_size
    # Every unit is gathered in forward and again in backward (reshard_after_forward), but the tail unit
    # with the LM head stays gathered from forward to backward; frozen (LoRA base) weights are gathered too.
    gathered = (2 * (shape.num_parameters - head) + head) * param_bytes
    reduced = trained_parameters(shape, config) * param_bytes  # reduce_dtype = param_dtype
    first_gather = collective_seconds(head * param_bytes, factor, speed, nodes)  # the embedding's unit, first
    last_unit_bytes = head * param_bytes if config.adapter is None else reduced / shape.num_layers
    last_reduce = collective_seconds(min(reduced, last_unit_bytes), factor, speed, nodes)
    gather_seconds = collective_seconds(gathered, factor, speed, nodes)
    reduce_seconds = collective_seconds(reduced, factor, speed, nodes)
    own = fsdp_units(shape) * speed.fsdp_unit_seconds
    accumulating = micro + own + max(gather_seconds - micro, first_gather)
    last = micro + own + max(gather_seconds + reduce_seconds - micro, first_gather + last_reduce)
    return accumulating, last


def zero_step_seconds(shape: ModelShape, config: TrainConfig, speed: GpuSpeed, micro: float, backward: float,
                      optimizer: float) -> float:
    """Predicted seconds of one optimizer step under DeepSpeed ZeRO (strategy "deepspeed"), given the single-GPU
    `micro`-batch seconds (of which `backward`) and the GPU optimizer step of the full replica (`optimizer`).

    Every rank runs the single-GPU micro-batches in DeepSpeed's 16-bit dtype (b bytes); ZeRO adds, from what
    DeepSpeed 0.19.8 does (docs/deepspeed-zero.md), timed with this module's collective and copy rates:
    - collectives (N > 1, `collective_seconds`): ZeRO-2 reduce-scatters the gradients (b·T) in every backward,
      through its reduce bucket, hidden behind backward but for the last bucket; ZeRO-1 reduces at the accumulation
      boundary, not hidden; both all-gather the updated 16-bit partitions (b·T) after the step; each reduction also
      copies the gradients into its bucket and out (memory-bound, as DDP's Reducer). ZeRO-3 gathers the
      parameters for forward and again for backward and reduce-scatters the gradients in every micro-batch, as FSDP2
      does (the same bytes and overlap as `fsdp_micro_batch_seconds`), and its per-module hooks are charged
      FSDP2's fitted `fsdp_unit_seconds` per unit (an assumption: ZeRO-3's coordinator is not timed);
    - the optimizer steps 1/N of the trained parameters on the GPU; under offload (ZeRO-Offload) it runs on the
      CPU instead, DeepSpeedCPUAdam at `cpu_optimizer_params_per_second` (fitted to torch's CPU AdamW under FSDP2
      offload on the H200 host; DeepSpeed's vectorised CPU Adam is assumed no slower: Ren et al. 2021,
      "ZeRO-Offload", report it several times faster than PyTorch's CPU Adam), after each micro-batch's gradient
      partition was copied to the host in fp32 (4·T/N over the host link: DeepSpeed accumulates offloaded
      gradients on the CPU) and before the updated 16-bit partition comes back (b·T/N); none of these copies is
      assumed hidden;
    - ZeRO-3 parameter offload copies each rank's 16-bit partition (b·P/N) to the GPU for forward and again for
      backward, every micro-batch (the updated partition stays on the host);
    - NVMe (ZeRO-Infinity) reads and writes the optimizer's fp32 state and gradient (16·T/N) each step, and the
      offloaded parameters' partitions each time they are copied in, at `nvme_bytes_per_second` (assumed).
    Not calibrated: no DeepSpeed step has been timed against this model yet (only memory was measured,
    benchmarks/results/zero_h200.json); a dedicated calibration is out of its scope."""
    zero = config.zero
    if zero is None:
        raise ValueError(f"zero_step_seconds is for a DeepSpeed configuration, got {config.describe()}")
    gpus = config.num_gpus
    b = DTYPE_BYTES[config.amp] if config.amp != "none" else DTYPE_BYTES[config.weights_dtype]
    trained = trained_parameters(shape, config)
    head = shape.vocab_size * shape.hidden_size
    factor = (gpus - 1) / gpus
    accumulating = last = micro
    after_step = 0.0
    if gpus > 1:
        reduce = collective_seconds(trained * b, factor, speed)
        # each reduction copies the gradients into the reduce bucket and the reduced share out of it (ZeRO-1/2:
        # into grads_in_partition; ZeRO-3: reduce_scatter_coalesced's cat): read + write each, memory-bound work on
        # the GPU that no collective hides, charged as DDP's Reducer copies are (`ddp_sync_seconds`)
        copies = 4 * trained * b / speed.memory_bytes_per_second
        if zero.stage == 3:
            gathered = (2 * (shape.num_parameters - head) + head) * b
            first = collective_seconds(head * b, factor, speed)
            own = fsdp_units(shape) * speed.fsdp_unit_seconds + copies
            accumulating = last = micro + own + max(collective_seconds(gathered, factor, speed) + reduce - micro, first)
        elif zero.stage == 2:
            last_bucket = collective_seconds(min(trained, shape.hidden_size * shape.hidden_size) * b, factor, speed)
            accumulating = last = micro + copies + max(reduce - backward, last_bucket)
        else:
            last = micro + copies + reduce
        if zero.stage < 3:
            after_step = collective_seconds(trained * b, factor, speed)
    partition = trained / gpus
    step = optimizer / gpus
    if config.offload != "none":
        gradients_out = 4 * partition / speed.pcie_bytes_per_second
        accumulating, last = accumulating + gradients_out, last + gradients_out
        step = partition / speed.cpu_optimizer_params_per_second
        if zero.offload_device == "nvme":
            step += 2 * 16 * partition / speed.nvme_bytes_per_second
    if config.offload == "parameters":
        parameters_in = 2 * b * shape.num_parameters / gpus
        seconds = parameters_in / speed.pcie_bytes_per_second
        if zero.offload_device == "nvme":
            seconds += parameters_in / speed.nvme_bytes_per_second
        accumulating, last = accumulating + seconds, last + seconds
    elif config.offload == "optimizer":
        step += b * partition / speed.pcie_bytes_per_second
    return (config.grad_accum_steps - 1) * accumulating + last + after_step + step


def tokens_per_second(shape: ModelShape, config: TrainConfig, speed: GpuSpeed,
                      evicted_bytes: int | None = None) -> float:
    """Predicted training throughput over all GPUs of the configuration (`evicted_bytes`: `optimizer_seconds`), in
    tokens/s: every sequence row counts, DPO's chosen and rejected rows both (`sequence_rows`), as `memtune run`
    reports them."""
    tokens = config.effective_batch_size * config.seq_len * sequence_rows(config)
    return tokens / step_seconds(shape, config, speed, evicted_bytes)
