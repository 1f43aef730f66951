"""The protocol parser against malformed and adversarial text: it must never raise."""
import random
import xml.etree.ElementTree as ET

import pytest

from env import EnvConfig, Episode, parse_turn, validate
from tasks import make_tasks, world_for_split
from tools import load_pool


def test_well_formed_turn():
    t = parse_turn('<think>plan</think>\n<call id="1" to="kb">capital of X</call>\n'
                   '<call id="2" to="kb">population of {1}</call>')
    assert [c.id for c in t.calls] == ["1", "2"] and not t.errors and t.outside_chars == 0
    assert t.calls[1].refs == ["1"] and all(not c.error for c in t.calls)
    assert parse_turn("<answer> 42 </answer>").answer == "42"


@pytest.mark.parametrize("text, message", [
    ('<call id="1" to="kb">x', "unclosed"),
    ('<call id="1" to="kb">a <call id="2" to="kb">b</call>', "unclosed or nested"),
    ('<call to="kb">x</call>', "exactly id"),
    ('<call id="1" to="kb" extra="y">x</call>', "exactly id"),
    ('<call id="abc" to="kb">x</call>', "not a positive number"),
    ('<call id="1" to="kb">   </call>', "empty task"),
])
def test_malformed_calls(text, message):
    t = parse_turn(text)
    assert any(message in c.error for c in t.calls)


@pytest.mark.parametrize("text, message", [
    ("<think>never closed", "unclosed think"),
    ("</call>", "stray closing"),
    ('<state round="1">', "written by the environment"),
    ("<answer></answer>", "empty answer"),
    ("<answer>1</answer><answer>2</answer>", "2 answer tags"),
    ("x" * 9000, "only the first"),
])
def test_turn_level_errors(text, message):
    assert any(message in e for e in parse_turn(text).errors)


def test_outside_text_is_counted():
    assert parse_turn("hello <answer>1</answer> bye").outside_chars == len("hellobye")


WORLD = world_for_split("heldout")
TASK = make_tasks("heldout", 1, 0, WORLD)[0]


def _episode():
    return Episode(TASK, load_pool("seen", WORLD, random.Random(0)), EnvConfig())


def test_validation_errors_become_parse_err_results():
    ep = _episode()
    name = ep.pool.callees[0].name
    turn = parse_turn(f'<call id="1" to="{name}">capital of X</call>'
                      f'<call id="1" to="{name}">dup</call>'
                      f'<call id="2" to="nobody">x</call>'
                      f'<call id="3" to="{name}">uses {{4}}</call>'
                      f'<call id="4" to="{name}">uses {{4}}</call>'
                      f'<call id="5" to="{name}">uses {{99}}</call>')
    items = validate(turn, ep.pool, {}, ep.config)
    errors = [getattr(i, "text", "") if getattr(i, "status", "") == "PARSE_ERR" else "" for i in items]
    assert errors[0] == ""
    assert "already used" in errors[1]
    assert "unknown callee" in errors[2]
    assert "later call" in errors[3]          # a cycle needs a forward reference, so none can form
    assert "itself" in errors[4]
    assert "no earlier call" in errors[5]


TEXT_TOOL = next(c.name for c in _episode().pool.callees if type(c).__name__ == "TextTool")
JUNK_PIECES = ['<call id="1" to="kb">', "</call>", "<answer>", "</answer>", "<think>", "</think>",
               "<state>", '<result id="1">', "{1}", "{999999}", "{", "}", "<", ">", '"', "id=", "\x00",
               "\udcff", "\n", " ", "é", "<<call", "population of X", '<call id="2" to="nobody">',
               '<call id="007" to="a" to="b">', "<call/>", "<answer x='1'>", "&", "&amp;", "\ud9b8", "\x0b",
               "\ufffe", '<call id="1&a" to="kb">', f'<call id="3" to="{TEXT_TOOL}">first 3 letters of ',
               f'<call id="4" to="{TEXT_TOOL}">reverse ']


def _state_is_xml(ep):
    """The last state message is well-formed XML and holds nothing the tokenizer refuses."""
    if ep.rounds:
        state = ep.rounds[-1].state
        state.encode("utf-8")                 # strict: a lone surrogate would raise here
        assert ET.fromstring(state).tag == "state"


def _mutations(rng: random.Random, n: int):
    base = ['<think>p</think><call id="1" to="kb">capital of X</call><call id="2" to="kb">population of {1}</call>',
            "<answer>42</answer>", f'<call id="5" to="{TEXT_TOOL}">first 3 letters of \u01c01\ud9b8x&y</call>']
    for _ in range(n):
        kind = rng.random()
        if kind < 0.3:
            yield "".join(rng.choice(JUNK_PIECES) for _ in range(rng.randint(0, 30)))
        elif kind < 0.6:
            s = list(rng.choice(base))
            for _ in range(rng.randint(1, 6)):
                op, i = rng.random(), rng.randrange(len(s) + 1)
                if op < 0.4 and s:
                    del s[min(i, len(s) - 1)]
                elif op < 0.8:
                    s.insert(i, rng.choice(JUNK_PIECES))
                else:
                    s[i:i] = s[: rng.randint(0, len(s))]
            yield "".join(s)
        elif kind < 0.9:
            yield bytes(rng.randrange(256) for _ in range(rng.randint(0, 200))).decode("latin-1")
        else:
            yield rng.choice(JUNK_PIECES) * rng.randint(1, 3000)


def test_fuzz_parser_and_episode_never_raise():
    """Plain seeded fuzzing (no extra package): 3,000 random and mutated turns; every state
    message parses as XML."""
    rng = random.Random(0)
    ep = _episode()
    states = 0
    for text in _mutations(rng, 3000):
        turn = parse_turn(text)
        assert isinstance(turn.errors, list)
        if ep.done:
            ep = _episode()
        rounds = len(ep.rounds)
        ep.step(text)      # the whole step: parse, validate, execute, format state
        _state_is_xml(ep)
        states += len(ep.rounds) > rounds
    assert ep.result() is not None and states > 1000


def test_hypothesis_parser_never_raises():
    pytest.importorskip("hypothesis")
    from hypothesis import given, settings, strategies as st

    pieces = st.sampled_from(JUNK_PIECES)
    text = st.one_of(st.text(max_size=300), st.lists(st.one_of(pieces, st.text(max_size=10)), max_size=40).map("".join))

    @settings(max_examples=1000, deadline=None, derandomize=True)
    @given(text)
    def check(s):
        parse_turn(s)
        ep = _episode()
        ep.step(s)
        _state_is_xml(ep)
        ep.result()
    check()
