"""On-policy distillation (dagger.py): the oracle takes over states a model played
(baselines.take_over), checked against the oracle that played its own episodes and on hand-made
states; the rows it makes, and how sft.py learns from them."""
import json
import random
import subprocess
import sys
from pathlib import Path

from baselines import scripted_policy, teacher_turn
from dagger import action, states_to_correct
from env import EnvConfig, Episode, play
from sft import episode_tokens
from tasks import task_at, task_world
from test_sft import POOL, TASK, _state
from tiny import save_tiny_checkpoint
from tools import load_pool

ROOT = Path(__file__).resolve().parent.parent
CHAIN = ('<call id="1" to="kb">capital of Velora</call>\n<call id="2" to="kb">population of {1}</call>\n'
         '<call id="3" to="calc">{2} * 2</call>')


def conversation(*turns):
    """System prompt, question, then (assistant turn, state) pairs."""
    messages = [{"role": "system", "content": POOL}, {"role": "user", "content": TASK.question}]
    for turn, state in turns:
        messages += [{"role": "assistant", "content": turn}, state]
    return messages


def test_the_teacher_writes_what_the_oracle_wrote_at_every_state_of_its_own_episodes():
    # the stateless reading of a conversation against the stateful oracle that played it
    states = 0
    for failure_rate in (0.0, 0.3, 0.6):
        for i in range(40):
            task = task_at("train", i, 5)
            episode = Episode(task, load_pool("seen", task_world(task), random.Random(i)),
                              EnvConfig(failure_rate=failure_rate), seed=f"t:{i}")
            play(episode, scripted_policy("oracle", task, i))
            for k in range(2, len(episode.messages), 2):
                assert teacher_turn(task, episode.messages[:k], i) == episode.messages[k]["content"], (failure_rate, i, k)
                states += 1
    assert states > 300


def test_the_teacher_answers_from_a_state_that_holds_the_answer():
    done = _state(("1", "kb", "OK", "Zarn"), ("2", "kb", "OK", "100"), ("3", "calc", "OK", "200"))
    assert teacher_turn(TASK, conversation((CHAIN, done))) == "<answer>{3}</answer>"
    # a model that asked again: the first exact answer stands, the repeat changes nothing
    again = _state(("4", "calc", "OK", "200"))
    assert teacher_turn(TASK, conversation((CHAIN, done), ('<call id="4" to="calc">{2} * 2</call>', again))) \
        == "<answer>{3}</answer>"


def test_the_teacher_reroutes_a_call_sent_to_a_callee_that_cannot_do_it():
    turn = CHAIN.replace('id="1" to="kb"', 'id="1" to="calc"')
    state = _state(("1", "calc", "EXEC_ERR", "not an arithmetic expression"),
                   ("2", "kb", "EXEC_ERR", "dependency {1} failed (EXEC_ERR)"),
                   ("3", "calc", "EXEC_ERR", "dependency {2} failed (EXEC_ERR)"))
    assert teacher_turn(TASK, conversation((turn, state))) == (
        "<think>call 1 failed, re-route to kb.</think>\n"
        '<call id="4" to="kb">capital of Velora</call>\n<call id="5" to="kb">population of {4}</call>\n'
        '<call id="6" to="calc">{5} * 2</call>')


def test_the_teacher_sends_again_what_a_call_it_cannot_read_was_for():
    # a misspelled entity is no work on any subtask: the plan starts over, with the next ids
    turn = '<call id="1" to="kb">capital of Velra</call>'
    state = _state(("1", "kb", "EXEC_ERR", "no fact matches 'capital of Velra'"))
    assert teacher_turn(TASK, conversation((turn, state))).endswith(
        '<call id="2" to="kb">capital of Velora</call>\n<call id="3" to="kb">population of {2}</call>\n'
        '<call id="4" to="calc">{3} * 2</call>')


def test_one_weak_answer_is_checked_and_the_same_weak_callee_twice_is_no_second_opinion():
    turn = '<call id="1" to="ann">capital of Velora</call>'
    assert teacher_turn(TASK, conversation((turn, _state(("1", "ann", "OK", "Zarn"))))) == (
        '<think>no second answer, ask kb.</think>\n<call id="2" to="kb">capital of Velora</call>')
    turn = '<call id="1" to="ann">capital of Velora</call>\n<call id="2" to="ann">capital of Velora</call>'
    state = _state(("1", "ann", "OK", "Zarn"), ("2", "ann", "OK", "Zarn"))
    assert "agree" not in teacher_turn(TASK, conversation((turn, state)))
    # two weak callees that agree settle it, as when the oracle asks them itself
    turn = '<call id="1" to="ann">capital of Velora</call>\n<call id="2" to="bob">capital of Velora</call>'
    state = _state(("1", "ann", "OK", "Zarn"), ("2", "bob", "OK", "Zarn"))
    assert teacher_turn(TASK, conversation((turn, state))).startswith(
        '<think>calls 1 and 2 agree.</think>\n<call id="3" to="kb">population of {1}</call>')


def test_rows_are_the_states_where_the_model_acted_otherwise():
    done = _state(("1", "kb", "OK", "Zarn"), ("2", "kb", "OK", "100"), ("3", "calc", "OK", "200"))
    good = conversation(("<think>my own words</think>\n" + CHAIN, done)) + [
        {"role": "assistant", "content": "<answer>{3}</answer>"}]
    assert states_to_correct(TASK, good, 0) == []          # the same actions, other thinking
    looping = conversation((CHAIN, done), ('<call id="4" to="calc">{2} * 2</call>', _state(("4", "calc", "OK", "200"))))
    assert states_to_correct(TASK, looping, 0) == [(4, "<answer>{3}</answer>"), (6, "<answer>{3}</answer>")]
    assert action("<think>a\nb</think>\n<answer> {3} </answer>") == "<answer> {3} </answer>"


def test_context_turns_are_not_learned(tmp_path):
    from tokenizer import train_tokenizer
    messages = conversation((CHAIN, _state(("1", "kb", "OK", "Zarn"))))
    tokenizer = train_tokenizer([json.dumps(messages)] * 4, vocab_size=300)
    messages += [{"role": "assistant", "content": "<answer>{1}</answer>"}]
    ids, mask = episode_tokens(tokenizer, messages)
    context = messages[:2] + [messages[2] | {"learn": False}] + messages[3:]
    ids2, mask2 = episode_tokens(tokenizer, context)
    answer = len(tokenizer.encode("<answer>{1}</answer>")) + 1
    assert ids2 == ids and sum(mask) == len(tokenizer.encode(CHAIN)) + 1 + answer
    assert sum(mask2) == answer and mask2[-answer:] == [1] * answer


def test_sft_dagger_collects_teacher_rows_from_a_played_model(tmp_path):
    ckpt = save_tiny_checkpoint(tmp_path / "tiny", [POOL, TASK.question, CHAIN] * 4, vocab_size=400)
    cmd = [sys.executable, "sft.py", "--init", str(ckpt), "--lora-rank", "0", "--dagger", "3", "--dagger-turns", "2",
           "--episodes", "4", "--steps", "1", "--eval-n", "0", "--runs-dir", str(tmp_path / "runs"), "--name", "d"]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True, timeout=600)
    rows = [json.loads(line) for line in open(tmp_path / "runs" / "sft" / "d" / "dagger.jsonl")]
    assert 1 <= len(rows) <= 6
    for row in rows:
        *context, target = row["messages"]
        task = task_at("train", row["meta"]["index"], 0)
        assert target["role"] == "assistant" and target.get("learn", True)
        assert all(m.get("learn") is False for m in context[2:] if m["role"] == "assistant")
        assert target["content"] == teacher_turn(task, context, row["meta"]["index"] - 1_000_000)
        assert len([m for m in context if m["role"] == "assistant"]) < 2 + 1
