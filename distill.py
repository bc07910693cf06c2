"""Stage 2 of Proxy-KD: distil the black-box teacher into the student through the aligned proxy.

    cache  run the proxy over D_s, teacher-forced on the teacher's responses: at every response position its
           top-k logits and ids (k = 10), per sample ℓ = mean_t log π_p(y_t | x, y_<t) (full-vocabulary
           softmax). Written as memory-mappable safetensors shards as they fill; a killed run resumes at the
           first missing shard.
    train  the student on NLL(y) + α · w · KL(p_proxy ‖ p_student), w = σ((ℓ − μ) / (γ·std)) per sample, or a
           baseline / ablation of it (--method):
             blackbox          NLL only: the teacher's text and nothing else (black-box KD)
             whitebox          NLL + α · KL to an unaligned proxy, w ≡ 1 (white-box KD; give it the base's cache)
             proxykd           NLL + α · w · KL (full Proxy-KD)
             proxykd-noweight  NLL + α · KL, w ≡ 1 (the "w/o weighting" row)
           The proxy directory decides the rest: the aligned proxy, the SFT-only one ("w/o DPO") or the base
           ("w/o alignment"). --topk 0 drops the cache and runs the proxy in the loop (full-vocabulary KL).

    python distill.py cache --proxy runs/x/proxy --data runs/x/split/D_s.jsonl --out runs/x/cache_proxy
    python distill.py train --method proxykd --init runs/bases/student --data runs/x/split/D_s.jsonl \\
        --cache runs/x/cache_proxy --out runs/x/student_proxykd

Shapes: N response tokens (of a batch, a chunk or a shard), k proxy top-k, V vocabulary, C hidden size.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import data
import proxy_align
import train
from model import CheckpointError, Llama

METHODS = ("blackbox", "whitebox", "proxykd", "proxykd-noweight")
CACHE_VERSION = 1
# ~2M response tokens a shard: 2M × k=10 × 8 bytes = 160 MB of top-k rows held while a shard fills.
SHARD_TOKENS = 1 << 21
# Tokens per chunk of the head + log-softmax + KL: [1024, V] fp32 is the largest tensor the loss makes
# (1024 × 128256 × 4 B = 0.5 GB for Llama 3's vocabulary), whatever the batch.
CHUNK_TOKENS = 1024


class CacheError(ValueError):
    """A proxy cache that does not fit this run; the message is one line naming the cache and the mismatch."""


# ------------------------------------------------------------------------------------------ losses

def kl_from_logprobs(logp, logq):
    """Σ_j p_j (log p_j − log q_j) over the last dim, p = exp(logp): forward KL(p ‖ q) per row. fp32 in."""
    return (logp.exp() * (logp - logq)).sum(-1)


def topk_kl_logq(logq, topk_logits, topk_ids):
    """topk_kl with the student's full-vocabulary log-softmax logq [N, V] already computed (the chunk driver
    shares it with the NLL)."""
    logp = topk_logits.float().log_softmax(-1)  # [N, k]: the proxy's top-k, renormalised
    return kl_from_logprobs(logp, logq.gather(-1, topk_ids.long()))


def topk_kl(student_logits, topk_logits, topk_ids):
    """Forward KL(p_proxy ‖ p_student) per token over the proxy's top-k (Proxy-KD's distillation term;
    DESIGN.md "Student loss").

    student_logits [N, V], topk_logits [N, k] (the proxy's k largest logits), topk_ids [N, k] -> [N] fp32:
        KL_t = Σ_j p_j (log p_j − log q_j),  p = softmax(topk_logits): the proxy's top-k RENORMALISED,
                                             log q_j = log_softmax(student_logits)[topk_ids_j], the student's
                                             FULL-vocabulary log-softmax gathered at the k ids (not renormalised).
    So the student is pulled to put the proxy's top-k mass on the same ids, and is not rewarded for mass it
    puts anywhere else. KL_t >= 0 (q summed over the k ids is at most 1)."""
    return topk_kl_logq(student_logits.float().log_softmax(-1), topk_logits, topk_ids)


def full_kl(student_logits, proxy_logits):
    """Forward KL(p_proxy ‖ p_student) per token over the whole vocabulary (the --topk 0 online mode).
    student_logits [N, V], proxy_logits [N, V] -> [N] fp32."""
    return kl_from_logprobs(proxy_logits.float().log_softmax(-1), student_logits.float().log_softmax(-1))


def _kd_chunk(weight, h, targets, topk_logits, topk_ids, proxy_weight, proxy_h):
    """One chunk: the student head, one fp32 log-softmax shared by NLL and KL. -> nll [n], kl [n]."""
    logq = F.linear(h, weight).float().log_softmax(-1)  # [n, V] fp32: only ever one chunk's worth
    nll = -logq.gather(-1, targets[:, None]).squeeze(-1)
    if topk_ids is not None:
        kl = topk_kl_logq(logq, topk_logits, topk_ids)
    elif proxy_h is not None:
        logp = F.linear(proxy_h, proxy_weight).float().log_softmax(-1)  # [n, V], no grad (frozen proxy)
        kl = kl_from_logprobs(logp, logq)
    else:
        kl = torch.zeros_like(nll)
    return nll, kl


def kd_token_losses(h, weight, targets, topk_logits=None, topk_ids=None, proxy_h=None, proxy_weight=None,
                    chunk_tokens: int = CHUNK_TOKENS):
    """Per-token NLL [N] and KL [N] (fp32) over the student's response positions, chunk by chunk.

    h [N, C]: the student's final (normed) hidden states at the shifted response positions, weight [V, C]: its
    head, targets [N]: the teacher's tokens. The KL comes from the cached top-k rows (topk_logits, topk_ids
    [N, k]), or from the proxy's own hidden states proxy_h [N, C_p] and head proxy_weight [V, C_p] (no grad;
    the full-vocabulary mode), or is 0 when neither is given (black-box KD).

    Each chunk runs under activation checkpointing: the forward keeps only its [n] outputs, the backward
    recomputes one chunk's [n, V] at a time. The peak is O(chunk · V) whatever N, never O(N · V)."""
    grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    step = max(1, chunk_tokens)
    nlls, kls = [], []
    for i in range(0, h.shape[0], step):
        sl = slice(i, i + step)
        args = (weight, h[sl], targets[sl],
                None if topk_logits is None else topk_logits[sl], None if topk_ids is None else topk_ids[sl],
                proxy_weight, None if proxy_h is None else proxy_h[sl])
        nll, kl = checkpoint(_kd_chunk, *args, use_reentrant=False) if grad else _kd_chunk(*args)
        nlls.append(nll)
        kls.append(kl)
    if not nlls:
        z = h.new_zeros(0, dtype=torch.float32)
        return z, z
    return torch.cat(nlls), torch.cat(kls)


def sample_weights(mean_logps, gamma: float) -> torch.Tensor:
    """w_i = σ((ℓ_i − μ) / (γ · std)) (Proxy-KD's sample weighting; DESIGN.md "Sample weight").

    mean_logps [n]: ℓ_i, the proxy's mean token log-prob of sample i's teacher response; μ and std over the
    whole set (std: population, ddof 0), computed in float64. Samples the proxy fits better than average get
    w > 0.5. Not renormalised, no gradient. -> [n] fp32. A set with std 0 gets w = 0.5 (every z is 0)."""
    if not gamma > 0:
        raise ValueError(f"gamma must be positive, got {gamma}")
    ell = torch.as_tensor(mean_logps).detach().double().cpu()
    if ell.numel() == 0:
        return ell.float()
    mu, std = ell.mean(), ell.std(correction=0)
    if std == 0:
        return torch.full_like(ell, 0.5, dtype=torch.float32)
    return torch.sigmoid((ell - mu) / (gamma * std)).float()


def weight_summary(w: torch.Tensor) -> dict:
    """Mean, std, min, max and a 10-bin histogram over [0, 1] (fixed edges, so runs compare)."""
    w = w.double()
    return {"n": w.numel(), "mean": float(w.mean()), "std": float(w.std(correction=0)), "min": float(w.min()),
            "max": float(w.max()), "hist": [int(c) for c in torch.histc(w, bins=10, min=0.0, max=1.0)],
            "hist_edges": [i / 10 for i in range(11)]}


def response_positions(batch):
    """mask [B, T-1] of the shifted response positions t (labels[t+1] is a target) and their targets [N], in
    row-major order: exactly the order of `h[:, :-1][mask]` and of the cached rows."""
    mask = batch["labels"][:, 1:] != data.IGNORE_INDEX
    return mask, batch["input_ids"][:, 1:][mask]


def distill_loss_fn(alpha: float, proxy: Llama | None = None, chunk_tokens: int = CHUNK_TOKENS):
    """loss = (Σ_t NLL_t + α Σ_t w_{s(t)} KL_t) / (response tokens of the accumulation window).

    The batch carries the per-token weights ("weights" [N]) and, in the cached mode, the proxy's top-k rows
    ("topk_logits", "topk_ids" [N, k]). With `proxy` and no cached rows, the proxy runs here, under no_grad
    (the full-vocabulary mode). Without either, the KL is 0: black-box KD. Metrics are window means: nll, kl
    (unweighted), wkl (weighted), w (mean weight per token)."""
    def loss_fn(fwd, batch, norm):
        mask, targets = response_positions(batch)
        h = fwd(batch["input_ids"], attention_mask=batch["attention_mask"], return_hidden=True)[:, :-1][mask]
        kw = {}
        if "topk_ids" in batch:
            kw = {"topk_logits": batch["topk_logits"], "topk_ids": batch["topk_ids"]}
        elif proxy is not None:
            with torch.no_grad():
                ph = proxy(batch["input_ids"], attention_mask=batch["attention_mask"], return_hidden=True)
                kw = {"proxy_h": ph[:, :-1][mask], "proxy_weight": proxy.lm_head.weight}
        nll, kl = kd_token_losses(h, fwd.lm_head.weight, targets, chunk_tokens=chunk_tokens, **kw)
        n = norm["tokens"]
        s_nll = nll.sum()
        metrics = {"nll": s_nll / n, "tokens": mask.sum().float()}
        if not kw:
            return s_nll / n, metrics
        w = batch["weights"]
        s_wkl = (w * kl).sum()
        loss = (s_nll + alpha * s_wkl) / n
        return loss, {**metrics, "loss": loss, "kl": kl.sum() / n, "wkl": s_wkl / n, "w": w.sum() / n}
    return loss_fn


# ------------------------------------------------------------------------------------ the proxy pass

@torch.no_grad()
def proxy_token_stats(proxy: Llama, batch, k: int, chunk_tokens: int = CHUNK_TOKENS):
    """One batch through the proxy, teacher-forced. At every response position (row-major, as h[:, :-1][mask]):
    the top-k logits [N, k] fp32 and ids [N, k] int32 (k = 0: None), and the full-vocabulary log-prob of the
    teacher's token [N] fp32. Also returns the per-row counts [B]."""
    mask, targets = response_positions(batch)
    h = proxy(batch["input_ids"], attention_mask=batch["attention_mask"], return_hidden=True)[:, :-1][mask]
    vals, ids, lps = [], [], []
    for i in range(0, h.shape[0], max(1, chunk_tokens)):
        logits = F.linear(h[i:i + chunk_tokens], proxy.lm_head.weight).float()  # [n, V]
        lps.append(logits.log_softmax(-1).gather(-1, targets[i:i + chunk_tokens, None]).squeeze(-1))
        if k:
            v, j = logits.topk(k, dim=-1)  # sorted, largest first: a prefix is the top-k' for any k' < k
            vals.append(v)
            ids.append(j.int())
    cat = (lambda xs: torch.cat(xs) if xs else None)
    lp = torch.cat(lps) if lps else h.new_zeros(0, dtype=torch.float32)
    return cat(vals), cat(ids), lp, mask.sum(-1)


def _batches_by_length(seqs, indices, batch_size):
    """Indices cut into batches of similar lengths (little padding); the caller puts results back in place."""
    order = sorted(indices, key=lambda i: len(seqs[i].ids))
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


def _collate(seqs, idx, pad_id, device):
    b = data.collate([(seqs[i].ids, seqs[i].labels) for i in idx], pad_id)
    return {k: v.to(device, non_blocking=True) for k, v in b.items()}


@torch.no_grad()
def proxy_mean_logps(proxy: Llama, seqs, pad_id, device, batch_size: int,
                     chunk_tokens: int = CHUNK_TOKENS) -> torch.Tensor:
    """ℓ_i = mean over sample i's response tokens of log π_p(y_t | x, y_<t) (full-vocabulary softmax) -> [n]
    fp32: the `cache` command's mean_logp, for the --topk 0 mode run without a cache."""
    out = torch.zeros(len(seqs), dtype=torch.float64)
    with train.autocast(device):
        for idx in _batches_by_length(seqs, range(len(seqs)), batch_size):
            _, _, lp, counts = proxy_token_stats(proxy, _collate(seqs, idx, pad_id, device), 0, chunk_tokens)
            for i, part in zip(idx, lp.double().cpu().split(counts.tolist())):
                out[i] = part.sum() / max(1, part.numel())
    return out.float()


# ------------------------------------------------------------------------------------------- cache

def plan_shards(counts: list[int], shard_tokens: int) -> list[tuple[int, int]]:
    """Consecutive sample ranges [start, end) of about shard_tokens response tokens each; fixed by the data, so
    a resumed run cuts the same shards."""
    plan, start, tok = [], 0, 0
    for i, c in enumerate(counts):
        tok += c
        if tok >= shard_tokens:
            plan.append((start, i + 1))
            start, tok = i + 1, 0
    if start < len(counts) or not plan:
        plan.append((start, len(counts)))
    return plan


def tokenizer_hash(tok) -> str:
    """A hash of the token -> id map: two tokenizers with the same hash read cached ids as the same tokens."""
    vocab = sorted(tok.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode("utf-8", "surrogatepass")).hexdigest()[:16]


def data_hash(rows) -> str:
    """A hash of what the cache depends on in the data: each row's id, prompt and response, in order."""
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps([r["id"], data.messages_of(r), r["response"]], ensure_ascii=False)
                 .encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:16]


def cache_index(rows, counts: list[int], tok, fmt, args, embedding_size: int) -> dict:
    shards = [{"file": f"shard-{i:05d}.safetensors", "start": a, "end": b, "tokens": sum(counts[a:b]),
               "ids": [r["id"] for r in rows[a:b]]}
              for i, (a, b) in enumerate(plan_shards(counts, args.shard_tokens))]
    return {"version": CACHE_VERSION, "k": args.topk, "max_len": args.max_len, "format": fmt,
            "dtype": args.cache_dtype, "proxy": str(Path(args.proxy).resolve()), "vocab_size": tok.get_vocab_size(),
            "embedding_size": embedding_size, "tokenizer_hash": tokenizer_hash(tok), "data": str(args.data),
            "data_hash": data_hash(rows), "n_samples": len(counts), "n_tokens": sum(counts),
            "shard_tokens": args.shard_tokens, "shards": shards, "complete": False}


def _atomic_save(tensors: dict, path: Path, metadata: dict):
    from safetensors.torch import save_file
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    train.fsync_file(tmp)
    os.replace(tmp, path)


def write_shard(proxy, seqs, shard: dict, out: Path, k: int, dtype, pad_id, device, batch_size: int,
                chunk_tokens: int, progress=None):
    """Fill one shard's tensors batch by batch (preallocated from the known counts), then write it atomically.
    seqs: the shard's own samples, seqs[j] is sample start + j."""
    a, b = shard["start"], shard["end"]
    counts = torch.tensor([s.n_targets for s in seqs], dtype=torch.int64)
    offsets = torch.zeros(b - a + 1, dtype=torch.int64)
    offsets[1:] = counts.cumsum(0)
    n_tok = int(offsets[-1])
    topk_logits = torch.empty(n_tok, k, dtype=dtype)
    topk_ids = torch.empty(n_tok, k, dtype=torch.int32)
    mean_logp = torch.empty(b - a, dtype=torch.float32)
    with train.autocast(device):
        for idx in _batches_by_length(seqs, range(len(seqs)), batch_size):
            vals, ids, lp, cnt = proxy_token_stats(proxy, _collate(seqs, idx, pad_id, device), k, chunk_tokens)
            vals, ids, lp = vals.cpu(), ids.cpu(), lp.double().cpu()
            pos = 0
            for j, c in zip(idx, cnt.tolist()):
                assert c == counts[j], (a + j, c, int(counts[j]))
                lo = int(offsets[j])
                topk_logits[lo:lo + c] = vals[pos:pos + c].to(dtype)
                topk_ids[lo:lo + c] = ids[pos:pos + c]
                mean_logp[j] = lp[pos:pos + c].sum() / max(1, c)
                pos += c
            if progress is not None:
                progress.update(len(idx))
    _atomic_save({"topk_logits": topk_logits, "topk_ids": topk_ids, "offsets": offsets, "mean_logp": mean_logp},
                 out / shard["file"], {"start": str(a), "end": str(b), "k": str(k)})


def _first_difference(old: dict, new: dict) -> str | None:
    for key in new:
        if key not in ("complete", "data") and old.get(key) != new[key]:  # the data is compared by its hash
            if key == "shards":
                return "shards: another shard plan (other data, --max-len or tokenizer)"
            return f"{key}: {old.get(key)!r} there, {new[key]!r} now"
    return None


def cmd_cache(args):
    from tqdm import tqdm
    device = train.pick_device(args.device)
    out = Path(args.out)
    src = args.tokenizer or args.proxy
    tok = data.load_tokenizer(src)
    fmt = args.format or data.guess_format(args.proxy)
    if args.topk < 1:
        train.fail(f"--topk {args.topk}: the cache needs k >= 1 (--topk 0 is a `train` mode with the proxy in the loop)")
    rows = proxy_align.teacher_rows(args.data)
    # Only the response lengths of the whole set stay in memory (they fix the shard plan); token ids are encoded
    # again shard by shard, so memory is bounded by one shard at any data size.
    counts, cut = [], 0
    for r in rows:
        (s,), c = proxy_align.encode_rows(tok, [r], fmt, args.max_len)
        counts.append(s.n_targets)
        cut += c
    if cut:
        print(f"{args.data}: {cut} of {len(rows)} sequences cut to --max-len {args.max_len}", flush=True)
    proxy = load_proxy(args.proxy, tok, device)
    if args.topk > proxy.cfg.vocab_size:
        train.fail(f"--topk {args.topk} is larger than the proxy's vocabulary ({proxy.cfg.vocab_size})")
    index = cache_index(rows, counts, tok, fmt, args, proxy.cfg.vocab_size)
    index_path = out / "index.json"
    if index_path.exists():
        old = json.loads(index_path.read_text())
        diff = _first_difference(old, index)
        if diff:
            train.fail(f"{out}: holds a cache built with other settings ({diff}); choose another --out or delete it")
        if old.get("complete"):
            print(f"{out}: cache already complete ({len(index['shards'])} shards)", flush=True)
            return 0
    out.mkdir(parents=True, exist_ok=True)
    data.atomic_write_text(index_path, json.dumps(index) + "\n")
    done = [(out / s["file"]).exists() for s in index["shards"]]
    if any(done):
        print(f"{out}: resuming, {sum(done)} of {len(done)} shards already written", flush=True)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.cache_dtype]
    pad = data.special_ids(tok)["pad"]
    print(f"cache: {len(rows)} sequences, {index['n_tokens']} response tokens, top-{args.topk}, "
          f"{len(done)} shards, format {fmt}, device {device}", flush=True)
    bar = tqdm(total=len(rows), initial=sum(s["end"] - s["start"] for s, d in zip(index["shards"], done) if d),
               desc="cache", unit="seq", disable=True if args.quiet else None)
    for shard, d in zip(index["shards"], done):
        if not d:
            seqs, _ = proxy_align.encode_rows(tok, rows[shard["start"]:shard["end"]], fmt, args.max_len)
            write_shard(proxy, seqs, shard, out, args.topk, dtype, pad, device, args.batch_size, args.chunk_tokens, bar)
    bar.close()
    index["complete"] = True
    data.atomic_write_text(index_path, json.dumps(index) + "\n")
    ml = ProxyCache(out).mean_logp
    print(f"cache: done, mean log-prob per sample {float(ml.mean()):.4f} ± {float(ml.std(correction=0)):.4f}",
          flush=True)
    return 0


class ProxyCache:
    """A finished cache directory, opened for reading: per-sample offsets and mean log-probs in memory (12 bytes
    a sample), the top-k rows memory-mapped (safetensors) and read per batch, only the rows asked for."""

    def __init__(self, path):
        from safetensors import safe_open
        self.path = Path(path)
        f = self.path / "index.json"
        if not f.is_file():
            raise CacheError(f"{self.path}: no index.json (not a proxy cache; build one with `distill.py cache`)")
        try:
            self.index = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise CacheError(f"{f}: not JSON ({e})") from None
        if self.index.get("version") != CACHE_VERSION:
            raise CacheError(f"{f}: cache version {self.index.get('version')}, expected {CACHE_VERSION}")
        if not self.index.get("complete"):
            raise CacheError(f"{self.path}: unfinished cache; rerun `distill.py cache` with the same arguments to "
                             "complete it")
        self.k = self.index["k"]
        self.logits, self.ids, offsets, means, self.shard_of, self.local = [], [], [], [], [], []
        for s_i, sh in enumerate(self.index["shards"]):
            p = self.path / sh["file"]
            try:
                h = safe_open(str(p), framework="pt")
                meta = h.metadata() or {}
                off, ml = h.get_tensor("offsets"), h.get_tensor("mean_logp")
                lg, ids = h.get_slice("topk_logits"), h.get_slice("topk_ids")
            except Exception as e:  # missing file, torn header, missing tensor
                raise CacheError(f"{p}: unreadable cache shard ({type(e).__name__}: {e})") from None
            n = sh["end"] - sh["start"]
            if (meta.get("start"), meta.get("end")) != (str(sh["start"]), str(sh["end"])) or off.shape != (n + 1,) \
                    or ml.shape != (n,) or lg.get_shape() != [int(off[-1]), self.k] or ids.get_shape() != lg.get_shape():
                raise CacheError(f"{p}: shard does not match index.json (samples {sh['start']}..{sh['end']}, k {self.k})")
            self.logits.append(lg)
            self.ids.append(ids)
            offsets.append(off.tolist())
            means.append(ml)
            self.shard_of += [s_i] * n
            self.local += range(n)
        self.offsets = offsets
        self.mean_logp = torch.cat(means) if means else torch.zeros(0)
        self.counts = [o[j + 1] - o[j] for o in offsets for j in range(len(o) - 1)]

    def rows(self, samples, k: int | None = None):
        """The cached rows of these samples, concatenated in the order given: topk_logits [N, k'] fp32 and
        topk_ids [N, k'] int64, k' = k or the cache's k (a prefix: the top-k are stored largest first)."""
        k = k or self.k
        lg, ids = [], []
        for s in samples:
            sh, j = self.shard_of[s], self.local[s]
            a, b = self.offsets[sh][j], self.offsets[sh][j + 1]
            lg.append(self.logits[sh][a:b][:, :k])
            ids.append(self.ids[sh][a:b][:, :k])
        return torch.cat(lg).float(), torch.cat(ids).long()

    def check(self, rows, seqs, tok, fmt: str, max_len: int, embedding_size: int, proxy: str | None, topk: int):
        """Refuse, with one line, a cache built for another run: other tokenizer, chat format, --max-len, data or
        proxy, or fewer than topk columns. Then every sample's cached row count must be its response length."""
        ix, where = self.index, self.path
        check_vocab(f"proxy (cache {where})", ix["vocab_size"], ix["embedding_size"], ix["tokenizer_hash"],
                    tok.get_vocab_size(), embedding_size, tokenizer_hash(tok))
        if ix["format"] != fmt:
            raise CacheError(f"{where}: built with chat format {ix['format']!r}, this run uses {fmt!r} (pass --format)")
        if ix["max_len"] != max_len:
            raise CacheError(f"{where}: built with --max-len {ix['max_len']}, this run uses --max-len {max_len}")
        if topk > self.k:
            raise CacheError(f"{where}: holds the top-{self.k}, this run asks for --topk {topk}")
        if proxy is not None and Path(proxy).resolve() != Path(ix["proxy"]):
            raise CacheError(f"{where}: built from proxy {ix['proxy']}, this run names --proxy {Path(proxy).resolve()}")
        if ix["n_samples"] != len(rows):
            raise CacheError(f"{where}: holds {ix['n_samples']} samples, the data has {len(rows)} (built from "
                             f"{ix['data']})")
        ids = [i for sh in ix["shards"] for i in sh["ids"]]
        bad = next((i for i, (a, r) in enumerate(zip(ids, rows)) if a != r["id"]), None)
        if bad is not None:
            raise CacheError(f"{where}: sample {bad} is id {ids[bad]!r} in the cache but {rows[bad]['id']!r} in the data "
                             f"(cache built from {ix['data']})")
        if ix["data_hash"] != data_hash(rows):
            raise CacheError(f"{where}: same ids but other prompts or responses than the data (built from {ix['data']})")
        for i, (c, s) in enumerate(zip(self.counts, seqs)):
            if c != s.n_targets:
                raise CacheError(f"{where}: sample {i} (id {rows[i]['id']!r}) has {c} cached positions but "
                                 f"{s.n_targets} response tokens here: cache built with another --max-len, tokenizer "
                                 "or data")


def check_vocab(what: str, p_tok: int, p_emb: int, p_hash: str | None, s_tok: int, s_emb: int, s_hash: str | None):
    """Proxy and student must share one tokenizer: the proxy's ids are read as the student's."""
    if p_tok != s_tok:
        raise CacheError(f"{what} tokenizer has {p_tok} tokens, the student's has {s_tok}: proxy and student must "
                         "share one tokenizer")
    if p_emb != s_emb:
        raise CacheError(f"{what} embedding has {p_emb} rows, the student's has {s_emb}: proxy and student must "
                         "have the same vocabulary size")
    if p_hash is not None and s_hash is not None and p_hash != s_hash:
        raise CacheError(f"{what} tokenizer has {p_tok} tokens like the student's but maps them to other ids "
                         f"(hash {p_hash} vs {s_hash}): proxy and student must share one tokenizer")


def load_proxy(path, tok, device) -> Llama:
    """The frozen proxy: bf16 weights on CUDA (it is only ever run forward), fp32 on CPU."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    proxy = Llama.from_pretrained(path, device=device, dtype=dtype).eval()
    if tok.get_vocab_size() > proxy.cfg.vocab_size:
        raise CheckpointError(f"{path}: tokenizer has {tok.get_vocab_size()} tokens but the proxy's embedding has only "
                              f"{proxy.cfg.vocab_size} rows")
    proxy.requires_grad_(False)
    return proxy


# ------------------------------------------------------------------------------------------- train

def distill_batch_fn(seqs, pad_id, device, cache: ProxyCache | None, topk: int, weights: torch.Tensor | None):
    """Collated samples plus, per response token in batch order, its sample's weight and (cached mode) the
    proxy's top-k row, read from the memory-mapped shards for these samples only."""
    counts = torch.tensor([s.n_targets for s in seqs], dtype=torch.int64)

    def batch_fn(idx):
        b = _collate(seqs, idx, pad_id, device)
        idx_t = torch.tensor(idx, dtype=torch.int64)
        w = weights[idx_t] if weights is not None else torch.ones(len(idx))
        b["weights"] = w.repeat_interleave(counts[idx_t]).to(device)
        if cache is not None:
            lg, ids = cache.rows(idx, topk)
            b["topk_logits"], b["topk_ids"] = lg.to(device), ids.to(device)
        return b
    return batch_fn


def cmd_train(args):
    device = train.pick_device(args.device)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    kd = args.method != "blackbox"
    if kd and args.topk > 0 and not args.cache:
        train.fail(f"--method {args.method} needs the proxy: pass --cache DIR (from `distill.py cache --proxy ...`), "
                   "or --topk 0 with --proxy DIR")
    if kd and args.topk == 0 and not args.proxy:
        train.fail(f"--method {args.method} with --topk 0 runs the proxy in the loop: pass --proxy DIR")
    if args.topk < 0:
        train.fail(f"--topk {args.topk}: expected k >= 1 (cached top-k) or 0 (full vocabulary, proxy in the loop)")
    if not args.gamma > 0:
        train.fail(f"--gamma {args.gamma}: expected a positive temperature (paper 1.0, authors' code 0.4)")
    tok, fmt = proxy_align.load_tok_and_format(args)
    rows = proxy_align.teacher_rows(args.data)
    seqs, cut = proxy_align.encode_rows(tok, rows, fmt, args.max_len)
    if cut and train.is_main():
        print(f"{args.data}: {cut} of {len(seqs)} sequences cut to --max-len {args.max_len}", flush=True)
    model = train.load_model(args.init, tok, train.build_device(args, device), seed=args.seed,
                             lora_rank=args.lora_rank, lora_alpha=args.lora_alpha)
    pad = data.special_ids(tok)["pad"]
    cache = proxy = None
    if kd and args.cache:
        cache = ProxyCache(args.cache)
        cache.check(rows, seqs, tok, fmt, args.max_len, model.cfg.vocab_size, args.proxy, max(args.topk, 1))
    if kd and args.topk == 0:
        ptok = data.load_tokenizer(args.proxy) if Path(args.proxy, "tokenizer.json").exists() else tok
        proxy = load_proxy(args.proxy, ptok, device)
        check_vocab(f"proxy {args.proxy}", ptok.get_vocab_size(), proxy.cfg.vocab_size, tokenizer_hash(ptok),
                    tok.get_vocab_size(), model.cfg.vocab_size, tokenizer_hash(tok))
    weights = None
    if args.method == "proxykd":
        if cache is not None:
            ell = cache.mean_logp
        else:  # full-vocabulary mode without a cache: ℓ over the whole set, one proxy pass before training
            if train.is_main():
                print("proxy log-probs over the data for the sample weights", flush=True)
            ell = proxy_mean_logps(proxy, seqs, pad, device, args.batch_size, args.chunk_tokens)
        weights = sample_weights(ell, args.gamma)
    elif kd:
        weights = torch.ones(len(seqs))
    out.mkdir(parents=True, exist_ok=True)
    summary = weight_summary(weights) if weights is not None and len(weights) else None
    train.write_args(out, args, {"format": fmt, "n_samples": len(seqs), "weights": summary})
    teacher = (f"top-{args.topk} of cache {args.cache}" if args.topk and cache is not None else
               f"full vocabulary of proxy {args.proxy}" if proxy is not None else "no proxy")
    if train.is_main():
        print(f"distill ({args.method}): {len(seqs)} sequences, {model.num_params() / 1e6:.2f}M parameters, KL from "
              f"{teacher}, format {fmt}, device {device}"
              + (f", {train.world()} ranks ({args.dist})" if train.world() > 1 else ""), flush=True)
    if summary is not None and train.find_checkpoint(out / "checkpoint") is None:
        train.MetricsLog(out, quiet=args.quiet)({"stage": "weights", "method": args.method, "gamma": args.gamma,
                                                 **summary})
    loss_fn = distill_loss_fn(args.alpha, proxy, args.chunk_tokens)
    batch_fn = distill_batch_fn(seqs, pad, device, cache if args.topk > 0 else None, args.topk, weights)
    finished = train.train_stage(model, seqs, loss_fn, train.nll_window_norm(seqs), args, tok, device, "distill",
                                 batch_fn=batch_fn)
    if finished and args.eval:
        proxy_align.report_eval(model, tok, fmt, args, out, {"stage": "distill", "method": args.method})
    return 0 if finished else 3


# --------------------------------------------------------------------------------------------- CLI

def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("cache", help="the proxy's top-k logits and mean log-probs over D_s, teacher-forced")
    c.add_argument("--proxy", required=True, help="HF directory of the proxy (with tokenizer.json)")
    c.add_argument("--tokenizer", default=None, help="tokenizer.json or its directory (default: --proxy's)")
    c.add_argument("--data", required=True, help="teacher JSONL (prompt/messages + response): the student's D_s")
    c.add_argument("--out", required=True, help="cache directory (index.json + shard-NNNNN.safetensors)")
    c.add_argument("--topk", type=int, default=10, help="proxy logits kept per position (paper: 10)")
    c.add_argument("--max-len", type=int, default=1024, help="max tokens per sequence: must equal train's --max-len")
    c.add_argument("--batch-size", type=int, default=16, help="sequences per proxy forward")
    c.add_argument("--format", default=None, help="chat format plain|chatml|llama3 (default: from --proxy)")
    c.add_argument("--cache-dtype", choices=["float32", "bfloat16"], default="float32",
                   help="dtype of the stored top-k logits (bfloat16 halves them; ids stay int32)")
    c.add_argument("--shard-tokens", type=int, default=SHARD_TOKENS,
                   help="response tokens per shard (memory held while one fills; the unit of resume)")
    c.add_argument("--chunk-tokens", type=int, default=CHUNK_TOKENS, help="positions per head + top-k chunk")
    c.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto")
    c.add_argument("--quiet", action="store_true", help="no progress bar")

    t = sub.add_parser("train", help="train the student: NLL + alpha * w * KL(proxy || student), or a baseline")
    t.add_argument("--init", required=True, help="student: HF directory, or a named size (tiny-student, toy, ...)")
    t.add_argument("--tokenizer", default=None, help="tokenizer.json or its directory (default: --init's)")
    t.add_argument("--data", required=True, help="teacher JSONL (prompt/messages + response): D_s")
    t.add_argument("--format", default=None, help="chat format plain|chatml|llama3 (default: from --init)")
    t.add_argument("--method", choices=METHODS, required=True,
                   help="blackbox: NLL only; whitebox: + KL to an unaligned proxy, w = 1; proxykd: + weighted KL; "
                        "proxykd-noweight: + KL, w = 1")
    t.add_argument("--proxy", default=None, help="proxy HF directory: required with --topk 0; with a cache, checked "
                                                 "against the proxy the cache was built from")
    t.add_argument("--cache", default=None, help="proxy cache directory from `distill.py cache` (--topk >= 1)")
    t.add_argument("--topk", type=int, default=10, help="KL over the proxy's cached top-k (<= the cache's k), or 0: "
                                                        "full vocabulary with the proxy forward in the loop")
    t.add_argument("--alpha", type=float, default=100.0, help="weight of the KL term (paper: 100)")
    t.add_argument("--gamma", type=float, default=0.4,
                   help="sample-weight temperature w = sigmoid((l - mean) / (gamma * std)); default 0.4 is the "
                        "authors' code, the paper says 1.0")
    t.add_argument("--chunk-tokens", type=int, default=CHUNK_TOKENS,
                   help="response tokens per chunk of head + log-softmax + KL ([chunk, V] fp32 is the peak)")
    train.add_eval_args(t, "at the end")
    train.add_train_args(t)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        # `train` runs under torchrun (--dist ddp|fsdp); `cache` is one no-grad pass and runs in one process.
        with train.distributed(args):
            return {"cache": cmd_cache, "train": cmd_train}[args.cmd](args)
    except (CheckpointError, data.DataError, CacheError) as e:
        train.fail(str(e))


if __name__ == "__main__":
    sys.exit(main())
