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
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import data
from generate import generate
from model import (PRESETS, CheckpointError, Config, Llama, LoRALinear, apply_lora, lora_state_dict, rope_inv_freq,
                   token_logprobs)


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


# ---------------------------------------------------------------------- past one device (torchrun)
#
# `torchrun --nproc_per_node=N script.py ... --dist ddp|fsdp` runs N copies; torchrun's environment (RANK,
# WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) sets up the process group. Every rank plans the same global windows
# and takes its share of each window's micro-batches; rank 0 alone writes logs and checkpoints. With one process
# (no torchrun) every helper below is a no-op and the code paths are those of a single device.

def dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if dist_on() else 0


def world() -> int:
    return dist.get_world_size() if dist_on() else 1


def is_main() -> bool:
    """Rank 0: the one that prints, logs and writes files."""
    return rank() == 0


def barrier():
    if dist_on():
        dist.barrier()


def gather_objects(obj) -> list:
    """Every rank's picklable obj, in rank order, on every rank ([obj] with one process)."""
    if not dist_on():
        return [obj]
    out = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def share(items: list, lockstep: bool = False) -> list[tuple[object, bool]]:
    """This rank's items of a list every rank knows: items[rank::world], as (item, True). With lockstep, ranks
    short of the longest share get (items[0], False) fillers: under FSDP every forward is a collective (each
    block is all-gathered), so all ranks must run the same number of them and drop the filler's result."""
    mine = [(x, True) for x in items[rank()::world()]]
    if lockstep and items:
        mine += [(items[0], False)] * (-(-len(items) // world()) - len(mine))
    return mine


def reshard(model):
    """Free every gathered FSDP parameter, so model.parameters() are the sharded ones again. The root stays
    gathered after a forward (see distribute) until a backward; after a no-grad forward (sampling, reference
    log-probs, evaluation) it must be resharded by hand before an optimizer or a state dict is made from it."""
    if is_fsdp(model):
        for m in model.modules():
            if is_fsdp(m):
                m.reshard()


def is_fsdp(model) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6
        return False
    return isinstance(model, FSDPModule)


@contextmanager
def distributed(args):
    """Set up (and always tear down) the process group for --dist ddp|fsdp under torchrun: NCCL with device
    cuda:LOCAL_RANK on GPUs, gloo on CPU. Sets args.device to this rank's device. A group that already exists
    (a caller set it up) is used and left alone. Without --dist, a torchrun launch is refused."""
    mode = getattr(args, "dist", None)
    n = int(os.environ.get("WORLD_SIZE", "1"))
    if mode is None and n > 1:
        fail(f"this command runs in one process (torchrun started {n}): launch it with python, not torchrun")
    if mode in (None, "none"):
        if n > 1:
            fail(f"torchrun started {n} processes but --dist is none: pass --dist ddp (replicated) or --dist fsdp "
                 "(sharded)")
        yield
        return
    if "LOCAL_RANK" not in os.environ:
        fail(f"--dist {mode} runs under torchrun: torchrun --nproc_per_node=N {Path(sys.argv[0]).name} ...")
    if mode == "fsdp":
        try:
            from torch.distributed.fsdp import fully_shard  # noqa: F401
        except ImportError:
            fail(f"--dist fsdp needs FSDP2 (torch.distributed.fsdp.fully_shard, torch >= 2.6); this is torch "
                 f"{torch.__version__}: upgrade, or use --dist ddp")
    device = pick_device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    args.device = str(device)
    owner = not dist_on()
    if owner:
        # One hour, not the default 10-30 minutes: the other ranks wait at a barrier while rank 0 evaluates by
        # generation (--eval) or writes a large checkpoint.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=1),
                                device_id=device if device.type == "cuda" else None)
    try:
        yield
        if owner:
            # Every rank past its last write before any exits: torchrun stops the others as soon as one exits
            # non-zero, as all do after --stop-after (exit 3).
            dist.barrier()
    finally:
        if owner:
            # Free every DDP/FSDP object that holds the group before destroying it: a gloo group freed later,
            # while the interpreter exits, can abort the process ("terminate called without an active
            # exception", exit -6) as its worker thread drops a Python object without the GIL.
            import gc
            gc.collect()
            dist.destroy_process_group()


def build_device(args, device) -> torch.device:
    """Where the model to train is loaded: its training device, or the CPU under FSDP, where fully_shard moves one
    block at a time to the device as it shards it, so no GPU ever holds the whole model."""
    return torch.device("cpu") if getattr(args, "dist", "none") == "fsdp" else device


class HeadDDP(DistributedDataParallel):
    """DDP that exposes the model's `lm_head`: the losses read `fwd.lm_head.weight` after `fwd(...)` returns the
    hidden states (the chunked head, model.token_logprobs and distill.kd_token_losses). DDP's gradient hooks sit
    on the parameters themselves, so a head applied outside forward is reduced like any other weight."""

    @property
    def lm_head(self):
        return self.module.lm_head


def distribute(model: Llama, args, device):
    """The forward handle for training, after the weights are restored and before the optimizer is built:
    the (compiled) model itself, DDP around it, or the model sharded in place with FSDP2.

    FSDP2: each decoder block is its own unit (all-gathered for its forward and backward, freed after), the
    root holds the embedding, final norm and head. The root is NOT resharded after forward: the losses apply
    model.lm_head.weight chunk by chunk after model.forward returns (a [B, T, V] logits tensor is never built),
    and that weight is the unsharded parameter only while the root is unsharded; FSDP reshards it after the
    backward. Weights are all-gathered in fp32 and the compute is under the same autocast as on one device."""
    mode = getattr(args, "dist", "none")
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard
        for block in model.model.layers:
            fully_shard(block)
        fully_shard(model, reshard_after_forward=False)
        return maybe_compile(model, device, args.compile)
    fwd = maybe_compile(model, device, args.compile)
    if mode == "ddp":
        return HeadDDP(fwd, device_ids=[device.index] if device.type == "cuda" else None)
    return fwd


def _grad_sync(fwd, model, sync: bool):
    """Gradients are reduced across ranks after the last micro-batch of a step only (DDP's no_sync; FSDP keeps
    unsharded gradients until then)."""
    if isinstance(fwd, DistributedDataParallel) and not sync:
        return fwd.no_sync()
    if is_fsdp(model):
        model.set_requires_gradient_sync(sync)
    return nullcontext()


def _sum_over_ranks(values: list[float], device) -> list[float]:
    if not dist_on():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


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
    reshard(model)  # under FSDP the optimizer must hold the sharded parameters, not the root's gathered ones
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")


def plan_windows(lengths: list[int], batch_size: int, grad_accum: int, epochs: float, seed: int):
    """Optimizer steps as windows of batch_size·grad_accum samples, each split into grad_accum micro-batches.

    The window, not the micro-batch, is what the seed shuffles, so batch 8 × 1 step and batch 2 × 4 steps
    see the same samples per optimizer step and (with token-normalised losses) take the same step.
    Under torchrun, pass grad_accum × world size: every rank plans the same global windows and `fit` gives
    each rank its share of every window's micro-batches, so N ranks take the steps one process would.
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
    window's normaliser; metric tensors are summed over the window's micro-batches.

    Under torchrun the windows are global (see plan_windows): rank r runs micro-batches r, r + N, ... of each,
    the normalisers still come from the whole window (every rank knows every sample's length: no
    communication), and the metric sums are added over ranks before rank 0 logs them. `log` and `save` are
    called on every rank (both no-ops or collectives there)."""
    amp = autocast(device)
    total = len(windows)
    n_ranks = world()
    t0, n_tok = time.time(), 0
    if stop_after is None:
        stop_after = getattr(args, "stop_after", None)
    for step in range(start_step, total):
        lr = lr_at(step, total, args.lr, args.lr_schedule, args.warmup_steps, args.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        norm = norm_fn(windows[step])
        # Every rank runs the same number of forward/backward passes (DDP and FSDP pair their collectives up):
        # a rank short of a micro-batch in a window's tail re-runs one with its loss and metrics times 0.
        todo = share(windows[step], lockstep=n_ranks > 1)
        sums: dict[str, torch.Tensor] = {}
        for i, (mb, real) in enumerate(todo):
            batch = batch_fn(mb)
            with _grad_sync(fwd, model, sync=i + 1 == len(todo)):
                with amp:
                    loss, metrics = loss_fn(fwd, batch, norm)
                if n_ranks > 1:
                    # DDP and FSDP AVERAGE gradients over ranks, but each rank's loss is its part of the
                    # window's mean, and the step needs their SUM: scale by the world size (exact for 2^k).
                    loss = loss * (n_ranks if real else 0.0)
                loss.backward()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0) + (v.detach() if real else 0 * v.detach())
            n_tok += int(batch["attention_mask"].sum()) if real and "attention_mask" in batch else 0
        grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                                   args.grad_clip if args.grad_clip > 0 else float("inf"))
        opt.step()
        opt.zero_grad(set_to_none=True)
        last = step + 1 == total or step + 1 == stop_after
        if (step + 1) % args.log_every == 0 or last:
            if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP; the same global norm on every rank
                grad_norm = grad_norm.full_tensor()
            keys = list(sums)
            vals = _sum_over_ranks([float(sums[k]) for k in keys] + [n_tok], device)
            dt = time.time() - t0
            row = {"stage": tag, "step": step + 1, "steps": total, "lr": lr, "grad_norm": float(grad_norm),
                   **dict(zip(keys, vals)), "tok_per_s": vals[-1] / max(dt, 1e-9)}
            if log is not None:
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
    window = args.batch_size * args.grad_accum * world()
    windows = plan_windows([len(s.ids) for s in samples], args.batch_size, args.grad_accum * world(), args.epochs,
                           args.seed)
    st = None
    if ck is not None:
        st = load_train_state(ck)
        if st.get("stage") != tag:
            fail(f"{ck}: checkpoint of stage {st.get('stage')!r}, this run is {tag!r}")
        check_window(st, window, ck)
        restore_weights(model, ck)
    fwd = distribute(model, args, device)
    opt = make_optimizer(model, args.lr, args.weight_decay, device)
    start = 0
    if st is not None:
        load_optimizer_state(model, opt, st, ck)
        set_rng_state(st["rng"])
        start = st["step"]
        if is_main():
            print(f"resumed {tag} from {ck} at step {start}/{len(windows)}", flush=True)
    log = log or MetricsLog(out, resume_from={"stage": tag, "step": start} if ck else None, quiet=args.quiet)
    batch_fn = batch_fn or batch_fn_for(samples, data.special_ids(tok)["pad"], device)

    def save(step):
        save_checkpoint(out / "checkpoint", model, opt, tok, {"stage": tag, "step": step, "window": window})

    done = fit(model, fwd, opt, windows, batch_fn, loss_fn, norm_fn, args, device=device, start_step=start,
               log=log, save=save, tag=tag)
    if done < len(windows):
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
    under a temporary name, then swap it in. A kill at any moment leaves `ckpt` or `ckpt.old` whole.

    Under torchrun every rank calls it and rank 0 writes. FSDP gathers the full weights and the full optimizer
    state (keyed by parameter name) to rank 0 first, so the checkpoint is the same HF directory as on one
    device and resumes at any number of ranks."""
    from safetensors.torch import save_file
    plain = gathered(model)
    osd = optimizer_state(model, opt) if opt is not None else None
    if is_main():
        ckpt = Path(ckpt)
        tmp, old = ckpt.with_name(ckpt.name + ".tmp"), ckpt.with_name(ckpt.name + ".old")
        shutil.rmtree(tmp, ignore_errors=True)
        plain.save_pretrained(tmp)
        data.save_tokenizer(tok, tmp)
        adapters = lora_state_dict(plain)
        if adapters:
            save_file({k: v.detach().cpu().contiguous() for k, v in adapters.items()}, str(tmp / "adapter.safetensors"))
        layout = {"optimizer_layout": "fsdp-full"} if is_fsdp(model) else {}
        torch.save({**state, **layout, "optimizer": osd, "rng": rng_state()}, tmp / "train_state.pt")
        _fsync_dir(tmp)
        if ckpt.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(ckpt, old)
        os.replace(tmp, ckpt)
        shutil.rmtree(old, ignore_errors=True)
    barrier()


def save_model(model: Llama, path: Path, tok):
    """The HF-layout model and tokenizer.json, written by rank 0 (every rank calls it: FSDP gathers)."""
    plain = gathered(model)
    if plain is not None:
        plain.save_pretrained(path)
        data.save_tokenizer(tok, path)
    barrier()


def gathered(model: Llama, device="cpu") -> Llama | None:
    """The model as one ordinary Llama on rank 0 (None on the other ranks): the model itself with one process
    or DDP (every rank holds it whole), or under FSDP a copy on `device` built from the full state dict, which
    every rank must call for (the gather is a collective)."""
    if not is_fsdp(model):
        return model if is_main() else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    reshard(model)
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not is_main():
        return None
    with torch.device("meta"):
        copy = Llama(model.cfg)
    for name, mod in model.named_modules():
        if isinstance(mod, LoRALinear):  # the same adapters, so save_pretrained merges them the same way
            parent, _, attr = name.rpartition(".")
            r = mod.lora_A.shape[0]
            setattr(copy.get_submodule(parent), attr, LoRALinear(copy.get_submodule(name), r, mod.scale * r))
    copy.load_state_dict(sd, assign=True)
    if model.cfg.tie_word_embeddings:
        copy.lm_head.weight = copy.model.embed_tokens.weight
    copy.inv_freq = rope_inv_freq(model.cfg)
    return copy.to(device)


def optimizer_state(model: Llama, opt) -> dict | None:
    """opt.state_dict() (replicated under DDP, rank 0's is saved), or under FSDP the full state keyed by
    parameter name, gathered to rank 0 (None elsewhere)."""
    if not is_fsdp(model):
        return opt.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    osd = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return osd if is_main() else None


def load_optimizer_state(model: Llama, opt, st: dict, ck: Path):
    """The inverse of optimizer_state; the two layouts do not mix, and a mismatch is one line."""
    fsdp_ck = st.get("optimizer_layout") == "fsdp-full"
    if fsdp_ck != is_fsdp(model):
        fail(f"{ck}: written {'under' if fsdp_ck else 'without'} --dist fsdp; resume it "
             f"{'under' if fsdp_ck else 'without'} --dist fsdp too")
    if not fsdp_ck:
        opt.load_state_dict(st["optimizer"])
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, opt, st["optimizer"],
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


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
        self.quiet = quiet
        self.on = is_main()  # under torchrun only rank 0 writes (the rows already hold sums over ranks)
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
    if not is_main():
        return
    d = {k: v for k, v in vars(args).items() if not callable(v)}
    d["world_size"] = world()
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
    pairs, _ = data.encode_rows(tok, rows, fmt, max_len)
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
