"""The `rrm` command line as a user meets it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli import main

COMMANDS = [[], ["synth"], ["manifest"], ["manifest", "voc12"], ["manifest", "folder"], ["stage"], ["report"]]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "rrm")
def test_every_command_explains_itself(command):
    result = CliRunner().invoke(main, [*command, "--help"])
    assert result.exit_code == 0
    assert "Usage: " in result.output and len(result.output.splitlines()) > 5


def test_synth_writes_a_dataset_and_its_manifest(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["synth", "--root", str(tmp_path / "data"), "--manifest", str(tmp_path / "m.json"),
                                  "--params", str(tmp_path / "none.yaml"), "--image-size", "48",
                                  "--train-images", "5", "--val-images", "2", "--num-classes", "3"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "m.json").read_text())
    assert [len(manifest["splits"][s]) for s in ("train", "val")] == [5, 2]
    assert "wrote 7 images" in result.output


def test_bad_input_is_one_line_and_exit_status_2(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (tmp_path / "tags.csv").write_text("picture,tags\na.jpg,cat\n")
    result = CliRunner().invoke(main, ["manifest", "folder", "--images", str(images),
                                       "--labels", str(tmp_path / "tags.csv"), "--out", str(tmp_path / "m.json")])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and result.output.startswith(f"error: {tmp_path / 'tags.csv'}")
    assert not (tmp_path / "m.json").exists()


def test_a_bad_parameter_stops_a_stage_with_one_line(tmp_path):
    (tmp_path / "params.yaml").write_text("data:\n  image_size: big\n")
    done = subprocess.run([sys.executable, "-m", "stages.data", "params.yaml"], cwd=tmp_path, capture_output=True,
                          text=True, env={"PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert done.returncode == 2
    assert done.stderr == "error: params.yaml [data]: parameter image_size: expected int, got 'big'\n"


def test_only_the_crf_stage_takes_a_scheduler():
    result = CliRunner().invoke(main, ["stage", "prune", "--scheduler", "tcp://x:1"])
    assert result.exit_code == 2 and "--scheduler is for the crf stage" in result.output
