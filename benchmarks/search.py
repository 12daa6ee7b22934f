"""memtune fit, cold and warm, beside accelerate's find_executable_batch_size, and the measured best that fits.

    PYTHONPATH=. python3 benchmarks/search.py --out benchmarks/results/search_cold_warm_h200.json   # one GPU, 6-8 min
    PYTHONPATH=. python3 benchmarks/search.py --dry-run --cases 2 --out /tmp/search_cpu.json       # no GPU: predictions

(results/search_h200.json holds the earlier runs' format, which benchmarks/oracle.py --offline reads: keep it.)

Each case (model, sequence length, effective batch, cap) emulates a smaller GPU on this one with
torch.cuda.set_per_process_memory_fraction(cap / total); the cap bounds torch's pool, as a card of `cap` + CUDA context
would. Models: catalog ones, and architectures outside the catalog and the speed model's calibration
(`benchmarks.cases.REAL_ARCHITECTURES`, published shapes), written as a local directory with config.json and given to
memtune as a user would (`memtune fit ./dir`). In one process, side by side, per case:

- memtune COLD: `fit_model` end to end (probe, tracing, search, trial steps, plan saved; the explanation is
  predicted after the plan is saved and reported apart) with MEMTUNE_CACHE_DIR a fresh empty directory and the
  in-process trace caches emptied: what a first `memtune fit` of the model costs once Python and torch are loaded.
- memtune WARM: the same fit again, in-process caches emptied again (as a new process), the disk cache kept: the
  finished estimates, FLOP counts and the trial measurements that fitted (same card, budget and libraries: "verified
  earlier (cached measurement)") are read, not made again.
- FEBS: `accelerate.utils.find_executable_batch_size` from the effective batch, bf16 autocast, no checkpointing (what
  `Trainer(auto_find_batch_size=True, bf16=True)` runs); the batch shrinks x0.9 per OOM and gradient accumulation is
  not adjusted (transformers PR #33281). Its tokens/s is its last attempt's (the final batch, `--steps` steps, the
  first untimed), not measured again.
- bisection (`--bisection` only): Lightning's BatchSizeFinder "binsearch" mode: from 1, double until OOM (or the
  wanted batch), then bisect; bf16 autocast, no checkpointing.
- the oracle: memtune's choice and the configurations its candidates table (the walked group: full fine-tuning at the
  chosen tier) predicts to fit under budget - margin, the fastest predicted first (`--oracle` of them at most,
  predicting untraced candidates as needed), each measured for 3 full steps (every micro-batch of the accumulation)
  under the cap, except those the cold fit's trials measured whole (at most 2 micro-batches a step): their trial
  measurement is used ("from_trial"). "choice / best" is the choice's measured tokens/s over the best measured among
  those whose measured total (peak reserved + workspaces + context) stays under budget - margin. Predicted and
  measured tokens/s of every measured configuration are recorded: the speed model's error on the held-apart
  architectures.

Offload is left out (`POLICY`): the batch-size finder cannot offload either. Trial steps are timed apart
(`trial_seconds`): the warm fit's floor is its trials. `--time-limit` (default 420 s) stops starting new work past it,
so one call of at most 9 minutes ends with the JSON written (after every case) and the table printed; what was skipped
says so.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from memtune.config import GIB, Policy, TrainConfig  # noqa: E402


@dataclass(frozen=True)
class Case:
    model: str
    """A catalog name, or a `benchmarks.cases.REAL_ARCHITECTURES` key (with `architecture`)."""
    seq_len: int
    batch_size: int
    cap_gib: int
    architecture: bool = False
    """True: `model` is a REAL_ARCHITECTURES key, outside the catalog and the speed model's calibration."""

    @property
    def name(self) -> str:
        kind = "new " if self.architecture else ""
        return f"{kind}{self.model} {self.batch_size}x{self.seq_len} @{self.cap_gib}GiB"


CASES = [
    Case("qwen2.5-0.5b", 1024, 32, 16),
    Case("smollm2-360m", 2048, 16, 8),
    Case("qwen3", 1024, 16, 40, architecture=True),  # Qwen3-1.7B shapes: 27 GiB of fp32 AdamW state
    Case("olmo2", 1024, 16, 32, architecture=True),  # OLMo-2-0425-1B: 1.5B, untied 100k vocabulary
    Case("gemma3_text", 1024, 16, 24, architecture=True),  # Gemma-3-1B: 262k vocabulary, 5:1 sliding window
    Case("granite", 1024, 8, 48, architecture=True),  # Granite-3.1-2B: 2.5B, 40 GiB of state
    Case("starcoder2", 1024, 8, 64, architecture=True),  # StarCoder2-3B (not in the default set: time)
    Case("llama-3.2-1b", 1024, 32, 24),  # (not in the default set)
]
DEFAULT_CASES = [2, 3, 4, 5, 0, 1]
"""The four architectures outside the catalog first (should the time limit cut the run short, they are done), then
two catalog models. Where a case's time went on one H200 (results/search_cold_warm_partial_h200.json, Qwen3-1.7B
shapes, ~104 s in all): cold fit 39 s, warm fit 17 s (5 s of it trials run again, the rest predictions made again),
FEBS 19.5 s, FEBS's final configuration measured again 3.5 s, 4 oracle measurements 14.4 s, the rest (the model's
config, the oracle's predictions) ~10 s; and Gemma-3-1B's cold fit was the longest (its 6-layer pattern makes every
partial-checkpointing trace full depth: 183 s on the CPU dry run, 66 s after `fewest_checkpointed`'s interpolated
guess). Now the warm fit reads its estimates and verified trials from the disk cache (~1 s), FEBS's tokens/s is its
last attempt's and the choice's oracle row is its whole-step trial: expected ~70 s a case, ~7.5 minutes for the six
on one H200; `--time-limit` keeps the call under 9 minutes whatever."""

POLICY = Policy(allow_offload=False)
"""Offload is left out of this comparison: the batch-size finders cannot offload either."""


def set_cap(case: Case) -> None:
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(case.cap_gib * GIB / total, 0)


def plain_bf16(case: Case, micro_batch_size: int) -> TrainConfig:
    """What a batch-size finder tries: bf16 autocast, no checkpointing, no accumulation."""
    return TrainConfig(seq_len=case.seq_len, micro_batch_size=micro_batch_size, amp="bf16")


def model_source(case: Case, folder: Path) -> tuple[Any, int]:
    """memtune's ModelSource of `case` and its parameter count: a catalog model by name; an architecture outside the
    catalog as a local directory with its config.json, resolved as `memtune fit DIR` resolves it."""
    from memtune.sources import resolve, source_parameters

    if case.architecture:
        from benchmarks.cases import REAL_ARCHITECTURES
        from benchmarks.cases import Case as ShapeCase
        from benchmarks.cases import model_config as shapes

        entry = REAL_ARCHITECTURES[case.model]
        config = shapes(ShapeCase(entry["shapes_of"], entry["num_layers"], TrainConfig(seq_len=case.seq_len),
                                  model_type=case.model,
                                  settings={**entry["settings"], "num_hidden_layers": entry["published_layers"]}))
        directory = folder / case.model
        config.save_pretrained(directory)
        source = resolve(str(directory), shapes_only=True)
    else:
        source = resolve(case.model, shapes_only=True)
    return source, source_parameters(source)


def forget_in_process() -> None:
    """Empty memtune's in-process caches (every `*_CACHE` dict of memtune.predict, and flops' `_COUNTS`): the next
    fit reads traces, estimates, FLOP counts and trial measurements from the disk cache only, as a new process
    would."""
    for name, module in list(sys.modules.items()):
        if name.startswith("memtune.predict") and module is not None:
            for attribute, value in vars(module).items():
                if attribute.endswith(("_CACHE", "_COUNTS")) and isinstance(value, dict):
                    value.clear()


@contextlib.contextmanager
def timed_trials(record: dict) -> Iterator[None]:
    """Add the wall time of every trial step memtune runs (`fit.measure_trial`) to record["trial_seconds"]."""
    from memtune import fit

    real = fit.measure_trial
    record["trial_seconds"] = 0.0

    def timing(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            record["trial_seconds"] += time.perf_counter() - started

    fit.measure_trial = timing
    try:
        yield
    finally:
        fit.measure_trial = real


def run_memtune(case: Case, source: Any, num_parameters: int, budget: int, steps: int, dry_run: bool,
                plan_path: Path) -> tuple[dict, Any]:
    """One `fit_model`, end to end (its own probe included), timed; (the row, the FitResult)."""
    from memtune.fit import fit_model
    from memtune.measure.probe import ProbeResult

    forget_in_process()
    row: dict = {}
    told: list[float] = []
    started = time.perf_counter()
    if not dry_run:
        set_cap(case)
    with timed_trials(row):
        result = fit_model(source, num_parameters, case.seq_len, case.batch_size, budget_bytes=budget,
                           budget_label=f"cap {case.cap_gib} GiB", trial_steps=steps, policy=POLICY,
                           verify=not dry_run, plan_path=plan_path,
                           probe_result=ProbeResult(reason="dry run") if dry_run else None,
                           trace_device="cpu" if dry_run else None, gpu_name="H200" if dry_run else None,
                           on_chosen=lambda line: told.append(time.perf_counter() - started))
    seconds = time.perf_counter() - started
    search = result.search
    chosen = search.chosen
    row.update({
        "seconds": seconds,
        "seconds_to_plan": told[0] if told else seconds,
        "explain_seconds": search.explain_seconds,
        "search_seconds": search.seconds,
        "trials": search.trials,
        "trials_from_cache": len(result.cached_trials),
        "ooms": search.trial_ooms,
        "estimates": search.estimates,
        "measured_both": [c.config.describe() for c in search.measured_both],
        "config": None if chosen is None else chosen.config.to_dict(),
        "description": None if chosen is None else chosen.config.describe(),
        "status": None if chosen is None else chosen.status,
        "predicted_total_bytes": None if chosen is None else chosen.predicted_total_bytes,
        "trial_total_bytes": None if chosen is None else chosen.measured_total_bytes,
        "predicted_tokens_per_second": None if chosen is None else chosen.predicted_tokens_per_second,
        "trial_tokens_per_second": None if chosen is None or chosen.measurement is None
        else chosen.measurement.tokens_per_second,
        "candidates": [{"description": c.config.describe(), "status": c.status, "note": c.note,
                        "predicted_total_bytes": c.predicted_total_bytes,
                        "predicted_tokens_per_second": c.predicted_tokens_per_second}
                       for c in search.candidates if c.status != "not evaluated"],
    })
    return row, result


def run_febs(case: Case, model_config: Any, steps: int) -> dict:
    import torch
    from accelerate.utils import find_executable_batch_size

    from memtune.measure import verify

    set_cap(case)
    tried: list[tuple[int, bool]] = []
    last: list[Any] = []
    started = time.perf_counter()

    @find_executable_batch_size(starting_batch_size=case.batch_size)
    def attempt(batch_size: int) -> TrainConfig:
        config = plain_bf16(case, batch_size)
        measurement = verify.measure(model_config, config, steps=steps)
        tried.append((batch_size, measurement.fits))
        last[:] = [measurement]
        if not measurement.fits:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. " + measurement.error)
        return config

    try:
        config, error = attempt(), ""
    except RuntimeError as failure:  # "No executable batch size found, reached zero."
        config, error = None, str(failure)
    final = {}
    if config is not None and last:  # its last attempt ran the final configuration: no accumulation, `steps` steps
        final = {"tokens_per_second": last[0].tokens_per_second, "final_peak_reserved_bytes":
                 last[0].peak_reserved_bytes, "final_fits": True, "final_from_last_attempt": True}
    return {**final, "seconds": time.perf_counter() - started, "trials": len(tried),
            "ooms": sum(1 for _, fits in tried if not fits), "tried": tried, "error": error,
            "config": None if config is None else config.to_dict(),
            "description": None if config is None else config.describe(),
            "keeps_effective_batch": config is not None and config.micro_batch_size == case.batch_size}


def run_bisection(case: Case, model_config: Any, steps: int) -> dict:
    from memtune.measure import verify

    set_cap(case)
    tried: list[tuple[int, bool]] = []
    started = time.perf_counter()

    def fits(batch_size: int) -> bool:
        ok = verify.measure(model_config, plain_bf16(case, batch_size), steps=steps).fits
        tried.append((batch_size, ok))
        return ok

    low, high, size = 0, None, 1
    while True:  # Lightning's _run_binary_scaling: double until failure, then bisect
        if fits(size):
            low = size
            if high is None:
                if size >= case.batch_size:
                    break
                size = min(2 * size, case.batch_size)
                continue
        else:
            high = size
        if high is not None:
            if high - low <= 1:
                break
            size = (low + high) // 2
    config = plain_bf16(case, low) if low else None
    return {"seconds": time.perf_counter() - started, "trials": len(tried),
            "ooms": sum(1 for _, ok in tried if not ok), "tried": tried,
            "config": None if config is None else config.to_dict(),
            "description": None if config is None else config.describe()}


TRIAL_ACCUMULATION_LIMIT = 2
"""`measure.verify.measure`'s default accumulation_limit: a trial of at most this many micro-batches per step ran the
whole step, so the oracle reuses its measurement (`oracle_configurations`)."""

Picked = tuple[TrainConfig, float, int, Any]
"""(configuration, predicted tokens/s, predicted total bytes, the cold fit's trial measurement of it or None)."""


def oracle_configurations(result: Any, source: Any, num_parameters: int, limit: int,
                          max_predictions: int = 12) -> list[Picked]:
    """(configuration, predicted tokens/s, predicted total bytes, trial measurement) of memtune's choice and of the
    fastest predicted candidates of its walked group that fit under budget - margin (`verdict.judge`), `limit` in all:
    the candidates the search judged to fit, then untraced ones predicted here (at most `max_predictions`), fastest
    first. The measurement is the cold fit's own trial of that configuration where it ran the whole step (at most
    TRIAL_ACCUMULATION_LIMIT micro-batches) and fitted: `measure_oracle` does not measure the same step again."""
    from memtune.fit import ModelPredictor, attention_fields
    from memtune.predict import throughput
    from memtune.search.choose import FITS, MEASURED_FASTER, MEASURED_SLOWER, NOT_EVALUATED, VERIFIED, techniques
    from memtune.search.verdict import judge

    search = result.search
    chosen = search.chosen
    if chosen is None:
        return []
    gpu = result.gpu
    on_card = attention_fields(None, gpu.capability if gpu else None)
    estimate = chosen.estimate
    predictor = ModelPredictor(source.config, num_parameters, throughput.gpu_speed(gpu.name if gpu else "H200"),
                               device=None if gpu else "cpu", on_card=on_card, context_bytes=estimate.context_bytes,
                               workspace_bytes=estimate.workspace_bytes)

    def trial_of(candidate: Any) -> Any:
        measurement = candidate.measurement
        whole_step = candidate.config.grad_accum_steps <= TRIAL_ACCUMULATION_LIMIT
        return measurement if measurement is not None and measurement.fits and whole_step else None

    picked: list[Picked] = [(chosen.config, chosen.predicted_tokens_per_second, chosen.predicted_total_bytes or 0,
                             trial_of(chosen))]
    predictions = 0
    for candidate in sorted(search.candidates, key=lambda c: -c.predicted_tokens_per_second):
        if len(picked) >= limit:
            break
        if any(techniques(candidate.config) == techniques(config) for config, _, _, _ in picked):
            continue  # the allocator's mode alone, or the checkpointed depth alone: the same kernels, already picked
        if candidate.status in (FITS, VERIFIED, MEASURED_FASTER, MEASURED_SLOWER) and candidate.estimate is not None:
            picked.append((candidate.config, candidate.predicted_tokens_per_second, candidate.estimate.total_bytes,
                           trial_of(candidate)))
        elif candidate.status == NOT_EVALUATED and predictions < max_predictions:
            predictions += 1
            estimate = predictor.memory(candidate.config)
            if judge(predictor, estimate, search.budget_bytes, search.margin_bytes).fits:
                picked.append((candidate.config, candidate.predicted_tokens_per_second, estimate.total_bytes, None))
    return picked


def measure_oracle(case: Case, model_config: Any, picked: list[Picked], usable: int, fixed_bytes: int,
                   deadline: float) -> list[dict]:
    """Each picked configuration measured for 3 full steps under the cap (skipped past `deadline`), or its cold
    fit's trial measurement where it has one (`oracle_configurations`; "from_trial": the trial's `--steps` steps,
    the first untimed); its measured total is the peak reserved + `fixed_bytes` (the workspaces and CUDA context, as
    `Candidate.measured_total_bytes` counts them)."""
    from memtune.measure import verify

    rows = []
    for config, predicted, predicted_total, trial in picked:
        row = {"config": config.to_dict(), "description": config.describe(), "predicted_tokens_per_second": predicted,
               "predicted_total_bytes": predicted_total}
        if trial is None and time.perf_counter() > deadline:
            row["skipped"] = "time limit"
            rows.append(row)
            continue
        started = time.perf_counter()
        if trial is not None:
            measurement, row["from_trial"] = trial, True
        else:
            set_cap(case)
            measurement = verify.measure(model_config, config, steps=3, accumulation_limit=None)
        total = measurement.peak_reserved_bytes + fixed_bytes if measurement.fits else None
        measured = measurement.tokens_per_second if measurement.fits else 0.0
        row.update({"seconds": time.perf_counter() - started, "fits": measurement.fits,
                    "measured_total_bytes": total, "under_usable": total is not None and total <= usable,
                    "measured_tokens_per_second": measured,
                    "speed_error": (predicted - measured) / measured if measured else None,
                    "error": measurement.error})
        rows.append(row)
    return rows


def measure_final(case: Case, model_config: Any, row: dict) -> None:
    """The final configuration of a finder measured for 3 steps (its tokens/s); not again where the finder's last
    attempt measured it already (`final_from_last_attempt`: FEBS's last attempt is its final batch, unaccumulated)."""
    from memtune.measure import verify

    if row["config"] is None:
        row["tokens_per_second"] = 0.0
        return
    if row.get("final_from_last_attempt"):
        return
    set_cap(case)
    measurement = verify.measure(model_config, TrainConfig.from_dict(row["config"]), steps=3, accumulation_limit=None)
    row["tokens_per_second"] = measurement.tokens_per_second if measurement.fits else 0.0
    row["final_peak_reserved_bytes"] = measurement.peak_reserved_bytes
    row["final_fits"] = measurement.fits


def oracle_verdict(oracle: list[dict], chosen: dict | None) -> dict:
    """The choice's measured tokens/s over the best measured under budget - margin."""
    under = [row for row in oracle if row.get("under_usable")]
    best = max(under, key=lambda row: row["measured_tokens_per_second"], default=None)
    mine = next((row for row in oracle if chosen is not None and row["config"] == chosen), None)
    ratio = (mine["measured_tokens_per_second"] / best["measured_tokens_per_second"]
             if mine is not None and best is not None and best["measured_tokens_per_second"] else None)
    return {"best": None if best is None else best["description"],
            "best_tokens_per_second": None if best is None else best["measured_tokens_per_second"],
            "choice_tokens_per_second": None if mine is None else mine.get("measured_tokens_per_second"),
            "choice_over_best": ratio, "measured": sum(1 for row in oracle if "fits" in row)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per trial, for every method (default 2)")
    parser.add_argument("--cases", type=int, nargs="*", default=None,
                        help=f"indices into CASES (default {DEFAULT_CASES}): "
                             + "; ".join(f"{i} {case.name}" for i, case in enumerate(CASES)))
    parser.add_argument("--oracle", type=int, default=4, help="configurations measured per case, the choice "
                        "included (default 4; 0: none); those the cold fit's trials ran whole are not measured again")
    parser.add_argument("--time-limit", type=float, default=420.0,
                        help="seconds after which no new case, FEBS or oracle measurement starts (default 420: a "
                             "case started just before ends within 9 minutes of the start)")
    parser.add_argument("--bisection", action="store_true",
                        help="also Lightning's BatchSizeFinder binsearch (double from 1 until OOM, then bisect), "
                             "as the earlier runs of this benchmark did")
    parser.add_argument("--dry-run", action="store_true",
                        help="no GPU: the cold and warm fits predict only (CPU traces, no trials), the oracle's "
                             "configurations are chosen but not measured, FEBS does not run")
    args = parser.parse_args()
    started = time.perf_counter()
    deadline = started + args.time_limit

    from memtune.predict.estimate import DEFAULT_CONTEXT_BYTES

    env: dict = {"dry_run": args.dry_run, "cpu_count": os.cpu_count()}
    context_bytes = DEFAULT_CONTEXT_BYTES
    if not args.dry_run:
        from benchmarks.ground_truth import environment
        from memtune.measure import memory
        from memtune.measure.probe import probe

        env.update(environment())
        memory.warm_up()
        context_bytes = probe().gpus[0].context_bytes
    rows: list[dict] = []
    folder = Path(tempfile.mkdtemp(prefix="memtune-search-"))
    for index in args.cases if args.cases is not None else DEFAULT_CASES:
        case = CASES[index]
        row: dict = {"case": case.name, "model": case.model, "outside_catalog": case.architecture,
                     "seq_len": case.seq_len, "batch_size": case.batch_size, "cap_bytes": case.cap_gib * GIB}
        rows.append(row)
        if time.perf_counter() > deadline:
            row["skipped"] = "time limit"
            continue
        os.environ["MEMTUNE_CACHE_DIR"] = tempfile.mkdtemp(prefix="cache-", dir=folder)  # cold: an empty cache
        source, num_parameters = model_source(case, folder)
        budget = case.cap_gib * GIB + context_bytes
        row.update({"num_parameters": num_parameters, "budget_bytes": budget})
        row["cold"], result = run_memtune(case, source, num_parameters, budget, args.steps, args.dry_run,
                                          folder / f"plan-{index}-cold.json")
        row["warm"], _ = run_memtune(case, source, num_parameters, budget, args.steps, args.dry_run,
                                     folder / f"plan-{index}-warm.json")
        row["usable_bytes"] = result.search.usable_bytes
        picked = oracle_configurations(result, source, num_parameters, args.oracle) if args.oracle else []
        row["oracle_picked"] = [{"description": config.describe(), "predicted_tokens_per_second": speed,
                                 "predicted_total_bytes": total, "trial_reused": trial is not None}
                                for config, speed, total, trial in picked]
        if not args.dry_run:
            import torch

            if time.perf_counter() < deadline:
                row["febs"] = run_febs(case, source.config, args.steps)
                measure_final(case, source.config, row["febs"])
            if args.bisection and time.perf_counter() < deadline:
                row["bisection"] = run_bisection(case, source.config, args.steps)
                measure_final(case, source.config, row["bisection"])
            estimate = result.search.chosen.estimate if result.search.chosen is not None else None
            fixed = context_bytes if estimate is None else estimate.workspace_bytes + estimate.context_bytes
            row["oracle"] = measure_oracle(case, source.config, picked, result.search.usable_bytes, fixed, deadline)
            row["oracle_verdict"] = oracle_verdict(row["oracle"], row["cold"]["config"])
            torch.cuda.set_per_process_memory_fraction(1.0, 0)
        print(line(row), flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"environment": env, "steps_per_trial": args.steps,
                                              "seconds": time.perf_counter() - started, "cases": rows}, indent=1))
    summary(rows)


def line(row: dict) -> str:
    cold, warm = row["cold"], row["warm"]
    return (f"{row['case']}: cold {cold['seconds']:.1f} s (plan at {cold['seconds_to_plan']:.1f} s, "
            f"{cold['estimates']} predictions, {cold['trials']} trials), warm {warm['seconds']:.1f} s "
            f"({warm['estimates']} predictions, trials {warm['trial_seconds']:.1f} s, "
            f"{warm.get('trials_from_cache', 0)} from the cache): {cold['description']}")


def summary(rows: list[dict]) -> None:
    print(f"\n{'case':44s} {'cold s':>7s} {'warm s':>7s} {'trials/OOMs':>11s} {'FEBS s':>7s} {'FEBS t/O':>8s} "
          f"{'choice/best':>11s} {'speed err':>9s}")
    for row in rows:
        if "cold" not in row:
            print(f"{row['case']:44s} {row.get('skipped', '')}")
            continue
        cold, warm, febs = row["cold"], row["warm"], row.get("febs")
        verdict = row.get("oracle_verdict") or {}
        ratio = verdict.get("choice_over_best")
        mine = next((o for o in row.get("oracle", []) if o["config"] == cold["config"] and o.get("speed_error")
                     is not None), None)
        febs_cells = f"{febs['seconds']:7.1f} {febs['trials']:>5d}/{febs['ooms']:<2d} " if febs else f"{'-':>16s} "
        print(f"{row['case']:44s} {cold['seconds']:7.1f} {warm['seconds']:7.1f} "
              f"{cold['trials']:>7d}/{cold['ooms']:<3d} " + febs_cells
              + (f"{ratio:11.2f} " if ratio is not None else f"{'-':>11s} ")
              + (f"{mine['speed_error']:+9.1%}" if mine is not None else f"{'-':>9s}"))


if __name__ == "__main__":
    main()
