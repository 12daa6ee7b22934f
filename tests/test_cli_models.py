"""Bad MODEL inputs through the command line: exit 2, the message on stderr, no traceback, no prompt.

Each case writes its config.json under tmp_path; conftest.py keeps the hub offline. The custom-code
cases run memtune in a subprocess whose `input()` fails loudly, with stdin closed, so a transformers
"Do you wish to run the custom code? [y/N]" prompt cannot hide.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import memtune
from memtune.cli import main
from memtune.errors import UsageError

REPOSITORY = Path(__file__).resolve().parent.parent

BAD_CONFIGS = {  # name -> (config.json text, what the message must say)
    "invalid-json": ('{"model_type": "llama",', "is not valid JSON"),
    "empty-file": ("", "is empty"),
    "empty-object": ("{}", "is an empty object {}"),
    "json-list": ('[{"model_type": "llama"}]', "holds a JSON list, not an object"),
    "unknown-type": ('{"model_type": "baichuan"}', "model_type 'baichuan', which this transformers does not know"),
    "bert": ('{"model_type": "bert"}', "model_type 'bert', an encoder"),
    "t5": ('{"model_type": "t5"}', "model_type 't5', which is not a causal LM"),
    "clip": ('{"model_type": "clip"}', "model_type 'clip', which is not a causal LM"),
    "vit": ('{"model_type": "vit"}', "model_type 'vit', which is not a causal LM"),
    "custom-code": (json.dumps({"model_type": "qwen", "auto_map": {
        "AutoConfig": "configuration_qwen.QWenConfig", "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"}}),
        "Pass --trust-remote-code"),
}

COMMANDS = {
    "plan": ["plan", "--seq-len", "64", "--batch-size", "2", "--trace-device", "cpu"],
    "fit": ["fit", "--seq-len", "64", "--batch-size", "2", "--budget", "1GiB", "--trace-device", "cpu"],
}


def _run_main(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, " ".join(captured.err.split())  # rich wraps long lines


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_json_exits_2_with_the_file_and_the_problem(tmp_path, capsys, command, case):
    text, expected = BAD_CONFIGS[case]
    (tmp_path / "config.json").write_text(text)
    first, *rest = COMMANDS[command]
    code, out, err = _run_main(capsys, [first, str(tmp_path), *rest, "--json"])
    assert code == 2
    assert out == ""  # --json: nothing half-written on stdout
    assert err.startswith("error: ") and expected in err
    assert "config.json" in err and "Traceback" not in err


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_missing_directory_is_not_looked_up_on_the_hub(capsys, command):
    first, *rest = COMMANDS[command]
    code, _, err = _run_main(capsys, [first, "./nodir", *rest])
    assert code == 2
    assert "model directory './nodir' does not exist" in err and "Traceback" not in err


def test_unknown_name_gets_no_far_fetched_suggestion(capsys):
    code, _, err = _run_main(capsys, COMMANDS["plan"][:1] + ["nonexistent-model-xyz"] + COMMANDS["plan"][1:])
    assert code == 2
    assert "model 'nonexistent-model-xyz' was not found" in err and "no catalog name is close to it" in err
    assert "mistral" not in err


def test_trust_remote_code_is_in_the_help_of_plan_and_fit(capsys):
    for command in COMMANDS:
        assert main([command, "--help"]) == 0
        help_text = " ".join(capsys.readouterr().out.split())
        assert "--trust-remote-code" in help_text and "runs the model's own Python" in help_text


def test_auto_fit_refuses_custom_code_without_trust_remote_code(tmp_path):
    (tmp_path / "config.json").write_text(BAD_CONFIGS["custom-code"][0])
    with pytest.raises(UsageError, match="trust_remote_code=True"):
        memtune.auto_fit(str(tmp_path), seq_len=64, batch_size=2, budget="1GiB", verify=False)


# ---- custom code in a subprocess: stdin closed and input() poisoned ----------------------------------


TINY_CUSTOM_MODEL = {
    "configuration_tiny.py": """
        from transformers import LlamaConfig


        class TinyCustomConfig(LlamaConfig):
            model_type = "tiny_custom"
        """,
    "modeling_tiny.py": """
        from transformers import LlamaForCausalLM

        from .configuration_tiny import TinyCustomConfig


        class TinyCustomForCausalLM(LlamaForCausalLM):
            config_class = TinyCustomConfig
        """,
    "config.json": json.dumps({
        "model_type": "tiny_custom",
        "auto_map": {"AutoConfig": "configuration_tiny.TinyCustomConfig",
                     "AutoModelForCausalLM": "modeling_tiny.TinyCustomForCausalLM"},
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 4, "vocab_size": 256, "max_position_embeddings": 256,
    }),
}

NO_INPUT = """
import builtins, sys
def poisoned_input(*args):
    sys.stderr.write("INPUT WAS CALLED\\n")
    raise SystemExit(99)
builtins.input = poisoned_input
from memtune.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _memtune_without_stdin(tmp_path: Path, argv: list[str]) -> subprocess.CompletedProcess:
    environment = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1",
                       PYTHONPATH=str(REPOSITORY) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", NO_INPUT, *argv], stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, env=environment, timeout=300)


@pytest.fixture
def custom_model_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "tiny-custom"
    directory.mkdir()
    for name, text in TINY_CUSTOM_MODEL.items():
        (directory / name).write_text(textwrap.dedent(text).lstrip())
    return directory


def test_custom_code_without_the_flag_exits_2_and_never_prompts(tmp_path, custom_model_dir):
    result = _memtune_without_stdin(tmp_path, ["plan", str(custom_model_dir), *COMMANDS["plan"][1:], "--json"])
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert "INPUT WAS CALLED" not in result.stderr and "Do you wish" not in result.stderr
    assert "--trust-remote-code" in " ".join(result.stderr.split()) and "Traceback" not in result.stderr
    assert not (tmp_path / "modules").exists()  # the model's Python was not even copied


def test_custom_code_with_the_flag_plans_without_a_prompt(tmp_path, custom_model_dir):
    result = _memtune_without_stdin(
        tmp_path, ["plan", str(custom_model_dir), *COMMANDS["plan"][1:], "--json", "--trust-remote-code"])
    assert result.returncode == 0, result.stderr
    assert "INPUT WAS CALLED" not in result.stderr and "Do you wish" not in result.stderr
    document = json.loads(result.stdout)
    assert document["model"]["origin"] == "local"
    assert document["model"]["num_layers"] == 2
    from transformers import LlamaConfig

    from memtune.sources import parameter_count

    shape = {key: value for key, value in json.loads(TINY_CUSTOM_MODEL["config.json"]).items()
             if key not in ("model_type", "auto_map")}
    assert document["model"]["num_parameters"] == parameter_count(LlamaConfig(**shape))  # the same Llama
