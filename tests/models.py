"""Small model configs shared by tests (random weights, built in a moment on the CPU)."""

from __future__ import annotations

from benchmarks.cases import tiny_llama

__all__ = ["tiny_llama"]
