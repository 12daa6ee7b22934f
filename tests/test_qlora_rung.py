"""The quantised-base rung (QLoRA) of the search: walked after every LoRA configuration on a 16/32-bit base,
forbidden by --no-qlora, pinned by --qlora 4|8, skipped with one line without bitsandbytes; its words.

The search runs on a fake predictor (no trace), with `ladder.bitsandbytes_available` patched either way, so these
tests pass with and without bitsandbytes installed."""

from __future__ import annotations

import pytest

from memtune.cli import main, parse
from memtune.config import GIB, QUANT_EXTRA_HINT, Adapter, Policy, Quantization, TrainConfig, policy_flags
from memtune.errors import UsageError
from memtune.report import words
from memtune.search import ladder
from memtune.search.choose import needs_at_least, search, stages


class QloraPredictor:
    """Memory in GiB: a full fine-tune 16 (never fits here); under LoRA a base of 2 (16-bit weights), 4 (fp32),
    0.5 (4-bit) or 1 (8-bit), plus activations of 2 per sequence (0.5 with checkpointing). Speed: checkpointing
    0.7x, and a quantised base predicted *faster* (1.2x) than any other, so that only the walk's order (`tier`)
    keeps it after the LoRA configurations on a 16/32-bit base."""

    BASE_GIB = {None: {"bf16": 2.0, "fp16": 2.0, "fp32": 4.0}, 4: 0.5, 8: 1.0}

    def __init__(self) -> None:
        self.calls: list[TrainConfig] = []

    def gib(self, config: TrainConfig) -> float:
        if config.adapter is None:
            return 16.0
        base = self.BASE_GIB[None][config.weights_dtype] if config.quantization is None else self.BASE_GIB[
            config.quantization.bits]
        return base + (0.5 if config.gradient_checkpointing else 2.0) * config.micro_batch_size

    def memory(self, config: TrainConfig):
        from memtune.predict.estimate import Estimate

        self.calls.append(config)
        size = int(self.gib(config) * GIB)
        return Estimate(config, size, size, workspace_bytes=0, context_bytes=0, breakdown={"weights": size})

    def fits(self, estimate, usable_bytes: int) -> bool:
        return estimate.total_bytes <= usable_bytes

    def tokens_per_second(self, config: TrainConfig) -> float:
        return (0.7 if config.gradient_checkpointing else 1.0) * (1.2 if config.quantization is not None else 1.0)


POLICY = dict(allow_offload=False, allow_chunked_loss=False, allow_8bit_optimizer=False, margin_bytes=0,
              micro_batch_size=2)


def searched(budget_gib: float, predictor: QloraPredictor | None = None, explain: bool = False, **policy):
    return search(predictor or QloraPredictor(), 64, 2, int(budget_gib * GIB), Policy(**(POLICY | policy)),
                  explain=explain)


@pytest.fixture
def with_bitsandbytes(monkeypatch):
    monkeypatch.setattr(ladder, "bitsandbytes_available", lambda: True)


@pytest.fixture
def without_bitsandbytes(monkeypatch):
    monkeypatch.setattr(ladder, "bitsandbytes_available", lambda: False)


def base_of(config: TrainConfig | None) -> int | None:
    assert config is not None
    return None if config.quantization is None else config.quantization.bits


# ---- the walk -------------------------------------------------------------------------------------------


def test_a_quantised_base_is_chosen_only_when_no_lora_on_a_16bit_base_fits(with_bitsandbytes):
    # 3 GiB: bf16 LoRA with checkpointing (2 + 1) fits; the 4-bit base without checkpointing (0.5 + 4) does not,
    # and with checkpointing (1.5, predicted 0.84x) would be faster: the bf16 base wins, as the walk's order says.
    predictor = QloraPredictor()
    result = searched(3, predictor)
    assert result.chosen is not None
    assert base_of(result.chosen.config) is None
    assert (result.chosen.config.precision, result.chosen.config.gradient_checkpointing) == ("bf16", True)
    assert all(config.quantization is None for config in predictor.calls)
    # 2.5 GiB: no LoRA on a 16/32-bit base fits (2 + 1 at the least); the 4-bit base with checkpointing does.
    predictor = QloraPredictor()
    result = searched(2.5, predictor)
    chosen = result.chosen.config
    assert base_of(chosen) == 4 and chosen.gradient_checkpointing
    assert chosen.quantization == Quantization(bits=4, quant_type="nf4", use_double_quant=True, compute_dtype="bf16")
    assert (chosen.weights_dtype, chosen.amp) == ("bf16", "bf16")
    assert "4-bit base (nf4)" in chosen.describe()
    first_quantised = next(i for i, config in enumerate(predictor.calls) if config.quantization is not None)
    assert all(config.quantization is None for config in predictor.calls[:first_quantised])
    assert all(config.quantization is not None for config in predictor.calls[first_quantised:])
    assert {config.adapter is None for config in predictor.calls[:1]} == {True}  # full fine-tuning came first


def test_the_8bit_base_is_chosen_where_only_it_fits_before_the_4bit_one_is_faster(with_bitsandbytes):
    # Among the quantised bases the faster predicted one that fits wins: 8-bit and 4-bit tie on speed here, and
    # the 4-bit one comes first (`quantized_fields` order); with 8 bits pinned only 8 bits are tried.
    result = searched(2.5, quantized_base=8)
    assert base_of(result.chosen.config) == 8
    assert "8-bit base" in result.chosen.config.describe()


def test_no_qlora_forbids_the_quantised_base(with_bitsandbytes):
    result = searched(2.5, allow_quantized_base=False)
    assert result.chosen is None
    assert all(candidate.config.quantization is None for candidate in result.candidates)
    assert not any("quantised" in note for note in result.notes)


def test_qlora_4_pins_the_quantised_base_and_implies_lora(with_bitsandbytes):
    policy = Policy(**(POLICY | {"quantized_base": 4}))
    assert stages(policy) == [True]
    predictor = QloraPredictor()
    result = searched(100, predictor, quantized_base=4)  # everything fits: the pin decides
    assert {base_of(candidate.config) for candidate in result.candidates} == {4}
    assert base_of(result.chosen.config) == 4 and not result.chosen.config.gradient_checkpointing
    assert all(config.adapter is not None for config in predictor.calls)


def test_qlora_without_bitsandbytes_is_a_usage_error_with_the_install_command(without_bitsandbytes):
    with pytest.raises(UsageError, match=r"--qlora 4 needs bitsandbytes.*" + QUANT_EXTRA_HINT.replace(".", r"\.")
                       .replace("[", r"\[").replace("]", r"\]")):
        searched(100, quantized_base=4)


def test_without_bitsandbytes_the_quantised_base_is_skipped_with_one_line(without_bitsandbytes):
    result = searched(2.5, use_adapter=True)
    assert result.chosen is None
    assert all(candidate.config.quantization is None for candidate in result.candidates)
    skipped = [note for note in result.notes if "quantised bases" in note]
    assert skipped == [f"quantised bases (QLoRA, 4-bit / 8-bit under LoRA) skipped: bitsandbytes is not installed "
                       f"({QUANT_EXTRA_HINT} to add them)"]
    assert not any("quantised" in note for note in ladder.skipped(Policy(allow_quantized_base=False)))
    assert not any("quantised" in note for note in ladder.skipped(Policy(use_adapter=False)))


def test_no_quantised_base_over_several_gpus_or_for_prefix_tuning(with_bitsandbytes):
    space = ladder.candidate_space(64, 4, Policy(num_gpus=2), with_adapter=True)
    assert space and all(config.quantization is None for config in space)
    space = ladder.candidate_space(64, 2, Policy(adapter=Adapter(kind="prefix")), with_adapter=True)
    assert space and all(config.quantization is None for config in space)
    space = ladder.candidate_space(64, 2, Policy(), with_adapter=False)
    assert all(config.quantization is None for config in space)


def test_the_candidate_space_holds_each_quantised_configuration_once(with_bitsandbytes):
    space = ladder.candidate_space(64, 2, Policy(**POLICY), with_adapter=True)
    assert len(space) == len(set(space))
    quantised = [config for config in space if config.quantization is not None]
    # 4 and 8 bits; without checkpointing, with it, with it and the inputs offloaded; either allocator mode
    assert len(quantised) == 2 * 3 * 2
    assert {ladder.tier(config) for config in quantised} == {4}
    assert max(ladder.tier(config) for config in space if config.quantization is None) < 4


def test_a_card_without_bf16_computes_the_quantised_base_in_fp16(with_bitsandbytes):
    space = ladder.candidate_space(64, 2, Policy(**POLICY, bf16_supported=False), with_adapter=True)
    quantised = [config for config in space if config.quantization is not None]
    assert {(c.weights_dtype, c.amp, c.quantization.compute_dtype) for c in quantised} == {("fp16", "fp16", "fp16")}


def test_a_quantised_base_never_implies_a_16bit_one():
    lora = TrainConfig(seq_len=64, micro_batch_size=2, weights_dtype="bf16", amp="bf16", adapter=Adapter())
    assert not needs_at_least(lora, lora.replace(quantization=Quantization()))
    assert not needs_at_least(lora.replace(quantization=Quantization()), lora)


# ---- the policy and the command line ----------------------------------------------------------------


@pytest.mark.parametrize(("changes", "message"), [
    ({"quantized_base": 4, "use_adapter": False}, "--qlora 4 trains LoRA on a quantised base, which --no-lora"),
    ({"quantized_base": 8, "allow_quantized_base": False}, "--qlora 8 contradicts --no-qlora"),
    ({"quantized_base": 4, "num_gpus": 2}, "--qlora 4 is planned on one GPU, got --gpus 2"),
    ({"quantized_base": 4, "offload": "parameters"}, "--qlora 4 is planned without CPU offload"),
    ({"quantized_base": 4, "adapter": Adapter(kind="prefix"), "use_adapter": True}, "not prefix tuning"),
    ({"quantized_base": 3}, "--qlora must be 4 or 8"),
])
def test_the_policy_refuses_a_pinned_quantised_base_that_cannot_run(changes, message):
    with pytest.raises(UsageError, match=message):
        Policy(**changes).validate(4)


def test_the_cli_flags_parse_and_give_back_the_same_policy():
    _, fit = parse(["fit", "gpt2", "--budget", "8GiB", "--qlora", "4"])
    policy = fit.policy()
    assert policy.quantized_base == 4 and policy.allow_quantized_base
    assert "--qlora 4" in policy_flags(policy)
    again = parse(["fit", "gpt2", "--budget", "8GiB", *" ".join(policy_flags(policy)).split()])[1].policy()
    assert again == policy
    _, fit = parse(["fit", "gpt2", "--budget", "8GiB", "--no-qlora"])
    assert fit.policy().allow_quantized_base is False and "--no-qlora" in policy_flags(fit.policy())


def test_the_cli_flags_are_in_the_help(capsys):
    assert main(["fit", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--qlora {4,8}" in text and "--no-qlora" in text
    assert "QLoRA" in text


@pytest.mark.parametrize(("flags", "message"), [
    (["--qlora", "4", "--no-lora"], "--qlora 4 trains LoRA on a quantised base, which --no-lora forbids"),
    (["--qlora", "8", "--no-qlora"], "--qlora 8 contradicts --no-qlora"),
])
def test_contradicting_qlora_flags_exit_2(flags, message, capsys):
    code = main(["fit", "gpt2", "--budget", "8GiB", *flags])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and message in err


def test_an_unknown_bit_width_exits_2(capsys):
    assert main(["fit", "gpt2", "--budget", "8GiB", "--qlora", "3"]) == 2
    assert "--qlora: invalid choice: '3'" in capsys.readouterr().err


def test_auto_fit_takes_allow_quantized_as_the_policy_field(monkeypatch):
    import memtune
    from memtune import fit

    seen = {}

    def fake_fit_model(*args, policy, **kwargs):
        seen["policy"] = policy
        raise UsageError("stop here")

    monkeypatch.setattr(fit, "fit_model", fake_fit_model)
    with pytest.raises(UsageError, match="stop here"):
        memtune.auto_fit("gpt2", budget="6GiB", allow_quantized=False)
    assert seen["policy"].allow_quantized_base is False
    with pytest.raises(UsageError, match="give allow_quantized or allow_quantized_base, not both"):
        memtune.auto_fit("gpt2", budget="6GiB", allow_quantized=False, allow_quantized_base=False)


# ---- words ----------------------------------------------------------------------------------------------


def test_the_quantised_base_has_its_quality_note_and_settings():
    fields = ladder.quantized_fields(4, Policy())
    config = TrainConfig(seq_len=64, adapter=Adapter(), **fields)
    note = words.quality_note(config)
    assert "4-bit base (nf4): the base weights are quantised (QLoRA, Dettmers et al. 2023: nf4 + double " \
           "quantisation), the adapter trains in bf16" in note
    lines = ladder.settings(config)
    assert any("BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=\"nf4\", bnb_4bit_use_double_quant=True, "
               "bnb_4bit_compute_dtype=torch.bfloat16)" in line for line in lines)
    assert ladder.trainer_arguments(config)["bf16"] is True
    eight = config.replace(**ladder.quantized_fields(8, Policy()))
    assert "8-bit base: the base weights are quantised to 8 bits" in words.quality_note(eight)
    assert ladder.is_quality_trade(config)


def test_why_this_one_offers_the_quantised_base_beside_lora_and_the_16bit_base_beside_it(with_bitsandbytes):
    result = searched(3, explain=True)
    changes = [alternative.change for alternative in result.alternatives]
    assert "+ 4-bit base (nf4)" in changes
    plus = next(a for a in result.alternatives if a.change == "+ 4-bit base (nf4)")
    assert plus.config.quantization is not None and plus.fits
    result = searched(2.5, explain=True)
    changes = [alternative.change for alternative in result.alternatives]
    assert "bf16 base instead of the 4-bit base (nf4)" in changes
    assert not any(change.startswith("fp32 instead") for change in changes)  # no precision flip of a quantised plan
    assert "+ 4-bit base (nf4)" not in [a.change for a in searched(3, explain=True, allow_quantized_base=False)
                                        .alternatives]


def test_the_python_snippet_loads_the_quantised_base_and_prepares_it():
    config = TrainConfig(seq_len=64, adapter=Adapter(), gradient_checkpointing=True,
                         **ladder.quantized_fields(8, Policy(bf16_supported=False)))
    snippet = words.python_snippet(config)
    assert "quantization_config = BitsAndBytesConfig(load_in_8bit=True)" in snippet
    assert "from_pretrained(MODEL, dtype=torch.float16, quantization_config=quantization_config)" in snippet
    assert "prepare_model_for_kbit_training(model, use_gradient_checkpointing=True" in snippet
    assert "    fp16=True," in snippet
    compile(snippet, "snippet", "exec")  # valid Python


def test_plan_predicts_one_quantised_base_configuration():
    _, options = parse(["plan", "llama-3.2-1b", "--batch-size", "4", "--qlora", "4", "--checkpointing"])
    config = options.train_config()
    assert config.quantization == Quantization(bits=4, quant_type="nf4", use_double_quant=True, compute_dtype="bf16")
    assert config.adapter == Adapter() and (config.weights_dtype, config.amp) == ("bf16", "bf16")
    fp16 = parse(["plan", "llama-3.2-1b", "--qlora", "8", "--precision", "fp16-mixed"])[1].train_config()
    assert fp16.quantization == Quantization(bits=8, compute_dtype="fp16")
    assert (fp16.weights_dtype, fp16.amp) == ("fp32", "fp16")


def test_plan_with_a_quantised_base_exits_2_with_the_install_hint_without_bitsandbytes(monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    assert main(["plan", "gpt2", "--seq-len", "64", "--batch-size", "1", "--qlora", "4", "--budget", "8GiB"]) == 2
    err = capsys.readouterr().err
    assert QUANT_EXTRA_HINT in err and "Traceback" not in err
