"""`memtune fit --nodes M --gpus N` and `auto_fit(nodes=M)` (issue 15 item 4): the search splits the effective batch
over every GPU of every machine, times the collectives over the assumed network, writes the launch files next to the
plan; `memtune run` of such a plan refuses to start one machine's processes alone. CPU only (tiny model, real
tracing on fake tensors, no GPU)."""

from __future__ import annotations

import dataclasses
import json
import sys

import pytest
from accelerate.commands.config.config_args import load_config_from_file

from memtune.cli import main
from memtune.config import DEFAULT_INTER_NODE_GBPS, STRATEGIES, Policy, TrainConfig
from memtune.errors import UsageError
from memtune.measure.probe import ProbeResult
from memtune.plan import Plan
from memtune.run import launch
from memtune.search import ladder
from memtune.sources import catalog_config

LAUNCH_FILES = ["LAUNCH.txt", "accelerate_machine0.yaml", "accelerate_machine1.yaml", "memtune.sbatch", "torchrun.sh"]
FAST_PINS = ["--strategy", "ddp", "--no-lora", "--precision", "bf16-mixed", "--checkpointing", "off", "--loss",
             "standard", "--offload-activations", "off", "--expandable-segments", "off", "--no-offload",
             "--no-8bit-optim", "--trace-device", "cpu"]
"""Pins that leave the search one engine (DDP: the per-GPU step is the one-GPU trace, fast on a CPU) and the
micro-batch / accumulation split as the only choice."""


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=4096, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    path = tmp_path_factory.mktemp("tiny-llama")
    config.save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def no_gpu(monkeypatch):
    """Plan as on a machine without a GPU, and as a process no launcher started."""
    monkeypatch.setattr(
        sys.modules["memtune.measure.probe"], "probe", lambda: ProbeResult(reason="tests plan without a GPU")
    )
    for name in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)


def run(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, " ".join(captured.err.split())


# ---- the candidates: the batch over the world size -------------------------------------------------------------


def test_every_candidate_splits_the_batch_over_every_gpu_of_every_machine():
    policy = Policy(num_gpus=2, num_nodes=2, use_adapter=False, allow_offload=False)
    assert ladder.micro_batch_sizes(16, policy) == [4, 2, 1]
    space = ladder.candidate_space(128, 16, policy, with_adapter=False)
    assert space
    assert {config.micro_batch_size for config in space} == {4, 2, 1}
    for config in space:
        assert (config.num_nodes, config.num_gpus, config.world_size) == (2, 2, 4)
        assert config.micro_batch_size * config.grad_accum_steps * 4 == 16 == config.effective_batch_size
    assert {config.strategy for config in space} == set(STRATEGIES)


def test_two_machines_of_two_gpus_search_what_one_machine_of_four_does():
    """The per-GPU choices are those of the same world size on one machine (the same micro-batches, engines, order);
    only where the GPUs are differs."""
    two_machines = ladder.candidate_space(128, 16, Policy(num_gpus=2, num_nodes=2), with_adapter=False)
    one_machine = ladder.candidate_space(128, 16, Policy(num_gpus=4), with_adapter=False)
    assert [config.replace(num_gpus=4, num_nodes=1) for config in two_machines] == one_machine


def test_one_gpu_on_each_of_two_machines_needs_a_strategy_that_spans_them():
    policy = Policy(num_gpus=1, num_nodes=2, use_adapter=False, allow_offload=False)
    assert ladder.world_size(policy) == 2
    assert ladder.strategies(policy) == list(STRATEGIES)
    assert ladder.micro_batch_sizes(8, policy) == [4, 2, 1]
    space = ladder.candidate_space(128, 8, policy, with_adapter=False)
    assert {config.strategy for config in space} == set(STRATEGIES)
    assert all(config.world_size == 2 and config.effective_batch_size == 8 for config in space)
    chosen = next(config for config in space if config.replicated)
    flipped = ladder.STRATEGY.flip(chosen, policy, 8)
    assert flipped is not None and flipped[1].strategy == "fsdp" and flipped[1].num_nodes == 2
    Policy(num_gpus=1, num_nodes=2, strategy="ddp").validate(8)  # DDP over 2 machines of one GPU: allowed
    with pytest.raises(UsageError, match="needs --gpus 2 or more"):
        Policy(num_gpus=1, num_nodes=1, strategy="ddp").validate(8)


def test_the_what_to_set_lines_name_the_machines_and_their_launch_files():
    config = TrainConfig(seq_len=128, micro_batch_size=2, amp="bf16", num_gpus=8, num_nodes=2, strategy="ddp")
    line = next(line for line in ladder.settings(config) if "replica" in line)
    assert "2 nodes x 8 GPUs" in line and "accelerate_machine{R}.yaml" in line
    one_machine = next(line for line in ladder.settings(config.replace(num_nodes=1)) if "replica" in line)
    assert one_machine.startswith("8 GPUs, a full replica") and "memtune run sets it up" in one_machine


# ---- memtune fit --nodes 2 --gpus 2 ------------------------------------------------------------------------------


def test_fit_over_two_machines_chooses_a_per_gpu_share_and_writes_the_launch_files(tiny_model_dir, tmp_path,
                                                                                   capsys):
    plan_path = tmp_path / "plans" / "plan.json"
    code, out, err = run(["fit", str(tiny_model_dir), "--seq-len", "128", "--batch-size", "16", "--budget", "4GiB",
                          "--nodes", "2", "--gpus", "2", *FAST_PINS, "--json", "--plan-out", str(plan_path)], capsys)
    assert code == 0, err
    document = json.loads(out)  # stdout: the document alone
    chosen = document["search"]["chosen"]["config"]
    assert chosen["num_nodes"] == 2 and chosen["num_gpus"] == 2 and chosen["strategy"] == "ddp"
    assert chosen["micro_batch_size"] * chosen["grad_accum_steps"] * 4 == 16
    assert document["inter_node_gbps"] == DEFAULT_INTER_NODE_GBPS
    notes = " ".join(document["search"]["notes"])
    assert "2 machines of 2 GPUs assume 400 Gb/s of network per machine" in notes and "--inter-node-gbps" in notes
    assert "fill in main_process_ip" in notes
    plan = Plan.load(plan_path)
    assert plan.train_config.to_dict() == chosen and plan.train_config.world_size == 4
    assert plan.predicted_tokens_per_second == document["search"]["chosen"]["predicted_tokens_per_second"] > 0
    assert sorted(path.name for path in plan_path.parent.iterdir()) == sorted(LAUNCH_FILES + ["plan.json"])
    steps = document["launch_files"]
    assert any("fill in main_process_ip" in step for step in steps)
    assert any(f"machine 1: accelerate launch --config_file {plan_path.parent}/accelerate_machine1.yaml" in step
               for step in steps)
    machine1 = load_config_from_file(str(plan_path.parent / "accelerate_machine1.yaml"))  # accelerate's own loader
    assert (machine1.num_machines, machine1.machine_rank, machine1.num_processes) == (2, 1, 4)
    assert machine1.distributed_type == "MULTI_GPU"


def test_auto_fit_plans_two_machines_and_times_the_network_it_is_told(tiny_model_dir, tmp_path):
    from memtune.fit import auto_fit

    pins = dict(strategy="ddp", use_adapter=False, precision="bf16-mixed", gradient_checkpointing=False,
                loss="standard", offload_activations=False, expandable_segments=False, allow_offload=False,
                allow_8bit_optimizer=False, micro_batch_size=2)
    fast = auto_fit(str(tiny_model_dir), seq_len=128, batch_size=8, budget="4GiB", verify=False, nodes=2,
                    plan_path=tmp_path / "fast" / "plan.json", **pins)
    config = fast.train_config
    assert (config.num_nodes, config.num_gpus, config.micro_batch_size, config.grad_accum_steps) == (2, 1, 2, 2)
    assert (tmp_path / "fast" / "accelerate_machine1.yaml").is_file()
    slow = auto_fit(str(tiny_model_dir), seq_len=128, batch_size=8, budget="4GiB", verify=False, nodes=2,
                    inter_node_gbps=1, **pins)  # no plan_path: no plan file, no launch files
    assert slow.train_config == config
    assert slow.predicted_tokens_per_second < fast.predicted_tokens_per_second  # the gradients cross 1 Gb/s
    with pytest.raises(UsageError, match="inter_node_gbps must be a positive rate in Gb/s, got 0"):
        auto_fit(str(tiny_model_dir), budget="4GiB", nodes=2, inter_node_gbps=0)


def test_a_batch_the_world_size_does_not_divide_exits_2_with_the_value_and_the_fix(tiny_model_dir, capsys):
    code, out, err = run(["fit", str(tiny_model_dir), "--seq-len", "128", "--batch-size", "6", "--budget", "4GiB",
                          "--nodes", "2", "--gpus", "2", "--trace-device", "cpu"], capsys)
    assert code == 2 and out == "" and "Traceback" not in err
    assert "batch 6 is not a multiple of 4 GPUs (--nodes 2 x --gpus 2): each GPU takes an equal share; use " \
           "--batch-size 4 or --batch-size 8" in err
    from memtune.fit import auto_fit

    with pytest.raises(UsageError, match=r"batch 3 is not a multiple of 2 GPUs .*use batch_size=2 or batch_size=4"):
        auto_fit(str(tiny_model_dir), seq_len=64, batch_size=3, budget="4GiB", verify=False, nodes=2)


# ---- memtune run of a plan over several machines -----------------------------------------------------------------


def two_machine_plan() -> Plan:
    config = TrainConfig(seq_len=128, micro_batch_size=2, amp="bf16", num_gpus=2, num_nodes=2, strategy="ddp")
    return Plan(model="Qwen/Qwen2.5-0.5B", train_config=config, budget_bytes=80 << 30)


def test_memtune_run_of_a_two_machine_plan_exits_2_and_says_to_use_the_launch_files(tmp_path, capsys):
    plan_path = two_machine_plan().save(tmp_path / "plan.json")
    code, out, err = run(["run", str(plan_path), "--output-dir", str(tmp_path / "out")], capsys)
    assert code == 2 and out == "" and "Traceback" not in err
    assert "the plan spans 2 machines (2 nodes x 2 GPUs)" in err and "starts the processes of one machine only" in err
    assert "memtune plan MODEL ... --nodes 2 --gpus 2 --out DIR" in err  # no launch files beside it yet
    launch.write_launch_files(tmp_path, two_machine_plan().train_config, plan_path,
                              model_config=catalog_config("Qwen/Qwen2.5-0.5B"))
    code, out, err = run(["run", str(plan_path), "--output-dir", str(tmp_path / "out")], capsys)
    assert code == 2
    assert "fill in main_process_ip" in err
    assert f"accelerate launch --config_file {tmp_path}/accelerate_machine{{R}}.yaml -m memtune run {plan_path}" in err
    assert not (tmp_path / "out").exists()  # refused before any work


def test_under_a_launcher_each_machine_runs_its_share(tmp_path, monkeypatch):
    from memtune.options import RunOptions
    from memtune.run.runner import _launch_warnings, relaunch_command, several_machines_problem

    plan = two_machine_plan()
    options = RunOptions(plan=str(tmp_path / "plan.json"), output_dir=str(tmp_path / "out"))
    with pytest.raises(UsageError, match="spans 2 machines"):
        relaunch_command(plan, options, tmp_path / "out")
    one_machine = dataclasses.replace(plan, train_config=plan.train_config.replace(num_nodes=1))
    assert several_machines_problem(one_machine, None) is None
    qwen = catalog_config("Qwen/Qwen2.5-0.5B")
    monkeypatch.setenv("WORLD_SIZE", "4")  # torchrun's global world size: every machine's processes
    assert several_machines_problem(plan, options.plan) is None
    assert relaunch_command(plan, options, tmp_path / "out") is None
    assert _launch_warnings(plan, qwen) == []
    monkeypatch.setenv("WORLD_SIZE", "2")  # one machine's processes alone
    warnings = " ".join(_launch_warnings(plan, qwen))
    assert "the plan is for 2 nodes x 2 GPUs but 2 process(es) run" in warnings and "accelerate_machine" in warnings


# ---- memtune plan --json: the throughput and its assumption -------------------------------------------------------


def test_plan_json_has_the_predicted_tokens_per_second_and_the_network_rate(tiny_model_dir, capsys):
    args = ["plan", str(tiny_model_dir), "--seq-len", "128", "--batch-size", "8", "--budget", "4GiB",
            "--strategy", "ddp", "--precision", "bf16-mixed", "--trace-device", "cpu", "--json"]
    code, out, err = run(args + ["--nodes", "2", "--gpus", "2", "--inter-node-gbps", "200"], capsys)
    assert code == 0, err
    document = json.loads(out)
    assert document["inter_node_gbps"] == 200 and document["tokens_per_second"] > 0
    code, out, err = run(args + ["--gpus", "4"], capsys)
    assert code == 0, err
    one_machine = json.loads(out)
    assert one_machine["inter_node_gbps"] is None
    assert one_machine["tokens_per_second"] > document["tokens_per_second"]  # the network is slower than NVLink
