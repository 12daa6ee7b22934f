"""Results as JSON documents (schema: docs/json-schema.md). Renders; computes nothing.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from memtune.sources import CatalogEntry

if TYPE_CHECKING:
    from memtune.fit import CardPlan, FitResult, PlanResult
    from memtune.measure.probe import ProbeResult


SCHEMA_VERSION = 1


def plan_to_dict(result: PlanResult) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "model": {"name": result.source.name, "origin": result.source.origin, "num_parameters": result.num_parameters,
                  "num_layers": result.estimate.num_layers},
        "budget_bytes": result.budget_bytes,
        "budget": result.budget_label,
        "margin_bytes": None if result.verdict is None else result.verdict.margin_bytes,
        "usable_bytes": None if result.verdict is None else result.verdict.usable_bytes,
        "fits": result.fits,
        "estimate": result.estimate.to_dict(),
        "tokens_per_second": result.tokens_per_second,
        "inter_node_gbps": result.inter_node_gbps,
        "data": None if result.data is None else result.data.to_dict(),
        "alternatives": [] if result.explanation is None else [a.to_dict() for a in result.explanation.alternatives],
        "explain_seconds": None if result.explanation is None else result.explanation.explain_seconds,
    }


def render_plan_json(result: PlanResult) -> str:
    return json.dumps(plan_to_dict(result), indent=2)


def render_models_json(entries: list[CatalogEntry]) -> str:
    return json.dumps(
        [{"hub_id": e.hub_id, "aliases": list(e.aliases), "num_parameters": e.num_parameters,
          "num_layers": e.num_layers, "hidden_size": e.hidden_size, "vocab_size": e.vocab_size} for e in entries],
        indent=2,
    )


def _card_plan_dict(card: CardPlan) -> dict[str, Any]:
    return {"card": card.card, "budget_bytes": card.budget_bytes,
            "search": None if card.search is None else card.search.to_dict(), "skipped": card.skipped}


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
        "data": None if result.data is None else result.data.to_dict(),
        "seconds": result.seconds,
        "inter_node_gbps": result.inter_node_gbps,
        "launch_files": None if result.launch_files is None else list(result.launch_files.steps),
    }


def render_fit_json(result: FitResult) -> str:
    return json.dumps(fit_to_dict(result), indent=2)


def probe_to_dict(result: ProbeResult) -> dict[str, Any]:
    return {"schema_version": SCHEMA_VERSION, "kind": "probe", **result.to_dict()}


def render_probe_json(result: ProbeResult) -> str:
    return json.dumps(probe_to_dict(result), indent=2)
