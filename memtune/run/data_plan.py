"""Data-aware planning: the user's training data -> token lengths -> the worst batch the loader will produce.

`memtune plan|fit --data FILE|DIR --packing MODE` reads the data as `memtune run` does (`run.data.read_texts`),
tokenises it with the model's tokenizer (`run.data.load_tokenizer`: a local directory's own, else memtune's shipped
one), and plans for the *worst* batch of the batching mode, not the average one:

- concat (what `memtune run` does, as transformers' run_clm.py `group_texts`): documents concatenated and cut into
  blocks of exactly seq_len tokens; every batch is micro_batch x seq_len; nothing is truncated (a long document
  continues in the next block).
- none: one document per row, truncated at seq_len, padded to the longest row of the batch (transformers'
  DataCollatorForLanguageModeling / TRL's collator with padding_free=False): the worst batch holds the longest
  document, micro_batch x min(seq_len, longest).
- bfd: TRL's best-fit-decreasing packing (`trl.data_utils.pack_dataset(strategy="bfd")`, `_pack_bfd`, read in TRL
  1.16): documents truncated at seq_len (the overflow dropped), sorted longest first within each `datasets.map`
  batch of 1,000 examples, each put in the open row with the least room that holds it (a new row when none does).
  Every row is <= seq_len; the worst batch is micro_batch rows of the fullest row. SFTTrainer trains bfd padding-free
  (`padding_free = args.padding_free or (packing and packing_strategy in {"bfd", "bfd_split"})`): the rows of a
  batch are then concatenated, 1 x their sum, at most the same tokens.
- padding-free: rows concatenated without padding, position_ids restarting at each document (TRL's
  `padding_free=True`), each document truncated at seq_len: the batch is 1 x the sum of its documents' lengths, at
  most the token budget micro_batch x seq_len; the worst batch holds the micro_batch longest documents.

`memtune run --packing MODE` makes these batches (`run.data`; bfd padded to the longest row of the micro-batch, as
planned, with position_ids restarting per document). Trainer shuffles the rows (a seeded random sampler), so the worst
batch planned is the largest batch any order could make: for none and bfd that is a full micro-batch holding the
longest row, which every epoch has (unless that row lands in a last, partial micro-batch); a padding-free epoch holds
the micro_batch longest documents together only by chance, so its measured peak may stay below the plan.

What is traced (fit.py sets it on every configuration predicted, tried and saved): micro_batch rows of the worst row's
length (`DataPlan.row_tokens`, the TrainConfig's seq_len), and for bfd and padding-free packed rows
(`DataPlan.packed_rows`, `TrainConfig.packed_rows`): the traced step passes position_ids restarting inside each row
(`recipe.step.packed_position_ids`), so transformers builds the block-diagonal bool mask it builds for the real batch
(masking_utils `find_packed_sequence_indices`, then `sdpa_mask`: rows x 1 x N x N bytes, `DataPlan.mask_bytes`), SDPA
leaves its flash kernel for the memory-efficient one, which converts the mask to an additive bias in the compute dtype
and saves it per attention layer for backward (`predict.emulation.aligned_bias` on the CPU path; torch itself on the
fake-CUDA path), and with grouped KV heads transformers repeats keys and values to every query head (`use_gqa_in_sdpa`
is False with a mask). All of it is in the prediction by construction. For concat, none and bfd (padded) the traced
shape is the worst batch's own. For padding-free (and TRL's padding-free bfd) the real batch is one row of
N <= micro_batch x row_tokens tokens; the trace holds the same or more tokens in micro_batch rows, so every per-token
activation (linear layers, norms, MLP, logits, loss) is counted, but the attention and its mask are traced per row
(micro_batch x row_tokens^2, not N^2: under SDPA an under-estimate, known limitation). One row of N tokens would be
refused by models whose positions are fewer than N (gpt2: 1,024) although the real positions restart per document.
With flash_attention_2, padding-free runs the varlen kernel with no mask.

Batches of varying shape (none, padding-free: every micro-batch is padded to its own longest row) fragment the CUDA
caching allocator over an epoch: blocks cut for earlier, smaller batches stay cached and the worst batch's large
requests need new segments. `DataPlan.epoch_row_tokens` gives the loader's batch shapes for that replay
(`predict.epoch`).
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memtune.errors import UsageError
from memtune.options import DEFAULT_PACKING
from memtune.run import data as data_module

TRL_PACK_BATCH = 1000
"""Documents per BFD packing pass: TRL packs inside `datasets.map(batched=True)`, whose batch_size defaults to 1,000."""
TOKENIZE_CHUNK = 1000
"""Documents tokenised per call (and per progress-bar step)."""
TRAINER_SEED = 42
"""`memtune run --seed`'s default (options.RunOptions.seed), which it passes as TrainingArguments seed and data_seed."""
EPOCH_STEPS = 64
"""Micro-batches of an epoch replayed at most (`DataPlan.epoch_row_tokens`)."""


check_packing = data_module.check_packing
"""Raise UsageError (exit 2) for a --packing value that is not one of PACKING_MODES (`run.data.check_packing`)."""


def percentile(sorted_values: Sequence[int], percent: float) -> int:
    """The nearest-rank percentile of ascending `sorted_values`: the smallest value with at least `percent` % of
    the values at or below it (value number ceil(percent/100 x n), counting from 1). 0 for no values."""
    if not sorted_values:
        return 0
    rank = max(1, math.ceil(percent / 100 * len(sorted_values)))
    return int(sorted_values[min(rank, len(sorted_values)) - 1])


@dataclass(frozen=True)
class LengthStats:
    """The token lengths of the documents (each with its end-of-text token, as the loader appends it)."""

    num_sequences: int
    total_tokens: int
    p50_tokens: int
    p90_tokens: int
    p99_tokens: int
    max_tokens: int

    @classmethod
    def of(cls, lengths: Sequence[int]) -> LengthStats:
        """The statistics of `lengths` (tokens per document); nearest-rank percentiles (`percentile`)."""
        ordered = sorted(lengths)
        return cls(num_sequences=len(ordered), total_tokens=sum(ordered), p50_tokens=percentile(ordered, 50),
                   p90_tokens=percentile(ordered, 90), p99_tokens=percentile(ordered, 99),
                   max_tokens=ordered[-1] if ordered else 0)


def token_lengths(tokenizer: Any, texts: Sequence[str], progress: Callable[[int, int], None] | None = None,
                  chunk: int = TOKENIZE_CHUNK) -> list[int]:
    """Tokens of each document as the loader makes it (`run.data.tokenize`: no special tokens, then the end-of-text
    token when the tokenizer has one). `progress(done, total)` is called after each chunk of documents; only the
    lengths are kept, never the token ids of the whole corpus."""
    eos = 1 if getattr(tokenizer, "eos_token_id", None) is not None else 0
    lengths: list[int] = []
    for start in range(0, len(texts), chunk):
        encoded = tokenizer(list(texts[start:start + chunk]), add_special_tokens=False, verbose=False)["input_ids"]
        lengths.extend(len(ids) + eos for ids in encoded)
        if progress is not None:
            progress(len(lengths), len(texts))
    return lengths


def bfd_row_lengths(lengths: Sequence[int], seq_len: int, pass_size: int = TRL_PACK_BATCH) -> list[int]:
    """Tokens in each row of TRL's best-fit-decreasing packing (`trl.data_utils._pack_bfd`, overflow "truncate"):
    per pass of `pass_size` documents (one `datasets.map` batch), empty documents dropped, each truncated at
    `seq_len`, longest first into the open row with the least room that still holds it, else a new row. TRL finds
    that row with a segment tree; the sorted list of free room here gives the same rows' fills (which of several
    rows with equal room is taken does not change them)."""
    rows: list[int] = []
    for start in range(0, len(lengths), pass_size):
        fills: list[int] = []
        rooms: list[tuple[int, int]] = []  # (free room, row index), ascending
        for length in sorted((min(n, seq_len) for n in lengths[start:start + pass_size] if n > 0), reverse=True):
            place = bisect.bisect_left(rooms, (length, -1))
            if place < len(rooms):
                room, row = rooms.pop(place)
            else:
                room, row = seq_len, len(fills)
                fills.append(0)
            fills[row] += length
            if room - length > 0:
                bisect.insort(rooms, (room - length, row))
        rows += fills
    return rows


@dataclass(frozen=True)
class DataPlan:
    """What the loader will produce from the training data, and the worst batch the plan is made for."""

    source: str
    """The data file or folder read."""
    text_field: str
    """The JSON field the text was read from (--text-field)."""
    tokenizer: str
    """Where the tokenizer came from (`run.data.load_tokenizer`)."""
    packing: str
    """The batching mode (PACKING_MODES)."""
    seq_len: int
    """--seq-len: the block length (concat), the truncation length (none, padding-free) or the packed row's limit."""
    lengths: LengthStats
    over_seq_len: int
    """Documents longer than seq_len: truncated (their tail dropped) in none, bfd and padding-free; split over two
    blocks, nothing dropped, in concat."""
    row_tokens: int
    """Tokens per row of the worst batch, the sequence length traced: seq_len (concat), the longest truncated
    document (none, padding-free), the fullest packed row (bfd)."""
    micro_batch_size: int | None = None
    """The micro-batch the worst batch is given for (None until the configuration is chosen)."""
    longest_tokens: tuple[int, ...] = field(default=(), repr=False)
    """The longest truncated documents, longest first (enough to fill any micro-batch up to 4,096 sequences)."""
    row_lengths: tuple[int, ...] = field(default=(), repr=False, compare=False)
    """Tokens of each row the loader makes, in the dataset's order (before Trainer's shuffle): the truncated documents
    (none, padding-free), the packed rows (bfd); empty for concat (every row seq_len)."""

    @property
    def truncated_sequences(self) -> int:
        """Documents whose tail the loader drops (concat drops none: it splits them)."""
        return 0 if self.packing == "concat" else self.over_seq_len

    def with_micro_batch(self, micro_batch_size: int) -> DataPlan:
        return dataclasses.replace(self, micro_batch_size=micro_batch_size)

    def worst_batch(self, micro_batch_size: int | None = None) -> tuple[int, int]:
        """(rows, tokens per row) of the worst batch at `micro_batch_size` (default: the one recorded).

        padding-free: one row of the micro_batch longest documents' tokens together (`padding_free_tokens`); the
        others: micro_batch rows of `row_tokens`."""
        micro = micro_batch_size or self.micro_batch_size or 1
        if self.packing == "padding-free":
            return 1, self.padding_free_tokens(micro)
        return micro, self.row_tokens

    def padding_free_tokens(self, micro_batch_size: int) -> int:
        """Tokens of the worst padding-free batch: the `micro_batch_size` longest truncated documents, at most the
        token budget micro_batch x seq_len."""
        longest = sum(self.longest_tokens[:micro_batch_size])
        return min(longest, micro_batch_size * self.seq_len)

    def epoch_row_tokens(self, micro_batch_size: int | None = None, seed: int = TRAINER_SEED,
                         max_steps: int = EPOCH_STEPS) -> list[int]:
        """Tokens per row of each micro-batch of the first epoch, in the order Trainer feeds them (`memtune run`:
        none and bfd rows padded to the longest row of their micro-batch), for the allocator's replay of an epoch of
        varying shapes (`predict.epoch`). Empty when every batch has one shape (concat) or for padding-free (traced
        per row: module docstring).

        The order: Trainer's train sampler is a RandomSampler that accelerate replaces with its SeedableRandomSampler
        seeded with TrainingArguments.data_seed (accelerate/data_loader.py: `generator.manual_seed(initial_seed +
        epoch)`, then torch's RandomSampler `torch.randperm(n, generator=generator)`); `memtune run` sets data_seed to
        --seed (default `TRAINER_SEED`). The batches are consecutive `micro_batch_size` rows of that permutation, the
        last one partial (drop_last False). At most `max_steps` micro-batches are kept: the first max_steps - 1 and
        then the worst one when it comes later (the replay's cost grows with the steps)."""
        import torch  # the sampler's own permutation: the same order for the same seed

        micro = micro_batch_size or self.micro_batch_size or 1
        if self.packing not in ("none", "bfd") or len(set(self.row_lengths)) <= 1:
            return []
        generator = torch.Generator()
        generator.manual_seed(seed)
        order = [self.row_lengths[index] for index in torch.randperm(len(self.row_lengths),
                                                                     generator=generator).tolist()]
        shapes = [max(order[start:start + micro]) for start in range(0, len(order), micro)]
        if len(shapes) > max_steps:
            worst = max(shapes)
            shapes = shapes[:max_steps] if worst in shapes[:max_steps] else [*shapes[:max_steps - 1], worst]
        return shapes

    @property
    def packed_rows(self) -> bool:
        """Rows that hold several documents, position_ids restarting (bfd, padding-free): `TrainConfig.packed_rows`."""
        return self.packing in ("bfd", "padding-free")

    @property
    def mask_bytes(self) -> int:
        """padding-free and bfd under SDPA: the block-diagonal bool mask (rows x 1 x N x N, one byte each) transformers
        builds from the restarting position_ids for the worst batch of rows x N tokens; traced (`packed_rows`), reported
        for the reader.
        0 for concat and none (their batches carry no position_ids and no attention_mask: `run.data`)."""
        if self.packing not in ("padding-free", "bfd") or self.micro_batch_size is None:
            return 0
        rows, tokens = self.worst_batch()
        return rows * tokens * tokens

    def to_dict(self) -> dict[str, Any]:
        rows, row_tokens = self.worst_batch()
        return {
            "source": self.source, "text_field": self.text_field, "tokenizer": self.tokenizer,
            "packing": self.packing, "seq_len": self.seq_len,
            **dataclasses.asdict(self.lengths),
            "over_seq_len": self.over_seq_len, "truncated_sequences": self.truncated_sequences,
            "row_tokens": self.row_tokens, "micro_batch_size": self.micro_batch_size,
            "worst_batch_rows": rows, "worst_batch_row_tokens": row_tokens, "mask_bytes": self.mask_bytes,
        }


LONGEST_KEPT = 4096
"""Longest documents a DataPlan keeps for the padding-free worst batch (no micro-batch is larger)."""


def plan_lengths(lengths: Sequence[int], seq_len: int, packing: str, *, source: str = "", text_field: str = "text",
                 tokenizer: str = "") -> DataPlan:
    """The DataPlan of documents of `lengths` tokens batched by `packing` at `seq_len`. Raises UsageError for an
    unknown packing mode or no documents."""
    check_packing(packing)
    if not lengths:
        raise UsageError(f"data '{source}' holds no documents: give a file with training text")
    truncated = sorted((min(n, seq_len) for n in lengths), reverse=True)
    if packing == "concat":
        rows: list[int] = []
        row_tokens = seq_len
    elif packing == "bfd":
        rows = bfd_row_lengths(lengths, seq_len)
        row_tokens = max(rows)
    else:  # none, padding-free
        rows = [min(n, seq_len) for n in lengths]
        row_tokens = truncated[0]
    return DataPlan(source=source, text_field=text_field, tokenizer=tokenizer, packing=packing, seq_len=seq_len,
                    lengths=LengthStats.of(lengths), over_seq_len=sum(1 for n in lengths if n > seq_len),
                    row_tokens=row_tokens, longest_tokens=tuple(truncated[:LONGEST_KEPT]), row_lengths=tuple(rows))


def plan_data(source: Any, data: str | Path, seq_len: int, packing: str = DEFAULT_PACKING, text_field: str = "text",
              progress: Callable[[int, int], None] | None = None,
              note: Callable[[str], None] | None = None) -> DataPlan:
    """Read and tokenise DATA for the model `source` (a `sources.ModelSource`) and plan its batches (`plan_lengths`).

    The tokenizer: `run.data.load_tokenizer` (a local directory's own, else memtune's shipped one); a hub model's
    tokenizer that cannot be fetched (offline) falls back to the shipped one, and `note` says so: the lengths are then
    those of a 1,156-entry byte-level BPE, longer than a real vocabulary's. Raises UsageError (exit 2) for a missing
    path, a bad file or an unknown packing mode."""
    check_packing(packing)
    texts = data_module.read_texts(data, text_field)
    try:
        tokenizer, where = data_module.load_tokenizer(source)
    except UsageError as error:
        if getattr(source, "origin", "") != "hub":
            raise
        tokenizer, where = data_module.sample_tokenizer(), "memtune's sample tokenizer (the model's could not be read)"
        if note is not None:
            note(f"{error}; counting tokens with memtune's sample tokenizer instead (longer sequences than the "
                 "model's own tokenizer gives)")
    lengths = token_lengths(tokenizer, texts, progress)
    return plan_lengths(lengths, seq_len, packing, source=str(data), text_field=text_field, tokenizer=where)
