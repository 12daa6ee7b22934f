"""The report renders result objects: terminal text against golden files, and JSON against docs/json-schema.md.

Every result here is built by hand: the estimates and measurements are test fixtures (invented numbers
of a plausible size), not predictions or measurements of any model. No tracing, no GPU.

Regenerate the golden files after an intended change of the report, then review the diff:

    MEMTUNE_UPDATE_GOLDEN=1 python -m pytest tests/test_report.py tests/test_html_report.py
"""

from __future__ import annotations

import json
import os
import re
from io import StringIO
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from rich.console import Console

from memtune.config import GIB, MIB, Adapter, TrainConfig
from memtune.fit import CardPlan, FitResult, PlanResult
from memtune.measure.memory import Measurement
from memtune.measure.probe import GpuInfo, ProbeResult
from memtune.plan import Plan
from memtune.predict.estimate import Estimate
from memtune.report import html as html_report
from memtune.report import json as json_report
from memtune.report import terminal as report
from memtune.report import words
from memtune.search.choose import (
    EXTRAPOLATED,
    FITS,
    NOT_EVALUATED,
    SKIPPED,
    TOO_BIG,
    TRIAL_OOM,
    VERIFIED,
    Alternative,
    Candidate,
    SearchResult,
)
from memtune.search.verdict import Verdict
from memtune.sources import ModelSource

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).parent / "golden"
SCHEMA_DOC = ROOT / "docs" / "json-schema.md"
UPDATE = os.environ.get("MEMTUNE_UPDATE_GOLDEN", "") not in ("", "0")
NO_GPU_REASON = "no CUDA GPU is visible to torch (this torch 2.13.0+cpu is a CPU-only build)"

# ---- fixtures: hand-built results ---------------------------------------------------------------


def qwen_source() -> ModelSource:
    config = SimpleNamespace(num_hidden_layers=24, hidden_size=896, vocab_size=151936, tie_word_embeddings=True)
    return ModelSource("qwen2.5-0.5b", config, "catalog", hub_id="Qwen/Qwen2.5-0.5B")


def llama_source() -> ModelSource:
    config = SimpleNamespace(num_hidden_layers=16, hidden_size=2048, vocab_size=128256, tie_word_embeddings=True)
    return ModelSource("meta-llama/Llama-3.2-1B", config, "catalog", hub_id="meta-llama/Llama-3.2-1B",
                       note="offline (HF_HUB_OFFLINE=1); used the built-in catalog config")


def fake_estimate(config: TrainConfig, **gib: float) -> Estimate:
    """An Estimate whose breakdown is `gib` (GiB per category) plus fragmentation, workspaces and context."""
    context, workspace = 610 * MIB, 65 * MIB
    fragmentation = int(gib.pop("fragmentation", 0.5) * GIB)
    allocated = {name: int(size * GIB) for name, size in gib.items()}
    peak_allocated = sum(allocated.values())
    breakdown = {**allocated, "overhead": fragmentation + workspace + context}
    return Estimate(config, peak_allocated, peak_allocated + fragmentation, workspace, context, breakdown,
                    trace_device="cpu", traced_layers=3, num_layers=24, seconds=2.5)


def full(micro: int, batch: int = 32, *, precision: str = "bf16-mixed", ckpt: bool = False, chunked: bool = False,
         offload: str = "none", adapter: Adapter | None = None, seq_len: int = 1024) -> TrainConfig:
    weights, amp = {"bf16-mixed": ("fp32", "bf16"), "fp32": ("fp32", "none"), "bf16": ("bf16", "none")}[precision]
    return TrainConfig(
        seq_len=seq_len,
        micro_batch_size=micro,
        grad_accum_steps=batch // micro,
        weights_dtype=weights,
        amp=amp,
        gradient_checkpointing=ckpt,
        loss="chunked" if chunked else "standard",
        offload=offload,
        adapter=adapter,
    )


def qwen_candidate(
    config: TrainConfig, status: str, tokens_per_second: float, note: str = "", extra_gib: float = 0.0
) -> Candidate:
    """A candidate of the qwen fixture; its (invented) memory grows with the micro-batch as a real one would.
    `extra_gib` is added to the weights (a bigger model, for the card fixture)."""
    candidate = Candidate(config, tokens_per_second, status=status, note=note)
    if status in (NOT_EVALUATED, SKIPPED, EXTRAPOLATED):  # never traced: no estimate
        return candidate
    micro = config.micro_batch_size
    activations = micro * (0.35 if config.gradient_checkpointing else 1.6)
    logits = micro * (0.15 if config.loss == "chunked" else 1.1)
    candidate.estimate = fake_estimate(
        config,
        weights=1.84 + extra_gib,
        gradients=1.84,
        optimizer=3.68,
        activations=activations,
        logits=logits,
        temporaries=0.3 * micro,
        fragmentation=0.08 * micro,
    )
    return candidate


def fixture_margin(budget_bytes: int) -> int:
    """The fixtures' safety margin: 5% of the budget, at least 256 MiB (fixed here, whatever search's default)."""
    return max(256 * MIB, budget_bytes // 20)


def rtx4090() -> GpuInfo:
    return GpuInfo(index=0, name="NVIDIA GeForce RTX 4090", total_bytes=24564 * MIB, free_bytes=22800 * MIB,
                   used_by_others_bytes=1180 * MIB, other_processes=1, capability="8.9", bf16_supported=True,
                   context_bytes=540 * MIB, driver_version="570.86.15")


def gpu_verified_result() -> FitResult:
    """A GPU is here: one trial ran out of memory, the next verified; alternatives explain the choice."""
    gpu = rtx4090()
    budget = gpu.budget_bytes
    search = SearchResult(1024, 32, budget, fixture_margin(budget))
    oom = "CUDA out of memory. Tried to allocate 1.16 GiB. GPU 0 has a total capacity of 23.99 GiB"
    chosen = qwen_candidate(full(4, chunked=True), VERIFIED, 21500)
    search.candidates = [
        qwen_candidate(full(32), TOO_BIG, 24800),
        qwen_candidate(full(16), TOO_BIG, 24600),
        qwen_candidate(
            full(32, chunked=True), SKIPPED, 24100, note="needs at least as much as micro-batch 16 x 2 accum"
        ),
        qwen_candidate(full(8), TRIAL_OOM, 23900, note=oom),
        qwen_candidate(full(8, chunked=True), TOO_BIG, 23500),
        qwen_candidate(
            full(16, chunked=True), SKIPPED, 23400, note="needs at least as much as micro-batch 8 x 4 accum"
        ),
        qwen_candidate(full(16, ckpt=True), EXTRAPOLATED, 21900, note="~23.90 GiB, from micro-batch 32"),
        chosen,
        qwen_candidate(full(4), NOT_EVALUATED, 21300),
        qwen_candidate(full(32, ckpt=True), NOT_EVALUATED, 19000),
        qwen_candidate(full(2), NOT_EVALUATED, 18000),
    ]
    reserved = int(chosen.estimate.peak_reserved_bytes * 1.02)  # the fixture's trial measured 2% more than predicted
    chosen.measurement = Measurement(
        fits=True,
        peak_allocated_bytes=chosen.estimate.peak_allocated_bytes,
        peak_reserved_bytes=reserved,
        step_seconds=[0.48, 0.38, 0.375],
        tokens_per_step=2 * 4 * 1024,
    )  # 2 of 8 micro-batches
    search.chosen = chosen
    search.trials, search.trial_ooms, search.estimates, search.seconds = 2, 1, 6, 31.4
    alternative_rows = [
        ("no gradient accumulation (micro-batch 32)", full(32, chunked=True), 28.90, 24900, False),
        ("fp32 instead of bf16-mixed", full(4, precision="fp32", chunked=True), 19.70, 6900, True),
        ("+ gradient checkpointing", full(4, ckpt=True, chunked=True), 12.25, 17900, True),
        ("- chunked loss", full(8), 21.40, 23900, True),
        ("+ CPU offload", full(4, chunked=True, offload="parameters"), 7.10, 6100, True),
        ("+ LoRA r=16 (all-linear)", full(4, chunked=True, adapter=Adapter()), 9.80, 26400, True),
    ]
    search.alternatives = [Alternative(change, config, int(gib * GIB), speed, fits)
                           for change, config, gib, speed, fits in alternative_rows]
    search.alternatives[3].config = full(8)  # the rung that matches the trial that ran out of memory
    search.fallbacks = [full(4, ckpt=True, chunked=True), full(2, chunked=True)]
    result = FitResult(qwen_source(), 494_032_768, 1024, 32, probe=ProbeResult([gpu], torch_cuda="12.8"), gpu=gpu,
                       budget_bytes=budget, budget_label=f"{gpu.name}: {budget / GIB:.2f} GiB usable", search=search,
                       plan_path=Path("plans/qwen2.5-0.5b.json"), seconds=38.2)
    result.plan = Plan(
        model="qwen2.5-0.5b",
        train_config=chosen.config,
        budget_bytes=budget,
        margin_bytes=search.margin_bytes,
        predicted_total_bytes=chosen.predicted_total_bytes,
        predicted_tokens_per_second=21500,
        measured_peak_reserved_bytes=chosen.measurement.peak_reserved_bytes,
        measured_tokens_per_second=chosen.measurement.tokens_per_second,
        gpu=gpu.name,
        fallbacks=search.fallbacks,
        created="2025-01-01T00:00:00+00:00",
    )
    return result


def budget_lora_result() -> FitResult:
    """No GPU, a budget: full fine-tuning does not fit, LoRA on a bf16 base does (predicted only)."""
    budget = 8 * GIB
    search = SearchResult(2048, 16, budget, fixture_margin(budget))
    lora = Adapter(rank=16, alpha=32)

    def candidate(config: TrainConfig, status: str, speed: float, **gib: float) -> Candidate:
        return Candidate(config, speed, fake_estimate(config, **gib) if gib else None, status)

    chosen = candidate(full(2, 16, precision="bf16", ckpt=True, adapter=lora, seq_len=2048), FITS, 9100,
                       weights=2.30, gradients=0.04, optimizer=0.08, activations=0.9, logits=2.0, temporaries=0.4)
    search.candidates = [
        candidate(full(16, 16, seq_len=2048), TOO_BIG, 8200, weights=4.6, gradients=4.6, optimizer=9.2, activations=40,
                  logits=18, temporaries=3),
        candidate(full(16, 16, ckpt=True, chunked=True, seq_len=2048), TOO_BIG, 6400, weights=4.6, gradients=4.6,
                  optimizer=9.2, activations=3, logits=1.2, temporaries=2),
        candidate(full(1, 16, ckpt=True, chunked=True, offload="parameters", seq_len=2048), TOO_BIG, 1900, weights=0.3,
                  gradients=4.6, optimizer=0.1, activations=0.3, logits=0.2, temporaries=3.5),
        candidate(full(4, 16, ckpt=True, seq_len=2048), SKIPPED, 6000),
        candidate(full(16, 16, precision="bf16", adapter=lora, seq_len=2048), TOO_BIG, 10400, weights=2.3,
                  gradients=0.04, optimizer=0.08, activations=22, logits=16, temporaries=2),
        chosen,
        candidate(full(1, 16, precision="bf16", adapter=lora, seq_len=2048), NOT_EVALUATED, 8000),
    ]
    search.chosen = chosen
    search.estimates, search.seconds = 5, 14.0
    search.alternatives = [
        Alternative(
            "no gradient accumulation (micro-batch 16)",
            full(16, 16, precision="bf16", ckpt=True, adapter=lora, seq_len=2048),
            int(14.2 * GIB),
            9800,
            False,
        ),
        Alternative(
            "bf16-mixed instead of bf16",
            full(2, 16, ckpt=True, adapter=lora, seq_len=2048),
            int(8.9 * GIB),
            8100,
            False,
        ),
        Alternative(
            "- gradient checkpointing",
            full(2, 16, precision="bf16", adapter=lora, seq_len=2048),
            int(9.6 * GIB),
            11000,
            False,
        ),
        Alternative(
            "+ chunked loss",
            full(2, 16, precision="bf16", ckpt=True, adapter=lora, chunked=True, seq_len=2048),
            int(4.9 * GIB),
            8700,
            True,
        ),
    ]
    result = FitResult(llama_source(), 1_235_814_400, 2048, 16, probe=ProbeResult(reason=NO_GPU_REASON),
                       budget_bytes=budget, budget_label="budget 8.00 GiB", search=search,
                       plan_path=Path("plans/llama.json"), seconds=15.0)
    result.plan = Plan(model=result.source.name, train_config=chosen.config, budget_bytes=budget,
                       margin_bytes=search.margin_bytes, predicted_total_bytes=chosen.predicted_total_bytes,
                       predicted_tokens_per_second=9100, created="2025-01-01T00:00:00+00:00")
    return result


def nothing_fits_result() -> FitResult:
    """A 4 GiB budget, full fine-tuning only: every candidate is too big."""
    budget = 4 * GIB
    search = SearchResult(1024, 8, budget, fixture_margin(budget))
    search.candidates = [
        qwen_candidate(full(8, 8), TOO_BIG, 24000),
        qwen_candidate(full(8, 8, chunked=True), TOO_BIG, 23000),
        qwen_candidate(full(1, 8, ckpt=True, chunked=True), TOO_BIG, 15000),
        qwen_candidate(full(2, 8), SKIPPED, 20000),
        qwen_candidate(full(1, 8, precision="fp32", ckpt=True, chunked=True), TOO_BIG, 6000),
    ]
    search.estimates, search.seconds = 4, 9.5
    smallest = search.candidates[2].predicted_total_bytes
    search.shortfall_bytes = smallest + search.margin_bytes - budget
    search.suggestions = [
        "a GPU with 9.94 GiB or more (e.g. T4-16GB) with micro-batch 1 x 8 accum, bf16-mixed, checkpointing, "
        "chunked loss",
        "allow LoRA (drop --no-lora / --full-finetune-only)",
        "the whole budget: it is 4.00 GiB, with a margin of 256.00 MiB (set --margin to change it)",
    ]
    return FitResult(qwen_source(), 494_032_768, 1024, 8, probe=ProbeResult(reason=NO_GPU_REASON), budget_bytes=budget,
                     budget_label="budget 4.00 GiB", search=search, seconds=10.0)


def cards_result() -> FitResult:
    """No GPU and no budget: one search per common card; the smallest card fits nothing."""
    extra = 9.0  # the fixture pretends a model 9 GiB heavier than the qwen fixture, so the 16 GiB card fails

    def card(name: str, size_gib: int, chosen_config: TrainConfig | None, speed: float) -> CardPlan:
        budget = size_gib * GIB
        search = SearchResult(1024, 32, budget, fixture_margin(budget))
        search.candidates = [qwen_candidate(full(32), TOO_BIG, 24800, extra_gib=extra)]
        if chosen_config is None:
            smallest = qwen_candidate(full(1, ckpt=True, chunked=True), TOO_BIG, 9000, extra_gib=extra)
            search.candidates.append(smallest)
            search.shortfall_bytes = smallest.predicted_total_bytes + search.margin_bytes - budget
            search.suggestions = ["a GPU with more memory"]
        else:
            search.chosen = qwen_candidate(chosen_config, FITS, speed, extra_gib=extra)
            search.candidates.append(search.chosen)
        search.estimates = len(search.candidates)
        return CardPlan(name, budget, search)

    plans = [
        card("16 GiB (T4, V100-16GB)", 16, None, 0),
        card("24 GiB (RTX 4090, A10, L4)", 24, full(1, ckpt=True, chunked=True), 9000),
        card("40 GiB (A100-40GB)", 40, full(4, chunked=True), 21500),
        card("48 GiB (L40S, A6000)", 48, full(8, chunked=True), 23500),
        card("80 GiB (A100-80GB, H100)", 80, full(16), 24600),
    ]
    return FitResult(qwen_source(), 494_032_768, 1024, 32, probe=ProbeResult(reason=NO_GPU_REASON), card_plans=plans,
                     seconds=20.0)


def probe_result() -> ProbeResult:
    second = GpuInfo(index=1, name="NVIDIA GeForce RTX 4090", total_bytes=24564 * MIB, free_bytes=24000 * MIB,
                     used_by_others_bytes=0, other_processes=0, capability="8.9", bf16_supported=True,
                     context_bytes=540 * MIB, memory_fraction=0.5, driver_version="570.86.15")
    return ProbeResult([rtx4090(), second], torch_cuda="12.8")


FIT_RESULTS = {
    "fit_gpu_verified": gpu_verified_result,
    "fit_budget_lora": budget_lora_result,
    "fit_nothing_fits": nothing_fits_result,
    "fit_cards": cards_result,
}

# ---- golden files ---------------------------------------------------------------------------------


def rendered(draw, width: int = 100) -> str:
    """What `draw(console)` prints on a plain (not a terminal, no colour) console `width` characters wide."""
    console = Console(file=StringIO(), width=width, force_terminal=False, color_system=None)
    draw(console)
    return "\n".join(line.rstrip() for line in console.file.getvalue().splitlines()) + "\n"


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return
    assert path.is_file(), f"{path} is missing: run MEMTUNE_UPDATE_GOLDEN=1 python -m pytest {Path(__file__).name}"
    expected = path.read_text()
    assert text == expected, f"{name} differs from the golden file; if the change is intended, regenerate " \
                             "with MEMTUNE_UPDATE_GOLDEN=1 and review the diff"


@pytest.mark.parametrize("name", list(FIT_RESULTS))
def test_fit_report_matches_golden(name):
    result = FIT_RESULTS[name]()
    check_golden(f"{name}.txt", rendered(lambda console: report.render_fit(result, console)))


@pytest.mark.parametrize("width", [80, 140])
def test_fit_report_at_other_widths_matches_golden(width):
    """80 columns (a pipe): quality notes under each configuration, no category notes; 140: every column."""
    result = gpu_verified_result()
    check_golden(
        f"fit_gpu_verified_{width}.txt", rendered(lambda console: report.render_fit(result, console), width=width)
    )


@pytest.mark.parametrize("probe", [probe_result(), ProbeResult(reason=NO_GPU_REASON)], ids=["gpus", "no_gpu"])
def test_probe_report_matches_golden(probe):
    name = "probe_gpus.txt" if probe.available else "probe_no_gpu.txt"
    check_golden(name, rendered(lambda console: report.render_probe(probe, console)))


# ---- what the report must say, whatever the layout -------------------------------------------------


def test_verified_report_names_the_winner_its_changes_and_the_evidence():
    text = rendered(lambda console: report.render_fit(gpu_verified_result(), console), width=250)
    assert "NVIDIA GeForce RTX 4090" in text and "1 other process" in text
    assert "vocab 151,936" in text and "24 layers" in text
    assert "chosen: micro-batch 4 x 8 accum, bf16-mixed, chunked loss" in text
    assert "per_device_train_batch_size=4" in text and "gradient_accumulation_steps=8" in text and "bf16=True" in text
    assert re.search(r"peak memory +16.54 GiB +16.86 GiB +-1.9%", text) and "(2 trials, 1 out of memory)" in text
    assert "each trial step ran 2 of the 8 accumulated micro-batches" in text
    assert "3 slower configurations not evaluated" in text
    assert "2 more too big (implied), not traced: each needs at least as much as one above" in text
    assert "1 more too big (extrapolated), not traced: extrapolated from a traced micro-batch" in text
    assert "ran out of memory in its trial" in text  # the "- chunked loss" rung is the config whose trial failed
    assert "memtune fit qwen2.5-0.5b --seq-len 1024 --batch-size 32 --plan-out plans/qwen2.5-0.5b.json" in text
    assert "memtune run plans/qwen2.5-0.5b.json" in text
    assert "--budget" not in text  # fitted to the GPU at hand: no --budget needed to reproduce


def test_lora_report_has_the_lora_config_and_no_verification():
    text = rendered(lambda console: report.render_fit(budget_lora_result(), console), width=250)
    assert "not verified (no GPU)" in text
    assert "LoraConfig(" in text and "r=16, lora_alpha=32" in text and "dtype=torch.bfloat16" in text
    assert "LoRA r=16: trains ~" in text
    assert "--budget 8GiB" in text


def test_nothing_fits_says_the_shortfall_and_what_would_fit():
    result = nothing_fits_result()
    text = rendered(lambda console: report.render_fit(result, console), width=250)
    assert "nothing fits" in text and "short by" in text
    for suggestion in result.search.suggestions:
        assert suggestion in text


def test_card_plans_show_each_card_or_its_shortfall():
    text = rendered(lambda console: report.render_fit(cards_result(), console), width=250)
    assert "does not fit (short by" in text
    for name in ("24 GiB (RTX 4090, A10, L4)", "80 GiB (A100-80GB, H100)"):
        assert name in text


def test_a_card_that_cannot_run_the_pinned_precision_is_named_not_planned():
    """No GPU, no budget and --precision bf16-mixed: the 16 GiB class (T4, V100) has no bf16. It is listed as not
    planned, in the table, the JSON and the page, and the rest are planned (before, the pin failed the whole
    command with exit 2)."""
    result = cards_result()
    result.card_plans[0] = CardPlan(result.card_plans[0].card, 16 * GIB, None,
                                    skipped="not planned: --precision bf16-mixed needs bf16, which these cards lack")
    text = rendered(lambda console: report.render_fit(result, console), width=250)
    row = next(line for line in text.splitlines() if line.startswith("16 GiB (T4, V100-16GB)"))
    assert row.split(maxsplit=4)[-1] == "not planned: --precision bf16-mixed needs bf16, which these cards lack"
    document = json.loads(json_report.render_fit_json(result))
    assert document["card_plans"][0]["search"] is None and document["card_plans"][0]["skipped"].startswith("not")
    assert "not planned" in html_report.render_html(result) and result.fits


def test_quality_notes():
    source = qwen_source()
    assert words.quality_note(full(4)) == "bf16-mixed: standard mixed precision"
    assert words.quality_note(full(4, precision="fp32")) == "fp32: full precision"
    note = words.quality_note(full(4, adapter=Adapter(rank=16)), source.config, 494_032_768)
    assert re.fullmatch(r"LoRA r=16: trains ~[0-9.]+% of weights", note)


def test_breakdown_bars_scale_with_the_budget():
    estimate = fake_estimate(full(4), weights=6.0, gradients=0, optimizer=0, activations=0, logits=0, temporaries=0,
                             fragmentation=0)
    text = rendered(lambda console: console.print(report.breakdown_bars(estimate, 12 * GIB, 11 * GIB)))
    weights_line = next(line for line in text.splitlines() if line.strip().startswith("weights"))
    assert weights_line.count("█") == report.BAR_WIDTH // 2  # 6 of 12 GiB: half the bar
    budget_line = next(line for line in text.splitlines() if line.strip().startswith("budget"))
    assert budget_line.count("█") == report.BAR_WIDTH


def test_reproduce_with_the_card_that_was_named():
    from memtune.config import KNOWN_GPUS

    result = budget_lora_result()
    result.budget_bytes, result.budget_label = KNOWN_GPUS["A10-24GB"], "A10-24GB (22.49 GiB)"
    result.plan_path = Path(words.DEFAULT_PLAN_PATH)
    assert words.fit_commands(result) == [
        "memtune fit meta-llama/Llama-3.2-1B --seq-len 2048 --batch-size 16 --gpu A10-24GB",
        "memtune run memtune-plan.json",
    ]


def test_budget_flag_parses_back():
    from memtune.config import parse_bytes

    for value in (24 * GIB, 23028 * MIB, 24 * 10**9 + 1):
        assert parse_bytes(words.budget_flag(value)) == value


def test_progress_printer_prints_plain_lines_off_a_terminal_and_animates_nothing():
    console = Console(file=StringIO(), width=100, force_terminal=False, color_system=None)
    with report.progress_printer(console) as progress:
        progress("predicting micro-batch 4 x 8 accum, bf16-mixed")
        progress("trial steps of micro-batch 4 x 8 accum, bf16-mixed")
    assert console.file.getvalue().splitlines() == ["predicting micro-batch 4 x 8 accum, bf16-mixed",
                                                    "trial steps of micro-batch 4 x 8 accum, bf16-mixed"]
    quiet = Console(file=StringIO(), force_terminal=False)
    with report.progress_printer(quiet, plain_lines=False) as progress:
        progress("tracing")
    assert quiet.file.getvalue() == ""


def test_progress_printer_uses_a_spinner_on_a_terminal():
    console = Console(file=StringIO(), width=100, force_terminal=True)
    with report.progress_printer(console) as progress:
        assert progress._status is not None
        progress("tracing")
    assert progress._status is None


# ---- JSON: documents against the documented schema ----------------------------------------------------

PRIMITIVES = {"integer": int, "number": (int, float), "string": str, "boolean": bool, "object": dict, "array": list}


def documented_types(text: str) -> dict[str, dict[str, str]]:
    """docs/json-schema.md -> {type name: {key: type}}: one `## Name` section with a `| key | type |...` table
    per type."""
    types: dict[str, dict[str, str]] = {}
    current = None
    for line in text.splitlines():
        heading = re.match(r"^##\s+(\w+)", line)
        if heading:
            current = heading.group(1)
            continue
        cells = [cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", line)[1:-1]]
        if current and len(cells) >= 2 and re.fullmatch(r"`[^`]+`", cells[0]):
            types.setdefault(current, {})[cells[0].strip("`")] = cells[1].replace("`", "")
    return types


def schema_errors(value: Any, type_: str, types: dict[str, dict[str, str]], path: str = "$") -> list[str]:
    """Where `value` departs from `type_`: primitives, `T | null`, `array of T`, `map of T` and the documented
    objects."""
    alternatives = [part.strip() for part in type_.split("|")]
    if len(alternatives) > 1:
        if value is None and "null" in alternatives:
            return []
        candidates = [schema_errors(value, part, types, path) for part in alternatives if part != "null"]
        return min(candidates, key=len) if candidates else [f"{path}: {value!r} is not null"]
    if type_.startswith("array of "):
        if not isinstance(value, list):
            return [f"{path}: expected an array, got {type(value).__name__}"]
        return [
            error for i, item in enumerate(value) for error in schema_errors(item, type_[9:], types, f"{path}[{i}]")
        ]
    if type_.startswith("map of "):
        if not isinstance(value, dict):
            return [f"{path}: expected an object, got {type(value).__name__}"]
        return [
            error for key, item in value.items() for error in schema_errors(item, type_[7:], types, f"{path}.{key}")
        ]
    if type_ in PRIMITIVES:
        ok = isinstance(value, PRIMITIVES[type_]) and not (type_ in ("integer", "number") and isinstance(value, bool))
        return [] if ok else [f"{path}: expected {type_}, got {value!r}"]
    if type_ not in types:
        return [f"{path}: type {type_!r} is not documented"]
    if not isinstance(value, dict):
        return [f"{path}: expected a {type_} object, got {type(value).__name__}"]
    keys = types[type_]
    errors = [f"{path}.{key}: not documented in {type_}" for key in value if key not in keys]
    errors += [f"{path}.{key}: documented in {type_} but missing" for key in keys if key not in value]
    for key, item in value.items():
        if key in keys:
            errors += schema_errors(item, keys[key], types, f"{path}.{key}")
    return errors


@pytest.fixture(scope="module")
def types() -> dict[str, dict[str, str]]:
    return documented_types(SCHEMA_DOC.read_text())


@pytest.mark.parametrize("name", list(FIT_RESULTS))
def test_fit_json_matches_the_documented_schema(name, types):
    document = json.loads(json_report.render_fit_json(FIT_RESULTS[name]()))
    assert document["schema_version"] == json_report.SCHEMA_VERSION and document["kind"] == "fit"
    assert schema_errors(document, "FitDocument", types) == []


def test_fit_json_keeps_bytes_as_integers_and_the_chosen_plan():
    result = gpu_verified_result()
    document = json_report.fit_to_dict(result)
    assert document["mode"] == "gpu" and document["fits"] is True
    assert document["search"]["chosen"]["predicted_total_bytes"] == result.search.chosen.predicted_total_bytes
    assert document["plan"]["train_config"]["micro_batch_size"] == 4
    assert document["plan_path"] == "plans/qwen2.5-0.5b.json"
    assert document["search"]["candidates_not_evaluated"] == 3
    assert json.loads(json_report.render_fit_json(cards_result()))["mode"] == "cards"
    assert json.loads(json_report.render_fit_json(nothing_fits_result()))["fits"] is False


@pytest.mark.parametrize("probe", [probe_result(), ProbeResult(reason=NO_GPU_REASON)], ids=["gpus", "no_gpu"])
def test_probe_json_matches_the_documented_schema(probe, types):
    document = json.loads(json_report.render_probe_json(probe))
    assert document["kind"] == "probe"
    assert schema_errors(document, "ProbeDocument", types) == []


def test_plan_json_matches_the_documented_schema(types):
    estimate = fake_estimate(full(4), weights=1, gradients=1, optimizer=2, activations=3, logits=1, temporaries=0.5)
    result = PlanResult(
        qwen_source(),
        estimate,
        "budget 24.00 GiB",
        494_032_768,
        Verdict(True, estimate.total_bytes, 24 * GIB, 491 * MIB),
    )
    assert schema_errors(json.loads(json_report.render_plan_json(result)), "PlanDocument", types) == []


def test_the_schema_checker_catches_departures(types):
    document = json_report.fit_to_dict(gpu_verified_result())
    document["search"]["chosen"]["predicted_total_bytes"] = "17 GiB"
    document["surprise"] = 1
    del document["seq_len"]
    errors = schema_errors(document, "FitDocument", types)
    assert any("predicted_total_bytes: expected integer" in error for error in errors)
    assert any("surprise: not documented" in error for error in errors)
    assert any("seq_len: documented in FitDocument but missing" in error for error in errors)


def test_a_real_search_renders_and_matches_the_schema(types):
    """The real ladder (search.search) with a fake predictor: the report handles whatever it produces."""
    from memtune.search.choose import search

    class FakePredictor:
        def memory(self, config: TrainConfig) -> Estimate:
            return qwen_candidate(config, FITS, 0).estimate

        def fits(self, estimate: Estimate, usable_bytes: int) -> bool:
            return estimate.total_bytes <= usable_bytes

        def tokens_per_second(self, config: TrainConfig) -> float:
            speed = 20000 + 100 * config.micro_batch_size - (3000 if config.gradient_checkpointing else 0)
            return speed / (3 if config.amp == "none" and config.weights_dtype == "fp32" else 1)

    found = search(FakePredictor(), 1024, 32, 16 * GIB)
    result = FitResult(qwen_source(), 494_032_768, 1024, 32, probe=ProbeResult(reason=NO_GPU_REASON),
                       budget_bytes=16 * GIB, budget_label="budget 16.00 GiB", search=found)
    text = rendered(lambda console: report.render_fit(result, console), width=250)
    assert found.chosen is not None and f"chosen: {found.chosen.config.describe()}" in text
    assert schema_errors(json.loads(json_report.render_fit_json(result)), "FitDocument", types) == []


@pytest.mark.parametrize("config", [
    full(4), full(2, precision="fp32", ckpt=True),
    full(2, precision="bf16", ckpt=True, adapter=Adapter(target_modules=("q_proj", "v_proj"))),
    full(2, precision="bf16", adapter=Adapter(kind="prefix")), full(1, chunked=True, offload="parameters"),
    TrainConfig(seq_len=1024, micro_batch_size=2, grad_accum_steps=4, amp="fp16"),
    TrainConfig(seq_len=1024, micro_batch_size=2, amp="bf16", num_gpus=4, strategy="ddp"),
], ids=["bf16-mixed", "fp32+ckpt", "lora-targets", "prefix", "offload", "fp16-mixed", "ddp"])
def test_the_python_snippet_is_valid_python(config):
    snippet = words.python_snippet(config)
    compile(snippet, "<snippet>", "exec")
    assert f"per_device_train_batch_size={config.micro_batch_size}" in snippet
    assert ("fp16=True" in snippet) == (config.amp == "fp16")


def test_a_ddp_plan_says_how_the_gpus_share_the_work(types):
    config = TrainConfig(seq_len=1024, micro_batch_size=2, amp="bf16", num_gpus=4, strategy="ddp")
    assert "4 GPUs, a full replica on each (DDP" in words.changes_to_make(config)[-1]
    assert "4 GPUs, sharded with FSDP" in words.changes_to_make(config.replace(strategy="fsdp"))[-1]
    snippet = words.python_snippet(config)
    assert "ddp_find_unused_parameters=False" in snippet and "DDP over 4 GPUs (accelerate launch)" in snippet
    estimate = fake_estimate(config, weights=1, gradients=1, ddp_buckets=1, optimizer=2, activations=3, logits=1)
    result = PlanResult(
        qwen_source(), estimate, "H100-80GB", 494_032_768, Verdict(True, estimate.total_bytes, 80 * GIB, 1638 * MIB)
    )
    text = rendered(lambda console: report.render_plan(result, console), width=120)
    assert "4 GPUs, DDP" in text and "DDP gradient buckets" in text
    document = json.loads(json_report.render_plan_json(result))
    assert document["estimate"]["config"]["strategy"] == "ddp"
    assert schema_errors(document, "PlanDocument", types) == []


def test_the_why_table_says_when_an_alternative_fits_only_by_releasing_the_cache():
    from memtune.config import GIB, TrainConfig
    from memtune.report.words import fits_word
    from memtune.search.choose import Alternative, SearchResult

    search = SearchResult(seq_len=64, effective_batch_size=1, budget_bytes=10 * GIB, margin_bytes=GIB)
    config = TrainConfig(seq_len=64)
    assert fits_word(Alternative("a", config, 8 * GIB, 1.0, fits=True), search) == "yes"
    assert fits_word(Alternative("b", config, int(9.5 * GIB), 1.0, fits=True), search) == "on release"
    assert fits_word(Alternative("c", config, 12 * GIB, 1.0, fits=False), search) == "no"


@pytest.mark.parametrize(("config", "expected", "absent"), [
    (TrainConfig(seq_len=256, trainer="dpo", precompute_ref_log_probs=True),
     ["from trl import DPOConfig", "args = DPOConfig(", "max_length=256,", "precompute_ref_log_probs=True,"],
     ["TrainingArguments"]),
    (TrainConfig(seq_len=256, trainer="sft", sft_batches="packed"),
     ["from trl import SFTConfig", "args = SFTConfig(", "packing=True,", "padding_free=True,"], ["TrainingArguments"]),
    (TrainConfig(seq_len=256, trainer="sft", sft_batches="padding-free", weights_dtype="bf16"),
     ["from transformers import AutoModelForCausalLM\n", "max_length=None,", "padding_free=True,"],
     ["TrainingArguments", "packing=True"]),
])
def test_the_python_snippet_of_a_trl_plan_builds_trls_config(config, expected, absent):
    """A TRL plan's "or in Python" lines build SFTConfig / DPOConfig with the layout and reference it planned, as
    Plan.sft_config / dpo_config do, not a TrainingArguments that would lose them."""
    from memtune.report.words import python_snippet

    snippet = python_snippet(config) + "\n"
    assert all(text in snippet for text in expected), snippet
    assert not any(text in snippet for text in absent), snippet
