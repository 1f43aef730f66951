"""bench.py --play on a tiny checkpoint: the profile attributes the time of real play to the
engine's passes (a broken attribution, e.g. a caller edge hidden by a decorator, reads 0)."""
import json

import bench
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
