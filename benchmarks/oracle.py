"""The grid over the ladder, measured: how close is memtune's choice to the fastest configuration that fits?

    PYTHONPATH=. python3 benchmarks/oracle.py --out benchmarks/results/oracle_h100.json

For each case (`CASES`: the catalog cases benchmarks/search.py ran before issue 17; same caps,
set_per_process_memory_fraction), measure real
steps (memtune.verify.measure) of the configurations that keep the effective batch:
{bf16-mixed, fp32} x {checkpointing off, on} x {standard, chunked loss} x micro-batch (divisors of
the batch). Within one family (all but the micro-batch) micro-batches are tried from the largest
down; after `--fitting` of them fit (1 for fp32, whose steps are ~5x slower and never the fastest),
smaller ones are not measured (smaller micro-batches are slower: launch overhead per micro-batch
grows). Steps accumulate at most `--accumulation` micro-batches (memory peaks by the second; the
optimizer's share of a step is then over-counted by the same rule for every configuration). Adapters
(they change what is trained) and offload are outside the grid. memtune's choice is its prediction-only
plan for the same budget (no trials); if the grid did not measure it, it is measured too. Reported:
memtune's measured tokens/s over the grid's best that fits.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.search import Case, set_cap  # noqa: E402
from memtune.config import GIB, TrainConfig  # noqa: E402

CASES = [
    Case("gpt2-medium", 1024, 32, 8),
    Case("smollm2-360m", 2048, 16, 8),
    Case("qwen2.5-0.5b", 1024, 32, 16),
    Case("gpt2-large", 1024, 16, 16),
    Case("llama-3.2-1b", 1024, 32, 24),
    Case("qwen2.5-1.5b", 1024, 16, 40),
]
"""The grid's cases (benchmarks/results/oracle_*.json are indexed by them). benchmarks/search.py now measures an
oracle of its own for its cases, architectures outside the catalog among them."""


def grid_families(case) -> list[TrainConfig]:
    return [TrainConfig(seq_len=case.seq_len, amp=amp, gradient_checkpointing=ckpt, loss=loss)
            for amp in ("bf16", "none") for ckpt in (False, True) for loss in ("standard", "chunked")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--fitting", type=int, default=3, help="fitting micro-batches measured per family (default 3)")
    parser.add_argument(
        "--accumulation", type=int, default=4, help="micro-batches per measured step at most (default 4)"
    )
    parser.add_argument("--cases", type=int, nargs="*", default=None)
    parser.add_argument("--reuse", default=None, metavar="ORACLE.json",
                        help="take the grid measured by an earlier run (same card) and measure only memtune's choice "
                             "if it is not in it: for re-checking the choice after the search changed")
    parser.add_argument(
        "--offline",
        action="store_true",
        help="with --reuse, on a machine without a GPU: make memtune's choice on the GPU-free trace path "
        "(budget = cap + the context the earlier run's probe measured) and look it up in the grid",
    )
    args = parser.parse_args()
    if args.offline:
        offline(args)
        return

    import torch

    from benchmarks.ground_truth import environment
    from memtune.config import Policy
    from memtune.fit import fit_model
    from memtune.measure import memory, verify
    from memtune.measure.probe import probe
    from memtune.sources import parameter_count, resolve

    env = environment()
    memory.warm_up()
    rows = []
    for index in args.cases if args.cases is not None else range(len(CASES)):
        case = CASES[index]
        source = resolve(case.model)
        started = time.perf_counter()
        set_cap(case)
        budget = case.cap_gib * GIB + probe().gpus[0].context_bytes
        choice = fit_model(source, parameter_count(source.config), case.seq_len, case.batch_size, budget_bytes=budget,
                           verify=False, policy=Policy(use_adapter=False, allow_offload=False)).search.chosen
        measured: dict[TrainConfig, dict] = {}
        if args.reuse:
            earlier = next(c for c in json.loads(Path(args.reuse).read_text())["cases"] if c["case"] == case.name)
            measured = {TrainConfig.from_dict(point["config"]): point for point in earlier["grid"]}
        for family in grid_families(case) if not args.reuse else []:
            fitting = 0
            for micro in [m for m in range(case.batch_size, 0, -1) if case.batch_size % m == 0]:
                config = family.replace(micro_batch_size=micro, grad_accum_steps=case.batch_size // micro)
                set_cap(case)
                m = verify.measure(source.config, config, steps=args.steps, accumulation_limit=args.accumulation)
                measured[config] = {"config": config.to_dict(), "description": config.describe(), "fits": m.fits,
                                    "tokens_per_second": m.tokens_per_second if m.fits else 0.0,
                                    "peak_reserved_bytes": m.peak_reserved_bytes}
                fitting += m.fits
                if fitting >= (args.fitting if family.amp != "none" else 1):
                    break
        if choice is not None and choice.config not in measured:
            set_cap(case)
            m = verify.measure(source.config, choice.config, steps=args.steps, accumulation_limit=args.accumulation)
            measured[choice.config] = {"config": choice.config.to_dict(), "description": choice.config.describe(),
                                       "fits": m.fits, "tokens_per_second": m.tokens_per_second if m.fits else 0.0,
                                       "peak_reserved_bytes": m.peak_reserved_bytes}
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
        best = max(measured.values(), key=lambda r: r["tokens_per_second"])
        mine = measured[choice.config] if choice is not None else None
        ratio = (mine["tokens_per_second"] / best["tokens_per_second"]) if mine and best["tokens_per_second"] else 0.0
        rows.append({"case": case.name, "grid": list(measured.values()), "best": best, "memtune": mine,
                     "memtune_over_best": ratio, "seconds": time.perf_counter() - started})
        print(f"{case.name:42s} grid {len(measured):3d} configs  best {best['tokens_per_second']:8.0f} tok/s "
              f"({best['description']})  memtune {0 if not mine else mine['tokens_per_second']:8.0f} "
              f"({'-' if not mine else mine['description']})  ratio {ratio:.3f}", flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(
            json.dumps(
                {"environment": env, "steps": args.steps, "accumulation": args.accumulation, "cases": rows}, indent=1
            )
        )


def offline(args: argparse.Namespace) -> None:
    """Re-check memtune's choice against a measured grid without a GPU (no trial: prediction only)."""
    from memtune.config import Policy
    from memtune.fit import fit_model
    from memtune.measure.probe import ProbeResult
    from memtune.sources import parameter_count, resolve

    if not args.reuse:
        raise SystemExit("--offline needs --reuse ORACLE.json (the measured grid)")
    earlier = json.loads(Path(args.reuse).read_text())
    search_runs = Path(args.reuse).with_name("search_h200.json")
    budgets = {c["case"]: c["methods"][0]["budget_bytes"] for c in json.loads(search_runs.read_text())["cases"]}
    rows = []
    for index in args.cases if args.cases is not None else range(len(CASES)):
        case = CASES[index]
        grid = next(c for c in earlier["cases"] if c["case"] == case.name)["grid"]
        source = resolve(case.model)
        started = time.perf_counter()
        result = fit_model(
            source,
            parameter_count(source.config),
            case.seq_len,
            case.batch_size,
            budget_bytes=budgets[case.name],
            verify=False,
            trace_device="cpu",
            probe_result=ProbeResult(),
            policy=Policy(use_adapter=False, allow_offload=False),
        )
        chosen = result.search.chosen
        measured = next(
            (p for p in grid if chosen is not None and TrainConfig.from_dict(p["config"]) == chosen.config), None
        )
        best = max(grid, key=lambda p: p["tokens_per_second"])
        ratio = measured["tokens_per_second"] / best["tokens_per_second"] if measured else 0.0
        rows.append(
            {
                "case": case.name,
                "budget_bytes": budgets[case.name],
                "memtune": chosen and chosen.config.to_dict(),
                "memtune_description": chosen and chosen.config.describe(),
                "measured": measured,
                "best": best,
                "memtune_over_best": ratio,
                "estimates": result.search.estimates,
                "seconds": time.perf_counter() - started,
            }
        )
        print(f"{case.name:42s} memtune {chosen and chosen.config.describe()}  grid tok/s "
              f"{0 if not measured else measured['tokens_per_second']:8.0f} (fits: {measured and measured['fits']})  "
              f"best {best['tokens_per_second']:8.0f}  ratio {ratio:.3f}", flush=True)
    Path(args.out).write_text(json.dumps({"grid_from": args.reuse, "trace_device": "cpu", "cases": rows}, indent=1))


if __name__ == "__main__":
    main()
