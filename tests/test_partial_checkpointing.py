"""Checkpointing the first k of a model's L decoder layers (issue 14): configuration, recipe, the two-template
trace, the speed model, the search's bisection and the command line."""

from __future__ import annotations

import pytest

from memtune.config import GIB, Adapter, Policy, TrainConfig, policy_flags
from memtune.errors import UsageError
from memtune.predict import allocator
from memtune.predict.peak import Estimate
from memtune.search import choose, ladder


def test_the_configuration_says_how_many_layers_and_round_trips():
    config = TrainConfig(seq_len=64, gradient_checkpointing=True, checkpoint_layers=3)
    assert TrainConfig.from_dict(config.to_dict()) == config
    assert TrainConfig.from_dict({"seq_len": 64}).checkpoint_layers is None  # plans written before the key
    assert config.describe() == "micro-batch 1 x 1 accum, fp32, checkpointing 3 layers"
    assert config.checkpointed_layers(8) == 3 and config.checkpointed_layers(2) == 2
    assert TrainConfig(seq_len=64, gradient_checkpointing=True).checkpointed_layers(8) == 8
    assert TrainConfig(seq_len=64).checkpointed_layers(8) == 0
    ranks = [TrainConfig(seq_len=64), config, TrainConfig(seq_len=64, gradient_checkpointing=True)]
    assert [c.checkpointing_rank for c in ranks] == sorted(c.checkpointing_rank for c in ranks)


@pytest.mark.parametrize("fields, words", [
    ({"checkpoint_layers": 2}, "needs gradient_checkpointing=True"),
    ({"gradient_checkpointing": True, "checkpoint_layers": 0}, "positive number of layers"),
    ({"gradient_checkpointing": True, "checkpoint_layers": 2, "offload": "optimizer"}, "not modelled under FSDP"),
])
def test_a_configuration_it_cannot_run_is_refused(fields, words):
    with pytest.raises(UsageError, match=words):
        TrainConfig(seq_len=64, **fields)


def test_the_recipe_checkpoints_the_first_layers_only():
    from transformers.modeling_layers import GradientCheckpointingLayer

    from benchmarks.cases import tiny_llama
    from memtune.recipe import step as recipe

    config = TrainConfig(seq_len=16, gradient_checkpointing=True, checkpoint_layers=2)
    model = recipe.build_model(tiny_llama(4), config, "cpu", initialise=False)
    flags = [m.gradient_checkpointing for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    assert flags == [True, True, False, False]


@pytest.mark.parametrize("model_type, layers", [("llama", 8), ("gemma2", 8)])
def test_two_templates_extend_to_every_k_as_the_full_depth_trace(model_type, layers):
    """The shallow trace of both kinds of layer, extended twice (`single.partial_events`), against the trace of
    the whole model with the same k: peak allocated and reserved within 0.5% (exact on these)."""
    from transformers import AutoConfig

    from memtune.predict.single import full_depth_events
    from memtune.predict.trace import trace_step

    extra = {"head_dim": 16} if model_type == "gemma2" else {}
    model_config = AutoConfig.for_model(model_type, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=512, **extra)
    for k in (1, 3, 4, 5, 7):
        config = TrainConfig(seq_len=64, micro_batch_size=2, amp="bf16", gradient_checkpointing=True,
                             checkpoint_layers=k)
        direct = allocator.simulate(trace_step(model_config, config, device="cpu").events)
        extended = allocator.simulate(full_depth_events(model_config, config, "cpu")[1])
        assert extended.peak_allocated_bytes == pytest.approx(direct.peak_allocated_bytes, rel=0.005), k
        assert extended.peak_reserved_bytes == pytest.approx(direct.peak_reserved_bytes, rel=0.005), k


def test_speed_falls_and_memory_rises_with_what_is_left_unrecomputed():
    """Peak allocated (the activations held at the end of forward) falls with each checkpointed layer; reserved
    need not, by a segment here or there."""
    from transformers import LlamaConfig

    from memtune.predict import throughput
    from memtune.predict.estimate import estimate
    from memtune.sources import parameter_count

    config = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=6, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=4000)
    shape = throughput.ModelShape.of(config, parameter_count(config))
    speed = throughput.gpu_speed("H100")
    configs = [TrainConfig(seq_len=256, micro_batch_size=2, amp="bf16", gradient_checkpointing=k > 0,
                           checkpoint_layers=k if 0 < k < 6 else None) for k in range(7)]
    rates = [throughput.tokens_per_second(shape, c, speed) for c in configs]
    assert rates == sorted(rates, reverse=True) and rates[0] > rates[3] > rates[6]
    peaks = [estimate(config, c, device="cpu").peak_allocated_bytes for c in configs]
    assert peaks == sorted(peaks, reverse=True) and peaks[0] > peaks[3] > peaks[6]


class LayeredPredictor:
    """L = 16 layers; memory 10 GiB + 1 GiB per layer not checkpointed (all checkpointed: 10 GiB, none: 26 GiB);
    speed 1.0 without checkpointing, minus 0.02 per checkpointed layer."""

    num_layers = 16

    def __init__(self) -> None:
        self.calls: list[int] = []

    def memory(self, config: TrainConfig) -> Estimate:
        k = config.checkpointed_layers(self.num_layers)
        self.calls.append(k)
        size = int((10 + self.num_layers - k) * GIB)
        return Estimate(config, size, size, workspace_bytes=0, context_bytes=0, breakdown={"activations": size})

    def fits(self, estimate: Estimate, usable_bytes: int) -> bool:
        return estimate.total_bytes <= usable_bytes

    def tokens_per_second(self, config: TrainConfig) -> float:
        return 1.0 - 0.02 * config.checkpointed_layers(self.num_layers)


POLICY = Policy(allow_offload=False, allow_chunked_loss=False, use_adapter=False, margin_bytes=0,
                allow_8bit_optimizer=False, allow_pure_16bit=False, precision="fp32", micro_batch_size=1,
                expandable_segments=False)  # the predictions below are counted: one allocator mode


def test_the_search_bisects_to_the_fewest_checkpointed_layers_that_fit():
    predictor = LayeredPredictor()
    result = choose.search(predictor, 1024, 1, int(20.5 * GIB), POLICY, explain=False)
    assert result.chosen is not None and result.chosen.config.checkpoint_layers == 6  # 10 + 10 = 20 GiB fits, 5 not
    assert predictor.calls[:2] == [0, 16] and len(predictor.calls) <= 2 + 4  # off, all, then log2(16) steps
    every = next(c for c in result.candidates if c.config.checkpointing_rank == float("inf"))
    assert every.status == choose.FITS and "6 of its 16 layers" in every.note
    assert result.candidates.index(result.chosen) == result.candidates.index(every) - 1


def test_a_failed_trial_of_the_fewest_falls_back_to_every_layer():
    predictor = LayeredPredictor()
    tried: list[TrainConfig] = []

    def trial(config: TrainConfig):
        from memtune.measure.memory import Measurement

        tried.append(config)
        if config.checkpoint_layers is not None:
            return Measurement(fits=False, error="CUDA out of memory")
        return Measurement(fits=True, peak_reserved_bytes=10 * GIB, step_seconds=[0.2, 0.1], tokens_per_step=1024)

    result = choose.search(predictor, 1024, 1, int(20.5 * GIB), POLICY, trial=trial, explain=False)
    assert [c.checkpoint_layers for c in tried] == [6, None]
    assert result.chosen is not None and result.chosen.status == choose.VERIFIED
    assert result.chosen.config.checkpoint_layers is None and result.trial_ooms == 1


def test_pinned_checkpointing_is_not_bisected():
    predictor = LayeredPredictor()
    result = choose.search(predictor, 1024, 1, int(20.5 * GIB),
                           POLICY.__class__(**{**POLICY.__dict__, "gradient_checkpointing": True}), explain=False)
    assert result.chosen is not None and result.chosen.config.checkpoint_layers is None
    pinned = choose.search(LayeredPredictor(), 1024, 1, int(30 * GIB),
                           POLICY.__class__(**{**POLICY.__dict__, "gradient_checkpointing": 4}), explain=False)
    assert pinned.chosen is not None and pinned.chosen.config.checkpoint_layers == 4


def test_trainer_leaves_partial_checkpointing_to_the_plan():
    config = TrainConfig(seq_len=64, gradient_checkpointing=True, checkpoint_layers=3)
    assert ladder.trainer_arguments(config)["gradient_checkpointing"] is False
    assert "first 3 decoder layers" in " ".join(ladder.settings(config))
    every = config.replace(checkpoint_layers=None)
    assert ladder.trainer_arguments(every)["gradient_checkpointing"] is True


def test_the_oom_guard_steps_from_some_layers_to_every_layer():
    from memtune.run.stepdown import step_down_ladder

    config = TrainConfig(seq_len=64, micro_batch_size=2, gradient_checkpointing=True, checkpoint_layers=3)
    steps = step_down_ladder(config, 2, chunked_loss=False)
    assert any(step.gradient_checkpointing and step.checkpoint_layers is None and step.micro_batch_size == 2
               for step in steps)


def test_the_command_line_takes_a_number_of_layers():
    from memtune import cli

    parser = cli.build_parser()
    problems: list[str] = []
    args = parser.parse_args(["fit", "gpt2", "--checkpointing", "6"])
    options = cli.options_from(cli.OPTIONS["fit"], args, problems)
    assert problems == [] and options.policy().gradient_checkpointing == 6
    assert "--checkpointing 6" in policy_flags(options.policy())
    args = parser.parse_args(["fit", "gpt2", "--checkpointing", "on"])
    options = cli.options_from(cli.OPTIONS["fit"], args, problems)
    assert options.policy().gradient_checkpointing is True and "--checkpointing on" in policy_flags(options.policy())
    shouted = cli.options_from(cli.OPTIONS["fit"], parser.parse_args(["fit", "gpt2", "--checkpointing", "ON"]),
                               problems)
    assert shouted.policy().gradient_checkpointing is True  # the words are taken in any case
    cli.options_from(cli.OPTIONS["fit"], parser.parse_args(["fit", "gpt2", "--checkpointing", "most"]), problems)
    assert problems and "expected auto, on, off or a number of layers, got 'most'" in problems[0]


def test_plan_takes_a_number_of_layers(capsys):
    from memtune import cli

    code = cli.main(["plan", "gpt2", "--seq-len", "128", "--batch-size", "2", "--checkpoint-layers", "4", "--json"])
    assert code == 0
    import json

    document = json.loads(capsys.readouterr().out)
    assert document["estimate"]["config"]["checkpoint_layers"] == 4


def test_a_bad_number_of_layers_exits_2(capsys):
    from memtune import cli

    assert cli.main(["fit", "gpt2", "--checkpointing", "0", "--budget", "4GiB"]) == 2
    assert "a number of layers must be at least 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("command", [
    ["fit", "gpt2", "--seq-len", "128", "--batch-size", "2", "--budget", "8GiB", "--no-verify", "--checkpointing",
     "13"],
    ["plan", "gpt2", "--seq-len", "128", "--batch-size", "2", "--checkpoint-layers", "13"],
])
def test_more_layers_than_the_model_has_exits_2(command, capsys):
    from memtune import cli

    assert cli.main(command) == 2
    assert "the model has 12 decoder layers; checkpoint at most 12" in capsys.readouterr().err


def test_as_many_layers_as_the_model_has_is_every_layer(capsys):
    import json

    from memtune import cli

    assert cli.main(["plan", "gpt2", "--seq-len", "128", "--batch-size", "2", "--checkpoint-layers", "12",
                     "--json"]) == 0
    config = json.loads(capsys.readouterr().out)["estimate"]["config"]
    assert config["gradient_checkpointing"] is True and config["checkpoint_layers"] is None


def test_the_report_says_why_it_checkpoints_the_layers_it_does():
    from transformers import GPT2Config

    from memtune.report.words import checkpointing_words

    config = TrainConfig(seq_len=64, gradient_checkpointing=True, checkpoint_layers=5)
    chosen = checkpointing_words(config, GPT2Config(n_layer=12))
    assert chosen == ("checkpointing the first 5 of 12 decoder layers: the fewest predicted to fit (4 do not); "
                      "checkpointing all of them would recompute 7 more")
    pinned = checkpointing_words(config, GPT2Config(n_layer=12), pinned=5)
    assert pinned == "checkpointing the first 5 of 12 decoder layers, as --checkpointing 5 asks"
    assert checkpointing_words(config.replace(checkpoint_layers=None), GPT2Config()) is None


def test_a_prefix_with_some_layers_checkpointed_names_the_flag_given():
    with pytest.raises(UsageError, match="--prefix contradicts --checkpointing 4"):
        Policy(use_adapter=True, adapter=Adapter(kind="prefix"), gradient_checkpointing=4).validate(8)
