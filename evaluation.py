"""Evaluation: zero-shot greedy accuracy (the paper's), a stage's report of it, and the proxy's teacher-forced
top-1 agreement with held-out teacher text (the paper's alignment measure).

    python evaluation.py --model runs/seed0/student_proxykd --data runs/world/val.jsonl   # any checkpoint
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import data
import dist
from generate import generate
from model import CheckpointError, Llama
from train import MetricsLog, autocast, fail, keep_freed_memory, pick_device


@torch.no_grad()
def evaluate(model: Llama, tok, rows: list[dict], fmt: str, batch_size: int = 64, max_new_tokens: int = 160,
             desc: str = "eval", progress: bool = True) -> dict:
    """Zero-shot greedy decoding (the paper's evaluation) over rows with an "answer": accuracy by exact match
    of the extracted final number. Prompts are batched by length so padding stays small."""
    from tqdm import tqdm
    was_training = model.training
    model.eval()
    prompts = [data.encode_prompt(tok, data.messages_of(r), fmt) for r in rows]
    stop, pad = data.stop_ids(tok, fmt), data.special_ids(tok)["pad"]
    outputs = [""] * len(rows)
    with autocast(model.device):
        for idx in tqdm(data.length_batches([len(p) for p in prompts], batch_size), desc=desc, disable=not progress,
                        leave=False):
            new = generate(model, [prompts[i] for i in idx], max_new_tokens, eos_id=stop, pad_id=pad)
            for i, toks in zip(idx, new):
                outputs[i] = tok.decode(toks)
    model.train(was_training)
    correct = [data.is_correct(o, r["answer"]) for o, r in zip(outputs, rows)]
    return {"accuracy": sum(correct) / max(1, len(rows)), "correct": sum(correct), "n": len(rows),
            "outputs": outputs, "scores": correct}


def group_key(row: dict) -> str:
    """Which problems count as one piece of evidence: those with the same template (where the row names one) and the
    same numbers in their prompt, in order. The embedded world asks the same arithmetic in other names and objects,
    and a model's wrong answers are wrong arithmetic, so such problems are right or wrong mostly together (seed 0's
    students: 70 % of their wrong answers lie in arithmetic they get wrong in every wording). On data whose prompts
    all differ in their numbers every problem is its own group."""
    text = " ".join(m["content"] for m in data.messages_of(row) if m.get("role") != "assistant")
    return " ".join([str(row.get("template", ""))] + data.numbers_in(text))


def eval_record(res: dict, rows: list[dict]) -> dict:
    """What a stage's eval.json holds: the accuracy, and each problem's 0/1 and group (table.paired_difference)."""
    return {"accuracy": res["accuracy"], "n": res["n"], "correct": [int(c) for c in res["scores"]],
            "groups": [group_key(r) for r in rows]}


def report_eval(model: Llama, tok, fmt: str, args, out: Path, row: dict):
    """Accuracy on --eval after a stage, by greedy generation: logged with `row` and written to out/eval.json with
    every problem's score. Rank 0 evaluates the whole model (gathered under FSDP) while the others wait; returns
    None on them."""
    def measure(m):
        rows = data.read_prompts(args.eval)[: args.eval_limit or None]
        res = evaluate(m, tok, rows, fmt, args.eval_batch_size, args.max_new_tokens, desc=f"eval {row.get('stage', '')}")
        MetricsLog(out, quiet=args.quiet)({**row, "eval_accuracy": res["accuracy"], "eval_n": res["n"]})
        data.atomic_write_text(out / "eval.json", json.dumps(eval_record(res, rows)) + "\n")
        return res["accuracy"]
    return dist.on_main(measure, model)


@torch.no_grad()
def top1_agreement(model: Llama, tok, rows: list[dict], fmt: str, max_len: int, batch_size: int = 32) -> float:
    """The paper's alignment measure: over the teacher's response tokens, how often the model's most likely
    next token is the teacher's token (teacher-forced)."""
    was_training = model.training
    model.eval()
    pairs, _ = data.encode_rows(tok, rows, fmt, max_len)
    pad = data.special_ids(tok)["pad"]
    hit = tot = 0
    with autocast(model.device):
        for s in range(0, len(pairs), batch_size):
            b = data.collate(pairs[s:s + batch_size], pad, model.device)
            mask = data.response_mask(b["labels"])
            h = model(b["input_ids"], attention_mask=b["attention_mask"], return_hidden=True)[:, :-1][mask]
            pred = model.lm_head(h).argmax(-1)
            hit += int((pred == b["input_ids"][:, 1:][mask]).sum())
            tot += int(mask.sum())
    model.train(was_training)
    return hit / max(1, tot)


# ------------------------------------------------------------------------------------------- CLI

def main(argv=None):
    e = argparse.ArgumentParser(description="Greedy-decode an eval file with any checkpoint directory and print its "
                                "accuracy as JSON.")
    e.add_argument("--model", required=True, help="HF-layout checkpoint directory (with tokenizer.json)")
    e.add_argument("--data", required=True, help="JSONL with prompt/messages and answer")
    e.add_argument("--format", default=None, help="chat format: plain, chatml or llama3 (default: from the model dir)")
    e.add_argument("--batch-size", type=int, default=64, help="prompts per generation batch")
    e.add_argument("--max-new-tokens", type=int, default=160, help="generation budget per answer")
    e.add_argument("--limit", type=int, default=0, help="score only the first N rows (0: all)")
    e.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto")
    e.add_argument("--out", default=None, help="write the generations with their scores to this JSONL")
    e.add_argument("--record", default=None,
                   help="write the eval record (accuracy, each problem's score and group) to this JSON, as a stage's "
                        "eval.json: `table.py compare` takes two")
    args = e.parse_args(argv)
    keep_freed_memory()
    try:
        device = pick_device(args.device)
        tok = data.load_tokenizer(args.model)
        model = Llama.from_pretrained(args.model, device=device).eval()
        rows = data.read_prompts(args.data)
        rows = rows[:args.limit] if args.limit else rows
        if any("answer" not in r for r in rows):
            fail(f"{args.data}: every row needs an \"answer\" to be scored")
        fmt = args.format or data.guess_format(args.model)
        res = evaluate(model, tok, rows, fmt, args.batch_size, args.max_new_tokens)
    except (CheckpointError, data.DataError) as err:
        fail(str(err))
    if args.out:
        data.write_jsonl(args.out, [{**r, "output": o, "correct": c}
                                    for r, o, c in zip(rows, res["outputs"], res["scores"])])
    if args.record:
        data.atomic_write_text(args.record, json.dumps(eval_record(res, rows)) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k not in ("outputs", "scores")}))


if __name__ == "__main__":
    main()
