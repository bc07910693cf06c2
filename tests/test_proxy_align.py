"""Stage 1: eqs. 3, 4 and 6 by hand and against float64, the rejected samples' stop tokens and budget, the shared
loop's accumulation and resume (refused when the rounds would change), the w/o-DPO rounds, the `sample` command,
and alignment on a tiny world measured on truly held-out teacher text."""

import json

import pytest
import torch

import data
import proxy_align
import train
import world as embedded  # `world` is this file's fixture
from model import Config, Llama
from conftest import metric_rows, weights, write_world


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


def test_proxy_nll_and_proxy_loss_by_hand():
    # Two teacher responses with summed log-probs -3 and -5 over a window of 16 response tokens: eq. 3 = 8 / 16.
    sums = torch.tensor([-3.0, -5.0])
    assert proxy_align.proxy_nll(sums, 16).item() == pytest.approx(0.5)
    # Eq. 6 adds the mean DPO loss over the window's pairs (4 pairs, two of them in this micro-batch).
    dpo = torch.tensor([0.474077, 1.313262])
    assert proxy_align.proxy_loss(sums, dpo, 16, 4).item() == pytest.approx(0.5 + 1.787339 / 4, abs=1e-6)
    assert proxy_align.proxy_loss(sums, None, 16, 4).item() == pytest.approx(0.5)  # w/o DPO: eq. 3 alone


def test_reduce_logps_mean_and_sum():
    s, n = torch.tensor([-6.0, -3.0]), torch.tensor([3.0, 1.0])
    torch.testing.assert_close(proxy_align.reduce_logps(s, n, "mean"), torch.tensor([-2.0, -3.0]))
    torch.testing.assert_close(proxy_align.reduce_logps(s, n, "sum"), s)


# ------------------------------------------------------------------------- the loops on a tiny world

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tokenizer, teacher rows and eval rows of the embedded world, written as the pipeline writes them."""
    d = tmp_path_factory.mktemp("world")
    tok, rows = write_world(d, 240)
    data.write_jsonl(d / "teacher.jsonl", rows[:200])
    data.write_jsonl(d / "small.jsonl", rows[:48])
    data.write_jsonl(d / "heldout.jsonl", rows[200:])
    data.write_jsonl(d / "eval.jsonl", embedded.make_problems(16, seed=0, split="eval"))
    return d


def run(*argv):
    return proxy_align.main([str(a) for a in argv])


def sft_args(world, out, *extra):
    return ["sft", "--init", "toy", "--tokenizer", world, "--data", world / "small.jsonl", "--out", out,
            "--lr", "3e-3", "--quiet", "--seed", "1", *extra]


def test_accumulation_batch_8x1_equals_2x4(world, tmp_path):
    assert run(*sft_args(world, tmp_path / "a", "--batch-size", "8", "--grad-accum", "1")) == 0
    assert run(*sft_args(world, tmp_path / "b", "--batch-size", "2", "--grad-accum", "4")) == 0
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-6, rtol=1e-5)
    la, lb = metric_rows(tmp_path / "a", "sft"), metric_rows(tmp_path / "b", "sft")
    assert [r["nll"] for r in la] == pytest.approx([r["nll"] for r in lb], rel=1e-5)


def test_sft_replay_trains_on_the_teacher_rows_and_the_drawn_text(world, tmp_path, capsys):
    """--replay F --replay-n N: the warm-up trains on --data plus N {"text"} rows of F drawn by the seed (text
    rows train every token, teacher rows their response); the draw depends on the seed alone; a file of other
    rows, or too few rows, is refused in one line."""
    texts = [{"text": f"Mia has {i} apples. Tom has {i + 2} pens."} for i in range(40)]
    data.write_jsonl(tmp_path / "corpus.jsonl", texts)
    drawn = proxy_align.replay_rows(tmp_path / "corpus.jsonl", 6, seed=1)
    assert drawn == proxy_align.replay_rows(tmp_path / "corpus.jsonl", 6, seed=1) != \
        proxy_align.replay_rows(tmp_path / "corpus.jsonl", 6, seed=2)
    assert len({r["text"] for r in drawn}) == 6 and all(r in texts for r in drawn)
    common = ["--batch-size", "6", "--epochs", "1"]
    assert run(*sft_args(world, tmp_path / "a", *common, "--replay", tmp_path / "corpus.jsonl", "--replay-n", "6")) == 0
    assert json.loads((tmp_path / "a" / "args.json").read_text())["n_samples"] == 48 + 6
    # the same rows through the loop's own path: teacher rows and text rows in one list
    rows = data.read_teacher(world / "small.jsonl") + drawn
    tok = data.load_tokenizer(world)
    seqs, _ = train.encode_seqs(tok, rows, "plain", 1024)
    assert sum(s.n_targets for s in seqs[48:]) == sum(len(tok.encode(r["text"]).ids) + 1 for r in drawn)
    data.write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x", "response": "y"}])
    for f, n, msg in ((tmp_path / "bad.jsonl", "1", "need a \"text\""), (tmp_path / "corpus.jsonl", "41", "has 40 rows")):
        with pytest.raises(SystemExit) as e:
            run(*sft_args(world, tmp_path / "b", *common, "--replay", f, "--replay-n", n))
        assert e.value.code == 2 and msg in capsys.readouterr().err


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
            "--batch-size", "4", "--lr", "2e-3", "--max-len", "128", "--log-every", "1", "--quiet",
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
    pairs = proxy_align.build_pairs(tok, rows, rejected, "plain", 128)
    # Batched as the run batched them (--gen-batch-size 64): other padding rounds a sum of some 500 nats differently (1 ulp).
    ref_c, ref_r = proxy_align.reference_logps(ref_model, pairs, data.special_ids(tok)["pad"], torch.device("cpu"), 64)
    for run_dir in ("full", "cut"):
        stored = load_file(str(tmp_path / run_dir / "round_02" / "ref_logps.safetensors"))
        torch.testing.assert_close(stored["chosen"], ref_c, atol=1e-5, rtol=0)
        # the rejected side comes from the sampling pass (KV-cached, left-padded): rounding of fp32 sums, ~1e-7
        torch.testing.assert_close(stored["rejected"], ref_r, atol=1e-5, rtol=1e-6)
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
               "--batch-size", "8", "--lr", "3e-3", "--max-len", "160", "--log-every", "1", "--quiet",
               "--heldout", world / "heldout.jsonl") == 0
    train_ids = {r["id"] for r in data.read_teacher(world / "teacher.jsonl")}
    assert not train_ids & {r["id"] for r in data.read_teacher(world / "heldout.jsonl")}  # truly held out
    ends = {r["round"]: r["agreement"] for r in metric_rows(out, "round_end")}
    assert ends[3] > ends[0] + 0.02, ends
    for k in (1, 2, 3):
        accs = [r["reward_acc"] for r in metric_rows(out, "align") if r["round"] == k]
        assert sum(accs[-3:]) / 3 > sum(accs[:2]) / 2, (k, accs)


# ------------------------------------------------------------------ rejected samples in real chat formats

@pytest.mark.parametrize("fmt", ["chatml", "llama3"])
def test_rejected_samples_keep_the_stop_token_they_sampled(world, fmt, monkeypatch):
    """A rejected sample that stopped ends with the token the model emitted (the end of turn or the eos, whichever
    it was), not the format's first stop id; one cut at its budget ends with none. The budget is the room the
    prompt leaves in --max-len, not the evaluation's --max-new-tokens."""
    tok = data.load_tokenizer(world)
    stop = data.stop_ids(tok, fmt)
    assert len(stop) == 2
    rows = data.read_teacher(world / "small.jsonl")[:3]
    prompts = [data.encode_prompt(tok, data.messages_of(r), fmt) for r in rows]
    max_len = max(len(p) for p in prompts) + 12
    calls = []

    def fake_generate(model, batch, max_new_tokens, **kw):
        calls.append((len(batch), max_new_tokens, kw["keep_stop"]))
        rows = [[11, 12, stop[1]], [13, stop[0]], [14] * max_new_tokens][:len(batch)]
        return (rows, [[-1.0] * len(r) for r in rows]) if kw.get("logprobs") else rows

    monkeypatch.setattr(proxy_align, "generate", fake_generate)
    ids = data.special_ids(tok)
    model = Llama(Config.preset("toy", tok.get_vocab_size(), bos_token_id=ids["bos"], eos_token_id=ids["eos"],
                                pad_token_id=ids["pad"])).init_weights(seed=0)
    got = proxy_align.sample_responses(model, tok, rows, fmt, temperature=1.0, top_p=0.8, seed=0, max_len=max_len,
                                       batch_size=8)
    order = sorted(range(3), key=lambda i: len(prompts[i]))  # the batch is sorted by prompt length
    (n, budget, keep), = calls
    assert n == 3 and keep and budget == max_len - len(prompts[order[0]])
    by_row = {i: t for i, t in zip(order, [[11, 12, stop[1]], [13, stop[0]], [14] * budget])}
    for i in range(3):
        own = max_len - len(prompts[i])
        assert got[i] == by_row[i][:own], i
    pairs = proxy_align.build_pairs(tok, rows, got, fmt, max_len)
    assert pairs[order[0]][1].labels[-1] == stop[1] and pairs[order[1]][1].labels[-1] == stop[0]
    assert all(len(c.ids) <= max_len and len(r.ids) <= max_len for c, r in pairs)


# ----------------------------------------------------------------------------- w/o DPO, refusals, sample

def test_no_dpo_rounds_train_the_nll_alone(world, sft_proxy, tmp_path):
    out = tmp_path / "nodpo"
    assert run(*align_args(world, sft_proxy, out, "--no-dpo")) == 0
    rows = metric_rows(out, "align")
    assert len(rows) == 12 and all("dpo" not in r and r["nll"] > 0 for r in rows)
    assert not (out / "round_01" / "rejected.jsonl").exists()  # nothing sampled
    assert (out / "round_02" / "model.safetensors").exists() and (out / "model.safetensors").exists()
    # Step 1 is eq. 3 alone on its window, under the warm-up proxy: recompute it from the planned window.
    tok = data.load_tokenizer(world)
    chunk = proxy_align.round_chunks(data.read_teacher(world / "small.jsonl"), 2, seed=3)[0]
    seqs, _ = train.encode_seqs(tok, chunk, "plain", 128)
    (first, *_), *_ = train.plan_windows([len(s.ids) for s in seqs], 4, 1, 1.0, 3)
    model = Llama.from_pretrained(sft_proxy)
    b = data.collate([(seqs[i].ids, seqs[i].labels) for i in first], data.special_ids(tok)["pad"])
    with torch.no_grad():
        logits = model(b["input_ids"], attention_mask=b["attention_mask"]).double()[:, :-1]
    mask = data.response_mask(b["labels"])
    lp = logits.log_softmax(-1).gather(-1, b["input_ids"][:, 1:, None]).squeeze(-1)
    assert rows[0]["nll"] == pytest.approx(float(-(lp * mask).sum() / mask.sum()), rel=1e-5)


def test_resume_refuses_changed_rounds_or_seed(world, sft_proxy, tmp_path, capsys):
    out = tmp_path / "cut"
    assert run(*align_args(world, sft_proxy, out, "--stop-after", "3")) == 3
    for flag, value in (("--rounds", "3"), ("--seed", "4"), ("--no-dpo", None)):
        args = align_args(world, sft_proxy, out, "--resume")
        if value is None:
            args.append(flag)
        else:
            args[args.index(flag) + 1] = value
        with pytest.raises(SystemExit) as e:
            run(*args)
        err = capsys.readouterr().err
        assert e.value.code == 2 and flag.replace("no-", "") in err, err
    assert train.load_train_state(out / "checkpoint")["step"] == 3  # nothing was overwritten


def test_sample_writes_teacher_rows(world, sft_proxy, tmp_path):
    out = tmp_path / "whitebox.jsonl"
    assert run("sample", "--init", sft_proxy, "--data", world / "small.jsonl", "--out", out, "--max-len", "128",
               "--device", "cpu") == 0
    rows = data.read_jsonl(out)
    src = data.read_prompts(world / "small.jsonl")  # the prompts' order, kept
    assert [r["id"] for r in rows] == [r["id"] for r in src]
    src = {r["id"]: r for r in data.read_teacher(world / "small.jsonl")}
    src = [src[r["id"]] for r in rows]
    assert all(r["finish_reason"] in ("stop", "length") for r in rows)
    assert any(r["response"] != s["response"] for r, s in zip(rows, src))  # the model's text, not the teacher's
    assert len(data.read_teacher(out)) == sum(r["finish_reason"] == "stop" for r in rows)
    again = tmp_path / "again.jsonl"  # greedy: the same text again
    assert run("sample", "--init", sft_proxy, "--data", world / "small.jsonl", "--out", again, "--max-len", "128",
               "--device", "cpu") == 0
    assert data.read_jsonl(again) == rows


def test_evaluation_cli_scores_a_checkpoint_and_refuses_unscored_rows(world, sft_proxy, tmp_path, capsys):
    """`python evaluation.py`: the printed accuracy is the mean of the per-row scores it writes with --out,
    each row's output decoded greedily (the same text twice); rows without an answer are refused."""
    import evaluation
    argv = ["--model", str(sft_proxy), "--data", str(world / "eval.jsonl"), "--out", str(tmp_path / "o.jsonl")]
    evaluation.main(argv)
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = data.read_jsonl(tmp_path / "o.jsonl")
    assert res["n"] == len(rows) == 16 and res["correct"] == sum(r["correct"] for r in rows)
    assert all(r["correct"] == data.is_correct(r["output"], r["answer"]) for r in rows)
    evaluation.main(argv[:4] + ["--limit", "5", "--out", str(tmp_path / "p.jsonl")])
    assert [r["output"] for r in data.read_jsonl(tmp_path / "p.jsonl")] == [r["output"] for r in rows[:5]]
    data.write_jsonl(tmp_path / "bare.jsonl", [{"prompt": "Tom has 3 cards."}])
    with pytest.raises(SystemExit) as e:
        evaluation.main(["--model", str(sft_proxy), "--data", str(tmp_path / "bare.jsonl")])
    assert e.value.code == 2 and "answer" in capsys.readouterr().err
