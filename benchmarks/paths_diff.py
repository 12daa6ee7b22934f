"""Where do the two trace paths differ? One step traced on fake CUDA and on the CPU emulation, op by op.

    PYTHONPATH=. python benchmarks/paths_diff.py --architecture falcon --configuration bf16-mixed
    PYTHONPATH=. python benchmarks/paths_diff.py --catalog google/gemma-2-2b --layers 2 --batch 2 --seq-len 1024

Every new storage a traced step allocates is logged with the aten op that made it, its dtype, shape, decoder
layer and phase. The two logs are compared as multisets: the rows printed are (op, dtype, shape, phase) with
a different count on each path, largest bytes first; a trace that fails prints its full traceback (the
data-dependent ops of a model under fake tensors are found this way). The fake-CUDA path needs a GPU:
without one only the CPU log is printed. `--out FILE` writes both logs and the differences as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.paths_agree import CONFIGURATIONS, config_of  # noqa: E402
from memtune.predict import trace as tracing  # noqa: E402

Key = tuple[str, str, tuple[int, ...], str]


def op_log(model_config: Any, train_config: Any, device: str) -> tuple[Counter[Key], dict[Key, int], str]:
    """(count per (op, dtype, shape, phase), bytes of one such storage, traceback or "") of one traced step."""
    log: list[tuple[Key, int]] = []
    dispatch = tracing.StorageCounter.__torch_dispatch__

    def logged(self: Any, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        first = self._next_id
        out = dispatch(self, func, types, args, kwargs)
        if self._next_id > first:
            tensors = [t for t in tracing.tree_flatten(out)[0] if isinstance(t, tracing.torch.Tensor)]
            for index, storage_id in enumerate(range(first, self._next_id)):
                tensor = tensors[min(index, len(tensors) - 1)] if tensors else None
                key = (str(func), str(tensor.dtype) if tensor is not None else "?",
                       tuple(tensor.shape) if tensor is not None else (), str(getattr(self.phase, "value", self.phase)))
                log.append((key, self._sizes.get(storage_id, 0)))
        return out

    tracing.StorageCounter.__torch_dispatch__ = logged  # type: ignore[method-assign]
    try:
        tracing.trace_step(model_config, train_config, device=device, steps=1)
        failure = ""
    except Exception:  # noqa: BLE001 - the traceback is the result
        failure = traceback.format_exc()
    finally:
        tracing.StorageCounter.__torch_dispatch__ = dispatch  # type: ignore[method-assign]
    return Counter(key for key, _ in log), {key: size for key, size in log}, failure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--architecture", help="a benchmarks/cases.py TINY_ARCHITECTURES type, scaled as paths_agree")
    parser.add_argument("--catalog", help="a catalog hub id instead (published shapes)")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of a --catalog model")
    parser.add_argument("--configuration", default="bf16-mixed", choices=list(CONFIGURATIONS))
    parser.add_argument("--batch", type=int, default=0, help="micro-batch (default: the configuration's)")
    parser.add_argument("--seq-len", type=int, default=0)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    import torch

    if args.catalog:
        from memtune.sources import catalog_config

        model_config = catalog_config(args.catalog)
        model_config.num_hidden_layers = args.layers
        if getattr(model_config, "layer_types", None):
            model_config.layer_types = model_config.layer_types[: args.layers]
        name = f"{args.catalog}[{args.layers}L]"
    else:
        model_config = config_of(args.architecture)
        name = args.architecture
    train_config = CONFIGURATIONS[args.configuration]
    train_config = train_config.replace(micro_batch_size=args.batch or train_config.micro_batch_size,
                                        seq_len=args.seq_len or train_config.seq_len)
    paths = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    logs = {path: op_log(model_config, train_config, path) for path in paths}
    print(f"{name} {args.configuration} {train_config.micro_batch_size}x{train_config.seq_len}")
    result: dict[str, Any] = {"case": name, "configuration": args.configuration, "paths": {}}
    for path, (counts, sizes, failure) in logs.items():
        total = sum(sizes[key] * count for key, count in counts.items())
        print(f"  {path}: {sum(counts.values())} allocations, {total / 2**20:.1f} MiB allocated in all"
              + (f"\n  {path} trace FAILED:\n{failure}" if failure else ""))
        result["paths"][path] = {"allocations": sum(counts.values()), "bytes": total, "failure": failure}
    if len(logs) == 2:
        (cpu, cpu_sizes, _), (cuda, cuda_sizes, _) = logs["cpu"], logs["cuda"]
        differing = [(key, cuda.get(key, 0), cpu.get(key, 0), cuda_sizes.get(key) or cpu_sizes.get(key, 0))
                     for key in set(cpu) | set(cuda) if cpu.get(key, 0) != cuda.get(key, 0)]
        differing.sort(key=lambda row: -abs(row[1] - row[2]) * row[3])
        print(f"  {len(differing)} (op, dtype, shape, phase) differ; cuda count, cpu count, MiB each:")
        for (op, dtype, shape, phase), on_cuda, on_cpu, size in differing[: args.rows]:
            print(f"    {op:55s} {dtype:15s} {str(shape):28s} {phase:11s} {on_cuda:4d} {on_cpu:4d} {size / 2**20:9.2f}")
        result["differences"] = [{"op": key[0], "dtype": key[1], "shape": key[2], "phase": key[3], "cuda": a,
                                  "cpu": b, "bytes": size} for key, a, b, size in differing]
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
