"""Start-up: `memtune --help`, `memtune models` and each command's `--help` import no torch, transformers,
accelerate or peft, and a catalog model is resolved without asking the hub (issue 17, item 3).

The import set is asserted, not tight timing: the wall limit is generous (CI runs on 2 shared cores;
importing torch and transformers alone takes 3-6 s there, a start-up without them 0.2-0.6 s).
benchmarks/results/startup_cpu.txt holds the measured times.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from memtune import cli, sources
from memtune.errors import ModelNotFoundError

ROOT = Path(__file__).resolve().parent.parent

HEAVY = ("torch", "transformers", "accelerate", "peft", "huggingface_hub", "numpy", "bitsandbytes", "deepspeed",
         "torchao", "liger_kernel")
"""Top-level packages a command that only parses, lists or prints help must not import."""

WALL_LIMIT_SECONDS = 3.0
"""Generous: 5-15 times the measured start-up on a loaded 2-core machine, under the 3-6 s that importing torch and
transformers alone costs there."""

PROBE = """
import json, runpy, sys
arguments, out = json.loads(sys.argv[1]), sys.argv[2]
sys.argv = ["memtune", *arguments]
code = 0
try:
    runpy.run_module("memtune", run_name="__main__", alter_sys=True)
except SystemExit as exit_:
    code = exit_.code if isinstance(exit_.code, int) else 0 if exit_.code is None else 1
with open(out, "w") as file:
    json.dump({"code": code, "modules": sorted(sys.modules)}, file)
"""
"""Runs `python -m memtune ARGS` in this interpreter, then writes the exit code and every module imported."""


def run_memtune(arguments: list[str], tmp_path: Path) -> tuple[int, list[str], float, str]:
    """(exit code, modules imported, wall seconds, stdout) of `python -m memtune *arguments` in a fresh process
    that imports this checkout's memtune."""
    out = tmp_path / "modules.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(arguments), str(out)], capture_output=True,
                          text=True, timeout=120, env=env, cwd=tmp_path)
    wall_seconds = time.perf_counter() - started
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    return result["code"], result["modules"], wall_seconds, done.stdout


@pytest.mark.parametrize("arguments", [["--help"], ["models"], ["models", "--json"], ["plan", "--help"],
                                       ["fit", "--help"], ["run", "--help"], ["probe", "--help"]],
                         ids=" ".join)
def test_help_and_models_import_no_torch_and_start_fast(arguments, tmp_path):
    code, modules, wall_seconds, stdout = run_memtune(arguments, tmp_path)
    assert code == 0
    assert stdout.strip()  # the help text or the catalog was printed
    assert "memtune.cli" in modules and ROOT.joinpath("memtune").is_dir()
    heavy = sorted({name.split(".")[0] for name in modules} & set(HEAVY))
    assert heavy == []
    assert wall_seconds < WALL_LIMIT_SECONDS


def test_the_models_listing_names_the_catalog(tmp_path):
    _, _, _, stdout = run_memtune(["models", "--json"], tmp_path)
    listed = {entry["hub_id"] for entry in json.loads(stdout)}
    assert listed == {entry.hub_id for entry in sources.catalog()}


def test_field_docs_read_a_class_defined_in_a_function_too():
    @dataclasses.dataclass
    class Local:
        steps: int = 3
        """How many steps."""

    assert cli.field_docs(Local) == {"steps": "How many steps."}


def test_field_docs_parse_each_module_once():
    cli._classes_in.cache_clear()
    cli.build_parser()
    parsed = cli._classes_in.cache_info()
    assert parsed.misses == len({cli.inspect.getsourcefile(cls) for cls in _option_classes()})
    assert parsed.hits > 0


def _option_classes() -> list[type]:
    """The dataclasses `build_parser` reads field docs of: each command's options, their bases and nested ones."""
    found: list[type] = []

    def visit(cls: type) -> None:
        for klass in cls.__mro__:
            if dataclasses.is_dataclass(klass) and klass not in found:
                found.append(klass)
                for field_ in dataclasses.fields(klass):
                    kind, _ = cli._value_type(cli.typing.get_type_hints(klass)[field_.name])
                    if isinstance(kind, type) and dataclasses.is_dataclass(kind):
                        visit(kind)

    for cls in cli.OPTIONS.values():
        visit(cls)
    return found


# ---- the hub: asked only for a hub id outside the catalog, and its reachability once per process -------------


@pytest.fixture
def online(monkeypatch):
    """The environment of a user with no offline switch and no proxy, so that only memtune's own rules keep
    it off the network; the probe's process cache is emptied before and after."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    probe = sources._reachable  # the cached function itself: `no_network` replaces the module's name
    probe.cache_clear()
    yield
    probe.cache_clear()


@pytest.fixture
def no_network(monkeypatch, online):
    """Fail the test on any attempt to reach the hub: the reachability probe, a config download, a socket."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"the network was asked: {args} {kwargs}")

    monkeypatch.setattr(sources, "_reachable", refuse)
    monkeypatch.setattr(sources, "_hub_config", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("name", ["qwen2.5-0.5b", "Qwen/Qwen2.5-0.5B", "gpt2", "GPT2", "meta-llama/Llama-3.1-8B"])
def test_a_catalog_name_for_a_prediction_makes_no_network_attempt(name, no_network):
    source = sources.resolve(name, shapes_only=True)
    assert source.origin == "catalog" and source.note == ""
    assert source.config.to_dict() == sources.catalog_config(name).to_dict()


def test_an_alias_makes_no_network_attempt_for_a_run_either(no_network):
    assert sources.resolve("llama-3.2-1b").origin == "catalog"


def test_a_local_directory_makes_no_network_attempt(tmp_path, no_network):
    sources.catalog_config("smollm2-135m").save_pretrained(tmp_path)
    assert sources.resolve(str(tmp_path), shapes_only=True).origin == "local"


def test_memtune_plan_of_a_catalog_hub_id_makes_no_network_attempt(no_network, capsys):
    code = cli.main(["plan", "gpt2", "--seq-len", "32", "--batch-size", "1", "--budget", "8GiB",
                     "--trace-device", "cpu", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert json.loads(captured.out)["model"]["origin"] == "catalog"
    assert "note:" not in captured.err


def test_the_hub_probe_runs_once_per_process(monkeypatch, online):
    connects: list[tuple[str, int]] = []

    def unreachable(address, timeout=None, **kwargs):
        connects.append(address)
        raise OSError("network is unreachable")

    def cache_only(hub_id, *, offline, trust_remote_code=False):
        assert offline  # an unreachable hub: only the local Hugging Face cache is read
        raise OSError(f"{hub_id} is not in the cache")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.setattr(sources, "_hub_config", cache_only)
    for model in ("some-org/model-a", "some-org/model-b", "some-org/model-a"):
        with pytest.raises(ModelNotFoundError, match="unreachable"):
            sources.resolve(model)
    assert connects == [("huggingface.co", 443)]
