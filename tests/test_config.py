"""The candidate configuration (TrainConfig, Adapter) and byte quantities with units."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from memtune.config import (
    GIB,
    KNOWN_GPUS,
    MIB,
    PRECISIONS,
    Adapter,
    TrainConfig,
    format_bytes,
    parse_bytes,
    precision_config,
)
from memtune.errors import UsageError

# ---- TrainConfig --------------------------------------------------------------------------------


def test_round_trip_without_adapter():
    config = TrainConfig(seq_len=2048, micro_batch_size=4, grad_accum_steps=8, weights_dtype="bf16",
                         gradient_checkpointing=True, loss="chunked", offload="optimizer", num_gpus=2)
    text = config.to_json()
    assert json.loads(text)["adapter"] is None
    assert TrainConfig.from_json(text) == config


def test_round_trip_with_lora_adapter_and_tuple_target_modules():
    adapter = Adapter(rank=8, alpha=16, dropout=0.05, target_modules=("q_proj", "v_proj"))
    config = TrainConfig(seq_len=1024, adapter=adapter, amp="bf16")
    text = config.to_json()
    assert json.loads(text)["adapter"]["target_modules"] == ["q_proj", "v_proj"]  # JSON has no tuples
    restored = TrainConfig.from_json(text)
    assert restored == config
    assert restored.adapter.target_modules == ("q_proj", "v_proj")
    assert hash(restored) == hash(config)  # candidates are cached by value


def test_round_trip_with_string_target_modules_and_prefix_tuning():
    for adapter in (Adapter(), Adapter(kind="prefix", num_virtual_tokens=30)):
        config = TrainConfig(seq_len=512, adapter=adapter)
        assert TrainConfig.from_json(config.to_json()) == config


def test_from_dict_accepts_an_adapter_object_and_fills_defaults():
    config = TrainConfig.from_dict({"seq_len": 128, "adapter": Adapter(rank=4)})
    assert config.adapter == Adapter(rank=4)
    assert config.micro_batch_size == 1 and config.weights_dtype == "fp32" and config.amp == "none"


def test_from_dict_refuses_unknown_keys_and_names_them():
    with pytest.raises(UsageError) as caught:
        TrainConfig.from_dict({"seq_len": 128, "batch": 4, "lr": 1e-4})
    message = str(caught.value)
    assert "['batch', 'lr']" in message
    assert "micro_batch_size" in message  # the known keys are listed as the fix


def test_validation_collects_every_problem_at_once():
    with pytest.raises(UsageError) as caught:
        TrainConfig(seq_len=0, micro_batch_size=-1, grad_accum_steps=1.5, weights_dtype="fp64", amp="int8",
                    num_gpus=0)
    message = str(caught.value)
    for problem in ("seq_len must be a positive integer, got 0",
                    "micro_batch_size must be a positive integer, got -1",
                    "grad_accum_steps must be a positive integer, got 1.5",
                    "num_gpus must be a positive integer, got 0",
                    "weights_dtype must be one of ['bf16', 'fp16', 'fp32'], got 'fp64'",
                    "amp must be none, bf16 or fp16, got 'int8'"):
        assert problem in message
    assert message.count("\n  - ") == 6  # one per line


def test_validation_also_runs_when_replacing_a_field():
    config = TrainConfig(seq_len=256)
    with pytest.raises(UsageError, match="micro_batch_size"):
        config.replace(micro_batch_size=0)
    assert config.replace(micro_batch_size=8).micro_batch_size == 8
    assert config.micro_batch_size == 1  # frozen: replace returns a copy


def test_effective_batch_size_multiplies_micro_batch_accumulation_and_gpus():
    assert TrainConfig(seq_len=64).effective_batch_size == 1
    assert TrainConfig(seq_len=64, micro_batch_size=4, grad_accum_steps=8).effective_batch_size == 32
    assert TrainConfig(seq_len=64, micro_batch_size=4, grad_accum_steps=8, num_gpus=4).effective_batch_size == 128


@pytest.mark.parametrize("name", list(PRECISIONS))
def test_precision_names_round_trip(name):
    weights_dtype, amp = precision_config(name)
    assert TrainConfig(seq_len=64, weights_dtype=weights_dtype, amp=amp).precision == name


def test_precision_names_mean_what_trainer_runs():
    assert precision_config("bf16-mixed") == ("fp32", "bf16")  # Trainer(bf16=True): fp32 master weights
    assert precision_config("bf16") == ("bf16", "none")
    assert TrainConfig(seq_len=64, weights_dtype="bf16", amp="fp16").precision == "bf16/fp16"  # no name


def test_unknown_precision_lists_the_choices():
    with pytest.raises(UsageError, match="unknown precision 'fp8': choose one of fp32, bf16-mixed"):
        precision_config("fp8")


def test_describe_names_every_memory_relevant_choice():
    config = TrainConfig(seq_len=64, micro_batch_size=2, grad_accum_steps=4, amp="bf16", gradient_checkpointing=True,
                         adapter=Adapter(rank=8, target_modules=("q_proj", "v_proj")), loss="chunked",
                         offload="optimizer", num_gpus=2)
    assert config.describe() == ("micro-batch 2 x 4 accum, bf16-mixed, checkpointing, LoRA r=8 (q_proj,v_proj), "
                                 "chunked loss, offload optimizer, 2 GPUs, FSDP")
    assert (
        TrainConfig(seq_len=64, num_gpus=4, strategy="ddp").describe() == "micro-batch 1 x 1 accum, fp32, 4 GPUs, DDP"
    )
    assert TrainConfig(seq_len=64, strategy="fsdp").describe() == "micro-batch 1 x 1 accum, fp32"  # one GPU: no wrapper


# ---- strategy: how several GPUs share the work ---------------------------------------------------


def test_strategy_round_trips_and_plans_without_it_load_as_fsdp():
    config = TrainConfig(seq_len=1024, micro_batch_size=2, amp="bf16", num_gpus=2, strategy="ddp")
    assert json.loads(config.to_json())["strategy"] == "ddp"
    assert TrainConfig.from_json(config.to_json()) == config
    old = {key: value for key, value in TrainConfig(seq_len=1024, num_gpus=2).to_dict().items() if key != "strategy"}
    restored = TrainConfig.from_dict(old)
    assert restored.strategy == "fsdp" and restored.sharded and not restored.replicated


def test_replicated_and_sharded_say_which_engine_runs_the_configuration():
    assert TrainConfig(seq_len=8, num_gpus=2, strategy="ddp").replicated
    assert not TrainConfig(seq_len=8, num_gpus=2, strategy="ddp").sharded
    assert TrainConfig(seq_len=8, num_gpus=2).sharded
    assert TrainConfig(seq_len=8, offload="parameters").sharded  # CPU offload runs FSDP on one GPU
    assert not TrainConfig(seq_len=8).sharded and not TrainConfig(seq_len=8).replicated


def test_ddp_with_offload_or_one_gpu_is_refused_with_every_reason():
    with pytest.raises(UsageError) as caught:
        TrainConfig(seq_len=8, num_gpus=1, offload="parameters", strategy="ddp")
    message = str(caught.value)
    assert "cannot offload 'parameters'" in message and "use strategy 'fsdp'" in message
    assert "needs num_gpus >= 2" in message
    with pytest.raises(UsageError, match="strategy must be fsdp, ddp or deepspeed, got 'zero3'"):
        TrainConfig(seq_len=8, num_gpus=2, strategy="zero3")


# ---- parse_bytes / format_bytes -----------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("24GiB", 24 * 2**30),
    ("24GB", 24 * 10**9),
    ("24000MiB", 24000 * 2**20),
    ("1.5 GiB", round(1.5 * 2**30)),
    ("24 gib", 24 * 2**30),
    ("  80GB  ", 80 * 10**9),
    ("512KiB", 512 * 1024),
    ("1TiB", 2**40),
    ("1TB", 10**12),
    ("4096B", 4096),
])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize(("text", "fix"), [
    ("24", "write 24GiB (binary, 2^30) or 24GB (10^9 bytes)"),
    ("24G", "write 24GiB (binary, 2^30) or 24GB (10^9 bytes)"),
    ("24g", "write 24GiB (binary, 2^30) or 24GB (10^9 bytes)"),
    ("512M", "write 512MiB or 512MB"),
])
def test_ambiguous_quantities_are_refused_with_both_readings(text, fix):
    with pytest.raises(UsageError) as caught:
        parse_bytes(text)
    message = str(caught.value)
    assert f"{text!r} is ambiguous" in message
    assert fix in message


@pytest.mark.parametrize(("text", "complaint"), [
    ("abc", "is malformed: write a number and a unit, e.g. 24GiB or 24GB"),
    ("-3GiB", "is malformed"),
    ("", "is malformed"),
    ("GiB", "is malformed"),
    ("24 parsecs", "has unknown unit 'parsecs': use B, KiB, MiB, GiB"),
    ("0GiB", "must be positive"),
])
def test_malformed_quantities_are_refused_with_the_value_and_the_fix(text, complaint):
    with pytest.raises(UsageError) as caught:
        parse_bytes(text)
    assert repr(text) in str(caught.value)
    assert complaint in str(caught.value)


@pytest.mark.parametrize(("num_bytes", "text"), [
    (512, "512 B"),
    (512 * MIB, "512.00 MiB"),
    (24 * GIB, "24.00 GiB"),
    (24 * 10**9, "22.35 GiB"),
    (-2 * GIB, "-2.00 GiB"),
    (3 * 2**40, "3.00 TiB"),
])
def test_format_bytes(num_bytes, text):
    assert format_bytes(num_bytes) == text


def test_known_gpus_are_whole_mebibytes():
    assert all(total_bytes % MIB == 0 for total_bytes in KNOWN_GPUS.values())
    assert KNOWN_GPUS["A100-80GB"] == 81920 * MIB


@given(st.integers(min_value=1, max_value=2**50))
def test_format_then_parse_round_trips_within_display_rounding(num_bytes):
    shown = format_bytes(num_bytes)
    unit_bytes = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}[shown.split()[1]]
    # Two decimals of the shown unit: off by at most half a hundredth of it (0.5% at worst).
    assert abs(parse_bytes(shown) - num_bytes) <= unit_bytes * 0.005 + 0.5


@given(st.integers(min_value=1, max_value=2**53))  # every integer below 2^53 is exact as a float
def test_plain_bytes_parse_exactly(num_bytes):
    assert parse_bytes(f"{num_bytes}B") == num_bytes


@given(st.floats(min_value=1e-3, max_value=1e6, allow_nan=False, allow_infinity=False))
def test_fractional_gibibytes_parse_to_the_nearest_byte(gibibytes):
    text = f"{gibibytes}GiB"  # repr never uses an exponent in this range
    assert parse_bytes(text) == round(gibibytes * 2**30)


# ---- the commands' options ----------------------------------------------------------------------------


def test_plan_options_build_the_train_config_they_describe():
    from memtune.options import LoraOptions, PlanOptions, TaskOptions

    options = PlanOptions(TaskOptions("gpt2", seq_len=256, batch_size=16, gpus=2), micro_batch_size=2,
                          precision="bf16-mixed", checkpointing=True, lora=True,
                          lora_shape=LoraOptions(lora_rank=8, lora_targets="q_proj,v_proj"), strategy="auto")
    assert options.problems() == []
    assert options.train_config() == TrainConfig(
        seq_len=256, micro_batch_size=2, grad_accum_steps=4, weights_dtype="fp32", amp="bf16",
        gradient_checkpointing=True, adapter=Adapter(rank=8, alpha=16, target_modules=("q_proj", "v_proj")),
        num_gpus=2, strategy="fsdp")
    default = PlanOptions(TaskOptions("gpt2"))  # the whole batch in one micro-batch, one GPU
    assert (default.train_config().micro_batch_size, default.train_config().num_gpus) == (8, 1)


def test_plan_options_report_every_problem_at_once():
    from memtune.options import PlanOptions, TaskOptions

    options = PlanOptions(TaskOptions("gpt2", seq_len=0, batch_size=6, gpus=4, budget="24"))
    problems = options.problems()
    assert any("--seq-len must be >= 1" in problem for problem in problems)
    assert any("not a multiple of --gpus 4" in problem for problem in problems)
    assert any("ambiguous" in problem for problem in problems)
    with pytest.raises(UsageError, match="not a multiple of --gpus 4"):
        options.train_config()
    ddp = PlanOptions(TaskOptions("gpt2", batch_size=2), strategy="ddp")  # TrainConfig's own check, collected too
    assert any("needs num_gpus >= 2" in problem for problem in ddp.problems())


@pytest.mark.parametrize("choice,use_adapter,kind", [
    ({}, None, "lora"),
    ({"lora": True}, True, "lora"),
    ({"prefix": True}, True, "prefix"),
    ({"no_lora": True}, False, "lora"),
    ({"full_finetune_only": True}, False, "lora"),
    ({"prefix": True, "no_lora": True}, False, "prefix"),
])
def test_adapter_choice_gives_the_policy_use_adapter_and_adapter(choice, use_adapter, kind):
    from memtune.options import AdapterChoice

    adapters = AdapterChoice(**choice)
    assert adapters.use_adapter() is use_adapter and adapters.adapter().kind == kind


def test_fit_options_policy_and_its_problems():
    from memtune.config import Policy
    from memtune.options import AdapterChoice, FitOptions, TaskOptions

    options = FitOptions(TaskOptions("gpt2", batch_size=8, gpus=2), pins=Policy(strategy="ddp", offload="parameters"))
    policy = options.policy()
    assert policy.num_gpus == 2 and policy.strategy == "ddp" and policy.use_adapter is None
    assert options.problems() == [
        "strategy ddp cannot offload parameters to the CPU: pin --strategy fsdp for CPU offload"]
    assert FitOptions(TaskOptions("gpt2", budget="8GiB")).policy().num_gpus == 1  # a budget: the GPUs here do not count
    wrong = FitOptions(TaskOptions("gpt2", gpus=0, gpu="GTX-1"), adapters=AdapterChoice(lora=True, no_lora=True),
                       trial_steps=4)
    assert len(wrong.problems()) == 4


def test_run_options_command_line_forwards_what_is_set_in_field_order():
    from memtune.options import RunOptions

    options = RunOptions(plan="plan.json", output_dir="out", max_steps=5, resume=True)
    assert options.command_line() == ["plan.json", "--output-dir", "out", "--text-field", "text", "--max-steps", "5",
                                      "--save-steps", "200", "--seed", "42", "--resume"]


def test_policy_margin_docstring_and_help_follow_the_margin_rule():
    import dataclasses

    from memtune.config import (
        DEFAULT_MARGIN_FRACTION,
        MIN_MARGIN_BYTES,
        Policy,
        margin_for,
        option_of,
    )

    margin = option_of(next(field for field in dataclasses.fields(Policy) if field.name == "margin_bytes"))
    assert margin.default_text == "2% of the budget, at least 256 MiB"
    assert margin_for(100 * GIB, Policy()) == int(DEFAULT_MARGIN_FRACTION * 100 * GIB)
    assert margin_for(GIB, Policy()) == MIN_MARGIN_BYTES == 256 * MIB
