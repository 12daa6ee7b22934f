"""`memtune fit` and `auto_fit` end to end on the CPU (tiny local model, real tracing, no GPU)."""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch

import memtune
from memtune.cli import main
from memtune.config import GIB, MIB
from memtune.errors import NothingFitsError, UsageError
from memtune.measure.probe import ProbeResult
from memtune.plan import Plan


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=4096, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    path = tmp_path_factory.mktemp("tiny-llama")
    config.save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def no_gpu(monkeypatch):
    """Plan as on a machine without a GPU, even where one is visible."""
    monkeypatch.setattr(
        sys.modules["memtune.measure.probe"], "probe", lambda: ProbeResult(reason="tests plan without a GPU")
    )


def test_fit_json_on_stdout_and_the_plan_saved(tiny_model_dir, tmp_path, capsys):
    plan_path = tmp_path / "plan.json"
    code = main(["fit", str(tiny_model_dir), "--seq-len", "256", "--batch-size", "8", "--budget", "1GiB",
                 "--trace-device", "cpu", "--json", "--plan-out", str(plan_path)])
    out = capsys.readouterr().out
    assert code == 0
    document = json.loads(out)  # stdout carries only the document
    chosen = document["search"]["chosen"]
    assert chosen["config"]["micro_batch_size"] * chosen["config"]["grad_accum_steps"] == 8
    plan = Plan.load(plan_path)
    assert plan.train_config.to_dict() == chosen["config"]
    assert plan.predicted_total_bytes <= plan.budget_bytes - plan.margin_bytes
    assert not plan.verified  # no GPU: predicted only


def test_fit_nothing_fits_exit_3_with_shortfall_and_suggestions(tiny_model_dir, capsys):
    code = main(["fit", str(tiny_model_dir), "--seq-len", "256", "--batch-size", "8", "--budget", "600MiB",
                 "--trace-device", "cpu", "--no-lora", "--no-offload"])
    out = re.sub(r"\s+", " ", capsys.readouterr().out)
    assert code == 3
    assert "short by" in out or "shortfall" in out.lower()


def test_fit_bad_policy_exit_2(tiny_model_dir, capsys):
    code = main(["fit", str(tiny_model_dir), "--batch-size", "6", "--micro-batch-size", "4", "--budget", "1GiB"])
    assert code == 2
    assert "does not divide the batch 6" in re.sub(r"\s+", " ", capsys.readouterr().err)
    assert main(["fit", str(tiny_model_dir), "--lora", "--no-lora", "--budget", "1GiB"]) == 2


def test_auto_fit_returns_a_plan_for_a_name_or_a_model_object(tiny_model_dir):
    from transformers import AutoConfig, AutoModelForCausalLM

    plan = memtune.auto_fit(str(tiny_model_dir), seq_len=128, batch_size=4, budget="1GiB", precision="fp32")
    assert plan.train_config.precision == "fp32" and plan.effective_batch_size == 4
    assert Plan.from_json(plan.to_json()).train_config == plan.train_config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_model_dir))
    same = memtune.auto_fit(model, seq_len=128, batch_size=4, budget=GIB, precision="fp32")
    assert same.train_config == plan.train_config


def test_auto_fit_refuses_what_it_cannot_do(tiny_model_dir):
    with pytest.raises(UsageError, match="unknown options"):
        memtune.auto_fit(str(tiny_model_dir), budget="1GiB", lora_rank=8)
    with pytest.raises(NothingFitsError) as error:
        memtune.auto_fit(str(tiny_model_dir), seq_len=256, batch_size=8, budget=600 * MIB, use_adapter=False,
                         allow_offload=False)
    assert error.value.shortfall_bytes > 0 and error.value.suggestions


def test_no_verify_runs_no_trial_and_makes_no_workspace_even_with_a_gpu(tiny_model_dir, monkeypatch):
    """`verify=False` (--no-verify) is honoured when the probe finds a GPU: no warm-up, no trial step."""
    from memtune import fit as fit_module
    from memtune.measure.probe import GpuInfo
    from memtune.sources import parameter_count, resolve

    gpu = GpuInfo(index=0, name="NVIDIA H200", total_bytes=140 * GIB, free_bytes=139 * GIB, used_by_others_bytes=0,
                  other_processes=0, capability="9.0", bf16_supported=True, context_bytes=600 * MIB)

    def forbidden(*args, **kwargs):
        raise AssertionError("a GPU call ran although verify=False")

    monkeypatch.setattr(fit_module.memory, "warm_up", forbidden)
    monkeypatch.setattr(fit_module, "measure_trial", forbidden)
    source = resolve(str(tiny_model_dir))
    result = fit_module.fit_model(source, parameter_count(source.config), 128, 4, budget_bytes=GIB, verify=False,
                                  trace_device="cpu", probe_result=ProbeResult(gpus=[gpu]))
    assert result.search is not None and result.search.chosen is not None
    assert result.search.trials == 0 and result.search.chosen.measurement is None


def test_fit_json_run_keeps_stdout_one_json_document(tiny_model_dir, tmp_path, capsys):
    """`fit --json --run`: stdout is the fit document alone; the run's summary table goes to stderr."""
    code = main(["fit", str(tiny_model_dir), "--seq-len", "64", "--batch-size", "2", "--budget", "1GiB",
                 "--trace-device", "cpu", "--json", "--plan-out", str(tmp_path / "plan.json"), "--run",
                 "--max-steps", "1", "--output-dir", str(tmp_path / "run")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert json.loads(captured.out)["kind"] == "fit"
    assert "memtune run: completed" in captured.err and "memtune run:" not in captured.out


def test_an_emulated_budget_adds_what_the_process_already_holds_to_the_pool_cap(monkeypatch):
    """set_per_process_memory_fraction caps the whole process's pool: a process that already holds 100 GiB (a
    notebook's tensors, a benchmark's ballast) and asks a trial for 12 GiB gets a cap of 112 GiB, not 12 (where
    every trial allocation would run out of memory)."""
    from memtune.fit import emulated_budget
    from memtune.measure.probe import GpuInfo

    fractions = []
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda index=None: 100 * GIB)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, index=None: fractions.append(f))
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda index=None: 1.0, raising=False)
    gpu = GpuInfo(index=0, name="H200", total_bytes=140 * GIB, free_bytes=40 * GIB, used_by_others_bytes=0,
                  other_processes=0, capability="9.0", bf16_supported=True, context_bytes=GIB // 2)
    with emulated_budget(gpu, 12 * GIB + GIB // 2):
        assert fractions == [pytest.approx(112 / 140)]
    assert fractions[-1] == 1.0  # the previous fraction is restored
    with emulated_budget(gpu, 140 * GIB):  # no smaller than the card: nothing capped
        pass
    assert len(fractions) == 2


def test_without_a_budget_a_pinned_bf16_skips_the_cards_without_bf16(tiny_model_dir, capsys):
    """No GPU, no budget: one plan per common card. bf16-mixed pinned: the T4/V100 class is named not planned
    (it has no bf16), the others are planned, exit 0 (before: exit 2 on the first card)."""
    code = main(["fit", str(tiny_model_dir), "--seq-len", "128", "--batch-size", "4", "--precision", "bf16-mixed",
                 "--trace-device", "cpu", "--json"])
    document = json.loads(capsys.readouterr().out)
    assert code == 0
    plans = document["card_plans"]
    assert plans[0]["search"] is None and "needs bf16, which these cards lack" in plans[0]["skipped"]
    assert all(plan["search"]["chosen"]["config"]["amp"] == "bf16" for plan in plans[1:])


def test_the_plan_is_saved_and_the_choice_told_before_the_explanation(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """The "why this one" alternatives are predicted after the plan file is written and the choice is on stderr
    (`fit.fit_model`'s `on_chosen`); their seconds are the search's explain_seconds."""
    from memtune import fit as fit_module

    plan_path = tmp_path / "plan.json"
    seen = []
    real = fit_module.explain_choice

    def explaining(search, predictor, policy):
        seen.append((plan_path.is_file(), capsys.readouterr().err))
        real(search, predictor, policy)

    monkeypatch.setattr(fit_module, "explain_choice", explaining)
    code = main(["fit", str(tiny_model_dir), "--seq-len", "128", "--batch-size", "4", "--budget", "1GiB",
                 "--trace-device", "cpu", "--json", "--plan-out", str(plan_path)])
    document = json.loads(capsys.readouterr().out)
    assert code == 0 and len(seen) == 1
    saved, told = seen[0]
    assert saved and f"chosen: {document['search']['chosen']['description']}" in told
    assert f"plan saved to {plan_path}" in told
    assert document["search"]["alternatives"] and document["search"]["explain_seconds"] > 0


def test_no_explain_predicts_no_alternatives(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from memtune import fit as fit_module

    monkeypatch.setattr(fit_module, "explain_choice", lambda *args: pytest.fail("explained with --no-explain"))
    code = main(["fit", str(tiny_model_dir), "--seq-len", "128", "--batch-size", "4", "--budget", "1GiB",
                 "--trace-device", "cpu", "--json", "--no-explain", "--plan-out", str(tmp_path / "plan.json")])
    captured = capsys.readouterr()
    document = json.loads(captured.out)
    assert code == 0 and document["search"]["alternatives"] == [] and document["search"]["explain_seconds"] == 0
    assert "chosen:" not in captured.err  # told early only when an explanation follows


def test_auto_fit_explains_only_when_asked(tiny_model_dir, monkeypatch):
    from memtune import fit as fit_module

    explained = []
    real = fit_module.explain_choice
    monkeypatch.setattr(fit_module, "explain_choice", lambda *args: explained.append(1) or real(*args))
    memtune.auto_fit(str(tiny_model_dir), seq_len=128, batch_size=4, budget="1GiB")
    assert explained == []
    lines: list[str] = []
    plan = memtune.auto_fit(str(tiny_model_dir), seq_len=128, batch_size=4, budget="1GiB", explain=True,
                            progress=lines.append)
    assert explained == [1] and plan.effective_batch_size == 4
    assert any(line.startswith("why this one: ") for line in lines)


def fit_on_a_fake_gpu(tiny_model_dir, monkeypatch, measured: list):
    """`fit_model` as on an H200 (a GpuInfo given as the probe's), trial steps faked: each appends its configuration
    to `measured`; the in-process trace caches emptied first, as in a new process."""
    import contextlib

    from memtune import fit as fit_module
    from memtune.measure.memory import Measurement
    from memtune.measure.probe import GpuInfo
    from memtune.predict import single
    from memtune.sources import parameter_count, resolve

    gpu = GpuInfo(index=0, name="NVIDIA H200", total_bytes=140 * GIB, free_bytes=139 * GIB, used_by_others_bytes=0,
                  other_processes=0, capability="9.0", bf16_supported=True, context_bytes=600 * MIB,
                  driver_version="580.1")

    def trial(model_config, config, steps):
        measured.append(config)
        return Measurement(fits=True, peak_reserved_bytes=64 * MIB, step_seconds=[0.2, 0.1],
                           tokens_per_step=config.effective_batch_size * config.seq_len)

    monkeypatch.setattr(single, "_TRACE_CACHE", {})
    monkeypatch.setattr(single, "_EVENTS_CACHE", {})
    monkeypatch.setattr(fit_module.memory, "warm_up", lambda: 8 * MIB)
    monkeypatch.setattr(fit_module, "measure_trial", trial)
    monkeypatch.setattr(fit_module, "emulated_budget", lambda gpu, budget: contextlib.nullcontext())
    source = resolve(str(tiny_model_dir))
    told: list[str] = []
    result = fit_module.fit_model(source, parameter_count(source.config), 128, 4, budget_bytes=GIB,
                                  trace_device="cpu", probe_result=ProbeResult(gpus=[gpu]), explain=False,
                                  on_chosen=told.append)
    assert result.search is not None and result.search.chosen is not None
    return result, told


def test_a_second_fit_on_the_same_card_reuses_the_verified_trial(tiny_model_dir, tmp_path, monkeypatch):
    """The trial's measurement is kept on disk (`fit.cached_trial`): a second fit of the same model, configuration,
    card and budget runs no trial step and says the choice was verified earlier; MEMTUNE_NO_CACHE=1 measures again."""
    from memtune.fit import CACHED_TRIAL

    monkeypatch.delenv("MEMTUNE_NO_CACHE", raising=False)
    monkeypatch.setenv("MEMTUNE_CACHE_DIR", str(tmp_path))
    measured: list = []
    first, _ = fit_on_a_fake_gpu(tiny_model_dir, monkeypatch, measured)
    assert len(measured) == first.search.trials >= 1 and first.cached_trials == []
    second, told = fit_on_a_fake_gpu(tiny_model_dir, monkeypatch, measured)
    assert len(measured) == first.search.trials  # no trial ran the second time
    chosen = second.search.chosen
    assert chosen.config == first.search.chosen.config and chosen.status == "verified"
    assert chosen.note.startswith(CACHED_TRIAL) and told and CACHED_TRIAL in told[0]
    assert second.plan is not None and second.plan.measured_tokens_per_second == first.plan.measured_tokens_per_second
    monkeypatch.setenv("MEMTUNE_NO_CACHE", "1")
    third, _ = fit_on_a_fake_gpu(tiny_model_dir, monkeypatch, measured)
    assert len(measured) == first.search.trials + third.search.trials and third.cached_trials == []
