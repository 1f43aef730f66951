"""Policy-level behaviour: chat continuation, the local LLM agent's shared-prefix batch."""
import random

import pytest
import torch

from policy import Policy, play_batch
from tiny import save_tiny_checkpoint
from tools import LocalLLMAgent, OK


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ck"),
                                [f"What is the population of city {i}? It is {i * 37}." for i in range(200)], 400,
                                std=0.3, hidden_size=64, intermediate_size=128, max_position_embeddings=2048,
                                tie_word_embeddings=True)


TASKS = ["population of city 3", "17*23", "reverse the word Velora", "capital of Zarnia"]
SYSTEM = "Answer briefly."


def test_local_agent_batch_equals_each_task_alone(checkpoint):
    policy = Policy.load(checkpoint)
    batch = policy.answer_batch(SYSTEM, TASKS, max_new_tokens=12)
    alone = [policy.chat([[{"role": "system", "content": SYSTEM}, {"role": "user", "content": t}]],
                         params=policy.chat_params(0.0, max_new_tokens=12))[0][0] for t in TASKS]
    assert batch == alone
    agent = LocalLLMAgent("helper", "agent", "a small local model", 0.001, 1.0, checkpoint=str(checkpoint),
                          system_prompt=SYSTEM, max_new_tokens=12)
    replies = agent.run_batch(TASKS, [random.Random(0)] * len(TASKS), timeout=60)
    assert [r.status for r in replies] == [OK] * len(TASKS)
    assert [r.text for r in replies] == [t.strip() for t in batch]


def make_episodes(tasks_and_seeds, max_turns=3):
    from env import EnvConfig, Episode
    from tasks import make_tasks, world_for_split
    from tools import load_pool

    world = world_for_split("train")
    tasks = make_tasks("train", 4, 0, world)
    return [Episode(tasks[t], load_pool("unseen-b", world), EnvConfig(max_turns=max_turns), seed=s)
            for t, s in tasks_and_seeds]


@torch.no_grad()
def play_alone(policy, episode, max_new):
    """Reference: one episode, no engine, no cache: full recompute with plain attention."""
    tok, model = policy.tokenizer, policy.model
    ids = tok.encode_chat(episode.messages)
    while not episode.done:
        new = []
        while len(new) < max_new:
            new.append(int(model(torch.tensor([ids + new]))[0, -1].argmax()))
            if new[-1] in tok.eos_token_ids:
                break
        stopped = new[-1] in tok.eos_token_ids
        state = episode.step(tok.decode(new[:-1] if stopped else new), n_tokens=len(new))
        if state is not None:
            ids += new + ([] if stopped else [tok.im_end_id]) + policy.next_turn_tokens(state)


# max_rows 2: at most two episodes play at once, the others wait for free rows (the group of
# two waits for both); None: all at once.
@pytest.mark.parametrize("max_new,max_rows", [(3, None), (40, None), (40, 2), (3, 3)])  # turns cut by length, and ended by the model
def test_play_batch_equals_playing_each_episode_alone(checkpoint, max_new, max_rows):
    policy = Policy.load(checkpoint)
    # Episodes 0 and 1 open identically (same task, pool, seed): one prefix group, two branches.
    plan = [(1, 1), (0, 0), (0, 0), (2, 2), (3, 3)]
    batched, alone = make_episodes(plan), make_episodes(plan)
    engine, branch_of = play_batch(policy, batched, policy.chat_params(0.0, max_new_tokens=max_new), mask=False,
                                   max_rows=max_rows)
    assert engine.prefix_k.shape[1] == (max_rows or 4) and engine.suffix_k.shape[1] == (max_rows or 5)
    assert branch_of[1] != branch_of[2] and engine.group_of[branch_of[1]] == engine.group_of[branch_of[2]]
    for episode in alone:
        play_alone(policy, episode, max_new)
    for b, a in zip(batched, alone):
        assert b.messages == a.messages
        assert b.result().tokens == a.result().tokens
    # An episode's branch holds its whole history after the prompt, in the chat format.
    history = policy.tokenizer.decode(policy.tokenizer.encode_chat(batched[2].messages[:2]) + engine.tokens[branch_of[2]])
    assert policy.tokenizer.render_chat(batched[2].messages, False).startswith(history.removesuffix("<|im_end|>"))


def test_infer_runs_a_checkpoint_policy_without_crashing(checkpoint, capsys):
    """An untrained model writes junk: it must become PARSE_ERR feedback and penalties, not a crash."""
    import json
    import infer
    assert infer.main(["--eval", "--policy", str(checkpoint), "--n", "2", "--max-new-tokens", "12",
                       "--max-turns", "2", "--device", "cpu", "--json", "--no-mask"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n"] == 2 and summary["success"] == 0.0 and summary["protocol"] == 0.0
    assert summary["reward_terms"]["protocol"] < 0
    assert infer.main(["--query", "What is 17*23?", "--policy", str(checkpoint), "--max-new-tokens", "12",
                       "--max-turns", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr()
    assert "question: What is 17*23?" in out.out and "play: episodes 1/1 done, 1 turns," in out.err


def test_infer_evaluates_a_jsonl_dataset(checkpoint, capsys, tmp_path):
    """--tasks FILE: the first --n of the file's questions are played, and the summary names the file."""
    import json
    import infer
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n"
                            for q, a in [("What is 17*23?", 391), ("Reverse Velora.", "arolev"), ("2+2?", 4)]))
    assert infer.main(["--eval", "--policy", str(checkpoint), "--tasks", str(data), "--n", "2",
                       "--max-new-tokens", "12", "--max-turns", "1", "--device", "cpu", "--json"]) == 0
    out = capsys.readouterr()
    summary = json.loads(out.out)
    assert summary["n"] == 2 and summary["split"] == str(data) and "play: episodes 2/2 done" in out.err


def test_infer_reports_episodes_that_outgrow_the_room_as_truncated(checkpoint, capsys):
    import json
    import infer
    assert infer.main(["--eval", "--policy", str(checkpoint), "--n", "3", "--max-new-tokens", "200",
                       "--max-suffix-len", "64", "--device", "cpu", "--json", "--no-mask"]) == 0
    out = capsys.readouterr()
    summary = json.loads(out.out)  # stdout is the JSON object alone; progress went to stderr
    assert summary["truncated"] == 1.0 and summary["success"] == 0.0
    assert "play: episodes 3/3 done" in out.err


def test_local_agent_in_a_pool_answers_a_rounds_calls_as_one_batch(checkpoint, monkeypatch):
    from env import Episode
    from tasks import make_tasks, world_for_split
    from tools import load_pool

    world = world_for_split("train")
    pool = load_pool({"name": "local", "callees": [
        {"type": "local_llm", "name": "mini", "kind": "agent", "description": "a small local model",
         "cost": 0.001, "latency": 1.0, "checkpoint": str(checkpoint), "max_new_tokens": 6}]}, world)
    batches = []
    answer_batch = Policy.answer_batch
    monkeypatch.setattr(Policy, "answer_batch", lambda self, system, tasks, n=64:
                        batches.append(list(tasks)) or answer_batch(self, system, tasks, n))
    episode = Episode(make_tasks("train", 1, 0, world)[0], pool, seed=0)
    state = episode.step('<call id="1" to="mini">17*23</call>\n<call id="2" to="mini">capital of Zarnia</call>\n'
                         '<call id="3" to="mini">reverse {1}</call>')
    first = next(r for r in episode.rounds[0].results if r.id == "1")
    assert batches == [["17*23", "capital of Zarnia"], [f"reverse {first.text}"]]
    assert state.count('status="OK"') == 3


@pytest.mark.parametrize("max_new,rounds", [(8, 1), (200, 0)])  # state message too long; turn cut by the room
def test_episodes_that_outgrow_the_room_end_truncated(checkpoint, max_new, rounds):
    policy = Policy.load(checkpoint)
    episodes = make_episodes([(0, 0), (1, 1), (1, 1)], max_turns=10)
    engine, branch_of = play_batch(policy, episodes, policy.chat_params(0.0, max_new_tokens=max_new),
                                   max_suffix_len=64, mask=False)
    for episode, b in zip(episodes, branch_of):
        result = episode.result()
        assert episode.done and result.truncated and result.answer is None and not result.success
        assert len(episode.rounds) == rounds and len(engine.tokens[b]) <= 64
        assert int(engine.suffix_len[b]) + len(engine.unfed[b]) == len(engine.tokens[b])
