"""The proxy cache of Stage 2: one teacher-forced pass of the (aligned) proxy over D_s, stored for the student's
training loop.

Per response position t of every sample: the proxy's k largest logits and their ids (k = 10, the paper's top-k);
per sample: ℓ = mean_t log π_p(y_t | x, y_<t) under the full-vocabulary softmax, which sets its weight (eq. 9).
The proxy's head and log-softmax run in fp32 whatever its weights' dtype (bf16 on CUDA), so the stored logits
carry no bf16 rounding (~6 % relative error on a top-k probability at logit 16 in bf16).

Written as memory-mappable safetensors shards of ~2M response tokens each, every shard atomically, under an
index.json that names what the cache was built from; a killed run resumes at the first missing shard, and a
training run refuses a cache built for other data, tokenizer, chat format or --max-len.

    python distill.py cache --proxy runs/x/proxy --data runs/x/split/D_s.jsonl --out runs/x/cache_proxy

Shapes: N response tokens (of a batch or a shard), k proxy top-k, V vocabulary, C hidden size.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import data
import train
from model import CheckpointError, Llama, hidden_at, map_chunks

# Version 2: content hashes of data and tokenizer, and fp32 head logits.
CACHE_VERSION = 2
# ~2M response tokens a shard: 2M × k=10 × 8 bytes = 160 MB of top-k rows held while a shard fills.
SHARD_TOKENS = 1 << 21
# Tokens per chunk of head + log-softmax: [1024, V] fp32 is the largest tensor made (0.5 GB at Llama 3's 128k).
CHUNK_TOKENS = 1024


class CacheError(data.DataError):
    """A proxy cache that does not fit this run; the message is one line naming the cache and the mismatch."""


def fp32_logits(h, weight):
    """The head in fp32, outside autocast: h [N, C] -> logits [N, V] fp32, whatever the dtype of h and weight."""
    with torch.autocast(h.device.type, enabled=False):
        return F.linear(h.float(), weight.float())


def load_proxy(path, tok, device) -> Llama:
    """The frozen proxy: bf16 weights on CUDA (it is only ever run forward), fp32 on CPU."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    proxy = Llama.from_pretrained(path, device=device, dtype=dtype).eval()
    if tok.get_vocab_size() > proxy.cfg.vocab_size:
        raise CheckpointError(f"{path}: tokenizer has {tok.get_vocab_size()} tokens but the proxy's embedding has only "
                              f"{proxy.cfg.vocab_size} rows")
    proxy.requires_grad_(False)
    return proxy


def data_hash(rows) -> str:
    """A hash of what the cache depends on in the data: each row's id, prompt and response, in order."""
    return data.content_hash([[r["id"], data.messages_of(r), r["response"]] for r in rows])


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


# ------------------------------------------------------------------------------------ the proxy pass

def _stats_chunk(weight, k, h, targets):
    logits = fp32_logits(h, weight)  # [n, V]
    lp = logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
    if not k:
        return None, None, lp
    v, j = logits.topk(k, dim=-1)  # sorted, largest first: a prefix is the top-k' for any k' < k
    return v, j.int(), lp


@torch.no_grad()
def proxy_token_stats(proxy: Llama, batch, k: int, chunk_tokens: int = CHUNK_TOKENS):
    """One batch through the proxy, teacher-forced. At every response position (row-major, as h[:, :-1][mask]):
    the top-k logits [N, k] fp32 and ids [N, k] int32 (k = 0: None), and the full-vocabulary log-prob of the
    teacher's token [N] fp32. Also returns the per-row counts [B]."""
    mask = data.response_mask(batch["labels"])
    targets = batch["input_ids"][:, 1:][mask]
    h = hidden_at(proxy, batch["input_ids"], batch["attention_mask"], F.pad(mask, (0, 1)))  # [N, C]
    parts = map_chunks(_stats_chunk, (h, targets), (proxy.lm_head.weight, k), chunk_tokens)
    vals, ids, lps = zip(*parts) if parts else ((), (), ())
    cat = (lambda xs: torch.cat(xs) if xs and xs[0] is not None else None)
    lp = torch.cat(lps) if lps else h.new_zeros(0, dtype=torch.float32)
    return cat(vals), cat(ids), lp, mask.sum(-1)


def _proxy_batches(proxy, seqs, pad_id, device, batch_size, k, chunk_tokens):
    """(indices, proxy_token_stats) for seqs in batches of similar lengths."""
    with train.autocast(device):
        for idx in data.length_batches([len(s.ids) for s in seqs], batch_size):
            batch = train.collate_seqs([seqs[i] for i in idx], pad_id, device)
            yield idx, proxy_token_stats(proxy, batch, k, chunk_tokens)


def proxy_mean_logps(proxy: Llama, seqs, pad_id, device, batch_size: int,
                     chunk_tokens: int = CHUNK_TOKENS) -> torch.Tensor:
    """ℓ_i = mean over sample i's response tokens of log π_p(y_t | x, y_<t) (full-vocabulary softmax) -> [n]
    fp32: the cache's mean_logp, for the --topk 0 mode run without a cache."""
    out = torch.zeros(len(seqs), dtype=torch.float64)
    for idx, (_, _, lp, counts) in _proxy_batches(proxy, seqs, pad_id, device, batch_size, 0, chunk_tokens):
        for i, part in zip(idx, lp.double().cpu().split(counts.tolist())):
            out[i] = part.sum() / max(1, part.numel())
    return out.float()


# ---------------------------------------------------------------------------------------- the shards

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


def cache_index(rows, counts: list[int], tok, fmt, args, embedding_size: int) -> dict:
    shards = [{"file": f"shard-{i:05d}.safetensors", "start": a, "end": b, "tokens": sum(counts[a:b]),
               "ids": [r["id"] for r in rows[a:b]]}
              for i, (a, b) in enumerate(plan_shards(counts, args.shard_tokens))]
    return {"version": CACHE_VERSION, "k": args.topk, "max_len": args.max_len, "format": fmt,
            "dtype": args.cache_dtype, "proxy": str(Path(args.proxy).resolve()), "vocab_size": tok.get_vocab_size(),
            "embedding_size": embedding_size, "tokenizer_hash": data.tokenizer_hash(tok), "data": str(args.data),
            "data_hash": data_hash(rows), "n_samples": len(counts), "n_tokens": sum(counts),
            "shard_tokens": args.shard_tokens, "shards": shards, "complete": False}


def write_shard(proxy, seqs, shard: dict, out: Path, k: int, dtype, pad_id, device, batch_size: int,
                chunk_tokens: int, progress=None):
    """Fill one shard's tensors batch by batch (preallocated from the known counts), then write it atomically.
    seqs: the shard's own samples, seqs[j] is sample start + j."""
    from safetensors.torch import save_file
    a, b = shard["start"], shard["end"]
    counts = torch.tensor([s.n_targets for s in seqs], dtype=torch.int64)
    offsets = torch.zeros(b - a + 1, dtype=torch.int64)
    offsets[1:] = counts.cumsum(0)
    n_tok = int(offsets[-1])
    topk_logits = torch.empty(n_tok, k, dtype=dtype)
    topk_ids = torch.empty(n_tok, k, dtype=torch.int32)
    mean_logp = torch.empty(b - a, dtype=torch.float32)
    for idx, (vals, ids, lp, cnt) in _proxy_batches(proxy, seqs, pad_id, device, batch_size, k, chunk_tokens):
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
    tensors = {"topk_logits": topk_logits, "topk_ids": topk_ids, "offsets": offsets, "mean_logp": mean_logp}
    with data.atomic_path(out / shard["file"]) as tmp:
        save_file(tensors, str(tmp), metadata={"start": str(a), "end": str(b), "k": str(k)})


def _first_difference(old: dict, new: dict) -> str | None:
    for key in new:
        if key not in ("complete", "data") and old.get(key) != new[key]:  # the data is compared by its hash
            if key == "shards":
                return "shards: another shard plan (other data, --max-len or tokenizer)"
            return f"{key}: {old.get(key)!r} there, {new[key]!r} now"
    return None


def build(args, tok, fmt, rows, device) -> int:
    """The `cache` command: plan the shards, refuse a directory holding another cache, write what is missing."""
    from tqdm import tqdm
    out = Path(args.out)
    # Only the response lengths of the whole set stay in memory (they fix the shard plan); token ids are encoded
    # again shard by shard, so memory is bounded by one shard at any data size.
    counts, cut = [], 0
    for r in rows:
        (s,), c = train.encode_seqs(tok, [r], fmt, args.max_len)
        counts.append(s.n_targets)
        cut += c
    if cut:
        print(f"{args.data}: {cut} of {len(rows)} sequences cut to --max-len {args.max_len}", flush=True)
    proxy = load_proxy(args.proxy, tok, device)
    if args.topk > proxy.cfg.vocab_size:
        raise CacheError(f"--topk {args.topk} is larger than the proxy's vocabulary ({proxy.cfg.vocab_size})")
    index = cache_index(rows, counts, tok, fmt, args, proxy.cfg.vocab_size)
    index_path = out / "index.json"
    if index_path.exists():
        old = json.loads(index_path.read_text())
        diff = _first_difference(old, index)
        if diff:
            raise CacheError(f"{out}: holds a cache built with other settings ({diff}); choose another --out or "
                             "delete it")
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
            seqs, _ = train.encode_seqs(tok, rows[shard["start"]:shard["end"]], fmt, args.max_len)
            write_shard(proxy, seqs, shard, out, args.topk, dtype, pad, device, args.batch_size, args.chunk_tokens, bar)
    bar.close()
    index["complete"] = True
    data.atomic_write_text(index_path, json.dumps(index) + "\n")
    ml = ProxyCache(out).mean_logp
    print(f"cache: done, mean log-prob per sample {float(ml.mean()):.4f} ± {float(ml.std(correction=0)):.4f}",
          flush=True)
    return 0


# -------------------------------------------------------------------------------------- reading it

# safetensors dtype -> the numpy dtype its bytes are mapped as (bf16, which numpy lacks, as its int16 bits)
MAPPED_DTYPES = {"F32": np.float32, "BF16": np.int16, "I32": np.int32}


def map_tensors(path: Path, names) -> list[np.ndarray]:
    """Tensors `names` of a safetensors file, memory-mapped read-only, from one read of its header (the format: an
    8-byte little-endian header length, a JSON header giving each tensor's dtype, shape and byte range after the
    header, then the bytes). A batch's rows are then numpy slices, where a safetensors slice read per sample cost
    2.2-2.5 ms of a ~31 ms step of the main job's Proxy-KD student."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    out = []
    for name in names:
        meta = header[name]
        begin, end = meta["data_offsets"]
        dtype = MAPPED_DTYPES.get(meta["dtype"])
        if dtype is None:
            raise CacheError(f"{path}: {name} is {meta['dtype']}, expected one of {sorted(MAPPED_DTYPES)}")
        out.append(np.zeros(meta["shape"], dtype) if begin == end else  # an empty tensor: nothing to map
                   np.memmap(path, dtype=dtype, mode="r", offset=8 + n + begin, shape=tuple(meta["shape"])))
    return out


class ProxyCache:
    """A finished cache directory, opened for reading: per-sample offsets and mean log-probs in memory (12 bytes
    a sample), the top-k rows memory-mapped (the safetensors shards' bytes) and read per batch, only the rows
    asked for."""

    def __init__(self, path):
        self.path = Path(path)
        self.index = self._read_index()
        self.k = int(self.index["k"])
        self.logits, self.ids, self.offsets, self.shard_of, self.local = [], [], [], [], []
        means = []
        for s_i, sh in enumerate(self.index["shards"]):
            lg, ids, off, ml = self._open_shard(sh)
            self.logits.append(lg)
            self.ids.append(ids)
            self.offsets.append(off.tolist())
            means.append(ml)
            self.shard_of += [s_i] * (sh["end"] - sh["start"])
            self.local += range(sh["end"] - sh["start"])
        self.mean_logp = torch.cat(means) if means else torch.zeros(0)
        self.counts = [o[j + 1] - o[j] for o in self.offsets for j in range(len(o) - 1)]

    def _read_index(self) -> dict:
        f = self.path / "index.json"
        if not f.is_file():
            raise CacheError(f"{self.path}: no index.json (not a proxy cache; build one with `distill.py cache`)")
        try:
            index = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise CacheError(f"{f}: not JSON ({e})") from None
        if index.get("version") != CACHE_VERSION:
            raise CacheError(f"{f}: cache version {index.get('version')}, expected {CACHE_VERSION} (rebuild it with "
                             "`distill.py cache`)")
        if not index.get("complete"):
            raise CacheError(f"{self.path}: unfinished cache; rerun `distill.py cache` with the same arguments to "
                             "complete it")
        return index

    def _open_shard(self, sh: dict):
        from safetensors import safe_open
        p = self.path / sh["file"]
        try:
            h = safe_open(str(p), framework="pt")
            meta = h.metadata() or {}
            off, ml = h.get_tensor("offsets"), h.get_tensor("mean_logp")
            lg, ids = map_tensors(p, ("topk_logits", "topk_ids"))
        except Exception as e:  # missing file, torn header, missing tensor
            raise CacheError(f"{p}: unreadable cache shard ({type(e).__name__}: {e})") from None
        n = sh["end"] - sh["start"]
        if (meta.get("start"), meta.get("end")) != (str(sh["start"]), str(sh["end"])) or off.shape != (n + 1,) \
                or ml.shape != (n,) or lg.shape != (int(off[-1]), self.k) or ids.shape != lg.shape:
            raise CacheError(f"{p}: shard does not match index.json (samples {sh['start']}..{sh['end']}, k {self.k})")
        return lg, ids, off, ml

    def rows(self, samples, k: int | None = None):
        """The cached rows of these samples, concatenated in the order given: topk_logits [N, k'] fp32 and
        topk_ids [N, k'] int64, k' = k or the cache's k (a prefix: the top-k are stored largest first)."""
        k = k or self.k
        lg, ids = [], []
        for s in samples:
            sh, j = self.shard_of[s], self.local[s]
            a, b = self.offsets[sh][j], self.offsets[sh][j + 1]
            lg.append(self.logits[sh][a:b, :k])
            ids.append(self.ids[sh][a:b, :k])
        if not lg:
            return torch.zeros(0, k), torch.zeros(0, k, dtype=torch.int64)
        logits = torch.from_numpy(np.concatenate(lg))
        if logits.dtype == torch.int16:
            logits = logits.view(torch.bfloat16)  # stored as bf16, mapped as its bits
        return logits.float(), torch.from_numpy(np.concatenate(ids)).long()

    def check(self, rows, seqs, tok, fmt: str, max_len: int, embedding_size: int, proxy: str | None, topk: int):
        """Refuse, with one line, a cache built for another run: other tokenizer, chat format, --max-len, data or
        proxy, or fewer than topk columns. Then every sample's cached row count must be its response length."""
        ix, where = self.index, self.path
        check_vocab(f"proxy (cache {where})", ix["vocab_size"], ix["embedding_size"], ix["tokenizer_hash"],
                    tok.get_vocab_size(), embedding_size, data.tokenizer_hash(tok))
        if ix["format"] != fmt:
            raise CacheError(f"{where}: built with chat format {ix['format']!r}, this run uses {fmt!r} (pass --format)")
        if ix["max_len"] != max_len:
            raise CacheError(f"{where}: built with --max-len {ix['max_len']}, this run uses --max-len {max_len}")
        if topk > self.k:
            raise CacheError(f"{where}: holds the top-{self.k}, this run asks for --topk {topk}")
        if proxy is not None and Path(proxy).resolve() != Path(ix["proxy"]):
            raise CacheError(f"{where}: built from proxy {ix['proxy']}, this run names --proxy {Path(proxy).resolve()}")
        self._check_samples(rows, seqs)

    def _check_samples(self, rows, seqs):
        ix, where = self.index, self.path
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
