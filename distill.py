"""Stage 2 of Proxy-KD: distil the black-box teacher into the student through the aligned proxy (paper §3.2).

    cache  run the proxy over D_s, teacher-forced on the teacher's responses (cache.py): at every response position
           its top-k logits and ids (k = 10), per sample ℓ = mean_t log π_p(y_t | x, y_<t).
    train  the student on L = NLL(y) + α · w · KL(p_proxy ‖ p_student), w = σ((ℓ − μ) / (γ·std)) per sample
           (eqs. 7-11 below), or a baseline / ablation of it (--method):
             blackbox  NLL only: the teacher's text and nothing else (black-box KD)
             kd        NLL + α · KL, w ≡ 1: white-box KD on a white-box teacher's own sequences, TAKD, and the
                       "w/o weighting" ablation, depending on the data and the proxy given
             proxykd   NLL + α · w · KL (full Proxy-KD)
           --topk 0 drops the cache and runs the proxy in the loop (full-vocabulary KL).

    python distill.py cache --proxy runs/x/proxy --data runs/x/split/D_s.jsonl --out runs/x/cache_proxy
    python distill.py train --method proxykd --init runs/bases/student --data runs/x/split/D_s.jsonl \\
        --cache runs/x/cache_proxy --out runs/x/student_proxykd

Shapes: N response tokens (of a batch or a chunk), k proxy top-k, V vocabulary, C hidden size.
"""
from __future__ import annotations

import argparse
import math
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

import cache
import data
import dist
import evaluation
import train
from cache import CHUNK_TOKENS, ProxyCache
from model import hidden_at, map_chunks

METHODS = ("blackbox", "kd", "proxykd")


# ------------------------------------------------------------------- the paper's equations (pure)

def student_nll(logq, targets):
    """Eq. 7, per token: −log p_student(y_t | x, y_<t). logq [N, V] fp32 log-softmax, targets [N] -> [N]."""
    return -logq.gather(-1, targets[:, None]).squeeze(-1)


def token_kl(logp, logq, eps: float = 0.0):
    """Eq. 8, per token: forward KL(p ‖ q) = Σ_j p_j (log p_j − log q_j). logp, logq [N, V'] log-probs over the
    same V' ids -> [N] fp32 (finite log-probs: a −inf in logp is only allowed with eps > 0, which smooths it).

    eps > 0 is the authors' code: p and q are smoothed to (p + eps) / Σ(p + eps) before the KL. Over V ids that
    mixes in V·eps / (1 + V·eps) of uniform mass: 7 % at V = 1k with eps = 7e-5, 69 % at 32k, 90 % at 128k, so
    the smoothed KL is several times weaker on a Llama vocabulary than the paper's equation."""
    if eps > 0:
        log_eps = math.log(eps)
        logp = torch.logaddexp(logp, torch.full_like(logp, log_eps))
        logp = logp - logp.logsumexp(-1, keepdim=True)
        logq = torch.logaddexp(logq, torch.full_like(logq, log_eps))
        logq = logq - logq.logsumexp(-1, keepdim=True)
    return (logp.exp() * (logp - logq)).sum(-1)


def sample_weights(mean_logps, gamma: float) -> torch.Tensor:
    """Eq. 9: w_i = σ((ℓ_i − μ) / (γ · std)).

    mean_logps [n]: ℓ_i, the proxy's mean token log-prob of sample i's teacher response; μ and std over the
    whole set (std: population, ddof 0), computed in float64. Samples the proxy fits better than average get
    w > 0.5. Not renormalised, no gradient. -> [n] fp32. A set with std 0 gets w = 0.5 (every z is 0).
    γ: the paper says 1.0, the authors' code uses 0.4."""
    if not gamma > 0:
        raise ValueError(f"gamma must be positive, got {gamma}")
    ell = torch.as_tensor(mean_logps).detach().double().cpu()
    if ell.numel() == 0:
        return ell.float()
    mu, std = ell.mean(), ell.std(correction=0)
    if std == 0:
        return torch.full_like(ell, 0.5, dtype=torch.float32)
    return torch.sigmoid((ell - mu) / (gamma * std)).float()


def weighted_kl(logq, w, topk_logits=None, topk_ids=None, proxy_logits=None, eps: float = 0.0, tau: float = 1.0):
    """Eq. 10, per token: w_{s(t)} · KL(p_proxy,t ‖ p_student,t) -> (weighted [N], unweighted [N]), fp32.

    logq [N, V]: the student's full-vocabulary log-softmax; w [N]: each token's sample weight. The proxy is either
    its cached top-k, topk_logits and topk_ids [N, k] (p = softmax over the k logits, the top-k RENORMALISED;
    without smoothing the KL runs over those k ids with log q gathered there, not renormalised, so the student
    is pulled to put the proxy's top-k mass on the same ids), or its full logits proxy_logits [N, V].
    With eps > 0 (the authors' smoothing) the top-k target is spread over the whole vocabulary first (0 outside
    the k ids), as the authors' code smooths the full distributions.

    tau != 1 is not in the paper: Hinton et al.'s softened KD, τ² · KL(softmax(z_p / τ) ‖ softmax(z_s / τ)). The
    proxy's logits are divided by tau here; logq must then be the student's log-softmax of its logits / tau (see
    _kd_chunk). The τ² keeps the term's gradients the size they have at τ = 1. tau = 1 is the paper's eq. 10."""
    if tau != 1.0:
        topk_logits = None if topk_logits is None else topk_logits.float() / tau
        proxy_logits = None if proxy_logits is None else proxy_logits.float() / tau
        wkl, kl = weighted_kl(logq, w, topk_logits, topk_ids, proxy_logits, eps)
        return wkl * tau ** 2, kl * tau ** 2
    if topk_ids is not None:
        logp = topk_logits.float().log_softmax(-1)
        if eps > 0:
            dense = torch.full_like(logq, -math.inf).scatter(-1, topk_ids.long(), logp)
            kl = token_kl(dense, logq, eps)
        else:
            kl = token_kl(logp, logq.gather(-1, topk_ids.long()))
    else:
        kl = token_kl(proxy_logits.float().log_softmax(-1), logq, eps)
    return w * kl, kl


def student_loss(nll, wkl, n_tokens, alpha: float):
    """Eq. 11: L_Student = (Σ_t NLL_t + α Σ_t w KL_t) / n_tokens, over the response tokens of the optimizer
    step's whole window (n_tokens), so the loss does not depend on how the window is cut into micro-batches.
    nll, wkl [N] fp32 (this micro-batch's tokens) -> scalar. The paper's α = 100."""
    return (nll.sum() + alpha * wkl.sum()) / n_tokens


# --------------------------------------------------------------------------------- the chunked driver

def _kd_chunk(head, proxy_head, eps, tau, h, targets, w, topk_logits, topk_ids, proxy_h):
    """One chunk: the student head and one fp32 log-softmax shared by eq. 7 and eq. 10 (a second one at the KD
    temperature when tau != 1) -> nll, wkl, kl [n]."""
    kd = topk_ids is not None or proxy_h is not None
    logits = F.linear(h, head).float()  # [n, V] fp32: only ever one chunk's worth
    logq_tau = (logits / tau).log_softmax(-1) if kd and tau != 1.0 else None
    logq = logits.log_softmax(-1)
    del logits  # one [n, V] fewer alive through the rest of the chunk
    nll = student_nll(logq, targets)
    if not kd:
        return nll, torch.zeros_like(nll), torch.zeros_like(nll)
    proxy_logits = None if proxy_h is None else cache.fp32_logits(proxy_h, proxy_head)  # no grad: frozen proxy
    wkl, kl = weighted_kl(logq if logq_tau is None else logq_tau, w, topk_logits, topk_ids, proxy_logits, eps, tau)
    return nll, wkl, kl


def kd_token_losses(h, head, targets, w=None, topk_logits=None, topk_ids=None, proxy_h=None, proxy_head=None,
                    eps: float = 0.0, chunk_tokens: int = CHUNK_TOKENS, tau: float = 1.0):
    """Eqs. 7 and 10 over the student's response positions, chunk by chunk -> nll, wkl, kl [N] fp32.

    h [N, C]: the student's final (normed) hidden states at the shifted response positions, head [V, C]: its
    lm_head weight, targets [N]: the teacher's tokens, w [N]: per-token sample weights (default 1). The proxy
    comes as cached top-k rows (topk_logits, topk_ids [N, k]), or as its own hidden states proxy_h [N, C_p] and
    head proxy_head [V, C_p] (the full-vocabulary mode), or not at all (black-box KD: the KL terms are 0).
    model.map_chunks runs each chunk under activation checkpointing: the peak is O(chunk · V), never O(N · V)."""
    w = torch.ones_like(targets, dtype=torch.float32) if w is None else w
    parts = map_chunks(_kd_chunk, (h, targets, w, topk_logits, topk_ids, proxy_h), (head, proxy_head, eps, tau),
                       chunk_tokens)
    if not parts:
        z = h.new_zeros(0, dtype=torch.float32)
        return z, z, z
    return tuple(torch.cat(xs) for xs in zip(*parts))


def distill_loss(fwd, batch, norm, alpha: float, eps: float = 0.0, proxy=None, chunk_tokens: int = CHUNK_TOKENS,
                 tau: float = 1.0):
    """One micro-batch of eq. 11, as the training loop calls it: (loss, metrics). The batch carries per-token
    weights ("weights" [N]) and, in the cached mode, the proxy's top-k rows ("topk_logits", "topk_ids" [N, k]);
    with `proxy` and no cached rows the proxy runs here under no_grad (the full-vocabulary mode); with neither
    the KL is 0 (black-box KD). Metrics are window means: nll, kl (unweighted), wkl (weighted), w (mean weight)."""
    mask = data.response_mask(batch["labels"])
    targets = batch["input_ids"][:, 1:][mask]
    h = hidden_at(fwd, batch["input_ids"], batch["attention_mask"], F.pad(mask, (0, 1)))  # [N, C]
    kw = {}
    if "topk_ids" in batch:
        kw = {"topk_logits": batch["topk_logits"], "topk_ids": batch["topk_ids"]}
    elif proxy is not None:
        with torch.no_grad():
            ph = proxy(batch["input_ids"], attention_mask=batch["attention_mask"], return_hidden=True)
        kw = {"proxy_h": ph[:, :-1][mask], "proxy_head": proxy.lm_head.weight}
    nll, wkl, kl = kd_token_losses(h, fwd.lm_head.weight, targets, batch.get("weights"), eps=eps,
                                   chunk_tokens=chunk_tokens, tau=tau, **kw)
    n = norm["tokens"]
    loss = student_loss(nll, wkl, n, alpha if kw else 0.0)
    metrics = {"nll": nll.sum() / n, "tokens": mask.sum().float()}
    if kw:
        metrics.update(loss=loss, kl=kl.sum() / n, wkl=wkl.sum() / n, w=batch["weights"].sum() / n)
    return loss, metrics


def weight_summary(w: torch.Tensor) -> dict:
    """Mean, std, min, max and a 10-bin histogram over [0, 1] (fixed edges, so runs compare)."""
    w = w.double()
    return {"n": w.numel(), "mean": float(w.mean()), "std": float(w.std(correction=0)), "min": float(w.min()),
            "max": float(w.max()), "hist": [int(c) for c in torch.histc(w, bins=10, min=0.0, max=1.0)],
            "hist_edges": [i / 10 for i in range(11)]}


# ------------------------------------------------------------------------------------------- train

def distill_batch_fn(seqs, pad_id, device, proxy_cache: ProxyCache | None, topk: int, weights: torch.Tensor | None):
    """Collated samples plus, per response token in batch order, its sample's weight and (cached mode) the
    proxy's top-k row, read from the memory-mapped shards for these samples only."""
    counts = torch.tensor([s.n_targets for s in seqs], dtype=torch.int64)

    def batch_fn(idx):
        b = train.collate_seqs([seqs[i] for i in idx], pad_id, device)
        idx_t = torch.tensor(idx, dtype=torch.int64)
        w = weights[idx_t] if weights is not None else torch.ones(len(idx))
        b["weights"] = w.repeat_interleave(counts[idx_t]).to(device)
        if proxy_cache is not None:
            lg, ids = proxy_cache.rows(idx, topk)
            b["topk_logits"], b["topk_ids"] = lg.to(device), ids.to(device)
        return b
    return batch_fn


def check_train_args(args):
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
    if not args.kd_temperature > 0:
        train.fail(f"--kd-temperature {args.kd_temperature}: expected a positive temperature (1: the paper's KL)")
    if not 0 <= args.kl_eps < 1:
        train.fail(f"--kl-eps {args.kl_eps}: expected 0 (the paper's KL) or a small smoothing such as 7e-5")


def proxy_side(args, rows, seqs, tok, fmt, model, device):
    """What the student learns from besides the text: the proxy cache or the proxy itself, and the sample
    weights (eq. 9 for proxykd, 1 for kd, none for blackbox)."""
    if args.method == "blackbox":
        return None, None, None
    proxy_cache = proxy = None
    if args.cache:
        proxy_cache = ProxyCache(args.cache)
        proxy_cache.check(rows, seqs, tok, fmt, args.max_len, model.cfg.vocab_size, args.proxy, max(args.topk, 1))
    if args.topk == 0:
        ptok = data.load_tokenizer(args.proxy) if Path(args.proxy, "tokenizer.json").exists() else tok
        proxy = cache.load_proxy(args.proxy, ptok, device)
        cache.check_vocab(f"proxy {args.proxy}", ptok.get_vocab_size(), proxy.cfg.vocab_size, data.tokenizer_hash(ptok),
                          tok.get_vocab_size(), model.cfg.vocab_size, data.tokenizer_hash(tok))
    if args.method == "kd":
        return proxy_cache, proxy, torch.ones(len(seqs))
    if proxy_cache is not None:
        ell = proxy_cache.mean_logp
    else:  # full-vocabulary mode without a cache: ℓ over the whole set, one proxy pass before training
        dist.print0("proxy log-probs over the data for the sample weights")
        ell = cache.proxy_mean_logps(proxy, seqs, data.special_ids(tok)["pad"], device, args.batch_size,
                                     args.chunk_tokens)
    return proxy_cache, proxy, sample_weights(ell, args.gamma)


def cmd_train(args):
    check_train_args(args)
    device, tok, fmt, rows, seqs, model = train.stage_setup(args)
    proxy_cache, proxy, weights = proxy_side(args, rows, seqs, tok, fmt, model, device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = weight_summary(weights) if weights is not None and len(weights) else None
    train.write_args(out, args, {"format": fmt, "n_samples": len(seqs), "weights": summary})
    source = (f"top-{args.topk} of cache {args.cache}" if proxy_cache is not None and args.topk else
              f"full vocabulary of proxy {args.proxy}" if proxy is not None else "no proxy")
    dist.print0(f"distill ({args.method}): {len(seqs)} sequences, {model.num_params() / 1e6:.2f}M parameters, KL "
                 f"from {source}, format {fmt}, device {device}")
    if summary is not None and train.find_checkpoint(out / "checkpoint") is None:
        train.MetricsLog(out, quiet=args.quiet)({"stage": "weights", "method": args.method, "gamma": args.gamma,
                                                 **summary})
    loss_fn = partial(distill_loss, alpha=args.alpha, eps=args.kl_eps, proxy=proxy, chunk_tokens=args.chunk_tokens,
                      tau=args.kd_temperature)
    batch_fn = distill_batch_fn(seqs, data.special_ids(tok)["pad"], device, proxy_cache if args.topk else None,
                                args.topk, weights)
    with train.timed(out, "train"):
        finished = train.train_stage(model, seqs, loss_fn, args, tok, device, "distill", batch_fn=batch_fn)
    if finished and args.eval:
        with train.timed(out, "eval"):
            evaluation.report_eval(model, tok, fmt, args, out, {"stage": "distill", "method": args.method})
    return 0 if finished else 3


def cmd_cache(args):
    if args.topk < 1:
        train.fail(f"--topk {args.topk}: the cache needs k >= 1 (--topk 0 is a `train` mode with the proxy in the loop)")
    tok, fmt = train.tokenizer_and_format(args, args.proxy)
    with train.timed(args.out, "cache"):
        return cache.build(args, tok, fmt, train.teacher_rows(args.data, args.keep_unfinished),
                       train.pick_device(args.device))


# --------------------------------------------------------------------------------------------- CLI

def positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {s}")
    return v


def add_keep_unfinished(p):
    p.add_argument("--keep-unfinished", action="store_true",
                   help="keep responses cut at their budget (finish_reason length): a white-box teacher's own "
                        "sequences are its sequences however they end (cache and train must agree)")


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
    c.add_argument("--shard-tokens", type=positive_int, default=cache.SHARD_TOKENS,
                   help="response tokens per shard (memory held while one fills; the unit of resume)")
    c.add_argument("--chunk-tokens", type=positive_int, default=CHUNK_TOKENS, help="positions per head + top-k chunk")
    c.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    add_keep_unfinished(c)

    t = sub.add_parser("train", help="train the student: NLL + alpha * w * KL(proxy || student), or a baseline")
    t.add_argument("--init", required=True, help="student: HF directory, or a named size (tiny-student, toy, ...)")
    t.add_argument("--tokenizer", default=None, help="tokenizer.json or its directory (default: --init's)")
    t.add_argument("--data", required=True, help="teacher JSONL (prompt/messages + response): D_s")
    t.add_argument("--format", default=None, help="chat format plain|chatml|llama3 (default: from --init)")
    t.add_argument("--method", choices=METHODS, required=True,
                   help="blackbox: NLL only; kd: + alpha * KL to the proxy, w = 1; proxykd: + alpha * w * KL")
    t.add_argument("--proxy", default=None, help="proxy HF directory: required with --topk 0; with a cache, checked "
                                                 "against the proxy the cache was built from")
    t.add_argument("--cache", default=None, help="proxy cache directory from `distill.py cache` (--topk >= 1)")
    t.add_argument("--topk", type=int, default=10, help="KL over the proxy's cached top-k (<= the cache's k), or 0: "
                                                        "full vocabulary with the proxy forward in the loop")
    t.add_argument("--alpha", type=float, default=100.0, help="weight of the KL term (paper: 100)")
    t.add_argument("--gamma", type=float, default=0.4,
                   help="sample-weight temperature w = sigmoid((l - mean) / (gamma * std)); default 0.4 is the "
                        "authors' code, the paper says 1.0")
    t.add_argument("--kl-eps", type=float, default=0.0,
                   help="smooth both distributions as (p + eps) / sum(p + eps) before the KL: 0 is the paper's "
                        "equation, the authors' code uses 7e-5 (several times weaker at 32k-128k tokens)")
    t.add_argument("--kd-temperature", type=float, default=1.0,
                   help="soften both distributions as softmax(logits / T) and scale the KL by T^2 (Hinton et al.); "
                        "1 is the paper's KL")
    add_keep_unfinished(t)
    t.add_argument("--chunk-tokens", type=positive_int, default=CHUNK_TOKENS,
                   help="response tokens per chunk of head + log-softmax + KL ([chunk, V] fp32 is the peak)")
    train.add_eval_args(t, "at the end")
    train.add_train_args(t)
    return p


def main(argv=None):
    # `train` runs under torchrun (--dist ddp|fsdp); `cache` is one no-grad pass and runs in one process.
    return train.run_command(build_parser(), {"cache": cmd_cache, "train": cmd_train}, argv)


if __name__ == "__main__":
    sys.exit(main())
