"""The policy: model + tokenizer + chat format, a generation engine whose branches share their
prompt's KV cache, and the log-probs training needs.

The engine (`Engine`) is built for this project's hot path: G branches continuing one prompt
(GRPO's group of samples; a local agent's parallel subtasks under one system prompt).

- ONE copy of each prompt's KV (the "prefix", [groups, kv_heads, P, D] per layer) and a
  per-branch "suffix" KV for everything after it ([branches, kv_heads, S, D]). Both are
  allocated once, zero-filled, when the engine starts (static shapes, as in gpt-fast).
- Decode attention is split: the queries of all branches of a group are folded into one query
  axis per kv head and attend to the prefix as one matrix-matrix product; each branch attends
  to its own suffix; the two partial results are merged exactly by their log-sum-exp
  (prefix_attn/: torch on CPU, Triton on CUDA). `share_prefix=False` copies the prefix KV into
  every branch instead (what most engines do), kept as the benchmark's baseline.
- Prefill (the prompts, once per group) and one-token decode are separate passes; appending
  several tokens to a branch (an environment's state message, a forced continuation) is a
  chunked prefill into that branch's suffix that still shares the original prefix.
- A token is sampled from the logits that predict it, then fed to the model only if its
  branch goes on: a stop token costs no forward pass, finished branches cost nothing, and
  the stop token waits ("unfed") until the branch is continued by `append`.
- Per-token log-probs are recorded at temperature 1 (the model's distribution), the quantity
  RL's importance ratio needs; `token_logprobs` computes the same by teacher forcing.
- Cache rows are not branch ids: the branches of a pass are first swapped into the cache's
  first rows (and their prompts into the prefix cache's first rows), so every pass reads both
  caches as slices. A swap copies two rows once when the set of active branches changes (a
  branch stops, a turn starts), where an index read would copy every active row in every layer
  of every step. Cache contents past a row's length are stale, never seen: masked (torch) or
  never loaded (Triton).
- `play_batch` drives whole episodes (anything with messages / step / done, such as env.Episode)
  on one engine: episodes that open identically share one prefix group, all decode together.
"""
import time
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F

import lora
import prefix_attn
from model import Transformer, linear, plain_causal_attention
from protocol_mask import ProtocolMask
from tokenizer import Tokenizer


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    max_new_tokens: int = 256  # per `generate` call, per branch
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()  # needs the engine's `decode`


@dataclass
class Completion:
    """What one branch generated in one `generate` call."""
    branch: int
    token_ids: list[int]
    logprobs: list[float]
    stop_reason: str  # "stop_token" | "stop_string" | "length"


@dataclass
class _Turn:
    """A branch's turn being decoded: its token limit, its mask, what it generated so far."""
    limit: int
    constraint: object = None
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    mask_ids: list[int] = field(default_factory=list)


@dataclass
class PassPlan:
    """Index plan of one engine pass over new suffix tokens, shared by all layers."""
    positions: torch.Tensor       # [A, T] absolute positions (prefix length + suffix slot)
    write: tuple                  # index of the new tokens' K/V in a layer's suffix cache
    write_is_head_major: bool     # True: `write` is slices, the cache view is [A, Hkv, T, D]
    read: tuple                   # the rows' suffix K/V in use after the write (slices)
    start: torch.Tensor           # [A] int32 suffix slot of each row's first new token
    T: int                        # new tokens per row (padded)
    R: int                        # rows of the fullest group
    n_groups: int                 # prompt groups of these rows: prefix cache rows 0..n_groups-1
    group_idx: torch.Tensor       # [A] prefix cache row of each row's group
    slot_in_group: torch.Tensor | None  # [A] rank in its group; None when folding is a reshape
    prefix_len: torch.Tensor      # [n_groups] int32


def sample_tokens(logits, temperature: float, top_p: float, generator=None):
    """Greedy (temperature 0) or temperature + nucleus sampling. logits [A, V] -> ids [A]."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest set of top tokens whose mass reaches top_p (always the first).
        drop = sorted_probs.cumsum(-1) - sorted_probs > top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class Engine:
    """Generation for a batch of prompts ("prefix groups"), each continued by several branches.

    Branch ids run group by group: with prompts [a, b] and branches 2, branches 0-1 continue a
    and 2-3 continue b. `tokens[i]` holds everything after the prompt in branch i (generated and
    appended), `logprobs[i]` the log-prob of each generated token (None for appended ones).
    """

    def __init__(self, model: Transformer, prompts: list[list[int]], branches: int | list[int] = 1,
                 max_suffix_len: int = 512, share_prefix: bool = True, decode=None,
                 max_rows: int | None = None, max_prompt_len: int | None = None):
        """`max_rows` rows of suffix cache (and of prefix cache) and `max_prompt_len` prompt
        slots (defaults: what `prompts` and `branches` need) leave room for prompts that `add`
        brings in later, in the rows `release` frees."""
        c = model.config
        if isinstance(branches, int):
            branches = [branches] * len(prompts)
        self.max_prompt_len = max([max_prompt_len or 0] + [len(p) for p in prompts])
        if self.max_prompt_len + max_suffix_len > c.max_position_embeddings:
            raise ValueError(f"prompt + max_suffix_len = {self.max_prompt_len + max_suffix_len} tokens > "
                             f"max_position_embeddings {c.max_position_embeddings}")
        self.model, self.decode, self.share_prefix = model, decode, share_prefix
        self.device = model.model.embed_tokens.weight.device
        self.dtype = model.model.embed_tokens.weight.dtype
        self.n_kv_heads, self.head_dim = c.num_key_value_heads, c.head_size
        self.q_per_kv = c.num_attention_heads // c.num_key_value_heads
        self.scale = self.head_dim ** -0.5
        self.max_suffix_len = max_suffix_len
        # `append`'s fixed cost of one pass, in tokens, against padding (see pack_by_length);
        # a huge value gives one pass padded to the longest append (the benchmark's baseline).
        self.append_pass_cost = 32
        self.prefill_seconds = 0.0
        # Per branch (ids in the order `add` made them; a released branch keeps its history):
        self.tokens: list[list[int]] = []
        self.logprobs: list[list[float | None]] = []
        self.unfed: list[list[int]] = []  # sampled, not yet in the KV cache
        self.mask_ids: list[list[int]] = []  # per token: the mask it was sampled under (-1: none, or appended)
        self.turns: dict[int, _Turn] = {}  # the branches being decoded (begin ... step)
        long = dict(dtype=torch.long, device=self.device)
        self.suffix_len, self.group_of, self.row_of = (torch.zeros(0, **long) for _ in range(3))
        self.next_logits = torch.zeros(0, c.vocab_size, device=self.device)  # predict each branch's next token
        # Per prompt group: its prompt length and prefix cache row (-1 once released).
        self.prefix_len, self.prefix_row_of = torch.zeros(0, **long), torch.zeros(0, **long)
        rows = max(max_rows or 0, sum(branches))
        prefix_rows = max(max_rows or 0, len(prompts) if share_prefix else rows)
        # One slot past max_suffix_len takes the K/V of padding tokens, so they never land on
        # a real token's slot; no real query reaches it.
        suffix = (c.num_hidden_layers, rows, self.n_kv_heads, max_suffix_len + 1, self.head_dim)
        prefix = (c.num_hidden_layers, prefix_rows, self.n_kv_heads, self.max_prompt_len, self.head_dim)
        self.suffix_k, self.suffix_v = (torch.zeros(suffix, device=self.device, dtype=self.dtype) for _ in range(2))
        self.prefix_k, self.prefix_v = (torch.zeros(prefix, device=self.device, dtype=self.dtype) for _ in range(2))
        self.branch_at = torch.full((rows,), -1, **long)  # suffix cache row -> branch (-1: free)
        self.group_at = torch.full((prefix_rows,), -1, **long)  # prefix cache row -> group (-1: free)
        self.add(prompts, branches)

    @property
    def num_branches(self) -> int:
        return len(self.tokens)

    def kv_cache_bytes(self) -> tuple[int, int]:
        """Bytes allocated for the (prefix, suffix) KV caches."""
        def size(*tensors):
            return sum(t.numel() * t.element_size() for t in tensors)
        return size(self.prefix_k, self.prefix_v), size(self.suffix_k, self.suffix_v)

    def add(self, prompts: list[list[int]], branches: int | list[int] = 1) -> list[int]:
        """Prefill new prompts into free rows and open `branches` branches on each: returns
        their branch ids, group by group. `share_prefix=False` (the benchmark's baseline) gives
        every branch a copy of its prompt's KV instead."""
        if isinstance(branches, int):
            branches = [branches] * len(prompts)
        assert len(branches) == len(prompts) and all(b >= 1 for b in branches), branches
        assert all(1 <= len(p) <= self.max_prompt_len for p in prompts), \
            f"every prompt needs 1 to max_prompt_len={self.max_prompt_len} tokens"
        n, g0, b0 = sum(branches), len(self.prefix_len), self.num_branches
        local = torch.tensor([g for g, b in enumerate(branches) for _ in range(b)], device=self.device)
        copies = local if not self.share_prefix else torch.arange(len(prompts), device=self.device)
        rows = torch.nonzero(self.branch_at < 0).squeeze(1)[:n]
        prows = torch.nonzero(self.group_at < 0).squeeze(1)[:len(copies)]
        if len(rows) < n or len(prows) < len(copies):
            raise RuntimeError(f"no room for {n} more branches: release finished ones first")
        if self.share_prefix:
            logits = self._prefill(prompts, prows)
        else:  # the baseline layout: each branch's own copy of its prompt's KV
            first = torch.searchsorted(local, torch.arange(len(prompts), device=self.device))  # a prompt's first branch
            logits = self._prefill(prompts, prows[first])
            for cache in (self.prefix_k, self.prefix_v):
                cache[:, prows] = cache[:, prows[first[local]]]
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)[copies]
        self.group_at[prows] = g0 + torch.arange(len(copies), device=self.device)
        self.prefix_len = torch.cat([self.prefix_len, lengths])
        self.prefix_row_of = torch.cat([self.prefix_row_of, prows])
        self.branch_at[rows] = b0 + torch.arange(n, device=self.device)
        self.row_of = torch.cat([self.row_of, rows])
        own_group = local if self.share_prefix else torch.arange(n, device=self.device)
        self.group_of = torch.cat([self.group_of, g0 + own_group])
        self.suffix_len = torch.cat([self.suffix_len, torch.zeros(n, dtype=torch.long, device=self.device)])
        self.next_logits = torch.cat([self.next_logits, logits[local]])  # each branch's prompt's last logits
        for history in (self.tokens, self.logprobs, self.unfed, self.mask_ids):
            history.extend([] for _ in range(n))
        return list(range(b0, b0 + n))

    def free_rows(self) -> int:
        """Suffix cache rows that `add` can give to new branches."""
        return int((self.branch_at < 0).sum())

    def release(self, branches) -> None:
        """Free the cache rows of finished branches (their token histories stay), and of a
        prompt group once all of its branches are released."""
        branches = torch.tensor(sorted(branches), dtype=torch.long, device=self.device)
        assert not set(branches.tolist()) & set(self.turns), "a branch in a turn cannot be released"
        assert bool((self.row_of[branches] >= 0).all()), "a branch is released twice"
        self.branch_at[self.row_of[branches]] = -1
        self.row_of[branches] = -1
        for g in torch.unique(self.group_of[branches]).tolist():
            if bool((self.row_of[self.group_of == g] < 0).all()):
                self.group_at[self.prefix_row_of[g]] = -1
                self.prefix_row_of[g] = -1

    # -- prefill ---------------------------------------------------------------------------------

    @torch.no_grad()
    def _prefill(self, prompts, rows):
        """The prompts' KV into prefix cache `rows`; returns the logits after each prompt."""
        t0 = time.perf_counter()
        NG, P = len(prompts), max(len(p) for p in prompts)
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        ids = torch.zeros(NG, P, dtype=torch.long, device=self.device)
        for g, p in enumerate(prompts):  # right padding: causal attention keeps it invisible
            ids[g, : len(p)] = torch.tensor(p)

        def attention(layer, q, k, v):
            self.prefix_k[layer, rows, :, :P] = k.transpose(1, 2)
            self.prefix_v[layer, rows, :, :P] = v.transpose(1, 2)
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  is_causal=True, enable_gqa=self.q_per_kv > 1).transpose(1, 2)

        hidden = self.model.hidden_states(ids, attention=attention)
        last = hidden[torch.arange(NG, device=self.device), lengths - 1]
        logits = linear(last, self.model.output_weight()).float()
        if self.device.type == "cuda":
            torch.cuda.synchronize()  # so prefill_seconds is the prefill's, not its launch's
        self.prefill_seconds += time.perf_counter() - t0
        return logits

    # -- one forward pass over new suffix tokens ---------------------------------------------------

    @torch.no_grad()
    def _forward_suffix(self, rows: torch.Tensor, ids: torch.Tensor, n_real: torch.Tensor):
        """Feed ids [A, T] (right-padded; n_real[a] real tokens) to branches `rows` [A].

        Writes their K/V into the suffix cache and returns the logits at each row's last real
        token [A, V]. T = 1 is a decode step; T > 1 a chunk appended to each row's suffix.
        """
        assert bool((self.row_of[rows] >= 0).all()), "a released branch has no cache rows"
        self._to_front(rows, self.row_of, self.branch_at, self.suffix_k, self.suffix_v, self.suffix_len)
        groups = torch.unique(self.group_of[rows])
        self._to_front(groups, self.prefix_row_of, self.group_at, self.prefix_k, self.prefix_v, self.prefix_len)
        # The pass runs in cache-row order: `rows` now hold rows 0..A-1, so each one's cache row is
        # also its place in the pass.
        place = self.row_of[rows]
        order = torch.argsort(place)
        plan = self._plan(rows[order], n_real[order], ids.shape[1])
        hidden = self.model.hidden_states(ids[order], plan.positions, partial(self._attend, plan))
        last = hidden[torch.arange(len(rows), device=self.device), n_real[order] - 1]
        self.suffix_len[rows] += n_real
        return linear(last, self.model.output_weight()).float()[place]

    @staticmethod
    def _to_front(items, row_of, item_at, k, v, lengths):
        """Swap cache rows so that `items` (unique branches, or prompt groups) hold rows
        0..len(items)-1 of k and v [layers, rows, Hkv, slots, D]. `row_of` (item -> row) and
        `item_at` (row -> item, -1: free) are updated; only the slots in use (`lengths`, per
        item) are copied."""
        A = len(items)
        rows = row_of[items]
        incoming = items[rows >= A]
        if not len(incoming):
            return
        taken = torch.zeros(A, dtype=torch.bool, device=row_of.device)
        taken[rows[rows < A]] = True
        free = torch.nonzero(~taken).squeeze(1)  # front rows that are free or hold items not in this pass
        src, leaving = row_of[incoming], item_at[free]
        used = int(torch.cat([lengths[incoming], lengths[leaving[leaving >= 0]]]).max())
        for cache in (k, v):
            a, b = cache[:, src, :, :used], cache[:, free, :, :used]  # index reads: copies
            cache[:, free, :, :used] = a
            cache[:, src, :, :used] = b
        row_of[incoming], item_at[free] = free, incoming
        row_of[leaving[leaving >= 0]] = src[leaving >= 0]
        item_at[src] = leaving

    def _decode(self, rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The decode step: one new token [A, 1] for each of `rows` (its own name, so that a
        profile tells decode steps from appended chunks: bench.py --play)."""
        return self._forward_suffix(rows, ids, torch.ones_like(rows))

    def _plan(self, rows, n_real, T) -> PassPlan:
        """Where one pass writes and reads the caches and how it folds queries: computed once,
        used by every layer. `rows` hold cache rows 0..A-1 in order, and their prompt groups
        prefix cache rows 0..NG-1 (`_to_front`)."""
        A = len(rows)
        start = self.suffix_len[rows]  # suffix slot of each row's first new token
        used = int((start + n_real).max())  # suffix slots any row can see after this pass
        assert used <= self.max_suffix_len, "callers check the room first"
        offsets = torch.arange(T, device=self.device)
        group = self.group_of[rows]
        lockstep = bool((start == start[0]).all() & (n_real == T).all())
        if lockstep:  # the usual GRPO decode step: one strided copy per cache
            s0 = int(start[0])
            write = (slice(0, A), slice(None), slice(s0, s0 + T))
        else:  # padding tokens go to the spare slot past max_suffix_len
            slots = torch.where(offsets < n_real[:, None], start[:, None] + offsets, self.max_suffix_len)
            write = (torch.arange(A, device=self.device)[:, None], slice(None), slots)
        # a row's group, as its prefix cache row: 0..NG-1, so folding pairs with a slice of it
        group_idx = self.prefix_row_of[group]
        counts = torch.bincount(group_idx)
        NG, R = len(counts), int(counts.max())
        prefix_len = torch.zeros(NG, dtype=torch.int32, device=self.device)
        prefix_len[group_idx] = self.prefix_len[group].to(torch.int32)
        slot_in_group = None  # None: every group has R rows, in order, so folding is a reshape
        if not (bool((group_idx[1:] >= group_idx[:-1]).all()) and A == NG * R):
            order = torch.argsort(group_idx, stable=True)
            slot_in_group = torch.empty_like(group_idx)
            slot_in_group[order] = torch.arange(A, device=self.device) - (torch.cumsum(counts, 0) - counts)[group_idx[order]]
        return PassPlan(
            positions=self.prefix_len[group][:, None] + start[:, None] + offsets,
            write=write, write_is_head_major=lockstep,
            read=(slice(0, A), slice(None), slice(0, used)),
            start=start.to(torch.int32), T=T, R=R, n_groups=NG, group_idx=group_idx,
            slot_in_group=slot_in_group, prefix_len=prefix_len)

    def _attend(self, plan: PassPlan, layer: int, q, k, v):
        """The model's attention for new suffix tokens: q [A, T, Hq, D]; k, v [A, T, Hkv, D]."""
        A, T, NG, R = q.shape[0], plan.T, plan.n_groups, plan.R
        H, rep, D = self.n_kv_heads, self.q_per_kv, self.head_dim
        self.suffix_k[layer][plan.write] = k.transpose(1, 2) if plan.write_is_head_major else k
        self.suffix_v[layer][plan.write] = v.transpose(1, 2) if plan.write_is_head_major else v
        # Prefix part: [NG, Hkv, R*T*rep, D] queries against one copy of each prompt's KV.
        if plan.slot_in_group is None:
            folded = q.view(NG, R, T, H, rep, D).permute(0, 3, 1, 2, 4, 5)
        else:
            folded = q.new_zeros(NG, R, H, T, rep, D)
            folded[plan.group_idx, plan.slot_in_group] = q.view(A, T, H, rep, D).permute(0, 2, 1, 3, 4)
            folded = folded.permute(0, 2, 1, 3, 4, 5)
        pk, pv = self.prefix_k[layer][:NG], self.prefix_v[layer][:NG]
        out1, lse1 = prefix_attn.prefix_attention(folded.reshape(NG, H, R * T * rep, D), pk, pv,
                                              plan.prefix_len, self.scale)
        out1 = out1.view(NG, H, R, T, rep, D).permute(0, 2, 1, 4, 3, 5)  # unfold: [NG, R, H, rep, T, D]
        lse1 = lse1.view(NG, H, R, T, rep).permute(0, 2, 1, 4, 3)
        if plan.slot_in_group is not None:
            out1, lse1 = out1[plan.group_idx, plan.slot_in_group], lse1[plan.group_idx, plan.slot_in_group]
        # Suffix part (only the slots in use), merged into the prefix part by log-sum-exp.
        out, _ = prefix_attn.suffix_merge_attention(
            q.transpose(1, 2), self.suffix_k[layer][plan.read], self.suffix_v[layer][plan.read],
            plan.start, self.scale, out1.reshape(A, H * rep, T, D).contiguous(),
            lse1.reshape(A, H * rep, T).contiguous())
        return out.transpose(1, 2)

    # -- public API ------------------------------------------------------------------------------

    def room(self, branch: int) -> int:
        """Tokens this branch's suffix can still take (its pending stop token already counted)."""
        return self.max_suffix_len - int(self.suffix_len[branch]) - len(self.unfed[branch])

    def append(self, branch_tokens: dict[int, list[int]]) -> None:
        """Continue chosen branches with given tokens (e.g. a state message).

        A branch's pending stop token is fed first, so its suffix holds its full history.
        Uneven lengths run as a few passes of similar lengths (`pack_by_length`), not one pass
        padded to the longest.
        """
        over = {b: len(t) for b, t in branch_tokens.items() if len(t) > self.room(b)}
        if over:  # checked before any pass, so a refused append changes nothing
            raise RuntimeError(f"appending {over} (branch: tokens) would exceed max_suffix_len="
                               f"{self.max_suffix_len}; room: {[self.room(b) for b in over]}")
        items = [(b, self.unfed[b] + list(t)) for b, t in branch_tokens.items() if self.unfed[b] or t]
        for chunk in pack_by_length([len(t) for _, t in items], self.append_pass_cost):
            chunk = sorted(chunk, key=lambda i: items[i][0])  # branch order keeps the cheap fold
            T = max(len(items[i][1]) for i in chunk)
            ids = torch.zeros(len(chunk), T, dtype=torch.long, device=self.device)
            for row, i in enumerate(chunk):
                ids[row, : len(items[i][1])] = torch.tensor(items[i][1])
            rows = torch.tensor([items[i][0] for i in chunk], device=self.device)
            n_real = torch.tensor([len(items[i][1]) for i in chunk], device=self.device)
            self.next_logits[rows] = self._forward_suffix(rows, ids, n_real)
        for b, t in branch_tokens.items():
            self.tokens[b] += list(t)
            self.logprobs[b] += [None] * len(t)
            self.mask_ids[b] += [-1] * len(t)
            self.unfed[b] = []

    def begin(self, params: SamplingParams, branches, max_new_tokens: dict[int, int] | None = None,
              constraints: dict | None = None) -> list[Completion]:
        """Start a turn on these branches: each `step` then decodes one token for every branch
        in a turn, until that branch hits a stop condition. Returns the turns that end at once
        (no room left, or a limit of 0).

        `max_new_tokens` overrides `params.max_new_tokens` for the branches it names.
        `constraints` maps a branch to an object with `mask(left) -> (mask id, bool [V])` and
        `advance(token)` (protocol_mask.TurnMask): each step samples among the tokens its mask
        allows, and the recorded log-prob is over those tokens (the distribution that sampled).
        """
        if params.stop_strings and self.decode is None:
            raise ValueError("stop_strings need the engine's `decode` function")
        busy = [b for b in branches if b in self.turns]
        assert not busy, f"branches {busy} are already in a turn"
        # A branch also stops where its suffix room ends: every token it generates has a slot
        # (the last one is fed only when the branch goes on), so the engine stays consistent.
        limit = {b: min((max_new_tokens or {}).get(b, params.max_new_tokens), self.room(b)) for b in branches}
        self.append({b: [] for b in branches if self.unfed[b] and limit[b] > 0})  # a stopped branch goes on
        for b in branches:
            self.turns[b] = _Turn(limit[b], (constraints or {}).get(b))
        return [self._end_turn(b, "length") for b in branches if limit[b] <= 0]

    def step(self, params: SamplingParams, generator=None) -> list[Completion]:
        """One token for every branch in a turn: sampled from the logits that predict it, then
        fed (one decode pass for all of them) unless its turn ends. Returns the ended turns."""
        active = sorted(self.turns)
        if not active:
            return []
        rows = torch.tensor(active, dtype=torch.long, device=self.device)
        logits = self.next_logits[rows]
        mask_ids = [-1] * len(active)
        if any(self.turns[b].constraint is not None for b in active):
            allowed = []
            for k, b in enumerate(active):
                turn = self.turns[b]
                if turn.constraint is not None:
                    mask_ids[k], row = turn.constraint.mask(turn.limit - len(turn.tokens))
                    allowed.append(row)
                else:
                    allowed.append(torch.ones(logits.shape[-1], dtype=torch.bool, device=self.device))
            logits = logits.masked_fill(~torch.stack(allowed), float("-inf"))
        token = sample_tokens(logits, params.temperature, params.top_p, generator)
        logprob = torch.log_softmax(logits, -1).gather(-1, token[:, None]).squeeze(-1)
        is_stop = torch.isin(token, torch.tensor(sorted(params.stop_token_ids), dtype=torch.long, device=self.device))
        tail = max((len(s.encode()) for s in params.stop_strings), default=0)  # >= 1 byte per token
        ended, keep = [], []
        for b, t, lp, stop, mid in zip(active, token.tolist(), logprob.tolist(), is_stop.tolist(), mask_ids):
            turn = self.turns[b]
            turn.tokens.append(t)
            turn.logprobs.append(lp)
            turn.mask_ids.append(mid)
            if turn.constraint is not None:
                turn.constraint.advance(t)
            reason = None
            if stop:
                reason = "stop_token"
            elif tail and any(s in self.decode(turn.tokens[-tail:]) for s in params.stop_strings):
                reason = "stop_string"
            elif len(turn.tokens) >= turn.limit:
                reason = "length"
            if reason is None:
                keep.append(b)
            else:
                self.unfed[b] = [t]
                ended.append(self._end_turn(b, reason))
        if keep:
            rows = torch.tensor(keep, dtype=torch.long, device=self.device)
            ids = torch.tensor([self.turns[b].tokens[-1] for b in keep], device=self.device)[:, None]
            self.next_logits[rows] = self._decode(rows, ids)
        return ended

    def _end_turn(self, b: int, reason: str) -> Completion:
        turn = self.turns.pop(b)
        self.tokens[b] += turn.tokens
        self.logprobs[b] += turn.logprobs
        self.mask_ids[b] += turn.mask_ids
        return Completion(b, turn.tokens, turn.logprobs, reason)

    def generate(self, params: SamplingParams, branches=None, generator=None,
                 max_new_tokens: dict[int, int] | None = None, constraints: dict | None = None) -> list[Completion]:
        """Decode the given branches (default: all) until each hits a stop condition: `begin`,
        then `step` until every turn ended. Completions come in the order of `branches`."""
        branches = list(range(self.num_branches)) if branches is None else list(branches)
        ended = {c.branch: c for c in self.begin(params, branches, max_new_tokens, constraints)}
        while self.turns:
            ended.update((c.branch, c) for c in self.step(params, generator))
        return [ended[b] for b in branches]


def pack_by_length(lengths: list[int], pass_cost: int = 32) -> list[list[int]]:
    """Split items into passes that each pad to their own longest item: sorted by length, cut
    where padded tokens + `pass_cost` (a pass's fixed cost, in tokens) summed over passes is
    least (exact, by dynamic programming over the cut points). Returns lists of item indices."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    best, cut = [0] + [float("inf")] * len(order), [0] * (len(order) + 1)
    for j in range(1, len(order) + 1):  # best[j]: cost of the j shortest items
        for i in range(j):  # the last pass holds sorted items i..j-1, padded to item j-1
            cost = best[i] + pass_cost + (j - i) * lengths[order[j - 1]]
            if cost < best[j]:
                best[j], cut[j] = cost, i
    passes, j = [], len(order)
    while j:
        passes.append(order[cut[j]:j])
        j = cut[j]
    return passes[::-1]


def token_logprobs(model: Transformer, input_ids: torch.Tensor) -> torch.Tensor:
    """Teacher-forced log-prob of each next token: input_ids [B, T] -> [B, T-1] (with grad).

    Right-padded rows are fine (causal attention); mask the padding and prompt in the loss.
    """
    logits = model(input_ids[:, :-1]).float()
    return torch.log_softmax(logits, -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)


def shared_prefix_logits(model: Transformer, prefixes: list[list[int]], suffixes: list[list[int]],
                         group_of: list[int], pad_id: int = 0) -> torch.Tensor:
    """Training forward for groups of sequences that share a prompt: logits [N, T, vocab] of
    the suffix tokens (right-padded to T), equal to running `model(prefix + suffix)` on each row.

    Each prompt runs ONCE through the model, with grad (`prefix_kv`); its per-layer K/V stay in
    the autograd graph. The suffix rows then run as one batch attending to it (`suffix_logits`:
    one fused, differentiable SDPA call per layer on every device). Autograd sums every row's
    gradient into its prompt's computation. Rows must be sorted by group (`group_of`
    non-decreasing).
    """
    kv, lengths = prefix_kv(model, prefixes, pad_id)
    return suffix_logits(model, kv, lengths, suffixes, group_of, pad_id)


def prefix_kv(model: Transformer, prefixes: list[list[int]], pad_id: int = 0):
    """Run each prompt once (right-padded into one batch): the per-layer K/V [groups, Hkv, P, D]
    that suffix rows attend to, in the autograd graph when grad is on, and the prompt lengths."""
    device = model.output_weight().device
    assert all(prefixes), "empty prefix"
    lengths = torch.tensor([len(p) for p in prefixes], device=device)
    prefix_ids = torch.full((len(prefixes), int(lengths.max())), pad_id, dtype=torch.long, device=device)
    for g, p in enumerate(prefixes):
        prefix_ids[g, :len(p)] = torch.tensor(p)
    kv = []

    def record(layer_idx, q, k, v):
        kv.append((k.transpose(1, 2), v.transpose(1, 2)))
        return plain_causal_attention(layer_idx, q, k, v)
    model.hidden_states(prefix_ids, attention=record)
    return kv, lengths


def suffix_logits(model: Transformer, kv, lengths: torch.Tensor, suffixes: list[list[int]],
                  group_of: list[int], pad_id: int = 0) -> torch.Tensor:
    """Logits [N, T, vocab] of suffix rows (right-padded to T) continuing the prompts whose K/V
    `prefix_kv` returned (suffix_hidden, then the output layer)."""
    return F.linear(suffix_hidden(model, kv, lengths, suffixes, group_of, pad_id), model.output_weight())


def suffix_hidden(model: Transformer, kv, lengths: torch.Tensor, suffixes: list[list[int]],
                  group_of: list[int], pad_id: int = 0, starts: list[list[int]] | None = None,
                  query_block: int = 256) -> torch.Tensor:
    """Final-norm hidden states [N, T, hidden] of suffix rows (right-padded to T) continuing the
    prompts whose K/V `prefix_kv` returned. Each row's queries attend to its prompt's K/V and
    causally to its own tokens, in ONE fused SDPA call per layer over [prompt K/V gathered per
    row ; row K/V] with a visibility mask (per block of `query_block` queries). The prompt's
    projections and MLPs ran once; only its
    K/V (a few MB) is gathered per row for the attention op, and autograd sums the rows'
    gradients back into it.
    `starts[n]` packs several branches of one prompt end to end into row n: the offsets where
    each begins (default [0], one branch). A branch sees the prompt and its own tokens only, and
    its positions restart at the prompt's length, so each equals its own row; packing short
    branches into one row saves the padding a row per branch would need (sft.py).
    Why not the engine's fold-and-merge ops (prefix_attn.reference): on CPU their unfused softmax
    backward ate most of the saving (bench.py --train at G=8: 1.17x over the plain pass with
    them in the first version; 1.95x with this and length-sorted micro-batches). `kv` may be
    detached leaves: a caller that runs a group's suffixes in several chunks then
    back-propagates the prompt once (grpo.shared_passes)."""
    device = model.output_weight().device
    assert len(suffixes) == len(group_of) and list(group_of) == sorted(group_of), "rows sorted by group"
    assert all(suffixes), "empty suffix"
    starts = starts or [[0]] * len(suffixes)
    assert all(s[0] == 0 and s == sorted(set(s)) and s[-1] < len(x) for s, x in zip(starts, suffixes)), "bad starts"
    T = max(len(s) for s in suffixes)
    suffix_ids = torch.full((len(suffixes), T), pad_id, dtype=torch.long, device=device)
    branch = torch.zeros(len(suffixes), T, dtype=torch.long)       # which branch of its row a token is
    offset = torch.zeros(len(suffixes), T, dtype=torch.long)       # its position within that branch
    for n, (s, st) in enumerate(zip(suffixes, starts)):
        suffix_ids[n, :len(s)] = torch.tensor(s)
        branch[n, st[1:]] = 1
        branch[n] = branch[n].cumsum(0)
        offset[n] = torch.arange(T) - torch.tensor(st)[branch[n]]
    branch, offset = branch.to(device), offset.to(device)
    rows = torch.tensor(group_of, device=device)
    positions = lengths[rows][:, None] + offset
    P = kv[0][0].shape[2]
    # which keys a query may see: its prompt's real tokens, then its own branch causally
    prompt_keys = (torch.arange(P, device=device)[None, :] < lengths[rows][:, None])[:, None, None, :]
    own = torch.ones(T, T, dtype=torch.bool, device=device).tril()[None] & (branch[:, :, None] == branch[:, None, :])
    # Queries in blocks, each given only the row keys from the earliest branch start among its
    # queries to its last query: the fused kernel skips nothing under an explicit mask, and a
    # long packed row would otherwise pay for every key of every other branch.
    spans, masks = [], []
    branch_start = torch.arange(T, device=device)[None, :] - offset
    for q0 in range(0, T, query_block):
        q1 = min(T, q0 + query_block)
        k0 = int(branch_start[:, q0].min())
        spans.append((q0, q1, k0))
        masks.append(torch.cat([prompt_keys.expand(-1, -1, q1 - q0, -1), own[:, None, q0:q1, k0:q1]], dim=3))

    def split(layer_idx, q, k, v):
        kp, vp = kv[layer_idx]
        kp, vp = kp[rows], vp[rows]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        out = [F.scaled_dot_product_attention(q[:, :, q0:q1], torch.cat([kp, k[:, :, k0:q1]], dim=2),
                                              torch.cat([vp, v[:, :, k0:q1]], dim=2), attn_mask=mask,
                                              enable_gqa=q.shape[1] != k.shape[1])
               for (q0, q1, k0), mask in zip(spans, masks)]
        return torch.cat(out, dim=2).transpose(1, 2)
    return model.hidden_states(suffix_ids, positions, attention=split)


class Policy:
    """A chat model: checkpoint weights + tokenizer + ChatML, with the engine behind it."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self._protocol_mask = None

    @property
    def protocol_mask(self) -> ProtocolMask:
        """The protocol automaton compiled against this tokenizer (built on first use, a few
        seconds for a 49k vocabulary; its caches live as long as the policy)."""
        if self._protocol_mask is None:
            self._protocol_mask = ProtocolMask(self.tokenizer, self.model.output_weight().device,
                                               vocab_size=self.model.config.vocab_size)
        return self._protocol_mask

    @classmethod
    def load(cls, path, device="cpu", dtype=None) -> "Policy":
        """A checkpoint folder, or a LoRA adapter folder merged into its base (lora.load_any)."""
        return cls(lora.load_any(path, device=device, dtype=dtype), Tokenizer.load(lora.tokenizer_folder(path)))

    def engine(self, prompts: list[list[int]], branches: int | list[int] = 1, max_suffix_len: int = 512,
               max_rows: int | None = None, max_prompt_len: int = 0) -> Engine:
        """An engine over these token prompts, its suffix room capped by the model's context."""
        longest = max([max_prompt_len] + [len(p) for p in prompts])
        room = self.model.config.max_position_embeddings - longest
        if room < 2:
            raise ValueError(f"prompt of {longest} tokens fills the model's context")
        return Engine(self.model, prompts, branches, min(max_suffix_len, room), decode=self.tokenizer.decode,
                      max_rows=max_rows, max_prompt_len=longest)

    def chat_params(self, temperature=0.0, top_p=1.0, max_new_tokens=256) -> SamplingParams:
        """Sampling that ends an assistant turn at the chat's end-of-turn token(s)."""
        return SamplingParams(temperature, top_p, max_new_tokens, tuple(self.tokenizer.eos_token_ids))

    def reply_text(self, completion: Completion) -> str:
        ids = completion.token_ids
        if completion.stop_reason == "stop_token":
            ids = ids[:-1]
        return self.tokenizer.decode(ids)

    def next_turn_tokens(self, new: str | list[dict]) -> list[int]:
        """What follows a finished assistant turn (whose end token is pending): the new user
        message(s), then the opening of the next assistant turn."""
        messages = [{"role": "user", "content": new}] if isinstance(new, str) else new
        return self.tokenizer.encode("\n" + self.tokenizer.render_turns(messages))

    def answer_batch(self, system_prompt: str, tasks: list[str], max_new_tokens: int = 64) -> list[str]:
        """Greedy replies to several user messages under one system prompt, as parallel
        branches of one shared prefix (the local LLM agent's round of subtasks)."""
        tok = self.tokenizer
        prefix = tok.encode(tok.render_chat([{"role": "system", "content": system_prompt}], False))
        questions = [tok.encode(tok.render_turns([{"role": "user", "content": t}])) for t in tasks]
        engine = self.engine([prefix], len(tasks), max(map(len, questions)) + max_new_tokens + 1)
        engine.append(dict(enumerate(questions)))
        return [self.reply_text(c) for c in engine.generate(self.chat_params(0.0, max_new_tokens=max_new_tokens))]

    def chat(self, conversations: list[list[dict]], n: int = 1, params: SamplingParams | None = None,
             generator=None) -> list[list[str]]:
        """One assistant reply per branch: n replies for each conversation."""
        params = params or self.chat_params()
        prompts = [self.tokenizer.encode_chat(m) for m in conversations]
        done = self.engine(prompts, n, params.max_new_tokens + 1).generate(params, generator=generator)
        texts = [self.reply_text(c) for c in done]
        return [texts[i * n: (i + 1) * n] for i in range(len(conversations))]


def play_batch(policy: Policy, episodes: list, params: SamplingParams, max_suffix_len: int = 2048,
               generator=None, min_turn_room: int = 32, on_turn=None, mask: bool = True,
               max_rows: int | None = None) -> tuple[Engine, list[int]]:
    """Drive several episodes to the end at once, one engine branch per episode.

    An episode is anything with `messages` (the conversation so far), `step(text, n_tokens)`
    (returns the next user message, or None when it is over) and `done` — env.Episode, without
    this module knowing env. Episodes whose opening messages are identical (a GRPO group: G
    samples of one task and pool) become branches of ONE prefix group, so their prompt's KV is
    computed and stored once. All playing episodes decode in the same steps; an episode whose
    turn ends gets its state message appended to its own branch and starts its next turn at the
    next step, without waiting for the others' turns to end. With `max_rows`, at most that many
    episodes play at once: the groups wait in order, and a group starts as soon as finished
    episodes free enough rows (so the batch stays full until the queue is empty).

    An episode that outgrows its branch's room (`max_suffix_len` tokens after the prompt) ends
    as truncated, through its `truncate(reason)` if it has one (else it is only left unplayed):
    when a turn is cut by the room's end (that turn is not played), or when its state message
    would not leave the next turn `min_turn_room` tokens. `on_turn(turns, playing, new_tokens)`,
    if given, is called whenever turns end (progress reports): turns ended so far, episodes not
    finished (queued ones included), tokens of the turns that just ended.

    With `mask` (the default), an episode that has `turn_spec()` (env.Episode) decodes each turn
    under the protocol mask (protocol_mask.py): every turn it samples is one the environment
    parses without a PARSE_ERR, and it ends within the turn's token limit.

    Returns the engine and each episode's branch: `engine.tokens[b]` is that episode's whole
    token history after its prompt, `engine.logprobs[b]` the log-probs of the generated tokens
    (None for the appended state messages: the mask RL training needs), `engine.mask_ids[b]`
    the protocol mask each token was sampled under (-1: none).
    """
    groups: dict[tuple, list[int]] = {}
    for i, episode in enumerate(episodes):
        key = tuple(policy.tokenizer.encode_chat(episode.messages))
        groups.setdefault(key, []).append(i)
    queue = list(groups.items())
    rows = max(max_rows or len(episodes), max(len(members) for members in groups.values()))
    first = []
    while queue and sum(len(m) for _, m in first) + len(queue[0][1]) <= rows:
        first.append(queue.pop(0))
    engine = policy.engine([list(key) for key, _ in first], [len(m) for _, m in first], max_suffix_len,
                           max_rows=rows if queue else None, max_prompt_len=max(len(key) for key in groups))
    episode_at = [i for _, members in first for i in members]  # branch b plays episodes[episode_at[b]]
    min_turn_room = min(min_turn_room, params.max_new_tokens)
    unfinished = len(episodes)

    def truncate(episode, reason):
        if hasattr(episode, "truncate"):
            episode.truncate(reason)

    def begin(branches, over):
        """Free the rows of the episodes `over`, admit the waiting groups that now fit, and
        start the next turn of `branches` and of the admitted episodes."""
        nonlocal unfinished
        while True:
            over = over + [b for b in branches if episodes[episode_at[b]].done]  # over before they began
            branches = [b for b in branches if not episodes[episode_at[b]].done]
            unfinished -= len(over)
            if over:
                engine.release(over)
            over = []
            if not (queue and len(queue[0][1]) <= engine.free_rows()):
                break
            key, members = queue.pop(0)  # the next waiting group fits in the free rows
            new = engine.add([list(key)], [len(members)])
            episode_at.extend(members)
            branches = branches + new
        constraints = None
        if mask:
            constraints = {b: policy.protocol_mask.start(episodes[episode_at[b]].turn_spec()) for b in branches
                           if hasattr(episodes[episode_at[b]], "turn_spec")}
        return engine.begin(params, branches, constraints=constraints)

    ended = begin(list(range(len(episode_at))), [])
    turns = 0
    while ended or engine.turns:
        ended = ended or engine.step(params, generator)
        states, over = {}, []
        for c in ended:
            episode = episodes[episode_at[c.branch]]
            if c.stop_reason == "length" and len(c.token_ids) < params.max_new_tokens:
                truncate(episode, f"turn cut at the end of the engine's room ({engine.max_suffix_len} tokens)")
                over.append(c.branch)
                continue
            state = episode.step(policy.reply_text(c), n_tokens=len(c.token_ids))
            if state is None:
                over.append(c.branch)
                continue
            end = [] if c.stop_reason == "stop_token" else [policy.tokenizer.im_end_id]
            tokens = end + policy.next_turn_tokens(state)
            if len(tokens) + min_turn_room > engine.room(c.branch):
                truncate(episode, f"no room left for the next turn ({engine.max_suffix_len} tokens)")
                over.append(c.branch)
            else:
                states[c.branch] = tokens
        turns += len(ended)
        if on_turn is not None and ended:
            on_turn(turns, unfinished - len(over), sum(len(c.token_ids) for c in ended))
        engine.append(states)
        ended = begin(list(states), over)
    branch_of = [0] * len(episodes)
    for b, i in enumerate(episode_at):
        branch_of[i] = b
    return engine, branch_of
