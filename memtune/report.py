"""Renders result objects for people (rich) and programs (JSON); the picture is in html_report.py.

Computes nothing: every number comes from the result objects (fit.FitResult, search.SearchResult,
estimate.Estimate, verify.Measurement, probe.ProbeResult). What is shared by the terminal and the
HTML page - the wording of a configuration's changes, quality notes, the lines to reproduce - is a
plain-string function here, so both say the same thing.

JSON documents carry `schema_version` and `kind`; every key, type and unit is documented in
docs/json-schema.md, and tests/test_report.py checks real documents against that file.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich import box
from rich.console import Console
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from memtune.config import GIB, KNOWN_GPUS, MIB, TrainConfig, format_bytes
from memtune.estimate import Estimate
from memtune.search import EXTRAPOLATED, NOT_EVALUATED, SKIPPED, TRIAL_OOM, policy_flags
from memtune.sources import CatalogEntry, ModelSource

if TYPE_CHECKING:
    from memtune.fit import CardPlan, FitResult
    from memtune.probe import ProbeResult
    from memtune.search import Alternative, Candidate, SearchResult

SCHEMA_VERSION = 1
CATEGORY_NOTES = {
    "weights": "parameters and buffers",
    "gradients": "gradients of trained parameters",
    "optimizer": "AdamW moments and step counters",
    "activations": "tensors saved for backward",
    "logits": "LM-head logits, loss and their gradients",
    "temporaries": "backward intermediates",
    "overhead": "allocator fragmentation, cuBLAS workspaces, CUDA context",
    "fsdp_buffers": "FSDP all-gather and reduce-scatter buffers",
    "ddp_buckets": "DDP gradient buckets (a second copy of the gradients, all-reduced)",
}
# Okabe-Ito colours (distinguishable with colour-blindness); the terminal bars and the HTML
# picture use the same ones, so either legend reads the other.
CATEGORY_COLOURS = {
    "weights": "#0072B2",
    "gradients": "#56B4E9",
    "optimizer": "#009E73",
    "activations": "#E69F00",
    "logits": "#D55E00",
    "temporaries": "#CC79A7",
    "overhead": "#999999",
}
OTHER_COLOUR = "#666666"
PRECISION_NOTES = {
    "fp32": "fp32: full precision",
    "bf16-mixed": "bf16-mixed: standard mixed precision",
    "fp16-mixed": "fp16-mixed: mixed precision with loss scaling",
    "bf16": "bf16 weights: no fp32 master copy (small updates can be lost)",
    "fp16": "fp16 weights: no fp32 master copy (small updates can be lost)",
}
WIDE = 120
"""A console at least this wide gets the candidates' quality notes in a column of their own."""
BAR_WIDTH = 32
"""Characters of a terminal bar that stands for the whole budget."""
DEFAULT_PLAN_PATH = "memtune-plan.json"
"""Where `memtune fit` saves the plan unless --plan-out says otherwise."""


# ---- `memtune plan` and `memtune models` ---------------------------------------------------------


@dataclass
class PlanResult:
    """What `memtune plan` found: one configuration's predicted memory against a budget."""

    source: ModelSource
    estimate: Estimate
    budget_bytes: int | None
    budget_label: str
    num_parameters: int
    fits_strict: bool | None = None
    """The replay against the budget's capacity (cache release included) fitted."""

    @property
    def fits(self) -> bool | None:
        if self.budget_bytes is None:
            return None
        return self.estimate.fits(self.budget_bytes) and bool(self.fits_strict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "model": {"name": self.source.name, "origin": self.source.origin, "num_parameters": self.num_parameters,
                      "num_layers": self.estimate.num_layers},
            "budget_bytes": self.budget_bytes,
            "budget": self.budget_label,
            "fits": self.fits,
            "estimate": self.estimate.to_dict(),
        }


def render_plan_json(result: PlanResult) -> str:
    return json.dumps(result.to_dict(), indent=2)


def render_plan(result: PlanResult, console: Console) -> None:
    estimate = result.estimate
    config = estimate.config
    console.print(
        f"[bold]{result.source.name}[/bold] ({result.source.origin}, {result.num_parameters / 1e9:.3g}B parameters, "
        f"{estimate.num_layers} layers)"
    )
    console.print(f"configuration: {config.describe()}, {config.seq_len} tokens, effective batch {config.effective_batch_size}")
    table = Table(title="predicted peak memory", show_lines=False)
    table.add_column("category")
    table.add_column("bytes", justify="right")
    table.add_column("share", justify="right")
    table.add_column("what it is")
    total = estimate.total_bytes
    for category, size in sorted(estimate.breakdown.items(), key=lambda item: -item[1]):
        table.add_row(category, format_bytes(size), f"{100 * size / total:.0f}%", CATEGORY_NOTES.get(category, ""))
    table.add_row("[bold]total[/bold]", f"[bold]{format_bytes(total)}[/bold]", "", "reserved + workspaces + context")
    console.print(table)
    console.print(
        f"peak allocated {format_bytes(estimate.peak_allocated_bytes)}, peak reserved {format_bytes(estimate.peak_reserved_bytes)} "
        f"(traced {estimate.traced_layers} of {estimate.num_layers} layers on fake {estimate.trace_device} tensors, "
        f"{estimate.seconds:.1f} s)"
    )
    if result.budget_bytes is None:
        console.print("no budget given: pass --budget 24GiB or --gpu NAME to check a card")
    elif result.fits:
        console.print(f"[green]fits[/green] {result.budget_label}: {format_bytes(result.budget_bytes - total)} to spare")
    else:
        console.print(f"[red]does not fit[/red] {result.budget_label}: short by {format_bytes(total - result.budget_bytes)}")


def render_models(entries: list[CatalogEntry], console: Console) -> None:
    table = Table(title="built-in catalog (works offline)")
    for column in ("hub id", "aliases", "parameters", "layers", "hidden", "vocab"):
        table.add_column(column, justify="right" if column in ("parameters", "layers", "hidden", "vocab") else "left")
    for entry in entries:
        table.add_row(entry.hub_id, ", ".join(entry.aliases), f"{entry.num_parameters / 1e9:.3f}B", str(entry.num_layers),
                      str(entry.hidden_size), str(entry.vocab_size))
    console.print(table)


def render_models_json(entries: list[CatalogEntry]) -> str:
    return json.dumps(
        [{"hub_id": e.hub_id, "aliases": list(e.aliases), "num_parameters": e.num_parameters, "num_layers": e.num_layers,
          "hidden_size": e.hidden_size, "vocab_size": e.vocab_size} for e in entries],
        indent=2,
    )


# ---- words shared by the terminal report and the HTML page ---------------------------------------


def count_words(count: int) -> str:
    """494032768 -> '494M', 1235814400 -> '1.24B'."""
    return f"{count / 1e9:.3g}B" if count >= 1e9 else f"{count / 1e6:.0f}M"


def budget_flag(num_bytes: int) -> str:
    """A --budget value that parses back to exactly `num_bytes`."""
    for unit, size in (("GiB", GIB), ("MiB", MIB)):
        if num_bytes % size == 0:
            return f"{num_bytes // size}{unit}"
    return f"{num_bytes}B"


def relative(value: float, reference: float) -> str:
    """value against reference: '+12%', '-30%', '+0%'; '4.8x' from twice as much on."""
    if not reference:
        return "n/a"
    return f"{value / reference:.1f}x" if value >= 2 * reference else f"{(value - reference) / reference:+.0%}"


def breakdown_items(breakdown: dict[str, int]) -> list[tuple[str, int]]:
    """Non-zero categories in the fixed order of CATEGORY_NOTES, unknown categories after them."""
    known = [(name, breakdown[name]) for name in CATEGORY_NOTES if breakdown.get(name)]
    return known + [(name, size) for name, size in breakdown.items() if name not in CATEGORY_NOTES and size]


def category_colour(category: str) -> str:
    return CATEGORY_COLOURS.get(category, OTHER_COLOUR)


def trained_share(config: TrainConfig, model_config: Any, num_parameters: int) -> float | None:
    """Fraction of the model's parameters the optimizer updates (throughput's count), None if unknown."""
    from memtune import throughput

    try:
        shape = throughput.ModelShape.of(model_config, num_parameters)
    except (AttributeError, TypeError, ValueError):
        return None
    return throughput.trained_parameters(shape, config) / num_parameters if num_parameters else None


def quality_note(config: TrainConfig, model_config: Any = None, num_parameters: int = 0, *, short: bool = False) -> str:
    """What the configuration costs in training quality, in a few words: "LoRA r=16: trains ~1.1% of
    weights", "fp32: full precision". `short` leaves out the name (beside a configuration that has it)."""
    if config.adapter is None:
        note = PRECISION_NOTES.get(config.precision, config.precision)
        return note.split(": ", 1)[-1] if short else note
    share = trained_share(config, model_config, num_parameters)
    name = f"LoRA r={config.adapter.rank}" if config.adapter.kind == "lora" else config.adapter.describe()
    note = f"trains ~{100 * share:.2g}% of weights" if share else "trains the adapter only"
    if config.weights_dtype != "fp32":
        note += f", frozen base in {config.weights_dtype}"
    return note if short else f"{name}: {note}"


def changes_to_make(config: TrainConfig) -> list[str]:
    """The settings that turn a default fine-tuning script into `config`, one per technique."""
    changes = [f"micro-batch {config.micro_batch_size} per device, {config.grad_accum_steps} gradient accumulation "
               f"step{'s' if config.grad_accum_steps > 1 else ''} (effective batch {config.effective_batch_size} kept)"]
    precision = {
        "fp32": "precision fp32: no mixed-precision flags",
        "bf16-mixed": "precision bf16-mixed: fp32 weights, bf16 autocast (TrainingArguments bf16=True)",
        "fp16-mixed": "precision fp16-mixed: fp32 weights, fp16 autocast and loss scaling (TrainingArguments fp16=True)",
        "bf16": "precision bf16: load the weights in bf16 (dtype=torch.bfloat16), no autocast",
        "fp16": "precision fp16: load the weights in fp16 (dtype=torch.float16), no autocast",
    }
    changes.append(precision.get(config.precision, f"precision {config.precision}"))
    if config.gradient_checkpointing:
        changes.append("gradient checkpointing on, non-reentrant (gradient_checkpointing=True, use_reentrant=False)")
    else:
        changes.append("gradient checkpointing off")
    adapter = config.adapter
    if adapter is not None and adapter.kind == "lora":
        changes.append(f"LoRA (peft): r={adapter.rank}, lora_alpha={adapter.alpha}, dropout {adapter.dropout}, "
                       f"target_modules={_python(adapter.target_modules)}")
    elif adapter is not None:
        changes.append(f"{adapter.describe()} (peft)")
    if config.loss == "chunked":
        changes.append("chunked loss: the LM head and cross-entropy in chunks of tokens (memtune run applies it)")
    if config.offload != "none":
        changes.append(f"offload {config.offload} to CPU (FSDP CPU offload through accelerate; memtune run sets it up)")
    if config.replicated:
        changes.append(f"{config.num_gpus} GPUs, a full replica on each (DDP through accelerate launch, "
                       "ddp_find_unused_parameters=False; memtune run sets it up)")
    elif config.num_gpus > 1:
        changes.append(f"{config.num_gpus} GPUs, sharded with FSDP through accelerate")
    return changes


def _python(value: Any) -> str:
    """A Python literal for a snippet: strings in double quotes, tuples of module names as lists."""
    return json.dumps(list(value) if isinstance(value, tuple) else value)


def python_snippet(config: TrainConfig) -> str:
    """transformers/peft code that sets what `config` chose (memtune run does all of it from the plan)."""
    adapter = config.adapter
    imports, body = ["from transformers import TrainingArguments"], []
    if config.weights_dtype != "fp32":
        dtype = {"bf16": "torch.bfloat16", "fp16": "torch.float16"}[config.weights_dtype]
        imports = ["import torch", "from transformers import AutoModelForCausalLM, TrainingArguments"]
        body.append(f"model = AutoModelForCausalLM.from_pretrained(MODEL, dtype={dtype})")
    if adapter is not None and adapter.kind == "lora":
        imports.append("from peft import LoraConfig, get_peft_model")
        body += ["model = get_peft_model(model, LoraConfig(",
                 f"    r={adapter.rank}, lora_alpha={adapter.alpha}, lora_dropout={adapter.dropout},",
                 f"    target_modules={_python(adapter.target_modules)}, task_type=\"CAUSAL_LM\",",
                 "))"]
    elif adapter is not None:
        imports.append("from peft import PrefixTuningConfig, get_peft_model")
        body.append(f"model = get_peft_model(model, PrefixTuningConfig(num_virtual_tokens={adapter.num_virtual_tokens}, "
                    "task_type=\"CAUSAL_LM\"))")
    body += [
        "args = TrainingArguments(",
        "    output_dir=\"out\",",
        f"    per_device_train_batch_size={config.micro_batch_size},",
        f"    gradient_accumulation_steps={config.grad_accum_steps},",
        f"    bf16={config.amp == 'bf16'},",
    ]
    if config.amp == "fp16":
        body.append("    fp16=True,")
    if config.gradient_checkpointing:  # non-reentrant, as memtune predicts and measures it
        body += ["    gradient_checkpointing=True,  # activation_checkpointing=True from transformers 5.24",
                 "    gradient_checkpointing_kwargs={\"use_reentrant\": False},"]
    else:
        body.append("    gradient_checkpointing=False,")
    if config.replicated:
        body.append("    ddp_find_unused_parameters=False,")
    body.append(")")
    missing = [name for name, on in (("the chunked loss", config.loss == "chunked"),
                                     (f"offload of {config.offload}", config.offload != "none"),
                                     ("FSDP over several GPUs", config.num_gpus > 1 and not config.replicated),
                                     (f"DDP over {config.num_gpus} GPUs (accelerate launch)", config.replicated)) if on]
    if missing:
        body.append(f"# no TrainingArguments flag for {' and '.join(missing)}: `memtune run PLAN` applies it")
    return "\n".join(imports + [""] + body)


def fit_commands(result: FitResult) -> list[str]:
    """The command lines that make this result again (with the options that pinned or forbade a
    choice) and run its plan."""
    command = f"memtune fit {shlex.quote(result.source.name)} --seq-len {result.seq_len} --batch-size {result.effective_batch_size}"
    if result.policy is not None:
        command += "".join(f" {flag}" for flag in policy_flags(result.policy))
    budget = result.budget_bytes
    if budget is not None and (result.gpu is None or budget != result.gpu.budget_bytes):
        card = next((name for name, size in KNOWN_GPUS.items() if size == budget and result.budget_label.startswith(name)), None)
        command += f" --gpu {card}" if card else f" --budget {budget_flag(budget)}"
    if result.plan_path is not None and str(result.plan_path) != DEFAULT_PLAN_PATH:
        command += f" --plan-out {shlex.quote(str(result.plan_path))}"
    commands = [command]
    if result.plan_path is not None:
        commands.append(f"memtune run {shlex.quote(str(result.plan_path))}")
    return commands


def gpu_lines(result: FitResult) -> list[str]:
    """The device the result was planned for, what other processes use of it, and the budget."""
    gpu = result.gpu
    if gpu is None:
        reason = result.probe.reason if result.probe is not None and result.probe.reason else "none is visible"
        if result.budget_bytes is None:
            return [f"no GPU: {reason}", "planned for common cards (predictions only)"]
        return [f"no GPU: {reason}", f"planned for {result.budget_label or 'budget ' + format_bytes(result.budget_bytes)}"]
    others = f"{format_bytes(gpu.used_by_others_bytes)} used by {gpu.other_processes} other process" \
             f"{'es' if gpu.other_processes != 1 else ''}"
    lines = [f"GPU {gpu.index}: {gpu.name}, {format_bytes(gpu.total_bytes)} total, {format_bytes(gpu.free_bytes)} free, {others}"]
    budget = result.budget_bytes
    if budget is None or budget == gpu.budget_bytes:
        lines.append(f"planned for what this process may use: {format_bytes(gpu.budget_bytes)}")
    else:
        emulated = ", emulated on this GPU" if budget < gpu.budget_bytes else ""
        lines.append(f"planned for {result.budget_label or 'budget ' + format_bytes(budget)}{emulated} "
                     f"(this process may use {format_bytes(gpu.budget_bytes)})")
    return lines


def model_line(result: FitResult) -> str:
    source = result.source
    parts = [source.origin]
    if source.hub_id and source.hub_id != source.name:
        parts.append(source.hub_id)
    parts.append(f"{count_words(result.num_parameters)} parameters")
    layers = getattr(source.config, "num_hidden_layers", None)
    if layers:
        parts.append(f"{layers} layers")
    vocab = getattr(source.config, "vocab_size", None)
    if vocab:
        parts.append(f"vocab {vocab:,}")
    return f"model: {source.name} ({', '.join(parts)})"


def task_line(result: FitResult) -> str:
    tokens = result.seq_len * result.effective_batch_size
    return (f"task: {result.seq_len} tokens per sequence, effective batch {result.effective_batch_size} "
            f"({tokens:,} tokens per optimizer step)")


def verification(result: FitResult) -> tuple[str, list[tuple[str, str, str, str]]]:
    """The chosen configuration's evidence: a heading, and rows (quantity, predicted, measured, error)
    where a trial measured it. Errors are (predicted - measured) / measured."""
    search = result.search
    chosen = search.chosen if search is not None else None
    if chosen is None:
        return "", []
    trials = f"{search.trials} trial{'s' if search.trials != 1 else ''}, {search.trial_ooms} out of memory"
    measured = chosen.measured_total_bytes
    if chosen.measurement is None or not chosen.measurement.fits or measured is None:
        if result.gpu is None:
            return "not verified (no GPU): predictions only; run `memtune fit` where the GPU is to verify", []
        why = chosen.note.removeprefix("not verified: ") or "trial steps were not run"
        return f"not verified: {why}" + (f" ({trials})" if search.trials else ""), []
    heading = f"verified by trial steps on {result.gpu.name if result.gpu is not None else 'the GPU'} ({trials})"
    if result.gpu is not None and result.budget_bytes is not None and result.budget_bytes < result.gpu.budget_bytes:
        heading += f", under a per-process memory fraction emulating {format_bytes(result.budget_bytes)}"
    config, measurement = chosen.config, chosen.measurement
    accumulated = measurement.tokens_per_step // (config.micro_batch_size * config.seq_len * config.num_gpus)
    if 0 < accumulated < config.grad_accum_steps:  # verify.measure shortens long accumulations: the peak repeats
        heading += f"; each trial step ran {accumulated} of the {config.grad_accum_steps} accumulated micro-batches"
    predicted = chosen.predicted_total_bytes or 0
    rows = [("peak memory", format_bytes(predicted), format_bytes(measured), f"{(predicted - measured) / measured:+.1%}")]
    speed = chosen.measurement.tokens_per_second
    if speed and search.throughput_error is not None:
        rows.append(("tokens/s", f"{chosen.predicted_tokens_per_second:,.0f}", f"{speed:,.0f}", f"{search.throughput_error:+.1%}"))
    return heading, rows


UNTRACED_REASONS = {
    SKIPPED: "each needs at least as much as one above (a larger micro-batch or one technique fewer)",
    EXTRAPOLATED: "extrapolated from a traced micro-batch of the same configuration, each is clearly over",
}


def untraced_counts(search: SearchResult) -> list[tuple[str, int, str]]:
    """(status, count, why) of the candidates the search judged without a prediction of their own
    (the slower ones it never reached excepted), in order of first appearance."""
    groups: dict[str, list[Candidate]] = {}
    for candidate in search.candidates:
        if candidate.estimate is None and candidate.status != NOT_EVALUATED:
            groups.setdefault(candidate.status, []).append(candidate)
    return [(status, len(members), UNTRACED_REASONS.get(status, members[0].note)) for status, members in groups.items()]


def alternative_verdict(alternative: Alternative, search: SearchResult) -> str:
    """What one rung changes: the memory it needs or saves, and its speed against the winner."""
    chosen = search.chosen
    delta = alternative.predicted_total_bytes - (chosen.predicted_total_bytes or 0)
    speed = (alternative.predicted_tokens_per_second / chosen.predicted_tokens_per_second - 1
             if chosen.predicted_tokens_per_second else 0.0)
    if speed >= 1:
        pace = f"{speed + 1:.1f}x as fast"
    else:
        pace = f"{abs(speed):.0%} {'faster' if speed > 0 else 'slower'}" if round(speed, 2) else "same speed"
    if not alternative.fits:
        more = f"needs {format_bytes(delta)} more" if delta > 0 else "over the usable budget"
        return f"does not fit: {more}" + (f" (it would be {pace})" if round(speed, 2) else "")
    if any(candidate.config == alternative.config and candidate.status == TRIAL_OOM for candidate in search.candidates):
        return f"predicted to fit, but ran out of memory in its trial ({pace})"
    memory = f"saves {format_bytes(-delta)}" if delta < 0 else f"needs {format_bytes(delta)} more" if delta > 0 else "same memory"
    verdict = f"fits ({memory}), {pace}"
    if alternative.config.adapter is not None and chosen.config.adapter is None:
        verdict += ", but trains the adapter only"
    return verdict


# ---- `memtune fit`: the terminal report ----------------------------------------------------------


def render_fit(result: FitResult, console: Console) -> None:
    """The recommendation report: device and model, candidates, the winner and why, how to reproduce."""
    for line in gpu_lines(result):
        console.print(line, highlight=False)
    console.print(model_line(result), highlight=False)
    if result.source.note:
        console.print(f"note: {result.source.note}", highlight=False)
    console.print(task_line(result), highlight=False)
    if result.card_plans:
        _render_card_plans(result, console)
        return
    search = result.search
    if search is None:
        console.print("no search was run")
        return
    console.print()
    console.print(_candidates_table(result, search, wide=console.width >= WIDE))
    for line in _candidate_footnotes(search):
        console.print(line, highlight=False)
    console.print()
    if search.chosen is None:
        _render_nothing_fits(search, console)
    else:
        _render_chosen(result, search, console)
    console.print(f"searched in {search.seconds:.1f} s: {search.estimates} memory predictions, {search.trials} trials",
                  style="dim", highlight=False)


def _candidates_table(result: FitResult, search: SearchResult, wide: bool) -> Table:
    """Evaluated candidates; the quality note has a column on a wide console, else a line under the configuration."""
    table = Table(title=f"candidates, fastest predicted first (usable {format_bytes(search.usable_bytes)} = budget "
                        f"{format_bytes(search.budget_bytes)} - margin {format_bytes(search.margin_bytes)})",
                  title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    table.add_column("configuration", ratio=3)
    table.add_column("predicted peak (of usable)", justify="right", width=17)
    table.add_column("status", width=None if wide else 13, no_wrap=wide)
    table.add_column("tokens/s", justify="right", width=8)
    if wide:
        table.add_column("quality", ratio=2)
    for candidate in search.evaluated:  # the rest is summarised below the table
        chosen = candidate is search.chosen
        peak = candidate.predicted_total_bytes
        configuration = Text(("> " if chosen else "") + candidate.config.describe())
        quality = quality_note(candidate.config, result.source.config, result.num_parameters, short=True)
        if not wide:
            configuration.append(f"\n  {quality}", style="dim")
        cells = [configuration, f"{format_bytes(peak)} ({peak / search.usable_bytes:.0%})", candidate.status,
                 f"{candidate.predicted_tokens_per_second:,.0f}"]
        table.add_row(*cells, *([quality] if wide else []), style="bold" if chosen else None)
    return table


def _candidate_footnotes(search: SearchResult) -> Iterator[str]:
    yield "(> marks the chosen configuration; tokens/s are predicted)"
    for status, count, why in untraced_counts(search):
        yield f"{count} more {status}, not traced: {why}"
    for candidate in search.candidates:
        if candidate.status == TRIAL_OOM and candidate.note:
            yield f"trial of {candidate.config.describe()}: {candidate.note}"
    not_evaluated = sum(1 for candidate in search.candidates if candidate.status == NOT_EVALUATED)
    if not_evaluated:
        yield (f"{not_evaluated} slower configuration{'s' if not_evaluated != 1 else ''} not evaluated: "
               "the search stops at the fastest that fits")


def _render_chosen(result: FitResult, search: SearchResult, console: Console) -> None:
    chosen = search.chosen
    peak = chosen.predicted_total_bytes or 0
    console.print(Text(f"chosen: {chosen.config.describe()}", style="bold green"))
    console.print(_indented(f"predicted peak {format_bytes(peak)} of {format_bytes(search.usable_bytes)} usable "
                            f"({format_bytes(search.usable_bytes - peak)} to spare), "
                            f"{chosen.predicted_tokens_per_second:,.0f} tokens/s predicted"))
    console.print(_indented(f"quality: {quality_note(chosen.config, result.source.config, result.num_parameters)}"))
    console.print("  what to set:")
    console.print(_bullets(changes_to_make(chosen.config)))
    if search.alternatives:
        console.print()
        console.print(_alternatives_table(search))
    if chosen.estimate is not None:
        console.print()
        console.print(breakdown_bars(chosen.estimate, search.budget_bytes, search.usable_bytes, notes=console.width >= 100))
    console.print()
    heading, rows = verification(result)
    console.print(heading, highlight=False)
    if rows:
        table = Table(box=None, padding=(0, 1), pad_edge=True)
        for column in ("", "predicted", "measured", "error"):
            table.add_column(column, justify="left" if not column else "right", no_wrap=True)
        for row in rows:
            table.add_row(*row)
        console.print(table)
    if result.plan_path is not None:
        console.print(f"plan saved to {result.plan_path}", highlight=False)
    console.print()
    console.print("to reproduce:")
    for command in fit_commands(result):
        console.print(f"  {command}", highlight=False, markup=False, soft_wrap=True)
    console.print("or in Python (MODEL and model are yours):")
    snippet = "\n".join("  " + line if line else "" for line in python_snippet(chosen.config).splitlines())
    console.print(Text(snippet), soft_wrap=True)


def _alternatives_table(search: SearchResult) -> Table:
    chosen = search.chosen
    table = Table(title="why this one: the chosen configuration with one thing changed", title_justify="left",
                  box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    table.add_column("change", ratio=2)
    table.add_column("predicted peak", justify="right", no_wrap=True)
    table.add_column("fits", no_wrap=True)
    table.add_column("tokens/s", justify="right", no_wrap=True)
    table.add_column("verdict", ratio=3)
    for alternative in search.alternatives:
        table.add_row(
            alternative.change,
            format_bytes(alternative.predicted_total_bytes),
            "yes" if alternative.fits else "no",
            relative(alternative.predicted_tokens_per_second, chosen.predicted_tokens_per_second),
            alternative_verdict(alternative, search),
        )
    return table


def _bar(fraction: float, width: int = BAR_WIDTH) -> str:
    """A bar of `fraction` x `width` characters, in eighths of a character."""
    eighths = max(0, round(min(fraction, 1.5) * width * 8))
    return "█" * (eighths // 8) + ("", "▏", "▎", "▍", "▌", "▋", "▊", "▉")[eighths % 8]


def breakdown_bars(estimate: Estimate, budget_bytes: int, usable_bytes: int, notes: bool = True) -> Table:
    """The estimate's categories as horizontal bars; a bar of BAR_WIDTH characters is the whole budget.
    `notes` adds what each category is (a column that wants a console of 100 characters)."""
    table = Table(title=f"where the memory goes (bar: share of the {format_bytes(budget_bytes)} budget)",
                  title_justify="left", show_header=False, box=None, padding=(0, 1))
    table.add_column("category", min_width=11, no_wrap=True)
    table.add_column("bytes", justify="right", min_width=10, no_wrap=True)
    table.add_column("share", justify="right", min_width=4, no_wrap=True)
    table.add_column("bar", min_width=BAR_WIDTH + 1, no_wrap=True)
    if notes:
        table.add_column("what it is")

    def row(name: str | Text, size: int, bar: str | Text, note: str) -> None:
        table.add_row(name, format_bytes(size), f"{size / budget_bytes:.0%}", bar, *([note] if notes else []))

    stacked = Text()  # the total as one bar in the same colours: whole characters, rounded cumulatively
    cumulative = drawn = 0
    for category, size in breakdown_items(estimate.breakdown):
        row(category, size, Text(_bar(size / budget_bytes), style=category_colour(category)), CATEGORY_NOTES.get(category, ""))
        cumulative += size
        end = round(min(cumulative / budget_bytes, 1.5) * BAR_WIDTH)
        stacked.append("█" * (end - drawn), style=category_colour(category))
        drawn = end
    row(Text("total", style="bold"), estimate.total_bytes, stacked, "predicted peak")
    row("usable", usable_bytes, _bar(usable_bytes / budget_bytes), "budget minus the safety margin")
    row("budget", budget_bytes, _bar(1.0), "")
    return table


def _indented(text: str, indent: int = 2) -> Padding:
    """A paragraph whose wrapped lines keep its indent."""
    return Padding(Text(text), (0, 0, 0, indent))


def _bullets(items: list[str], indent: int = 4) -> Padding:
    """A list with a hanging indent: wrapped lines stay under their item."""
    grid = Table.grid(padding=(0, 1))
    grid.add_column(no_wrap=True)
    grid.add_column()
    for item in items:
        grid.add_row("-", Text(item))
    return Padding(grid, (0, 0, 0, indent))


def _render_nothing_fits(search: SearchResult, console: Console) -> None:
    console.print(Text(f"nothing fits in {format_bytes(search.usable_bytes)} usable "
                       f"({format_bytes(search.budget_bytes)} budget - {format_bytes(search.margin_bytes)} margin)",
                       style="bold red"))
    if search.shortfall_bytes:
        smallest = min(search.evaluated, key=lambda candidate: candidate.predicted_total_bytes or 0)
        console.print(_indented(f"the smallest, {smallest.config.describe()}, needs "
                                f"{format_bytes(smallest.predicted_total_bytes or 0)}: short by "
                                f"{format_bytes(search.shortfall_bytes)}"))
    if search.suggestions:
        console.print("  what would fit:")
        console.print(_bullets(search.suggestions))


def _render_card_plans(result: FitResult, console: Console) -> None:
    table = Table(title="planned for common cards (predicted, not verified)", title_justify="left",
                  box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    wide = console.width >= 120  # narrower: the quality note goes under the configuration, as in the candidates table
    table.add_column("card", ratio=1)
    table.add_column("chosen configuration", ratio=3)
    table.add_column("predicted peak", justify="right", no_wrap=True)
    table.add_column("tokens/s", justify="right", no_wrap=True)
    if wide:
        table.add_column("quality", ratio=2)
    for card in result.card_plans:
        chosen = card.search.chosen
        if chosen is None:
            table.add_row(card.card, f"does not fit (short by {format_bytes(card.search.shortfall_bytes)})", "", "",
                          *([""] if wide else []), style="dim")
            continue
        peak = chosen.predicted_total_bytes or 0
        quality = quality_note(chosen.config, result.source.config, result.num_parameters, short=True)
        description = chosen.config.describe() if wide else f"{chosen.config.describe()}\n[dim]{quality}[/dim]"
        table.add_row(card.card, description, f"{format_bytes(peak)} ({peak / card.search.usable_bytes:.0%})",
                      f"{chosen.predicted_tokens_per_second:,.0f}", *([quality] if wide else []))
    console.print()
    console.print(table)
    margins = sorted({card.search.margin_bytes for card in result.card_plans})
    margin = format_bytes(margins[0]) if len(margins) == 1 else f"{format_bytes(margins[0])} to {format_bytes(margins[-1])}"
    console.print(f"(peak: % of the card's usable memory, its memory minus a safety margin of {margin}; "
                  "tokens/s: predicted)", highlight=False)
    command = f"memtune fit {shlex.quote(result.source.name)} --seq-len {result.seq_len} --batch-size {result.effective_batch_size}"
    console.print(f"the full report for one card: {command} --budget 24GiB", highlight=False, markup=False)


# ---- `memtune fit --json` ---------------------------------------------------------------------------


def _card_plan_dict(card: CardPlan) -> dict[str, Any]:
    return {"card": card.card, "budget_bytes": card.budget_bytes, "search": card.search.to_dict()}


def fit_to_dict(result: FitResult) -> dict[str, Any]:
    """The whole fit result as one JSON-ready document (bytes, seconds, tokens/s); see docs/json-schema.md."""
    config = result.source.config
    mode = "cards" if result.card_plans else ("gpu" if result.gpu is not None else "budget")
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "fit",
        "mode": mode,
        "model": {
            "name": result.source.name,
            "origin": result.source.origin,
            "hub_id": result.source.hub_id,
            "note": result.source.note,
            "num_parameters": result.num_parameters,
            "num_layers": getattr(config, "num_hidden_layers", None),
            "hidden_size": getattr(config, "hidden_size", None),
            "vocab_size": getattr(config, "vocab_size", None),
        },
        "seq_len": result.seq_len,
        "effective_batch_size": result.effective_batch_size,
        "gpu": None if result.gpu is None else result.gpu.to_dict(),
        "no_gpu_reason": result.probe.reason if result.probe is not None and result.gpu is None else "",
        "budget_bytes": result.budget_bytes,
        "budget": result.budget_label,
        "fits": result.fits,
        "search": None if result.search is None else result.search.to_dict(),
        "plan": None if result.plan is None else result.plan.to_dict(),
        "plan_path": None if result.plan_path is None else str(result.plan_path),
        "card_plans": [_card_plan_dict(card) for card in result.card_plans],
        "seconds": result.seconds,
    }


def render_fit_json(result: FitResult) -> str:
    return json.dumps(fit_to_dict(result), indent=2)


def write_html(result: FitResult, path: str | Path) -> Path:
    """The picture: see html_report.write_html."""
    from memtune import html_report

    return html_report.write_html(result, path)


# ---- `memtune probe` ------------------------------------------------------------------------------


def render_probe(result: ProbeResult, console: Console) -> None:
    """What each visible GPU has, and what memtune may plan against on it."""
    if not result.available:
        console.print(f"no GPU: {result.reason or 'none is visible'}", highlight=False)
        console.print("plan without one: memtune fit MODEL --budget 24GiB (or memtune plan MODEL --gpu RTX4090-24GB)",
                      highlight=False, markup=False)
        return
    for gpu in result.gpus:
        console.print(Text(f"GPU {gpu.index}: {gpu.name}", style="bold"),
                      f"(capability {gpu.capability}, bf16 {'yes' if gpu.bf16_supported else 'no'}"
                      + (f", driver {gpu.driver_version})" if gpu.driver_version else ")"), highlight=False)
        table = Table(show_header=False, box=None, padding=(0, 1), pad_edge=True)
        table.add_column("what", no_wrap=True)
        table.add_column("bytes", justify="right", no_wrap=True)
        table.add_column("meaning")
        others = f"{gpu.other_processes} other process{'es' if gpu.other_processes != 1 else ''}"
        table.add_row("total", format_bytes(gpu.total_bytes), "")
        table.add_row("free", format_bytes(gpu.free_bytes), "now, after every process's allocations")
        table.add_row("used by others", format_bytes(gpu.used_by_others_bytes), others)
        table.add_row("our context", format_bytes(gpu.context_bytes), "CUDA context and kernels, outside torch's pool")
        if gpu.memory_fraction is not None:
            table.add_row("memory fraction", f"{gpu.memory_fraction:.0%}", "torch.cuda.set_per_process_memory_fraction")
        table.add_row(Text("usable by us", style="bold"), Text(format_bytes(gpu.budget_bytes), style="bold"),
                      "total - used by others" + (", capped by the memory fraction" if gpu.memory_fraction is not None else ""))
        console.print(table)
    console.print(f"torch built with CUDA {result.torch_cuda or 'unknown'}", highlight=False)


def probe_to_dict(result: ProbeResult) -> dict[str, Any]:
    return {"schema_version": SCHEMA_VERSION, "kind": "probe", **result.to_dict()}


def render_probe_json(result: ProbeResult) -> str:
    return json.dumps(probe_to_dict(result), indent=2)


# ---- progress ----------------------------------------------------------------------------------------


class ProgressPrinter:
    """Progress of tracing and trial steps on `console` (stderr): a spinner on a terminal, plain
    lines elsewhere (or nothing with plain_lines=False), so logs never fill with animation.

        with report.progress_printer(err) as progress:
            result = fit_model(..., progress=progress)

    Also callable outside `with`: then each message is a plain line, terminal or not.
    """

    def __init__(self, console: Console, *, plain_lines: bool = True) -> None:
        self.console = console
        self.plain_lines = plain_lines
        self._status: Any = None

    def __enter__(self) -> ProgressPrinter:
        if self.console.is_terminal:
            self._status = self.console.status("starting...", spinner="dots")
            self._status.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None

    def __call__(self, message: str) -> None:
        if self._status is not None:
            self._status.update(Text(message))
        elif self.plain_lines:
            self.console.print(message, highlight=False, markup=False)


def progress_printer(console: Console, *, plain_lines: bool = True) -> ProgressPrinter:
    return ProgressPrinter(console, plain_lines=plain_lines)


__all__ = [
    "PlanResult", "ProgressPrinter", "SCHEMA_VERSION", "fit_to_dict", "progress_printer", "render_fit", "render_fit_json",
    "render_models", "render_models_json", "render_plan", "render_plan_json", "render_probe", "render_probe_json",
    "write_html",
]
