"""Data parallelism under torchrun (2 gloo processes on CPU, tiny models): a step on two ranks
against one process on the same global batch, a rank killed mid-run, resume under torchrun,
and plain `python sft.py` without torch.distributed."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import cli
from tiny import SCRATCH
import dataparallel
import grpo
import model as M
import sft
import train

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
SFT_FLAGS = ["--episodes", "40", "--steps", "8", "--batch-tokens", "2400", "--micro-batch-tokens", "1200",
             "--ckpt-every", "2", "--log-every", "2", "--eval-every", "0", "--eval-n", "0",
             "--vocab-size", "400", "--warmup-steps", "2", *SCRATCH]


def _torchrun(*args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *map(str, args)]


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint / "model.safetensors"))


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _assert_same_run(run: Path, reference: Path, step: int) -> None:
    """Equal weights (1e-5) at `step`, and the same loss and pre-clip gradient norm at every
    step: AdamW's update hides a gradient's scale, the logged norm does not."""
    a, b = _weights(run / "checkpoints" / f"step-{step:06d}"), _weights(reference / "checkpoints" / f"step-{step:06d}")
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] - b[name]).abs().max().item() <= 1e-5, name
    mine = {r["step"]: r for r in _rows(run) if "loss" in r}
    ref = {r["step"]: r for r in _rows(reference) if "loss" in r}
    assert sorted(mine) == sorted(ref) == list(range(1, step + 1))
    for s in ref:
        for key in ("loss", "grad_norm"):
            assert mine[s][key] == pytest.approx(ref[s][key], rel=1e-5), (s, key)


@pytest.fixture(scope="module")
def sft_reference(tmp_path_factory) -> Path:
    """One process, 8 steps of 2 micro-batches each (the global batch)."""
    runs = tmp_path_factory.mktemp("single")
    out = subprocess.run([sys.executable, str(ROOT / "sft.py"), "--runs-dir", runs, "--name", "one", *SFT_FLAGS],
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return runs / "sft" / "one"


def _assert_rank_zero_wrote_and_both_trained(run: Path, reference: Path | None) -> None:
    # each rank trained its own micro-batches (of the reference's whole run: together its tokens)
    ranks = _rows(run)[-1]["ranks"]
    assert len(ranks) == 2 and all(r["micro_batches"] > 0 for r in ranks)
    if reference is not None:
        assert sum(r["tokens"] for r in ranks) == _rows(reference)[-1]["ranks"][0]["tokens"]
    # rank 0 alone wrote: one row per step, one run folder
    assert [r["step"] for r in _rows(run)] == list(range(1, 9)) + [8]
    assert sorted(p.name for p in run.parent.iterdir()) == sorted(["latest", run.name])


@pytest.mark.slow   # the killed-and-resumed run below ends with the same checks
def test_sft_on_two_ranks_equals_one_process(tmp_path, sft_reference):
    out = subprocess.run(_torchrun(ROOT / "sft.py", "--runs-dir", tmp_path, "--name", "two", *SFT_FLAGS),
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    _assert_same_run(tmp_path / "sft" / "two", sft_reference, 8)
    _assert_rank_zero_wrote_and_both_trained(tmp_path / "sft" / "two", sft_reference)


def _child_of_rank(agent: int, rank: int, deadline: float) -> int:
    """The pid of torchrun's worker process of this rank (its environment says RANK)."""
    while time.time() < deadline:
        for pid in Path(f"/proc/{agent}/task/{agent}/children").read_text().split():
            try:
                if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                    return int(pid)
            except OSError:
                pass
        time.sleep(0.1)
    raise AssertionError(f"no worker of rank {rank} under torchrun {agent}")


def test_killed_rank_stops_the_run_with_a_clear_message_then_resume(tmp_path, sft_reference):
    agent = subprocess.Popen(_torchrun(ROOT / "sft.py", "--runs-dir", tmp_path, "--name", "killed", *SFT_FLAGS),
                             env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    rank1 = _child_of_rank(agent.pid, 1, time.time() + 120)
    ckpt = tmp_path / "sft" / "killed" / "checkpoints" / "step-000002"
    deadline = time.time() + 240
    while not ckpt.is_dir() and agent.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert ckpt.is_dir(), "no step-2 checkpoint"
    os.kill(rank1, signal.SIGKILL)
    killed = time.time()
    log, _ = agent.communicate(timeout=90)
    assert time.time() - killed < 60, "the run did not end within a minute of the kill"
    assert agent.returncode != 0 and not (tmp_path / "sft" / "latest").exists(), log[-3000:]
    # the survivor says why it stops, in one line (torchrun's SIGTERM, or the closed connection if
    # that comes first), and torchrun names the killed rank
    assert re.search(r"error: rank 0 of 2: (stopped by SIGTERM \(torchrun stops every rank|the [a-z ]+ failed)", log), \
        log[-3000:]
    assert "Signal 9 (SIGKILL)" in log and "rank      : 1" in log, log[-3000:]
    # resumed on two ranks from its own config.json: the same run as the one process's
    out = subprocess.run(_torchrun(ROOT / "sft.py", "--runs-dir", tmp_path, "--name", "killed", "--resume"),
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stderr.count("resumed from") == 2 and "step-000002" in out.stderr
    _assert_same_run(tmp_path / "sft" / "killed", sft_reference, 8)
    _assert_rank_zero_wrote_and_both_trained(tmp_path / "sft" / "killed", None)   # shares since the resume


@pytest.mark.slow   # waits out --dist-timeout
def test_stalled_rank_stops_the_others_after_the_timeout(tmp_path):
    agent = subprocess.Popen(_torchrun(ROOT / "sft.py", "--runs-dir", tmp_path, "--name", "stalled", *SFT_FLAGS,
                                       "--dist-timeout", "20"),
                             env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    rank0, rank1 = (_child_of_rank(agent.pid, r, time.time() + 120) for r in (0, 1))
    ckpt = tmp_path / "sft" / "stalled" / "checkpoints" / "step-000002"
    deadline = time.time() + 240
    while not ckpt.is_dir() and agent.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert ckpt.is_dir(), "no step-2 checkpoint"
    os.kill(rank1, signal.SIGSTOP)   # alive, holding its connections, silent
    stopped = time.time()
    while time.time() - stopped < 120 and Path(f"/proc/{rank0}/stat").is_file() \
            and Path(f"/proc/{rank0}/stat").read_text().split()[2] != "Z":
        time.sleep(0.1)
    waited = time.time() - stopped
    os.kill(rank1, signal.SIGKILL)
    log, _ = agent.communicate(timeout=90)
    assert 20 <= waited < 60, waited
    assert re.search(r"error: rank 0 of 2: the [a-z ]+ failed \(Timed out", log), log[-3000:]


@pytest.fixture(scope="module")
def tiny_init(tmp_path_factory) -> Path:
    from tiny import save_tiny_checkpoint
    from tokenizer import Tokenizer
    rows = sft.generate_episodes(40, seed=0, failure_rate=0.2, recovery=True)
    return save_tiny_checkpoint(tmp_path_factory.mktemp("init"), [Tokenizer.render_turns(r["messages"]) for r in rows],
                                500)


def _replay(record: Path, call: int, start: Path, config, resume: bool) -> tuple[torch.nn.Module, dict, list]:
    """The recorded rollouts of both ranks' train_on call number `call`, trained in one process
    from `start` (a checkpoint; with its optimizer state when resume)."""
    model = M.load_model(start, dtype=torch.float32)
    train.freeze_bottom(model, config.freeze_layers)
    optimizer = train.make_optimizer(model, config)
    if resume:
        train.load_training_state(start, model, optimizer)
    shares = [json.loads((record / f"rank{r}-call{call}.json").read_text()) for r in range(2)]
    rollouts = [grpo.Rollout(**r) for s in shares for r in s["rollouts"]]
    stats = grpo.train_on(model, None, optimizer, rollouts, config, shares[0]["lr"], "cpu")
    return model, stats, shares


def test_grpo_on_two_ranks_equals_one_process_on_their_rollouts_and_resumes(tmp_path, tiny_init):
    flags = ["--init", tiny_init, "--runs-dir", tmp_path, "--name", "g", "--prompts", "4", "--group", "4",
             "--max-new-tokens", "24", "--max-turns", "2", "--eval-every", "0", "--eval-n", "0",
             "--ckpt-every", "1", "--lr", "0.01", "--warmup-steps", "1", "--seed", "3",
             "--no-drop-zero-variance",   # a step trains even when every group is flat (step 2 here)
             "--freeze-layers", "1",      # only some parameters train, as with adapters
             "--no-mask"]   # a mask id indexes its rank's own mask cache, which the one-process replay lacks
    record = tmp_path / "record"
    out = subprocess.run(_torchrun(ROOT / "tests" / "record_grpo.py", record, *flags, "--steps", "1"),
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "grpo" / "g"
    config = cli.parse_config(grpo.GRPOConfig, [str(f) for f in flags])
    model, stats, shares = _replay(record, 0, tiny_init, config, resume=False)
    # every group on one rank (its advantages centred there), both ranks with something to learn
    prompts = [{tuple(r["ids"][:r["prompt_len"]]) for r in s["rollouts"]} for s in shares]
    assert all(prompts) and not prompts[0] & prompts[1]
    assert all(any(abs(r["advantage"]) > 1e-3 for r in s["rollouts"]) for s in shares)
    for s in shares:
        for p in {tuple(r["ids"][:r["prompt_len"]]) for r in s["rollouts"]}:
            group = [r["advantage"] for r in s["rollouts"] if tuple(r["ids"][:r["prompt_len"]]) == p]
            assert len(group) == 4 and abs(sum(group)) < 1e-6
    ckpt = run / "checkpoints" / "step-000001"
    start = M.load_model(tiny_init, dtype=torch.float32).state_dict()
    weights = _weights(ckpt)
    moved = max((weights[n] - start[n]).abs().max().item() for n in weights)
    assert moved > 1e-3   # the step moved the weights far beyond the tolerance below
    for name, p in model.state_dict().items():
        assert (weights[name] - p).abs().max().item() <= 1e-5, name
    row = _rows(run)[0]
    assert row["grad_norm"] == pytest.approx(stats["grad_norm"], rel=1e-5)
    assert row["loss"] == pytest.approx(stats["loss"], rel=1e-5, abs=1e-9)
    assert row["trained_episodes"] == sum(len(s["rollouts"]) for s in shares)
    # each rank saved its own sampling state; resumed on two ranks, step 2 trains from step 1's
    # weights and AdamW state exactly as one process would on the same rollouts
    generators = json.loads((ckpt / "training_state.json").read_text())["generators"]
    assert len(generators) == 2 and generators[0] != generators[1]
    out = subprocess.run(_torchrun(ROOT / "tests" / "record_grpo.py", tmp_path / "record2", *flags, "--steps", "2",
                                   "--resume"),
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stderr.count("resumed from") == 2, out.stderr[-3000:]
    assert [r["step"] for r in _rows(run)] == [1, 2]
    model, _, _ = _replay(tmp_path / "record2", 0, ckpt, config, resume=True)
    weights = _weights(run / "checkpoints" / "step-000002")
    for name, p in model.state_dict().items():
        assert (weights[name] - p).abs().max().item() <= 1e-5, name


def test_plain_python_never_touches_torch_distributed(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for name in ("init_process_group", "all_reduce", "all_gather_object", "broadcast_object_list", "barrier",
                 "get_backend", "destroy_process_group"):
        monkeypatch.setattr(torch.distributed, name, lambda *a, _n=name, **k: pytest.fail(f"called {_n}"))
    flags = SFT_FLAGS.copy()
    flags[flags.index("--steps") + 1] = "2"
    assert sft.main(["--runs-dir", str(tmp_path), "--name", "plain", *flags]) == 0
    assert len(_rows(tmp_path / "sft" / "plain")[-1]["ranks"]) == 1


def _two_ranks(rank: int, store: str) -> None:
    """World's collectives on rank `rank` of 2 (gloo), each checked against a reference
    computed here in plain torch; run by test_world_collectives_on_two_ranks."""
    import datetime
    import torch.nn.functional as F
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                                         timeout=datetime.timedelta(seconds=120))
    world = dataparallel.World(rank, 2)
    torch.manual_seed(0)
    a, b, c, d = torch.nn.Linear(3, 4), torch.nn.Linear(4, 2), torch.nn.Linear(2, 5), torch.nn.Linear(5, 1)
    model = torch.nn.ModuleList([a, b, c, d])
    b.requires_grad_(False)                  # frozen: never summed
    xs = [torch.randn(2, 3), torch.randn(6, 3)]

    def loss(x, params, with_c):             # rank 1's micro-batch does not reach c; none reaches d
        h = F.linear(F.linear(x, params[0], params[1]), b.weight, b.bias)
        return (h ** 2).sum() + (F.linear(h, params[2], params[3]).sum() if with_c else 0)
    ref = [t.detach().clone().requires_grad_() for t in (a.weight, a.bias, c.weight, c.bias)]
    ref_grads = torch.autograd.grad(loss(xs[0], ref, True) + loss(xs[1], ref, False), ref)
    loss(xs[rank], [a.weight, a.bias, c.weight, c.bias], rank == 0).backward()
    world.sum_grads(model, bucket=5)         # several buckets
    for p, g in zip((a.weight, a.bias, c.weight, c.bias), ref_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-6, atol=1e-7)
    assert all(p.grad is None for p in [*b.parameters(), *d.parameters()])
    assert world.sum(1, 2.5) == [2.0, 5.0] and world.gather(rank * 10) == [0, 10]
    assert world.shard(range(5)) == [[0, 2, 4], [1, 3]][rank]
    assert world.first(lambda: f"from rank {rank}") == "from rank 0"

    def refuse():
        raise cli.UsageError("bad flag")
    with pytest.raises(cli.UsageError, match="bad flag"):   # rank 0's error, raised on both
        world.first(refuse)
    with pytest.raises(cli.UsageError, match="bad flag"):   # raised before rank 1 runs it
        world.main_first(refuse if rank == 0 else lambda: pytest.fail("rank 1 ran after rank 0 failed"))
    world.check_same(model, 3)
    with torch.no_grad():
        a.bias[0] += rank
    with pytest.raises(cli.UsageError, match="do not start from the same state"):
        world.check_same(model, 3)
    torch.distributed.destroy_process_group()


def test_world_collectives_on_two_ranks(tmp_path):
    import torch.multiprocessing
    torch.multiprocessing.spawn(_two_ranks, args=(str(tmp_path / "store"),), nprocs=2)


def test_single_world_is_the_identity():
    world = dataparallel.World()
    assert world.main and world.shard([3, 1, 2]) == [3, 1, 2] and world.sum(2, 0.5) == [2.0, 0.5]
    assert world.gather("x") == ["x"] and world.first(lambda: 7) == 7 and world.main_first(lambda: 8) == 8
    assert dataparallel.World(1, 3).shard(range(8)) == [1, 4, 7]
