"""Low-bit rungs on the GPU (issue 13): predicted vs measured peak memory of 8-bit / paged optimizers, Adafactor,
pure 16-bit full fine-tuning and quantised LoRA bases (QLoRA).

Cases: Qwen/Qwen2.5-0.5B and meta-llama/Llama-3.2-1B (random weights at their published shapes), 2 x 1024 tokens:
bf16-mixed full fine-tuning with each optimizer, pure bf16, and LoRA r16 on all linear layers (bf16 load dtype,
bf16 autocast) over a bf16, 4-bit (nf4, double quantisation, bf16 compute) or 8-bit (LLM.int8) base, with and
without checkpointing (`recipe.build_model` quantises through transformers' BitsAndBytesConfig quantizer,
recipe/quant.py). One more: Llama-3.2-1B 4-bit at 4 x 1024 with checkpointing, the step issue 13 quotes as
measured at 28.0 GiB through Trainer.

Each case is measured in a process of its own (`memtune.measure.verify.measure`, 3 steps: bitsandbytes' paged
state is never freed, `get_paged` has no matching free, so it would stay in the next case's device memory), then
predicted on both trace paths (`memtune.predict.estimate.estimate(config, train_config, device=...)`).

On the GPU machine, with bitsandbytes installed (pip install -e ".[quant]", or its wheel carried over):
    PYTHONPATH=. python3 benchmarks/lowbit.py                       # every case, both paths
    PYTHONPATH=. python3 benchmarks/lowbit.py --match paged --paths cpu
Anywhere (predictions only): add --no-measure.

What is compared: measured `max_memory_reserved` (a delta over the state before the trial) with the predicted
`peak_reserved_bytes`. Paged optimizers keep the state of every parameter of >= 1e5 elements in CUDA unified
memory, outside torch's pool: neither number includes it (see `memtune.predict.trace.traced_optimizer`). The
row records it apart: `paged_state_bytes` (bitsandbytes' rule applied to the model's parameters) and
`device_used_after_bytes`, the device memory still in use after the trial gave torch's memory back (the paged
state bitsandbytes never frees, where the driver kept it resident).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.cases import Case, model_config, prediction_arguments  # noqa: E402
from memtune.config import DEFAULT_OPTIMIZER, PAGED_OPTIMIZERS, Adapter, Quantization, TrainConfig  # noqa: E402

GIB = 1 << 30
TOLERANCE = 0.05
"""Issue 13: max |error| <= 5% of measured peak reserved (median <= 2%)."""

MODELS = ["Qwen/Qwen2.5-0.5B", "meta-llama/Llama-3.2-1B"]
SEVEN_B = "mistralai/Mistral-7B-v0.1"
INITIALIZER_RANGE = {f"{SEVEN_B} 2x1024 bf16/bf16+ckpt+lora 8-bit base (LLM.int8)": 0.004}
"""Cases measured with a smaller random initialisation than the config's (0.02). LLM.int8 (threshold 6.0)
multiplies in 16 bits every input column holding a value above 6 and keeps those columns for backward: a
random Mistral-7B at 0.02 has an MLP intermediate (silu(gate) * up, std ~1.6) above 6 somewhere in nearly all
14,336 columns, so down_proj ran 14,300 outlier columns (+3.8 GiB, the H200 history of
benchmarks/single_history.py), where a trained checkpoint has a handful (Dettmers et al. 2022, LLM.int8(),
Sec. 4: outlier features in ~6 dimensions). At 0.004 the intermediate stays far below 6, as the prediction
assumes (no outlier columns)."""
HEAVY_PARAMETERS = 3e9
"""Cases of models this large are measured one at a time (a 7B full fine-tune takes ~70 GB); the rest run
`--jobs` at a time."""
MIXED = {"weights_dtype": "fp32", "amp": "bf16"}  # bf16-mixed: fp32 master weights, bf16 autocast
PURE_BF16 = {"weights_dtype": "bf16", "amp": "none"}  # pure bf16: weights and optimizer state in bf16
VARIANTS: list[dict] = [
    {**MIXED, "optimizer": "adamw_torch_fused"},  # the reference every other row is compared with
    {**MIXED, "optimizer": "adamw_bnb_8bit"},
    {**MIXED, "optimizer": "paged_adamw_8bit"},
    {**MIXED, "optimizer": "adafactor"},
    {**PURE_BF16, "optimizer": "adamw_torch_fused"},
    {**MIXED, "optimizer": "adamw_torch_8bit"},  # torchao's, a compiled step per parameter
    {**MIXED, "optimizer": "adamw_torch_4bit"},
    {**PURE_BF16, "optimizer": "adamw_torch_4bit"},
    {**PURE_BF16, "optimizer": "adamw_torch_4bit", "stochastic_rounding": True},  # what the search runs
    {**PURE_BF16, "optimizer": "adamw_torch_8bit", "stochastic_rounding": True},
]
BASES: list[Quantization | None] = [None, Quantization(bits=4), Quantization(bits=8)]
"""LoRA bases: bf16 (the reference), 4-bit nf4 with double quantisation and bf16 compute, 8-bit LLM.int8."""
CASES: list[Case] = [
    Case(model, None, TrainConfig(seq_len=1024, micro_batch_size=2, **variant))
    for model in MODELS for variant in VARIANTS
] + [
    Case(model, None, TrainConfig(seq_len=1024, micro_batch_size=2, weights_dtype="bf16", amp="bf16",
                                  gradient_checkpointing=checkpointing, adapter=Adapter(), quantization=base))
    for model in MODELS for base in BASES for checkpointing in (False, True)
] + [
    # issue 13's figure: 28.0 GiB reserved measured for this step run through Trainer (from_pretrained, fused AdamW)
    Case("meta-llama/Llama-3.2-1B", None, TrainConfig(seq_len=1024, micro_batch_size=4, weights_dtype="bf16",
                                                      amp="bf16", gradient_checkpointing=True, adapter=Adapter(),
                                                      quantization=Quantization(bits=4))),
] + [
    # a 7B-class model, checkpointed: LoRA on a 4-bit and an 8-bit base, and full fine-tuning with 8-bit AdamW
    # (paged or not, fp32 master weights) and in pure bf16
    Case(SEVEN_B, None, TrainConfig(seq_len=1024, micro_batch_size=2, weights_dtype="bf16", amp="bf16",
                                    gradient_checkpointing=True, adapter=Adapter(),
                                    quantization=None if bits is None else Quantization(bits=bits)))
    for bits in (None, 4, 8)
] + [
    Case(SEVEN_B, None, TrainConfig(seq_len=1024, micro_batch_size=2, gradient_checkpointing=True, **variant))
    for variant in ({**MIXED, "optimizer": "adamw_bnb_8bit"}, {**MIXED, "optimizer": "paged_adamw_8bit"},
                    {**PURE_BF16, "optimizer": "adamw_torch_fused"})
]
"""Extend with more `Case`s (catalog name, layers or None, TrainConfig)."""


def case_name(case: Case) -> str:
    """`Case.name` and what it does not say: the optimizer where it is not the default, and a LoRA case's base."""
    config = case.config
    name = case.name + ("" if config.optimizer == DEFAULT_OPTIMIZER else f" {config.optimizer}")
    name += " stochastic rounding" if config.stochastic_rounding else ""
    if config.adapter is not None:
        name += f" {'bf16 base' if config.quantization is None else config.quantization.describe()}"
    return name


def paged_state_bytes(case: Case) -> int:
    """Bytes bitsandbytes puts in unified memory for this case: the state of every trained parameter of
    >= 1e5 elements (Optimizer8bit.get_state_buffer): 2 uint8 states for an 8-bit one (absmax stays in the
    pool), 2 fp32 states for a 32-bit one or a 32-bit override (Trainer keeps nn.Embedding in 32 bits)."""
    if case.config.optimizer not in PAGED_OPTIMIZERS:
        return 0
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config(case))
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    total = 0
    for param in model.parameters():
        if param.numel() < 100_000:
            continue
        eight_bit = "8bit" in case.config.optimizer and id(param) not in embeddings
        total += 2 * param.numel() * (1 if eight_bit else 4)
    return total


def measure_here(name: str) -> dict:
    """Measure the case named `name` on this process's GPU: the measurement's fields, and device memory in use
    after it (cudaMemGetInfo) minus before."""
    import torch

    from memtune.measure.verify import measure

    case = next(case for case in CASES if case_name(case) == name)
    config = model_config(case)
    if name in INITIALIZER_RANGE:
        config.initializer_range = INITIALIZER_RANGE[name]
    free_before, _ = torch.cuda.mem_get_info()
    result = measure(config, case.config, steps=3).to_dict()
    if name in INITIALIZER_RANGE:
        result["initializer_range"] = INITIALIZER_RANGE[name]
    free_after, _ = torch.cuda.mem_get_info()
    result["device_used_after_bytes"] = free_before - free_after
    return result


def measure_isolated(case: Case) -> dict:
    """`measure_here` in a fresh process; a crash becomes a row with the error."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        done = subprocess.run([sys.executable, __file__, "--measure-one", case_name(case), "--row-out", out.name],
                              capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            return {"fits": False, "error": (done.stderr.strip().splitlines() or ["no output"])[-1][:300]}
        return json.loads(Path(out.name).read_text())


def is_heavy(case: Case) -> bool:
    """Whether the case's model has HEAVY_PARAMETERS or more (catalog figure)."""
    from memtune.sources import catalog

    return next(entry.num_parameters for entry in catalog() if entry.hub_id == case.model) >= HEAVY_PARAMETERS


def measure_all(cases: list[Case], jobs: int, raw: Path | None = None) -> dict[str, dict]:
    """Every case measured in its own process, by name: small ones `jobs` at a time, then heavy ones alone.
    With jobs > 1 the timing fields are dropped (the processes share the GPU). Each measurement is also
    appended to `raw` (JSON lines) as it arrives, so a run cut short keeps what it measured."""
    from concurrent.futures import ThreadPoolExecutor

    small = [case for case in cases if not is_heavy(case)]
    heavy = [case for case in cases if is_heavy(case)]
    results: dict[str, dict] = {}
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        for case, result in zip(small, pool.map(measure_isolated, small), strict=True):
            if jobs > 1:
                for key in ("tokens_per_second", "step_seconds", "device_used_after_bytes"):
                    result.pop(key, None)
                result["concurrent_jobs"] = jobs
            keep(results, case, result, raw)
    for case in heavy:
        keep(results, case, measure_isolated(case), raw)
    return results


def keep(results: dict[str, dict], case: Case, result: dict, raw: Path | None) -> None:
    results[case_name(case)] = result
    if raw is not None:
        with raw.open("a") as file:
            file.write(json.dumps({"case": case_name(case), **result}) + "\n")
    print(f"measured {case_name(case)}", file=sys.stderr, flush=True)


def case_row(case: Case, measured: dict | None, paths: list[str]) -> dict:
    """accuracy.py's row (measured and predicted peaks, errors; failures recorded) with this benchmark's name,
    the predicted optimizer state and weights, the paged state, and the measured tokens/s and device memory
    left in use."""
    from benchmarks.accuracy import case_row as accuracy_row

    row = accuracy_row(case, measured, paths, breakdown=("optimizer", "weights"))
    row.update(case=case_name(case), config=case.config.to_dict(), paged_state_bytes=paged_state_bytes(case))
    if measured is None:
        row["measured_error"] = "not measured (--no-measure)"
    elif measured.get("fits"):
        for key in ("tokens_per_second", "device_used_after_bytes", "initializer_range"):
            row[f"measured_{key}"] = measured.get(key)
    return row


def summarize(rows: list[dict], path: str) -> dict:
    """Median and largest |relative error| of predicted peak reserved on `path`, and cases within TOLERANCE."""
    errors = [abs(row[f"{path}_reserved_error"]) for row in rows if f"{path}_reserved_error" in row]
    if not errors:
        return {}
    return {"cases": len(errors), "median_abs_error": statistics.median(errors), "max_abs_error": max(errors),
            "within_5pct": sum(error <= TOLERANCE for error in errors),
            "failed_traces": sum(f"{path}_error" in row for row in rows)}


def format_row(row: dict, paths: list[str]) -> str:
    """accuracy.py's line (case | measured reserved GiB | per path: predicted GiB, error) | paged GiB."""
    from benchmarks.accuracy import format_row as accuracy_line

    line = accuracy_line(row, paths)
    paged = row["paged_state_bytes"]
    line += f" | {paged / GIB:6.2f}" if paged else f" | {'':6s}"
    if "measured_error" in row and not row["measured_error"].startswith("not measured"):
        line += f"  [measure: {row['measured_error'][:50]}]"
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    prediction_arguments(parser)
    parser.add_argument("--jobs", type=int, default=1,
                        help="measure this many small cases at once, each in its own process on the same GPU: "
                             "peaks are per-process allocator statistics, so they are unaffected; tokens/s and "
                             "device memory left in use are then not recorded (default 1)")
    parser.add_argument("--out", default="benchmarks/results/lowbit.json")
    parser.add_argument("--measure-one", default="", help=argparse.SUPPRESS)  # the isolated measurement process
    parser.add_argument("--row-out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure_one:
        Path(args.row_out).write_text(json.dumps(measure_here(args.measure_one)))
        return

    cases = [case for case in CASES if any(text in case_name(case) for text in args.match)]
    environment = None
    if args.measured:
        args.no_measure = True
        environment = {"measurements_from": args.measured}
    if not args.no_measure:
        from benchmarks.ground_truth import environment as describe

        environment = describe()
    print(f"{'case':66s} {'measured':>8s}" + "".join(f" | {path + ' GiB':>8s} {'error':>7s}" for path in args.paths)
          + f" | {'paged':>6s}", flush=True)
    measured = {} if args.no_measure else measure_all(cases, args.jobs, Path(args.out).with_suffix(".measured.jsonl"))
    if args.measured:
        recorded = [json.loads(line) for line in Path(args.measured).read_text().splitlines() if line.strip()]
        measured = {row["case"]: row for row in recorded}
    rows = []
    for case in cases:
        rows.append(case_row(case, measured.get(case_name(case)), args.paths))
        print(format_row(rows[-1], args.paths), flush=True)
    summary = {path: summarize(rows, path) for path in args.paths}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"environment": environment, "summary": summary, "rows": rows}, indent=1))
    for path, stats in summary.items():
        if stats:
            print(f"{path}: {stats['cases']} cases, median |error| {100 * stats['median_abs_error']:.2f}%, "
                  f"max {100 * stats['max_abs_error']:.2f}%, {stats['within_5pct']} within 5%, "
                  f"{stats['failed_traces']} traces failed")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
