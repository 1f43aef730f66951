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
    (["--linear", "4", "0"], ["--linear", "at least 1"]),
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


# ---- infer.py: --query ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from tiny import save_tiny_checkpoint
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ck"),
                                [f"What is the population of city {i}? It is {i * 37}." for i in range(200)], 400,
                                num_hidden_layers=1, max_position_embeddings=1024)


@pytest.mark.parametrize("query", ["", "   ", "\n\t"])
def test_empty_query(capsys, no_play, query):
    rejected(capsys, infer.main, ["--query", query], "--query is empty")
    rejected(capsys, infer.main, ["--query", query, "--policy", "oracle"], "--query is empty")


def test_query_longer_than_the_context(capsys, no_play, tiny_checkpoint):
    line = rejected(capsys, infer.main, ["--query", "x" * 10_000, "--policy", str(tiny_checkpoint)],
                    "--query", "holds 1024")
    assert "tokens" in line


def test_query_with_a_scripted_policy_outside_the_question_forms(capsys, no_play):
    rejected(capsys, infer.main, ["--query", "What is the meaning of life?", "--policy", "oracle"],
             "--policy oracle", "built-in question form")


def test_query_without_a_policy_is_played_by_the_release(capsys, no_play, monkeypatch, tiny_checkpoint):
    """No --policy: the release plays (here a stand-in whose context is too short, which is
    refused naming it)."""
    monkeypatch.setattr(infer, "RELEASE", str(tiny_checkpoint))
    rejected(capsys, infer.main, ["--query", "x" * 10_000], f"the context of {tiny_checkpoint} holds 1024")


def test_query_plays_the_policy_it_was_given_and_says_so(capsys, monkeypatch):
    """The oracle plays a query in a built-in question form, even with a trained checkpoint in
    runs/ (it used to play the newest checkpoint instead), and the trace names it."""
    from tasks import task_at, world_for_split
    monkeypatch.setattr(infer, "RELEASE", "/nonexistent-release")
    task = task_at("heldout", 4, 0, world=world_for_split("heldout"))
    assert infer.main(["--query", task.question, "--policy", "serial-oracle"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "policy: serial-oracle"
    assert f"answer: {task.answer!r} (correct)" in out


# ---- sft.py and grpo.py: checked before any data, model or run folder ----------------------------

@pytest.fixture
def no_training(monkeypatch):
    import grpo
    import sft
    def tripwire(*args, **kwargs):
        raise AssertionError("work started before the input was checked")
    for module, name in ((sft, "generate_episodes"), (sft, "prepare"), (sft, "build_model"),
                         (grpo, "Policy"), (grpo, "latest_of")):
        monkeypatch.setattr(module, name, tripwire)


@pytest.mark.parametrize("stage", ["sft", "grpo"])
@pytest.mark.parametrize("argv,expected", [
    (["--steps", "0"], ["--steps must be at least 1 (got 0)"]),
    (["--steps", "-3"], ["--steps must be at least 1 (got -3)"]),
    (["--init", "/nonexistent"], ["--init /nonexistent", "does not exist"]),
    (["--eval-every", "-1"], ["--eval-every must be 0 or more"]),
])
def test_training_flags(capsys, no_training, tmp_path, stage, argv, expected):
    import grpo
    import sft
    main = {"sft": sft.main, "grpo": grpo.main}[stage]
    rejected(capsys, main, argv + ["--runs-dir", str(tmp_path / "runs")], *expected)
    assert not (tmp_path / "runs").exists(), "left a run folder behind"


@pytest.mark.parametrize("argv,expected", [
    (["--dagger", "-1"], ["--dagger must be 0 (off) or more episodes (got -1)"]),
    (["--dagger", "4", "--dagger-turns", "0"], ["--dagger-turns must be at least 1 (got 0)"]),
    (["--dagger", "4", "--dagger-per-episode", "0"], ["--dagger-per-episode must be at least 1 (got 0)"]),
    (["--dagger", "4", "--preset", "tiny", "--lora-rank", "0"], ["--dagger needs a trained policy to play"]),
    (["--mistakes", "1.5"], ["--mistakes is a share of the episodes, in [0, 1] (got 1.5)"]),
    (["--mistakes", "0.5", "--no-recovery"], ["--mistakes plants failures", "--no-recovery"]),
    (["--split", "heldout"], ["--split 'heldout': expected one of train, train-wide"]),
])
def test_sft_dagger_flags(capsys, no_training, tmp_path, argv, expected):
    import sft
    rejected(capsys, sft.main, argv + ["--runs-dir", str(tmp_path / "runs")], *expected)
    assert not (tmp_path / "runs").exists(), "left a run folder behind"


def test_sft_checks_its_flags_before_converting_a_missing_default_base(capsys, no_training, tmp_path, monkeypatch):
    """On a fresh clone the default --init (checkpoints/smollm2-135m-instruct) is missing: a bad
    flag is still refused at once, and nothing is converted."""
    import convert_gguf
    import lora
    import sft
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(lora, "ROOT", tmp_path)
    monkeypatch.setattr(convert_gguf, "convert", lambda *a: pytest.fail("converted before the flags were checked"))
    assert convert_gguf.default_checkpoint_missing(sft.SFTConfig().init)
    rejected(capsys, sft.main, ["--steps", "0", "--runs-dir", str(tmp_path / "runs")], "--steps must be at least 1")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "checkpoints").exists()


def test_sft_init_that_is_not_a_checkpoint(capsys, no_training, tmp_path):
    import sft
    rejected(capsys, sft.main, ["--init", str(tmp_path), "--runs-dir", str(tmp_path / "runs")],
             "not a checkpoint or adapter folder", "config.json")
    assert not (tmp_path / "runs").exists()


def test_sft_init_that_fails_to_load_leaves_no_run(capsys, tmp_path):
    """A folder that looks like a checkpoint but is not one fails when it loads: the run folder
    made for it (and the data generated into it) is removed."""
    import sft
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{}")
    rejected_slowly = sft.main(["--init", str(tmp_path / "bad"), "--episodes", "4", "--runs-dir",
                                str(tmp_path / "runs"), "--name", "r"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rejected_slowly == 2 and err[-1].startswith("error: --init"), err
    assert not (tmp_path / "runs" / "sft" / "r").exists()


# ---- infer.py: a pool whose Python runner has no sandbox here ------------------------------------

@pytest.mark.parametrize("argv", [["--eval"], ["--eval", "--policy", "oracle", "--pool", "unseen"],
                                  ["--eval", "--policy", "oracle", "--pool", "unseen-b"]])
def test_no_bubblewrap_refuses_instead_of_printing_other_numbers(capsys, no_play, monkeypatch, argv):
    import tools
    monkeypatch.setattr(tools, "bwrap_path", lambda: None)
    monkeypatch.setattr(tools, "_warned_no_bwrap", True)
    rejected(capsys, infer.main, argv, "unseen-b", "'sandbox'", "apt-get install bubblewrap")


# ---- infer.py: --episodes-out --------------------------------------------------------------------

def test_episodes_out_is_never_overwritten(capsys, no_play, tmp_path):
    out = tmp_path / "e.jsonl"
    out.write_text("earlier results\n")
    rejected(capsys, infer.main, ["--eval", "--policy", "oracle", "--episodes-out", str(out)], str(out), "already exists")
    assert out.read_text() == "earlier results\n"


@pytest.mark.parametrize("argv,expected", [
    (["--eval", "--policy", "oracle", "--episodes-out", "no/such/dir/e.jsonl"], ["no/such/dir/e.jsonl", "no such folder"]),
    (["--eval", "--episodes-out", "e.jsonl"], ["--episodes-out", "--policy"]),
    (["--trace", "--episodes-out", "e.jsonl"], ["--episodes-out", "--eval"]),
])
def test_episodes_out_needs_one_evaluation_and_a_folder(capsys, no_play, argv, expected):
    rejected(capsys, infer.main, argv, *expected)
