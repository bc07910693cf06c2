"""Past one device: proxy_align.py and distill.py under torchrun, 2 ranks on CPU with gloo, each against one process
taking the same global batch (2 ranks x batch 2 = 1 process x batch 4): per-step losses and final weights agree to
float32 rounding for SFT, 2 rounds of alignment (the very same sampled responses; reference log-probs to rounding)
and distillation, with DDP and with FSDP2; a run cut by --stop-after and resumed under torchrun ends bit-identical
to an uninterrupted one. Each torchrun launch is a real CLI run in 2 fresh processes (a few seconds each)."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import data
import distill
import proxy_align
from model import Config, Llama
from conftest import free_port, metric_rows, weights, write_world

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available")


def torchrun(script, *argv, nproc=2) -> int:
    """`torchrun --nproc_per_node 2 script argv...` in fresh processes; returns the exit code (0 or 3 with
    --stop-after), failing the test with the ranks' output otherwise."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), ROOT / script, *map(str, argv)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    # torchrun reports a worker's non-zero exit as a failure of the job (exit 1), names it as the root cause and
    # stops the other workers (which may show as SIGTERM'd while they tear down): --stop-after's exit 3.
    if p.returncode != 0 and re.search(r"Root Cause.*?exitcode\s*:\s*3\b", p.stderr, re.S):
        return 3
    assert p.returncode == 0, f"{' '.join(map(str, cmd))}\n{p.stdout[-4000:]}\n{p.stderr[-6000:]}"
    return 0


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tokenizer, teacher rows (42 for SFT, so the last window has one micro-batch for two ranks; 24 for two
    rounds of alignment; 40 for distillation), an SFT'd toy proxy to align, a random proxy and its cache over the
    40, and a random student with an untied head."""
    d = tmp_path_factory.mktemp("dist_world")
    tok, rows = write_world(d, 120)
    data.write_jsonl(d / "sft.jsonl", rows[:42])
    data.write_jsonl(d / "align.jsonl", rows[42:66])
    data.write_jsonl(d / "D_s.jsonl", rows[66:106])
    data.write_jsonl(d / "warmup.jsonl", rows[:96])
    assert proxy_align.main(map(str, ["sft", "--init", "toy", "--tokenizer", d, "--data", d / "warmup.jsonl",
                                      "--out", d / "proxy", "--lr", "3e-3", "--batch-size", "8", "--epochs", "2",
                                      "--quiet", "--seed", "0", "--device", "cpu"])) == 0
    ids = data.special_ids(tok)
    cfg = Config.preset("toy", tok.get_vocab_size(), bos_token_id=ids["bos"], eos_token_id=ids["eos"],
                        pad_token_id=ids["pad"], hidden_size=48, intermediate_size=96)
    Llama(cfg).init_weights(seed=7).save_pretrained(d / "kd_proxy")
    data.save_tokenizer(tok, d / "kd_proxy")
    # The student has an untied head (as Llama 3 8B/70B): under FSDP it is a separate parameter of the root.
    cfg = Config.preset("toy", tok.get_vocab_size(), bos_token_id=ids["bos"], eos_token_id=ids["eos"],
                        pad_token_id=ids["pad"], tie_word_embeddings=False)
    Llama(cfg).init_weights(seed=1).save_pretrained(d / "student")
    data.save_tokenizer(tok, d / "student")
    assert distill.main(map(str, ["cache", "--proxy", d / "kd_proxy", "--data", d / "D_s.jsonl", "--out", d / "cache",
                                  "--topk", "4", "--device", "cpu", "--quiet"])) == 0
    return d


def assert_same_run(one, two, stage, keys, lr):
    """Same per-step losses and gradient norms (rel 1e-5; abs 1e-6 for a DPO margin of 0 at a round's start): the
    gradient norm is what shows that ranks' gradients are summed, not averaged (Adam's steps would hardly differ).
    Final weights to lr/10: float32 rounding of another batch split is ~1e-7, but Adam turns it into up to ~lr a
    step for a weight whose gradient is itself near 0 (measured: 2.3e-5 at lr 1e-3 after 6 alignment steps)."""
    a, b = metric_rows(one, stage), metric_rows(two, stage)
    assert [r["step"] for r in a] == [r["step"] for r in b] and a
    for key in ["grad_norm", *keys]:
        assert [r[key] for r in b] == pytest.approx([r[key] for r in a], rel=1e-5, abs=1e-6), key
    wa, wb = weights(one), weights(two)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=lr / 10, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


def sft_args(world, out, *extra):
    return ["sft", "--init", "toy", "--tokenizer", world, "--data", world / "sft.jsonl", "--out", out, "--lr", "3e-3",
            "--quiet", "--seed", "1", "--log-every", "1", "--device", "cpu", *extra]


def align_args(world, out, *extra):
    return ["align", "--init", world / "proxy", "--data", world / "align.jsonl", "--out", out, "--rounds", "2",
            "--lr", "1e-3", "--max-new-tokens", "24", "--gen-batch-size", "5", "--log-every", "1", "--quiet",
            "--seed", "3", "--device", "cpu", *extra]


def distill_args(world, out, *extra):
    return ["train", "--method", "proxykd", "--init", world / "student", "--data", world / "D_s.jsonl",
            "--cache", world / "cache", "--topk", "4", "--out", out, "--lr", "1e-3", "--device", "cpu", "--quiet",
            "--seed", "1", "--log-every", "1", "--epochs", "0.5", "--chunk-tokens", "64", *extra]


@pytest.fixture(scope="module")
def one_process(world, tmp_path_factory):
    """The references: one process, batch 4."""
    d = tmp_path_factory.mktemp("one")
    assert proxy_align.main(map(str, sft_args(world, d / "sft", "--batch-size", "4"))) == 0
    assert proxy_align.main(map(str, align_args(world, d / "align", "--batch-size", "4"))) == 0
    assert distill.main(map(str, distill_args(world, d / "distill", "--batch-size", "4"))) == 0
    return d


@pytest.fixture(scope="module", params=["ddp", "fsdp"])
def two_ranks(request, world, tmp_path_factory):
    """The same three runs under torchrun with 2 ranks: (mode, directory)."""
    mode, d = request.param, tmp_path_factory.mktemp(request.param)
    # SFT: 2 ranks x batch 2. 42 samples: the last window has 2, one micro-batch, so rank 1 runs a zero filler.
    assert torchrun("proxy_align.py", *sft_args(world, d / "sft", "--batch-size", "2", "--dist", mode)) == 0
    # Align: 2 ranks x batch 1 x 2 accumulation steps; sampling in batches of 5 prompts, 3 a round (2 on rank 0).
    assert torchrun("proxy_align.py", *align_args(world, d / "align", "--batch-size", "1", "--grad-accum", "2",
                                                  "--dist", mode)) == 0
    assert torchrun("distill.py", *distill_args(world, d / "distill", "--batch-size", "2", "--dist", mode)) == 0
    return mode, d


def test_sft_on_two_ranks_takes_the_steps_of_one_process(one_process, two_ranks):
    mode, d = two_ranks
    assert_same_run(one_process / "sft", d / "sft", "sft", ["nll", "tokens"], lr=3e-3)
    assert [r["step"] for r in metric_rows(d / "sft", "sft")] == list(range(1, 12))
    args = json.loads((d / "sft" / "args.json").read_text())
    assert args["world_size"] == 2 and args["dist"] == mode


def test_align_on_two_ranks_samples_and_steps_as_one_process(one_process, two_ranks):
    _, d = two_ranks
    for rnd in ("round_01", "round_02"):  # the same samples, and the same reference log-probs up to rounding
        assert (d / "align" / rnd / "rejected.jsonl").read_text() == \
            (one_process / "align" / rnd / "rejected.jsonl").read_text(), rnd
        ref2, ref1 = (load_file(str(p / rnd / "ref_logps.safetensors")) for p in (d / "align", one_process / "align"))
        for k in ref1:
            torch.testing.assert_close(ref2[k], ref1[k], atol=1e-4, rtol=1e-6)
    # (Not reward_acc: at a round's first step the policy is its reference, every margin is 0 up to rounding, and
    # "chosen > rejected" flips with the last bit.)
    assert_same_run(one_process / "align", d / "align", "align", ["nll", "dpo", "margin", "chosen_reward"], lr=1e-3)


def test_distill_on_two_ranks_takes_the_steps_of_one_process(one_process, two_ranks):
    _, d = two_ranks
    assert_same_run(one_process / "distill", d / "distill", "distill", ["loss", "nll", "kl", "wkl", "w"], lr=1e-3)


def test_resume_under_torchrun_is_bitwise(world, two_ranks, tmp_path):
    mode, d = two_ranks
    common = ["--batch-size", "2", "--dist", mode]
    assert torchrun("proxy_align.py", *sft_args(world, tmp_path / "cut", *common, "--stop-after", "5")) == 3
    shutil.copytree(tmp_path / "cut", tmp_path / "cut_one")
    assert torchrun("proxy_align.py", *sft_args(world, tmp_path / "cut", *common, "--resume")) == 0
    full, cut = weights(d / "sft"), weights(tmp_path / "cut")
    for k in full:
        assert torch.equal(full[k], cut[k]), k
    lf, lc = metric_rows(d / "sft", "sft"), metric_rows(tmp_path / "cut", "sft")
    assert [r["step"] for r in lc] == list(range(1, 12)) and [r["nll"] for r in lc] == [r["nll"] for r in lf]
    # Another global window (batch x accumulation x ranks) is refused with one line.
    with pytest.raises(SystemExit):
        proxy_align.main(map(str, sft_args(world, tmp_path / "cut_one", "--batch-size", "2", "--resume")))
    if mode == "fsdp":  # the optimizer state is keyed by parameter name: it resumes under FSDP only
        with pytest.raises(SystemExit):
            proxy_align.main(map(str, sft_args(world, tmp_path / "cut_one", "--batch-size", "4", "--resume")))
        return
    # A DDP checkpoint is a one-process checkpoint: one process at batch 4 (the same global window) resumes it.
    assert proxy_align.main(map(str, sft_args(world, tmp_path / "cut_one", "--batch-size", "4", "--resume"))) == 0
    assert_same_run(d / "sft", tmp_path / "cut_one", "sft", ["nll"], lr=3e-3)


def test_refusals_without_and_outside_torchrun(world, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit):  # torchrun started 2 copies, --dist none: one line, before any work
        proxy_align.main(map(str, sft_args(world, tmp_path / "x")))
    assert "--dist ddp" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the cache runs in one process
        distill.main(map(str, ["cache", "--proxy", world / "kd_proxy", "--data", world / "D_s.jsonl",
                               "--out", tmp_path / "c"]))
    assert "one process" in capsys.readouterr().err
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(SystemExit):  # --dist ddp without torchrun
        proxy_align.main(map(str, sft_args(world, tmp_path / "x", "--dist", "ddp")))
    assert "torchrun --nproc_per_node" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "c").exists()
