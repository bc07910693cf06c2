"""Results tables: `summary` after `make proxy` / `make student`, `collect` for `make table` (every row of
the paper's comparison over several seeds, mean ± std, as markdown and a PNG plot), and `study` for
`make study` (Proxy-KD's gain over black-box KD as one setting moves away from the main job's).

    python table.py summary --run runs/seed0 --bases runs/bases --teacher runs/teacher
    python table.py collect --runs runs/seed0 runs/seed1 runs/seed2 --bases runs/bases --out runs/table.md
    python table.py study --dir runs/study --alpha 1 --gamma 0.4 --rounds 2 --slip 0.1 --out runs/study/study.md
    python table.py numbers --model runs/seed0/proxy --data runs/teacher/teacher_eval.jsonl
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

# (row label, directory under the run (or "bases:NAME"), what it is). The order is the paper's Table 1/2.
ROWS = [
    ("proxy base (before alignment)", "bases:proxy", "proxy"),
    ("proxy after warm-up SFT", "proxy_sft", "proxy"),
    ("proxy after K rounds of NLL alone (w/o DPO; the TAKD assistant)", "proxy_nodpo", "proxy"),
    ("proxy after alignment (SFT + K rounds of NLL + DPO)", "proxy", "proxy"),
    ("student base", "bases:student", "student"),
    ("black-box KD (NLL on D_s)", "student_blackbox", "student"),
    ("black-box KD on all teacher data", "student_blackbox_all", "student"),
    ("white-box KD from the proxy base (its own sequences)", "student_whitebox_base", "student"),
    ("white-box KD from the aligned proxy (its own sequences)", "student_whitebox_aligned", "student"),
    ("TAKD (KD from the w/o-DPO proxy, w = 1)", "student_takd", "student"),
    ("Proxy-KD w/o alignment", "student_noalign", "student"),
    ("Proxy-KD w/o DPO", "student_nodpo", "student"),
    ("Proxy-KD w/o weighting", "student_noweight", "student"),
    ("Proxy-KD", "student_proxykd", "student"),
]


def _record(path: Path) -> dict | None:
    """An eval JSON ({"accuracy": ...}: a stage's eval.json, `evaluation.py --record`'s), or None before it exists."""
    return json.loads(path.read_text()) if path.exists() else None


def _acc(r: dict | None) -> float | None:
    """The accuracy an eval record holds, None without a record."""
    return None if r is None else r["accuracy"]


def paired_difference(a: dict, b: dict) -> tuple[float, float, int]:
    """Accuracy of a minus that of b on the same problems (two eval records, as evaluation.eval_record writes
    them) -> (the difference, its standard error, the number of groups).

    The standard error is the cluster-robust one of a mean: with d_i = a_i - b_i, D their mean over the N problems
    and S_g the sum of d_i - D over group g's problems, se = sqrt(G / (G - 1) * sum_g S_g^2) / N. Groups of problems
    that are right or wrong together are one sample each, so a world with few distinct problems gets the wide
    interval it should: two models that differ only in the last bits of their arithmetic differ by about this
    much. With one problem a group it is the paired t-test's standard error."""
    if a.get("groups") != b.get("groups") or len(a.get("correct", [])) != len(a.get("groups") or []):
        raise ValueError("paired_difference: the two eval records are not over the same problems")
    n = len(a["correct"])
    if n == 0:
        raise ValueError("paired_difference: no problems")
    d = [x - y for x, y in zip(a["correct"], b["correct"])]
    mean = sum(d) / n
    sums: dict[str, float] = {}
    for g, di in zip(a["groups"], d):
        sums[g] = sums.get(g, 0.0) + (di - mean)
    G = len(sums)
    se = (G / (G - 1) * sum(s * s for s in sums.values())) ** 0.5 / n if G > 1 else 0.0
    return mean, se, G


def row_record(run: Path, bases: Path, where: str) -> dict | None:
    """A row's eval.json (see ROWS for `where`), or None before its stage has run."""
    d = bases / where.split(":", 1)[1] if where.startswith("bases:") else run / where
    return _record(d / "eval.json")


def accuracy(run: Path, bases: Path, where: str) -> float | None:
    return _acc(row_record(run, bases, where))


def paired_records(ra: dict | None, rb: dict | None) -> tuple[float, float, int] | None:
    """paired_difference of two eval records, or None where either is missing, has no per-problem scores (written
    before they were kept) or is over other problems."""
    if not (ra and rb and "correct" in ra and "correct" in rb and ra.get("groups") == rb.get("groups")):
        return None
    return paired_difference(ra, rb)


def paired(run: Path, bases: Path, a: str, b: str) -> tuple[float, float, int] | None:
    """paired_records of rows a and b of one run (see ROWS)."""
    return paired_records(row_record(run, bases, a), row_record(run, bases, b))


# Differences the summary states with their standard error: (label, row, minus row), rows as in ROWS.
GAINS = [("Proxy-KD − black-box KD", "student_proxykd", "student_blackbox"),
         ("aligned proxy − black-box KD", "proxy", "student_blackbox")]


def agreement(run: Path) -> dict[int, float]:
    """Top-1 agreement with held-out teacher text after each alignment round (round 0 = before)."""
    f = run / "proxy" / "metrics.jsonl"
    out = {}
    if f.exists():
        for line in f.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if r.get("stage") == "round_end" and "agreement" in r:
                out[r["round"]] = r["agreement"]
    return out


def summary(run: Path, bases: Path, teacher: Path | None = None) -> str:
    """The run's accuracies so far, then its wall time by stage (also written to RUN/timing.json)."""
    lines = [f"results in {run} (accuracy on the held-out eval set, greedy decoding)", ""]
    for label, where, _ in ROWS:
        acc = accuracy(run, bases, where)
        if acc is not None:
            lines.append(f"  {label:<64} {100 * acc:6.1f} %")
    for label, a, b in GAINS:
        ra, rb = row_record(run, bases, a), row_record(run, bases, b)
        if (g := paired_records(ra, rb)) is not None:
            d, se, G = g
            lines.append(f"  {label:<64} {100 * d:+6.1f} ± {100 * se:.1f} points (1 s.e.: {ra['n']} problems, "
                         f"{G} groups of shared numbers)")
    ag = agreement(run)
    if ag:
        first, last = min(ag), max(ag)
        lines.append(f"  {'proxy top-1 agreement with the teacher':<64} {100 * ag[first]:6.1f} % -> "
                     f"{100 * ag[last]:.1f} % after {last} rounds")
    stages = stage_timings(run, bases, teacher)
    if stages:
        record = timing_record(stages)
        run.mkdir(parents=True, exist_ok=True)
        (run / TIMING).write_text(json.dumps(record, indent=2) + "\n")
        lines += ["", f"wall time by stage, seconds (each stage's {TIMING}; all of them in {run / TIMING})"]
        lines += format_timing(record)
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ wall time

TIMING = "timing.json"  # train.timed's file: {phase: seconds} in each stage's output directory


def read_phases(path: Path) -> dict[str, float]:
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return {k: float(v) for k, v in d.items() if isinstance(v, (int, float))} if isinstance(d, dict) else {}


def stage_timings(run: Path, bases: Path, teacher: Path | None = None) -> dict[str, dict[str, float]]:
    """Every stage's timing.json under the bases, the teacher directory and the run -> {stage: {phase:
    seconds}}, in the order the stages last wrote them (the order they ran). Stages are named by their
    directory: "bases/proxy", "teacher", and the run's own ("proxy_sft", "proxy", "cache_proxy", ...)."""
    found, seen = [], {(run / TIMING).resolve()}  # the gathered breakdown is not a stage
    for root, prefix in ((bases, "bases"), (teacher, "teacher"), (run, "")):
        if root is None or not root.is_dir():
            continue
        for f in sorted(root.rglob(TIMING)):
            if f.resolve() in seen:  # a root inside another (bases under the run) counts once
                continue
            seen.add(f.resolve())
            rel = f.parent.relative_to(root).as_posix()
            name = "/".join(x for x in (prefix, "" if rel == "." else rel) if x) or root.name
            phases = read_phases(f)
            if phases:
                found.append((f.stat().st_mtime, name, phases))
    return {name: phases for _, name, phases in sorted(found, key=lambda x: x[0])}


def timing_record(stages: dict[str, dict[str, float]]) -> dict:
    """RUN/timing.json: per stage its phases and their sum, and the total (wall seconds of the phases the
    stages timed: interpreter start-up and imports, ~2 s a process, are not in them)."""
    per = {s: {"seconds": round(sum(p.values()), 3), "phases": p} for s, p in stages.items()}
    return {"stages": per, "total_seconds": round(sum(v["seconds"] for v in per.values()), 3)}


def format_timing(record: dict) -> list[str]:
    """One line per stage, its phases after it; phases named "group/phase" (an alignment round's sample,
    reference, train and eval) get a line per group under their stage."""
    lines = []
    for stage, v in record["stages"].items():
        groups: dict[str, dict[str, float]] = {}
        for phase, sec in v["phases"].items():
            group, _, name = phase.rpartition("/")
            groups.setdefault(group, {})[name] = sec
        flat = groups.pop("", {})
        lines.append(f"  {stage:<28} {v['seconds']:8.1f}   " + " · ".join(f"{k} {x:.1f}" for k, x in flat.items()))
        for group, phases in groups.items():
            lines.append(f"    {group:<26} {sum(phases.values()):8.1f}   "
                         + " · ".join(f"{k} {x:.1f}" for k, x in phases.items()))
    lines.append(f"  {'total':<28} {record['total_seconds']:8.1f}")
    return [line.rstrip() for line in lines]


def mean_std(xs: list[float]) -> str:
    if not xs:
        return "—"
    m = statistics.mean(xs)
    s = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{100 * m:.1f} ± {100 * s:.1f}"


def collect(runs: list[Path], bases: Path, out: Path, plot: Path | None, note: str = "") -> str:
    rows = []
    for label, where, kind in ROWS:
        accs = [a for a in (accuracy(r, bases, where) for r in runs) if a is not None]
        rows.append((label, kind, accs))
    md = [f"| method | model | accuracy % (mean ± std over {len(runs)} seeds) | n |", "| --- | --- | --- | --- |"]
    md += [f"| {label} | {kind} | {mean_std(accs)} | {len(accs)} |" for label, kind, accs in rows]
    gains = [(label, [paired(r, bases, a, b) for r in runs]) for label, a, b in GAINS]
    gains = [(label, [(run, g) for run, g in zip(runs, gs) if g is not None]) for label, gs in gains]
    if any(gs for _, gs in gains):
        md += ["", "| difference | per seed, points ± 1 s.e. | mean ± std over seeds |", "| --- | --- | --- |"]
        md += [f"| {label} | " + " / ".join(f"{run.name} {100 * d:+.1f} ± {100 * se:.1f}" for run, (d, se, _) in gs)
               + f" | {mean_std([d for _, (d, _, _) in gs])} |" for label, gs in gains if gs]
    ags = [agreement(r) for r in runs]
    rounds = sorted(set().union(*ags)) if ags else []
    if rounds:
        md += ["", "| round | proxy top-1 agreement % (mean ± std) |", "| --- | --- |"]
        md += [f"| {k} | {mean_std([a[k] for a in ags if k in a])} |" for k in rounds]
    text = (note + "\n\n" if note else "") + "\n".join(md) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    if plot is not None:
        draw(rows, ags, rounds, plot)
    return text


def draw(rows, ags, rounds, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [2.2, 1]})
    shown = [(label, accs) for label, _, accs in rows if accs]
    ys = range(len(shown))
    a.barh(list(ys), [100 * statistics.mean(x) for _, x in shown],
           xerr=[100 * (statistics.stdev(x) if len(x) > 1 else 0) for _, x in shown], color="#4c72b0")
    a.set_yticks(list(ys), [label for label, _ in shown])
    a.invert_yaxis()
    a.set_xlabel("eval accuracy (%)")
    a.set_title("accuracy by method")
    if rounds:
        m = [100 * statistics.mean([g[k] for g in ags if k in g]) for k in rounds]
        b.plot(rounds, m, marker="o")
        b.set_xlabel("alignment round (0 = before)")
        b.set_ylabel("top-1 agreement with the teacher (%)")
        b.set_title("proxy agreement by round")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# The study's axes: (directory prefix, what varies, the main job's value of it, log-scaled plot).
AXES = [("round", "proxy strength: alignment rounds (accuracy of that proxy)", "rounds", False),
        ("alpha", "alpha (weight of the KL)", "alpha", True),
        ("gamma", "gamma (sharpness of the sample weights)", "gamma", True),
        ("slip", "teacher slip rate", "slip", False)]


def study_points(study: Path, main: dict) -> list[dict]:
    """Every point of `make study` found under `study`: {axis, value, proxy, blackbox, proxykd} (accuracies on
    the validation split, None where missing). The main job's run is the point each axis shares (its value
    in `main`: alpha, gamma, rounds, slip); a slip-rate point is a whole run with its own teacher, so
    it has its own aligned proxy too (scored on validation: the slip runs evaluate on it). The proxy column is
    filled where the proxy differs along the axis (rounds, slip rate); alpha and gamma share the main job's."""
    def students(pk: dict | None, bb: dict | None) -> dict:  # a point's student columns, from their records
        return {"blackbox": _acc(bb), "proxykd": _acc(pk), "paired": paired_records(pk, bb)}

    ref_bb = _record(study / "ref" / "blackbox.json")
    ref = students(_record(study / "ref" / "proxykd.json"), ref_bb)
    points = []
    for prefix, _, key, _ in AXES:
        values = {float(main[key]): dict(ref, proxy=None)}
        for d in study.glob(f"{prefix}_*"):
            v = float(d.name.split("_", 1)[1])
            if prefix == "slip":
                run = d / "run"
                values[v] = {"proxy": _acc(_record(run / "proxy" / "eval.json")),
                             **students(_record(run / "student_proxykd" / "eval.json"),
                                        _record(run / "student_blackbox" / "eval.json"))}
            else:
                values[v] = {"proxy": None, **students(_record(d / "eval.json"), ref_bb)}
        if prefix == "round":  # a proxy already scored whose student is not trained yet
            for f in study.glob("proxy_round_*.json"):
                values.setdefault(float(f.stem.rsplit("_", 1)[1]),
                                  {"proxy": None, "blackbox": ref["blackbox"], "proxykd": None, "paired": None})
            for v, point in values.items():
                point["proxy"] = _acc(_record(study / f"proxy_round_{int(v):02d}.json"))
        if prefix == "slip":  # the main job's own slip rate: its aligned proxy is the last round's
            values[float(main["slip"])]["proxy"] = _acc(_record(study / f"proxy_round_{int(main['rounds']):02d}.json"))
        points += [{"axis": prefix, "value": v, **values[v]} for v in sorted(values)]
    return points


def study(study_dirs: list[Path], main: dict, out: Path, plot: Path | None, note: str = "") -> str:
    """The study's table (and plot) over one study directory per seed. With one, each cell is that seed's
    accuracy and the gain has its standard error on the validation problems (paired_difference); with several,
    mean ± std over the seeds that have the point, the gain paired seed by seed (each seed's Proxy-KD minus its
    own black-box KD), and a column saying how many seeds it averages."""
    label = {prefix: what for prefix, what, _, _ in AXES}
    many = len(study_dirs) > 1

    def cell(xs):  # accuracies of one point over the seeds that have it
        return "—" if not xs else mean_std(xs) if many else f"{100 * xs[0]:.1f}"

    head = "| what varies | value | proxy % | black-box KD % | Proxy-KD % | gain (points) |"
    md = [head + (" seeds |" if many else ""), "| --- " * (7 if many else 6) + "|"]
    per_seed = [study_points(d, main) for d in study_dirs]
    order = [prefix for prefix, _, _, _ in AXES]
    keys = sorted({(p["axis"], p["value"]) for ps in per_seed for p in ps}, key=lambda k: (order.index(k[0]), k[1]))
    points = []
    for axis, value in keys:
        same = [p for ps in per_seed for p in ps if (p["axis"], p["value"]) == (axis, value)]
        col = {c: [p[c] for p in same if p[c] is not None] for c in ("proxy", "blackbox", "proxykd")}
        gains = [p["proxykd"] - p["blackbox"] for p in same if None not in (p["blackbox"], p["proxykd"])]
        p = {"axis": axis, "value": value, "proxy": statistics.mean(col["proxy"]) if col["proxy"] else None,
             "gain": statistics.mean(gains) if gains else None,
             "gain_std": statistics.stdev(gains) if len(gains) > 1 else 0.0}
        points.append(p)
        gain = "—" if not gains else f"{100 * p['gain']:+.1f}" + (
            f" ± {100 * p['gain_std']:.1f}" if len(gains) > 1 else "")  # the per-seed gains, in points
        if not many and gains and same[0].get("paired"):  # one seed: the gain's standard error on its problems
            gain += f" ± {100 * same[0]['paired'][1]:.1f} (1 s.e.)"
        md.append(f"| {label[axis]} | {value:g} | {cell(col['proxy'])} | {cell(col['blackbox'])} | "
                  f"{cell(col['proxykd'])} | {gain} |" + (f" {len(gains)} |" if many else ""))
    text = (note + "\n\n" if note else "") + "\n".join(md) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    if plot is not None:
        draw_study(points, plot)
    return text


def draw_study(points, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(AXES), figsize=(4.2 * len(AXES), 3.8), sharey=True)
    for ax, (prefix, what, _, log) in zip(axes, AXES):
        ps = [p for p in points if p["axis"] == prefix and p["gain"] is not None]
        xs = [100 * p["proxy"] if prefix == "round" and p["proxy"] is not None else p["value"] for p in ps]
        ax.errorbar(xs, [100 * p["gain"] for p in ps], yerr=[100 * p["gain_std"] for p in ps], marker="o",
                    capsize=3)
        for x, p in zip(xs, ps):
            if prefix == "round":
                ax.annotate(f"round {p['value']:g}", (x, 100 * p["gain"]), fontsize=8)
        ax.axhline(0, color="grey", lw=0.8)
        if log:
            ax.set_xscale("log")
        ax.set_xlabel("proxy accuracy on validation (%)" if prefix == "round" else what)
        ax.set_title(what.split(":")[0].split(" (")[0])
    axes[0].set_ylabel("Proxy-KD − black-box KD (points, validation)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def number_accuracy(model_dir: Path, teacher_path: Path, limit: int = 100) -> dict:
    """Where a model fails on the teacher's solutions, teacher-forced top-1 over response tokens: every
    digit; whole numbers copied from the prompt; whole numbers right after "=" (a step's result); the
    other tokens. A number counts as right when all its digits are."""
    import re

    import torch

    import data
    from model import Llama
    tok = data.load_tokenizer(model_dir)
    fmt = data.guess_format(model_dir)
    model = Llama.from_pretrained(model_dir).eval()
    counts = {k: [0, 0] for k in ("digits", "copied numbers", "step results", "other tokens")}
    for r in data.read_teacher(teacher_path)[:limit]:
        ids, labels = data.encode_pair(tok, data.messages_of(r), r["response"], fmt)
        with torch.no_grad():
            pred = model(torch.tensor([ids]))[0, :-1].argmax(-1).tolist()
        ok = [None] + [pred[t - 1] == ids[t] for t in range(1, len(ids))]  # ok[t]: token t predicted
        pieces = [tok.id_to_token(i) for i in ids]
        in_prompt = set(re.findall(r"\d+", r["prompt"]))
        t = next(i for i, lab in enumerate(labels) if lab != data.IGNORE_INDEX)
        while t < len(ids):
            if not pieces[t].isdigit():
                counts["other tokens"][0] += ok[t]
                counts["other tokens"][1] += 1
                t += 1
                continue
            u = t
            while u < len(ids) and pieces[u].isdigit():
                counts["digits"][0] += ok[u]
                counts["digits"][1] += 1
                u += 1
            before = tok.decode(ids[max(0, t - 3):t]).rstrip()
            kind = "step results" if before.endswith("=") else "copied numbers" if tok.decode(ids[t:u]) in in_prompt else None
            if kind:
                counts[kind][0] += all(ok[t:u])
                counts[kind][1] += 1
            t = u
    return {k: (a / n if n else float("nan"), n) for k, (a, n) in counts.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("summary", help="print the accuracies one run has so far")
    s.add_argument("--run", required=True, help="run directory (runs/seedN)")
    s.add_argument("--bases", required=True, help="directory of the pretrained bases")
    s.add_argument("--teacher", default=None, help="teacher directory, whose collection time joins the breakdown")
    c = sub.add_parser("collect", help="mean ± std over several runs as markdown (+ a PNG plot)")
    c.add_argument("--runs", nargs="+", required=True, help="run directories, one per seed")
    c.add_argument("--bases", required=True, help="directory of the pretrained bases")
    c.add_argument("--out", required=True, help="markdown file to write")
    c.add_argument("--plot", default=None, help="PNG to draw (needs matplotlib)")
    c.add_argument("--note", default="", help="a line above the table (command, machine)")
    st = sub.add_parser("study", help="Proxy-KD's gain over black-box KD at every point of make study")
    st.add_argument("--dir", required=True, action="append",
                    help="a study directory (runs/study); repeat it, one per seed, for mean ± std over seeds")
    st.add_argument("--alpha", type=float, required=True, help="the main job's alpha")
    st.add_argument("--gamma", type=float, required=True, help="the main job's gamma")
    st.add_argument("--rounds", type=int, required=True, help="the main job's alignment rounds K")
    st.add_argument("--slip", type=float, required=True, help="the main job's teacher slip rate (SLIP_RATE)")
    st.add_argument("--out", required=True, help="markdown file to write")
    st.add_argument("--plot", default=None, help="PNG to draw (needs matplotlib)")
    st.add_argument("--note", default="", help="a line above the table (command, machine)")
    cp = sub.add_parser("compare", help="accuracy of A minus B on the same problems, with its standard error")
    cp.add_argument("a", help="eval record of A: a stage's eval.json, or evaluation.py --record's")
    cp.add_argument("b", help="eval record of B, over the same problems")
    n = sub.add_parser("numbers", help="teacher-forced accuracy on digits, copied numbers and step results")
    n.add_argument("--model", required=True, help="HF-layout checkpoint directory")
    n.add_argument("--data", required=True, help="teacher JSONL (e.g. runs/teacher/teacher_eval.jsonl)")
    n.add_argument("--limit", type=int, default=100, help="use the first N rows")
    args = p.parse_args(argv)
    if args.cmd == "numbers":
        for k, (acc, count) in number_accuracy(Path(args.model), Path(args.data), args.limit).items():
            print(f"  {k:<16} {100 * acc:5.1f} %  of {count}")
        return 0
    if args.cmd == "compare":
        ra, rb = (json.loads(Path(f).read_text()) for f in (args.a, args.b))
        if "correct" not in ra or "correct" not in rb:
            print("error: an eval record without per-problem scores (written before they were kept); "
                  "rerun evaluation.py --record", file=sys.stderr)
            return 2
        try:
            d, se, G = paired_difference(ra, rb)
        except ValueError as e:
            print(f"error: {args.a} vs {args.b}: {e}", file=sys.stderr)
            return 2
        print(f"A {100 * ra['accuracy']:.1f} %, B {100 * rb['accuracy']:.1f} %, "
              f"A − B {100 * d:+.1f} ± {100 * se:.1f} points (1 s.e.; {ra['n']} problems in {G} groups of shared "
              f"numbers)")
        return 0
    if args.cmd == "study":
        main_job = {"alpha": args.alpha, "gamma": args.gamma, "rounds": args.rounds, "slip": args.slip}
        print(study([Path(d) for d in args.dir], main_job,
                    Path(args.out), Path(args.plot) if args.plot else None, args.note))
        return 0
    if args.cmd == "summary":
        print(summary(Path(args.run), Path(args.bases), Path(args.teacher) if args.teacher else None))
    else:
        print(collect([Path(r) for r in args.runs], Path(args.bases), Path(args.out),
                      Path(args.plot) if args.plot else None, args.note))
    return 0


if __name__ == "__main__":
    sys.exit(main())
