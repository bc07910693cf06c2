"""world.py: problems deterministic and disjoint between train and eval, small numbers, the teacher's
solver reading text (right in every phrasing, wrong by one carried slip at its slip rate), the corpus."""
import random
import re
from collections import Counter

import pytest

import data
import world

@pytest.fixture(scope="module")
def train_eval():
    return world.make_problems(2000, seed=0), world.make_problems(400, seed=0, split="eval")


def test_world_sets_deterministic_distinct_and_disjoint(train_eval):
    train, ev = train_eval
    assert world.make_problems(50, seed=0) == train[:50]
    assert world.make_problems(50, seed=1) != train[:50]
    for rows in train_eval:
        assert len({r["id"] for r in rows}) == len({r["prompt"] for r in rows}) == len(rows)
    # Never a shared problem, not even in other words: compare the arithmetic (template and numbers),
    # here across other seeds too.
    arith = lambda rows: {(r["template"], world._parse(r["prompt"])[-1][1],
                           tuple(int(x) for x in re.findall(r"\d+", r["prompt"]))) for r in rows}
    other_train = world.make_problems(2000, seed=7)
    assert not arith(train + other_train) & arith(ev + world.make_problems(300, seed=5, split="eval"))
    assert set(Counter(r["template"] for r in train)) == {t[0] for t in world.TEMPLATES}
    assert len(world.TEMPLATES) >= 6


def test_world_numbers_are_small(train_eval, tok):
    for r in train_eval[0] + train_eval[1]:
        steps = world._parse(r["prompt"])
        assert 2 <= len(steps) <= 4
        assert all(1 <= v <= world.MAX_VALUE for _, _, v in steps)  # no degenerate 0
        assert len(tok.encode(r["prompt"]).ids) <= 60


def test_teacher_solution_is_right_in_every_style(train_eval):
    rng = random.Random(0)
    for r in train_eval[0][:600] + train_eval[1]:
        assert world.solve(r["prompt"]) == int(r["answer"])
        for style in world.STYLES:
            text = world.teacher_solution(r["prompt"], rng, style)
            assert text.endswith(f"\n#### {r['answer']}") and data.is_correct(text, r["answer"]), text
    drawn = Counter(world.teacher_solution(train_eval[0][0]["prompt"], rng).split("\n")[0][:2] for _ in range(60))
    assert len(drawn) == 3  # the teacher samples its phrasing


def test_slip_rate_zero_draws_nothing_more(train_eval):
    for r in train_eval[0][:300]:
        a, b = random.Random(r["id"]), random.Random(r["id"])
        assert world.teacher_solution(r["prompt"], a) == world.teacher_solution(r["prompt"], b, slip_rate=0.0)
        assert a.getstate() == b.getstate()


def _equation_lines(text):
    return [line for line in text.split("\n") if " = " in line]


def test_slip_rate_one_is_one_carried_slip_and_a_wrong_answer(train_eval):
    rng = random.Random(0)
    for r in train_eval[0][:400] + train_eval[1][:100]:
        text = world.teacher_solution(r["prompt"], rng, "equations", slip_rate=1.0)
        assert text.endswith(f"\n#### {data.extract_answer(text)}") and not data.is_correct(text, r["answer"])
        eqs = [line.split(" ") for line in _equation_lines(text)]  # "x op y = r"
        true = [eval(f"{x} {op.replace('/', '//')} {y}") for x, op, y, _, _ in eqs]  # noqa: S307 (our digits)
        off = [int(e[4]) - t for e, t in zip(eqs, true)]
        assert sum(d != 0 for d in off) == 1 and 1 <= max(map(abs, off)) <= 3  # one small slip ...
        slipped = next(k for k, d in enumerate(off) if d)
        later = [(x, y) for x, _, y, _, _ in eqs[slipped + 1:]]  # the wrong value is computed with ...
        assert slipped == len(eqs) - 1 or any(eqs[slipped][4] in xy for xy in later)
        assert world.solve(r["prompt"]) == int(r["answer"]) != int(eqs[-1][4])  # ... to the end
        for style in ("steps", "prose"):  # every phrasing stays well-formed
            text = world.teacher_solution(r["prompt"], rng, style, slip_rate=1.0)
            assert "\n#### " in text and not data.is_correct(text, r["answer"])


def test_slip_rate_is_a_rate(train_eval):
    rng = random.Random(1)
    wrong = [not data.is_correct(world.teacher_solution(r["prompt"], rng, slip_rate=0.3), r["answer"])
             for r in train_eval[0]]
    assert abs(sum(wrong) / len(wrong) - 0.3) < 0.04  # 2,000 draws: 4 standard deviations


def test_teacher_reads_text_not_templates():
    # Hand-written prompts (other names, objects, spacing) and hand-computed answers.
    cases = [("Kim has 7 plums. She buys 2 crates of 6 plums. She gives 4 plums to Al. "
              "How many plums does Kim have now?", 15),
             ("Dan is 9 years old.  Eve is 3 years older than Dan.\nHow old will Eve be in 10 years?", 22),
             ("Al has 300 dollars. He buys 4 lamps for 25 dollars each. How many dollars does Al have left?", 200),
             ("A van travels 15 miles each hour. It travels for 2 hours in the morning and 3 hours in the "
              "afternoon. How many miles does the van travel in total?", 75),
             ("Bo has 3 bags with 5 nuts in each. He eats 3 of the nuts. He shares the rest equally among "
              "4 friends. How many nuts does each friend get?", 3)]
    for prompt, answer in cases:
        assert world.solve(prompt) == answer
        assert data.is_correct(world.teacher_solution(prompt, random.Random(1)), answer)
    assert world.solve("Bo has 3 bags with 5 nuts in each. He eats 2 of the nuts. He shares the rest "
                      "equally among 4 friends. How many nuts does each friend get?") is None  # 13 / 4
    assert world.teacher_solution("What is the capital of France?", random.Random(0)) is None


def test_pretrain_corpus_is_plain_text_not_solutions():
    docs = world.pretrain_corpus(300, seed=0)
    assert docs == world.pretrain_corpus(300, seed=0) and docs != world.pretrain_corpus(300, seed=1)
    scenes = [d for d in docs if ", so " in d]
    facts = [d for d in docs if ", so " not in d]
    lines = [line for d in facts for line in d.split("\n")]
    assert not any("####" in d or "answer" in d for d in docs) and not any("?" in line for line in lines)
    eqs = [line for line in lines if " = " in line]
    assert len(eqs) > 30
    for line in eqs:
        lhs, rhs = line.split(" = ")  # equations stand alone, never inside a sentence
        assert eval(lhs.replace("/", "//")) == int(rhs)  # noqa: S307 (our own generated digits)
    assert any(" has " in line for line in lines) and any(" times " in line for line in lines)
    # Scenes: a situation and its question, a line break, then the facts that answer it in sentences,
    # arithmetic in words, never in symbols; the last fact's number is the problem's answer.
    assert len(scenes) > 0.75 * len(docs)
    for s in scenes:
        problem, worked = s.split("\n")
        assert problem.endswith("?") and "?" not in worked and worked.count(", so ") >= 2
        assert world.solve(problem) == int(re.findall(r"\d+", worked)[-1])
        assert not re.search(r"\d [-+*/=] \d", worked) and not re.match(r"\d+\.", worked)
    rng = random.Random(0)  # every scene's arithmetic is from the train split, never eval
    for _ in range(300):
        name, v, _text = world._scene_draw(rng)
        ranges = next(r for n, _, r, _ in world.TEMPLATES if n == name)
        assert not world._is_eval(name, v, ranges)


def test_world_template_choice(tmp_path, capsys):
    rows = world.make_problems(300, seed=0, templates="share_found")
    # 300 distinct texts from a template with fewer number choices: arithmetic repeats in other words
    assert len({r["prompt"] for r in rows}) == 300 and {r["template"] for r in rows} == {"share_found"}
    assert len({tuple(re.findall(r"\d+", r["prompt"])) for r in rows}) < 100
    ev = world.make_problems(50, seed=0, split="eval", templates=["share_found", "boxes"])
    assert {r["template"] for r in ev} == {"share_found", "boxes"}
    assert all(world.solve(r["prompt"]) == int(r["answer"]) for r in rows + ev)
    rng = random.Random(0)
    assert {world._scene_draw(rng, world.world_templates("boxes"))[0] for _ in range(20)} == {"boxes"}
    assert [t[0] for t in world.world_templates(None)] == [t[0] for t in world.TEMPLATES] == \
        [t[0] for t in world.world_templates("all")]
    assert set(world.DEFAULT_TEMPLATES) <= {t[0] for t in world.TEMPLATES}
    with pytest.raises(data.DataError, match="unknown world template.*nope"):
        world.world_templates("boxes,nope")
    # the CLI refuses an unknown name in one line before writing anything
    assert world.main(["--out", str(tmp_path / "w"), "--templates", "boxes,nope"]) == 2
    assert "nope" in capsys.readouterr().err and not (tmp_path / "w").exists()


def test_validation_problems_are_held_out_from_train_and_eval(train_eval):
    train, ev = train_eval
    val = world.validation_problems(200, seed=0, eval_rows=ev)
    assert len(val) == 200 and all(r["id"].startswith("val-") for r in val)
    assert not {r["prompt"] for r in val} & {r["prompt"] for r in ev + train}
    arith = lambda rows: {(r["template"], tuple(re.findall(r"\d+", r["prompt"]))) for r in rows}
    assert not arith(val) & arith(train)  # drawn on the eval side of the hash: never a train problem's numbers
    assert val == world.validation_problems(200, seed=0, eval_rows=ev)
