"""table.py: the failure breakdown counts what it says, collect writes mean ± std over runs, and summary gathers
the stages' wall time."""
import json
import os
import random
import re
import statistics

import numpy as np
import pytest

import data
import evaluation
import table
from conftest import write_world
from model import Config, Llama


def test_number_accuracy_counts_every_digit_and_number(tmp_path):
    tok, rows = write_world(tmp_path, 12)
    data.write_jsonl(tmp_path / "teacher.jsonl", rows)
    ids = data.special_ids(tok)
    cfg = Config.preset("toy", tok.get_vocab_size(), bos_token_id=ids["bos"], eos_token_id=ids["eos"])
    Llama(cfg).init_weights(seed=0).save_pretrained(tmp_path / "m")
    data.save_tokenizer(tok, tmp_path / "m")
    res = table.number_accuracy(tmp_path / "m", tmp_path / "teacher.jsonl")
    digits = sum(len(re.findall(r"\d", r["response"])) for r in rows)  # digits are single tokens
    results = sum(len(re.findall(r"= \d+", r["response"])) for r in rows)
    assert res["digits"][1] == digits and res["step results"][1] == results
    assert 0 < res["copied numbers"][1] <= sum(len(re.findall(r"\d+", r["response"])) for r in rows) - results
    assert all(0.0 <= acc <= 1.0 for acc, _ in res.values())


def test_collect_means_and_stds(tmp_path):
    for seed, acc in ((0, 0.10), (1, 0.20)):
        d = tmp_path / f"seed{seed}" / "student_proxykd"
        d.mkdir(parents=True)
        (d / "eval.json").write_text(json.dumps({"accuracy": acc}))
    text = table.collect([tmp_path / "seed0", tmp_path / "seed1"], tmp_path / "bases", tmp_path / "t.md", None)
    assert "| Proxy-KD | student | 15.0 ± 7.1 | 2 |" in text


def test_summary_gathers_every_stage_timing_into_the_run(tmp_path):
    run, bases, teacher = tmp_path / "seed0", tmp_path / "bases", tmp_path / "teacher"
    stages = [(bases / "proxy", {"train": 180.0, "eval": 12.0}), (teacher, {"teacher": 8.0, "teacher_eval": 2.0}),
              (run / "proxy_sft", {"train": 30.0, "eval": 10.0}),
              (run / "proxy", {"round_00/eval": 10.0, "round_01/sample": 12.0, "round_01/reference": 2.5,
                               "round_01/train": 13.0, "round_01/eval": 10.0}),
              (run / "cache_proxy", {"cache": 4.0})]
    for i, (d, phases) in enumerate(stages):
        d.mkdir(parents=True)
        (d / "timing.json").write_text(json.dumps(phases))
        os.utime(d / "timing.json", (1000 + i, 1000 + i))  # the order the stages ran in
    (run / "proxy" / "round_01").mkdir()
    (run / "proxy" / "round_01" / "timing.json").write_text("not json")  # unreadable: skipped
    text = table.summary(run, bases, teacher)
    rec = json.loads((run / "timing.json").read_text())
    assert list(rec["stages"]) == ["bases/proxy", "teacher", "proxy_sft", "proxy", "cache_proxy"]
    assert rec["stages"]["proxy"] == {"seconds": 47.5, "phases": stages[3][1]}
    assert rec["total_seconds"] == 192 + 10 + 40 + 47.5 + 4
    lines = text.splitlines()
    assert "  bases/proxy                     192.0   train 180.0 · eval 12.0" in lines
    assert "    round_01                       37.5   sample 12.0 · reference 2.5 · train 13.0 · eval 10.0" in lines
    assert lines[-1] == "  total                           293.5"
    assert table.summary(run, bases, teacher) == text  # the gathered file is not read back as a stage


def test_study_reads_every_axis_around_the_main_job(tmp_path):
    def acc(path, a):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"accuracy": a, "n": 10}))
    acc(tmp_path / "ref" / "blackbox.json", 0.50)
    acc(tmp_path / "ref" / "proxykd.json", 0.60)
    for k, a in ((0, 0.3), (1, 0.5), (2, 0.8)):
        acc(tmp_path / f"proxy_round_{k:02d}.json", a)
    acc(tmp_path / "round_00" / "eval.json", 0.45)
    acc(tmp_path / "alpha_10" / "eval.json", 0.40)
    acc(tmp_path / "gamma_0.1" / "eval.json", 0.55)
    acc(tmp_path / "slip_0" / "run" / "student_blackbox" / "eval.json", 0.42)
    acc(tmp_path / "slip_0" / "run" / "student_proxykd" / "eval.json", 0.47)
    acc(tmp_path / "slip_0" / "run" / "proxy" / "eval.json", 0.70)
    text = table.study([tmp_path], {"alpha": 1, "gamma": 0.4, "rounds": 2, "slip": 0.1}, tmp_path / "s.md", None)
    rows = {tuple(c.strip() for c in line.split("|")[2:7]) for line in text.splitlines()[2:]}
    assert ("0", "30.0", "50.0", "45.0", "-5.0") in rows      # Proxy-KD from the warm-up proxy
    assert ("1", "50.0", "50.0", "—", "—") in rows            # round 1: its student not trained yet
    assert ("2", "80.0", "50.0", "60.0", "+10.0") in rows     # the main job, on the round axis
    assert ("1", "—", "50.0", "60.0", "+10.0") in rows        # ... and on the alpha axis
    assert ("10", "—", "50.0", "40.0", "-10.0") in rows
    assert ("0.1", "—", "50.0", "55.0", "+5.0") in rows       # gamma 0.1
    assert ("0", "70.0", "42.0", "47.0", "+5.0") in rows      # slip 0 brings its own proxy and students
    assert ("0.1", "80.0", "50.0", "60.0", "+10.0") in rows   # slip 0.1 is the main job, with its aligned proxy
    assert len(rows) == 2 + 2 + 2 + 2 + 1  # rounds 0-2, alpha 1 and 10, gamma 0.4 and 0.1, slip 0 and 0.1


def test_study_over_seeds_pairs_each_seed_s_gain(tmp_path):
    def acc(path, a):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"accuracy": a, "n": 10}))
    dirs = [tmp_path / "s0", tmp_path / "s1"]
    for d, (bb, pkd, slip_bb, slip_pkd) in zip(dirs, ((0.50, 0.60, 0.30, 0.50), (0.70, 0.66, 0.40, 0.44))):
        acc(d / "ref" / "blackbox.json", bb)
        acc(d / "ref" / "proxykd.json", pkd)
        acc(d / "proxy_round_02.json", 0.8)
        acc(d / "slip_0.3" / "run" / "student_blackbox" / "eval.json", slip_bb)
        acc(d / "slip_0.3" / "run" / "student_proxykd" / "eval.json", slip_pkd)
    acc(dirs[0] / "alpha_10" / "eval.json", 0.40)  # a point only one seed has
    text = table.study(dirs, {"alpha": 1, "gamma": 0.4, "rounds": 2, "slip": 0.1}, tmp_path / "s.md", None)
    lines = text.splitlines()
    assert lines[0].endswith("| seeds |") and lines[1].count("---") == 7
    rows = {tuple(c.strip() for c in line.split("|")[2:8]) for line in lines[2:]}
    # gains +10 and -4: paired per seed, not the difference of the two means (which is the same here, +3)
    assert ("0.1", "80.0 ± 0.0", "60.0 ± 14.1", "63.0 ± 4.2", "+3.0 ± 9.9", "2") in rows  # the main job's slip
    assert ("0.3", "—", "35.0 ± 7.1", "47.0 ± 4.2", "+12.0 ± 11.3", "2") in rows
    assert ("10", "—", "50.0 ± 0.0", "40.0 ± 0.0", "-10.0", "1") in rows


def test_paired_difference_by_hand():
    """d = [1, 0, 0, 1], mean 0.5; groups x = {0, 1}, y = {2}, z = {3} sum d - mean to 0, -0.5, 0.5; G = 3:
    se = sqrt(3/2 * 0.5) / 4."""
    a = {"correct": [1, 1, 0, 1], "groups": ["x", "x", "y", "z"]}
    b = {"correct": [0, 1, 0, 0], "groups": ["x", "x", "y", "z"]}
    d, se, G = table.paired_difference(a, b)
    assert (d, G) == (0.5, 3) and abs(se - 0.75 ** 0.5 / 4) < 1e-15


def test_paired_difference_is_the_paired_t_error_with_one_problem_a_group():
    rng = random.Random(0)
    a = {"correct": [rng.randint(0, 1) for _ in range(50)], "groups": [str(i) for i in range(50)]}
    b = {"correct": [rng.randint(0, 1) for _ in range(50)], "groups": a["groups"]}
    d, se, G = table.paired_difference(a, b)
    diffs = [x - y for x, y in zip(a["correct"], b["correct"])]
    assert G == 50 and abs(d - statistics.mean(diffs)) < 1e-15
    assert abs(se - statistics.stdev(diffs) / 50 ** 0.5) < 1e-12


def test_paired_difference_matches_a_cluster_bootstrap():
    """The formula against its definition: redraw whole groups with replacement many times (float64 numpy) and take
    the spread of the mean difference. Groups of 1-6 problems that tend to be right or wrong together."""
    rng = np.random.default_rng(0)
    groups, ca, cb = [], [], []
    for g in range(300):
        size, pa, pb = rng.integers(1, 7), rng.uniform(0.5, 1.0), rng.uniform(0.5, 1.0)
        ka, kb = rng.random() < pa, rng.random() < pb  # the group's arithmetic known or not, mostly shared
        for _ in range(size):
            groups.append(f"g{g}")
            ca.append(int(ka if rng.random() < 0.9 else not ka))
            cb.append(int(kb if rng.random() < 0.9 else not kb))
    d, se, G = table.paired_difference({"correct": ca, "groups": groups}, {"correct": cb, "groups": groups})
    keys = sorted(set(groups), key=lambda k: int(k[1:]))
    dsum = np.array([sum(x - y for x, y, k in zip(ca, cb, groups) if k == key) for key in keys], dtype=np.float64)
    size = np.array([groups.count(key) for key in keys], dtype=np.float64)
    pick = rng.integers(0, len(keys), size=(20000, len(keys)))
    boot = dsum[pick].sum(1) / size[pick].sum(1)
    assert G == 300 and abs(d - dsum.sum() / size.sum()) < 1e-12
    assert abs(boot.std() / se - 1) < 0.05


def test_paired_difference_refuses_records_over_other_problems():
    a = {"correct": [1, 0], "groups": ["x", "y"]}
    with pytest.raises(ValueError, match="same problems"):
        table.paired_difference(a, {"correct": [1, 0], "groups": ["x", "z"]})


def test_group_key_joins_the_same_arithmetic_in_other_words():
    same = [{"prompt": "Mia has 3 pens. She buys 4 more. How many?", "template": "t"},
            {"prompt": "Tom has 3 cards. He buys 4 more. How many?", "template": "t"}]
    assert evaluation.group_key(same[0]) == evaluation.group_key(same[1]) == "t 3 4"
    assert evaluation.group_key({**same[0], "template": "u"}) != evaluation.group_key(same[0])
    assert evaluation.group_key({"messages": [{"role": "user", "content": "1,000 and 2.50"}]}) == " 1000 2.5"


def test_summary_states_the_gain_with_its_error_and_compare_reads_two_records(tmp_path, capsys):
    run, bases = tmp_path / "seed0", tmp_path / "bases"
    groups = ["a", "a", "b", "c"]
    for where, correct in (("student_blackbox", [0, 0, 1, 1]), ("student_proxykd", [1, 1, 1, 0])):
        (run / where).mkdir(parents=True)
        (run / where / "eval.json").write_text(json.dumps({"accuracy": sum(correct) / 4, "n": 4, "correct": correct,
                                                           "groups": groups}))
    text = table.summary(run, bases)
    d, se, _ = table.paired_difference(*(json.loads((run / w / "eval.json").read_text())
                                         for w in ("student_proxykd", "student_blackbox")))
    assert f"Proxy-KD − black-box KD" in text and f"{100 * d:+6.1f} ± {100 * se:.1f} points" in text
    assert "3 groups of shared numbers" in text and "aligned proxy − black-box KD" not in text
    assert table.main(["compare", str(run / "student_proxykd" / "eval.json"),
                       str(run / "student_blackbox" / "eval.json")]) == 0
    assert "A − B +25.0 ±" in capsys.readouterr().out
    (run / "old.json").write_text(json.dumps({"accuracy": 0.5}))
    assert table.main(["compare", str(run / "old.json"), str(run / "student_blackbox" / "eval.json")]) == 2
    assert "per-problem scores" in capsys.readouterr().err


def test_collect_states_each_seeds_gain_and_their_mean(tmp_path):
    for seed, (bb, pk) in enumerate((([0, 1, 1, 1], [1, 1, 1, 1]), ([1, 1, 1, 1], [1, 1, 1, 0]))):
        for where, correct in (("student_blackbox", bb), ("student_proxykd", pk)):
            d = tmp_path / f"seed{seed}" / where
            d.mkdir(parents=True)
            d.joinpath("eval.json").write_text(json.dumps({"accuracy": sum(correct) / 4, "n": 4, "correct": correct,
                                                           "groups": ["a", "b", "c", "d"]}))
    text = table.collect([tmp_path / "seed0", tmp_path / "seed1"], tmp_path / "bases", tmp_path / "t.md", None)
    se = (4 / 3 * (0.75 ** 2 + 3 * 0.25 ** 2)) ** 0.5 / 4  # d = [1, 0, 0, 0] (seed 0), mean 0.25
    assert f"| Proxy-KD − black-box KD | seed0 +25.0 ± {100 * se:.1f} / seed1 -25.0 ± {100 * se:.1f} | 0.0 ± 35.4 |" \
        in text


def test_study_with_one_seed_gives_each_gain_its_standard_error(tmp_path):
    groups = ["a", "a", "b", "c"]

    def rec(path, correct):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"accuracy": sum(correct) / 4, "n": 4, "correct": correct, "groups": groups}))
    rec(tmp_path / "ref" / "blackbox.json", [0, 0, 1, 1])
    rec(tmp_path / "ref" / "proxykd.json", [1, 1, 1, 0])
    rec(tmp_path / "alpha_10" / "eval.json", [0, 1, 1, 1])
    text = table.study([tmp_path], {"alpha": 1, "gamma": 0.4, "rounds": 2, "slip": 0.1}, tmp_path / "s.md", None)
    rows = {tuple(c.strip() for c in line.split("|")[2:7]) for line in text.splitlines()[2:]}
    bb = {"correct": [0, 0, 1, 1], "groups": groups}
    _, se_main, _ = table.paired_difference({"correct": [1, 1, 1, 0], "groups": groups}, bb)
    _, se_10, _ = table.paired_difference({"correct": [0, 1, 1, 1], "groups": groups}, bb)
    assert ("1", "—", "50.0", "75.0", f"+25.0 ± {100 * se_main:.1f} (1 s.e.)") in rows
    assert ("10", "—", "50.0", "75.0", f"+25.0 ± {100 * se_10:.1f} (1 s.e.)") in rows
