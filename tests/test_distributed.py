"""Launcher config, launch command, Trainer arguments and the sharded trial (CPU, gloo)."""

from __future__ import annotations

import sys

import pytest
import torch

from memtune import distributed, verify
from memtune.config import TrainConfig
from memtune.distributed import (
    accelerate_config,
    apply_fsdp,
    fsdp_training_arguments,
    launch_command,
    measure_sharded,
    write_accelerate_config,
)
from memtune.errors import UsageError
from memtune.sources import catalog_config


def tiny_llama(layers: int = 2):
    config = catalog_config("meta-llama/Llama-3.2-1B")
    config.hidden_size, config.intermediate_size, config.num_attention_heads = 64, 128, 4
    config.num_key_value_heads, config.head_dim, config.vocab_size = 2, 16, 256
    config.num_hidden_layers = layers
    config.bos_token_id = config.eos_token_id = 0
    return config


def test_accelerate_config_shards_fully_with_fsdp2_by_decoder_layer():
    config = accelerate_config(TrainConfig(seq_len=1024, amp="bf16", num_gpus=4),
                               model_config=catalog_config("meta-llama/Llama-3.1-8B"))
    assert config["distributed_type"] == "FSDP"
    assert config["num_processes"] == 4
    assert config["mixed_precision"] == "bf16"
    assert config["fsdp_config"] == {
        "fsdp_version": 2,
        "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer",
        "fsdp_reshard_after_forward": True,
        "fsdp_offload_params": False,
        "fsdp_state_dict_type": "FULL_STATE_DICT",
        "fsdp_cpu_ram_efficient_loading": False,
        "fsdp_activation_checkpointing": False,
    }


def test_offload_precision_and_process_count_follow_the_configuration():
    config = accelerate_config(TrainConfig(seq_len=1024, offload="parameters"), num_gpus=1,
                               model_config=catalog_config("Qwen/Qwen2.5-0.5B"))
    assert config["fsdp_config"]["fsdp_offload_params"] is True
    assert config["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"] == "Qwen2DecoderLayer"
    assert config["mixed_precision"] == "no"
    assert config["num_processes"] == 1
    with pytest.raises(UsageError, match="ZeRO-Offload"):
        accelerate_config(TrainConfig(seq_len=1024, offload="optimizer"))


def test_unsupported_configurations_are_refused_with_every_reason():
    with pytest.raises(UsageError) as refused:
        distributed.check_supported(TrainConfig(seq_len=16, offload="optimizer", loss="chunked"))
    assert "ZeRO-Offload" in str(refused.value) and "single root module" in str(refused.value)


def test_launch_command_runs_memtune_under_accelerate_launch(tmp_path):
    path = tmp_path / "fsdp.yaml"
    assert launch_command(path, ["run", "plan.json"]) == [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(path), "-m", "memtune", "run", "plan.json",
    ]


@pytest.mark.parametrize("offload", [False, True])
def test_the_accelerate_launcher_turns_the_written_config_into_an_fsdp2_plugin(tmp_path, offload):
    """What `accelerate launch` does with the file, up to the plugin Trainer's Accelerator builds from the env."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin, patch_environment
    from accelerate.utils.launch import prepare_multi_gpu_env
    from torch.distributed.fsdp import CPUOffloadPolicy

    train_config = TrainConfig(seq_len=1024, amp="bf16", num_gpus=2, offload="parameters" if offload else "none")
    path = write_accelerate_config(tmp_path / "fsdp.yaml", train_config, model_config=catalog_config("meta-llama/Llama-3.1-8B"))
    command = launch_command(path, ["run", "plan.json"])
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(command[3:]))
    assert args.use_fsdp and args.module and args.training_script == "memtune"
    assert args.training_script_args == ["run", "plan.json"] and int(args.num_processes) == 2
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    assert env["FSDP_OFFLOAD_PARAMS"] == str(offload).lower()
    assert env["FSDP_TRANSFORMER_CLS_TO_WRAP"] == "LlamaDecoderLayer"
    with patch_environment(**{k: v for k, v in env.items() if k.startswith(("FSDP_", "ACCELERATE_"))}):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert plugin.reshard_after_forward is True
    assert isinstance(plugin.cpu_offload, CPUOffloadPolicy) == offload
    assert plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]


def test_training_arguments_give_transformers_the_same_plugin(tmp_path):
    from transformers import TrainingArguments

    kwargs = fsdp_training_arguments(TrainConfig(seq_len=1024, amp="bf16", offload="parameters"),
                                     model_config=catalog_config("meta-llama/Llama-3.1-8B"))
    plugin_args = TrainingArguments(output_dir=str(tmp_path), report_to=[], **kwargs).fsdp_plugin_args
    assert plugin_args["fsdp_version"] == 2
    assert plugin_args["reshard_after_forward"] is True
    assert plugin_args["cpu_offload"] is True
    assert plugin_args["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert plugin_args["transformer_cls_names_to_wrap"] == "LlamaDecoderLayer"


@pytest.fixture
def one_process_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_apply_fsdp_wraps_layers_and_a_tail_unit_with_fp32_masters_under_mixed_precision(one_process_group):
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from memtune import recipe

    config = TrainConfig(seq_len=16, weights_dtype="bf16", amp="bf16")
    model = apply_fsdp(recipe.build_model(tiny_llama(), config, "cpu"), config, pin_memory=False)
    assert isinstance(model, FSDPModule)
    assert all(isinstance(layer, FSDPModule) for layer in model.model.layers)
    assert all(isinstance(p, DTensor) and p.dtype == torch.float32 for p in model.parameters())
    policy = model.model.layers[0]._get_fsdp_state()._mp_policy
    assert policy.param_dtype == policy.reduce_dtype == policy.output_dtype == torch.bfloat16
    # Tied embedding and LM head share one unit with the final norm, kept gathered after forward.
    tail = model.model.norm._get_fsdp_state()._fsdp_param_group
    assert tail.post_forward_mesh_info is None
    assert any(p is model.lm_head.weight for p in [fp.sharded_param for fp in tail.fsdp_params])


def test_sharded_trial_with_cpu_offload_runs_on_cpu_and_leaves_no_process_group():
    import torch.distributed as dist

    config = TrainConfig(seq_len=16, micro_batch_size=2, grad_accum_steps=2, amp="bf16", offload="parameters")
    measured = measure_sharded(tiny_llama(), config, steps=1, device="cpu")
    assert measured.fits and len(measured.step_seconds) == 1
    assert measured.tokens_per_step == 2 * 2 * 16
    assert not dist.is_initialized()


@pytest.mark.slow
def test_two_gpu_trial_spawns_one_process_per_rank_on_cpu():
    measured = measure_sharded(tiny_llama(), TrainConfig(seq_len=16, micro_batch_size=2, num_gpus=2), steps=1, device="cpu")
    assert measured.fits and measured.tokens_per_step == 2 * 2 * 16 and len(measured.step_seconds) == 1


def test_verify_hands_offloaded_and_multi_gpu_configurations_to_the_sharded_trial(monkeypatch):
    calls = []

    def fake_trial(model_config, train_config, steps, device):
        calls.append((train_config.num_gpus, train_config.offload, steps, device))
        return verify.Measurement(fits=True)

    monkeypatch.setattr(distributed, "measure_sharded", fake_trial)
    model = tiny_llama()
    assert verify.measure(model, TrainConfig(seq_len=16, num_gpus=2), steps=2).fits
    assert verify.measure(model, TrainConfig(seq_len=16, offload="parameters"), steps=1).fits
    assert calls == [(2, "none", 2, "cuda"), (1, "parameters", 1, "cuda")]


@pytest.mark.gpu
@pytest.mark.xfail(strict=False, reason="on the H200 (torch 2.11) 2 MiB stayed allocated after this trial "
                   "(69,206,016 vs 67,108,864 bytes); the cause is not found yet")
def test_one_gpu_offload_trial_gives_its_memory_back():
    import torch.distributed as dist

    verify.warm_up()
    verify.release_memory()
    baseline = torch.cuda.memory_allocated()
    config = TrainConfig(seq_len=512, micro_batch_size=2, amp="bf16", gradient_checkpointing=True, offload="parameters")
    measured = measure_sharded(catalog_config("Qwen/Qwen2.5-0.5B"), config, steps=2)
    assert measured.fits and measured.peak_reserved_bytes > 0
    assert torch.cuda.memory_allocated() == baseline
    assert not dist.is_initialized()
