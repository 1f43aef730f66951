"""grpo.py's main, with what each rank's train_on receives recorded: run under torchrun by
tests/test_distributed.py, which replays the recorded rollouts in one process.

    torchrun --standalone --nproc_per_node 2 tests/record_grpo.py RECORD_DIR [grpo.py flags]

Each call of train_on writes RECORD_DIR/rank<R>-call<K>.json (the lr and the rollouts, with
their advantages) before it runs unchanged."""
import dataclasses
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import grpo  # noqa: E402

RECORD = Path(sys.argv[1])
real_train_on = grpo.train_on
calls = []


def recording_train_on(model, reference, optimizer, rollouts, config, lr, *args, **kwargs):
    rank = os.environ.get("RANK", "0")
    (RECORD / f"rank{rank}-call{len(calls)}.json").write_text(
        json.dumps({"lr": lr, "rollouts": [dataclasses.asdict(r) for r in rollouts]}))
    calls.append(lr)
    return real_train_on(model, reference, optimizer, rollouts, config, lr, *args, **kwargs)


if __name__ == "__main__":
    RECORD.mkdir(parents=True, exist_ok=True)
    grpo.train_on = recording_train_on
    grpo.dataparallel.exit_process(grpo.main(sys.argv[2:]))
