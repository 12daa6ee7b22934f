"""The picture: a self-contained HTML page (inline SVG and CSS, no script, no network) of a fit.

One stacked horizontal bar per evaluated candidate, split by memory category in the colours of the
terminal report, against the budget line and the safety margin; the chosen configuration is marked.
With no GPU and no budget (card plans) there is one bar per card, each against its own budget.
Below the figure, the same facts as the terminal report, as text. Computes nothing: the numbers
and the wording come from the result objects and from `report.words`.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from memtune.config import GIB, format_bytes
from memtune.report import words
from memtune.search.choose import NOT_EVALUATED, TOO_BIG

if TYPE_CHECKING:
    from memtune.fit import FitResult
    from memtune.predict.estimate import Estimate
    from memtune.search.choose import Candidate, SearchResult

SVG_NAMESPACE = "http://www.w3.org/2000/svg"
WIDTH = 960
SIDE = 16
ROW_HEIGHT = 40
BAR_HEIGHT = 16
LEGEND_HEIGHT = 30
LINE_LABELS_HEIGHT = 20
CHARACTER_WIDTH = 6.8
"""Rough width of a 12px sans-serif character, to lay out the legend."""
BUDGET_COLOUR = "#C00000"
CLIP = 2.5
"""Bars longer than CLIP x the budget are cut at the axis end (their label still says the total)."""
HALO = 'paint-order="stroke" stroke="#ffffff" stroke-width="3" stroke-linejoin="round"'
"""Text attributes that keep labels readable where a budget line crosses them."""


@dataclass
class Bar:
    """One bar of the figure: a candidate's predicted memory by category, against its budget."""

    label: str
    status: str
    breakdown: list[tuple[str, int]]
    total_bytes: int
    budget_bytes: int
    usable_bytes: int
    chosen: bool = False
    measured_total_bytes: int | None = None


def _estimate(candidate: Candidate) -> Estimate:
    """The estimate of an evaluated candidate (`SearchResult.evaluated` holds those that have one)."""
    if candidate.estimate is None:
        raise ValueError(f"candidate {candidate.config.describe()} was not evaluated: it has no estimate to draw")
    return candidate.estimate


def _bar(candidate: Candidate, label: str, status: str, budget_bytes: int, usable_bytes: int, chosen: bool) -> Bar:
    estimate = _estimate(candidate)
    return Bar(label, status, words.breakdown_items(estimate.breakdown), estimate.total_bytes, budget_bytes,
               usable_bytes, chosen, candidate.measured_total_bytes)


def bars_of(result: FitResult) -> list[Bar]:
    """Every evaluated candidate in search order or, for card plans, each card's choice (or its smallest candidate)."""
    bars = []
    if result.card_plans:
        for card in result.card_plans:
            card_search = card.search
            if card_search is None:
                continue
            chosen = card_search.chosen
            name = card.card.split(" (")[0]  # "24 GiB (RTX 4090, A10, L4)" -> "24 GiB": the table below has the rest
            if chosen is not None and chosen.estimate is not None:
                bars.append(_bar(chosen, f"{name}: {chosen.config.describe()}", "fits", card.budget_bytes,
                                 card_search.usable_bytes, True))
            elif card_search.evaluated:
                smallest = min(card_search.evaluated, key=lambda candidate: candidate.predicted_total_bytes or 0)
                bars.append(_bar(smallest, f"{name}: smallest, {smallest.config.describe()}",
                                 f"does not fit (short by {format_bytes(card_search.shortfall_bytes)})",
                                 card.budget_bytes, card_search.usable_bytes, False))
        return bars
    search = result.search
    if search is None:
        return bars
    for candidate in search.evaluated:
        bars.append(_bar(candidate, candidate.config.describe(), words.status_word(candidate, search),
                         search.budget_bytes, search.usable_bytes, candidate is search.chosen))
    return bars


# ---- the figure ----------------------------------------------------------------------------------


def _tick_step_gib(max_gib: float) -> float:
    """A round step giving at most ~10 ticks: 0.25, 0.5, 1, 2, 5, 10, 20, 50, ... GiB."""
    for step in (0.25, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000):
        if max_gib / step <= 10:
            return step
    return 10 ** math.ceil(math.log10(max_gib / 10))


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def chart_svg(bars: list[Bar]) -> str:
    """The stacked bars, budget and usable lines, margin band, legend and a GiB axis, as one <svg>."""
    shared_budget = len({(bar.budget_bytes, bar.usable_bytes) for bar in bars}) == 1
    # Bars far over budget would squeeze the region that matters: past CLIP x the largest budget they are cut.
    clip = CLIP * max(bar.budget_bytes for bar in bars)
    largest = min(clip, max([bar.budget_bytes for bar in bars] + [bar.total_bytes for bar in bars]
                            + [bar.measured_total_bytes or 0 for bar in bars] + [GIB]))
    step = _tick_step_gib(largest * 1.05 / GIB)
    axis_max = math.ceil(largest * 1.05 / GIB / step) * step * GIB
    plot_width = WIDTH - 2 * SIDE
    top = LEGEND_HEIGHT + LINE_LABELS_HEIGHT
    axis_y = top + len(bars) * ROW_HEIGHT + 6
    height = axis_y + 46

    def x(num_bytes: float) -> float:
        return round(SIDE + plot_width * min(num_bytes, axis_max) / axis_max, 2)

    parts = [f'<svg xmlns="{SVG_NAMESPACE}" class="memory-chart" width="{WIDTH}" height="{height}" '
             f'viewBox="0 0 {WIDTH} {height}" role="img" font-family="system-ui, sans-serif" font-size="12">',
             "<title>Predicted peak memory of each candidate, by category, against the budget</title>"]

    # legend: every category that appears, in the fixed order
    present = {category for bar in bars for category, _ in bar.breakdown}
    legend_x: float = SIDE
    parts.append('<g class="legend">')
    known = [name for name in words.CATEGORY_NOTES if name in present]
    for category in known + sorted(present - set(words.CATEGORY_NOTES)):
        note = words.CATEGORY_NOTES.get(category, category)
        parts.append(f'<rect class="swatch category-{_e(category)}" x="{legend_x}" y="8" width="12" height="12" '
                     f'fill="{words.category_colour(category)}"><title>{_e(note)}'
                     f'</title></rect><text x="{legend_x + 16}" y="18">{_e(category)}</text>')
        legend_x += 16 + CHARACTER_WIDTH * len(category) + 14
    parts.append("</g>")

    budget, usable = bars[0].budget_bytes, bars[0].usable_bytes
    if shared_budget:  # the margin band behind the bars; the lines go over them, below
        parts.append(f'<rect class="margin" x="{x(usable)}" y="{top - 4}" width="{round(x(budget) - x(usable), 2)}" '
                     f'height="{axis_y - top + 4}" fill="{BUDGET_COLOUR}" fill-opacity="0.08">'
                     f'<title>safety margin {_e(format_bytes(budget - usable))}</title></rect>')

    labels = []
    for index, bar in enumerate(bars):
        y = top + index * ROW_HEIGHT
        bar_y = y + 17
        classes = "bar chosen" if bar.chosen else "bar"
        parts.append(f'<g class="{classes}" data-index="{index}" data-total-bytes="{bar.total_bytes}">')
        start = 0
        for category, size in bar.breakdown:
            parts.append(f'<rect class="segment category-{_e(category)}" x="{x(start)}" y="{bar_y}" '
                         f'width="{max(0.0, round(x(start + size) - x(start), 2))}" height="{BAR_HEIGHT}" '
                         f'fill="{words.category_colour(category)}"><title>{_e(category)}: {_e(format_bytes(size))}'
                         f'</title></rect>')
            start += size
        if start > axis_max:
            parts.append(f'<text class="clipped" x="{x(axis_max) - 2}" y="{bar_y + BAR_HEIGHT - 4}" text-anchor="end" '
                         f'fill="#ffffff" font-weight="bold">\u00bb</text>')
        if bar.chosen:
            mark_width = round(x(bar.total_bytes) - x(0) + 4, 2)
            parts.append(f'<rect class="chosen-mark" x="{x(0) - 2}" y="{bar_y - 2}" width="{mark_width}" '
                         f'height="{BAR_HEIGHT + 4}" fill="none" stroke="#000000" stroke-width="2"/>')
        if bar.measured_total_bytes is not None:  # a triangle under the bar, pointing up at the measured peak
            measured_x = x(bar.measured_total_bytes)
            parts.append(f'<path class="measured" d="M {measured_x} {bar_y + BAR_HEIGHT + 1} l 5 6 h -10 z" '
                         f'fill="#000000"><title>measured {_e(format_bytes(bar.measured_total_bytes))}</title></path>')
        if not shared_budget:  # each card against its own memory: a margin band and a tick on its row
            usable_x, budget_x = x(bar.usable_bytes), x(bar.budget_bytes)
            parts.append(f'<rect class="margin" x="{usable_x}" y="{bar_y - 3}" width="{round(budget_x - usable_x, 2)}" '
                         f'height="{BAR_HEIGHT + 6}" fill="{BUDGET_COLOUR}" fill-opacity="0.12"/>')
            parts.append(f'<line class="budget-line" x1="{budget_x}" y1="{bar_y - 3}" x2="{budget_x}" '
                         f'y2="{bar_y + BAR_HEIGHT + 3}" stroke="{BUDGET_COLOUR}" stroke-width="2">'
                         f'<title>budget {_e(format_bytes(bar.budget_bytes))}</title></line>')
        parts.append("</g>")
        mark = ("\u2605 chosen: " if shared_budget else "\u2605 ") if bar.chosen else ""
        weight = ' font-weight="bold"' if bar.chosen else ""
        labels.append(f'<text class="bar-label" data-index="{index}" x="{SIDE}" y="{y + 12}"{weight} {HALO}>'
                      f'{_e(mark + bar.label)} \u2014 {_e(format_bytes(bar.total_bytes))} predicted, '
                      f'{_e(bar.status)}</text>')

    if shared_budget:
        parts.append(f'<line class="usable-line" x1="{x(usable)}" y1="{top - 4}" x2="{x(usable)}" y2="{axis_y}" '
                     f'stroke="{BUDGET_COLOUR}" stroke-width="1" stroke-dasharray="4 3"/>')
        parts.append(f'<line class="budget-line" x1="{x(budget)}" y1="{top - 4}" x2="{x(budget)}" y2="{axis_y}" '
                     f'stroke="{BUDGET_COLOUR}" stroke-width="2"/>')
        labels.append(f'<text class="usable-label" x="{x(usable) - 4}" y="{top - 8}" text-anchor="end" '
                      f'fill="{BUDGET_COLOUR}" {HALO}>usable {_e(format_bytes(usable))}</text>')
        labels.append(f'<text class="budget-label" x="{x(budget) + 4}" y="{top - 8}" fill="{BUDGET_COLOUR}" {HALO}>'
                      f'budget {_e(format_bytes(budget))}</text>')
    parts += ['<g class="labels">', *labels, "</g>"]  # last, so lines never cover them

    # the axis, in GiB
    parts.append(f'<g class="axis"><line x1="{SIDE}" y1="{axis_y}" x2="{WIDTH - SIDE}" y2="{axis_y}" '
                 'stroke="#333333"/>')
    ticks = round(axis_max / GIB / step)
    for tick in range(ticks + 1):
        value = tick * step
        tick_x = x(value * GIB)
        anchor = "start" if tick == 0 else ("end" if tick == ticks else "middle")
        parts.append(f'<line x1="{tick_x}" y1="{axis_y}" x2="{tick_x}" y2="{axis_y + 4}" stroke="#333333"/>'
                     f'<text x="{tick_x}" y="{axis_y + 17}" text-anchor="{anchor}">{value:g}</text>')
    parts.append(f'<text class="axis-title" x="{WIDTH / 2}" y="{axis_y + 36}" text-anchor="middle">'
                 "predicted peak memory (GiB): reserved + workspaces + CUDA context</text></g>")
    parts.append("</svg>")
    return "\n".join(parts)


# ---- the page ----------------------------------------------------------------------------------------

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1000px; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.1em; margin-top: 1.6em; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border-bottom: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
td.number { text-align: right; white-space: nowrap; }
tr.chosen { font-weight: bold; background: #f3f7ee; }
.chosen-verdict { color: #1a6b1a; } .nothing-fits { color: #C00000; }
pre { background: #f5f5f5; padding: 0.8em; overflow-x: auto; }
figure { margin: 1em 0; } figcaption { font-size: 0.85em; color: #555; }
"""


def _table(header: list[str], rows: list[tuple[list[str], str]], numeric: frozenset[int] = frozenset()) -> str:
    """An HTML table; each row is (cells, css class)."""
    lines = ["<table>", "<tr>" + "".join(f"<th>{_e(cell)}</th>" for cell in header) + "</tr>"]
    for cells, css in rows:
        tds = "".join(f'<td class="number">{_e(cell)}</td>' if i in numeric else f"<td>{_e(cell)}</td>"
                      for i, cell in enumerate(cells))
        lines.append(f'<tr class="{css}">{tds}</tr>' if css else f"<tr>{tds}</tr>")
    lines.append("</table>")
    return "\n".join(lines)


def _candidates_section(result: FitResult, search: SearchResult) -> list[str]:
    rows = []
    for candidate in search.evaluated:
        peak = _estimate(candidate).total_bytes
        rows.append(([candidate.config.describe(), format_bytes(peak), f"{peak / search.usable_bytes:.0%}",
                      words.status_word(candidate, search), f"{candidate.predicted_tokens_per_second:,.0f}",
                      words.quality_note(candidate.config, result.source.config, result.num_parameters)],
                     "chosen" if candidate is search.chosen else ""))
    header = ["configuration", "predicted peak", "of usable", "status", "predicted tokens/s", "quality"]
    parts = ["<h2>candidates, fastest predicted first</h2>", _table(header, rows, frozenset({1, 2, 4}))]
    not_evaluated = sum(1 for candidate in search.candidates if candidate.status == NOT_EVALUATED)
    notes = [f"{count} more {status}, not traced: {why}." for status, count, why in words.untraced_counts(search)]
    if not_evaluated:
        notes.append(f"{not_evaluated} slower configurations not evaluated: the search stops at the fastest that fits.")
    notes += [f"{candidate.config.describe()}: fits the GPU, but {candidate.note}." for candidate in search.candidates
              if candidate.status == TOO_BIG and words.host_refusal(candidate)]
    if search.measured_both:
        notes.append(words.measured_both_words(search) + ".")
    notes += list(search.notes)
    parts += [f"<p>{_e(note)}</p>" for note in notes]
    return parts


def _chosen_section(result: FitResult, search: SearchResult, chosen: Candidate) -> list[str]:
    peak = chosen.predicted_total_bytes or 0
    pinned = result.policy.gradient_checkpointing if result.policy is not None else None
    reasons = [why for why in (words.checkpointing_words(chosen.config, result.source.config, pinned),
                                words.allocator_words(search), words.offload_words(search),
                                words.zero_words(search)) if why]
    return [f'<p class="chosen-verdict"><strong>chosen: {_e(chosen.config.describe())}</strong><br>'
            f"predicted peak {_e(format_bytes(peak))} of {_e(format_bytes(search.usable_bytes))} usable "
            f"({_e(words.spare_words(search.usable_bytes, peak))}), "
            f"{chosen.predicted_tokens_per_second:,.0f} tokens/s "
            f"predicted; {_e(words.quality_note(chosen.config, result.source.config, result.num_parameters))}"
            + "".join(f"<br>{_e(why)}" for why in reasons) + "</p>"]


def _why_section(result: FitResult, search: SearchResult, chosen: Candidate) -> list[str]:
    parts = ["<h2>what to set</h2>", "<ul>"]
    parts += [f"<li>{_e(change)}</li>" for change in words.changes_to_make(chosen.config)]
    parts.append("</ul>")
    if search.alternatives:
        rows = [([alternative.change, format_bytes(alternative.predicted_total_bytes),
                  words.fits_word(alternative, search),
                  words.relative(alternative.predicted_tokens_per_second, chosen.predicted_tokens_per_second),
                  words.alternative_verdict(alternative, search)], "") for alternative in search.alternatives]
        header = ["change", "predicted peak", "fits", "tokens/s vs chosen", "verdict"]
        parts += ["<h2>why this one: the chosen configuration with one thing changed</h2>",
                  _table(header, rows, frozenset({1, 3}))]
    heading, checks = words.verification(result)
    parts += ["<h2>verification</h2>", f"<p>{_e(heading)}</p>"]
    if checks:
        parts.append(_table(["", "predicted", "measured", "error"], [(list(row), "") for row in checks],
                            frozenset({1, 2, 3})))
    return parts


def _nothing_fits_section(search: SearchResult) -> list[str]:
    parts = [f'<p class="nothing-fits"><strong>nothing fits in {_e(format_bytes(search.usable_bytes))} usable</strong> '
             f"({_e(format_bytes(search.budget_bytes))} budget - {_e(format_bytes(search.margin_bytes))} margin)"]
    if search.shortfall_bytes:
        parts[-1] += f": the smallest candidate is short by {_e(format_bytes(search.shortfall_bytes))}"
    parts[-1] += "</p>"
    if search.suggestions:
        parts += ["<h2>what would fit</h2>", "<ul>", *(f"<li>{_e(item)}</li>" for item in search.suggestions), "</ul>"]
    return parts


def _cards_section(result: FitResult) -> list[str]:
    rows = []
    for card in result.card_plans:
        if card.search is None:
            rows.append(([card.card, card.skipped, "", "", ""], ""))
            continue
        chosen = card.search.chosen
        if chosen is None:
            short = f"does not fit (short by {format_bytes(card.search.shortfall_bytes)})"
            rows.append(([card.card, short, "", "", ""], ""))
        else:
            rows.append(([card.card, chosen.config.describe(), format_bytes(chosen.predicted_total_bytes or 0),
                          f"{chosen.predicted_tokens_per_second:,.0f}",
                          words.quality_note(chosen.config, result.source.config, result.num_parameters)], ""))
    header = ["card", "chosen configuration", "predicted peak", "predicted tokens/s", "quality"]
    return ["<h2>planned for common cards (predicted, not verified)</h2>", _table(header, rows, frozenset({2, 3}))]


def render_html(result: FitResult) -> str:
    """The whole page as a string."""
    bars = bars_of(result)
    title = f"memtune fit: {result.source.name}"
    parts = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">', f"<title>{_e(title)}</title>",
             f"<style>{STYLE}</style>", "</head>", "<body>", f"<h1>{_e(title)}</h1>",
             "<p>" + "<br>\n".join(_e(line) for line in [*words.gpu_lines(result), words.model_line(result),
                                                         words.task_line(result)]) + "</p>"]
    if result.source.note:
        parts.append(f"<p>note: {_e(result.source.note)}</p>")
    if result.data is not None:  # the same lines as the terminal's data section
        parts.append("<p>" + "<br>\n".join(_e(line.strip()) for line in words.data_lines(result.data)) + "</p>")
    search = result.search
    chosen = search.chosen if search is not None else None
    if not result.card_plans and search is not None:
        parts += _chosen_section(result, search, chosen) if chosen is not None else _nothing_fits_section(search)
    if bars:  # the picture first, where the page opens
        caption = ("Each bar is one candidate's predicted peak memory, split by category; the red line is the budget, "
                   "the dashed line the usable budget (budget minus the safety margin, shaded). The chosen "
                   "configuration is outlined in black (\u2605); a black triangle marks a measured peak; \u00bb marks "
                   "a bar cut at the axis end.")
        if result.card_plans:
            caption = ("Each bar is the configuration chosen for one card (\u2605, outlined) or, where nothing fits, "
                       "its smallest candidate, split by category; the red tick is that card's memory, the shaded band "
                       "its safety margin.")
        parts += ["<figure>", chart_svg(bars), f"<figcaption>{_e(caption)}</figcaption>", "</figure>"]
    if result.card_plans:
        parts += _cards_section(result)
    elif search is not None:
        if chosen is not None:
            parts += _why_section(result, search, chosen)
        parts += _candidates_section(result, search)
        if chosen is not None:
            if result.plan_path is not None:
                parts.append(f"<p>plan saved to <code>{_e(result.plan_path)}</code></p>")
            parts += ["<h2>to reproduce</h2>", "<pre>" + _e("\n".join(words.fit_commands(result))) + "</pre>",
                      "<pre>" + _e(words.python_snippet(result.plan.train_config if result.plan is not None
                                                        else chosen.config)) + "</pre>"]
    parts += ["</body>", "</html>", ""]
    return "\n".join(parts)


def write_html(result: FitResult, path: str | Path) -> Path:
    """Write the page to `path` (folders created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(result), encoding="utf-8")
    return path
