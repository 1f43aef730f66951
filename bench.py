"""Benchmark: G branches continuing one P-token prompt, three ways, in one run on one machine.

    shared   this engine, ONE copy of the prompt's KV for all branches (policy.Engine)
    copied   this engine with the prompt's KV copied into every branch (share_prefix=False):
             what most minimal engines do; same code otherwise, so the ratio isolates the layout
    hf       Hugging Face `generate` on the same config and random weights, the G copies of the
             prompt as one batch (what a user would otherwise run); skipped if not installed

Each case decodes exactly `--new-tokens` tokens greedily (no stop token), with random weights:
speed does not depend on the weights' values. Reported per case: end-to-end tokens/s (prefill
included), decode-only tokens/s (end-to-end time minus the prefill), and KV-cache bytes (on CUDA
also the peak allocated memory). The run first measures this machine's memory bandwidth and
matmul throughput, and estimates the best decode step's floor from them: bytes read per step
(weights + the KV each mode must read) over bandwidth, FLOPs per step over matmul throughput.

`--train` times the other place a group shares its prompt: the GRPO training step
(grpo.train_on: forward, backward, AdamW) on synthetic groups of G = --branches episodes,
the plain pass (every episode with its own copy of the prompt) against --shared-prefix-train
(the prompt once per group), interleaved in one run:

    python bench.py --train --presets tiny smollm2-135m --branches 4 8 16

`--sft` times an SFT step (forward + backward + AdamW, sft.py's loss and batching) of the
converted SmolLM2-135M on oracle episodes, in LEARNED tokens per second (the assistant tokens
the loss covers), under each setting of SFT_SETTINGS (sft.py flags), interleaved in one run:

    python bench.py --sft                       today's recipe (--freeze-layers 20) against LoRA

`--mask` times a decode step with and without the protocol mask (protocol_mask.py): G
branches of one prompt sample --new-tokens tokens at temperature 1 (no stop token, so every
branch takes every step), the unmasked engine against the engine with one TurnMask per branch
(the pool names of a seen-pool draw, SmolLM2's 49k vocabulary from --mask-tokenizer),
interleaved; the mask's compile cache is warmed by one run first, whose time is reported
apart. Also reported: the mask's own work per step, timed directly (`mask_ms`, `mask_share` of
an unmasked step), which is steadier on a shared machine than the end-to-end difference:

    python bench.py --mask --presets smollm2-135m --prefix-lens 400 --branches 16

`--linear ROWS...` times the weight products of one decode pass (every projection of every layer,
then the output layer) on that many rows, F.linear against model.linear (which splits few-row
products over the cores), interleaved, the fastest of --repeats:

    python bench.py --linear 1 4 16 64 --presets smollm2-135m

`--play DIR` profiles policy.play_batch end to end as evaluation runs it (held-out tasks,
greedy, masked): prefill, decode passes, appended state messages, attention and the output layer
inside them, the mask, sampling, the environment, and the rest:

    python bench.py --play release/paramanager-smollm2-135m --play-n 16
    python bench.py --play release/paramanager-smollm2-135m --play-n 16 --play-plain-linear   (the baseline)
"""
import dataclasses
import json
import os
import random
import sys
import time

import torch

import cli
import model as M
from policy import Engine, SamplingParams
from protocol_mask import ProtocolMask, TurnSpec
from tasks import world_for_split
from tokenizer import Tokenizer
from tools import load_pool


@dataclasses.dataclass
class BenchConfig:
    presets: list[str] = cli.field(["tiny", "smollm2-135m"], "model shapes (model.PRESETS names)", "cases")
    prefix_lens: list[int] = cli.field([256, 1024], "prompt lengths P", "cases")
    branches: list[int] = cli.field([1, 8], "branch counts G", "cases")
    new_tokens: int = cli.field(64, "tokens generated per branch", "cases")
    modes: list[str] = cli.field(["shared", "copied", "hf"], "which implementations to run", "cases")
    hf_max_prefill: int = cli.field(16384, "skip hf cases whose G*P prompt tokens exceed this (CPU time)", "cases")
    tiny_vocab: int = cli.field(2048, "vocabulary of the tiny preset (our BPE's size)", "cases")
    repeats: int = cli.field(2, "timed repeats per case, modes interleaved (the fastest is kept)", "cases")
    device: str = cli.field("cuda" if torch.cuda.is_available() else "cpu", "cpu or cuda", "run")
    seed: int = cli.field(0, "random weights and prompts", "run")
    json: bool = cli.field(False, "print the results as JSON instead of a table", "run")
    jsonl: str = cli.field("", "also append each row to this JSON-lines file as soon as it is measured", "run")
    train: bool = cli.field(False, "instead: time the GRPO training step (forward + backward + AdamW), plain "
                            "pass against --shared-prefix-train, on synthetic groups of --branches episodes", "train")
    train_prompts: int = cli.field(2, "prompts (groups) per training step", "train")
    train_prompt_len: int = cli.field(400, "tokens of each prompt (system prompt, pool and question)", "train")
    train_suffix_len: int = cli.field(300, "mean tokens of an episode after its prompt (drawn in [0.5, 1.5] x this)", "train")
    train_micro_batch_tokens: int = cli.field(8192, "tokens per forward/backward pass (grpo.py --micro-batch-tokens; "
                                              "the smollm2-135m shape needs 4096 within 24 GB on CPU)", "train")
    tokens: str = cli.field("", "instead: where an SFT episode's tokens go (system prompt and pool, question, "
                            "state messages, learned turns), for this checkpoint's tokenizer, over --token-episodes "
                            "oracle training episodes", "tokens")
    token_episodes: int = cli.field(300, "oracle episodes of --tokens (sft.py's default failure rate)", "tokens")
    sft: bool = cli.field(False, "instead: time an SFT step of --sft-init under each of --sft-settings, in "
                          "learned tokens per second", "sft")
    sft_init: str = cli.field("checkpoints/smollm2-135m-instruct", "the checkpoint the SFT settings start from", "sft")
    sft_settings: list[str] = cli.field(["freeze-20", "lora-16", "lora-16-top-10"], "which settings (SFT_SETTINGS)",
                                        "sft")
    sft_episodes: int = cli.field(48, "oracle episodes the steps are cut from", "sft")
    sft_steps: int = cli.field(1, "optimizer steps per timed repeat (the same batches for every setting)", "sft")
    sft_batch_tokens: int = cli.field(4096, "tokens per optimizer step and per pass (sft.py --batch-tokens and "
                                      "--micro-batch-tokens of the recipe)", "sft")
    sft_shared: list[int] = cli.field([], "instead: learned tokens/s of a SmolLM2-135M SFT step (the README recipe), "
                                      "plain pass against the shared prompt, on episodes drawn this many per pool "
                                      "draw (one comparison per value)", "sft")
    mask: bool = cli.field(False, "instead: time a decode step with and without the protocol mask", "mask")
    mask_tokenizer: str = cli.field("checkpoints/smollm2-135m-instruct", "checkpoint folder whose tokenizer the "
                                    "--mask benchmark compiles the mask against", "mask")
    append_lens: list[int] = cli.field([], "instead: time appending suffixes of these lengths to as many branches "
                                       "of one --prefix-lens prompt (padded pass, packed passes, one call each)", "cases")
    linear: list[int] = cli.field([], "instead: time a decode pass's weight products on these row counts, "
                                  "F.linear against model.linear", "cases")
    play: str = cli.field("", "instead: profile policy.play_batch end to end with this checkpoint or adapter "
                          "folder on --play-n held-out tasks (where the time goes, under cProfile)", "play")
    play_n: int = cli.field(16, "held-out tasks --play plays (seed --seed, seen pool family)", "play")
    play_batch: int = cli.field(16, "episodes decoded together (evaluation's --batch-episodes)", "play")
    play_plain_linear: bool = cli.field(False, "the baseline: every weight product through F.linear (model.SPLIT_MAX_ROWS "
                                        "is 0 for the run)", "play")


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def machine_limits(device, dtype) -> dict:
    """Measured read bandwidth (GB/s) and matmul throughput (GFLOP/s) of this device."""
    n = 256 * 2**20 // torch.tensor([], dtype=dtype).element_size()  # 256 MiB
    a = torch.ones(n, device=device, dtype=dtype)
    a.sum(), sync(device)
    t0 = time.perf_counter()
    for _ in range(10):
        a.sum()
    sync(device)
    bandwidth = 10 * a.numel() * a.element_size() / (time.perf_counter() - t0) / 1e9
    del a
    x = torch.randn(2048, 2048, device=device, dtype=dtype)
    x @ x, sync(device)
    t0 = time.perf_counter()
    for _ in range(10):
        x @ x
    sync(device)
    flops = 10 * 2 * 2048**3 / (time.perf_counter() - t0) / 1e9
    return {"read_bandwidth_gb_s": round(bandwidth, 1), "matmul_gflop_s": round(flops, 1)}


def run_engine(model, prompt, G, new_tokens, share_prefix):
    sync(prompt.device)
    t0 = time.perf_counter()
    engine = Engine(model, [prompt.tolist()], G, new_tokens + 1, share_prefix=share_prefix)
    out = engine.generate(SamplingParams(temperature=0.0, max_new_tokens=new_tokens))
    sync(prompt.device)
    total = time.perf_counter() - t0
    assert all(len(c.token_ids) == new_tokens for c in out)
    return total, engine.prefill_seconds, engine.kv_cache_bytes()


def run_hf(hf_model, prompt, G, new_tokens):
    ids = prompt[None].repeat(G, 1)

    def generate(n):
        sync(ids.device)
        t0 = time.perf_counter()
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                min_new_tokens=n, do_sample=False, pad_token_id=0,
                                return_dict_in_generate=True)
        sync(ids.device)
        return time.perf_counter() - t0, out
    total, out = generate(new_tokens)
    assert out.sequences.shape[1] == ids.shape[1] + new_tokens
    prefill, _ = generate(1)  # one new token = the prefill (and one lm_head)
    cache = out.past_key_values
    kv_bytes = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    return total, prefill, kv_bytes


def measure(mode, model, hf_model, prompt, G, new_tokens) -> dict:
    cuda = prompt.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        if mode == "hf":
            seconds, prefill, kv = run_hf(hf_model, prompt, G, new_tokens)
            prefix_kv = None
        else:
            seconds, prefill, (prefix_kv, suffix_kv) = run_engine(model, prompt, G, new_tokens, mode == "shared")
            kv = prefix_kv + suffix_kv
    r = {"seconds": seconds, "prefill_s": prefill, "kv_mb": kv / 2**20}
    if prefix_kv is not None:
        r["prefix_kv_mb"] = prefix_kv / 2**20
    if cuda:
        r["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return r


def decode_floor(config: M.ModelConfig, P, G, mode, dtype, limits) -> float:
    """Lower bound (s) on one decode step of G branches: max(bytes / bandwidth, FLOPs / throughput)."""
    size = torch.tensor([], dtype=dtype).element_size()
    params = sum(s[0] * (s[1] if len(s) > 1 else 1) for s in M.checkpoint_tensor_shapes(config).values())
    kv_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_size * size
    prefix_copies = 1 if mode == "shared" else G
    bytes_read = params * size + kv_per_token * P * prefix_copies
    flops = 2 * params * G + 4 * config.num_hidden_layers * config.num_attention_heads * config.head_size * P * G
    return max(bytes_read / (limits["read_bandwidth_gb_s"] * 1e9), flops / (limits["matmul_gflop_s"] * 1e9))


MODES = ("shared", "copied", "hf")


def validate(cfg: BenchConfig) -> None:
    """Refuse bad flags before measuring anything (a cli.UsageError, printed as one line)."""
    for flag, values, known in (("modes", cfg.modes, MODES), ("presets", cfg.presets, tuple(M.PRESETS))):
        unknown = [v for v in values if v not in known]
        cli.check(values and not unknown, f"--{flag} {' '.join(unknown or ['(none)'])}: expected some of {', '.join(known)}")
    cli.check(not cfg.mask or os.path.isfile(os.path.join(cfg.mask_tokenizer, "tokenizer.json")),
              f"--mask-tokenizer {cfg.mask_tokenizer}: no tokenizer.json there (python convert_gguf.py writes SmolLM2's)")
    cli.check(min(cfg.linear, default=1) >= 1, f"--linear must be row counts of at least 1 (got {cfg.linear})")
    cli.check(min(cfg.append_lens, default=1) >= 1, f"--append-lens must be lengths of at least 1 (got {cfg.append_lens})")
    for flag in ("prefix_lens", "branches"):
        values = getattr(cfg, flag)
        cli.check(values and min(values) >= 1, f"--{flag.replace('_', '-')} must be sizes of at least 1 (got {values})")
    cli.check(not cfg.tokens or os.path.isfile(os.path.join(cfg.tokens, "tokenizer.json")),
              f"--tokens {cfg.tokens}: no tokenizer.json in it (a checkpoint folder was expected)")
    unknown = [s for s in cfg.sft_settings if s not in SFT_SETTINGS]
    cli.check(bool(cfg.sft_settings) and not unknown,
              f"--sft-settings {' '.join(unknown or ['(none)'])}: expected some of {', '.join(SFT_SETTINGS)}")
    cli.check(not cfg.play or os.path.isdir(cfg.play), f"--play {cfg.play}: no such checkpoint or adapter folder")
    for flag in ("play_n", "play_batch", "token_episodes", "new_tokens", "repeats", "tiny_vocab", "train_prompts", "train_prompt_len", "train_suffix_len",
                 "train_micro_batch_tokens", "sft_episodes", "sft_steps", "sft_batch_tokens"):
        cli.check(getattr(cfg, flag) >= 1, f"--{flag.replace('_', '-')} must be at least 1 (got {getattr(cfg, flag)})")


@cli.entry_point
def main(argv=None):
    cfg = cli.parse_config(BenchConfig, argv, __doc__.splitlines()[0])
    validate(cfg)
    cli.log_config(cfg)
    torch.manual_seed(cfg.seed)
    dtype = M.default_dtype(cfg.device)
    if cfg.play:
        return bench_play(cfg)
    if cfg.tokens:
        return bench_tokens(cfg)
    if cfg.append_lens:
        return bench_append(cfg, dtype)
    if cfg.linear:
        return bench_linear(cfg, dtype)
    if cfg.sft_shared:
        return bench_sft_shared(cfg)
    if cfg.train:
        return bench_train(cfg, torch.float32)  # training's weights are fp32 (train.autocast), on CUDA too
    if cfg.sft:
        return bench_sft(cfg)
    if cfg.mask:
        return bench_mask(cfg, dtype)
    limits = machine_limits(cfg.device, dtype)
    print(f"machine: {limits}, dtype {dtype}, threads {torch.get_num_threads()}", file=sys.stderr)
    try:
        import transformers
    except ImportError:
        transformers = None
        print("transformers not installed: the hf column is skipped", file=sys.stderr)
    rows = []
    for preset in cfg.presets:
        overrides = {"vocab_size": cfg.tiny_vocab} if preset == "tiny" else {}
        config = M.preset_config(preset, **overrides)
        model = M.build_model(config, cfg.device, dtype, seed=cfg.seed).eval()
        hf_model = None
        if "hf" in cfg.modes and transformers is not None:
            hf_config = transformers.AutoConfig.for_model(**config.to_hf())
            hf_model = transformers.AutoModelForCausalLM.from_config(hf_config).to(cfg.device, dtype).eval()
        with torch.no_grad():  # warm-up: first calls pay for thread pools and allocator growth
            warm = torch.randint(0, config.vocab_size, (32,), device=cfg.device)
            run_engine(model, warm, 2, 4, True), run_engine(model, warm, 2, 4, False)
            if hf_model is not None:
                run_hf(hf_model, warm, 2, 4)
        for P in cfg.prefix_lens:
            prompt = torch.randint(0, config.vocab_size, (P,), device=cfg.device)
            for G in cfg.branches:
                modes = [m for m in cfg.modes if m != "hf" or (hf_model is not None and G * P <= cfg.hf_max_prefill)]
                best = {}
                for _ in range(cfg.repeats):  # modes interleaved, so machine noise hits them alike
                    for mode in modes:
                        result = measure(mode, model, hf_model, prompt, G, cfg.new_tokens)
                        if mode not in best or result["seconds"] < best[mode]["seconds"]:
                            best[mode] = result
                for mode, r in best.items():
                    tokens = G * cfg.new_tokens
                    row = {"preset": preset, "P": P, "G": G, "mode": mode, **r,
                           "e2e_tok_s": tokens / r["seconds"],
                           "decode_tok_s": tokens / max(r["seconds"] - r["prefill_s"], 1e-9)}
                    if mode != "hf":
                        step = (r["seconds"] - r["prefill_s"]) / cfg.new_tokens
                        row["floor_frac"] = decode_floor(config, P, G, mode, dtype, limits) / step
                    rows.append(row)
                    append_jsonl(cfg, [row], machine=limits, device=cfg.device)
                    print(f"{preset} P={P} G={G} {mode}: {row['e2e_tok_s']:.1f} tok/s e2e, "
                          f"{row['decode_tok_s']:.1f} decode, {r['seconds']:.1f}s", file=sys.stderr)
        del model, hf_model
    add_ratios(rows)
    if cfg.json:
        print(json.dumps({"machine": limits, "device": cfg.device, "rows": rows}, indent=1))
    else:
        print_table(rows, limits, cfg.device)
    return 0


# Where play_batch's time goes: (part, [(sign, function, the caller its time must come from, or
# None for every caller)]), a part's seconds the signed sum of those functions' cumulative times.
# The parts not indented are disjoint; the indented ones lie inside the passes above them.
STEP = ("policy.py", "step")  # Engine.step: where the mask is applied
PLAY_PARTS = [
    ("prefill", [(1, ("policy.py", "_prefill"), None)]),
    ("decode steps", [(1, ("policy.py", "_decode"), None)]),
    ("appended state messages", [(1, ("policy.py", "_forward_suffix"), None), (-1, ("policy.py", "_decode"), None)]),
    ("  of which attention", [(1, ("policy.py", "_attend"), None)]),
    ("  of which output layer", [(1, ("model.py", "linear"), ("policy.py", "_forward_suffix"))]),
    ("protocol mask", [(1, ("protocol_mask.py", "mask"), STEP), (1, ("protocol_mask.py", "advance"), STEP)]),
    ("sampling", [(1, ("policy.py", "sample_tokens"), None)]),
    ("environment", [(1, ("env.py", "step"), None)]),
]


def bench_play(cfg) -> int:
    """Profile policy.play_batch as evaluation runs it: --play-n held-out tasks, greedy, masked,
    --play-batch at a time. cProfile's caller edges split the model's passes into prefill, decode
    steps (Engine._decode) and appended state messages; attention and the output layer are inside
    those passes.
    cProfile adds a cost per Python call, so the shares are of a slightly slower run."""
    import cProfile
    import pstats
    from env import EnvConfig, Episode
    from evaluation import play_episodes, pool_for_episode
    from policy import Policy
    from tasks import make_tasks, task_world
    policy = Policy.load(cfg.play, device=cfg.device)
    tasks = make_tasks("heldout", cfg.play_n, seed=cfg.seed)
    episodes = [Episode(t, pool_for_episode("seen", task_world(t), cfg.seed, i), EnvConfig(), seed=f"{cfg.seed}:{i}")
                for i, t in enumerate(tasks)]
    profiler = cProfile.Profile()
    start = time.perf_counter()
    split_max_rows = M.SPLIT_MAX_ROWS
    if cfg.play_plain_linear:  # the baseline for one run, restored below: not a setting
        M.SPLIT_MAX_ROWS = 0
    try:
        profiler.runcall(play_episodes, policy, episodes, list(range(len(episodes))), cfg.device,
                         batch=cfg.play_batch, quiet=True)
    finally:
        M.SPLIT_MAX_ROWS = split_max_rows
    total = time.perf_counter() - start
    stats = pstats.Stats(profiler).stats

    def seconds(where, caller):
        out = 0.0
        for (path, _, name), (_, _, _, cumulative, callers) in stats.items():
            if path.endswith(where[0]) and name == where[1]:
                if caller is None:
                    out += cumulative
                else:
                    out += sum(edge[3] for (cpath, _, cname), edge in callers.items()
                               if cpath.endswith(caller[0]) and cname == caller[1])
        return out

    # max(0, ...): a difference of two cumulative times can dip a hair below 0 when it is empty
    rows = [{"part": part, "seconds": max(0.0, sum(sign * seconds(where, caller) for sign, where, caller in edges))}
            for part, edges in PLAY_PARTS]
    counted = sum(r["seconds"] for r in rows if not r["part"].startswith(" "))
    rows.append({"part": "the rest (Python around the passes, tokenizing, bookkeeping)", "seconds": total - counted})
    rows.append({"part": "total", "seconds": total})
    for r in rows:
        r["share"] = r["seconds"] / total
    turns = sum(e.turns for e in episodes)
    tokens = sum(e.tokens for e in episodes)
    title = (f"play_batch profile{' (every product through F.linear)' if cfg.play_plain_linear else ''}: {cfg.play}, {len(episodes)} held-out tasks, {turns} turns, {tokens} generated "
             f"tokens, {tokens / total:.1f} tok/s, {total:.0f}s under cProfile")
    return report(cfg, rows, title, [("part", "{}"), ("seconds", "{:.1f}"), ("share", "{:.1%}")])


def bench_linear(cfg, dtype) -> int:
    """One decode pass's weight products (each layer's projections in order, then the output
    layer) on R rows: F.linear against model.linear, interleaved, the fastest of --repeats.
    The weights are read once per pass, as in decoding: too many to stay in cache."""
    import torch.nn.functional as F
    rows = []
    for preset in cfg.presets:
        overrides = {"vocab_size": cfg.tiny_vocab} if preset == "tiny" else {}
        model = M.build_model(M.preset_config(preset, **overrides), cfg.device, dtype, seed=cfg.seed)
        weights = [m.weight for m in model.model.layers.modules() if isinstance(m, M.Linear)]
        weights.append(model.output_weight())
        weight_bytes = sum(w.numel() * w.element_size() for w in weights)
        for R in cfg.linear:
            inputs = {w.shape[1]: torch.randn(R, w.shape[1], device=cfg.device, dtype=dtype) for w in weights}
            best = {}
            with torch.no_grad():
                for _ in range(cfg.repeats + 1):  # the first round warms up
                    for name, fn in (("plain", F.linear), ("split", M.linear)):
                        sync(cfg.device)
                        t0 = time.perf_counter()
                        for w in weights:
                            fn(inputs[w.shape[1]], w)
                        sync(cfg.device)
                        best[name] = min(best.get(name, float("inf")), time.perf_counter() - t0)
            rows.append({"preset": preset, "rows": R, "threads": torch.get_num_threads(),
                         "plain_ms": 1e3 * best["plain"], "split_ms": 1e3 * best["split"],
                         "split_x_plain": best["plain"] / best["split"],
                         "plain_gb_s": weight_bytes / best["plain"] / 1e9, "split_gb_s": weight_bytes / best["split"] / 1e9})
            append_jsonl(cfg, rows[-1:])
    title = f"weight products of one decode pass, {cfg.device}, {dtype}"
    return report(cfg, rows, title, [("preset", "{}"), ("rows", "{}"), ("threads", "{}"), ("plain_ms", "{:.1f}"),
                                     ("split_ms", "{:.1f}"), ("split_x_plain", "{:.2f}"), ("plain_gb_s", "{:.1f}"),
                                     ("split_gb_s", "{:.1f}")])


def bench_tokens(cfg) -> int:
    """Where the tokens of SFT's oracle episodes go. Only the assistant turns are learned; the
    rest is context the model reads (and, in training, pays a forward and backward pass for)."""
    from sft import SFTConfig, episode_tokens, generate_episodes
    from tokenizer import Tokenizer
    tokenizer = Tokenizer.load(cfg.tokens)
    rows = generate_episodes(cfg.token_episodes, cfg.seed, SFTConfig.failure_rate, True)
    parts = {"system prompt and pool lines": 0, "question": 0, "state messages": 0, "assistant turns (learned)": 0}
    for row in rows:
        messages = row["messages"]
        ids, mask = episode_tokens(tokenizer, messages)
        system = len(tokenizer.encode_chat(messages[:1], add_generation_prompt=False))
        prompt = len(tokenizer.encode_chat(messages[:2]))
        parts["system prompt and pool lines"] += system
        parts["question"] += prompt - system
        parts["assistant turns (learned)"] += sum(mask)
        parts["state messages"] += len(ids) - prompt - sum(mask)
    total = sum(parts.values())
    print(f"{len(rows)} oracle episodes (seed {cfg.seed}, failure rate {SFTConfig.failure_rate}), "
          f"tokenizer of {cfg.tokens}")
    table = [{"part of an episode": k, "tokens, mean": v / len(rows), "share": v / total} for k, v in parts.items()]
    markdown_table(table + [{"part of an episode": "total", "tokens, mean": total / len(rows)}],
                   [("part of an episode", "{}"), ("tokens, mean", "{:.0f}"), ("share", "{:.0%}")])
    return 0


class Timed:
    """A TurnMask whose calls add their seconds to `total[0]`."""

    def __init__(self, turn, total):
        self.turn, self.total = turn, total

    def mask(self, left):
        t = time.perf_counter()
        out = self.turn.mask(left)
        self.total[0] += time.perf_counter() - t
        return out

    def advance(self, token):
        t = time.perf_counter()
        self.turn.advance(token)
        self.total[0] += time.perf_counter() - t


def bench_mask(cfg, dtype) -> int:
    """Seconds per decode step, unmasked and masked, same model, prompt and G, in one run; and
    the mask's own work per step timed directly (its calls, plus stacking G rows and filling
    the logits), which a shared machine's noise hides in the end-to-end ratio."""
    tokenizer = Tokenizer.load(cfg.mask_tokenizer)
    t0 = time.perf_counter()
    mask = ProtocolMask(tokenizer, cfg.device)
    build = time.perf_counter() - t0
    pool = load_pool("seen", world_for_split("train"), random.Random(cfg.seed))
    spec = TurnSpec.fit([c.name for c in pool.callees], [], [], 16, 1000, 8000)
    params = SamplingParams(temperature=1.0, max_new_tokens=cfg.new_tokens)
    rows = []
    for preset in cfg.presets:
        config = M.preset_config(preset, vocab_size=tokenizer.vocab_size)
        model = M.build_model(config, cfg.device, dtype, seed=cfg.seed).eval()
        for P in cfg.prefix_lens:
            prompt = torch.randint(0, config.vocab_size, (P,), device=cfg.device).tolist()
            for G in cfg.branches:
                inside = [0.0]   # seconds spent in the mask's own calls (automaton, mask lookup or build)

                def run(masked, seed):
                    generator = torch.Generator(cfg.device).manual_seed(seed)
                    engine = Engine(model, [prompt], G, cfg.new_tokens + 1)
                    constraints = {b: Timed(mask.start(spec), inside) for b in range(G)} if masked else None
                    sync(cfg.device)
                    t = time.perf_counter()
                    with torch.no_grad():
                        out = engine.generate(params, generator=generator, constraints=constraints)
                    sync(cfg.device)
                    assert all(len(c.token_ids) == cfg.new_tokens for c in out)
                    return (time.perf_counter() - t) / cfg.new_tokens
                mask.clear()
                cold = run(True, cfg.seed)   # compiles the states these turns visit
                best = {False: float("inf"), True: float("inf")}
                inside[0] = 0.0
                for r in range(cfg.repeats):
                    for masked in (False, True):
                        best[masked] = min(best[masked], run(masked, cfg.seed))
                # the engine's share: stacking G rows and filling the logits, timed apart
                rows_ = [mask.mask(0)] * G
                logits = torch.randn(G, config.vocab_size, device=cfg.device)
                sync(cfg.device)
                t = time.perf_counter()
                for _ in range(100):
                    logits.masked_fill(~torch.stack(rows_), float("-inf"))
                sync(cfg.device)
                fill = (time.perf_counter() - t) / 100
                own = inside[0] / (cfg.repeats * cfg.new_tokens) + fill
                row = {"preset": preset, "P": P, "G": G, "step_ms": best[False] * 1e3,
                       "masked_step_ms": best[True] * 1e3, "mask_cost": best[True] / best[False] - 1,
                       "mask_ms": own * 1e3, "mask_share": own / best[False],
                       "cold_step_ms": cold * 1e3, "compiled_states": len(mask.tables), "build_s": build}
                rows.append(row)
                print(f"{preset} P={P} G={G}: {row['step_ms']:.1f} ms/step unmasked, "
                      f"{row['masked_step_ms']:.1f} masked ({100 * row['mask_cost']:+.1f}%); the mask's own work "
                      f"{row['mask_ms']:.2f} ms/step ({100 * row['mask_share']:.1f}% of a step)", file=sys.stderr)
    return report(cfg, rows,
                  f"decode step with and without the protocol mask, {cfg.new_tokens} steps at temperature 1, "
                  f"fastest of {cfg.repeats}; mask built in {build:.1f}s",
                  [("preset", "{}"), ("P", "{}"), ("G", "{}"), ("step_ms", "{:.1f}"),
                   ("masked_step_ms", "{:.1f}"), ("mask_cost", "{:+.3f}"), ("mask_ms", "{:.2f}"),
                   ("mask_share", "{:.3f}"), ("cold_step_ms", "{:.1f}"),
                   ("compiled_states", "{}")])


def bench_append(cfg, dtype) -> int:
    """Appending uneven suffixes (state messages, a local agent's questions) to the branches of
    one prompt: one call as ONE pass padded to the longest (the engine before packing), one call
    packed into passes of similar lengths (pack_by_length), and one call per branch."""
    for preset in cfg.presets:
        config = M.preset_config(preset, **({"vocab_size": cfg.tiny_vocab} if preset == "tiny" else {}))
        model = M.build_model(config, cfg.device, dtype, seed=cfg.seed).eval()
        prompt = torch.randint(0, config.vocab_size, (cfg.prefix_lens[0],)).tolist()
        suffixes = {b: torch.randint(0, config.vocab_size, (n,)).tolist() for b, n in enumerate(cfg.append_lens)}

        def run(how):
            engine = Engine(model, [prompt], len(suffixes), max(cfg.append_lens))
            engine.append_pass_cost = 10**9 if how == "padded" else engine.append_pass_cost
            sync(cfg.device)
            t0 = time.perf_counter()
            for chunk in ([suffixes] if how != "per branch" else [{b: s} for b, s in suffixes.items()]):
                engine.append(chunk)
            sync(cfg.device)
            return time.perf_counter() - t0
        ways = ("padded", "packed", "per branch")
        for how in ways:  # warm-up
            run(how)
        best = {}
        for _ in range(cfg.repeats):  # interleaved, so machine noise hits them alike; fastest kept
            for how in ways:
                best[how] = min(best.get(how, float("inf")), run(how))
        print(f"{preset}, prompt {len(prompt)}, appends {cfg.append_lens}, {cfg.device}, best of {cfg.repeats}: "
              + ", ".join(f"{how} {s * 1000:.0f} ms" for how, s in best.items())
              + f"; packed is {best['padded'] / best['packed']:.2f}x faster than padded")
    return 0


def synthetic_rollouts(cfg, vocab_size, G, generator) -> list:
    """GRPO rollouts of realistic shape: --train-prompts prompts of about --train-prompt-len
    tokens, G episodes each with ragged suffixes, about 70% of suffix tokens generated (the rest
    are state messages), nonzero advantages. Speed does not depend on the values."""
    from grpo import Rollout
    rollouts = []
    for _ in range(cfg.train_prompts):
        P = int(cfg.train_prompt_len * (0.9 + 0.2 * torch.rand(1, generator=generator).item()))
        prompt = torch.randint(1, vocab_size, (P,), generator=generator).tolist()
        for _ in range(G):
            S = max(2, int(cfg.train_suffix_len * (0.5 + torch.rand(1, generator=generator).item())))
            suffix = torch.randint(1, vocab_size, (S,), generator=generator).tolist()
            mask = [0] * (P - 1) + (torch.rand(S, generator=generator) < 0.7).int().tolist()
            rollouts.append(Rollout(prompt + suffix, mask, [-1.0 * m for m in mask], reward=0.0, prompt_len=P,
                                    advantage=torch.randn(1, generator=generator).item()))
    return rollouts


def saved_activation_mb(model, rollouts, config, device) -> float:
    """Bytes autograd keeps for backward at the peak of a step: the largest micro-batch, plus
    (shared) its group's prompt, which stays until the group's last micro-batch is done.
    Measured by hooking every tensor saved for backward (each storage once, no parameter),
    running the same passes train_on runs, forward only."""
    import grpo
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    store = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            store["now"][t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t.detach()   # keeps the storage (no address reuse while counted) without a reference cycle
    passes = (grpo.shared_passes if config.shared_prefix_train else grpo.plain_passes)(
        model, None, rollouts, config.micro_batch_tokens, device)
    prefix, peak = {}, 0
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        while True:
            store["now"] = {}
            item = next(passes, None)       # a new group's prompt runs here
            if item is None:
                return peak / 2**20
            prefix = store["now"] or prefix
            store["now"] = {}
            logp, _ = item[3](model)
            peak = max(peak, sum(prefix.values()) + sum(store["now"].values()))
            del logp


def bench_train(cfg, dtype) -> int:
    """The GRPO training step, plain pass against the shared-prefix pass, interleaved in one
    run (the fastest of --repeats kept): seconds per step, training tokens/s over the episodes'
    full length, activation memory saved for backward, and on CUDA the peak allocated memory."""
    import grpo
    import train
    rows = []
    for preset in cfg.presets:
        overrides = {"vocab_size": cfg.tiny_vocab} if preset == "tiny" else {}
        model = M.build_model(M.preset_config(preset, **overrides), cfg.device, dtype, seed=cfg.seed)
        generator = torch.Generator().manual_seed(cfg.seed)
        for G in cfg.branches:
            rollouts = synthetic_rollouts(cfg, model.config.vocab_size, G, generator)
            tokens = sum(len(r.ids) for r in rollouts)
            configs = {mode: grpo.GRPOConfig(shared_prefix_train=mode == "shared", group=G, device=cfg.device,
                                             micro_batch_tokens=cfg.train_micro_batch_tokens)
                       for mode in ("plain", "shared")}
            optimizer = train.make_optimizer(model, configs["plain"])
            grpo.train_on(model, None, optimizer, rollouts[:2], configs["plain"], 1e-6, cfg.device)  # warm-up
            best = {}
            for _ in range(cfg.repeats):
                for mode, config in configs.items():
                    if cfg.device.startswith("cuda"):
                        torch.cuda.reset_peak_memory_stats()
                    sync(cfg.device)
                    t0 = time.perf_counter()
                    grpo.train_on(model, None, optimizer, rollouts, config, 1e-6, cfg.device)
                    sync(cfg.device)
                    seconds = time.perf_counter() - t0
                    if mode not in best or seconds < best[mode]["seconds"]:
                        best[mode] = {"seconds": seconds}
                        if cfg.device.startswith("cuda"):
                            best[mode]["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
            for mode, config in configs.items():
                row = {"preset": preset, "G": G, "groups": cfg.train_prompts, "episode_tokens": tokens,
                       "micro_batch_tokens": cfg.train_micro_batch_tokens,
                       "mode": mode, **best[mode], "train_tok_s": tokens / best[mode]["seconds"],
                       "saved_mb": saved_activation_mb(model, rollouts, config, cfg.device)}
                rows.append(row)
                print(f"{preset} G={G} {mode}: {row['seconds']:.2f} s/step, {row['train_tok_s']:.0f} tok/s, "
                      f"{row['saved_mb']:.0f} MB saved for backward", file=sys.stderr)
            plain, shared = rows[-2], rows[-1]
            shared["speedup"] = plain["seconds"] / shared["seconds"]
            shared["saved_frac"] = shared["saved_mb"] / plain["saved_mb"]
            append_jsonl(cfg, [plain, shared], device=cfg.device)
        del model
    return report(cfg, rows,
                  f"device {cfg.device}, dtype {dtype}, threads {torch.get_num_threads()}; GRPO training step "
                  f"(forward + backward + AdamW), prompts ~{cfg.train_prompt_len} tokens, suffixes ~{cfg.train_suffix_len}",
                  [("preset", "{}"), ("G", "{}"), ("groups", "{}"), ("episode_tokens", "{}"),
                   ("mode", "{}"), ("seconds", "{:.2f}"), ("train_tok_s", "{:.0f}"), ("saved_mb", "{:.0f}"),
                   ("peak_mb", "{:.0f}"), ("speedup", "{:.2f}"), ("saved_frac", "{:.2f}")])


# SFT settings: sft.py flags over its defaults, every LoRA flag given (the defaults are the
# release recipe, lora-16-top-10). The first is the baseline of the ratios.
SFT_SETTINGS = {
    "freeze-20": dict(lora_rank=0, freeze_layers=20),           # full fine-tuning of the top 10 of 30 layers
    "lora-16": dict(lora_rank=16, lora_alpha=32.0, lora_layers=[]),   # an adapter on every linear of every layer
    "lora-16-top-10": dict(lora_rank=16, lora_alpha=32.0, lora_layers=list(range(20, 30))),
    # the same, each pool draw's system prompt once per micro-batch (sft.py --shared-prefix)
    "freeze-20-shared": dict(lora_rank=0, freeze_layers=20, shared_prefix=True, episodes_per_pool=4),
    "lora-16-top-10-shared": dict(lora_rank=16, lora_alpha=32.0, lora_layers=list(range(20, 30)),
                                  shared_prefix=True, episodes_per_pool=4),
}


def sft_setting(cfg, name: str):
    """(config, model, adapter, optimizer, step batches, examples) of one setting, on its own copy
    of the model (adapters hook into the model they adapt)."""
    import sft
    import train
    import lora
    from tokenizer import Tokenizer
    config = sft.SFTConfig(init=cfg.sft_init, device=cfg.device, batch_tokens=cfg.sft_batch_tokens,
                           micro_batch_tokens=cfg.sft_batch_tokens, episodes=cfg.sft_episodes, seed=cfg.seed,
                           **SFT_SETTINGS[name])
    train.check_lora(config, config.init)
    model = lora.load_any(config.init, device=cfg.device, dtype=torch.float32).train()
    tokenizer = Tokenizer.load(lora.tokenizer_folder(config.init))
    adapter = train.add_adapter(model, config, config.init)
    if adapter is None:
        train.freeze_bottom(model, config.freeze_layers)
    optimizer = train.make_optimizer(adapter or model, config)
    rows = sft.generate_episodes(config.episodes, config.seed, config.failure_rate, config.recovery, config.pool,
                                 config.episodes_per_pool)
    examples = [sft.episode_tokens(tokenizer, r["messages"]) for r in rows]
    lengths = [len(ids) for ids, _ in examples]
    if config.shared_prefix:
        shared = sft.SharedPrompts(tokenizer, rows, examples)
        stream = sft.Stream(lambda e: shared.batches(config.micro_batch_tokens, config.seed, e), shared.size,
                            config.batch_tokens)
    else:
        shared = None
        stream = sft.Stream(lambda e: sft.bucketed_batches(lengths, config.micro_batch_tokens, config.seed, e),
                            lambda b: len(b) * max(lengths[i] for i in b), config.batch_tokens)
    steps = [stream.next_step() for _ in range(cfg.sft_steps)]
    return config, model, adapter, optimizer, steps, examples, (tokenizer.pad_token_id, shared)


def sft_step(config, model, adapter, optimizer, micro, examples, pad, device) -> int:
    """One optimizer step as sft.run takes it (loss summed over learned tokens, divided by their
    count, accumulated over the micro-batches); returns its learned tokens."""
    import sft
    import train
    pad_id, shared = pad
    n_learned = sum(sum(examples[i][1]) for b in micro for i in b)
    for batch in micro:
        with train.autocast(config.precision, device):
            if shared is not None:
                loss = shared.sum_loss(model, batch, pad_id, device) / n_learned
            else:
                ids, mask = sft.collate([examples[i] for i in batch], pad_id, device)
                loss = sft.sum_token_loss(model, ids, mask) / n_learned
        loss.backward()
    train.optimizer_step(adapter or model, optimizer, 1e-6, config.grad_clip)
    return n_learned


def bench_sft(cfg) -> int:
    """Learned tokens per second of an SFT step under each setting, the settings interleaved
    within each repeat (machine noise hits them alike), the fastest repeat kept."""
    try:
        setups = {name: sft_setting(cfg, name) for name in cfg.sft_settings}
    except (OSError, ValueError) as e:
        raise cli.UsageError(f"--sft-init {cfg.sft_init}: {e}") from None
    for name, (config, model, adapter, optimizer, steps, examples, pad) in setups.items():
        # warm-up (thread pools, allocator) on an episode's last 128 tokens: its answer turn is learned
        warm = [(ids[-128:], mask[-128:]) for ids, mask in examples[:1]]
        sft_step(config, model, adapter, optimizer, [[0]], warm, pad, cfg.device)
        trained = sum(p.numel() for p in (adapter or model).parameters() if p.requires_grad)
        print(f"sft {name}: {trained / 1e6:.2f}M trained parameters", file=sys.stderr)
    best = {}
    for _ in range(cfg.repeats):
        for name, (config, model, adapter, optimizer, steps, examples, pad) in setups.items():
            sync(cfg.device)
            t0, cpu0 = time.perf_counter(), time.process_time()
            learned = sum(sft_step(config, model, adapter, optimizer, micro, examples, pad, cfg.device)
                          for micro in steps)
            sync(cfg.device)
            seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
            tokens = sum(len(examples[i][0]) for micro in steps for b in micro for i in b)
            print(f"sft {name}: {seconds:.1f}s ({cpu:.1f} CPU-s), {learned / seconds:.1f} learned tok/s",
                  file=sys.stderr)
            if name not in best or seconds < best[name]["seconds"]:
                best[name] = {"setting": name, "seconds": seconds, "learned_tokens": learned, "tokens": tokens,
                              "learned_tok_s": learned / seconds, "tok_s": tokens / seconds}
            # CPU seconds of this process: on a machine shared with other jobs, less noisy than the wall
            if "cpu_seconds" not in best[name] or cpu < best[name]["cpu_seconds"]:
                best[name] |= {"cpu_seconds": cpu, "learned_tok_cpu_s": learned / cpu}
    rows = list(best.values())
    for row in rows:
        row["x_baseline"] = row["learned_tok_s"] / rows[0]["learned_tok_s"]
        row["x_baseline_cpu"] = row["learned_tok_cpu_s"] / rows[0]["learned_tok_cpu_s"]
        row["flags"] = " ".join(f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                                for k, v in SFT_SETTINGS[row["setting"]].items())
    return report(cfg, rows,
                  f"device {cfg.device}, fp32, threads {torch.get_num_threads()}; SFT step of {cfg.sft_init} "
                  f"({cfg.sft_steps} step(s) of <= {cfg.sft_batch_tokens} tokens, the fastest of {cfg.repeats} repeats)",
                  [("setting", "{}"), ("flags", "{}"), ("tokens", "{}"), ("learned_tokens", "{}"),
                   ("seconds", "{:.2f}"), ("tok_s", "{:.0f}"), ("learned_tok_s", "{:.1f}"),
                   ("x_baseline", "{:.2f}"), ("cpu_seconds", "{:.2f}"), ("learned_tok_cpu_s", "{:.1f}"),
                   ("x_baseline_cpu", "{:.2f}")])


def bench_sft_shared(cfg, checkpoint="checkpoints/smollm2-135m-instruct", freeze=20, step_tokens=4096,
                     episodes=256) -> int:
    """SFT from SmolLM2-135M-Instruct as the README's recipe trains it (fp32 weights, the bottom
    `freeze` of 30 layers frozen, steps of `step_tokens` padded tokens in one micro-batch),
    plain pass against the shared prompt (sft.py --shared-prefix), on the SAME oracle episodes
    drawn K per pool draw, for each K of --sft-shared. Steps are what sft.py runs (its Stream
    and batching, forward + backward + AdamW), the two passes' steps interleaved so machine
    noise hits both alike; --repeats steps each, all timed. Learned tokens/s is
    the orchestrator's tokens (the loss's) over the summed step time; run_per_step the tokens
    the passes ran, padding included (the shared pass runs each prompt once)."""
    import sft
    import train
    from tokenizer import Tokenizer
    cli.check(min(cfg.sft_shared) >= 1, f"--sft-shared must be episode counts of at least 1 (got {cfg.sft_shared})")
    tokenizer = Tokenizer.load(checkpoint)
    model = M.load_model(checkpoint, device=cfg.device, dtype=torch.float32)
    train.freeze_bottom(model, freeze)
    config = sft.SFTConfig(batch_tokens=step_tokens, micro_batch_tokens=step_tokens, seed=cfg.seed)
    optimizer = train.make_optimizer(model, config)
    pad = tokenizer.pad_token_id
    rows = []
    for K in cfg.sft_shared:
        data = sft.generate_episodes(episodes, cfg.seed, config.failure_rate, True, config.pool, K)
        examples = [sft.episode_tokens(tokenizer, r["messages"]) for r in data]
        lengths = [len(ids) for ids, _ in examples]
        shared = sft.SharedPrompts(tokenizer, data, examples)
        passes = {
            "plain": (sft.Stream(lambda e: sft.bucketed_batches(lengths, step_tokens, cfg.seed, e),
                                 lambda b: len(b) * max(lengths[i] for i in b), step_tokens),
                      lambda b: sft.sum_token_loss(model, *sft.collate([examples[i] for i in b], pad, cfg.device))),
            "shared": (sft.Stream(lambda e: shared.batches(step_tokens, cfg.seed, e), shared.size, step_tokens),
                       lambda b: shared.sum_loss(model, b, pad, cfg.device))}
        totals = {mode: dict.fromkeys(("seconds", "learned", "tokens", "padded", "episodes", "prompts"), 0)
                  for mode in passes}
        for _, loss_of in passes.values():   # warm-up: first calls pay for thread pools and allocator growth
            loss_of([0]).backward()
            model.zero_grad(set_to_none=True)
        for _ in range(cfg.repeats):
            for mode, (stream, loss_of) in passes.items():
                micro = stream.next_step()
                learned = sum(sum(examples[i][1]) for b in micro for i in b)
                sync(cfg.device)
                t0 = time.perf_counter()
                for b in micro:
                    (loss_of(b) / learned).backward()
                train.optimizer_step(model, optimizer, 1e-6, config.grad_clip)
                sync(cfg.device)
                t = totals[mode]
                t["seconds"] += time.perf_counter() - t0
                t["learned"] += learned
                t["tokens"] += sum(lengths[i] for b in micro for i in b)
                t["padded"] += sum(stream.size(b) for b in micro)
                t["episodes"] += sum(len(b) for b in micro)
                t["prompts"] += sum(len({shared.prefix_of[i] for i in b}) for b in micro)
        for mode, t in totals.items():
            steps = cfg.repeats
            row = {"K": K, "mode": mode, "steps": steps, "s_per_step": t["seconds"] / steps,
                   "episodes_per_step": t["episodes"] / steps, "prompts_per_step": t["prompts"] / steps,
                   "learned_per_step": t["learned"] / steps, "run_per_step": t["padded"] / steps,
                   "learned_tok_s": t["learned"] / t["seconds"], "episode_tok_s": t["tokens"] / t["seconds"]}
            rows.append(row)
            print(f"K={K} {mode}: {row['learned_tok_s']:.1f} learned tok/s, {row['s_per_step']:.1f} s/step",
                  file=sys.stderr)
        rows[-1]["x_plain"] = rows[-1]["learned_tok_s"] / rows[-2]["learned_tok_s"]
        append_jsonl(cfg, rows[-2:], device=cfg.device)
    return report(cfg, rows,
                  f"device {cfg.device}, fp32, threads {torch.get_num_threads()}; SmolLM2-135M SFT step, {freeze} of 30 "
                  f"layers frozen, {step_tokens} padded tokens a step; K = episodes per pool draw (same episodes both ways)",
                  [("K", "{}"), ("mode", "{}"), ("steps", "{}"), ("s_per_step", "{:.1f}"),
                   ("episodes_per_step", "{:.1f}"), ("prompts_per_step", "{:.1f}"),
                   ("learned_per_step", "{:.0f}"), ("run_per_step", "{:.0f}"),
                   ("episode_tok_s", "{:.0f}"), ("learned_tok_s", "{:.1f}"), ("x_plain", "{:.2f}")])


def add_ratios(rows):
    """shared/copied and shared/hf ratios of the same case, measured in this run."""
    by_case = {(r["preset"], r["P"], r["G"], r["mode"]): r for r in rows}
    for r in rows:
        if r["mode"] != "shared":
            continue
        for other in ("copied", "hf"):
            o = by_case.get((r["preset"], r["P"], r["G"], other))
            if o:
                r[f"e2e_x_{other}"] = r["e2e_tok_s"] / o["e2e_tok_s"]
                r[f"decode_x_{other}"] = r["decode_tok_s"] / o["decode_tok_s"]
                r[f"kv_frac_{other}"] = r["kv_mb"] / o["kv_mb"]
                if "prefix_kv_mb" in o:
                    r[f"prefix_kv_frac_{other}"] = r["prefix_kv_mb"] / o["prefix_kv_mb"]


def print_table(rows, limits, device):
    print(f"device {device}; measured read bandwidth {limits['read_bandwidth_gb_s']} GB/s, "
          f"matmul {limits['matmul_gflop_s']} GFLOP/s")
    cols = [("preset", "{}"), ("P", "{}"), ("G", "{}"), ("mode", "{}"), ("e2e_tok_s", "{:.1f}"),
            ("decode_tok_s", "{:.1f}"), ("kv_mb", "{:.1f}"), ("peak_mb", "{:.0f}"), ("floor_frac", "{:.2f}"),
            ("e2e_x_hf", "{:.2f}"), ("decode_x_hf", "{:.2f}"), ("e2e_x_copied", "{:.2f}"),
            ("decode_x_copied", "{:.2f}"), ("kv_frac_copied", "{:.3f}"), ("prefix_kv_frac_copied", "{:.3f}")]
    markdown_table(rows, cols)


def append_jsonl(cfg, rows: list[dict], **extra) -> None:
    """With --jsonl, append each row (after the `extra` keys) as one JSON line, as soon as it is
    measured, so a long benchmark killed midway keeps what it measured."""
    if cfg.jsonl:
        with open(cfg.jsonl, "a") as f:
            for row in rows:
                f.write(json.dumps({**extra, **row}) + "\n")


def report(cfg, rows: list[dict], title: str, cols: list[tuple[str, str]]) -> int:
    """A benchmark's rows: JSON with --json, else its title line and a Markdown table."""
    if cfg.json:
        print(json.dumps({"device": cfg.device, "rows": rows}, indent=1))
    else:
        print(title)
        markdown_table(rows, cols)
    return 0


def markdown_table(rows: list[dict], cols: list[tuple[str, str]]) -> None:
    """Rows as a Markdown table: the (key, format) columns any row has, blank where one lacks it."""
    cols = [(k, f) for k, f in cols if any(k in r for r in rows)]
    print("| " + " | ".join(k for k, _ in cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f.format(r[k]) if k in r else "" for k, f in cols) + " |")


if __name__ == "__main__":
    sys.exit(main())
