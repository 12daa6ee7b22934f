"""The speed model's error on measured steps: predicted vs measured tokens/s, per case and per architecture.

    PYTHONPATH=. python benchmarks/speed_error.py benchmarks/results/speed_heldout_h200.json [--out table.md]

Reads a file of measured configurations: {"environment": {"gpu": ...}, "cases": [{"model_type" or "model",
"num_layers", "config" (TrainConfig.to_dict()), "fits", "tokens_per_second"}, ...]} (benchmarks/search.py's rows
too, where they name their model). A "model_type" of benchmarks/cases.py's REAL_ARCHITECTURES is built from its
published shapes; anything else is resolved as a model name (the catalog, a local directory). Predicts each
fitted case's tokens/s with memtune's speed model (`predict.throughput.tokens_per_second`, FLOPs counted on the
model where this memtune counts them) on the file's card, and prints a Markdown table: every case, then the median
and max |error| per architecture and overall. Error = predicted / measured - 1.

It runs against whichever memtune is on PYTHONPATH, so the same file can be scored before and after a change
(e.g. PYTHONPATH=<an older checkout>); `--closed-form` predicts with the closed-form FLOPs of this memtune.
Fits nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.cases import REAL_ARCHITECTURES, SEALED_ARCHITECTURES, Case, model_config  # noqa: E402
from memtune.config import TrainConfig  # noqa: E402
from memtune.predict import throughput  # noqa: E402
from memtune.sources import parameter_count, resolve  # noqa: E402


def case_model_config(case: dict[str, Any]) -> Any:
    """The transformers config a measured case ran: REAL_ARCHITECTURES' (or SEALED_ARCHITECTURES') shapes for its
    model_type, else its model
    resolved by name; cut to its num_layers."""
    model_type = case.get("model_type") or ""
    layers = case.get("num_layers")
    train = TrainConfig.from_dict(case["config"])
    known = {**REAL_ARCHITECTURES, **SEALED_ARCHITECTURES}
    if model_type in known:
        entry = known[model_type]
        return model_config(Case(entry["shapes_of"], layers, train, model_type=model_type,
                                 settings={**entry["settings"], "num_hidden_layers": entry["published_layers"]}))
    config = resolve(case["model"]).config
    if layers:
        config.num_hidden_layers = layers
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[:layers]
    return config


def shape_of(config: Any, closed_form: bool) -> throughput.ModelShape:
    """The speed model's shape, FLOPs counted where this memtune counts them (older ones have no `count`)."""
    try:
        return throughput.ModelShape.of(config, parameter_count(config), count=not closed_form)
    except TypeError:
        return throughput.ModelShape.of(config, parameter_count(config))


def score(data: dict[str, Any], closed_form: bool = False) -> list[dict[str, Any]]:
    """One row per fitted, measured case: its architecture, name, measured and predicted tokens/s and the error."""
    speed = throughput.gpu_speed(data.get("environment", {}).get("gpu", "H100"))
    rows = []
    for case in data["cases"]:
        if not case.get("fits", True) or not case.get("tokens_per_second") or not case.get("config"):
            continue
        if not case.get("model_type") and not case.get("model"):
            print(f"skipped (no model named): {case.get('case', '?')}", file=sys.stderr)
            continue
        config = case_model_config(case)
        train = TrainConfig.from_dict(case["config"])
        predicted = throughput.tokens_per_second(shape_of(config, closed_form), train, speed)
        measured = float(case["tokens_per_second"])
        rows.append({"architecture": case.get("model_type") or getattr(config, "model_type", "?"),
                     "case": case.get("case") or f"{case.get('model')} {train.describe()}",
                     "measured": measured, "predicted": predicted, "error": predicted / measured - 1})
    return rows


def summarise(rows: list[dict[str, Any]]) -> list[tuple[str, int, float, float]]:
    """(architecture, cases, median |error|, max |error|) per architecture, then "all"."""
    groups: dict[str, list[float]] = {}
    for row in rows:
        groups.setdefault(row["architecture"], []).append(abs(row["error"]))
    summary = [(name, len(errors), statistics.median(errors), max(errors)) for name, errors in groups.items()]
    every = [abs(row["error"]) for row in rows]
    if every:
        summary.append(("all", len(every), statistics.median(every), max(every)))
    return summary


def render(rows: list[dict[str, Any]], title: str) -> str:
    """The Markdown tables: every case, then the summary by architecture."""
    lines = [f"### {title}", "", "| case | measured tokens/s | predicted | error |", "|---|---:|---:|---:|"]
    lines += [f"| {row['case']} | {row['measured']:,.0f} | {row['predicted']:,.0f} | {row['error']:+.1%} |"
              for row in rows]
    lines += ["", "| architecture | cases | median abs. error | max abs. error |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {count} | {median:.1%} | {largest:.1%} |"
              for name, count, median, largest in summarise(rows)]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", help="measured cases (JSON, see above)")
    parser.add_argument("--closed-form", action="store_true", help="predict with the closed-form FLOPs")
    parser.add_argument("--title", default="", help="the table's heading (default: the file and the memtune used)")
    parser.add_argument("--out", default="", help="also write the Markdown here")
    parser.add_argument("--json", default="", help="also write the rows and the summary as JSON here")
    args = parser.parse_args()
    data = json.loads(Path(args.path).read_text())
    rows = score(data, args.closed_form)
    import memtune

    source = Path(memtune.__file__).resolve().parent.parent
    title = args.title or (f"{Path(args.path).name}: memtune at {source}"
                           + (" (closed-form FLOPs)" if args.closed_form else ""))
    text = render(rows, title)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"title": title, "rows": rows, "summary": [
            {"architecture": name, "cases": count, "median_abs_error": median, "max_abs_error": largest}
            for name, count, median, largest in summarise(rows)]}, indent=1))


if __name__ == "__main__":
    main()
