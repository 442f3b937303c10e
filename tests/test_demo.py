"""The demo pipeline end to end, on a tiny budget (tinycnn, a few patients, one epoch)."""

from pathlib import Path

import pytest

from cbr.errors import CbrError
from cbr.pipeline.demo import run_demo
from conftest import invoke


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    lines = []
    result = run_demo(tmp_path / "demo", patients=12, slices=2, size=48, epochs=1, img_size=32,
                      backbone="tinycnn", log=lines.append)
    assert [line[:2] for line in lines if line[:1].isdigit()] == ["1.", "2.", "3.", "4."]
    assert result.weights == "none"  # tinycnn has no ImageNet weights: the demo says so and goes on
    assert any("random weights" in line for line in lines)
    assert result.queries == len(result.rows) > 0
    truth, answers = [r["label"] for r in result.rows], [r["prediction"] for r in result.rows]
    assert result.accuracy == sum(t == a for t, a in zip(truth, answers)) / len(truth)
    recalls = [sum(a == c for t, a in zip(truth, answers) if t == c) / truth.count(c) for c in set(truth)]
    assert result.balanced_accuracy == pytest.approx(sum(recalls) / len(recalls))
    pointed = [r["pointing"] for r in result.rows if r["pointing"] is not None]
    assert result.pointing_game == (sum(pointed) / len(pointed) if pointed else None)
    assert Path(result.report).is_file() and Path(result.case_base).is_file()
    # Running it again recreates the case base rather than piling up queries.
    again = run_demo(tmp_path / "demo", patients=12, slices=2, size=48, epochs=1, img_size=32,
                     backbone="tinycnn", log=lambda *_: None)
    assert again.queries == result.queries


def test_demo_refuses_too_few_patients(runner, tmp_path):
    result = invoke(runner, "demo", "--out", tmp_path / "d", "--patients", 5)
    assert result.exit_code == 2 and "--patients" in result.output


def test_demo_refuses_a_negative_seed_before_writing(runner, tmp_path):
    result = invoke(runner, "demo", "--out", tmp_path / "d", "--seed", -1)
    assert result.exit_code == 2 and "--seed" in result.output
    assert not (tmp_path / "d").exists()


def test_run_demo_refuses_a_negative_seed_before_writing(tmp_path):
    with pytest.raises(CbrError, match="--seed -1"):
        run_demo(tmp_path / "d", seed=-1, log=lambda *_: None)
    assert not (tmp_path / "d").exists()
