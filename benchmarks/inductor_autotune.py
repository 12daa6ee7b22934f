"""What Inductor's first-launch autotuning holds while torchao's compiled optimizer step runs for the first time
(issue 13: Llama-3.2-1B with adamw_torch_8bit measured 19.48 GiB reserved against 17.77 predicted, allocated
exact; the allocator's history showed `clone_preserve_strides` copies of the step's in-place arguments).

The rule it measures is torch's: a Triton kernel with more than one config benchmarks each config at its first
launch (torch/_inductor/runtime/triton_heuristics.py `CachingAutotuner.run` -> `autotune_to_one_config` ->
`benchmark_all_configs` -> `bench`), and every benchmarked call clones the kernel's mutated arguments first
(`maybe_clone_args`, "to avoid autotune contaminating them"); the benchmarker holds an L2-sized flush buffer
meanwhile (torch/_inductor/runtime/benchmarking.py `benchmark_gpu`). The winner is cached on disk by the
kernel's source (`autotune_local_cache`), so the same kernel compiled again, in this process or a later one
with the same cache directory, does not benchmark.

On the GPU machine (torchao installed or its wheel on PYTHONPATH):
    PYTHONPATH=. python3 benchmarks/inductor_autotune.py --out $OUT/inductor_autotune.json

Part 1 (`kernels`): for each torchao optimizer variant, a fresh process with a fresh Inductor cache directory
steps one parameter of each Llama-3.2-1B shape, in the order the model's parameters come, and records for each
kernel that benchmarks: its name, how many configs, how many benchmarked calls, the bytes of its mutated
(cloned) arguments and of all its tensor arguments, the parameter it ran for, and the growth of the peak
allocated and reserved memory during the benchmark.
Part 2 (`cold_warm`): benchmarks/lowbit.py's Llama-3.2-1B adamw_torch_8bit case measured twice, each in a fresh
process sharing one Inductor cache directory: cold (compile and autotune), then warm (caches hit).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

GIB = 1 << 30
HIDDEN, INTERMEDIATE, KV, VOCAB = 2048, 8192, 512, 128256
QWEN_05B_SHAPES = [  # Qwen2.5-0.5B's (tied embedding, biased q/k/v), in model order
    ("embed_tokens", (151936, 896)), ("q_proj", (896, 896)), ("q_proj.bias", (896,)), ("k_proj", (128, 896)),
    ("k_proj.bias", (128,)), ("o_proj", (896, 896)), ("gate_proj", (4864, 896)), ("down_proj", (896, 4864)),
    ("input_layernorm", (896,)),
]
LLAMA_1B_SHAPES = [  # Llama-3.2-1B's parameters in model order: the embedding, one decoder layer, the final norm
    ("embed_tokens", (VOCAB, HIDDEN)), ("q_proj", (HIDDEN, HIDDEN)), ("k_proj", (KV, HIDDEN)),
    ("v_proj", (KV, HIDDEN)), ("o_proj", (HIDDEN, HIDDEN)), ("gate_proj", (INTERMEDIATE, HIDDEN)),
    ("up_proj", (INTERMEDIATE, HIDDEN)), ("down_proj", (HIDDEN, INTERMEDIATE)), ("input_layernorm", (HIDDEN,)),
    ("post_attention_layernorm", (HIDDEN,)), ("norm", (HIDDEN,)),
]
VARIANTS = {  # name -> (torchao optimizer class, parameter dtype, bf16 stochastic rounding)
    "adamw_torch_8bit fp32": ("AdamW8bit", "float32", False),
    "adamw_torch_4bit fp32": ("AdamW4bit", "float32", False),
    "adamw_torch_8bit bf16 sr": ("AdamW8bit", "bfloat16", True),
    "adamw_torch_4bit bf16": ("AdamW4bit", "bfloat16", False),
    "adamw_torch_4bit bf16 sr": ("AdamW4bit", "bfloat16", True),
}
LOWBIT_CASE = "meta-llama/Llama-3.2-1B 2x1024 bf16-mixed adamw_torch_8bit"


def kernels(variant: str, model: str = "llama") -> dict[str, Any]:
    """Step one parameter of each shape with `variant` (this process: a fresh Inductor cache directory) and
    record every kernel that benchmarks its configs."""
    import torch
    import torchao.optim
    from torch._inductor.runtime import triton_heuristics

    class_name, dtype_name, rounding = VARIANTS[variant]
    dtype = getattr(torch, dtype_name)
    records: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    autotuner = triton_heuristics.CachingAutotuner
    original_benchmark, original_clone = autotuner.benchmark_all_configs, autotuner.maybe_clone_args

    def nbytes(value: Any) -> int:
        return value.untyped_storage().nbytes() if isinstance(value, torch.Tensor) else 0

    def benchmark_all_configs(self: Any, *args: Any, **kwargs: Any) -> Any:
        names = list(self.fn.arg_names[: len(args)])
        torch.cuda.synchronize()
        allocated, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
        torch.cuda.reset_peak_memory_stats()
        current["calls"] = 0
        timings = original_benchmark(self, *args, **kwargs)
        torch.cuda.synchronize()
        records.append({
            "parameter": current["parameter"], "allocated_at_start": allocated - current["before"],
            "kernel": self.inductor_meta.get("kernel_name", self.fn.__name__),
            "configs": len(self.launchers), "benchmarked_calls": current["calls"],
            "mutated_bytes": [nbytes(arg) for name, arg in zip(names, args, strict=False)
                              if name in self.mutated_arg_names],
            "mutated_names": [name for name in names if name in self.mutated_arg_names],
            "argument_bytes": [nbytes(arg) for arg in args if isinstance(arg, torch.Tensor)],
            "peak_allocated_growth": torch.cuda.max_memory_allocated() - allocated,
            "reserved_growth": torch.cuda.max_memory_reserved() - reserved,
        })
        return timings

    def maybe_clone_args(self: Any, *args: Any, **kwargs: Any) -> Any:
        current["calls"] = current.get("calls", 0) + 1
        return original_clone(self, *args, **kwargs)

    autotuner.benchmark_all_configs, autotuner.maybe_clone_args = benchmark_all_configs, maybe_clone_args
    shapes = QWEN_05B_SHAPES if model == "qwen" else LLAMA_1B_SHAPES
    params = [torch.nn.Parameter(torch.randn(shape, device="cuda", dtype=dtype) * 0.02) for _, shape in shapes]
    for param in params:
        param.grad = torch.randn_like(param) * 1e-3
    kwargs = {"bf16_stochastic_round": True} if rounding else {}
    optimizer = getattr(torchao.optim, class_name)(params, lr=1e-4, **kwargs)
    steps = []
    for (name, shape), param in zip(shapes, params, strict=True):  # one parameter per step: who autotunes
        current["parameter"] = name
        for group in optimizer.param_groups:
            group["params"] = [param]
        torch.cuda.synchronize()
        before = torch.cuda.memory_reserved()
        current["before"] = torch.cuda.memory_allocated()
        optimizer.step()
        torch.cuda.synchronize()
        steps.append({"parameter": name, "shape": list(shape), "numel": param.numel(),
                      "element_bytes": param.element_size(), "reserved_growth": torch.cuda.memory_reserved() - before})
    return {"variant": variant, "model": model, "torch": torch.__version__, "gpu": torch.cuda.get_device_name(),
            "l2_cache_bytes": torch.cuda.get_device_properties(0).L2_cache_size, "steps": steps, "kernels": records}


def in_fresh_process(arguments: list[str], env: dict[str, str]) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        done = subprocess.run([sys.executable, __file__, *arguments, "--row-out", out.name], env=env,
                              capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            return {"error": (done.stderr.strip().splitlines() or ["no output"])[-3:]}
        return json.loads(Path(out.name).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/inductor_autotune.json")
    parser.add_argument("--variant", default="", help=argparse.SUPPRESS)  # one process of part 1
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # one process of part 2
    parser.add_argument("--model", default="llama", choices=["llama", "qwen"],
                        help="whose parameter shapes part 1 steps (Llama-3.2-1B or Qwen2.5-0.5B)")
    parser.add_argument("--only", default="", help="only the variants whose name has this text; skip part 2")
    parser.add_argument("--row-out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        Path(args.row_out).write_text(json.dumps(kernels(args.variant, args.model)))
        return
    if args.measure:
        from benchmarks.lowbit import measure_here

        Path(args.row_out).write_text(json.dumps(measure_here(LOWBIT_CASE)))
        return
    result: dict[str, Any] = {"kernels": [], "cold_warm": {}}
    for variant in [variant for variant in VARIANTS if args.only in variant]:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(prefix="inductor-")}
        row = in_fresh_process(["--variant", variant, "--model", args.model], env)
        result["kernels"].append(row)
        for kernel in row.get("kernels", []):
            print(f"{variant:26s} {kernel['parameter']:18s} at +{kernel['allocated_at_start'] >> 20:5d} MiB "
                  f"{kernel['configs']} configs x "
                  f"{kernel['benchmarked_calls']:2d} calls, clones {[b >> 20 for b in kernel['mutated_bytes']]} MiB, "
                  f"peak +{kernel['peak_allocated_growth'] >> 20} MiB, reserved +{kernel['reserved_growth'] >> 20} MiB",
                  flush=True)
        if "error" in row:
            print(variant, row["error"], flush=True)
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(prefix="inductor-")}
    for run in ("cold", "warm") if not args.only else ():
        measured = in_fresh_process(["--measure"], env)
        result["cold_warm"][run] = measured
        print(f"{LOWBIT_CASE} {run}: reserved {measured.get('peak_reserved_bytes', 0) / GIB:.2f} GiB, allocated "
              f"{measured.get('peak_allocated_bytes', 0) / GIB:.2f} GiB {measured.get('error', '')}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
