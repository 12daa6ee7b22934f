"""DeepSpeed ZeRO as a TrainConfig strategy (issue 15): the `Zero` settings, their validation, JSON round trip,
the "auto" sizes `Zero.resolved` gives, and the guards that keep DeepSpeed plans off the FSDP / single-GPU paths
(the search's ZeRO rung: tests/test_deepspeed_search.py)."""

from __future__ import annotations

import json

import pytest

from memtune.config import (
    DEEPSPEED_EXTRA_HINT,
    STRATEGY_NAMES,
    TrainConfig,
    Zero,
    require_deepspeed,
)
from memtune.errors import UsageError


def deepspeed(**changes) -> TrainConfig:
    fields = {"seq_len": 512, "amp": "bf16", "strategy": "deepspeed", "zero": Zero()}
    return TrainConfig(**{**fields, **changes})


def problems_of(**changes) -> str:
    with pytest.raises(UsageError) as error:
        TrainConfig(**{"seq_len": 512, **changes})
    return str(error.value)


# ---- round trip --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [
    deepspeed(),
    deepspeed(zero=Zero(stage=1), num_gpus=4, micro_batch_size=2),
    deepspeed(zero=Zero(stage=2, overlap_comm=False, reduce_bucket_size=50_000_000), offload="optimizer"),
    deepspeed(zero=Zero(stage=3, offload_device="nvme", nvme_path="/local_nvme", sub_group_size=10**8,
                        stage3_max_reuse_distance=0), offload="parameters", num_gpus=2),
])
def test_round_trip(config):
    text = config.to_json()
    assert TrainConfig.from_json(text) == config
    assert isinstance(TrainConfig.from_json(text).zero, Zero)
    assert json.loads(text)["zero"]["stage"] == config.zero.stage


def test_plans_without_zero_load_as_none():
    data = TrainConfig(seq_len=512).to_dict()
    del data["zero"]
    assert TrainConfig.from_dict(data).zero is None


def test_unknown_zero_key_is_named():
    data = deepspeed().to_dict()
    data["zero"]["stage3_gather_16bit_weights_on_model_save"] = True
    with pytest.raises(UsageError, match=r"unknown zero keys \['stage3_gather_16bit_weights_on_model_save'\]"):
        TrainConfig.from_dict(data)


def test_strategy_name_and_description():
    assert STRATEGY_NAMES["deepspeed"] == "DeepSpeed"
    assert deepspeed().describe().endswith("DeepSpeed ZeRO-3")
    assert deepspeed(zero=Zero(stage=2), offload="optimizer", num_gpus=2).describe().endswith(
        "DeepSpeed ZeRO-2 (CPU optimizer offload) on 2 GPUs")
    nvme = deepspeed(zero=Zero(offload_device="nvme", nvme_path="/nvme"), offload="parameters")
    assert nvme.describe().endswith("DeepSpeed ZeRO-3 (NVMe parameter + optimizer offload)")
    assert "offload parameters" not in nvme.describe()  # said once, in ZeRO's words


# ---- validation: every message -------------------------------------------------------------------------------------


@pytest.mark.parametrize("fields, message", [
    ({"stage": 0}, "stage must be 1, 2 or 3, got 0"),
    ({"stage": True}, "stage must be 1, 2 or 3, got True"),
    ({"offload_device": "gpu"}, "offload_device must be cpu or nvme, got 'gpu'"),
    ({"nvme_path": " "}, "nvme_path must be a directory path or None, got ' '"),
    ({"overlap_comm": 1}, "overlap_comm must be True or False, got 1"),
    ({"contiguous_gradients": None}, "contiguous_gradients must be True or False, got None"),
    ({"reduce_bucket_size": 0}, "reduce_bucket_size must be a positive number of elements or None (auto), got 0"),
    ({"reduce_bucket_size": 5e8}, "reduce_bucket_size must be a positive number of elements or None (auto), got "
                                  "500000000.0"),
    ({"sub_group_size": -1}, "sub_group_size must be a non-negative number of elements or None (auto), got -1"),
    ({"stage3_max_reuse_distance": False}, "stage3_max_reuse_distance must be a non-negative number of elements"),
])
def test_zero_field_messages(fields, message):
    with pytest.raises(UsageError, match="invalid zero") as error:
        Zero(**fields)
    assert message in str(error.value)


def test_zero_problems_are_listed_together():
    with pytest.raises(UsageError) as error:
        Zero(stage=4, offload_device="disk", allgather_bucket_size=-5)
    text = str(error.value)
    assert "stage must be" in text and "offload_device must be" in text and "allgather_bucket_size must be" in text


def test_zero_of_zero_knobs_allowed():
    assert Zero(stage3_max_reuse_distance=0, stage3_prefetch_bucket_size=0).stage3_max_reuse_distance == 0


def test_zero_needs_strategy_deepspeed():
    text = problems_of(zero=Zero(stage=2), num_gpus=2, strategy="fsdp")
    assert "zero (DeepSpeed ZeRO-2) needs strategy 'deepspeed', got strategy 'fsdp'" in text


def test_strategy_deepspeed_needs_zero():
    assert "strategy 'deepspeed' needs its ZeRO settings: add zero=Zero(stage=3)" in problems_of(strategy="deepspeed")


def test_zero_of_wrong_type():
    assert "zero must be a Zero or None, got dict" in problems_of(strategy="deepspeed", zero={"stage": 3})


def test_unknown_strategy_names_deepspeed():
    assert "strategy must be fsdp, ddp or deepspeed, got 'zero'" in problems_of(strategy="zero")


@pytest.mark.parametrize("stage", [1, 2])
def test_parameter_offload_needs_stage_3(stage):
    text = problems_of(strategy="deepspeed", zero=Zero(stage=stage), offload="parameters")
    assert f"offload 'parameters' under DeepSpeed is ZeRO-3's offload_param, got ZeRO stage {stage}" in text


@pytest.mark.parametrize("stage", [1, 2])
def test_nvme_needs_stage_3(stage):
    text = problems_of(strategy="deepspeed", zero=Zero(stage=stage, offload_device="nvme", nvme_path="/nvme"),
                       offload="optimizer")
    assert f"NVMe offload is ZeRO-3's (ZeRO-Infinity): ZeRO stage {stage} would silently keep the state" in text


def test_nvme_needs_a_path():
    text = problems_of(strategy="deepspeed", zero=Zero(offload_device="nvme"), offload="optimizer")
    assert "offload_device 'nvme' needs nvme_path" in text


def test_nvme_without_offload_is_unused_and_allowed():
    assert deepspeed(zero=Zero(offload_device="nvme")).offload == "none"


def test_deepspeed_optimizer_must_be_adamw():
    text = problems_of(strategy="deepspeed", zero=Zero(), optimizer="adafactor")
    assert "a DeepSpeed plan runs DeepSpeed's AdamW (fp32 state), got optimizer adafactor" in text
    assert deepspeed(optimizer="adamw_torch").optimizer == "adamw_torch"


def test_deepspeed_refuses_a_quantised_base():
    from memtune.config import Adapter, Quantization

    text = problems_of(strategy="deepspeed", zero=Zero(), adapter=Adapter(), quantization=Quantization(),
                       weights_dtype="bf16")
    assert "a quantised base (QLoRA) is not planned under DeepSpeed" in text


def test_deepspeed_problems_are_listed_with_the_others():
    text = problems_of(strategy="deepspeed", zero=Zero(stage=1, offload_device="nvme"), offload="parameters",
                       micro_batch_size=0)
    assert text.startswith("invalid training configuration")
    assert "micro_batch_size must be a positive integer" in text
    assert "offload 'parameters' under DeepSpeed" in text and "NVMe offload is ZeRO-3's" in text
    assert "needs nvme_path" in text


def test_deepspeed_on_one_gpu_and_several():
    assert deepspeed(offload="optimizer", zero=Zero(stage=2)).num_gpus == 1  # ZeRO-Offload on one GPU
    assert deepspeed(num_gpus=8).num_gpus == 8


def test_ddp_rules_unchanged():
    assert "needs num_gpus >= 2" in problems_of(strategy="ddp")
    assert "cannot offload 'optimizer'" in problems_of(strategy="ddp", num_gpus=2, offload="optimizer")


# ---- not an FSDP plan ----------------------------------------------------------------------------------------------


def test_deepspeed_is_neither_sharded_nor_replicated():
    for config in (deepspeed(num_gpus=4), deepspeed(offload="optimizer")):
        assert config.deepspeed and not config.sharded and not config.replicated
    assert TrainConfig(seq_len=512, num_gpus=4).sharded and not TrainConfig(seq_len=512, num_gpus=4).deepspeed


def test_fsdp_only_rules_do_not_fire_for_deepspeed():
    # partial checkpointing is refused under FSDP (`sharded`), not under DeepSpeed
    config = deepspeed(num_gpus=2, gradient_checkpointing=True, checkpoint_layers=3)
    assert config.checkpoint_layers == 3


def test_model_predictor_predicts_deepspeed():
    # the refusal of issue 15's first step is gone: fit's predictor dispatches a DeepSpeed plan to predict.zero
    from memtune.fit import ModelPredictor
    from memtune.predict import throughput
    from tests.models import tiny_llama

    predictor = ModelPredictor(tiny_llama(), 10**6, throughput.gpu_speed("H200"), device="cpu")
    config = deepspeed(seq_len=64, offload="optimizer")
    estimate = predictor.memory(config)
    assert estimate.config == config and estimate.total_bytes > 0 and estimate.host_bytes > 0
    assert predictor.memory(config) is estimate  # cached


def test_trials_refuse_deepspeed():
    from memtune.measure.verify import measure

    with pytest.raises(UsageError, match="trial steps do not run DeepSpeed plans yet"):
        measure(None, deepspeed())


# ---- resolved sizes ------------------------------------------------------------------------------------------------


def test_resolved_auto_values():
    # transformers integrations/deepspeed.py:232-242 for "auto"; DeepSpeed runtime/zero/config.py defaults otherwise
    assert Zero().resolved(4096) == {
        "reduce_bucket_size": 4096 * 4096,
        "allgather_bucket_size": 500_000_000,
        "stage3_prefetch_bucket_size": int(0.9 * 4096 * 4096),
        "stage3_param_persistence_threshold": 40_960,
        "stage3_max_live_parameters": 1_000_000_000,
        "stage3_max_reuse_distance": 1_000_000_000,
        "sub_group_size": 1_000_000_000,
    }
    assert Zero().resolved(896)["stage3_prefetch_bucket_size"] == 722_534  # int() truncates 722534.4


def test_resolved_keeps_set_values():
    zero = Zero(reduce_bucket_size=50_000_000, stage3_max_reuse_distance=0, sub_group_size=10**8)
    resolved = zero.resolved(2048)
    assert resolved["reduce_bucket_size"] == 50_000_000
    assert resolved["stage3_max_reuse_distance"] == 0
    assert resolved["sub_group_size"] == 10**8
    assert resolved["stage3_param_persistence_threshold"] == 20_480
    assert all(isinstance(value, int) and not isinstance(value, bool) for value in resolved.values())


@pytest.mark.parametrize("hidden_size", [0, -1, 4096.0, None, True])
def test_resolved_needs_a_hidden_size(hidden_size):
    with pytest.raises(UsageError, match="Zero.resolved needs the model's hidden_size as a positive integer"):
        Zero().resolved(hidden_size)


def test_resolved_matches_deepspeed_defaults():
    """The defaults `resolved` cites are DeepSpeed's own (skipped where DeepSpeed is not installed)."""
    zero_config = pytest.importorskip("deepspeed.runtime.zero.config")
    defaults = zero_config.DeepSpeedZeroConfig()
    resolved = Zero().resolved(1024)
    assert resolved["allgather_bucket_size"] == defaults.allgather_bucket_size
    assert resolved["stage3_max_live_parameters"] == defaults.max_live_parameters
    assert resolved["stage3_max_reuse_distance"] == defaults.max_reuse_distance
    assert resolved["sub_group_size"] == defaults.sub_group_size


# ---- the optional extra ----------------------------------------------------------------------------------------------


def test_missing_deepspeed_gives_the_install_hint(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import deepspeed -> ImportError, as without the extra
    with pytest.raises(UsageError) as error:
        require_deepspeed(deepspeed())
    assert DEEPSPEED_EXTRA_HINT in str(error.value) and "\n" not in str(error.value)
    require_deepspeed(TrainConfig(seq_len=512))  # other strategies never need it


def test_deepspeed_has_no_pure_16_bit_mode():
    text = problems_of(strategy="deepspeed", zero=Zero(), weights_dtype="bf16", amp="none")
    assert "DeepSpeed keeps fp32 master weights and computes in the dtype of its bf16 / fp16 mode, got bf16 " \
           "weights with amp 'none'" in text
    assert deepspeed(weights_dtype="bf16", amp="bf16").amp == "bf16"  # a bf16 base under bf16 autocast runs


def test_zero_is_public():
    import memtune

    assert memtune.Zero is Zero and "Zero" in memtune.__all__
