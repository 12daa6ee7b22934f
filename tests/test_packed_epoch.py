"""Data the loader really batches, traced as it runs: packed rows (position_ids restarting: transformers' block-diagonal
mask, SDPA's memory-efficient kernel and its bias) and an epoch of varying batch shapes replayed through the allocator
(predict.epoch)."""

from __future__ import annotations

import pytest
import torch

from memtune.config import Adapter, TrainConfig
from memtune.predict import allocator, epoch
from memtune.predict.emulation import MEM_EFFICIENT_ALIGNMENT, aligned_bias
from memtune.predict.events import rounded
from memtune.predict.trace import trace_step
from memtune.recipe.step import packed_position_ids
from memtune.run.data_plan import plan_lengths

ROWS, LENGTH, LAYERS = 2, 200, 2


def tiny_llama(vocab_size: int = 1000, max_positions: int = 2048):
    """A 2-layer Llama with grouped KV heads (8 query heads, 2 KV heads), SDPA attention."""
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=LAYERS,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=max_positions)
    config._attn_implementation = "sdpa"
    return config


def config(**changes) -> TrainConfig:
    fields = {"seq_len": LENGTH, "micro_batch_size": ROWS, "weights_dtype": "bf16", "amp": "bf16", "adapter": Adapter()}
    return TrainConfig(**{**fields, **changes})


def alloc_sizes(trace) -> list[int]:
    return [event.num_bytes for event in trace.events if event.kind == "alloc"]


def test_packed_position_ids_restart_once_per_row():
    positions = packed_position_ids(torch.zeros(2, 5, dtype=torch.long))
    assert positions.tolist() == [[0, 1, 2, 0, 1]] * 2
    assert packed_position_ids(torch.zeros(1, 1, dtype=torch.long)).tolist() == [[0]]


def test_the_efficient_kernels_bias_is_padded_to_16_elements_as_torch_pads_it():
    bias = torch.zeros(ROWS, 1, LENGTH, LENGTH, dtype=torch.bfloat16)
    padded = aligned_bias(bias)
    assert padded.shape == bias.shape
    assert padded.stride()[-2] == LENGTH + MEM_EFFICIENT_ALIGNMENT - LENGTH % MEM_EFFICIENT_ALIGNMENT == 208
    aligned = torch.zeros(ROWS, 1, 16, 16)
    assert aligned_bias(aligned) is aligned


def test_restarting_position_ids_put_the_block_diagonal_mask_and_a_bias_per_layer_in_the_trace(one_thread):
    """The packed step builds transformers' rows x 1 x L x L bool mask and, per attention layer and step, the
    memory-efficient kernel's bf16 bias (padded to 16 elements: 200 -> 208); the unpacked step has neither and
    holds less at its peak (keys and values are also repeated to every query head once a mask is passed)."""
    packed = trace_step(tiny_llama(), config(packed_rows=True), device="cpu")
    plain = trace_step(tiny_llama(), config(), device="cpu")
    mask_bytes = rounded(ROWS * LENGTH * LENGTH)
    bias_bytes = rounded(ROWS * LENGTH * 208 * 2)
    assert mask_bytes in alloc_sizes(packed) and mask_bytes not in alloc_sizes(plain)
    assert alloc_sizes(packed).count(bias_bytes) >= 2 * LAYERS  # two steps
    assert bias_bytes not in alloc_sizes(plain)
    packed_peak = allocator.simulate(packed.events).peak_allocated_bytes
    plain_peak = allocator.simulate(plain.events).peak_allocated_bytes
    assert packed_peak >= plain_peak + LAYERS * bias_bytes


def test_a_step_per_shape_traces_each_shape():
    trace = trace_step(tiny_llama(), config(), device="cpu", seq_lens=[50, 200])
    embedding_outputs = [size for size in alloc_sizes(trace) if size in (rounded(ROWS * 50 * 128 * 2),
                                                                         rounded(ROWS * 200 * 128 * 2))]
    assert rounded(ROWS * 50 * 128 * 2) in embedding_outputs and rounded(ROWS * 200 * 128 * 2) in embedding_outputs


def test_an_epoch_of_varying_shapes_reserves_at_least_its_worst_step_alone(one_thread):
    """Smaller batches before the worst one leave cached blocks the worst one cannot use: the epoch's replay reserves
    at least what the worst step traced alone reserves (the logits here, 2 x 512 x 8,000 fp32, are in the large
    pool), and never allocates less."""
    model_config = tiny_llama(vocab_size=8000)
    train_config = config(seq_len=512)
    alone = epoch.epoch_peaks(model_config, train_config, [512, 512], "cpu")
    varied = epoch.epoch_peaks(model_config, train_config, [96, 320, 512, 160, 448, 512], "cpu")
    assert varied[1] >= alone[1]
    assert varied[0] >= alone[0]
    expandable = epoch.epoch_peaks(model_config, train_config.replace(expandable_segments=True),
                                   [96, 320, 512, 160, 448, 512], "cpu")
    assert expandable[1] <= varied[1]


def test_the_epochs_shapes_follow_trainers_seeded_sampler():
    lengths = [10, 300, 20, 40, 500, 60, 70]
    data = plan_lengths(lengths, 400, "none").with_micro_batch(2)
    generator = torch.Generator()
    generator.manual_seed(42)
    order = [min(lengths[index], 400) for index in torch.randperm(len(lengths), generator=generator).tolist()]
    expected = [max(order[start:start + 2]) for start in range(0, len(order), 2)]
    assert data.epoch_row_tokens() == expected and len(expected) == 4  # the last micro-batch is partial
    assert max(expected) == 400
    capped = data.epoch_row_tokens(max_steps=2)
    assert len(capped) == 2 and max(capped) == 400  # the worst batch is kept when the epoch is cut
    assert plan_lengths(lengths, 400, "concat").with_micro_batch(2).epoch_row_tokens() == []
    assert plan_lengths([30] * 6, 400, "none").with_micro_batch(2).epoch_row_tokens() == []  # one shape


@pytest.mark.parametrize("packing,packed", [("none", False), ("concat", False), ("bfd", True),
                                            ("padding-free", True)])
def test_packed_modes_are_traced_with_restarting_positions(packing, packed):
    assert plan_lengths([10, 300, 20], 400, packing).packed_rows is packed


def test_over_an_epoch_keeps_the_estimate_for_one_shape():
    from memtune.predict.peak import Estimate

    estimate = Estimate(config=config(), peak_allocated_bytes=10, peak_reserved_bytes=20, workspace_bytes=0,
                        context_bytes=0)
    assert epoch.over_an_epoch(tiny_llama(), estimate, [200, 200], "cpu") is estimate
    assert epoch.over_an_epoch(tiny_llama(), estimate, [], "cpu") is estimate
