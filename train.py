"""What both training stages share: device and precision, model set-up, the LR schedule, one flat
optimisation loop with token-normalised accumulation, atomic checkpoints with bit-identical resume,
the metrics log and the stages' wall-time record. Evaluation is `evaluation.py`."""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

import data
import dist
from model import PRESETS, CheckpointError, Config, Llama, apply_lora, lora_state_dict, token_logprobs


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
    only, as in nanoGPT. Fused kernel on CUDA; elsewhere the foreach form, which on CPU runs the same per-tensor
    kernels as torch's default for-loop (the same weights to the bit) with less Python per step."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8,
                             fused=device.type == "cuda", foreach=device.type != "cuda")


def plan_windows(lengths: list[int], batch_size: int, grad_accum: int, epochs: float, seed: int):
    """Optimizer steps as windows of batch_size·grad_accum samples, each split into grad_accum micro-batches.

    The window, not the micro-batch, is what the seed shuffles, so batch 8 × 1 step and batch 2 × 4 steps
    see the same samples per optimizer step and (with token-normalised losses) take the same step.
    Under torchrun, pass grad_accum × the number of ranks: every rank plans the same global windows and `fit`
    gives each rank its share of every window's micro-batches, so N ranks take the steps one process would.
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


@dataclass
class Stage:
    """What a stage hands the loop: its optimizer steps, how to build and score a micro-batch, and where its
    rows and checkpoints go."""
    tag: str                        # "sft", "align", "distill": the `stage` of its metrics rows
    windows: list                   # plan_windows(...): [step][micro-batch] -> sample indices
    batch_fn: Callable              # micro-batch indices -> dict of tensors on the device
    norm_fn: Callable               # window -> its normalisers ({"tokens": n, ...}), counted over the whole window
    loss_fn: Callable               # (fwd, batch, norm) -> (loss already / the window's normaliser, {name: tensor})
    log: Callable                   # row -> None, on log steps (every rank calls it; MetricsLog writes on rank 0)
    save: Callable                  # step -> None: a checkpoint every --save-every steps and at the end
    stop_after: int | None = None   # return after this step (--stop-after: a budget, or to test resume)


def fit(model: Llama, fwd, opt, stage: Stage, args, device, start: int = 0) -> int:
    """The one training loop, from step `start` (0, or where a resume picks up) to the last window or
    stage.stop_after; returns the number of steps done. Each optimizer step: set the LR, forward and backward
    every micro-batch of the window, clip, step, zero. Every micro-batch's loss is divided by the normalisers of
    its whole window, so the step is the same however the window is split. `.item()` only on log steps.

    `model` is the uncompiled module (its parameters are clipped and saved), `fwd` what dist.wrap made of it
    (the forwards run through it). Under torchrun the windows are global (see plan_windows) and each rank runs
    its share of every window (dist.share_window); the normalisers still come from the whole window (every
    rank knows every sample's length: no communication), and the logged sums are added over ranks."""
    total = len(stage.windows)
    t0, n_tok = time.time(), 0
    for step in range(start, total):
        lr = lr_at(step, total, args.lr, args.lr_schedule, args.warmup_steps, args.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        sums, tokens = accumulate(model, fwd, stage, stage.windows[step], device)
        n_tok += tokens
        grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                                   args.grad_clip if args.grad_clip > 0 else float("inf"))
        opt.step()
        opt.zero_grad(set_to_none=True)
        last = step + 1 in (total, stage.stop_after)
        if (step + 1) % args.log_every == 0 or last:
            grad_norm = float(dist.full_tensor(grad_norm))  # a DTensor under FSDP: the same global norm on every rank
            totals = dist.sum_over_ranks({**{k: float(v) for k, v in sums.items()}, "tok_per_s": n_tok}, device)
            totals["tok_per_s"] /= max(time.time() - t0, 1e-9)
            stage.log({"stage": stage.tag, "step": step + 1, "steps": total, "lr": lr, "grad_norm": grad_norm,
                       **totals})
            t0, n_tok = time.time(), 0
        if last or (args.save_every and (step + 1) % args.save_every == 0):
            stage.save(step + 1)
        if last:
            return step + 1
    return total


def accumulate(model: Llama, fwd, stage: Stage, window: list, device) -> tuple[dict, int]:
    """Forward and backward over this process's micro-batches of one window (all of them with one process),
    the gradients adding up in .grad. Returns the metrics summed over the micro-batches and the tokens seen."""
    norm = stage.norm_fn(window)
    mine = dist.share_window(window)
    sums, n_tok = {}, 0
    for i, (mb, real) in enumerate(mine):
        batch = stage.batch_fn(mb)
        with dist.grad_sync(fwd, model, last=i + 1 == len(mine)):
            with autocast(device):
                loss, metrics = stage.loss_fn(fwd, batch, norm)
            dist.backward(loss, real)
        for k, v in metrics.items():  # a filler's metrics count 0, but every rank must hold the same keys
            sums[k] = sums.get(k, 0) + (v.detach() if real else 0 * v.detach())
        if real and "attention_mask" in batch:
            n_tok += int(batch["attention_mask"].sum())
    return sums, n_tok


# --------------------------------------------------------------------------------- samples, stages

class Seq:
    """One training sequence: token ids and unshifted labels (IGNORE_INDEX where no loss is taken)."""
    __slots__ = ("ids", "labels", "n_targets")

    def __init__(self, ids: list[int], labels: list[int]):
        self.ids, self.labels = ids, labels
        self.n_targets = sum(1 for t in labels[1:] if t != data.IGNORE_INDEX)


def collate_seqs(seqs: list[Seq], pad_id: int, device=None) -> dict:
    """data.collate of Seqs: input_ids, labels, attention_mask [B, T] on `device`."""
    return data.collate([(s.ids, s.labels) for s in seqs], pad_id, device)


def encode_seqs(tok, rows, fmt: str, max_len: int) -> tuple[list[Seq], int]:
    """Training sequences from rows: teacher rows masked to the response, {"text"} rows whole; and how many
    were cut to max_len."""
    pairs, cut = data.encode_rows(tok, rows, fmt, max_len)
    return [Seq(ids, labels) for ids, labels in pairs], cut


def stage_setup(args, rows: list[dict] | None = None):
    """What a training stage starts from: (device, tokenizer, chat format, rows, training sequences, model).
    rows: teacher rows or {"text"} rows (default: --data's teacher responses); --init a directory or a size."""
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    tok, fmt = tokenizer_and_format(args, args.init)
    rows = teacher_rows(args.data, getattr(args, "keep_unfinished", False)) if rows is None else rows
    seqs, cut = encode_seqs(tok, rows, fmt, args.max_len)
    if cut:
        dist.print0(f"{args.data}: {cut} of {len(seqs)} sequences cut to --max-len {args.max_len}")
    model = load_model(args.init, tok, dist.load_device(args, device), seed=args.seed, lora_rank=args.lora_rank,
                       lora_alpha=args.lora_alpha)
    return device, tok, fmt, rows, seqs, model


def teacher_rows(path, keep_unfinished: bool = False) -> list[dict]:
    """The usable teacher responses of a file (finished ones, unless keep_unfinished); none at all is an error."""
    rows = data.read_teacher(path, keep_unfinished)
    if not rows:
        fail(f"{path}: no usable teacher responses")
    return rows


def tokenizer_and_format(args, model_dir: str):
    """The tokenizer (--tokenizer, else model_dir's) and the chat format (--format, else model_dir's, else
    plain for a named size)."""
    src = args.tokenizer or model_dir
    try:
        tok = data.load_tokenizer(src)
    except Exception as e:  # tokenizers raises plain Exceptions for bad files, OSError for missing ones
        fail(f"{src}: cannot load a tokenizer ({e}); pass --tokenizer for a named size")
    fmt = args.format or (data.guess_format(model_dir) if Path(model_dir).is_dir() else "plain")
    return tok, fmt


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
    g.add_argument("--dist", choices=["none", "ddp", "fsdp"], default="none",
                   help="under torchrun: ddp (model replicated on every rank) or fsdp (FSDP2, sharded per block); "
                        "--batch-size stays per rank, so a step takes batch-size x grad-accum x ranks samples")
    return g


def add_eval_args(p, when: str, budget: str = "generation budget for evaluation"):
    """The evaluation flags of every training script (accuracy by greedy decoding `when`)."""
    p.add_argument("--eval", default=None, help=f"JSONL of prompts with answers: accuracy {when}")
    p.add_argument("--eval-limit", type=int, default=0, help="score only the first N eval rows (0: all)")
    p.add_argument("--eval-batch-size", type=int, default=64, help="prompts per evaluation generation batch")
    p.add_argument("--max-new-tokens", type=int, default=160, help=budget)


def batch_fn_for(samples: list[Seq], pad_id: int, device):
    def batch_fn(idx):
        return collate_seqs([samples[i] for i in idx], pad_id, device)
    return batch_fn


def check_fresh_or_resume(out_dir: Path, resume: bool):
    """Never train over a run's checkpoint by accident: that would lose it."""
    ck = find_checkpoint(Path(out_dir) / "checkpoint")
    if ck is not None and not resume:
        fail(f"{ck} exists: pass --resume to continue that run, or choose another --out")
    return ck if resume else None


def train_stage(model: Llama, samples: list[Seq], loss_fn, args, tok, device, tag: str, batch_fn=None) -> bool:
    """Plan, resume, run and save one single-pass stage (SFT, pretraining, distillation) whose loss is
    normalised by the window's response tokens (nll_window_norm). batch_fn defaults to collating the samples.
    Returns True when the stage finished (False when --stop-after cut it short)."""
    out = Path(args.out)
    ck = check_fresh_or_resume(out, args.resume)
    window = args.batch_size * args.grad_accum * dist.n_ranks()
    windows = plan_windows([len(s.ids) for s in samples], args.batch_size, args.grad_accum * dist.n_ranks(),
                           args.epochs, args.seed)
    st = None
    if ck is not None:
        st = load_train_state(ck)
        if st.get("stage") != tag:
            fail(f"{ck}: checkpoint of stage {st.get('stage')!r}, this run is {tag!r}")
        check_window(st, window, ck)
        restore_weights(model, ck)
    fwd = dist.wrap(model, args, device)
    opt = make_optimizer(model, args.lr, args.weight_decay, device)
    start = 0
    if st is not None:
        dist.load_optimizer_state(model, opt, st, ck)
        set_rng_state(st["rng"])
        start = st["step"]
        dist.print0(f"resumed {tag} from {ck} at step {start}/{len(windows)}")
    log = MetricsLog(out, resume_from={"stage": tag, "step": start} if ck else None, quiet=args.quiet)

    def save(step):
        save_checkpoint(out / "checkpoint", model, opt, tok, {"stage": tag, "step": step, "window": window})

    stage = Stage(tag, windows, batch_fn or batch_fn_for(samples, data.special_ids(tok)["pad"], device),
                  nll_window_norm(samples), loss_fn, log, save, stop_after=args.stop_after)
    if fit(model, fwd, opt, stage, args, device, start) < len(windows):
        return False
    save_model(model, out, tok)
    return True


def check_window(st: dict, window: int, ck: Path):
    """A resumed run must cut the data into the same global windows: batch-size x grad-accum x ranks may be
    regrouped (2 ranks x batch 4 resumes as 1 process x batch 8), not changed."""
    if st.get("window", window) != window:
        fail(f"{ck}: written by a run taking {st['window']} samples a step; this one takes {window} "
             f"(--batch-size x --grad-accum x ranks): resume with the same product")


# ------------------------------------------------------------------------------------- the losses

def nll_window_norm(samples):
    """Normaliser for masked NLL: the number of label tokens in the window (shifted, so the first token of a
    sequence is never a target)."""
    def norm(window):
        return {"tokens": max(1, sum(samples[i].n_targets for mb in window for i in mb))}
    return norm


def nll_sum(fwd, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of -log p over the label tokens of a batch, and their count (both fp32 scalars)."""
    mask = data.response_mask(batch["labels"])
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
    under a temporary name, then swap it in. A kill at any moment leaves `ckpt` or `ckpt.old` whole.

    Every rank calls it and rank 0 writes. Under FSDP the full optimizer state (keyed by parameter name) and
    the full weights are gathered to rank 0 first, so the checkpoint is the same HF directory as on one
    device and resumes at any number of ranks."""
    osd = dist.optimizer_state(model, opt)
    dist.on_main(lambda plain: _write_checkpoint(Path(ckpt), plain, tok, {**state, **osd, "rng": rng_state()}),
                 model, device="cpu")


def _write_checkpoint(ckpt: Path, plain: Llama, tok, train_state: dict):
    from safetensors.torch import save_file
    tmp, old = ckpt.with_name(ckpt.name + ".tmp"), ckpt.with_name(ckpt.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    data.save_tokenizer(tok, tmp)
    adapters = lora_state_dict(plain)
    if adapters:
        save_file({k: v.detach().cpu().contiguous() for k, v in adapters.items()}, str(tmp / "adapter.safetensors"))
    torch.save(train_state, tmp / "train_state.pt")
    _fsync_dir(tmp)
    if ckpt.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(ckpt, old)
    os.replace(tmp, ckpt)
    shutil.rmtree(old, ignore_errors=True)


def save_model(model: Llama, path: Path, tok):
    """The HF-layout model and tokenizer.json (every rank calls it: FSDP gathers; rank 0 writes)."""
    def write(plain):
        plain.save_pretrained(path)
        data.save_tokenizer(tok, path)
    dist.on_main(write, model, device="cpu")


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


def _fsync_dir(d: Path):
    for f in Path(d).iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


class MetricsLog:
    """metrics.jsonl (one JSON object a line, flushed) plus one printed line per log step. On resume, rows
    of the same stage past the resumed step are dropped so the file reads as one uninterrupted run."""

    def __init__(self, out_dir: Path, resume_from: dict | None = None, quiet: bool = False):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.quiet = quiet
        self.on = dist.is_main()  # under torchrun only rank 0 writes (the rows already hold sums over ranks)
        if not self.on:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
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
        if not self.on:
            return
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
    if not dist.is_main():
        return
    d = {k: v for k, v in vars(args).items() if not callable(v)}
    d["world_size"] = dist.n_ranks()
    data.atomic_write_text(Path(out_dir) / "args.json", json.dumps({**d, **(extra or {})}, indent=2, default=str) + "\n")


# ------------------------------------------------------------------------------------- wall time

TIMING_FILE = "timing.json"


_setup_recorded = False


@contextmanager
def timed(out_dir, phase: str, setup: str = "setup"):
    """Wall seconds of the block, kept as {phase: seconds} in OUT/timing.json beside the stage's other
    outputs; `table.py summary` gathers every stage's file into the run's breakdown. Phases of one
    stage share the file ("train", "eval", "round_01/sample", ...). A phase run again (a resumed stage)
    keeps the seconds of its last run; a block that raises records nothing. Rank 0 writes.

    The first block of a process also records, as `setup`, the seconds from the process's start to the
    block (interpreter, imports, reading data, building the model): a few seconds per stage that no
    phase would count otherwise."""
    global _setup_recorded
    if not _setup_recorded:
        _setup_recorded = True
        age = process_age()
        if age is not None:
            record_time(out_dir, setup, age)
    t0 = time.perf_counter()
    yield
    record_time(out_dir, phase, time.perf_counter() - t0)


def process_age() -> float | None:
    """Seconds since this process started (Linux /proc; None elsewhere)."""
    try:
        # /proc/self/stat: "pid (comm) state ..."; starttime, field 22, in clock ticks after boot
        start = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def record_time(out_dir, phase: str, seconds: float):
    if not dist.is_main():
        return
    path = Path(out_dir) / TIMING_FILE
    phases = read_timing(path)
    phases[phase] = round(seconds, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    data.atomic_write_text(path, json.dumps(phases, indent=2) + "\n")


def read_timing(path) -> dict[str, float]:
    """A stage's {phase: seconds} in the order the phases first ran; {} if the file is missing or torn."""
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return {k: float(v) for k, v in d.items() if isinstance(v, (int, float))} if isinstance(d, dict) else {}


# ------------------------------------------------------------------------------------------- CLI

def fail(msg: str, code: int = 2):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(code)


HEAP_KEEP_BYTES = 32 << 20  # glibc's largest mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)


def keep_freed_memory() -> bool:
    """Let the process keep the memory it frees (glibc only; elsewhere nothing happens) -> whether it was set.

    PyTorch has no caching allocator on the CPU: every tensor is a malloc, every free a free. glibc serves a
    block above its mmap threshold (128 KiB, raised as such blocks come and go) with a fresh mmap and hands it
    back to the kernel on free, so the next step's tensor of the same size faults its pages in again, zeroed by
    the kernel: a training step of the embedded student allocates a dozen [N, V] and [B, T, C] fp32 tensors of
    0.1-2 MB each, and its ~1,100 page faults a step cost ~10 % of its wall time (README "Speed"). With the
    threshold at 32 MiB and the heap trimmed only past 1 GiB, freed blocks stay in the heap and are reused. Only
    where the memory comes from changes: tensors stay 64-byte aligned (PyTorch's own allocator), so every result
    is the same to the bit."""
    import ctypes
    import ctypes.util
    if sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_MMAP_THRESHOLD, HEAP_KEEP_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))


def run_command(parser: argparse.ArgumentParser, commands: dict, argv=None) -> int:
    """The main() of the stage scripts: parse, set up torchrun's process group when --dist asks for it, run the
    command -> its exit code (3: stopped by --stop-after). A user's error (a bad checkpoint, data file, cache or
    launch) is one line on stderr and exit 2."""
    args = parser.parse_args(argv)
    keep_freed_memory()
    try:
        with dist.setup(args):
            return commands[args.cmd](args)
    except (CheckpointError, data.DataError, dist.LaunchError) as e:
        fail(str(e))
