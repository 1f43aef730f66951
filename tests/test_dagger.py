"""On-policy distillation (dagger.py): the oracle takes over states a model played
(baselines.take_over), checked against the oracle that played its own episodes and on hand-made
states; the rows it makes, and how sft.py learns from them. Planted mistakes: checked against
the oracle's own turn and the real environment's callees and results."""
import json
import random
import re
import subprocess
import sys
from pathlib import Path

from baselines import CALL_TEXT, scripted_policy, teacher_turn
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


def test_a_planted_mistake_is_one_call_made_wrong_the_way_a_model_does_and_it_fails():
    from dagger import Mistaken
    from tools import Calculator, KnowledgeBase, TextTool
    tool_of = {"lookup": KnowledgeBase, "math": Calculator, "text": TextTool}
    seen = set()
    for i in range(120):
        task = task_at("train", i, 3)
        pool = load_pool("seen", task_world(task), random.Random(i))
        episode = Episode(task, pool, EnvConfig(failure_rate=0.0), seed=f"m{i}")
        policy = Mistaken(task, i, random.Random(i))
        play(episode, policy)
        oracle = scripted_policy("oracle", task, i)(episode.messages[:2])
        if not policy.mistaken_turns:
            assert episode.messages[2]["content"] == oracle
            continue
        planted = episode.messages[2]["content"].splitlines()
        right = oracle.splitlines()
        assert len(planted) == len(right) and sum(a != b for a, b in zip(planted, right)) == 1
        wrong, meant = next((a, b) for a, b in zip(planted, right) if a != b)
        (cid, to, text), (_, to0, text0) = CALL_TEXT.findall(wrong)[0], CALL_TEXT.findall(meant)[0]
        kind = next(s.kind for s in task.subtasks if s.task.split("{")[0] == text0.split("{")[0])
        if to != to0:    # misrouted, to a tool of another kind
            seen.add("route")
            assert text == text0 and isinstance(pool.get(to), tuple(set(tool_of.values()) - {tool_of[kind]}))
        elif len(text.split()) < len(text0.split()):   # a word of a lookup's relation dropped
            seen.add("relation")
            words = text0.split()
            assert kind == "lookup" and any(words[:k] + words[k + 1:] == text.split() for k in range(len(words)))
        else:            # an entity with one or two letters dropped
            seen.add("spelling")
            a, b = [w for w in text.split() if w not in text0.split()], [w for w in text0.split() if w not in text.split()]
            assert kind == "lookup" and len(a) == len(b) == 1 and 1 <= len(b[0]) - len(a[0]) <= 2
            assert a[0][0] == b[0][0] and all(c in b[0] for c in a[0])
        status = re.search(rf'<result id="{cid}" status="([A-Z_]+)"', episode.messages[3]["content"]).group(1)
        assert status == "EXEC_ERR"
        for k in range(2 + 2 * policy.mistaken_turns, len(episode.messages), 2):   # the oracle's recovery
            assert episode.messages[k]["content"] == teacher_turn(task, episode.messages[:k], i)
        if policy.mistaken_turns == 2:   # the same wrong call again, alone
            seen.add("repeat")
            again = CALL_TEXT.findall(episode.messages[4]["content"])
            assert len(again) == 1 and again[0][1:] == (to, text)
    assert seen == {"route", "relation", "spelling", "repeat"}


def test_sft_data_with_planted_mistakes_learns_only_the_recovery():
    from sft import generate_episodes
    rows = generate_episodes(60, seed=4, failure_rate=0.15, recovery=True, mistakes=0.5)
    planted = [r for r in rows if r["meta"].get("mistaken_turns")]
    assert 15 <= len(planted) <= 45
    for row in rows:
        turns = [m for m in row["messages"][2:] if m["role"] == "assistant"]
        n = row["meta"].get("mistaken_turns", 0)
        assert [m.get("learn", True) for m in turns] == [False] * n + [True] * (len(turns) - n)
    assert generate_episodes(20, seed=4, failure_rate=0.15, recovery=True, mistakes=0.0) == \
        generate_episodes(20, seed=4, failure_rate=0.15, recovery=True)
