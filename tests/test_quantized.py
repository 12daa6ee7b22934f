"""The quantised base (QLoRA): its configuration, the model the recipe builds, and its trace on fake tensors.

The traced model is a Llama-3.2-1B-shaped tiny config (benchmarks.cases.tiny_llama) widened so that every
linear layer's shape, and so its weight's size, differs from the activations' sizes: q/o [256, 256],
k/v [128, 256], gate/up [768, 256], down [256, 768]; 2 sequences of 24 tokens.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from collections import Counter

import pytest

from memtune.config import Adapter, Quantization, TrainConfig
from memtune.errors import UsageError


def _bitsandbytes_imports() -> bool:
    if importlib.util.find_spec("bitsandbytes") is None:
        return False
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken build
        return False
    return True


needs_bitsandbytes = pytest.mark.skipif(not _bitsandbytes_imports(),
                                        reason='bitsandbytes cannot be imported here: pip install -e ".[quant]"')

LAYERS = 3
HIDDEN, INTERMEDIATE, KV = 256, 768, 128
LINEARS = {  # name: (out_features, in_features)
    "q_proj": (HIDDEN, HIDDEN), "k_proj": (KV, HIDDEN), "v_proj": (KV, HIDDEN), "o_proj": (HIDDEN, HIDDEN),
    "gate_proj": (INTERMEDIATE, HIDDEN), "up_proj": (INTERMEDIATE, HIDDEN), "down_proj": (HIDDEN, INTERMEDIATE),
}
VOCAB = 256
RANK = 16


def model_config():
    from benchmarks.cases import tiny_llama

    config = tiny_llama(LAYERS)
    config.hidden_size, config.intermediate_size = HIDDEN, INTERMEDIATE
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = 4, 2, 64
    return config


def train_config(quantization: Quantization | None, checkpointing: bool = False) -> TrainConfig:
    """LoRA r16 on all linear layers, bf16 weights and bf16 autocast (Trainer bf16=True), 2 x 24 tokens."""
    return TrainConfig(seq_len=24, micro_batch_size=2, weights_dtype="bf16", amp="bf16",
                       gradient_checkpointing=checkpointing, adapter=Adapter(rank=RANK), quantization=quantization)


def rounded(num_bytes: int) -> int:
    return max(512, math.ceil(num_bytes / 512) * 512)


def allocated_bytes(trace, category: str) -> int:
    return sum(e.num_bytes for e in trace.events if e.kind == "alloc" and trace.categories[e.source] == category)


def other_weight_bytes() -> int:
    """What is not quantised, all fp32 after prepare_model_for_kbit_training: the (tied) embedding, the norms
    (2 per layer and the final one), LoRA's A [r, in] and B [out, r] of every linear layer, and the rotary
    embedding's two buffers (inv_freq, original_inv_freq: head_dim / 2 values each)."""
    lora = sum(rounded(RANK * fan_in * 4) + rounded(fan_out * RANK * 4) for fan_out, fan_in in LINEARS.values())
    rotary = 2 * rounded(64 // 2 * 4)
    return rounded(VOCAB * HIDDEN * 4) + (2 * LAYERS + 1) * rounded(HIDDEN * 4) + LAYERS * lora + rotary


def packed_4bit_bytes(out_features: int, in_features: int, double_quant: bool) -> int:
    """functional.quantize_4bit's survivors: the packed weight, the 16-value code, and the scales of 64-value blocks
    (fp32; or in 8 bits with their mean and an fp32 scale per 256 of them and the 256-value code)."""
    numel = out_features * in_features
    blocks = math.ceil(numel / 64)
    packed = rounded((numel + 1) // 2) + rounded(16 * 4)
    if not double_quant:
        return packed + rounded(blocks * 4)
    return packed + rounded(4) + rounded(blocks) + rounded(4 * math.ceil(blocks / 256)) + rounded(256 * 4)


def trace(config: TrainConfig):
    from memtune.predict.trace import trace_step

    return trace_step(model_config(), config, device="cpu")


# -- configuration ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("quantization", [Quantization(), Quantization(bits=8),
                                          Quantization(quant_type="fp4", use_double_quant=False, compute_dtype="fp16")])
def test_quantization_round_trips_through_json(quantization):
    config = train_config(quantization)
    data = json.loads(config.to_json())
    assert data["quantization"]["bits"] == quantization.bits
    assert TrainConfig.from_json(config.to_json()) == config
    assert TrainConfig.from_dict(data).quantization == quantization


def test_a_configuration_without_quantization_reads_as_before():
    data = json.loads(train_config(None).to_json())
    del data["quantization"]  # a plan saved before the field existed
    assert TrainConfig.from_dict(data).quantization is None


def test_quantization_fields_are_validated_all_at_once():
    with pytest.raises(UsageError) as raised:
        Quantization(bits=3, quant_type="int4", use_double_quant="yes", compute_dtype="fp32")  # type: ignore[arg-type]
    message = str(raised.value)
    for expected in ("bits must be 4 or 8, got 3", "quant_type must be nf4 or fp4, got 'int4'",
                     "use_double_quant must be True or False, got 'yes'", "compute_dtype must be bf16 or fp16"):
        assert expected in message


@pytest.mark.parametrize("adapter", [None, Adapter(kind="prefix")])
def test_a_quantised_base_needs_a_lora_adapter(adapter):
    with pytest.raises(UsageError, match=r"quantised base \(4-bit\) trains only a LoRA adapter.*--lora"):
        TrainConfig(seq_len=24, adapter=adapter, quantization=Quantization())


def test_a_quantised_base_is_planned_on_one_gpu_without_offload():
    with pytest.raises(UsageError) as raised:
        TrainConfig(seq_len=24, adapter=Adapter(), quantization=Quantization(bits=8), num_gpus=2, offload="optimizer")
    message = str(raised.value)
    assert "quantised base (8-bit) is planned on one GPU, got 2 GPUs (--gpus, num_gpus): use 1" in message
    assert "quantised base (8-bit) is planned without CPU offload, got offload 'optimizer' (--offload)" in message
    with pytest.raises(UsageError, match=r"trains under 16-bit autocast .* got no autocast"):
        TrainConfig(seq_len=24, weights_dtype="bf16", amp="none", adapter=Adapter(), quantization=Quantization())


def test_describe_names_the_quantised_base():
    assert "4-bit base (nf4), bf16 compute, double quant" in train_config(Quantization()).describe()
    assert "8-bit base (LLM.int8)" in train_config(Quantization(bits=8)).describe()


@needs_bitsandbytes
def test_plan_model_kwargs_give_transformers_bitsandbytes_config():
    import torch

    from memtune.plan import Plan

    four = Plan("m", train_config(Quantization(quant_type="fp4", compute_dtype="fp16")), budget_bytes=1).model_kwargs()
    config = four["quantization_config"]
    assert four["dtype"] is torch.bfloat16
    assert (config.load_in_4bit, config.bnb_4bit_quant_type, config.bnb_4bit_use_double_quant,
            config.bnb_4bit_compute_dtype) == (True, "fp4", True, torch.float16)
    eight = Plan("m", train_config(Quantization(bits=8)), budget_bytes=1).model_kwargs()
    assert eight["quantization_config"].load_in_8bit
    assert "quantization_config" not in Plan("m", train_config(None), budget_bytes=1).model_kwargs()


def test_without_bitsandbytes_a_quantised_plan_fails_with_exit_2_and_the_install_command(monkeypatch):
    from memtune.plan import Plan
    from memtune.predict.single import estimate_single as estimate

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError
    monkeypatch.setattr("memtune.predict.single._TRACE_CACHE", {})  # no trace of an earlier test answers
    for attempt in (lambda: estimate(model_config(), train_config(Quantization()), device="cpu"),
                    lambda: Plan("m", train_config(Quantization(bits=8)), budget_bytes=1).model_kwargs()):
        with pytest.raises(UsageError) as raised:
            attempt()
        assert raised.value.exit_code == 2
        assert 'needs bitsandbytes' in str(raised.value) and 'pip install -e ".[quant]"' in str(raised.value)


# -- the model the recipe builds ---------------------------------------------------------------------------


@needs_bitsandbytes
@pytest.mark.parametrize("bits", [4, 8])
def test_the_recipe_builds_bitsandbytes_layers_with_lora_and_fp32_elsewhere(bits):
    import bitsandbytes as bnb
    import torch

    from memtune.recipe import step as recipe

    model = recipe.build_model(model_config(), train_config(Quantization(bits=bits), checkpointing=True), "meta")
    layer = bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt
    quantised = [name for name, module in model.named_modules() if isinstance(module, layer)]
    assert len(quantised) == LAYERS * len(LINEARS)  # every linear layer of the decoder; the (tied) LM head not
    assert all(name.endswith(".base_layer") for name in quantised)  # LoRA wraps each one
    base = model.get_base_model()
    assert getattr(base, f"is_loaded_in_{bits}bit") and base.is_activation_checkpointing
    others = {name: p for name, p in model.named_parameters() if "base_layer.weight" not in name}
    assert {p.dtype for p in others.values()} == {torch.float32}  # kbit preparation cast the bf16 norms, embedding
    assert {name for name, p in others.items() if p.requires_grad} == {name for name in others if "lora_" in name}


# -- the trace ------------------------------------------------------------------------------------------------


@needs_bitsandbytes
@pytest.mark.parametrize("double_quant", [True, False])
def test_4bit_trace_holds_the_packed_weights_and_quant_state_not_16_bit_weights(double_quant):
    traced = trace(train_config(Quantization(use_double_quant=double_quant)))
    packed = LAYERS * sum(packed_4bit_bytes(out, fan_in, double_quant) for out, fan_in in LINEARS.values())
    assert allocated_bytes(traced, "weights") == packed + other_weight_bytes()
    weight_sizes = Counter(e.num_bytes for e in traced.events
                           if e.kind == "alloc" and traced.categories[e.source] == "weights")
    assert weight_sizes[rounded(INTERMEDIATE * HIDDEN // 2)] == 3 * LAYERS  # gate, up, down: [out*in/2, 1] uint8
    assert weight_sizes[rounded(INTERMEDIATE * HIDDEN * 2)] == 0  # no bf16 weight


@needs_bitsandbytes
def test_8bit_trace_holds_int8_weights_and_their_row_scales():
    traced = trace(train_config(Quantization(bits=8)))
    int8 = LAYERS * sum(rounded(out * fan_in) + rounded(4 * out) for out, fan_in in LINEARS.values())
    assert allocated_bytes(traced, "weights") == int8 + other_weight_bytes()


@needs_bitsandbytes
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("bits", [4, 8])
def test_a_quantised_trace_peaks_below_the_bf16_lora_trace(bits, checkpointing):
    bf16 = trace(train_config(None, checkpointing))
    quantised = trace(train_config(Quantization(bits=bits), checkpointing))
    assert quantised.peak_allocated_bytes < bf16.peak_allocated_bytes
    assert quantised.peak_breakdown["weights"] < bf16.peak_breakdown["weights"]


@needs_bitsandbytes
@pytest.mark.parametrize("checkpointing", [False, True])
def test_4bit_dequantises_each_weight_in_every_forward_and_backward(checkpointing):
    """MatMul4Bit over 48 tokens: CUDA's gemm_4bit dequantises the weight ([out, in], bf16 compute) and runs
    F.linear; backward dequantises it again (to the QuantState's dtype, bf16 here) where the layer's input needs a
    gradient: not for the first layer's q/k/v, whose input comes from the frozen embedding and norm. Checkpointing
    runs the forward once more in backward. 2 steps of one micro-batch are traced."""
    traced = trace(train_config(Quantization(), checkpointing))
    sizes = Counter(e.num_bytes for e in traced.events
                    if e.kind == "alloc" and traced.categories[e.source] != "weights")
    passes = 2 * (3 if checkpointing else 2)  # steps x (forward, backward[, recomputed forward])
    assert sizes[INTERMEDIATE * HIDDEN * 2] == 3 * LAYERS * passes  # gate, up, down
    assert sizes[KV * HIDDEN * 2] >= 2 * (LAYERS * passes - 2)  # k, v (an activation may share the size)
    frees = {e.storage for e in traced.events if e.kind == "free"}
    dequantised = [e.storage for e in traced.events if e.kind == "alloc" and e.num_bytes == INTERMEDIATE * HIDDEN * 2]
    assert set(dequantised) <= frees  # each one freed after its matmul


@needs_bitsandbytes
def test_8bit_dequantises_each_weight_in_backward_in_the_input_dtype():
    """MatMul8bitLt's forward multiplies in int8 (an int32 product [tokens, out]); its backward dequantises the
    weight to the input's dtype: fp32 here, the residual stream of a model whose norms kbit preparation cast."""
    traced = trace(train_config(Quantization(bits=8)))
    sizes = Counter(e.num_bytes for e in traced.events if e.kind == "alloc")
    assert sizes[INTERMEDIATE * HIDDEN * 4] == 3 * LAYERS * 2  # gate, up, down, once per backward, 2 steps
    assert sizes[rounded(48 * INTERMEDIATE * 4)] >= 2 * LAYERS * 2  # int32 products of gate and up per forward


@needs_bitsandbytes
def test_estimate_of_a_deep_quantised_model_extends_its_trace():
    from memtune.predict.estimate import estimate

    config = model_config()
    config.num_hidden_layers = 8
    bf16 = estimate(config, train_config(None, True), device="cpu")
    four = estimate(config, train_config(Quantization(), True), device="cpu")
    assert 0 < four.peak_reserved_bytes < bf16.peak_reserved_bytes


@needs_bitsandbytes
def test_the_gpu_benchmark_predicts_its_quantised_cases_on_the_cpu_path():
    """benchmarks/lowbit.py --no-measure --paths cpu, for the two checkpointed 4-bit / 8-bit Qwen cases."""
    from benchmarks import lowbit

    names = [lowbit.case_name(case) for case in lowbit.CASES]
    assert len(set(names)) == len(names) == 20 + 13 + 6  # 10 optimizer / precision variants x 2 models, + the 7B-class
    chosen = [case for case in lowbit.CASES
              if case.model == "Qwen/Qwen2.5-0.5B" and case.config.quantization and case.config.gradient_checkpointing]
    rows = [lowbit.case_row(case, None, ["cpu"]) for case in chosen]
    assert [row.get("cpu_error") for row in rows] == [None, None]
    assert all(0 < row["cpu_weights_bytes"] < row["cpu_reserved_bytes"] for row in rows)
    assert rows[0]["cpu_weights_bytes"] < rows[1]["cpu_weights_bytes"]  # 4-bit weights below 8-bit


@needs_bitsandbytes
@pytest.mark.parametrize("bits", [4, 8])
def test_memtune_run_loads_the_plans_quantised_base_and_prepare_refuses_a_16_bit_one(bits, tmp_path):
    """runner.load_model passes the plan's BitsAndBytesConfig to from_pretrained (bitsandbytes quantises on the
    CPU too); Plan.prepare then runs the k-bit preparation and LoRA, and refuses a model loaded without it."""
    import bitsandbytes as bnb
    import torch
    from transformers import AutoModelForCausalLM

    from memtune import sources
    from memtune.plan import Plan
    from memtune.run.runner import load_model

    AutoModelForCausalLM.from_config(model_config()).save_pretrained(tmp_path)
    plan = Plan(str(tmp_path), train_config(Quantization(bits=bits), checkpointing=True), budget_bytes=1)
    model, _, pretrained = load_model(sources.resolve(str(tmp_path)), plan.train_config, "cpu")
    layer = bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt
    assert pretrained and sum(isinstance(module, layer) for module in model.modules()) == LAYERS * len(LINEARS)
    prepared = plan.prepare(model, warm_up=False)
    assert {p.dtype for name, p in prepared.named_parameters() if "base_layer.weight" not in name} == {torch.float32}
    with pytest.raises(UsageError, match=r"loaded without it: load it with .*plan\.model_kwargs\(\)"):
        plan.prepare(AutoModelForCausalLM.from_pretrained(tmp_path), warm_up=False)


@needs_bitsandbytes
@pytest.mark.parametrize("bits", [4, 8])
def test_a_real_device_build_quantises_layer_by_layer_and_initialises_the_rest(bits, monkeypatch):
    # On a real device the 16-bit linear weights are never all there at once (a 7B 4-bit trial on a 12 GiB card
    # could not start when the 16-bit model was built on the GPU first): each is moved, drawn and quantised alone.
    import torch

    from memtune.recipe import quant
    from memtune.recipe import step as recipe

    calls = []
    original = quant.quantize_model

    def watched(model, quantization, device=None, init_std=None):
        calls.append((str(next(model.parameters()).device), device, init_std))
        return original(model, quantization, device=device, init_std=init_std)

    monkeypatch.setattr(quant, "quantize_model", watched)
    model = recipe.build_model(model_config(), train_config(Quantization(bits=bits)), "cpu")
    base = model.get_base_model()
    layer = base.model.layers[0]
    assert layer.mlp.down_proj.base_layer.weight.dtype == (torch.uint8 if bits == 4 else torch.int8)
    # built on the CPU, each linear drawn from N(0, initializer_range) on the target device as it is quantised
    assert calls == [("cpu", "cpu", 0.02)]
    assert base.model.norm.weight.float().eq(1).all()  # the model's own init for what stays 16-bit
    assert 0.015 < base.model.embed_tokens.weight.float().std().item() < 0.025  # N(0, initializer_range 0.02)
    ids = torch.randint(0, VOCAB, (2, 24))
    loss = model(input_ids=ids, labels=ids).loss
    assert abs(loss.item() - math.log(VOCAB)) < 0.5  # random weights: about uniform over the vocabulary
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_the_speed_model_charges_a_quantised_base_per_pass_over_its_weights():
    # Fitted on one H200 step (Mistral-7B, LoRA, 2 x 1024, checkpointing): 4-bit +0.132 s, 8-bit +0.950 s over
    # the bf16 base, over 3 passes (forward, recompute, backward) of the 6.98e9 quantised parameters.
    from memtune.predict import throughput
    from memtune.sources import catalog_config, parameter_count

    config = catalog_config("mistralai/Mistral-7B-v0.1")
    shape = throughput.ModelShape.of(config, parameter_count(config))
    speed = throughput.gpu_speed("H200")
    bf16 = TrainConfig(seq_len=1024, micro_batch_size=2, weights_dtype="bf16", amp="bf16",
                       gradient_checkpointing=True, adapter=Adapter())
    base = throughput.step_seconds(shape, bf16, speed)
    extra = {bits: throughput.step_seconds(shape, bf16.replace(quantization=Quantization(bits=bits)), speed) - base
             for bits in (4, 8)}
    assert extra[4] == pytest.approx(0.132, rel=0.01) and extra[8] == pytest.approx(0.950, rel=0.01)
    unchecked = bf16.replace(gradient_checkpointing=False, quantization=Quantization(bits=4))
    unchecked_extra = throughput.step_seconds(shape, unchecked, speed) - throughput.step_seconds(
        shape, unchecked.replace(quantization=None), speed)
    assert unchecked_extra == pytest.approx(extra[4] * 2 / 3, rel=1e-6)  # no recompute pass
    slower_card = throughput.gpu_speed("A100")  # memory-bound: scaled by bandwidth, 4.8 / 2.0 TB/s
    assert throughput.step_seconds(shape, bf16.replace(quantization=Quantization(bits=4)), slower_card) - \
        throughput.step_seconds(shape, bf16, slower_card) == pytest.approx(extra[4] * 4.8 / 2.0, rel=1e-6)
