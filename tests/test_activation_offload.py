"""Offloading the checkpointed layers' inputs to pinned host memory (issue 14, item 2): configuration, recipe,
trace (device and host bytes, at any depth and k), speed model, search and command line."""

from __future__ import annotations

import json

import pytest

from memtune.config import GIB, Policy, TrainConfig
from memtune.errors import UsageError
from memtune.predict import allocator
from memtune.search import choose, ladder
from tests.models import tiny_llama


def small_llama(layers: int = 6, hidden: int = 256):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2)


def test_the_configuration_round_trips_and_says_it():
    config = TrainConfig(seq_len=64, gradient_checkpointing=True, offload_activations=True)
    assert TrainConfig.from_dict(config.to_dict()) == config
    assert TrainConfig.from_dict({"seq_len": 64}).offload_activations is False  # plans written before the key
    assert "checkpointing (inputs on the host)" in config.describe()


@pytest.mark.parametrize("fields, words", [
    ({}, "needs gradient_checkpointing=True"),
    ({"gradient_checkpointing": True, "offload": "parameters"}, "not modelled under FSDP"),
    ({"gradient_checkpointing": True, "num_gpus": 2}, "not modelled under FSDP"),
])
def test_a_configuration_it_cannot_run_is_refused(fields, words):
    with pytest.raises(UsageError, match=words):
        TrainConfig(seq_len=64, offload_activations=True, **fields)


def test_the_recipe_trains_the_same_with_the_inputs_on_the_host():
    """A real CPU step: the same loss and gradients with and without the offload (save_on_cpu is a copy)."""
    import torch

    from memtune.recipe import step as recipe

    losses, grads = [], []
    for offload in (False, True):
        config = TrainConfig(seq_len=32, micro_batch_size=2, gradient_checkpointing=True, offload_activations=offload)
        torch.manual_seed(0)
        model = recipe.build_model(small_llama(3, 64), config, "cpu")
        assert all((module._gradient_checkpointing_func.func is recipe.offloaded_checkpoint) == offload
                   for module in model.modules() if hasattr(module, "_gradient_checkpointing_func")
                   and hasattr(module._gradient_checkpointing_func, "func"))
        batch = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(1))
        loss = recipe.forward_loss(model, batch, batch, config)
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in model.parameters()])
    assert torch.equal(losses[0], losses[1])
    assert all(torch.allclose(a, b) for a, b in zip(*grads, strict=True))


def test_the_trace_moves_each_checkpointed_input_to_the_host():
    """Each checkpointed layer saves its input, tokens x hidden in fp32 (the residual stream under bf16 autocast):
    with the offload the host holds one pinned block per layer, no saved input is left among the activations at the
    peak, and the device's peak falls by at most what went to the host."""
    from memtune.predict.estimate import estimate
    from memtune.predict.trace import host_block

    model_config = small_llama(12)
    config = TrainConfig(seq_len=2048, micro_batch_size=4, amp="bf16", gradient_checkpointing=True)
    on_gpu = estimate(model_config, config, device="cpu")
    offloaded = estimate(model_config, config.replace(offload_activations=True), device="cpu")
    per_layer = 4 * 2048 * 256 * 4
    assert offloaded.host_bytes == 12 * host_block(per_layer)
    assert on_gpu.host_bytes == 0
    assert on_gpu.breakdown["activations"] >= 12 * per_layer > offloaded.breakdown["activations"] + 11 * per_layer
    saved = on_gpu.peak_allocated_bytes - offloaded.peak_allocated_bytes
    assert 6 * per_layer <= saved <= 12 * per_layer  # the peak moves to the backward's temporaries


def test_host_blocks_are_torch_s_powers_of_two():
    from memtune.predict.trace import host_block

    assert [host_block(n) for n in (0, 1, 4096, 4097, 14 * 2**20)] == [0, 1, 4096, 8192, 16 * 2**20]


@pytest.mark.parametrize("k", [None, 2, 5])
def test_the_shallow_trace_extends_to_every_depth_and_k(k):
    """Device peaks and host bytes of the extended shallow trace equal the whole model's trace."""
    from memtune.predict.single import estimate_single, full_depth_events
    from memtune.predict.trace import trace_step

    model_config = small_llama(8, 64)
    config = TrainConfig(seq_len=64, micro_batch_size=2, amp="bf16", gradient_checkpointing=True,
                         checkpoint_layers=k, offload_activations=True)
    whole = trace_step(model_config, config, device="cpu")
    direct = allocator.simulate(whole.events)
    extended = allocator.simulate(full_depth_events(model_config, config, "cpu")[1])
    assert extended.peak_allocated_bytes == pytest.approx(direct.peak_allocated_bytes, rel=0.005)
    assert extended.peak_reserved_bytes == pytest.approx(direct.peak_reserved_bytes, rel=0.005)
    assert estimate_single(model_config, config, device="cpu").host_bytes == sum(whole.host_bytes.values())
    assert len(whole.host_bytes) == (k or 8)


def test_the_speed_model_charges_a_copy_out_and_back():
    from memtune.predict import throughput

    shape = throughput.ModelShape.of(small_llama(6), 10_000_000)
    speed = throughput.gpu_speed("H200")
    config = TrainConfig(seq_len=1024, micro_batch_size=2, amp="bf16", gradient_checkpointing=True)
    offloaded = config.replace(offload_activations=True)
    moved = throughput.offloaded_activation_bytes(shape, offloaded)
    assert moved == 6 * 2 * 1024 * 256 * 4 and throughput.offloaded_activation_bytes(shape, config) == 0
    extra = throughput.step_seconds(shape, offloaded, speed) - throughput.step_seconds(shape, config, speed)
    assert extra == pytest.approx(2 * moved / speed.pcie_bytes_per_second)
    faster = speed.scaled(pcie_bytes_per_second=4 * speed.pcie_bytes_per_second)
    slower = throughput.tokens_per_second(shape, offloaded, speed)
    assert throughput.tokens_per_second(shape, offloaded, faster) > slower


class OffloadPredictor:
    """Memory: 20 GiB, 14 with checkpointing, 11 with the inputs offloaded too (4 GiB of them on the host)."""

    num_layers = 4

    def memory(self, config: TrainConfig):
        from memtune.predict.peak import Estimate

        size = int((11 if config.offload_activations else 14 if config.gradient_checkpointing else 20) * GIB)
        host = 4 * GIB if config.offload_activations else 0
        return Estimate(config, size, size, 0, 0, breakdown={"activations": size}, host_bytes=host)

    def fits(self, estimate, usable_bytes: int) -> bool:
        return estimate.total_bytes <= usable_bytes

    def tokens_per_second(self, config: TrainConfig) -> float:
        return 100.0 - 20 * config.gradient_checkpointing - 15 * config.offload_activations


POLICY = Policy(allow_offload=False, allow_chunked_loss=False, use_adapter=False, margin_bytes=0,
                allow_8bit_optimizer=False, allow_pure_16bit=False, precision="fp32", micro_batch_size=1,
                expandable_segments=False, gradient_checkpointing=True)


def test_the_search_offloads_only_when_checkpointing_alone_does_not_fit():
    roomy = choose.search(OffloadPredictor(), 1024, 1, 16 * GIB, POLICY, explain=False)
    assert roomy.chosen is not None and not roomy.chosen.config.offload_activations
    tight = choose.search(OffloadPredictor(), 1024, 1, 12 * GIB, POLICY, explain=False)
    assert tight.chosen is not None and tight.chosen.config.offload_activations
    assert [c.config.offload_activations for c in tight.candidates] == [False, True]


def test_the_search_keeps_the_host_s_memory_in_mind():
    policy = Policy(**{**POLICY.__dict__, "host_budget_bytes": 2 * GIB})
    result = choose.search(OffloadPredictor(), 1024, 1, 12 * GIB, policy, explain=False)
    assert result.chosen is None
    refused = next(c for c in result.candidates if c.config.offload_activations)
    assert refused.status == choose.TOO_BIG and "4.00 GiB of host memory (all ranks)" in refused.note


def test_offload_is_not_a_candidate_without_checkpointing_or_under_fsdp():
    space = ladder.candidate_space(64, 2, Policy(use_adapter=False, num_gpus=2), with_adapter=False)
    offloaded = [c for c in space if c.offload_activations]
    assert offloaded and all(c.gradient_checkpointing and c.strategy == "ddp" for c in offloaded)


def test_trainer_leaves_the_offload_to_the_plan_and_the_snippet_sets_it():
    from memtune.report.words import python_snippet

    config = TrainConfig(seq_len=64, gradient_checkpointing=True, offload_activations=True)
    assert ladder.trainer_arguments(config)["gradient_checkpointing"] is False
    assert "pinned host memory" in " ".join(ladder.settings(config))
    snippet = python_snippet(config)
    assert "offload=True" in snippet and "gradient_checkpointing=False" in snippet


def test_pinning_the_offload_against_checkpointing_off_exits_2(capsys):
    from memtune import cli

    code = cli.main(["fit", "gpt2", "--budget", "8GiB", "--offload-activations", "on", "--checkpointing", "off"])
    assert code == 2
    assert "--offload-activations on" in capsys.readouterr().err


def test_plan_predicts_the_offload(capsys):
    from memtune import cli

    assert cli.main(["plan", "gpt2", "--seq-len", "256", "--batch-size", "2", "--offload-activations",
                     "--trace-device", "cpu", "--json"]) == 0
    estimate = json.loads(capsys.readouterr().out)["estimate"]
    assert estimate["config"]["offload_activations"] and estimate["config"]["gradient_checkpointing"]
    assert estimate["host_bytes"] > 0


def test_plan_takes_the_loss_and_says_the_host_memory(capsys):
    from memtune import cli

    assert cli.main(["plan", "gpt2", "--seq-len", "256", "--batch-size", "2", "--offload-activations", "--loss",
                     "chunked", "--trace-device", "cpu"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "pinned host memory" in out and "not in the GPU total" in out


def test_several_gpus_with_the_strategy_left_to_the_search_offload_under_ddp():
    Policy(offload_activations=True, num_gpus=2).validate(4)  # auto: the search keeps the DDP candidates
    space = ladder.candidate_space(64, 4, Policy(offload_activations=True, num_gpus=2, use_adapter=False),
                                   with_adapter=False)
    assert space and all(c.strategy == "ddp" and c.gradient_checkpointing for c in space)
    with pytest.raises(UsageError, match="--offload-activations on with --strategy fsdp"):
        Policy(offload_activations=True, num_gpus=2, strategy="fsdp").validate(4)
    with pytest.raises(UsageError, match="--offload-activations on with --offload parameters"):
        Policy(offload_activations=True, offload="parameters").validate(4)


def test_what_to_set_agrees_with_the_snippet():
    config = TrainConfig(seq_len=64, gradient_checkpointing=True, offload_activations=True)
    lines = " ".join(ladder.settings(config))
    assert "gradient_checkpointing=True" not in lines and "gradient_checkpointing=False" in lines


def test_every_ddp_rank_pins_its_own_copy():
    """The host budget is the machine's: a 2-GPU DDP candidate pins twice one rank's bytes."""
    policy = Policy(**{**POLICY.__dict__, "host_budget_bytes": 6 * GIB, "num_gpus": 2, "strategy": "ddp"})
    result = choose.search(OffloadPredictor(), 1024, 2, 12 * GIB, policy, explain=False)
    refused = next(c for c in result.candidates if c.config.offload_activations)
    assert refused.status == choose.TOO_BIG and "8.00 GiB of host memory (all ranks)" in refused.note


def test_the_oom_guard_may_step_down_to_the_offload():
    from memtune.run.stepdown import StepDownPolicy

    plan = TrainConfig(seq_len=64, micro_batch_size=2, gradient_checkpointing=True)
    offloaded = plan.replace(offload_activations=True)
    policy = StepDownPolicy(plan, fallbacks=(offloaded,), loader_micro_batch=2, per_device_batch=2,
                            can_checkpoint=True)
    assert policy.usable(offloaded, plan)
    assert not StepDownPolicy(plan, fallbacks=(offloaded,), loader_micro_batch=2, per_device_batch=2).usable(
        offloaded, plan)


def test_the_plan_file_records_the_pinned_host_memory(capsys, tmp_path):
    from memtune import cli
    from memtune.plan import Plan

    path = tmp_path / "plan.json"
    assert cli.main(["fit", "gpt2", "--seq-len", "256", "--batch-size", "2", "--budget", "8GiB", "--no-verify",
                     "--offload-activations", "on", "--checkpointing", "on", "--trace-device", "cpu", "--json",
                     "--plan-out", str(path)]) == 0
    document = json.loads(capsys.readouterr().out)
    chosen = document["search"]["chosen"]["estimate"]
    saved = json.loads(path.read_text())
    assert saved["predicted_host_bytes"] == chosen["host_bytes"] > 0
    assert document["plan"]["predicted_host_bytes"] == chosen["host_bytes"]
    assert Plan.load(path).predicted_host_bytes == chosen["host_bytes"]
    del saved["predicted_host_bytes"]  # a plan written before the field existed
    assert Plan.from_dict(saved).predicted_host_bytes == 0


def test_fsdp_cpu_offload_counts_its_offloaded_shards_in_host_memory():
    """FSDP2 CPU offload keeps every shard of the weights and, for trained ones, of the gradients (both pinned, each
    rounded up to a power of two) and AdamW's two moments on the host: fp32 full fine-tuning holds at least 16 bytes
    per parameter there (what the search checks against --host-memory), split over the GPUs."""
    from memtune.predict.estimate import fsdp_offload_host_bytes
    from memtune.predict.zero import cached_layout

    model_config = tiny_llama()
    one = TrainConfig(seq_len=64, micro_batch_size=1, amp="bf16", offload="parameters")
    params = sum(param.numel for param in cached_layout(model_config, one).params)
    host = fsdp_offload_host_bytes(model_config, one)
    assert 16 * params <= host <= 32 * params
    assert fsdp_offload_host_bytes(model_config, one.replace(offload="none")) == 0
    assert fsdp_offload_host_bytes(model_config, one.replace(num_gpus=2)) < host
