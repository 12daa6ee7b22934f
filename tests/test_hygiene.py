"""Process hygiene (issue 12, item 7): Ctrl-C always stops a trace, `auto_fit` keeps the libraries' warnings
off stderr and gives the global state back, and only the main process of a multi-process run prints."""

from __future__ import annotations

import gc

import pytest
import torch

from memtune.predict import trace as trace_module
from memtune.predict.trace import StorageCounter


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

    from transformers.utils import logging as transformers_logging

    warnings.warn("`foo` is deprecated and will be removed in v6", FutureWarning, stacklevel=1)
    warnings.warn("peft: target modules were not all found", UserWarning, stacklevel=1)
    transformers_logging.get_logger("transformers.modeling_utils").warning("some weights were not initialized")
    for _ in transformers_logging.tqdm(range(3), desc="Loading checkpoint shards"):
        pass


def _library_state() -> tuple:
    import logging
    import warnings

    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers.utils import logging as transformers_logging

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
