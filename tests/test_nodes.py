"""Plans over several machines (`--nodes M --gpus N`, issue 15 item 4): the configuration and its checks, the
per-GPU memory (the world size shards), the throughput over the inter-node link, and the launch files, read back
with accelerate's own config loader and launcher parser and torchrun's parser."""

from __future__ import annotations

import json
import subprocess
from dataclasses import replace

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser

from memtune.cli import main
from memtune.config import DEFAULT_INTER_NODE_GBPS, Policy, TrainConfig, Zero
from memtune.errors import UsageError
from memtune.plan import Plan
from memtune.predict import throughput
from memtune.predict.estimate import estimate
from memtune.run import launch
from memtune.sources import catalog_config
from tests.models import tiny_llama

LLAMA_8B = catalog_config("meta-llama/Llama-3.1-8B")
SHAPE_8B = throughput.ModelShape.of(LLAMA_8B, 8_030_261_248)


def run(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---- the configuration -----------------------------------------------------------------------------------


def test_num_nodes_round_trips_and_sets_the_world_size():
    config = TrainConfig(seq_len=1024, micro_batch_size=2, grad_accum_steps=3, amp="bf16", num_gpus=8, num_nodes=2)
    assert config.world_size == 16
    assert config.effective_batch_size == 2 * 3 * 16
    assert config.sharded and not config.replicated
    assert TrainConfig.from_dict(config.to_dict()) == config
    assert TrainConfig.from_json(config.to_json()) == config
    assert "2 nodes x 8 GPUs, FSDP" in config.describe()
    plan = Plan(model="meta-llama/Llama-3.1-8B", train_config=config, budget_bytes=80 * 2**30)
    loaded = Plan.from_dict(json.loads(plan.to_json()))
    assert loaded.train_config == config and loaded.train_config.num_nodes == 2
    old = config.to_dict()
    del old["num_nodes"]  # a plan saved before the key existed
    assert TrainConfig.from_dict(old).num_nodes == 1


def test_one_gpu_per_machine_over_two_machines_is_distributed():
    ddp = TrainConfig(seq_len=128, num_gpus=1, num_nodes=2, strategy="ddp")
    assert ddp.replicated and ddp.world_size == 2
    with pytest.raises(UsageError, match="needs num_gpus >= 2"):
        TrainConfig(seq_len=128, num_gpus=1, num_nodes=1, strategy="ddp")


@pytest.mark.parametrize("value", [0, -1, 1.5, "2", True])
def test_num_nodes_must_be_a_positive_integer(value):
    with pytest.raises(UsageError, match=f"num_nodes must be a positive integer, got {value!r}"):
        TrainConfig(seq_len=128, num_gpus=2, num_nodes=value)


def test_a_quantised_base_stays_on_one_machine():
    from memtune.config import Adapter, quantized_base_fields

    with pytest.raises(UsageError, match=r"planned on one machine, got 2 \(--nodes, num_nodes\): use 1"):
        TrainConfig(seq_len=128, adapter=Adapter(), num_nodes=2, **quantized_base_fields(4, None))


def test_the_policy_splits_the_batch_over_every_machine():
    with pytest.raises(UsageError) as refused:
        Policy(num_gpus=8, num_nodes=2).validate(24)
    message = str(refused.value)
    assert "batch 24 is not a multiple of 16 GPUs (--nodes 2 x --gpus 8)" in message
    assert "use --batch-size 16 or --batch-size 32" in message
    Policy(num_gpus=8, num_nodes=1).validate(24)
    Policy(num_gpus=8, num_nodes=2).validate(32)  # the search plans several machines (tests/test_fit_nodes.py)


# ---- the command line: exit 2 with the value seen and the fix ---------------------------------------------


@pytest.mark.parametrize("args, words", [
    (["--nodes", "0"], ["--nodes must be a whole number of machines >= 1, got 0", "e.g. --nodes 2 --gpus 8"]),
    (["--nodes", "2", "--gpus", "4", "--batch-size", "12"],
     ["--batch-size 12 is not a multiple of 8 GPUs (--nodes 2 x --gpus 4)"]),
    (["--nodes", "2", "--gpus", "2", "--inter-node-gbps", "0"],
     ["--inter-node-gbps must be a positive rate in Gb/s, got 0.0", "e.g. 400"]),
    (["--nodes", "2", "--gpus", "1", "--qlora", "4"], ["planned on one machine, got 2 (--nodes, num_nodes): use 1"]),
])
def test_plan_refuses_bad_nodes_with_exit_2(args, words, capsys):
    base = ["plan", "gpt2", "--seq-len", "128", "--batch-size", "8", "--budget", "16GiB", "--trace-device", "cpu"]
    code, out, err = run(base + args, capsys)
    assert code == 2, err
    assert out == "" and "Traceback" not in err
    flat = " ".join(err.split())
    for word in words:
        assert word in flat


def test_plan_out_needs_a_budget(tmp_path, capsys):
    code, _, err = run(["plan", "gpt2", "--seq-len", "128", "--batch-size", "8", "--nodes", "2", "--gpus", "2",
                        "--out", str(tmp_path)], capsys)
    assert code == 2
    assert "--out" in err and "add --gpu NAME" in " ".join(err.split())


# ---- memory: the world size shards ---------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_per_gpu_memory_of_2x2_equals_1x4(strategy):
    model = tiny_llama(2)
    base = dict(seq_len=64, micro_batch_size=2, amp="bf16", gradient_checkpointing=True, strategy=strategy)
    one_machine = estimate(model, TrainConfig(**base, num_gpus=4), device="cpu")
    two_machines = estimate(model, TrainConfig(**base, num_gpus=2, num_nodes=2), device="cpu")
    two_gpus = estimate(model, TrainConfig(**base, num_gpus=2), device="cpu")
    assert two_machines.total_bytes == one_machine.total_bytes
    assert two_machines.breakdown == one_machine.breakdown
    if strategy == "fsdp":  # sharded over 4 ranks, not over the 2 of one machine
        assert two_machines.breakdown["weights"] < two_gpus.breakdown["weights"]


def test_zero_partitions_over_the_world_size():
    from memtune.predict.zero import cached_layout

    model = tiny_llama(2)
    base = TrainConfig(seq_len=64, amp="bf16", strategy="deepspeed", zero=Zero(stage=3))
    assert cached_layout(model, replace(base, num_gpus=2, num_nodes=2)).num_ranks == 4
    assert cached_layout(model, replace(base, num_gpus=4)).num_ranks == 4


# ---- throughput across machines -------------------------------------------------------------------------------


def test_one_machine_is_timed_as_before():
    speed = throughput.gpu_speed("H100")
    # the formula before several machines existed: factor x bytes / (GPU-GPU link x efficiency)
    assert throughput.collective_seconds(1e9, 1.5, speed) == 1.5 * 1e9 / (450e9 * 0.6)
    slow_network = speed.scaled(inter_node_bytes_per_second=1.0)  # not used on one machine
    for strategy in ("fsdp", "ddp"):
        config = TrainConfig(seq_len=2048, micro_batch_size=4, grad_accum_steps=2, amp="bf16",
                             gradient_checkpointing=True, num_gpus=8, strategy=strategy, adapter=None)
        assert throughput.tokens_per_second(SHAPE_8B, config, slow_network) == \
            throughput.tokens_per_second(SHAPE_8B, config, speed)


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_throughput_is_lower_across_machines_at_equal_world_size(strategy):
    from memtune.config import Adapter

    speed = throughput.gpu_speed("H100")
    adapter = Adapter() if strategy == "ddp" else None  # DDP of an 8B model: LoRA, as it would fit
    base = dict(seq_len=2048, micro_batch_size=1, amp="bf16", gradient_checkpointing=True, strategy=strategy,
                adapter=adapter)
    one_machine, two_machines = TrainConfig(**base, num_gpus=16), TrainConfig(**base, num_gpus=8, num_nodes=2)
    within = throughput.tokens_per_second(SHAPE_8B, one_machine, speed)
    across = throughput.tokens_per_second(SHAPE_8B, two_machines, speed)
    assert across < within
    # the slowest link sets the time: a network as fast as NVLink costs nothing more
    as_fast = speed.scaled(inter_node_bytes_per_second=speed.interconnect_bytes_per_second)
    assert throughput.tokens_per_second(SHAPE_8B, two_machines, as_fast) == within
    faster_network = speed.scaled(inter_node_bytes_per_second=8 * speed.inter_node_bytes_per_second)
    assert throughput.tokens_per_second(SHAPE_8B, two_machines, faster_network) > across


def test_the_network_assumption_is_400_gbps_per_machine():
    assert DEFAULT_INTER_NODE_GBPS == 400
    assert throughput.GpuSpeed(name="x", bf16_flops=1, fp32_flops=1, memory_bytes_per_second=1) \
        .inter_node_bytes_per_second == 400e9 / 8


# ---- launch files ---------------------------------------------------------------------------------------------


LAUNCHED = [
    TrainConfig(seq_len=1024, amp="bf16", gradient_checkpointing=True, num_gpus=8, num_nodes=2),
    TrainConfig(seq_len=1024, amp="bf16", num_gpus=8, num_nodes=2, strategy="ddp"),
    TrainConfig(seq_len=1024, amp="bf16", num_gpus=8, num_nodes=4, strategy="deepspeed", zero=Zero(stage=3),
                offload="optimizer"),
]


@pytest.mark.parametrize("config", LAUNCHED, ids=["fsdp", "ddp", "deepspeed"])
def test_launch_files_parse_with_accelerates_loader(config, tmp_path):
    files = launch.write_launch_files(tmp_path / "launch", config, tmp_path / "plan.json", model_config=LLAMA_8B)
    assert len(files.accelerate_configs) == config.num_nodes
    expected_type = {"fsdp": "FSDP", "ddp": "MULTI_GPU", "deepspeed": "DEEPSPEED"}[config.strategy]
    for rank, path in enumerate(files.accelerate_configs):
        loaded = load_config_from_file(str(path))  # accelerate's own loader (ClusterConfig.from_yaml_file)
        assert loaded.distributed_type.value == expected_type
        assert loaded.num_machines == config.num_nodes and loaded.machine_rank == rank
        assert loaded.num_processes == config.world_size  # accelerate counts every machine's processes
        assert loaded.main_process_ip == launch.MAIN_PROCESS_IP and loaded.main_process_port == 29500
    if config.deepspeed:
        assert loaded.deepspeed_config["deepspeed_multinode_launcher"] == "standard"
        assert json.loads((tmp_path / "launch" / launch.DEEPSPEED_CONFIG_FILE).read_text())["zero_optimization"][
            "stage"] == 3
    # accelerate launch takes the rank and the address on its command line too (what the SLURM script passes)
    parsed = launch_command_parser().parse_args(
        ["--config_file", str(files.accelerate_configs[0]), "--machine_rank", "1", "--main_process_ip", "10.0.0.1",
         "-m", "memtune", "run", "plan.json"])
    parsed, _, _ = _validate_launch_command(parsed)
    assert (parsed.machine_rank, parsed.main_process_ip, parsed.num_machines) == (1, "10.0.0.1", config.num_nodes)


@pytest.mark.parametrize("config", LAUNCHED, ids=["fsdp", "ddp", "deepspeed"])
def test_torchrun_line_and_sbatch_script(config, tmp_path):
    import torch.distributed.run as torchrun

    files = launch.write_launch_files(tmp_path / "launch", config, tmp_path / "plan.json", model_config=LLAMA_8B)
    line = files.torchrun_line
    for option in ("--nnodes=", "--node-rank=", "--master-addr=", "--nproc-per-node="):
        assert option in line
    words = (line.replace("$NODE_RANK", "1").replace("$MASTER_ADDR", "10.0.0.1")
             .replace("${MASTER_PORT:-29500}", "29500").split()[1:])
    parsed = torchrun.get_args_parser().parse_args(words)  # torchrun's own parser
    assert (parsed.nnodes, parsed.nproc_per_node, parsed.node_rank, parsed.master_addr) == (
        str(config.num_nodes), str(config.num_gpus), 1, "10.0.0.1")
    assert parsed.module and parsed.training_script == "memtune"
    script = files.torchrun_script.read_text()
    assert line in script and "NODE_RANK:?" in script and "MASTER_ADDR:?" in script
    accelerate_variable = {"fsdp": "ACCELERATE_USE_FSDP=true", "ddp": "ACCELERATE_MIXED_PRECISION=bf16",
                           "deepspeed": "ACCELERATE_USE_DEEPSPEED=true"}[config.strategy]
    assert f"export {accelerate_variable}" in script
    sbatch = files.sbatch_script.read_text()
    assert f"#SBATCH --nodes={config.num_nodes}" in sbatch and f"#SBATCH --gpus-per-node={config.num_gpus}" in sbatch
    assert "srun" in sbatch and "accelerate launch" in sbatch and '--machine_rank "$SLURM_NODEID"' in sbatch
    assert '--cpus-per-task="$SLURM_CPUS_ON_NODE"' in sbatch  # not srun's one CPU per task
    for path in (files.torchrun_script, files.sbatch_script):
        assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    assert launch.MAIN_PROCESS_IP in files.instructions.read_text()


def test_one_gpu_needs_no_launch_files(tmp_path):
    with pytest.raises(UsageError, match="no launcher"):
        launch.write_launch_files(tmp_path, TrainConfig(seq_len=128), tmp_path / "plan.json")


def test_plan_out_writes_the_plan_and_the_launch_files(tmp_path, capsys):
    out_dir = tmp_path / "launch"
    code, out, err = run(["plan", "gpt2", "--seq-len", "128", "--batch-size", "8", "--gpu", "H100-80GB",
                          "--precision", "bf16-mixed", "--nodes", "2", "--gpus", "2", "--trace-device", "cpu",
                          "--inter-node-gbps", "200", "--out", str(out_dir)], capsys)
    assert code == 0, err
    flat = " ".join(out.split())
    assert "assuming 200 Gb/s of network per machine" in flat and "--inter-node-gbps" in flat
    assert "fill in main_process_ip" in flat and "2 nodes x 2 GPUs" in flat
    plan = Plan.load(out_dir / "plan.json")
    assert plan.train_config.num_nodes == 2 and plan.train_config.world_size == 4
    assert plan.predicted_tokens_per_second > 0
    assert sorted(path.name for path in out_dir.iterdir()) == [
        "LAUNCH.txt", "accelerate_machine0.yaml", "accelerate_machine1.yaml", "memtune.sbatch", "plan.json",
        "torchrun.sh"]
