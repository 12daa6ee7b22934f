"""One exception hierarchy; cli.py maps each class to an exit code."""

from __future__ import annotations


class MemtuneError(Exception):
    """Base class. Messages say what failed, the value seen and how to fix it."""

    exit_code = 1


class UsageError(MemtuneError):
    """Bad input: an unknown model, a malformed budget, an invalid option (exit code 2)."""

    exit_code = 2


def listed(heading: str, problems: list[str]) -> str:
    """Problems found together (torchtune's config validation reports every one) as one message: a single one
    after the heading on one line ("invalid adapter: rank must be ..."), several one per line under it:

        invalid training configuration:
          - micro_batch_size must be a positive integer, got 0
          - offload must be none, optimizer or parameters, got 'bogus'
    """
    if len(problems) == 1:
        return f"{heading}: {problems[0]}" if heading else problems[0]
    return (heading or "invalid options") + ":\n" + "\n".join(f"  - {problem}" for problem in problems)


class ModelNotFoundError(UsageError):
    """MODEL is neither a reachable hub id, a local directory with config.json, nor a catalog name."""


class NothingFitsError(MemtuneError):
    """No configuration allowed by the policy fits the budget (exit code 3)."""

    exit_code = 3

    def __init__(self, message: str, shortfall_bytes: int = 0, suggestions: list[str] | None = None):
        super().__init__(message)
        self.shortfall_bytes = shortfall_bytes
        self.suggestions = suggestions or []


class NoGpuError(MemtuneError):
    """A command needs a CUDA GPU and none is visible."""

    exit_code = 2
