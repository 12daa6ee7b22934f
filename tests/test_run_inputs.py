"""`memtune run`'s inputs checked before any work (issue 12): the plan file (`Plan.load` / `Plan.from_dict`), the
run options (`RunOptions.problems`) and the output directory. Each bad input exits 2 with what was wrong, the
value seen and the fix, and no traceback; the problems of one input come together."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest

from memtune.cli import main
from memtune.config import TrainConfig
from memtune.errors import UsageError
from memtune.plan import Plan
from memtune.run.runner import run_plan

# No model of this name exists: a check that came after loading the model would fail on it instead.
MODEL = "no-such-model-anywhere"


def good_plan() -> dict:
    return Plan(MODEL, TrainConfig(seq_len=32, micro_batch_size=2, grad_accum_steps=2), budget_bytes=1 << 30).to_dict()


def memtune_run(arguments: list[str], capsys: pytest.CaptureFixture) -> str:
    """`memtune run ARGUMENTS`: asserts exit code 2, nothing on stdout, and returns stderr (one line per problem
    is not promised: the message is what the user reads)."""
    code = main(["run", *arguments])
    captured = capsys.readouterr()
    assert code == 2, captured.err
    assert captured.out == ""
    assert "Traceback" not in captured.err and captured.err.startswith("error:")
    return " ".join(captured.err.split())  # rich wraps long lines


@pytest.fixture
def plan_file(tmp_path: Path) -> Path:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(good_plan()))
    return path


# ---- the plan file -------------------------------------------------------------------------------


def write(tmp_path: Path, content: str | bytes) -> Path:
    path = tmp_path / "bad-plan.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


@pytest.mark.parametrize("content, expected", [
    (b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", ["is not text (binary data)", "memtune fit"]),
    ("{\"model\": ", ["is not JSON", "memtune fit"]),
    ("[1, 2]", ["a plan is a JSON object", "got a JSON list"]),
    ("\"plan\"", ["a plan is a JSON object", "got a JSON string"]),
    (json.dumps({**good_plan(), "model": 1}), ["model must be a string, got 1 (a JSON number)"]),
    (json.dumps({**good_plan(), "train_config": "x"}), ["train_config must be a JSON object, got \"x\""]),
    (json.dumps({**good_plan(), "model": 1, "train_config": "x", "budget_bytes": "24GiB"}),
     ["model must be a string", "train_config must be a JSON object", "budget_bytes must be an integer"]),
    (json.dumps({**good_plan(), "budget_bytes": 0}), ["budget_bytes must be > 0, got 0"]),
    (json.dumps({**good_plan(), "fallbacks": [3]}), ["fallbacks[0] must be a JSON object"]),
    (json.dumps({**good_plan(), "train_config": {"sequence": 5}}), ["train_config: unknown training configuration"]),
    (json.dumps({"schema_version": 1}), ["missing field(s) model, train_config, budget_bytes"]),
    (json.dumps({**good_plan(), "schema_version": 7}), ["schema_version 7 is not supported"]),
    (json.dumps({**good_plan(), "colour": "red"}), ["unknown field(s) colour"]),
    ("", ["is not JSON"]),
])
def test_a_bad_plan_file_exits_2_with_what_is_wrong(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                   content: str | bytes, expected: list[str]) -> None:
    path = write(tmp_path, content)
    message = memtune_run([str(path)], capsys)
    assert str(path) in message
    for part in expected:
        assert part in message


def test_a_plan_path_that_is_a_directory_or_missing_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert "is a directory: give the JSON file" in memtune_run([str(tmp_path)], capsys)
    (tmp_path / "plan.json").write_text(json.dumps(good_plan()))
    assert "is a directory (it holds plan.json: give that)" in memtune_run([str(tmp_path)], capsys)
    assert "does not exist" in memtune_run([str(tmp_path / "nothing.json")], capsys)


def test_from_dict_takes_back_what_to_dict_wrote() -> None:
    plan = Plan(MODEL, TrainConfig(seq_len=32), budget_bytes=1 << 30, fallbacks=[TrainConfig(seq_len=32,
                                                                                            micro_batch_size=1)])
    assert Plan.from_dict(json.loads(plan.to_json())) == plan


# ---- the run options and the output directory ------------------------------------------------------


@pytest.mark.parametrize("arguments, expected", [
    (["--learning-rate", "nan"], "--learning-rate must be a positive number, got nan"),
    (["--learning-rate", "inf"], "--learning-rate must be a positive number, got inf"),
    (["--learning-rate=-1e-4"], "--learning-rate must be a positive number, got -0.0001"),
    (["--learning-rate", "-0.001"], "--learning-rate must be a positive number, got -0.001"),
    (["--learning-rate", "0"], "--learning-rate must be a positive number, got 0.0"),
    (["--seed", "-1"], "--seed must be >= 0, got -1"),
    (["--seed", str(2**32)], "--seed must be below 2**32"),
    (["--max-steps", "0"], "--max-steps must be >= 1, got 0"),
    (["--save-steps", "0"], "--save-steps must be >= 1, got 0"),
    (["--text-field", ""], "--text-field must name a JSON field"),
])
def test_a_bad_run_option_exits_2_with_the_value_seen(plan_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                     arguments: list[str], expected: str) -> None:
    message = memtune_run([str(plan_file), "--output-dir", str(tmp_path / "out"), *arguments], capsys)
    assert expected in message
    assert not (tmp_path / "out").exists()  # nothing was started


def test_an_output_dir_that_is_a_file_or_under_one_exits_2(plan_file: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    message = memtune_run([str(plan_file), "--output-dir", str(a_file)], capsys)
    assert f"--output-dir '{a_file}' is a file, not a directory" in message
    message = memtune_run([str(plan_file), "--output-dir", str(a_file / "deeper" / "out")], capsys)
    assert f"cannot be created: '{a_file}' is a file" in message


def writable(folder: Path) -> bool:
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError:
        return False
    return True


def read_only_places(tmp_path: Path) -> list[Path]:
    """Folders this user cannot write into: a chmod 555 one (not for root, whom permissions do not stop) and
    /sys (sysfs refuses new files, even to root, where os.access says yes)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    return [place for place in (locked, Path("/sys")) if place.is_dir() and not writable(place)]


def test_an_output_dir_in_a_read_only_place_exits_2(plan_file: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    places = read_only_places(tmp_path)
    if not places:
        pytest.skip("no read-only folder on this machine")
    for place in places:
        message = memtune_run([str(plan_file), "--output-dir", str(place / "missing" / "out")], capsys)
        assert f"is not writable (in '{place}', its nearest existing parent)" in message
        assert "choose a directory you can write" in message


def test_every_problem_of_the_options_is_reported_at_once(plan_file: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    message = memtune_run([str(plan_file), "--learning-rate", "nan", "--seed", "-1", "--max-steps", "0",
                           "--output-dir", str(a_file)], capsys)
    for part in ("--learning-rate must be a positive number, got nan", "--seed must be >= 0, got -1",
                 "--max-steps must be >= 1, got 0", "is a file, not a directory"):
        assert part in message


def test_run_plan_checks_its_arguments_types_before_any_work(tmp_path: Path) -> None:
    plan = Plan.from_dict(good_plan())
    with pytest.raises(UsageError) as raised:
        run_plan(plan, output_dir=str(tmp_path / "out"), learning_rate="1e-4", seed="1", max_steps=2.5)
    for part in ("--learning-rate must be a number, got '1e-4'", "--seed must be an integer, got '1'",
                 "--max-steps must be an integer, got 2.5"):
        assert part in str(raised.value)
    assert not (tmp_path / "out").exists()


def test_the_default_output_dir_is_checked_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "memtune-runs").write_text("a file where the runs' folder goes")
    with pytest.raises(UsageError, match="the default output directory .* cannot be created: 'memtune-runs' is a "
                                         "file; .* with --output-dir"):
        run_plan(Plan.from_dict(good_plan()))
