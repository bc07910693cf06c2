"""table.py: the failure breakdown counts what it says, and collect writes mean ± std over runs."""
import json
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
