"""Standard vs chunked vs Liger's fused loss on one GPU: peak reserved memory measured and predicted (both trace
paths), and tokens/s measured and predicted.

    python -m pip install --no-deps .whl/liger_kernel-0.8.5-py3-none-any.whl   # or pip install -e ".[liger]"
    python3 benchmarks/fused_loss.py --out benchmarks/results/fused_loss_h200.json
    python3 benchmarks/fused_loss.py --out /tmp/fused_loss_dry.json --dry-run   # no GPU: CPU-path predictions only

Models are catalog configs at full depth with random weights: Qwen2.5-0.5B (152k vocabulary, tied), Llama-3.2-1B
(128k, tied) at 4 x 1024 and 4 x 2048, Gemma-2-2B (256k, final-logit softcapping, which Liger's kernel applies) at
4 x 1024; bf16-mixed, no checkpointing (where the loss is the largest share of the peak). Each configuration is
measured with `verify.measure` (3 steps) and predicted with `estimate` on fake CUDA tensors and on the CPU
emulation (`predict.liger` stands in for Liger's kernels on both). The Liger rows check its memory model
(allocation-equivalent stand-in) and its speed term (`throughput.GpuSpeed.liger_logits_traffic`, an assumption, and
`liger_weight_bytes_per_chunk`, fitted to results/fused_loss_h200.json). `--values` first compares the Liger loss
and its gradients with the standard loss on a 2-layer model (fp32 and bf16-mixed), so a wrong call of Liger shows
here.
About 3 minutes on an H200.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.chunked_loss import measure_into  # noqa: E402
from memtune.config import TrainConfig, liger_available  # noqa: E402
from memtune.measure import memory  # noqa: E402
from memtune.predict import throughput  # noqa: E402
from memtune.predict.estimate import estimate  # noqa: E402
from memtune.predict.liger import liger_chunk_size  # noqa: E402
from memtune.sources import catalog_config, parameter_count  # noqa: E402

GIB = 1 << 30
CASES = [("Qwen/Qwen2.5-0.5B", 1024), ("Qwen/Qwen2.5-0.5B", 2048), ("meta-llama/Llama-3.2-1B", 1024),
         ("meta-llama/Llama-3.2-1B", 2048), ("google/gemma-2-2b", 1024)]
MICRO_BATCH = 4
LOSSES = ("standard", "chunked", "liger")
TRACE_DEVICES = ("cuda", "cpu")


def grid(losses: tuple[str, ...] = LOSSES) -> list[tuple[str, TrainConfig]]:
    return [(model, TrainConfig(seq_len=seq_len, micro_batch_size=MICRO_BATCH, amp="bf16", loss=loss_kind))
            for (model, seq_len), loss_kind in itertools.product(CASES, losses)]


def run_case(model: str, config: TrainConfig, trace_devices: tuple[str, ...], measure: bool, card: str) -> dict:
    """One row: the predictions on each trace path, the predicted tokens/s and (on a GPU) the measurement; an error
    is recorded, not raised."""
    model_config = catalog_config(model)
    tokens = config.micro_batch_size * config.seq_len
    row: dict = {"model": model, "config": config.to_dict()}
    if config.loss == "liger":
        row["liger_chunk_tokens"] = liger_chunk_size(tokens, model_config.vocab_size, model_config.hidden_size)
    shape = throughput.ModelShape.of(model_config, parameter_count(model_config))
    row["predicted_tokens_per_second"] = throughput.tokens_per_second(shape, config, throughput.gpu_speed(card))
    for device in trace_devices:
        started = time.perf_counter()
        try:
            predicted = estimate(model_config, config, device=device)
            row[f"predicted_reserved_bytes_{device}"] = predicted.peak_reserved_bytes
            row[f"predicted_allocated_bytes_{device}"] = predicted.peak_allocated_bytes
            row[f"predicted_breakdown_{device}"] = predicted.breakdown
        except Exception as error:  # noqa: BLE001 - one broken case must not lose the others
            row[f"predict_error_{device}"] = f"{type(error).__name__}: {error}"[:300]
        row[f"predict_seconds_{device}"] = time.perf_counter() - started
    if measure:
        measure_into(row, model_config, config)
    return row


def check_values(device: str) -> list[dict]:
    """The Liger loss and gradients against the standard loss on a 2-layer Qwen2.5 (and Gemma-2, softcapped) with a
    small vocabulary: max absolute differences, fp32 and bf16-mixed."""
    import torch

    from memtune.recipe import step as recipe

    results = []
    for hub_id, amp in itertools.product(("Qwen/Qwen2.5-0.5B", "google/gemma-2-2b"), ("none", "bf16")):
        model_config = catalog_config(hub_id)
        model_config.num_hidden_layers, model_config.vocab_size = 2, 4096
        if getattr(model_config, "layer_types", None):
            model_config.layer_types = model_config.layer_types[:2]
        torch.manual_seed(0)
        input_ids = torch.randint(0, 4096, (2, 256), device=device)
        found: dict[str, tuple] = {}
        for loss_kind in ("standard", "liger"):
            config = TrainConfig(seq_len=256, micro_batch_size=2, amp=amp, loss=loss_kind)
            torch.manual_seed(1)
            model = recipe.build_model(model_config, config, device)
            with recipe.amp_context(config, device):
                loss = recipe.forward_loss(model, input_ids, input_ids, config)
            loss.backward()
            found[loss_kind] = (loss.detach().float(), {name: p.grad.float() for name, p in model.named_parameters()
                                                        if p.grad is not None})
        (standard_loss, standard_grads), (liger_loss, liger_grads) = found["standard"], found["liger"]
        results.append({
            "model": hub_id, "amp": amp, "loss_standard": standard_loss.item(), "loss_liger": liger_loss.item(),
            "max_abs_grad_difference": max((standard_grads[name] - liger_grads[name]).abs().max().item()
                                           for name in standard_grads),
            "max_abs_grad": max(grad.abs().max().item() for grad in standard_grads.values()),
            "same_parameters_with_grad": sorted(standard_grads) == sorted(liger_grads)})
        print(f"values {hub_id.split('/')[-1]:14s} amp {amp:4s}: loss {standard_loss.item():.5f} vs "
              f"{liger_loss.item():.5f}, max |grad diff| {results[-1]['max_abs_grad_difference']:.2e} "
              f"(max |grad| {results[-1]['max_abs_grad']:.2e})", flush=True)
    return results


def gib(row: dict, key: str) -> str:
    return f"{row[key] / GIB:8.2f}" if key in row else "       -"


HEADER = (f"{'model':14s} {'tokens':>9s} {'loss':8s} {'chunk':>5s} {'cuda GiB':>8s} {'cpu GiB':>8s} {'meas GiB':>8s} "
          f"{'err cuda':>8s} {'tok/s':>8s} {'pred t/s':>8s}")


def format_row(row: dict) -> str:
    config = row["config"]
    measured = row.get("measured_peak_reserved_bytes") if row.get("measured_fits") else None
    error = "OOM" if row.get("measured_fits") is False else ""
    if measured and "predicted_reserved_bytes_cuda" in row:
        error = f"{100 * (row['predicted_reserved_bytes_cuda'] / measured - 1):+7.1f}%"
    speed = f"{row['measured_tokens_per_second']:8.0f}" if row.get("measured_fits") else "       -"
    failure = next((row[key] for key in row if key.endswith("_error") or "_error_" in key), "")
    return (f"{row['model'].split('/')[-1]:14s} {config['micro_batch_size']:>4d}x{config['seq_len']:<4d} "
            f"{config['loss']:8s} {row.get('liger_chunk_tokens', ''):>5} {gib(row, 'predicted_reserved_bytes_cuda')} "
            f"{gib(row, 'predicted_reserved_bytes_cpu')} {gib(row, 'measured_peak_reserved_bytes')} {error:>8s} "
            f"{speed} {row['predicted_tokens_per_second']:8.0f}" + (f"  {failure[:70]}" if failure else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON file for the environment and every row")
    parser.add_argument("--dry-run", "--no-measure", dest="dry_run", action="store_true",
                        help="no GPU: predict on the CPU trace path only, measure nothing")
    parser.add_argument("--card", default="H200", help="the card whose speed the tokens/s prediction uses")
    parser.add_argument("--no-values", dest="values", action="store_false",
                        help="skip the value check of the Liger loss against the standard one (GPU only)")
    args = parser.parse_args()

    started = time.perf_counter()
    if args.dry_run:
        import torch

        env: dict = {"dry_run": True, "torch": torch.__version__}
        trace_devices: tuple[str, ...] = ("cpu",)
    else:
        from benchmarks.ground_truth import environment

        env = environment()
        env["workspace_bytes"] = memory.warm_up()
        trace_devices = TRACE_DEVICES
    env["liger_available"] = liger_available()
    losses = LOSSES if liger_available() or args.dry_run else ("standard", "chunked")
    if not liger_available():
        print(f"liger-kernel or triton missing: {'predicting' if args.dry_run else 'skipping'} the liger rows",
              file=sys.stderr)
    values = check_values("cuda") if args.values and not args.dry_run and liger_available() else []
    print(HEADER, flush=True)
    rows = []
    for model, config in grid(losses):
        rows.append(run_case(model, config, trace_devices, measure=not args.dry_run, card=args.card))
        print(format_row(rows[-1]), flush=True)
    env["seconds"] = time.perf_counter() - started
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"environment": env, "values": values, "rows": rows}, indent=1))
    print(f"\n{len(rows)} rows in {env['seconds']:.0f} s -> {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
