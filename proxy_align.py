"""Stage 1 of Proxy-KD: align a white-box proxy to the black-box teacher (paper §3.1).

    sft     warm-up: NLL on the teacher's responses (prompt masked), one epoch over D_w. The same loop
            pretrains the embedded world's bases on plain text (rows with "text": every token is a target).
    align   K rounds over chunks of D_p. Round k: sample one response ŷ per prompt from the current proxy
            (temperature 1.0, top-p 0.8); log-probs of y and ŷ under the proxy as it is at the start of the
            round (π_p^{k-1}, the DPO reference), computed once and stored; then train on
            L_Proxy = NLL(y) + DPO(chosen = teacher y, rejected = ŷ) (eqs. 3-6 below); save the round's proxy.
            --no-dpo keeps the same rounds with the NLL alone (the paper's "w/o DPO" ablation).
    sample  one response per prompt from any model, written as teacher rows: the sequences a white-box teacher
            generates, for the white-box KD baselines.

    python proxy_align.py sft --init tiny-proxy --tokenizer runs/world/tokenizer.json --data corpus.jsonl --out runs/proxy_base
    python proxy_align.py sft --init runs/proxy_base --data runs/x/D_w.jsonl --out runs/x/proxy_sft
    python proxy_align.py align --init runs/x/proxy_sft --data runs/x/D_p.jsonl --rounds 16 --out runs/x/proxy
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

import data
import dist
import evaluation
import train
from generate import cut_at_stop, generate
from model import token_logprobs


# ------------------------------------------------------------------- the paper's equations (pure)

def proxy_nll(chosen_logps, n_tokens):
    """Eq. 3: L_Proxy-NLL = −Σ_t log π_p(y_t | x, y_<t) over the teacher's response tokens, divided by the
    response tokens of the optimizer step's window (n_tokens). chosen_logps [B] fp32: each teacher response's
    summed token log-probs under the proxy -> scalar."""
    return -chosen_logps.sum() / n_tokens


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta: float):
    """Eq. 4 (DPO, Rafailov et al. 2023, their eq. 7), per pair. All inputs [B] fp32 sequence log-probs (summed or
    length-averaged, as the caller chose):

        loss_i = −log σ(β · [(log π(y_i) − log π_ref(y_i)) − (log π(ŷ_i) − log π_ref(ŷ_i))])

    with y_i the teacher's response (chosen) and ŷ_i the proxy's own sample (rejected). Returns (losses [B],
    chosen_rewards [B], rejected_rewards [B]); rewards are β·(log π − log π_ref), detached: they are for logging
    (reward accuracy = chosen > rejected, margin = chosen − rejected)."""
    chosen_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_ratio = policy_rejected_logps - ref_rejected_logps
    losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    return losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach()


def proxy_loss(chosen_logps, dpo_losses, n_tokens, n_pairs):
    """Eq. 6: L_Proxy = L_Proxy-NLL (eq. 3) + L_DPO, where L_DPO (eq. 5) is the expectation of eq. 4 over the
    pairs: Σ_i loss_i / n_pairs of the window. Unit weights, as in the paper. dpo_losses None: the NLL alone
    (the "w/o DPO" ablation). -> scalar."""
    nll = proxy_nll(chosen_logps, n_tokens)
    return nll if dpo_losses is None else nll + dpo_losses.sum() / n_pairs


def reduce_logps(sums, counts, mode: str):
    """`mean`: length-averaged (the authors' code, with β = 1); `sum`: standard DPO (β ≈ 0.1)."""
    return sums / counts.clamp(min=1) if mode == "mean" else sums


# ------------------------------------------------------------------------- the loss of one batch

def sequence_logps(fwd, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sum of response-token log-probs [N] and their counts [N] (fp32)."""
    mask = data.response_mask(batch["labels"])
    lp = token_logprobs(fwd, batch["input_ids"], batch["attention_mask"], mask=mask)
    return (lp * mask).sum(-1), mask.sum(-1).float()


def align_loss(fwd, batch, norm, beta: float, mode: str, use_dpo: bool = True):
    """One micro-batch of eq. 6, as the training loop calls it: (loss, metrics). With DPO the batch holds B chosen
    rows then B rejected rows (one forward for both, as in the DPO reference implementation) plus the stored
    reference sums of each ("ref_chosen", "ref_rejected" [B]); without it, the B chosen rows only."""
    sums, counts = sequence_logps(fwd, batch)
    if not use_dpo:
        nll = proxy_nll(sums, norm["tokens"])
        return nll, {"nll": nll}
    B = batch["ref_chosen"].shape[0]
    pol = reduce_logps(sums, counts, mode)
    ref_c = reduce_logps(batch["ref_chosen"], counts[:B], mode)
    ref_r = reduce_logps(batch["ref_rejected"], counts[B:], mode)
    losses, cr, rr = dpo_loss(pol[:B], pol[B:], ref_c, ref_r, beta)
    loss = proxy_loss(sums[:B], losses, norm["tokens"], norm["pairs"])
    per_pair = (lambda x: x.sum() / norm["pairs"])
    return loss, {"nll": proxy_nll(sums[:B], norm["tokens"]), "dpo": per_pair(losses),
                  "reward_acc": per_pair((cr > rr).float()), "margin": per_pair(cr - rr),
                  "chosen_reward": per_pair(cr), "rejected_reward": per_pair(rr)}


# --------------------------------------------------------------------------------------------- sft

def replay_rows(path, n: int, seed: int) -> list[dict]:
    """n {"text"} rows drawn at random (by seed) from a pretraining file, to train on beside the teacher's: the
    base keeps reading its own text while it takes up the teacher's (rehearsal; off in the paper)."""
    rows = data.read_jsonl(path)
    bad = next((i for i, r in enumerate(rows, 1) if not isinstance(r.get("text"), str)), None)
    if bad is not None:
        raise data.DataError(f"{path}:{bad}: --replay rows need a \"text\" string (pretraining text)")
    if n > len(rows):
        raise data.DataError(f"{path}: --replay-n {n} but the file has {len(rows)} rows")
    return random.Random(f"replay:{seed}").sample(rows, n)


def cmd_sft(args):
    rows = data.read_jsonl(args.data)
    if not rows or "response" in rows[0] or "text" not in rows[0]:  # teacher rows, not pretraining text
        rows = None
    if args.replay:
        rows = (rows or train.teacher_rows(args.data)) + replay_rows(args.replay, args.replay_n, args.seed)
    device, tok, fmt, rows, seqs, model = train.stage_setup(args, rows)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    train.write_args(args.out, args, {"format": fmt, "n_samples": len(seqs)})
    dist.print0(f"sft: {len(seqs)} sequences, {model.num_params() / 1e6:.2f}M parameters, format {fmt}, device "
                f"{device}")
    with train.timed(args.out, "train"):
        finished = train.train_stage(model, seqs, train.nll_loss_fn, args, tok, device, "sft")
    if finished and args.eval:
        with train.timed(args.out, "eval"):
            evaluation.report_eval(model, tok, fmt, args, Path(args.out), {"stage": "sft"})
    return 0 if finished else 3


# ------------------------------------------------------------------------------------ sampling

@torch.no_grad()
def sample_responses(model, tok, rows, fmt, *, temperature: float, top_p: float, seed: int, max_len: int,
                     batch_size: int, with_logps: bool = False):
    """One response per prompt, as token ids that end with the stop token the model emitted when it stopped by
    itself (the chat format's end of turn or the eos, whichever it sampled); a response cut at its budget keeps
    none. The budget is the room the prompt leaves in max_len, as for the teacher's responses. with_logps:
    (responses, logps [n]), each response's summed log-probability under the model that drew it.

    Prompts are batched by length; a batch's seed is `seed` plus the batch's first position in that order, not
    who runs it, so N ranks draw exactly the samples one process draws (at the same batch_size)."""
    stop = data.stop_ids(tok, fmt)
    pad = data.special_ids(tok)["pad"]
    prompts = [data.encode_prompt(tok, data.messages_of(r), fmt) for r in rows]
    budgets = [max(1, max_len - len(p)) for p in prompts]
    batches = data.length_batches([len(p) for p in prompts], batch_size)
    # Under FSDP every forward is a collective: every batch decodes the longest budget of all (no early stop, the
    # same number of steps on every rank), cut here at the first stop token. The tokens up to it are the same
    # either way: each step draws from one generator over all rows, whether or not some rows have stopped.
    lockstep = dist.lockstep(model)

    def run(job):
        b, idx = job
        budget = max(budgets) if lockstep else max(budgets[i] for i in idx)
        got = generate(model, [prompts[i] for i in idx], budget, temperature=temperature, top_p=top_p,
                       eos_id=[] if lockstep else stop, pad_id=pad, seed=seed + b, keep_stop=True, logprobs=with_logps)
        new, lps = got if with_logps else (got, None)
        if lockstep:
            new = [cut_at_stop(t, stop, keep_stop=True) for t in new]
        # A row's own budget may be shorter than its batch's: a response cut there has no stop token.
        new = [t[:budgets[i]] for i, t in zip(idx, new)]
        return new, [sum(lp[:len(t)]) for t, lp in zip(new, lps)] if with_logps else [0.0] * len(new)

    model.eval()
    with train.autocast(model.device):
        results = dist.map_shared(run, [(b * batch_size, idx) for b, idx in enumerate(batches)], model)
    model.train()
    out, logps = [None] * len(rows), torch.zeros(len(rows))
    for idx, (toks, lps) in zip(batches, results):
        for i, t, lp in zip(idx, toks, lps):
            out[i], logps[i] = t, lp
    return (out, logps) if with_logps else out


def cmd_sample(args):
    """The `sample` command: a model's own responses to prompts, as teacher rows (finish_reason "stop" when it
    ended by itself, "length" when cut at its budget)."""
    device = train.pick_device(args.device)
    tok, fmt = train.tokenizer_and_format(args, args.init)
    rows = data.read_prompts(args.data)
    model = train.load_model(args.init, tok, device, seed=args.seed)
    with train.timed(Path(args.out).parent, "sample"):
        toks = sample_responses(model, tok, rows, fmt, temperature=args.temperature, top_p=args.top_p,
                                seed=args.seed, max_len=args.max_len, batch_size=args.batch_size)
    stop = set(data.stop_ids(tok, fmt))
    out = [{**r, "response": tok.decode([x for x in t if x not in stop]),
            "finish_reason": "stop" if t and t[-1] in stop else "length"} for r, t in zip(rows, toks)]
    data.write_jsonl(args.out, out)
    n_stop = sum(o["finish_reason"] == "stop" for o in out)
    print(f"sample: {len(out)} responses from {args.init} ({n_stop} ended by themselves) -> {args.out}", flush=True)
    return 0


# ------------------------------------------------------------------------------------------- align

def round_chunks(rows: list[dict], rounds: int, seed: int) -> list[list[dict]]:
    """D_p shuffled once by the seed and cut into K nearly equal chunks, one per round."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    return [[rows[i] for i in order[k::rounds]] for k in range(rounds)]


def build_pairs(tok, rows, rejected_tokens, fmt, max_len):
    """(chosen, rejected) Seq pairs: the same prompt, the teacher's response vs the proxy's sample."""
    chosen, _ = train.encode_seqs(tok, rows, fmt, max_len)
    pairs = []
    for c, r, rej in zip(chosen, rows, rejected_tokens):
        p_ids = data.encode_prompt(tok, data.messages_of(r), fmt)
        r_ids, r_lab = p_ids + rej, [data.IGNORE_INDEX] * len(p_ids) + rej
        pairs.append((c, train.Seq(*data.truncate(r_ids, r_lab, max_len))))
    return pairs


@torch.no_grad()
def reference_logps(model, pairs, pad_id, device, batch_size: int, which=(0, 1)) -> tuple[torch.Tensor, ...]:
    """Summed response log-probs [n] under the round's reference, of every chosen (which 0) and of every
    rejected (which 1) sequence, teacher-forced."""
    model.eval()
    jobs = [(w, s) for w in which for s in range(0, len(pairs), batch_size)]

    def run(job):
        which, s = job
        b = train.collate_seqs([p[which] for p in pairs[s:s + batch_size]], pad_id, device)
        return sequence_logps(model, b)[0].float().cpu()

    with train.autocast(device):
        done = dict(zip(jobs, dist.map_shared(run, jobs, model)))
    model.train()
    return tuple(torch.cat([done[(w, s)] for s in range(0, len(pairs), batch_size)]) for w in which)


def save_round_data(rdir: Path, rows, rejected, ref_c, ref_r):
    """Persist what a round trains on before training it: the sampled responses and the reference log-probs.
    A resumed run reloads these, so its reference stays π_p^{k-1} and never the resumed policy."""
    from safetensors.torch import save_file
    rdir.mkdir(parents=True, exist_ok=True)
    data.write_jsonl(rdir / "rejected.jsonl", [{"id": r["id"], "rejected_ids": t} for r, t in zip(rows, rejected)])
    with data.atomic_path(rdir / "ref_logps.safetensors") as tmp:
        save_file({"chosen": ref_c.contiguous(), "rejected": ref_r.contiguous()}, str(tmp))


def load_round_data(rdir: Path, rows):
    """A round's stored samples and reference, or None; refused when they belong to other rows than this
    round's chunk (another --seed, --rounds or data)."""
    from safetensors.torch import load_file
    if not (rdir / "ref_logps.safetensors").exists() or not (rdir / "rejected.jsonl").exists():
        return None
    saved = data.read_jsonl(rdir / "rejected.jsonl")
    if [r["id"] for r in saved] != [r["id"] for r in rows]:
        raise data.DataError(f"{rdir}/rejected.jsonl: samples for other prompts than this round's chunk of --data "
                             "(written with another --seed, --rounds or data): resume with the run's own arguments")
    ref = load_file(str(rdir / "ref_logps.safetensors"))
    return [r["rejected_ids"] for r in saved], ref["chosen"], ref["rejected"]


def round_batch_fn(pairs, ref_c, ref_r, pad_id, device):
    """Micro-batches of a round: B chosen rows then, with DPO, their B rejected rows and stored references."""
    def batch_fn(idx):
        seqs = [pairs[i][0] for i in idx] + ([pairs[i][1] for i in idx] if ref_c is not None else [])
        b = train.collate_seqs(seqs, pad_id, device)
        if ref_c is not None:
            b["ref_chosen"], b["ref_rejected"] = ref_c[idx].to(device), ref_r[idx].to(device)
        return b
    return batch_fn


def pair_window_norm(pairs):
    def norm(window):
        idx = [i for mb in window for i in mb]
        return {"tokens": max(1, sum(pairs[i][0].n_targets for i in idx)), "pairs": len(idx)}
    return norm


def prepare_round(model, tok, chunk, fmt, args, k: int, rdir: Path, resumed: bool, device):
    """The pairs of round k and their reference log-probs: sampled now from the model, which is π_p^{k}, and
    scored by it once before any training (rank 0 stores them), or reloaded when a run resumes inside the round.
    The model that drew a sample is the reference, so the sampling pass's own log-probs score the rejected
    side (to float rounding: ~1e-6 a token in fp32) and only the teacher's responses take a second pass.
    Without DPO: the teacher's responses alone."""
    pad = data.special_ids(tok)["pad"]
    if not args.dpo:
        return [(c, None) for c in train.encode_seqs(tok, chunk, fmt, args.max_len)[0]], None, None
    saved = load_round_data(rdir, chunk) if resumed else None
    if saved is not None:
        rejected, ref_c, ref_r = saved
        return build_pairs(tok, chunk, rejected, fmt, args.max_len), ref_c, ref_r
    with train.timed(rdir.parent, f"{rdir.name}/sample"):
        rejected, ref_r = sample_responses(model, tok, chunk, fmt, temperature=args.temperature, top_p=args.top_p,
                                           seed=args.seed * 100003 + k * 1009, max_len=args.max_len,
                                           batch_size=args.gen_batch_size, with_logps=True)
    pairs = build_pairs(tok, chunk, rejected, fmt, args.max_len)
    with train.timed(rdir.parent, f"{rdir.name}/reference"):
        (ref_c,) = reference_logps(model, pairs, pad, device, args.gen_batch_size, which=(0,))
    if dist.is_main():
        save_round_data(rdir, chunk, rejected, ref_c, ref_r)
    return pairs, ref_c, ref_r


def resume_state(args, out: Path, window: int):
    """(checkpoint, its state) to resume from, or (None, None). A resume must take the same rounds over the same
    chunks: a changed --rounds, --seed or --dpo would pair the stored samples with other rows."""
    ck = train.check_fresh_or_resume(out, args.resume)
    if ck is None:
        return None, None
    st = train.load_train_state(ck)
    train.check_window(st, window, ck)
    for key in ("rounds", "seed", "dpo"):
        if key in st and st[key] != getattr(args, key):
            train.fail(f"{ck}: written by a run with --{key} {st[key]}, this one has --{key} {getattr(args, key)}: "
                       "resume with the run's own arguments, or choose another --out")
    return ck, st


def round_optimizer(model, args, device, resume=None):
    """A fresh AdamW for a round and the step it starts at; resume = (state, checkpoint, step) continues a round
    from its checkpoint (its optimizer state once a step was taken, and the RNG)."""
    opt = train.make_optimizer(model, args.lr, args.weight_decay, device)
    if resume is None:
        return opt, 0
    st, ck, step = resume
    if st.get("optimizer") is not None and step > 0:
        dist.load_optimizer_state(model, opt, st, ck)
    train.set_rng_state(st["rng"])
    return opt, step


def cmd_align(args):
    device = train.pick_device(args.device)
    out = Path(args.out)
    tok, fmt = train.tokenizer_and_format(args, args.init)
    chunks = round_chunks(train.teacher_rows(args.data), args.rounds, args.seed)
    heldout = train.teacher_rows(args.heldout)[: args.heldout_limit or None] if args.heldout else None
    model = train.load_model(args.init, tok, dist.load_device(args, device), seed=args.seed,
                             lora_rank=args.lora_rank, lora_alpha=args.lora_alpha)
    window = args.batch_size * args.grad_accum * dist.n_ranks()  # pairs per optimizer step, over all ranks
    ck, st = resume_state(args, out, window)
    start_round, start_step, gstep0 = (st["round"], st["step"], st["gstep0"]) if st else (0, 0, 0)
    if ck is not None:
        train.restore_weights(model, ck)
        dist.print0(f"resumed align from {ck}: round {start_round + 1}/{args.rounds}, step {start_step}")
    out.mkdir(parents=True, exist_ok=True)
    train.write_args(out, args, {"format": fmt})
    log = train.MetricsLog(out, resume_from=None if ck is None else
                           {"round": start_round + 1, "stage": "align", "step": start_step,
                            "stage_order": ["align", "round_end"]}, quiet=args.quiet)
    fwd = dist.wrap(model, args, device)
    loss_fn = partial(align_loss, beta=args.beta, mode=args.dpo_logp, use_dpo=args.dpo)
    if ck is None and heldout:
        # Round 0 = the proxy before alignment: its agreement (its accuracy is the warm-up stage's eval.json).
        with train.timed(out, "round_00/eval"):
            log_round_end(model, tok, fmt, args, heldout, log, 0)
    fixed = {"stage": "align", "window": window, "rounds": args.rounds, "seed": args.seed, "dpo": args.dpo}

    for k in range(start_round, args.rounds):
        resumed = st is not None and k == start_round
        pairs, ref_c, ref_r = prepare_round(model, tok, chunks[k], fmt, args, k, out / f"round_{k + 1:02d}", resumed,
                                            device)
        windows = train.plan_windows([len(c.ids) + (len(r.ids) if r else 0) for c, r in pairs], args.batch_size,
                                     args.grad_accum * dist.n_ranks(), args.epochs, args.seed + k)
        opt, step0 = round_optimizer(model, args, device, (st, ck, start_step) if resumed else None)

        def save(step, k=k, opt=opt, g=gstep0):
            train.save_checkpoint(out / "checkpoint", model, opt, tok, {**fixed, "round": k, "step": step, "gstep0": g})

        def tagged(row, k=k, g=gstep0):
            log({**row, "round": k + 1, "global_step": g + row["step"]})

        # --stop-after counts optimizer steps over all rounds.
        local_stop = args.stop_after - gstep0 if args.stop_after and args.stop_after > gstep0 else None
        stage = train.Stage("align", windows, round_batch_fn(pairs, ref_c, ref_r, data.special_ids(tok)["pad"], device),
                            pair_window_norm(pairs), loss_fn, tagged, save, stop_after=local_stop)
        with train.timed(out, f"round_{k + 1:02d}/train"):
            done = train.fit(model, fwd, opt, stage, args, device, step0)
        if done < len(windows):
            return 3
        gstep0 += len(windows)
        with train.timed(out, f"round_{k + 1:02d}/eval"):
            finish_round(model, tok, fmt, args, heldout, log, k, out)
        # The next round starts from here: a checkpoint at (k+1, step 0) makes that the resume point.
        train.save_checkpoint(out / "checkpoint", model, None, tok, {**fixed, "round": k + 1, "step": 0, "gstep0": gstep0})
        if args.stop_after and gstep0 >= args.stop_after:
            return 3 if k + 1 < args.rounds else 0
    train.save_model(model, out, tok)
    return 0


def finish_round(model, tok, fmt, args, heldout, log, k: int, out: Path):
    """Save round k's proxy, measure it, and write the final accuracy after the last round."""
    train.save_model(model, out / f"round_{k + 1:02d}", tok)
    end = log_round_end(model, tok, fmt, args, heldout, log, k + 1)
    if k + 1 == args.rounds and end and "eval_record" in end:
        data.atomic_write_text(out / "eval.json", json.dumps(end["eval_record"]) + "\n")


def log_round_end(model, tok, fmt, args, heldout, log, k: int):
    """Top-1 agreement with held-out teacher text and (k > 0) accuracy after round k (rank 0 measures, on the whole
    model)."""
    def measure(m):
        row = {"stage": "round_end", "round": k}
        if heldout:
            row["agreement"] = evaluation.top1_agreement(m, tok, heldout, fmt, args.max_len, args.gen_batch_size)
        record = None
        if args.eval and k > 0:
            rows = data.read_prompts(args.eval)[: args.eval_limit or None]
            res = evaluation.evaluate(m, tok, rows, fmt, args.eval_batch_size, args.max_new_tokens,
                                      desc=f"eval round {k}")
            row["eval_accuracy"], record = res["accuracy"], evaluation.eval_record(res, rows)
        log(row)
        return row if record is None else {**row, "eval_record": record}
    return dist.on_main(measure, model)


# --------------------------------------------------------------------------------------------- CLI

def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, help_ in [("sft", "warm-up SFT on teacher responses, or pretraining on {\"text\"} rows"),
                        ("align", "K rounds of online sampling + NLL + DPO against the previous round's proxy")]:
        s = sub.add_parser(name, help=help_)
        s.add_argument("--init", required=True, help="HF directory, or a named size (tiny-proxy, tiny-student, toy)")
        s.add_argument("--tokenizer", default=None, help="tokenizer.json or its directory (default: --init's)")
        s.add_argument("--data", required=True, help="JSONL: teacher rows (prompt/messages + response) or {\"text\"} rows")
        s.add_argument("--format", default=None, help="chat format plain|chatml|llama3 (default: from --init)")
        train.add_eval_args(s, "after the stage/round")
        train.add_train_args(s)
        if name == "sft":
            s.add_argument("--replay", default=None, help="{\"text\"} JSONL (the base's pretraining text) to train on "
                           "beside --data; off by default (the paper's warm-up is --data alone)")
            s.add_argument("--replay-n", type=int, default=0, help="how many --replay rows, drawn by --seed")
        if name == "align":
            s.add_argument("--rounds", type=int, default=16, help="K alignment rounds over chunks of D_p (paper: 16)")
            s.add_argument("--dpo", action=argparse.BooleanOptionalAction, default=True,
                           help="--no-dpo: the same rounds with the NLL alone (the paper's w/o DPO ablation)")
            s.add_argument("--beta", type=float, default=1.0, help="DPO beta (authors' code 1.0 with mean log-probs)")
            s.add_argument("--dpo-logp", choices=["mean", "sum"], default="mean",
                           help="length-averaged (authors' code) or summed (standard DPO, use beta ~0.1)")
            add_sampling_args(s, "rejected responses", temperature=1.0, top_p=0.8)
            s.add_argument("--gen-batch-size", type=int, default=64, help="prompts per sampling / reference batch")
            s.add_argument("--heldout", default=None, help="teacher JSONL for the top-1 agreement measure per round")
            s.add_argument("--heldout-limit", type=int, default=0, help="use only the first N held-out rows (0: all)")
    s = sub.add_parser("sample", help="one response per prompt from a model, written as teacher rows")
    s.add_argument("--init", required=True, help="HF directory of the model (with tokenizer.json)")
    s.add_argument("--tokenizer", default=None, help="tokenizer.json or its directory (default: --init's)")
    s.add_argument("--data", required=True, help="JSONL of prompts (prompt or messages)")
    s.add_argument("--out", required=True, help="JSONL of teacher rows: the prompt's fields plus response")
    s.add_argument("--format", default=None, help="chat format plain|chatml|llama3 (default: from --init)")
    s.add_argument("--max-len", type=int, default=1024, help="prompt + response tokens (the response budget)")
    s.add_argument("--batch-size", type=int, default=64, help="prompts per generation batch")
    s.add_argument("--seed", type=int, default=0, help="sampling seed")
    s.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto")
    add_sampling_args(s, "responses (0: greedy)", temperature=0.0, top_p=1.0)
    return p


def add_sampling_args(p, what: str, temperature: float, top_p: float):
    p.add_argument("--temperature", type=float, default=temperature, help=f"sampling temperature for {what}")
    p.add_argument("--top-p", type=float, default=top_p, help=f"nucleus for {what}")


def main(argv=None):
    return train.run_command(build_parser(), {"sft": cmd_sft, "align": cmd_align, "sample": cmd_sample}, argv)


if __name__ == "__main__":
    sys.exit(main())
