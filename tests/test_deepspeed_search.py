"""DeepSpeed ZeRO as a rung of the search (issue 15, item 1): offered beside DDP and FSDP2 where DeepSpeed is
installed (ZeRO-Offload on one GPU), chosen when it is the fastest predicted fit, NVMe only when the host RAM is not
enough, the host RAM and the NVMe space checked; the CLI and auto_fit accept --strategy deepspeed, --zero-stage and
the offload words, and refuse them (exit 2, the install hint) where DeepSpeed is missing.

The search logic is tested with DeepSpeed declared installed (`deepspeed_available` patched where it is read), so it
runs without DeepSpeed; the fake predictor keeps the walk's sequence exact."""

from __future__ import annotations

import dataclasses
from io import StringIO
from types import SimpleNamespace

import pytest
from rich.console import Console

from memtune import config as config_module
from memtune import options as options_module
from memtune.cli import main
from memtune.config import DEEPSPEED_EXTRA_HINT, GIB, Policy, TrainConfig, Zero
from memtune.errors import UsageError
from memtune.fit import FitResult
from memtune.predict import throughput
from memtune.predict.estimate import Estimate
from memtune.report import terminal
from memtune.search import ladder
from memtune.search.choose import FITS, TOO_BIG, search
from memtune.sources import ModelSource
from tests.models import tiny_llama

DEEPSPEED_READERS = (config_module, ladder, options_module)
"""The modules that ask `deepspeed_available`."""


@pytest.fixture
def with_deepspeed(monkeypatch):
    """DeepSpeed declared installed wherever memtune asks (found by name, never imported by the search)."""
    for module in DEEPSPEED_READERS:
        monkeypatch.setattr(module, "deepspeed_available", lambda: True)


@pytest.fixture
def without_deepspeed(monkeypatch):
    for module in DEEPSPEED_READERS:
        monkeypatch.setattr(module, "deepspeed_available", lambda: False)


QUIET = dict(allow_chunked_loss=False, use_adapter=False, margin_bytes=0, allow_8bit_optimizer=False,
             allow_pure_16bit=False, expandable_segments=False, offload_activations=False, precision="bf16-mixed",
             gradient_checkpointing=False)
"""Pins that keep the candidate space small: the ZeRO rung and the strategies vary, little else."""


class ZeroPredictor:
    """Memory in GiB per GPU: a replica holds 16 GiB of state, FSDP2 and ZeRO-3 1/N of it, ZeRO-2 8 + 8/N;
    offloading the optimizer takes 12/N off the GPU and puts (16+2) x 1e9 / N bytes on the host (ZeRO's rule),
    parameters too another 2 x 1e9 / N, to NVMe 1 GiB of swap buffers; activations 1 GiB per sequence.
    Speed: DDP 1.0, ZeRO-2 0.98, FSDP2 0.95, ZeRO-3 0.93, x0.5 with the optimizer offloaded, x0.3 with the
    parameters, x0.2 more on NVMe. Records the order of memory predictions."""

    def __init__(self, nvme_bytes: int = 0):
        self.calls: list[TrainConfig] = []
        self.nvme = nvme_bytes

    def state_gib(self, config: TrainConfig) -> float:
        gpus = config.num_gpus
        if config.deepspeed:
            assert config.zero is not None
            state = 16 / gpus if config.zero.stage == 3 else 8 + 8 / gpus
            if config.offload != "none":
                state -= 12 / gpus
            if config.offload == "parameters":
                state -= 2 / gpus
            return state
        if config.replicated:
            return 16
        return 16 / gpus if config.offload == "none" else 0.5

    def memory(self, config: TrainConfig) -> Estimate:
        self.calls.append(config)
        size = int((self.state_gib(config) + config.micro_batch_size) * GIB)
        host = 0
        if config.zero is not None and config.offload != "none" and config.zero.offload_device == "nvme":
            host = GIB  # the pinned swap buffers
        elif config.deepspeed and config.offload != "none":
            host = int(18e9 / config.num_gpus) + (int(2e9 / config.num_gpus) if config.offload == "parameters" else 0)
        return Estimate(config, size, size, workspace_bytes=0, context_bytes=0, host_bytes=host)

    def fits(self, estimate: Estimate, usable_bytes: int) -> bool:
        return estimate.total_bytes <= usable_bytes

    def tokens_per_second(self, config: TrainConfig) -> float:
        if config.deepspeed:
            assert config.zero is not None
            speed = 0.98 if config.zero.stage == 2 else 0.93
        else:
            speed = 1.0 if config.replicated else 0.95
        speed *= {"none": 1.0, "optimizer": 0.5, "parameters": 0.3}[config.offload]
        if config.zero is not None and config.offload != "none" and config.zero.offload_device == "nvme":
            speed *= 0.2
        return speed * config.micro_batch_size / (config.micro_batch_size + 1)

    def nvme_bytes(self, config: TrainConfig) -> int:
        return self.nvme


def zero_of(config: TrainConfig) -> tuple[int, str, str] | None:
    """(stage, offload, device) of a DeepSpeed configuration, None for another."""
    if config.zero is None:
        return None
    return config.zero.stage, config.offload, config.zero.offload_device


# ---- the candidate space -------------------------------------------------------------------------------------------


def test_several_gpus_offer_zero_2_and_3_beside_ddp_and_fsdp(with_deepspeed):
    space = ladder.candidate_space(512, 8, Policy(num_gpus=2, micro_batch_size=4, **QUIET), False)
    strategies = {config.strategy for config in space}
    assert strategies == {"ddp", "fsdp", "deepspeed"}
    zeros = {zero_of(config) for config in space if config.deepspeed}
    assert zeros == {(2, "none", "cpu"), (3, "none", "cpu"), (2, "optimizer", "cpu"), (3, "optimizer", "cpu"),
                     (3, "parameters", "cpu")}  # no ZeRO-2 parameter offload, no NVMe without --nvme-path
    assert not any(config.offload == "optimizer" and not config.deepspeed for config in space)  # DeepSpeed's alone
    assert all((config.zero is not None) == config.deepspeed for config in space)


def test_one_gpu_offers_zero_offload_only(with_deepspeed):
    space = ladder.candidate_space(512, 8, Policy(num_gpus=1, micro_batch_size=4, **QUIET), False)
    zeros = {zero_of(config) for config in space if config.deepspeed}
    assert zeros == {(2, "optimizer", "cpu"), (3, "optimizer", "cpu"), (3, "parameters", "cpu")}
    # no offload allowed, or LoRA (whose offload is not searched): no ZeRO on one GPU
    assert not any(c.deepspeed for c in ladder.candidate_space(512, 8, Policy(allow_offload=False, **QUIET), False))
    assert not any(c.deepspeed for c in ladder.candidate_space(512, 8, Policy(**{**QUIET, "use_adapter": True}), True))


def test_nvme_is_offered_only_with_a_path_and_for_zero_3(with_deepspeed):
    policy = Policy(num_gpus=2, micro_batch_size=4, nvme_path="/local_nvme", **QUIET)
    space = ladder.candidate_space(512, 8, policy, False)
    nvme = {zero_of(config) for config in space if config.zero is not None and config.zero.offload_device == "nvme"}
    assert nvme == {(3, "optimizer", "nvme"), (3, "parameters", "nvme")}
    assert all(config.zero.nvme_path == "/local_nvme" for config in space
               if config.zero is not None and config.zero.offload_device == "nvme")


def test_pinned_zero_stage_and_offload_are_kept(with_deepspeed):
    policy = Policy(num_gpus=2, micro_batch_size=4, strategy="deepspeed", zero_stage=3, offload="optimizer", **QUIET)
    space = ladder.candidate_space(512, 8, policy, False)
    assert space and {zero_of(config) for config in space} == {(3, "optimizer", "cpu")}
    # --zero-stage alone (strategy auto) implies DeepSpeed: neither DDP nor FSDP is tried
    implied = ladder.candidate_space(512, 8, Policy(num_gpus=2, micro_batch_size=4, zero_stage=2, **QUIET), False)
    assert {config.strategy for config in implied} == {"deepspeed"}
    assert {config.zero.stage for config in implied if config.zero is not None} == {2}


def test_without_deepspeed_the_rung_is_skipped_with_a_hint(without_deepspeed):
    space = ladder.candidate_space(512, 8, Policy(num_gpus=2, micro_batch_size=4, **QUIET), False)
    assert space and not any(config.deepspeed or config.offload == "optimizer" for config in space)
    result = search(ZeroPredictor(), 512, 8, 64 * GIB, Policy(num_gpus=2, **QUIET), explain=False)
    hint = [note for note in result.notes if note.startswith("DeepSpeed ZeRO skipped")]
    assert hint == [f"DeepSpeed ZeRO skipped: deepspeed is not installed ({DEEPSPEED_EXTRA_HINT} to add it)"]
    assert hint[0] in list(terminal._candidate_footnotes(result))  # the report's lines under the candidates
    console = Console(file=StringIO(), width=300)
    terminal.render_fit(FitResult(ModelSource("tiny", SimpleNamespace(num_hidden_layers=2), "catalog"), 10**6, 512,
                                  8, budget_bytes=64 * GIB, search=result), console)
    assert hint[0] in console.file.getvalue()  # printed as text: its brackets are no markup


def test_a_pinned_strategy_deepspeed_without_deepspeed_is_refused_with_the_install_hint(without_deepspeed):
    with pytest.raises(UsageError, match=r"--strategy deepspeed needs DeepSpeed, which is not installed: pip install"):
        search(ZeroPredictor(), 512, 8, 64 * GIB, Policy(num_gpus=2, strategy="deepspeed", **QUIET))


# ---- the walk ------------------------------------------------------------------------------------------------------


def test_the_fastest_predicted_fit_wins_ddp_then_zero_2_then_zero_3(with_deepspeed):
    policy = Policy(num_gpus=2, micro_batch_size=1, **QUIET)
    # 17 GiB: a DDP replica (16 + 1) fits, and it is the fastest
    assert search(ZeroPredictor(), 512, 8, 17 * GIB, policy, explain=False).chosen.config.replicated
    # 13 GiB: ZeRO-2 (8 + 4 + 1) fits and is faster than FSDP2 and ZeRO-3
    chosen = search(ZeroPredictor(), 512, 8, 13 * GIB, policy, explain=False).chosen.config
    assert zero_of(chosen) == (2, "none", "cpu")
    # 9.5 GiB: only full sharding fits: FSDP2 (0.95) before ZeRO-3 (0.93)
    assert search(ZeroPredictor(), 512, 8, 9.5 * GIB, policy, explain=False).chosen.config.strategy == "fsdp"


def test_zero_offload_is_chosen_on_one_gpu_when_nothing_fits_on_it(with_deepspeed):
    predictor = ZeroPredictor()
    result = search(predictor, 512, 8, 6 * GIB, Policy(num_gpus=1, micro_batch_size=1, **QUIET), explain=False)
    chosen = result.chosen.config
    # one GPU: 16 + 1 too big; ZeRO-2 optimizer offload (8 + 8 - 12 + 1 = 5) fits and is the fastest offload
    assert zero_of(chosen) == (2, "optimizer", "cpu") and result.chosen.estimate.host_bytes == int(18e9)
    walked = [zero_of(config) or (config.strategy, config.offload) for config in predictor.calls]
    assert walked == [("fsdp", "none"), (2, "optimizer", "cpu")]


def test_host_ram_refuses_zero_offload_that_does_not_fit_the_machine(with_deepspeed):
    # 3.5 GiB per GPU: ZeRO-3 with the optimizer offloaded fits the GPU (2 + 1), but its 18 GB of host state over
    # the two ranks does not fit a 10 GiB host budget; FSDP2's CPU offload (slower, 0.5 + 1 GiB) takes over
    policy = Policy(num_gpus=2, micro_batch_size=1, host_budget_bytes=10 * GIB, **QUIET)
    result = search(ZeroPredictor(), 512, 8, 3.5 * GIB, policy, explain=False)
    refused = [c for c in result.candidates if c.note.startswith("ZeRO's offloaded state")]
    assert [zero_of(c.config) for c in refused] == [(3, "optimizer", "cpu")] and refused[0].status == TOO_BIG
    assert refused[0].note == ("ZeRO's offloaded state needs 16.76 GiB of host memory (all ranks), over the "
                               "10.00 GiB allowed (--host-memory; by default 50% of what a GPU machine has available)")
    assert (result.chosen.config.strategy, result.chosen.config.offload) == ("fsdp", "parameters")
    # with room on the host the same ZeRO plan is chosen
    roomy = search(ZeroPredictor(), 512, 8, 3.5 * GIB, dataclasses.replace(policy, host_budget_bytes=64 * GIB),
                   explain=False)
    assert zero_of(roomy.chosen.config) == (3, "optimizer", "cpu")


def test_nvme_only_when_the_host_ram_is_not_enough(with_deepspeed):
    base = dict(num_gpus=2, micro_batch_size=1, strategy="deepspeed", nvme_path="/local_nvme",
                nvme_budget_bytes=1 << 40, **QUIET)
    # ample host RAM: the CPU offload wins, NVMe is never predicted
    roomy = ZeroPredictor()
    chosen = search(roomy, 512, 8, 2.5 * GIB, Policy(host_budget_bytes=1 << 40, **base), explain=False).chosen
    assert zero_of(chosen.config) == (3, "parameters", "cpu")
    assert not any(c.zero is not None and c.zero.offload_device == "nvme" for c in roomy.calls)
    # 8 GiB of host RAM: CPU offload of 18-20 GB over two ranks is refused, ZeRO-Infinity takes over
    tight = ZeroPredictor()
    result = search(tight, 512, 8, 2.5 * GIB, Policy(host_budget_bytes=8 * GIB, **base), explain=False)
    assert zero_of(result.chosen.config) == (3, "parameters", "nvme")
    assert result.chosen.config.zero.nvme_path == "/local_nvme"


def test_nvme_space_is_checked(with_deepspeed):
    policy = Policy(num_gpus=2, micro_batch_size=1, nvme_path="/local_nvme", offload_device="nvme",
                    nvme_budget_bytes=10 * GIB, **QUIET)
    result = search(ZeroPredictor(nvme_bytes=8 * GIB), 512, 8, 2.5 * GIB, policy, explain=False)
    assert result.chosen is None
    refused = [c for c in result.candidates if "NVMe" in c.note]
    assert [zero_of(c.config) for c in refused] == [(3, "parameters", "nvme")] and refused[0].status == TOO_BIG
    assert refused[0].note == ("its NVMe offload needs 16.00 GiB at /local_nvme (all ranks), over the 10.00 GiB "
                               "free there")


def test_a_zero_winner_is_not_sent_to_the_single_process_trial(with_deepspeed):
    def trial(config):
        raise AssertionError(f"trial steps were asked for {config.describe()}")

    result = search(ZeroPredictor(), 512, 8, 13 * GIB, Policy(num_gpus=2, micro_batch_size=1, **QUIET), trial=trial,
                    explain=False)
    assert result.chosen.status == FITS and result.chosen.config.deepspeed
    assert result.chosen.note.startswith("not verified: trial steps do not run DeepSpeed plans yet")


def test_alternatives_flip_the_zero_stage_and_the_engine(with_deepspeed):
    policy = Policy(num_gpus=2, micro_batch_size=1, **QUIET)
    zero_2 = search(ZeroPredictor(), 512, 8, 13 * GIB, policy)
    changes = {alternative.change for alternative in zero_2.alternatives}
    assert {"ZeRO-3 instead of ZeRO-2", "FSDP2 instead of DeepSpeed ZeRO-2", "+ ZeRO CPU optimizer offload"} <= changes
    fsdp = search(ZeroPredictor(), 512, 8, 9.5 * GIB, policy)
    assert "DeepSpeed ZeRO-3 instead of FSDP2" in {alternative.change for alternative in fsdp.alternatives}


@pytest.mark.skipif(not config_module.deepspeed_available(),
                    reason=f"DeepSpeed is not installed ({DEEPSPEED_EXTRA_HINT}); the tests above declare it installed")
def test_installed_deepspeed_is_offered_without_any_patch():
    space = ladder.candidate_space(512, 8, Policy(num_gpus=2, micro_batch_size=4, **QUIET), False)
    assert {zero_of(config) for config in space if config.deepspeed} >= {(2, "none", "cpu"), (3, "none", "cpu")}


def test_the_search_on_a_tiny_llama_predicts_zero_and_takes_the_fastest_fit(with_deepspeed):
    from memtune.fit import ModelPredictor
    from memtune.search.choose import walk_group

    predictor = ModelPredictor(tiny_llama(), 10**6, throughput.gpu_speed("H200"), device="cpu")
    policy = Policy(num_gpus=2, micro_batch_size=2, **QUIET)
    result = search(predictor, 64, 4, 8 * GIB, policy, explain=False)
    chosen = result.chosen
    first_group = [config for config in ladder.candidate_space(64, 4, policy, False)
                   if walk_group(config) == walk_group(chosen.config)]
    assert any(config.deepspeed for config in first_group) and chosen.estimate is not None
    # everything fits this tiny model: the first walked, the fastest predicted of DDP, FSDP2, ZeRO-2 and ZeRO-3
    assert chosen.predicted_tokens_per_second == max(predictor.tokens_per_second(config) for config in first_group)
    # pinned, the ZeRO plan is predicted by predict.zero (its buckets are in the breakdown, its ranks in the context)
    pinned = search(predictor, 64, 4, 8 * GIB, dataclasses.replace(policy, strategy="deepspeed"), explain=False)
    assert pinned.chosen.config.deepspeed and pinned.chosen.estimate.config == pinned.chosen.config


# ---- words ---------------------------------------------------------------------------------------------------------


def test_the_plan_names_the_engine():
    zero = TrainConfig(seq_len=512, amp="bf16", num_gpus=2, strategy="deepspeed", zero=Zero(stage=3),
                       offload="optimizer")
    line = next(line for line in ladder.settings(zero) if "DeepSpeed" in line)
    assert line.startswith("DeepSpeed ZeRO-3, CPU optimizer offload, on 2 GPUs (DeepSpeed 0.19.8's rules")
    fsdp = TrainConfig(seq_len=512, amp="bf16", num_gpus=2)
    assert any("FSDP2" in line for line in ladder.settings(fsdp))
    assert not any("FSDP" in line for line in ladder.settings(zero))


# ---- speed ---------------------------------------------------------------------------------------------------------


def test_the_speed_model_charges_zero_offload_and_nvme():
    shape = throughput.ModelShape(num_parameters=1_235_814_400, num_layers=16, hidden_size=2048, vocab_size=128_256,
                                  tied_embeddings=True)
    speed = throughput.gpu_speed("H200")

    def tokens(**changes) -> float:
        fields = dict(seq_len=2048, micro_batch_size=2, grad_accum_steps=2, amp="bf16", num_gpus=2,
                      strategy="deepspeed", zero=Zero(stage=3))
        return throughput.tokens_per_second(shape, TrainConfig(**{**fields, **changes}), speed)

    on_gpu, optimizer, parameters = tokens(), tokens(offload="optimizer"), tokens(offload="parameters")
    nvme = tokens(offload="optimizer", zero=Zero(stage=3, offload_device="nvme", nvme_path="/nvme"))
    assert on_gpu > optimizer > parameters and optimizer > nvme
    # ZeRO-2 gathers no parameters in forward and backward: faster than ZeRO-3 on the same GPUs
    assert tokens(zero=Zero(stage=2)) > on_gpu
    # one GPU steps the whole model on the CPU, two GPUs half each: more tokens/s in all over two
    assert optimizer > tokens(offload="optimizer", num_gpus=1, grad_accum_steps=4)


# ---- the command line and the API ----------------------------------------------------------------------------------


def test_cli_plan_and_fit_refuse_strategy_deepspeed_without_deepspeed(without_deepspeed, capsys):
    for command in (["plan", "gpt2", "--strategy", "deepspeed"],
                    ["fit", "gpt2", "--budget", "24GiB", "--strategy", "deepspeed"]):
        assert main(command) == 2
        error = capsys.readouterr().err
        assert "--strategy deepspeed needs DeepSpeed, which is not installed" in error
        assert DEEPSPEED_EXTRA_HINT in error and "Traceback" not in error


def test_cli_refuses_deepspeed_options_without_strategy_deepspeed(with_deepspeed, capsys):
    assert main(["plan", "gpt2", "--zero-stage", "2"]) == 2
    assert ("--zero-stage 2 is DeepSpeed's, got --strategy fsdp (plan's default): add --strategy deepspeed"
            in capsys.readouterr().err)
    assert main(["fit", "gpt2", "--budget", "24GiB", "--strategy", "fsdp", "--offload", "optimizer"]) == 2
    error = capsys.readouterr().err
    assert "--offload optimizer is DeepSpeed's, which --strategy fsdp contradicts" in error
    assert main(["fit", "gpt2", "--budget", "24GiB", "--offload-device", "nvme"]) == 2
    assert "--offload-device nvme needs --nvme-path" in capsys.readouterr().err
    assert main(["fit", "gpt2", "--budget", "24GiB", "--zero-stage", "2", "--offload", "parameters"]) == 2
    assert "--offload parameters under DeepSpeed is ZeRO-3's offload_param, got --zero-stage 2" \
        in capsys.readouterr().err


def test_fit_and_plan_refuse_an_nvme_path_that_is_not_a_directory(with_deepspeed, tmp_path, capsys):
    missing = tmp_path / "no-such-dir"
    assert main(["fit", "gpt2", "--budget", "24GiB", "--offload-device", "nvme", "--nvme-path", str(missing),
                 "--no-verify"]) == 2
    assert f"--nvme-path '{missing}' is not an existing directory" in capsys.readouterr().err
    assert main(["plan", "gpt2", "--budget", "24GiB", "--strategy", "deepspeed", "--offload", "optimizer",
                 "--offload-device", "nvme", "--nvme-path", str(missing)]) == 2
    assert f"--nvme-path '{missing}' is not an existing directory" in capsys.readouterr().err


def test_cli_plan_predicts_a_deepspeed_configuration(with_deepspeed, tmp_path, capsys):
    model = tmp_path / "tiny"
    model.mkdir()
    tiny_llama().save_pretrained(model)
    assert main(["plan", str(model), "--seq-len", "64", "--batch-size", "4", "--precision", "bf16-mixed",
                 "--strategy", "deepspeed", "--zero-stage", "3", "--offload", "optimizer", "--budget", "8GiB",
                 "--trace-device", "cpu"]) == 0
    captured = capsys.readouterr()
    out = " ".join(captured.out.split())  # the table wraps at the console's width
    assert "DeepSpeed ZeRO-3 (CPU optimizer offload)" in out
    assert "host memory" in out and "DeepSpeed ZeRO-3, CPU optimizer offload's offloaded state" in out
    assert "on this machine" not in captured.err  # a few MiB of host state: room enough here


def test_cli_plan_notes_a_zero_plan_over_this_machines_host_memory(with_deepspeed, tmp_path, capsys, monkeypatch):
    import memtune.fit

    monkeypatch.setattr(memtune.fit, "host_budget_here", lambda: 1024)  # a host with 2 KiB available
    model = tmp_path / "tiny"
    model.mkdir()
    tiny_llama().save_pretrained(model)
    assert main(["plan", str(model), "--seq-len", "64", "--batch-size", "4", "--precision", "bf16-mixed",
                 "--strategy", "deepspeed", "--offload", "optimizer", "--trace-device", "cpu"]) == 0
    error = " ".join(capsys.readouterr().err.split())
    assert "note: on this machine ZeRO's offloaded state needs" in error
    assert "of host memory (all ranks), over the 1.00 KiB allowed" in error


def test_auto_fit_plans_zero_offload_on_one_gpu(with_deepspeed):
    import torch
    from transformers import AutoModelForCausalLM

    import memtune

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_llama())
    plan = memtune.auto_fit(model, seq_len=64, batch_size=4, budget="4GiB", verify=False, strategy="deepspeed",
                            precision="bf16-mixed", use_adapter=False)
    config = plan.train_config
    assert config.deepspeed and config.offload in ("optimizer", "parameters") and config.zero.stage in (2, 3)
    assert plan.predicted_host_bytes > 0


def test_auto_fit_speaks_keywords_for_deepspeed_errors(without_deepspeed):
    import memtune

    with pytest.raises(UsageError, match='strategy="deepspeed" needs DeepSpeed'):
        memtune.auto_fit("gpt2", budget="24GiB", verify=False, strategy="deepspeed")


def test_the_fit_report_names_the_engine_its_host_memory_and_the_host_refusals(with_deepspeed):
    policy = Policy(num_gpus=2, micro_batch_size=1, host_budget_bytes=18 * GIB, **QUIET)
    # 3.5 GiB: ZeRO-3 + optimizer offload (16.76 GiB of host state) fits the host; parameters too (18.63) would not
    result = search(ZeroPredictor(), 512, 8, 3.5 * GIB, policy)
    assert zero_of(result.chosen.config) == (3, "optimizer", "cpu")
    model = SimpleNamespace(num_hidden_layers=16, hidden_size=2048, vocab_size=128256, tie_word_embeddings=True)
    fit = FitResult(ModelSource("tiny", model, "catalog"), 1_235_814_400, 512, 8, budget_bytes=int(3.5 * GIB),
                    budget_label="budget 3.50 GiB", search=result, policy=policy)

    def rendered(fit: FitResult) -> str:
        console = Console(file=StringIO(), width=200)
        terminal.render_fit(fit, console)
        return " ".join(console.file.getvalue().split())

    text = rendered(fit)
    assert ("DeepSpeed ZeRO-3, CPU optimizer offload (as DeepSpeed 0.19.8 allocates): 8.38 GiB of pinned host memory "
            "per GPU (16.76 GiB for the 2 GPUs of a machine), not in the GPU total") in text
    assert "DeepSpeed ZeRO-3, CPU optimizer offload, on 2 GPUs (DeepSpeed 0.19.8's rules" in text
    changes = {alternative.change for alternative in result.alternatives}
    assert {"ZeRO-2 instead of ZeRO-3", "- ZeRO offload", "FSDP2 instead of DeepSpeed ZeRO-3, CPU optimizer offload"} \
        <= changes
    # a 10 GiB host: the ZeRO plan is refused for the host, and the report says so under the candidates
    tight = dataclasses.replace(policy, host_budget_bytes=10 * GIB)
    refused = dataclasses.replace(fit, search=search(ZeroPredictor(), 512, 8, 3.5 * GIB, tight), policy=tight)
    assert refused.search.chosen.config.strategy == "fsdp"
    assert ("DeepSpeed ZeRO-3 (CPU optimizer offload) on 2 GPUs: fits the GPU, but ZeRO's offloaded state needs 16.76 "
            "GiB of host memory (all ranks), over the 10.00 GiB allowed") in rendered(refused)


@pytest.mark.parametrize(("flags", "words"), [
    (["--zero-stage", "2", "--offload", "parameters"],
     "--offload parameters under DeepSpeed is ZeRO-3's offload_param, got --zero-stage 2: use --zero-stage 3"),
    (["--zero-stage", "2", "--offload", "optimizer", "--offload-device", "nvme", "--nvme-path", "."],
     "--offload-device nvme is ZeRO-3's (ZeRO-Infinity), got --zero-stage 2: use --zero-stage 3"),
    (["--offload-device", "nvme", "--nvme-path", "."], "--offload-device nvme says where offloaded state goes, and "
     "nothing is offloaded: add --offload optimizer"),
    (["--offload", "optimizer", "--offload-device", "nvme"], "--offload-device nvme needs --nvme-path"),
    (["--optim", "paged_adamw_8bit"], "got --optim paged_adamw_8bit: use --optim adamw_torch_fused"),
])
@pytest.mark.parametrize("installed", [True, False])
def test_cli_plan_names_deepspeed_problems_in_flags(flags, words, installed, monkeypatch, capsys):
    """`memtune plan --strategy deepspeed` refuses what DeepSpeed cannot run in the CLI's words (not TrainConfig's
    Zero(stage=3)), whether DeepSpeed is installed or not; nothing is silently ignored (--offload-device nvme
    without anything offloaded used to plan the GPU alone)."""
    for module in DEEPSPEED_READERS:
        monkeypatch.setattr(module, "deepspeed_available", lambda: installed)
    assert main(["plan", "gpt2", "--strategy", "deepspeed", *flags]) == 2
    error = capsys.readouterr().err
    assert words in error and "Zero(" not in error and "Traceback" not in error
