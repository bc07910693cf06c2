"""Collect a black-box teacher's responses through an OpenAI-compatible chat-completions API.

    python teacher_client.py --prompts prompts.jsonl --out runs/x/teacher.jsonl \
        --base-url http://127.0.0.1:8000/v1 --model proxykd-teacher --concurrency 32

Only the teacher's text is visible (the black-box setting of Proxy-KD), so this is the whole of
our access to it. The job is thousands of paid requests against a service that throttles, fails,
hangs and gets killed mid-run, so the contract is:

- OUT is the cache. One JSON line per distinct request, appended and flushed as each result
  arrives, keyed by `request_hash` (sha256 of everything that changes the answer). A rerun of the
  same command reads OUT and sends only what is missing; a torn last line (kill -9 mid-write) is
  dropped with a warning, garbage lines are reported with their line numbers and set aside.
- Failures go to OUT with `.errors.jsonl` in place of `.jsonl`, rewritten at the end of every run
  with only the keys that still fail, so every input key ends in exactly one of the two files.
- 401/403/404/quota stop the job at once (no further requests); 400/422 fail that item only;
  429, 5xx, timeouts, resets and malformed 200s are retried with capped exponential backoff and
  jitter, honouring Retry-After, under a concurrency limit that halves on 429.

The API key comes only from the environment (TEACHER_API_KEY, else OPENAI_API_KEY); it is sent
in the Authorization header and redacted from anything we record or print.

With --serve-embedded (instead of --base-url) the client starts the embedded teacher
(teacher_server.py) in this process on a free 127.0.0.1 port for the length of the run, and talks
to it as to any endpoint; cache keys name it by its slip rate, not by the port of the day.
"""

import argparse
import concurrent.futures
import contextlib
import json
import os
import sys
import threading
import time
from collections import Counter
from urllib.parse import urlsplit, urlunsplit

from tqdm import tqdm

import data
import teacher_api as api
import teacher_server


# ------------------------------------------------------------------ cache keys

def normalise_base_url(url):
    """Scheme and host lower-cased, default port, user:password@ and trailing slashes dropped:
    spellings of the same endpoint share a cache key, and credentials never reach it."""
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"  # IPv6 literal
    port = parts.port
    if port is not None and (scheme, port) not in {("http", 80), ("https", 443)}:
        host = f"{host}:{port}"
    return urlunsplit((scheme, host, parts.path.rstrip("/"), parts.query, ""))


def sampling_params(temperature=1.0, max_tokens=1024, seed=None):
    """The sampling parameters as they are sent and hashed. Types are fixed here so that
    `--temperature 1` and `--temperature 1.0` are the same request; unset ones are left out."""
    params = {"temperature": float(temperature), "max_tokens": int(max_tokens)}
    if seed is not None:
        params["seed"] = int(seed)
    return params


def request_hash(base_url, model, messages, params, sample_index=0):
    """The cache key: sha256 of canonical JSON of everything that changes the answer.
    Key order, whitespace and URL spelling do not change it; any content does."""
    key = {"base_url": normalise_base_url(base_url), "model": model, "messages": messages,
           "params": params, "sample_index": int(sample_index)}
    return data.content_hash(key, 64)


# ------------------------------------------------------------------ the cache (OUT itself)

def errors_path_for(out_path):
    out_path = os.fspath(out_path)
    stem = out_path[:-len(".jsonl")] if out_path.endswith(".jsonl") else out_path
    return stem + ".errors.jsonl"


def load_cache(out_path, warn=None):
    """The results already in OUT, {request_hash: row}. A torn last line is cut off (a kill -9
    mid-write leaves at most one); lines that do not parse, or lack request_hash/response, are
    reported with their line numbers, treated as missing and moved to OUT + ".rejected" so that
    every line of OUT parses again; a repeated key keeps its first row."""
    warn = warn or (lambda msg: print(msg, file=sys.stderr))
    if not os.path.exists(out_path):
        return {}
    with open(out_path, "rb") as f:
        raw = f.read()
    cache, good, bad, dups = {}, [], [], 0
    lines = raw.split(b"\n")
    torn = lines.pop()  # after the last "\n": empty unless the last write was torn
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        row = _parse_cache_line(line)
        if row is None:
            bad.append((lineno, line))
        elif row["request_hash"] in cache:
            dups += 1
        else:
            cache[row["request_hash"]] = row
            good.append(line + b"\n")
    tail_row = _parse_cache_line(torn) if torn.strip() else None
    if tail_row is not None and tail_row["request_hash"] not in cache:
        # A complete result that only lacks its newline (an edited file): keep it.
        cache[tail_row["request_hash"]] = tail_row
        good.append(torn + b"\n")
        with open(out_path, "ab") as f:
            f.write(b"\n")
        torn = b""
    if torn.strip():
        warn(f"{out_path}:{len(lines) + 1}: dropping a torn last line ({len(torn)} bytes, "
             "no newline; a killed run) - its request will be sent again")
    for lineno, line in bad:
        warn(f"{out_path}:{lineno}: not a result line (expected JSON with request_hash and "
             f"response): {api.snippet(line, 80)} - treated as missing, moved to {out_path}.rejected")
    if dups:
        warn(f"{out_path}: {dups} repeated request_hash line(s); keeping the first of each")
    if bad or dups:
        if bad:
            with open(out_path + ".rejected", "ab") as f:
                f.writelines(line + b"\n" for _, line in bad)
        with data.atomic_path(out_path) as tmp:  # readers see the old file or the new one
            tmp.write_bytes(b"".join(good))
    elif torn.strip():
        # Cut the torn tail in place, so the next append starts on a fresh line.
        with open(out_path, "r+b") as f:
            f.truncate(len(raw) - len(torn))
    return cache


def _parse_cache_line(line):
    try:
        row = json.loads(line)
    except (UnicodeDecodeError, ValueError):
        return None
    if (not isinstance(row, dict) or not isinstance(row.get("request_hash"), str)
            or not isinstance(row.get("response"), str)):
        return None
    return row


class Appender:
    """Append-only JSONL with one line per write() under a lock. Each line is flushed to the OS
    at once, so a kill -9 loses at most the line being written; fsync is batched (at most once a
    second, and at close) because a per-line fsync would cap the job at the disk's sync rate and
    only protects against a power cut, after which a rerun re-requests the last second."""

    def __init__(self, path, fsync_every=1.0):
        self.f = open(path, "a", encoding="utf-8", newline="\n")
        self.lock = threading.Lock()
        self.fsync_every, self.last_sync = fsync_every, time.monotonic()

    def write(self, row):
        line = json.dumps(row, ensure_ascii=False) + "\n"
        with self.lock:
            self.f.write(line)
            self.f.flush()
            if time.monotonic() - self.last_sync >= self.fsync_every:
                os.fsync(self.f.fileno())
                self.last_sync = time.monotonic()

    def close(self):
        with self.lock:
            self.f.flush()
            os.fsync(self.f.fileno())
            self.f.close()


# ------------------------------------------------------------------ the job

class Job:
    """One distinct request: the first input row that asked for it, its messages and sample."""
    __slots__ = ("row", "messages", "params", "sample_index")

    def __init__(self, row, messages, params, sample_index):
        self.row, self.messages, self.params, self.sample_index = row, messages, params, sample_index


def plan(rows, base_url, model, params, samples=1):
    """{request_hash: Job} in input order, and how many (row, sample) pairs were duplicates
    (same messages and parameters as an earlier row: they share its one request and line)."""
    jobs, duplicates = {}, 0
    for row in rows:
        messages = data.messages_of(row)
        for i in range(samples):
            p = dict(params)
            if "seed" in p:  # each sample its own seed, or every sample would be the same text
                p["seed"] += i
            key = request_hash(base_url, model, messages, p, i)
            if key in jobs:
                duplicates += 1
            else:
                jobs[key] = Job(row, messages, p, i)
    return jobs, duplicates


def _prompt_fields(job):
    row = job.row
    fields = {"id": row.get("id")}
    if "prompt" in row:
        fields["prompt"] = row["prompt"]
    else:
        fields["messages"] = job.messages
    if "answer" in row:
        fields["answer"] = row["answer"]
    fields["sample_index"] = job.sample_index
    return fields


def result_row(key, job, model, content, finish, usage, served):
    # flagged: anything but a natural stop (length = cut off, content_filter = censored, tool
    # calls...) is not a clean demonstration; kept in the cache, left out of training by default.
    return {**_prompt_fields(job), "response": content, "finish_reason": finish,
            "flagged": finish != "stop", "model": model, "served_model": served or model,
            **job.params, "usage": usage, "request_hash": key}


def error_row(key, job, failure, attempts):
    return {**_prompt_fields(job), "class": failure.cls, "status": failure.status,
            "message": failure.message, "attempts": attempts, "request_hash": key}


def collect(prompts, out_path, base_url, model, *, concurrency=8, timeout=120.0,
            connect_timeout=10.0, max_retries=6, temperature=1.0, max_tokens=1024, seed=None,
            samples=1, backoff_base=1.0, backoff_max=30.0, max_retry_after=60.0, api_key=None,
            progress=True, warn=None, key_url=None):
    """Get one teacher response per distinct (prompt, sample) into `out_path`; return a summary.

    `prompts` is a JSONL path (read with data.read_prompts) or a list of such rows. The API key
    defaults to the environment. Cache keys name the endpoint by `key_url` (default: base_url).
    Delays are parameters so that tests can make them tiny."""
    t_start = time.monotonic()
    warn = warn or (lambda msg: print(msg, file=sys.stderr))
    out_path = os.fspath(out_path)
    err_path = errors_path_for(out_path)
    rows = data.read_prompts(prompts) if isinstance(prompts, (str, os.PathLike)) else list(prompts)
    jobs, duplicates = plan(rows, key_url or base_url, model,
                            sampling_params(temperature, max_tokens, seed), samples)

    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    cache = load_cache(out_path, warn)
    missing = [k for k in jobs if k not in cache]
    if os.path.exists(err_path):  # last run's failures are retried now; this run writes its own
        os.remove(err_path)
    endpoint = api.Endpoint(base_url, api_key if api_key is not None else api.api_key_from_env(), timeout,
                            connect_timeout)
    fetcher = api.Fetcher(endpoint, api.Retry(max_retries, backoff_base, backoff_max, max_retry_after), concurrency)
    finished = {k: cache[k]["finish_reason"] for k in jobs if k in cache}  # key -> finish_reason
    t_net = time.monotonic()
    try:
        failures = _fetch_missing(fetcher, jobs, missing, model, out_path, err_path, finished, progress)
    finally:
        endpoint.close()
    t_end = time.monotonic()

    still_failing = _write_failures(err_path, jobs, finished, failures)

    net_s = max(t_end - t_net, 1e-9)
    done = len(finished) - (len(jobs) - len(missing))
    return {
        "rows": len(rows), "requests": len(jobs), "duplicates": duplicates,
        "cached": len(jobs) - len(missing), "done": done, "failed": len(still_failing),
        "failed_by_class": dict(Counter(r["class"] for r in still_failing)),
        "flagged": dict(Counter(f for f in finished.values() if f != "stop")),
        "requests_sent": fetcher.requests_sent,
        "attempt_failures": dict(fetcher.attempt_failures),
        "lowest_concurrency": fetcher.limit.lowest,
        "results_per_s": done / net_s if missing else 0.0,
        "requests_per_s": fetcher.requests_sent / net_s if missing else 0.0,
        "seconds": t_end - t_start,
        "fatal": None if fetcher.fatal is None else
                 {"class": fetcher.fatal.cls, "status": fetcher.fatal.status,
                  "message": fetcher.fatal.message},
        "out": out_path, "errors": err_path if still_failing else None,
    }


def _fetch_missing(fetcher, jobs, missing, model, out_path, err_path, finished, progress):
    """Send the missing requests through a pool of fetcher.fetch workers, appending each result
    to OUT (and each failure to the errors file) as it arrives; `finished` gains the results.
    Returns this run's failures, {key: (Failure, attempts)}."""
    cached = len(jobs) - len(missing)
    failures = {}
    bar = tqdm(total=len(jobs), initial=len(finished), unit="req", desc="teacher",
               disable=not progress, file=sys.stderr, dynamic_ncols=True)
    out, errors = Appender(out_path), Appender(err_path) if missing else None
    try:
        with concurrent.futures.ThreadPoolExecutor(fetcher.limit.maximum, "teacher") as pool:
            futures = {pool.submit(fetcher.fetch, api.request_body(model, jobs[k].messages, jobs[k].params)): k
                       for k in missing}
            try:
                for fut in concurrent.futures.as_completed(futures):
                    key = futures[fut]
                    status, value, attempts = fut.result()
                    if status == "ok":
                        content, finish, usage, served = value
                        out.write(result_row(key, jobs[key], model, content, finish, usage, served))
                        finished[key] = finish
                    else:
                        failures[key] = (value, attempts)
                        errors.write(error_row(key, jobs[key], value, attempts))
                    bar.update(1)
                    bar.set_postfix(done=len(finished) - cached, cached=cached, failed=len(failures),
                                    refresh=False)
            finally:
                # Whatever ended the loop (a fatal error, Ctrl-C), the queued jobs see the flag
                # and return without sending; in-flight ones end within the timeout.
                fetcher.stop.set()
    finally:
        bar.close()
        out.close()
        if errors:
            errors.close()
    return failures


def _write_failures(err_path, jobs, finished, failures):
    """Rewrite the errors file with every key not in OUT, so each key is now in exactly one of the
    two files; keys the loop never reached (the job stopped early) are recorded as cancelled."""
    never = api.Failure(api.CANCELLED, "not sent: the job stopped before this request")
    still_failing = [error_row(k, jobs[k], *failures.get(k, (never, 0))) for k in jobs if k not in finished]
    if still_failing:
        data.write_jsonl(err_path, still_failing)
    elif os.path.exists(err_path):
        os.remove(err_path)
    return still_failing


def format_summary(s):
    lines = [f"teacher_client: {s['requests']} requests ({s['rows']} rows, {s['duplicates']} "
             f"duplicates): {s['done']} done, {s['cached']} cached, {s['failed']} failed; "
             f"{s['requests_sent']} HTTP requests in {s['seconds']:.1f} s "
             f"({s['results_per_s']:.1f} results/s)"]
    if s["flagged"]:
        lines.append("  flagged (kept, excluded from training by default): "
                     + ", ".join(f"{k}: {v}" for k, v in sorted(s["flagged"].items())))
    if s["attempt_failures"]:
        lines.append("  failed attempts (retried where transient): "
                     + ", ".join(f"{k}: {v}" for k, v in sorted(s["attempt_failures"].items()))
                     + f"; concurrency went down to {s['lowest_concurrency']}")
    if s["fatal"]:
        f = s["fatal"]
        lines.append(f"  STOPPED at HTTP {f['status']} ({f['class']}): {f['message']}\n"
                     "  no further requests were sent; fix the key, quota, URL or model and rerun")
    if s["failed"]:
        lines.append(f"  {s['failed']} of {s['requests']} requests failed ("
                     + ", ".join(f"{k}: {v}" for k, v in sorted(s["failed_by_class"].items()))
                     + f"), listed in {s['errors']}; rerun the same command to retry them")
    lines.append(f"  results in {s['out']}")
    return "\n".join(lines)


@contextlib.contextmanager
def serve_embedded(model, slip_rate=0.0):
    """The embedded teacher (teacher_server.py) on a free 127.0.0.1 port for the length of the
    block: yields (base URL, the URL its cache keys use). It is stopped on the way out, also on an
    error or Ctrl-C. The key URL names the teacher by its slip rate, which changes its answers,
    not by the port, which changes every run: a rerun finds its cache."""
    server, thread, url = teacher_server.start_server(0, model=model, slip_rate=slip_rate)
    try:
        yield url, f"embedded://teacher_server?slip_rate={slip_rate:g}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", required=True, help="input JSONL: id, prompt or messages, optional answer")
    ap.add_argument("--out", required=True,
                    help="output JSONL, also the cache: rerunning the same command sends only what is missing")
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--base-url", help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    where.add_argument("--serve-embedded", action="store_true",
                       help="start the embedded teacher in this process for the run and ask it")
    ap.add_argument("--slip-rate", type=float, default=0.0,
                    help="with --serve-embedded: chance that an answer makes one arithmetic slip")
    ap.add_argument("--model", required=True, help="model name sent with every request")
    ap.add_argument("--concurrency", type=int, default=8, help="worker threads (the most requests in flight)")
    ap.add_argument("--timeout", type=float, default=120.0,
                    help="seconds one attempt may take in all, including a slowly dripping body")
    ap.add_argument("--max-retries", type=int, default=6, help="retries of a transient failure before giving up on it")
    ap.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    ap.add_argument("--max-tokens", type=int, default=1024, help="completion token limit (paper: max length 1024)")
    ap.add_argument("--seed", type=int, default=None, help="sampling seed sent to the API (sample i gets seed+i); unset: not sent")
    ap.add_argument("--samples", type=int, default=1, help="responses per prompt, each its own request and line")
    ap.add_argument("--max-retry-after", type=float, default=60.0,
                    help="longest Retry-After honoured; a longer one fails the item for a later rerun")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    if args.concurrency < 1 or args.max_retries < 0 or args.samples < 1 or args.timeout <= 0:
        ap.error("--concurrency and --samples must be >= 1, --max-retries >= 0, --timeout > 0")
    if (args.slip_rate and not args.serve_embedded) or not 0 <= args.slip_rate <= 1:
        ap.error("--slip-rate is a probability, and only for --serve-embedded")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        rows = data.read_prompts(args.prompts)
    except (data.DataError, OSError) as e:
        print(f"teacher_client: {e}", file=sys.stderr)
        return 2
    endpoint = (serve_embedded(args.model, args.slip_rate) if args.serve_embedded
                else contextlib.nullcontext((args.base_url, args.base_url)))
    from train import timed  # the stages' wall-time record (OUT's directory/timing.json, phase: OUT's name)
    try:
        name = os.path.splitext(os.path.basename(args.out))[0]
        with timed(os.path.dirname(args.out) or ".", name, setup=f"{name} setup"), endpoint as (base_url, key_url):
            summary = collect(rows, args.out, base_url, args.model, key_url=key_url,
                              concurrency=args.concurrency, timeout=args.timeout,
                              max_retries=args.max_retries, temperature=args.temperature,
                              max_tokens=args.max_tokens, seed=args.seed, samples=args.samples,
                              max_retry_after=args.max_retry_after, progress=not args.no_progress)
    except KeyboardInterrupt:
        print(f"teacher_client: interrupted; {args.out} holds every result so far, rerun the "
              "same command to finish", file=sys.stderr)
        return 130
    except OSError as e:  # OUT not writable, disk full: nothing already written is lost
        print(f"teacher_client: {e}", file=sys.stderr)
        return 2
    print(format_summary(summary), file=sys.stderr)
    if summary["fatal"]:
        return 3
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
