"""LoRA adapters (lora.py) against peft on transformers (logits, gradients, folders both ways),
merged against unmerged, the KL reference with the adapter off against a separate base model,
bad flags, and a LoRA SFT run killed with SIGKILL and resumed against an uninterrupted one."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import lora
import model as M

ROOT = Path(__file__).resolve().parent.parent
BASE = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)
SPECS = {
    "all-targets-all-layers": lora.LoraSpec(4, 8.0),
    "some-targets-one-layer": lora.LoraSpec(2, 5.0, ("q_proj", "v_proj", "down_proj"), (1,)),
    "mlp-two-layers": lora.LoraSpec(8, 4.0, ("gate_proj", "up_proj", "down_proj"), (0, 2)),
}


def hf_base(tmp_path, model_type="llama"):
    """A random checkpoint saved by transformers, every parameter perturbed."""
    transformers = pytest.importorskip("transformers")
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[model_type]
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(cls(**BASE)).float().eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.add_(torch.randn_like(p) * (0.1 if "norm" in name else 0.05))
    ref.save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def perturb(adapter, seed=1):
    """A trained-looking adapter: B is no longer zero, A moved too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return adapter


IDS = torch.randint(0, BASE["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
@pytest.mark.parametrize("spec", list(SPECS))
def test_adapter_saved_here_matches_peft(tmp_path, spec, model_type):
    peft = pytest.importorskip("peft", reason="peft is the reference (requirements-test.txt)")
    import transformers
    base = hf_base(tmp_path, model_type)
    ours = M.load_model(base)
    adapter = perturb(lora.Adapter(ours, SPECS[spec], str(base)))
    adapter.save(tmp_path / "adapter")
    ref = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base).float(),
                                         tmp_path / "adapter", is_trainable=True).eval()
    logits, ref_logits = ours(IDS), ref(IDS).logits
    diff = (logits - ref_logits).abs().max().item()
    print(f"lora vs peft {model_type} {spec}: max |logit diff| {diff:.1e}")   # shown with `pytest -s`
    assert diff <= 1e-5
    # the same gradients reach A and B (peft's adapter is named "default" in its modules)
    (logits.float() ** 2).mean().backward()
    (ref_logits.float() ** 2).mean().backward()
    ref_grads = {n.replace(".default", ""): p.grad for n, p in ref.named_parameters() if "lora_" in n}
    assert set(ref_grads) == {n for n, _ in adapter.named_parameters()}
    for name, p in adapter.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    # the folder as a policy loads it: merged into the base, still the same logits
    with torch.no_grad():
        assert (lora.load_any(tmp_path / "adapter")(IDS) - ref_logits).abs().max().item() <= 1e-5


def test_adapter_saved_by_peft_loads_here(tmp_path):
    peft = pytest.importorskip("peft", reason="peft is the reference (requirements-test.txt)")
    import transformers
    base = hf_base(tmp_path)
    config = peft.LoraConfig(r=4, lora_alpha=12, target_modules=["k_proj", "o_proj", "up_proj"],
                             layers_to_transform=[0, 2], task_type="CAUSAL_LM")
    ref = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(base).float(), config)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn_like(p) * 0.2)
    ref.eval().save_pretrained(tmp_path / "peft-adapter")
    cfg = json.loads((tmp_path / "peft-adapter" / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(base)    # peft writes the name it was given (none here)
    (tmp_path / "peft-adapter" / "adapter_config.json").write_text(json.dumps(cfg))
    with torch.no_grad():
        diff = (lora.load_any(tmp_path / "peft-adapter")(IDS) - ref(IDS).logits).abs().max().item()
    assert diff <= 1e-5


def _chain_of_three(tmp_path, base):
    """Three adapters, each trained-looking and saved on the one before: ranks and scales differ."""
    specs = [lora.LoraSpec(4, 8.0, ("q_proj", "up_proj"), (0, 2)), lora.LoraSpec(2, 6.0, ("up_proj", "q_proj"), (2, 0)),
             lora.LoraSpec(3, 3.0, ("q_proj", "up_proj"), (0, 2))]
    below = base
    for i, spec in enumerate(specs):
        perturb(lora.Adapter(lora.load_any(below), spec, str(below)), seed=i + 1).save(tmp_path / f"a{i}")
        below = tmp_path / f"a{i}"
    return below


def test_flattened_chain_equals_peft_merging_the_chain(tmp_path, capsys):
    """peft loads each adapter of the chain onto the merged one before it; the flattened adapter,
    loaded alone by peft and here, gives the same logits."""
    peft = pytest.importorskip("peft", reason="peft is the reference (requirements-test.txt)")
    import transformers
    base = hf_base(tmp_path)
    top = _chain_of_three(tmp_path, base)
    assert lora.main(["--adapter", str(top), "--out", str(tmp_path / "flat")]) == 0
    config = json.loads((tmp_path / "flat" / lora.CONFIG_FILE).read_text())
    assert (config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == (9, 9 * 3.0 / 3, str(base))
    ref = transformers.AutoModelForCausalLM.from_pretrained(base).float()
    for i in range(3):
        ref = peft.PeftModel.from_pretrained(ref, tmp_path / f"a{i}").merge_and_unload()
    flat = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base).float(),
                                          tmp_path / "flat")
    with torch.no_grad():
        ref_logits = ref.eval()(IDS).logits
        assert (ref_logits - transformers.AutoModelForCausalLM.from_pretrained(base).float()(IDS).logits
                ).abs().max() > 1e-2   # the chain moves the model
        assert (flat.eval()(IDS).logits - ref_logits).abs().max().item() <= 1e-5
        assert (lora.load_any(tmp_path / "flat")(IDS) - ref_logits).abs().max().item() <= 1e-5
        assert (lora.load_any(top)(IDS) - ref_logits).abs().max().item() <= 1e-5


def test_truncated_flatten_is_the_dense_svd_of_peft_merging_the_chain(tmp_path, capsys):
    """--rank R: each target's weight moves by the best rank-R approximation of what peft's merge
    of the whole chain moves it by (a dense SVD of the difference, truncated); --rank at the full
    rank is exact; --dtype float16 stores half-precision tensors that peft and load_any read back
    to within fp16 rounding."""
    peft = pytest.importorskip("peft", reason="peft is the reference (requirements-test.txt)")
    import transformers
    base = hf_base(tmp_path)
    top = _chain_of_three(tmp_path, base)
    plain = lambda: transformers.AutoModelForCausalLM.from_pretrained(base).float()
    ref = plain()
    for i in range(3):
        ref = peft.PeftModel.from_pretrained(ref, tmp_path / f"a{i}").merge_and_unload()
    ref_w, base_w = ref.state_dict(), plain().state_dict()
    moved = [n for n in base_w if not torch.equal(ref_w[n], base_w[n])]
    assert len(moved) == 4   # q_proj and up_proj of layers 0 and 2
    for rank in (4, 9):
        assert lora.main(["--adapter", str(top), "--out", str(tmp_path / f"r{rank}"), "--rank", str(rank)]) == 0
        config = json.loads((tmp_path / f"r{rank}" / lora.CONFIG_FILE).read_text())
        assert (config["r"], config["lora_alpha"]) == (rank, rank * 3.0 / 3)   # the chain's flat scale, kept
        ours = lora.load_any(tmp_path / f"r{rank}").state_dict()
        for n in moved:
            u, s, vh = torch.linalg.svd((ref_w[n] - base_w[n]).double())
            best = (u[:, :rank] * s[:rank]) @ vh[:rank]
            assert (ours[n].double() - base_w[n].double() - best).abs().max().item() <= 1e-5, n
            if rank == 4:
                assert (s[4:9] > 1e-3).all()   # the truncation dropped something real
        record = json.loads((tmp_path / f"r{rank}" / lora.RECORD_FILE).read_text())
        assert (record["summed_rank"], record["rank"], record["dtype"]) == (9, rank, "float32")
        assert record["chain"] == [str(tmp_path / f"a{i}") for i in (2, 1, 0)]
    out = capsys.readouterr().out
    assert "dropped" in out and "approximating" in out
    assert lora.main(["--adapter", str(top), "--out", str(tmp_path / "half"), "--dtype", "float16"]) == 0
    tensors = load_file(str(tmp_path / "half" / lora.WEIGHTS_FILE))
    assert {t.dtype for t in tensors.values()} == {torch.float16}
    assert (tmp_path / "half" / lora.WEIGHTS_FILE).stat().st_size < 0.6 * (tmp_path / "r9" / lora.WEIGHTS_FILE).stat().st_size
    with torch.no_grad():
        ref_logits = ref.eval()(IDS).logits
        half = peft.PeftModel.from_pretrained(plain(), tmp_path / "half").eval()(IDS).logits
        err = (lora.load_any(tmp_path / "half")(IDS) - ref_logits).abs().max().item()
        assert (half - ref_logits).abs().max().item() <= 1e-2 and 1e-7 < err <= 1e-2


def test_flatten_refuses_bad_input_in_one_line_and_writes_nothing(tmp_path, capsys):
    base = hf_base(tmp_path)
    top = _chain_of_three(tmp_path, base)
    perturb(lora.Adapter(lora.load_any(top), lora.LoraSpec(2, 4.0, ("q_proj",), (0, 2)), str(top))).save(
        tmp_path / "other-targets")
    capsys.readouterr()   # transformers' progress bars
    for flags, expected in [(["--adapter", str(base)], "not an adapter folder"),
                            (["--adapter", str(top), "--out", str(tmp_path / "a0")], "does not exist yet"),
                            (["--adapter", str(tmp_path / "other-targets")], "differ from"),
                            (["--adapter", str(top), "--rank", "10"], "between 1 and the adapter's rank 9"),
                            (["--adapter", str(top), "--rank", "-1"], "--rank -1")]:
        flags = flags if "--out" in flags else [*flags, "--out", str(tmp_path / "flat")]
        assert lora.main(flags) == 2
        err = capsys.readouterr().err
        assert expected in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "flat").exists()
    assert sorted(p.name for p in (tmp_path / "a0").iterdir()) == [lora.CONFIG_FILE, lora.WEIGHTS_FILE]


def _small_model(seed=0):
    return M.init_weights(M.Transformer(M.ModelConfig(**BASE)), seed=seed, std=0.1)


def test_merged_equals_unmerged_and_the_base_comes_back_unchanged():
    model = _small_model()
    before = {n: t.clone() for n, t in model.state_dict().items()}
    adapter = perturb(lora.Adapter(model, SPECS["all-targets-all-layers"], "base"))
    with torch.no_grad():
        unmerged = model(IDS)
        with adapter.merged():
            merged = model(IDS)
            changed = [n for n, t in model.state_dict().items() if not torch.equal(t, before[n])]
        after = model(IDS)
        with adapter.disabled():
            off = model(IDS)
    assert (merged - unmerged).abs().max().item() <= 1e-5
    assert len(changed) == 7 * BASE["num_hidden_layers"]     # every target's weight, nothing else
    assert torch.equal(after, unmerged)
    for n, t in model.state_dict().items():
        assert torch.equal(t, before[n]), n
    # the adapter off is the base: a model with the same weights and no adapter at all
    assert torch.equal(off, _small_model()(IDS).detach())
    # the engine's decode runs through the merged weights: greedy tokens as the unmerged model picks
    from policy import Engine, SamplingParams
    with torch.no_grad(), adapter.merged():
        tokens = Engine(model, [IDS[0, :10].tolist()], 1, 12).generate(SamplingParams(0.0, 1.0, 8, ()))[0].token_ids
    ids = IDS[:1, :10]
    with torch.no_grad():
        for _ in range(8):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert tokens == ids[0, 10:].tolist()


@pytest.mark.parametrize("shared", [False, True])
def test_kl_reference_is_the_base_with_the_adapter_off(shared):
    """One GRPO step with the adapter's own reference (the same weights, adapter off) against
    the same step with a separate copy of the base as the reference."""
    from grpo import Rollout, train_on
    config = SimpleNamespace(micro_batch_tokens=10_000, clip_low=0.2, clip_high=0.28, kl_coef=0.5,
                             aggregation="token-mean", norm_tokens=16, grad_clip=0.0, shared_prefix_train=shared,
                             precision="fp32")
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 96, (6,), generator=g).tolist()
    rollouts = []
    for n, adv in ((9, 0.5), (13, -0.5)):
        ids = prompt + torch.randint(0, 96, (n,), generator=g).tolist()
        mask = [0] * 5 + [1] * n
        rollouts.append(Rollout(ids, mask, [-4.0 if m else 0.0 for m in mask], 0.0, len(prompt), adv))
    steps, stats = [], []
    for separate in (False, True):
        model = _small_model().requires_grad_(False)
        base_copy = _small_model().eval()
        adapter = perturb(lora.Adapter(model, SPECS["some-targets-one-layer"], "base"))
        reference = base_copy if separate else lora.AdapterOff(model, adapter)
        start = [p.detach().clone() for p in adapter.parameters()]
        stats.append(train_on(model, reference, torch.optim.SGD(adapter.parameters(), lr=1.0), rollouts, config,
                              1.0, "cpu", trainable=adapter))
        steps.append([p0 - p.detach() for p0, p in zip(start, adapter.parameters())])
    assert stats[0]["kl"] > 1e-4        # the policy is not the base: the KL term is live
    assert stats[0]["kl"] == pytest.approx(stats[1]["kl"], rel=1e-5)
    assert stats[0]["loss"] == pytest.approx(stats[1]["loss"], rel=1e-5)
    for a, b in zip(*steps):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- the command line

def _init_checkpoint(tmp_path) -> Path:
    """A small random checkpoint with a BPE tokenizer of the oracle's episodes: a base to adapt."""
    from sft import generate_episodes
    from tiny import save_tiny_checkpoint
    from tokenizer import Tokenizer
    rows = generate_episodes(30, seed=0, failure_rate=0.2, recovery=True)
    return save_tiny_checkpoint(tmp_path / "init", [Tokenizer.render_turns(r["messages"]) for r in rows], 400,
                                hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                                max_position_embeddings=8192)


@pytest.fixture(scope="module")
def init_checkpoint(tmp_path_factory):
    return _init_checkpoint(tmp_path_factory.mktemp("lora-init"))


@pytest.mark.parametrize("flags,expected", [
    (["--preset", "tiny", "--lora-rank", "4"], "needs a pretrained base"),
    (["--lora-rank", "4", "--init", "INIT", "--lora-targets", "q_proj", "qproj"], "choose among"),
    (["--lora-rank", "4", "--init", "INIT", "--lora-layers", "0", "4"], "layers 0..3"),
    (["--lora-rank", "4", "--init", "INIT", "--lora-layers", "1", "1"], "each once"),
    (["--lora-rank", "4", "--init", "INIT", "--freeze-layers", "2"], "--lora-layers"),
    (["--lora-rank", "-1", "--init", "INIT"], "must be 0 (off) or more"),
    (["--lora-rank", "4", "--lora-alpha", "0", "--init", "INIT"], "--lora-alpha"),
    (["--lora-rank", "4", "--init", "NOWHERE"], "does not exist"),
])
def test_bad_lora_flags_are_one_line_and_leave_no_run(capsys, tmp_path, init_checkpoint, flags, expected):
    import sft
    flags = [str(init_checkpoint) if f == "INIT" else str(tmp_path / "nowhere") if f == "NOWHERE" else f
             for f in flags]
    assert sft.main(["--runs-dir", str(tmp_path / "runs"), *flags]) == 2
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "runs").exists()


def test_adapter_whose_base_is_missing_is_one_line(capsys, tmp_path, init_checkpoint):
    import infer
    adapter = lora.Adapter(M.load_model(init_checkpoint), lora.LoraSpec(2, 4.0), str(tmp_path / "gone"))
    adapter.save(tmp_path / "adapter")
    assert infer.main(["--eval", "--policy", str(tmp_path / "adapter"), "--n", "1"]) == 2
    err = capsys.readouterr().err
    assert "base_model_name_or_path" in err and "gone" in err and len(err.strip().splitlines()) == 1, err


def _sft(runs, name, init, *extra):
    return [sys.executable, str(ROOT / "sft.py"), "--runs-dir", str(runs), "--name", name, "--init", str(init),
            "--lora-rank", "4", "--lora-alpha", "8", "--lora-layers", "1", "2", "3", "--lr", "3e-3",
            "--episodes", "30", "--steps", "12", "--batch-tokens", "1200", "--micro-batch-tokens", "1200",
            "--ckpt-every", "4", "--log-every", "4", "--eval-every", "0", "--eval-n", "0", "--warmup-steps", "2",
            *extra]


def _losses(run: Path) -> dict[int, float]:
    rows = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_lora_sft_killed_and_resumed_equals_an_uninterrupted_run(tmp_path, init_checkpoint):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(_sft(tmp_path / "ref", "reference", init_checkpoint, "--ckpt-every", "0"),
                   check=True, env=env, capture_output=True, timeout=300)
    final = tmp_path / "ref" / "sft" / "reference" / "checkpoints" / "step-000012"
    # the checkpoint is a PEFT adapter folder: the adapter and its optimizer state, no base weights
    assert not (final / "model.safetensors").exists() and not (final / "config.json").exists()
    config = json.loads((final / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["layers_to_transform"]) == (4, 8.0, [1, 2, 3])
    assert Path(config["base_model_name_or_path"]) == init_checkpoint.resolve()
    moments = load_file(str(final / "optimizer.safetensors"))
    weights = load_file(str(final / "adapter_model.safetensors"))
    assert len(weights) == 2 * 7 * 3
    assert {n.rsplit(".", 1)[0] for n in moments} == set(weights)
    # killed hard once its step-4 checkpoint exists, then resumed by name
    proc = subprocess.Popen(_sft(tmp_path, "killed", init_checkpoint), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "sft" / "killed" / "checkpoints" / "step-000004"
    deadline = time.time() + 240
    while not ckpt.is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.is_dir() and not (tmp_path / "sft" / "latest").exists()
    resume = [sys.executable, str(ROOT / "sft.py"), "--runs-dir", str(tmp_path), "--name", "killed", "--resume"]
    out = subprocess.run(resume, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "resumed from" in out.stderr, out.stderr[-2000:]
    ref, resumed = _losses(tmp_path / "ref" / "sft" / "reference"), _losses(tmp_path / "sft" / "killed")
    assert sorted(resumed) == sorted(ref) == list(range(1, 13))
    assert ref[12] < ref[1]
    for step in range(1, 13):
        assert resumed[step] == pytest.approx(ref[step], rel=1e-5), step
    again = load_file(str(tmp_path / "sft" / "killed" / "checkpoints" / "step-000012" / "adapter_model.safetensors"))
    for name, t in weights.items():
        torch.testing.assert_close(again[name], t, rtol=1e-5, atol=1e-7, msg=name)

    # GRPO on top of the SFT adapter: a new adapter whose base is the SFT adapter folder (merged
    # first), KL to that start with the adapter off; the result plays as a policy
    grpo = [sys.executable, str(ROOT / "grpo.py"), "--runs-dir", str(tmp_path), "--name", "g", "--init", str(final),
            "--lora-rank", "2", "--kl-coef", "0.05", "--prompts", "1", "--group", "3", "--max-new-tokens", "16",
            "--max-turns", "2", "--eval-every", "0", "--eval-n", "0", "--steps", "1"]
    out = subprocess.run(grpo, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    grpo_ckpt = tmp_path / "grpo" / "g" / "checkpoints" / "step-000001"
    base = Path(json.loads((grpo_ckpt / "adapter_config.json").read_text())["base_model_name_or_path"])
    assert base == final.resolve()
    from policy import Policy
    policy = Policy.load(grpo_ckpt)
    assert lora.root_base(grpo_ckpt) == init_checkpoint.resolve() and policy.tokenizer.vocab_size > 0


def test_sft_benchmark_times_every_setting_on_the_same_batches(capsys, monkeypatch, init_checkpoint):
    import bench
    monkeypatch.setattr(bench, "SFT_SETTINGS", {"freeze-2": dict(lora_rank=0, freeze_layers=2),
                                                "lora-4": dict(lora_rank=4, lora_alpha=8.0, lora_layers=[])})
    rc = bench.main(["--sft", "--sft-init", str(init_checkpoint), "--sft-settings", "freeze-2", "lora-4",
                     "--sft-episodes", "3", "--sft-batch-tokens", "1500", "--repeats", "1", "--json"])
    assert rc == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["setting"] for r in rows] == ["freeze-2", "lora-4"]
    assert rows[0]["learned_tokens"] == rows[1]["learned_tokens"] > 0
    assert rows[0]["x_baseline"] == 1.0
    assert rows[1]["x_baseline"] == rows[1]["learned_tok_s"] / rows[0]["learned_tok_s"]
