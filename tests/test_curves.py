"""curves.py: a PNG with one panel per logged quantity, and a clear message without matplotlib."""
import json
import sys

import pytest

import curves


def _run(tmp_path, rows):
    run = tmp_path / "grpo" / "seed0"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


ROWS = [{"step": s, "loss": 1.0 / s, "reward": 0.1 * s, "r_success": 0.1 * s, "r_latency": -0.01,
         "success": 0.1 * s, "latency": 3.0, "zero_variance_groups": 0.5} for s in range(1, 13)] + \
       [{"step": 12, "eval_success": 0.5, "eval_protocol": 0.9, "eval_latency": 2.0}]


def test_draws_a_png_with_the_logged_panels(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run = _run(tmp_path, ROWS)
    assert curves.main(["--runs", str(run), "--smooth", "3"]) == 0
    png = run / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    said = capsys.readouterr().out
    for panel in ("loss", "reward terms", "success", "protocol", "latency", "zero-variance groups"):
        assert panel in said


def test_sft_run_has_no_reward_panels(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run = _run(tmp_path, [{"step": s, "loss": 2.0 / s} for s in range(1, 5)] + [{"step": 4, "eval_success": 0.1}])
    assert curves.main(["--runs", str(run), "--out", str(tmp_path / "c.png")]) == 0
    panels = capsys.readouterr().out.rsplit("(", 1)[1]
    assert panels.strip() == "loss, success)"


def test_without_matplotlib_it_says_how_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # import matplotlib now raises ImportError
    run = _run(tmp_path, ROWS)
    assert curves.main(["--runs", str(run)]) == 2
    assert "pip install matplotlib" in capsys.readouterr().err
    assert not (run / "curves.png").exists()


def test_a_folder_without_metrics_is_one_line(tmp_path, capsys):
    assert curves.main(["--runs", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no metrics.jsonl" in err and "Traceback" not in err


def test_a_checkpoint_or_latest_names_its_run(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run = _run(tmp_path, ROWS)
    checkpoint = run / "checkpoints" / "step-000012"
    checkpoint.mkdir(parents=True)
    (checkpoint / "config.json").write_text("{}")
    latest = run.parent / "latest"
    latest.symlink_to(checkpoint.relative_to(run.parent))
    for given in (checkpoint, latest):
        assert curves.main(["--runs", str(given), "--out", str(tmp_path / "c.png")]) == 0, capsys.readouterr().err
        assert "loss" in capsys.readouterr().out
    assert curves.main(["--runs", str(latest)]) == 0
    assert (run / "curves.png").is_file()
