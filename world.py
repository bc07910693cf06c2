"""The embedded world: multi-step arithmetic word problems, the black-box teacher's solver, and the
plain-text corpus the bases are pretrained on.

    python world.py --out runs/world --prompts 8000 --eval 500 --corpus 30000

A template is a prompt pattern with fields, number ranges, and a solver that writes the steps. The
same pattern renders a prompt and, compiled to a regex, parses one back: the teacher sees only text.
Operands are small (<= 9, a few start values up to 50), every intermediate value is an integer in
[0, MAX_VALUE], division is exact: what a 1-5M-parameter Llama can learn on a CPU in minutes, but
not trivially. Read top to bottom: the calculator and the solvers -> the templates -> drawing
problems -> parsing and solving a prompt (the teacher, with its occasional slip) -> the corpus ->
the tokenizer and the files the main job reads.
"""
from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

from tokenizers import Tokenizer

import data

MAX_VALUE = 100
EVAL_FRACTION = 0.2  # share of each template's problems (by numbers) reserved for eval
NAMES = {"Mia": 0, "Ava": 0, "Zoe": 0, "Nora": 0, "Ella": 0, "Ivy": 0, "Lily": 0, "Ruby": 0, "Emma": 0, "Sara": 0,
         "Tom": 1, "Leo": 1, "Sam": 1, "Omar": 1, "Finn": 1, "Max": 1, "Ben": 1, "Jack": 1, "Noah": 1, "Luke": 1}
PRONOUNS = {"She": ("She", "He"), "she": ("she", "he"), "Her": ("Her", "His"), "her": ("her", "his")}
VOCAB = {"obj": ["apples", "pens", "stamps", "marbles", "stickers", "shells", "cards", "books", "balloons",
                 "coins", "pencils", "toys", "rocks", "beads"],
         "food": ["cookies", "candies", "grapes", "muffins", "cherries", "nuts", "crackers", "plums"],
         "thing": ["book", "kite", "ball", "game", "hat", "lamp", "puzzle"],
         "vehicle": ["bus", "train", "car", "truck", "boat", "bike"]}
CONTAINERS = [("box", "boxes"), ("bag", "bags"), ("pack", "packs"), ("jar", "jars"), ("basket", "baskets")]


class _Reject(Exception):
    """A drawn problem breaks a constraint (negative, too large, inexact division)."""


class _Steps:
    """The solver's calculator: f(x, op, y, say) computes one step, checks it, records it as
    (sentence with the equation filled in, equation, value). With a limit (drawing problems) every value
    lies in [1, limit], so no answer is a degenerate 0; without (the teacher parsing) any value >= 0.
    slip=(i, d) makes step i's result d too large (the teacher's arithmetic slip); the wrong value is
    what the following steps compute with."""

    def __init__(self, fields: dict, limit: int | None, slip: tuple[int, int] | None = None):
        self.fields, self.limit, self.slip, self.steps = fields, limit, slip, []
        self.lowest = 0 if limit is None else 1

    def __call__(self, x: int, op: str, y: int, say: str) -> int:
        if op == "/" and (y == 0 or x % y):
            raise _Reject
        r = {"+": x + y, "-": x - y, "*": x * y, "/": x // max(y, 1)}[op]
        if self.slip is not None and self.slip[0] == len(self.steps):
            r += self.slip[1]
        if r < self.lowest or (self.limit is not None and r > self.limit):
            raise _Reject
        eq = f"{x} {op} {y} = {r}"
        self.steps.append((say.format(e=eq, **self.fields), eq, r))
        return r


# Solvers: one line per step; `say` is the step as a sentence ({e} = the equation), lower case unless
# it starts with a name, so it reads after "Then " and as "2. ...".
def _shop(f, a, n, c, d, **_):
    t = f(n, "*", c, "{X} buys {e} {obj}")
    t = f(a, "+", t, "{X} has {e} {obj}")
    f(t, "-", d, "after giving {d} to {Y}, {X} has {e} {obj}")


def _share(f, n, c, d, k, **_):
    t = f(n, "*", c, "{X} has {e} {food}")
    t = f(t, "-", d, "after eating {d}, {X} has {e} {food} left")
    f(t, "/", k, "each friend gets {e} {food}")


def _share_found(f, a, b, k, **_):
    t = f(a, "+", b, "together they find {e} {obj}")
    f(t, "/", k, "each friend gets {e} {obj}")


def _compare_sum(f, a, b, **_):
    y = f(a, "+", b, "{Y} has {e} {obj}")
    f(a, "+", y, "together they have {e} {obj}")


def _compare_times(f, a, b, k, **_):
    y = f(a, "-", b, "{Y} has {e} {obj}")
    f(y, "*", k, "{Z} has {e} {obj}")


def _compare_total(f, a, k, b, **_):
    y = f(a, "*", k, "{Y} has {e}")
    z = f(y, "-", b, "{Z} has {e}")
    t = f(a, "+", y, "{X} and {Y} have {e}")
    f(t, "+", z, "all three have {e} {obj}")


def _ages_future(f, a, b, c, **_):
    y = f(a, "+", b, "{Y} is {e} years old now")
    f(y, "+", c, "in {c} years {Y} will be {e} years old")


def _ages_past(f, a, k, b, c, **_):
    y = f(a, "*", k, "{Y} is {e} years old")
    z = f(y, "-", b, "{Z} is {e} years old")
    f(z, "-", c, "{c} years ago {Z} was {e} years old")


def _money_spend(f, a, n, c, **_):
    t = f(n, "*", c, "the {obj} cost {e} dollars")
    f(a, "-", t, "{X} has {e} dollars left")


def _money_earn(f, a, b, n, c, **_):
    t = f(b, "*", n, "{X} earns {e} dollars")
    t = f(a, "+", t, "{X} has {e} dollars")
    f(t, "-", c, "after buying the {thing}, {X} has {e} dollars")


def _collect_two(f, a, b, **_):
    t = f(a, "+", b, "on Tuesday {X} collects {e} {obj}")
    f(a, "+", t, "in the two days {X} collects {e} {obj}")


def _collect_three(f, a, k, b, **_):
    t = f(a, "*", k, "{X} collects {e} on Tuesday")
    w = f(t, "-", b, "{X} collects {e} on Wednesday")
    s = f(a, "+", t, "{X} collects {e} on the first two days")
    f(s, "+", w, "{X} collects {e} {obj} in all")


def _travel(f, s, h, g, **_):
    t = f(h, "+", g, "the {vehicle} travels for {e} hours")
    f(t, "*", s, "the {vehicle} travels {e} miles")


def _reading(f, c, s, h, b, **_):
    t = f(s, "*", h, "{X} reads {e} pages in {h} days")
    t = f(t, "+", b, "{X} reads {e} pages in all")
    f(c, "-", t, "{X} still has {e} pages to read")


def _boxes(f, c, n, d, **_):
    t = f(n, "*", c, "the full {box} hold {e} {obj}")
    f(t, "+", d, "{X} has {e} {obj}")


def _transfer(f, a, b, c, **_):
    x = f(a, "-", c, "{X} has {e} {obj} left")
    y = f(b, "+", c, "{Y} has {e} {obj}")
    f(y, "-", x, "{Y} has {e} more {obj} than {X}")


# (name, prompt pattern, number ranges, solver). Scenarios: shopping, sharing, comparing, ages, money,
# collecting, travel/reading, boxes, giving. Steps: 2 to 4.
TEMPLATES = [
    ("shop", "{X} has {a} {obj}. {She} buys {n} {box} of {c} {obj}. {She} gives {d} {obj} to {Y}. "
             "How many {obj} does {X} have now?", dict(a=(2, 9), n=(2, 5), c=(2, 9), d=(2, 9)), _shop),
    ("share", "{X} has {n} {box} with {c} {food} in each. {She} eats {d} of the {food}. {She} shares the rest "
              "equally among {k} friends. How many {food} does each friend get?",
     dict(n=(2, 5), c=(2, 9), d=(1, 9), k=(2, 6)), _share),
    ("share_found", "{X} finds {a} {obj} and {Y} finds {b} {obj}. They share them equally among {k} friends. "
                    "How many {obj} does each friend get?", dict(a=(2, 9), b=(2, 9), k=(2, 6)), _share_found),
    ("compare_sum", "{X} has {a} {obj}. {Y} has {b} more {obj} than {X}. How many {obj} do {X} and {Y} have "
                    "altogether?", dict(a=(2, 9), b=(2, 9)), _compare_sum),
    ("compare_times", "{X} has {a} {obj}. {Y} has {b} fewer {obj} than {X}. {Z} has {k} times as many {obj} "
                      "as {Y}. How many {obj} does {Z} have?", dict(a=(3, 9), b=(1, 9), k=(2, 5)), _compare_times),
    ("compare_total", "{X} has {a} {obj}. {Y} has {k} times as many {obj} as {X}. {Z} has {b} fewer {obj} "
                      "than {Y}. How many {obj} do the three of them have altogether?",
     dict(a=(2, 9), k=(2, 4), b=(2, 9)), _compare_total),
    ("ages_future", "{X} is {a} years old. {Y} is {b} years older than {X}. How old will {Y} be in {c} years?",
     dict(a=(3, 9), b=(2, 9), c=(2, 9)), _ages_future),
    ("ages_past", "{X} is {a} years old. {Y} is {k} times as old as {X}. {Z} is {b} years younger than {Y}. "
                  "How old was {Z} {c} years ago?", dict(a=(2, 9), k=(2, 4), b=(2, 9), c=(2, 9)), _ages_past),
    ("money_spend", "{X} has {a} dollars. {She} buys {n} {obj} for {c} dollars each. How many dollars does {X} "
                    "have left?", dict(a=(10, 30), n=(2, 5), c=(2, 9)), _money_spend),
    ("money_earn", "{X} has {a} dollars. {She} earns {b} dollars each day for {n} days. Then {she} buys a "
                   "{thing} for {c} dollars. How many dollars does {X} have now?",
     dict(a=(2, 9), b=(2, 9), n=(2, 6), c=(5, 15)), _money_earn),
    ("collect_two", "{X} collects {a} {obj} on Monday. On Tuesday {she} collects {b} more {obj} than on Monday. "
                    "How many {obj} does {X} collect in the two days?", dict(a=(2, 9), b=(2, 9)), _collect_two),
    ("collect_three", "{X} collects {a} {obj} on Monday. On Tuesday {she} collects {k} times as many {obj} as "
                      "on Monday. On Wednesday {she} collects {b} fewer {obj} than on Tuesday. How many {obj} "
                      "does {X} collect in the three days?", dict(a=(2, 9), k=(2, 4), b=(2, 9)), _collect_three),
    ("travel", "A {vehicle} travels {s} miles each hour. It travels for {h} hours in the morning and {g} hours "
               "in the afternoon. How many miles does the {vehicle} travel in total?",
     dict(s=(2, 9), h=(2, 6), g=(2, 6)), _travel),
    ("reading", "A book has {c} pages. {X} reads {s} pages each day for {h} days and then {b} more pages. "
                "How many pages does {X} still have to read?", dict(c=(20, 50), s=(2, 9), h=(2, 6), b=(2, 9)),
     _reading),
    ("boxes", "A {boxs} holds {c} {obj}. {X} fills {n} {box} and has {d} {obj} left over. How many {obj} does "
              "{X} have in all?", dict(c=(2, 9), n=(2, 9), d=(2, 9)), _boxes),
    ("transfer", "{X} has {a} {obj} and {Y} has {b} {obj}. {X} gives {c} {obj} to {Y}. How many more {obj} "
                 "does {Y} have than {X} now?", dict(a=(5, 9), b=(2, 9), c=(2, 9)), _transfer),
]


def _field_regex(field: str, ranges: dict) -> str:
    if field in ranges:
        return r"\d+"
    if field in ("X", "Y", "Z"):
        return r"[A-Z][a-z]+"
    if field in PRONOUNS:
        return "|".join(PRONOUNS[field])
    return r"[a-z]+"  # objects, containers, vehicles: any word, so the teacher handles unseen ones


def _compile(pattern: str, ranges: dict) -> re.Pattern:
    # "{X} has {a} {obj}. ... {X}" -> "(?P<X>[A-Z][a-z]+) has (?P<a>\d+) (?P<obj>[a-z]+)\. ... (?P=X)"
    out, seen, pos = [], set(), 0
    for m in re.finditer(r"\{(\w+)\}", pattern):
        f = m.group(1)
        out.append(re.escape(pattern[pos:m.start()]))
        out.append(f"(?P={f})" if f in seen else f"(?P<{f}>{_field_regex(f, ranges)})")
        seen.add(f)
        pos = m.end()
    return re.compile("".join(out) + re.escape(pattern[pos:]))


_PARSERS = [(name, _compile(pattern, ranges), ranges, solve) for name, pattern, ranges, solve in TEMPLATES]


def _fields_of(pattern: str) -> list[str]:
    return list(dict.fromkeys(re.findall(r"\{(\w+)\}", pattern)))  # unique, in order: a fixed draw order


def _draw_fields(pattern: str, ranges: dict, rng: random.Random) -> dict:
    names = rng.sample(sorted(NAMES), 3)
    box = rng.choice(CONTAINERS)
    v = {}
    for f in _fields_of(pattern):
        if f in ranges:
            v[f] = rng.randint(*ranges[f])
        elif f in ("X", "Y", "Z"):
            v[f] = names["XYZ".index(f)]
        elif f in PRONOUNS:
            v[f] = PRONOUNS[f][NAMES[names[0]]]  # pronouns always refer to X
        elif f in ("box", "boxs"):
            v[f] = box[1] if f == "box" else box[0]
        else:
            v[f] = rng.choice(VOCAB[f])
    return v


def _is_eval(name: str, v: dict, ranges: dict) -> bool:
    # The split hashes the problem's arithmetic (template and numbers), not its names or objects, and not
    # the seed: an eval problem is never a train problem in other words, whatever seeds are used.
    return data.hash_to_unit(json.dumps([name] + [v[k] for k in sorted(ranges)])) < EVAL_FRACTION


def world_templates(names=None) -> list[tuple]:
    """The TEMPLATES entries named (a list, or a comma-separated string; None or "all": every one)."""
    if names is None or names == "all":
        return list(TEMPLATES)
    if isinstance(names, str):
        names = [x.strip() for x in names.split(",") if x.strip()]
    known = {t[0]: t for t in TEMPLATES}
    bad = [x for x in names if x not in known]
    if bad or not names:
        raise data.DataError(f"unknown world template(s) {', '.join(bad) or '(none given)'}; "
                        f"expected names from {', '.join(known)} or 'all'")
    return [known[x] for x in dict.fromkeys(names)]


# The main job's world: the two-step templates, one for each pair of operations. Longer chains (3-4 steps,
# all 16 templates) are there for harder worlds; measured, a tiny proxy trained from scratch for 1,000 steps
# on teacher solutions reached 46 % on four two-step templates, 16 % with two three-step ones among five,
# 8.5 % on all sixteen.
DEFAULT_TEMPLATES = ("ages_future", "boxes", "money_spend", "share_found", "compare_times")


def make_problems(n: int, seed: int, split: str = "train", templates=None) -> list[dict]:
    """n distinct problems {id, prompt, answer (str of an int), template}, templates (see world_templates)
    drawn uniformly. Distinct means distinct text: two problems may share their arithmetic in other names
    and objects, as a small template has only a few hundred number choices. Train and eval problems never
    share their arithmetic (see _is_eval); a template whose problems run out leaves the draw."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    rng = random.Random(f"world:{split}:{seed}")
    chosen = world_templates(templates)
    out, seen, pool = [], set(), list(range(len(chosen)))
    while len(out) < n:
        if not pool:
            raise ValueError(f"only {len(out)} distinct {split} problems exist; ask for fewer")
        t = rng.choice(pool)
        name, pattern = chosen[t][:2]
        for _ in range(2000):  # redraw numbers until they fit: every template stays equally likely
            drawn = _draw_solved(chosen[t], rng, split)
            if drawn is not None and pattern.format(**drawn[0]) not in seen:
                break
        else:  # 2000 draws without a new problem: this template is used up
            pool.remove(t)
            continue
        v, steps = drawn
        prompt = pattern.format(**v)
        seen.add(prompt)
        out.append({"id": f"{split}-{data.content_hash(prompt, 12)}", "prompt": prompt,
                    "answer": str(steps.steps[-1][2]), "template": name})
    return out


def _draw_solved(template: tuple, rng: random.Random, split: str):
    """One draw of a template's fields and its solved steps, (fields, _Steps); None where the arithmetic
    belongs to the other split or breaks a constraint (negative, zero, too large, inexact division)."""
    name, pattern, ranges, solve = template
    v = _draw_fields(pattern, ranges, rng)
    if _is_eval(name, v, ranges) != (split == "eval"):
        return None
    steps = _Steps(v, MAX_VALUE)
    try:
        solve(steps, **v)
    except _Reject:
        return None
    return v, steps


def _parse(text: str, slip: tuple[int, int] | None = None):
    """Prompt text -> the solver's steps [(sentence, equation, value)], or None if no template matches
    or the numbers do not work out (also after a slip: see _Steps)."""
    text = " ".join(text.split())
    for _, regex, ranges, solve in _PARSERS:
        m = regex.fullmatch(text)
        if m:
            v = {k: int(x) if k in ranges else x for k, x in m.groupdict().items()}
            steps = _Steps(v, None, slip)  # no size limit: the teacher solves larger numbers too
            try:
                solve(steps, **v)
            except _Reject:
                return None
            return steps.steps
    return None


def solve(prompt_text: str) -> int | None:
    steps = _parse(prompt_text)
    return None if steps is None else steps[-1][2]


STYLES = ("equations", "steps", "prose")
SLIPS = (1, -1, 2, -2, 3, -3)  # how far off a slipped step's result is


def teacher_solution(prompt_text: str, rng: random.Random, style: str | None = None,
                     slip_rate: float = 0.0) -> str | None:
    """What the black-box teacher answers: a step-by-step solution in a phrasing drawn with rng (like an
    LLM sampling), ending with `#### N`; None if the prompt is not a world problem. With probability
    slip_rate one step's result is off by a little and the wrong value is carried to a wrong final
    answer, as an LLM sampled at temperature 1 sometimes slips; at 0 nothing more is drawn from rng."""
    steps = _parse(prompt_text)
    if steps is None:
        return None
    style = style or rng.choice(STYLES)
    # The upper tail of the draw: a greedy rng (every draw 0, temperature 0) slips only at rate 1.
    if slip_rate > 0 and rng.random() >= 1 - slip_rate:
        steps = _slipped(prompt_text, steps, rng)
    answer = steps[-1][2]
    if style == "equations":
        lines = [eq for _, eq, _ in steps]
    elif style == "steps":
        lines = [f"{i}. {say[0].upper()}{say[1:]}." for i, (say, _, _) in enumerate(steps, 1)]
    elif style == "prose":
        words = ["First, "] + [rng.choice(["Then ", "Next, "]) for _ in steps[1:-1]] + ["So "]
        lines = [" ".join(f"{w}{say}." for w, (say, _, _) in zip(words, steps)), f"The answer is {answer}."]
    else:
        raise ValueError(f"unknown style {style!r}; expected one of {', '.join(STYLES)}")
    return "\n".join(lines + [f"#### {answer}"])


def _slipped(prompt_text: str, steps: list, rng: random.Random) -> list:
    """The steps with one slip: (step, offset) pairs in a random order, the first whose following steps
    still work out (exact division, no negative value) and whose final answer is wrong. One always
    does: the last step with a positive offset."""
    candidates = [(i, d) for i in range(len(steps)) for d in SLIPS]
    rng.shuffle(candidates)
    tried = (_parse(prompt_text, slip) for slip in candidates)
    return next(wrong for wrong in tried if wrong is not None and wrong[-1][2] != steps[-1][2])


def _equation(rng: random.Random) -> str:
    """One arithmetic fact in the ranges the problems use: sums and differences up to MAX_VALUE with a
    small second operand, products and exact quotients of the 12 x 12 table."""
    op = rng.choice("+-*/")
    if op == "+":
        a, b = rng.randint(0, rng.choice([12, 40, MAX_VALUE - 12])), rng.randint(0, 12)
        a, b, r = (b, a, a + b) if rng.random() < 0.5 else (a, b, a + b)
    elif op == "-":
        r, b = rng.randint(0, rng.choice([12, 40, MAX_VALUE - 12])), rng.randint(0, 12)
        a = r + b
    elif op == "*":
        a, b = rng.randint(0, 12), rng.randint(0, 12)
        r = a * b
    else:
        r, b = rng.randint(0, 12), rng.randint(1, 12)
        a = r * b
    if rng.random() < 0.7:
        return f"{a} {op} {b} = {r}"
    return f"{a} {_WORDS[op]} {b} is {r}"


SCENE_SHARE = 0.85  # share of scenes among the corpus documents; the rest are lines of facts


def pretrain_corpus(n: int, seed: int, templates=None) -> list[str]:
    """n short plain-text documents for the base models, of two kinds:
    - scenes (SCENE_SHARE of them): a situation and its question, then on the next line the facts that
      answer it, each with its arithmetic in words ("Max has 3 jars with 12 nuts in each. He eats 6 of the
      nuts. How many nuts does Max have left?\n3 times 12 is 36, so Max has 36 nuts. 36 minus 6 is 30, so
      after eating 6, Max has 30 nuts left."), so a base learns to read names and numbers from context
      and to compute with them, as open LLMs learn from worked examples on the web;
    - lines of equations ("7 + 5 = 12", "3 times 4 is 12") and world statements ("Mia has 6 apples.").
    Measured on the main job's five templates (tiny proxy, 1,000 steps from scratch): a corpus of scenes
    only let the base finish 45 % of held-out scenes with every number right; half scenes and half fact
    lines gave 2 % after 1,875 steps. Fact lines carry no reading-from-context signal.
    No symbolic equations inside sentences, no numbered steps, no "####": how the teacher writes a
    solution is what the teacher's data teaches. Scenes use train-split arithmetic only."""
    rng = random.Random(f"corpus:{seed}")
    chosen = world_templates(templates)
    statements = [(re.split(r"(?<=\.) ", pattern)[:-1], pattern, ranges) for _, pattern, ranges, _ in chosen]
    docs = []
    for _ in range(n):
        if rng.random() < SCENE_SHARE:
            docs.append(_scene_draw(rng, chosen)[2])
            continue
        lines = []
        for _ in range(rng.randint(3, 7)):
            if rng.random() < 0.5:
                lines.append(_equation(rng))
            else:
                sentences, pattern, ranges = rng.choice(statements)
                v = _draw_fields(pattern, ranges, rng)
                lines.append(rng.choice(sentences).format(**v))
        docs.append("\n".join(lines))
    return docs


def _scene_draw(rng: random.Random, templates=TEMPLATES):
    """(template name, fields, text) of one scene: the situation and the question it raises, a line
    break, then the facts that answer it with their arithmetic in words. Eval-split arithmetic is redrawn."""
    while True:
        template = rng.choice(templates)
        drawn = _draw_solved(template, rng, "train")
        if drawn is None:
            continue
        (name, pattern), (v, steps) = template[:2], drawn
        facts = []
        for sentence, eq, r in steps.steps:
            x, op, y, _, _ = eq.split(" ")
            facts.append(f"{x} {_WORDS[op]} {y} is {r}, so {sentence.replace(eq, str(r))}.")
        return name, v, pattern.format(**v) + "\n" + " ".join(f[0].upper() + f[1:] for f in facts)


_WORDS = {"+": "plus", "-": "minus", "*": "times", "/": "divided by"}


def world_tokenizer(vocab_size: int = 1024, seed: int = 0) -> Tokenizer:
    """The embedded world's tokenizer: BPE on the pretraining corpus plus train problems and teacher
    solutions in every style (so the solutions' words are tokens too), over every template, so one
    tokenizer serves any choice of templates. Eval problems are not used."""
    rng = random.Random(seed)
    texts = pretrain_corpus(2000, seed, "all")
    for p in make_problems(500, seed, "train", "all"):
        texts += [p["prompt"]] + [teacher_solution(p["prompt"], rng, s) for s in STYLES]
    return data.train_tokenizer(texts, vocab_size)


# ----------------------------------------------------------------------------------------------- CLI

def validation_problems(n: int, seed: int, eval_rows: list[dict], templates=None) -> list[dict]:
    """n held-out problems for choosing hyperparameters: drawn like the eval problems (never a train
    problem's arithmetic) with another seed, none with an eval problem's text. They share the eval side's
    arithmetic pool (a few hundred number choices per template), in other names and objects."""
    taken = {r["prompt"] for r in eval_rows}
    rows = [r for r in make_problems(n + len(taken), seed + 123, "eval", templates) if r["prompt"] not in taken]
    return [{**r, "id": "val-" + r["id"].split("-", 1)[1]} for r in rows[:n]]


def write_world(out_dir, n_prompts: int, n_eval: int, n_corpus: int, vocab_size: int, seed: int,
                templates=None, n_val: int = 300):
    """Everything the main job needs from the world: tokenizer, teacher prompts (the teacher sees only the
    prompt text; "answer" stays here for scoring), held-out eval problems, validation problems (for
    choosing hyperparameters; see validation_problems), and the pretraining corpus."""
    chosen = [t[0] for t in world_templates(templates)]  # unknown names fail before anything is written
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data.save_tokenizer(world_tokenizer(vocab_size, seed), out, fmt="plain")
    data.write_jsonl(out / "prompts.jsonl", make_problems(n_prompts, seed, "train", chosen))
    eval_rows = make_problems(n_eval, seed, "eval", chosen)
    data.write_jsonl(out / "eval.jsonl", eval_rows)
    data.write_jsonl(out / "val.jsonl", validation_problems(n_val, seed, eval_rows, chosen))
    data.write_jsonl(out / "corpus.jsonl", [{"text": t} for t in pretrain_corpus(n_corpus, seed, chosen)])



def main(argv=None):
    import argparse
    p = argparse.ArgumentParser(description="Write the embedded world: tokenizer, prompts.jsonl, eval.jsonl, val.jsonl, corpus.jsonl.")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--prompts", type=int, default=4000, help="problems the teacher will answer (all of D_w+D_p+D_s)")
    p.add_argument("--eval", type=int, default=500, help="held-out problems for accuracy (never in --prompts)")
    p.add_argument("--val", type=int, default=300, help="validation problems (none with an eval problem's text)")
    p.add_argument("--corpus", type=int, default=20000, help="plain-text documents to pretrain the bases on")
    p.add_argument("--vocab-size", type=int, default=1024, help="BPE vocabulary (the world needs ~700)")
    p.add_argument("--seed", type=int, default=0, help="seed of every draw")
    p.add_argument("--templates", default=",".join(DEFAULT_TEMPLATES),
                   help="comma-separated template names (see world.TEMPLATES), or 'all'")
    args = p.parse_args(argv)
    try:
        write_world(args.out, args.prompts, args.eval, args.corpus, args.vocab_size, args.seed, args.templates,
                    args.val)
    except data.DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"world: {args.prompts} prompts, {args.eval} eval and {args.val} validation problems, {args.corpus} corpus documents in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
