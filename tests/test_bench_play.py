"""bench.py --play on a tiny checkpoint: the profile attributes the time of real play to the
engine's passes (a broken attribution, e.g. a caller edge hidden by a decorator, reads 0)."""
import json

import torch

import bench
import model as M
from test_sft import POOL, TASK
from tiny import save_tiny_checkpoint


def test_play_profile_finds_the_passes(tmp_path, capsys):
    ckpt = save_tiny_checkpoint(tmp_path / "tiny", [POOL, TASK.question] * 4, vocab_size=400)
    assert bench.main(["--play", str(ckpt), "--play-n", "3", "--play-batch", "2", "--json"]) == 0
    parts = {r["part"]: r["seconds"] for r in json.loads(capsys.readouterr().out)["rows"]}
    passes = parts["prefill"] + parts["decode steps"] + parts["appended state messages"]
    assert parts["prefill"] > 0 and parts["decode steps"] > 0 and parts["  of which output layer"] > 0
    assert 0 < parts["  of which attention"] + parts["  of which output layer"] <= passes
    assert parts["protocol mask"] > 0 and passes + parts["protocol mask"] <= parts["total"]


def test_play_baseline_runs_plain_products_and_restores_the_split(tmp_path, capsys, monkeypatch):
    """--play-plain-linear: no product is split during the run (2 threads, where play splits
    them otherwise), and the split is back after it."""
    ckpt = save_tiny_checkpoint(tmp_path / "tiny", [POOL, TASK.question] * 4, vocab_size=400)
    real_bmm, split_calls = torch.bmm, []
    monkeypatch.setattr(torch, "bmm", lambda a, b, **k: split_calls.append(b.shape) or real_bmm(a, b, **k))
    before, threads = M.SPLIT_MAX_ROWS, torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert bench.main(["--play", str(ckpt), "--play-n", "2", "--play-batch", "2", "--play-plain-linear", "--json"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert M.SPLIT_MAX_ROWS == before > 0
    parts = {r["part"]: r["seconds"] for r in json.loads(capsys.readouterr().out)["rows"]}
    assert parts["  of which output layer"] > 0 and not split_calls  # torch.bmm: model.linear's split only
