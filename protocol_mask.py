"""Protocol-constrained decoding: at each step, a token mask that allows only what env.py's
parser accepts without a PARSE_ERR.

    spec = TurnSpec.fit(names=("kb", "calc"), ids=(), ok_ids=(), max_calls=16,
                        max_task_chars=1000, max_turn_chars=8000)
    mask = ProtocolMask(tokenizer)               # once per tokenizer: its tokens as bytes, a trie
    turn = mask.start(spec)                      # one per branch and turn
    mask_id, allowed = turn.mask(left)           # allowed: bool [vocab]; left: tokens this turn may still take
    turn.advance(token)

Design choices, and why:
- One small character-level (byte-level) automaton of a canonical turn, `TurnGrammar.step`:
      gap [<think>free</think> gap] ((<call id="N" to="NAME">task</call> gap)+ | <answer>text</answer> gap)
  A gap is at most MAX_GAP spaces or newlines, so there is no text outside the tags. N is the
  next id (one more than any id of the episode), NAME one of the pool's names. Free text (the
  think line, a task, an answer) takes any byte, but a `<` in it must not be followed by `/`, a
  letter or `_`, so it cannot open a tag (`{1} < {2}` stays possible). In a task or an answer
  `{` starts a reference, which must name an id that exists (in an answer, a call with an OK
  result). A task or an answer starts with a printable non-space ASCII byte other than `<`, so
  it is never empty once stripped. Every free text has a byte limit, chosen so that the whole
  turn stays within the environment's max_turn_chars (`TurnSpec.fit`). The language is a strict
  subset of what the parser accepts: one spelling of the tags, no think after the calls; the
  scripted oracle's turns are in it (tested), so the mask does not fight what SFT taught.
- Bytes, not characters: a byte-level BPE token may hold half a UTF-8 character. Structure is
  ASCII, and no byte of a multi-byte character is `<`, `{` or a digit, so a byte automaton is
  exact on structure; byte limits are stricter than the parser's character limits.
- Compiled against the vocabulary per automaton state, cached: a structural state (a gap, a
  tag being written, a name, a reference) walks the vocabulary's byte trie, pruned where the
  automaton rejects, so only the few live tokens are visited. A free-text state takes a mask of
  "plain" tokens computed once per tokenizer (no `<`; in a task or an answer no `{` either) and
  walks only the few tokens left (SmolLM2's 49,152 tokens hold 38 with `<` and 50 with `{`).
  Counters (bytes of the current free text) are not part of a cached state: each compiled token
  records how many bytes it adds, checked against the room left at run time. Tokens longer than
  MAX_FREE_TOKEN bytes (0.3% of SmolLM2's: runs of spaces or dashes) stay out of free text, so
  the room changes a mask only in a free text's last 16 bytes and masks are reused.
- Termination: a turn must end before the engine's token limit, or its cut text would be a
  PARSE_ERR. `finish(state)` is a short completion (close what is open; from a gap that needs a
  turn, `<answer>?</answer>`); a token is allowed only if, after it, that completion still fits in
  the tokens left, one byte per token (byte-level BPE has a token for every byte), plus the end
  token. So every sampled turn is closed and accepted, and an episode ends by the answer or by
  the environment's turn cap.
- The mask a token was sampled under is named by an integer id (`mask_id`) that the training
  pass turns back into the same bool row (`rows`): GRPO takes log-probs over the allowed tokens,
  the distribution that sampled, storing one int per generated token instead of a bitmap.
"""
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import NamedTuple

import torch

MAX_GAP = 2                      # spaces/newlines allowed between two elements of a turn
MAX_FREE_TOKEN = 16              # longer tokens stay out of free text (masks reused; see above)
_GAP_BYTES = frozenset(b" \n")
_LT, _LBRACE, _RBRACE = ord("<"), ord("{"), ord("}")
_REGION = ("body", "ref", "close")   # states inside one free text (their `n` counts its bytes)
_ID = re.compile(r"[1-9]\d{0,5}")
_TAG_START = frozenset(b"/_ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")   # after `<`: a tag
_CLOSE = {"think": b"</think>", "task": b"</call>", "answer": b"</answer>"}


@dataclass(frozen=True)
class TurnSpec:
    """What one turn may say: this episode's pool names, the id the next call gets, the ids a
    call may reference from earlier rounds and those an answer may (OK results), the limits."""
    names: tuple[str, ...]
    first_id: int = 1
    ref_ids: frozenset = frozenset()
    ok_ids: frozenset = frozenset()
    max_calls: int = 16
    think_bytes: int = 300
    task_bytes: int = 400
    answer_bytes: int = 200

    @classmethod
    def fit(cls, names, ids, ok_ids, max_calls: int, max_task_chars: int, max_turn_chars: int,
            think_bytes: int = 300, answer_bytes: int = 200) -> "TurnSpec":
        """A spec for an episode: `ids` every call id so far, `ok_ids` those with an OK result.
        Names the parser would not route back (it clips them at 40 characters) are left out.
        The task limit is cut so that max_calls calls and a think line fit in max_turn_chars."""
        ids = [i for i in ids if _ID.fullmatch(i)]
        names = tuple(n for n in names if 0 < len(n) < 40 and n.isprintable() and not set(n) & set('<>"'))
        first_id = 1 + max(map(int, ids), default=0)
        longest = max((len(n.encode()) for n in names), default=0)
        per_call = len(f'<call id="{first_id + max_calls}" to="">') + longest + len("</call>") + MAX_GAP
        fixed = MAX_GAP + len("<think></think>") + think_bytes
        task = min(max_task_chars, (max_turn_chars - fixed) // max(1, max_calls) - per_call)
        if task < 1 or fixed + MAX_GAP + answer_bytes + 17 > max_turn_chars:
            raise ValueError(f"max_turn_chars={max_turn_chars} leaves no room for {max_calls} calls")
        return cls(names, first_id, frozenset(ids), frozenset(i for i in ok_ids if i in ids),
                   max_calls, think_bytes, task, answer_bytes)


class State(NamedTuple):
    mode: str     # gap | open (a tag being written) | name | body (free text) | ref | close
    where: str    # gap: start | think | call | answer (what came last); else: think | task | answer
    text: bytes   # what is written of the current tag, name + '">', or reference digits
    n: int        # gap: its whitespace bytes; body, ref, close: the free text's bytes so far
    calls: int    # calls completed in this turn


class TurnGrammar:
    """The automaton of one turn under one spec: `step` one byte, `accepting`, `finish`."""

    def __init__(self, spec: TurnSpec):
        self.spec = spec
        self.start = State("gap", "start", b"", 0, 0)
        self.limit = {"think": spec.think_bytes, "task": spec.task_bytes, "answer": spec.answer_bytes}
        # shortest first, so `finish` picks the shortest completion and stays on it
        self.names = sorted((n.encode() + b'">' for n in spec.names), key=lambda c: (len(c), c))
        self._opens, self._refs = {}, {}

    def opens(self, where: str, calls: int) -> list[tuple[bytes, State]]:
        """The tags a gap may open, and the state each leads to (the answer first: `finish`)."""
        key = (where, calls)
        if key not in self._opens:
            out = []
            if where in ("start", "think"):
                out.append((b"<answer>", State("body", "answer", b"", 0, calls)))
            if where in ("start", "think", "call") and calls < self.spec.max_calls and self.names:
                out.append((b'<call id="%d" to="' % (self.spec.first_id + calls), State("name", "task", b"", 0, calls)))
            if where == "start":
                out.append((b"<think>", State("body", "think", b"", 0, calls)))
            self._opens[key] = out
        return self._opens[key]

    def refs(self, where: str, calls: int) -> list[bytes]:
        """Ids a reference may name, shortest first: in a task, earlier rounds' calls and this
        turn's earlier calls; in an answer, calls with an OK result."""
        key = (where, calls)
        if key not in self._refs:
            ids = (set(self.spec.ok_ids) if where == "answer" else
                   set(self.spec.ref_ids) | {str(self.spec.first_id + i) for i in range(calls)})
            self._refs[key] = sorted((i.encode() for i in ids), key=lambda i: (len(i), i))
        return self._refs[key]

    def _ref(self, s: State, digits: bytes, n: int) -> State | None:
        s = State("ref", s.where, digits, n, s.calls)
        return s if any(i.startswith(digits) for i in self.refs(s.where, s.calls)) and n + self.need(s) <= self.limit[s.where] else None

    def need(self, s: State) -> int:
        """Free-text bytes still owed by an open reference (its shortest id and `}`)."""
        if s.mode != "ref":
            return 0
        best = next(i for i in self.refs(s.where, s.calls) if i.startswith(s.text))
        return len(best) - len(s.text) + 1

    def _after_close(self, s: State) -> State:
        where = {"think": "think", "task": "call", "answer": "answer"}[s.where]
        return State("gap", where, b"", 0, s.calls + (s.where == "task"))

    def step(self, s: State, b: int) -> State | None:
        """The state after byte b, or None where the parser would not accept the turn."""
        if s.mode == "gap":
            if b in _GAP_BYTES:
                return s._replace(n=s.n + 1) if s.n < MAX_GAP else None
            return State("open", s.where, b"<", 0, s.calls) if b == _LT and self.opens(s.where, s.calls) else None
        if s.mode == "open":
            t = s.text + bytes([b])
            for literal, after in self.opens(s.where, s.calls):
                if literal == t:
                    return after
                if literal.startswith(t):
                    return s._replace(text=t)
            return None
        if s.mode == "name":
            t = s.text + bytes([b])
            if t in self.names:
                return State("body", "task", b"", 0, s.calls)
            return s._replace(text=t) if any(c.startswith(t) for c in self.names) else None
        if s.mode == "body":
            if s.n == 0 and s.where != "think" and not (0x21 <= b <= 0x7E and b != _LT):
                return None                     # a task or an answer starts with a visible byte
            if b == _LT:
                return State("close", s.where, b"<", s.n, s.calls)
            if b == _LBRACE and s.where != "think":
                return self._ref(s, b"", s.n + 1)
            return s._replace(n=s.n + 1) if s.n < self.limit[s.where] else None
        if s.mode == "ref":
            if b == _RBRACE:
                return State("body", s.where, b"", s.n + 1, s.calls) if s.text in self.refs(s.where, s.calls) else None
            return self._ref(s, s.text + bytes([b]), s.n + 1) if 0x30 <= b <= 0x39 else None
        # close: the body's closing tag, or a `<` of the free text (`{1} < {2}`) that opens no tag
        if s.text == b"<" and b != ord("/"):
            if b in _TAG_START or s.n >= self.limit[s.where]:
                return None
            return self.step(State("body", s.where, b"", s.n + 1, s.calls), b)
        literal, t = _CLOSE[s.where], s.text + bytes([b])
        if t == literal:
            return self._after_close(s)
        return s._replace(text=t) if literal.startswith(t) else None

    def accepting(self, s: State) -> bool:
        return s.mode == "gap" and s.where in ("call", "answer")

    def finish(self, s: State) -> bytes:
        """A short completion that `step` accepts from s and ends accepting. Each of its bytes
        leads to a state whose finish is the rest of it, so following it one byte per token
        never runs out of room once it fits."""
        if s.mode == "gap":
            return b"" if self.accepting(s) else b"<answer>?</answer>"
        if s.mode == "open":
            literal, after = next(o for o in self.opens(s.where, s.calls) if o[0].startswith(s.text))
            return literal[len(s.text):] + self.finish(after)
        if s.mode == "name":
            name = next(c for c in self.names if c.startswith(s.text))
            return name[len(s.text):] + self.finish(State("body", "task", b"", 0, s.calls))
        if s.mode == "body":
            first = b"?" if s.n == 0 and s.where != "think" else b""
            return first + _CLOSE[s.where] + self.finish(self._after_close(s))
        if s.mode == "ref":
            best = next(i for i in self.refs(s.where, s.calls) if i.startswith(s.text))
            return best[len(s.text):] + b"}" + self.finish(State("body", s.where, b"", s.n + 1, s.calls))
        literal = _CLOSE[s.where]
        return literal[len(s.text):] + self.finish(self._after_close(s))


def token_bytes(tokenizer) -> list[bytes]:
    """Each token id's bytes, as the tokenizer's byte-level decoder joins them."""
    from tokenizers import decoders
    hf = tokenizer.tokenizer
    if not isinstance(hf.decoder, decoders.ByteLevel):
        raise ValueError("protocol mask: only byte-level BPE tokenizers are supported "
                         f"(this one decodes with {type(hf.decoder).__name__})")
    byte_of = _byte_level_alphabet()
    added = {i: t.content for i, t in hf.get_added_tokens_decoder().items()}
    out = []
    for i in range(hf.get_vocab_size()):
        piece = hf.id_to_token(i)
        out.append(added[i].encode() if i in added else bytes(byte_of[ch] for ch in piece) if piece else b"")
    return out


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet: printable bytes stand for themselves, the other bytes, in
    order, for the characters from U+0100 on."""
    keep = set(range(33, 127)) | set(range(161, 173)) | set(range(174, 256))
    out, n = {}, 0
    for b in range(256):
        if b in keep:
            out[chr(b)] = b
        else:
            out[chr(256 + n)] = b
            n += 1
    return out


class _Trie:
    __slots__ = ("kids", "ids")

    def __init__(self):
        self.kids, self.ids = {}, []

    def add(self, data: bytes, token: int) -> None:
        node = self
        for b in data:
            node = node.kids.setdefault(b, _Trie())
        node.ids.append(token)


@dataclass
class Table:
    """A compiled state: which tokens it allows, and where each leads."""
    base: torch.Tensor | None   # bool [V]: plain tokens that stay in this free text (or None)
    base_d: int                 # len(finish) after a plain token
    ids: torch.Tensor           # [K] the other allowed tokens
    peak: torch.Tensor          # [K] free-text bytes each needs in this state's free text
    d: torch.Tensor             # [K] len(finish) after each
    after: dict                 # token -> (state after it, free-text bytes it adds, stays in this free text)
    accepting: bool
    max_peak: int
    max_d: int


class ProtocolMask:
    """The protocol automaton compiled against one tokenizer's vocabulary, with its caches."""

    def __init__(self, tokenizer, device="cpu", vocab_size: int | None = None, cache_masks: int = 4096):
        self.device = torch.device(device)
        self.tokens = token_bytes(tokenizer)
        # a model's output layer may be wider than its tokenizer: ids past it are never allowed
        self.tokens += [b""] * max(0, (vocab_size or 0) - len(self.tokens))
        self.vocab_size = len(self.tokens)
        self.eos_ids = list(tokenizer.eos_token_ids)
        single = {t for t in self.tokens if len(t) == 1}
        missing = [b for b in range(256) if bytes([b]) not in single]
        if any(0x20 <= b <= 0x7E or b == 0x0A for b in missing):
            raise ValueError("protocol mask: the vocabulary lacks single-byte tokens for "
                             f"{bytes(b for b in missing if 0x20 <= b <= 0x7E)!r}")
        self.trie = _Trie()
        self.lens = torch.tensor([len(t) for t in self.tokens], dtype=torch.int32)
        self.max_len = int(self.lens.max())
        has_lt = torch.tensor([_LT in t for t in self.tokens])
        has_brace = torch.tensor([_LBRACE in t for t in self.tokens])
        first_ok = torch.tensor([bool(t) and 0x21 <= t[0] <= 0x7E and t[0] not in (_LT, _LBRACE) for t in self.tokens])
        short = (self.lens > 0) & (self.lens <= MAX_FREE_TOKEN)
        eos = torch.zeros(self.vocab_size, dtype=torch.bool)
        eos[self.eos_ids] = True
        # Plain tokens stay in a free text byte by byte (a mask computed once); the few special
        # ones (those with `<`, or `{` in a task or an answer) are walked through the automaton.
        special = {"think": has_lt & ~eos, "text": (has_lt | has_brace) & ~eos}
        plain = {kind: short & ~s & ~eos for kind, s in special.items()}
        self.base = {("think", 0): plain["think"], ("think", 1): plain["think"],
                     ("text", 0): plain["text"] & first_ok, ("text", 1): plain["text"]}
        self.special = {"think": _Trie(), "text": _Trie()}
        for i, t in enumerate(self.tokens):
            if not t or i in self.eos_ids:
                continue
            self.trie.add(t, i)
            for kind, trie in self.special.items():
                if special[kind][i]:
                    trie.add(t, i)
        self.grammars: dict[TurnSpec, TurnGrammar] = {}
        self.tables: dict[tuple, Table] = {}
        self.mask_keys: list[tuple] = []           # mask id -> (table, room cap, left cap)
        self.mask_ids: dict[tuple, int] = {}
        self.cache: OrderedDict[int, torch.Tensor] = OrderedDict()
        self.cache_masks = cache_masks
        self.lens_on_device = self.lens.to(self.device)
        self.all_true = torch.ones(self.vocab_size, dtype=torch.bool, device=self.device)

    def clear(self) -> None:
        """Forget every compiled state and mask id (a long run calls this between rollout
        batches, once their mask ids are spent); the per-tokenizer tables stay."""
        self.grammars.clear()
        self.tables.clear()
        self.mask_keys.clear()
        self.mask_ids.clear()
        self.cache.clear()

    def start(self, spec: TurnSpec) -> "TurnMask":
        if spec not in self.grammars:
            self.grammars[spec] = TurnGrammar(spec)
        return TurnMask(self, self.grammars[spec])

    # -- compiling a state ---------------------------------------------------------------------

    @staticmethod
    def key_of(s: State) -> State:
        """The cached state: a free text's byte count matters only as empty / not empty."""
        return s._replace(n=min(s.n, 1)) if s.mode in _REGION else s

    def table(self, g: TurnGrammar, key: State) -> Table:
        k = (g.spec, key)
        if k not in self.tables:
            self.tables[k] = self._compile(g, key)
        return self.tables[k]

    def _compile(self, g: TurnGrammar, key: State) -> Table:
        after, region = {}, key.mode in _REGION

        def visit(node, s, grow, peak, stays):
            for token in node.ids:
                after[token] = (s, grow, peak, stays)
            for b, child in node.kids.items():
                nxt = g.step(s, b)
                if nxt is None:
                    continue
                still = stays and nxt.mode in _REGION
                if still:
                    visit(child, nxt, nxt.n - key.n, max(peak, nxt.n - key.n + g.need(nxt)), True)
                else:
                    visit(child, nxt, grow, peak, False)

        base, base_d = None, 0
        if key.mode == "body":   # plain tokens from the precomputed mask; walk the rest
            kind = "think" if key.where == "think" else "text"
            base = self.base[(kind, key.n)]
            base_d = len(g.finish(key._replace(n=1)))
            visit(self.special[kind], key, 0, g.need(key) if region else 0, region)
        else:
            visit(self.trie, key, 0, g.need(key) if region else 0, region)
        ids = sorted(after)
        return Table(base.to(self.device) if base is not None else None, base_d,
                     torch.tensor(ids, dtype=torch.long),
                     torch.tensor([after[i][2] for i in ids], dtype=torch.int32),
                     torch.tensor([len(g.finish(after[i][0])) for i in ids], dtype=torch.int32),
                     {i: (after[i][0], after[i][1], after[i][3]) for i in ids}, g.accepting(key),
                     max([after[i][2] for i in ids] + [self.max_len if base is not None else 0]),
                     max([len(g.finish(after[i][0])) for i in ids] + [base_d]))

    # -- masks ---------------------------------------------------------------------------------

    def mask_id(self, table: Table, room: int, left: int) -> int:
        """The id of the mask of `table` with `room` free-text bytes and `left` tokens left;
        rooms and lefts beyond what any token of the table needs share one id."""
        k = (id(table), min(room, table.max_peak), min(left, table.max_d + 2))
        if k not in self.mask_ids:
            self.mask_ids[k] = len(self.mask_keys)
            self.mask_keys.append((table, k[1], k[2]))
        return self.mask_ids[k]

    def mask(self, mask_id: int) -> torch.Tensor:
        """bool [V] of the tokens allowed under this mask id (-1: every token)."""
        if mask_id < 0:
            return self.all_true
        if mask_id in self.cache:
            self.cache.move_to_end(mask_id)
            return self.cache[mask_id]
        table, room, left = self.mask_keys[mask_id]
        m = self._build(table, room, left, budget=True)
        if not bool(m.any()):   # the engine's limit is below the shortest turn: the turn will be cut
            m = self._build(table, room, left, budget=False)
        self.cache[mask_id] = m
        if len(self.cache) > self.cache_masks:
            self.cache.popitem(last=False)
        return m

    def _build(self, table: Table, room: int, left: int, budget: bool) -> torch.Tensor:
        m = torch.zeros(self.vocab_size, dtype=torch.bool, device=self.device)
        if table.base is not None and (not budget or table.base_d + 2 <= left):
            m = table.base & (self.lens_on_device <= room)
        ok = table.peak <= room
        if budget:
            ok &= table.d + 2 <= left
        m[table.ids[ok].to(self.device)] = True
        if table.accepting:
            m[self.eos_ids] = True
        return m

    def rows(self, mask_ids: torch.Tensor) -> torch.Tensor:
        """bool [..., V]: the mask of each id (-1: every token), for the training pass."""
        unique, inverse = torch.unique(mask_ids.cpu(), return_inverse=True)
        table = torch.stack([self.mask(int(i)) for i in unique])
        return table[inverse.to(table.device)]


class TurnMask:
    """One branch's turn under the mask: its automaton state and free-text byte count."""

    def __init__(self, owner: ProtocolMask, grammar: TurnGrammar):
        self.owner, self.grammar, self.state = owner, grammar, grammar.start
        self.done = False

    def _table(self) -> Table:
        return self.owner.table(self.grammar, ProtocolMask.key_of(self.state))

    def mask(self, left: int) -> tuple[int, torch.Tensor]:
        """(mask id, bool [V]) for the next token, with `left` tokens this turn may still take."""
        s = self.state
        room = self.grammar.limit[s.where] - s.n if s.mode in _REGION else 0
        mask_id = self.owner.mask_id(self._table(), room, left)
        return mask_id, self.owner.mask(mask_id)

    def advance(self, token: int) -> None:
        if token in self.owner.eos_ids:
            self.done = True
            return
        entry = self._table().after.get(token)
        if entry is None:   # a plain token: it stays in the free text
            self.state = self.state._replace(n=self.state.n + len(self.owner.tokens[token]))
            return
        state, grow, stays = entry
        self.state = state._replace(n=self.state.n + grow) if stays else state
