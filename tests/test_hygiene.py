"""Process hygiene (issue 12, item 7): Ctrl-C always stops a trace, `auto_fit` keeps the libraries' warnings
off stderr and gives the global state back, and only the main process of a multi-process run prints."""

from __future__ import annotations

import gc

import pytest
import torch
from transformers.utils import logging as transformers_logging

from memtune.predict import trace as trace_module
from memtune.predict.trace import StorageCounter

# transformers' log handler writes to the sys.stderr of the moment it is made: make it now, not under a
# test's capsys, whose stream is closed after that test
transformers_logging.get_logger("transformers")


def _interrupt(*_args, **_kwargs):
    raise KeyboardInterrupt


def test_ctrl_c_in_the_weakref_callback_stops_the_trace_at_the_next_op(monkeypatch, capsys):
    counter = StorageCounter()
    with counter:
        doomed = torch.empty(64)
        assert counter.trace.events[-1].kind == "alloc"
        # Ctrl-C arrives while the callback records the free: Python would print "Exception ignored" and drop it
        monkeypatch.setattr(trace_module.Event, "free", _interrupt)
        del doomed
        gc.collect()
        monkeypatch.undo()
        assert isinstance(counter.interrupted, KeyboardInterrupt)
        with pytest.raises(KeyboardInterrupt):
            torch.ones(4)
        torch.ones(4)  # raised once: the next op runs
    assert "Exception ignored" not in capsys.readouterr().err


def test_ctrl_c_in_the_weakref_callback_after_the_last_op_stops_finish(monkeypatch):
    counter = StorageCounter()
    with counter:
        doomed = torch.empty(64)
    monkeypatch.setattr(trace_module.Event, "free", _interrupt)
    del doomed
    monkeypatch.undo()
    with pytest.raises(KeyboardInterrupt):
        counter.finish()
    assert counter.finish().peak_allocated_bytes > 0


# ---- auto_fit prints nothing ----------------------------------------------------------------------------


def _library_noise() -> None:
    """What transformers, peft and torch say while a fit runs: Python warnings, a transformers log record and a
    transformers progress bar."""
    import warnings

    warnings.warn("`foo` is deprecated and will be removed in v6", FutureWarning, stacklevel=1)
    warnings.warn("peft: target modules were not all found", UserWarning, stacklevel=1)
    transformers_logging.get_logger("transformers.modeling_utils").warning("some weights were not initialized")
    for _ in transformers_logging.tqdm(range(3), desc="Loading checkpoint shards"):
        pass


def _library_state() -> tuple:
    import logging
    import warnings

    from huggingface_hub.utils import are_progress_bars_disabled

    return (list(warnings.filters), warnings.showwarning, transformers_logging.get_verbosity(),
            logging.getLogger("transformers").handlers[:], transformers_logging.is_progress_bar_enabled(),
            are_progress_bars_disabled())


def test_auto_fit_keeps_the_libraries_warnings_off_stderr_and_logs_them(monkeypatch, capsys, caplog):
    import logging

    import memtune
    from memtune import fit as fit_module

    real_fit_model = fit_module.fit_model

    def noisy_fit_model(*args, **kwargs):
        _library_noise()
        return real_fit_model(*args, **kwargs)

    monkeypatch.setattr(fit_module, "fit_model", noisy_fit_model)
    before = _library_state()
    with caplog.at_level(logging.DEBUG, logger="memtune.fit"):
        plan = memtune.auto_fit("gpt2", seq_len=32, batch_size=2, budget="8GiB", verify=False,
                                precision="fp32", use_adapter=False, micro_batch_size=2,
                                gradient_checkpointing=False, allow_offload=False)
    captured = capsys.readouterr()
    assert plan.effective_batch_size == 2
    assert captured.err == "" and captured.out == ""
    logged = " ".join(record.getMessage() for record in caplog.records if record.name == "memtune.fit")
    for said in ("FutureWarning: `foo` is deprecated", "UserWarning: peft: target modules",
                 "transformers.modeling_utils: some weights were not initialized"):
        assert said in logged, said
    assert _library_state() == before


def test_auto_fit_gives_the_libraries_state_back_after_an_error(monkeypatch, capsys):
    import warnings

    import memtune
    from memtune import fit as fit_module
    from memtune.errors import NothingFitsError

    def failing_fit_model(*args, **kwargs):
        _library_noise()
        raise NothingFitsError("nothing fits", shortfall_bytes=1, suggestions=[])

    monkeypatch.setattr(fit_module, "fit_model", failing_fit_model)
    before = _library_state()
    with pytest.raises(NothingFitsError):
        memtune.auto_fit("gpt2", seq_len=32, batch_size=2, budget="8GiB", verify=False)
    assert capsys.readouterr().err == ""
    assert _library_state() == before
    with pytest.warns(FutureWarning):  # the user's own warnings are shown again afterwards
        warnings.warn("after the fit", FutureWarning, stacklevel=1)


# ---- a multi-process run prints once ----------------------------------------------------------------


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("rank, prints", [("1", False), ("0", True)])
def test_only_rank_0_of_a_launched_run_prints(model_dir, tmp_path, capsys, monkeypatch, rank, prints):
    """`accelerate launch` starts `memtune run` once per GPU and sets RANK: each rank trains, rank 0 alone prints
    progress, warnings and the summary (before, every line came once per GPU, and --json gave one document per
    rank on stdout)."""
    import io
    from pathlib import Path

    from rich.console import Console

    from memtune.cli import cmd_run, parse
    from memtune.config import TrainConfig
    from memtune.plan import Plan

    monkeypatch.setenv("RANK", rank)
    plan = Plan(str(model_dir), TrainConfig(seq_len=32, micro_batch_size=2, grad_accum_steps=2),
                budget_bytes=1 << 30)
    plan_path = plan.save(tmp_path / "plan.json")
    corpus = Path(__file__).parent / "data" / "tiny_corpus.jsonl"
    _, options = parse(["run", str(plan_path), "--data", str(corpus), "--output-dir", str(tmp_path / "out"),
                        "--max-steps", "2", "--learning-rate", "1e-3", "--json"])
    out, err = io.StringIO(), io.StringIO()
    code = cmd_run(options, Console(file=out, width=120), Console(file=err, width=120))
    printed = capsys.readouterr()
    assert code == 0
    assert out.getvalue() == "" and printed.err == ""
    if prints:
        assert "step 2/2  loss" in err.getvalue() and '"status": "completed"' in printed.out
    else:
        assert err.getvalue() == "" and printed.out == ""
