"""Stage 2: eqs. 7-11 against float64 brute force (the KL with and without the authors' smoothing, the
student loss with mixed weights), the chunked loss against the unchunked one (values and gradients), the sample
weights by hand, the proxy cache (fp32 head, round trip, resume), bounded memory of the chunked full-vocabulary
loss, and the training loop (resume, accumulation, cached vs online KL, refusals)."""
import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import cache
import data
import distill
import train
import world as embedded
from model import Config, Llama, token_logprobs
from conftest import metric_rows, weights, write_world


# ------------------------------------------------------------------------------------- the KL terms

def topk_kl(s, vals, ids, eps=0.0):
    """Eq. 10 at w = 1 from student logits s [N, V] and the proxy's top-k: the unweighted KL [N]."""
    return distill.weighted_kl(s.float().log_softmax(-1), torch.ones(s.shape[0]), vals, ids, eps=eps)[1]


def full_kl(s, p, eps=0.0):
    return distill.weighted_kl(s.float().log_softmax(-1), torch.ones(s.shape[0]), proxy_logits=p, eps=eps)[1]


def test_topk_kl_hand_computed():
    # Student uniform over V = 3: log q = -log 3. Proxy top-2 logits (1, 0): p = (e, 1) / (e + 1).
    p0, p1 = math.e / (math.e + 1), 1 / (math.e + 1)
    expected = p0 * math.log(p0) + p1 * math.log(p1) + math.log(3)  # = 0.516409...
    kl = topk_kl(torch.zeros(1, 3), torch.tensor([[1.0, 0.0]]), torch.tensor([[0, 1]]))
    assert kl.item() == pytest.approx(expected, abs=1e-6) and expected == pytest.approx(0.516409, abs=1e-6)


def test_topk_kl_against_float64_brute_force():
    g = torch.Generator().manual_seed(0)
    N, V, k = 7, 50, 5
    s = torch.randn(N, V, generator=g) * 3
    proxy = torch.randn(N, V, generator=g) * 3
    vals, ids = proxy.topk(k, dim=-1)
    got = topk_kl(s, vals, ids)
    for n in range(N):
        sv = [float(x) for x in s[n].double()]
        log_z = math.log(sum(math.exp(x) for x in sv))  # the student's FULL-vocabulary normaliser
        zs = [float(x) for x in vals[n].double()]
        zp = sum(math.exp(x) for x in zs)  # the proxy's top-k renormalised
        ref = sum(math.exp(z) / zp * (z - math.log(zp) - (sv[int(i)] - log_z)) for z, i in zip(zs, ids[n]))
        assert got[n].item() == pytest.approx(ref, rel=1e-5, abs=1e-6), n
    assert (got >= 0).all()
    # With k = V the top-k KL is the full-vocabulary KL.
    vals, ids = proxy.topk(V, dim=-1)
    torch.testing.assert_close(topk_kl(s, vals, ids), full_kl(s, proxy), atol=1e-5, rtol=1e-5)


def test_full_kl_against_float64_brute_force():
    g = torch.Generator().manual_seed(1)
    s, p = torch.randn(4, 30, generator=g) * 2, torch.randn(4, 30, generator=g) * 2
    got = full_kl(s, p)
    for n in range(4):
        lp = p[n].double() - torch.logsumexp(p[n].double(), 0)
        lq = s[n].double() - torch.logsumexp(s[n].double(), 0)
        ref = sum(math.exp(a) * (a - b) for a, b in zip(lp.tolist(), lq.tolist()))
        assert got[n].item() == pytest.approx(ref, rel=1e-5, abs=1e-6)
    assert full_kl(p, p).abs().max() < 1e-6


def smoothed_kl_float64(p, q, eps):
    """The authors' smoothing written out in float64: p' = (p + eps) / sum(p + eps), likewise q, then KL(p' || q')."""
    p = [x + eps for x in p]
    q = [x + eps for x in q]
    zp, zq = sum(p), sum(q)
    return sum(a / zp * (math.log(a / zp) - math.log(b / zq)) for a, b in zip(p, q))


def test_smoothed_kl_against_float64(eps=7e-5):
    g = torch.Generator().manual_seed(4)
    N, V, k = 5, 1024, 10
    s, proxy = torch.randn(N, V, generator=g) * 3, torch.randn(N, V, generator=g) * 3
    vals, ids = proxy.topk(k, dim=-1)
    got_full, got_topk = full_kl(s, proxy, eps), topk_kl(s, vals, ids, eps)
    for n in range(N):
        q = (s[n].double().softmax(0)).tolist()
        assert got_full[n].item() == pytest.approx(smoothed_kl_float64(proxy[n].double().softmax(0).tolist(), q, eps),
                                                   rel=1e-4)
        p_topk = [0.0] * V  # the top-k target, renormalised over its k ids and 0 elsewhere, then smoothed
        for z, i in zip(vals[n].double().softmax(0).tolist(), ids[n].tolist()):
            p_topk[i] = z
        assert got_topk[n].item() == pytest.approx(smoothed_kl_float64(p_topk, q, eps), rel=1e-4)
    # The smoothing weakens the KL: at V = 1024 the target is 7 % uniform.
    assert (got_full < full_kl(s, proxy)).all() and (got_topk < topk_kl(s, vals, ids)).all()
    assert full_kl(proxy, proxy, eps).abs().max() < 1e-6


def test_tempered_kl_against_float64_brute_force(tau=2.5):
    """--kd-temperature T: T^2 KL(softmax(z_p / T) || softmax(z_s / T)), the top-k target renormalised over its
    k ids, the student's log-probs over the full vocabulary at T; T = 1 is the paper's KL, bit for bit."""
    g = torch.Generator().manual_seed(7)
    N, V, k = 6, 40, 5
    s, proxy = torch.randn(N, V, generator=g) * 4, torch.randn(N, V, generator=g) * 4
    vals, ids = proxy.topk(k, dim=-1)
    logq_t = (s / tau).log_softmax(-1)
    got_topk = distill.weighted_kl(logq_t, torch.ones(N), vals, ids, tau=tau)[1]
    got_full = distill.weighted_kl(logq_t, torch.ones(N), proxy_logits=proxy, tau=tau)[1]
    for n in range(N):
        lq = [x / tau for x in s[n].double().tolist()]
        log_zq = math.log(sum(math.exp(x) for x in lq))
        lp = [x / tau for x in proxy[n].double().tolist()]
        log_zp = math.log(sum(math.exp(x) for x in lp))
        full = sum(math.exp(a - log_zp) * ((a - log_zp) - (b - log_zq)) for a, b in zip(lp, lq))
        zk = [float(x) / tau for x in vals[n].double()]
        log_zk = math.log(sum(math.exp(x) for x in zk))
        topk = sum(math.exp(z - log_zk) * ((z - log_zk) - (lq[int(i)] - log_zq)) for z, i in zip(zk, ids[n]))
        assert got_full[n].item() == pytest.approx(tau ** 2 * full, rel=1e-5, abs=1e-6), n
        assert got_topk[n].item() == pytest.approx(tau ** 2 * topk, rel=1e-5, abs=1e-6), n
    assert torch.equal(distill.weighted_kl(s.log_softmax(-1), torch.ones(N), vals, ids, tau=1.0)[1], topk_kl(s, vals, ids))


@pytest.mark.parametrize("tau", [1.0, 2.5])
def test_student_loss_against_a_float64_rederivation(tau):
    """Eq. 11 through the training loop's loss function, on a batch of three samples with different weights and
    lengths (and padding), against the loss written out in float64 from the student's logits and the proxy's
    top-k: (sum_t NLL_t + alpha sum_t w_s(t) KL_t) / window tokens, with a window larger than the batch. At a KD
    temperature tau the KL is tau^2 KL(softmax(z_p / tau) || softmax(z_s / tau)) and the NLL stays at 1."""
    V, alpha, n_window = 61, 7.5, 40
    student = tiny_llama(V, 0)
    b = random_batch(V, 5)
    mask = data.response_mask(b["labels"])
    g = torch.Generator().manual_seed(6)
    proxy_logits = torch.randn(int(mask.sum()), V, generator=g) * 2
    vals, ids = proxy_logits.topk(5, dim=-1)
    w_sample = torch.tensor([0.9, 0.2, 0.55])
    b["weights"] = w_sample.repeat_interleave(mask.sum(-1))
    b["topk_logits"], b["topk_ids"] = vals, ids
    loss, m = distill.distill_loss(student, b, {"tokens": n_window}, alpha=alpha, chunk_tokens=3, tau=tau)
    with torch.no_grad():
        logits = student(b["input_ids"], attention_mask=b["attention_mask"]).double()
    total, t = 0.0, 0
    for row in range(3):
        for pos in range(b["input_ids"].shape[1] - 1):
            if not mask[row, pos]:
                continue
            logq = logits[row, pos] - torch.logsumexp(logits[row, pos], 0)
            nll = -float(logq[b["input_ids"][row, pos + 1]])
            zp, zq = vals[t].double() / tau, logits[row, pos] / tau
            p, logq_t = (zp - torch.logsumexp(zp, 0)).exp(), zq - torch.logsumexp(zq, 0)
            kl = tau ** 2 * float((p * (p.log() - logq_t[ids[t]])).sum())
            total += nll + alpha * float(w_sample[row]) * kl
            t += 1
    assert t == int(mask.sum()) and len(set(mask.sum(-1).tolist())) == 3
    assert loss.item() == pytest.approx(total / n_window, rel=1e-5)
    assert m["loss"].item() == pytest.approx(m["nll"].item() + alpha * m["wkl"].item(), rel=1e-5)
    assert m["wkl"].item() < m["kl"].item()  # weights below 1 shrink the KL term


def test_sample_weights_by_hand():
    # l = (-1, -2, -3): mu = -2, population std sqrt(2/3) = 0.816497 (ddof 0; ddof 1 would give 1.0).
    # gamma 0.4: z = ±1 / (0.4 · 0.816497) = ±3.061862 -> sigmoid 0.955292, 0.5, 0.044708.
    w = distill.sample_weights(torch.tensor([-1.0, -2.0, -3.0]), 0.4)
    torch.testing.assert_close(w, torch.tensor([0.955292, 0.5, 0.044708]), atol=1e-6, rtol=0)
    # gamma 1 (the paper): z = ±1.224745 -> 0.772897, 0.5, 0.227103.
    w = distill.sample_weights([-1.0, -2.0, -3.0], 1.0)
    torch.testing.assert_close(w, torch.tensor([0.772897, 0.5, 0.227103]), atol=1e-6, rtol=0)
    ell = torch.tensor([-0.5, -0.7], requires_grad=True)
    assert not distill.sample_weights(ell, 0.4).requires_grad  # no gradient flows into the weights
    torch.testing.assert_close(distill.sample_weights(torch.full((5,), -1.3), 0.4), torch.full((5,), 0.5))
    s = distill.weight_summary(torch.tensor([0.05, 0.5, 0.5, 0.95]))
    assert s["hist"] == [1, 0, 0, 0, 0, 2, 0, 0, 0, 1] and s["mean"] == pytest.approx(0.5)


# ------------------------------------------------------------------------ chunked == unchunked

def tiny_llama(vocab, seed, hidden=32):
    cfg = Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True)
    return Llama(cfg).init_weights(seed=seed)


def random_batch(V, seed):
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for n_p, n_r in [(5, 9), (3, 4), (7, 12)]:
        ids = torch.randint(3, V, (n_p + n_r,), generator=g).tolist()
        pairs.append((ids, [data.IGNORE_INDEX] * n_p + ids[n_p:]))
    return data.collate(pairs, pad_id=0)


@pytest.mark.parametrize("mode", ["topk", "full", "nll"])
def test_chunked_loss_equals_unchunked_values_and_grads(mode):
    V = 97
    student, proxy = tiny_llama(V, 0), tiny_llama(V, 1, hidden=48).requires_grad_(False)
    b = random_batch(V, 2)
    mask = data.response_mask(b["labels"])
    targets = b["input_ids"][:, 1:][mask]
    with torch.no_grad():
        p_logits = proxy(b["input_ids"], attention_mask=b["attention_mask"])[:, :-1][mask]
        p_h = proxy(b["input_ids"], attention_mask=b["attention_mask"], return_hidden=True)[:, :-1][mask]
    vals, ids = p_logits.topk(6, dim=-1)
    w = torch.rand(mask.sum(), generator=torch.Generator().manual_seed(3))

    def reference():  # the whole [N, V] at once
        s = student(b["input_ids"], attention_mask=b["attention_mask"])[:, :-1][mask]
        nll = F.cross_entropy(s, targets, reduction="none")
        kl = {"topk": lambda: topk_kl(s, vals, ids), "full": lambda: full_kl(s, p_logits),
              "nll": lambda: torch.zeros_like(nll)}[mode]()
        return nll, kl

    def chunked(chunk):
        h = student(b["input_ids"], attention_mask=b["attention_mask"], return_hidden=True)[:, :-1][mask]
        kw = {"topk": dict(topk_logits=vals, topk_ids=ids), "full": dict(proxy_h=p_h, proxy_head=proxy.lm_head.weight),
              "nll": {}}[mode]
        nll, _, kl = distill.kd_token_losses(h, student.lm_head.weight, targets, chunk_tokens=chunk, **kw)
        return nll, kl

    results = []
    for fn in (reference, lambda: chunked(4), lambda: chunked(1000)):
        student.zero_grad(set_to_none=True)
        nll, kl = fn()
        (nll.sum() + 100 * (w * kl).sum()).backward()
        results.append((nll.detach(), kl.detach(), {n: p.grad.clone() for n, p in student.named_parameters()}))
    ref = results[0]
    for nll, kl, grads in results[1:]:
        torch.testing.assert_close(nll, ref[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(kl, ref[1], atol=1e-5, rtol=1e-5)
        for n in grads:
            torch.testing.assert_close(grads[n], ref[2][n], atol=1e-5, rtol=1e-4, msg=n)
    assert mode == "nll" or ref[1].min() > 0


def cpu_peak_bytes(fn) -> int:
    """Peak bytes the CPU allocator held during fn() (the benchmark's measure, from its profiler trace)."""
    import bench
    return bench.peak_bytes(fn, torch.device("cpu"))


def test_chunked_full_vocab_loss_peak_memory_is_bounded():
    """Forward + backward of the full-vocabulary loss (proxy head in the loop), chunk 16: the peak grows with
    chunk · V, not with N · V, and does not grow with N. Measured (2 cores, C = 8): 10 MiB at V = 32k and 40 MiB
    at 128k whether N is 256 or 1024 (five [chunk, V] fp32 tensors live at once in a chunk's backward); the
    unchunked loss peaks at 256 MiB and 1 GiB for N = 256 (eight [N, V] fp32 tensors)."""
    C, chunk = 8, 16

    def peak(N, V):
        g = torch.Generator().manual_seed(0)
        W = (torch.randn(V, C, generator=g) * 0.1).requires_grad_(True)
        Wp = torch.randn(V, C, generator=g) * 0.1
        h0, hp = torch.randn(N, C, generator=g), torch.randn(N, C, generator=g)
        targets = torch.randint(0, V, (N,), generator=g)

        def step():
            h = h0.clone().requires_grad_(True)
            nll, _, kl = distill.kd_token_losses(h, W, targets, proxy_h=hp, proxy_head=Wp, chunk_tokens=chunk)
            (nll.sum() + kl.sum()).backward()
            W.grad = None
        return cpu_peak_bytes(step)

    N = 256
    peaks = {V: peak(N, V) for V in (32768, 131072)}
    for V, p in peaks.items():
        assert p <= 6 * chunk * V * 4 + 2 * V * C * 4, (V, p)  # a few [chunk, V] fp32 and the head's gradient
        assert p < N * V * 4 / 2, (V, p)  # far below one [N, V] fp32 tensor
    dV = 131072 - 32768
    assert peaks[131072] - peaks[32768] <= 6 * chunk * dV * 4 + 2 * dV * C * 4, peaks
    assert peak(4 * N, 32768) <= peaks[32768] + 2**20  # 4x the tokens: only [N]- and [N, C]-sized tensors grow


# --------------------------------------------------------------------------------- a tiny world

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tokenizer, 40 teacher rows of the embedded world, an eval file, and a random toy proxy (with its
    tokenizer) saved as an HF directory."""
    d = tmp_path_factory.mktemp("distill_world")
    tok, rows = write_world(d, 40)
    data.write_jsonl(d / "D_s.jsonl", rows)
    data.write_jsonl(d / "eval.jsonl", embedded.make_problems(4, seed=0, split="eval"))
    ids = data.special_ids(tok)
    cfg = Config.preset("toy", tok.get_vocab_size(), bos_token_id=ids["bos"], eos_token_id=ids["eos"],
                        pad_token_id=ids["pad"], hidden_size=48, intermediate_size=96)
    Llama(cfg).init_weights(seed=7).save_pretrained(d / "proxy")
    data.save_tokenizer(tok, d / "proxy")
    return d


def run(*argv):
    return distill.main([str(a) for a in argv])


def cache_args(world, out, *extra):
    return ["cache", "--proxy", world / "proxy", "--data", world / "D_s.jsonl", "--out", out, "--topk", "4",
            "--batch-size", "6", "--device", "cpu", "--quiet", *extra]


@pytest.fixture(scope="module")
def cache_dir(world):
    out = world / "cache"
    assert run(*cache_args(world, out, "--shard-tokens", "700")) == 0
    return out


def test_cache_round_trip_across_shards(world, cache_dir):
    pc = cache.ProxyCache(cache_dir)
    assert len(pc.index["shards"]) >= 3 and pc.k == 4
    tok = data.load_tokenizer(world)
    rows = data.read_teacher(world / "D_s.jsonl")
    seqs, _ = train.encode_seqs(tok, rows, "plain", 1024)
    proxy = Llama.from_pretrained(world / "proxy")
    for i in range(len(seqs)):  # one sample at a time, no padding: a direct forward
        ids = torch.tensor([seqs[i].ids])
        mask = torch.tensor([seqs[i].labels[1:]]) != data.IGNORE_INDEX
        with torch.no_grad():
            logits = proxy(ids)[:, :-1][mask]
            lp = token_logprobs(proxy, ids, mask=mask)[mask]
        vals, idx = logits.topk(4, dim=-1)
        got_v, got_i = pc.rows([i])
        assert got_v.shape == (seqs[i].n_targets, 4)
        torch.testing.assert_close(got_v, vals, atol=1e-5, rtol=1e-5)
        assert torch.equal(got_i, idx)
        assert pc.mean_logp[i].item() == pytest.approx(lp.mean().item(), abs=1e-5)
    # Rows of several samples come back concatenated in the order asked (what a batch needs), and a prefix of k.
    order = [31, 2, 17]
    v, i = pc.rows(order, k=2)
    parts = [pc.rows([s]) for s in order]
    assert torch.equal(v, torch.cat([p[0][:, :2] for p in parts]))
    assert torch.equal(i, torch.cat([p[1][:, :2] for p in parts]))


def test_cache_rows_are_safetensors_own_read_in_both_dtypes(world, cache_dir, tmp_path):
    # rows() maps the shards' bytes itself: they must be what safetensors reads, bf16 included (numpy has no bf16).
    bf16 = tmp_path / "cache_bf16"
    assert run(*cache_args(world, bf16, "--shard-tokens", "700", "--cache-dtype", "bfloat16")) == 0
    for d, dtype in ((cache_dir, torch.float32), (bf16, torch.bfloat16)):
        pc = cache.ProxyCache(d)
        shards = [load_file(str(d / sh["file"])) for sh in pc.index["shards"]]
        assert len(shards) >= 3 and shards[0]["topk_logits"].dtype == dtype
        want_v = torch.cat([t["topk_logits"] for t in shards]).float()
        want_i = torch.cat([t["topk_ids"] for t in shards]).long()
        order = list(range(len(pc.mean_logp)))  # every sample, in order: every shard's rows end to end
        v, i = pc.rows(order)
        assert v.dtype == torch.float32 and i.dtype == torch.int64
        assert torch.equal(v, want_v) and torch.equal(i, want_i)
        v, i = pc.rows([], k=3)
        assert v.shape == (0, 3) and i.shape == (0, 3)


def test_cache_resumes_at_the_first_missing_shard(world, cache_dir, tmp_path):
    out = tmp_path / "cache"
    shutil.copytree(cache_dir, out)
    index = json.loads((out / "index.json").read_text())
    index["complete"] = False  # as a kill mid-run leaves it
    (out / "index.json").write_text(json.dumps(index))
    before = {p.name: load_file(str(p)) for p in out.glob("shard-*.safetensors")}
    (out / "shard-00001.safetensors").unlink()
    torn = out / ".shard-00001.safetensors.tmp99999999"  # a killed writer's temporary (data.atomic_path's name)
    torn.write_bytes(b"torn")
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.safetensors")}
    with pytest.raises(cache.CacheError, match="unfinished"):
        cache.ProxyCache(out)
    assert run(*cache_args(world, out, "--shard-tokens", "700")) == 0
    for name, tensors in before.items():
        again = load_file(str(out / name))  # the rewritten shard is identical
        assert all(torch.equal(again[k], tensors[k]) for k in tensors) and again.keys() == tensors.keys(), name
        if name != "shard-00001.safetensors":
            assert (out / name).stat().st_mtime_ns == mtimes[name], name  # the others were not redone
    assert sorted(out.glob(".*.tmp*")) == [torn]  # only the dead writer's temporary, never read; none of ours
    with pytest.raises(SystemExit):  # other settings never overwrite a cache
        run(*cache_args(world, out, "--shard-tokens", "700", "--topk", "3"))


# ------------------------------------------------------------------------------------ training

def train_args(world, out, method, *extra):
    return ["train", "--method", method, "--init", "toy", "--tokenizer", world, "--data", world / "D_s.jsonl",
            "--out", out, "--lr", "3e-3", "--device", "cpu", "--quiet", "--seed", "1", "--log-every", "1", *extra]


def test_resume_is_bitwise_identical(world, cache_dir, tmp_path):
    common = ["--cache", cache_dir, "--topk", "4", "--batch-size", "4", "--chunk-tokens", "64"]
    assert run(*train_args(world, tmp_path / "full", "proxykd", *common)) == 0
    assert run(*train_args(world, tmp_path / "cut", "proxykd", *common, "--stop-after", "4")) == 3
    assert run(*train_args(world, tmp_path / "cut", "proxykd", *common, "--resume")) == 0
    full, cut = weights(tmp_path / "full"), weights(tmp_path / "cut")
    for k in full:
        assert torch.equal(full[k], cut[k]), k
    lf, lc = metric_rows(tmp_path / "full", "distill"), metric_rows(tmp_path / "cut", "distill")
    assert [r["step"] for r in lf] == list(range(1, 11))
    losses = lambda rows: [(r["loss"], r["nll"], r["kl"], r["wkl"]) for r in rows]  # noqa: E731
    assert losses(lc) == losses(lf)
    # The weight distribution is logged once, at the start, and matches the formula over the cache.
    (wrow,) = metric_rows(tmp_path / "cut", "weights")
    w = distill.sample_weights(cache.ProxyCache(cache_dir).mean_logp, 0.4)
    assert wrow["mean"] == pytest.approx(float(w.mean())) and sum(wrow["hist"]) == 40 and wrow["gamma"] == 0.4
    assert 0 < wrow["min"] < 0.5 < wrow["max"] < 1


def test_accumulation_4x1_equals_2x2(world, cache_dir, tmp_path):
    # Two optimizer steps at a small lr: Adam's first steps move every weight by about lr whatever the size of its
    # gradient, so a weight whose gradient is ~0 (and rounds differently) would move differently at a large lr.
    common = ["--cache", cache_dir, "--topk", "4", "--epochs", "0.2", "--lr", "1e-4"]
    assert run(*train_args(world, tmp_path / "a", "proxykd", *common, "--batch-size", "4", "--grad-accum", "1")) == 0
    assert run(*train_args(world, tmp_path / "b", "proxykd", *common, "--batch-size", "2", "--grad-accum", "2")) == 0
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-6, rtol=1e-5)
    la, lb = metric_rows(tmp_path / "a", "distill"), metric_rows(tmp_path / "b", "distill")
    for key in ("loss", "nll", "kl", "wkl", "w"):
        assert [r[key] for r in la] == pytest.approx([r[key] for r in lb], rel=1e-5), key


def test_cached_topk_with_k_equal_v_matches_online_full_vocab(world, tmp_path):
    """A cache holding the whole vocabulary (k = V) gives the student the same first-step KL as the proxy run in
    the loop (--topk 0): the cached rows land on the right response positions through batching and padding."""
    V = data.load_tokenizer(world).get_vocab_size()
    assert run(*cache_args(world, tmp_path / "cache_v", "--topk", str(V), "--shard-tokens", "500")) == 0
    common = ["--batch-size", "8", "--stop-after", "1"]
    assert run(*train_args(world, tmp_path / "cached", "proxykd", *common, "--cache", tmp_path / "cache_v",
                           "--topk", str(V))) == 3
    assert run(*train_args(world, tmp_path / "online", "proxykd", *common, "--proxy", world / "proxy",
                           "--topk", "0", "--chunk-tokens", "37")) == 3
    (c,), (o,) = metric_rows(tmp_path / "cached", "distill"), metric_rows(tmp_path / "online", "distill")
    for key in ("nll", "kl", "wkl", "w", "loss"):
        assert c[key] == pytest.approx(o[key], rel=1e-4), key
    assert c["kl"] > 0.01


def test_blackbox_needs_no_proxy_and_reports_eval(world, tmp_path):
    out = tmp_path / "bb"
    assert run(*train_args(world, out, "blackbox", "--batch-size", "8", "--eval", world / "eval.jsonl",
                           "--max-new-tokens", "8")) == 0
    rows = [r for r in metric_rows(out, "distill") if "step" in r]
    assert len(rows) == 5 and "kl" not in rows[-1] and rows[-1]["nll"] > 0
    assert "eval_accuracy" in metric_rows(out, "distill")[-1]
    assert not metric_rows(out, "weights")
    ev = json.loads((out / "eval.json").read_text())
    assert ev["n"] == 4 and ev["accuracy"] * 4 == round(ev["accuracy"] * 4)  # scored over all 4 eval problems
    assert ev["accuracy"] == metric_rows(out, "distill")[-1]["eval_accuracy"]
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()


def test_refusals(world, cache_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run("--help")
    assert e.value.code == 0
    for method in ("proxykd", "kd"):  # a method that needs a proxy, without one
        with pytest.raises(SystemExit) as e:
            run(*train_args(world, tmp_path / "x", method))
        assert e.value.code != 0 and "--cache" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run(*train_args(world, tmp_path / "x", "proxykd", "--topk", "0"))
    assert "--proxy" in capsys.readouterr().err
    # A cache built with another --max-len.
    with pytest.raises(SystemExit):
        run(*train_args(world, tmp_path / "x", "proxykd", "--cache", cache_dir, "--max-len", "64"))
    assert "--max-len 1024" in capsys.readouterr().err
    # A student tokenizer of another size: both sizes named.
    other = tmp_path / "tok"
    tok2 = embedded.world_tokenizer(vocab_size=350, seed=0)
    data.save_tokenizer(tok2, other)
    with pytest.raises(SystemExit):
        run(*train_args(world, tmp_path / "x", "proxykd", "--cache", cache_dir, "--tokenizer", other))
    err = capsys.readouterr().err
    assert str(tok2.get_vocab_size()) in err and str(data.load_tokenizer(world).get_vocab_size()) in err
    # More top-k than cached, a cache from another proxy.
    with pytest.raises(SystemExit):
        run(*train_args(world, tmp_path / "x", "proxykd", "--cache", cache_dir, "--topk", "8"))
    assert "top-4" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run(*train_args(world, tmp_path / "x", "proxykd", "--cache", cache_dir, "--topk", "4", "--proxy", world))
    assert "built from proxy" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run(*train_args(world, tmp_path / "x", "proxykd", "--cache", cache_dir, "--kd-temperature", "0"))
    assert "--kd-temperature 0.0" in capsys.readouterr().err
    assert not (tmp_path / "x" / "checkpoint").exists()


def test_cached_row_counts_must_match_the_samples(world, cache_dir):
    """Sequences encoded another way (here: cut to 48 tokens) do not fit the cache: one line naming the sample."""
    tok = data.load_tokenizer(world)
    rows = data.read_teacher(world / "D_s.jsonl")
    seqs, cut = train.encode_seqs(tok, rows, "plain", 48)
    assert cut
    pc = cache.ProxyCache(cache_dir)
    with pytest.raises(cache.CacheError, match=r"sample \d+ \(id .*cached positions"):
        pc.check(rows, seqs, tok, "plain", 1024, tok.get_vocab_size(), None, 4)
    with pytest.raises(cache.CacheError, match="samples"):
        pc.check(rows[:-1], seqs[:-1], tok, "plain", 1024, tok.get_vocab_size(), None, 4)
    with pytest.raises(cache.CacheError, match="embedding"):
        pc.check(rows, seqs, tok, "plain", 1024, tok.get_vocab_size() + 64, None, 4)


def test_kd_method_uses_unit_weights(world, cache_dir, tmp_path):
    out = tmp_path / "kd"
    assert run(*train_args(world, out, "kd", "--cache", cache_dir, "--topk", "4", "--batch-size", "8",
                           "--stop-after", "2")) == 3
    for r in metric_rows(out, "distill"):
        assert r["w"] == pytest.approx(1.0) and r["wkl"] == pytest.approx(r["kl"]) and r["kl"] > 0
    (wrow,) = metric_rows(out, "weights")
    assert wrow["min"] == wrow["max"] == 1.0 and wrow["method"] == "kd"


def test_kl_eps_weakens_the_kl_term(world, cache_dir, tmp_path):
    """--kl-eps smooths both distributions: the same first step logs a smaller KL (V ~ 400 here: 3 % uniform)."""
    common = ["--cache", cache_dir, "--topk", "4", "--batch-size", "8", "--stop-after", "1"]
    assert run(*train_args(world, tmp_path / "plain", "kd", *common)) == 3
    assert run(*train_args(world, tmp_path / "eps", "kd", *common, "--kl-eps", "7e-5")) == 3
    (a,), (b,) = metric_rows(tmp_path / "plain", "distill"), metric_rows(tmp_path / "eps", "distill")
    assert a["nll"] == b["nll"] and 0 < b["kl"] < a["kl"]


def test_cache_head_is_fp32_for_bf16_weights(world):
    """A bf16 proxy (as on CUDA): the cached logits are the fp32 product of its hidden states and its head, not the
    bf16 one (which rounds a logit of 16 by up to 1/16)."""
    tok = data.load_tokenizer(world)
    proxy = Llama.from_pretrained(world / "proxy", dtype=torch.bfloat16).eval()
    seqs, _ = train.encode_seqs(tok, data.read_teacher(world / "D_s.jsonl")[:4], "plain", 1024)
    b = data.collate([(s.ids, s.labels) for s in seqs], data.special_ids(tok)["pad"])
    vals, ids, lp, counts = cache.proxy_token_stats(proxy, b, 4)
    mask = data.response_mask(b["labels"])
    with torch.no_grad():
        h = proxy(b["input_ids"], attention_mask=b["attention_mask"], return_hidden=True)[:, :-1][mask]
    fp32 = h.float() @ proxy.lm_head.weight.float().T
    assert vals.dtype == torch.float32
    torch.testing.assert_close(vals, fp32.topk(4, dim=-1).values, atol=1e-5, rtol=1e-5)
    bf16 = (h @ proxy.lm_head.weight.T).float().topk(4, dim=-1).values
    assert (bf16 - vals).abs().max() > 0  # the bf16 head would have stored other numbers


def test_chunk_tokens_must_be_positive(world, cache_dir, tmp_path, capsys):
    for cmd in (train_args(world, tmp_path / "x", "kd", "--cache", cache_dir, "--chunk-tokens", "0"),
                cache_args(world, tmp_path / "c", "--chunk-tokens", "0")):
        with pytest.raises(SystemExit) as e:
            run(*cmd)
        assert e.value.code == 2 and "--chunk-tokens" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run(*train_args(world, tmp_path / "x", "kd", "--cache", cache_dir, "--kl-eps", "-1"))
    assert "--kl-eps" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "c").exists()
