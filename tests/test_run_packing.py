"""`memtune run --packing none|concat|bfd|padding-free` (memtune/run/data.py): each mode makes, batch for batch, the
rows `run.data_plan` plans for (row lengths, the worst batch), position_ids restart at every document, the run trains
on them through Trainer, and the refusals (a bad mode, bfd without TRL) exit 2."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from benchmarks import make_longtail
from memtune.cli import main, parse
from memtune.config import TrainConfig
from memtune.errors import UsageError
from memtune.options import PACKING_MODES, RunOptions
from memtune.plan import Plan
from memtune.run import data as data_module
from memtune.run.data_plan import bfd_row_lengths, plan_lengths, token_lengths
from memtune.run.runner import run_plan

HAS_TRL = importlib.util.find_spec("trl") is not None and importlib.util.find_spec("datasets") is not None
MODES_HERE = [mode for mode in PACKING_MODES if mode != "bfd" or HAS_TRL]
"""bfd runs TRL's own pack_dataset: tested where TRL is installed (PYTHONPATH=$PWD:/tmp/trlsite here)."""


@pytest.fixture(scope="module")
def longtail(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """120 documents of log-normal length (benchmarks/make_longtail.py), short enough for a 2-layer model."""
    path = tmp_path_factory.mktemp("data") / "longtail.jsonl"
    documents = make_longtail.make_documents(120, seed=11, median_chars=120, max_chars=600)
    return make_longtail.write_jsonl(documents, path)


@pytest.fixture(scope="module")
def tokenizer():
    return data_module.sample_tokenizer()


def words(text: str) -> str:
    return " ".join(text.split())


# ---- the rows of each mode, as planned ---------------------------------------------------------------


@pytest.mark.parametrize("packing", MODES_HERE)
def test_each_mode_makes_the_rows_the_data_plan_counts(packing, longtail, tokenizer):
    seq_len = 96
    lengths = token_lengths(tokenizer, data_module.read_texts(longtail))
    dataset = data_module.build_dataset(tokenizer, seq_len, longtail, packing=packing)
    rows = dataset.row_lengths()
    assert [int(dataset[index]["input_ids"].numel()) for index in range(len(dataset))] == rows
    plan = plan_lengths(lengths, seq_len, packing)
    assert max(rows) == plan.row_tokens
    if packing == "concat":
        assert rows == [seq_len] * (sum(lengths) // seq_len)
    elif packing == "bfd":
        assert sorted(rows) == sorted(bfd_row_lengths(lengths, seq_len))
    else:
        assert rows == [min(length, seq_len) for length in lengths]  # file order, each truncated at seq_len


def test_documents_keep_their_tokens_and_are_cut_at_seq_len(longtail, tokenizer):
    texts = data_module.read_texts(longtail)
    corpus = data_module.tokenize_corpus(tokenizer, iter(texts), chunk=7)
    assert torch.equal(corpus.tokens, data_module.tokenize(tokenizer, texts))  # chunking changes nothing
    assert corpus.tokens.dtype == torch.int32 and corpus.lengths == token_lengths(tokenizer, texts)
    expected = tokenizer(texts[3], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    dataset = data_module.build_dataset(tokenizer, 40, longtail, packing="none")
    assert dataset[3]["input_ids"].tolist() == expected[:40]


def test_no_padding_pads_to_the_longest_row_with_ignored_labels(tokenizer):
    collate = data_module.collator_for("none", tokenizer)
    batch = collate([{"input_ids": torch.tensor([5, 6, 7])}, {"input_ids": torch.tensor([8])}])
    assert set(batch) == {"input_ids", "labels"}  # no attention_mask: right padding under a causal mask
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, tokenizer.pad_token_id, tokenizer.pad_token_id]]
    assert batch["labels"].tolist() == [[5, 6, 7], [8, -100, -100]]


def test_padding_free_is_one_row_with_positions_restarting_per_document(tokenizer):
    collate = data_module.collator_for("padding-free", tokenizer)
    batch = collate([{"input_ids": torch.tensor([5, 6, 7])}, {"input_ids": torch.tensor([8, 9])}])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9]]  # TRL: labels[position_ids == 0] = -100


def test_packed_rows_restart_positions_and_pad_them_with_zeros(tokenizer):
    collate = data_module.collator_for("bfd", tokenizer)
    rows = [{"input_ids": torch.tensor([1, 2, 3, 4]), "position_ids": data_module.positions_of([3, 1])},
            {"input_ids": torch.tensor([6, 7]), "position_ids": data_module.positions_of([2])}]
    batch = collate(rows)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0], [0, 1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3, -100], [-100, 7, -100, -100]]


@pytest.mark.skipif(not HAS_TRL, reason="TRL is not installed")
def test_bfd_rows_are_trls_with_positions_from_its_seq_lengths(longtail, tokenizer):
    dataset = data_module.build_dataset(tokenizer, 64, longtail, packing="bfd")
    corpus = data_module.tokenize_corpus(tokenizer, data_module.iter_texts(longtail))
    documents = {tuple(corpus.document(index)[:64].tolist()) for index in range(len(corpus))}
    for index in range(len(dataset)):
        item = dataset[index]
        lengths = dataset.document_lengths(index)
        assert item["position_ids"].tolist() == [position for length in lengths for position in range(length)]
        starts = [sum(lengths[:number]) for number in range(len(lengths))]
        for start, length in zip(starts, lengths, strict=True):  # each piece of a row is one whole (cut) document
            assert tuple(item["input_ids"][start:start + length].tolist()) in documents


def test_bfd_at_the_fullest_rows_length_packs_the_same_rows():
    """A data plan's seq_len is the fullest row's length F, and the run packs at it: BFD at F <= --seq-len makes the
    same rows as at --seq-len (`build_dataset`'s docstring)."""
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        lengths = (torch.rand(300, generator=generator) ** 4 * 700).long().add(1).tolist()
        fullest = max(bfd_row_lengths(lengths, 1000))
        assert sorted(bfd_row_lengths(lengths, fullest)) == sorted(bfd_row_lengths(lengths, 1000))


# ---- the run: every batch Trainer feeds, the worst one the plan's --------------------------------------


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("packing", MODES_HERE)
def test_the_run_trains_on_the_planned_batches(packing, longtail, tokenizer, model_dir, tmp_path, monkeypatch):
    """One epoch through run_plan on the CPU: the batches Trainer feeds are those of the mode (all of the data, each
    row once) and the largest is the data plan's worst batch (the plan's seq_len is the worst row's length, as
    `fit --data` writes it)."""
    micro, seq_len = 4, 96
    lengths = token_lengths(tokenizer, data_module.read_texts(longtail))
    data = plan_lengths(lengths, seq_len, packing).with_micro_batch(micro)
    seen: list[dict[str, torch.Tensor]] = []
    make = data_module.collator_for

    def recording(mode: str, tokenizer_: object):
        collate = make(mode, tokenizer_)

        def collate_and_keep(items: list) -> dict:
            batch = collate(items)
            seen.append({key: value.clone() for key, value in batch.items()})
            return batch
        return collate_and_keep

    monkeypatch.setattr(data_module, "collator_for", recording)
    received: list[torch.Tensor | None] = []
    # where documents share a row, the chunked loss's forward (position_ids through **kwargs) is the harder path
    loss = "chunked" if packing in ("bfd", "padding-free") else "standard"
    config = TrainConfig(seq_len=data.row_tokens, micro_batch_size=micro, loss=loss)
    summary = run_plan(Plan(str(model_dir), config, budget_bytes=1 << 30), data=str(longtail), packing=packing,
                       output_dir=tmp_path / "out", device="cpu", progress=False, save_steps=10**6,
                       callbacks=[PositionsSeen(received)])
    dataset = data_module.build_dataset(tokenizer, data.row_tokens, longtail, packing=packing)
    assert summary.status == "completed" and summary.num_sequences == len(dataset)
    assert summary.global_step == -(-len(dataset) // micro) == len(seen)
    shapes = [tuple(batch["input_ids"].shape) for batch in seen]
    worst_tokens = max(rows * width for rows, width in shapes)
    rows, width = data.worst_batch()
    if packing == "padding-free":  # the plan's worst: the micro-batch's longest documents together (any order)
        assert all(rows_ == 1 for rows_, _ in shapes) and worst_tokens <= rows * width
        assert sum(width_ for _, width_ in shapes) == sum(min(length, seq_len) for length in lengths)
        for batch in seen:
            assert (batch["labels"][batch["position_ids"] == 0] == -100).all()
    else:  # the batch holding the longest row is micro rows of it: the plan's worst batch exactly
        assert max(width_ for _, width_ in shapes) == width == data.row_tokens
        assert worst_tokens == rows * width
        real = sorted(length for batch in seen for length in _row_lengths(batch, packing))
        assert real == sorted(dataset.row_lengths())  # every row once, unpadded as planned
    if packing in ("bfd", "padding-free"):  # the backbone gets the restarting position_ids Trainer collated
        assert len(received) == len(seen)
        for batch, positions in zip(seen, received, strict=True):
            assert positions is not None and torch.equal(positions, batch["position_ids"])
        assert any(int((positions == 0).sum()) > positions.shape[0] for positions in received)  # documents share rows
    else:
        assert all(positions is None for positions in received)  # default positions, no mask: the traced step
    # the summary's tokens are those the batches held (Trainer's count), not the planned micro-batch x seq_len
    held = sum(sum(_row_lengths(batch, packing)) if packing in ("none", "bfd") else batch["input_ids"].numel()
               for batch in seen)
    assert summary.tokens_per_step == round(held / summary.global_step)
    if packing != "concat":
        assert summary.tokens_per_step < micro * data.row_tokens


class PositionsSeen(TrainerCallback):
    """Records the position_ids the model's backbone (the decoder stack) receives in each training forward."""

    def __init__(self, received: list):
        self.received = received

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from transformers import LlamaModel

        backbone = next(module for module in model.modules() if isinstance(module, LlamaModel))
        backbone.register_forward_pre_hook(
            lambda module, positional, keywords: self.received.append(
                None if keywords.get("position_ids") is None else keywords["position_ids"].detach().cpu().clone()),
            with_kwargs=True)


def _row_lengths(batch: dict[str, torch.Tensor], packing: str) -> list[int]:
    """Tokens of each row of a batch before its padding (concat has none; none and bfd pad with -100 labels)."""
    if packing == "concat":
        return [batch["input_ids"].shape[1]] * batch["input_ids"].shape[0]
    return [int(labels.numel()) - _trailing_pad(labels) for labels in batch["labels"]]


def _trailing_pad(labels: torch.Tensor) -> int:
    count = 0
    for value in reversed(labels.tolist()):
        if value != -100:
            break
        count += 1
    return count


# ---- refusals -----------------------------------------------------------------------------------------


def test_a_bad_packing_exits_2_with_the_modes(tmp_path, capsys):
    code = main(["run", str(tmp_path / "plan.json"), "--packing", "greedy"])
    err = words(capsys.readouterr().err)
    assert code == 2 and "argument --packing: invalid choice: 'greedy'" in err and "Traceback" not in err
    assert RunOptions(packing="greedy").problems() == [  # type: ignore[arg-type]
        "--packing 'greedy' is not a batching mode: use one of concat, none, bfd, padding-free (default concat)"]
    with pytest.raises(UsageError, match="--packing 'greedy' is not a batching mode"):
        data_module.build_dataset(data_module.sample_tokenizer(), 64, packing="greedy")


def test_run_takes_packing_and_fit_run_passes_it_on():
    _, options = parse(["run", "plan.json", "--packing", "padding-free"])
    assert options.packing == "padding-free" and "--packing" in options.command_line()
    assert parse(["run", "plan.json"])[1].packing is None  # concat
    _, fit = parse(["fit", "gpt2", "--budget", "8GiB", "--run", "--data", "x.jsonl", "--packing", "none"])
    assert fit.problems() == [] and fit.run_options("plan.json").packing == "none"


def test_bfd_without_trl_exits_2_with_the_install_hint(tmp_path, capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_trl(name, *args, **kwargs):
        if name.split(".")[0] == "trl":
            raise ImportError(f"No module named '{name}'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_trl)
    real_find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "trl" else
                        real_find(name, *args))
    with pytest.raises(UsageError, match=r'install it with pip install -e "\.\[trl\]"'):
        data_module.build_dataset(data_module.sample_tokenizer(), 64, packing="bfd")
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(Plan("gpt2", TrainConfig(seq_len=64), budget_bytes=1 << 30).to_dict()))
    code = main(["run", str(plan), "--packing", "bfd"])
    err = words(capsys.readouterr().err)
    assert code == 2 and "trl" in err and "not installed: install TRL with pip install -e \".[trl]\"" in err
    assert "Traceback" not in err
    with pytest.raises(UsageError, match=r'install TRL with pip install -e "\.\[trl\]"'):  # before the search
        parse(["fit", "gpt2", "--budget", "8GiB", "--run", "--data", "x.jsonl", "--packing", "bfd"])
    _, fit = parse(["fit", "gpt2", "--budget", "8GiB", "--data", "x.jsonl", "--packing", "bfd"])
    assert fit.problems() == []  # planning bfd needs no TRL (run.data_plan.bfd_row_lengths)


def test_the_plan_records_its_packing_and_refuses_an_unknown_one():
    """A plan made with --data --packing bfd says so, and `memtune run` batches that way by default; an unknown
    mode in a plan file is named (exit 2); plans without the key load as concat."""
    from memtune.config import TrainConfig
    from memtune.errors import UsageError
    from memtune.plan import Plan

    plan = Plan(model="gpt2", train_config=TrainConfig(seq_len=64), budget_bytes=2**30, packing="bfd")
    assert Plan.from_dict(plan.to_dict()).packing == "bfd"
    written = plan.to_dict()
    del written["packing"]
    assert Plan.from_dict(written).packing == "concat"
    with pytest.raises(UsageError, match="packing must be one of concat, none, bfd, padding-free, got 'zip'"):
        Plan.from_dict({**plan.to_dict(), "packing": "zip"})
