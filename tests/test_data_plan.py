"""Data-aware planning (`memtune/run/data_plan.py`, `plan|fit --data --packing`): the token lengths of a long-tailed
corpus, the worst batch of each batching mode, the truncated count, the CLI's refusals and `plan --data` end to end."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from benchmarks import make_longtail
from memtune.cli import main
from memtune.errors import UsageError
from memtune.options import PACKING_MODES
from memtune.run import data as data_module
from memtune.run.data_plan import (
    DataPlan,
    LengthStats,
    bfd_row_lengths,
    percentile,
    plan_data,
    plan_lengths,
    token_lengths,
)
from memtune.sources import resolve
from tests.test_report import documented_types, schema_errors


def words(text: str) -> str:
    return re.sub(r"\s+", " ", text)


@pytest.fixture(scope="module")
def longtail(tmp_path_factory: pytest.TempPathFactory):
    """300 documents of log-normal length (benchmarks/make_longtail.py), as JSON Lines."""
    path = tmp_path_factory.mktemp("data") / "longtail.jsonl"
    return make_longtail.write_jsonl(make_longtail.make_documents(300, seed=3), path)


# ---- lengths ------------------------------------------------------------------------------------------


def test_percentiles_are_nearest_rank():
    values = list(range(1, 101))
    assert [percentile(values, p) for p in (50, 90, 99, 100)] == [50, 90, 99, 100]
    assert percentile([7], 50) == 7 and percentile([], 50) == 0
    assert percentile([1, 2, 3, 4], 50) == 2  # the 2nd of 4 (ceil(0.5 x 4)), not an interpolated 2.5


def test_length_statistics_of_a_long_tailed_corpus(longtail):
    tokenizer = data_module.sample_tokenizer()
    texts = data_module.read_texts(longtail)
    seen: list[tuple[int, int]] = []
    lengths = token_lengths(tokenizer, texts, progress=lambda done, total: seen.append((done, total)), chunk=64)
    # each document's tokens plus the end-of-text token run.data.tokenize appends
    assert lengths == [len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1 for text in texts]
    assert seen[-1] == (300, 300) and len(seen) == math.ceil(300 / 64)
    stats = LengthStats.of(lengths)
    ordered = np.array(sorted(lengths))
    expected = [int(np.percentile(ordered, p, method="inverted_cdf")) for p in (50, 90, 99)]
    assert [stats.p50_tokens, stats.p90_tokens, stats.p99_tokens] == expected
    assert (stats.num_sequences, stats.total_tokens, stats.max_tokens) == (300, sum(lengths), max(lengths))
    assert stats.max_tokens > 8 * stats.p50_tokens  # the tail the generator is for


def test_the_generator_is_deterministic_and_long_tailed():
    first, again = make_longtail.make_documents(200, seed=5), make_longtail.make_documents(200, seed=5)
    assert first == again and first != make_longtail.make_documents(200, seed=6)
    sizes = sorted(len(text) for text in first)
    assert sizes[-1] > 10 * sizes[len(sizes) // 2]


# ---- the worst batch of each mode ----------------------------------------------------------------------

LENGTHS = [10, 500, 30, 2000, 40, 70]


def test_truncation_counts_the_documents_longer_than_seq_len():
    for packing in PACKING_MODES:
        data = plan_lengths(LENGTHS, 256, packing)
        assert data.over_seq_len == 2  # 500 and 2000
        assert data.truncated_sequences == (0 if packing == "concat" else 2)  # concat splits, the others cut
    assert plan_lengths(LENGTHS, 4096, "none").over_seq_len == 0


def test_concat_batches_are_micro_batch_by_seq_len():
    data = plan_lengths(LENGTHS, 256, "concat").with_micro_batch(4)
    assert data.row_tokens == 256 and data.worst_batch() == (4, 256)


def test_no_packing_pads_to_the_longest_document_truncated_at_seq_len():
    assert plan_lengths(LENGTHS, 256, "none").with_micro_batch(2).worst_batch() == (2, 256)
    assert plan_lengths(LENGTHS, 4096, "none").with_micro_batch(2).worst_batch() == (2, 2000)


def test_bfd_packs_as_trl_documents_it():
    # trl.data_utils.pack_dataset's docstring: lengths 5, 2, 3, 1 at seq_length 4 -> rows [1,2,3,4] (5 truncated),
    # [8,9,10,11] (3 + 1), [6,7] (2)
    assert sorted(bfd_row_lengths([5, 2, 3, 1], 4)) == [2, 4, 4]
    # 70 opens a row (room 30), 60 another (room 40), 20 goes where the least room holds it: the first (90 of 100)
    assert sorted(bfd_row_lengths([70, 60, 20], 100)) == [60, 90]
    data = plan_lengths([70, 60, 20], 100, "bfd").with_micro_batch(3)
    assert data.row_tokens == 90 and data.worst_batch() == (3, 90)
    assert bfd_row_lengths([0, 3], 4) == [3]  # empty documents are dropped, as TRL does
    assert data.mask_bytes == 3 * 90 * 90  # rows x N x N: the run's restarting position_ids make SDPA a mask too


def test_bfd_packs_each_map_batch_apart():
    # TRL packs inside datasets.map(batched=True): 1,000 documents at a time, so rows never mix two batches
    assert bfd_row_lengths([3] * 4, 6, pass_size=3) == [6, 3, 3]
    assert bfd_row_lengths([3] * 4, 6) == [6, 6]


def test_bfd_agrees_with_trl_where_it_is_installed():
    """The planned rows are those of TRL's own pack_dataset, which `memtune run --packing bfd` runs (`pack_bfd`)."""
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    import torch

    rng = np.random.default_rng(0)
    lengths = [int(n) for n in np.minimum(rng.lognormal(4, 1.3, size=2500), 5000).astype(int) + 1]
    offsets = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int64)
    corpus = data_module.TokenizedCorpus(torch.ones(int(offsets[-1]), dtype=torch.int32), offsets)
    packed = data_module.pack_bfd(corpus, 512)
    assert sorted(packed.row_lengths()) == sorted(bfd_row_lengths(lengths, 512))


def test_padding_free_is_one_row_of_the_longest_documents():
    data = plan_lengths(LENGTHS, 4096, "padding-free").with_micro_batch(3)
    assert data.worst_batch() == (1, 2000 + 500 + 70)
    assert data.row_tokens == 2000  # traced as 3 rows of the longest: at least the batch's tokens
    assert data.mask_bytes == (2000 + 500 + 70) ** 2  # the block-diagonal bool mask SDPA gets, not traced
    truncated = plan_lengths(LENGTHS, 256, "padding-free").with_micro_batch(2)
    assert truncated.worst_batch() == (1, 512)  # the token budget: micro-batch x seq_len
    assert plan_lengths(LENGTHS, 256, "none").with_micro_batch(2).mask_bytes == 0


def test_a_bad_packing_or_no_documents_is_a_usage_error():
    with pytest.raises(UsageError, match="--packing 'greedy' is not a batching mode: use one of concat, none"):
        plan_lengths(LENGTHS, 256, "greedy")
    with pytest.raises(UsageError, match="holds no documents"):
        plan_lengths([], 256, "none")


def test_a_local_model_counts_with_its_own_tokenizer(model_dir, longtail):
    data = plan_data(resolve(str(model_dir)), longtail, 96, "none")
    assert data.tokenizer == f"tokenizer of {model_dir}"
    assert isinstance(data, DataPlan) and data.lengths.num_sequences == 300 and data.row_tokens == 96


# ---- the command line ---------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["plan", "gpt2"], ["fit", "gpt2", "--budget", "8GiB"]])
def test_a_missing_data_path_exits_2_before_any_trace(command, capsys):
    code = main([*command, "--data", "missing.jsonl"])
    err = words(capsys.readouterr().err)
    assert code == 2
    assert "--data 'missing.jsonl' does not exist: give a .jsonl, .json or .txt file or a folder of them" in err
    assert "predicting" not in err and "Traceback" not in err


@pytest.mark.parametrize("args,message", [
    (["plan", "gpt2", "--packing", "greedy"],
     "argument --packing: invalid choice: 'greedy' (choose from 'concat', 'none', 'bfd', 'padding-free')"),
    (["plan", "gpt2", "--packing", "bfd"], "--packing bfd plans the worst batch of the data's lengths: add --data"),
    (["fit", "gpt2", "--budget", "8GiB", "--packing", "none"],
     "--packing none plans the worst batch of the data's lengths: add --data FILE, or drop --packing"),
])
def test_a_bad_packing_exits_2_with_the_value_and_the_fix(args, message, capsys):
    code = main(args)
    assert code == 2 and message in words(capsys.readouterr().err)


def test_fit_data_without_run_is_planned_and_run_still_gets_it():
    from memtune.cli import parse

    _, options = parse(["fit", "gpt2", "--budget", "8GiB", "--data", "train.jsonl", "--packing", "bfd"])
    assert options.training_data.data == "train.jsonl" and options.training_data.packing == "bfd"
    _, options = parse(["fit", "gpt2", "--budget", "8GiB", "--run", "--data", "train.jsonl", "--text-field", "body"])
    run = options.run_options("plan.json")
    assert (run.data, run.text_field) == ("train.jsonl", "body")


def test_plan_data_end_to_end_traces_the_worst_batch(capsys):
    """gpt2 (catalog: memtune's shipped tokenizer) on the shipped sample, no padding: the longest document is under
    --seq-len, so the step is traced at its length, not at 1,024."""
    corpus = str(data_module.SAMPLE_CORPUS_PATH)
    code = main(["plan", "gpt2", "--seq-len", "1024", "--batch-size", "4", "--micro-batch-size", "2", "--data", corpus,
                 "--packing", "none", "--trace-device", "cpu", "--budget", "16GiB", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    document = json.loads(captured.out)
    data = document["data"]
    tokenizer = data_module.sample_tokenizer()
    lengths = token_lengths(tokenizer, data_module.read_texts(corpus))
    assert data["num_sequences"] == len(lengths) == 704
    assert data["max_tokens"] == max(lengths) < 1024 and data["over_seq_len"] == 0
    assert data["row_tokens"] == max(lengths) and data["micro_batch_size"] == 2
    assert (data["worst_batch_rows"], data["worst_batch_row_tokens"]) == (2, max(lengths))
    assert document["estimate"]["config"]["seq_len"] == max(lengths)  # what was traced
    assert schema_errors(document, "PlanDocument", documented_types_now()) == []


def test_the_terminal_report_has_a_data_section(longtail, capsys):
    code = main(["plan", "gpt2", "--seq-len", "256", "--batch-size", "2", "--data", str(longtail),
                 "--packing", "padding-free", "--trace-device", "cpu"])
    out = words(capsys.readouterr().out)
    assert code == 0
    data = plan_data(resolve("gpt2"), longtail, 256, "padding-free").with_micro_batch(2)
    stats = data.lengths
    assert f"lengths in tokens: p50 {stats.p50_tokens:,}, p90 {stats.p90_tokens:,}, p99 {stats.p99_tokens:,}" in out
    assert f"longer than --seq-len 256: {data.over_seq_len:,} of 300 (truncated: {data.over_seq_len:,} lose" in out
    assert f"worst batch 1 x {data.worst_batch()[1]:,} tokens" in out and "block-diagonal mask" in out


def documented_types_now() -> dict[str, dict[str, str]]:
    from tests.test_report import SCHEMA_DOC

    return documented_types(SCHEMA_DOC.read_text())


def test_fit_data_searches_at_the_worst_row_and_records_the_data(tmp_path, capsys):
    """fit --data --packing none: the search, the saved plan and the JSON use the longest document's length."""
    corpus = str(data_module.SAMPLE_CORPUS_PATH)
    plan_path = tmp_path / "plan.json"
    code = main(["fit", "gpt2", "--seq-len", "1024", "--batch-size", "8", "--budget", "12GiB", "--no-verify",
                 "--trace-device", "cpu", "--data", corpus, "--packing", "none", "--plan-out", str(plan_path),
                 "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    document = json.loads(captured.out)
    longest = max(token_lengths(data_module.sample_tokenizer(), data_module.read_texts(corpus)))
    chosen = document["plan"]["train_config"]
    assert chosen["seq_len"] == longest and json.loads(plan_path.read_text())["train_config"]["seq_len"] == longest
    assert document["seq_len"] == 1024  # the task as given: the reproduce line's --seq-len
    assert document["data"]["micro_batch_size"] == chosen["micro_batch_size"]
    assert (document["data"]["worst_batch_rows"], document["data"]["worst_batch_row_tokens"]) == (
        chosen["micro_batch_size"], longest)
    assert schema_errors(document, "FitDocument", documented_types_now()) == []


def test_the_html_page_has_the_data_section(longtail):
    from memtune.fit import FitResult
    from memtune.report import html

    data = plan_data(resolve("gpt2"), longtail, 256, "bfd").with_micro_batch(4)
    page = html.render_html(FitResult(resolve("gpt2"), 124_439_808, 256, 8, data=data))
    stats = data.lengths
    assert f"lengths in tokens: p50 {stats.p50_tokens:,}, p90 {stats.p90_tokens:,}" in page
    assert f"worst batch 4 x {data.row_tokens:,} tokens" in page


def test_without_a_chosen_micro_batch_the_worst_row_is_given_per_micro_batch():
    from memtune.report.words import data_lines

    lines = data_lines(plan_lengths(LENGTHS, 4096, "none", source="x.jsonl", tokenizer="t"))
    assert lines[-1] == "  batching: none; worst batch micro-batch x 2,000 tokens per row"
