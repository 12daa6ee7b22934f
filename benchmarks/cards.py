"""The card's kernels and the attention implementation, predicted vs measured on one GPU (issue 16, items 3 and 4).

Two groups of cases, each measured with memtune's trial recipe (`measure.verify.measure`: 3 optimizer steps,
accumulation cut to 2 micro-batches, peaks as deltas over the allocator's state before the trial, cuBLAS workspaces
created first) and predicted by `predict.estimate` on both trace paths (fake CUDA and the CPU emulation):

- eager vs sdpa (`--attn`): Qwen2.5-0.5B and Llama-3.2-1B at 1 x 2048, bf16-mixed, on the GPU as it is;
- emulated older cards on a newer GPU: a T4-like run (16 GiB through torch.cuda.set_per_process_memory_fraction,
  fp16-mixed, flash and cuDNN SDPA off: torch.backends.cuda.enable_flash_sdp(False)) and a V100-like run (32 GiB,
  the same), predicted as `memtune plan --gpu T4-16GB` / `--gpu V100-32GB` predicts them (TrainConfig.gpu_capability
  7.5 / 7.0: the trace lets torch pick only the kernels such a card has).

What cannot be emulated on a Hopper card, so these cases do not test it:
- the older card's own kernels: sm70/sm75 tensor cores, their cuBLAS / cuBLASLt algorithms and workspace sizes
  (cuBLAS picks its workspace by architecture), the memory-efficient kernel's sm70/sm75 build and its speed; the
  CUDA context of the older card (the context and workspaces are outside the compared peaks here, and `probe`
  measures them on the real card);
- speed: the step times of the emulated runs are the H200's (recorded, not compared);
- the memory fraction caps torch's pool, not the device: a run that fits the fraction but would not fit the older
  card's real free memory (its context is smaller or larger) is not caught;
- bf16 missing: the emulated runs use fp16-mixed as memtune plans it for those cards, but the H200 could run bf16.

On the GPU (under 4 minutes on an H200):
    PYTHONPATH=. python3 benchmarks/cards.py --out benchmarks/results/cards_h200.json
Anywhere (predictions only, both paths where a GPU is visible, else the CPU path):
    PYTHONPATH=. python3 benchmarks/cards.py --no-measure --out /tmp/cards.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from memtune.config import GIB, TrainConfig, gpu_card  # noqa: E402
from memtune.predict.estimate import estimate  # noqa: E402
from memtune.sources import catalog_config  # noqa: E402


@dataclass(frozen=True)
class CardCase:
    """One measured and predicted step. `card`: the card emulated (None: the GPU as it is)."""

    name: str
    model: str
    config: TrainConfig
    card: str | None = None


def cases() -> list[CardCase]:
    """The cases, eager vs sdpa first. The emulated ones use grouped-query models (sdpa runs the math kernel below
    sm80: torch's memory-efficient kernel takes no grouped KV heads) and GPT-2 medium (multi-head: the
    memory-efficient kernel)."""
    found = []
    for model in ("Qwen/Qwen2.5-0.5B", "meta-llama/Llama-3.2-1B"):
        for attn in ("sdpa", "eager"):
            config = TrainConfig(seq_len=2048, micro_batch_size=1, amp="bf16", attn=attn)
            found.append(CardCase(f"{model.split('/')[-1]} {attn} 1x2048 bf16-mixed", model, config))
    emulated = [("T4-16GB", "Qwen/Qwen2.5-0.5B", 1, 1024), ("T4-16GB", "gpt2-medium", 2, 1024),
                ("V100-32GB", "meta-llama/Llama-3.2-1B", 1, 1024), ("V100-32GB", "Qwen/Qwen2.5-0.5B", 2, 1024)]
    for card, model, micro, seq in emulated:
        config = TrainConfig(seq_len=seq, micro_batch_size=micro, amp="fp16",
                             gpu_capability=gpu_card(card).capability)
        found.append(CardCase(f"{card}-like {model.split('/')[-1]} {micro}x{seq} fp16-mixed sdpa", model, config, card))
    return found


@contextlib.contextmanager
def emulated_card(card: str | None) -> Iterator[None]:
    """On this GPU, an older card as far as torch allows: its memory as the process's fraction, and no flash or cuDNN
    SDPA kernel (sm80+ only). Restores both afterwards."""
    import torch

    if card is None:
        yield
        return
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, gpu_card(card).total_bytes / total))
    torch.backends.cuda.enable_flash_sdp(False)
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.backends.cuda.enable_flash_sdp(True)
        torch.backends.cuda.enable_cudnn_sdp(True)


def measure_case(case: CardCase) -> dict:
    """The measured peaks of `case` (bytes), or why there are none."""
    from memtune.measure.verify import measure

    started = time.perf_counter()
    try:
        with emulated_card(case.card):
            measured = measure(catalog_config(case.model), case.config, steps=3)
    except Exception as error:  # noqa: BLE001 - report and continue
        return {"measured_error": f"{type(error).__name__}: {error}"[:300]}
    row = {"measure_seconds": time.perf_counter() - started, "fits": measured.fits,
           "step_seconds": measured.step_seconds}
    if measured.fits:
        row.update(measured_allocated_bytes=measured.peak_allocated_bytes,
                   measured_reserved_bytes=measured.peak_reserved_bytes)
    else:
        row["measured_error"] = measured.error or "out of memory"
    return row


def predict_case(case: CardCase, path: str) -> dict:
    """The predicted peaks of `case` on trace path `path` (bytes), with the errors against a measurement."""
    started = time.perf_counter()
    try:
        predicted = estimate(catalog_config(case.model), case.config, device=path)
    except Exception as error:  # noqa: BLE001 - report and continue
        return {f"{path}_error": f"{type(error).__name__}: {error}"[:300]}
    return {f"{path}_allocated_bytes": predicted.peak_allocated_bytes,
            f"{path}_reserved_bytes": predicted.peak_reserved_bytes, f"{path}_ran_on": predicted.trace_device,
            f"{path}_seconds": time.perf_counter() - started}


def with_errors(row: dict, paths: list[str]) -> dict:
    """`row` with each path's relative error of peak allocated and reserved (predicted / measured - 1)."""
    for path in paths:
        for key in ("allocated", "reserved"):
            if f"measured_{key}_bytes" in row and f"{path}_{key}_bytes" in row:
                row[f"{path}_{key}_error"] = row[f"{path}_{key}_bytes"] / row[f"measured_{key}_bytes"] - 1
    return row


def format_row(row: dict, paths: list[str]) -> str:
    """One line of the table: measured and predicted peak reserved in GiB, the errors in %."""
    measured = row.get("measured_reserved_bytes")
    line = f"{row['case']:52s} {measured / GIB if measured else float('nan'):8.2f}"
    for path in paths:
        value, error = row.get(f"{path}_reserved_bytes"), row.get(f"{path}_reserved_error")
        line += f" | {value / GIB if value else float('nan'):8.2f} " + (f"{100 * error:+6.2f}%" if error is not None
                                                                          else "     - ")
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-measure", action="store_true", help="predict only (no GPU needed)")
    parser.add_argument("--paths", nargs="+", choices=("cuda", "cpu"), default=None,
                        help="trace paths to predict with (default: both where a GPU is visible, else cpu)")
    parser.add_argument("--match", default="", help="only cases whose name contains this text")
    parser.add_argument("--out", default="benchmarks/results/cards.json")
    args = parser.parse_args()
    import torch

    paths = args.paths or (["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"])
    selected = [case for case in cases() if args.match in case.name]
    header = f"{'case':52s} {'measured':>8s}" + "".join(f" | {path + ' GiB':>8s} {'error':>7s}" for path in paths)
    print(header, flush=True)
    rows: list[dict] = []
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    summary: dict = {}
    for case in selected:
        row: dict = {"case": case.name, "model": case.model, "card": case.card, "config": case.config.to_dict()}
        if not args.no_measure:
            row.update(measure_case(case))
        for path in paths:
            row.update(predict_case(case, path))
        rows.append(with_errors(row, paths))
        print(format_row(row, paths), flush=True)
        errors = {path: [abs(row[f"{path}_reserved_error"]) for row in rows if f"{path}_reserved_error" in row]
                  for path in paths}
        summary = {path: {"cases": len(found), "max_abs_error": max(found, default=None)}
                   for path, found in errors.items()}
        out.write_text(json.dumps({"device": device, "torch": torch.__version__, "summary": summary, "rows": rows},
                                  indent=1))  # after every case: a run cut short keeps what it measured
    for path, stats in summary.items():
        if stats["cases"]:
            print(f"{path}: {stats['cases']} measured cases, max |error| of peak reserved "
                  f"{100 * stats['max_abs_error']:.2f}%")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
