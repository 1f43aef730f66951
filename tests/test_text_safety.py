"""Text that is not valid Unicode, at every door where outside text enters a prompt: the query,
callee replies (an HTTP agent's JSON, a tool's echo), and files (tasks, trajectories, pools).
Each ends with a typed status or a clear line, and the text that reaches the prompt is something
the tokenizer encodes and an XML parser reads."""
import http.server
import json
import os
import random
import subprocess
import sys
import threading
import xml.etree.ElementTree as ET

import pytest

import sft
import train
from env import EnvConfig, Episode
from policy import Policy, play_batch
from tasks import Subtask, Task, load_jsonl_tasks, safe_text, world_for_split
from tiny import save_tiny_checkpoint
from tools import EXEC_ERR, OK, HttpAgent, Pool, TextTool, load_pool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK = Task("q?", "1", [Subtask(1, "math", "1", "1")], "test", 1, 1, 1)
TEXT = TextTool("text", "tool", "exact text operations", 0.0, 0.1)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny model with its own byte-level BPE: the tokenizer refuses lone surrogates as the
    SmolLM2 one does (`TypeError: TextInputSequence must be str`)."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ck"),
                                [f"What is the capital of city {i}? It is {i * 37}." for i in range(200)], 400,
                                std=0.3, hidden_size=64, intermediate_size=128, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    return Policy.load(checkpoint).tokenizer


def test_the_tokenizer_refuses_a_lone_surrogate(tokenizer):
    """The failure this file guards against, so that the tests below can fail."""
    with pytest.raises(TypeError):
        tokenizer.encode("ok \ud9b8 x")


@pytest.mark.parametrize("text, expected", [
    ("ok \ud9b8 x", "ok \ufffd x"),                       # lone high surrogate
    ("Velora\udcff?", "Velora\ufffd?"),                    # argv's escape for the byte 0xff
    ("\ude00\ud83d", "\ufffd\ufffd"),                      # low before high: two lone halves
    ("\ud83d\ude00", "\U0001F600"),                        # a pair is the character it encodes
    ("a\x00b\x0bc\x1fd\ufffe\uffff", "a\ufffdb\ufffdc\ufffdd\ufffd\ufffd"),
    ("tab\tnew\nline\r ok é 東 \U0001F600 \x7f", "tab\tnew\nline\r ok é 東 \U0001F600 \x7f"),
])
def test_safe_text_hand_cases(text, expected):
    assert safe_text(text) == expected


def test_safe_text_of_any_code_points_encodes_and_parses_as_xml(tokenizer):
    rng = random.Random(0)
    ranges = [(0, 0x7f), (0x80, 0x7ff), (0xd800, 0xdfff), (0xe000, 0xffff), (0x10000, 0x10ffff)]
    for _ in range(300):
        s = "".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(rng.randint(0, 40)))
        safe = safe_text(s)
        safe.encode("utf-8")                                 # strict: no surrogate is left
        tokenizer.encode(safe)
        body = safe.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        got = ET.fromstring(f"<a>{body}</a>").text or ""
        assert got == safe.replace("\r\n", "\n").replace("\r", "\n")   # XML's own newline rule
        assert len(safe) <= len(s)


def _state_ok(tokenizer, state: str) -> ET.Element:
    tokenizer.encode(state)
    return ET.fromstring(state)


def test_text_tool_echo_of_a_lone_surrogate(tokenizer):
    episode = Episode(TASK, Pool("p", [TEXT]), EnvConfig())
    state = episode.step('<call id="1" to="text">first 3 letters of \u01c01\ud9b8xyz</call>'
                         '<call id="2" to="text">reverse {1}</call>')
    first, second = episode.rounds[0].results
    assert (first.status, first.text) == (OK, "\u01c01\ufffd")
    assert (second.task, second.text) == ("reverse \u01c01\ufffd", "\ufffd1\u01c0")
    assert [r.text for r in _state_ok(tokenizer, state)] == ["\u01c01\ufffd", "\ufffd1\u01c0"]


def test_an_exception_message_with_a_surrogate_is_a_clean_exec_err(tokenizer):
    class Raising(TextTool):
        def run(self, task, rng, timeout):
            raise RuntimeError("bad \udcff byte")
    episode = Episode(TASK, Pool("p", [Raising("boom", "tool", "x", 0.0, 0.1)]), EnvConfig())
    state = episode.step('<call id="1" to="boom">x</call>')
    result = episode.rounds[0].results[0]
    assert (result.status, result.text) == (EXEC_ERR, "RuntimeError: bad \ufffd byte")
    _state_ok(tokenizer, state)


class _JsonReply(http.server.BaseHTTPRequestHandler):
    BODY = b'{"choices": [{"message": {"content": " ok \\ud800 x \\ud83d\\ude00 "}}]}'

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.BODY)))
        self.end_headers()
        self.wfile.write(self.BODY)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def agent():
    """An HTTP agent whose server answers every call with JSON holding the escape \\ud800."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _JsonReply)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield HttpAgent("remote", "agent", "a remote model", 0.01, 1.0,
                    url=f"http://127.0.0.1:{server.server_address[1]}/v1", model="m")
    server.shutdown()
    server.server_close()


def test_http_agent_reply_with_an_escaped_lone_surrogate(agent, tokenizer):
    assert json.loads(_JsonReply.BODY)["choices"][0]["message"]["content"] == " ok \ud800 x \U0001F600 "
    episode = Episode(TASK, Pool("p", [agent]), EnvConfig(call_timeout=5.0))
    state = episode.step('<call id="1" to="remote">hello</call>')
    result = episode.rounds[0].results[0]
    assert (result.status, result.text) == (OK, "ok \ufffd x \U0001F600")
    assert _state_ok(tokenizer, state)[0].text == "ok \ufffd x \U0001F600"


def test_jsonl_task_file_with_a_lone_surrogate(tmp_path, tokenizer):
    path = tmp_path / "qa.jsonl"
    path.write_bytes(b'{"question": "capital of \\ud800?", "answer": "Vel\\udcffora"}\n'
                     b'{"question": "byte \xff here", "answer": "1"}\n')
    tasks = load_jsonl_tasks(str(path))
    assert [(t.question, t.answer) for t in tasks] == [("capital of \ufffd?", "Vel\ufffdora"), ("byte \ufffd here", "1")]
    world = world_for_split("heldout")
    episode = Episode(tasks[0], load_pool("seen", world, random.Random(0)), EnvConfig())
    tokenizer.encode_chat(episode.messages)
    path.write_text("[" * 100000 + "]" * 100000 + "\n")
    with pytest.raises(ValueError, match=r"qa.jsonl:1: "):
        load_jsonl_tasks(str(path))


def test_trajectory_and_pool_files_with_a_lone_surrogate(tmp_path, tokenizer):
    row = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q \\ud800"},
                        {"role": "assistant", "content": "<answer>a</answer>"}], "meta": {}}
    path = tmp_path / "data.jsonl"
    path.write_bytes(json.dumps(row).replace("\\\\ud800", "\\ud800").encode() + b"\n"
                     + json.dumps(row).replace("q \\\\ud800", "q \xff").encode("latin-1") + b"\n")
    rows = sft.read_jsonl(path)
    assert [r["messages"][1]["content"] for r in rows] == ["q \ufffd", "q \ufffd"]
    sft.episode_tokens(tokenizer, rows[0]["messages"])
    path.write_text("[" * 100000 + "]" * 100000 + "\n")
    with pytest.raises(train.TrainingError, match=r"data.jsonl:1: not a trajectory"):
        sft.read_jsonl(path)

    pool = tmp_path / "pool.json"
    pool.write_text('{"name": "p", "callees": [{"type": "text", "name": "t\\udcff", "kind": "tool", '
                    '"description": "echoes \\ud800", "cost": 0, "latency": 0.1}]}')
    loaded = load_pool(str(pool), None)
    assert loaded.callees[0].name == "t\ufffd" and "echoes \ufffd" in loaded.describe()
    episode = Episode(TASK, loaded, EnvConfig())
    tokenizer.encode_chat(episode.messages)


def test_a_checkpoint_policy_plays_through_state_messages_that_held_bad_text(checkpoint, agent):
    """play_batch encodes the prompt (a state message already in it) and appends every new
    state message; each one here carries an HTTP agent's reply that held a lone surrogate."""
    policy = Policy.load(checkpoint)

    class CallingEpisode(Episode):
        """Whatever the (untrained) model wrote, the turn sent is a call to the HTTP agent."""
        def step(self, text, n_tokens=None):
            return super().step(f'<call id="{len(self.rounds) + 1}" to="remote">hello</call>', n_tokens)

    episodes = [CallingEpisode(TASK, Pool("p", [agent]), EnvConfig(max_turns=3, call_timeout=5.0), seed=s)
                for s in range(2)]
    for episode in episodes:
        episode.step("")
    play_batch(policy, episodes, policy.chat_params(0.0, max_new_tokens=4))
    for episode in episodes:
        assert episode.done and len(episode.rounds) == 3 and not episode.truncated
        for r in episode.rounds:
            result = ET.fromstring(r.state)[0]
            assert (result.get("status"), result.text) == (OK, "ok \ufffd x \U0001F600")


def test_query_with_an_invalid_byte(checkpoint):
    """The query as the shell passes it: bytes, one of them not UTF-8."""
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    out = subprocess.run([sys.executable, os.path.join(ROOT, "infer.py"), "--policy", str(checkpoint),
                          "--query", b"What is the capital of Velora\xff?", "--max-turns", "1",
                          "--max-new-tokens", "4", "--device", "cpu"],
                         capture_output=True, cwd=ROOT, env=env, timeout=300)
    stdout, stderr = out.stdout.decode("utf-8"), out.stderr.decode("utf-8", "replace")
    assert out.returncode == 0 and "Traceback" not in stderr, stderr
    assert "question: What is the capital of Velora\ufffd?" in stdout
