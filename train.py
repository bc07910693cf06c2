"""What both training stages share: device and precision, model set-up, the LR schedule, one flat
optimisation loop with token-normalised accumulation, atomic checkpoints with bit-identical resume,
the metrics log, and evaluation by generation.

    python train.py eval --model runs/x/student --data runs/world/eval.jsonl   # accuracy of any checkpoint
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

import data
from model import PRESETS, CheckpointError, Config, Llama, apply_lora, generate, lora_state_dict, token_logprobs


# ------------------------------------------------------------------------------------ device, model

def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast(device: torch.device):
    """The one place precision is decided: bf16 autocast over fp32 master weights on CUDA, plain fp32 on
    CPU. Losses upcast to fp32 themselves (log-softmax, KL and DPO log-probs)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def maybe_compile(model: Llama, device: torch.device, flag: bool | None):
    """The module to run forward passes with. The uncompiled `model` stays the one that is saved,
    evaluated and used for generation, so checkpoints never carry `_orig_mod.` prefixes."""
    if flag is None:
        flag = device.type == "cuda"
    return torch.compile(model) if flag else model


def load_model(init: str, tok, device, seed: int = 0, lora_rank: int = 0, lora_alpha: float | None = None,
               lora_targets=None) -> Llama:
    """An HF directory, or a named size from model.PRESETS initialised at random from `seed`."""
    vocab = tok.get_vocab_size()
    if init in PRESETS:
        ids = data.special_ids(tok)
        cfg = Config.preset(init, vocab, bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"])
        model = Llama(cfg).init_weights(seed=seed)
    elif Path(init, "config.json").exists():
        model = Llama.from_pretrained(init)
    else:
        raise CheckpointError(f"--init {init}: neither an HF directory with config.json nor a size in {sorted(PRESETS)}")
    if vocab > model.cfg.vocab_size:
        raise CheckpointError(f"{init}: tokenizer has {vocab} tokens but the embedding has only "
                              f"{model.cfg.vocab_size} rows")
    model.to(device)
    if lora_rank:
        kw = {"targets": lora_targets} if lora_targets else {}
        apply_lora(model, lora_rank, lora_alpha or 2 * lora_rank, seed=seed, **kw)
    return model


# ----------------------------------------------------------------------------------- optimisation

def lr_at(step: int, total: int, lr: float, schedule: str = "constant", warmup: int = 0,
          min_ratio: float = 0.1) -> float:
    """Pure function of the step: linear warm-up, then constant (the paper) or cosine to min_ratio·lr."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    progress = (step - warmup) / max(1, total - warmup)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def make_optimizer(model: Llama, lr: float, weight_decay: float, device) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters (the LoRA adapters only, under LoRA); weight decay on matrices
    only, as in nanoGPT. Fused kernel on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")


def plan_windows(lengths: list[int], batch_size: int, grad_accum: int, epochs: float, seed: int):
    """Optimizer steps as windows of batch_size·grad_accum samples, each split into grad_accum micro-batches.

    The window, not the micro-batch, is what the seed shuffles, so batch 8 × 1 step and batch 2 × 4 steps
    see the same samples per optimizer step and (with token-normalised losses) take the same step.
    Returns list[window][micro-batch] -> sample indices; resuming at step s is `windows[s:]`."""
    window_size = batch_size * grad_accum
    windows = []
    for epoch in range(max(1, math.ceil(epochs))):
        windows += data.batch_order(lengths, window_size, seed=seed, epoch=epoch)
    n_keep = max(1, round(epochs * math.ceil(len(lengths) / window_size)))
    plan = []
    for w in windows[:n_keep]:
        w = sorted(w, key=lambda i: lengths[i])  # similar lengths share a micro-batch: less padding
        plan.append([w[i:i + batch_size] for i in range(0, len(w), batch_size)])
    return plan


def fit(model: Llama, fwd, opt, windows, batch_fn, loss_fn, norm_fn, args, *, device, start_step: int = 0,
        log=None, save=None, tag: str = "train", stop_after: int | None = None):
    """The one training loop. For each optimizer step: the window's normalisers (token and pair counts of
    all its micro-batches, so the loss is a mean over the window whatever the split), forward/backward each
    micro-batch, clip, step, zero. `.item()` only on log steps. `save(step)` runs every --save-every steps
    and at the end; `--stop-after N` returns after step N (for resume tests and budgets).

    loss_fn(fwd, batch, norm) -> (loss, {name: detached tensor}) where loss is already divided by the
    window's normaliser; metric tensors are summed over the window's micro-batches."""
    amp = autocast(device)
    total = len(windows)
    t0, n_tok = time.time(), 0
    if stop_after is None:
        stop_after = getattr(args, "stop_after", None)
    for step in range(start_step, total):
        lr = lr_at(step, total, args.lr, args.lr_schedule, args.warmup_steps, args.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        norm = norm_fn(windows[step])
        sums: dict[str, torch.Tensor] = {}
        for mb in windows[step]:
            batch = batch_fn(mb)
            with amp:
                loss, metrics = loss_fn(fwd, batch, norm)
            loss.backward()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0) + v.detach()
            n_tok += int(batch["attention_mask"].sum()) if "attention_mask" in batch else 0
        grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                                   args.grad_clip if args.grad_clip > 0 else float("inf"))
        opt.step()
        opt.zero_grad(set_to_none=True)
        last = step + 1 == total or step + 1 == stop_after
        if log is not None and ((step + 1) % args.log_every == 0 or last):
            dt = time.time() - t0
            row = {"stage": tag, "step": step + 1, "steps": total, "lr": lr, "grad_norm": float(grad_norm),
                   **{k: float(v) for k, v in sums.items()}, "tok_per_s": n_tok / max(dt, 1e-9)}
            log(row)
            t0, n_tok = time.time(), 0
        if save is not None and (last or (args.save_every and (step + 1) % args.save_every == 0)):
            save(step + 1)
        if step + 1 == stop_after:
            return step + 1
    return total


# --------------------------------------------------------------------------------- samples, stages

class Seq:
    """One training sequence: token ids and unshifted labels (IGNORE_INDEX where no loss is taken)."""
    __slots__ = ("ids", "labels", "n_targets")

    def __init__(self, ids: list[int], labels: list[int]):
        self.ids, self.labels = ids, labels
        self.n_targets = sum(1 for t in labels[1:] if t != data.IGNORE_INDEX)


def add_train_args(p: argparse.ArgumentParser, lr: float = 1e-5, batch_size: int = 16):
    """The optimisation flags every stage shares (defaults: the paper's Adam at constant lr 1e-5, 1 epoch)."""
    g = p.add_argument_group("training")
    g.add_argument("--out", required=True, help="output directory (final HF-layout model, checkpoint/, metrics.jsonl)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the forward (default: on for CUDA, off for CPU)")
    g.add_argument("--batch-size", type=int, default=batch_size, help="sequences per micro-batch")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--epochs", type=float, default=1.0, help="passes over the data (fractions allowed)")
    g.add_argument("--lr", type=float, default=lr, help="peak learning rate")
    g.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant", help="after warm-up")
    g.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up steps")
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine floor as a fraction of --lr")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay on matrices")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max global grad norm (0: off)")
    g.add_argument("--max-len", type=int, default=1024, help="max tokens per sequence (prompt end + response start kept)")
    g.add_argument("--lora-rank", type=int, default=0, help="LoRA rank (0: train all weights)")
    g.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default 2 x rank)")
    g.add_argument("--seed", type=int, default=0, help="seeds init, data order and sampling")
    g.add_argument("--log-every", type=int, default=10, help="optimizer steps between log lines")
    g.add_argument("--save-every", type=int, default=0, help="optimizer steps between checkpoints (0: at the end)")
    g.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    g.add_argument("--stop-after", type=int, default=None, help="stop after this optimizer step (a budget, or to test resume)")
    g.add_argument("--quiet", action="store_true", help="no per-step lines on stdout (metrics.jsonl still written)")
    return g


def batch_fn_for(samples: list[Seq], pad_id: int, device):
    def batch_fn(idx):
        b = data.collate([(samples[i].ids, samples[i].labels) for i in idx], pad_id)
        return {k: v.to(device, non_blocking=True) for k, v in b.items()}
    return batch_fn


def check_fresh_or_resume(out_dir: Path, resume: bool):
    """Never train over a run's checkpoint by accident: that would lose it."""
    ck = find_checkpoint(Path(out_dir) / "checkpoint")
    if ck is not None and not resume:
        fail(f"{ck} exists: pass --resume to continue that run, or choose another --out")
    return ck if resume else None


def train_stage(model: Llama, samples: list[Seq], loss_fn, norm_fn, args, tok, device, tag: str,
                batch_fn=None, log=None) -> bool:
    """Plan, resume, run and save one single-pass stage (SFT, pretraining, distillation). Returns True when
    the stage finished (False when --stop-after cut it short)."""
    out = Path(args.out)
    ck = check_fresh_or_resume(out, args.resume)
    windows = plan_windows([len(s.ids) for s in samples], args.batch_size, args.grad_accum, args.epochs, args.seed)
    opt = make_optimizer(model, args.lr, args.weight_decay, device)
    start = 0
    if ck is not None:
        st = load_train_state(ck)
        if st.get("stage") != tag:
            fail(f"{ck}: checkpoint of stage {st.get('stage')!r}, this run is {tag!r}")
        restore_weights(model, ck)
        opt.load_state_dict(st["optimizer"])
        set_rng_state(st["rng"])
        start = st["step"]
        print(f"resumed {tag} from {ck} at step {start}/{len(windows)}", flush=True)
    log = log or MetricsLog(out, resume_from={"stage": tag, "step": start} if ck else None, quiet=args.quiet)
    fwd = maybe_compile(model, device, args.compile)
    batch_fn = batch_fn or batch_fn_for(samples, data.special_ids(tok)["pad"], device)

    def save(step):
        save_checkpoint(out / "checkpoint", model, opt, tok, {"stage": tag, "step": step})

    done = fit(model, fwd, opt, windows, batch_fn, loss_fn, norm_fn, args, device=device, start_step=start,
               log=log, save=save, tag=tag)
    if done < len(windows):
        return False
    model.save_pretrained(out)
    data.save_tokenizer(tok, out)
    return True


# ------------------------------------------------------------------------------------- the losses

def nll_window_norm(samples):
    """Normaliser for masked NLL: the number of label tokens in the window (shifted, so the first token of a
    sequence is never a target)."""
    def norm(window):
        return {"tokens": max(1, sum(samples[i].n_targets for mb in window for i in mb))}
    return norm


def nll_sum(fwd, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of -log p over the label tokens of a batch, and their count (both fp32 scalars)."""
    mask = batch["labels"][:, 1:] != data.IGNORE_INDEX
    lp = token_logprobs(fwd, batch["input_ids"], batch["attention_mask"], mask=mask)
    return -(lp * mask).sum(), mask.sum().float()


def nll_loss_fn(fwd, batch, norm):
    s, n = nll_sum(fwd, batch)
    return s / norm["tokens"], {"nll": s / norm["tokens"], "tokens": n}


# ------------------------------------------------------------------------------------ checkpoints

def rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "python": _pystate_to_list(random.getstate())}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict):
    torch.set_rng_state(st["torch"])
    v, state, gauss = st["python"]
    random.setstate((v, tuple(state), gauss))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _pystate_to_list(s):
    return [s[0], list(s[1]), s[2]]


def save_checkpoint(ckpt: Path, model: Llama, opt, tok, state: dict):
    """Write a complete checkpoint directory — HF-layout weights (LoRA merged), the adapters alone when
    LoRA is on, tokenizer.json, and train_state.pt (optimizer, RNG, step, data position, stage state) —
    under a temporary name, then swap it in. A kill at any moment leaves `ckpt` or `ckpt.old` whole."""
    from safetensors.torch import save_file
    ckpt = Path(ckpt)
    tmp, old = ckpt.with_name(ckpt.name + ".tmp"), ckpt.with_name(ckpt.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    data.save_tokenizer(tok, tmp)
    adapters = lora_state_dict(model)
    if adapters:
        save_file({k: v.detach().cpu().contiguous() for k, v in adapters.items()}, str(tmp / "adapter.safetensors"))
    torch.save({**state, "optimizer": opt.state_dict() if opt is not None else None, "rng": rng_state()},
               tmp / "train_state.pt")
    _fsync_dir(tmp)
    if ckpt.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(ckpt, old)
    os.replace(tmp, ckpt)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(ckpt: Path) -> Path | None:
    """The newest complete checkpoint: `ckpt`, or `ckpt.old` when a kill hit between the two renames."""
    for c in (Path(ckpt), Path(str(ckpt) + ".old")):
        if (c / "train_state.pt").exists():
            return c
    return None


def load_train_state(ckpt: Path) -> dict:
    # weights_only: our own state holds tensors, numbers, strings, lists and dicts, never arbitrary objects.
    return torch.load(Path(ckpt) / "train_state.pt", map_location="cpu", weights_only=True)


def restore_weights(model: Llama, ckpt: Path):
    """Put a checkpoint's trainable weights back into a model built the same way (adapters under LoRA,
    else every weight)."""
    from safetensors.torch import load_file
    ckpt = Path(ckpt)
    if (ckpt / "adapter.safetensors").exists():
        sd = load_file(str(ckpt / "adapter.safetensors"))
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if unexpected or len(sd) != len(lora_state_dict(model)):
            raise CheckpointError(f"{ckpt}/adapter.safetensors does not match the model's LoRA adapters "
                                  f"(unexpected {unexpected[:1]}, {len(sd)} vs {len(lora_state_dict(model))} tensors)")
        return
    src = Llama.from_pretrained(ckpt, device=model.device)
    with torch.no_grad():
        for (k, p), (k2, q) in zip(model.state_dict().items(), src.state_dict().items()):
            assert k == k2, (k, k2)
            p.copy_(q)


def fsync_file(path: Path):
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(d: Path):
    for f in Path(d).iterdir():
        if f.is_file():
            fsync_file(f)


class MetricsLog:
    """metrics.jsonl (one JSON object a line, flushed) plus one printed line per log step. On resume, rows
    of the same stage past the resumed step are dropped so the file reads as one uninterrupted run."""

    def __init__(self, out_dir: Path, resume_from: dict | None = None, quiet: bool = False):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.quiet = quiet
        if resume_from is not None and self.path.exists():
            keep = []
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a torn last line from a kill
                if not _is_after(row, resume_from):
                    keep.append(line)
            data.atomic_write_text(self.path, "".join(k + "\n" for k in keep))

    def __call__(self, row: dict):
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if not self.quiet:
            skip = {"stage", "step", "steps"}
            parts = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items() if k not in skip]
            head = f"{row.get('stage', '')} step {row['step']}/{row['steps']}" if "step" in row else row.get("stage", "")
            print(f"{head} | " + " | ".join(parts), flush=True)


def _is_after(row: dict, pos: dict) -> bool:
    """True when a metrics row was logged after the position a resume restarts from."""
    rnd, stage_order = pos.get("round", 0), pos.get("stage_order", [])
    r_rnd = row.get("round", 0)
    if r_rnd != rnd:
        return r_rnd > rnd
    if row.get("stage") == pos.get("stage"):
        return row.get("step", 0) > pos.get("step", 0)
    if row.get("stage") in stage_order and pos.get("stage") in stage_order:
        return stage_order.index(row["stage"]) > stage_order.index(pos["stage"])
    return False


def write_args(out_dir: Path, args, extra: dict | None = None):
    d = {k: v for k, v in vars(args).items() if not callable(v)}
    data.atomic_write_text(Path(out_dir) / "args.json", json.dumps({**d, **(extra or {})}, indent=2, default=str) + "\n")


# -------------------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model: Llama, tok, rows: list[dict], fmt: str, batch_size: int = 64, max_new_tokens: int = 160,
             desc: str = "eval", progress: bool = True) -> dict:
    """Zero-shot greedy decoding (the paper's evaluation) over rows with an "answer": accuracy by exact match
    of the extracted final number. Prompts are batched by length so padding stays small."""
    from tqdm import tqdm
    was_training = model.training
    model.eval()
    prompts = [data.encode_prompt(tok, data.messages_of(r), fmt) for r in rows]
    order = sorted(range(len(rows)), key=lambda i: len(prompts[i]))
    stop, pad = data.stop_ids(tok, fmt), data.special_ids(tok)["pad"]
    outputs = [""] * len(rows)
    with autocast(model.device):
        for s in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, leave=False):
            idx = order[s:s + batch_size]
            new = generate(model, [prompts[i] for i in idx], max_new_tokens, eos_id=stop, pad_id=pad)
            for i, toks in zip(idx, new):
                outputs[i] = tok.decode(toks)
    model.train(was_training)
    correct = [data.is_correct(o, r["answer"]) for o, r in zip(outputs, rows)]
    return {"accuracy": sum(correct) / max(1, len(rows)), "correct": sum(correct), "n": len(rows),
            "outputs": outputs}


@torch.no_grad()
def top1_agreement(model: Llama, tok, rows: list[dict], fmt: str, max_len: int, batch_size: int = 32) -> float:
    """The paper's alignment measure: over the teacher's response tokens, how often the model's most likely
    next token is the teacher's token (teacher-forced)."""
    was_training = model.training
    model.eval()
    pairs = [data.encode_pair(tok, data.messages_of(r), r["response"], fmt) for r in rows]
    pairs = [data.truncate(ids, labels, max_len) for ids, labels in pairs]
    pad = data.special_ids(tok)["pad"]
    hit = tot = 0
    with autocast(model.device):
        for s in range(0, len(pairs), batch_size):
            b = {k: v.to(model.device) for k, v in data.collate(pairs[s:s + batch_size], pad).items()}
            mask = b["labels"][:, 1:] != data.IGNORE_INDEX
            h = model(b["input_ids"], attention_mask=b["attention_mask"], return_hidden=True)[:, :-1][mask]
            pred = model.lm_head(h).argmax(-1)
            hit += int((pred == b["input_ids"][:, 1:][mask]).sum())
            tot += int(mask.sum())
    model.train(was_training)
    return hit / max(1, tot)


# ------------------------------------------------------------------------------------------- CLI

def fail(msg: str, code: int = 2):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(code)


def main(argv=None):
    p = argparse.ArgumentParser(description="Shared training utilities; `eval` scores any checkpoint directory.")
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("eval", help="greedy-decode an eval file with a checkpoint and report accuracy")
    e.add_argument("--model", required=True, help="HF-layout checkpoint directory (with tokenizer.json)")
    e.add_argument("--data", required=True, help="JSONL with prompt/messages and answer")
    e.add_argument("--format", default=None, help="chat format: plain, chatml or llama3 (default: from the model dir)")
    e.add_argument("--batch-size", type=int, default=64, help="prompts per generation batch")
    e.add_argument("--max-new-tokens", type=int, default=160, help="generation budget per answer")
    e.add_argument("--limit", type=int, default=0, help="score only the first N rows (0: all)")
    e.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto")
    e.add_argument("--out", default=None, help="write the generations with their scores to this JSONL")
    args = p.parse_args(argv)
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
        data.write_jsonl(args.out, [{**r, "output": o, "correct": data.is_correct(o, r["answer"])}
                                    for r, o in zip(rows, res["outputs"])])
    print(json.dumps({k: v for k, v in res.items() if k != "outputs"}))


if __name__ == "__main__":
    main()
