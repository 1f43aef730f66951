"""Bad user input to an entry point: one line on stderr, exit status 2, no traceback, and no
work done first (each entry point's work is replaced by a tripwire that fails the test)."""
import json
import time

import pytest

import bench
import convert_gguf
import infer


def rejected(capsys, main, argv, *expected):
    start = time.perf_counter()
    status = main(argv)
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert status == 2, out.err
    assert out.out == "" and "Traceback" not in out.err
    assert len(lines) == 1 and lines[0].startswith("error: "), out.err
    for text in expected:
        assert text in lines[0], lines[0]
    assert time.perf_counter() - start < 5, "rejected at the start, before any work"
    return lines[0]


@pytest.fixture
def no_play(monkeypatch):
    def tripwire(*args, **kwargs):
        raise AssertionError("work started before the input was checked")
    for name in ("evaluate", "play_episodes", "table", "task_at"):
        monkeypatch.setattr(infer, name, tripwire)


def write_pool(tmp_path, callees, text=None):
    path = tmp_path / "pool.json"
    path.write_text(text if text is not None else json.dumps({"name": "mine", "callees": callees}))
    return str(path)


CALC = {"type": "calc", "name": "adder", "kind": "tool", "description": "exact math", "cost": 0.001, "latency": 0.1}


# ---- infer.py: --tasks (a JSONL dataset) -----------------------------------------------------------

@pytest.mark.parametrize("lines,expected", [
    (['{"question": "2+2?", "answer": 4}', '{"question": "oops"'], ["qa.jsonl:2", "not JSON"]),
    (['{"question": "2+2?"}'], ["qa.jsonl:1", "'answer'"]),
    ([""], ["no tasks"]),
])
def test_bad_dataset_file(capsys, no_play, tmp_path, lines, expected):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "config.json").write_text("{}")
    (tmp_path / "qa.jsonl").write_text("\n".join(lines) + "\n")
    rejected(capsys, infer.main, ["--eval", "--policy", str(tmp_path / "ck"), "--tasks", str(tmp_path / "qa.jsonl")],
             "--tasks", *expected)


def test_dataset_with_a_scripted_policy(capsys, no_play, tmp_path):
    (tmp_path / "qa.jsonl").write_text('{"question": "2+2?", "answer": 4}\n')
    rejected(capsys, infer.main, ["--eval", "--policy", "oracle", "--tasks", str(tmp_path / "qa.jsonl")],
             "no subtask graph", "checkpoint folder")


# ---- infer.py: --policy -------------------------------------------------------------------------

def test_policy_path_that_does_not_exist(capsys, no_play):
    rejected(capsys, infer.main, ["--eval", "--policy", "runs/sft/nope"], "runs/sft/nope", "does not exist")


def test_policy_folder_that_is_not_a_checkpoint(capsys, no_play, tmp_path):
    rejected(capsys, infer.main, ["--eval", "--policy", str(tmp_path)], "not a checkpoint folder", "config.json")


def test_unknown_scripted_policy(capsys, no_play):
    rejected(capsys, infer.main, ["--eval", "--policy", "orakel"], "'orakel'", "oracle", "single:<callee>")


def test_single_unknown_callee_in_a_fixed_pool(capsys, no_play):
    rejected(capsys, infer.main, ["--eval", "--policy", "single:zzz", "--pool", "unseen-a"],
             "no callee 'zzz'", "tally")


def test_single_callee_with_the_randomized_family(capsys, no_play):
    rejected(capsys, infer.main, ["--eval", "--policy", "single:tally", "--pool", "seen"], "single:best")


# ---- infer.py: pools -----------------------------------------------------------------------------

def test_unknown_pool_name(capsys, no_play):
    rejected(capsys, infer.main, ["--eval", "--pool", "unseen-z"], "unknown pool 'unseen-z'", "unseen-a")


def test_pool_file_that_does_not_exist(capsys, no_play, tmp_path):
    rejected(capsys, infer.main, ["--eval", "--pool", str(tmp_path / "p.json")], "does not exist")


def test_malformed_pool_file(capsys, no_play, tmp_path):
    path = write_pool(tmp_path, None, text='{"name": "mine", "callees": [}')
    rejected(capsys, infer.main, ["--eval", "--pool", path], path, "not valid JSON", "line 1 column 30")


def test_unknown_callee_type(capsys, no_play, tmp_path):
    path = write_pool(tmp_path, [dict(CALC, type="abacus")])
    rejected(capsys, infer.main, ["--eval", "--pool", path], path, "callee 'adder'", "unknown type 'abacus'",
             "calc", "sim_agent", "local_llm")


def test_missing_callee_field(capsys, no_play, tmp_path):
    path = write_pool(tmp_path, [{k: v for k, v in CALC.items() if k != "latency"}])
    rejected(capsys, infer.main, ["--eval", "--pool", path], path, "callee 'adder'", "missing field(s) 'latency'")


def test_extra_callee_field(capsys, no_play, tmp_path):
    path = write_pool(tmp_path, [dict(CALC, colour="blue")])
    rejected(capsys, infer.main, ["--eval", "--pool", path], path, "callee 'adder'", "unknown field(s) 'colour'")


def test_empty_callee_list(capsys, no_play, tmp_path):
    path = write_pool(tmp_path, [])
    rejected(capsys, infer.main, ["--eval", "--pool", path], path, "'callees' must be a non-empty list")


def test_a_good_pool_file_still_plays(capsys, tmp_path):
    path = write_pool(tmp_path, [CALC, dict(CALC, type="kb", name="facts", description="facts")])
    assert infer.main(["--eval", "--policy", "oracle", "--pool", path, "--n", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 2


# ---- infer.py: numbers and names -----------------------------------------------------------------

@pytest.mark.parametrize("argv,expected", [
    (["--split", "dev"], ["--split 'dev'", "heldout"]),
    (["--n", "0"], ["--n must be at least 1"]),
    (["--n", "-5"], ["--n must be at least 1"]),
    (["--failure-rate", "1.5"], ["--failure-rate", "[0, 1]"]),
    (["--failure-rate", "-0.1"], ["--failure-rate", "[0, 1]"]),
    (["--task-index", "-1"], ["--task-index must be 0 or more"]),
    (["--max-suffix-len", "0"], ["--max-suffix-len must be at least 1"]),
])
def test_bad_numbers_and_names(capsys, no_play, argv, expected):
    rejected(capsys, infer.main, ["--eval"] + argv, *expected)


def test_trace_mode_checks_too(capsys, no_play):
    rejected(capsys, infer.main, ["--trace", "--task-index", "-3"], "--task-index")


# ---- bench.py: rejected before it measures the machine -------------------------------------------

@pytest.mark.parametrize("argv,expected", [
    (["--modes", "shared", "fast"], ["--modes fast", "shared, copied, hf"]),
    (["--presets", "huge"], ["--presets huge", "tiny"]),
    (["--branches", "0"], ["--branches", "at least 1"]),
    (["--branches"], ["--branches"]),
    (["--prefix-lens", "256", "-1"], ["--prefix-lens"]),
    (["--new-tokens", "0"], ["--new-tokens"]),
    (["--append-lens", "5", "0"], ["--append-lens"]),
    (["--sft", "--sft-settings", "lora-16", "lora-99"], ["--sft-settings lora-99", "freeze-20"]),
    (["--sft", "--sft-batch-tokens", "0"], ["--sft-batch-tokens"]),
])
def test_bench_bad_cases(capsys, monkeypatch, argv, expected):
    monkeypatch.setattr(bench, "machine_limits", lambda *a: pytest.fail("measured the machine first"))
    rejected(capsys, bench.main, argv, *expected)


# ---- convert_gguf.py ------------------------------------------------------------------------------

def test_convert_missing_file(capsys, tmp_path):
    rejected(capsys, convert_gguf.main, ["--gguf", str(tmp_path / "no.gguf"), "--out", str(tmp_path / "out")],
             "no such file")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content,expected", [
    (b"<html>not a model</html>", "not a GGUF file"),
    (b"GGUF\x03\x00\x00\x00\x01", "not a readable GGUF file"),  # the magic, then a cut-off header
])
def test_convert_non_gguf_file(capsys, tmp_path, content, expected):
    pytest.importorskip("gguf")
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    rejected(capsys, convert_gguf.main, ["--gguf", str(path), "--out", str(tmp_path / "out")], str(path), expected)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv", [["infer.py", "--n", "0"], ["bench.py", "--branches", "0"],
                                  ["convert_gguf.py", "--gguf", "no-such.gguf"]])
def test_the_real_command_line_prints_one_line(argv):
    """As a user runs it: the whole stderr is the one line (no config dump before it), status 2."""
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable] + argv, cwd=root, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1 and done.stderr.startswith("error: "), done.stderr
