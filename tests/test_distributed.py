"""Launcher config, launch command, Trainer arguments and the sharded trial (CPU, gloo)."""

from __future__ import annotations

import contextlib
import gc
import json
import sys
from pathlib import Path

import pytest
import torch

from memtune.config import TrainConfig
from memtune.errors import UsageError
from memtune.measure import memory, sharded, verify
from memtune.measure.sharded import measure_sharded
from memtune.recipe import parallel
from memtune.recipe.parallel import apply_fsdp, build_replicated_model, ddp_train_step
from memtune.run.launch import (
    accelerate_config,
    ddp_training_arguments,
    fsdp_training_arguments,
    launch_command,
    write_accelerate_config,
)
from memtune.sources import catalog_config
from tests.models import tiny_llama


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
        parallel.check_supported(TrainConfig(seq_len=16, offload="optimizer", loss="chunked"))
    assert "ZeRO-Offload" in str(refused.value) and "loss" not in str(refused.value)  # the chunked loss runs


def test_launch_command_runs_memtune_under_accelerate_launch(tmp_path):
    path = tmp_path / "fsdp.yaml"
    assert launch_command(path, ["run", "plan.json"]) == [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(path),
        "-m",
        "memtune",
        "run",
        "plan.json",
    ]


@pytest.mark.parametrize("offload", [False, True])
def test_the_accelerate_launcher_turns_the_written_config_into_an_fsdp2_plugin(tmp_path, offload):
    """What `accelerate launch` does with the file, up to the plugin Trainer's Accelerator builds from the env."""
    from accelerate.commands.launch import (
        _validate_launch_command,
        launch_command_parser,
    )
    from accelerate.utils import FullyShardedDataParallelPlugin, patch_environment
    from accelerate.utils.launch import prepare_multi_gpu_env
    from torch.distributed.fsdp import CPUOffloadPolicy

    train_config = TrainConfig(seq_len=1024, amp="bf16", num_gpus=2, offload="parameters" if offload else "none")
    path = write_accelerate_config(
        tmp_path / "fsdp.yaml", train_config, model_config=catalog_config("meta-llama/Llama-3.1-8B")
    )
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

    from memtune.recipe import step as recipe

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


def test_a_spawned_rank_ends_without_interpreter_shutdown():
    """end_spawned_rank: what was printed comes out, exit status 0, and no shutdown step (atexit) runs, so no
    process-group thread can outlive the interpreter's shutdown."""
    import subprocess

    code = ("import atexit; from memtune.measure import sharded; atexit.register(print, 'atexit ran'); "
            "print('result written', end=''); sharded.end_spawned_rank(); print('not reached')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout) == (0, "result written"), done.stderr


@pytest.mark.slow
def test_two_gpu_trial_spawns_one_process_per_rank_on_cpu():
    measured = measure_sharded(
        tiny_llama(), TrainConfig(seq_len=16, micro_batch_size=2, num_gpus=2), steps=1, device="cpu"
    )
    assert measured.fits and measured.tokens_per_step == 2 * 2 * 16 and len(measured.step_seconds) == 1


def test_verify_hands_offloaded_and_multi_gpu_configurations_to_the_sharded_trial(monkeypatch):
    calls = []

    def fake_trial(model_config, train_config, steps, device):
        calls.append((train_config.num_gpus, train_config.strategy, train_config.offload, steps, device))
        return memory.Measurement(fits=True)

    monkeypatch.setattr(sharded, "measure_sharded", fake_trial)
    model = tiny_llama()
    assert verify.measure(model, TrainConfig(seq_len=16, num_gpus=2), steps=2).fits
    assert verify.measure(model, TrainConfig(seq_len=16, offload="parameters"), steps=1).fits
    assert verify.measure(model, TrainConfig(seq_len=16, num_gpus=2, strategy="ddp"), steps=1).fits
    assert calls == [
        (2, "fsdp", "none", 2, "cuda"),
        (1, "fsdp", "parameters", 1, "cuda"),
        (2, "ddp", "none", 1, "cuda"),
    ]


@pytest.mark.gpu
@pytest.mark.xfail(strict=False, reason="on the H200 (torch 2.11) 2 MiB stayed allocated after this trial "
                   "(69,206,016 vs 67,108,864 bytes); the cause is not found yet")
def test_one_gpu_offload_trial_gives_its_memory_back():
    import torch.distributed as dist

    memory.warm_up()
    memory.release_memory()
    baseline = torch.cuda.memory_allocated()
    config = TrainConfig(seq_len=512, micro_batch_size=2, amp="bf16", gradient_checkpointing=True, offload="parameters")
    measured = measure_sharded(catalog_config("Qwen/Qwen2.5-0.5B"), config, steps=2)
    assert measured.fits and measured.peak_reserved_bytes > 0
    assert torch.cuda.memory_allocated() == baseline
    assert not dist.is_initialized()


# ---- DDP (strategy "ddp") ----------------------------------------------------------------------------


def test_the_accelerate_launcher_turns_the_ddp_config_into_a_multi_gpu_launch_without_fsdp(tmp_path):
    from accelerate.commands.launch import (
        _validate_launch_command,
        launch_command_parser,
    )
    from accelerate.utils.launch import prepare_multi_gpu_env

    train_config = TrainConfig(seq_len=1024, amp="bf16", num_gpus=4, strategy="ddp")
    config = accelerate_config(train_config, model_config=catalog_config("meta-llama/Llama-3.1-8B"))
    assert config["distributed_type"] == "MULTI_GPU" and config["num_processes"] == 4 and "fsdp_config" not in config
    path = write_accelerate_config(tmp_path / "ddp.yaml", train_config)
    args, _, _ = _validate_launch_command(
        launch_command_parser().parse_args(launch_command(path, ["run", "plan.json"])[3:])
    )
    assert args.multi_gpu and not args.use_fsdp and not args.use_deepspeed
    assert int(args.num_processes) == 4 and args.module and args.training_script == "memtune"
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    assert env.get("ACCELERATE_USE_FSDP", "false") != "true" and not any(key.startswith("FSDP_") for key in env
                                                                        if key not in __import__("os").environ)


def test_ddp_and_fsdp_accept_the_chunked_loss_which_is_the_models_forward():
    for config in (TrainConfig(seq_len=16, num_gpus=2, strategy="ddp", loss="chunked"),
                   TrainConfig(seq_len=16, num_gpus=2, loss="chunked"),
                   TrainConfig(seq_len=16, offload="parameters", loss="chunked")):
        parallel.check_supported(config)  # raises nothing
        assert accelerate_config(config)["num_processes"] == config.num_gpus


def test_trainer_gets_the_ddp_arguments_memtune_measured(tmp_path, model_dir):
    """Plan.training_arguments -> Trainer -> accelerate's DDP kwargs: torch's defaults, find_unused_parameters=False."""
    from transformers import AutoModelForCausalLM, Trainer

    from memtune.plan import Plan

    config = TrainConfig(seq_len=32, micro_batch_size=2, num_gpus=2, strategy="ddp")
    assert ddp_training_arguments(config) == {"ddp_find_unused_parameters": False}
    args = Plan(model=str(model_dir), train_config=config, budget_bytes=1 << 30).training_arguments(
        output_dir=str(tmp_path), use_cpu=True)
    assert args.ddp_find_unused_parameters is False
    trainer = Trainer(model=AutoModelForCausalLM.from_pretrained(model_dir), args=args)
    handler = trainer._build_accelerator_args()["kwargs_handlers"][0]
    assert handler.find_unused_parameters is False and handler.gradient_as_bucket_view is False
    assert handler.to_kwargs() == {}  # what accelerate passes on: DistributedDataParallel's defaults
    assert parallel.DDP_KWARGS == {"find_unused_parameters": False}
    # an FSDP plan does not touch the DDP options
    fsdp = Plan(model=str(model_dir), train_config=config.replace(strategy="fsdp"), budget_bytes=1 << 30)
    assert fsdp.training_arguments(output_dir=str(tmp_path), use_cpu=True).ddp_find_unused_parameters is None


def _replicas_agree_worker(rank: int, world_size: int, init_method: str, out_dir: str) -> None:
    """One rank: different initial weights and batches per rank; after a DDP step the replicas must agree."""
    import torch.distributed as dist

    from memtune.recipe import step as recipe

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
    try:
        torch.manual_seed(rank)
        config = TrainConfig(seq_len=16, micro_batch_size=2, grad_accum_steps=2, num_gpus=world_size, strategy="ddp")
        model = build_replicated_model(tiny_llama(), config, "cpu")
        optimizer = recipe.make_optimizer(model)
        batches = [recipe.random_batch(tiny_llama(), config, "cpu") for _ in range(config.grad_accum_steps)]
        ddp_train_step(model, optimizer, batches, config, device_type="cpu")
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        tensors = {"weights": flat, "batches": torch.cat(batches).flatten().float()}
        result = {}
        for name, tensor in tensors.items():
            gathered = [torch.empty_like(tensor) for _ in range(world_size)]
            dist.all_gather(gathered, tensor)
            result[name] = float((gathered[0] - gathered[1]).abs().max())
        if rank == 0:
            Path(out_dir, "result.json").write_text(json.dumps(result))
        del model, optimizer  # the Reducer holds the process group: let it go before the group is destroyed
        gc.collect()
    finally:
        dist.destroy_process_group()
    sharded.end_spawned_rank()  # DDP leaves the group's threads running: no interpreter shutdown with them


@pytest.mark.slow
def test_two_process_ddp_step_keeps_the_replicas_equal(tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(_replicas_agree_worker, args=(2, f"file://{tmp_path}/store", str(tmp_path)), nprocs=2,
                       start_method="spawn", join=True)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["batches"] > 0  # the ranks trained on different data...
    assert result["weights"] == 0.0  # ...and all-reduced gradients: one model


@pytest.mark.slow
def test_two_gpu_ddp_trial_spawns_one_process_per_rank_on_cpu():
    config = TrainConfig(seq_len=16, micro_batch_size=2, grad_accum_steps=3, num_gpus=2, strategy="ddp")
    measured = measure_sharded(tiny_llama(), config, steps=2, device="cpu")
    assert measured.fits and len(measured.step_seconds) == 2
    assert measured.tokens_per_step == 2 * 2 * 2 * 16  # accumulation shortened to 2 micro-batches, as the estimate


def test_memtune_run_relaunches_a_ddp_plan_with_a_multi_gpu_config_and_warns_about_a_mismatched_launch(
    tmp_path, monkeypatch
):
    import argparse

    from memtune.plan import Plan
    from memtune.run.runner import _launch_warnings, relaunch_command

    for name in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    args = argparse.Namespace(
        plan=str(tmp_path / "plan.json"),
        data=None,
        output_dir=None,
        text_field="text",
        max_steps=5,
        learning_rate=None,
        save_steps=200,
        seed=42,
        resume=False,
        json=False,
    )
    config = TrainConfig(seq_len=1024, micro_batch_size=2, amp="bf16", num_gpus=2, strategy="ddp")
    ddp = Plan(model="qwen2.5-0.5b", budget_bytes=80 << 30, train_config=config)
    command = relaunch_command(ddp, args, tmp_path / "out")
    assert command[1:4] == ["-m", "accelerate.commands.launch", "--config_file"] and command[4].endswith(
        "accelerate_ddp.yaml"
    )
    written = Path(command[4]).read_text()
    assert "distributed_type: MULTI_GPU" in written and "num_processes: 2" in written and "fsdp" not in written
    qwen = catalog_config("Qwen/Qwen2.5-0.5B")
    monkeypatch.setenv("WORLD_SIZE", "2")  # under the launcher: run here, as planned
    assert relaunch_command(ddp, args, tmp_path / "out") is None
    assert _launch_warnings(ddp, qwen) == []
    fsdp = Plan(model="qwen2.5-0.5b", budget_bytes=80 << 30, train_config=config.replace(strategy="fsdp"))
    assert any("launched without an FSDP config" in message for message in _launch_warnings(fsdp, qwen))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert _launch_warnings(fsdp, qwen) == []
    assert any("launched with an FSDP or DeepSpeed config" in message for message in _launch_warnings(ddp, qwen))


# ---- the chunked loss under DDP and FSDP2 (two gloo ranks) ---------------------------------------------


def _chunked_equals_standard_worker(rank: int, world_size: int, init_method: str, out_dir: str, strategy: str,
                                    tied: bool) -> None:
    """One rank: the same random weights on every rank, a different batch per rank, two micro-batches (the first
    without gradient sync, as Trainer's accumulation runs them), once with the standard loss and once with the
    chunked forward (`use_chunked_loss`, chunks of 5 tokens: 7 chunks per micro-batch) on a copy of the model.
    Writes each loss and every full (all-reduced / unsharded) gradient to rank-N.pt."""
    import copy

    import torch.distributed as dist

    from memtune.recipe import step as recipe
    from memtune.recipe.loss import use_chunked_loss

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
    try:
        model_config = tiny_llama()
        model_config.tie_word_embeddings = tied
        config = TrainConfig(seq_len=16, micro_batch_size=2, grad_accum_steps=2, num_gpus=world_size,
                             strategy="ddp" if strategy == "ddp" else "fsdp",
                             offload="parameters" if strategy == "fsdp-offload" else "none")
        torch.manual_seed(0)
        standard = recipe.build_model(model_config, config, "cpu")
        chunked = use_chunked_loss(copy.deepcopy(standard), chunk_tokens=5)
        torch.manual_seed(1 + rank)
        batches = [recipe.random_batch(model_config, config, "cpu") for _ in range(config.grad_accum_steps)]
        batches[0][0, :3] = -100  # ignored label tokens
        results = {}
        for name, model in (("standard", standard), ("chunked", chunked)):
            if strategy == "ddp":
                wrapped = torch.nn.parallel.DistributedDataParallel(model, **parallel.DDP_KWARGS)
            else:
                wrapped = apply_fsdp(model, config, pin_memory=False)
            losses = []
            for index, input_ids in enumerate(batches):
                synced = index == len(batches) - 1
                if strategy == "ddp":
                    context = contextlib.nullcontext() if synced else wrapped.no_sync()
                else:
                    wrapped.set_requires_gradient_sync(synced)
                    context = contextlib.nullcontext()
                with context:
                    labels = input_ids.clone()
                    output = wrapped(input_ids=input_ids.clamp(min=0), labels=labels)
                    assert (output.logits is None) == (name == "chunked")  # the chunked forward ran
                    loss = output.loss / len(batches)
                    loss.backward()
                losses.append(loss.detach())
                del output
            grads = {param_name: (param.grad.full_tensor() if hasattr(param.grad, "full_tensor") else param.grad)
                     for param_name, param in model.named_parameters()}
            results[name] = {"losses": torch.stack(losses), "grads": grads}
            del wrapped
        torch.save(results, Path(out_dir, f"rank-{rank}.pt"))
        del standard, chunked, results
        gc.collect()
    finally:
        dist.destroy_process_group()
    sharded.end_spawned_rank()


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "fsdp-offload"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_two_process_chunked_loss_equals_the_standard_loss_and_its_gradients(tmp_path, strategy, tied):
    """The chunked forward called through DDP's wrapper and FSDP2's root module (the LM head called once per
    chunk and again in the checkpointed recomputation): on each rank, the same loss and the same synced
    gradients, every parameter's, as the model's own loss; and the ranks hold the same gradients."""
    import torch.multiprocessing as mp

    mp.start_processes(_chunked_equals_standard_worker,
                       args=(2, f"file://{tmp_path}/store", str(tmp_path), strategy, tied),
                       nprocs=2, start_method="spawn", join=True)
    ranks = [torch.load(tmp_path / f"rank-{rank}.pt") for rank in range(2)]
    for result in ranks:
        torch.testing.assert_close(result["chunked"]["losses"], result["standard"]["losses"], rtol=1e-5, atol=1e-6)
        expected = result["standard"]["grads"]
        assert result["chunked"]["grads"].keys() == expected.keys() and len(expected) > 10
        for name, grad in result["chunked"]["grads"].items():
            assert grad is not None and expected[name] is not None, name
            torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)
    assert not torch.equal(ranks[0]["standard"]["losses"], ranks[1]["standard"]["losses"])  # different batches
    for name, grad in ranks[0]["chunked"]["grads"].items():
        torch.testing.assert_close(grad, ranks[1]["chunked"]["grads"][name], rtol=0, atol=0, msg=name)
