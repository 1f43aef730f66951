"""The shared-prefix engine against one-branch-at-a-time decoding with plain attention.

Reference decoding recomputes the whole sequence with the model's plain causal attention at
every step (no cache at all), so it shares none of the engine's cache or kernel code.
"""
import pytest
import torch

import model as M
from policy import Engine, SamplingParams, pack_by_length, sample_tokens, token_logprobs

VOCAB = 64
# On a GPU machine the engine also runs on CUDA (Triton kernels, fp32) against the same reference.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module", params=DEVICES)
def tiny(request):
    config = M.ModelConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    # A large init std makes the logits peaked, so greedy argmaxes are far from ties.
    return M.init_weights(M.Transformer(config), seed=0, std=0.3).to(request.param).eval()


def device_of(model):
    return model.model.embed_tokens.weight.device


def greedy_alone(model, ids, n):
    ids = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(n):
            t = int(model(torch.tensor([ids], device=device_of(model)))[0, -1].argmax())
            out.append(t)
            ids.append(t)
    return out


PROMPTS = [[1, 5, 9, 13, 2, 7, 30, 31, 40], [3, 4, 60, 22, 11]]  # ragged prefix lengths
FORCED = [[10], [11, 12, 13], [14, 15], [20, 21, 22, 23], [24], [25, 26]]  # ragged suffixes
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=6)


@pytest.mark.parametrize("share_prefix", [True, False])
def test_greedy_branches_match_decoding_each_branch_alone(tiny, share_prefix):
    engine = Engine(tiny, PROMPTS, branches=3, max_suffix_len=64, share_prefix=share_prefix)
    engine.append({b: FORCED[b] for b in range(6)})
    first = engine.generate(GREEDY)
    # Multi-turn: a different "state message" for some branches, then decode again.
    state = {0: [50, 51], 2: [52], 4: [53, 54, 55, 56], 5: [57]}
    engine.append(state)
    second = engine.generate(GREEDY, branches=list(state))
    for b in range(6):
        prompt = PROMPTS[b // 3]
        history = prompt + FORCED[b]
        assert first[b].token_ids == greedy_alone(tiny, history, 6), f"branch {b}, turn 1"
        if b in state:
            history = history + first[b].token_ids + state[b]
            assert second[list(state).index(b)].token_ids == greedy_alone(tiny, history, 6), f"branch {b}, turn 2"


def test_scattered_rows_match_each_branch_alone(tiny):
    """Evaluation's shape: many prompts of one or two branches, only some of them decoding or
    appending in a pass (the rest between turns or done)."""
    prompts = [PROMPTS[0], PROMPTS[1], [8, 9, 10], [33, 34, 35, 36, 37, 38], [44, 45, 46, 47]]
    branches = [1, 2, 1, 2, 1]
    prompt_of = [g for g, n in enumerate(branches) for _ in range(n)]
    engine = Engine(tiny, prompts, branches=branches, max_suffix_len=64)
    history = {b: list(prompts[g]) for b, g in enumerate(prompt_of)}
    for turn, rows in enumerate([[0, 2, 3, 4, 5, 6], [1, 5], [0, 6], [3], [2, 3, 4, 6]]):
        state = {b: [(5 * b + turn + i) % VOCAB for i in range(1 + (b + turn) % 3)] for b in rows}
        engine.append(state)
        out = engine.generate(GREEDY, branches=rows)
        for b, completion in zip(rows, out):
            history[b] += state[b]
            assert completion.token_ids == greedy_alone(tiny, history[b], 6), f"branch {b}, turn {turn}"
            history[b] += completion.token_ids


@pytest.mark.parametrize("share_prefix", [True, False])
def test_cache_rows_swapped_under_random_active_sets_match_each_branch_alone(tiny, share_prefix):
    """Every pass moves its branches to the caches' first rows (and their prompts to the prefix
    cache's): random subsets, turn after turn, against decoding each branch alone."""
    prompts = [PROMPTS[0], PROMPTS[1], [8, 9, 10], [33, 34, 35, 36, 37, 38]]
    branches = [3, 1, 2, 2]
    prompt_of = [g for g, n in enumerate(branches) for _ in range(n)]
    engine = Engine(tiny, prompts, branches=branches, max_suffix_len=200, share_prefix=share_prefix)
    history = {b: list(prompts[g]) for b, g in enumerate(prompt_of)}
    rng = torch.Generator().manual_seed(3)
    for turn in range(8):
        rows = sorted(torch.randperm(8, generator=rng)[: 1 + turn % 5].tolist())
        state = {b: torch.randint(0, VOCAB, (1 + (b * turn) % 4,), generator=rng).tolist() for b in rows}
        engine.append(state)
        limits = {b: 1 + (b + turn) % 5 for b in rows}  # branches stop at different steps
        out = engine.generate(GREEDY, branches=rows, max_new_tokens=limits)
        for b, completion in zip(rows, out):
            history[b] += state[b]
            assert completion.token_ids == greedy_alone(tiny, history[b], limits[b]), f"branch {b}, turn {turn}"
            history[b] += completion.token_ids
    assert sorted(engine.row_of.tolist()) == list(range(8))


def test_released_rows_take_new_prompts(tiny):
    """`release` frees a finished branch's rows (and its prompt's, once all its branches are
    released); `add` prefills a new prompt there. The others go on undisturbed."""
    engine = Engine(tiny, [PROMPTS[0], PROMPTS[1]], branches=[2, 1], max_suffix_len=32, max_rows=3)
    first = engine.generate(GREEDY)
    with pytest.raises(RuntimeError, match="no room"):
        engine.add([[8, 9, 10]])
    engine.release([2])  # PROMPTS[1]'s only branch: its prefix row is free too
    new_prompt = [33, 34, 35, 36, 37, 38, 39, 40, 41, 42]  # longer than any prompt the engine began with
    with pytest.raises(AssertionError, match="max_prompt_len"):
        engine.add([new_prompt])
    assert engine.add([new_prompt[:9]]) == [3]
    engine.release([0])  # PROMPTS[0] keeps its prefix row: branch 1 still uses it
    assert engine.free_rows() == 1 and int((engine.group_at < 0).sum()) == 1
    second = engine.generate(GREEDY, branches=[1, 3])
    assert first[2].token_ids == greedy_alone(tiny, PROMPTS[1], 6)
    assert second[0].token_ids == greedy_alone(tiny, PROMPTS[0] + first[1].token_ids, 6)
    assert second[1].token_ids == greedy_alone(tiny, new_prompt[:9], 6)
    assert engine.tokens[0] == first[0].token_ids  # a released branch keeps its history
    with pytest.raises(AssertionError, match="released"):
        engine.append({0: [5]})


def test_first_token_comes_from_the_shared_prompt(tiny):
    engine = Engine(tiny, PROMPTS, branches=[2, 1], max_suffix_len=16)
    out = engine.generate(SamplingParams(temperature=0.0, max_new_tokens=5))
    for b, g in [(0, 0), (1, 0), (2, 1)]:
        assert out[b].token_ids == greedy_alone(tiny, PROMPTS[g], 5)


def test_generation_logprobs_match_teacher_forcing(tiny):
    engine = Engine(tiny, PROMPTS, branches=2, max_suffix_len=32)
    gen = torch.Generator(device_of(tiny)).manual_seed(0)
    out = engine.generate(SamplingParams(temperature=1.0, max_new_tokens=8), generator=gen)
    for c in out:
        ids = torch.tensor([PROMPTS[c.branch // 2] + c.token_ids], device=device_of(tiny))
        with torch.no_grad():
            ref = token_logprobs(tiny, ids)[0, -len(c.token_ids):]
        assert torch.allclose(torch.tensor(c.logprobs), ref.cpu(), atol=1e-4), c.branch


def test_sampling_is_reproducible_with_a_seed(tiny):
    def run(seed):
        engine = Engine(tiny, PROMPTS, branches=4, max_suffix_len=32)
        gen = torch.Generator(device_of(tiny)).manual_seed(seed)
        return [c.token_ids for c in engine.generate(SamplingParams(1.0, 0.9, 10), generator=gen)]
    assert run(7) == run(7)
    assert run(7) != run(8)
    assert len({tuple(t) for t in run(7)}) > 1, "branches of one prompt should differ when sampling"


def test_stop_tokens_strings_and_lengths(tiny):
    engine = Engine(tiny, [PROMPTS[0]], branches=1, max_suffix_len=32, decode=lambda ids: " ".join(map(str, ids)))
    reference = greedy_alone(tiny, PROMPTS[0], 8)
    stop = reference[3]
    out = engine.generate(SamplingParams(0.0, 1.0, 8, stop_token_ids=(stop,)))[0]
    assert out.token_ids == reference[: reference.index(stop) + 1] and out.stop_reason == "stop_token"
    # The stop token is pending: continuing the branch feeds it first, then the appended tokens.
    engine.append({0: [9]})
    assert engine.tokens[0] == out.token_ids + [9]
    cont = engine.generate(SamplingParams(0.0, 1.0, 3))[0]
    assert cont.token_ids == greedy_alone(tiny, PROMPTS[0] + out.token_ids + [9], 3) and cont.stop_reason == "length"
    engine2 = Engine(tiny, [PROMPTS[0]], 1, 32, decode=lambda ids: " ".join(map(str, ids)))
    target = f"{reference[1]} {reference[2]}"
    out2 = engine2.generate(SamplingParams(0.0, 1.0, 8, stop_strings=(target,)))[0]
    assert out2.stop_reason == "stop_string" and out2.token_ids == reference[:3]


def test_per_branch_length_limits(tiny):
    engine = Engine(tiny, PROMPTS, branches=2, max_suffix_len=16)
    out = engine.generate(SamplingParams(0.0, 1.0, 5), max_new_tokens={0: 2, 3: 7})
    assert [len(c.token_ids) for c in out] == [2, 5, 5, 7]
    assert out[3].token_ids == greedy_alone(tiny, PROMPTS[1], 7)


def test_finished_branches_cost_nothing(tiny, monkeypatch):
    engine = Engine(tiny, [PROMPTS[0]], branches=1, max_suffix_len=32)
    reference = greedy_alone(tiny, PROMPTS[0], 4)
    calls = []
    original = engine._forward_suffix
    monkeypatch.setattr(engine, "_forward_suffix", lambda rows, ids, n: calls.append(rows.tolist()) or original(rows, ids, n))
    engine.generate(SamplingParams(0.0, 1.0, 10, stop_token_ids=(reference[1],)))
    assert calls == [[0]], "one forward pass: the stop token is never fed"


def test_suffix_overflow_is_a_clear_error(tiny):
    engine = Engine(tiny, [PROMPTS[0]], branches=2, max_suffix_len=4)
    with pytest.raises(RuntimeError, match="max_suffix_len"):
        engine.append({0: [1, 2], 1: [1, 2, 3, 4, 5]})
    assert engine.tokens == [[], []] and engine.suffix_len.tolist() == [0, 0], "a refused append changes nothing"


def test_generate_stops_at_the_end_of_the_room(tiny):
    # Branch 0 has 6 - 4 = 2 slots left, branch 1 has 5: both stop there, by length, no error.
    engine = Engine(tiny, PROMPTS, branches=1, max_suffix_len=6)
    engine.append({0: [10, 11, 12, 13], 1: [14]})
    out = engine.generate(SamplingParams(0.0, 1.0, 20))
    histories = [PROMPTS[0] + [10, 11, 12, 13], PROMPTS[1] + [14]]
    for b, (c, history) in enumerate(zip(out, histories)):
        assert c.token_ids == greedy_alone(tiny, history, [2, 5][b]) and c.stop_reason == "length"
        assert engine.tokens[b] == history[len(PROMPTS[b]):] + c.token_ids
        assert int(engine.suffix_len[b]) + len(engine.unfed[b]) == len(engine.tokens[b]) == 6
        assert engine.room(b) == 0
    again = engine.generate(SamplingParams(0.0, 1.0, 20))  # a full branch gives nothing, cleanly
    assert [(c.token_ids, c.stop_reason) for c in again] == [([], "length")] * 2
    # Room freed: a fresh engine given the same history predicts exactly what the full one did.
    for b in range(2):
        fresh = Engine(tiny, [PROMPTS[b]], branches=1, max_suffix_len=32)
        fresh.append({0: engine.tokens[b][:-1]})  # the last token is the pending (unfed) one
        assert torch.allclose(fresh.next_logits[0], engine.next_logits[b], atol=1e-4)
        fresh.append({0: engine.tokens[b][-1:]})
        more = fresh.generate(SamplingParams(0.0, 1.0, 4))[0].token_ids
        assert more == greedy_alone(tiny, PROMPTS[b] + engine.tokens[b], 4)


def test_max_new_tokens_zero_gives_no_token(tiny):
    engine = Engine(tiny, PROMPTS, branches=1, max_suffix_len=16)
    out = engine.generate(SamplingParams(0.0, 1.0, 0))
    assert [(c.token_ids, c.stop_reason) for c in out] == [([], "length")] * 2
    assert engine.tokens == [[], []] and engine.suffix_len.tolist() == [0, 0]
    out = engine.generate(SamplingParams(0.0, 1.0, 3), max_new_tokens={0: 0})
    assert out[0].token_ids == [] and out[1].token_ids == greedy_alone(tiny, PROMPTS[1], 3)


def test_uneven_appends_match_each_branch_alone(tiny, monkeypatch):
    lengths = [1, 40, 3, 25, 2, 38]  # very uneven: several passes, each padded to its own longest
    forced = {b: [(7 * b + 3 * i) % VOCAB for i in range(n)] for b, n in enumerate(lengths)}
    engine = Engine(tiny, PROMPTS, branches=3, max_suffix_len=64)
    passes = []
    original = engine._forward_suffix
    monkeypatch.setattr(engine, "_forward_suffix", lambda rows, ids, n: passes.append(ids.shape) or original(rows, ids, n))
    engine.append(forced)
    assert 1 < len(passes) < 6 and sum(r * t for r, t in passes) < len(lengths) * max(lengths)
    out = engine.generate(GREEDY)
    for b in range(6):
        assert out[b].token_ids == greedy_alone(tiny, PROMPTS[b // 3] + forced[b], 6), f"branch {b}"


def test_pack_by_length_is_the_cheapest_split():
    import itertools

    def cost(passes, lengths, pass_cost):
        return sum(pass_cost + len(p) * max(lengths[i] for i in p) for p in passes)

    for lengths in ([5, 20, 60, 120, 250, 364], [7, 7, 8, 9], [1], [300, 2, 290, 3, 150, 149, 1], []):
        passes = pack_by_length(lengths, 32)
        assert sorted(i for p in passes for i in p) == list(range(len(lengths)))
        # Reference: every split of the sorted items into runs of neighbours (2^(n-1) of them).
        order = sorted(range(len(lengths)), key=lengths.__getitem__)
        best = min((cost([order[a:b] for a, b in zip((0,) + cuts, cuts + (len(order),))], lengths, 32)
                    for k in range(len(order)) for cuts in itertools.combinations(range(1, len(order)), k)),
                   default=0)
        assert cost(passes, lengths, 32) == best, lengths
    assert len(pack_by_length([7, 7, 8, 9], 32)) == 1  # even lengths stay one pass


def test_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    seen = {int(sample_tokens(logits, 1.0, 0.7, gen)) for _ in range(300)}
    assert seen == {0, 1}  # 0.5 + 0.3 reaches 0.7: the tail is never sampled
    assert {int(sample_tokens(logits, 1.0, 0.01, gen)) for _ in range(50)} == {0}
