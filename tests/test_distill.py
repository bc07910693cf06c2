"""Stage 2: the KL terms against float64 brute force, the chunked loss against the unchunked one (values and
gradients), the sample weights by hand, the proxy cache round trip and resume, bounded memory of the chunked
full-vocabulary loss, and the training loop (resume, accumulation, cached vs online KL, refusals)."""
import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import data
import distill
import proxy_align
import world as embedded
from model import Config, Llama, token_logprobs
from conftest import write_world


# ------------------------------------------------------------------------------------- the KL terms

def test_topk_kl_hand_computed():
    # Student uniform over V = 3: log q = -log 3. Proxy top-2 logits (1, 0): p = (e, 1) / (e + 1).
    p0, p1 = math.e / (math.e + 1), 1 / (math.e + 1)
    expected = p0 * math.log(p0) + p1 * math.log(p1) + math.log(3)  # = 0.516409...
    kl = distill.topk_kl(torch.zeros(1, 3), torch.tensor([[1.0, 0.0]]), torch.tensor([[0, 1]]))
    assert kl.item() == pytest.approx(expected, abs=1e-6) and expected == pytest.approx(0.516409, abs=1e-6)


def test_topk_kl_against_float64_brute_force():
    g = torch.Generator().manual_seed(0)
    N, V, k = 7, 50, 5
    s = torch.randn(N, V, generator=g) * 3
    proxy = torch.randn(N, V, generator=g) * 3
    vals, ids = proxy.topk(k, dim=-1)
    got = distill.topk_kl(s, vals, ids)
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
    torch.testing.assert_close(distill.topk_kl(s, vals, ids), distill.full_kl(s, proxy), atol=1e-5, rtol=1e-5)


def test_full_kl_against_float64_brute_force():
    g = torch.Generator().manual_seed(1)
    s, p = torch.randn(4, 30, generator=g) * 2, torch.randn(4, 30, generator=g) * 2
    got = distill.full_kl(s, p)
    for n in range(4):
        lp = p[n].double() - torch.logsumexp(p[n].double(), 0)
        lq = s[n].double() - torch.logsumexp(s[n].double(), 0)
        ref = sum(math.exp(a) * (a - b) for a, b in zip(lp.tolist(), lq.tolist()))
        assert got[n].item() == pytest.approx(ref, rel=1e-5, abs=1e-6)
    assert distill.full_kl(p, p).abs().max() < 1e-6


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
    mask, targets = distill.response_positions(b)
    with torch.no_grad():
        p_logits = proxy(b["input_ids"], attention_mask=b["attention_mask"])[:, :-1][mask]
        p_h = proxy(b["input_ids"], attention_mask=b["attention_mask"], return_hidden=True)[:, :-1][mask]
    vals, ids = p_logits.topk(6, dim=-1)
    w = torch.rand(mask.sum(), generator=torch.Generator().manual_seed(3))

    def reference():  # the whole [N, V] at once
        s = student(b["input_ids"], attention_mask=b["attention_mask"])[:, :-1][mask]
        nll = F.cross_entropy(s, targets, reduction="none")
        kl = {"topk": lambda: distill.topk_kl(s, vals, ids), "full": lambda: distill.full_kl(s, p_logits),
              "nll": lambda: torch.zeros_like(nll)}[mode]()
        return nll, kl

    def chunked(chunk):
        h = student(b["input_ids"], attention_mask=b["attention_mask"], return_hidden=True)[:, :-1][mask]
        kw = {"topk": dict(topk_logits=vals, topk_ids=ids), "full": dict(proxy_h=p_h, proxy_weight=proxy.lm_head.weight),
              "nll": {}}[mode]
        return distill.kd_token_losses(h, student.lm_head.weight, targets, chunk_tokens=chunk, **kw)

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
            nll, kl = distill.kd_token_losses(h, W, targets, proxy_h=hp, proxy_weight=Wp, chunk_tokens=chunk)
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
    cache = distill.ProxyCache(cache_dir)
    assert len(cache.index["shards"]) >= 3 and cache.k == 4
    tok = data.load_tokenizer(world)
    rows = data.read_teacher(world / "D_s.jsonl")
    seqs, _ = proxy_align.encode_rows(tok, rows, "plain", 1024)
    proxy = Llama.from_pretrained(world / "proxy")
    for i in range(len(seqs)):  # one sample at a time, no padding: a direct forward
        ids = torch.tensor([seqs[i].ids])
        mask = torch.tensor([seqs[i].labels[1:]]) != data.IGNORE_INDEX
        with torch.no_grad():
            logits = proxy(ids)[:, :-1][mask]
            lp = token_logprobs(proxy, ids, mask=mask)[mask]
        vals, idx = logits.topk(4, dim=-1)
        got_v, got_i = cache.rows([i])
        assert got_v.shape == (seqs[i].n_targets, 4)
        torch.testing.assert_close(got_v, vals, atol=1e-5, rtol=1e-5)
        assert torch.equal(got_i, idx)
        assert cache.mean_logp[i].item() == pytest.approx(lp.mean().item(), abs=1e-5)
    # Rows of several samples come back concatenated in the order asked (what a batch needs), and a prefix of k.
    order = [31, 2, 17]
    v, i = cache.rows(order, k=2)
    parts = [cache.rows([s]) for s in order]
    assert torch.equal(v, torch.cat([p[0][:, :2] for p in parts]))
    assert torch.equal(i, torch.cat([p[1][:, :2] for p in parts]))


def test_cache_resumes_at_the_first_missing_shard(world, cache_dir, tmp_path):
    out = tmp_path / "cache"
    shutil.copytree(cache_dir, out)
    index = json.loads((out / "index.json").read_text())
    index["complete"] = False  # as a kill mid-run leaves it
    (out / "index.json").write_text(json.dumps(index))
    before = {p.name: load_file(str(p)) for p in out.glob("shard-*.safetensors")}
    (out / "shard-00001.safetensors").unlink()
    (out / "shard-00001.safetensors.tmp").write_bytes(b"torn")
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.safetensors")}
    with pytest.raises(distill.CacheError, match="unfinished"):
        distill.ProxyCache(out)
    assert run(*cache_args(world, out, "--shard-tokens", "700")) == 0
    for name, tensors in before.items():
        again = load_file(str(out / name))  # the rewritten shard is identical
        assert all(torch.equal(again[k], tensors[k]) for k in tensors) and again.keys() == tensors.keys(), name
        if name != "shard-00001.safetensors":
            assert (out / name).stat().st_mtime_ns == mtimes[name], name  # the others were not redone
    assert not (out / "shard-00001.safetensors.tmp").exists()
    with pytest.raises(SystemExit):  # other settings never overwrite a cache
        run(*cache_args(world, out, "--shard-tokens", "700", "--topk", "3"))


# ------------------------------------------------------------------------------------ training

def train_args(world, out, method, *extra):
    return ["train", "--method", method, "--init", "toy", "--tokenizer", world, "--data", world / "D_s.jsonl",
            "--out", out, "--lr", "3e-3", "--device", "cpu", "--quiet", "--seed", "1", "--log-every", "1", *extra]


def weights(path):
    return load_file(str(path / "model.safetensors"))


def metric_rows(path, stage):
    return [r for r in map(json.loads, (path / "metrics.jsonl").read_text().splitlines()) if r.get("stage") == stage]


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
    w = distill.sample_weights(distill.ProxyCache(cache_dir).mean_logp, 0.4)
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
    assert 0 <= json.loads((out / "eval.json").read_text())["accuracy"] <= 1
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()


def test_refusals(world, cache_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run("--help")
    assert e.value.code == 0
    for method in ("proxykd", "whitebox", "proxykd-noweight"):  # a method that needs a proxy, without one
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
    assert not (tmp_path / "x" / "checkpoint").exists()


def test_cached_row_counts_must_match_the_samples(world, cache_dir):
    """Sequences encoded another way (here: cut to 48 tokens) do not fit the cache: one line naming the sample."""
    tok = data.load_tokenizer(world)
    rows = data.read_teacher(world / "D_s.jsonl")
    seqs, cut = proxy_align.encode_rows(tok, rows, "plain", 48)
    assert cut
    cache = distill.ProxyCache(cache_dir)
    with pytest.raises(distill.CacheError, match=r"sample \d+ \(id .*cached positions"):
        cache.check(rows, seqs, tok, "plain", 1024, tok.get_vocab_size(), None, 4)
    with pytest.raises(distill.CacheError, match="samples"):
        cache.check(rows[:-1], seqs[:-1], tok, "plain", 1024, tok.get_vocab_size(), None, 4)
    with pytest.raises(distill.CacheError, match="embedding"):
        cache.check(rows, seqs, tok, "plain", 1024, tok.get_vocab_size() + 64, None, 4)


def test_unweighted_methods_use_unit_weights(world, cache_dir, tmp_path):
    for method in ("whitebox", "proxykd-noweight"):
        out = tmp_path / method
        assert run(*train_args(world, out, method, "--cache", cache_dir, "--topk", "4", "--batch-size", "8",
                               "--stop-after", "2")) == 3
        for r in metric_rows(out, "distill"):
            assert r["w"] == pytest.approx(1.0) and r["wkl"] == pytest.approx(r["kl"]) and r["kl"] > 0
            assert r["loss"] == pytest.approx(r["nll"] + 100 * r["kl"], rel=1e-5)
        (wrow,) = metric_rows(out, "weights")
        assert wrow["min"] == wrow["max"] == 1.0 and wrow["method"] == method
