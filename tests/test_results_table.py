"""infer.py --eval without --policy: the results table. Seeds of one training recipe are one
row with their spread; scripted rows match single-policy evaluations of the same tasks."""
import json

import infer
from env import EnvConfig, RewardConfig
from evaluation import evaluate
from tasks import make_tasks


def _run(root, stage, name, **config):
    run = root / stage / name
    (run / "checkpoints" / "step-000010").mkdir(parents=True)
    (run / "checkpoints" / "step-000020").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"seed": 0, "name": name, "lr": 0.003, "steps": 20, **config}))
    return run


def test_runs_that_differ_only_in_seed_are_one_row(tmp_path, monkeypatch):
    monkeypatch.setattr(infer, "RELEASE", str(tmp_path / "release"))   # none: its row is the next test's
    _run(tmp_path, "sft", "seed0", seed=0)
    _run(tmp_path, "sft", "seed1", seed=1, device="cuda", eval_n=8)
    _run(tmp_path, "sft", "norecovery", recovery=False)
    _run(tmp_path, "grpo", "a", init="runs/sft/seed0/checkpoints/step-000020")
    (tmp_path / "sft" / "empty").mkdir()          # not a run: no config.json
    groups = dict(infer.trained_groups([], str(tmp_path)))
    assert groups == {
        "sft: norecovery": [str(tmp_path / "sft/norecovery/checkpoints/step-000020")],
        "sft: seed0, seed1": [str(tmp_path / f"sft/seed{s}/checkpoints/step-000020") for s in (0, 1)],
        "grpo: a": [str(tmp_path / "grpo/a/checkpoints/step-000020")],
    }


def test_the_release_has_the_first_trained_row(tmp_path, monkeypatch):
    (tmp_path / "release").mkdir()
    monkeypatch.setattr(infer, "RELEASE", str(tmp_path / "release"))
    _run(tmp_path, "sft", "seed0", seed=0)
    assert infer.trained_groups([], str(tmp_path)) == [
        (str(tmp_path / "release"), [str(tmp_path / "release")]),
        ("sft: seed0", [str(tmp_path / "sft/seed0/checkpoints/step-000020")])]
    # --checkpoints lists exactly the rows wanted
    assert infer.trained_groups([str(tmp_path / "sft" / "seed0")], str(tmp_path)) == [
        ("sft: seed0", [str(tmp_path / "sft/seed0/checkpoints/step-000020")])]


def test_table_without_trained_runs_has_every_scripted_policy(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(infer, "RELEASE", str(tmp_path / "release"))
    assert infer.main(["--eval", "--n", "3", "--runs-dir", str(tmp_path), "--failure-rates", "0", "0.5", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 2 * 2 * len(infer.SCRIPTED)
    # the seen family's callees all run on the virtual clock, so every column is exact (the
    # unseen pools' Python runner is a real process: its latency is measured, not replayable)
    oracle_seen_half = next(r for r in rows if r["policy"] == "oracle" and r["pool"] == "seen"
                            and r["failure_rate"] == 0.5)
    alone = evaluate("oracle", "seen", "heldout", 3, 0, EnvConfig(failure_rate=0.5), RewardConfig())
    for key in ("success", "protocol", "rounds", "latency", "cost", "reward"):
        assert oracle_seen_half[key] == alone[key]


def test_markdown_table(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(infer, "RELEASE", str(tmp_path / "release"))
    assert infer.main(["--eval", "--n", "2", "--runs-dir", str(tmp_path), "--failure-rates", "0.2", "--markdown"]) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("|")]
    assert lines[0].startswith("| policy | pool | failures | success")
    assert len(lines) == 2 + 2 * len(infer.SCRIPTED) and all("| 20% |" in l for l in lines[2:])


def test_episodes_out_holds_every_episode_of_the_evaluation(tmp_path, capsys):
    out = tmp_path / "episodes.jsonl"
    assert infer.main(["--eval", "--policy", "random", "--n", "8", "--seed", "0", "--failure-rate", "0.3", "--json",
                       "--episodes-out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    tasks = make_tasks("heldout", 8, 0)
    assert [(r["question"], r["gold"]) for r in rows] == [(t.question, t.answer) for t in tasks]
    successes = [r["result"]["success"] for r in rows]
    assert 0 < sum(successes) < 8                      # random routing: some right, some wrong
    assert sum(successes) / 8 == summary["success"]
    for r in rows:   # every executed call is in its round, and an episode's calls add up to its result's
        assert sum(len(round_["calls"]) for round_ in r["rounds"]) == r["result"]["calls"]
        assert len(r["rounds"]) == r["result"]["rounds"]
        assert r["answer"] == r["result"]["answer"]
    assert [p.name for p in tmp_path.iterdir()] == ["episodes.jsonl"]    # no partial file left


def test_success_is_split_by_composition_by_hand():
    """Three episodes of train's compositions (two solved) and two of held-out ones (one solved)."""
    from dataclasses import replace
    from env import EpisodeResult
    from evaluation import summarize
    base = EpisodeResult("q", "1", "1", True, 1, 2, 1, 0.5, 0.001, 1, 0, 0, 0, 0, 0, 10, True, [], "capital", 1)
    played = [replace(base, composition=c, success=ok) for c, ok in
              [("capital", True), ("arith", False), ("capital", True), ("join_reversed", True), ("ceo_birth_sum", False)]]
    s = summarize(played, [])
    assert s["success"] == 3 / 5
    assert s["success_trained_compositions"] == 2 / 3 and s["success_heldout_compositions"] == 1 / 2
    assert s["by_composition"] == {"arith": {"n": 1, "success": 0.0}, "capital": {"n": 2, "success": 1.0},
                                   "ceo_birth_sum": {"n": 1, "success": 0.0}, "join_reversed": {"n": 1, "success": 1.0}}
    assert summarize(played[:3], [])["success_heldout_compositions"] is None
