"""Liger-Kernel's fused linear cross-entropy as a loss: the trace's stand-in against Liger's allocation rule, the
patched forward (Liger mocked: no Triton on CPU), config / policy / CLI, the search's offer and the speed term."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from memtune import config as config_module
from memtune.config import Adapter, Policy, TrainConfig
from memtune.errors import UsageError
from memtune.predict import throughput
from memtune.predict.estimate import estimate
from memtune.predict.events import rounded
from memtune.predict.liger import TracedLigerFunction, liger_chunk_size, liger_num_chunks, next_power_of_2
from memtune.predict.trace import Category, StorageCounter, trace_step
from memtune.recipe import step as recipe
from memtune.recipe.loss import FUSED_LOSS, IGNORE_INDEX, causal_lm_of, use_chunked_loss
from memtune.search import choose, ladder
from memtune.sources import catalog_config
from tests.test_loss import MODELS, batch, tiny

LIGER_PACKAGES = ("liger_kernel", "triton")


@pytest.fixture
def liger_installed(monkeypatch):
    """`config.liger_available` true without the packages (find_spec answers for liger_kernel and triton)."""
    installed = config_module._installed
    monkeypatch.setattr(config_module, "_installed", lambda name: name in LIGER_PACKAGES or installed(name))


@pytest.fixture
def liger_missing(monkeypatch):
    installed = config_module._installed
    monkeypatch.setattr(config_module, "_installed", lambda name: name not in LIGER_PACKAGES and installed(name))


# -- the chunk rule and the stand-in's allocations ---------------------------------------------------------


def test_chunk_size_follows_liger_rule():
    # inc_factor = ceil(V / H); chunk = next_power_of_2(ceil(BT / inc_factor)), at most BT
    assert [next_power_of_2(n) for n in (1, 2, 3, 25, 32, 33)] == [1, 2, 4, 32, 32, 64]
    assert liger_chunk_size(4096, 151_936, 896) == 32  # Qwen2.5-0.5B: inc 170, ceil(4096/170)=25 -> 32
    assert liger_num_chunks(4096, 151_936, 896) == 128
    assert liger_chunk_size(4096, 128_256, 2048) == 128  # Llama-3.2-1B: inc 63 -> 66 -> 128
    assert liger_chunk_size(8192, 256_000, 2304) == 128  # Gemma-2-2B: inc 112 -> 74 -> 128
    assert liger_chunk_size(100, 300, 64) == 32  # inc 5 -> 20 -> 32
    assert liger_chunk_size(3, 64, 64) == 3  # one chunk covers everything: never more than BT
    assert liger_num_chunks(100, 300, 64) == 4


def allocations(hidden_dtype, weight_dtype, *, amp=None, weight_grad=True, tokens=100, vocab=300, hidden=64,
                bias=False):
    """(allocation sizes in forward, in backward, gradient shapes) of the stand-in on fake CPU tensors."""
    counter = StorageCounter()
    with FakeTensorMode(allow_non_fake_inputs=True), counter:
        inputs = torch.empty(tokens, hidden, dtype=hidden_dtype, requires_grad=True)
        weight = torch.empty(vocab, hidden, dtype=weight_dtype, requires_grad=weight_grad)
        bias_tensor = torch.empty(vocab, dtype=weight_dtype, requires_grad=weight_grad) if bias else None
        target = torch.empty(tokens, dtype=torch.int64)
        start = len(counter.trace.events)
        context = torch.autocast("cpu", dtype=amp) if amp is not None else torch.autocast("cpu", enabled=False)
        with context:
            loss = TracedLigerFunction.apply(inputs, weight, target, bias_tensor, None)
        forward = [event.num_bytes for event in counter.trace.events[start:] if event.kind == "alloc"]
        middle = len(counter.trace.events)
        (loss / 7).backward()
        backward = [event.num_bytes for event in counter.trace.events[middle:] if event.kind == "alloc"]
        weight_grad_of = None if weight.grad is None else (tuple(weight.grad.shape), weight.grad.dtype)
        grads = (tuple(inputs.grad.shape), weight_grad_of)
    return forward, backward, grads


def test_stand_in_pure_16bit_allocates_liger_buffers_once():
    """bf16 hidden states and weight, no autocast: Liger's mm(out=) path. grad_input, grad_weight, the fp32 loss per
    token, the mask and its count, one (chunk x V) logits buffer; nothing per chunk (matmuls into buffers, the
    kernel in place); the summed loss. Backward: the 0-dim tensor(1.0) only, the gradients are forward's."""
    tokens, vocab, hidden = 100, 300, 64
    chunk = liger_chunk_size(tokens, vocab, hidden)
    forward, backward, grads = allocations(torch.bfloat16, torch.bfloat16)
    assert forward == [rounded(n) for n in (tokens * hidden * 2, vocab * hidden * 2, tokens * 4, tokens, 8,
                                            chunk * vocab * 2, 4)]
    assert grads == ((tokens, hidden), ((vocab, hidden), torch.bfloat16))
    assert max(backward, default=0) <= 512  # the loss division's and tensor(1.0)'s scalars: no new gradient


def test_stand_in_fp32_takes_liger_fallback_per_chunk():
    """fp32 without autocast: one fp32 logits buffer, and per chunk Liger's fallback product of the weight's
    shape (grad_weight += mm(grad_logits.t(), input).float())."""
    tokens, vocab, hidden = 100, 300, 64
    chunk = liger_chunk_size(tokens, vocab, hidden)
    forward, _, _ = allocations(torch.float32, torch.float32)
    head = [rounded(n) for n in (tokens * hidden * 4, vocab * hidden * 4, tokens * 4, tokens, 8, chunk * vocab * 4)]
    assert forward[:6] == head
    assert forward[6:] == [rounded(vocab * hidden * 4)] * liger_num_chunks(tokens, vocab, hidden) + [512]


def test_stand_in_mixed_precision_allocates_logits_per_chunk():
    """fp32 hidden states and weight under bf16 autocast: no preallocated buffer; each chunk's logits (chunk x V,
    bf16) and its input-gradient product (chunk x H, bf16), the weight gradient fp32."""
    tokens, vocab, hidden = 100, 300, 64
    chunk = liger_chunk_size(tokens, vocab, hidden)
    forward, _, grads = allocations(torch.float32, torch.float32, amp=torch.bfloat16)
    assert forward[:5] == [rounded(n) for n in (tokens * hidden * 4, vocab * hidden * 4, tokens * 4, tokens, 8)]
    assert forward.count(rounded(chunk * vocab * 2)) == tokens // chunk  # 3 chunks of 32 tokens, then 4 tokens
    assert rounded(tokens % chunk * vocab * 2) in forward
    # autocast's bf16 copy of the weight: `weight.t()` (a view, not cached) per chunk, `weight` once (cached)
    assert forward.count(rounded(vocab * hidden * 2)) == liger_num_chunks(tokens, vocab, hidden) + 1
    assert rounded(vocab * hidden * 4) not in forward[5:]  # fp32 accumulator: addmm in place, no weight-sized copy
    assert grads[1] == ((vocab, hidden), torch.float32)


def test_stand_in_frozen_head_has_no_weight_gradient():
    forward, _, grads = allocations(torch.bfloat16, torch.bfloat16, weight_grad=False)
    assert grads[1] is None
    assert rounded(300 * 64 * 2) not in forward


def test_stand_in_bias_gradient():
    forward, _, _ = allocations(torch.bfloat16, torch.bfloat16, bias=True)
    assert forward[:3] == [rounded(100 * 64 * 2), rounded(300 * 64 * 2), rounded(300 * 2)]


# -- the forward, with Liger's module mocked ------------------------------------------------------------


def reference_fused(calls):
    """A torch twin of Liger's summed loss: logits in fp32, the softcap, cross-entropy summed over counted tokens."""

    def fused(hidden, weight, targets, bias, softcap):
        calls.append((tuple(hidden.shape), tuple(weight.shape), tuple(targets.shape), bias is None, softcap))
        logits = torch.nn.functional.linear(hidden, weight, bias).float()
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        return torch.nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")

    return fused


@pytest.mark.parametrize("name", ["llama", "gemma2-softcap", "gpt2-tied", "qwen2"])
def test_liger_forward_matches_the_standard_loss(name):
    model = recipe.build_model(MODELS[name](), TrainConfig(seq_len=24, micro_batch_size=2), "cpu")
    input_ids, labels = batch(), batch()
    labels[0, :5] = IGNORE_INDEX

    def standard():
        return model(input_ids=input_ids, labels=labels).loss

    import copy

    liger_model = use_chunked_loss(copy.deepcopy(model), kind="liger")
    calls: list = []
    setattr(causal_lm_of(liger_model), FUSED_LOSS, reference_fused(calls))

    def liger():
        return liger_model(input_ids=input_ids, labels=labels).loss

    expected_loss, expected = _loss_and_grads(model, standard)
    loss, found = _loss_and_grads(liger_model, liger)
    torch.testing.assert_close(loss, expected_loss)
    assert found.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(found[key], expected[key], rtol=1e-4, atol=1e-6)
    hidden, vocab = model.config.hidden_size, model.config.vocab_size
    softcap = getattr(model.config, "final_logit_softcapping", None)
    assert calls == [((2 * 24, hidden), (vocab, hidden), (2 * 24,), True, softcap)]


def _loss_and_grads(model, compute):
    model.zero_grad(set_to_none=True)
    loss = compute()
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_forward_calls_liger_module_with_its_arguments(liger_installed, monkeypatch):
    """Without the attribute, the forward builds liger_kernel's LigerFusedLinearCrossEntropyLoss (mocked here:
    Triton is not on this machine) with ignore_index -100, reduction "sum" and the model's softcap, and calls it
    as (weight, hidden, targets, bias)."""
    built, calls = [], []
    reference = reference_fused(calls)

    class FakeLoss(torch.nn.Module):
        def __init__(self, **kwargs):
            super().__init__()
            built.append(kwargs)

        def forward(self, lin_weight, _input, target, bias=None):
            return reference(_input, lin_weight, target, bias, built[-1]["softcap"])

    module = types.ModuleType("liger_kernel.transformers.fused_linear_cross_entropy")
    module.LigerFusedLinearCrossEntropyLoss = FakeLoss
    for name in ("liger_kernel", "liger_kernel.transformers"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    config = TrainConfig(seq_len=24, micro_batch_size=2, loss="liger")
    model = recipe.build_model(tiny("google/gemma-2-2b"), config, "cpu")
    loss = recipe.forward_loss(model, batch(), batch(), config)
    loss.backward()
    assert built == [{"ignore_index": -100, "reduction": "sum", "softcap": model.config.final_logit_softcapping}]
    assert calls[0][:3] == ((48, 64), (300, 64), (48,))


def test_forward_without_liger_says_how_to_install(liger_missing):
    config = TrainConfig(seq_len=24, micro_batch_size=2, loss="liger")
    model = recipe.build_model(tiny("Qwen/Qwen2.5-0.5B"), config, "cpu")
    with pytest.raises(UsageError, match=r'pip install -e "\.\[liger\]"'):
        recipe.forward_loss(model, batch(), batch(), config)


def test_liger_refuses_an_adapter_on_the_head():
    config = TrainConfig(seq_len=24, micro_batch_size=2, loss="liger",
                         adapter=Adapter(rank=4, target_modules=("q_proj", "lm_head")))
    model = recipe.build_model(tiny("Qwen/Qwen2.5-0.5B"), config, "cpu")
    setattr(causal_lm_of(model), FUSED_LOSS, reference_fused([]))
    with pytest.raises(UsageError, match="LM head"):
        recipe.forward_loss(model, batch(), batch(), config)


def test_liger_and_chunked_forwards_do_not_mix():
    config = TrainConfig(seq_len=24, micro_batch_size=2, loss="chunked")
    model = recipe.build_model(tiny("Qwen/Qwen2.5-0.5B"), config, "cpu")
    with pytest.raises(ValueError, match="chunked loss already"):
        use_chunked_loss(model, kind="liger")
    with pytest.raises(ValueError, match="liger loss"):
        recipe.forward_loss(model, batch(), batch(), config.replace(loss="liger"))


def test_liger_forward_under_lora_trains_the_adapter_only():
    config = TrainConfig(seq_len=24, micro_batch_size=2, loss="liger", adapter=Adapter(rank=4))
    model = recipe.build_model(tiny("Qwen/Qwen2.5-0.5B"), config, "cpu")
    calls: list = []
    setattr(causal_lm_of(model), FUSED_LOSS, reference_fused(calls))
    recipe.forward_loss(model, batch(), batch(), config).backward()
    assert calls and all("lora" in name for name, p in model.named_parameters() if p.grad is not None)


# -- the trace and the estimate -------------------------------------------------------------------------


def test_trace_uses_the_stand_in_and_tags_logits():
    model_config = tiny("Qwen/Qwen2.5-0.5B")
    trace = trace_step(model_config, TrainConfig(seq_len=32, micro_batch_size=2, amp="bf16", loss="liger"))
    assert Category.LOGITS in trace.categories.values()
    assert trace.peak_allocated_bytes > 0


def test_liger_is_predicted_below_the_standard_loss_for_a_large_vocabulary():
    model_config = catalog_config("Qwen/Qwen2.5-0.5B")
    model_config.num_hidden_layers, model_config.layer_types = 2, model_config.layer_types[:2]
    base = TrainConfig(seq_len=1024, micro_batch_size=4, amp="bf16")
    standard = estimate(model_config, base, device="cpu")
    liger = estimate(model_config, base.replace(loss="liger"), device="cpu")
    assert liger.peak_allocated_bytes < standard.peak_allocated_bytes
    # Liger's weight gradient (V x H fp32) exists in forward already: it shows among the categories
    assert liger.breakdown.get("logits", 0) + liger.breakdown.get("gradients", 0) >= 151_936 * 896 * 4


# -- config, policy, CLI --------------------------------------------------------------------------------


def test_train_config_accepts_liger_on_one_gpu_ddp_and_fsdp():
    assert TrainConfig(seq_len=256, loss="liger").describe().endswith("Liger fused loss")
    TrainConfig(seq_len=256, loss="liger", num_gpus=2, strategy="ddp")
    TrainConfig(seq_len=256, loss="liger", num_gpus=2)
    TrainConfig(seq_len=256, loss="liger", offload="parameters")
    with pytest.raises(UsageError, match="standard, chunked or liger"):
        TrainConfig(seq_len=256, loss="fused")


def test_policy_refuses_liger_contradictions():
    Policy(loss="liger").validate(8)
    with pytest.raises(UsageError, match="--loss liger contradicts --no-chunked-loss"):
        Policy(loss="liger", allow_chunked_loss=False).validate(8)
    Policy(loss="liger", num_gpus=2, strategy="fsdp").validate(8)
    Policy(loss="liger", offload="parameters").validate(8)
    Policy(loss="liger", num_gpus=2, strategy="ddp").validate(8)
    with pytest.raises(UsageError, match="standard, chunked or liger"):
        Policy(loss="fused").validate(8)


def test_cli_exits_2_when_liger_is_pinned_but_missing(liger_missing, capsys):
    from memtune.cli import main

    code = main(["fit", "Qwen/Qwen2.5-0.5B", "--seq-len", "256", "--batch-size", "4", "--budget", "40GiB",
                 "--loss", "liger", "--no-verify", "--trace-device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2
    assert 'pip install -e ".[liger]"' in err and "Traceback" not in err


# -- the search -----------------------------------------------------------------------------------------


def test_search_offers_liger_only_when_installed(liger_missing, monkeypatch):
    rung = ladder.Loss()
    assert [o["loss"] for o in rung.options(Policy(), False, 8)] == ["standard", "chunked"]
    assert any("Liger" in note and "[liger]" in note for note in ladder.skipped(Policy()))
    assert not any("Liger" in note for note in ladder.skipped(Policy(allow_chunked_loss=False)))
    with pytest.raises(UsageError, match=r"\.\[liger\]"):
        rung.options(Policy(loss="liger"), False, 8)


def test_search_offers_liger_when_installed(liger_installed):
    rung = ladder.Loss()
    assert [o["loss"] for o in rung.options(Policy(), False, 8)] == ["standard", "chunked", "liger"]
    assert [o["loss"] for o in rung.options(Policy(allow_chunked_loss=False), False, 8)] == ["standard"]
    assert [o["loss"] for o in rung.options(Policy(loss="liger"), False, 8)] == ["liger"]
    assert "liger" in [o["loss"] for o in rung.options(Policy(num_gpus=2, strategy="fsdp"), False, 8)]
    assert not any("Liger" in note for note in ladder.skipped(Policy()))
    space = ladder.candidate_space(256, 8, Policy(num_gpus=2), with_adapter=False)
    assert {c.loss for c in space} == {"standard", "chunked", "liger"}
    assert {c.strategy for c in space if c.loss == "liger"} == {"ddp", "fsdp"}


def test_flip_and_setting_of_liger():
    rung = ladder.Loss()
    chosen = TrainConfig(seq_len=256, loss="liger")
    words, flipped = rung.flip(chosen, Policy(), 8)
    assert flipped.loss == "chunked" and "Liger" in words
    assert "liger-kernel" in rung.setting(chosen)
    assert rung.flip(chosen, Policy(loss="liger"), 8) is None


def test_needs_at_least_does_not_order_the_two_fused_losses():
    liger, chunked, standard = (TrainConfig(seq_len=256, micro_batch_size=2, loss=loss)
                                for loss in ("liger", "chunked", "standard"))
    assert not choose.needs_at_least(liger, chunked) and not choose.needs_at_least(chunked, liger)
    assert not choose.needs_at_least(standard, liger)  # not surely: Liger holds the weight gradient from forward
    assert choose.needs_at_least(liger, liger.replace(micro_batch_size=1))
    assert choose.needs_at_least(standard, chunked)


# -- speed ----------------------------------------------------------------------------------------------


def test_liger_speed_term_has_no_recompute():
    shape = throughput.ModelShape(num_parameters=494_000_000, num_layers=24, hidden_size=896, vocab_size=151_936,
                                  tied_embeddings=True)
    speed = throughput.gpu_speed("H200")
    config = TrainConfig(seq_len=2048, micro_batch_size=4, amp="bf16")
    standard, standard_backward = throughput.micro_batch_seconds(shape, config, speed)
    chunked, _ = throughput.micro_batch_seconds(shape, config.replace(loss="chunked"), speed)
    liger, liger_backward = throughput.micro_batch_seconds(shape, config.replace(loss="liger"), speed)
    tokens = 4 * 2048
    traffic = tokens * shape.vocab_size * (speed.logits_traffic - speed.liger_logits_traffic)
    chunks = liger_num_chunks(tokens, shape.vocab_size, shape.hidden_size)
    weight_traffic = chunks * speed.liger_weight_bytes_per_chunk * shape.vocab_size * shape.hidden_size
    assert liger - standard == pytest.approx((weight_traffic - traffic) / speed.memory_bytes_per_second)
    assert liger > chunked  # measured on the H200: 128 chunks of 32 tokens move the head's weight 128 times
    assert liger_backward / liger < standard_backward / standard  # the head's gradients run in forward


def test_plan_prepare_refuses_liger_when_missing(liger_missing):
    from memtune.plan import Plan

    config = TrainConfig(seq_len=24, micro_batch_size=2, loss="liger")
    plan = Plan(model="tiny", train_config=config, budget_bytes=1 << 34)
    with pytest.raises(UsageError, match=r"\.\[liger\]"):
        plan.prepare(recipe.build_model(tiny("Qwen/Qwen2.5-0.5B"), TrainConfig(seq_len=24), "cpu"), warm_up=False)


def test_run_refuses_a_liger_plan_without_liger(liger_missing, tmp_path):
    from memtune.options import RunOptions
    from memtune.plan import Plan
    from memtune.run.runner import check_run_inputs
    from tests.test_runner import CORPUS

    plan = Plan(model=str(tmp_path), train_config=TrainConfig(seq_len=24, micro_batch_size=2, loss="liger"),
                budget_bytes=1 << 34)
    with pytest.raises(UsageError, match=r"Liger's fused loss.*\.\[liger\]"):
        check_run_inputs(plan, RunOptions(data=str(CORPUS), output_dir=str(tmp_path / "out")))


@pytest.mark.parametrize("num_gpus, offload", [(2, "none"), (1, "parameters")], ids=["2-gpus", "offload"])
def test_the_sharded_trace_stands_in_for_liger(num_gpus, offload):
    """Under FSDP2 Liger reads the head's gathered weight (with the final norm's unit, as the chunked loss does):
    the sharded trace runs the stand-in and its peak is below the standard loss's, the model state the same."""
    from transformers import LlamaConfig

    from memtune.predict.fsdp import estimate_sharded

    model_config = LlamaConfig(vocab_size=32000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2)
    standard = TrainConfig(seq_len=512, micro_batch_size=2, amp="bf16", num_gpus=num_gpus, offload=offload)
    full, fused = (estimate_sharded(model_config, standard.replace(loss=loss)) for loss in ("standard", "liger"))
    assert 0 < fused.peak_allocated_bytes < full.peak_allocated_bytes
    for category in ("weights", "optimizer"):
        assert fused.breakdown.get(category) == full.breakdown.get(category), category


def test_liger_is_not_combined_with_lora_on_the_head(liger_installed):
    from memtune.config import Adapter

    on_head = Policy(use_adapter=True, adapter=Adapter(target_modules=("q_proj", "lm_head")))
    space = ladder.candidate_space(256, 8, on_head, with_adapter=True)
    assert space and "liger" not in {c.loss for c in space}
    assert "liger" in {c.loss for c in ladder.candidate_space(256, 8, Policy(use_adapter=True), with_adapter=True)}
