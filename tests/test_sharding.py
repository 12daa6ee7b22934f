"""The FSDP memory model on small models (CPU, fake tensors, a fake process group)."""

from __future__ import annotations

import pytest

from memtune.config import TrainConfig
from memtune.errors import UsageError
from memtune.predict.fsdp import (
    FSDP_BUFFERS,
    SHARDED_PERIODS,
    _trace,
    cached_trace_sharded,
    estimate_sharded,
    extend_sharded,
    simulate_streams,
)
from memtune.predict.single import estimate_single
from memtune.predict.trace import COMPUTE_STREAM, rounded, traced_depth
from memtune.sources import catalog_config


def small_llama(layers: int = 6, hidden: int = 256, vocab: int = 4096):
    """Llama-3.2 shaped (tied embeddings, grouped KV heads), large enough that 512-byte rounding is noise."""
    config = catalog_config("meta-llama/Llama-3.2-1B")
    config.hidden_size, config.intermediate_size, config.num_attention_heads = hidden, 2 * hidden, 4
    config.num_key_value_heads, config.head_dim, config.vocab_size = 2, hidden // 4, vocab
    config.num_hidden_layers = layers
    config.bos_token_id = config.eos_token_id = 0
    return config


def allocated(trace, category: str) -> int:
    return sum(event.num_bytes for event in trace.events
               if event.kind == "alloc" and trace.categories[event.source] == category)


def test_one_gpu_without_mixed_precision_matches_the_unsharded_estimate():
    config = TrainConfig(seq_len=128, micro_batch_size=2)
    sharded = estimate_sharded(small_llama(), config)
    plain = estimate_single(small_llama(), config, device="cpu")
    # FSDP on one GPU still copies the unit in use (and the tied embedding/head unit, gathered from
    # the embedding's forward to its backward) into separate "unsharded" storages: a few percent more.
    assert plain.peak_allocated_bytes <= sharded.peak_allocated_bytes <= 1.10 * plain.peak_allocated_bytes
    assert sharded.breakdown["weights"] == plain.breakdown["weights"]


@pytest.mark.parametrize("num_gpus", [2, 4])
def test_weights_gradients_and_optimizer_state_shrink_with_the_number_of_gpus(num_gpus):
    config = TrainConfig(seq_len=64, micro_batch_size=1, amp="bf16")
    one = cached_trace_sharded(small_llama(), config)
    many = cached_trace_sharded(small_llama(), config.replace(num_gpus=num_gpus))
    for category in ("weights", "gradients", "optimizer"):
        assert allocated(one, category) > 0
        assert allocated(many, category) == pytest.approx(allocated(one, category) / num_gpus, rel=0.05), category
    assert simulate_streams(many.events)[0] < simulate_streams(one.events)[0]


def test_several_gpus_add_nccls_own_memory_to_the_fixed_memory_of_each_gpu():
    from memtune.config import DEFAULT_CONTEXT_BYTES
    from memtune.predict.ddp import estimate_replicated
    from memtune.predict.peak import NCCL_BYTES

    config = TrainConfig(seq_len=64, micro_batch_size=1, amp="bf16")
    assert estimate_sharded(small_llama(), config.replace(offload="parameters")).context_bytes == DEFAULT_CONTEXT_BYTES
    two = estimate_sharded(small_llama(), config.replace(num_gpus=2))
    assert two.context_bytes == DEFAULT_CONTEXT_BYTES + NCCL_BYTES
    assert two.total_bytes == two.peak_reserved_bytes + two.workspace_bytes + DEFAULT_CONTEXT_BYTES + NCCL_BYTES
    ddp = estimate_replicated(small_llama(), config.replace(num_gpus=2, strategy="ddp"), device="cpu")
    assert ddp.context_bytes == DEFAULT_CONTEXT_BYTES + NCCL_BYTES


def test_cpu_offload_keeps_parameters_gradients_and_optimizer_state_off_the_gpu():
    config = TrainConfig(seq_len=64, micro_batch_size=1, amp="bf16", gradient_checkpointing=True)
    resident = cached_trace_sharded(small_llama(), config)
    offloaded = cached_trace_sharded(small_llama(), config.replace(offload="parameters"))
    assert allocated(offloaded, "optimizer") == 0
    assert allocated(offloaded, "weights") < 0.001 * allocated(resident, "weights")  # buffers (RoPE) only
    # Each sharded gradient leaves for the host as soon as it is reduced: never two alive at once.
    live, most = {}, 0
    for event in offloaded.events:
        if offloaded.categories[event.source] == "gradients":
            live.pop(event.storage, None) if event.kind == "free" else live.update({event.storage: event.num_bytes})
            most = max(most, len(live))
    assert most == 1
    assert estimate_sharded(small_llama(), config.replace(offload="parameters")).peak_reserved_bytes < \
        estimate_sharded(small_llama(), config).peak_reserved_bytes


def test_a_layer_is_gathered_in_the_parameter_dtype_for_its_forward_and_freed_after_it():
    model = small_llama()
    config = TrainConfig(seq_len=64, micro_batch_size=1, amp="bf16", num_gpus=2)
    trace = cached_trace_sharded(model, config)
    layer = 3  # a template copy in the extended trace
    # The first run of events tagged with the layer after the shards are in place is its forward.
    runs, start = [], 0
    events = trace.events
    for index in range(1, len(events) + 1):
        if index == len(events) or events[index].layer != events[start].layer:
            runs.append(events[start:index])
            start = index
    forward = [run for run in runs if run[0].layer == layer][1]
    gathered = [(event.storage, event.num_bytes) for event in forward
                if event.kind == "alloc" and trace.categories[event.source] == FSDP_BUFFERS
                and event.stream == COMPUTE_STREAM]
    hidden, inner, kv = model.hidden_size, model.intermediate_size, model.num_key_value_heads * model.head_dim
    shapes = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden), (inner, hidden), (inner, hidden),
              (hidden, inner), (hidden,), (hidden,)]
    expected = sorted(rounded(2 * (shape[0] * (shape[1] if len(shape) > 1 else 1))) for shape in shapes)
    assert sorted(size for _, size in gathered) == expected  # one bf16 storage per parameter
    freed = {event.storage for event in forward if event.kind == "free"}
    assert {sid for sid, _ in gathered} <= freed  # resharded after forward
    # The all-gather output (world size x shard, bf16) lives on FSDP's own stream.
    all_gather = [event.num_bytes for event in forward
                  if event.kind == "alloc" and event.stream != COMPUTE_STREAM
                  and trace.categories[event.source] == FSDP_BUFFERS]
    assert rounded(sum(expected)) in all_gather or max(all_gather) >= sum(expected)


@pytest.mark.parametrize(
    "config",
    [
        TrainConfig(seq_len=32, micro_batch_size=2, amp="bf16", gradient_checkpointing=True, num_gpus=4),
        TrainConfig(seq_len=32, micro_batch_size=2, grad_accum_steps=2, num_gpus=2),
        TrainConfig(seq_len=32, micro_batch_size=2, amp="bf16", offload="parameters"),
    ],
    ids=["bf16-mixed+ckpt, 4 GPUs", "fp32 accum 2, 2 GPUs", "offload, 1 GPU"],
)
def test_extending_a_five_layer_trace_reproduces_tracing_every_layer(config):
    # One step: its optimizer step creates the state and zero_grad frees the gradients.
    assert traced_depth(8, 1, SHARDED_PERIODS) == 5
    full = _trace(small_llama(8, hidden=128, vocab=1000), config, 1)
    shallow = _trace(small_llama(5, hidden=128, vocab=1000), config, 1)
    extended = extend_sharded(shallow, 8, 1)
    assert extended is not None

    def signature(events, categories):
        return [(event.kind, event.num_bytes, event.stream, categories[event.source]) for event in events]

    assert signature(extended, shallow.categories) == signature(full.events, full.categories)
    assert simulate_streams(extended) == simulate_streams(full.events)


def test_estimate_sends_sharded_and_offloaded_configurations_to_the_fsdp_model(monkeypatch):
    from types import SimpleNamespace

    from memtune.predict import estimate as estimate_module
    from memtune.predict import fsdp, single

    def by(name: str):
        return lambda model, config, **_: SimpleNamespace(by=name, host_bytes=0)

    monkeypatch.setattr(fsdp, "estimate_sharded", by("fsdp"))
    monkeypatch.setattr(single, "estimate_single", by("single"))
    model = small_llama()
    assert estimate_module.estimate(model, TrainConfig(seq_len=16, num_gpus=2)).by == "fsdp"
    offloaded = estimate_module.estimate(model, TrainConfig(seq_len=16, offload="parameters"))
    assert offloaded.by == "fsdp" and offloaded.host_bytes > 0  # the offloaded shards, added after the trace
    assert estimate_module.estimate(model, TrainConfig(seq_len=16)).by == "single"


def test_optimizer_only_offload_is_refused_with_the_alternative():
    with pytest.raises(UsageError, match="offload 'parameters'"):
        estimate_sharded(small_llama(), TrainConfig(seq_len=64, offload="optimizer"))


@pytest.mark.parametrize("num_gpus, offload", [(2, "none"), (1, "parameters")], ids=["2-gpus", "offload"])
def test_the_chunked_loss_traces_under_fsdp_and_lowers_the_peak_of_a_large_vocabulary(num_gpus, offload):
    """The chunked forward runs inside FSDP2's root module on fake tensors (the LM head of the tail unit called per
    chunk and again in backward): with a 32k vocabulary for hidden 256 the full logits dominate the standard
    loss's peak, and the chunked loss's peak and logits memory are below it."""
    model_config = small_llama(layers=2, vocab=32000)
    standard = TrainConfig(seq_len=512, micro_batch_size=2, amp="bf16", num_gpus=num_gpus, offload=offload)
    traces = {loss: _trace(model_config, standard.replace(loss=loss), steps=1) for loss in ("standard", "chunked")}
    peaks = {loss: simulate_streams(trace.events)[0] for loss, trace in traces.items()}
    assert 0 < peaks["chunked"] < 0.8 * peaks["standard"]
    for category in ("weights", "gradients", "optimizer"):  # the model state is the same
        assert allocated(traces["chunked"], category) == allocated(traces["standard"], category), category
    chunked, full = estimate_sharded(model_config, standard.replace(loss="chunked")), estimate_sharded(model_config,
                                                                                                      standard)
    assert 0 < chunked.peak_allocated_bytes < full.peak_allocated_bytes
    # logits and loss (the standard loss's backward is labelled temporaries, the chunked one's recomputation logits)
    assert 0 < sum(chunked.breakdown[name] for name in ("logits", "temporaries")) < 0.7 * sum(
        full.breakdown[name] for name in ("logits", "temporaries"))


def test_a_tied_embeddings_fresh_head_gradient_is_summed_in_place_under_fsdp(monkeypatch):
    """Liger's fused loss hands back the LM head's weight gradient as a fresh tensor (not a transposed view, as a
    matmul's is), so autograd adds the tied embedding's gradient into it in place (input_buffer.cpp
    `can_accumulate_inplace`); the sharded trace records that sum as the single-GPU one does. H200, Llama-3.2-1B 2 x
    2048, checkpointing, CPU offload on 1 GPU: with the sum out of place the prediction was +11.05% reserved,
    with it in place -0.04% (benchmarks/results/history_offload_1gpu_liger_h200.json.gz)."""
    from memtune import config as config_module
    from memtune.predict import fsdp

    assert fsdp.ShardedCounter().in_place_sums
    monkeypatch.setattr(config_module, "_installed", lambda name: True)  # the stand-in traces without liger-kernel
    model_config = small_llama(layers=5, vocab=8192)
    config = TrainConfig(seq_len=256, micro_batch_size=2, amp="bf16", gradient_checkpointing=True,
                         offload="parameters", loss="liger")
    head_sized = rounded(model_config.vocab_size * model_config.hidden_size * 2)  # the bf16 head gradient

    def head_sized_allocations(in_place: bool) -> int:
        def init(self) -> None:
            original(self)
            self.in_place_sums = in_place

        monkeypatch.setattr(fsdp.ShardedCounter, "__init__", init)
        trace = _trace(model_config, config, steps=1)
        return sum(1 for event in trace.events if event.kind == "alloc" and event.num_bytes == head_sized)

    original = fsdp.ShardedCounter.__init__
    assert head_sized_allocations(in_place=True) == head_sized_allocations(in_place=False) - 1


@pytest.mark.parametrize("num_gpus, offload", [(2, "none"), (1, "parameters")], ids=["2-gpus", "offload"])
def test_lora_with_an_untied_head_traces_the_chunked_loss_under_fsdp(num_gpus, offload):
    """A peft model has no final norm accelerate can find (`_find_final_norm` looks at the PeftModel's children), so
    an untied LM head is sharded in a unit of its own, which nothing gathers before the chunked loss: the loss then
    calls the head, whose hooks gather it (it raised "the LM head's weight is sharded" before)."""
    from memtune.config import Adapter

    model_config = small_llama()
    model_config.tie_word_embeddings = False
    config = TrainConfig(seq_len=64, micro_batch_size=1, amp="bf16", num_gpus=num_gpus, offload=offload,
                         adapter=Adapter(), loss="chunked")
    assert estimate_sharded(model_config, config).peak_allocated_bytes > 0
