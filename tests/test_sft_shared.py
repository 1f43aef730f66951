"""SFT's shared-prompt pass (sft.shared_sum_token_loss) against the plain pass, each episode run
alone in full with plain causal attention: logits, loss and every parameter's gradient, with
branches packed end to end in a row, several prompts in one micro-batch, GQA, and frozen
layers. Also the shared batching: every episode once per epoch, within budget, seeded."""
import pytest
import torch
import torch.nn.functional as F

import model as M
import train
from policy import prefix_kv, suffix_hidden
from sft import (collate, episode_tokens, generate_episodes, pack_rows, shared_batches, shared_layout, shared_size,
                 shared_sum_token_loss, split_prompt, sum_token_loss)
from tokenizer import Tokenizer, train_tokenizer


def _model(vocab, layers=2, kv_heads=2):
    config = M.ModelConfig(vocab_size=vocab, hidden_size=48, intermediate_size=96, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=4096)
    return M.init_weights(M.Transformer(config), seed=3, std=0.3)


def _rel(x, ref):
    return ((x - ref).norm() / ref.norm().clamp(min=1e-12)).item()


@pytest.fixture(scope="module")
def episodes():
    """Oracle episodes on two pool draws (3 and 2 episodes) plus one alone, tokenized with a
    small BPE: [(prompt, rest, rest mask, full ids, full mask)]."""
    rows = (generate_episodes(3, seed=5, failure_rate=0.3, recovery=True, per_pool=3)
            + generate_episodes(2, seed=6, failure_rate=0.3, recovery=True, per_pool=2)
            + generate_episodes(1, seed=7, failure_rate=0.3, recovery=True, per_pool=1))
    tokenizer = train_tokenizer([Tokenizer.render_turns(r["messages"]) for r in rows], vocab_size=1000)
    out = []
    for r in rows:
        ids, mask = episode_tokens(tokenizer, r["messages"])
        prompt, rest, rest_mask = split_prompt(tokenizer, ids, mask, r["messages"][0])
        out.append((prompt, rest, rest_mask, ids, mask))
    assert len({tuple(e[0]) for e in out}) == 3
    return tokenizer, out


def _groups(eps):
    groups: dict[tuple, list] = {}
    for prompt, rest, rest_mask, _, _ in eps:
        groups.setdefault(tuple(prompt), []).append((rest, rest_mask))
    return [(list(p), members) for p, members in groups.items()]


def _loss_and_grads(model, loss):
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


@pytest.mark.parametrize("freeze", [0, 2])
def test_shared_loss_and_every_gradient_equal_the_plain_pass(episodes, freeze):
    tokenizer, eps = episodes
    model = _model(tokenizer.vocab_size, layers=3)
    train.freeze_bottom(model, freeze)
    # reference: each episode alone, in full, plain causal attention
    plain = sum(sum_token_loss(model, *collate([(ids, mask)], 0, "cpu")) for *_, ids, mask in eps)
    ref_loss, ref_grads = _loss_and_grads(model, plain)
    groups = _groups(eps)
    prefix_of = [g for g, (_, members) in enumerate(groups) for _ in members]
    layout, _ = shared_layout(list(range(len(eps))), prefix_of, [len(rest) for _, rest, *_ in eps])
    assert max(len(row) for _, rows in layout for row in rows) > 1       # some row packs two episodes
    loss, grads = _loss_and_grads(model, shared_sum_token_loss(model, groups, tokenizer.pad_token_id, "cpu"))
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(grads) == set(ref_grads) == trainable      # frozen layers get no gradient either way
    if freeze:
        assert not any(n.startswith(("model.embed_tokens", "model.layers.0.", "model.layers.1.")) for n in trainable)
    for name in trainable:
        assert _rel(grads[name], ref_grads[name]) < 1e-5, name


def test_packed_branches_give_each_branch_its_own_logits():
    """Rows of branches packed end to end (suffix_hidden's `starts`), two prompts of different
    lengths, GQA: every branch's logits equal the plain model's on prompt + branch alone."""
    g = torch.Generator().manual_seed(0)
    model = _model(64, kv_heads=1)
    prompts = [torch.randint(1, 64, (n,), generator=g).tolist() for n in (9, 23)]
    rows = [[5, 11, 2], [17], [3, 8]]               # branch lengths per row
    group_of = [0, 0, 1]
    suffixes, starts, branches = [], [], []
    for lens, p in zip(rows, group_of):
        row, start = [], []
        for n in lens:
            start.append(len(row))
            branch = torch.randint(1, 64, (n,), generator=g).tolist()
            branches.append((p, len(row), branch))
            row += branch
        suffixes.append(row)
        starts.append(start)
    kv, lengths = prefix_kv(model, prompts)
    # blocks of 4 queries: a block's keys start at its earliest branch (suffix_hidden's saving)
    logits = F.linear(suffix_hidden(model, kv, lengths, suffixes, group_of, 0, starts, query_block=4),
                      model.output_weight())
    row_of = [r for r, lens in enumerate(rows) for _ in lens]
    for r, (p, at, branch) in zip(row_of, branches):
        ref = model(torch.tensor([prompts[p] + branch]))[0, len(prompts[p]):]
        assert _rel(logits[r, at:at + len(branch)], ref) < 1e-5


def test_a_learned_token_cannot_open_a_packed_branch():
    model = _model(64)
    with pytest.raises(AssertionError, match="opens"):
        shared_sum_token_loss(model, [([1, 2, 3], [([4, 5], [1, 0])])], 0, "cpu")


def test_pack_rows_by_hand():
    assert pack_rows([5, 2, 7, 3, 1], 7) == [[2], [0, 1], [3, 4]]
    rows = pack_rows([4, 4, 4, 4], 9)
    assert rows == [[0, 1], [2, 3]]


def test_shared_batches_cover_every_episode_within_budget_and_seeded():
    g = torch.Generator().manual_seed(1)
    prefix_of = [i // 6 for i in range(60)] + list(range(10, 20))     # pools of 6, then 10 alone
    prefix_lens = torch.randint(300, 460, (20,), generator=g).tolist()
    suffix_lens = torch.randint(120, 1300, (70,), generator=g).tolist()
    budget = 4096
    batches = shared_batches(prefix_of, prefix_lens, suffix_lens, budget, seed=0, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(70))
    assert all(shared_size(b, prefix_of, prefix_lens, suffix_lens) <= budget for b in batches)
    assert batches == shared_batches(prefix_of, prefix_lens, suffix_lens, budget, 0, 0)
    assert batches != shared_batches(prefix_of, prefix_lens, suffix_lens, budget, 0, 1)
    # each prompt's episodes sit together, in neighbouring micro-batches
    for p in range(10):
        where = sorted({k for k, b in enumerate(batches) for i in b if prefix_of[i] == p})
        assert where == list(range(where[0], where[-1] + 1))
    # the size is the prompts once each (padded to the longest) plus rows as long as the longest rest
    b = [0, 1, 2, 60]
    width = max(suffix_lens[i] for i in b)
    rows = len(pack_rows([suffix_lens[i] for i in b[:3]], width)) + 1
    assert shared_size(b, prefix_of, prefix_lens, suffix_lens) == 2 * max(prefix_lens[0], prefix_lens[10]) + rows * width
