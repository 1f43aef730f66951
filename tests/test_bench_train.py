"""bench.py --train on a tiny case: both passes run the real GRPO step, and with a prompt much
longer than the suffixes the shared pass keeps less for backward than the plain one (the
prompt's activations once per group instead of once per episode)."""
import json

import bench


def test_train_benchmark_rows_and_memory(capsys):
    rc = bench.main(["--train", "--presets", "tiny", "--tiny-vocab", "128", "--branches", "4",
                     "--train-prompts", "2", "--train-prompt-len", "64", "--train-suffix-len", "8",
                     "--repeats", "1", "--json"])
    assert rc == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    plain, shared = ({r["mode"]: r for r in rows}[m] for m in ("plain", "shared"))
    assert plain["episode_tokens"] == shared["episode_tokens"] > 2 * 4 * 64
    assert shared["saved_mb"] < 0.6 * plain["saved_mb"]
    assert shared["speedup"] == plain["seconds"] / shared["seconds"]
