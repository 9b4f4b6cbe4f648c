"""Issue 9's acceptance in CI: every case of bench/bad_inputs.py (bad or unusual inputs through the real CLI)
ends as expected — no traceback, no changed pre-existing file, nothing non-finite written, no error case that
exits 0 — and the script's own detectors do catch each of those failures."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import bad_inputs  # noqa: E402
from bad_inputs import Case, Workspace, non_finite, run_case  # noqa: E402


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> list:
    return bad_inputs.run_cases(keep=str(tmp_path_factory.mktemp("bad-inputs")), echo=None)


def test_the_script_covers_enough_inputs(rows):
    assert len(rows) >= 60
    assert {row.command for row in rows} >= {"boothkit", "train", "sample", "score", "evaluate", "tiny"}
    assert {row.expect for row in rows} >= {"ok", "error"}


@pytest.mark.parametrize("category", bad_inputs.CATEGORIES)
def test_no_case_fails(rows, category):
    failing = [row for row in rows if any(problem.startswith(category) for problem in row.problems)]
    assert not failing, f"{len(failing)} case(s) with '{category}':\n" + "\n".join(
        f"{row.command}: {row.name} -> exit {row.exit_code}: {row.first_line}" for row in failing)


# ------------------------------------------------------------------------------- the detectors can fail


def test_non_finite_files_are_found(tmp_path):
    finite, nan = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({"w": torch.ones(3)}, finite)
    save_file({"w": torch.tensor([1.0, float("nan")]), "i": torch.ones(2, dtype=torch.int64)}, nan)
    assert not non_finite(finite) and non_finite(nan)
    for name, text, bad in [("c.json", '{"DINO": 0.5, "x": [1, "a"]}', False), ("d.json", '{"x": [NaN]}', True),
                            ("e.json", '{"x": {"y": Infinity}}', True), ("f.json", '[1e400]', True),
                            ("g.csv", "step,loss\n1,0.5\n", False), ("h.csv", "step,loss\n1,nan\n", True),
                            ("i.csv", "subject,DINO\ndog,-inf\n", True)]:
        (tmp_path / name).write_text(text)
        assert non_finite(tmp_path / name) == bad, name


@pytest.fixture
def workspace(tmp_path) -> Workspace:
    return Workspace(tmp_path)


def test_an_error_case_that_exits_zero_is_silently_wrong(workspace):
    row = run_case(1, Case("tiny", "expects an error", "error", lambda c: ["tiny", "dino", c.dir / "m"]), workspace)
    assert row.exit_code == 0 and row.problems == ["silently wrong"]
    row = run_case(2, Case("tiny", "expects ok", "ok", lambda c: ["tiny", "nonsense", c.dir / "m"]), workspace)
    assert row.exit_code == 2 and row.problems == ["unexpected error"] and row.first_line.startswith("error:")


def test_a_changed_pre_existing_file_is_found(workspace):
    def plant_earlier_build(c):
        bad_inputs.invoke(["tiny", "dino", str(c.dir / "m")])
        c.keep(c.dir / "m")
        return ["tiny", "dino", c.dir / "m", "--seed", "1"]  # replaces the earlier build: other weights

    row = run_case(1, Case("tiny", "rebuild", "ok", plant_earlier_build), workspace)
    assert row.exit_code == 0 and row.problems == ["changed file"]
    assert any("model.safetensors (modified)" in path for path in row.changed)


def test_a_traceback_and_a_missing_mention_are_found(workspace, monkeypatch):
    # A rate in a progress bar ("12.77it/s") must not count as mentioning the token limit 77.
    assert bad_inputs.message_lines("load: 50%|##  | 1/2 [00:01, 12.77it/s]\rwarning: 99 tokens\n") == [
        "warning: 99 tokens"]
    row = run_case(1, Case("tiny", "says", "error", lambda c: ["tiny", "nonsense", "x"], says=("sd99",)), workspace)
    assert row.problems == ["missing mention: output does not mention 'sd99'"]
    monkeypatch.setattr(bad_inputs.cli, "build_parser", lambda *argv: 1 / 0)
    row = run_case(2, Case("tiny", "crash", "error", lambda c: ["tiny", "dino", "x"]), workspace)
    assert row.traceback and row.problems == ["traceback"] and "ZeroDivisionError" in row.first_line


def test_json_output(tmp_path, monkeypatch):
    monkeypatch.setattr(bad_inputs, "CASES", [Case("tiny", "kind", "error", lambda c: ["tiny", "nonsense", "x"])])
    assert bad_inputs.main(["--json", str(tmp_path / "t.json"), "--keep", str(tmp_path / "w")]) == 0
    table = json.loads((tmp_path / "t.json").read_text())
    assert table["counts"]["cases"] == 1 and table["rows"][0]["verdict"] == "pass"
    assert table["rows"][0]["exit_code"] == 2 and table["rows"][0]["first_line"].startswith("error:")
