"""TRL's trainers (issue 18): --trainer sft|dpo planned without TRL, the DPO reference's weights in the trace,
Plan.sft_config / dpo_config accepted by TRL's own classes, and exit 2 with the install command without TRL."""

from __future__ import annotations

import json

import pytest
import torch

from memtune import config as config_module
from memtune.cli import main
from memtune.config import GIB, Adapter, TrainConfig
from memtune.errors import UsageError
from memtune.plan import Plan
from memtune.predict.estimate import estimate
from memtune.predict.trace import trace_step
from memtune.run import trl_run
from tests.models import tiny_llama


def weight_bytes(model_config, train_config) -> int:
    """Weights at the peak of the full-depth prediction (the trace's are extended with the layers)."""
    return estimate(model_config, train_config, device="cpu").breakdown["weights"]


def test_dpo_trace_counts_two_models_only_with_a_full_reference():
    model_config = tiny_llama(layers=8)  # traced at 3 layers and extended: the reference's layers are repeated too
    base = TrainConfig(seq_len=32, micro_batch_size=2, amp="bf16")
    policy = weight_bytes(model_config, base)
    assert weight_bytes(model_config, base.replace(trainer="sft")) == policy
    assert weight_bytes(model_config, base.replace(trainer="dpo")) == 2 * policy  # a frozen full copy
    assert weight_bytes(model_config, base.replace(trainer="dpo", precompute_ref_log_probs=True)) == policy
    lora = base.replace(adapter=Adapter(rank=4))
    assert weight_bytes(model_config, lora.replace(trainer="dpo")) == weight_bytes(model_config, lora)  # adapter off


def test_dpo_step_runs_twice_the_sequences_and_the_reference_forward_adds_to_the_peak():
    model_config = tiny_llama(layers=2)
    base = TrainConfig(seq_len=64, micro_batch_size=2, amp="bf16", adapter=Adapter(rank=4))
    sft = trace_step(model_config, base.replace(trainer="sft"), device="cpu")
    dpo = trace_step(model_config, base.replace(trainer="dpo"), device="cpu")
    precomputed = trace_step(model_config, base.replace(trainer="dpo", precompute_ref_log_probs=True), device="cpu")
    assert dpo.peak_allocated_bytes > precomputed.peak_allocated_bytes > sft.peak_allocated_bytes


def test_trl_head_never_holds_the_full_logits():
    """TRL's fused head projects [4096 tokens, 32768 vocabulary] tiles: with a large vocabulary the SFT step holds far
    less than the causal-LM step's fp32 logits."""
    model_config = tiny_llama(layers=2)
    model_config.vocab_size = 65536
    base = TrainConfig(seq_len=512, micro_batch_size=8, amp="bf16")
    logits_bytes = 8 * 512 * 65536 * 4
    causal = trace_step(model_config, base, device="cpu").peak_allocated_bytes
    sft = trace_step(model_config, base.replace(trainer="sft"), device="cpu").peak_allocated_bytes
    assert causal - sft > logits_bytes // 2


def test_trainer_fields_round_trip_and_are_described():
    train_config = TrainConfig(seq_len=128, trainer="dpo", precompute_ref_log_probs=True)
    assert TrainConfig.from_dict(json.loads(train_config.to_json())) == train_config
    assert "TRL DPO (reference: precomputed log-probs)" in train_config.describe()
    assert "TRL SFT (packed)" in TrainConfig(seq_len=8, trainer="sft", sft_batches="packed").describe()
    assert "TRL" not in TrainConfig(seq_len=8).describe()


@pytest.mark.parametrize("fields,message", [
    ({"sft_batches": "packed"}, "needs --trainer sft"),
    ({"precompute_ref_log_probs": True}, "need --trainer dpo"),
    ({"trainer": "sft", "loss": "chunked"}, "fused LM head"),
    ({"trainer": "ppo"}, "trainer must be one of"),
])
def test_trainer_fields_refused_where_they_do_not_apply(fields, message):
    with pytest.raises(UsageError, match=message):
        TrainConfig(seq_len=8, **fields)


def test_plan_trainer_dpo_predicts_without_trl(capsys, monkeypatch):
    monkeypatch.setattr(config_module, "trl_available", lambda: False)
    code = main(["plan", "HuggingFaceTB/SmolLM2-135M", "--trainer", "dpo", "--lora", "--seq-len", "64",
                 "--batch-size", "2", "--budget", "8GiB", "--trace-device", "cpu", "--json"])
    document = json.loads(capsys.readouterr().out)
    assert code == 0 and document["estimate"]["config"]["trainer"] == "dpo"


@pytest.mark.parametrize("args,message", [
    (["--sft-batches", "packed"], "--sft-batches packed is SFTTrainer's"),
    (["--trainer", "sft", "--precompute-ref-log-probs", "on"], "--precompute-ref-log-probs on is DPOTrainer's"),
])
def test_trainer_options_without_their_trainer_exit_2(args, message, capsys):
    code = main(["plan", "gpt2", "--seq-len", "64", "--batch-size", "2", "--trace-device", "cpu", *args])
    assert code == 2 and message in capsys.readouterr().err


def test_without_trl_the_configs_and_the_run_exit_2_with_the_install_command(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(config_module, "trl_available", lambda: False)
    plan = Plan(model="HuggingFaceTB/SmolLM2-135M", budget_bytes=2**33,
                train_config=TrainConfig(seq_len=64, trainer="dpo", adapter=Adapter(rank=4)))
    with pytest.raises(UsageError, match=r'pip install -e "\.\[trl\]"'):
        plan.dpo_config()
    with pytest.raises(UsageError, match=r'pip install -e "\.\[trl\]"'):
        Plan(model=plan.model, budget_bytes=plan.budget_bytes,
             train_config=TrainConfig(seq_len=64, trainer="sft")).sft_config()
    path = plan.save(tmp_path / "plan.json")
    code = main(["run", str(path), "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and 'pip install -e ".[trl]"' in err and "Traceback" not in err


def test_run_refuses_another_trainer_than_the_plans(tmp_path, capsys):
    plan = Plan(model="HuggingFaceTB/SmolLM2-135M", budget_bytes=2**33, train_config=TrainConfig(seq_len=64))
    path = plan.save(tmp_path / "plan.json")
    code = main(["run", str(path), "--trainer", "dpo", "--output-dir", str(tmp_path / "out")])
    assert code == 2 and "differs from the plan's causal-lm" in capsys.readouterr().err


def test_dpo_batches_split_by_pair_for_the_guard():
    chosen, rejected = torch.arange(6).view(3, 2), 10 + torch.arange(6).view(3, 2)
    batch = {"input_ids": torch.cat([chosen, rejected]), "ref_chosen_logps": torch.zeros(3)}
    pairs, paired = trl_run.as_pairs(batch)
    assert paired == {"input_ids"} and pairs["input_ids"].shape == (3, 2, 2)
    piece = {key: value[1:3] for key, value in pairs.items()}  # what the guard's split makes
    back = trl_run.from_pairs(piece, paired)
    assert torch.equal(back["input_ids"], torch.cat([chosen[1:3], rejected[1:3]]))


def test_configs_are_accepted_by_trls_own_classes():
    trl = pytest.importorskip("trl")
    adapter = Adapter(rank=4)
    dpo = Plan(model="x", budget_bytes=2**33, train_config=TrainConfig(
        seq_len=256, micro_batch_size=2, grad_accum_steps=4, amp="bf16", gradient_checkpointing=True,
        adapter=adapter, trainer="dpo", precompute_ref_log_probs=True)).dpo_config(output_dir="out")
    assert isinstance(dpo, trl.DPOConfig)
    assert (dpo.per_device_train_batch_size, dpo.gradient_accumulation_steps, dpo.max_length) == (2, 4, 256)
    assert dpo.precompute_ref_log_probs and dpo.bf16 and dpo.loss_type == ["sigmoid"]
    for batches, packing, padding_free, max_length in (("padded", False, False, 128), ("packed", True, True, 128),
                                                       ("padding-free", False, True, None)):
        sft = Plan(model="x", budget_bytes=2**33, train_config=TrainConfig(
            seq_len=128, micro_batch_size=4, trainer="sft", sft_batches=batches)).sft_config(output_dir="out")
        assert isinstance(sft, trl.SFTConfig)
        assert (sft.packing, sft.padding_free, sft.max_length) == (packing, padding_free, max_length)
    with pytest.raises(UsageError, match="plan again with --trainer sft"):
        Plan(model="x", budget_bytes=2**33, train_config=TrainConfig(seq_len=8)).sft_config()


def test_shipped_trl_samples_are_what_the_generator_writes():
    import importlib.util

    from memtune.run.trl_run import DATA_DIR

    spec = importlib.util.spec_from_file_location("make_trl_data", DATA_DIR / "make_trl_data.py")
    assert spec is not None and spec.loader is not None
    make_trl_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_trl_data)
    instructions, preferences = make_trl_data.make()
    assert [json.loads(line) for line in make_trl_data.INSTRUCTIONS_PATH.read_text().splitlines()] == instructions
    assert [json.loads(line) for line in make_trl_data.PREFERENCES_PATH.read_text().splitlines()] == preferences
    assert all(row["chosen"] != row["rejected"] for row in preferences)


# ---- memtune run --trainer: the model, the rows, the summary (issue 18 review) ----------------------------------


def test_both_run_paths_load_pytorch_bin_weights_and_share_the_output_dir(tmp_path):
    """A local directory holding pytorch_model.bin (no safetensors) loads its weights in both run paths (trl_run
    used to glob *.safetensors alone and initialise it randomly), and the default output directory is sanitised."""
    from transformers import AutoModelForCausalLM

    from memtune import sources
    from memtune.run import model as run_model
    from memtune.run import runner

    model_config = tiny_llama(layers=1)
    saved = AutoModelForCausalLM.from_config(model_config)
    model_config.save_pretrained(tmp_path)
    torch.save(saved.state_dict(), tmp_path / "pytorch_model.bin")
    assert run_model.has_weights(tmp_path)
    model, origin, pretrained = run_model.load_model(sources.resolve(str(tmp_path)), TrainConfig(seq_len=8), "cpu")
    assert pretrained and origin == f"weights from {tmp_path}"
    assert torch.equal(model.get_input_embeddings().weight, saved.get_input_embeddings().weight)
    assert trl_run.load_model is runner.load_model is run_model.load_model
    assert run_model.default_output_dir("org/My Model: v2/").name == "My-Model-v2"


@pytest.fixture
def tiny_local_model(tmp_path):
    """A 2-layer llama directory with config.json alone (random weights, memtune's sample tokenizer)."""
    from memtune.run.data import sample_tokenizer

    model_config = tiny_llama(layers=2)
    model_config.vocab_size = len(sample_tokenizer())
    model_config.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def run_trl_on_cpu(model_dir, tmp_path, **fields):
    from memtune.options import RunOptions

    train_config = TrainConfig(**{"seq_len": 16, "micro_batch_size": 2, **fields})
    plan = Plan(model=str(model_dir), budget_bytes=2**33, train_config=train_config)
    return trl_run.run_trl(plan, RunOptions(output_dir=str(tmp_path / "out"), max_steps=2), device="cpu",
                           log=lambda message: None)


def test_padding_free_sft_rows_are_cut_to_the_plans_seq_len(tmp_path):
    datasets = pytest.importorskip("datasets")
    path = tmp_path / "rows.jsonl"  # through a file, as the run loads its rows (load_dataset("json"))
    path.write_text("".join(json.dumps(row) + "\n" for row in (
        {"input_ids": [1, 2, 3, 4, 5, 6], "labels": [-100, -100, 3, 4, 5, 6], "completion_mask": [0, 0, 1, 1, 1, 1]},
        {"input_ids": [7, 8], "labels": [-100, 8], "completion_mask": [0, 1]},
        {"input_ids": [9, 10, 11, 12, 13], "labels": [-100, -100, -100, -100, 13], "completion_mask": [0, 0, 0, 0, 1]},
    )))
    rows = datasets.load_dataset("json", data_files=str(path), split="train")
    cut, longer = trl_run.truncate_rows(rows, 4)
    assert longer == 2
    assert cut["input_ids"] == [[1, 2, 3, 4], [7, 8]]  # the third row is left with no label: dropped
    assert cut["labels"] == [[-100, -100, 3, 4], [-100, 8]] and cut["completion_mask"] == [[0, 0, 1, 1], [0, 1]]
    same, none = trl_run.truncate_rows(rows, 6)
    assert none == 0 and same["input_ids"] == rows["input_ids"]


def test_padding_free_sft_run_cuts_its_rows_and_says_so(tiny_local_model, tmp_path):
    pytest.importorskip("trl")
    summary = run_trl_on_cpu(tiny_local_model, tmp_path, trainer="sft", sft_batches="padding-free")
    assert summary["status"] == "completed" and summary["global_step"] == 2
    assert any("were longer than the plan's seq_len (16 tokens) and were cut to it" in note
               for note in summary["notes"])
    # the tokens the batches held (Trainer's count): here every row is cut to 16, so 2 x 16 a step, as planned
    assert summary["num_tokens"] == 2 * 2 * 16 and summary["tokens_per_step"] == 2 * 16


def test_trl_run_summary_counts_the_tokens_the_batches_held(tiny_local_model, tmp_path):
    """Real tokens, not micro-batch x seq_len (x2 for DPO): the shipped samples' rows are shorter than 512."""
    pytest.importorskip("trl")
    for fields in ({"trainer": "sft"}, {"trainer": "dpo", "adapter": Adapter(rank=4)}):
        summary = run_trl_on_cpu(tiny_local_model, tmp_path, **{**fields, "seq_len": 512})
        planned = 2 * 512 * (2 if fields["trainer"] == "dpo" else 1)
        assert 0 < summary["num_tokens"] and summary["tokens_per_step"] == round(summary["num_tokens"] / 2)
        assert summary["tokens_per_step"] < planned
        assert summary["tokens_per_second"] == pytest.approx(summary["num_tokens"] / summary["train_seconds"])


@pytest.mark.parametrize("args,message", [
    (["--resume"], "--resume: a TRL run writes no checkpoints yet"),
    (["--packing", "padding-free"], "--packing padding-free: TRL batches the rows itself"),
    (["--text-field", "content"], "--text-field 'content': a TRL run reads TRL's dataset fields"),
    (["--save-steps", "10"], "--save-steps 10: a TRL run writes no checkpoints yet"),
])
def test_run_refuses_what_a_trl_run_would_ignore(args, message, tmp_path, capsys):
    """Before TRL is imported or anything loads: exit 2 naming the value and what to do (they used to be ignored)."""
    plan = Plan(model="HuggingFaceTB/SmolLM2-135M", budget_bytes=2**33, train_config=TrainConfig(seq_len=64,
                                                                                                  trainer="sft"))
    path = plan.save(tmp_path / "plan.json")
    code = main(["run", str(path), "--output-dir", str(tmp_path / "out"), *args])
    err = capsys.readouterr().err
    assert code == 2 and "a TRL SFT plan does not take" in err and message in err and "Traceback" not in err


def test_run_plan_refuses_callbacks_for_a_trl_plan(tmp_path):
    from transformers import TrainerCallback

    from memtune.run.runner import run_plan

    plan = Plan(model="HuggingFaceTB/SmolLM2-135M", budget_bytes=2**33,
                train_config=TrainConfig(seq_len=64, trainer="dpo", adapter=Adapter(rank=4)))
    with pytest.raises(UsageError, match=r"callbacks \(1 given\): a TRL run does not take them yet"):
        run_plan(plan, output_dir=str(tmp_path), callbacks=[TrainerCallback()], progress=False)


def test_dpo_on_a_quantised_base_is_neither_searched_nor_accepted():
    """memtune run does not run DPO on a quantised base (DPOTrainer would add a second adapter as its reference), so
    fit must not choose it: the Reference rung conflicts with the QuantizedBase rung, and TrainConfig refuses it."""
    from memtune.config import Quantization
    from memtune.search import ladder

    fields = {"trainer": "dpo", "quantization": Quantization(bits=4), "adapter": Adapter(rank=4), "offload": "none",
              "amp": "bf16", "num_gpus": 1}
    assert "quantised base" in ladder.Reference().conflict(fields)
    assert ladder.Reference().conflict({**fields, "quantization": None}) is None
    assert ladder.Reference().conflict({**fields, "trainer": "sft"}) is None  # SFT QLoRA runs
    with pytest.raises(UsageError, match=r"--trainer dpo on a quantised base \(--qlora\) is not run yet"):
        TrainConfig(seq_len=64, trainer="dpo", adapter=Adapter(rank=4), quantization=Quantization(bits=4),
                    weights_dtype="bf16", amp="bf16")


def test_fit_verifies_no_trl_plan_and_says_why(monkeypatch):
    """fit --trainer sft|dpo is not refused on a GPU machine (it used to exit 2 there): the search leaves the TRL
    winner unverified, with the reason in its note, as for DeepSpeed and multi-node plans."""
    import memtune.options as options_module
    from memtune.config import Policy
    from memtune.options import FitOptions, TaskOptions
    from memtune.search.choose import SearchResult, not_verifiable

    result = SearchResult(seq_len=64, effective_batch_size=8, budget_bytes=2**33, margin_bytes=0)
    note = not_verifiable(TrainConfig(seq_len=64, trainer="sft"), result, Policy())
    assert note == ("not verified: trial steps run memtune's causal-LM step, not TRL's; memtune run --trainer sft "
                    "runs it")
    assert not_verifiable(TrainConfig(seq_len=64), result, Policy()) == ""
    assert not hasattr(options_module, "_cuda_visible")
    problems = FitOptions(TaskOptions("gpt2", seq_len=64, batch_size=8, budget="8GiB", trainer="dpo")).problems()
    assert not any("TRL" in problem for problem in problems)


def test_guarded_dpo_trainer_is_the_guard_mixin_over_a_pairing_dpo_trainer():
    """The guard's bodies are GuardedTrainerMixin's alone (no copy): PairedDPOTrainer only pairs and unpairs."""
    pytest.importorskip("trl")
    from memtune.run.guard import GuardedTrainerMixin

    guarded = trl_run.guarded_trainer_class("dpo")
    paired = guarded.__mro__[2]
    assert guarded.__mro__[1] is GuardedTrainerMixin and paired.__name__ == "PairedDPOTrainer"
    assert not {"get_batch_samples", "training_step", "prediction_step"} & set(vars(guarded))
    assert set(vars(paired)) >= {"get_batch_samples", "training_step"} and "prediction_step" not in vars(paired)


@pytest.mark.parametrize(("trainer", "content", "suffix", "words"), [
    ("sft", "", ".jsonl", "has no rows"),
    ("sft", '{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion"\n', ".jsonl", "line 2 of"),
    ("sft", '["a", "b"]\n', ".jsonl", "row 1 of"),
    ("sft", '{"prompt": "a", "completion": 5}\n', ".jsonl", "'completion' holds 5; it must be a string"),
    ("dpo", '{"prompt": "a", "chosen": "b", "rejected": null}\n', ".jsonl", "'rejected' holds null"),
    ("dpo", '{"prompt": "a", "completion": "b"}\n', ".jsonl", "needs prompt+chosen+rejected or chosen+rejected"),
    ("sft", '{"a": 1}', ".json", "holds a JSON dict, not an array of rows"),
    ("sft", "plain text\n", ".txt", "is not JSON Lines or JSON (suffix '.txt')"),
])
def test_trl_run_data_mistakes_are_usage_errors_naming_the_row(tmp_path, trainer, content, suffix, words):
    """`memtune run --trainer sft|dpo --data FILE` reads the file itself before datasets does: every mistake in it
    is exit 2 with the line or row and the value seen, never a parser's traceback (no TRL needed to check)."""
    from memtune.run.trl_run import read_records

    path = tmp_path / f"rows{suffix}"
    path.write_text(content)
    with pytest.raises(UsageError) as raised:
        read_records(path, trainer)
    assert words in str(raised.value)


def test_trl_run_data_accepts_text_and_conversational_rows_and_refuses_a_directory(tmp_path):
    from memtune.run.trl_run import read_records

    path = tmp_path / "rows.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n\n{"messages": [{"role": "user", "content": "hi"}]}\n')
    assert len(read_records(path, "sft")) == 2
    with pytest.raises(UsageError, match="is a directory"):
        read_records(tmp_path, "sft")


def test_plan_trainer_refuses_a_trl_plan_rather_than_run_another_step():
    plan = Plan(model="HuggingFaceTB/SmolLM2-135M", train_config=TrainConfig(seq_len=64, trainer="dpo"),
                budget_bytes=GIB)
    with pytest.raises(UsageError, match=r"memtune run PLAN --trainer dpo .* plan\.dpo_config\(\)"):
        plan.trainer(model=None)


def test_a_trl_run_refuses_to_overwrite_an_earlier_run(tmp_path, monkeypatch):
    """A TRL run writes no checkpoint, so a finished run's model in --output-dir would be lost: exit 2 first."""
    from memtune.options import RunOptions
    from memtune.run import trl_run

    monkeypatch.setattr(trl_run, "require_trl", lambda what: None)
    (tmp_path / "run_summary.json").write_text("{}")
    plan = Plan(model="HuggingFaceTB/SmolLM2-135M", train_config=TrainConfig(seq_len=64, trainer="sft"),
                budget_bytes=GIB)
    options = RunOptions(plan="plan.json", output_dir=str(tmp_path))
    with pytest.raises(UsageError, match="holds an earlier run"):
        trl_run.run_trl(plan, options, device="cpu")
