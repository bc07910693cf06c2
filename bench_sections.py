"""The measurements behind bench.py: how each side is timed (interleaved rounds) and its memory taken, the two
models with the same weights, and the four sections, each returning its results and its table rows:

    train   one optimizer step of ours against transformers' LlamaForCausalLM, eager and compiled
    decode  generate.generate against LlamaForCausalLM.generate, greedy (a token-for-token guard) and top-p
    kdloss  distill.kd_token_losses against the naive [N, V] fp32 loss: peak memory and time
    dpo     an alignment step with stored reference log-probs against a live reference model

Shapes: B batch, T tokens, N loss positions, V vocabulary, C hidden size.
"""
from __future__ import annotations

import argparse
import copy
import functools
import gc
import os
import statistics
import time
from contextlib import nullcontext
from dataclasses import asdict

import torch
import torch.nn.functional as F

import data
import distill
import proxy_align
import train
from generate import generate, left_pad
from model import Config, Llama

PROMPT_FRAC = 0.4  # ragged training rows: the share of each sequence that is prompt (no loss)
TOPK = 10  # proxy top-k of the cached distillation loss (the paper's k = 10)
H100_BF16_FLOPS = 989e12  # dense BF16 tensor-core peak of an H100 SXM (NVIDIA datasheet): the MFU basis
CPU_TARGET = 1.3  # the main size's target on CPU: ours ≥ 1.3× transformers eager (train step, batched decoding)
GiB = 2**30


# ------------------------------------------------------------------------------------- measuring

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_avg() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def race(fns: dict, args, device) -> dict:
    """Seconds per call of each fn (name -> fn), after args.warmup untimed calls each, over args.steps rounds
    that call each fn once in turn. Returns {"s": {name: median seconds}, "ratios": [second / first per round]
    (with two fns), "load": [1-min load average before, after]}."""
    clock = time.process_time if args.clock == "cpu" and device.type == "cpu" else time.perf_counter
    for fn in fns.values():
        for _ in range(args.warmup):
            fn()
    load, rounds = [load_avg()], {k: [] for k in fns}
    for _ in range(args.steps):
        for name, fn in fns.items():
            sync(device)
            t0 = clock()
            fn()
            sync(device)
            rounds[name].append(clock() - t0)
    load.append(load_avg())
    out = {"s": {k: statistics.median(v) for k, v in rounds.items()}, "load": load}
    if len(fns) == 2:
        a, b = rounds.values()
        out["ratios"] = [y / x for x, y in zip(a, b)]
    return out


def race_pair(ours, peer, args, device, interleave: bool = True) -> dict:
    """race() of ours against peer: interleaved, or (on CUDA) one side after the other."""
    if interleave:
        return race({"ours": ours, "peer": peer}, args, device)
    a, b = race({"ours": ours}, args, device), race({"peer": peer}, args, device)
    return {"s": {**a["s"], **b["s"]}, "load": [a["load"][0], b["load"][1]]}


def seconds_once(fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def peak_bytes(fn, device) -> int:
    """Peak bytes allocated during one fn() above what was allocated before it (what the call itself needs)."""
    gc.collect()
    if device.type == "cuda":
        sync(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    # CPU has no allocator statistics; the profiler records each allocation (+nbytes) and free (-nbytes) of
    # the CPU allocator as a "[memory]" event. Their running sum in time order is the live-bytes curve.
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def free_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def keep(out: dict, key: str, r: dict):
    """A race's ratio spread and load into a section's results, under `key`."""
    if "ratios" in r:
        out[f"{key}_ratio_range"] = [min(r["ratios"]), max(r["ratios"])]
    out[f"{key}_load"] = r["load"]


# ----------------------------------------------------------------------------------------- models

def build_models(cfg: Config, device, seed: int, with_peer: bool, weights=None):
    """Our Llama, and (with_peer) transformers' LlamaForCausalLM holding the same weights: the parameter names
    are the same, so the state dict copies across key for key. The weights are a checkpoint's (an HF directory
    of cfg's architecture, token ids aside) or, without one, a random init."""
    if weights is not None:
        ours = Llama.from_pretrained(weights, device=device)
        ids = {k: getattr(ours.cfg, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        if Config(**{**asdict(cfg), **ids}) != ours.cfg:
            raise RuntimeError(f"{weights}: its config.json is not the architecture benchmarked ({cfg})")
    else:
        with torch.device(device):  # built where it runs: no 5 GB detour through host memory at 1B
            ours = Llama(cfg)
        ours.init_weights(seed=seed)  # outside the context: its generator draws on the CPU, then copies
    if not with_peer:
        return ours, None
    from transformers import LlamaConfig, LlamaForCausalLM
    with torch.device(device):
        peer = LlamaForCausalLM(LlamaConfig(**cfg.to_hf(), attn_implementation="sdpa"))
    peer.load_state_dict(ours.state_dict(), strict=True)
    # An untied peer head would do different work (and hold more weights): refuse rather than compare.
    if cfg.tie_word_embeddings and peer.lm_head.weight is not peer.model.embed_tokens.weight:
        raise RuntimeError("peer: lm_head is not tied to embed_tokens")
    if peer.num_parameters() != ours.num_params():
        raise RuntimeError(f"peer has {peer.num_parameters()} parameters, ours {ours.num_params()}")
    return ours, peer


def flops_per_token(cfg: Config, n_params: int, seq: int) -> float:
    """Training FLOPs per token, 6N + 12·L·H·T (PaLM, Chowdhery et al. 2022, appendix B; nanoGPT's
    estimate_mfu): 6N for the forward (2N) and backward (4N) matmuls over every weight, 12·L·H·T for the
    attention scores and their weighted sum (H = heads × head_dim, the hidden size of Llama 3.2 1B;
    T = sequence length; the causal half is not subtracted, as in PaLM). N counts the matrices that are multiplied: a tied
    embedding is the head's matmul, so it stays in; an untied input embedding is a lookup, so it is not."""
    n = n_params - (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size)
    return 6 * n + 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq


HIGHER_IS_BETTER = {"tok/s", "%"}


def row(section, metric, ours, peer, unit, target=None, met=None, always_judged=False, spread=None) -> dict:
    """One table row. ratio = how many times better ours is (ours/peer for throughput, peer/ours for time
    and memory); spread: [min, max] of that ratio over the interleaved rounds. `met` is None where there is
    no target or nothing to judge it on."""
    ratio = None
    if isinstance(ours, float) and isinstance(peer, float) and ours > 0 and peer > 0:
        ratio = ours / peer if unit in HIGHER_IS_BETTER else peer / ours
    return {"section": section, "metric": metric, "unit": unit, "ours": ours, "peer": peer, "ratio": ratio,
            "spread": spread, "target": target, "met": met, "always_judged": always_judged}


# ----------------------------------------------------------------------------------------- train

def train_batch(args, V: int, g, device) -> tuple[dict, dict]:
    """A training micro-batch and its loss normaliser. Ragged (the main job's): lengths seq ± 2 (train.plan_windows
    sorts a window by length before cutting it, so a micro-batch's rows differ by a few tokens), right-padded by
    data.collate, the first PROMPT_FRAC of each row masked out of the labels. Otherwise full-length rows (packed
    pretraining-style), every next token a target and no attention_mask: both sides take SDPA's causal path."""
    B, T = args.batch, args.seq
    if not args.ragged:
        ids = torch.randint(0, V, (B, T), generator=g).to(device)
        return {"input_ids": ids, "labels": ids, "attention_mask": None}, {"tokens": B * (T - 1)}
    pairs = []
    for n in torch.randint(T - 2, T + 3, (B,), generator=g).tolist():
        ids = torch.randint(3, V, (n,), generator=g).tolist()
        cut = round(n * PROMPT_FRAC)
        pairs.append((ids, [data.IGNORE_INDEX] * cut + ids[cut:]))
    batch = data.collate(pairs, 0, device)
    return batch, {"tokens": int(data.response_mask(batch["labels"]).sum())}


def ours_train_loss(fwd, batch, norm):
    return train.nll_loss_fn(fwd, batch, norm)[0]


def peer_train_loss(fwd, batch, norm):
    # HF shifts the labels and takes the mean over those not -100: ours over the same targets.
    return fwd(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss


def train_step(model, fwd, loss_fn, opt, batch, norm, amp):
    """What train.fit does per optimizer step with one micro-batch: forward, backward, clip, step, zero."""
    def step():
        with amp:
            loss = loss_fn(fwd, batch, norm)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def bench_train(ours, peer, args, device) -> dict:
    batch, norm = train_batch(args, ours.cfg.vocab_size, torch.Generator().manual_seed(1), device)
    amp = train.autocast(device)
    # Same weights, same loss: the two must agree before their speeds mean anything.
    with torch.no_grad(), amp:
        loss_ours = float(ours_train_loss(ours, batch, norm))
        loss_peer = float(peer_train_loss(peer, batch, norm))
    mask = batch["attention_mask"]
    n_tok = batch["input_ids"].numel() if mask is None else int(mask.sum())
    modes = ["eager"] + (["compiled"] if args.compile else [])
    out = {"tokens_per_step": n_tok, "loss_ours": loss_ours, "loss_peer": loss_peer, "modes": modes}
    sides = {"ours": (ours, ours_train_loss), "peer": (peer, peer_train_loss)}
    for mode in modes:
        def make(side):
            model, loss_fn = sides[side]
            model.train()
            opt = train.make_optimizer(model, lr=1e-5, weight_decay=0.0, device=device)  # fused on CUDA
            step = train_step(model, torch.compile(model) if mode == "compiled" else model, loss_fn, opt, batch,
                              norm, amp)
            if mode == "compiled":  # the first call compiles: dynamo, inductor, on CPU the kernels' C++
                out[f"{side}_compile_s"] = seconds_once(step, device)
            return step
        if device.type == "cpu":
            r = race({side: make(side) for side in sides}, args, device)
        else:  # one side at a time: two 1B models with their AdamW states need not share the GPU
            r = {"s": {}, "load": []}
            for side in sides:
                step = make(side)
                one = race({side: step}, args, device)
                r["s"].update(one["s"])
                r["load"] += one["load"]
                out[f"{side}_{mode}_peak_gib"] = peak_bytes(step, device) / GiB
                del step
                sides[side][0].zero_grad(set_to_none=True)
                free_memory(device)
        for side in sides:
            out[f"{side}_{mode}_tok_s"] = n_tok / r["s"][side]
            if mode == "compiled":
                out[f"{side}_compile_s"] -= r["s"][side]  # less one steady step
        keep(out, mode, r)
    for model, _ in sides.values():
        model.zero_grad(set_to_none=True)
    free_memory(device)
    return out


def train_rows(r, cfg, n_params, args, device):
    rows = []
    best = r["modes"][-1]
    for mode in r["modes"]:
        ours_v, peer_v = r[f"ours_{mode}_tok_s"], r[f"peer_{mode}_tok_s"]
        if args.size == "main":  # the stages train eager on CPU: that is the target's comparison
            kw = dict(target=f"≥ {CPU_TARGET}× peer", met=ours_v / peer_v >= CPU_TARGET,
                      always_judged=True) if mode == "eager" else {}
        else:
            kw = dict(target="≥ 1.15× compiled peer" if mode == best else None,
                      met=None if mode != "compiled" else ours_v / peer_v >= 1.15)
        rows.append(row("train", mode, ours_v, peer_v, "tok/s", spread=r.get(f"{mode}_ratio_range"), **kw))
    if "compiled" in r["modes"]:
        rows.append(row("train", "compile, first step less a steady one", r["ours_compile_s"], r["peer_compile_s"],
                        "s"))
    if device.type == "cuda":
        f = flops_per_token(cfg, n_params, args.seq) / args.peak_flops
        mfu_o, mfu_p = r[f"ours_{best}_tok_s"] * f, r[f"peer_{best}_tok_s"] * f
        r["mfu_ours"], r["mfu_peer"], r["flops_per_token"] = mfu_o, mfu_p, f * args.peak_flops
        rows.append(row("train", f"MFU, {best}", mfu_o, mfu_p, "%", target="ours ≥ 50 %", met=mfu_o >= 0.5))
    elif args.size != "main":  # tiny models on CPU: no MFU worth stating
        rows.append(row("train", "MFU", None, None, "%", target="ours ≥ 50 %"))
    return rows


# ---------------------------------------------------------------------------------------- decode

# How each side draws the next token: greedy (evaluation), or alignment's sampling (temperature 1, top-p 0.8).
DRAW = {"greedy": ({}, {"do_sample": False}),
        "top-p": ({"temperature": 1.0, "top_p": 0.8, "seed": 0}, {"do_sample": True, "temperature": 1.0,
                                                                  "top_p": 0.8, "top_k": 0})}


def decode_prompts(args, V: int, g) -> list[list[int]]:
    """Prompts of prompt_len tokens, or (ragged) of prompt_len ± 4: a batch of the length-sorted eval set."""
    d = 4 if args.ragged else 0
    lens = torch.randint(args.prompt_len - d, args.prompt_len + d + 1, (max(args.decode_batches),), generator=g)
    return [torch.randint(3, V, (n,), generator=g).tolist() for n in lens.tolist()]


def decode_cases(args) -> list[tuple[int, int, str]]:
    """(batch, new tokens, draw): greedy at every batch and length; the main size adds alignment's sampling."""
    cases = [(bs, n, "greedy") for bs in args.decode_batches for n in args.new_tokens]
    return cases + ([(max(args.decode_batches), max(args.new_tokens), "top-p")] if args.size == "main" else [])


def bench_decode(ours, peer, args, device) -> dict:
    prompts = decode_prompts(args, ours.cfg.vocab_size, torch.Generator().manual_seed(2))
    amp = train.autocast(device)
    ours.eval()
    peer.eval()

    def run_ours(ps, n, amp, draw="greedy", compile=False):
        with amp:  # eos_id=[]: never stop early, like the peer
            return generate(ours, ps, n, eos_id=[], compile=compile, **DRAW[draw][0])

    @torch.no_grad()
    def run_peer(ps, n, amp, draw="greedy"):
        ids, mask = left_pad(ps, max(map(len, ps)), 0, device)  # what generate feeds our model
        with amp:
            out = peer.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, eos_token_id=None,
                                pad_token_id=0, **DRAW[draw][1])
        return out[:, ids.shape[1]:].tolist()

    out = {"prompt_len": args.prompt_len, "cases": decode_cases(args)}
    # Decode calls are long (hundreds of steps each): fewer rounds.
    dargs = argparse.Namespace(**{**vars(args), "steps": max(1, min(args.steps, 5)), "warmup": min(args.warmup, 1)})
    fp32 = isinstance(amp, nullcontext)
    same = []
    for bs, n, draw in out["cases"]:
        ps, key = prompts[:bs], f"b{bs}_{draw}_{n}"
        r = race_pair(lambda: run_ours(ps, n, amp, draw), lambda: run_peer(ps, n, amp, draw), dargs, device,
                      interleave=device.type == "cpu")
        for side in ("ours", "peer"):
            out[f"{side}_{key}_tok_s"] = bs * n / r["s"][side]
        keep(out, key, r)
        if fp32 and draw == "greedy":  # the guard runs exactly the calls that were timed
            same.append(run_ours(ps, n, amp) == run_peer(ps, n, amp))
        if args.compile and draw == "greedy":  # our compiled decode step: one static-shape graph for every step
            out[f"ours_{key}_compile_s"] = seconds_once(lambda: run_ours(ps, n, amp, compile=True), device)
            one = race({"ours": lambda: run_ours(ps, n, amp, compile=True)}, dargs, device)
            out[f"ours_{key}_compile_s"] -= one["s"]["ours"]
            out[f"ours_compiled_{key}_tok_s"] = bs * n / one["s"]["ours"]
    if fp32:
        out["guard"] = "the timed fp32 greedy calls"
    else:
        # Under bf16 autocast two correct implementations may round to different argmaxes, so the guard
        # runs in fp32 (TF32 off) at batch 4: the same cache, masking and sampling code, smaller.
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            n = min(args.new_tokens[0], 32)
            same.append(run_ours(prompts[:4], n, nullcontext()) == run_peer(prompts[:4], n, nullcontext()))
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
        out["guard"] = f"fp32 re-run, batch 4, {n} new tokens"
    out["same_tokens"] = all(same)
    return out


def decode_rows(r, args):
    rows = []
    for bs, n, draw in r["cases"]:
        key = f"b{bs}_{draw}_{n}"
        o, p = r[f"ours_{key}_tok_s"], r[f"peer_{key}_tok_s"]
        if args.size == "main":
            name, kw = f"batch {bs}, {draw} +{n}", dict(target=f"≥ {CPU_TARGET}× peer", met=o / p >= CPU_TARGET,
                                                         always_judged=True)
        elif bs == 1:
            name, kw = "batch 1", dict(target="ours ≥ 600 tok/s", met=o >= 600)
        else:
            name, kw = f"batch {bs}", dict(target="≥ 10× peer", met=o / p >= 10)
        rows.append(row("decode", name, o, p, "tok/s", spread=r.get(f"{key}_ratio_range"), **kw))
        if f"ours_compiled_{key}_tok_s" in r:
            rows.append(row("decode", f"{name}, ours compiled vs peer eager", r[f"ours_compiled_{key}_tok_s"], p,
                            "tok/s"))
            rows.append(row("decode", f"{name}, ours' compile", r[f"ours_{key}_compile_s"], None, "s"))
    rows.append(row("decode", "same greedy tokens as peer, fp32", "yes" if r["same_tokens"] else "NO", "", "",
                    target="identical", met=r["same_tokens"], always_judged=True))
    return rows


# ---------------------------------------------------------------------------------------- kdloss

def naive_kd_token_losses(h, weight, targets, topk_logits=None, topk_ids=None, proxy_h=None, proxy_head=None):
    """The textbook loss that distill.kd_token_losses replaces: whole [N, V] logits at once, in fp32, with
    autograd keeping every intermediate for backward. Same math, same outputs (nll [N], kl [N])."""
    logq = F.linear(h, weight).float().log_softmax(-1)  # [N, V] fp32, and its bf16/fp32 logits before it
    nll = F.nll_loss(logq, targets, reduction="none")
    if topk_ids is not None:
        logp = topk_logits.float().log_softmax(-1)  # [N, k]: the proxy's top-k, renormalised
        kl = F.kl_div(logq.gather(-1, topk_ids.long()), logp, log_target=True, reduction="none").sum(-1)
    else:
        with torch.no_grad():
            logp = F.linear(proxy_h, proxy_head).float().log_softmax(-1)  # [N, V] fp32, the proxy's
        kl = F.kl_div(logq, logp, log_target=True, reduction="none").sum(-1)  # [N, V] before the sum
    return nll, kl


def bench_kdloss(cfg: Config, args, device) -> dict:
    """The student loss of distill.py, NLL + α·w·KL over N response tokens (a training batch's), from the
    student's final hidden states through its head, against the naive loss on the same inputs. Both KL modes:
    the cached top-k rows, and the full vocabulary from the proxy's hidden states and head (--topk 0)."""
    N, C, V = args.kd_tokens, cfg.hidden_size, cfg.vocab_size
    chunk = args.kd_chunk or distill.CHUNK_TOKENS
    g = torch.Generator().manual_seed(4)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device)

    # fp32 leaves like the model's: the final RMSNorm returns fp32 under autocast, the head is fp32 master.
    h = rand(N, C).requires_grad_()
    weight = (0.02 * rand(V, C)).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=g).to(device)
    w = torch.rand(N, generator=g).to(device)  # per-token sample weights, constant
    proxy_h, proxy_weight = rand(N, C), 0.02 * rand(V, C)
    topk_logits, topk_ids = F.linear(proxy_h, proxy_weight).topk(TOPK, dim=-1)  # [N, k] each
    alpha, amp = 100.0, train.autocast(device)
    modes = {"topk": {"topk_logits": topk_logits, "topk_ids": topk_ids},
             "full": {"proxy_h": proxy_h, "proxy_head": proxy_weight}}
    sides = {"ours": lambda **kw: distill.kd_token_losses(h, weight, targets, chunk_tokens=chunk, **kw)[::2],
             "peer": lambda **kw: naive_kd_token_losses(h, weight, targets, **kw)}
    out = {"tokens": N, "vocab": V, "chunk_tokens": chunk, "k": TOPK,
           "grads_gib": (h.numel() + weight.numel()) * 4 / GiB}  # d/dh and d/dW, allocated by both sides

    def fwd_bwd(losses, kw):
        def call():
            h.grad = weight.grad = None
            with amp:
                nll, kl = losses(**kw)
                loss = (nll.sum() + alpha * (w * kl).sum()) / N  # distill.student_loss over one window
            loss.backward()
            return loss.detach()
        return call

    for mode, kw in modes.items():
        calls = {side: fwd_bwd(losses, kw) for side, losses in sides.items()}
        r = race(calls, args, device)
        keep(out, mode, r)
        for side, call in calls.items():
            out[f"{side}_{mode}_loss"] = float(call())
            out[f"{side}_{mode}_ms"] = 1e3 * r["s"][side]
            out[f"{side}_{mode}_peak_mib"] = peak_bytes(call, device) / 2**20
            h.grad = weight.grad = None
            free_memory(device)
    return out


def kdloss_rows(r):
    rows = []
    for mode, name in (("topk", f"top-{r['k']}"), ("full", "full vocab")):
        rows.append(row("kdloss", f"peak memory, {name}", r[f"ours_{mode}_peak_mib"], r[f"peer_{mode}_peak_mib"],
                        "MiB", target="≤ 1/8 of naive",
                        met=r[f"ours_{mode}_peak_mib"] * 8 <= r[f"peer_{mode}_peak_mib"]))
        rows.append(row("kdloss", f"fwd+bwd, {name}", r[f"ours_{mode}_ms"], r[f"peer_{mode}_ms"], "ms",
                        target="≤ naive's time", met=r[f"ours_{mode}_ms"] <= r[f"peer_{mode}_ms"],
                        spread=r.get(f"{mode}_ratio_range")))
    return rows


# ------------------------------------------------------------------------------------------- dpo

def dpo_pairs(P: int, T: int, V: int, g) -> list:
    """P (chosen, rejected) pairs of full-length sequences sharing a prompt of T/2 tokens."""
    pairs = []
    for _ in range(P):
        prompt = torch.randint(0, V, (T // 2,), generator=g).tolist()
        seqs = []
        for _ in range(2):
            resp = torch.randint(0, V, (T - T // 2,), generator=g).tolist()
            seqs.append(train.Seq(prompt + resp, [data.IGNORE_INDEX] * len(prompt) + resp))
        pairs.append(tuple(seqs))
    return pairs


def bench_dpo(ours, args, device) -> dict:
    """One step of proxy_align's round loop, with the reference log-probs read from the batch (as stored
    before the round) or computed by a live frozen reference every step. The policy's work is the same."""
    P, T, V = max(1, args.batch // 2), args.seq, ours.cfg.vocab_size  # 2P sequences: the train batch's size
    pairs = dpo_pairs(P, T, V, torch.Generator().manual_seed(3))
    ref = copy.deepcopy(ours).eval().requires_grad_(False)  # π_p^{k-1}: the policy at the round's start
    amp = train.autocast(device)
    ref_c, ref_r = proxy_align.reference_logps(ref, pairs, 0, device, batch_size=P)
    batch = proxy_align.round_batch_fn(pairs, ref_c, ref_r, 0, device)(list(range(P)))
    norm = proxy_align.pair_window_norm(pairs)([list(range(P))])
    loss_fn = functools.partial(proxy_align.align_loss, beta=1.0, mode="mean")
    ours.train()
    fwd = torch.compile(ours) if args.compile else ours
    ref_fwd = torch.compile(ref) if args.compile else ref
    opt = train.make_optimizer(ours, lr=1e-5, weight_decay=0.0, device=device)

    def step(live: bool):
        b = batch
        with amp:
            if live:
                with torch.no_grad():
                    sums = proxy_align.sequence_logps(ref_fwd, batch)[0].float()
                b = {**batch, "ref_chosen": sums[:P], "ref_rejected": sums[P:]}
            loss, _ = loss_fn(fwd, b, norm)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ours.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    out = {"pairs_per_step": P, "seq": T}
    r = race({"ours": lambda: step(False), "peer": lambda: step(True)}, args, device)
    out["ours_ms"], out["peer_ms"] = 1e3 * r["s"]["ours"], 1e3 * r["s"]["peer"]
    keep(out, "step", r)
    # The stored log-probs are not free: one no-grad pass over the chosen side at the round's start (the
    # rejected side's come with the sampling pass that drew them), so the step-time ratio alone flatters.
    pre = race({"pre": lambda: proxy_align.reference_logps(ref, pairs, 0, device, batch_size=P, which=(0,))},
               args, device)
    out["precompute_ms"] = 1e3 * pre["s"]["pre"]
    ours.zero_grad(set_to_none=True)
    free_memory(device)
    return out


def dpo_rows(r):
    return [row("dpo", "step", r["ours_ms"], r["peer_ms"], "ms", target="≥ 1.3× live reference",
                met=r["peer_ms"] / r["ours_ms"] >= 1.3, spread=r.get("step_ratio_range")),
            row("dpo", "step + precompute, 1 epoch", r["ours_ms"] + r["precompute_ms"], r["peer_ms"], "ms")]
