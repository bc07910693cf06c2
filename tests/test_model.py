"""model.py against the independent reference, transformers.LlamaForCausalLM, on tiny random models (CPU, fp32)."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import LlamaForCausalLM  # noqa: E402

from conftest import HF_CONFIGS as CONFIGS, LLAMA3_ROPE, hf_model  # noqa: E402
from model import Config, CheckpointError, Llama, LoRALinear, apply_lora, lora_state_dict, token_logprobs  # noqa: E402


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


# SmolLM2-135M-Instruct's own config.json as published on the Hub: real configs carry keys beyond the math.
SMOLLM2_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 1,
    "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 576, "initializer_range": 0.041666666666666664,
    "intermediate_size": 1536, "is_llama_config": True, "max_position_embeddings": 8192, "mlp_bias": False,
    "model_type": "llama", "num_attention_heads": 9, "num_hidden_layers": 30, "num_key_value_heads": 3,
    "pad_token_id": 2, "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_interleaved": False,
    "rope_scaling": None, "rope_theta": 100000, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers.js_config": {"kv_cache_dtype": {"q4f16": "float16", "fp16": "float16"}},
    "transformers_version": "4.42.3", "use_cache": True, "vocab_size": 49152,
}


def test_real_hub_config_loads_and_keys_that_change_the_math_are_refused_by_name():
    cfg = Config.from_hf(SMOLLM2_CONFIG)
    assert (cfg.num_key_value_heads, cfg.head_dim, cfg.rope_theta, cfg.tie_word_embeddings) == (3, 64, 100000, True)
    for patch, msg in [({"rope_interleaved": True}, r"rope_interleaved True is not supported, expected False"),
                       ({"attention_dropout": 0.1}, r"attention_dropout 0.1 is not supported"),
                       ({"hidden_act": "gelu"}, r"hidden_act 'gelu' is not supported, expected 'silu'"),
                       ({"no_rope_layers": [1, 0]}, r"unsupported keys \['no_rope_layers'\]")]:
        with pytest.raises(CheckpointError, match=msg) as e:
            Config.from_hf({**SMOLLM2_CONFIG, **patch})
        assert "\n" not in str(e.value)


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


def _attention_float64(q, k, v, mask):
    """Attention one query head at a time in float64: head h reads key/value head h // (H / KV)."""
    B, H, T, D = q.shape
    G = H // k.shape[1]
    out = torch.empty(B, H, T, D, dtype=torch.float64)
    for h in range(H):
        s = q[:, h].double() @ k[:, h // G].double().transpose(-1, -2) / D ** 0.5  # [B, T, L]
        if mask is None:
            s = s.masked_fill(torch.ones_like(s[0], dtype=torch.bool).triu(1), float("-inf"))
        else:
            s = s + mask[:, 0].double()
        out[:, h] = s.softmax(-1) @ v[:, h // G].double()
    return out


@pytest.mark.parametrize("H,KV", [(4, 4), (4, 2), (6, 2)])
@pytest.mark.parametrize("case", ["causal", "padded", "decode"])
def test_attention_paths_match_float64_with_grads(H, KV, case, monkeypatch):
    """Both CPU attention paths, the written-out grouped one (small problems) and SDPA's flash kernel (large ones),
    against per-head float64 attention: outputs and the gradients of q, k and v."""
    import model
    g = torch.Generator().manual_seed(H * 10 + KV)
    B, D = 3, 8  # a head size the grouped path takes
    T, L = {"causal": (11, 11), "padded": (9, 14), "decode": (1, 14)}[case]
    q = torch.randn(B, H, T, D, generator=g, requires_grad=True)
    k, v = (torch.randn(B, KV, L, D, generator=g, requires_grad=True) for _ in range(2))
    mask = None
    if case != "causal":  # left padding in rows 0 and 2, causal over the last T keys; a query always sees itself
        real = torch.ones(B, L, dtype=torch.bool)
        real[0, :4], real[2, :2] = False, False
        q_at = torch.arange(L - T, L)
        see = (torch.arange(L)[None, :] <= q_at[:, None])[None] & real[:, None, :]
        see |= torch.arange(L)[None, None, :] == q_at[None, :, None]
        mask = torch.zeros(B, 1, T, L).masked_fill_(~see[:, None], float("-inf"))
    ref = _attention_float64(q, k, v, mask)
    dout = torch.randn(ref.shape, generator=g)
    ref_grads = torch.autograd.grad((ref * dout.double()).sum(), (q, k, v))
    for max_bytes in (model.GROUPED_ATTENTION_MAX_BYTES, 0):  # grouped, then flash
        monkeypatch.setattr(model, "GROUPED_ATTENTION_MAX_BYTES", max_bytes)
        out = model.attend(q, k, v, mask)
        torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=0)
        for got, want in zip(torch.autograd.grad((out * dout).sum(), (q, k, v)), ref_grads):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)

