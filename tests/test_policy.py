"""Policy-level behaviour: chat continuation, the local LLM agent's shared-prefix batch."""
import random

import pytest
import torch

import model as M
from policy import ChatTurns, Policy, SamplingParams
from tokenizer import train_tokenizer
from tools import LocalLLMAgent, OK


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ck")
    texts = [f"What is the population of city {i}? It is {i * 37}." for i in range(200)]
    tok = train_tokenizer(texts, vocab_size=400)
    tok.save(path)
    config = M.ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=2048, tie_word_embeddings=True)
    M.save_model(M.init_weights(M.Transformer(config), seed=0, std=0.3), path, tokenizer_dir=path)
    return path


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


def test_chat_turns_continue_the_conversation_in_chat_format(checkpoint):
    policy = Policy.load(checkpoint)
    for max_new in (4, 40):  # cut by length (no end token) and ended by the model
        turns = ChatTurns(policy, SamplingParams(1.0, 1.0, max_new, tuple(policy.tokenizer.eos_token_ids)),
                          generator=torch.Generator().manual_seed(0))
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": TASKS[0]}]
        for state in ["<state round=\"1\"></state>", "more"]:
            messages.append({"role": "assistant", "content": turns(messages)})
            messages.append({"role": "user", "content": state})
        engine = turns.engine
        turns(messages)
        history = policy.tokenizer.decode(policy.tokenizer.encode_chat(messages[:2]) + engine.tokens[0])
        expected = policy.tokenizer.render_chat(messages + [{"role": "assistant", "content": turns.seen[-1]["content"]}], False)
        assert turns.engine is engine, "continuation must reuse the engine (shared prompt KV)"
        assert expected.startswith(history.removesuffix("<|im_end|>"))


def test_infer_runs_a_checkpoint_policy_without_crashing(checkpoint, capsys):
    """An untrained model writes junk: it must become PARSE_ERR feedback and penalties, not a crash."""
    import json
    import infer
    assert infer.main(["--eval", "--policy", str(checkpoint), "--n", "2", "--max-new-tokens", "12",
                       "--max-turns", "2", "--device", "cpu", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n"] == 2 and summary["success"] == 0.0 and summary["protocol"] == 0.0
    assert summary["reward_terms"]["protocol"] < 0
    assert infer.main(["--query", "What is 17*23?", "--policy", str(checkpoint), "--max-new-tokens", "12",
                       "--max-turns", "1", "--device", "cpu"]) == 0
    assert "question: What is 17*23?" in capsys.readouterr().out


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
