"""The card a plan runs on: known cards, the SDPA kernel its compute capability picks, bf16 where it is missing,
and `--attn` (eager, sdpa, flash_attention_2) from the command line to the traced and the run model."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from memtune.cli import main
from memtune.config import (
    GPU_CARDS,
    KNOWN_GPUS,
    NO_BF16_GPUS,
    Policy,
    TrainConfig,
    attention_problems,
    gpu_card,
    known_gpu,
)
from memtune.errors import UsageError
from memtune.predict import throughput
from memtune.predict.allocator import simulate
from memtune.predict.emulation import CudaEmulation, card_sdpa_backends, sdpa_backend
from memtune.predict.trace import trace_step
from memtune.recipe.step import attention_arguments, build_model
from memtune.sources import catalog_config

HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None


def tiny_llama(layers: int = 2):
    """Llama-3.2-1B's architecture at 128 hidden, 4 query and 2 key/value heads of 32 dimensions."""
    config = catalog_config("meta-llama/Llama-3.2-1B")
    config.hidden_size, config.intermediate_size, config.num_attention_heads = 128, 256, 4
    config.num_key_value_heads, config.head_dim, config.vocab_size = 2, 32, 1000
    config.num_hidden_layers = layers
    return config


# ---- the known cards ---------------------------------------------------------------------------------


def test_the_cards_people_use_are_known_with_capability_bf16_and_datasheet_rates():
    for name in ("T4-16GB", "V100-16GB", "V100-32GB", "A10G-24GB", "L4-24GB", "RTX-3090", "RTX-4090", "RTX-5090",
                 "A100-40GB", "A100-80GB", "L40S", "H100-80GB", "H200", "B200", "MI300X"):
        card = gpu_card(name)
        assert KNOWN_GPUS[name] == card.total_bytes > card.usable_bytes > 0
        assert card.half_flops > card.fp32_flops > 0 and card.memory_bytes_per_second > 0
        assert card.bf16_supported == (card.name not in NO_BF16_GPUS)
    assert NO_BF16_GPUS == {"T4-16GB", "V100-16GB", "V100-32GB"}
    assert [card.name for card in GPU_CARDS.values() if not card.flash_capable] == sorted(NO_BF16_GPUS)
    assert gpu_card("MI300X").note == "ROCm: predicted only"
    assert (gpu_card("V100-32GB").capability, gpu_card("T4-16GB").capability) == ("7.0", "7.5")


def test_earlier_names_still_plan_and_unknown_names_are_refused_with_the_list():
    assert known_gpu("rtx4090-24gb")[0] == "RTX-4090" and known_gpu("H200-141GB")[0] == "H200"
    with pytest.raises(UsageError, match="unknown --gpu 'P100'.*T4-16GB"):
        gpu_card("P100")


def test_the_speed_model_takes_a_known_cards_datasheet_rates():
    speed = throughput.gpu_speed("V100-32GB")
    card = gpu_card("V100-32GB")
    assert (speed.bf16_flops, speed.fp32_flops, speed.memory_bytes_per_second) == (
        card.half_flops, card.fp32_flops, card.memory_bytes_per_second)
    assert throughput.gpu_speed("A100-40GB").memory_bytes_per_second < throughput.gpu_speed("A100-80GB")\
        .memory_bytes_per_second


# ---- the SDPA kernel of a card --------------------------------------------------------------------------


@pytest.mark.parametrize("capability, dtype, head_dim, mask, gqa, kernel", [
    ("9.0", torch.bfloat16, 64, False, False, "flash"),
    ("8.0", torch.float16, 128, False, False, "flash"),
    ("8.0", torch.float16, 64, True, False, "efficient"),      # flash takes no mask
    ("8.0", torch.bfloat16, 512, False, False, "efficient"),   # flash: head_dim <= 256
    ("8.0", torch.float32, 64, False, False, "efficient"),     # flash: 16-bit only
    ("8.0", torch.float16, 64, False, True, "flash"),          # flash takes grouped KV heads
    ("7.5", torch.float16, 64, False, False, "efficient"),     # T4: no flash below sm80
    ("7.0", torch.float16, 64, True, False, "efficient"),      # V100
    ("8.0", torch.float32, 12, False, False, "efficient"),     # fp32 on sm80+: head_dim a multiple of 4
    ("8.0", torch.float32, 10, False, False, "math"),
    ("7.0", torch.float32, 10, False, False, "efficient"),     # fp32 below sm80: no tensor cores, any head_dim
    ("7.0", torch.float16, 12, False, False, "math"),          # 16-bit: a multiple of 8
    ("7.5", torch.float16, 64, False, True, "math"),           # mem-efficient takes no grouped KV heads
    ("7.0", torch.bfloat16, 64, False, False, "math"),         # no bf16 kernels below sm80
    ("3.7", torch.float16, 64, False, False, "math"),          # below sm50: math only
])
def test_the_sdpa_kernel_follows_torchs_selection_for_the_cards_capability(capability, dtype, head_dim, mask, gqa,
                                                                            kernel):
    assert sdpa_backend(capability, dtype, head_dim, mask, same_heads=not gqa, enable_gqa=gqa) == kernel


def test_the_fake_cuda_path_is_limited_to_the_cards_kernels():
    from torch.nn.attention import SDPBackend

    assert SDPBackend.FLASH_ATTENTION not in card_sdpa_backends("7.5")
    assert SDPBackend.FLASH_ATTENTION in card_sdpa_backends(None)  # the default, sm90
    assert SDPBackend.EFFICIENT_ATTENTION in card_sdpa_backends("7.0")


class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("capability, dtype, kernel", [
    ("9.0", torch.bfloat16, "_scaled_dot_product_flash_attention"),
    ("7.5", torch.float16, "_scaled_dot_product_efficient_attention"),
    ("7.0", torch.float32, "_scaled_dot_product_efficient_attention"),
])
def test_the_cpu_trace_runs_the_kernel_the_card_would(capability, dtype, kernel):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        query, key, value = (torch.empty(2, 4, 64, 32, dtype=dtype) for _ in range(3))
        ops = _Ops()
        with ops, CudaEmulation(capability):
            torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True)
    assert any(kernel in op for op in ops.ops), ops.ops


def test_a_grouped_query_model_runs_the_math_path_below_sm80_and_keeps_its_attention_matrix():
    """Tiny Llama (4 query heads, 2 KV heads) at fp16: on a T4, transformers passes enable_gqa and torch's
    memory-efficient kernel does not take it, so SDPA runs math and keeps the scores like eager."""
    layers, batch, heads, seq = 2, 2, 4, 256
    peak = {}
    for capability in ("9.0", "7.5"):
        config = TrainConfig(seq_len=seq, micro_batch_size=batch, amp="fp16", gpu_capability=capability)
        peak[capability] = simulate(trace_step(tiny_llama(layers), config, device="cpu").events).peak_allocated_bytes
    # math keeps the fp32 softmax for backward per layer (the fp16 inputs run the math path upcast)
    assert peak["7.5"] - peak["9.0"] >= layers * batch * heads * seq * seq * 4


# ---- eager against sdpa ----------------------------------------------------------------------------------


def test_eager_holds_the_attention_matrices_that_sdpa_does_not():
    """Eager (transformers' eager_attention_forward): scores in bf16, softmax in fp32 (kept for its backward), cast
    back to bf16 (kept by the matmul with V): 6 bytes per batch x heads x S x S element per layer, where flash keeps
    a logsumexp. At most one more fp32 matrix is live at the peak (the softmax's gradient)."""
    layers, batch, heads, seq = 2, 2, 4, 256
    peaks = {}
    for attn in ("sdpa", "eager"):
        config = TrainConfig(seq_len=seq, micro_batch_size=batch, amp="bf16", attn=attn)
        peaks[attn] = simulate(trace_step(tiny_llama(layers), config, device="cpu").events).peak_allocated_bytes
    matrix = batch * heads * seq * seq
    difference = peaks["eager"] - peaks["sdpa"]
    assert layers * matrix * (4 + 2) <= difference <= layers * matrix * (4 + 2) + matrix * 4


def test_a_model_is_built_with_the_attention_asked_for():
    eager = build_model(tiny_llama(1), TrainConfig(seq_len=8, attn="eager"), "meta")
    assert eager.config._attn_implementation == "eager"
    default = build_model(tiny_llama(1), TrainConfig(seq_len=8), "meta")
    assert default.config._attn_implementation == "sdpa"  # transformers' default


def test_flash_attention_2_is_traced_as_torchs_flash_kernel_and_run_as_itself():
    config = TrainConfig(seq_len=8, attn="flash_attention_2")
    assert attention_arguments(config, "meta") == {"attn_implementation": "sdpa"}
    assert attention_arguments(config, "cuda") == {"attn_implementation": "flash_attention_2"}
    assert attention_arguments(TrainConfig(seq_len=8), "cuda") == {}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fake-CUDA path needs a GPU")
@pytest.mark.parametrize("attn, amp, capability", [("eager", "bf16", None), ("sdpa", "bf16", None),
                                                   ("eager", "fp16", "7.5"), ("sdpa", "fp16", "7.5")])
def test_both_trace_paths_agree(attn, amp, capability):
    config = TrainConfig(seq_len=256, micro_batch_size=2, amp=amp, attn=attn, gpu_capability=capability)
    peaks = [simulate(trace_step(tiny_llama(2), config, device=device).events).peak_allocated_bytes
             for device in ("cpu", "cuda")]
    assert peaks[0] == peaks[1]


# ---- --attn and --gpu from the command line ----------------------------------------------------------------


def test_the_attention_and_the_cards_capability_round_trip_through_json():
    config = TrainConfig(seq_len=16, attn="eager", gpu_capability="7.0")
    assert TrainConfig.from_dict(config.to_dict()) == config
    assert "eager attention" in config.describe()
    with pytest.raises(UsageError, match="attn must be one of"):
        TrainConfig(seq_len=16, attn="paged")
    with pytest.raises(UsageError, match="gpu_capability must be"):
        TrainConfig(seq_len=16, gpu_capability="sm70")


def test_plan_carries_attn_and_the_cards_capability_into_the_traced_configuration():
    from memtune.cli import parse

    _, options = parse(["plan", "gpt2", "--attn", "eager", "--gpu", "V100-32GB", "--precision", "fp16-mixed"])
    config = options.train_config()
    assert (config.attn, config.gpu_capability, config.amp) == ("eager", "7.0", "fp16")
    _, options = parse(["plan", "gpt2", "--qlora", "4", "--gpu", "T4-16GB"])
    assert options.train_config().amp == "fp16"  # QLoRA's default bf16 falls back where bf16 is missing


def test_plan_with_bf16_on_a_v100_exits_2_and_says_to_use_fp16(capsys):
    code = main(["plan", "gpt2", "--gpu", "V100-32GB", "--precision", "bf16-mixed", "--trace-device", "cpu"])
    assert code == 2
    err = capsys.readouterr().err
    assert "V100-32GB" in err and "fp16-mixed" in err and "Traceback" not in err


def test_fit_with_bf16_pinned_on_a_t4_exits_2():
    assert main(["fit", "gpt2", "--gpu", "T4-16GB", "--precision", "bf16-mixed", "--no-verify"]) == 2


@pytest.mark.skipif(HAS_FLASH_ATTN, reason="flash-attn is installed here")
@pytest.mark.parametrize("command", ["plan", "fit"])
def test_flash_attention_2_without_the_package_exits_2_with_the_install_hint(command, capsys):
    code = main([command, "gpt2", "--attn", "flash_attention_2", "--gpu", "H100-80GB", "--trace-device", "cpu"])
    assert code == 2
    assert "pip install flash-attn" in capsys.readouterr().err


def test_flash_attention_2_on_a_card_below_sm80_is_refused_with_the_reason():
    problems = attention_problems("flash_attention_2", gpu_card("T4-16GB"))
    assert any("T4-16GB has 7.5" in problem for problem in problems)
    assert attention_problems("eager", gpu_card("T4-16GB")) == []


def test_fit_predicts_every_configuration_with_its_attention():
    from memtune.fit import ModelPredictor, attention_fields
    from memtune.sources import parameter_count

    model_config = tiny_llama(2)
    predictor = ModelPredictor(model_config, parameter_count(model_config), throughput.gpu_speed("T4-16GB"),
                               device="cpu", on_card=attention_fields("eager", "7.5"))
    estimate = predictor.memory(TrainConfig(seq_len=64, amp="fp16"))
    assert (estimate.config.attn, estimate.config.gpu_capability) == ("eager", "7.5")
    assert Policy(attn="eager").attn == "eager"


def test_the_runner_loads_the_model_with_the_plans_attention():
    from memtune.run.runner import load_model
    from memtune.sources import ModelSource

    source = ModelSource("tiny", tiny_llama(1), "catalog")
    model, _, pretrained = load_model(source, TrainConfig(seq_len=8, attn="eager"), "cpu")
    assert model.config._attn_implementation == "eager" and not pretrained


def test_auto_fit_plans_the_attention_asked_for_on_the_cards_kernels_and_dtype():
    import memtune

    plan = memtune.auto_fit("gpt2", seq_len=128, batch_size=2, gpu="T4-16GB", verify=False, attn="eager")
    config = plan.train_config
    assert (config.attn, config.gpu_capability) == ("eager", "7.5")
    assert "bf16" not in (config.amp, config.weights_dtype)  # the T4 has no bf16: fp16 or fp32


def test_the_benchmark_predicts_each_emulated_card_with_its_capability_in_fp16():
    from benchmarks.cards import cases, format_row, with_errors

    emulated = [case for case in cases() if case.card is not None]
    assert {case.card for case in emulated} == {"T4-16GB", "V100-32GB"}
    for case in emulated:
        assert (case.config.gpu_capability, case.config.amp) == (gpu_card(case.card).capability, "fp16")
    assert {case.config.attn for case in cases() if case.card is None} == {"sdpa", "eager"}
    row = with_errors({"case": "x", "measured_reserved_bytes": 100, "cpu_reserved_bytes": 103}, ["cpu"])
    assert row["cpu_reserved_error"] == pytest.approx(0.03) and "+3.00%" in format_row(row, ["cpu"])


def test_the_plan_report_names_the_attention_kernel_the_trace_assumed():
    """`report.words.attention_words`: sdpa's kernel on the card planned for (a grouped-KV model runs math on a T4,
    with the reason), flash on a Hopper card, and the implementation itself when it is not sdpa."""
    from memtune.report.words import attention_words
    from memtune.sources import catalog_config

    qwen = catalog_config("Qwen/Qwen2.5-0.5B")  # 14 heads, 2 KV heads: grouped
    fp16 = TrainConfig(seq_len=128, micro_batch_size=1, amp="fp16")
    t4 = attention_words(fp16.replace(gpu_capability="7.5"), qwen)
    assert "math" in t4 and "grouped KV heads" in t4 and "7.5" in t4
    assert "flash kernel at compute capability 9.0" in attention_words(fp16, qwen)
    assert attention_words(fp16.replace(attn="eager"), qwen) == "attention: eager"
