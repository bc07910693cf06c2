"""bench.py: the whole benchmark at tiny size on CPU (the CI smoke test), the main size's batches as the stages
build them, the interleaved timing, and the pieces its numbers rest on: the FLOP count behind MFU and the CPU
peak-memory measurement."""
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import bench
import bench_sections
import data
from model import Config, Llama

pytest.importorskip("transformers")  # the peer

ROOT = Path(__file__).resolve().parents[1]


def _numbers(d):
    for k, v in d.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            yield k, v


def test_bench_tiny_on_cpu_end_to_end(tmp_path):
    out = tmp_path / "bench.json"
    # One thread: the bench is a smoke test here, and on a shared 2-core box a second process's OpenMP
    # threads can slow a 2-thread run a hundredfold (measured while writing this test).
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # The timeout guards against a hang only: how long the run takes is the benchmark's business, not a test's
    # (a wall-clock bound here failed under load from other processes).
    p = subprocess.run([sys.executable, "bench.py", "--device", "cpu", "--size", "tiny", "--steps", "3", "--json",
                        str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "| section | metric" in p.stdout and "on CPU" in p.stdout
    res = json.loads(out.read_text())
    assert res["size"] == "tiny" and res["device"] == "CPU" and [m["model"] for m in res["models"]] == ["tiny-student"]
    sections = res["models"][0]["sections"]
    assert set(sections) == set(bench.SECTIONS)
    for name, sec in sections.items():
        nums = dict(_numbers(sec))
        assert nums, name
        for k, v in nums.items():
            assert math.isfinite(v) and v > 0, f"{name}.{k} = {v}"
    rows = res["rows"]
    assert {r["section"] for r in rows} == set(bench.SECTIONS)
    for r in rows:
        for k in ("ours", "peer", "ratio"):
            v = r[k]
            if isinstance(v, float):
                assert math.isfinite(v) and v > 0, f"{r['section']} {r['metric']} {k} = {v}"
        if r["target"] and not r["always_judged"]:
            assert r["verdict"] == "n/a (CPU)", r  # GPU targets are never judged on CPU, never dropped
    # Only MFU has no CPU figure; every other row measured both sides.
    assert [r["metric"] for r in rows if r["ours"] is None] == ["MFU"]
    # The correctness guard: same greedy tokens as transformers in fp32, and the training losses agree.
    assert sections["decode"]["same_tokens"] is True
    assert [r["verdict"] for r in rows if r["always_judged"]] == ["yes"]
    tr, kd = sections["train"], sections["kdloss"]
    assert tr["loss_ours"] == pytest.approx(tr["loss_peer"], abs=1e-4)
    for mode in ("topk", "full"):  # the chunked loss is the naive one's value, in less memory
        assert kd[f"ours_{mode}_loss"] == pytest.approx(kd[f"peer_{mode}_loss"], rel=1e-5)


def test_flops_per_token_is_palm_formula_for_llama_3_2_1b():
    cfg = Config.preset("llama-3.2-1b", 128256)
    with torch.device("meta"):
        n = Llama(cfg).num_params()
    # Llama-3.2-1B by hand: tied embedding 128256·2048, per layer q,o 2048² each, k,v 2048·512 each,
    # MLP 3·2048·8192, two norms; final norm.
    layer = 2 * 2048 * 2048 + 2 * 2048 * 512 + 3 * 2048 * 8192 + 2 * 2048
    assert n == 128256 * 2048 + 16 * layer + 2048 == 1_235_814_400
    f = bench.flops_per_token(cfg, n, 2048)
    assert f == 6 * n + 12 * 16 * 2048 * 2048
    # The two training targets agree: 50 % MFU on an H100 is ~60k tok/s ≈ 1.15 × the peer's 52k.
    assert 0.5 * bench.H100_BF16_FLOPS / f == pytest.approx(1.15 * 52_000, rel=0.01)


def test_cpu_peak_memory_sees_transient_allocations():
    cpu = torch.device("cpu")
    n = 1 << 20  # 4 MiB of fp32

    def f():
        a = torch.ones(n)
        b = a * 2  # both live at once: 8 MiB
        del a, b
        return torch.zeros(n // 4)  # 1 MiB still live at the end

    peak = bench_sections.peak_bytes(f, cpu)
    assert 8 * 2**20 <= peak < 10 * 2**20


def test_main_size_batches_are_the_stages_batches_and_both_losses_agree():
    """Ragged rows as train.fit gets them (lengths seq ± 2, right padding, the prompt masked), and on such a batch
    our nll_loss_fn and transformers' labels= loss are one number."""
    args = SimpleNamespace(batch=16, seq=72, ragged=True)
    batch, norm = bench_sections.train_batch(args, 1024, torch.Generator().manual_seed(1), torch.device("cpu"))
    lens = batch["attention_mask"].sum(-1)
    assert batch["input_ids"].shape == (16, int(lens.max())) and 70 <= int(lens.min()) and int(lens.max()) <= 74
    assert bool((batch["attention_mask"][:, 1:] <= batch["attention_mask"][:, :-1]).all())  # right padding only
    targets = data.response_mask(batch["labels"]).sum(-1)
    assert norm["tokens"] == int(targets.sum()) and bool(((targets - 0.6 * lens).abs() <= 2).all())
    ours, peer = bench_sections.build_models(Config.preset("toy", 1024), torch.device("cpu"), 0, with_peer=True)
    with torch.no_grad():
        a = bench_sections.ours_train_loss(ours, batch, norm)
        b = bench_sections.peer_train_loss(peer, batch, norm)
    assert float(a) == pytest.approx(float(b), abs=1e-5)


def test_race_alternates_the_sides_and_keeps_each_rounds_ratio():
    calls = []
    r = bench_sections.race({"ours": lambda: calls.append("o"), "peer": lambda: (calls.append("p"), time.sleep(0.01))},
                            SimpleNamespace(steps=3, warmup=1, clock="wall"), torch.device("cpu"))
    assert calls == ["o", "p"] + ["o", "p"] * 3  # warm-up, then interleaved rounds
    assert len(r["ratios"]) == 3 and min(r["ratios"]) > 1  # peer/ours per round: the sleeping side is slower
    assert r["s"]["peer"] >= 0.01 and len(r["load"]) == 2


def test_main_size_is_the_shipped_bases_architecture_and_vocabulary():
    """bench.py runs without a tokenizer, so SIZES["main"] spells the world's vocabulary out: it must stay what the
    shipped bases (built by `make bases` on the world's tokenizer) hold, preset for preset."""
    for (preset, vocab, _, weights), base in zip(bench.SIZES["main"], ("proxy", "student")):
        assert weights == bench.BASES / base  # and the bench runs those weights
        shipped = Config.from_json(ROOT / "bases" / base / "config.json")
        ids = {k: getattr(shipped, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}  # the tokenizer's
        assert Config.preset(preset, vocab, **ids) == shipped, f"bench.SIZES['main'] {preset}/{vocab} vs bases/{base}"
