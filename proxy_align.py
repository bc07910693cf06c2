"""Stage 1 of Proxy-KD: align a white-box proxy to the black-box teacher (paper §3.1).

    sft    warm-up: NLL on the teacher's responses (prompt masked), one epoch over D_w. The same loop
           pretrains the embedded world's bases on plain text (rows with "text": every token is a target).
    align  K rounds over chunks of D_p. Round k: sample one response ŷ per prompt from the current proxy
           (temperature 1.0, top-p 0.8); log-probs of y and ŷ under the proxy as it is at the start of the
           round (π_p^{k-1}, the DPO reference), computed once and stored; then train on
           NLL(y) + DPO(chosen = teacher y, rejected = ŷ) with unit weights; save the round's proxy.

    python proxy_align.py sft --init tiny-proxy --tokenizer runs/world/tokenizer.json --data corpus.jsonl --out runs/proxy_base
    python proxy_align.py sft --init runs/proxy_base --data runs/x/D_w.jsonl --out runs/x/proxy_sft
    python proxy_align.py align --init runs/x/proxy_sft --data runs/x/D_p.jsonl --rounds 16 --out runs/x/proxy
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import data
import train
from generate import generate
from model import CheckpointError, token_logprobs


# ------------------------------------------------------------------------------------------ losses

def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta: float):
    """DPO (Rafailov et al. 2023, eq. 7; Proxy-KD eq. 3), per example. All inputs [B] fp32 sequence
    log-probs (summed or length-averaged, as the caller chose).

        loss_i = -log σ(β · [(log π(y_i) - log π_ref(y_i)) - (log π(ŷ_i) - log π_ref(ŷ_i))])

    Returns (losses [B], chosen_rewards [B], rejected_rewards [B]); rewards are β·(log π - log π_ref),
    detached: they are for logging (reward accuracy = chosen > rejected, margin = chosen - rejected)."""
    chosen_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_ratio = policy_rejected_logps - ref_rejected_logps
    losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    return losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach()


def sequence_logps(fwd, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sequence sum of response-token log-probs [N], their counts [N], and the per-token log-probs."""
    mask = batch["labels"][:, 1:] != data.IGNORE_INDEX
    lp = token_logprobs(fwd, batch["input_ids"], batch["attention_mask"], mask=mask)
    return (lp * mask).sum(-1), mask.sum(-1).float(), lp


def reduce_logps(sums, counts, mode: str):
    """`mean`: length-averaged (the authors' code, with β = 1); `sum`: standard DPO (β ≈ 0.1)."""
    return sums / counts.clamp(min=1) if mode == "mean" else sums


def align_loss_fn(beta: float, mode: str):
    """loss = NLL(y) / window tokens + Σ DPO_i / window pairs (unit weights, paper eq. 4).

    The batch holds B chosen rows then B rejected rows (one forward for both, as in the DPO reference
    implementation) plus the stored reference sums/counts of each."""
    def loss_fn(fwd, batch, norm):
        sums, counts, _ = sequence_logps(fwd, batch)
        B = batch["ref_chosen"].shape[0]
        pol = reduce_logps(sums, counts, mode)
        ref_c = reduce_logps(batch["ref_chosen"], counts[:B], mode)
        ref_r = reduce_logps(batch["ref_rejected"], counts[B:], mode)
        losses, cr, rr = dpo_loss(pol[:B], pol[B:], ref_c, ref_r, beta)
        nll = -sums[:B].sum() / norm["tokens"]
        dpo = losses.sum() / norm["pairs"]
        return nll + dpo, {"nll": nll, "dpo": dpo, "reward_acc": (cr > rr).float().sum() / norm["pairs"],
                           "margin": (cr - rr).sum() / norm["pairs"], "chosen_reward": cr.sum() / norm["pairs"],
                           "rejected_reward": rr.sum() / norm["pairs"]}
    return loss_fn


# ---------------------------------------------------------------------------------------- data prep

def teacher_rows(path) -> list[dict]:
    rows = data.read_teacher(path)
    if not rows:
        train.fail(f"{path}: no usable teacher responses")
    return rows


def encode_rows(tok, rows, fmt: str, max_len: int) -> tuple[list[train.Seq], int]:
    """data.encode_rows as training sequences: teacher rows masked to the response, {"text"} rows whole."""
    pairs, cut = data.encode_rows(tok, rows, fmt, max_len)
    return [train.Seq(ids, labels) for ids, labels in pairs], cut


def load_tok_and_format(args):
    src = args.tokenizer or args.init
    try:
        tok = data.load_tokenizer(src)
    except Exception as e:  # tokenizers raises plain Exceptions for bad files, OSError for missing ones
        train.fail(f"{src}: cannot load a tokenizer ({e}); pass --tokenizer for a named --init size")
    fmt = args.format or (data.guess_format(args.init) if Path(args.init).is_dir() else "plain")
    return tok, fmt


# --------------------------------------------------------------------------------------------- sft

def cmd_sft(args):
    device = train.pick_device(args.device)
    torch.manual_seed(args.seed)
    tok, fmt = load_tok_and_format(args)
    rows = data.read_jsonl(args.data)
    if not rows or "response" in rows[0] or "text" not in rows[0]:  # teacher rows, not pretraining text
        rows = teacher_rows(args.data)
    seqs, cut = encode_rows(tok, rows, fmt, args.max_len)
    if cut and train.is_main():
        print(f"{args.data}: {cut} of {len(seqs)} sequences cut to --max-len {args.max_len}", flush=True)
    model = train.load_model(args.init, tok, train.build_device(args, device), seed=args.seed,
                             lora_rank=args.lora_rank, lora_alpha=args.lora_alpha)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    train.write_args(args.out, args, {"format": fmt, "n_samples": len(seqs)})
    if train.is_main():
        print(f"sft: {len(seqs)} sequences, {model.num_params() / 1e6:.2f}M parameters, format {fmt}, device "
              f"{device}" + (f", {train.world()} ranks ({args.dist})" if train.world() > 1 else ""), flush=True)
    finished = train.train_stage(model, seqs, train.nll_loss_fn, train.nll_window_norm(seqs), args, tok, device, "sft")
    if finished and args.eval:
        report_eval(model, tok, fmt, args, Path(args.out), {"stage": "sft"})
    return 0 if finished else 3


def report_eval(model, tok, fmt, args, out: Path, row: dict):
    """Accuracy by greedy generation, logged and written to eval.json. Under torchrun rank 0 evaluates the whole
    model (gathered under FSDP) while the others wait; returns None on them."""
    plain = train.gathered(model, device=model.device)
    acc = None
    if plain is not None:
        rows = data.read_prompts(args.eval)[: args.eval_limit or None]
        res = train.evaluate(plain, tok, rows, fmt, args.eval_batch_size, args.max_new_tokens,
                             desc=f"eval {row.get('stage', '')}")
        log = train.MetricsLog(out, quiet=args.quiet)
        log({**row, "eval_accuracy": res["accuracy"], "eval_n": res["n"]})
        data.atomic_write_text(out / "eval.json", json.dumps({"accuracy": res["accuracy"], "n": res["n"]}) + "\n")
        acc = res["accuracy"]
    train.barrier()
    return acc


# ------------------------------------------------------------------------------------------- align

def round_chunks(rows: list[dict], rounds: int, seed: int) -> list[list[dict]]:
    """D_p shuffled once by the seed and cut into K nearly equal chunks, one per round."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    return [[rows[i] for i in order[k::rounds]] for k in range(rounds)]


@torch.no_grad()
def sample_rejected(model, tok, rows, fmt, args, round_idx: int) -> list[list[int]]:
    """One response per prompt from the current proxy; token ids plus the end-of-turn token when it stopped
    by itself (a response cut at the budget keeps no end token).

    Prompts are batched by length; batch b's seed is fixed by the seed, the round and its first position, not
    by who runs it. Under torchrun rank r samples batches r, r + N, ... and every rank receives all results,
    so N ranks draw exactly the samples one process draws (at the same --gen-batch-size)."""
    stop = data.stop_ids(tok, fmt)
    pad = data.special_ids(tok)["pad"]
    prompts = [data.encode_prompt(tok, data.messages_of(r), fmt) for r in rows]
    order = sorted(range(len(rows)), key=lambda i: len(prompts[i]))
    # FSDP all-gathers every block in every forward, so all ranks must run the same number of them: the same
    # number of batches (train.share's fillers) and no early stop at the end-of-turn token: every batch decodes
    # the whole budget, cut at the first stop token here. (The tokens up to it are the same either way: each
    # step draws from one generator over all rows, whether or not some rows have stopped.)
    fsdp = train.is_fsdp(model)
    out: dict[int, list[int]] = {}
    model.eval()
    with train.autocast(model.device):
        for s, real in train.share(list(range(0, len(order), args.gen_batch_size)), lockstep=fsdp):
            idx = order[s:s + args.gen_batch_size]
            new = generate(model, [prompts[i] for i in idx], args.max_new_tokens, temperature=args.temperature,
                           top_p=args.top_p, eos_id=[] if fsdp else stop, pad_id=pad,
                           seed=args.seed * 100003 + round_idx * 1009 + s)
            for i, toks in zip(idx, new if real else []):
                if fsdp:
                    toks = toks[:next((j for j, t in enumerate(toks) if t in stop), len(toks))]
                out[i] = toks + ([stop[0]] if len(toks) < args.max_new_tokens else [])
    model.train()
    for part in train.gather_objects(out):
        out.update(part)
    return [out[i] for i in range(len(rows))]


def build_pairs(tok, rows, rejected_tokens, fmt, max_len):
    """(chosen, rejected) Seq pairs: the same prompt, the teacher's response vs the proxy's sample."""
    pairs = []
    for r, rej in zip(rows, rejected_tokens):
        c_ids, c_lab = data.encode_pair(tok, data.messages_of(r), r["response"], fmt)
        p_ids = data.encode_prompt(tok, data.messages_of(r), fmt)
        r_ids = p_ids + rej
        r_lab = [data.IGNORE_INDEX] * len(p_ids) + rej
        pairs.append((train.Seq(*data.truncate(c_ids, c_lab, max_len)), train.Seq(*data.truncate(r_ids, r_lab, max_len))))
    return pairs


@torch.no_grad()
def reference_logps(model, pairs, pad_id, device, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs of every chosen and rejected sequence under the round's reference. Under
    torchrun the batches are shared out like sample_rejected's and the results gathered on every rank."""
    model.eval()
    jobs = [(which, s) for which in (0, 1) for s in range(0, len(pairs), batch_size)]
    done = {}
    with train.autocast(device):
        for (which, s), real in train.share(jobs, lockstep=train.is_fsdp(model)):
            b = {k: v.to(device) for k, v in data.collate([(p[which].ids, p[which].labels)
                                                           for p in pairs[s:s + batch_size]], pad_id).items()}
            lp = sequence_logps(model, b)[0].float().cpu()
            if real:
                done[(which, s)] = lp
    model.train()
    for part in train.gather_objects(done):
        done.update(part)
    return tuple(torch.cat([done[(which, s)] for s in range(0, len(pairs), batch_size)]) for which in (0, 1))


def save_round_data(rdir: Path, rows, rejected, ref_c, ref_r):
    """Persist what a round trains on before training it: the sampled responses and the reference log-probs.
    A resumed run reloads these, so its reference stays π_p^{k-1} and never the resumed policy."""
    from safetensors.torch import save_file
    rdir.mkdir(parents=True, exist_ok=True)
    data.write_jsonl(rdir / "rejected.jsonl", [{"id": r["id"], "rejected_ids": t} for r, t in zip(rows, rejected)])
    tmp = rdir / "ref_logps.safetensors.tmp"
    save_file({"chosen": ref_c.contiguous(), "rejected": ref_r.contiguous()}, str(tmp))
    train.fsync_file(tmp)
    tmp.replace(rdir / "ref_logps.safetensors")


def load_round_data(rdir: Path):
    from safetensors.torch import load_file
    if not (rdir / "ref_logps.safetensors").exists() or not (rdir / "rejected.jsonl").exists():
        return None
    rej = [r["rejected_ids"] for r in data.read_jsonl(rdir / "rejected.jsonl")]
    ref = load_file(str(rdir / "ref_logps.safetensors"))
    return rej, ref["chosen"], ref["rejected"]


def pair_batch_fn(pairs, ref_c, ref_r, pad_id, device):
    def batch_fn(idx):
        seqs = [(pairs[i][0].ids, pairs[i][0].labels) for i in idx] + [(pairs[i][1].ids, pairs[i][1].labels) for i in idx]
        b = {k: v.to(device) for k, v in data.collate(seqs, pad_id).items()}
        b["ref_chosen"] = ref_c[idx].to(device)
        b["ref_rejected"] = ref_r[idx].to(device)
        return b
    return batch_fn


def pair_window_norm(pairs):
    def norm(window):
        idx = [i for mb in window for i in mb]
        return {"tokens": max(1, sum(pairs[i][0].n_targets for i in idx)), "pairs": len(idx)}
    return norm


def cmd_align(args):
    device = train.pick_device(args.device)
    out = Path(args.out)
    tok, fmt = load_tok_and_format(args)
    pad = data.special_ids(tok)["pad"]
    rows = teacher_rows(args.data)
    chunks = round_chunks(rows, args.rounds, args.seed)
    heldout = teacher_rows(args.heldout)[: args.heldout_limit or None] if args.heldout else None
    model = train.load_model(args.init, tok, train.build_device(args, device), seed=args.seed,
                             lora_rank=args.lora_rank, lora_alpha=args.lora_alpha)
    window = args.batch_size * args.grad_accum * train.world()  # pairs per optimizer step, over all ranks
    ck = train.check_fresh_or_resume(out, args.resume)
    start_round, start_step, st, gstep0 = 0, 0, None, 0
    if ck is not None:
        st = train.load_train_state(ck)
        train.check_window(st, window, ck)
        train.restore_weights(model, ck)
        start_round, start_step, gstep0 = st["round"], st["step"], st["gstep0"]
        if train.is_main():
            print(f"resumed align from {ck}: round {start_round + 1}/{args.rounds}, step {start_step}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    train.write_args(out, args, {"format": fmt})
    log = train.MetricsLog(out, resume_from=None if ck is None else
                           {"round": start_round + 1, "stage": "align", "step": start_step,
                            "stage_order": ["align", "round_end"]}, quiet=args.quiet)
    fwd = train.distribute(model, args, device)
    loss_fn = align_loss_fn(args.beta, args.dpo_logp)
    if ck is None and (args.eval or heldout):
        log_round_end(model, tok, fmt, args, heldout, log, 0)  # round 0 = the proxy before alignment

    for k in range(start_round, args.rounds):
        rdir = out / f"round_{k + 1:02d}"
        chunk = chunks[k]
        saved = load_round_data(rdir) if (st is not None and k == start_round) else None
        if saved is None:
            # The model now is π_p^{k}: sample from it and score both responses with it, once, before training.
            # Under torchrun each rank does its share of both and every rank gets all of it; rank 0 writes it.
            rejected = sample_rejected(model, tok, chunk, fmt, args, k)
            pairs = build_pairs(tok, chunk, rejected, fmt, args.max_len)
            ref_c, ref_r = reference_logps(model, pairs, pad, device, args.gen_batch_size)
            if train.is_main():
                save_round_data(rdir, chunk, rejected, ref_c, ref_r)
        else:
            rejected, ref_c, ref_r = saved
            pairs = build_pairs(tok, chunk, rejected, fmt, args.max_len)
        windows = train.plan_windows([len(c.ids) + len(r.ids) for c, r in pairs], args.batch_size,
                                     args.grad_accum * train.world(), args.epochs, args.seed + k)
        opt = train.make_optimizer(model, args.lr, args.weight_decay, device)  # a fresh Adam each round
        step0 = 0
        if st is not None and k == start_round:
            if st.get("optimizer") is not None and start_step > 0:
                train.load_optimizer_state(model, opt, st, ck)
            train.set_rng_state(st["rng"])
            step0 = start_step
        st = None

        def save(step, k=k, opt=opt, g=gstep0):
            train.save_checkpoint(out / "checkpoint", model, opt, tok,
                                  {"stage": "align", "round": k, "step": step, "gstep0": g, "window": window})

        def tagged(row, k=k, g=gstep0):
            log({**row, "round": k + 1, "global_step": g + row["step"]})

        # --stop-after counts optimizer steps over all rounds.
        local_stop = args.stop_after - gstep0 if args.stop_after and args.stop_after > gstep0 else None
        done = train.fit(model, fwd, opt, windows, pair_batch_fn(pairs, ref_c, ref_r, pad, device), loss_fn,
                         pair_window_norm(pairs), args, device=device, start_step=step0, log=tagged, save=save,
                         tag="align", stop_after=local_stop)
        if done < len(windows):
            return 3
        gstep0 += len(windows)
        train.save_model(model, rdir, tok)
        end = log_round_end(model, tok, fmt, args, heldout, log, k + 1)
        if k + 1 == args.rounds and "eval_accuracy" in end:
            data.atomic_write_text(out / "eval.json", json.dumps({"accuracy": end["eval_accuracy"]}) + "\n")
        # The next round starts from here: a checkpoint at (k+1, step 0) makes that the resume point.
        train.save_checkpoint(out / "checkpoint", model, None, tok,
                              {"stage": "align", "round": k + 1, "step": 0, "gstep0": gstep0, "window": window})
        if args.stop_after and gstep0 >= args.stop_after:
            return 3 if k + 1 < args.rounds else 0
    train.save_model(model, out, tok)
    return 0


def log_round_end(model, tok, fmt, args, heldout, log, k: int):
    """Top-1 agreement and accuracy after round k. Under torchrun rank 0 measures the whole model (gathered under
    FSDP) while the others wait, and they return {}."""
    plain = train.gathered(model, device=model.device) if (heldout or args.eval) else None
    row = {"stage": "round_end", "round": k}
    if not train.is_main():
        train.barrier()
        return {}
    model = plain if plain is not None else model
    if heldout:
        row["agreement"] = train.top1_agreement(model, tok, heldout, fmt, args.max_len, args.gen_batch_size)
    if args.eval:
        rows = data.read_prompts(args.eval)[: args.eval_limit or None]
        row["eval_accuracy"] = train.evaluate(model, tok, rows, fmt, args.eval_batch_size, args.max_new_tokens,
                                              desc=f"eval round {k}")["accuracy"]
    log(row)
    train.barrier()
    return row


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
        train.add_eval_args(s, "after the stage/round", budget="generation budget (eval and sampling)")
        train.add_train_args(s)
        if name == "align":
            s.add_argument("--rounds", type=int, default=16, help="K alignment rounds over chunks of D_p (paper: 16)")
            s.add_argument("--beta", type=float, default=1.0, help="DPO beta (authors' code 1.0 with mean log-probs)")
            s.add_argument("--dpo-logp", choices=["mean", "sum"], default="mean",
                           help="length-averaged (authors' code) or summed (standard DPO, use beta ~0.1)")
            s.add_argument("--temperature", type=float, default=1.0, help="sampling temperature for rejected responses")
            s.add_argument("--top-p", type=float, default=0.8, help="nucleus for rejected responses")
            s.add_argument("--gen-batch-size", type=int, default=64, help="prompts per sampling / reference batch")
            s.add_argument("--heldout", default=None, help="teacher JSONL for the top-1 agreement measure per round")
            s.add_argument("--heldout-limit", type=int, default=0, help="use only the first N held-out rows (0: all)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        with train.distributed(args):
            return {"sft": cmd_sft, "align": cmd_align}[args.cmd](args)
    except (CheckpointError, data.DataError) as e:
        train.fail(str(e))


if __name__ == "__main__":
    sys.exit(main())
