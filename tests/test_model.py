"""model.py against the independent reference, transformers.LlamaForCausalLM, on tiny random models (CPU, fp32)."""
import copy
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from model import (Config, CheckpointError, KVCache, Llama, LoRALinear, apply_lora, generate,  # noqa: E402
                   lora_state_dict, sample_next, token_logprobs)

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
CONFIGS = {
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
    torch.manual_seed(seed)
    # deepcopy: LlamaConfig rewrites the rope dict it is given in place.
    hf = LlamaForCausalLM(LlamaConfig(max_position_embeddings=256, initializer_range=init,
                                      **copy.deepcopy(CONFIGS[name]))).eval()
    d = tmp_path / f"hf_{name}"
    hf.save_pretrained(d)
    return hf, d


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers(name, tmp_path):
    hf, d = hf_model(name, tmp_path)
    ours = Llama.from_pretrained(d).eval()
    x = torch.randint(0, CONFIGS[name]["vocab_size"], (3, 70))  # 70 > 32: past llama3's original context
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=1e-4, rtol=0)
        # Padding on both sides: compare the real positions only.
        mask = torch.ones_like(x)
        mask[0, :9] = 0   # left padding
        mask[1, -13:] = 0  # right padding
        ref = hf(x, attention_mask=mask).logits
        got = ours(x, attention_mask=mask)
        real = mask.bool()
        torch.testing.assert_close(got[real], ref[real], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["llama3_gqa", "odd_head_dim"])
def test_greedy_generate_matches_transformers(name, tmp_path):
    hf, d = hf_model(name, tmp_path, init=0.3)  # a larger init so greedy paths differ between prompts
    ours = Llama.from_pretrained(d).eval()
    V = CONFIGS[name]["vocab_size"]
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, V, (n,), generator=g).tolist() for n in (7, 2, 12, 5)]
    got = generate(ours, prompts, max_new_tokens=24, eos_id=[])
    P = max(map(len, prompts))
    ids = torch.tensor([[0] * (P - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0,
                      eos_token_id=None, min_new_tokens=24)[:, P:].tolist()
    assert got == ref
    assert len({tuple(r) for r in got}) > 1


def test_generate_stops_at_eos_and_is_reproducible(tmp_path):
    _, d = hf_model("llama3_gqa", tmp_path, init=0.3)
    m = Llama.from_pretrained(d).eval()
    prompts = [[5, 6, 7], [8, 9], [10]]
    full = generate(m, prompts, max_new_tokens=16, eos_id=[])
    eos = full[0][3]
    cut = generate(m, prompts, max_new_tokens=16, eos_id=eos)
    for f, c in zip(full, cut):
        stop = f.index(eos) if eos in f else len(f)
        assert c == f[:stop]
    a = generate(m, prompts, 16, temperature=1.0, top_p=0.8, seed=3, eos_id=[])
    b = generate(m, prompts, 16, temperature=1.0, top_p=0.8, seed=3, eos_id=[])
    c = generate(m, prompts, 16, temperature=1.0, top_p=0.8, seed=4, eos_id=[])
    assert a == b and a != c
    # top_p tiny keeps only the most likely token: sampling becomes greedy.
    assert generate(m, prompts, 16, temperature=1.0, top_p=1e-6, seed=5, eos_id=[]) == full


def test_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, 1.0, 0.7, g)) for _ in range(300)}
    assert draws == {0, 1}  # 0.5 < 0.7 so the token crossing it (0.3) is kept, the rest dropped


def test_kv_cache_decode_equals_full_forward(tmp_path):
    _, d = hf_model("llama3_gqa", tmp_path)
    m = Llama.from_pretrained(d).eval()
    x = torch.randint(0, 97, (2, 40))
    with torch.no_grad():
        full = m(x)
        cache = KVCache(m.cfg.num_hidden_layers, 40)
        parts = [m(x[:, :25], cache=cache)] + [m(x[:, t:t + 1], cache=cache) for t in range(25, 40)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["llama3_gqa", "llama2_mha"])
def test_save_then_transformers_load(name, tmp_path):
    _, d = hf_model(name, tmp_path)
    ours = Llama.from_pretrained(d).eval()
    out = tmp_path / "ours"
    ours.save_pretrained(out)
    back = LlamaForCausalLM.from_pretrained(out).eval()
    x = torch.randint(0, CONFIGS[name]["vocab_size"], (2, 50))
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, ours(x), atol=1e-4, rtol=0)


def test_sharded_checkpoints_load_both_ways(tmp_path):
    hf, d = hf_model("llama2_mha", tmp_path)
    ours = Llama.from_pretrained(d).eval()
    sharded = tmp_path / "sharded"
    ours.save_pretrained(sharded, max_shard_bytes=40_000)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2 and not (sharded / "model.safetensors").exists()
    hf_sharded = tmp_path / "hf_sharded"
    hf.save_pretrained(hf_sharded, max_shard_size="40KB")
    x = torch.randint(0, 101, (2, 30))
    with torch.no_grad():
        ref = ours(x)
        torch.testing.assert_close(Llama.from_pretrained(sharded)(x), ref, atol=0, rtol=0)
        torch.testing.assert_close(Llama.from_pretrained(hf_sharded)(x), ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(LlamaForCausalLM.from_pretrained(sharded)(x).logits, ref, atol=1e-4, rtol=0)


def _tamper(d, fn):
    from safetensors.torch import load_file, save_file
    sd = load_file(d / "model.safetensors")
    fn(sd)
    save_file(sd, d / "model.safetensors")


def test_bad_checkpoints_are_refused_with_one_clear_line(tmp_path):
    _, d = hf_model("llama2_mha", tmp_path)
    good = Llama.from_pretrained(d)
    key = "model.layers.1.mlp.up_proj.weight"

    _tamper(d, lambda sd: sd.pop(key))
    with pytest.raises(CheckpointError, match=rf"missing tensor {key} \(expected shape \(160, 64\)\)"):
        Llama.from_pretrained(d)

    _tamper(d, lambda sd: sd.update({key: torch.zeros(160, 65)}))
    with pytest.raises(CheckpointError, match=rf"tensor {key} has shape \(160, 65\), expected \(160, 64\)"):
        Llama.from_pretrained(d)

    _tamper(d, lambda sd: sd.update({key: torch.zeros(160, 64), "model.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor model.extra.weight with shape \(2,\)"):
        Llama.from_pretrained(d)

    _tamper(d, lambda sd: (sd.pop("model.extra.weight"), sd.update({key: torch.zeros(160, 64, dtype=torch.int32)})))
    with pytest.raises(CheckpointError, match=rf"tensor {key} has dtype torch.int32"):
        Llama.from_pretrained(d)

    good.save_pretrained(d)
    blob = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match=r"model.safetensors: unreadable safetensors file"):
        Llama.from_pretrained(d)

    cfg = json.loads((d / "config.json").read_text())
    for patch, msg in [({"architectures": ["MistralForCausalLM"], "model_type": "mistral"}, "is not supported"),
                       ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling type 'yarn'"),
                       ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
                       ({"sliding_window": 4096}, r"unsupported keys \['sliding_window'\]"),
                       ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads 3"),
                       ({"hidden_size": -1}, "hidden_size = -1")]:
        (d / "config.json").write_text(json.dumps({**cfg, **patch}))
        with pytest.raises(CheckpointError, match=msg):
            Llama.from_pretrained(d)
    bad = dict(cfg)
    del bad["num_hidden_layers"]
    (d / "config.json").write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match=r"missing required fields \['num_hidden_layers'\]"):
        Llama.from_pretrained(d)


def test_config_roundtrip_and_rope_parameters_form():
    cfg = Config(vocab_size=10, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                 rope_theta=500000.0, rope_scaling=dict(LLAMA3_ROPE))
    assert Config.from_hf(cfg.to_hf()) == cfg
    # transformers >= 5 writes RoPE as rope_parameters; both spellings give the same config.
    d = cfg.to_hf()
    d["rope_parameters"] = {"rope_theta": d.pop("rope_theta"), **d.pop("rope_scaling")}
    assert Config.from_hf(d) == cfg


def test_token_logprobs_chunked_matches_naive_with_grads(tmp_path):
    _, d = hf_model("llama3_gqa", tmp_path)
    m = Llama.from_pretrained(d)
    x = torch.randint(0, 97, (2, 33))
    got = token_logprobs(m, x, chunk_tokens=7)
    got.sum().backward()
    g_chunked = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    ref = m(x).float().log_softmax(-1)[:, :-1].gather(-1, x[:, 1:, None]).squeeze(-1)
    ref.sum().backward()
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    for a, p in zip(g_chunked, m.parameters()):
        torch.testing.assert_close(a, p.grad, atol=1e-5, rtol=1e-4)


def test_lora_starts_at_base_trains_adapters_only_and_merges_on_save(tmp_path):
    _, d = hf_model("llama3_gqa", tmp_path)
    m = Llama.from_pretrained(d)
    x = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        base = m(x)
    apply_lora(m, rank=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"), seed=0)
    with torch.no_grad():
        torch.testing.assert_close(m(x), base, atol=0, rtol=0)  # B = 0: identical to the base
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert isinstance(m.model.layers[0].self_attn.q_proj, LoRALinear)
    assert not isinstance(m.model.layers[0].self_attn.k_proj, LoRALinear)
    assert len(lora_state_dict(m)) == 2 * 3 * 3
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
    m(x).logsumexp(-1).mean().backward()
    opt.step()
    with torch.no_grad():
        live = m(x)
    assert (live - base).abs().max() > 1e-3
    m.save_pretrained(tmp_path / "merged")
    sd_keys = set(json.loads((tmp_path / "merged" / "config.json").read_text()))
    assert "vocab_size" in sd_keys
    merged = Llama.from_pretrained(tmp_path / "merged")  # a plain model: no lora keys were written
    with torch.no_grad():
        torch.testing.assert_close(merged(x), live, atol=1e-5, rtol=0)
        hf_back = LlamaForCausalLM.from_pretrained(tmp_path / "merged")(x).logits
        torch.testing.assert_close(hf_back, live, atol=1e-4, rtol=0)


def test_token_logprobs_mask_scores_only_the_selected_positions(tmp_path):
    _, d = hf_model("llama3_gqa", tmp_path)
    m = Llama.from_pretrained(d).eval()
    x = torch.randint(0, 97, (3, 21))
    mask = torch.rand(3, 20) > 0.5
    with torch.no_grad():
        full = token_logprobs(m, x)
        part = token_logprobs(m, x, mask=mask, chunk_tokens=5)
    torch.testing.assert_close(part, full * mask, atol=1e-6, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled, CUDA-graphed decode step needs a GPU")
def test_compiled_decode_matches_eager_on_cuda(tmp_path):
    _, d = hf_model("llama3_gqa", tmp_path, init=0.3)
    m = Llama.from_pretrained(d, device="cuda").eval()
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    assert generate(m, prompts, 20, eos_id=[], compile=True) == generate(m, prompts, 20, eos_id=[])
