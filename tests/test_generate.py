"""generate.py: greedy decoding token for token against transformers, stop tokens (cut or kept), seeded
nucleus sampling, and the KV cache's prefill + decode equal to one full forward (CPU, fp32)."""
import pytest
import torch

pytest.importorskip("transformers")

from conftest import HF_CONFIGS as CONFIGS, hf_model  # noqa: E402
from generate import KVCache, generate, sample_next  # noqa: E402
from model import Llama  # noqa: E402


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


def test_keep_stop_ends_each_row_with_the_stop_id_it_emitted(tmp_path):
    _, d = hf_model("llama3_gqa", tmp_path, init=0.3)
    m = Llama.from_pretrained(d).eval()
    prompts = [[5, 6, 7], [8, 9], [10], [11, 12, 13, 14], [20, 3]]
    full = generate(m, prompts, max_new_tokens=16, eos_id=[])
    stops = [full[0][10], full[1][5]]  # two ids (as chatml's <|im_end|> and <|endoftext|>) that end rows
    kept = generate(m, prompts, max_new_tokens=16, eos_id=stops, keep_stop=True)
    cut = generate(m, prompts, max_new_tokens=16, eos_id=stops)
    ends = set()
    for f, k, c in zip(full, kept, cut):
        first = next((i for i, t in enumerate(f) if t in stops), None)
        if first is None:  # cut by the budget: all 16 tokens, no stop to keep
            assert k == c == f
        else:
            assert k == f[:first + 1] and c == f[:first] and k[-1] in stops
            ends.add(k[-1])
    assert ends == set(stops) and any(len(k) == 16 for k in kept)  # both ids, and a budget-cut row


def test_sampled_logprobs_equal_a_teacher_forced_pass(tmp_path):
    """logprobs=True: each kept token's log p under the untempered model (whatever temperature and top_p drew
    it), equal to a teacher-forced forward over prompt + sample; a row cut at its stop keeps the stop's."""
    from model import token_logprobs
    _, d = hf_model("llama3_gqa", tmp_path, init=0.3)
    m = Llama.from_pretrained(d).eval()
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14]]
    plain = generate(m, prompts, 16, temperature=0.7, top_p=0.8, seed=3, eos_id=[])
    stop = plain[0][6]
    toks, lps = generate(m, prompts, 16, temperature=0.7, top_p=0.8, seed=3, eos_id=stop, keep_stop=True,
                         logprobs=True)
    assert toks == generate(m, prompts, 16, temperature=0.7, top_p=0.8, seed=3, eos_id=stop, keep_stop=True)
    assert toks[0][-1] == stop and len(toks[0]) <= 7
    for p, t, lp in zip(prompts, toks, lps):
        assert len(lp) == len(t) and all(x <= 0 for x in lp)
        with torch.no_grad():
            ref = token_logprobs(m, torch.tensor([p + t]))[0, len(p) - 1:]
        # fp32 rounding: the cached decode and the full forward sum in other orders. On an AVX-512 CPU a log-prob
        # of -3.5 came out 1.05e-5 apart (3e-6 relative), so the bound is relative as well as absolute.
        torch.testing.assert_close(torch.tensor(lp), ref, atol=1e-5, rtol=1e-5)


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
        parts = [m(x[:, :25], cache=cache.at(torch.arange(25)))]
        parts += [m(x[:, t:t + 1], cache=cache.at(torch.tensor([t]))) for t in range(25, 40)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled, CUDA-graphed decode step needs a GPU")
def test_compiled_decode_matches_eager_on_cuda(tmp_path):
    _, d = hf_model("llama3_gqa", tmp_path, init=0.3)
    m = Llama.from_pretrained(d, device="cuda").eval()
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    assert generate(m, prompts, 20, eos_id=[], compile=True) == generate(m, prompts, 20, eos_id=[])


def test_nucleus_keeps_the_tokens_a_full_sort_keeps():
    """The top-k shortcut and the full sort keep the same tokens: sharp rows (nucleus inside the top 64), flat
    ones (past it), and a batch mixing both (one flat row sends the whole batch to the sort)."""
    from generate import nucleus
    g = torch.Generator().manual_seed(0)
    for scale in (0.02, 2.0, 10.0, None):
        logits = torch.randn(8, 1024, generator=g) * (scale or 10.0)
        if scale is None:
            logits[3] *= 0.01
        probs = logits.softmax(-1)
        sp, idx = probs.sort(-1, descending=True)
        ref = torch.zeros_like(probs).scatter_(-1, idx, sp.masked_fill(sp.cumsum(-1) - sp > 0.8, 0.0))
        assert torch.equal(nucleus(probs, 0.8), ref)
