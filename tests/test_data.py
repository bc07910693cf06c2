"""data.py: JSONL reading and atomic writes, the split, tokenizer and chat formats, masks, batching, scoring."""
import json
import random
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import data
import world
from data import IGNORE_INDEX, DataError

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# ------------------------------------------------------------------------------------------- JSONL

json_value = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                          lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(), kids, max_size=3),
                          max_leaves=8)
json_row = st.dictionaries(st.text(), json_value, max_size=4)


@FAST
@given(rows=st.lists(json_row, max_size=6), crlf=st.booleans(), bom=st.booleans(), final_newline=st.booleans(),
       blanks=st.lists(st.sampled_from(["", "  ", "\t", " \r"]), max_size=6), ascii_only=st.booleans())
def test_read_jsonl_tolerates_line_endings_bom_blank_lines(tmp_path, rows, crlf, bom, final_newline, blanks,
                                                           ascii_only):
    lines = [json.dumps(r, ensure_ascii=ascii_only) for r in rows]
    for i, b in enumerate(blanks):  # blank lines anywhere
        lines.insert(i * 7 % (len(lines) + 1), b)
    nl = "\r\n" if crlf else "\n"
    text = ("\ufeff" if bom else "") + nl.join(lines) + (nl if final_newline else "")
    p = tmp_path / "x.jsonl"
    p.write_bytes(text.encode("utf-8"))
    assert data.read_jsonl(p) == rows


@FAST
@given(rows=st.lists(json_row, min_size=1, max_size=5))
def test_write_then_read_roundtrips(tmp_path, rows):
    p = tmp_path / "sub" / "y.jsonl"
    data.write_jsonl(p, rows)
    assert data.read_jsonl(p) == rows
    assert [q.name for q in p.parent.iterdir()] == ["y.jsonl"]  # no temporary left behind


def test_atomic_path_replaces_on_success_and_cleans_up_on_error(tmp_path):
    p = tmp_path / "a" / "f.txt"
    data.atomic_write_text(p, "old")
    with pytest.raises(RuntimeError):
        with data.atomic_path(p) as tmp:
            tmp.write_text("half")
            raise RuntimeError
    assert p.read_text() == "old" and [q.name for q in p.parent.iterdir()] == ["f.txt"]
    with data.atomic_path(p) as tmp:
        assert tmp.parent == p.parent and tmp != p
        tmp.write_text("new")
        assert p.read_text() == "old"  # nothing visible until the block ends
    assert p.read_text() == "new" and [q.name for q in p.parent.iterdir()] == ["f.txt"]


def test_content_hash_is_canonical_and_fixed():
    assert data.content_hash({"b": 1, "a": "é"}) == data.content_hash({"a": "é", "b": 1})
    assert data.content_hash({"a": 1}) != data.content_hash({"a": 2})
    # Persisted ids are made with it: its bytes must never change.
    assert data.content_hash([{"role": "user", "content": "2+2?"}]) == "ed60fcb984823fb0"
    assert len(data.content_hash("x", 12)) == 12 and len(data.content_hash("\ud800 lone", 64)) == 64


def test_separators_inside_strings_do_not_split_records(tmp_path):
    rows = [{"prompt": "a\u2028b\u0085c\u2029d\x1ce"}, {"prompt": "\ud800 lone surrogate"}]
    p = tmp_path / "z.jsonl"
    data.write_jsonl(p, rows)
    assert data.read_jsonl(p) == rows


@pytest.mark.parametrize("content, line, expected", [
    ('{"a": 1}\n\n{"a": 2\n', 3, "expected one JSON object per line"),
    ('{"a": 1}\n[1, 2]\n', 2, "expected a JSON object, got a JSON list"),
    ('{"a": 1}\r\n"s"', 2, "expected a JSON object"),
])
def test_bad_line_names_path_and_line(tmp_path, content, line, expected):
    p = tmp_path / "bad.jsonl"
    p.write_text(content, encoding="utf-8", newline="")
    with pytest.raises(DataError) as e:
        data.read_jsonl(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}:{line}: ") and expected in msg and "\n" not in msg


def test_bad_utf8_names_the_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b'{"a": 1}\n{"a": "\xff"}\n')
    with pytest.raises(DataError, match=rf"^{p}:2: expected UTF-8"):
        data.read_jsonl(p)


def write(tmp_path, rows, name="f.jsonl"):
    p = tmp_path / name
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return p


def test_read_prompts_ids_messages_answers(tmp_path):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    p = write(tmp_path, [{"prompt": "hi"}, {"id": 7, "messages": msgs, "answer": 4},
                         {"question": "GSM8K style?", "answer": "... so 3.\n#### 3", "extra": [1]}])
    rows = data.read_prompts(p)
    assert rows[0]["id"] == data.make_id({"prompt": "hi"}) and len(rows[0]["id"]) == 16
    assert rows[0]["id"] == data.make_id({"messages": [{"role": "user", "content": "hi"}]})  # same request, same id
    assert rows[1]["id"] == "7" and rows[1]["answer"] == "4" and data.messages_of(rows[1]) == msgs
    assert rows[2]["prompt"] == "GSM8K style?" and rows[2]["extra"] == [1]
    assert data.messages_of(rows[0]) == [{"role": "user", "content": "hi"}]
    assert data.read_prompts(p) == rows  # generated ids are stable


@pytest.mark.parametrize("row, expected", [
    ({"id": "a"}, 'expected "prompt" (a string) or "messages"'),
    ({"prompt": 3}, 'expected "prompt" (a string)'),
    ({"messages": []}, 'expected "messages" to be a non-empty list'),
    ({"messages": [{"role": "bot", "content": "x"}]}, "expected messages[0] to be"),
    ({"prompt": "x", "answer": [1]}, 'expected "answer" to be a string or a number'),
    ({"prompt": "x", "id": 1.5}, 'expected "id" to be a string or an integer'),
])
def test_read_prompts_bad_rows(tmp_path, row, expected):
    p = write(tmp_path, [{"prompt": "ok"}, row])
    with pytest.raises(DataError) as e:
        data.read_prompts(p)
    assert str(e.value).startswith(f"{p}:2: ") and expected in str(e.value)


def test_read_prompts_duplicates(tmp_path, capsys):
    p = write(tmp_path, [{"prompt": "a"}, {"prompt": "b"}, {"prompt": "a"}, {"id": "x", "prompt": "a"}])
    assert [r["prompt"] for r in data.read_prompts(p)] == ["a", "b", "a"]  # the explicit id is another row
    assert "dropped 1 repeated" in capsys.readouterr().err
    p = write(tmp_path, [{"id": "x", "prompt": "a"}, {"id": "x", "prompt": "b"}])
    with pytest.raises(DataError, match=r':2: duplicate id "x" \(first on line 1\)'):
        data.read_prompts(p)


def test_read_teacher_drops_unfinished_with_a_count(tmp_path, capsys):
    p = write(tmp_path, [{"id": "1", "prompt": "a", "response": "r", "finish_reason": "stop"},
                         {"id": "2", "prompt": "b", "response": "r", "finish_reason": "length"},
                         {"id": "3", "prompt": "c", "response": "r", "finish_reason": "content_filter"},
                         {"prompt": "d", "response": "r"}])
    assert [r["id"] for r in data.read_teacher(p)] == ["1", data.make_id({"prompt": "d"})]
    assert "dropped 2 rows" in capsys.readouterr().err
    assert len(data.read_teacher(p, keep_unfinished=True)) == 4
    with pytest.raises(DataError, match=r':1: expected "response" to be a string, got nothing'):
        data.read_teacher(write(tmp_path, [{"prompt": "a"}]))


def test_read_pairs(tmp_path):
    p = write(tmp_path, [{"prompt": "a", "chosen": "x", "rejected": "y"}])
    assert data.read_pairs(p)[0]["id"] == data.make_id({"prompt": "a"})
    with pytest.raises(DataError, match=r':1: expected "rejected" to be a string, got a JSON int'):
        data.read_pairs(write(tmp_path, [{"prompt": "a", "chosen": "x", "rejected": 1}]))


# ------------------------------------------------------------------------------------------- split

def test_split_stable_disjoint_covering_and_proportional():
    rows = [{"id": f"r{i}"} for i in range(20000)]
    w, p, s = data.split_three(rows, seed=1)
    ids = [{r["id"] for r in part} for part in (w, p, s)]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert set().union(*ids) == {r["id"] for r in rows} and len(w) + len(p) + len(s) == len(rows)
    for part, frac in zip((w, p, s), (0.1, 0.45, 0.45)):
        assert abs(len(part) / len(rows) - frac) < 0.015  # ~4 standard deviations of a binomial
    # Stable: a row's set does not depend on the other rows or their order; the seed changes it.
    sub = list(reversed(rows[::7]))
    for part, ref in zip(data.split_three(sub, seed=1), ids):
        assert {r["id"] for r in part} <= ref
    assert {r["id"] for r in data.split_three(rows, seed=2)[0]} != ids[0]
    # All rows of one prompt (one id) go together.
    dup = [{"id": "same", "k": i} for i in range(5)]
    assert sorted(len(x) for x in data.split_three(dup, seed=0)) == [0, 0, 5]
    for bad in ((0.5, 0.5), (0.5, 0.6, -0.1), (float("nan"), 0.5, 0.5)):
        with pytest.raises(ValueError, match="fractions"):
            data.split_three(rows, seed=0, fractions=bad)


def test_split_fractions_move_the_shares_and_nest(tmp_path, capsys):
    """`data.py split --fractions`: other shares, the same D_w where its share is the same, D_s inside the
    default D_s when it shrinks (one hash decides, so a smaller share is a subset); a bad value exits 2."""
    rows = [{"id": f"r{i}", "prompt": "p", "response": "r"} for i in range(4000)]
    data.write_jsonl(tmp_path / "t.jsonl", rows)
    assert data.main(["split", "--data", str(tmp_path / "t.jsonl"), "--out", str(tmp_path / "a"), "--seed", "3"]) == 0
    assert data.main(["split", "--data", str(tmp_path / "t.jsonl"), "--out", str(tmp_path / "b"), "--seed", "3",
                      "--fractions", "0.1,0.7,0.2"]) == 0
    ids = {d: {n: {r["id"] for r in data.read_jsonl(tmp_path / d / f"{n}.jsonl")} for n in ("D_w", "D_p", "D_s")}
           for d in "ab"}
    assert ids["a"]["D_w"] == ids["b"]["D_w"] and ids["b"]["D_s"] < ids["a"]["D_s"]
    assert abs(len(ids["b"]["D_s"]) / len(rows) - 0.2) < 0.03 and abs(len(ids["b"]["D_p"]) / len(rows) - 0.7) < 0.03
    for bad in ("0.1,0.7", "0.5,0.5,0.5", "a,b,c", "-0.1,0.6,0.5", "nan,0.5,0.5", "inf,0,0"):
        with pytest.raises(SystemExit) as e:
            data.main(["split", "--data", str(tmp_path / "t.jsonl"), "--out", str(tmp_path / "c"), f"--fractions={bad}"])
        assert e.value.code == 2 and "summing to 1" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


# --------------------------------------------------------------------------------------- tokenizer

def test_tokenizer_trains_fast_and_splits_digits(tok):
    t = time.perf_counter()
    world.world_tokenizer(1024, seed=1)
    assert time.perf_counter() - t < 3.0
    assert 500 < tok.get_vocab_size() <= 1024
    assert all(tok.token_to_id(s) is not None for s in data.SPECIALS)
    for t_ in tok.get_vocab():
        if any(c.isdigit() for c in t_):
            assert len(t_) == 1, t_  # every digit its own token
    assert tok.encode("She has 1234 pens.", add_special_tokens=False).tokens[3:7] == ["1", "2", "3", "4"]


@FAST
@given(text=st.text(max_size=60))
def test_tokenizer_roundtrips_any_text(tok, text):
    text = text.replace("<|", "<")  # a literal special token in the text is the special token, by design
    assert tok.decode(tok.encode(text, add_special_tokens=False).ids, skip_special_tokens=False) == text


def test_same_tokenizer_check_names_both(tok, tmp_path, capsys):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for d, t in ((a, tok), (b, tok), (c, world.world_tokenizer(vocab_size=350, seed=0))):
        data.save_tokenizer(t, d)
    assert data.main(["same-tokenizer", str(a), str(b)]) == 0
    assert data.main(["same-tokenizer", str(a), str(b), str(c)]) == 2
    err = capsys.readouterr().err
    n_c = data.load_tokenizer(c).get_vocab_size()
    assert err.count("\n") == 1 and str(c) in err and str(a) in err and f"{n_c} tokens" in err, err
    assert data.tokenizer_hash(tok) == data.tokenizer_hash(data.load_tokenizer(a))


def test_special_ids_for_world_and_llama3_like_tokenizers(tok):
    ids = data.special_ids(tok)
    assert [tok.id_to_token(ids[k]) for k in ("bos", "eos", "pad")] == ["<|bos|>", "<|eos|>", "<|pad|>"]
    from tokenizers import Tokenizer, models
    llama3 = Tokenizer(models.BPE())
    llama3.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"])
    ids = data.special_ids(llama3)
    assert ids == {"bos": 0, "eos": 1, "pad": 1}  # no pad token: pad is eos
    assert data.stop_ids(llama3, "llama3") == [1, 2]
    with pytest.raises(DataError, match="no <|im_start|> token"):
        data.encode_prompt(llama3, "x", "chatml")


def test_save_load_and_guess_format(tok, tmp_path):
    data.save_tokenizer(tok, tmp_path / "a")
    back = data.load_tokenizer(tmp_path / "a")
    assert back.encode("Mia has 12 pens.").ids == tok.encode("Mia has 12 pens.").ids
    assert data.guess_format(tmp_path / "a") == "plain"
    data.save_tokenizer(back, tmp_path / "b", fmt="llama3")
    assert data.guess_format(tmp_path / "b") == "llama3"
    data.save_tokenizer(data.load_tokenizer(tmp_path / "b"), tmp_path / "c")  # a loaded format is kept
    assert data.guess_format(tmp_path / "c") == "llama3"
    # A real model directory: the format comes from its chat template, and it survives a save.
    real = tmp_path / "real"
    data.save_tokenizer(tok, real)
    (real / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ '<|im_start|>' }}"}))
    assert data.guess_format(real) == "chatml"
    data.save_tokenizer(data.load_tokenizer(real), tmp_path / "d")
    assert data.guess_format(tmp_path / "d") == "chatml"
    (real / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "default", "template": "<|start_header_id|>{{ m }}"}]}))
    assert data.guess_format(real) == "llama3"
    assert data.guess_format(tmp_path / "nothing-here") == "plain"
    with pytest.raises(DataError, match="expected a tokenizers tokenizer.json"):
        (tmp_path / "junk.json").write_text("{}")
        data.load_tokenizer(tmp_path / "junk.json")
    with pytest.raises(DataError, match="no such file"):
        data.load_tokenizer(tmp_path / "nothing-here")


# ------------------------------------------------------------------------------------ chat formats

PROMPTS = ["Mia has 6 apples. How many?", [{"role": "system", "content": "Be exact."},
                                          {"role": "user", "content": "  2 + 3?\n"}]]
EXPECTED = {  # the exact rendered text of (PROMPTS[1], "5")
    "plain": "<|bos|>Be exact.\n  2 + 3?\n\n5<|eos|>",
    "chatml": "<|im_start|>system\nBe exact.<|im_end|>\n<|im_start|>user\n  2 + 3?\n<|im_end|>\n"
              "<|im_start|>assistant\n5<|im_end|>",
    "llama3": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe exact.<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\n2 + 3?<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n5<|eot_id|>",
}


@pytest.mark.parametrize("fmt", data.FORMATS)
def test_format_renders_the_real_template(tok, fmt):
    ids, _ = data.encode_pair(tok, PROMPTS[1], "5", fmt)
    assert tok.decode(ids, skip_special_tokens=False) == EXPECTED[fmt]


def check_mask(tok, prompt, response, fmt):
    ids, labels = data.encode_pair(tok, prompt, response, fmt)
    prefix = data.encode_prompt(tok, prompt, fmt)
    assert len(ids) == len(labels) and ids[:len(prefix)] == prefix  # the generation prompt is a prefix
    assert labels[:len(prefix)] == [IGNORE_INDEX] * len(prefix)
    assert labels[len(prefix):] == ids[len(prefix):]  # every response token (and the end) is a target
    eot = {"plain": "<|eos|>", "chatml": "<|im_end|>", "llama3": "<|eot_id|>"}[fmt]
    assert tok.decode(labels[len(prefix):], skip_special_tokens=False) == response + eot
    assert labels[-1] in data.stop_ids(tok, fmt)


@pytest.mark.parametrize("fmt", data.FORMATS)
@pytest.mark.parametrize("prompt", PROMPTS)
def test_mask_covers_exactly_the_response(tok, fmt, prompt):
    check_mask(tok, prompt, "First, 3 * 4 = 12.\n#### 12", fmt)


@FAST
@given(prompt=st.text(max_size=40), response=st.text(max_size=40), fmt=st.sampled_from(data.FORMATS))
def test_mask_property(tok, prompt, response, fmt):
    prompt, response = prompt.replace("<|", "<"), response.replace("<|", "<")
    check_mask(tok, prompt, response, fmt)


@pytest.mark.parametrize("fmt", data.FORMATS)
def test_saved_chat_template_matches_in_transformers(tok, tmp_path, fmt):
    transformers = pytest.importorskip("transformers")
    data.save_tokenizer(tok, tmp_path, fmt=fmt)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for prompt in PROMPTS:
        msgs = data._as_messages(prompt)
        ref = hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        ref = ref["input_ids"] if isinstance(ref, dict) or hasattr(ref, "keys") else ref
        assert list(ref) == data.encode_prompt(tok, prompt, fmt)


# -------------------------------------------------------------------------- truncation and batching

def test_truncate_keeps_prompt_end_and_response_start():
    P, R = [IGNORE_INDEX] * 10, list(range(100, 130))  # prompt 10 tokens, response 30
    ids, labels = list(range(10)) + R, P + R
    assert data.truncate(ids, labels, 64) == (ids, labels)
    assert data.truncate(ids, labels, 20) == (list(range(0, 10)) + R[:10], P + R[:10])  # short prompt kept whole
    assert data.truncate(ids, labels, 8) == (list(range(6, 10)) + R[:4], P[:4] + R[:4])  # both long: halves
    long_p = list(range(50)) + R[:3]
    assert data.truncate(long_p, [IGNORE_INDEX] * 50 + R[:3], 10)[0] == list(range(43, 50)) + R[:3]
    rows = [{"prompt": "x" * n, "response": "y"} for n in (1, 200)]
    pairs, cut = data.encode_rows(data.train_tokenizer(["x y"], 300), rows, "plain", 64)
    assert cut == 1 and max(len(i) for i, _ in pairs) == 64


def test_collate_right_pads():
    b = data.collate([([1, 2, 3], [IGNORE_INDEX, 2, 3]), ([4], [4])], pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert b["labels"].tolist() == [[IGNORE_INDEX, 2, 3], [4, IGNORE_INDEX, IGNORE_INDEX]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(v.dtype == torch.long for v in b.values())


def test_collate_moves_to_a_device_and_response_mask_shifts():
    b = data.collate([([1, 2, 3], [IGNORE_INDEX, 2, 3]), ([4], [4])], pad_id=0, device="cpu")
    assert all(v.device.type == "cpu" for v in b.values())
    assert data.response_mask(b["labels"]).tolist() == [[True, True], [False, False]]


def test_length_batches_sort_by_length_and_cover_every_index():
    lengths = [5, 1, 3, 1, 9, 2, 3]
    batches = data.length_batches(lengths, 3)
    assert batches == [[1, 3, 5], [2, 6, 0], [4]]  # stable: equal lengths keep input order
    assert data.length_batches([], 4) == []


def test_batch_order_deterministic_complete_and_length_grouped():
    rng = random.Random(0)
    lengths = [rng.randint(5, 500) for _ in range(1000)]
    a = data.batch_order(lengths, 8, seed=3, epoch=0, window=10)
    assert a == data.batch_order(lengths, 8, seed=3, epoch=0, window=10)
    assert a != data.batch_order(lengths, 8, seed=3, epoch=1, window=10)
    assert sorted(i for b in a for i in b) == list(range(1000)) and all(len(b) <= 8 for b in a)
    pad = lambda batches: sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)
    shuffled = list(range(1000))
    rng.shuffle(shuffled)
    assert pad(a) < 0.2 * pad([shuffled[i:i + 8] for i in range(0, 1000, 8)])
    firsts = [min(lengths[i] for i in b) for b in a]
    assert firsts != sorted(firsts)  # batches are shuffled, not short-to-long


# ------------------------------------------------------------------------------ answers and scoring

@pytest.mark.parametrize("text, answer", [
    ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72", "72"),
    ("So the total is $1,234.\n#### $1,234.", "1234"),
    ("#### 1,000,000", "1000000"),
    ("The answer is 18.", "18"),
    ("5 - 3 = 2", "2"),
    ("x = -3", "-3"),
    ("It costs 2.50 dollars, then 3,4", "4"),
    ("#### 12.0", "12"),
    ("#### -7", "-7"),
    ("Step 1: 7 + 5 = 12\n####\nso 13", "13"),  # an empty #### line: fall back to the last number
    ("no numbers here", None),
    ("", None),
])
def test_extract_answer(text, answer):
    assert data.extract_answer(text) == answer


def test_is_correct():
    assert data.is_correct("6 + 12 = 18\n#### 18", "18")
    assert data.is_correct("#### 18", 18) and data.is_correct("#### 18.00", "18")
    assert data.is_correct("#### 72", "She sold 48+24 = 72.\n#### 72")  # a GSM8K answer field
    assert not data.is_correct("#### 18\nor 19", "19")  # the #### line wins over later numbers
    assert not data.is_correct("#### 17", "18") and not data.is_correct("no answer", "18")
    assert not data.is_correct("#### 18", None) and not data.is_correct("18", "")
