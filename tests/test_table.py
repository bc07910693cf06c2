"""table.py: the failure breakdown counts what it says, collect writes mean ± std over runs, and summary gathers
the stages' wall time."""
import json
import os
import re

import data
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
