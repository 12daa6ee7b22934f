"""predict/flops.py: FLOPs, traffic and kernels counted on the fake step, and the speed model that uses them."""

from __future__ import annotations

import time

import pytest

from memtune.config import Adapter, TrainConfig
from memtune.predict import flops, throughput
from memtune.sources import parameter_count
from tests.models import tiny_llama

SEQ_LEN = 256


@pytest.fixture(autouse=True)
def fresh_counts(monkeypatch):
    """Every test counts afresh (the in-process cache is module state)."""
    monkeypatch.setattr(flops, "_COUNTS", {})


def projections(config) -> list[tuple[int, int]]:
    """(in, out) features of a Llama layer's matmuls: q, k, v, o, gate, up, down."""
    h, d, f = config.hidden_size, config.head_dim, config.intermediate_size
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    return [(h, heads * d), (h, kv_heads * d), (h, kv_heads * d), (heads * d, h), (h, f), (h, f), (f, h)]


def attention_forward(config, seq_len: int, share: float) -> float:
    """Per token per layer: the scores and their product with the values, 2 x 2 x heads x head_dim x seq_len,
    `share` of them computed."""
    return 4 * config.num_attention_heads * config.head_dim * seq_len * share


# bf16 autocast: SDPA's flash kernel (grouped KV heads taken natively), causal, 2 tiles of 128 tokens: 3/4 computed
BF16 = TrainConfig(seq_len=SEQ_LEN, amp="bf16")
SHARE = 3 / 4


def test_tiny_llama_forward_matches_a_hand_count():
    config = tiny_llama(4)
    count = flops.count_flops(config, BF16)
    assert flops.attention_share(SEQ_LEN, SEQ_LEN, True) == SHARE
    matmuls = sum(2 * features_in * features_out for features_in, features_out in projections(config))
    layers = config.num_hidden_layers * (matmuls + attention_forward(config, SEQ_LEN, SHARE))
    head = 2 * config.hidden_size * config.vocab_size
    assert count.counted
    assert count.layers_forward == pytest.approx(layers, rel=0.01)
    assert count.head_forward == pytest.approx(head, rel=0.01)
    attention = config.num_hidden_layers * attention_forward(config, SEQ_LEN, SHARE)
    assert count.attention_forward == pytest.approx(attention)
    # full fine-tuning: input and weight gradients of every matmul (2x); the fused kernels' backward recomputes the
    # scores (2.5x, torch's sdpa_backward_flop_count)
    backward = config.num_hidden_layers * (2 * matmuls + 2.5 * attention_forward(config, SEQ_LEN, SHARE))
    assert count.layers_backward == pytest.approx(backward, rel=0.01)
    assert count.head_backward == pytest.approx(2 * head, rel=0.01)
    assert "flash attention (masked tiles skipped" in count.attention


def test_eager_attention_counts_the_masked_half():
    config = tiny_llama(2)
    fused = flops.count_flops(config, BF16)
    eager = flops.count_flops(config, BF16.replace(attn="eager"))
    # eager attention computes every score, as plain matmuls: 1 / share of the fused kernel's
    assert eager.attention_forward == pytest.approx(fused.attention_forward / SHARE, rel=0.01)
    assert eager.layers_backward > fused.layers_backward - 0.5 * fused.attention_forward
    assert "every score computed" in eager.attention


def test_lora_backward_has_no_weight_gradients_of_the_frozen_base():
    """By hand, per token: a frozen matmul's backward is its input gradient, 2 x in x out (full fine-tuning adds the
    weight gradient, as much again); each LoRA pair's backward (A and B's weight gradients, the gradient through B
    and into the input) 4 r (in + out). The first layer's q, k and v take the embedding, which needs no gradient:
    no input gradients there."""
    config = tiny_llama(4)
    rank = 8
    full = flops.count_flops(config, BF16)
    lora = flops.count_flops(config, BF16.replace(adapter=Adapter(rank=rank)))
    attention = 2.5 * attention_forward(config, SEQ_LEN, SHARE)
    frozen = sum(2 * features_in * features_out for features_in, features_out in projections(config))
    adapters = sum(4 * rank * (features_in + features_out) for features_in, features_out in projections(config))
    first_layer = sum(2 * features_in * features_out + 2 * rank * features_in
                      for features_in, features_out in projections(config)[:3])
    expected = config.num_hidden_layers * (frozen + adapters + attention) - first_layer
    assert lora.layers_backward == pytest.approx(expected, rel=0.01)
    assert lora.layers_backward < full.layers_backward == pytest.approx(
        config.num_hidden_layers * (2 * frozen + attention), rel=0.01)
    assert lora.layers_forward > full.layers_forward  # the adapters' own matmuls
    assert lora.head_backward == pytest.approx(full.head_backward / 2, rel=0.01)  # the head is frozen: input grad only


def test_checkpointing_adds_one_forward_of_the_layers():
    config = tiny_llama(4)
    shape = throughput.ModelShape.of(config, parameter_count(config), count=True)
    speed = throughput.gpu_speed("H100").scaled(kernel_seconds=0.0, traffic_factor=0.0, logits_traffic=0.0)
    plain = TrainConfig(seq_len=SEQ_LEN, micro_batch_size=2)
    count = throughput.flop_count(shape, plain)
    without, _ = throughput.micro_batch_seconds(shape, plain, speed)
    with_checkpointing, _ = throughput.micro_batch_seconds(shape, plain.replace(gradient_checkpointing=True), speed)
    rate = speed.fp32_flops * speed.fp32_efficiency
    assert with_checkpointing - without == pytest.approx(2 * SEQ_LEN * count.layers_forward / rate, rel=1e-6)


def test_the_count_is_cached(monkeypatch):
    config = tiny_llama(2)
    train = TrainConfig(seq_len=SEQ_LEN)
    first = flops.flop_count(config, train, lambda note: pytest.fail(note))
    calls = []
    monkeypatch.setattr(flops, "count_flops", lambda *args: calls.append(args))
    started = time.perf_counter()
    # the same count for another micro-batch, accumulation or checkpointing: none of them is in the key
    again = flops.flop_count(config, train.replace(micro_batch_size=8, grad_accum_steps=4, gradient_checkpointing=True),
                             lambda note: pytest.fail(note))
    assert again is first and calls == []
    assert time.perf_counter() - started < 0.05


def test_the_count_is_kept_on_disk(monkeypatch, tmp_path):
    monkeypatch.delenv("MEMTUNE_NO_CACHE", raising=False)
    monkeypatch.setenv("MEMTUNE_CACHE_DIR", str(tmp_path))
    config = tiny_llama(2)
    train = TrainConfig(seq_len=SEQ_LEN)
    first = flops.flop_count(config, train, lambda note: pytest.fail(note))
    monkeypatch.setattr(flops, "_COUNTS", {})  # a new process
    monkeypatch.setattr(flops, "count_flops", lambda *args: pytest.fail("counted again"))
    assert flops.flop_count(config, train, lambda note: pytest.fail(note)) == first


def test_a_failed_count_falls_back_to_the_closed_form_with_a_note(monkeypatch):
    def fail(*args):
        raise RuntimeError("no fake kernel for aten.something")

    monkeypatch.setattr(flops, "count_flops", fail)
    config = tiny_llama(2)
    notes: list[str] = []
    shape = throughput.ModelShape.of(config, parameter_count(config), count=True, note=notes.append)
    train = TrainConfig(seq_len=SEQ_LEN, micro_batch_size=2)
    count = throughput.flop_count(shape, train)
    assert not count.counted and "no fake kernel for aten.something" in count.note
    assert notes == [count.note] and "closed form" in notes[0]
    closed = throughput.ModelShape.of(config, parameter_count(config))
    speed = throughput.gpu_speed("H200")
    assert throughput.tokens_per_second(shape, train, speed) == throughput.tokens_per_second(closed, train, speed)
    throughput.tokens_per_second(shape, train.replace(micro_batch_size=4), speed)
    assert len(notes) == 1  # told once


def test_the_closed_form_is_the_old_formula():
    config = tiny_llama(2)
    shape = throughput.ModelShape.of(config, parameter_count(config))
    count = throughput.flop_count(shape, TrainConfig(seq_len=SEQ_LEN, adapter=Adapter()))
    head = shape.vocab_size * shape.hidden_size
    assert not count.counted
    assert count.forward == 2.0 * (shape.matmul_parameters + shape.num_layers * SEQ_LEN * shape.hidden_size)
    assert count.backward == count.forward  # frozen weights: input gradients only
    assert count.head_forward == 2.0 * head


def test_layer_types_are_counted_each_at_its_own_depth():
    """A sliding-window layer (a mask: every tile computed) and a full one (causal, masked tiles skipped) are
    counted apart and scaled by how many of each the model has."""
    from transformers import AutoConfig

    def gemma3(types):
        return AutoConfig.for_model("gemma3_text", hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                    num_key_value_heads=1, head_dim=16, vocab_size=256, num_hidden_layers=len(types),
                                    layer_types=types, sliding_window=64, max_position_embeddings=512)

    train = TrainConfig(seq_len=SEQ_LEN, amp="bf16")
    sliding, full = "sliding_attention", "full_attention"
    mixed = flops.count_flops(gemma3([sliding] * 5 + [full]), train)
    all_sliding = flops.count_flops(gemma3([sliding] * 6), train)
    all_full = flops.count_flops(gemma3([full] * 6), train)
    assert all_full.attention_forward < mixed.attention_forward < all_sliding.attention_forward
    assert mixed.attention_forward == pytest.approx(
        (5 * all_sliding.attention_forward + all_full.attention_forward) / 6, rel=0.01)


def test_a_count_costs_under_a_few_seconds():
    config = tiny_llama(2)
    started = time.perf_counter()
    flops.count_flops(config, TrainConfig(seq_len=SEQ_LEN, amp="bf16", adapter=Adapter()))
    assert time.perf_counter() - started < 10  # ~0.3 s on a 2-core CPU once torch and peft are imported


def test_speed_error_band_is_a_relative_error():
    assert 0.0 < throughput.SPEED_ERROR_BAND < 1.0


def test_dpo_runs_two_rows_a_pair_and_the_live_reference_one_more_forward():
    """TRL's DPO: chosen and rejected rows (twice SFT's FLOPs per pair) and, unless precomputed, the reference's
    forward of both: exactly one more forward of the layers and the head per row."""
    config = tiny_llama(4)
    shape = throughput.ModelShape.of(config, parameter_count(config), count=True)
    speed = throughput.gpu_speed("H100").scaled(kernel_seconds=0.0, traffic_factor=0.0, logits_traffic=0.0,
                                                 liger_logits_traffic=0.0)
    sft = TrainConfig(seq_len=SEQ_LEN, micro_batch_size=2, trainer="sft")
    precomputed = sft.replace(trainer="dpo", precompute_ref_log_probs=True)
    live = precomputed.replace(precompute_ref_log_probs=False)
    count = throughput.flop_count(shape, sft)
    rate = speed.fp32_flops * speed.fp32_efficiency
    seconds = {name: throughput.micro_batch_seconds(shape, c, speed)[0]
               for name, c in (("sft", sft), ("precomputed", precomputed), ("live", live))}
    assert seconds["precomputed"] == pytest.approx(2 * seconds["sft"], rel=1e-6)
    assert seconds["live"] - seconds["precomputed"] == pytest.approx(2 * 2 * SEQ_LEN * count.forward / rate, rel=1e-6)
    # tokens/s counts both rows of a pair, as memtune run reports them
    assert throughput.tokens_per_second(shape, precomputed, speed) == pytest.approx(
        throughput.tokens_per_second(shape, sft, speed), rel=0.05)
