"""Executor, episodes and rewards against hand-computed cases."""
import random
import re
import time
from dataclasses import dataclass

import pytest

from baselines import scripted_policy
from env import (CallResult, EnvConfig, Episode, EpisodeResult, RewardConfig, answers_match, episode_rewards,
                 group_rewards, play, resolve_answer)
from tasks import Subtask, Task, make_tasks, world_for_split
from tools import OK, Callee, Pool, Reply, load_pool


@dataclass
class Echo(Callee):
    """Answers the task upper-cased after a fixed latency; 'fail' fails, 'slow' takes 100 s."""
    calls: list = None

    def run(self, task, rng, timeout):
        if self.calls is not None:
            self.calls.append(task)
        if "fail" in task:
            return Reply("EXEC_ERR", "boom", self.latency, self.cost)
        latency = 100.0 if "slow" in task else self.latency
        return Reply(OK, task.upper(), latency, self.cost)


@dataclass
class Batcher(Echo):
    batch = True
    batches: list = None

    def run_batch(self, tasks, rngs, timeout):
        self.batches.append(list(tasks))
        return [self.run(t, r, timeout) for t, r in zip(tasks, rngs)]


def _pool():
    return Pool("test", [Echo("a", "agent", "fast", 0.01, 1.0), Echo("b", "agent", "slow", 0.02, 2.0)])


TASK = Task("q?", "A B", [Subtask(1, "text", "a", "A")], "test", 1, 1, 1)


def test_critical_path_hand_computed():
    ep = Episode(TASK, _pool(), EnvConfig(call_timeout=10))
    state = ep.step('<call id="1" to="a">x</call><call id="2" to="b">y</call>'
                    '<call id="3" to="a">{1} {2}</call><call id="4" to="b">z</call>')
    # 1: 0..1, 2: 0..2, 3 waits for both: 2..3, 4: 0..2 -> round = 3.0
    assert 'elapsed="3.00"' in state and 'cost="0.0600"' in state
    r3 = ep.rounds[0].results[2]
    assert (r3.start, r3.end, r3.task, r3.text) == (2.0, 3.0, "X Y", "X Y")
    ep.step('<call id="5" to="b">{3}!</call>')      # a reference to an earlier round
    assert ep.rounds[1].results[0].task == "X Y!" and ep.elapsed == pytest.approx(5.0)


def test_failed_dependency_and_timeout():
    ep = Episode(TASK, _pool(), EnvConfig(call_timeout=5))
    state = ep.step('<call id="1" to="a">fail</call><call id="2" to="a">{1}</call>'
                    '<call id="3" to="b">slow</call><call id="4" to="a">{3}</call>')
    statuses = [r.status for r in ep.rounds[0].results]
    assert statuses == ["EXEC_ERR", "EXEC_ERR", "TIMEOUT", "EXEC_ERR"]
    assert "dependency {1} failed" in ep.rounds[0].results[1].text
    assert ep.rounds[0].elapsed == 5.0 and 'latency="5.00"' in state
    ep.step('<call id="5" to="a">{1}</call>')     # an earlier round's failure fails it too
    assert ep.rounds[1].results[0].status == "EXEC_ERR"


def test_batching_callee_gets_simultaneous_calls_together():
    seen = []
    pool = Pool("t", [Batcher("m", "agent", "batched", 0.0, 1.0, batches=seen), Echo("a", "agent", "x", 0.0, 1.0)])
    ep = Episode(TASK, pool)
    ep.step('<call id="1" to="m">p</call><call id="2" to="m">q</call><call id="3" to="a">r</call>'
            '<call id="4" to="m">{1}x</call><call id="5" to="m">{2}y</call>')
    assert seen == [["p", "q"], ["Px", "Qy"]]


def test_queueing_on_the_virtual_clock_hand_computed():
    # "a" serves one call at a time (1 s each); "b" has no limit (2 s). Calls 1, 4, 5 are ready
    # at 0 and call 3 at 2 (after 2): first ready, first served, although 3 is dispatched before
    # 4 and 5. a: 1 0..1, 4 1..2, 5 2..3, 3 3..4; 6 waits for 5: 3..5 on b. Round = 5.
    def episode(call_timeout):
        pool = Pool("q", [Echo("a", "agent", "x", 0.01, 1.0, concurrency=1), Echo("b", "agent", "y", 0.0, 2.0)])
        ep = Episode(TASK, pool, EnvConfig(call_timeout=call_timeout))
        state = ep.step('<call id="1" to="a">x</call><call id="2" to="b">y</call><call id="3" to="a">{2} z</call>'
                        '<call id="4" to="a">w</call><call id="5" to="a">v</call><call id="6" to="b">{5}!</call>')
        return ep, state, {r.id: r for r in ep.rounds[0].results}
    ep, state, r = episode(10)
    assert [(r[i].start, r[i].end, r[i].latency) for i in "123456"] == [
        (0, 1, 1), (0, 2, 2), (2, 4, 2), (0, 2, 2), (0, 3, 3), (3, 5, 2)]
    assert ep.rounds[0].elapsed == 5 and 'elapsed="5.00"' in state and 'latency="3.00">V<' in state
    # a 2.5 s deadline: call 5 starts at 2 and would end at 3, so it times out at 2.5 (and is
    # charged: it started); its slot frees then, so call 3 runs 2.5..3.5; call 6 fails with 5
    ep, state, r = episode(2.5)
    assert (r["5"].status, r["5"].end, r["5"].cost) == ("TIMEOUT", 2.5, 0.01)
    assert (r["3"].start, r["3"].end, r["3"].latency) == (2, 3.5, 1.5)
    assert r["6"].status == "EXEC_ERR" and ep.rounds[0].elapsed == 3.5
    # still waiting at the deadline: never started, nothing charged
    pool = Pool("q", [Echo("a", "agent", "x", 0.01, 1.0, concurrency=1)])
    ep = Episode(TASK, pool, EnvConfig(call_timeout=1.5))
    ep.step('<call id="1" to="a">x</call><call id="2" to="a">y</call><call id="3" to="a">z</call>')
    assert [(c.status, c.latency, c.cost) for c in ep.rounds[0].results] == [
        ("OK", 1, 0.01), ("TIMEOUT", 1.5, 0.01), ("TIMEOUT", 1.5, 0.0)]


def test_queueing_with_two_slots_and_batches():
    # two slots of 1 s: three calls ready at 0 end at 1, 1 and 2
    pool = Pool("q", [Echo("a", "agent", "x", 0.0, 1.0, concurrency=2)])
    ep = Episode(TASK, pool)
    ep.step('<call id="1" to="a">x</call><call id="2" to="a">y</call><call id="3" to="a">z</call>')
    assert [c.end for c in ep.rounds[0].results] == [1, 1, 2]
    # a batch is one request: p and q together 0..1; Rx (ready at 0.5) waits for the slot: 1..2
    seen = []
    pool = Pool("t", [Batcher("m", "agent", "b", 0.0, 1.0, concurrency=1, batches=seen), Echo("a", "agent", "x", 0.0, 0.5)])
    ep = Episode(TASK, pool)
    ep.step('<call id="1" to="m">p</call><call id="2" to="m">q</call><call id="3" to="a">r</call>'
            '<call id="4" to="m">{3}x</call>')
    assert seen == [["p", "q"], ["Rx"]]
    assert [(c.start, c.end) for c in ep.rounds[0].results] == [(0, 1), (0, 1), (0, 0.5), (0.5, 2)]


def test_answer_ends_episode_and_budgets():
    ep = Episode(TASK, _pool())
    assert ep.step('<answer>a b</answer>') is None and ep.done and ep.result().success
    ep = Episode(TASK, _pool(), EnvConfig(max_turns=2))
    ep.step("nothing here")
    assert ep.step('<call id="1" to="a">x</call>') is None and ep.done
    r = ep.result()
    assert r.answer is None and not r.success and r.parse_errors == 1 and r.outside_turns == 1
    ep = Episode(TASK, _pool(), EnvConfig(time_budget=1.5))
    assert ep.step('<call id="1" to="b">x</call>') is None and ep.done


def test_answer_by_reference():
    ep = Episode(TASK, _pool())
    ep.step('<call id="1" to="a">a</call><call id="2" to="a">b</call><call id="3" to="a">fail</call>')
    assert ep.step('<answer>{1} {2}</answer>') is None          # results "A" and "B", pasted in
    r = ep.result()
    assert (r.answer, r.success, r.parse_errors) == ("A B", True, 0)
    for answer, why in (("{3}", "it ended EXEC_ERR"), ("{1} {9}", "no such call")):
        ep = Episode(TASK, _pool())
        ep.step('<call id="1" to="a">a</call><call id="3" to="a">fail</call>')
        ep.step(f"<answer>{answer}</answer>")
        r = ep.result()
        assert ep.done and r.answer is None and not r.success and r.parse_errors == 1, why
    assert resolve_answer("{3}", {"3": CallResult("3", "a", "x", "EXEC_ERR", "boom", 0.0, 0.0)})[1] == \
        "the answer references {3}, which has no OK result (it ended EXEC_ERR)"


def test_redundant_calls():
    ep = Episode(TASK, _pool())
    ep.step('<call id="1" to="a">x</call><call id="2" to="a">x</call><call id="3" to="b">x</call>')
    ep.step('<call id="4" to="a">x</call><call id="5" to="a">fail</call>')
    ep.step('<call id="6" to="a">fail</call><answer>A B</answer>')
    r = ep.result()
    # 2 duplicates 1 in-turn; 4 repeats an OK call; 3 is another callee; 6 never runs (answer turn)
    assert r.redundant_calls == 2 and r.parse_errors == 1 and r.rounds == 2


def test_a_call_sent_again_after_its_own_exec_err_is_counted_as_a_repeated_failure():
    ep = Episode(TASK, _pool())
    ep.step('<call id="1" to="a">now fail</call><call id="2" to="a">{1} x</call>')
    ep.step('<call id="3" to="a">NOW  fail</call><call id="4" to="b">now fail</call><call id="5" to="a">{1} x</call>')
    ep.step('<call id="6" to="a">now fail</call><call id="7" to="a">a</call>')
    r = ep.result()
    # 3 and 6 repeat call 1 (case and spacing aside); 4 is another callee; 2 and 5 failed on a dependency
    assert [x.repeats_failure for rnd in ep.rounds for x in rnd.results] == [False, False, True, False, False, True, False]
    assert r.repeated_failures == 2 and r.exec_errors == 6 and r.redundant_calls == 0


def test_reward_terms_hand_computed():
    c = RewardConfig()
    r = EpisodeResult("q", "7", "7", True, rounds=3, turns=4, min_rounds=2, latency=2.0, cost=0.01,
                      calls=3, parse_errors=2, exec_errors=0, timeouts=0, redundant_calls=1,
                      outside_turns=1, tokens=100, protocol_ok=False, decomposition=["x"],
                      composition="c", difficulty=3)
    t = episode_rewards(r, c)
    assert t["success"] == 1.0
    assert t["protocol"] == pytest.approx(-(0.1 * 2 + 0.05 * 1))
    assert t["redundancy"] == pytest.approx(-0.05)
    assert t["rounds"] == pytest.approx(-0.05)
    assert t["tokens"] == pytest.approx(-0.05)
    assert t["cost"] == pytest.approx(-0.01)
    assert t["latency"] == pytest.approx(-0.02)
    r.answer, r.success = None, False
    assert episode_rewards(r, c)["protocol"] == pytest.approx(-(0.2 + 0.5 + 0.05))


def test_group_diversity_term():
    def res(dec, success=True):
        return EpisodeResult("q", "1", "1", success, 1, 2, 1, 0.0, 0.0, 1, 0, 0, 0, 0, 0, 0, True, dec, "c", 1)
    group = [res(["a"]), res(["a"]), res(["b"]), res(["c"], success=False)]
    terms = group_rewards(group, RewardConfig(w_group_diversity=0.3))
    # G=4; "a" shared by 2 -> 0.3 * (1 - 1/3); "b" unique -> 0.3; "c" failed -> 0
    assert [t["diversity"] for t in terms] == pytest.approx([0.2, 0.2, 0.3, 0.0])
    assert group[2].reward == pytest.approx(sum(terms[2].values()))


@pytest.mark.parametrize("pred, gold, ok", [("1,234", "1234", True), ("1234.0", "1234", True),
                                            (" Velora. ", "velora", True), ("True", "yes", True),
                                            ("1235", "1234", False), (None, "1", False), ("abc", "abd", False)])
def test_answers_match(pred, gold, ok):
    assert answers_match(pred, gold) == ok


def _run(policy, split="heldout", n=200, failure_rate=0.0, pool="seen"):
    world = world_for_split(split)
    results = []
    for i, task in enumerate(make_tasks(split, n, 0, world)):
        p = load_pool(pool, world, random.Random(i))
        ep = Episode(task, p, EnvConfig(failure_rate=failure_rate), seed=i)
        results.append(play(ep, scripted_policy(policy, task, i)))
    return results


def test_oracle_success_and_recovery():
    assert sum(r.success for r in _run("oracle")) / 200 >= 0.99
    rs = _run("oracle", failure_rate=0.2)
    assert sum(r.success for r in rs) / 200 >= 0.95
    assert all(r.protocol_ok for r in rs) and sum(r.exec_errors + r.timeouts for r in rs) > 50


def test_parallel_beats_serial_latency_on_wide_tasks():
    from tasks import graph_width
    wide = [t for t in make_tasks("heldout", 200, 0) if graph_width(t.subtasks) >= 3]
    par, ser = _run("oracle"), _run("serial-oracle")
    idx = [i for i, t in enumerate(make_tasks("heldout", 200, 0)) if graph_width(t.subtasks) >= 3]
    assert len(wide) > 20
    lat = lambda rs: sum(rs[i].latency for i in idx) / len(idx)
    assert lat(par) <= 0.5 * lat(ser)


def test_thousand_simulated_episodes_are_fast():
    start = time.perf_counter()
    rs = _run("oracle", n=1000)
    assert time.perf_counter() - start < 5.0 and len(rs) == 1000


# ---------------------------------------------------------------- the oracle on hand-made states

SUM = Task("What is the total population of Velora and Kamar?", "3000",
           [Subtask(1, "lookup", "population of Velora", "1000"), Subtask(2, "lookup", "population of Kamar", "2000"),
            Subtask(3, "math", "{1} + {2}", "3000", [1, 2])], "sum_population", 3, 2, 2)


def _system(lines: list[str]) -> dict:
    return {"role": "system", "content": "Pool (name | kind | description | cost | latency):\n" + "\n".join(lines)}


PROSE_POOL = ['- "chatty" | agent | assistant; knowledge: exact | cost 0.0010 | latency 0.50s',
              '- "sage" | agent | assistant; knowledge: excellent | cost 0.0020 | latency 1.00s',
              '- "tally" | tool | calculator, exact math | cost 0.0001 | latency 0.10s']


def _state(*results) -> dict:
    rows = "\n".join(f'<result id="{i}" status="{s}" latency="0.50">{t}</result>' for i, _, s, t in results)
    return {"role": "user", "content": f'<state round="1" elapsed="0.60" cost="0.0021">\n{rows}\n</state>'}


def test_oracle_reroutes_a_lookup_answered_with_prose():
    oracle = scripted_policy("oracle", SUM)
    messages = [_system(PROSE_POOL), {"role": "user", "content": SUM.question}]
    first = oracle(messages)
    assert first.endswith('<call id="1" to="chatty">population of Velora</call>\n'
                          '<call id="2" to="chatty">population of Kamar</call>\n'
                          '<call id="3" to="tally">{1} + {2}</call>')
    messages += [{"role": "assistant", "content": first},
                 _state(("1", "chatty", "OK", 'The answer is: "1000".'), ("2", "chatty", "OK", "2000"),
                        ("3", "tally", "EXEC_ERR", "not an arithmetic expression: SyntaxError"))]
    second = oracle(messages)
    # lookup 1 goes to the next near-exact callee; lookup 2 stands; the sum is sent again on the
    # new result, not as the call that failed ({1} + {2} to tally)
    assert '<call id="4" to="sage">population of Velora</call>' in second
    assert '<call id="5" to="tally">{4} + {2}</call>' in second
    assert "{1}" not in second and "population of Kamar" not in second
    assert "call 1 gave not a number, re-route to sage" in second
    messages += [{"role": "assistant", "content": second},
                 _state(("4", "sage", "OK", "1000"), ("5", "tally", "OK", "3000"))]
    assert oracle(messages) == "<answer>{5}</answer>"


def test_oracle_stops_when_no_callee_can_give_a_usable_value():
    oracle = scripted_policy("oracle", SUM)
    messages = [_system([PROSE_POOL[0], PROSE_POOL[2]]), {"role": "user", "content": SUM.question}]
    messages += [{"role": "assistant", "content": oracle(messages)},
                 _state(("1", "chatty", "OK", "The population of Velora is 1000 people, give or take."),
                        ("2", "chatty", "OK", ""), ("3", "tally", "EXEC_ERR", "not an arithmetic expression"))]
    assert oracle(messages) == "<answer>unknown</answer>"    # no call is repeated


@dataclass
class Prose(Echo):
    """An agent that wraps the exact answer in a sentence, as a chat model may."""
    world: object = None

    def run(self, task, rng, timeout):
        return Reply(OK, f'The answer is: "{self.world.lookup(task)}".', self.latency, self.cost)


def test_oracle_episode_with_an_agent_that_answers_in_prose():
    from tasks import make_task
    from tools import Calculator, SimAgent
    world = world_for_split("heldout")
    solved = 0
    for i in range(6):
        task = make_task(world, ["sum_population", "founding_gap", "capital_population"][i % 3], random.Random(i))
        pool = Pool("p", [Prose("chatty", "agent", "assistant; knowledge: exact", 0.001, 0.5, world=world),
                          SimAgent("sage", "agent", "assistant; knowledge: excellent", 0.002, 1.0, world=world,
                                   skills={"lookup": 1.0}, exec_err_rate=0.0, timeout_rate=0.0),
                          Calculator("tally", "tool", "calculator, exact math", 0.0001, 0.1)])
        episode = Episode(task, pool, seed=i)
        result = play(episode, scripted_policy("oracle", task, i))
        calls = [(c.to, c.task, c.status) for rnd in episode.rounds for c in rnd.results]
        failed = [c[:2] for c in calls if c[2] != OK]
        assert len(failed) == len(set(failed)), calls       # no failing call is sent twice
        assert result.rounds <= 3, calls
        solved += result.success
    assert solved == 6


def test_oracle_spreads_calls_over_a_busy_callee():
    # kb serves one call at a time (0.4 s); sage is near-exact (1.0 s, no limit). Lookup 1 on kb
    # ends at 0.4, lookup 2 at 0.8 (< 1.0 on sage), lookup 3 would end at 1.2 on kb: sage, 1.0
    task = Task("q", "6", [Subtask(i, "lookup", f"population of C{i}", "1") for i in (1, 2, 3)]
                + [Subtask(4, "math", "{1} + {2} + {3}", "6", [1, 2, 3])], "t", 4, 2, 2)
    lines = ['- "kb" | tool | exact facts | cost 0.0010 | latency 0.40s | concurrency 1',
             '- "sage" | agent | assistant; knowledge: excellent | cost 0.0020 | latency 1.00s',
             '- "tally" | tool | calculator, exact math | cost 0.0001 | latency 0.10s']
    turn = scripted_policy("oracle", task)([_system(lines), {"role": "user", "content": task.question}])
    assert [m for m in re.findall(r'to="(\w+)"', turn)] == ["kb", "kb", "sage", "tally"]
    assert "kb is busy, call 3 to sage" in turn
    # without the limit everything goes to the exact kb
    lines[0] = lines[0].replace(" | concurrency 1", "")
    turn = scripted_policy("oracle", task)([_system(lines), {"role": "user", "content": task.question}])
    assert [m for m in re.findall(r'to="(\w+)"', turn)] == ["kb", "kb", "kb", "tally"]
