"""Batched generation with a KV cache: the cache, nucleus sampling, the prefill and the decode step.

The prompts are left-padded into one batch, the prefix runs once (prefill), then one token per step
(decode). The cache is a plain object handed to `Llama.forward`, not module state, so the same model
stays trainable (and usable as a DPO reference) while something else generates with it.

Shapes: B batch, P padded prompt length, N new tokens at most, L = P + N cache slots, KV key/value
heads, D head_dim, V vocabulary.
"""
from __future__ import annotations

import torch

from model import Llama


class KVCache:
    """Keys and values of every layer, [B, KV, L, D] each, allocated on the first write in the dtype of
    the keys written (bf16 under autocast).

    `at(pos, n_keys)` says which slots the next forward call writes (pos [T], one per new token) and how
    many it reads back (the first n_keys, all L by default); every layer then writes there and reads
    those. The attention mask is causal over slot index, so a slot not yet written is never read. One
    write path for prefill and decode; the eager decode step reads the slots written so far, the compiled
    one all L slots, so its shapes never change and one compiled graph (one CUDA graph) serves every step.
    """

    def __init__(self, n_layers: int, max_len: int):
        self.max_len = max_len
        self.pos: torch.Tensor | None = None
        self.n_keys = max_len
        self.k: list[torch.Tensor | None] = [None] * n_layers
        self.v: list[torch.Tensor | None] = [None] * n_layers

    def at(self, pos: torch.Tensor, n_keys: int | None = None) -> "KVCache":
        self.pos, self.n_keys = pos, n_keys or self.max_len
        return self

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """k, v [B, KV, T, D] written at `pos` -> the layer's first n_keys slots [B, KV, n_keys, D]."""
        if self.k[layer] is None:
            B, KV, _, D = k.shape
            self.k[layer] = k.new_zeros(B, KV, self.max_len, D)
            self.v[layer] = v.new_zeros(B, KV, self.max_len, D)
            if hasattr(torch, "_dynamo"):  # fixed addresses: CUDA graphs may then write them in place
                torch._dynamo.mark_static_address(self.k[layer])
                torch._dynamo.mark_static_address(self.v[layer])
        self.k[layer].index_copy_(2, self.pos, k)
        self.v[layer].index_copy_(2, self.pos, v)
        return self.k[layer][:, :, :self.n_keys], self.v[layer][:, :, :self.n_keys]


def sample_next(logits, temperature: float, top_p: float, generator=None):
    """logits [B, V] -> token ids [B]: argmax at temperature 0, else nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = (logits.float() / temperature).softmax(-1)
    if top_p < 1.0:
        probs = nucleus(probs, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


NUCLEUS_TOPK = 64  # on CPU, the nucleus is looked for among each row's top 64 first


def nucleus(probs, top_p: float):
    """probs [B, V] -> the same with every token outside its row's nucleus set to 0: the smallest prefix of the
    tokens sorted by probability whose mass reaches top_p (the token that crosses it stays in).

    Sorting [64, 1,024] costs 3.5 ms on one CPU core, as much as a decode step of the tiny proxy. A trained
    model's nucleus is a handful of tokens, so on CPU the top NUCLEUS_TOPK come first (0.7 ms); only when a
    row's nucleus reaches past them (a near-uniform row) is everything sorted. Their cumulative sums are the
    same numbers either way, so are the kept tokens (up to the order of exactly equal probabilities)."""
    k = min(NUCLEUS_TOPK, probs.shape[-1])
    found = False
    # k x the largest probability bounds the top k's mass: a row that fails it is sorted without trying (host
    # syncs, so CUDA always sorts)
    if probs.device.type == "cpu" and k < probs.shape[-1] and bool((probs.amax(-1) * k > top_p).all()):
        top, idx = probs.topk(k, dim=-1)  # sorted, largest first
        found = bool((top.sum(-1) - top[:, -1] > top_p).all())  # every row drops its k-th token, so all after it
    if not found:
        top, idx = probs.sort(-1, descending=True)
    drop = top.cumsum(-1) - top > top_p
    return torch.zeros_like(probs).scatter_(-1, idx, top.masked_fill(drop, 0.0))


def decode_step(model: Llama, compile: bool):
    """model's one-token step: tok [B, 1], mask [B, L], pos [B, 1] (RoPE positions), a cache already
    `at` the slot to write -> logits [B, V]. Compiled, it is one graph for every step, replayed as a CUDA
    graph on CUDA (one kernel launch a step instead of hundreds of Python-issued ones: what batch-1
    decoding is bound by)."""
    def step(tok, mask, pos, cache):
        return model(tok, attention_mask=mask, position_ids=pos, cache=cache)[:, -1]
    if not compile:
        return step
    return torch.compile(step, mode="reduce-overhead" if model.device.type == "cuda" else None, fullgraph=True)


def left_pad(prompts: list[list[int]], width: int, pad_id: int, device):
    """ids [B, width] with each prompt at the right end, and mask [B, width] (1 = a prompt token)."""
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, device=device)
        mask[i, width - len(p):] = 1
    return ids, mask


@torch.no_grad()
def generate(model: Llama, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, eos_id=None, seed: int | None = None, pad_id: int = 0,
             compile: bool = False, keep_stop: bool = False, logprobs: bool = False):
    """Each prompt's new tokens (prompts: lists of ids, any lengths), cut before the first stop token, or
    ending with it under keep_stop (whichever stop id the row emitted; a row cut by max_new_tokens ends
    without one). eos_id: an id, a list of ids, or None (the config's eos ids). Same seed, same samples.

    logprobs=True returns (tokens, logps): also each kept token's log-probability under the model itself,
    log_softmax of its untempered logits (whatever temperature and top_p drew it), so a sample's score under
    the model that drew it needs no second pass (proxy_align: the round's reference is that model)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    device = model.device
    eos = model.cfg.eos_ids if eos_id is None else [eos_id] if isinstance(eos_id, int) else list(eos_id)
    eos_t = torch.tensor(eos or [-1], device=device)
    B, P = len(prompts), max(len(p) for p in prompts)
    L = P + max_new_tokens
    ids, prompt_mask = left_pad(prompts, P, pad_id, device)
    # The mask over all L slots, built once: the prompts' real tokens now, each new token as it is written.
    mask = torch.zeros((B, L), dtype=torch.long, device=device)
    mask[:, :P] = prompt_mask
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    cache = KVCache(model.cfg.num_hidden_layers, L)
    # The prefill reads back only its P slots: masked-out extra keys would still change SDPA's summation
    # order (~1e-5 in the logits), and the samples drawn from them.
    # Only the last position's output is needed: the last block's output projection and MLP, the final norm
    # and the head run on it alone (the other P - 1 positions still write their keys and values).
    last = torch.zeros((B, P), dtype=torch.bool, device=device)
    last[:, -1] = True
    h = model(ids, attention_mask=mask, cache=cache.at(torch.arange(P, device=device), P), return_hidden=True,
              select=last)  # [B, C]
    logits = model.lm_head(h)
    pos = prompt_mask.sum(-1, keepdim=True) - 1  # [B, 1] position of each row's last real token
    step = decode_step(model, compile)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    out, lps = [], []
    for i in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_p, gen)
        nxt = nxt.masked_fill(done, pad_id)
        out.append(nxt)
        if logprobs:
            lps.append(logits.float().log_softmax(-1).gather(-1, nxt[:, None]).squeeze(-1))
        if len(out) == max_new_tokens:
            break
        if eos:  # without eos ids nothing can stop early: no per-step host sync
            done |= torch.isin(nxt, eos_t)
            if (i + 1) % 8 == 0 and bool(done.all()):  # a sync every 8 tokens, not every token
                break
        mask[:, P + i] = 1
        pos = pos + 1
        # Eager, the step reads only the P + i + 1 slots written so far (attention over the live keys, not
        # all L: 1.5x less at 60 + 160); compiled, all L, so that one graph serves every step.
        n_keys = None if compile else P + i + 1
        logits = step(nxt[:, None], mask, pos, cache.at(torch.tensor([P + i], device=device), n_keys))
    rows = [cut_at_stop(row, eos, keep_stop) for row in torch.stack(out, 1).tolist()]
    if not logprobs:
        return rows
    return rows, [lp[:len(row)] for row, lp in zip(rows, torch.stack(lps, 1).tolist())]


def cut_at_stop(row: list[int], stop: list[int], keep_stop: bool) -> list[int]:
    """row up to its first stop token (with it under keep_stop), or whole when it has none."""
    cut = next((i for i, t in enumerate(row) if t in stop), None)
    if cut is None:
        return row
    return row[:cut + 1] if keep_stop else row[:cut]
