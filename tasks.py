"""The task world: a seeded fictional world and composite questions built from typed subtasks.

Design choices, and why:
- The world is procedurally generated from one integer seed (countries, cities, people,
  companies and the facts linking them), so training and evaluation run offline, are exactly
  reproducible, and every answer is verifiable. Names are built from a small syllable set so the
  vocabulary a tokenizer must learn stays modest.
- A question is a *composition*: a named template that draws entities at random and wires typed
  subtasks into a dependency graph. Subtask kinds are the skills callees are good or bad at:
  "lookup" (a fact), "math" (an arithmetic expression), "text" (a string operation). The last
  subtask is the aggregation (sum, difference, max, comparison, concatenation, ...) whose result
  is the gold answer.
- Each subtask carries the exact task string one would send to a callee, with `{k}` standing for
  the result of subtask k, in the same syntax the protocol uses (env.py). So a scripted policy
  can send the graph as-is, and the task strings are valid input for both the exact tools
  (tools.py) and the simulated agents.
- `depth` is the longest dependency chain (in subtasks). `min_rounds` is defined as `depth`: the
  number of call rounds a policy needs when it sends every subtask as soon as its inputs are known
  and reads the results between rounds. The final answer turn is not counted (+0). In-turn
  `{k}` chaining (env.py) can finish in fewer rounds; the reward only charges rounds *beyond*
  min_rounds, so chaining is never penalized and level-by-level orchestration is not either.
- Worlds and splits. Every generated task lives in a world of its own, drawn from a seed that
  names its split, the task seed and the task's index. A model trained on thousands of such
  tasks cannot answer from remembered facts or names: it has to copy names from the question
  into its calls and read the facts from the callees. The splits never share a world:
  "train" (train compositions), "heldout" (the benchmark's compositions: train's and the
  held-out ones, new worlds), "heldout-compositions" (only compositions never used in train,
  new worlds), so the two kinds of generalization are measured separately. Four of the five
  held-out compositions use a part no train composition uses (the relations "birth year of" and
  a company's "founding year of", the aggregations min and ">"), so a model trained on "train"
  meets a word it never learned to route, not only a new combination. "train-wide" adds four
  compositions that each teach one such part (PART_COMPOSITIONS, used only in training):
  there, every relation and aggregation of a held-out composition is learned in some other
  combination, and what a held-out composition still asks is the combination. A split also has
  one fixed reference world (`world_for_split`) for free-text queries and for tests that want
  many tasks in one world.
- Tasks are index-addressable (`task_at`): task i of a split is built from its own seed, so
  asking for task 10**8 costs one task, and a list of tasks is a prefix of a longer one.
- Text from outside (a query, a callee's reply, a JSONL, trajectory or pool file) passes
  `safe_text` once, where it enters: the tokenizer refuses a string holding a lone surrogate
  (what the JSON escape \\ud800 and an invalid byte in argv become in Python), and a state
  message must stay well-formed XML. It lives here, the lowest module every edge imports.
"""
import itertools
import json
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache

KINDS = ("lookup", "math", "text")
SPLITS = ("train", "train-wide", "heldout", "heldout-compositions")
TRAINING_SPLITS = ("train", "train-wide")

_SYLLABLES = ["ka", "lo", "mi", "ra", "ven", "tor", "za", "qui", "bel", "dor", "na", "sel",
              "mar", "ti", "os", "ul", "fen", "gar", "lis", "ro", "dun", "e", "va", "kor"]
_COMPANY_SUFFIXES = ["Works", "Labs", "Foods", "Motors", "Trading", "Mills"]
_REGIONS = ["North", "South", "East", "West"]

# relation -> (phrase used in lookup task strings, entity type it applies to, value type)
RELATIONS = {
    "capital": ("capital of", "country", "city"),
    "leader": ("leader of", "country", "person"),
    "country": ("country of", "city", "country"),
    "population": ("population of", "city", "number"),
    "city_founded": ("founding year of", "city", "number"),
    "born": ("birth year of", "person", "number"),
    "birthplace": ("birthplace of", "person", "city"),
    "employer": ("employer of", "person", "company"),
    "headquarters": ("headquarters of", "company", "city"),
    "company_founded": ("founding year of", "company", "number"),
    "employees": ("employees of", "company", "number"),
    "ceo": ("ceo of", "company", "person"),
}


@dataclass
class World:
    """Entities by type and a fact table {(relation, entity name): value}."""
    seed: int | str
    entities: dict[str, list[str]]          # type -> names
    facts: dict[tuple[str, str], object]    # (relation, entity) -> str name or int

    def fact(self, relation: str, entity: str):
        return self.facts[(relation, entity)]

    def entity_type(self, name: str) -> str | None:
        for kind, names in self.entities.items():
            if name in names:
                return kind
        return None

    def lookup(self, query: str) -> str | None:
        """Answer a lookup task string like 'population of Velora' exactly, or None."""
        q = " ".join(query.split()).rstrip("?.").lower()
        for relation, (phrase, etype, _) in RELATIONS.items():
            if q.startswith(phrase + " "):
                name = q[len(phrase) + 1:].strip()
                for entity in self.entities[etype]:
                    if entity.lower() == name:
                        return str(self.facts[(relation, entity)])
        return None


def _unique_names(rng: random.Random, n: int, taken: set, make) -> list[str]:
    names = []
    while len(names) < n:
        name = make()
        if name.lower() not in taken:
            taken.add(name.lower())
            names.append(name)
    return names


def make_world(seed: int | str, n_countries: int = 10, n_cities: int = 40, n_people: int = 30,
               n_companies: int = 15) -> World:
    rng = random.Random(seed)
    taken: set = set()

    def word(lo, hi):
        return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(lo, hi))).capitalize()

    countries = _unique_names(rng, n_countries, taken, lambda: word(2, 3) + rng.choice(["ia", "land", "a", ""]))
    cities = _unique_names(rng, n_cities, taken, lambda: word(2, 3))
    people = _unique_names(rng, n_people, taken, lambda: word(2, 2) + " " + word(2, 3))
    companies = _unique_names(rng, n_companies, taken, lambda: word(2, 2) + " " + rng.choice(_COMPANY_SUFFIXES))
    facts: dict = {}
    # every country gets a capital of its own; the other cities are spread over the countries
    for i, city in enumerate(cities):
        country = countries[i] if i < n_countries else rng.choice(countries)
        facts[("country", city)] = country
        if i < n_countries:
            facts[("capital", country)] = city
        facts[("population", city)] = rng.randint(20, 5000) * 1000 + rng.randint(0, 999)
        facts[("city_founded", city)] = rng.randint(900, 1950)
    for person in people:
        facts[("born", person)] = rng.randint(1930, 2000)
        facts[("birthplace", person)] = rng.choice(cities)
        facts[("employer", person)] = rng.choice(companies)
    for country, leader in zip(countries, rng.sample(people, n_countries)):
        facts[("leader", country)] = leader
    for company, ceo in zip(companies, rng.sample(people, n_companies)):
        facts[("ceo", company)] = ceo
        facts[("headquarters", company)] = rng.choice(cities)
        facts[("company_founded", company)] = rng.randint(1850, 2020)
        facts[("employees", company)] = rng.randint(50, 90000)
    entities = {"country": countries, "city": cities, "person": people, "company": companies}
    return World(seed, entities, facts)


@dataclass
class Subtask:
    id: int
    kind: str          # "lookup" | "math" | "text": the skill it needs
    task: str          # what one sends to a callee; "{k}" = result of subtask k
    gold: str          # the correct result
    deps: list[int] = field(default_factory=list)

    def resolve(self, results: dict[int, str]) -> str:
        """The task string with each {k} replaced by results[k]."""
        text = self.task
        for k in self.deps:
            text = text.replace("{%d}" % k, results[k])
        return text


@dataclass
class Task:
    question: str
    answer: str
    subtasks: list[Subtask]       # a dependency graph; empty for loaded real-dataset tasks
    composition: str
    difficulty: int               # number of subtasks
    depth: int                    # longest dependency chain, in subtasks
    min_rounds: int               # = depth (see module docstring); 1 for graph-less tasks
    split: str = ""
    world_seed: int | str | None = None

    def to_json(self) -> dict:
        from dataclasses import asdict
        return asdict(self)


class _Graph:
    """Builds a subtask graph while computing every gold value from the world."""

    def __init__(self, world: World):
        self.world, self.subtasks = world, []

    def _add(self, kind, task, gold, deps) -> int:
        sid = len(self.subtasks) + 1
        self.subtasks.append(Subtask(sid, kind, task, str(gold), list(deps)))
        return sid

    def gold(self, ref) -> str:
        return self.subtasks[ref - 1].gold if isinstance(ref, int) else ref

    def _arg(self, ref) -> str:
        return "{%d}" % ref if isinstance(ref, int) else ref

    def lookup(self, relation: str, entity) -> int:
        """entity: a name, or the id of a subtask whose result is the name."""
        value = self.world.fact(relation, self.gold(entity))
        deps = [entity] if isinstance(entity, int) else []
        return self._add("lookup", f"{RELATIONS[relation][0]} {self._arg(entity)}", value, deps)

    def math(self, template: str, *refs) -> int:
        """template uses {0}, {1}, ... for refs: subtask ids (int) or literal numbers (str)."""
        task = template.format(*[self._arg(r) for r in refs])
        values = [int(self.gold(r)) for r in refs]
        deps = [r for r in refs if isinstance(r, int)]
        return self._add("math", task, _eval_math(template, values), deps)

    def text(self, op: str, *refs) -> int:
        args = [self.gold(r) for r in refs]
        task = {"reverse": "reverse {0}", "upper": "uppercase {0}", "letters": "letters in {0}",
                "first3": "first 3 letters of {0}", "join": "join {0} and {1}"}[op]
        task = task.format(*[self._arg(r) for r in refs])
        deps = [r for r in refs if isinstance(r, int)]
        return self._add("text", task, text_op_result(op, args), deps)


def _eval_math(template: str, values: list) -> object:
    # gold arithmetic is computed here by construction, independently of the calculator tool
    ops = {"{0} + {1}": lambda a: a[0] + a[1], "{0} + {1} + {2}": lambda a: a[0] + a[1] + a[2],
           "{0} - {1}": lambda a: a[0] - a[1], "{0} * {1}": lambda a: a[0] * a[1],
           "{0} * {1} + {2}": lambda a: a[0] * a[1] + a[2],
           "max({0}, {1}, {2})": max, "max({0}, {1}, {2}, {3}, {4})": max, "min({0}, {1}, {2})": min,
           "{0} > {1}": lambda a: "yes" if a[0] > a[1] else "no",
           "{0} < {1}": lambda a: "yes" if a[0] < a[1] else "no"}
    return ops[template](values)


def text_op_result(op: str, args: list[str]) -> str:
    """The string operations shared by tasks (gold) and the text tool."""
    if op == "reverse":
        return args[0][::-1]
    if op == "upper":
        return args[0].upper()
    if op == "letters":
        return str(sum(c.isalpha() for c in args[0]))
    if op == "first3":
        return args[0][:3]
    if op == "join":
        return args[0] + "-" + args[1]
    raise ValueError(op)


# ---- compositions: name -> function(graph, world, rng) -> question; the last subtask answers ----

def _pick(rng, world, kind, k=1):
    return rng.sample(world.entities[kind], k)


def c_capital(g, w, rng):
    (c,) = _pick(rng, w, "country")
    g.lookup("capital", c)
    return f"What is the capital of {c}?"


def c_arith(g, w, rng):
    a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(1, 999)
    g.math("{0} * {1} + {2}", str(a), str(b), str(c))
    return f"What is {a} times {b} plus {c}?"


def c_capital_population(g, w, rng):
    (c,) = _pick(rng, w, "country")
    g.lookup("population", g.lookup("capital", c))
    return f"What is the population of the capital of {c}?"


def c_leader_employer_size(g, w, rng):
    (c,) = _pick(rng, w, "country")
    g.lookup("employees", g.lookup("employer", g.lookup("leader", c)))
    return f"How many employees does the employer of the leader of {c} have?"


def c_sum_population(g, w, rng):
    a, b = _pick(rng, w, "city", 2)
    g.math("{0} + {1}", g.lookup("population", a), g.lookup("population", b))
    return f"What is the total population of {a} and {b}?"


def c_sum_capital_populations(g, w, rng):
    cs = _pick(rng, w, "country", 3)
    pops = [g.lookup("population", g.lookup("capital", c)) for c in cs]
    g.math("{0} + {1} + {2}", *pops)
    return f"What is the total population of the capitals of {cs[0]}, {cs[1]} and {cs[2]}?"


def _founding_gap(g, w, rng, kind, relation):
    a, b = _pick(rng, w, kind, 2)
    if w.fact(relation, a) < w.fact(relation, b):
        a, b = b, a
    g.math("{0} - {1}", g.lookup(relation, a), g.lookup(relation, b))
    return f"How many years after {b} was {a} founded?"


def c_founding_gap(g, w, rng):
    return _founding_gap(g, w, rng, "city", "city_founded")


def c_max_employees(g, w, rng):
    cos = _pick(rng, w, "company", 3)
    g.math("max({0}, {1}, {2})", *[g.lookup("employees", c) for c in cos])
    return f"What is the largest number of employees among {cos[0]}, {cos[1]} and {cos[2]}?"


def c_latest_founding(g, w, rng):
    cs = _pick(rng, w, "city", 5)
    g.math("max({0}, {1}, {2}, {3}, {4})", *[g.lookup("city_founded", c) for c in cs])
    return f"Which is the latest founding year among {', '.join(cs[:4])} and {cs[4]}?"


def c_older_city(g, w, rng):
    a, b = _pick(rng, w, "city", 2)
    g.math("{0} < {1}", g.lookup("city_founded", a), g.lookup("city_founded", b))
    return f"Was {a} founded before {b}? Answer yes or no."


def c_bigger_capital(g, w, rng):
    a, b = _pick(rng, w, "country", 2)
    pa, pb = (g.lookup("population", g.lookup("capital", c)) for c in (a, b))
    g.math("{0} > {1}", pa, pb)
    return f"Does the capital of {a} have more people than the capital of {b}? Answer yes or no."


def c_join_capitals(g, w, rng):
    a, b = _pick(rng, w, "country", 2)
    g.text("join", g.lookup("capital", a), g.lookup("capital", b))
    return f"Join the capitals of {a} and {b} with a hyphen."


def c_reverse_capital(g, w, rng):
    (c,) = _pick(rng, w, "country")
    g.text("reverse", g.lookup("capital", c))
    return f"What is the capital of {c} spelled backwards?"


def c_ceo_letters(g, w, rng):
    (co,) = _pick(rng, w, "company")
    g.text("letters", g.lookup("ceo", co))
    return f"How many letters are in the name of the ceo of {co}?"


def c_upper_birthplace(g, w, rng):
    (p,) = _pick(rng, w, "person")
    g.text("upper", g.lookup("birthplace", p))
    return f"Write the birthplace of {p} in capital letters."


def c_first_letters_hq(g, w, rng):
    (co,) = _pick(rng, w, "company")
    g.text("first3", g.lookup("headquarters", co))
    return f"What are the first 3 letters of the headquarters city of {co}?"


def c_population_times(g, w, rng):
    (c,) = _pick(rng, w, "city")
    k = rng.randint(2, 9)
    g.math("{0} * {1}", g.lookup("population", c), str(k))
    return f"What is {k} times the population of {c}?"


def c_hq_population_plus_staff(g, w, rng):
    (co,) = _pick(rng, w, "company")
    pop = g.lookup("population", g.lookup("headquarters", co))
    g.math("{0} + {1}", pop, g.lookup("employees", co))
    return f"What is the population of the headquarters city of {co} plus its number of employees?"


def c_capital_population_gap(g, w, rng):
    a, b = _pick(rng, w, "country", 2)
    pa, pb = (g.lookup("population", g.lookup("capital", c)) for c in (a, b))
    g.math("{0} - {1}", pa, pb)
    return f"What is the population of the capital of {a} minus that of the capital of {b}?"


def c_ceo_birth_sum(g, w, rng):
    a, b = _pick(rng, w, "company", 2)
    g.math("{0} + {1}", *[g.lookup("born", g.lookup("ceo", c)) for c in (a, b)])
    return f"What is the sum of the birth years of the ceos of {a} and {b}?"


def c_age_at_founding(g, w, rng):
    (p,) = _pick(rng, w, "person")
    co = w.fact("employer", p)
    g.math("{0} - {1}", g.lookup("company_founded", co), g.lookup("born", p))
    return f"How many years after the birth of {p} was {co} founded?"


def c_smallest_birthplace(g, w, rng):
    ps = _pick(rng, w, "person", 3)
    g.math("min({0}, {1}, {2})", *[g.lookup("population", g.lookup("birthplace", p)) for p in ps])
    return f"What is the smallest population among the birthplaces of {ps[0]}, {ps[1]} and {ps[2]}?"


def c_join_reversed(g, w, rng):
    a, b = _pick(rng, w, "country", 2)
    rev = g.text("reverse", g.lookup("capital", a))
    g.text("join", rev, g.lookup("capital", b))
    return f"Reverse the capital of {a}, then join it with the capital of {b} using a hyphen."


# train-wide only: each teaches one part that train lacks and a held-out composition uses
def c_leader_birth_year(g, w, rng):
    (c,) = _pick(rng, w, "country")
    g.lookup("born", g.lookup("leader", c))
    return f"What is the birth year of the leader of {c}?"


def c_company_founding_gap(g, w, rng):
    return _founding_gap(g, w, rng, "company", "company_founded")


def c_more_employees(g, w, rng):
    a, b = _pick(rng, w, "company", 2)
    g.math("{0} > {1}", g.lookup("employees", a), g.lookup("employees", b))
    return f"Does {a} have more employees than {b}? Answer yes or no."


def c_fewest_employees(g, w, rng):
    cos = _pick(rng, w, "company", 3)
    g.math("min({0}, {1}, {2})", *[g.lookup("employees", c) for c in cos])
    return f"What is the smallest number of employees among {cos[0]}, {cos[1]} and {cos[2]}?"


COMPOSITIONS = {f.__name__[2:]: f for f in [
    c_capital, c_arith, c_capital_population, c_leader_employer_size, c_sum_population,
    c_sum_capital_populations, c_founding_gap, c_max_employees, c_latest_founding, c_older_city,
    c_bigger_capital, c_join_capitals, c_reverse_capital, c_ceo_letters, c_upper_birthplace,
    c_first_letters_hq, c_population_times, c_hq_population_plus_staff, c_capital_population_gap,
    c_ceo_birth_sum, c_age_at_founding, c_smallest_birthplace, c_join_reversed,
    c_leader_birth_year, c_company_founding_gap, c_more_employees, c_fewest_employees]}
# never used in training; "train" lacks some of their parts, "train-wide" has every one
HELDOUT_COMPOSITIONS = ("bigger_capital", "ceo_birth_sum", "age_at_founding",
                        "smallest_birthplace", "join_reversed")
PART_COMPOSITIONS = ("leader_birth_year", "company_founding_gap", "more_employees", "fewest_employees")


def compositions_for(split: str) -> list[str]:
    benchmark = [c for c in COMPOSITIONS if c not in PART_COMPOSITIONS]
    if split == "train":
        return [c for c in benchmark if c not in HELDOUT_COMPOSITIONS]
    if split == "train-wide":
        return compositions_for("train") + list(PART_COMPOSITIONS)
    if split == "heldout":
        return benchmark
    if split == "heldout-compositions":
        return list(HELDOUT_COMPOSITIONS)
    raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


def graph_depth(subtasks: list[Subtask]) -> int:
    depth: dict[int, int] = {}
    for s in subtasks:  # subtasks are in topological order by construction
        depth[s.id] = 1 + max((depth[d] for d in s.deps), default=0)
    return max(depth.values(), default=0)


def graph_width(subtasks: list[Subtask]) -> int:
    """The most subtasks at one dependency level: how many calls can truly run in parallel."""
    level: dict[int, int] = {}
    for s in subtasks:
        level[s.id] = 1 + max((level[d] for d in s.deps), default=0)
    return max(Counter(level.values()).values(), default=0)


def make_task(world: World, composition: str, rng: random.Random, split: str = "") -> Task:
    g = _Graph(world)
    question = COMPOSITIONS[composition](g, world, rng)
    depth = graph_depth(g.subtasks)
    return Task(question, g.subtasks[-1].gold, g.subtasks, composition, len(g.subtasks),
                depth, depth, split, world.seed)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


def world_for_split(split: str) -> World:
    """The split's one fixed reference world (free-text queries, single-world tests)."""
    _check_split(split)
    return world_of(f"{split}:reference")


@lru_cache(maxsize=4096)
def world_of(seed: int | str) -> World:
    """The world with this seed (cached: a task's pool and its checks share one object)."""
    return make_world(seed)


def task_world(task: Task) -> World:
    """The world a generated task was drawn from (its callees must know this world)."""
    if task.world_seed is None:
        raise ValueError("this task has no world (a loaded dataset task)")
    return world_of(task.world_seed)


def task_at(split: str, index: int, seed: int = 0, world: World | None = None) -> Task:
    """Task `index` of a split, built on its own: compositions cycle in blocks (every block
    holds each of the split's compositions once, in a seeded order), and the task's world is
    new (seed "split:seed:index") unless `world` is given."""
    _check_split(split)
    if index < 0:
        raise ValueError(f"task index must be >= 0, got {index}")
    names = compositions_for(split)
    order = random.Random(f"order:{split}:{seed}:{index // len(names)}").sample(names, len(names))
    world = world or world_of(f"{split}:{seed}:{index}")
    return make_task(world, order[index % len(names)], random.Random(f"task:{split}:{seed}:{index}"), split)


def make_tasks(split: str, n: int, seed: int = 0, world: World | None = None) -> list[Task]:
    """Tasks 0..n-1 of a split (each in its own world unless `world` is given)."""
    return [task_at(split, i, seed, world) for i in range(n)]


class _Replay:
    """Stands in for random.Random while a composition draws: hands out the given values in
    order (sample -> a list, randint -> an int), or, with no values, records each call's shape."""

    def __init__(self, values=None):
        self.values, self.calls = list(values or []), []

    def sample(self, population, k):
        self.calls.append(("sample", tuple(population), k))
        return list(self.values.pop(0)) if self.values else list(population[:k])

    def randint(self, lo, hi):
        self.calls.append(("randint", lo, hi))
        return self.values.pop(0) if self.values else lo


def task_from_question(question: str, world: World, split: str = "query") -> Task | None:
    """The generated task whose question is `question` (case and spacing aside) in `world`, or
    None: a free-text query in one of the built-in question forms, with its subtask graph, so a
    scripted policy can play it. Each composition is replayed with the entities and numbers the
    question names, in every order, and kept if it writes the same question back."""
    def norm(text):
        return " ".join(text.split()).casefold()
    target = norm(question)
    names = {n for kind in world.entities.values() for n in kind if norm(n) in target}
    numbers = [int(x) for x in re.findall(r"\d+", question)]
    for composition in COMPOSITIONS:
        probe = _Replay()
        COMPOSITIONS[composition](_Graph(world), world, probe)
        options = [itertools.permutations([n for n in call[1] if n in names], call[2]) if call[0] == "sample"
                   else [x for x in numbers if call[1] <= x <= call[2]] for call in probe.calls]
        for values in itertools.product(*options):
            g = _Graph(world)
            if norm(COMPOSITIONS[composition](g, world, _Replay(values))) == target:
                depth = graph_depth(g.subtasks)
                return Task(question, g.subtasks[-1].gold, g.subtasks, composition, len(g.subtasks), depth, depth,
                            split, world.seed)
    return None


# ---- text from outside ----

# Code points XML 1.0 cannot carry: C0 controls other than tab, newline and carriage return,
# and the non-characters U+FFFE and U+FFFF. Lone surrogates are handled before this.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def safe_text(text: str) -> str:
    """`text` safe to enter a prompt and a state message: every lone surrogate (a JSON escape
    like \\ud800, a byte that was not UTF-8 in argv) and every code point XML cannot carry
    becomes U+FFFD, as a decoder with errors="replace" does; a surrogate pair becomes the
    character it encodes. Everything else is left as it is."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:   # the UTF-16 round trip joins pairs and replaces lone halves
        text = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return _NOT_XML.sub("\ufffd", text)


def safe_json(value):
    """A parsed JSON value with `safe_text` applied to every string in it, keys included."""
    if isinstance(value, str):
        return safe_text(value)
    if isinstance(value, list):
        return [safe_json(v) for v in value]
    if isinstance(value, dict):
        return {safe_text(k): safe_json(v) for k, v in value.items()}
    return value


def load_jsonl_tasks(path: str, question_key: str = "question", answer_key: str = "answer") -> list[Task]:
    """Real-dataset tasks (one JSON object a line). They have no subtask graph: only real
    agents can answer them, and only success/efficiency can be scored. A bad line is a
    ValueError naming the file and line. Bytes that are not UTF-8 and JSON escapes of lone
    surrogates become U+FFFD (`safe_text`)."""
    tasks = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = safe_json(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not JSON ({e.msg})") from None
            except RecursionError:
                raise ValueError(f"{path}:{number}: JSON nested too deeply") from None
            if not isinstance(row, dict) or question_key not in row or answer_key not in row:
                raise ValueError(f"{path}:{number}: expected an object with {question_key!r} and {answer_key!r}")
            tasks.append(Task(str(row[question_key]), str(row[answer_key]), [], "jsonl", 1, 1, 1, split=path))
    if not tasks:
        raise ValueError(f"{path}: no tasks in it")
    return tasks
