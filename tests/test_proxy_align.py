"""Stage 1: the DPO loss by hand, the shared loop's accumulation and resume, and alignment on a tiny world."""
import json
import math

import pytest
import torch

import data
import proxy_align
import train
import world as embedded  # `world` is this file's fixture
from model import Llama
from conftest import write_world


# ------------------------------------------------------------------------------------- dpo_loss

def test_dpo_loss_hand_computed():
    pc, pr = torch.tensor([-1.0, -10.0]), torch.tensor([-2.0, -8.0])
    rc, rr = torch.tensor([-1.5, -9.0]), torch.tensor([-1.5, -9.0])
    losses, cr, rj = proxy_align.dpo_loss(pc, pr, rc, rr, beta=0.5)
    # Row 0: ratios +0.5 and -0.5, z = 0.5·1.0 = 0.5, loss = log(1 + e^-0.5) = 0.474077.
    # Row 1: ratios -1 and +1, z = 0.5·(-2) = -1, loss = log(1 + e^1) = 1.313262.
    torch.testing.assert_close(losses, torch.tensor([0.474077, 1.313262]), atol=1e-6, rtol=0)
    torch.testing.assert_close(cr, torch.tensor([0.25, -0.5]))
    torch.testing.assert_close(rj, torch.tensor([-0.25, 0.5]))
    losses, _, _ = proxy_align.dpo_loss(torch.tensor([-10.0]), torch.tensor([-8.0]), torch.tensor([-9.0]),
                                        torch.tensor([-9.0]), beta=0.1)
    torch.testing.assert_close(losses, torch.tensor([0.798139]), atol=1e-6, rtol=0)  # log(1 + e^0.2)


def test_dpo_loss_against_an_independent_derivation():
    """Float64 re-derivation from the Bradley-Terry form: p(y ≻ ŷ) = e^{r_c} / (e^{r_c} + e^{r_r}),
    loss = -log p; and the gradient w.r.t. log π(y) is -β·(1 - p)."""
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(64, generator=g, dtype=torch.float64) * 5 for _ in range(4))
    pc.requires_grad_(True)
    beta = 0.3
    losses, cr, rj = proxy_align.dpo_loss(pc, pr, rc, rr, beta)
    r_c, r_r = beta * (pc.detach() - rc), beta * (pr - rr)
    p = torch.exp(r_c) / (torch.exp(r_c) + torch.exp(r_r))
    torch.testing.assert_close(losses.detach(), -torch.log(p), atol=1e-10, rtol=1e-10)
    losses.sum().backward()
    torch.testing.assert_close(pc.grad, -beta * (1 - p), atol=1e-10, rtol=1e-10)
    assert not cr.requires_grad and not rj.requires_grad


def test_reduce_logps_mean_and_sum():
    s, n = torch.tensor([-6.0, -3.0]), torch.tensor([3.0, 1.0])
    torch.testing.assert_close(proxy_align.reduce_logps(s, n, "mean"), torch.tensor([-2.0, -3.0]))
    torch.testing.assert_close(proxy_align.reduce_logps(s, n, "sum"), s)


def test_lr_schedule():
    assert train.lr_at(0, 100, 1e-3, "constant", warmup=4) == pytest.approx(2.5e-4)
    assert train.lr_at(50, 100, 1e-3, "constant", warmup=4) == 1e-3
    assert train.lr_at(4, 100, 1e-3, "cosine", warmup=4, min_ratio=0.1) == pytest.approx(1e-3)
    assert train.lr_at(100, 100, 1e-3, "cosine", warmup=4, min_ratio=0.1) == pytest.approx(1e-4)


# ------------------------------------------------------------------------- the loops on a tiny world

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tokenizer, teacher rows and eval rows of the embedded world, written as the pipeline writes them."""
    d = tmp_path_factory.mktemp("world")
    tok, rows = write_world(d, 240)
    data.write_jsonl(d / "teacher.jsonl", rows)
    data.write_jsonl(d / "small.jsonl", rows[:48])
    data.write_jsonl(d / "heldout.jsonl", rows[200:])
    data.write_jsonl(d / "eval.jsonl", embedded.make_problems(16, seed=0, split="eval"))
    return d


def run(*argv):
    return proxy_align.main([str(a) for a in argv])


def sft_args(world, out, *extra):
    return ["sft", "--init", "toy", "--tokenizer", world, "--data", world / "small.jsonl", "--out", out,
            "--lr", "3e-3", "--quiet", "--seed", "1", *extra]


def weights(path):
    from safetensors.torch import load_file
    return load_file(str(path / "model.safetensors"))


def metric_rows(path, stage):
    return [r for r in map(json.loads, (path / "metrics.jsonl").read_text().splitlines()) if r.get("stage") == stage]


def test_accumulation_batch_8x1_equals_2x4(world, tmp_path):
    assert run(*sft_args(world, tmp_path / "a", "--batch-size", "8", "--grad-accum", "1")) == 0
    assert run(*sft_args(world, tmp_path / "b", "--batch-size", "2", "--grad-accum", "4")) == 0
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-6, rtol=1e-5)
    la, lb = metric_rows(tmp_path / "a", "sft"), metric_rows(tmp_path / "b", "sft")
    assert [r["nll"] for r in la] == pytest.approx([r["nll"] for r in lb], rel=1e-5)


def test_sft_resume_is_bitwise_identical(world, tmp_path):
    common = ["--batch-size", "4", "--log-every", "1", "--epochs", "1.5"]
    assert run(*sft_args(world, tmp_path / "full", *common)) == 0
    assert run(*sft_args(world, tmp_path / "cut", *common, "--stop-after", "7")) == 3
    with pytest.raises(SystemExit):  # an existing checkpoint is never trained over without --resume
        run(*sft_args(world, tmp_path / "cut", *common))
    assert run(*sft_args(world, tmp_path / "cut", *common, "--resume")) == 0
    full, cut = weights(tmp_path / "full"), weights(tmp_path / "cut")
    for k in full:
        assert torch.equal(full[k], cut[k]), k
    lf, lc = metric_rows(tmp_path / "full", "sft"), metric_rows(tmp_path / "cut", "sft")
    assert [r["step"] for r in lc] == [r["step"] for r in lf] == list(range(1, 19))
    assert [r["nll"] for r in lc] == [r["nll"] for r in lf]


def align_args(world, init, out, *extra):
    return ["align", "--init", init, "--data", world / "small.jsonl", "--out", out, "--rounds", "2",
            "--batch-size", "4", "--lr", "2e-3", "--max-new-tokens", "40", "--log-every", "1", "--quiet",
            "--seed", "3", *extra]


@pytest.fixture(scope="module")
def sft_proxy(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft")
    assert run(*sft_args(world, out, "--batch-size", "8", "--epochs", "2")) == 0
    return out


def test_align_resume_mid_round_keeps_the_reference_and_is_bitwise(world, sft_proxy, tmp_path):
    from safetensors.torch import load_file
    assert run(*align_args(world, sft_proxy, tmp_path / "full")) == 0
    # 24 prompts a round, batch 4: 6 steps a round; stop in the middle of round 2, then resume.
    assert run(*align_args(world, sft_proxy, tmp_path / "cut", "--stop-after", "9")) == 3
    assert train.load_train_state(tmp_path / "cut" / "checkpoint")["round"] == 1
    assert run(*align_args(world, sft_proxy, tmp_path / "cut", "--resume")) == 0
    full, cut = weights(tmp_path / "full"), weights(tmp_path / "cut")
    for k in full:
        assert torch.equal(full[k], cut[k]), k
    steps = lambda p: [(r["round"], r["step"], r["dpo"], r["nll"]) for r in metric_rows(p, "align")]
    assert steps(tmp_path / "cut") == steps(tmp_path / "full") and len(steps(tmp_path / "full")) == 12

    # Round 2's reference is the proxy after round 1, in both runs: recompute it from round_01.
    tok = data.load_tokenizer(world)
    ref_model = Llama.from_pretrained(tmp_path / "full" / "round_01")
    rows = proxy_align.round_chunks(data.read_teacher(world / "small.jsonl"), 2, seed=3)[1]
    rejected = [r["rejected_ids"] for r in data.read_jsonl(tmp_path / "cut" / "round_02" / "rejected.jsonl")]
    pairs = proxy_align.build_pairs(tok, rows, rejected, "plain", 1024)
    # Batched as the run batched them (--gen-batch-size 64): other padding rounds a sum of some 500 nats differently (1 ulp).
    ref_c, ref_r = proxy_align.reference_logps(ref_model, pairs, data.special_ids(tok)["pad"], torch.device("cpu"), 64)
    for run_dir in ("full", "cut"):
        stored = load_file(str(tmp_path / run_dir / "round_02" / "ref_logps.safetensors"))
        torch.testing.assert_close(stored["chosen"], ref_c, atol=1e-5, rtol=0)
        torch.testing.assert_close(stored["rejected"], ref_r, atol=1e-5, rtol=0)
    # ... and not the SFT proxy's (the reference moved with the rounds).
    sft_model = Llama.from_pretrained(sft_proxy)
    old_c, _ = proxy_align.reference_logps(sft_model, pairs, data.special_ids(tok)["pad"], torch.device("cpu"), 8)
    assert (old_c - ref_c).abs().max() > 1e-3


def test_alignment_raises_reward_accuracy_and_agreement(world, tmp_path):
    """A tiny proxy, SFT'd on the teacher's text, then aligned for 3 rounds: within each round DPO separates
    the teacher's responses from its own samples, and its top-1 agreement with held-out teacher text rises."""
    base = tmp_path / "sft"
    assert run("sft", "--init", "toy", "--tokenizer", world, "--data", world / "teacher.jsonl", "--out", base,
               "--lr", "3e-3", "--batch-size", "16", "--quiet", "--seed", "0") == 0
    out = tmp_path / "aligned"
    assert run("align", "--init", base, "--data", world / "teacher.jsonl", "--out", out, "--rounds", "3",
               "--batch-size", "8", "--lr", "3e-3", "--max-new-tokens", "60", "--log-every", "1", "--quiet",
               "--heldout", world / "heldout.jsonl") == 0
    ends = {r["round"]: r["agreement"] for r in metric_rows(out, "round_end")}
    assert ends[3] > ends[0] + 0.02, ends
    for k in (1, 2, 3):
        accs = [r["reward_acc"] for r in metric_rows(out, "align") if r["round"] == k]
        assert sum(accs[-3:]) / 3 > sum(accs[:2]) / 2, (k, accs)
