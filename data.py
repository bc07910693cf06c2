"""Data for proxykd: JSONL files, the D_w/D_p/D_s split, tokenizer, chat formats, batching, scoring.

Read top to bottom: JSONL files -> the split -> tokenizer -> chat formats and loss masks -> truncation
and batching -> answer extraction and scoring. The embedded arithmetic world is world.py.

Conventions every script relies on:
- Labels are unshifted (the HF convention): labels[i] is input_ids[i] on response tokens (and the
  end-of-turn token that closes the response), IGNORE_INDEX elsewhere; the loss does the shift.
- Prompt and response are tokenized as separate segments, so the mask boundary is exact and
  `encode_prompt` is always a prefix of `encode_pair`'s ids (the generation prompt).
- Bad input raises DataError with one line: `path:line: expected ...`.
"""
from __future__ import annotations

import codecs
import functools
import hashlib
import json
import os
import random
import re
import sys
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

IGNORE_INDEX = -100  # the one ignore index of the whole project (torch's cross_entropy default)
FORMATS = ("plain", "chatml", "llama3")
ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """Bad input data; the message is one line naming the file (and line) and what was expected."""


def _note(msg: str):
    print(msg, file=sys.stderr, flush=True)


def content_hash(obj, n: int = 16) -> str:
    """The first n hex digits of the sha256 of obj's canonical JSON: key order and whitespace never
    change it (sorted keys, no spaces); text stays UTF-8, and lone surrogates ("\\ud800" escapes in
    a JSON file) hash instead of raising."""
    s = json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(s.encode("utf-8", "surrogatepass")).hexdigest()[:n]


# ------------------------------------------------------------------------------------------- JSONL

def _iter_jsonl(path):
    """(line number, object) per non-blank line. Reads bytes and splits on b"\\n" only, so U+2028 or
    U+0085 inside a JSON string (legal there) never splits a record, and CRLF, a BOM and a missing final
    newline are all fine."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if n == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            try:
                line = raw.decode("utf-8").strip(" \t\r\n")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{n}: expected UTF-8 text (bad byte at column {e.start + 1})") from None
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: expected one JSON object per line ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{n}: expected a JSON object, got a JSON {type(obj).__name__}")
            yield n, obj


def read_jsonl(path) -> list[dict]:
    return [obj for _, obj in _iter_jsonl(path)]


@contextmanager
def atomic_path(path):
    """A temporary path beside `path` to write to; on normal exit the file is fsynced and renamed
    over `path`, on an exception it is removed. A kill at any moment leaves either the old file or
    the new one, never a torn one (the rename is atomic on one file system)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path, text: str):
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)


def write_jsonl(path, rows):
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            try:  # readable UTF-8; lone surrogates (from "\\ud800" escapes) cannot be UTF-8, so escape those rows
                line = json.dumps(row, ensure_ascii=False)
                line.encode("utf-8")
            except UnicodeEncodeError:
                line = json.dumps(row)
            f.write(line + "\n")


def messages_of(row: dict) -> list[dict]:
    """The chat messages of a prompt row: its "messages", or its "prompt" as one user message."""
    if "messages" in row:
        return list(row["messages"])
    return [{"role": "user", "content": row["prompt"]}]


def make_id(row: dict) -> str:
    """An id from the prompt's content: the same prompt gets the same id in every file (prompts,
    teacher responses, pairs), so the split keeps all of a prompt's rows in one of D_w, D_p, D_s."""
    return content_hash(messages_of(row))


def _check_row(path, n, row: dict, strings=()) -> dict:
    """Validate a prompt-carrying row in place: prompt/messages, the given string fields, "id"."""
    where = f"{path}:{n}"
    if "prompt" not in row and "messages" not in row and isinstance(row.get("question"), str):
        row["prompt"] = row["question"]  # GSM8K's own files say "question"
    if "messages" in row:
        ms = row["messages"]
        if not isinstance(ms, list) or not ms:
            raise DataError(f'{where}: expected "messages" to be a non-empty list of {{"role", "content"}}')
        for i, m in enumerate(ms):
            if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
                raise DataError(f'{where}: expected messages[{i}] to be {{"role": one of {"/".join(ROLES)}, '
                                f'"content": a string}}, got {json.dumps(m)[:80]}')
    elif not isinstance(row.get("prompt"), str):
        raise DataError(f'{where}: expected "prompt" (a string) or "messages" (a list of {{"role", "content"}})')
    for key in strings:
        if not isinstance(row.get(key), str):
            got = "nothing" if key not in row else f"a JSON {type(row[key]).__name__}"
            raise DataError(f'{where}: expected "{key}" to be a string, got {got}')
    if "id" in row:
        if isinstance(row["id"], bool) or not isinstance(row["id"], (str, int)):
            raise DataError(f'{where}: expected "id" to be a string or an integer')
        row["id"] = str(row["id"])
    else:
        row["id"] = make_id(row)
    return row


def read_prompts(path) -> list[dict]:
    """Prompt rows: {"id"?, "prompt" | "messages" | "question", "answer"?, ...}; other keys are kept.
    "answer" becomes a string. A repeated row (same id, same content) is dropped with a note; the same
    id with other content is an error."""
    rows, first = [], {}  # id -> (line, canonical content)
    dropped = 0
    for n, row in _iter_jsonl(path):
        row = _check_row(path, n, row)
        if "answer" in row:
            a = row["answer"]
            if isinstance(a, bool) or not isinstance(a, (str, int, float)):
                raise DataError(f'{path}:{n}: expected "answer" to be a string or a number')
            row["answer"] = str(a)
        content = content_hash(row)
        if row["id"] in first:
            line, seen = first[row["id"]]
            if seen != content:
                raise DataError(f'{path}:{n}: duplicate id "{row["id"]}" (first on line {line}) with other '
                                f'content; expected each row to have its own "id"')
            dropped += 1
            continue
        first[row["id"]] = (n, content)
        rows.append(row)
    if dropped:
        _note(f"{path}: dropped {dropped} repeated rows")
    return rows


def read_teacher(path, keep_unfinished: bool = False) -> list[dict]:
    """Teacher output rows: a prompt row plus "response" and "finish_reason", in a canonical order (by id,
    then sample index): a concurrent client writes them in the order the API answered, which differs from
    run to run, and every stage's data order (the split, the shuffles, the held-out subset) must not. Rows
    whose finish_reason is not "stop" (cut at max tokens, filtered) are dropped by default, with a count; a
    row without a finish_reason (a file from another tool) is kept."""
    rows, dropped = [], {}
    for n, row in _iter_jsonl(path):
        row = _check_row(path, n, row, strings=("response",))
        why = row.get("finish_reason", "stop")
        if why != "stop" and not keep_unfinished:
            dropped[str(why)] = dropped.get(str(why), 0) + 1
            continue
        rows.append(row)
    if dropped:
        detail = ", ".join(f"{k}: {v}" for k, v in sorted(dropped.items()))
        _note(f"{path}: dropped {sum(dropped.values())} rows whose finish_reason is not \"stop\" ({detail})")
    return sorted(rows, key=lambda r: (r["id"], r.get("sample_index", 0)))


def read_pairs(path) -> list[dict]:
    """Preference pairs: {"id"?, "prompt" | "messages", "chosen", "rejected"}."""
    return [_check_row(path, n, row, strings=("chosen", "rejected")) for n, row in _iter_jsonl(path)]


# ------------------------------------------------------------------------------------------- split

def hash_to_unit(key: str) -> float:
    """A uniform number in [0, 1) from a string, the same on every machine and Python run."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()[:8], "big") / 2**64


PAPER_SPLIT = (0.1, 0.45, 0.45)  # shares of D_w, D_p, D_s (paper §4.1)


def fractions_ok(fractions) -> bool:
    """Three shares, each >= 0, summing to 1 (written so that NaN fails)."""
    return len(fractions) == 3 and all(f >= 0 for f in fractions) and abs(sum(fractions) - 1) <= 1e-9


def split_three(rows, seed: int, fractions=PAPER_SPLIT):
    """D_w, D_p, D_s (paper §4.1: 10/45/45 at random). Each row goes by a hash of (seed, id) alone, so
    the split is stable (it does not depend on the other rows or their order), disjoint, covers every
    row, and all rows of one prompt land together. Proportions are binomially close to `fractions`."""
    if not fractions_ok(fractions):
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions}")
    out = ([], [], [])
    for row in rows:
        u = hash_to_unit(f"{seed}\x00{row['id']}")
        out[0 if u < fractions[0] else 1 if u < fractions[0] + fractions[1] else 2].append(row)
    return out


# --------------------------------------------------------------------------------------- tokenizer

# Every chat format's special tokens, so the embedded tokenizer works with all three formats.
SPECIALS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>",
            "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
# What bos/eos/pad are called in the tokenizers people use (ours, Llama 3, Llama 2/Mistral, Gemma, Qwen).
_BOS = ("<|bos|>", "<|begin_of_text|>", "<s>", "<bos>")
_EOS = ("<|eos|>", "<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>")
_PAD = ("<|pad|>", "<pad>", "[PAD]")
_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def train_tokenizer(texts, vocab_size: int = 1024) -> Tokenizer:
    """Byte-level BPE (any text encodes, decode(encode(s)) == s) with every digit its own token, so
    numbers are read digit by digit and arithmetic is learnable by a tiny model."""
    if vocab_size < 256 + len(SPECIALS):
        raise ValueError(f"vocab_size must be >= {256 + len(SPECIALS)} (256 bytes + specials), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def load_tokenizer(path_or_dir) -> Tokenizer:
    """A tokenizer.json, or a directory holding one. The directory's HF side files (tokenizer_config.json
    with its chat template, ...) ride along on `tok.side_files`, so save_tokenizer copies them into every
    checkpoint and `guess_format` keeps working downstream."""
    p = Path(path_or_dir)
    f = p / "tokenizer.json" if p.is_dir() else p
    if not f.is_file():
        raise DataError(f"{f}: no such file (expected a tokenizer.json, or a directory holding one)")
    try:
        tok = Tokenizer.from_file(str(f))
    except Exception as e:  # tokenizers raises plain Exceptions
        raise DataError(f"{f}: expected a tokenizers tokenizer.json ({str(e).splitlines()[0]})") from None
    tok.side_files = {n: (f.parent / n).read_text(encoding="utf-8") for n in _SIDE_FILES if (f.parent / n).is_file()}
    return tok


def tokenizer_hash(tok: Tokenizer) -> str:
    """A hash of the token -> id map: two tokenizers with the same hash read the same ids as the same tokens."""
    return content_hash(sorted(tok.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1]))


def check_same_tokenizer(dirs) -> None:
    """Refuse, naming both, model directories (or tokenizer files) whose tokenizers differ: a proxy, a student
    and the world they are trained on must read token ids the same way."""
    first = None
    for d in dirs:
        tok = load_tokenizer(d)
        h = (tok.get_vocab_size(), tokenizer_hash(tok))
        if first is None:
            first = (d, h)
        elif h != first[1]:
            raise DataError(f"{d}: tokenizer of {h[0]} tokens (hash {h[1]}) differs from {first[0]}'s "
                            f"({first[1][0]} tokens, hash {first[1][1]}): rebuild the bases for this world "
                            "(make bases) or point them at the world they were made for")


def special_ids(tok: Tokenizer) -> dict:
    """{"bos", "eos", "pad"} ids; bos may be None (Qwen has none); pad falls back to eos (Llama 3 has none)."""
    def first(names):
        return next((i for i in map(tok.token_to_id, names) if i is not None), None)
    bos, eos, pad = first(_BOS), first(_EOS), first(_PAD)
    if eos is None:
        raise DataError(f"tokenizer has no end-of-sequence token (looked for {', '.join(_EOS)})")
    return {"bos": bos, "eos": eos, "pad": eos if pad is None else pad}


# HF chat templates (jinja) equal to the formats below, written into tokenizer_config.json so that
# transformers and serving engines render prompts exactly as proxykd does (tested token for token).
CHAT_TEMPLATES = {
    "plain": r"{% if bos_token %}{{ bos_token }}{% endif %}{% for m in messages %}{% if m['role'] == 'assistant' %}"
             r"{{ m['content'] + eos_token }}{% else %}{{ m['content'] + '\n' }}{% endif %}{% endfor %}",
    "chatml": r"{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
              r"{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
    "llama3": r"{{ '<|begin_of_text|>' }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + "
              r"'<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
              r"{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}",
}


def save_tokenizer(tok: Tokenizer, out_dir, fmt: str | None = None):
    """tokenizer.json plus tokenizer_config.json, so every checkpoint directory is complete. With fmt=None
    a loaded tokenizer's own side files are copied unchanged (a real model keeps its chat template) and a
    fresh one is marked "plain"; a given fmt is written as the chat template and the recorded format."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "tokenizer.json", tok.to_str(pretty=True))
    side = dict(getattr(tok, "side_files", {}))
    if fmt is None and "tokenizer_config.json" in side:
        for name, text in side.items():
            atomic_write_text(out / name, text)
        return
    fmt = fmt or "plain"
    if fmt not in FORMATS:
        raise ValueError(f"unknown chat format {fmt!r}; expected one of {', '.join(FORMATS)}")
    cfg = json.loads(side.get("tokenizer_config.json", "{}"))
    if not cfg:
        ids = special_ids(tok)
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast",
               "bos_token": None if ids["bos"] is None else tok.id_to_token(ids["bos"]),
               "eos_token": tok.id_to_token(_end_of_turn(tok, fmt)),  # what instruct models stop on
               "pad_token": tok.id_to_token(ids["pad"])}
    cfg.update(chat_template=CHAT_TEMPLATES[fmt], proxykd_chat_format=fmt)
    atomic_write_text(out / "tokenizer_config.json", json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    if "special_tokens_map.json" in side:
        atomic_write_text(out / "special_tokens_map.json", side["special_tokens_map.json"])
    (out / "chat_template.jinja").unlink(missing_ok=True)  # it would override ours in transformers


def guess_format(model_dir) -> str:
    """The chat format a model directory was trained with: ours as recorded, else recognised from its HF
    chat template (tokenizer_config.json or chat_template.jinja), else "plain" (a base model)."""
    d = Path(model_dir)
    cfg_path, tpl = d / "tokenizer_config.json", ""
    if cfg_path.is_file():
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{cfg_path}:{e.lineno}: expected JSON ({e.msg})") from None
        if cfg.get("proxykd_chat_format") in FORMATS:
            return cfg["proxykd_chat_format"]
        tpl = cfg.get("chat_template") or ""
        if isinstance(tpl, list):  # [{"name": "default", "template": ...}, ...]
            tpl = " ".join(str(t.get("template", "")) for t in tpl if isinstance(t, dict))
    if (d / "chat_template.jinja").is_file():
        tpl += (d / "chat_template.jinja").read_text(encoding="utf-8")
    if "<|im_start|>" in tpl:
        return "chatml"
    if "<|start_header_id|>" in tpl:
        return "llama3"
    return "plain"


# ------------------------------------------------------------------------------------ chat formats
#
# plain:  <|bos|>{prompt}\n{response}<|eos|>        (several prompt messages: each content + "\n")
# chatml: <|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n{response}<|im_end|>
# llama3: <|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{prompt}<|eot_id|>
#         <|start_header_id|>assistant<|end_header_id|>\n\n{response}<|eot_id|>
# A system message is one more turn before the user's (chatml, llama3) or one more line (plain).
# chatml also opens a chat that has no system turn with its template's default one, if it has one (default_system).
# A format is rendered as "pieces" (text, or a special token id); each text run between special
# tokens is encoded on its own, exactly as HF does when it tokenizes a rendered chat template.

def _special(tok, name: str, fmt: str) -> int:
    i = tok.token_to_id(name)
    if i is None:
        raise DataError(f"tokenizer has no {name} token, which the {fmt} chat format needs; pick another chat format")
    return i


def _end_of_turn(tok, fmt: str) -> int:
    if fmt == "plain":
        return special_ids(tok)["eos"]
    if fmt == "chatml":
        return _special(tok, "<|im_end|>", fmt)
    if fmt == "llama3":
        return _special(tok, "<|eot_id|>", fmt)
    raise ValueError(f"unknown chat format {fmt!r}; expected one of {', '.join(FORMATS)}")


# The whole default system turn as one string literal of a ChatML template (SmolLM2, Qwen2.5), "\n" written as a
# newline or as an escape; group 2 is its content.
_DEFAULT_SYSTEM = re.compile(r"""(['"])<\|im_start\|>system(?:\n|\\n)((?:(?!\1)[\s\S])*?)<\|im_end\|>""")


@functools.lru_cache(maxsize=8)
def _template_default_system(template: str) -> str | None:
    m = _DEFAULT_SYSTEM.search(template)
    return None if m is None else m.group(2).replace("\\n", "\n")


def default_system(tok) -> str | None:
    """The system message the chat template of the tokenizer's directory adds to a chat that has none
    (SmolLM2's "You are a helpful AI assistant named SmolLM, trained by Hugging Face"), or None. The model was
    instruction-tuned with it and apply_chat_template (transformers, serving engines) renders it, so the chatml
    format renders it too: the ids we train and evaluate on are the ids the model is served with. The teacher
    still sees the prompt as given (it is a black box with its own template). Our own templates have none."""
    side = getattr(tok, "side_files", {})
    tpl = side.get("chat_template.jinja")  # transformers 5 reads this file before tokenizer_config.json's
    if tpl is None and "tokenizer_config.json" in side:
        try:
            tpl = json.loads(side["tokenizer_config.json"]).get("chat_template")
        except json.JSONDecodeError:
            tpl = None
        if isinstance(tpl, list):  # [{"name": "default", "template": ...}, ...]
            tpl = next((t.get("template") for t in tpl if isinstance(t, dict) and t.get("name") == "default"), None)
    return _template_default_system(tpl) if isinstance(tpl, str) else None


def _prompt_pieces(tok, messages: list[dict], fmt: str) -> list:
    eot = _end_of_turn(tok, fmt)  # also validates fmt
    pieces = []
    if fmt == "plain":
        bos = special_ids(tok)["bos"]
        pieces += [] if bos is None else [bos]
        for m in messages:
            pieces += [m["content"], eot] if m["role"] == "assistant" else [m["content"] + "\n"]
    elif fmt == "chatml":
        start = _special(tok, "<|im_start|>", fmt)
        system = default_system(tok)
        if system is not None and messages and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system}] + messages  # as the model's own template does
        for m in messages:
            pieces += [start, f"{m['role']}\n{m['content']}", eot, "\n"]
        pieces += [start, "assistant\n"]
    else:
        sh, eh = _special(tok, "<|start_header_id|>", fmt), _special(tok, "<|end_header_id|>", fmt)
        pieces.append(_special(tok, "<|begin_of_text|>", fmt))
        for m in messages:  # the real Llama 3 template trims each message
            pieces += [sh, m["role"], eh, "\n\n" + m["content"].strip(), eot]
        pieces += [sh, "assistant", eh, "\n\n"]
    return pieces


def _encode_pieces(tok, pieces) -> list[int]:
    ids, text = [], ""
    for p in pieces + [None]:
        if isinstance(p, str):
            text += p
            continue
        if text:
            ids += tok.encode(text, add_special_tokens=False).ids
            text = ""
        if p is not None:
            ids.append(p)
    return ids


def _as_messages(prompt) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def encode_prompt(tok, prompt, fmt: str) -> list[int]:
    """The generation prompt: a string or a list of messages, rendered up to where the response starts."""
    return _encode_pieces(tok, _prompt_pieces(tok, _as_messages(prompt), fmt))


def encode_pair(tok, prompt, response: str, fmt: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for a prompt and its response. labels is IGNORE_INDEX on the prompt and the
    response tokens plus the closing end-of-turn token elsewhere; input_ids starts with encode_prompt."""
    p = encode_prompt(tok, prompt, fmt)
    r = _encode_pieces(tok, [response, _end_of_turn(tok, fmt)])
    return p + r, [IGNORE_INDEX] * len(p) + r


def stop_ids(tok, fmt: str) -> list[int]:
    """Token ids that end a generated response in this format."""
    ids = {_end_of_turn(tok, fmt), special_ids(tok)["eos"]}  # a model may also end a turn with plain eos
    return sorted(ids)


# -------------------------------------------------------------------------- truncation and batching

def truncate(ids: list[int], labels: list[int], max_len: int) -> tuple[list[int], list[int]]:
    """Cut a sequence to max_len, keeping the prompt's end and the response's start (what a response
    token is conditioned on most, and the first response tokens). When both are long each keeps half."""
    if len(ids) <= max_len:
        return ids, labels
    p = next((i for i, y in enumerate(labels) if y != IGNORE_INDEX), len(labels))  # prompt length
    keep_p = min(p, max(max_len - (len(ids) - p), max_len // 2))
    lo, hi = p - keep_p, p + max_len - keep_p
    return ids[lo:hi], labels[lo:hi]


def encode_rows(tok, rows, fmt: str, max_len: int) -> tuple[list[tuple[list[int], list[int]]], int]:
    """Rows -> truncated (input_ids, labels) pairs, and how many were cut (callers print it). Teacher rows
    are masked to their response; plain-text rows ({"text"}, for pretraining) make every token a target."""
    pairs, cut = [], 0
    bos, eos = special_ids(tok)["bos"], special_ids(tok)["eos"]
    for r in rows:
        if "text" in r and "response" not in r:
            ids = ([bos] if bos is not None else []) + tok.encode(r["text"], add_special_tokens=False).ids + [eos]
            labels = list(ids)
        else:
            ids, labels = encode_pair(tok, messages_of(r), r["response"], fmt)
        cut += len(ids) > max_len
        pairs.append(truncate(ids, labels, max_len))
    return pairs, cut


def collate(pairs, pad_id: int, device=None) -> dict:
    """[(ids, labels)] -> input_ids, labels, attention_mask, each LongTensor[B, T], T the longest in the
    batch; right padding (pad_id in the ids, IGNORE_INDEX in the labels, 0 in the mask). With a device
    the tensors are moved there (non_blocking: the copy overlaps the host's next work on CUDA)."""
    T = max(len(ids) for ids, _ in pairs)
    # One array from padded lists per field (numpy builds it from Python ints 4x faster than torch.tensor):
    # a tensor copy per row cost the main job's students several percent of a step.
    input_ids = torch.from_numpy(np.array([list(ids) + [pad_id] * (T - len(ids)) for ids, _ in pairs], np.int64))
    labels = torch.from_numpy(np.array([list(lab) + [IGNORE_INDEX] * (T - len(lab)) for _, lab in pairs], np.int64))
    mask = (torch.arange(T) < torch.tensor([len(ids) for ids, _ in pairs])[:, None]).long()
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": mask}
    if device is not None:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    return batch


def response_mask(labels: torch.Tensor) -> torch.Tensor:
    """bool[B, T-1]: which shifted positions are response targets. Position t predicts token t+1, so
    the logits [:, :-1] line up with labels[:, 1:]."""
    return labels[:, 1:] != IGNORE_INDEX


def length_batches(lengths, batch_size: int) -> list[list[int]]:
    """Sample indices sorted by length (a stable sort: ties keep input order), cut into batches of
    batch_size: for the passes without gradients (evaluation, sampling, reference log-probs, the proxy
    cache), where similar lengths mean little padding. Callers put the results back in input order."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


def batch_order(lengths: list[int], batch_size: int, seed: int, epoch: int = 0, window: int = 50) -> list[list[int]]:
    """One epoch's batches as lists of sample indices, deterministic in (seed, epoch): shuffle, sort by
    length within windows of window·batch_size samples (little padding), then shuffle the batches (no
    short-to-long curriculum). A resumed run skips to batch i of the same list."""
    rng = random.Random(f"batch_order:{seed}:{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    span, batches = window * batch_size, []
    for s in range(0, len(order), span):
        chunk = sorted(order[s:s + span], key=lambda i: lengths[i])
        batches += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


# ------------------------------------------------------------------------------ answers and scoring

# A number: thousands separators only in groups of three ("1,234" but "3,4" is two numbers); a minus
# sign only where it cannot be subtraction ("5-3" ends in 3, "x = -3" in -3).
_NUMBER = re.compile(r"(?:(?<![\w.)])-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def _canon(s: str) -> str:
    d = Decimal(s.replace(",", ""))
    return str(int(d)) if d == d.to_integral_value() else str(d.normalize())


def extract_answer(text: str) -> str | None:
    """The final answer: the number on the last `#### N` line (GSM8K; "$", commas and a final period
    allowed), else the last number in the text; None if there is no number. Canonical: "1,000.0" -> "1000"."""
    if "####" in text:
        tail = text.rsplit("####", 1)[1].split("\n", 1)[0].replace("$", "")
        m = _NUMBER.search(tail)
        if m:
            return _canon(m.group())
    found = _NUMBER.findall(text)
    return _canon(found[-1]) if found else None


def numbers_in(text: str) -> list[str]:
    """Every number in text, in order, canonical ("1,000.0" -> "1000")."""
    return [_canon(m) for m in _NUMBER.findall(text)]


def is_correct(text: str, answer) -> bool:
    """Exact numeric match of text's extracted answer with `answer` (a number, or a solution text)."""
    pred, gold = extract_answer(text), extract_answer(str(answer))
    return pred is not None and gold is not None and Decimal(pred) == Decimal(gold)


# ----------------------------------------------------------------------------------------------- CLI

def parse_fractions(text: str) -> tuple[float, float, float]:
    """"0.1,0.45,0.45" -> (0.1, 0.45, 0.45): three non-negative shares summing to 1 (argparse type)."""
    import argparse
    try:
        parts = tuple(float(x) for x in text.split(","))
    except ValueError:
        parts = ()
    if not fractions_ok(parts):
        raise argparse.ArgumentTypeError(f"expected three non-negative numbers summing to 1 (D_w,D_p,D_s), "
                                         f"got {text!r}")
    return parts


def write_split(teacher_path, out_dir, seed: int, fractions=PAPER_SPLIT):
    """D_w / D_p / D_s (10/45/45 unless `fractions` says otherwise, by a hash of the id and the seed) as three
    JSONL files."""
    rows = read_teacher(teacher_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parts = split_three(rows, seed, fractions)
    for name, part in zip(("D_w", "D_p", "D_s"), parts):
        write_jsonl(out / f"{name}.jsonl", part)
    return [len(p) for p in parts]


def main(argv=None):
    import argparse
    p = argparse.ArgumentParser(description="Split teacher data into D_w/D_p/D_s; check that tokenizers agree.")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("split", help="split teacher responses 10/45/45 into D_w, D_p, D_s")
    s.add_argument("--data", required=True, help="teacher JSONL (teacher_client.py output)")
    s.add_argument("--out", required=True, help="directory for D_w.jsonl, D_p.jsonl, D_s.jsonl")
    s.add_argument("--seed", type=int, default=0, help="split seed")
    s.add_argument("--fractions", type=parse_fractions, default=PAPER_SPLIT,
                   help="shares of D_w, D_p, D_s, comma-separated (default 0.1,0.45,0.45, the paper's)")
    c = sub.add_parser("same-tokenizer", help="exit 2 with one line unless every directory has the same tokenizer")
    c.add_argument("dirs", nargs="+", help="model directories or tokenizer.json files")
    args = p.parse_args(argv)
    try:
        if args.cmd == "same-tokenizer":
            check_same_tokenizer(args.dirs)
            return 0
        n = write_split(args.data, args.out, args.seed, args.fractions)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"split {args.data}: D_w {n[0]}, D_p {n[1]}, D_s {n[2]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
