"""Renders result objects for people (rich) and programs (JSON). Computes nothing."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.table import Table

from memtune.config import format_bytes
from memtune.estimate import Estimate
from memtune.sources import CatalogEntry, ModelSource

SCHEMA_VERSION = 1
CATEGORY_NOTES = {
    "weights": "parameters and buffers",
    "gradients": "gradients of trained parameters",
    "optimizer": "AdamW moments and step counters",
    "activations": "tensors saved for backward",
    "logits": "LM-head logits, loss and their gradients",
    "temporaries": "backward intermediates",
    "overhead": "allocator fragmentation, cuBLAS workspaces, CUDA context",
}


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
