"""The estimator on tiny models (CPU, fake tensors) and against GPU measurements recorded on an H200."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from memtune.config import Adapter, TrainConfig
from memtune.predict.allocator import simulate
from memtune.predict.estimate import estimate
from memtune.predict.trace import Event, extend, shallow_config, trace_step, traced_depth
from memtune.sources import catalog_config

DATA = Path(__file__).parent / "data"


def tiny_llama(layers: int = 6):
    config = catalog_config("meta-llama/Llama-3.2-1B")
    config.hidden_size, config.intermediate_size, config.num_attention_heads = 128, 256, 4
    config.num_key_value_heads, config.head_dim, config.vocab_size = 2, 32, 1000
    config.num_hidden_layers = layers
    return config


def test_trace_counts_weights_and_optimizer_state_exactly():
    config = TrainConfig(seq_len=16, micro_batch_size=2)
    trace = trace_step(tiny_llama(3), config, device="cpu")
    from memtune.sources import parameter_count

    params = parameter_count(tiny_llama(3))
    weights = trace.peak_breakdown.get("weights", 0)
    optimizer = trace.peak_breakdown.get("optimizer", 0)
    # fp32 weights; AdamW keeps two fp32 moments per parameter (plus a 4-byte step per tensor, rounded to 512 B).
    assert abs(weights - 4 * params) / (4 * params) < 0.05
    assert 8 * params <= optimizer <= 8 * params * 1.1


@pytest.mark.parametrize(
    "config",
    [
        TrainConfig(seq_len=32, micro_batch_size=2),
        TrainConfig(seq_len=32, micro_batch_size=2, amp="bf16", gradient_checkpointing=True),
        TrainConfig(seq_len=32, micro_batch_size=2, weights_dtype="bf16", adapter=Adapter(rank=4)),
    ],
    ids=["fp32", "bf16-mixed+ckpt", "bf16+lora"],
)
def test_extending_a_shallow_trace_matches_tracing_every_layer(config):
    full = trace_step(tiny_llama(8), config, device="cpu")
    shallow = trace_step(tiny_llama(3), config, device="cpu")
    extended = extend(shallow, 8)
    assert len(extended) == len(full.events)
    full_result, extended_result = simulate(full.events), simulate(extended)
    assert extended_result.peak_allocated_bytes == full_result.peak_allocated_bytes
    # Tiny tensors live in 2 MiB small-pool segments: allow one segment either way.
    assert abs(extended_result.peak_reserved_bytes - full_result.peak_reserved_bytes) <= 2 * 1024 * 1024


def test_memory_techniques_lower_the_estimate_in_the_expected_order():
    model = tiny_llama(4)
    base = TrainConfig(seq_len=256, micro_batch_size=8)
    full = estimate(model, base, device="cpu")
    checkpointed = estimate(model, base.replace(gradient_checkpointing=True), device="cpu")
    lora = estimate(model, base.replace(adapter=Adapter(rank=4)), device="cpu")
    assert checkpointed.peak_allocated_bytes < full.peak_allocated_bytes
    assert lora.breakdown.get("optimizer", 0) < full.breakdown["optimizer"] / 10
    assert full.total_bytes == full.peak_reserved_bytes + full.workspace_bytes + full.context_bytes
    assert set(full.breakdown) >= {"weights", "optimizer", "activations", "overhead"}


def test_shallow_config_keeps_layer_pattern():
    config = catalog_config("google/gemma-2-2b")
    cut = shallow_config(config, 6)
    assert cut.num_hidden_layers == 6 and len(cut.layer_types) == 6
    assert config.num_hidden_layers == 26  # the original is untouched


def _ground_truth_cases():
    from benchmarks.cases import accuracy_cases

    truth = {row["case"]: row for row in json.loads((DATA / "ground_truth_h200.json").read_text())["cases"]}
    # The gpt2 cases trace in seconds on two cores; the others run in benchmarks/accuracy.py.
    return [pytest.param(case, truth[case.name], marks=KNOWN_MISSES.get(case.name, ())) for case in accuracy_cases()
            if case.model in ("gpt2",)]


KNOWN_MISSES: dict[str, pytest.MarkDecorator] = {}
"""Cases expected to miss, by name (strict xfail). gpt2 4x512 bf16-mixed was 7% under until the trace recorded
CUDA dropout's mask before its output (trace.KERNEL_ALLOCATION_ORDER)."""


@pytest.mark.parametrize("case,truth", _ground_truth_cases(), ids=lambda value: getattr(value, "name", ""))
def test_gpu_free_path_matches_h200_measurements(case, truth):
    """GPU-free prediction vs torch.cuda.max_memory_allocated/reserved measured on an H200 (torch 2.11)."""
    from benchmarks.cases import model_config

    predicted = estimate(model_config(case), case.config, device="cpu")
    assert abs(predicted.peak_allocated_bytes / truth["peak_allocated_bytes"] - 1) < 0.02
    assert abs(predicted.peak_reserved_bytes / truth["peak_reserved_bytes"] - 1) < 0.05


def test_autograd_sums_a_gradient_in_place_unless_it_is_a_view():
    """The engine adds a tensor's second gradient into the first in place when it holds the first's only
    reference and storage (input_buffer.cpp); fake tensors would allocate the sum. A residual stream: x's
    gradient arrives through the residual first, then through the branch, and is summed in place."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from memtune.predict.trace import StorageCounter

    def backward_allocs(in_place_sums: bool) -> int:
        counter = StorageCounter()
        counter.in_place_sums = in_place_sums
        with FakeTensorMode(), counter:
            weight = torch.empty(32, 32, requires_grad=True)
            x = torch.empty(8, 32, requires_grad=True)
            loss = (x + x @ weight).pow(2).sum()  # pow: a dense gradient (sum's alone is an expand)
            before = len(counter.trace.events)
            loss.backward()
            return sum(event.kind == "alloc" for event in counter.trace.events[before:])

    # the sum of x's two gradients: in place for the single-GPU rule, allocated without it
    assert backward_allocs(in_place_sums=True) == backward_allocs(in_place_sums=False) - 1


def test_a_tied_weights_view_gradient_is_summed_out_of_place():
    """fp32 tied embedding/LM head: the head's gradient is a transposed view, so the GPU sums out of place
    (tests/data/ground_truth_h200.json); under autocast it comes fresh out of the cast and is summed in place."""
    from transformers import LlamaConfig

    from memtune.predict.trace import trace_step

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True)
    vocab_bytes = 512 * 64 * 4

    def allocs_of_vocab_size(amp: str) -> int:
        train_config = TrainConfig(seq_len=16, micro_batch_size=2, weights_dtype="fp32", amp=amp)
        trace = trace_step(config, train_config, device="cpu", steps=1)
        return sum(event.kind == "alloc" and event.num_bytes == vocab_bytes for event in trace.events)

    # weight, its gradient (+ the out-of-place tied sum in fp32), AdamW's two moments
    assert allocs_of_vocab_size("none") == allocs_of_vocab_size("bf16") + 1


def test_the_depth_rule_traces_whole_periods_and_ends_on_the_same_layer_type():
    assert traced_depth(16, 1) == 3 and traced_depth(16, 1, periods=5) == 5
    assert traced_depth(26, 2) == 6  # gemma-2: alternating sliding/full attention
    assert traced_depth(27, 2) == 7 and traced_depth(27, 2) % 2 == 27 % 2
    assert traced_depth(3, 1) == 3 and traced_depth(4, 1, periods=5) == 4  # shallow models are traced whole


def test_events_have_named_fields_and_an_extended_copy_keeps_its_traced_storage():
    config = TrainConfig(seq_len=16, micro_batch_size=2)
    trace = trace_step(tiny_llama(3), config, device="cpu")
    assert all(isinstance(event, Event) and event.source == event.storage for event in trace.events)
    extended = extend(trace, 6)
    copies: dict[int, set] = {}
    for event in extended:
        if event.kind == "alloc":
            copies.setdefault(event.source, set()).add(event.storage)
    # a storage of the template layer is made once per copy, each with a storage of its own
    template = [event.source for event in trace.events if event.kind == "alloc" and event.layer == 1]
    assert template and all(len(copies[source]) == 4 for source in template)
    assert Event.alloc("x", 512) == Event("alloc", "x", 512, -1, "x", 0)


def test_the_public_estimate_follows_the_number_of_gpus_and_agrees_with_the_search():
    """memtune.estimate dispatches as the search's predictor does: 4-GPU FSDP is one rank's shard (plus
    NCCL's memory), not the one-GPU step; the same configuration gets the same figures and verdicts."""
    import memtune
    from memtune.fit import ModelPredictor
    from memtune.predict import throughput
    from memtune.predict.estimate import fits_under
    from memtune.predict.peak import NCCL_BYTES
    from memtune.sources import parameter_count
    from tests.models import tiny_llama as llama

    model_config = llama()
    predictor = ModelPredictor(model_config, parameter_count(model_config), throughput.gpu_speed("H100"), device="cpu")
    one_gpu = TrainConfig(seq_len=64, micro_batch_size=2)
    for config in (one_gpu, one_gpu.replace(num_gpus=4), one_gpu.replace(num_gpus=2, strategy="ddp")):
        public, searched = memtune.estimate(model_config, config, device="cpu"), predictor.memory(config)
        assert public.to_dict() | {"seconds": 0} == searched.to_dict() | {"seconds": 0}
        for usable in (public.total_bytes, public.total_bytes - 1, public.peak_allocated_bytes):
            assert fits_under(model_config, public, usable, "cpu") == predictor.fits(searched, usable)
    single = memtune.estimate(model_config, one_gpu, device="cpu")
    sharded = memtune.estimate(model_config, one_gpu.replace(num_gpus=4), device="cpu")
    assert single.total_bytes != sharded.total_bytes
    assert sharded.context_bytes == single.context_bytes + NCCL_BYTES
    assert sharded.config.num_gpus == 4
    assert "fsdp_buffers" in sharded.breakdown and "fsdp_buffers" not in single.breakdown


# -- a failed trace falls back to the other path -----------------------------------------------------


def _simulate_cuda_path(monkeypatch):
    """The fake trace below traces "cuda" as cpu: lift the guard that refuses a cuda trace without a GPU."""
    from memtune.predict import estimate as estimate_module

    monkeypatch.setattr(estimate_module, "check_trace_device", lambda device: None)


def _failing_on(devices, error_of):
    """A trace_step that raises `error_of()` on `devices` and traces for real elsewhere; records calls."""
    from memtune.predict import single

    real = single.trace_step
    calls = []

    def trace_step(model_config, train_config, device="cpu", steps=2):
        calls.append(device)
        if device in devices:
            raise error_of()
        trace = real(model_config, train_config, device="cpu", steps=steps)  # no GPU here: "cuda" traced as cpu
        trace.device = device
        return trace

    return trace_step, calls


def _data_dependent():
    from torch._subclasses.fake_tensor import DataDependentOutputException

    return DataDependentOutputException(torch.ops.aten._local_scalar_dense.default)


def test_a_failed_cuda_trace_falls_back_to_the_cpu_path_with_a_note(monkeypatch):
    from memtune.predict import single

    fake_trace, calls = _failing_on({"cuda"}, _data_dependent)
    monkeypatch.setattr(single, "trace_step", fake_trace)
    _simulate_cuda_path(monkeypatch)
    monkeypatch.setattr(single, "_TRACE_CACHE", {})
    config = TrainConfig(seq_len=16, micro_batch_size=2)
    result = estimate(tiny_llama(3), config, device="cuda")
    assert calls == ["cuda", "cpu"]
    assert result.trace_device == "cpu"
    note = result.trace_note
    assert "\n" not in note and "cuda trace of llama failed" in note and "DataDependentOutputException" in note
    assert "_local_scalar_dense" in note and "cpu path" in note
    # The same figures as asking for the CPU path, which is now cached without the note.
    direct = estimate(tiny_llama(3), config, device="cpu")
    assert calls == ["cuda", "cpu"]
    assert direct.trace_note == "" and direct.peak_reserved_bytes == result.peak_reserved_bytes
    assert direct.peak_allocated_bytes == result.peak_allocated_bytes
    assert result.to_dict()["trace_device"] == "cpu"


def test_both_paths_failing_is_a_usage_error_naming_model_op_and_versions(monkeypatch):
    import transformers

    from memtune.errors import UsageError
    from memtune.predict import single

    fake_trace, calls = _failing_on({"cuda", "cpu"}, _data_dependent)
    monkeypatch.setattr(single, "trace_step", fake_trace)
    _simulate_cuda_path(monkeypatch)
    monkeypatch.setattr(single, "_TRACE_CACHE", {})
    with pytest.raises(UsageError) as raised:
        estimate(tiny_llama(3), TrainConfig(seq_len=16, micro_batch_size=2), device="cuda")
    message = str(raised.value)
    assert calls == ["cuda", "cpu"]
    assert raised.value.exit_code == 2
    assert "'llama'" in message and "the cuda trace failed" in message and "the cpu trace failed" in message
    assert "aten._local_scalar_dense" in message
    assert f"torch {torch.__version__}" in message and f"transformers {transformers.__version__}" in message


def test_the_cpu_path_falls_back_to_fake_cuda_only_where_a_gpu_is_seen(monkeypatch):
    from memtune.errors import UsageError
    from memtune.predict import single

    fake_trace, calls = _failing_on({"cpu"}, lambda: RuntimeError("no fake kernel for aten.some_op\nsecond line"))
    monkeypatch.setattr(single, "trace_step", fake_trace)
    _simulate_cuda_path(monkeypatch)
    monkeypatch.setattr(single, "_TRACE_CACHE", {})
    config = TrainConfig(seq_len=16, micro_batch_size=2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsageError, match="RuntimeError: no fake kernel for aten.some_op") as raised:
        estimate(tiny_llama(3), config, device="cpu")
    assert calls == ["cpu"] and "second line" not in str(raised.value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    result = estimate(tiny_llama(3), config, device="cpu")
    assert calls == ["cpu", "cpu", "cuda"]
    assert result.trace_device == "cuda" and "traced on the cuda path instead" in result.trace_note


def test_memtunes_own_errors_are_not_retried_on_the_other_path(monkeypatch):
    from memtune.errors import UsageError
    from memtune.predict import single

    fake_trace, calls = _failing_on({"cuda", "cpu"}, lambda: UsageError("the chunked loss does not support cohere"))
    monkeypatch.setattr(single, "trace_step", fake_trace)
    _simulate_cuda_path(monkeypatch)
    monkeypatch.setattr(single, "_TRACE_CACHE", {})
    with pytest.raises(UsageError, match="chunked loss"):
        estimate(tiny_llama(3), TrainConfig(seq_len=16, micro_batch_size=2), device="cuda")
    assert calls == ["cuda"]


def test_fits_under_replays_the_fallback_trace(monkeypatch):
    from memtune.predict import single
    from memtune.predict.estimate import fits_under

    fake_trace, calls = _failing_on({"cuda"}, _data_dependent)
    monkeypatch.setattr(single, "trace_step", fake_trace)
    _simulate_cuda_path(monkeypatch)
    monkeypatch.setattr(single, "_TRACE_CACHE", {})
    config = TrainConfig(seq_len=16, micro_batch_size=2)
    result = estimate(tiny_llama(3), config, device="cuda")
    for device in ("cuda", None):
        assert fits_under(tiny_llama(3), result, result.total_bytes, device)
        assert not fits_under(tiny_llama(3), result, result.peak_allocated_bytes // 2, device)
    assert calls == ["cuda", "cpu"]


def test_a_failed_sharded_trace_is_a_usage_error_naming_the_model(monkeypatch):
    from memtune.errors import UsageError
    from memtune.predict import fsdp

    def trace_sharded(model_config, train_config):
        raise _data_dependent()

    monkeypatch.setattr(fsdp, "trace_sharded", trace_sharded)
    monkeypatch.setattr(fsdp, "_TRACE_CACHE", {})
    with pytest.raises(UsageError, match=r"model type 'llama'.*sharded \(FSDP\) trace.*_local_scalar_dense"):
        estimate(tiny_llama(3), TrainConfig(seq_len=16, micro_batch_size=2, num_gpus=2), device="cpu")


@pytest.mark.parametrize("dtype, copies", [(torch.float16, 0), (torch.bfloat16, 1)])
def test_cpu_emulation_softmax_to_fp32_allocates_as_cuda(dtype, copies):
    """CUDA's softmax of an fp16 input asked for fp32 runs the fused half_to_float kernel (no fp32 copy of
    the input); bf16 is copied to fp32 first on both devices (aten/src/ATen/native/SoftMax.cpp)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from memtune.predict.emulation import CudaEmulation
    from memtune.predict.trace import StorageCounter

    counter = StorageCounter()
    with FakeTensorMode(), counter, CudaEmulation():
        scores = torch.empty(2, 4, 64, 64, dtype=dtype)
        before = len(counter.trace.events)
        probabilities = torch.nn.functional.softmax(scores, dim=-1, dtype=torch.float32)
        allocs = [e.num_bytes for e in counter.trace.events[before:] if e.kind == "alloc"]
    assert probabilities.dtype == torch.float32
    assert allocs == [4 * scores.numel()] * (1 + copies)


def test_the_search_tells_a_fallback_note_once(monkeypatch):
    """fit/plan's predictor hands the fallback note to the progress printer (stderr), once per note."""
    from memtune.fit import ModelPredictor
    from memtune.predict import single, throughput

    fake_trace, calls = _failing_on({"cuda"}, _data_dependent)
    monkeypatch.setattr(single, "trace_step", fake_trace)
    _simulate_cuda_path(monkeypatch)
    monkeypatch.setattr(single, "_TRACE_CACHE", {})
    told: list[str] = []
    predictor = ModelPredictor(tiny_llama(3), 1_000_000, throughput.gpu_speed("H100"), device="cuda", note=told.append)
    predictor.memory(TrainConfig(seq_len=16, micro_batch_size=2))
    predictor.memory(TrainConfig(seq_len=16, micro_batch_size=2))  # cached: not told again
    assert len(told) == 1 and told[0].startswith("note: the cuda trace of llama failed")


def _recorded(run) -> list[tuple[str, int]]:
    """(kind, bytes) of the events that `run(counter)` returns (a slice of `counter.trace.events`, taken while
    its tensors live), traced on fake CPU tensors under the trace's modes; a free with its storage's bytes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from memtune.predict.emulation import CudaEmulation, GpuKernels
    from memtune.predict.trace import StorageCounter

    counter = StorageCounter()
    with FakeTensorMode(), counter, GpuKernels(), CudaEmulation():
        events = run(counter)
    sizes = {event.storage: event.num_bytes for event in counter.trace.events if event.kind == "alloc"}
    return [(event.kind, sizes[event.storage]) for event in events]


def test_dropout_records_its_mask_before_its_output_as_cuda_allocates_them():
    """aten/src/ATen/native/cuda/Dropout.cu `dropout_cuda`: the 1-byte mask, then the output."""

    def run(counter):
        hidden = torch.empty(4, 256, 1024, dtype=torch.bfloat16, requires_grad=True)  # the mask is saved
        start = len(counter.trace.events)
        out = torch.nn.functional.dropout(hidden, 0.1, training=True)
        assert out.shape == hidden.shape
        return counter.trace.events[start:]

    assert _recorded(run) == [("alloc", 1024 * 1024), ("alloc", 2 * 1024 * 1024)]


def test_math_attention_adds_the_mask_in_place_and_makes_safe_softmax_temporaries():
    """The math SDPA path (fp32 and grouped KV heads: no fused CUDA kernel) as the H200 runs it: the mask
    added into the scores in place (no second scores matrix), `_safe_softmax`'s boolean isneginf mask next to
    its output, and the scores freed after the softmax."""
    scores = 2 * 4 * 128 * 128 * 4  # batch x heads x L x S, fp32

    def run(counter):
        query = torch.empty(2, 4, 128, 64, requires_grad=True)
        key, value = torch.empty(2, 2, 128, 64, requires_grad=True), torch.empty(2, 2, 128, 64, requires_grad=True)
        start = len(counter.trace.events)
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True, enable_gqa=True)
        assert out.shape == query.shape
        return counter.trace.events[start:]

    events = [(kind, size) for kind, size in _recorded(run) if size in (scores, scores // 4)]
    assert events == [("alloc", scores), ("alloc", scores), ("alloc", scores // 4), ("free", scores // 4),
                      ("free", scores)]


def test_softmax_backward_allocates_cudas_grad_times_output_temporary():
    """aten/src/ATen/native/cuda/SoftMax.cu `softmax_backward_cuda_out`: `tmp = grad * output` after the
    result, freed when the op returns."""
    size = 2 * 4 * 128 * 128 * 4

    def run(counter):
        scores = torch.empty(2, 4, 128, 128, requires_grad=True)
        probabilities = torch.softmax(scores, dim=-1)
        grad = torch.empty_like(probabilities)
        start = len(counter.trace.events)
        (gradient,) = torch.autograd.grad(probabilities, scores, grad)
        assert gradient.shape == scores.shape
        return counter.trace.events[start:]

    assert [event for event in _recorded(run) if event[1] == size] == [("alloc", size), ("alloc", size), ("free", size)]


def _allocator_view(events) -> list[tuple[str, tuple[int, ...]]]:
    """What the caching allocator sees of an event stream: each allocation's bytes, and each run of frees
    between two allocations as the sorted bytes freed (the order inside a run changes no free block)."""
    sizes, view, frees = {}, [], []
    for event in events:
        if event.kind == "free":
            frees.append(sizes.get(event.storage, 0))
            continue
        if frees:
            view.append(("free", tuple(sorted(frees))))
            frees = []
        sizes[event.storage] = event.num_bytes
        view.append(("alloc", (event.num_bytes,)))
    return view + ([("free", tuple(sorted(frees)))] if frees else [])


@pytest.mark.parametrize(
    "config",
    [TrainConfig(seq_len=32, micro_batch_size=2),
     TrainConfig(seq_len=32, micro_batch_size=2, amp="bf16", gradient_checkpointing=True),
     TrainConfig(seq_len=32, micro_batch_size=2, weights_dtype="bf16", adapter=Adapter(rank=4))],
    ids=["fp32", "bf16-mixed+ckpt", "bf16+lora"],
)
def test_an_extended_trace_frees_across_layers_where_tracing_every_layer_does(config):
    """A checkpointed layer's saved input (the previous layer's output) is freed by that layer's backward, a
    gradient passed down a layer by the next one, and with a frozen LoRA base the previous layer's output
    when the next layer returns: each copy of the template frees its neighbour's storage, so the allocator
    sees the stream of the full-depth trace (before, the last layer freed every copy's at once: Qwen2.5-0.5B
    4 x 1024 fp32+ckpt was predicted 16% over the H200's 14.52 GiB, and 4 x 1024 bf16+lora 1.5% over)."""
    full = trace_step(tiny_llama(8), config, device="cpu")
    extended = extend(trace_step(tiny_llama(3), config, device="cpu"), 8)
    assert _allocator_view(extended) == _allocator_view(full.events)


def test_attention_scope_marks_attention_also_when_checkpointing_recomputes_it():
    """The fake-CUDA path's AttentionScope sets IN_ATTENTION for the length of each SDPA call: in forward and
    in the forward that non-reentrant checkpointing runs again in backward (here on CPU tensors, where SDPA
    runs the CPU flash kernel)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.checkpoint import checkpoint

    from memtune.predict.emulation import IN_ATTENTION, AttentionScope

    seen = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default:
                seen.append(IN_ATTENTION.get())
            return func(*args, **(kwargs or {}))

    def block(query):
        return torch.nn.functional.scaled_dot_product_attention(query, query, query).sum()

    query = torch.randn(1, 2, 4, 8, requires_grad=True)
    with Watch(), AttentionScope():
        checkpoint(block, query, use_reentrant=False).backward()
    assert seen == [True, True]  # the forward and its recomputation
    assert IN_ATTENTION.get() is False and query.grad is not None


def test_layer_tags_survive_a_checkpoint_that_recomputes_the_hooked_call():
    """transformers 5.17 checkpoints a decoder layer's `__call__`, so backward recomputes the call with its
    module hooks, and non-reentrant checkpointing stops the recomputation (early stop) before the forward
    hook: the hooks must not push a layer then (the stack would keep one stale entry per layer and every later
    event would be tagged with a wrong layer; the GPU machine's 28-layer Llama-3.2-3B plan came out 7 GiB high)."""
    from types import SimpleNamespace

    from torch.utils.checkpoint import checkpoint

    from memtune.predict.trace import NO_LAYER, _layer_hooks

    counter = SimpleNamespace(layer_stack=[], base_layer=NO_LAYER)
    layers = [torch.nn.Linear(8, 8) for _ in range(3)]
    handles = _layer_hooks(layers, counter)
    hidden = torch.randn(2, 8, requires_grad=True) * 2  # a grad_fn, as an embedding's output has
    for layer in layers:
        hidden = checkpoint(layer, hidden, use_reentrant=False)  # the hooked module call inside the checkpoint
    assert counter.layer_stack == []
    hidden.sum().backward()
    for handle in handles:
        handle.remove()
    assert counter.layer_stack == []  # nothing left behind by the recomputed calls
    assert counter.base_layer == NO_LAYER  # backward left the first layer
