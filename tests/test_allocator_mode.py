"""The caching allocator's mode as a rung (issue 14, item 4): expandable segments predicted, chosen, set."""

from __future__ import annotations

import json

import pytest

from memtune.config import Policy, TrainConfig, policy_flags
from memtune.measure import memory
from memtune.plan import Plan
from memtune.search import ladder


def test_the_mode_round_trips_and_old_plans_read_as_the_default():
    config = TrainConfig(seq_len=64, expandable_segments=True)
    assert TrainConfig.from_dict(config.to_dict()) == config
    assert TrainConfig.from_dict({"seq_len": 64}).expandable_segments is False
    assert config.describe().endswith("expandable segments")
    assert config.traced() == TrainConfig(seq_len=64)


def test_both_modes_share_one_trace_and_differ_only_in_the_allocator():
    from benchmarks.cases import tiny_llama
    from memtune.predict import allocator
    from memtune.predict.estimate import estimate
    from memtune.predict.single import full_depth_events

    model = tiny_llama(3)
    default = TrainConfig(seq_len=256, micro_batch_size=4, amp="bf16")
    expandable = default.replace(expandable_segments=True)
    trace, events = full_depth_events(model, default, "cpu")
    assert full_depth_events(model, expandable, "cpu")[0] is trace
    a, b = estimate(model, default, device="cpu"), estimate(model, expandable, device="cpu")
    assert a.peak_allocated_bytes == b.peak_allocated_bytes
    assert b.peak_reserved_bytes == allocator.simulate(events, expandable=True).peak_reserved_bytes
    assert a.peak_reserved_bytes == allocator.simulate(events).peak_reserved_bytes


def test_the_search_offers_both_modes_and_the_policy_pins_one():
    space = ladder.candidate_space(64, 2, Policy(allow_8bit_optimizer=False), with_adapter=False)
    assert {c.expandable_segments for c in space} == {False, True}
    pinned = Policy(allow_8bit_optimizer=False, expandable_segments=True)
    assert {c.expandable_segments for c in ladder.candidate_space(64, 2, pinned, with_adapter=False)} == {True}
    assert "--expandable-segments on" in policy_flags(pinned)
    flips = dict(ladder.alternatives(TrainConfig(seq_len=64), Policy(), 2))
    assert flips["+ expandable segments"].expandable_segments


def test_the_plan_sets_the_mode_before_cuda_starts_and_keeps_other_settings(monkeypatch):
    monkeypatch.setenv(memory.ALLOC_CONF, "max_split_size_mb:512,expandable_segments:False")
    assert memory.set_allocator_mode(True)
    import os

    assert os.environ[memory.ALLOC_CONF] == "max_split_size_mb:512,expandable_segments:True"
    config = TrainConfig(seq_len=64, expandable_segments=True)
    args = ladder.trainer_arguments(config)
    assert "expandable" not in json.dumps(args)  # not a TrainingArguments field: the environment carries it
    assert "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True" in " ".join(ladder.settings(config))
    monkeypatch.setenv(memory.ALLOC_CONF, "")
    from transformers import AutoModelForCausalLM

    from benchmarks.cases import tiny_llama

    Plan("tiny", TrainConfig(seq_len=64), budget_bytes=1 << 30).prepare(
        AutoModelForCausalLM.from_config(tiny_llama()), warm_up=False)
    assert os.environ[memory.ALLOC_CONF] == "expandable_segments:False"  # the plan's own mode, always said


@pytest.mark.parametrize("flag, expected", [(["--expandable-segments"], True), ([], False)])
def test_plan_predicts_the_mode_it_is_given(flag, expected, capsys):
    from memtune import cli

    assert cli.main(["plan", "gpt2", "--seq-len", "128", "--batch-size", "2", "--json", *flag]) == 0
    assert json.loads(capsys.readouterr().out)["estimate"]["config"]["expandable_segments"] is expected


def test_expandable_segments_are_chosen_where_the_default_fits_only_by_releasing_its_cache():
    """The default allocator's step of 10 GiB would fit 9 GiB by releasing its cache (`fits`); expandable
    segments need 8.5 GiB, no release: the same speed, so the search takes them."""
    from memtune.config import GIB
    from memtune.predict.peak import Estimate
    from memtune.search.choose import FITS, search

    class Releasing:
        def memory(self, config: TrainConfig) -> Estimate:
            size = int((8.5 if config.expandable_segments else 10) * GIB)
            return Estimate(config, size, size, workspace_bytes=0, context_bytes=0, breakdown={"weights": size})

        def fits(self, estimate: Estimate, usable_bytes: int) -> bool:
            return estimate.total_bytes <= usable_bytes + 2 * GIB  # room made by releasing the cache

        def tokens_per_second(self, config: TrainConfig) -> float:
            return 1.0

    policy = Policy(allow_offload=False, allow_chunked_loss=False, use_adapter=False, margin_bytes=0,
                    allow_8bit_optimizer=False, allow_pure_16bit=False, precision="fp32", micro_batch_size=1,
                    gradient_checkpointing=False, loss="standard")
    result = search(Releasing(), 64, 1, 9 * GIB, policy, explain=False)
    assert result.chosen is not None and result.chosen.config.expandable_segments
    default = next(c for c in result.candidates if not c.config.expandable_segments)
    assert default.status == FITS and "releasing the allocator's cache" in default.note
    roomy = search(Releasing(), 64, 1, 11 * GIB, policy, explain=False)  # both fit without: the default
    assert roomy.chosen is not None and not roomy.chosen.config.expandable_segments
