"""The Llama architecture, written out: leaves to root, then loading, saving, LoRA and per-token log-probs
(generation, with its KV cache, is generate.py; the checkpoint files on disk, checkpoint.py).

Module and parameter names follow the Hugging Face checkpoint layout (`model.layers.{i}.self_attn.q_proj`,
`mlp.gate_proj`, ...) and RoPE uses HF's half-split rotation, so a checkpoint loads with a plain
key-for-key loop: no renaming, no q/k permutation. `transformers` is never imported here; the tests
prove parity against it.

Shapes: B batch, T tokens in this call, L keys (T, or the KV cache's slots), H query heads,
KV key/value heads, D head_dim, C hidden size, V vocabulary.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import CheckpointError, check_tensors, read_safetensors_dir, write_safetensors_dir


# --------------------------------------------------------------------------------------------- leaves

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in fp32 (bf16 squares lose too much), cast back, then scale: HF's order exactly.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(cfg: "Config", device=None) -> torch.Tensor:
    """Inverse frequencies [D/2], with Llama 3.1's frequency-dependent scaling when configured."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))
    rs = cfg.rope_scaling
    if rs is None:
        return inv_freq
    # rope_type "llama3" (Llama 3.1 / 3.2): long wavelengths are slowed by `factor`, short ones kept,
    # and the band between is interpolated smoothly (Meta's reference, also HF `_compute_llama3_parameters`).
    factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old_len = rs["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, position_ids: torch.Tensor, dtype):
    """cos, sin [B, T, D] for integer positions [B, T]; computed in fp32, then cast like HF does."""
    freqs = position_ids[..., None].float() * inv_freq.float()  # [B, T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # half-split layout: the two halves share frequencies
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    """x [B, heads, T, D]; rotate the first half of D against the second (HF layout, not interleaved)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


# ---------------------------------------------------------------------------------------- attention

# SDPA's enable_gqa (torch >= 2.5): the kernel reads each key/value head for its group of query heads.
SDPA_GQA = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


# On CPU, attention with small heads and scores that fit in GROUPED_ATTENTION_MAX_BYTES (fp32 [B, H, T, L]) is
# written out as two batched matmuls (grouped_attention) instead of SDPA's flash kernel. At head_dim 8 (the main
# job's student) the flash kernel's blocking costs more than the scores it saves: the student's train step goes
# from 1.20x to 1.37x transformers' (README "Speed"). At 32 (its proxy) the two kernels measured the same, so
# larger heads keep the flash kernel, as do long sequences, whose scores it never holds whole.
GROUPED_ATTENTION_MAX_HEAD_DIM = 16
GROUPED_ATTENTION_MAX_BYTES = 16 * 2**20


def attend(q, k, v, mask):
    """Scaled dot-product attention with GQA. q [B, H, T, D], k and v [B, KV, L, D], mask None (causal, L = T)
    or additive float [B or 1, 1, T, L] (0 / -inf) -> [B, H, T, D].

    Each group of H/KV query heads reads one key/value head. On CPU, small heads and problems go to
    grouped_attention and the others to the flash kernel with enable_gqa (no [B, H, L, D] copy of K and V per
    layer and step, which at batch 64 cost decoding as much as attention itself). On CUDA only the flash kernel takes enable_gqa
    (fp16/bf16, no mask); the others fall back to the slow math kernel with it, so the heads are repeated."""
    B, H, T, D = q.shape
    groups = H // k.shape[1]
    if (q.device.type == "cpu" and D <= GROUPED_ATTENTION_MAX_HEAD_DIM
            and B * H * T * k.shape[2] * 4 <= GROUPED_ATTENTION_MAX_BYTES):
        return grouped_attention(q, k, v, mask)
    kw = {}
    if groups > 1 and SDPA_GQA and q.device.type == "cpu":
        kw["enable_gqa"] = True
    elif groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, **kw)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kw)


def grouped_attention(q, k, v, mask):
    """attend's math, written out: softmax(q k^T / sqrt(D) + mask) v, with the G = H/KV query heads that share a
    key/value head stacked as one [G*T, D] block of rows (head h reads key/value head h // G, HF's repeat_kv).
    So each product is one batched matmul of B*KV blocks, twice as tall as per-head blocks at G = 2, and K and V
    are never copied per query head. Shapes as in attend; the scores are [B, KV, G*T, L]."""
    B, H, T, D = q.shape
    KV, L = k.shape[1], k.shape[2]
    G = H // KV
    if mask is None:  # causal, L = T: key j is visible to query i when j <= i
        mask = torch.full((T, L), float("-inf"), dtype=q.dtype, device=q.device).triu_(1)
    if G > 1 and T > 1:  # [..., T, L] -> [..., G*T, L]: every head of a group sees the same keys
        mask = mask.repeat(*[1] * (mask.dim() - 2), G, 1)
    scores = torch.matmul(q.reshape(B, KV, G * T, D), k.transpose(-1, -2)).mul_(D ** -0.5).add_(mask)
    probs = scores.softmax(-1, dtype=torch.float32).to(v.dtype)
    return torch.matmul(probs, v).view(B, H, T, D)


class Attention(nn.Module):
    def __init__(self, cfg: "Config", layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        C, bias = cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(C, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(C, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(C, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, C, bias=bias)

    def forward(self, x, cos, sin, mask, cache, select=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, T, D]
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # [B, KV, T, D]
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # [B, KV, L, D]
        y = attend(q, k, v, mask).transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return self.o_proj(y if select is None else y[select])  # [B, T, C], or [N, C] at the selected positions


class MLP(nn.Module):
    def __init__(self, cfg: "Config"):
        super().__init__()
        C, F_, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = nn.Linear(C, F_, bias=bias)
        self.up_proj = nn.Linear(C, F_, bias=bias)
        self.down_proj = nn.Linear(F_, C, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg: "Config", layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache, select=None):
        """x [B, T, C] -> [B, T, C]; with select (bool [B, T]) -> [N, C], the selected positions only: keys and
        values still come from every position, the output projection and the MLP run on the N alone."""
        a = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, select)
        x = (x if select is None else x[select]) + a
        return x + self.mlp(self.post_attention_layernorm(x))


# ------------------------------------------------------------------------------------------- config

# HF config.json key -> our field. Any other key must be listed below, with why it leaves the model's
# math unchanged, or be at the one value this implementation computes; anything else is refused by name,
# so a config we do not understand never loads silently wrong.
FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
          "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling",
          "max_position_embeddings", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
          "attention_bias", "mlp_bias")
IGNORED_KEYS = {
    # What the file is and what wrote it (model_type and architectures are checked in from_hf);
    # is_llama_config is nanotron's marker for a plain Llama, transformers.js_config the settings of
    # transformers.js's ONNX export.
    "architectures", "model_type", "transformers_version", "_name_or_path", "is_llama_config",
    "transformers.js_config",
    # The dtype the weights were stored in: from_pretrained casts to the one asked for.
    "torch_dtype", "dtype",
    # Switches and defaults of transformers' own runtime: caching, outputs, generation settings.
    "use_cache", "return_dict", "output_attentions", "output_hidden_states", "torchscript",
    "_attn_implementation_autoset", "generation_config", "max_length", "bad_words_ids", "num_beams",
    "chunk_size_feed_forward",
    # Initialisation of a fresh model: loading replaces every weight.
    "initializer_range",
    # transformers' Llama slices each projection into this many parts and sums them: the same matmul.
    "pretraining_tp",
    # PretrainedConfig defaults for classification heads and encoder-decoders; a causal Llama reads none.
    "id2label", "label2id", "is_encoder_decoder", "is_decoder", "add_cross_attention",
    "cross_attention_hidden_size", "tie_encoder_decoder", "tokenizer_class", "prefix", "sep_token_id",
    "decoder_start_token_id", "task_specific_params", "problem_type", "finetuning_task",
}
# Keys accepted only at the value this implementation computes: (that value, what it computes).
REQUIRED_VALUES = {
    "hidden_act": ("silu", "the MLP is SwiGLU, silu(gate) * up"),
    "rope_interleaved": (False, "RoPE here rotates the two halves of each head against each other (HF's "
                                "layout), not adjacent pairs"),
    "attention_dropout": (0.0, "no dropout here, where transformers would drop attention weights in training"),
}


@dataclass
class Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    pad_token_id: int | None = None
    attention_bias: bool = False
    mlp_bias: bool = False

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise CheckpointError(f"config: hidden_size {self.hidden_size} is not divisible by "
                                      f"num_attention_heads {self.num_attention_heads} and no head_dim is given")
            self.head_dim = self.hidden_size // self.num_attention_heads
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 0 < v <= 2**24:
                raise CheckpointError(f"config: {name} = {v!r}, expected an integer in [1, 2^24]")
        if self.num_attention_heads % self.num_key_value_heads:
            raise CheckpointError(f"config: num_attention_heads {self.num_attention_heads} is not a multiple of "
                                  f"num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim % 2:
            raise CheckpointError(f"config: head_dim {self.head_dim} must be even for RoPE")
        if not self.rms_norm_eps > 0 or not self.rope_theta > 0:
            raise CheckpointError(f"config: rms_norm_eps {self.rms_norm_eps} and rope_theta {self.rope_theta} "
                                  "must be positive")
        rs = self.rope_scaling
        if rs is not None:
            kind = rs.get("rope_type", rs.get("type"))
            if kind == "default":
                self.rope_scaling = None
            elif kind != "llama3":
                raise CheckpointError(f"config: rope_scaling type {kind!r} is not supported (only 'llama3' or none)")
            else:
                missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor",
                                       "original_max_position_embeddings") if k not in rs]
                if missing:
                    raise CheckpointError(f"config: rope_scaling of type llama3 lacks {', '.join(missing)}")

    @property
    def eos_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else list(e) if isinstance(e, (list, tuple)) else [e]

    @classmethod
    def from_hf(cls, d: dict, where: str = "config.json") -> "Config":
        arch = d.get("architectures") or ["LlamaForCausalLM"]
        if d.get("model_type", "llama") != "llama" or arch != ["LlamaForCausalLM"]:
            raise CheckpointError(f"{where}: model_type {d.get('model_type')!r} / architectures {arch} is not "
                                  "supported, expected llama / ['LlamaForCausalLM']")
        for key, (value, what) in REQUIRED_VALUES.items():
            if d.get(key, value) != value:
                raise CheckpointError(f"{where}: {key} {d[key]!r} is not supported, expected {value!r}: {what}")
        d = {k: v for k, v in d.items() if k not in REQUIRED_VALUES}
        # transformers >= 5 writes RoPE settings as `rope_parameters`; older files use rope_theta/rope_scaling.
        rp = d.pop("rope_parameters", None)
        if rp:
            d.setdefault("rope_theta", rp.get("rope_theta", 10000.0))
            if rp.get("rope_type", "default") != "default":
                d["rope_scaling"] = {k: v for k, v in rp.items() if k != "rope_theta"}
        unknown = sorted(k for k in d if k not in FIELDS and k not in IGNORED_KEYS)
        if unknown:
            raise CheckpointError(f"{where}: unsupported keys {unknown}; this Llama implementation would ignore "
                                  "them and compute something else")
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in d]
        if missing:
            raise CheckpointError(f"{where}: missing required fields {missing}")
        return cls(**{k: d[k] for k in FIELDS if d.get(k) is not None})

    @classmethod
    def from_json(cls, path) -> "Config":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: cannot read a JSON config ({e})") from None
        return cls.from_hf(d, where=str(path))

    def to_hf(self) -> dict:
        d = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
             **{k: v for k, v in asdict(self).items()}}
        if d["rope_scaling"] is None:
            del d["rope_scaling"]
        return d

    @classmethod
    def preset(cls, name: str, vocab_size: int, **overrides) -> "Config":
        if name not in PRESETS:
            raise CheckpointError(f"unknown model size {name!r}; expected an HF directory or one of {sorted(PRESETS)}")
        return cls(vocab_size=vocab_size, **{**PRESETS[name], **overrides})


# Named sizes for random init. The embedded world's bases (README: "The embedded world"): the proxy has
# tiny-student's architecture (0.64 M parameters), the student micro-student's (0.04 M, 16 times smaller), so
# the proxy is far the larger model, as an open LLM that stands in for the teacher is larger than the student
# (tiny-student keeps the name of its role in earlier recipes; nano-student, 0.14 M, was the student before and
# learned this world as well as the proxy on its own; tiny-proxy, 1.71 M, was the proxy before that;
# pico-student, one layer, was measured as the student and not taken: README "How the recipe was chosen").
PRESETS = {
    "toy": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True),
    "tiny-student": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True),
    # toy's architecture under its own name: toy is the tests' smoke size and may change, the shipped student
    # base (bases/student) must not change with it
    "micro-student": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True),
    # micro-student with one layer (`make bases STUDENT_SIZE=pico-student` builds it as the student base)
    "pico-student": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True),
    # micro-student with a 16-wide MLP (femto), and 24 wide with a 48-wide MLP (atto): smaller students measured and
    # not taken, both as strong by black-box KD on this world as micro-student (README "How the recipe was chosen")
    "femto-student": dict(hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True),
    "atto-student": dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True),
    # micro-student at width 48 (0.08 M): in the harder world (HARD=1) it learns up to the aligned proxy's level by
    # black-box KD alone (README "The harder world")
    "micro48-student": dict(hidden_size=48, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True),
    "nano-student": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True),
    "tiny-proxy": dict(hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=6,
                       num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, rope_theta=500000.0, max_position_embeddings=131072,
                         tie_word_embeddings=True, rms_norm_eps=1e-5,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
}


# -------------------------------------------------------------------------------------------- model

def positions_and_mask(input_ids, attention_mask, position_ids, cache):
    """RoPE positions [B, T] (unless given) and the one attention mask every layer shares, of three kinds:

    - None: no cache and no padding before a real token, so SDPA takes its fused causal path. Right
      padding (every training batch, data.collate) counts as none: a real token's keys are all real and
      earlier, so causal attention alone gives it the same output; only the padding positions' own
      outputs (which no loss reads) differ;
    - causal over key index [1, 1, T, L]: a cache without padding; each query sits at its cache slot, so
      the slots not yet written (later ones) are never read; L is the cache's n_keys;
    - causal and padded keys masked out [B, 1, T, L]. A query always sees itself, so a padding row never
      softmaxes over nothing (no NaN).
    """
    B, T = input_ids.shape
    # One host sync: is each row 1…1 0…0 (right padding or none)?
    if cache is None and attention_mask is not None and bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all()):
        attention_mask = None
    q_idx = cache.pos if cache is not None else torch.arange(T, device=input_ids.device)  # [T] key index
    if position_ids is None:
        if attention_mask is not None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, q_idx]
        else:
            position_ids = q_idx.expand(B, T)
    if cache is None and attention_mask is None:
        return position_ids, None
    L = cache.n_keys if cache is not None else T
    k_idx = torch.arange(L, device=input_ids.device)[None, :]
    mask = (k_idx <= q_idx[:, None])[None, None]
    if attention_mask is not None:
        mask = (mask & attention_mask[:, None, None, :L].bool()) | (k_idx == q_idx[:, None])[None, None]
    return position_ids, mask


class Llama(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        # `model.` prefix on the body, `lm_head` beside it: the LlamaForCausalLM state-dict layout.
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.model.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.model.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def init_weights(self, seed: int | None = None):
        """Random init for pretraining from scratch: N(0, 0.02) like HF's initializer_range."""
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith("layernorm.weight") or name == "model.norm.weight":
                    p.fill_(1.0)
                elif name.endswith(".bias"):
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        return self

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, return_hidden: bool = False,
                select=None):
        """input_ids [B, T] -> logits [B, T, V] (or the final-normed hidden [B, T, C] with return_hidden,
        so a loss can apply lm_head chunk by chunk and never hold [B, T, V] in fp32). select (bool [B, T]):
        only those positions' outputs, [N, V] or [N, C] in row-major order (as out[select]); see hidden_at.

        attention_mask [B, L] (1 = real token) covers every key: this call's T tokens, or with a cache
        (a generate.KVCache, `at` the slots this call writes) all its slots. Padding may be on either side;
        without position_ids, each row counts positions from its first real token."""
        position_ids, mask = positions_and_mask(input_ids, attention_mask, position_ids, cache)
        x = self.model.embed_tokens(input_ids)
        dtype = x.dtype if not torch.is_autocast_enabled() else torch.get_autocast_dtype(x.device.type)
        cos, sin = rope_cos_sin(self.inv_freq, position_ids, dtype)
        if mask is not None:  # additive (0 / -inf), made once: SDPA turns a bool mask into this in every layer
            mask = torch.zeros(mask.shape, dtype=dtype, device=x.device).masked_fill_(~mask, float("-inf"))
        last = len(self.model.layers) - 1
        for i, block in enumerate(self.model.layers):
            x = block(x, cos, sin, mask, cache, select if i == last else None)
        x = self.model.norm(x)
        return x if return_hidden else self.lm_head(x)

    @property
    def device(self):
        return self.model.embed_tokens.weight.device

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # parameters() counts a tied weight once

    # ------------------------------------------------------------------------------ save and load

    def save_pretrained(self, path, max_shard_bytes: int | None = None):
        """Write an HF-layout directory (config.json + model.safetensors, or shards + index). LoRA is merged
        into the written weights; the live model keeps its adapters. Each file is written to a temporary
        name and renamed, so a crash mid-save leaves the previous files whole."""
        sd = merged_state_dict(self)
        if self.cfg.tie_word_embeddings:
            sd.pop("lm_head.weight", None)  # HF omits the tied head
        write_safetensors_dir(path, sd, self.cfg.to_hf(), max_shard_bytes)

    @classmethod
    def from_pretrained(cls, path, device=None, dtype=torch.float32) -> "Llama":
        """Build on the meta device, read and check every tensor, then assign: a bad checkpoint raises
        CheckpointError before any model exists, so nothing is ever half-loaded."""
        path = Path(path)
        cfg = Config.from_json(path / "config.json")
        with torch.device("meta"):
            model = cls(cfg)
        expected = {k: v.shape for k, v in model.state_dict().items()}
        if cfg.tie_word_embeddings:
            expected.pop("lm_head.weight")
        sd = read_safetensors_dir(path, device=device)
        if cfg.tie_word_embeddings and "lm_head.weight" in sd:
            sd.pop("lm_head.weight")  # some tied exports repeat the head; the tie decides
        check_tensors(path, expected, sd)
        sd = {k: t.to(dtype=dtype) for k, t in sd.items()}
        model.load_state_dict(sd, strict=not cfg.tie_word_embeddings, assign=True)
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        model.inv_freq = rope_inv_freq(cfg, device=model.device)
        return model


# --------------------------------------------------------------------------------------------- LoRA

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Linear):
    """y = x W^T + (alpha / r) · x A^T B^T. A subclass of nn.Linear so the frozen base keeps its checkpoint
    name (`...q_proj.weight`); the adapters add `lora_A` [r, in] and `lora_B` [out, r] (B starts at 0, so
    the wrapped model starts as the base exactly)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.scale = alpha / rank
        # fp32 adapters whatever the base dtype: they are the only weights the optimizer updates.
        dev = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=dev, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=dev, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # the LoRA paper's / peft's init

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        return y + F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B).to(y.dtype) * self.scale

    def merged_weight(self):
        return (self.weight.float() + self.scale * (self.lora_B.float() @ self.lora_A.float())).to(self.weight.dtype)


def apply_lora(model: Llama, rank: int, alpha: float, targets=LORA_TARGETS, seed: int | None = None) -> Llama:
    """Freeze every base parameter and put rank-r adapters on the named projections, in place."""
    if seed is not None:
        torch.manual_seed(seed)
    bad = set(targets) - set(LORA_TARGETS)
    if bad:
        raise ValueError(f"LoRA targets {sorted(bad)} are not projections; expected a subset of {LORA_TARGETS}")
    for p in model.parameters():
        p.requires_grad_(False)
    for block in model.model.layers:
        for parent in (block.self_attn, block.mlp):
            for name in targets:
                if hasattr(parent, name):
                    setattr(parent, name, LoRALinear(getattr(parent, name), rank, alpha))
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if ".lora_A" in k or ".lora_B" in k}


def merged_state_dict(model: Llama) -> dict[str, torch.Tensor]:
    """The HF-layout state dict with every adapter folded into its base weight."""
    sd = {k: v for k, v in model.state_dict().items() if ".lora_" not in k}
    for name, mod in model.named_modules():
        if isinstance(mod, LoRALinear):
            sd[f"{name}.weight"] = mod.merged_weight().detach()
    return sd


# ---------------------------------------------------------------------------------------- log-probs

# map_chunks recomputes a chunk's head in backward only when the whole [N, V] fp32 would exceed this: the main
# job's batches (16 x 72 positions x 1,024 tokens: 4.7 MB) keep theirs, a Llama vocabulary's never does.
RECOMPUTE_ABOVE_BYTES = 16 * 2**20


def map_chunks(fn, sliced: tuple, shared: tuple = (), chunk_tokens: int = 4096) -> list:
    """fn(*shared, *chunk) over consecutive chunks of `chunk_tokens` rows of every tensor in `sliced` (None stays
    None) -> the list of fn's outputs. The one chunk loop of every loss that applies a [V, C] head to N positions:
    under autograd each chunk runs with activation checkpointing, so its [chunk, V] fp32 intermediates are
    recomputed in backward instead of stored, and the peak is O(chunk · V) whatever N. Where all N positions'
    [N, V] fp32 logits fit in RECOMPUTE_ABOVE_BYTES (V: the rows of the largest [V, C] head in `shared`), the
    trade buys nothing and costs a second head forward: the chunks keep their intermediates instead (the same
    values and gradients)."""
    from torch.utils.checkpoint import checkpoint
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    grad = torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in sliced + shared)
    n = next(t.shape[0] for t in sliced if t is not None)
    V = max((t.shape[0] for t in shared if isinstance(t, torch.Tensor) and t.dim() == 2), default=0)
    grad = grad and n * V * 4 > RECOMPUTE_ABOVE_BYTES
    out = []
    for i in range(0, n, chunk_tokens):
        args = (*shared, *(None if t is None else t[i:i + chunk_tokens] for t in sliced))
        out.append(checkpoint(fn, *args, use_reentrant=False) if grad else fn(*args))
    return out


def hidden_at(fwd, input_ids, attention_mask, select):
    """The final-normed hidden states at the positions `select` (bool [B, T]) marks -> [N, C], row-major (as
    h[select]). On CPU the forward takes `select` itself: the positions no loss reads (the prompt, padding)
    need only the last block's keys and values, so its output projection and MLP skip them (the main job's
    batches: a tenth of the matmuls). Elsewhere the full forward is indexed: a compiled CUDA forward keeps
    one graph, which a data-dependent shape inside it would break."""
    if input_ids.device.type == "cpu":
        return fwd(input_ids, attention_mask=attention_mask, return_hidden=True, select=select)
    return fwd(input_ids, attention_mask=attention_mask, return_hidden=True)[select]


def token_logprobs(model: Llama, input_ids, attention_mask=None, mask=None, chunk_tokens: int = 4096):
    """log p(input_ids[:, t+1] | input_ids[:, :t+1]) for t < T-1 -> [B, T-1] fp32.

    mask [B, T-1] (bool): positions to score; the others are 0 and cost no head compute (prompt and padding
    are often half the tokens). The head and log-softmax run over chunks of positions (map_chunks), so neither
    [B, T, V] logits nor their fp32 log-softmax are ever held whole."""
    targets = input_ids[:, 1:]
    if mask is None:
        mask = torch.ones_like(targets, dtype=torch.bool)
    mask = mask.bool()
    h = hidden_at(model, input_ids, attention_mask, F.pad(mask, (0, 1)))  # [N, C]: position t predicts t + 1
    parts = map_chunks(head_logprobs, (h, targets[mask]), (model.lm_head.weight,), chunk_tokens)
    out = torch.zeros(targets.shape, dtype=torch.float32, device=h.device)
    return out.masked_scatter(mask, torch.cat(parts)) if parts else out


def head_logprobs(weight, h, targets):
    """h [N, C] through the head [V, C] -> log p(targets) [N] fp32 (full-vocabulary log-softmax)."""
    logits = F.linear(h, weight).float()
    return logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
