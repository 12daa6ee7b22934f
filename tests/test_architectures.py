"""Every causal-LM architecture transformers builds from a config traces on the GPU-free path (CPU, fake tensors).

Tiny configs (2 decoder layers, hidden 64, vocabulary 256) built with the transformers config classes,
no download, in four configurations each: fp32, bf16-mixed, bf16 weights + LoRA, and checkpointing
under bf16 autocast. An architecture this transformers version cannot build is skipped with the reason.
The agreement of the two trace paths and with measurement is for the GPU machine (tests/test_gpu.py).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from benchmarks.cases import TINY_ARCHITECTURES as ARCHITECTURES
from memtune.cli import main
from memtune.config import Adapter, TrainConfig
from memtune.predict.estimate import estimate

CONFIGURATIONS = {
    "fp32": TrainConfig(seq_len=16, micro_batch_size=2),
    "bf16-mixed": TrainConfig(seq_len=16, micro_batch_size=2, amp="bf16"),
    "bf16+lora": TrainConfig(seq_len=16, micro_batch_size=2, weights_dtype="bf16", adapter=Adapter(rank=4)),
    "checkpointing": TrainConfig(seq_len=16, micro_batch_size=2, amp="bf16", gradient_checkpointing=True),
}


def tiny_config(model_type: str) -> Any:
    """The tiny config of `model_type`, or a skip with the reason transformers gives for not building it."""
    from transformers import AutoConfig

    try:
        return AutoConfig.for_model(model_type, **ARCHITECTURES[model_type])
    except (ValueError, KeyError, ImportError) as error:
        pytest.skip(f"transformers cannot build a {model_type} config here: {type(error).__name__}: {error}")


@pytest.mark.parametrize("configuration", list(CONFIGURATIONS))
@pytest.mark.parametrize("model_type", list(ARCHITECTURES))
def test_every_architecture_traces_on_the_cpu_path(model_type, configuration):
    config = tiny_config(model_type)
    train_config = CONFIGURATIONS[configuration]
    result = estimate(config, train_config, device="cpu")
    assert result.trace_device == "cpu" and result.trace_note == ""
    assert result.num_layers == 2 and result.traced_layers == 2
    assert 0 < result.peak_allocated_bytes <= result.peak_reserved_bytes
    # Weights are live at the peak; trained weights also have gradients or optimizer state there.
    assert result.breakdown.get("weights", 0) > 0
    assert result.breakdown.get("gradients", 0) + result.breakdown.get("optimizer", 0) > 0


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe"])
def test_moe_experts_in_fp32_trace_what_the_gpu_kernel_allocates(model_type):
    """The grouped matmul's fake kernel takes bf16 only; the GPU runs fp32 through its per-group fallback.
    Expert weights in fp32 hold twice the bytes of bf16: the fp32 trace's weights are about twice
    the bf16 one's (same parameters, both traced)."""
    config = tiny_config(model_type)
    fp32 = estimate(config, TrainConfig(seq_len=16, micro_batch_size=2), device="cpu")
    bf16 = estimate(config, TrainConfig(seq_len=16, micro_batch_size=2, weights_dtype="bf16"), device="cpu")
    ratio = fp32.breakdown["weights"] / bf16.breakdown["weights"]
    assert 1.8 < ratio <= 2.0


def test_multi_query_attention_that_only_broadcasts_runs_the_math_kernel():
    """Falcon passes its one KV head to SDPA without enable_gqa; CUDA's fused kernels need one number of
    heads (sdp_utils `check_batch_size_and_num_heads_dense`), so the GPU runs the math path, which saves
    the batch x heads x seq x seq attention matrix. The CPU emulation picks the same kernel: its trace
    of a 2 x 64-token step holds the fp32 attention weights (the fake-CUDA path measured 3-13% above the
    emulation on the H200 before; benchmarks/results/paths_agree_h200.json)."""
    import torch

    from memtune.predict.emulation import _fused_attention

    query = torch.zeros(2, 4, 64, 16, dtype=torch.bfloat16, device="meta")
    one_head = torch.zeros(2, 1, 64, 16, dtype=torch.bfloat16, device="meta")
    four_heads = torch.zeros(2, 4, 64, 16, dtype=torch.bfloat16, device="meta")
    seen: list[str] = []

    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with Ops():
        _fused_attention(query, one_head, one_head, is_causal=True)
    assert "aten._scaled_dot_product_flash_attention.default" not in seen
    assert "aten._safe_softmax.default" in seen  # the math path's attention weights
    seen.clear()
    with Ops():
        _fused_attention(query, four_heads, four_heads, is_causal=True)
    assert seen == ["aten._scaled_dot_product_flash_attention.default"]
    seen.clear()
    with Ops():
        _fused_attention(query, one_head, one_head, is_causal=True, enable_gqa=True)
    assert seen == ["aten._scaled_dot_product_flash_attention.default"]


def test_mask_code_reads_a_full_batch_and_layerdrop_keeps_every_layer():
    """transformers 5.17's mask code reads `fast_all(attention_mask)` of OPT's all-ones mask, and OPT's
    LayerDrop reads `torch.rand([]) < layerdrop`; fake tensors have no values (emulation.FULL_BATCHES). A
    read in the mask code is True, the LayerDrop draw never drops, and any other read still fails."""
    import torch
    import transformers.masking_utils as masking_utils
    from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

    from memtune.predict.emulation import GpuKernels
    from memtune.predict.trace import assume_unpacked_batches

    with assume_unpacked_batches(), FakeTensorMode(allow_non_fake_inputs=True), GpuKernels():
        mask = torch.ones(2, 16, dtype=torch.bool)
        # transformers 5.17 and 5.24 both: (padding_mask, q_length, kv_length, q_offset, kv_offset)
        assert masking_utils._ignore_causal_mask_sdpa(mask, 16, 16, 0, 0) is True
        assert bool(torch.rand([]) < 0.0) is False and bool(torch.rand([]) < 0.5) is False
        with pytest.raises(DataDependentOutputException):
            bool(mask.all())  # not in the mask code: not guessed


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["opt", "mixtral", "gemma2", "falcon"])
def test_plan_exits_0_with_json_on_the_cpu_path(model_type, tmp_path, capsys):
    config = tiny_config(model_type)
    config.save_pretrained(tmp_path)
    code = main(["plan", str(tmp_path), "--seq-len", "16", "--batch-size", "2", "--precision", "bf16-mixed",
                 "--json", "--trace-device", "cpu"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    document = json.loads(captured.out)
    assert document["estimate"]["peak_allocated_bytes"] > 0
    assert document["estimate"]["trace_device"] == "cpu"


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe"])
def test_moe_traces_for_several_gpus(model_type, strategy):
    config = tiny_config(model_type)
    train_config = TrainConfig(seq_len=16, micro_batch_size=2, amp="bf16", num_gpus=2, strategy=strategy)
    result = estimate(config, train_config, device="cpu")
    assert 0 < result.peak_allocated_bytes <= result.peak_reserved_bytes
    assert result.breakdown.get("weights", 0) > 0


def test_plan_exits_2_with_the_model_type_when_no_path_traces(tmp_path, capsys, monkeypatch):
    """Both paths failing (here: the CPU path, on a machine without a GPU to fall back to) is exit 2 with
    the model type, the failure and the versions on stderr, and nothing on stdout."""
    import torch
    from torch._subclasses.fake_tensor import DataDependentOutputException

    from memtune.predict import single

    def trace_step(model_config, train_config, device="cpu", steps=2):
        raise DataDependentOutputException(torch.ops.aten._local_scalar_dense.default)

    monkeypatch.setattr(single, "trace_step", trace_step)
    monkeypatch.setattr(single, "_TRACE_CACHE", {})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    tiny_config("opt").save_pretrained(tmp_path)
    code = main(["plan", str(tmp_path), "--seq-len", "16", "--batch-size", "2", "--json", "--trace-device", "cpu"])
    captured = capsys.readouterr()
    err = " ".join(captured.err.split())  # the console wraps long lines
    assert code == 2 and captured.out == ""
    assert "model type 'opt'" in err and "_local_scalar_dense" in err
    assert f"torch {torch.__version__}" in err and "Traceback" not in err
