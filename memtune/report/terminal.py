"""Renders result objects for people (rich); JSON is in `report.json`, the picture in `report.html`.

Computes nothing: every number comes from the result objects (fit.FitResult, search.SearchResult,
predict.Estimate, measure.Measurement, measure.ProbeResult). What is shared by the terminal and the
HTML page - the wording of a configuration's changes, quality notes, the lines to reproduce - is a
plain-string function here, so both say the same thing.

JSON documents carry `schema_version` and `kind`; every key, type and unit is documented in
docs/json-schema.md, and tests/test_report.py checks real documents against that file.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import rich.markup
from rich import box
from rich.console import Console
from rich.padding import Padding
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from memtune.config import Policy, TrainConfig, format_bytes, policy_flags
from memtune.predict.peak import Estimate
from memtune.report.words import (
    CATEGORY_NOTES,
    allocator_words,
    alternative_verdict,
    attention_words,
    breakdown_items,
    category_colour,
    changes_to_make,
    checkpointing_words,
    data_lines,
    evaluation_line,
    fit_command,
    fit_commands,
    fits_word,
    fsdp_offload_words,
    gpu_lines,
    host_memory_words,
    host_refusal,
    measured_both_words,
    model_line,
    offload_words,
    python_snippet,
    quality_note,
    relative,
    searched_words,
    spare_words,
    status_word,
    task_line,
    untraced_counts,
    verification,
    zero_words,
)
from memtune.search.choose import FITS, NOT_EVALUATED, TOO_BIG, TRIAL_OOM
from memtune.sources import CatalogEntry

if TYPE_CHECKING:
    from memtune.fit import FitResult, PlanResult
    from memtune.measure.probe import ProbeResult
    from memtune.run.runner import RunSummary
    from memtune.search.choose import SearchResult

WIDE = 120
"""A console at least this wide gets the candidates' quality notes in a column of their own."""
BAR_WIDTH = 32
"""Characters of a terminal bar that stands for the whole budget."""


# ---- `memtune plan` and `memtune models` ---------------------------------------------------------


def render_plan(result: PlanResult, console: Console) -> None:
    estimate = result.estimate
    config = estimate.config
    console.print(
        f"[bold]{result.source.name}[/bold] ({result.source.origin}, {result.num_parameters / 1e9:.3g}B parameters, "
        f"{estimate.num_layers} layers)"
    )
    console.print(
        f"configuration: {config.describe()}, {config.seq_len} tokens, effective batch {config.effective_batch_size}"
    )
    if result.data is not None:
        for line in data_lines(result.data):
            console.print(line, highlight=False, markup=False)
    console.print(attention_words(config, result.source.config), highlight=False)
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
        f"peak allocated {format_bytes(estimate.peak_allocated_bytes)}, "
        f"peak reserved {format_bytes(estimate.peak_reserved_bytes)} "
        f"(traced {estimate.traced_layers} of {estimate.num_layers} layers on fake {estimate.trace_device} tensors, "
        f"{estimate.seconds:.1f} s)"
    )
    if evaluation_line(estimate):
        console.print(evaluation_line(estimate), highlight=False)
    if estimate.paged_bytes:
        console.print(f"paged optimizer state {format_bytes(estimate.paged_bytes)} in CUDA unified memory, not in the "
                      "peak: the driver moves it to the host when the GPU needs the room")
    host = host_memory_words(estimate)
    if host:
        console.print(host)
    if result.inter_node_gbps is not None and result.tokens_per_second:
        console.print(f"throughput {result.tokens_per_second:,.0f} tokens/s predicted over {config.gpus_words}, "
                      f"assuming {result.inter_node_gbps:g} Gb/s of network per machine (an assumption, not measured: "
                      "--inter-node-gbps)", highlight=False)
    verdict = result.verdict
    if verdict is None:
        console.print("no budget given: pass --budget 24GiB or --gpu NAME to check a card")
        return
    margin = format_bytes(verdict.margin_bytes)
    usable = f"{format_bytes(verdict.usable_bytes)} usable = {result.budget_label} - margin {margin}"
    if verdict.fits and verdict.spare_bytes >= 0:
        console.print(f"[green]fits[/green] {usable}: {format_bytes(verdict.spare_bytes)} to spare", highlight=False)
    elif verdict.fits:
        console.print(
            f"[green]fits[/green] {usable}: the peak is {format_bytes(-verdict.spare_bytes)} over it, but the "
            "allocator releases its cache under pressure and the replay never runs out",
            highlight=False,
        )
    else:
        console.print(
            f"[red]does not fit[/red] {usable}: short by {format_bytes(verdict.shortfall_bytes)}", highlight=False
        )
    explanation = result.explanation
    if explanation is not None and explanation.alternatives:
        console.print()
        console.print(_alternatives_table(explanation, "what if: this configuration with one thing changed",
                                          "this one"))
        console.print(f"explained in {explanation.explain_seconds:.1f} s: {len(explanation.alternatives)} "
                      "alternatives predicted", style="dim", highlight=False)


def render_models(entries: list[CatalogEntry], console: Console) -> None:
    """The catalog as a table that fits 80 columns: the hub id (what a user copies) is never cut or wrapped;
    the aliases, which `memtune fit` takes as well, go on the line below it."""
    table = Table(title="built-in catalog (works offline)")
    widest = max((len(entry.hub_id) for entry in entries), default=6)
    table.add_column("hub id (aliases below)", min_width=widest, max_width=widest)
    for column in ("parameters", "layers", "hidden", "vocab"):
        table.add_column(column, justify="right", no_wrap=True)
    for entry in entries:
        aliases = ", ".join(entry.aliases)
        table.add_row(
            entry.hub_id + (f"\n  [dim]{rich.markup.escape(aliases)}[/dim]" if aliases else ""),
            f"{entry.num_parameters / 1e9:.3f}B",
            str(entry.num_layers),
            str(entry.hidden_size),
            str(entry.vocab_size),
        )
    console.print(table)


# ---- words shared by the terminal report and the HTML page ---------------------------------------


# ---- `memtune fit`: the terminal report ----------------------------------------------------------


def render_fit(result: FitResult, console: Console) -> None:
    """The recommendation report: device and model, candidates, the winner and why, how to reproduce."""
    for line in gpu_lines(result):
        console.print(line, highlight=False)
    console.print(model_line(result), highlight=False)
    if result.source.note:
        console.print(f"note: {result.source.note}", highlight=False)
    console.print(task_line(result), highlight=False)
    if result.data is not None:
        for line in data_lines(result.data):
            console.print(line, highlight=False, markup=False)
    if result.card_plans:
        _render_card_plans(result, console)
        return
    search = result.search
    if search is None:
        console.print("no search was run")
        return
    console.print()
    if search.evaluated:  # nothing traced (every state alone over the budget): no table, the footnotes say why
        console.print(_candidates_table(result, search, wide=console.width >= WIDE))
    for line in _candidate_footnotes(search):
        console.print(Text(line))  # plain text: a note's brackets (pip install -e ".[deepspeed]") are no markup
    console.print()
    if search.chosen is None:
        _render_nothing_fits(search, console)
    else:
        _render_chosen(result, search, console)
    console.print(searched_words(search), style="dim", highlight=False)


def _candidates_table(result: FitResult, search: SearchResult, wide: bool) -> Table:
    """Evaluated candidates; the quality note has a column on a wide console, else a line under the configuration."""
    table = Table(title=f"candidates in the order tried, by tier, fastest first within one (usable "
                        f"{format_bytes(search.usable_bytes)} = budget {format_bytes(search.budget_bytes)} - margin "
                        f"{format_bytes(search.margin_bytes)})",
                  title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    table.add_column("configuration", ratio=3)
    table.add_column("predicted peak (of usable)", justify="right", width=17)
    table.add_column("status", width=None if wide else 13, no_wrap=wide)
    table.add_column("tokens/s", justify="right", width=8)
    if wide:
        table.add_column("quality", ratio=2)
    for candidate in search.evaluated:  # the rest is summarised below the table
        chosen = candidate is search.chosen
        peak = candidate.predicted_total_bytes or 0  # evaluated: it has an estimate
        configuration = Text(("> " if chosen else "") + candidate.config.describe())
        quality = quality_note(candidate.config, result.source.config, result.num_parameters, short=True)
        if not wide:
            configuration.append(f"\n  {quality}", style="dim")
        share = f"{format_bytes(peak)} ({peak / search.usable_bytes:.0%})"
        speed = f"{candidate.predicted_tokens_per_second:,.0f}"
        status = status_word(candidate, search)
        if status == FITS and peak > search.usable_bytes:  # as "why this one" says it (`fits_word`)
            status = "fits on release"
        cells: list[Text | str] = [configuration, share, status, speed]
        table.add_row(*cells, *([quality] if wide else []), style="bold" if chosen else None)
    return table


def _candidate_footnotes(search: SearchResult) -> Iterator[str]:
    if search.evaluated:
        yield "(> marks the chosen configuration; tokens/s are predicted)"
    for status, count, why in untraced_counts(search):
        yield f"{count} more {status}, not traced: {why}"
    for candidate in search.candidates:
        if candidate.status == TRIAL_OOM and candidate.note:
            yield f"trial of {candidate.config.describe()}: {candidate.note}"
        if candidate.status == TOO_BIG and host_refusal(candidate):
            yield f"{candidate.config.describe()}: fits the GPU, but {candidate.note}"
    if search.measured_both:
        yield measured_both_words(search)
    yield from search.notes  # rungs skipped for a missing package, alternatives not predicted
    not_evaluated = sum(1 for candidate in search.candidates if candidate.status == NOT_EVALUATED)
    if not_evaluated:
        yield (f"{not_evaluated} slower configuration{'s' if not_evaluated != 1 else ''} not evaluated: "
               "the search stops at the fastest that fits")


def _render_chosen(result: FitResult, search: SearchResult, console: Console) -> None:
    chosen = search.chosen
    assert chosen is not None, "rendered only when the search chose a configuration"
    peak = chosen.predicted_total_bytes or 0
    console.print(Text(f"chosen: {chosen.config.describe()}", style="bold green"))
    console.print(_indented(f"predicted peak {format_bytes(peak)} of {format_bytes(search.usable_bytes)} usable "
                            f"({spare_words(search.usable_bytes, peak)}), "
                            f"{chosen.predicted_tokens_per_second:,.0f} tokens/s predicted"))
    console.print(_indented(f"quality: {quality_note(chosen.config, result.source.config, result.num_parameters)}"))
    pinned = result.policy.gradient_checkpointing if result.policy is not None else None
    checkpointing = checkpointing_words(chosen.config, result.source.config, pinned)
    evaluation = None if chosen.estimate is None else evaluation_line(chosen.estimate)
    for why in (checkpointing, allocator_words(search), offload_words(search), zero_words(search),
                fsdp_offload_words(search), evaluation):
        if why:
            console.print(_indented(why))
    console.print("  what to set:")
    console.print(_bullets(changes_to_make(chosen.config)))
    if search.alternatives:
        console.print()
        console.print(_alternatives_table(search))
    if chosen.estimate is not None:
        console.print()
        console.print(
            breakdown_bars(chosen.estimate, search.budget_bytes, search.usable_bytes, notes=console.width >= 100)
        )
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
    planned = result.plan.train_config if result.plan is not None else chosen.config  # with evaluation, if planned
    snippet = "\n".join("  " + line if line else "" for line in python_snippet(planned).splitlines())
    console.print(Text(snippet), soft_wrap=True)


def _alternatives_table(search: SearchResult, title: str = "why this one: the chosen configuration with one thing "
                        "changed", reference: str = "the chosen") -> Table:
    chosen = search.chosen
    assert chosen is not None, "alternatives exist only beside a chosen configuration"
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    table.add_column("change", ratio=2)
    table.add_column("predicted peak", justify="right", no_wrap=True)
    table.add_column("fits", no_wrap=True)
    table.add_column("tokens/s", justify="right", no_wrap=True)
    table.add_column("verdict", ratio=3)
    for alternative in search.alternatives:
        table.add_row(
            alternative.change,
            format_bytes(alternative.predicted_total_bytes),
            fits_word(alternative, search),
            relative(alternative.predicted_tokens_per_second, chosen.predicted_tokens_per_second),
            alternative_verdict(alternative, search, reference),
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
        row(
            category,
            size,
            Text(_bar(size / budget_bytes), style=category_colour(category)),
            CATEGORY_NOTES.get(category, ""),
        )
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
    found = search.smallest_need()
    if search.shortfall_bytes and found is not None:
        smallest, need, floor = found
        needs = (f"its weights, gradients and optimizer state alone need {format_bytes(need)}" if floor
                 else f"needs {format_bytes(need)}")
        console.print(_indented(f"the smallest, {smallest.config.describe()}, {needs}: short by at least "
                                f"{format_bytes(search.shortfall_bytes)}" if floor else
                                f"the smallest, {smallest.config.describe()}, {needs}: short by "
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
        if card.search is None:
            table.add_row(card.card, card.skipped, "", "", *([""] if wide else []), style="dim")
            continue
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
    margins = sorted({card.search.margin_bytes for card in result.card_plans if card.search is not None})
    margin = (
        format_bytes(margins[0]) if len(margins) == 1 else f"{format_bytes(margins[0])} to {format_bytes(margins[-1])}"
    )
    console.print(f"(peak: % of the card's usable memory, its memory minus a safety margin of {margin}; "
                  "tokens/s: predicted)", highlight=False)
    command = fit_command(result) + "".join(f" {flag}" for flag in policy_flags(result.policy or Policy()))
    console.print(f"the full report for one card: {command} --budget 24GiB", highlight=False, markup=False)


# ---- `memtune fit --json` ---------------------------------------------------------------------------


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
        table.add_row(
            Text("usable by us", style="bold"),
            Text(format_bytes(gpu.budget_bytes), style="bold"),
            "total - used by others" + (", capped by the memory fraction" if gpu.memory_fraction is not None else ""),
        )
        console.print(table)
    console.print(f"torch built with CUDA {result.torch_cuda or 'unknown'}", highlight=False)


# ---- `memtune run` -------------------------------------------------------------------------------------


def render_run_summary(summary: RunSummary, console: Console) -> None:
    """The run summary as a table (stdout): steps, loss, speed, peak memory against the plan's prediction,
    the configuration at the end (after any OOM guard step-down) and where the output went."""
    table = Table(title=f"memtune run: {summary.status}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    first = summary.loss_curve[0][1] if summary.loss_curve else None
    last = summary.loss_curve[-1][1] if summary.loss_curve else None
    table.add_row("steps", f"{summary.global_step} / {summary.max_steps}"
                  + (f" (resumed at {summary.resumed_from_step + 1})" if summary.resumed_from_step is not None else ""))
    if first is not None:
        table.add_row("loss", f"{first:.4f} -> {last:.4f}")
    # measured over the steps after the first (compilation, allocator warm-up): a 1-step run has none
    table.add_row("tokens/s", f"{summary.tokens_per_second:,.0f}" if summary.tokens_per_second
                  else "not measured (the first step is not timed: run 2 or more)")
    if summary.peak_reserved_bytes is not None:
        predicted = (f" (plan predicted {format_bytes(summary.predicted_total_bytes)} in all)"
                     if summary.predicted_total_bytes else "")
        table.add_row("peak reserved", format_bytes(summary.peak_reserved_bytes) + predicted)
    final = TrainConfig.from_dict(summary.final_train_config)
    table.add_row("configuration", final.describe())
    for event in summary.guard_events:
        if event["kind"] == "oom":
            table.add_row("oom guard", f"step {event['step'] + 1} ({event['phase']}): "
                          + ("stepped down" if event["to_config"] else "gave up"))
    table.add_row("wall time", f"{summary.wall_seconds:,.1f} s")
    table.add_row("model", summary.model_origin.split(":")[0])
    table.add_row("output", summary.output_dir)
    if summary.checkpoint:
        table.add_row("checkpoint", summary.checkpoint)
    console.print(table)


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


@contextlib.contextmanager
def tokenizing_progress(console: Console) -> Iterator[Callable[[int, int], None] | None]:
    """A progress bar of the documents tokenised (`run.data_plan.token_lengths`' `progress(done, total)`) on a
    terminal, gone when done; None off a terminal, so logs get no animation.

        with report.tokenizing_progress(err) as progress:
            data = plan_data(source, path, seq_len, progress=progress)
    """
    if not console.is_terminal:
        yield None
        return
    columns = (TextColumn("tokenising the data"), BarColumn(), MofNCompleteColumn(), TextColumn("documents"),
               TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("tokenising", total=None)

        def advance(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield advance
