"""Past one device: torchrun set-up, DDP/FSDP2 wrapping, work shared out across ranks, the sharded state.
The only file that imports torch.distributed.

`torchrun --nproc_per_node=N script.py ... --dist ddp|fsdp` runs N copies; torchrun's environment (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) sets up the process group. Every rank plans the same global windows
and takes its share of each window's micro-batches; rank 0 alone prints and writes files. With one process
(no torchrun) every function here is the plain single-device operation: no collective, no rank arithmetic.

Under FSDP every forward is a collective (each block is all-gathered for it), so ranks must run the same number
of forwards: the shares below pad a rank that is short with "lockstep fillers" whose results are dropped. And
the root module stays gathered after a no-grad forward (see `wrap`); every function here that runs one leaves
the model resharded, so its parameters are the sharded ones an optimizer or a state dict is built from.
"""
from __future__ import annotations

import gc
import os
import sys
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as tdist
from torch.nn.parallel import DistributedDataParallel

from model import CheckpointError, Llama, LoRALinear, rope_inv_freq


class LaunchError(RuntimeError):
    """A launch that cannot work (torchrun without --dist, --dist without torchrun, no FSDP2): one line."""


# ----------------------------------------------------------------------------------- who am I

def _on() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    return tdist.get_rank() if _on() else 0


def n_ranks() -> int:
    return tdist.get_world_size() if _on() else 1


def is_main() -> bool:
    """Rank 0: the one that prints, logs and writes files."""
    return rank() == 0


def barrier():
    if _on():
        tdist.barrier()


def print0(msg: str):
    if is_main():
        print(msg, flush=True)


def is_fsdp(model) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6
        return False
    return isinstance(model, FSDPModule)


def lockstep(model) -> bool:
    """True when every forward of `model` is a collective (FSDP): ranks must then run the same number of them,
    e.g. decode every batch to its whole budget instead of stopping early at the end-of-turn token."""
    return is_fsdp(model)


# ------------------------------------------------------------------------------------ set-up

@contextmanager
def setup(args):
    """Set up (and always tear down) the process group for --dist ddp|fsdp under torchrun: NCCL with device
    cuda:LOCAL_RANK on GPUs (args.device is set to it), gloo on CPU. A group that already exists (a caller set
    it up) is used and left alone. Without --dist, a torchrun launch is refused."""
    mode = getattr(args, "dist", None)
    n = int(os.environ.get("WORLD_SIZE", "1"))
    if mode is None and n > 1:
        raise LaunchError(f"this command runs in one process (torchrun started {n}): launch it with python, "
                          "not torchrun")
    if mode in (None, "none"):
        if n > 1:
            raise LaunchError(f"torchrun started {n} processes but --dist is none: pass --dist ddp (replicated) or "
                              "--dist fsdp (sharded)")
        yield
        return
    if "LOCAL_RANK" not in os.environ:
        raise LaunchError(f"--dist {mode} runs under torchrun: torchrun --nproc_per_node=N "
                          f"{Path(sys.argv[0]).name} ...")
    if mode == "fsdp":
        try:
            from torch.distributed.fsdp import fully_shard  # noqa: F401
        except ImportError:
            raise LaunchError(f"--dist fsdp needs FSDP2 (torch.distributed.fsdp.fully_shard, torch >= 2.6); this is "
                              f"torch {torch.__version__}: upgrade, or use --dist ddp") from None
    cuda = args.device != "cpu" and torch.cuda.is_available()  # auto or cuda: one GPU per rank
    if cuda:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        args.device = str(device)
    owner = not _on()
    if owner:
        # One hour, not the default 10-30 minutes: the other ranks wait at a barrier while rank 0 evaluates by
        # generation (--eval) or writes a large checkpoint.
        tdist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(hours=1),
                                 device_id=device if cuda else None)
    try:
        yield
        if owner:
            # Every rank past its last write before any exits: torchrun stops the others as soon as one exits
            # non-zero, as all do after --stop-after (exit 3).
            tdist.barrier()
    finally:
        if owner:
            # Free every DDP/FSDP object that holds the group before destroying it: a gloo group freed later,
            # while the interpreter exits, can abort the process ("terminate called without an active
            # exception", exit -6) as its worker thread drops a Python object without the GIL.
            gc.collect()
            tdist.destroy_process_group()


def load_device(args, device) -> torch.device:
    """Where the model to train is loaded: its training device, or the CPU under FSDP, where fully_shard moves one
    block at a time to the device as it shards it, so no GPU ever holds the whole model."""
    return torch.device("cpu") if getattr(args, "dist", "none") == "fsdp" else device


class HeadDDP(DistributedDataParallel):
    """DDP that exposes the model's `lm_head`: the losses read `fwd.lm_head.weight` after `fwd(...)` returns the
    hidden states (the chunked head of model.token_logprobs and of the distillation KL). DDP's gradient hooks sit
    on the parameters themselves, so a head applied outside forward is reduced like any other weight."""

    @property
    def lm_head(self):
        return self.module.lm_head


def wrap(model, args, device):
    """The forward handle for training, made after the weights are restored and before the optimizer is built:
    the model itself, torch.compile'd with --compile (default: on CUDA), with DDP around it under --dist ddp,
    or sharded in place with FSDP2 under --dist fsdp (compiled after sharding). The uncompiled `model` stays
    the one that is saved, evaluated and used for generation, so checkpoints carry no `_orig_mod.` prefixes.

    FSDP2: each decoder block is its own unit (all-gathered for its forward and backward, freed after), the
    root holds the embedding, final norm and head. The root is NOT resharded after forward: the losses apply
    model.lm_head.weight chunk by chunk after model.forward returns (a [B, T, V] logits tensor is never built),
    and that weight is the unsharded parameter only while the root is unsharded; FSDP reshards it after the
    backward. Weights are all-gathered in fp32 and the compute is under the same autocast as on one device."""
    mode = getattr(args, "dist", "none")
    compiled = device.type == "cuda" if args.compile is None else args.compile
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard
        for block in model.model.layers:
            fully_shard(block)
        fully_shard(model, reshard_after_forward=False)
    fwd = torch.compile(model) if compiled else model
    if mode == "ddp":
        return HeadDDP(fwd, device_ids=[device.index] if device.type == "cuda" else None)
    return fwd


def _reshard(model):
    """Free every gathered FSDP parameter, so model.parameters() are the sharded ones again."""
    if is_fsdp(model):
        for m in model.modules():
            if is_fsdp(m):
                m.reshard()


# ---------------------------------------------------------------------- sharing work out

def _gather_objects(obj) -> list:
    """Every rank's picklable obj, in rank order, on every rank ([obj] with one process)."""
    if not _on():
        return [obj]
    out = [None] * n_ranks()
    tdist.all_gather_object(out, obj)
    return out


def _share(items: list, lockstep: bool) -> list[tuple[object, bool]]:
    """This rank's items of a list every rank knows: items[rank::n_ranks], as (item, True). With lockstep, ranks
    short of the longest share get (items[0], False) fillers, to run and drop."""
    mine = [(x, True) for x in items[rank()::n_ranks()]]
    if lockstep and items:
        mine += [(items[0], False)] * (-(-len(items) // n_ranks()) - len(mine))
    return mine


def map_shared(fn, jobs: list, model) -> list:
    """[fn(job) for job in jobs], in job order, on every rank: the no-grad passes over data every rank needs
    (sampling, reference log-probs). With one process just that; under torchrun rank r runs jobs r, r + N, ...
    (fillers under FSDP, see `lockstep`) and every rank receives all results, so N ranks compute what one
    process computes as long as a job's result depends on the job alone (its seed included)."""
    if not _on():
        return [fn(job) for job in jobs]
    mine = {}
    for (i, job), real in _share(list(enumerate(jobs)), lockstep(model)):
        out = fn(job)
        if real:
            mine[i] = out
    _reshard(model)
    done = {}
    for part in _gather_objects(mine):
        done.update(part)
    return [done[i] for i in range(len(jobs))]


def on_main(fn, model, device=None):
    """fn(the whole model) on rank 0 while the other ranks wait; fn's result on rank 0, None elsewhere. Under
    FSDP the model is first gathered into an ordinary copy on `device` (default: the model's own), which every
    rank must call for; with one process or DDP fn gets the model itself."""
    plain = gathered(model, device=model.device if device is None else device)
    out = fn(plain) if is_main() else None
    barrier()
    return out


# ------------------------------------------------------------------ the training step's collectives

def share_window(window: list) -> list[tuple[list[int], bool]]:
    """This rank's micro-batches of one global window, as (micro-batch, real): all of them, real, with one
    process. Under torchrun every rank runs the same number of forward/backward passes (DDP and FSDP pair their
    collectives up): a rank short of a micro-batch in a window's tail re-runs one as a filler (real False)."""
    return _share(window, lockstep=n_ranks() > 1)


def grad_sync(fwd, model, last: bool):
    """Context for one micro-batch's backward: gradients are reduced across ranks after the last micro-batch of a
    step only (DDP's no_sync; FSDP keeps unsharded gradients until then). Nothing with one process."""
    if isinstance(fwd, DistributedDataParallel) and not last:
        return fwd.no_sync()
    if is_fsdp(model):
        model.set_requires_gradient_sync(last)
    return nullcontext()


def backward(loss, real: bool = True):
    """loss.backward(). Under torchrun DDP and FSDP AVERAGE gradients over ranks, but each rank's loss is its
    part of the window's mean and the step needs their SUM: the loss is scaled by the number of ranks first
    (exact for 2^k ranks), and by 0 for a filler."""
    if n_ranks() > 1:
        loss = loss * (n_ranks() if real else 0.0)
    loss.backward()


def full_tensor(t):
    """A value every rank can read whole: a DTensor (a gradient norm under FSDP) gathered, anything else as is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def sum_over_ranks(values: dict[str, float], device) -> dict[str, float]:
    """The per-rank sums of a log step added over ranks (values itself with one process)."""
    if not _on():
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    tdist.all_reduce(t)
    return dict(zip(values, t.tolist()))


# --------------------------------------------------------------------------------- sharded state

def gathered(model, device="cpu") -> Llama | None:
    """The model as one ordinary Llama on rank 0 (None on the other ranks): the model itself with one process
    or DDP (every rank holds it whole), or under FSDP a copy on `device` built from the full state dict, which
    every rank must call for (the gather is a collective)."""
    if not is_fsdp(model):
        return model if is_main() else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    _reshard(model)
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


def optimizer_state(model, opt) -> dict:
    """The optimizer's part of train_state.pt: {"optimizer": opt.state_dict()} (replicated under DDP: rank 0's
    is saved; None without an optimizer), or under FSDP the full state keyed by parameter name, gathered to
    rank 0 (None elsewhere) and marked with its layout. Every rank calls it (the gather is a collective)."""
    if not is_fsdp(model):
        return {"optimizer": opt.state_dict() if opt is not None else None}
    osd = None
    if opt is not None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        _reshard(model)
        osd = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {"optimizer_layout": "fsdp-full", "optimizer": osd if is_main() else None}


def load_optimizer_state(model, opt, st: dict, ck: Path):
    """The inverse of optimizer_state; the two layouts do not mix, and a mismatch is one line."""
    fsdp_ck = st.get("optimizer_layout") == "fsdp-full"
    if fsdp_ck != is_fsdp(model):
        how = "under" if fsdp_ck else "without"
        raise CheckpointError(f"{ck}: written {how} --dist fsdp; resume it {how} --dist fsdp too")
    if not fsdp_ck:
        opt.load_state_dict(st["optimizer"])
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, opt, st["optimizer"],
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
