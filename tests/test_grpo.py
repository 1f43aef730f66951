"""GRPO: the loss pieces against hand-computed values, and one training step against a plain
per-episode reference loop written here."""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import model as M
import rl_loss
from grpo import Rollout, train_on
from train import freeze_bottom


def test_group_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]])
    assert rl_loss.group_advantages(rewards).tolist() == [[0.5, -0.5, -0.5, 0.5], [0.0] * 4]
    normalized = rl_loss.group_advantages(rewards, std_normalize=True)   # population std 0.5
    torch.testing.assert_close(normalized, torch.tensor([[1.0, -1.0, -1.0, 1.0], [0.0] * 4]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("ratio,adv,loss,active", [
    (1.5, 1.0, -1.28, True),     # above 1 + clip_high with a positive advantage: clipped
    (1.5, -1.0, 1.5, False),     # a negative advantage is never clipped from above
    (0.5, 1.0, -0.5, False),     # below 1 - clip_low with a positive advantage: not clipped
    (0.5, -1.0, 0.8, True),      # ... with a negative one: clipped at 1 - clip_low
    (1.1, 2.0, -2.2, False),     # inside the band
])
def test_clipping_on_both_sides_by_hand(ratio, adv, loss, active):
    logp_old = torch.tensor([[math.log(0.3)]])
    logp = logp_old + math.log(ratio)
    out, clipped = rl_loss.clipped_policy_loss(logp, logp_old, torch.tensor([adv]), clip_low=0.2, clip_high=0.28)
    assert out.item() == pytest.approx(loss, abs=1e-6) and clipped.item() == active


def test_k3_kl_by_hand():
    kl = rl_loss.k3_kl(torch.tensor([math.log(0.5), math.log(0.2)]), torch.tensor([math.log(0.25), math.log(0.2)]))
    assert kl[0].item() == pytest.approx(0.5 + math.log(2) - 1, abs=1e-6) and kl[1].item() == 0.0


def test_masking_and_aggregation_by_hand():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert rl_loss.aggregate(per_token, mask, "token-mean").item() == pytest.approx(7 / 3)
    assert rl_loss.aggregate(per_token, mask, "constant", norm_tokens=10).item() == pytest.approx(7 / 20)
    assert rl_loss.aggregate(per_token, mask, "constant", norm_tokens=10, episodes=4).item() == pytest.approx(7 / 40)
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        rl_loss.aggregate(per_token, mask, "sum")


def _model():
    config = M.ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return M.init_weights(M.Transformer(config), seed=3, std=0.2)


def _episodes(model):
    """Two hand-made episodes of different lengths: a prompt (masked), generated tokens, an
    environment message in between (masked); old log-probs a little off the current ones."""
    g = torch.Generator().manual_seed(0)
    out = []
    for length, learned, adv in ((12, [5, 6, 7, 10, 11], 0.75), (9, [4, 5, 8], -0.75)):
        ids = torch.randint(0, 50, (length,), generator=g).tolist()
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0], -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
        mask = [int(t + 1 in learned) for t in range(length - 1)]
        old = [(lp[t].item() + 0.3 * (-1) ** t) if mask[t] else 0.0 for t in range(length - 1)]
        out.append(Rollout(ids, mask, old, reward=0.0, advantage=adv))
    return out


@pytest.mark.parametrize("aggregation", ["token-mean", "constant"])
def test_grpo_step_equals_a_plain_reference_loop(aggregation):
    config = SimpleNamespace(micro_batch_tokens=10_000, clip_low=0.2, clip_high=0.28, kl_coef=0.1,
                             aggregation=aggregation, norm_tokens=16, grad_clip=0.0, shared_prefix_train=False,
                             precision="fp32")
    policy, reference = _model(), _model()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.01)
    rollouts = _episodes(policy)
    # reference: each episode alone, token by token, written out plainly
    ref_model = _model()
    total, terms = sum(sum(r.mask) for r in rollouts), []
    for r in rollouts:
        ids = torch.tensor([r.ids])
        logp = torch.log_softmax(ref_model(ids[:, :-1])[0], -1)
        with torch.no_grad():
            logp_ref = torch.log_softmax(reference(ids[:, :-1])[0], -1)
        for t, learn in enumerate(r.mask):
            if not learn:
                continue
            tok = r.ids[t + 1]
            ratio = torch.exp(logp[t, tok] - r.logp_old[t])
            surrogate = torch.minimum(ratio * r.advantage, ratio.clamp(0.8, 1.28) * r.advantage)
            d = logp_ref[t, tok] - logp[t, tok]
            terms.append(-surrogate + 0.1 * (torch.exp(d) - d - 1))
    loss = sum(terms) / (total if aggregation == "token-mean" else len(rollouts) * 16)
    loss.backward()
    # ours: padded batch, masks, one optimizer step. Plain SGD with lr 1, so the step is the
    # gradient itself: Adam would turn the roundoff of near-zero gradients into full-size steps.
    start = [p.detach().clone() for p in policy.parameters()]
    stats = train_on(policy, reference, torch.optim.SGD(policy.parameters(), lr=1.0), rollouts, config, 1.0, "cpu")
    assert stats["loss"] == pytest.approx(loss.item(), rel=1e-5)
    for (name, p), q, p0 in zip(policy.named_parameters(), ref_model.parameters(), start):
        step = p0 - p.detach()
        assert ((step - q.grad).norm() / q.grad.norm().clamp(min=1e-12)).item() < 1e-5, name


def test_grpo_runs_end_to_end_and_resumes(tmp_path):
    """grpo.py on a tiny random checkpoint: rollouts through the environment, every logged
    term present, checkpoints, runs/grpo/latest, and --resume continuing from the last one, from
    the start the run recorded even after runs/sft/latest has moved."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from sft import generate_episodes
    from tiny import save_tiny_checkpoint
    from tokenizer import Tokenizer
    rows = generate_episodes(40, seed=0, failure_rate=0.2, recovery=True)
    ckpt = save_tiny_checkpoint(tmp_path / "init", [Tokenizer.render_turns(r["messages"]) for r in rows], 500)
    root = Path(__file__).resolve().parent.parent
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "latest").symlink_to(ckpt)  # the default start, as sft.py leaves it
    args = [sys.executable, str(root / "grpo.py"), "--runs-dir", str(tmp_path), "--name", "g",
            "--prompts", "2", "--group", "3", "--max-new-tokens", "24", "--max-turns", "2", "--eval-n", "2",
            "--eval-every", "0", "--ckpt-every", "1", "--kl-coef", "0.05"]
    out = subprocess.run(args + ["--steps", "2"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "grpo" / "g" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("reward", "success", "format_error_rate", "rounds", "latency", "cost", "tokens", "r_success",
                "r_protocol", "r_diversity", "r_latency", "zero_variance_groups", "rollout_tokens_per_s",
                "rollout_seconds", "train_seconds", "eval_success"):
        assert key in rows[-1], key
    assert (tmp_path / "grpo" / "latest").resolve().name == "step-000002"
    # A newer SFT run moved sft/latest (here to a folder that is no checkpoint): the resumed run
    # must keep its own start and KL reference, not pick up the new one.
    (tmp_path / "sft" / "latest").unlink()
    (tmp_path / "sft" / "latest").symlink_to(tmp_path / "sft")
    out = subprocess.run(args + ["--steps", "3", "--resume"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "resumed from" in out.stderr and "step-000002" in out.stderr, out.stderr[-2000:]
    assert f"grpo: {ckpt.resolve()} ->" in out.stderr, out.stderr[-2000:]
    steps = [json.loads(line)["step"] for line in (tmp_path / "grpo" / "g" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_grpo_without_an_sft_checkpoint_says_what_to_run(tmp_path, capsys):
    import grpo
    assert grpo.main(["--runs-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "python sft.py" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("aggregation,micro_batch_tokens,frozen",
                         [("token-mean", 10_000, 0), ("constant", 10_000, 0), ("token-mean", 12, 0),
                          ("constant", 12, 0), ("token-mean", 12, 1)])
def test_shared_prefix_training_step_equals_the_plain_step(aggregation, micro_batch_tokens, frozen):
    """--shared-prefix-train: the same loss and the same updated weights as the plain pass, for
    two groups of prompts of different lengths with ragged episodes; with a small token budget
    each group's suffixes run in several micro-batches against its prompt computed once; with
    --freeze-layers the frozen layers' prompt K/V need no gradient and their weights stay put."""
    g = torch.Generator().manual_seed(1)
    rollouts = []
    for prompt_len in (14, 9):
        prompt = torch.randint(0, 50, (prompt_len,), generator=g).tolist()
        for k in range(3):
            rest = torch.randint(0, 50, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g).tolist()
            ids = prompt + rest
            mask = [0] * (prompt_len - 1) + [int(torch.rand(1, generator=g) < 0.7) for _ in rest]
            old = [(-2.0 - 0.1 * t) if m else 0.0 for t, m in enumerate(mask)]
            rollouts.append(Rollout(ids, mask, old, 0.0, prompt_len, advantage=(-1.0) ** k * 0.5))
    config = SimpleNamespace(micro_batch_tokens=micro_batch_tokens, clip_low=0.2, clip_high=0.28, kl_coef=0.1,
                             aggregation=aggregation, norm_tokens=16, grad_clip=0.0, shared_prefix_train=False,
                             precision="fp32")
    if micro_batch_tokens < 100:
        from grpo import shared_passes
        assert len(list(shared_passes(_model(), None, rollouts, micro_batch_tokens, "cpu"))) >= 4
    reference = _model()
    plain, shared = _model(), _model()
    freeze_bottom(plain, frozen)
    freeze_bottom(shared, frozen)
    start = [p.detach().clone() for p in plain.parameters()]
    # plain SGD with lr 1, so the step is the gradient itself (Adam would blow up the
    # roundoff of near-zero gradients into full-size steps)
    a = train_on(plain, reference, torch.optim.SGD(plain.parameters(), lr=1.0), rollouts, config, 1.0, "cpu")
    config.shared_prefix_train = True
    b = train_on(shared, reference, torch.optim.SGD(shared.parameters(), lr=1.0), rollouts, config, 1.0, "cpu")
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    assert b["kl"] == pytest.approx(a["kl"], rel=1e-4, abs=1e-7)
    for (name, p), q, p0 in zip(plain.named_parameters(), shared.parameters(), start):
        g_plain, g_shared = p0 - p.detach(), p0 - q.detach()
        assert ((g_shared - g_plain).norm() / g_plain.norm().clamp(min=1e-12)).item() < 1e-5, name
        if frozen and (name.startswith("model.layers.0.") or "embed" in name):
            assert torch.equal(q.detach(), p0), name


@pytest.mark.parametrize("shared", [False, True])
def test_bf16_mixed_step_keeps_fp32_weights_and_follows_the_fp32_step(shared):
    """--precision bf16-mixed (CUDA's default; CPU autocast here): the weights stay fp32, the
    passes run in bf16 (the loss moves by bf16 roundoff, no more), and the update follows the
    fp32 one, which the test above checks against a reference loop."""
    config = SimpleNamespace(micro_batch_tokens=10_000, clip_low=0.2, clip_high=0.28, kl_coef=0.1,
                             aggregation="token-mean", norm_tokens=16, grad_clip=0.0, shared_prefix_train=shared,
                             precision="fp32")
    reference = _model()
    rollouts = _episodes(reference)
    steps, losses = {}, {}
    for precision in ("fp32", "bf16-mixed"):
        model = _model()
        start = [p.detach().clone() for p in model.parameters()]
        config.precision = precision
        losses[precision] = train_on(model, reference, torch.optim.SGD(model.parameters(), lr=1.0), rollouts,
                                     config, 1.0, "cpu")["loss"]
        assert all(p.dtype == torch.float32 for p in model.parameters())
        steps[precision] = torch.cat([(p0 - p.detach()).flatten() for p, p0 in zip(model.parameters(), start)])
    assert losses["bf16-mixed"] != losses["fp32"]
    assert losses["bf16-mixed"] == pytest.approx(losses["fp32"], rel=3e-2, abs=1e-3)
    assert F.cosine_similarity(steps["bf16-mixed"], steps["fp32"], dim=0) > 0.99


def test_resume_names_the_flags_its_config_predates(tmp_path, capsys):
    """A run whose config.json lacks a flag added since continues with that flag's default,
    given explicitly or not, and the log names it (with --no-... the run continues as it began)."""
    import json
    from dataclasses import asdict, replace

    import train
    from grpo import GRPOConfig
    saved = asdict(replace(GRPOConfig(), runs_dir=str(tmp_path), name="g", steps=7))
    del saved["last_turn_answers"]
    (tmp_path / "grpo" / "g").mkdir(parents=True)
    (tmp_path / "grpo" / "g" / "config.json").write_text(json.dumps(saved))
    asked = replace(GRPOConfig(), runs_dir=str(tmp_path), name="g", resume=True)
    merged = train.resumed_config(asked, "grpo", {"resume", "name", "runs_dir"})
    assert merged.steps == 7 and merged.last_turn_answers is True
    assert "predates --last-turn-answers (now True)" in capsys.readouterr().err
    off = train.resumed_config(replace(asked, last_turn_answers=False), "grpo",
                               {"resume", "name", "runs_dir", "last_turn_answers"})
    assert off.last_turn_answers is False and "predates" not in capsys.readouterr().err
