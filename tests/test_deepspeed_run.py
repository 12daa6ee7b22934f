"""Running a DeepSpeed plan (issue 15, step 2): the DeepSpeed JSON, the accelerate launcher config that names it,
the TrainingArguments, the relaunch under `accelerate launch`, and exit 2 with the install hint without DeepSpeed.
The JSON's content is checked everywhere; DeepSpeed's, accelerate's and transformers' own parsers where DeepSpeed is
installed (CI has none)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from memtune.config import DEEPSPEED_EXTRA_HINT, TrainConfig, Zero
from memtune.errors import UsageError
from memtune.options import RunOptions
from memtune.plan import Plan
from memtune.run.launch import (
    DEEPSPEED_CONFIG_FILE,
    accelerate_config,
    deepspeed_accelerate_config,
    deepspeed_config,
    hidden_size_of,
    write_accelerate_config,
    write_deepspeed_config,
)
from memtune.sources import catalog_config

LLAMA_8B = "meta-llama/Llama-3.1-8B"  # hidden_size 4096


def deepspeed_plan(**changes) -> TrainConfig:
    fields = {"seq_len": 1024, "amp": "bf16", "strategy": "deepspeed", "zero": Zero()}
    return TrainConfig(**{**fields, **changes})


ZERO2_OFFLOAD = deepspeed_plan(zero=Zero(stage=2), offload="optimizer")
ZERO3 = deepspeed_plan(num_gpus=2)
ZERO3_NVME = deepspeed_plan(zero=Zero(offload_device="nvme", nvme_path="/local_nvme", stage3_max_reuse_distance=0),
                            offload="parameters")


@pytest.fixture
def no_deepspeed(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import deepspeed -> ImportError, as without the extra


# ---- the JSON, without DeepSpeed --------------------------------------------------------------------------------


def test_zero2_offload_json_has_the_offload_block_and_deepspeeds_adamw():
    config = deepspeed_config(ZERO2_OFFLOAD, model_config=catalog_config(LLAMA_8B))
    assert config["zero_optimization"] == {
        "stage": 2, "overlap_comm": True, "contiguous_gradients": True,
        "reduce_bucket_size": 4096 * 4096, "allgather_bucket_size": 500_000_000,
        "offload_optimizer": {"device": "cpu", "pin_memory": True},
    }
    # DeepSpeed refuses Trainer's torch AdamW under offload (engine.py:2342-2347): its own AdamW, values from Trainer
    assert config["optimizer"] == {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                               "weight_decay": "auto"}}
    assert config["bf16"] == {"enabled": True} and config["fp16"] == {"enabled": False}
    for name in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
                 "gradient_clipping"):
        assert config[name] == "auto"


def test_zero3_json_writes_every_stage3_knob_as_a_number_and_lets_trainer_build_the_optimizer():
    config = deepspeed_config(ZERO3, model_config=catalog_config(LLAMA_8B))
    zero = config["zero_optimization"]
    assert zero == {
        "stage": 3, "overlap_comm": True, "contiguous_gradients": True,
        **{name: value for name, value in Zero().resolved(4096).items() if name != "allgather_bucket_size"},
        "stage3_gather_16bit_weights_on_model_save": True,
    }
    assert zero["stage3_param_persistence_threshold"] == 40_960
    assert "optimizer" not in config  # no offload: Trainer's AdamW (the plan's optimizer) runs under ZeRO


def test_zero3_nvme_parameter_offload_json():
    zero = deepspeed_config(ZERO3_NVME, model_config=catalog_config(LLAMA_8B))["zero_optimization"]
    place = {"device": "nvme", "pin_memory": True, "nvme_path": "/local_nvme"}
    # the swap buffer holds the largest partition, the 128256 x 4096 embedding: DeepSpeed's default 1e8 elements
    # fails its assertion (partitioned_param_swapper.py:357; Qwen2.5-0.5B's embedding did on the H200)
    assert zero["offload_optimizer"] == place and zero["offload_param"] == {**place, "buffer_size": 128256 * 4096}
    assert zero["stage3_max_reuse_distance"] == 0


def test_nvme_parameter_swap_buffer_is_the_default_where_every_partition_fits():
    two = deepspeed_plan(num_gpus=8, zero=Zero(offload_device="nvme", nvme_path="/nvme"), offload="parameters")
    zero = deepspeed_config(two, model_config=catalog_config("Qwen/Qwen2.5-0.5B"))["zero_optimization"]
    assert zero["offload_param"]["buffer_size"] == 100_000_000  # 151936 x 896 / 8 ranks < 1e8


def test_without_the_model_config_the_hidden_size_knobs_are_left_to_trainer():
    config = deepspeed_config(deepspeed_plan(zero=Zero(reduce_bucket_size=50_000_000)))
    zero = config["zero_optimization"]
    assert zero["reduce_bucket_size"] == 50_000_000  # set: written as it is
    assert zero["stage3_prefetch_bucket_size"] == "auto" and zero["stage3_param_persistence_threshold"] == "auto"
    assert zero["sub_group_size"] == 1_000_000_000  # no "auto" exists: DeepSpeed's default as a number


def test_json_precision_follows_the_plans_autocast():
    fp16 = deepspeed_config(deepspeed_plan(amp="fp16"))
    assert fp16["fp16"] == {"enabled": True} and fp16["bf16"] == {"enabled": False}
    fp32 = deepspeed_config(deepspeed_plan(amp="none"))
    assert not fp32["fp16"]["enabled"] and not fp32["bf16"]["enabled"]


def test_hidden_size_is_read_as_transformers_reads_it():
    assert hidden_size_of(catalog_config(LLAMA_8B)) == 4096

    class Vision:
        hidden_sizes = [96, 192, 768]

    class Composite:
        text_config = type("Text", (), {"hidden_size": 2048})()

    assert hidden_size_of(Vision()) == 768 and hidden_size_of(Composite()) == 2048 and hidden_size_of(object()) is None


def test_other_strategies_get_no_deepspeed_config_and_deepspeed_no_fsdp_config():
    with pytest.raises(UsageError, match="a DeepSpeed config is for strategy 'deepspeed'"):
        deepspeed_config(TrainConfig(seq_len=1024, num_gpus=2))
    with pytest.raises(UsageError, match="a DeepSpeed launcher config is for strategy 'deepspeed'"):
        deepspeed_accelerate_config(TrainConfig(seq_len=1024, num_gpus=2), "ds.json")
    with pytest.raises(UsageError, match="use deepspeed_accelerate_config"):
        accelerate_config(ZERO3)


# ---- the launcher config ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("train_config", [ZERO2_OFFLOAD, ZERO3])
def test_accelerate_yaml_names_the_json_beside_it(tmp_path, train_config):
    import yaml
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    model_config = catalog_config(LLAMA_8B)
    path = write_accelerate_config(tmp_path / "accelerate_deepspeed.yaml", train_config, model_config=model_config)
    launcher = yaml.safe_load(path.read_text())
    assert launcher["distributed_type"] == "DEEPSPEED"
    assert launcher["num_processes"] == train_config.num_gpus
    json_path = Path(launcher["deepspeed_config"]["deepspeed_config_file"])
    assert json_path == (tmp_path / DEEPSPEED_CONFIG_FILE).resolve() and json_path.is_absolute()
    assert json.loads(json_path.read_text()) == deepspeed_config(train_config, model_config=model_config)
    assert launcher["deepspeed_config"]["zero3_init_flag"] == (train_config.zero.stage == 3)
    # accelerate raises when the yaml repeats what the JSON owns (DeepSpeedPlugin._deepspeed_config_checks)
    assert not {"mixed_precision", "gradient_accumulation_steps", "gradient_clipping", "zero_stage"} & (
        set(launcher) | set(launcher["deepspeed_config"]))
    parsed = load_config_from_file(str(path))
    assert parsed.distributed_type == DistributedType.DEEPSPEED and parsed.num_processes == train_config.num_gpus


def test_a_deepspeed_plan_is_relaunched_under_accelerate_even_on_one_gpu(tmp_path, monkeypatch):
    from memtune.run.runner import relaunch_command

    for name in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    options = RunOptions(plan=str(tmp_path / "plan.json"), data="train.jsonl", output_dir=str(tmp_path / "out"))
    plan = Plan(model="qwen2.5-0.5b", budget_bytes=80 << 30, train_config=ZERO2_OFFLOAD)
    command = relaunch_command(plan, options, tmp_path / "out")
    assert command is not None and command[1:4] == ["-m", "accelerate.commands.launch", "--config_file"]
    assert Path(command[4]).name == "accelerate_deepspeed.yaml"
    assert "distributed_type: DEEPSPEED" in Path(command[4]).read_text()
    written = json.loads((tmp_path / "out" / DEEPSPEED_CONFIG_FILE).read_text())
    assert written["zero_optimization"]["reduce_bucket_size"] == catalog_config("qwen2.5-0.5b").hidden_size ** 2
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # already under the launcher: run here
    assert relaunch_command(plan, options, tmp_path / "out") is None


def test_fsdp_plans_still_launch_fsdp(tmp_path):
    path = write_accelerate_config(tmp_path / "fsdp.yaml", TrainConfig(seq_len=1024, num_gpus=2))
    assert "distributed_type: FSDP" in path.read_text() and not (tmp_path / DEEPSPEED_CONFIG_FILE).exists()


# ---- without DeepSpeed: exit 2 with the install hint -------------------------------------------------------------


def test_training_arguments_without_deepspeed_name_the_extra(no_deepspeed, tmp_path):
    plan = Plan(model="qwen2.5-0.5b", budget_bytes=1 << 30, train_config=ZERO3)
    with pytest.raises(UsageError, match=r"strategy deepspeed needs DeepSpeed, which is not installed") as error:
        plan.training_arguments(output_dir=str(tmp_path))
    assert DEEPSPEED_EXTRA_HINT in str(error.value)


def test_memtune_run_without_deepspeed_exits_2_with_the_hint(no_deepspeed, tmp_path, capsys):
    from memtune.cli import main

    plan_path = Plan(model="qwen2.5-0.5b", budget_bytes=1 << 30, train_config=ZERO2_OFFLOAD).save(
        tmp_path / "plan.json")
    assert main(["run", str(plan_path), "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert DEEPSPEED_EXTRA_HINT in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # refused before any work


# ---- with DeepSpeed: its own parsers accept the JSON ------------------------------------------------------------


def filled(config: dict) -> dict:
    """The JSON with Trainer's "auto"s replaced by numbers, as `trainer_config_process` does (micro-batch 2 x 3)."""
    text = json.dumps(config)
    text = text.replace('"lr": "auto"', '"lr": 2e-05').replace('"betas": "auto"', '"betas": [0.9, 0.999]')
    text = text.replace('"eps": "auto"', '"eps": 1e-08').replace('"weight_decay": "auto"', '"weight_decay": 0.0')
    data = json.loads(text)
    data.update(train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=3, train_batch_size=6,
                gradient_clipping=1.0)
    return data


@pytest.mark.parametrize("train_config", [ZERO2_OFFLOAD, ZERO3, ZERO3_NVME, deepspeed_plan(zero=Zero(stage=1))])
def test_deepspeeds_config_parser_reads_the_knobs_back(train_config):
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.config import DeepSpeedConfig

    written = deepspeed_config(train_config, model_config=catalog_config(LLAMA_8B))
    parsed = DeepSpeedConfig(filled(written))
    zero, knobs = parsed.zero_config, written["zero_optimization"]
    assert parsed.zero_optimization_stage == train_config.zero.stage
    assert zero.reduce_bucket_size == knobs["reduce_bucket_size"] and zero.overlap_comm is True
    assert parsed.bfloat16_config.enabled is True
    if train_config.zero.stage == 3:
        assert zero.prefetch_bucket_size == knobs["stage3_prefetch_bucket_size"]
        assert zero.param_persistence_threshold == knobs["stage3_param_persistence_threshold"]
        assert zero.max_reuse_distance == knobs["stage3_max_reuse_distance"]
        assert zero.sub_group_size == knobs["sub_group_size"]
    offloaded = train_config.offload != "none"
    assert (zero.offload_optimizer is not None) == offloaded
    if offloaded:
        assert zero.offload_optimizer.device == train_config.zero.offload_device
        assert zero.offload_optimizer.pin_memory is True
    assert (zero.offload_param is not None) == (train_config.offload == "parameters")


@pytest.mark.parametrize("train_config", [ZERO2_OFFLOAD, ZERO3])
def test_accelerates_plugin_accepts_the_json(tmp_path, train_config):
    pytest.importorskip("deepspeed")
    from accelerate.utils import DeepSpeedPlugin

    path = write_deepspeed_config(tmp_path / "ds.json", train_config, model_config=catalog_config(LLAMA_8B))
    plugin = DeepSpeedPlugin(hf_ds_config=str(path), zero3_init_flag=train_config.zero.stage == 3)
    assert plugin.zero_stage == train_config.zero.stage
    assert plugin.offload_optimizer_device == ("cpu" if train_config.offload != "none" else "none")


def test_training_arguments_of_a_deepspeed_plan_hand_trainer_the_json(tmp_path):
    pytest.importorskip("deepspeed")
    plan = Plan(model="qwen2.5-0.5b", budget_bytes=1 << 30,
                train_config=deepspeed_plan(amp="none", micro_batch_size=2, grad_accum_steps=3, offload="optimizer",
                                            zero=Zero(stage=2)))
    args = plan.training_arguments(output_dir=str(tmp_path), use_cpu=False)  # fp32: no use_cpu needed on a CPU
    resolved = args.hf_deepspeed_config.config  # Trainer filled the "auto"s from its own fields
    assert resolved["train_micro_batch_size_per_gpu"] == 2 and resolved["gradient_accumulation_steps"] == 3
    assert resolved["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert resolved["optimizer"]["params"]["lr"] == args.learning_rate
    assert args.deepspeed_plugin.zero_stage == 2
    path = write_deepspeed_config(tmp_path / "x.json", plan.train_config)
    given = plan.training_arguments(output_dir=str(tmp_path), use_cpu=False, deepspeed=str(path))
    assert given.deepspeed == str(path)  # an explicit deepspeed= wins


def test_a_deepspeed_plan_run_without_its_launcher_is_warned_about(monkeypatch):
    from memtune.run.runner import _launch_warnings

    for name in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    model_config = catalog_config("qwen2.5-0.5b")
    plan = Plan(model="qwen2.5-0.5b", budget_bytes=1 << 30, train_config=ZERO2_OFFLOAD.replace(seq_len=512))
    messages = _launch_warnings(plan, model_config)
    assert any("not launched with a DeepSpeed accelerate config" in message for message in messages)
    assert not any("FSDP" in message for message in messages)  # its offload is DeepSpeed's, not FSDP's
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert _launch_warnings(plan, model_config) == []


# ---- end to end on the CPU (DeepSpeed's CPU accelerator, gloo) --------------------------------------------------


@pytest.mark.slow
def test_memtune_run_trains_a_zero3_plan_under_accelerate_launch(model_dir, tmp_path, monkeypatch):
    """`memtune run` relaunches itself under `accelerate launch` with the DeepSpeed yaml and JSON it writes, and
    Trainer runs ZeRO-3 for 2 optimizer steps (DeepSpeed's CPU accelerator here; the first run JIT-builds its shared
    memory op, ~40 s)."""
    pytest.importorskip("deepspeed")
    from memtune.cli import main

    for name in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)
    plan = Plan(model=str(model_dir), budget_bytes=1 << 30,
                train_config=TrainConfig(seq_len=64, micro_batch_size=2, strategy="deepspeed", zero=Zero(stage=3)))
    output = tmp_path / "out"
    corpus = Path(__file__).parent / "data" / "tiny_corpus.jsonl"
    code = main(["run", str(plan.save(tmp_path / "plan.json")), "--data", str(corpus), "--output-dir", str(output),
                 "--max-steps", "2"])
    assert code == 0
    summary = json.loads((output / "run_summary.json").read_text())
    assert summary["status"] == "completed" and summary["global_step"] == 2, summary
    assert [step for step, _ in summary["loss_curve"]] == [1, 2]
    assert (output / DEEPSPEED_CONFIG_FILE).is_file() and (output / "checkpoint-2" / "global_step2").is_dir()
