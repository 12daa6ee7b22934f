"""The optimizer rung and pure 16-bit training: names, what the recipe builds, what the trace records, the search."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from benchmarks.cases import TINY_ARCHITECTURES, tiny_llama
from memtune.config import (
    BITSANDBYTES_OPTIMIZERS,
    DEFAULT_OPTIMIZER,
    GIB,
    OPTIMIZERS,
    TORCHAO_OPTIMIZERS,
    Adapter,
    Policy,
    TrainConfig,
)
from memtune.errors import UsageError
from memtune.plan import Plan
from memtune.predict import throughput
from memtune.predict.trace import (
    AUTOTUNE_FLUSH_BYTES,
    AUTOTUNED_ARGUMENTS,
    BLOCK_BYTES,
    NO_LAYER,
    Category,
    Event,
    budget_autotune_clones,
    trace_step,
)
from memtune.recipe import step as recipe
from memtune.search import ladder
from memtune.search.choose import search

needs_bitsandbytes = pytest.mark.skipif(
    not recipe.bitsandbytes_available(), reason='bitsandbytes is not installed (pip install -e ".[quant]")'
)
needs_torchao = pytest.mark.skipif(
    not recipe.torchao_available(), reason='torchao is not installed (pip install -e ".[quant]")'
)


def rounded(num_bytes: int) -> int:
    return max(BLOCK_BYTES, math.ceil(num_bytes / BLOCK_BYTES) * BLOCK_BYTES)


# ---- names -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_optimizer_name_round_trips(name):
    config = TrainConfig(seq_len=64, optimizer=name)
    assert TrainConfig.from_json(config.to_json()) == config
    assert json.loads(config.to_json())["optimizer"] == name


def test_adamw_of_old_plans_reads_as_fused_adamw():
    old = TrainConfig(seq_len=64).to_dict() | {"optimizer": "adamw"}
    assert TrainConfig.from_dict(old).optimizer == DEFAULT_OPTIMIZER == "adamw_torch_fused"
    plan = Plan(model="gpt2", train_config=TrainConfig(seq_len=64), budget_bytes=GIB)
    data = plan.to_dict()
    data["train_config"]["optimizer"] = "adamw"
    assert Plan.from_dict(data).train_config.optimizer == "adamw_torch_fused"


def test_an_unknown_optimizer_is_refused_with_the_choices():
    with pytest.raises(UsageError, match="optimizer must be one of adamw_torch_fused, .*got 'sgd'"):
        TrainConfig(seq_len=64, optimizer="sgd")


def test_bitsandbytes_optimizers_are_refused_under_fsdp():
    with pytest.raises(UsageError, match="FSDP cannot shard or offload bitsandbytes"):
        TrainConfig(seq_len=64, optimizer="adamw_bnb_8bit", offload="parameters")
    assert TrainConfig(seq_len=64, optimizer="adamw_bnb_8bit", num_gpus=2, strategy="ddp").replicated


# ---- what the recipe builds: what Trainer builds ----------------------------------------------------


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_the_recipe_builds_the_optimizer_trainer_builds(name, tmp_path):
    if name in BITSANDBYTES_OPTIMIZERS and not recipe.bitsandbytes_available():
        pytest.skip('bitsandbytes is not installed (pip install -e ".[quant]")')
    if name in TORCHAO_OPTIMIZERS and not recipe.torchao_available():
        pytest.skip('torchao is not installed (pip install -e ".[quant]")')
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    arguments = TrainingArguments(output_dir=str(tmp_path), optim=name, use_cpu=True, report_to="none")
    trainer_class, trainer_kwargs = Trainer.get_optimizer_cls_and_kwargs(arguments)
    our_class, our_kwargs = recipe.optimizer_class_and_kwargs(name)
    assert our_class is trainer_class
    assert our_kwargs == trainer_kwargs
    model = AutoModelForCausalLM.from_config(tiny_llama())
    decay = set(Trainer.get_decay_parameter_names(None, model))  # uses no Trainer state
    groups = recipe.parameter_groups(model)
    assert [id(p) for p in groups[0]["params"]] == [id(p) for n, p in model.named_parameters() if n in decay]
    assert [id(p) for p in groups[1]["params"]] == [id(p) for n, p in model.named_parameters() if n not in decay]


def test_a_missing_bitsandbytes_is_a_usage_error_with_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    monkeypatch.setitem(sys.modules, "torchao", None)  # nor torchao, whose 8-bit AdamW would stand in
    assert not recipe.bitsandbytes_available()
    for name in sorted(BITSANDBYTES_OPTIMIZERS):
        with pytest.raises(UsageError, match=r'which is not installed: pip install -e "\.\[quant\]"'):
            recipe.make_optimizer(torch.nn.Linear(4, 4), TrainConfig(seq_len=8, optimizer=name))
    assert ladder.skipped(Policy())[0] == (
        "8-bit and 4-bit optimizers skipped: neither bitsandbytes nor torchao is installed "
        '(pip install -e ".[quant]" to add them)'
    )  # the quantised bases' line follows (tests/test_qlora_rung.py)
    assert {c.optimizer for c in ladder.candidate_space(64, 2, Policy(), with_adapter=False)} == {DEFAULT_OPTIMIZER}


def test_8bit_optimizers_are_offered_for_full_fine_tuning_only(monkeypatch):
    # An adapter's optimizer state is a few MiB: quantising it is a quality trade that saves nothing.
    monkeypatch.setattr(ladder, "bitsandbytes_available", lambda: True)
    monkeypatch.setattr(ladder, "torchao_available", lambda: False)
    full = {c.optimizer for c in ladder.candidate_space(64, 2, Policy(), with_adapter=False)}
    assert full == {DEFAULT_OPTIMIZER, "adamw_bnb_8bit", "paged_adamw_8bit"}
    assert {c.optimizer for c in ladder.candidate_space(64, 2, Policy(), with_adapter=True)} == {DEFAULT_OPTIMIZER}
    pinned = Policy(optimizer="adamw_bnb_8bit")
    monkeypatch.setattr(ladder, "require_extra", lambda name: None)
    assert {c.optimizer for c in ladder.candidate_space(64, 2, pinned, with_adapter=True)} == {"adamw_bnb_8bit"}


@pytest.mark.parametrize("command", [
    ["plan", "gpt2", "--seq-len", "64", "--batch-size", "1", "--optim", "adamw_bnb_8bit", "--budget", "8GiB"],
    ["fit", "gpt2", "--seq-len", "64", "--batch-size", "1", "--optim", "paged_adamw_8bit", "--budget", "8GiB",
     "--no-verify"],
])
def test_the_cli_exits_2_with_the_install_hint_when_bitsandbytes_is_missing(command, monkeypatch, capsys):
    from memtune.cli import main

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    assert main(command) == 2
    err = capsys.readouterr().err
    assert 'pip install -e ".[quant]"' in err and "Traceback" not in err


def test_the_optimizer_choices_are_in_the_help(capsys):
    from memtune.cli import main

    assert main(["fit", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--optim NAME" in out and "--no-8bit-optim" in out and "--no-pure-16bit" in out
    for name in OPTIMIZERS:
        assert f"{name}:" in out


# ---- what the trace records: the state of each implementation on the tiny Llama -------------------


def traced_state_bytes(name: str, weights_dtype: str = "fp32", model_config=None) -> tuple[int, object]:
    """Optimizer state live at the traced step's peak (the second step's forward/backward), and the trace."""
    config = TrainConfig(seq_len=32, micro_batch_size=2, optimizer=name, weights_dtype=weights_dtype)
    trace = trace_step(model_config or tiny_llama(), config, device="cpu")
    return trace.peak_breakdown.get(Category.OPTIMIZER.value, 0), trace


def tiny_parameters(model_config=None) -> list[tuple[str, torch.Tensor]]:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config or tiny_llama())
    embedding = model.get_input_embeddings().weight
    return [("embedding" if p is embedding else "other", p) for p in model.parameters()]


def test_fused_and_foreach_adamw_hold_two_fp32_copies_of_the_parameters():
    params = tiny_parameters()
    two_copies = sum(2 * rounded(4 * p.numel()) for _, p in params)
    fused, _ = traced_state_bytes("adamw_torch_fused")
    foreach, _ = traced_state_bytes("adamw_torch")
    # + the fused step's `step` counter, a 0-d fp32 tensor on the device per parameter (torch/optim/adam.py
    # _init_group: on the device when fused); foreach keeps it on the host, traced here as a CPU tensor too.
    assert fused == two_copies + BLOCK_BYTES * len(params)
    assert foreach == two_copies + BLOCK_BYTES * len(params)


def test_pure_bf16_full_fine_tuning_holds_two_bf16_copies():
    params = tiny_parameters()
    state, trace = traced_state_bytes("adamw_torch_fused", weights_dtype="bf16")
    assert state == sum(2 * rounded(2 * p.numel()) for _, p in params) + BLOCK_BYTES * len(params)
    fp32_weights = trace_step(tiny_llama(), TrainConfig(seq_len=32, micro_batch_size=2), device="cpu")
    halved = sum(rounded(4 * p.numel()) - rounded(2 * p.numel()) for _, p in params)  # fp32 buffers stay
    assert trace.peak_breakdown[Category.WEIGHTS.value] == fp32_weights.peak_breakdown[Category.WEIGHTS.value] - halved


def test_adafactor_state_is_factored_and_much_smaller():
    params = tiny_parameters()
    # transformers.optimization.Adafactor._init: a matrix keeps a row and a column mean (fp32), a vector its
    # squared average; each parameter an RMS scalar on the device.
    expected = sum(
        (rounded(4 * p.shape[0]) + rounded(4 * p.shape[1]) if p.dim() == 2 else rounded(4 * p.numel())) + BLOCK_BYTES
        for _, p in params
    )
    adafactor, _ = traced_state_bytes("adafactor")
    fused, _ = traced_state_bytes("adamw_torch_fused")
    assert adafactor == expected
    assert adafactor < fused / 10


@needs_bitsandbytes
@pytest.mark.parametrize("name", ["adamw_bnb_8bit", "paged_adamw_8bit"])
def test_8bit_adamw_holds_two_bytes_per_parameter_and_the_block_maxima(name):
    params = tiny_parameters()
    expected = 2 * 256 * 4  # the two quantisation maps (bitsandbytes create_dynamic_map: 256 fp32 each)
    for kind, p in params:
        n = p.numel()
        if kind == "embedding" or n < 4096:
            # Trainer keeps nn.Embedding in 32-bit state; bitsandbytes keeps tensors under min_8bit_size=4096 so
            expected += 2 * rounded(4 * n)
        else:
            expected += 2 * rounded(n) + 2 * rounded(4 * math.ceil(n / 256))  # state1/2 uint8, absmax1/2 per block
    state, trace = traced_state_bytes(name)
    assert state == expected
    assert trace.paged_bytes == {}  # no tensor of the tiny Llama reaches bitsandbytes' paging size (1e5 elements)


@needs_bitsandbytes
def test_paged_state_is_left_out_of_the_pool_and_counted_apart():
    model_config = tiny_llama()
    model_config.vocab_size = 2048  # the (tied) embedding: 2048 x 64 = 131072 elements, paged
    embedding = 2048 * 64
    paged, trace = traced_state_bytes("paged_adamw_32bit", model_config=model_config)
    unpaged, _ = traced_state_bytes("adamw_bnb_8bit", model_config=model_config)
    params = tiny_parameters(model_config)
    assert trace.paged_bytes == {NO_LAYER: 2 * 4 * embedding}  # the embedding is in no decoder layer
    assert paged == sum(2 * rounded(4 * p.numel()) for _, p in params) - 2 * rounded(4 * embedding)
    assert unpaged > paged - 2 * rounded(4 * embedding)  # the 8-bit one holds its embedding state in the pool


@needs_bitsandbytes
def test_the_estimate_reports_paged_state_at_full_depth():
    from memtune.predict.estimate import estimate

    model_config = tiny_llama(layers=5)  # traced at 3 layers, extended to 5
    model_config.intermediate_size = 2048  # each MLP matrix 64 x 2048 = 131072 elements: paged
    config = TrainConfig(seq_len=32, micro_batch_size=2, optimizer="paged_adamw_8bit")
    predicted = estimate(model_config, config, device="cpu")
    assert predicted.num_layers == 5 and predicted.traced_layers == 3
    # 3 MLP matrices per layer, two uint8 states each (absmax stays in the pool), in all 5 layers
    assert predicted.paged_bytes == 5 * 3 * 2 * 64 * 2048
    assert predicted.to_dict()["paged_bytes"] == predicted.paged_bytes
    fused = estimate(model_config, config.replace(optimizer="adamw_torch_fused"), device="cpu")
    assert fused.paged_bytes == 0 and predicted.peak_reserved_bytes < fused.peak_reserved_bytes


def test_a_missing_torchao_is_a_usage_error_and_its_rung_is_skipped_with_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setattr(ladder, "bitsandbytes_available", lambda: True)
    assert not recipe.torchao_available()
    for name in sorted(TORCHAO_OPTIMIZERS):
        with pytest.raises(UsageError, match=r'needs torchao, which is not installed: pip install -e "\.\[quant\]"'):
            recipe.make_optimizer(torch.nn.Linear(4, 4), TrainConfig(seq_len=8, optimizer=name))
    assert '4-bit AdamW skipped: torchao is not installed (pip install -e ".[quant]" to add it)' in ladder.skipped(
        Policy())


def test_torchao_4bit_adamw_is_offered_beside_bitsandbytes_and_its_8bit_one_only_without_it(monkeypatch):
    monkeypatch.setattr(ladder, "torchao_available", lambda: True)
    monkeypatch.setattr(ladder, "bitsandbytes_available", lambda: True)
    offered = {c.optimizer for c in ladder.candidate_space(64, 2, Policy(), with_adapter=False)}
    assert offered == {DEFAULT_OPTIMIZER, "adamw_bnb_8bit", "paged_adamw_8bit", "adamw_torch_4bit"}
    monkeypatch.setattr(ladder, "bitsandbytes_available", lambda: False)
    offered = {c.optimizer for c in ladder.candidate_space(64, 2, Policy(), with_adapter=False)}
    assert offered == {DEFAULT_OPTIMIZER, "adamw_torch_4bit", "adamw_torch_8bit"}
    assert {c.optimizer for c in ladder.candidate_space(64, 2, Policy(allow_8bit_optimizer=False),
                                                        with_adapter=False)} == {DEFAULT_OPTIMIZER}
    with pytest.raises(UsageError, match="contradicts --no-8bit-optim"):
        Policy(optimizer="adamw_torch_4bit", allow_8bit_optimizer=False).validate(16)


@needs_torchao
@pytest.mark.parametrize(("name", "code_bytes", "temporary_per_element"),
                         [("adamw_torch_8bit", 1.0, 8), ("adamw_torch_4bit", 0.5, 24)])
def test_torchao_state_and_its_compiled_update_buffers(name, code_bytes, temporary_per_element, monkeypatch):
    # torchao/optim/adam.py `_new_buffer`: a parameter of >= 4096 elements that is a multiple of the block (256,
    # Trainer's block_size) gets coded state (uint8 codes, one fp32 scale per block, a 256-entry fp32 map), the
    # rest zeros_like; a step holds the fp32 buffers of `trace._compiled_update_buffers` per coded parameter.
    monkeypatch.setattr("memtune.predict.trace.AUTOTUNE_FLUSH_BYTES", BLOCK_BYTES)  # the peak stays in backward
    model_config = tiny_llama()
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass
    from transformers import AutoModelForCausalLM

    model_config.intermediate_size = 256  # gate/up/down: 64 x 256 = 16384 elements, coded
    model = AutoModelForCausalLM.from_config(model_config)
    real = recipe.make_optimizer(model, TrainConfig(seq_len=8, optimizer=name))
    expected, coded = 0, []
    for param in model.parameters():  # the state torchao makes for each parameter, on real CPU tensors
        for signed in (True, False):
            buffer = real._new_buffer(param, signed)
            parts = [getattr(buffer, key) for key in buffer.__tensor_flatten__()[0]] if (
                is_traceable_wrapper_subclass(buffer)) else [buffer]
            expected += sum(rounded(part.untyped_storage().nbytes()) for part in parts)
        if is_traceable_wrapper_subclass(buffer):
            coded.append(param.numel())
            assert parts[0].numel() * parts[0].element_size() == int(param.numel() * code_bytes)
    state, trace = traced_state_bytes(name, model_config=model_config)
    # + the `step` counter torchao keeps per parameter, a 0-d fp32 CPU tensor, traced as a block
    assert state == expected + BLOCK_BYTES * len(list(model.parameters()))
    n = 64 * 256  # the embedding and the MLP matrices; the attention projections (64 x 64) are coded too
    assert max(coded) == n and 64 * 64 in coded
    per_step = {4 * n: 2} | ({8 * n: 2} if temporary_per_element == 24 else {})  # fp32 buffers per parameter
    assert sum(size * count for size, count in per_step.items()) == temporary_per_element * n
    in_step = [e.num_bytes for e in trace.events if e.kind == "alloc" and e.num_bytes >= 4 * n
               and trace.categories[e.storage] == Category.OPTIMIZER.value
               and e.storage not in trace.autotune_clones]
    steps = 2
    assert {size: in_step.count(size) for size in set(in_step)} == {
        size: count * coded.count(n) * steps for size, count in per_step.items()}


@needs_torchao
@pytest.mark.parametrize("name", sorted(TORCHAO_OPTIMIZERS))
def test_the_compiled_update_autotunes_once_per_parameter_size_in_the_first_step(name):
    # Inductor benchmarks a kernel's configs at its first launch only, cloning its in-place arguments
    # (trace._autotune): once per coded parameter size, never in the second step.
    model_config = tiny_llama()
    model_config.intermediate_size = 256
    trace = traced_state_bytes(name, model_config=model_config)[1]
    kernels_with_arguments = sum(1 for group in AUTOTUNED_ARGUMENTS[name] for kernel in group if kernel)
    coded_sizes = {64 * 256, 64 * 64}  # the embedding and MLP matrices, the attention projections
    groups = {group for group, _ in trace.autotune_clones.values()}
    assert len(groups) == kernels_with_arguments * len(coded_sizes)
    clone_events = [i for i, e in enumerate(trace.events) if e.kind == "alloc" and e.storage in trace.autotune_clones]
    second_step = max(i for i, e in enumerate(trace.events) if e.kind == "alloc"
                      and trace.categories[e.storage] == Category.ACTIVATIONS.value)
    assert clone_events and max(clone_events) < second_step  # all in the first step's optimizer phase
    flush = [e for e in trace.events if e.kind == "alloc" and e.num_bytes == AUTOTUNE_FLUSH_BYTES]
    assert len(flush) == sum(len(group) for group in AUTOTUNED_ARGUMENTS[name]) * 2 * len(coded_sizes)


def test_autotune_clones_are_made_only_while_they_fit_under_the_peak_so_far():
    # triton_heuristics.py `copy_args_to_cpu_if_needed`: budget = peak allocated - allocated; each in-place
    # argument in order is cloned on the GPU while it fits, else copied to the host. A 600-byte budget here
    # (1000 peak, 400 live) takes the 512-byte clone, not the next 512-byte one (only 88 left), nor the
    # 1024-byte one; every call of that kernel decides alike.
    events = [Event.alloc("big", 1000), Event.free("big"), Event.alloc("held", 400)]
    for call in range(2):
        events += [Event.alloc(f"a{call}", 512), Event.alloc(f"b{call}", 1024), Event.alloc(f"c{call}", 512)]
        events += [Event.free(f"c{call}"), Event.free(f"b{call}"), Event.free(f"a{call}")]
    clones = {f"{name}{call}": (0, position) for call in range(2) for position, name in enumerate("abc")}
    kept = budget_autotune_clones(events, clones)
    assert [e.storage for e in kept if e.storage in clones] == ["a0", "a0", "a1", "a1"]
    assert budget_autotune_clones(events, {}) == events


# ---- pure 16-bit training end to end ------------------------------------------------------------


def test_pure_bf16_full_fine_tuning_plan_round_trip_and_training_arguments(tmp_path):
    config = TrainConfig(seq_len=64, weights_dtype="bf16", amp="none")
    assert config.precision == "bf16"
    plan = Plan(model="gpt2", train_config=config, budget_bytes=GIB)
    assert Plan.from_json(plan.to_json()).train_config == config
    arguments = plan.training_arguments(output_dir=str(tmp_path))
    assert arguments.bf16 is False and arguments.fp16 is False  # no autocast: the weights are loaded in bf16
    assert ladder.tier(config) == 1 and ladder.is_quality_trade(config)
    assert "no fp32 master weights" in ladder.precision_quality(config)
    assert "load the weights in bf16" in " ".join(ladder.settings(config))
    model = plan.prepare(torch.nn.Linear(4, 4), warm_up=False)
    assert model.weight.dtype == torch.bfloat16


def test_training_arguments_pass_the_plan_optimizer(tmp_path):
    plan = Plan(model="gpt2", train_config=TrainConfig(seq_len=64, optimizer="adafactor"), budget_bytes=GIB)
    assert plan.training_arguments(output_dir=str(tmp_path)).optim == "adafactor"


# ---- the search --------------------------------------------------------------------------------


class OptimizerPredictor:
    """Memory in GiB: 4 of weights + gradients, AdamW state 4 (8-bit: 1; paged: 0, outside the pool), activations
    2 per sequence (0.5 with checkpointing); 16-bit weights halve the model state. Speed: checkpointing 0.7x,
    8-bit AdamW 0.98x, paged 0.9x (as the throughput model ranks them:
    `test_the_speed_model_ranks_8bit_adamw_after_fused_adamw`), pure bf16 1.1x."""

    STATE_GIB = {"adamw_torch_fused": 4.0, "adamw_bnb_8bit": 1.0, "paged_adamw_8bit": 0.0}
    SPEED = {"adamw_torch_fused": 1.0, "adamw_bnb_8bit": 0.98, "paged_adamw_8bit": 0.9}

    def __init__(self) -> None:
        self.calls: list[TrainConfig] = []

    def gib(self, config: TrainConfig) -> float:
        state = (4.0 + self.STATE_GIB[config.optimizer]) / (2 if config.weights_dtype != "fp32" else 1)
        return state + (0.5 if config.gradient_checkpointing else 2.0) * config.micro_batch_size

    def memory(self, config: TrainConfig):
        from memtune.predict.estimate import Estimate

        self.calls.append(config)
        size = int(self.gib(config) * GIB)
        optimizer = int(self.STATE_GIB[config.optimizer] * GIB / (2 if config.weights_dtype != "fp32" else 1))
        return Estimate(config, size, size, workspace_bytes=0, context_bytes=0,
                        breakdown={"weights": size - optimizer, "optimizer": optimizer})

    def fits(self, estimate, usable_bytes: int) -> bool:
        return estimate.total_bytes <= usable_bytes

    def tokens_per_second(self, config: TrainConfig) -> float:
        speed = (0.7 if config.gradient_checkpointing else 1.0) * self.SPEED[config.optimizer]
        return speed * (1.1 if config.weights_dtype != "fp32" else 1.0)


POLICY = dict(allow_offload=False, allow_chunked_loss=False, use_adapter=False, margin_bytes=0, micro_batch_size=2)


def chosen(budget_gib: float, predictor: OptimizerPredictor | None = None, **policy) -> TrainConfig | None:
    result = search(predictor or OptimizerPredictor(), 64, 2, int(budget_gib * GIB), Policy(**(POLICY | policy)),
                    explain=False)
    return None if result.chosen is None else result.chosen.config


def described(config: TrainConfig | None) -> tuple | None:
    return None if config is None else (config.optimizer, config.gradient_checkpointing, config.precision)


@needs_bitsandbytes
def test_the_search_takes_8bit_adamw_only_when_allowed_and_nothing_faster_fits(monkeypatch):
    monkeypatch.setattr(ladder, "torchao_available", lambda: False)  # bitsandbytes' rungs alone
    # 12 GiB: fused AdamW without checkpointing fits (8 + 4) and is fastest.
    assert described(chosen(12)) == ("adamw_torch_fused", False, "bf16-mixed")
    # 10 GiB: fused AdamW fits only with checkpointing (9, 0.7x); 8-bit AdamW fits without (9, 0.98x): faster.
    assert described(chosen(10)) == ("adamw_bnb_8bit", False, "bf16-mixed")
    assert described(chosen(10, allow_8bit_optimizer=False)) == ("adamw_torch_fused", True, "bf16-mixed")
    # 8.5 GiB: 8-bit needs checkpointing (6, 0.69x); paged 8-bit fits without (8, 0.9x): faster.
    assert described(chosen(8.5)) == ("paged_adamw_8bit", False, "bf16-mixed")
    # 5.5 GiB: only the paged one with checkpointing keeps fp32 master weights (5).
    assert described(chosen(5.5)) == ("paged_adamw_8bit", True, "bf16-mixed")
    # Without 8-bit optimizers nothing with fp32 master weights fits 5.5 GiB: pure bf16 with checkpointing does
    # (state 4 + activations 1).
    assert described(chosen(5.5, allow_8bit_optimizer=False)) == ("adamw_torch_fused", True, "bf16")
    assert chosen(5.5, allow_8bit_optimizer=False, allow_pure_16bit=False) is None
    # A pinned optimizer is the only one tried.
    predictor = OptimizerPredictor()
    chosen(12, predictor, optimizer="adamw_bnb_8bit")
    assert {config.optimizer for config in predictor.calls} == {"adamw_bnb_8bit"}


class OffloadPredictor(OptimizerPredictor):
    """OptimizerPredictor, and CPU offload: the model state leaves the GPU (1 GiB stays) at 0.2x the speed."""

    def gib(self, config: TrainConfig) -> float:
        if config.offload == "none":
            return super().gib(config)
        return 1.0 + (0.5 if config.gradient_checkpointing else 2.0) * config.micro_batch_size

    def tokens_per_second(self, config: TrainConfig) -> float:
        return super().tokens_per_second(config) * (0.2 if config.offload != "none" else 1.0)


def test_pure_bf16_comes_before_offload_and_after_fp32_master_weights_on_the_gpu():
    """5.5 GiB: nothing with fp32 master weights fits on the GPU; pure bf16 with checkpointing does (5), and
    offload does too (2-5) but at 0.2x: pure bf16 is chosen. Forbidden, offload is."""
    offload = dict(allow_offload=True, allow_8bit_optimizer=False)
    assert described(chosen(5.5, OffloadPredictor(), **offload)) == ("adamw_torch_fused", True, "bf16")
    config = chosen(5.5, OffloadPredictor(), allow_pure_16bit=False, **offload)
    assert config is not None and config.offload != "none" and config.weights_dtype == "fp32"
    # 12 GiB: fp32 master weights fit on the GPU: neither pure bf16 nor offload is walked
    predictor = OffloadPredictor()
    assert described(chosen(12, predictor, **offload)) == ("adamw_torch_fused", False, "bf16-mixed")
    assert {ladder.tier(config) for config in predictor.calls} == {0}
    assert [ladder.tier(TrainConfig(seq_len=8, weights_dtype=w, offload=o)) for w, o in
            [("fp32", "none"), ("bf16", "none"), ("fp32", "optimizer"), ("bf16", "parameters")]] == [0, 1, 2, 3]


def test_pure_bf16_is_walked_after_everything_with_fp32_master_weights():
    predictor = OptimizerPredictor()
    assert described(chosen(5.5, predictor, allow_8bit_optimizer=False)) == ("adamw_torch_fused", True, "bf16")
    tiers = [ladder.tier(config) for config in predictor.calls]
    assert tiers == sorted(tiers) and tiers[-1] == 1 and 0 in tiers
    # pinned, it is the only precision and walked at once
    predictor = OptimizerPredictor()
    chosen(40, predictor, precision="bf16", allow_8bit_optimizer=False)
    assert {(c.weights_dtype, c.amp) for c in predictor.calls} == {("bf16", "none")}
    # pinned but forbidden for full fine-tuning (--precision bf16 --no-pure-16bit): only the LoRA stage uses it
    space = ladder.candidate_space(64, 2, Policy(precision="bf16", allow_pure_16bit=False), with_adapter=False)
    assert space == []
    assert ladder.candidate_space(64, 2, Policy(precision="bf16", allow_pure_16bit=False), with_adapter=True)


def test_the_speed_model_ranks_8bit_adamw_after_fused_adamw():
    from memtune.sources import catalog_config

    for model in ("meta-llama/Llama-3.2-1B", "mistralai/Mistral-7B-v0.1"):
        model_config = catalog_config(model)
        shape = throughput.ModelShape.of(model_config, 7_000_000_000 if "7B" in model else 1_235_814_400)
        speed = throughput.gpu_speed("H100-80GB")
        base = TrainConfig(seq_len=1024, micro_batch_size=2, amp="bf16")
        fused = throughput.tokens_per_second(shape, base, speed)
        eight_bit = throughput.tokens_per_second(shape, base.replace(optimizer="adamw_bnb_8bit"), speed)
        paged = throughput.tokens_per_second(shape, base.replace(optimizer="paged_adamw_8bit"), speed)
        assert paged < eight_bit < fused, model
        for name in ("adamw_torch", "adafactor", "paged_adamw_32bit", "adamw_torch_8bit", "adamw_torch_4bit"):
            assert throughput.tokens_per_second(shape, base.replace(optimizer=name), speed) < fused, (model, name)


def meta_parameter_tensors(model_config) -> int:
    """Parameter tensors of the model transformers builds from `model_config`, tied ones once (on the meta device)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    return len({id(parameter) for parameter in model.parameters()})


@pytest.mark.parametrize("model_type, flags", [(model_type, {}) for model_type in TINY_ARCHITECTURES] + [
    ("llama", {"attention_bias": True, "mlp_bias": True}), ("llama", {"tie_word_embeddings": True}),
    ("gpt_neox", {"attention_bias": False}), ("qwen3", {"attention_bias": True}),
])
def test_the_speed_model_counts_the_parameter_tensors_transformers_builds(model_type, flags):
    from transformers import AutoConfig

    try:
        model_config = AutoConfig.for_model(model_type, **(TINY_ARCHITECTURES[model_type] | flags))
    except (ValueError, KeyError, ImportError) as error:
        pytest.skip(f"transformers cannot build a {model_type} config here: {error}")
    assert throughput.parameter_tensors(model_config) == meta_parameter_tensors(model_config)


def test_the_optimizer_step_pays_per_tensor_for_qwen2s_biases_and_per_lora_target():
    """Qwen2 is Llama's layout plus q/k/v biases: 12 tensors a layer, not 9; a per-tensor optimizer pays for each."""
    from transformers import AutoConfig

    llama, qwen2 = (AutoConfig.for_model(name, **TINY_ARCHITECTURES[name]) for name in ("llama", "qwen2"))
    shapes = {name: throughput.ModelShape.of(config, 100_000) for name, config in (("llama", llama), ("qwen2", qwen2))}
    assert shapes["llama"].parameter_tensors == meta_parameter_tensors(llama) == 2 * 9 + 3
    assert shapes["qwen2"].parameter_tensors == meta_parameter_tensors(qwen2) == 2 * 12 + 3
    speed = throughput.gpu_speed("H200")
    config = TrainConfig(seq_len=64, amp="bf16", optimizer="adamw_torch_8bit")
    extra = throughput.optimizer_seconds(shapes["qwen2"], config, speed) - throughput.optimizer_seconds(
        shapes["llama"], config, speed)
    assert extra == pytest.approx(2 * 3 * throughput.PER_TENSOR_SECONDS["adamw_torch_8bit"])
    # LoRA: A and B of each targeted module in each layer, whatever the base's biases
    lora = config.replace(adapter=Adapter(rank=4, target_modules=("q_proj", "v_proj")))
    assert throughput.trained_tensors(shapes["qwen2"], lora) == throughput.trained_tensors(shapes["llama"], lora) == 8
    assert throughput.trained_tensors(shapes["qwen2"], lora.replace(adapter=Adapter(rank=4))) == 2 * 2 * 7


def test_the_quality_note_flags_8bit_state():
    from memtune.report.words import quality_note

    assert "optimizer state quantised" in quality_note(TrainConfig(seq_len=64, amp="bf16", optimizer="adamw_bnb_8bit"))
    assert "quantised" not in quality_note(TrainConfig(seq_len=64, amp="bf16"))
    assert ladder.is_quality_trade(TrainConfig(seq_len=64, amp="bf16", optimizer="paged_adamw_8bit"))


def test_a_paged_optimizer_is_charged_for_paging_only_as_far_as_its_state_is_evicted():
    from memtune.sources import catalog_config

    model_config = catalog_config("meta-llama/Llama-3.2-3B")
    shape = throughput.ModelShape.of(model_config, 3_212_749_824)
    speed = throughput.gpu_speed("H200")
    paged = TrainConfig(seq_len=1024, micro_batch_size=16, amp="bf16", gradient_checkpointing=True,
                        optimizer="paged_adamw_8bit")
    resident = throughput.tokens_per_second(shape, paged, speed, evicted_bytes=0)
    evicted = throughput.tokens_per_second(shape, paged, speed)  # unknown room: all of it evicted
    assert evicted < resident
    assert throughput.tokens_per_second(shape, paged, speed, evicted_bytes=10**15) == evicted  # at most the state
    half = throughput.tokens_per_second(shape, paged, speed, evicted_bytes=shape.num_parameters)  # 1 of 2 bytes
    assert evicted < half < resident
    # without paging the 8-bit step costs a little more than the non-paged one (H200: 43.0 vs 39.0 ms for
    # Llama-3.2-1B's step alone, benchmarks/results/optimizer_step_h200.json)
    unpaged = throughput.tokens_per_second(shape, paged.replace(optimizer="adamw_bnb_8bit"), speed)
    assert 0.97 * unpaged < resident < unpaged


# ---- torchao's stochastic rounding of bf16 weights ------------------------------------------------


@needs_torchao
@pytest.mark.parametrize("name", sorted(TORCHAO_OPTIMIZERS))
def test_stochastic_rounding_builds_what_trainer_builds_from_optim_args(name, tmp_path):
    from transformers import Trainer

    config = TrainConfig(seq_len=64, weights_dtype="bf16", optimizer=name, stochastic_rounding=True)
    arguments = Plan("gpt2", config, budget_bytes=GIB).training_arguments(output_dir=str(tmp_path), use_cpu=True)
    assert arguments.optim_args == "bf16_stochastic_round=True"
    trainer_class, trainer_kwargs = Trainer.get_optimizer_cls_and_kwargs(arguments)
    our_class, our_kwargs = recipe.optimizer_class_and_kwargs(name, stochastic_rounding=True)
    assert our_class is trainer_class and our_kwargs == trainer_kwargs and our_kwargs["bf16_stochastic_round"]


@pytest.mark.parametrize("fields", [
    {"weights_dtype": "bf16", "optimizer": "adamw_torch_fused"},  # not torchao's
    {"weights_dtype": "fp32", "amp": "bf16", "optimizer": "adamw_torch_4bit"},  # fp32 master weights: nothing to round
])
def test_stochastic_rounding_is_refused_where_torchao_does_not_round(fields):
    with pytest.raises(UsageError, match="stochastic rounding is torchao's, for bf16 weights trained in full"):
        TrainConfig(seq_len=64, stochastic_rounding=True, **fields)


def test_the_search_rounds_pure_bf16_stochastically_with_torchao_and_says_so(monkeypatch):
    monkeypatch.setattr(ladder, "bitsandbytes_available", lambda: False)
    monkeypatch.setattr(ladder, "torchao_available", lambda: True)
    space = ladder.candidate_space(64, 2, Policy(), with_adapter=False)
    torchao = [c for c in space if c.optimizer in TORCHAO_OPTIMIZERS]
    assert torchao and all(c.stochastic_rounding == (c.weights_dtype == "bf16") for c in torchao)
    assert not any(c.stochastic_rounding for c in space if c.optimizer not in TORCHAO_OPTIMIZERS)
    rounded_config = next(c for c in torchao if c.stochastic_rounding)
    assert "stochastic rounding" in ladder.precision_quality(rounded_config)
    assert 'optim_args="bf16_stochastic_round=True"' in " ".join(ladder.settings(rounded_config))
    flips = dict(ladder.alternatives(rounded_config, Policy(), 2))  # each flip is a valid configuration
    assert not flips[f"{DEFAULT_OPTIMIZER} instead of {rounded_config.optimizer}"].stochastic_rounding


@needs_torchao
@pytest.mark.parametrize("precision, rounds", [("bf16", True), ("bf16-mixed", False)])
def test_plan_rounds_as_the_search_does(precision, rounds, capsys):
    from memtune import cli

    command = ["plan", "gpt2", "--seq-len", "64", "--batch-size", "2", "--precision", precision, "--json",
               "--optim", "adamw_torch_4bit"]
    assert cli.main(command) == 0
    assert json.loads(capsys.readouterr().out)["estimate"]["config"]["stochastic_rounding"] is rounds


def test_pure_bf16_that_rounds_stochastically_is_walked_before_pure_bf16_that_cannot(monkeypatch):
    """bitsandbytes' 8-bit AdamW is faster, but on bf16 weights it rounds to nearest: the search walks every pure
    bf16 configuration that rounds stochastically (torchao's) before it."""
    monkeypatch.setattr(ladder, "bitsandbytes_available", lambda: True)
    monkeypatch.setattr(ladder, "torchao_available", lambda: True)
    pure = TrainConfig(seq_len=64, weights_dtype="bf16")
    assert ladder.quality_rank(pure) == (1, 0)
    assert ladder.quality_rank(pure.replace(optimizer="adamw_torch_4bit", stochastic_rounding=True)) == (0, 1)
    assert ladder.quality_rank(TrainConfig(seq_len=64, amp="bf16", optimizer="adamw_bnb_8bit")) == (0, 0)
    walked: list[TrainConfig] = []

    class Pure16Only:  # only pure bf16 fits; bitsandbytes ranks fastest
        def memory(self, config):
            from memtune.predict.peak import Estimate

            walked.append(config)
            size = GIB if config.weights_dtype == "bf16" else 100 * GIB
            return Estimate(config, size, size, workspace_bytes=0, context_bytes=0, breakdown={"weights": size})

        def fits(self, estimate, usable_bytes):
            return estimate.total_bytes <= usable_bytes

        def tokens_per_second(self, config):
            return 2.0 if config.optimizer == "adamw_bnb_8bit" else 1.0

    policy = Policy(allow_offload=False, allow_chunked_loss=False, use_adapter=False, margin_bytes=0,
                    micro_batch_size=2, gradient_checkpointing=False, expandable_segments=False)
    result = search(Pure16Only(), 64, 2, 8 * GIB, policy, explain=False)
    assert result.chosen is not None and result.chosen.config.stochastic_rounding
    assert not any(c.weights_dtype == "bf16" and not c.stochastic_rounding for c in walked)


def test_the_explanation_says_what_a_faster_alternative_that_rounds_to_nearest_gives_up(monkeypatch):
    """The fresh-user trial: with --precision bf16 the search chose torchao's 8-bit AdamW (stochastic rounding), and
    "why this one" showed fused AdamW 90% faster with no word of why it was not taken."""
    from memtune.predict.peak import Estimate
    from memtune.report.words import alternative_verdict
    from memtune.search.choose import Alternative

    monkeypatch.setattr(ladder, "torchao_available", lambda: True)

    class OnlyTorchao8bit:
        def memory(self, config):
            size = GIB if config.optimizer == "adamw_torch_8bit" else 100 * GIB
            return Estimate(config, size, size, workspace_bytes=0, context_bytes=0, breakdown={"weights": size})

        def fits(self, estimate, usable_bytes):
            return estimate.total_bytes <= usable_bytes

        def tokens_per_second(self, config):
            return 1.0

    policy = Policy(allow_offload=False, allow_chunked_loss=False, use_adapter=False, margin_bytes=0,
                    micro_batch_size=2, gradient_checkpointing=False, expandable_segments=False, precision="bf16")
    result = search(OnlyTorchao8bit(), 64, 2, 8 * GIB, policy, explain=False)
    assert result.chosen is not None and result.chosen.config.stochastic_rounding
    chosen = result.chosen.config
    nearest = chosen.replace(optimizer=DEFAULT_OPTIMIZER, stochastic_rounding=False)
    said = alternative_verdict(Alternative("adamw_torch_fused instead", nearest, 2 * GIB, 2.0, True), result)
    assert "but rounds bf16 weights to nearest" in said
    mixed = chosen.replace(weights_dtype="fp32", amp="bf16", stochastic_rounding=False)
    assert "rounds" not in alternative_verdict(Alternative("bf16-mixed", mixed, 2 * GIB, 2.0, True), result)


@pytest.mark.parametrize("bitsandbytes", [False, True])
def test_4bit_optimizer_state_is_walked_after_8bit_state_of_about_the_same_speed(bitsandbytes, monkeypatch):
    """torchao's AdamW4bit predicted a hair faster than the 8-bit AdamW on offer (torchao's, or bitsandbytes' where
    installed): the 8-bit one is walked and chosen first; 4-bit only when no 8-bit state fits."""
    monkeypatch.setattr(ladder, "bitsandbytes_available", lambda: bitsandbytes)
    monkeypatch.setattr(ladder, "torchao_available", lambda: True)
    eight_bit = "adamw_bnb_8bit" if bitsandbytes else "adamw_torch_8bit"
    speed = {DEFAULT_OPTIMIZER: 1.2, eight_bit: 1.0, "adamw_torch_4bit": 1.001, "paged_adamw_8bit": 0.9}

    class StateFits:  # fused AdamW is too big, and 8-bit state too unless `eight_bit_fits`
        def __init__(self, eight_bit_fits: bool) -> None:
            self.eight_bit_fits, self.walked = eight_bit_fits, []

        def memory(self, config):
            from memtune.predict.peak import Estimate

            self.walked.append(config.optimizer)
            fits = config.optimizer == "adamw_torch_4bit" or (config.optimizer != DEFAULT_OPTIMIZER
                                                               and self.eight_bit_fits)
            size = 2 * GIB if fits else 100 * GIB  # 1 GiB of weights, the rest optimizer state
            return Estimate(config, size, size, workspace_bytes=0, context_bytes=0,
                            breakdown={"weights": GIB, "optimizer": size - GIB})

        def fits(self, estimate, usable_bytes):
            return estimate.total_bytes <= usable_bytes

        def tokens_per_second(self, config):
            return speed[config.optimizer]

    policy = Policy(allow_offload=False, allow_chunked_loss=False, use_adapter=False, margin_bytes=0,
                    micro_batch_size=2, gradient_checkpointing=False, expandable_segments=False,
                    precision="bf16-mixed")
    predictor = StateFits(eight_bit_fits=True)
    result = search(predictor, 64, 2, 8 * GIB, policy, explain=False)
    assert result.chosen is not None and result.chosen.config.optimizer == eight_bit
    assert predictor.walked == [DEFAULT_OPTIMIZER, eight_bit]
    predictor = StateFits(eight_bit_fits=False)
    result = search(predictor, 64, 2, 8 * GIB, policy, explain=False)
    assert result.chosen is not None and result.chosen.config.optimizer == "adamw_torch_4bit"
    assert predictor.walked[-1] == "adamw_torch_4bit" and predictor.walked.count("adamw_torch_4bit") == 1
