"""The search where the low-bit rungs (issue 13) or partial checkpointing (issue 14) decide: memtune's verified
choice against a small measured grid.

Four scenarios, each on this GPU made as small as the card it stands for: the process first takes all free
device memory but `cap` into a ballast tensor it never frees, so torch's pool and CUDA unified memory (where
bitsandbytes' paged optimizers keep their state) share `cap` bytes, as on a card of that size. (A
set_per_process_memory_fraction cap, as benchmarks/search.py uses, bounds torch's pool only: paged state would
then sit in the rest of the GPU and never be evicted.)

- Mistral-7B (LoRA allowed) on 16 GiB, 16 x 1024 tokens per optimizer step: a bf16 base just fits, at
  micro-batch 1 with checkpointing; QLoRA would fit larger micro-batches but is walked after every 16-bit base.
- Mistral-7B on 12 GiB: a bf16 base (13.5 GiB of weights) cannot fit, so the search reaches QLoRA.
- Llama-3.2-3B full fine-tuning (--no-lora) on 40 GiB, 16 x 1024: fp32 master weights with fused AdamW need
  ~51 GB of state, so the search reaches 8-bit AdamW / pure bf16 (offload left out, as in benchmarks/search.py).
- Gemma-2-2B full fine-tuning on 64 GiB, 16 x 1024 (issue 14's case): no checkpointing fits only small
  micro-batches, checkpointing every layer leaves memory unused; partial checkpointing is between.

For each: `fit_model` with trial steps (memtune's choice, the wall time to the verified fit), then every grid
configuration and memtune's choice measured under the same cap in a fresh process each (bitsandbytes' paged
state is never freed), 3 full optimizer steps (no accumulation shortcut, so tokens/s compare across
accumulation): fits or not, peak reserved, tokens/s. The report: the chosen plan's measured tokens/s against the
best measured grid configuration that fits.

    PYTHONPATH=. python3 benchmarks/lowbit_search.py --out $OUT/lowbit_search.json [--scenarios 0 1]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from memtune.config import GIB, Adapter, Policy, Quantization, TrainConfig  # noqa: E402


def lora(micro: int, checkpointing: bool = True, bits: int | None = 4, seq_len: int = 1024, batch: int = 16,
         **changes: object) -> TrainConfig:
    """LoRA r16 all-linear on a bf16 or quantised base, bf16 autocast, `batch` sequences of `seq_len` per step."""
    return TrainConfig(seq_len=seq_len, micro_batch_size=micro, grad_accum_steps=batch // micro, weights_dtype="bf16",
                       amp="bf16", gradient_checkpointing=checkpointing, adapter=Adapter(),
                       quantization=None if bits is None else Quantization(bits=bits)).replace(**changes)


def full(micro: int, optimizer: str = "adamw_torch_fused", pure: bool = False, checkpointing: bool = True,
         loss: str = "standard", layers: int | None = None, seq_len: int = 1024, batch: int = 16,
         **changes: object) -> TrainConfig:
    """Full fine-tuning, bf16-mixed (fp32 master weights) or pure bf16, `batch` sequences of `seq_len` per step;
    `layers`: checkpoint only the first ones."""
    precision = {"weights_dtype": "bf16", "amp": "none"} if pure else {"weights_dtype": "fp32", "amp": "bf16"}
    return TrainConfig(seq_len=seq_len, micro_batch_size=micro, grad_accum_steps=batch // micro, optimizer=optimizer,
                       gradient_checkpointing=checkpointing, checkpoint_layers=layers, loss=loss,
                       **precision).replace(**changes)


@dataclass(frozen=True)
class Scenario:
    model: str
    cap_gib: int
    policy: Policy
    grid: list[TrainConfig] = field(hash=False)
    seq_len: int = 1024
    batch: int = 16

    @property
    def name(self) -> str:
        return (f"{self.model} {self.batch}x{self.seq_len} @{self.cap_gib}GiB"
                + ("" if self.policy.use_adapter is not False else " full"))


LONG_LORA = {"seq_len": 8192, "batch": 8, "bits": None, "loss": "chunked", "amp": "none"}
"""Scenario 4: LoRA on a bf16 base at 8 x 8192 tokens, where the checkpointed layers' inputs are a large share."""
QWEN_FULL = {"seq_len": 2048, "batch": 16, "loss": "chunked"}
"""Scenario 5: Qwen2.5-1.5B full fine-tuning at 16 x 2048, where partial checkpointing and the allocator decide."""


SCENARIOS = [
    Scenario("mistralai/Mistral-7B-v0.1", 16, Policy(allow_offload=False), [
        lora(1, bits=None), lora(1), lora(2), lora(4), lora(8), lora(1, checkpointing=False), lora(2, bits=8),
    ]),
    Scenario("mistralai/Mistral-7B-v0.1", 12, Policy(allow_offload=False), [lora(2), lora(4)]),
    Scenario("meta-llama/Llama-3.2-3B", 40, Policy(allow_offload=False, use_adapter=False), [
        full(4, "adamw_bnb_8bit"), full(8, "adamw_bnb_8bit"),
        full(4, "paged_adamw_8bit"), full(16, "paged_adamw_8bit", loss="chunked"),
        full(4, "adamw_torch_fused", pure=True), full(8, "adamw_torch_fused", pure=True),
        full(2, "adamw_torch_fused", pure=True, checkpointing=False),
    ]),
    Scenario("google/gemma-2-2b", 64, Policy(allow_offload=False, use_adapter=False), [
        full(2, "adamw_torch_fused", checkpointing=False),  # issue 14's fastest measured: 15.7k tokens/s, 63.1 GiB
        full(16, "adamw_torch_fused", loss="chunked"),  # memtune's choice before partial checkpointing: 14.4k
        full(8, "adamw_torch_fused"), full(4, "adamw_torch_fused", layers=13),
        full(8, "adamw_torch_fused", layers=19), full(16, "adamw_torch_fused", loss="chunked", layers=13),
    ]),
    Scenario("meta-llama/Llama-3.2-1B", 10, Policy(allow_offload=False, use_adapter=True, allow_quantized_base=False), [
        lora(4, offload_activations=True, **LONG_LORA), lora(2, **LONG_LORA),
        lora(2, offload_activations=True, **LONG_LORA), lora(4, checkpoint_layers=8, **LONG_LORA),
        lora(1, checkpointing=False, **LONG_LORA), lora(2, expandable_segments=True, **LONG_LORA),
    ], seq_len=8192, batch=8),
    Scenario("Qwen/Qwen2.5-1.5B", 32, Policy(allow_offload=False, use_adapter=False), [
        full(16, layers=27, expandable_segments=True, **QWEN_FULL), full(16, **QWEN_FULL),
        full(16, expandable_segments=True, **QWEN_FULL), full(8, **QWEN_FULL),
        full(16, offload_activations=True, **QWEN_FULL), full(4, checkpointing=False, **QWEN_FULL),
    ], seq_len=2048, batch=16),
]


BALLAST: list = []
"""The tensor that holds the device memory the emulated card does not have (kept for the process's life)."""


def set_cap(cap_gib: int) -> None:
    """Leave `cap_gib` GiB of device memory free to this process (beyond its CUDA context): the rest goes into a
    ballast tensor, allocated once and outside the trial's measured deltas."""
    import torch

    if BALLAST:
        return
    torch.cuda.init()
    free, _ = torch.cuda.mem_get_info()
    BALLAST.append(torch.empty(max(0, free - cap_gib * GIB), dtype=torch.uint8, device="cuda"))


def measure_one(model: str, cap_gib: int, config: TrainConfig) -> dict:
    """3 full optimizer steps of `config` under the cap, in this process."""
    from memtune.measure.verify import measure
    from memtune.sources import catalog_config

    set_cap(cap_gib)
    result = measure(catalog_config(model), config, steps=3, accumulation_limit=None)
    return result.to_dict()


def measure_isolated(model: str, cap_gib: int, config: TrainConfig) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        done = subprocess.run([sys.executable, __file__, "--one", json.dumps(config.to_dict()), "--model", model,
                               "--cap", str(cap_gib), "--row-out", out.name],
                              capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            return {"fits": False, "error": (done.stderr.strip().splitlines() or ["no output"])[-1][:300]}
        return json.loads(Path(out.name).read_text())


def run_fit_isolated(scenario: Scenario) -> dict:
    """`run_memtune` in a fresh process (its own ballast); a crash becomes {"error": ...}."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        done = subprocess.run([sys.executable, __file__, "--fit", str(SCENARIOS.index(scenario)),
                               "--row-out", out.name], capture_output=True, text=True, timeout=1200)
        if done.returncode != 0:
            return {"error": (done.stderr.strip().splitlines() or ["no output"])[-1][:300]}
        return json.loads(Path(out.name).read_text())


def run_memtune(scenario: Scenario) -> dict:
    """fit_model under the cap, with trial steps: the choice, its prediction, trials, wall time."""
    from memtune.fit import fit_model
    from memtune.measure.probe import probe
    from memtune.sources import parameter_count, resolve

    set_cap(scenario.cap_gib)
    started = time.perf_counter()
    gpu = probe().gpus[0]
    budget = scenario.cap_gib * GIB + gpu.context_bytes
    source = resolve(scenario.model)
    result = fit_model(source, parameter_count(source.config), scenario.seq_len, scenario.batch, budget_bytes=budget,
                       budget_label=f"cap {scenario.cap_gib} GiB", policy=scenario.policy)
    seconds = time.perf_counter() - started
    search = result.search
    chosen = search.chosen if search is not None else None
    return {
        "seconds_to_verified_fit": seconds - (search.explain_seconds if search else 0.0),
        "trials": search.trials if search else 0, "trial_ooms": search.trial_ooms if search else 0,
        "estimates": search.estimates if search else 0,
        "config": None if chosen is None else chosen.config.to_dict(),
        "description": None if chosen is None else chosen.config.describe(),
        "status": None if chosen is None else chosen.status,
        "predicted_total_bytes": None if chosen is None else chosen.predicted_total_bytes,
        "predicted_peak_reserved_bytes": None if chosen is None or chosen.estimate is None
        else chosen.estimate.peak_reserved_bytes,
        "predicted_tokens_per_second": None if chosen is None else chosen.predicted_tokens_per_second,
        "budget_bytes": budget,
        "trial_results": [{"description": c.config.describe(), "predicted_total_bytes": c.predicted_total_bytes,
                           "measured": c.measurement.to_dict(), "note": c.note}
                          for c in (search.candidates if search else []) if c.measurement is not None],
    }


def run_scenario(scenario: Scenario, grid: bool = True, fit: bool = True, match: str = "") -> dict:
    memtune: dict = {}
    if fit:
        memtune = run_fit_isolated(scenario)
    print(f"{scenario.name}: memtune chose {memtune.get('description')} in "
          f"{memtune.get('seconds_to_verified_fit', 0):.0f} s, {memtune.get('trials')} trials", flush=True)
    configs = [config for config in scenario.grid if match in config.describe()] if grid else []
    chosen = TrainConfig.from_dict(memtune["config"]) if memtune.get("config") else None
    if chosen is not None and chosen not in configs:
        configs.append(chosen)
    rows = []
    for config in configs:
        measured = measure_isolated(scenario.model, scenario.cap_gib, config)
        rows.append({"config": config.to_dict(), "description": config.describe(), "chosen": config == chosen,
                     "fits": measured.get("fits", False), "peak_reserved_bytes": measured.get("peak_reserved_bytes"),
                     "tokens_per_second": measured.get("tokens_per_second") if measured.get("fits") else None,
                     "error": measured.get("error", "")})
        row = rows[-1]
        speed = f"{row['tokens_per_second']:8.0f} tok/s" if row["fits"] else "     OOM/error"
        peak = f"{row['peak_reserved_bytes'] / GIB:6.2f} GiB" if row["fits"] else ""
        print(f"  {'*' if row['chosen'] else ' '} {row['description'][:90]:90s} {speed} {peak}", flush=True)
    fitting = [row for row in rows if row["fits"]]
    best = max(fitting, key=lambda row: row["tokens_per_second"], default=None)
    chosen_row = next((row for row in rows if row["chosen"]), None)
    ratio = (chosen_row["tokens_per_second"] / best["tokens_per_second"]
             if best and chosen_row and chosen_row["fits"] else None)
    return {"scenario": scenario.name, "model": scenario.model, "cap_gib": scenario.cap_gib, "memtune": memtune,
            "grid": rows, "best_measured": best and best["description"],
            "chosen_over_best_tokens_per_second": ratio}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/lowbit_search.json")
    parser.add_argument("--scenarios", type=int, nargs="*", default=None, help="indices into SCENARIOS")
    parser.add_argument("--no-grid", action="store_true", help="measure memtune's choice only, not the grid")
    parser.add_argument("--no-fit", action="store_true", help="measure the grid only (no memtune fit)")
    parser.add_argument("--match", default="", help="only grid configurations whose description has this text")
    parser.add_argument("--one", default="", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="", help=argparse.SUPPRESS)
    parser.add_argument("--cap", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--fit", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--row-out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        row = measure_one(args.model, args.cap, TrainConfig.from_dict(json.loads(args.one)))
        Path(args.row_out).write_text(json.dumps(row))
        return
    if args.fit is not None:
        Path(args.row_out).write_text(json.dumps(run_memtune(SCENARIOS[args.fit])))
        return

    from benchmarks.ground_truth import environment

    chosen = [SCENARIOS[i] for i in args.scenarios] if args.scenarios is not None else SCENARIOS
    results = [run_scenario(scenario, grid=not args.no_grid, fit=not args.no_fit, match=args.match)
               for scenario in chosen]
    for result in results:
        ratio = result["chosen_over_best_tokens_per_second"]
        print(f"{result['scenario']}: chosen {result['memtune'].get('description')}; best measured "
              f"{result['best_measured']}; chosen/best tokens/s {'-' if ratio is None else f'{ratio:.2f}'}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"environment": environment(), "scenarios": results}, indent=1))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
