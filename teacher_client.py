"""Collect a black-box teacher's responses through an OpenAI-compatible chat-completions API.

    python teacher_client.py --prompts prompts.jsonl --out runs/x/teacher.jsonl \
        --base-url http://127.0.0.1:8000/v1 --model proxykd-teacher --concurrency 32

Only the teacher's text is visible (the black-box setting of Proxy-KD), so this is the whole of
our access to it. The job is thousands of paid requests against a service that throttles, fails,
hangs and gets killed mid-run, so the contract is ../shared/RELIABILITY.md:

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
"""

import argparse
import concurrent.futures
import email.utils
import hashlib
import json
import os
import random
import sys
import threading
import time
from collections import Counter
from urllib.parse import urlsplit, urlunsplit

import requests
import urllib3
from tqdm import tqdm

# Error classes. FATAL stops the whole job: every further request would fail the same way and
# some of them cost money. PERMANENT fails one item without retrying it. Everything else is
# transient: retried within the run, and a rerun tries again.
FATAL = {"unauthorized", "forbidden", "not_found", "insufficient_quota"}
PERMANENT = {"bad_request", "unexpected_status"}
TRANSIENT = {"rate_limited", "server_error", "timeout", "connection_error", "invalid_response"}
CANCELLED = "cancelled"  # never attempted (or abandoned) because the job stopped

FLAG_FINISH = {"length", "content_filter"}  # kept, but not clean training data
INVALID_RETRIES = 2      # a malformed 200 is usually systematic: retry it, but not for long
MAX_BODY = 64 << 20      # no completion is this large; refuse rather than fill memory


class Failure(Exception):
    """One failed attempt, with its class and, for 429/503, how long the server asked us to wait."""

    def __init__(self, cls, message, status=None, retry_after=None):
        super().__init__(message)
        self.cls, self.message, self.status, self.retry_after = cls, message, status, retry_after


# ------------------------------------------------------------------ keys and classification

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


def _canonical(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def request_hash(base_url, model, messages, params, sample_index=0):
    """The cache key: sha256 of canonical JSON of everything that changes the answer.
    Key order, whitespace and URL spelling do not change it; any content does."""
    key = {"base_url": normalise_base_url(base_url), "model": model, "messages": messages,
           "params": params, "sample_index": int(sample_index)}
    return hashlib.sha256(_canonical(key).encode("utf-8")).hexdigest()


def request_body(model, messages, params):
    """The JSON body POSTed to /chat/completions (one choice per request: samples are separate
    requests with their own keys, so each can be cached and retried on its own)."""
    return {"model": model, "messages": messages, **params}


def classify(status, body=b""):
    """The error class of a non-200 response. `body` is only looked at to tell a 429 that means
    "slow down" from one that means "out of money" (`insufficient_quota`, OpenAI's spelling)."""
    if status == 401:
        return "unauthorized"
    if status == 403:
        return "forbidden"
    if status == 404:  # wrong base URL or model name: every request would get it
        return "not_found"
    if status == 402 or (status == 429 and b"insufficient_quota" in (body or b"")):
        return "insufficient_quota"
    if status == 429:
        return "rate_limited"
    if status == 408:
        return "timeout"
    if status >= 500:
        return "server_error"
    if status >= 400:  # 400 context length, 413, 422 validation: this item will never succeed
        return "bad_request"
    return "unexpected_status"  # 1xx/3xx to a POST: a misconfigured endpoint, not worth retrying


def retry_after_seconds(headers):
    """Seconds the server asked us to wait: `retry-after-ms` (OpenAI, Azure) first, then
    `retry-after` as seconds or an HTTP date. None when absent or unreadable."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def parse_completion(raw):
    """(content, finish_reason, usage, served model) of a 200 body, or Failure("invalid_response").
    Every shape a broken proxy or gateway has been seen to return is checked here, so nothing
    downstream can hit an IndexError or cache a None."""
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise Failure("invalid_response", f"200 with a body that is not JSON: {_snippet(raw)}")
    choices = doc.get("choices") if isinstance(doc, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise Failure("invalid_response", f"200 without choices: {_snippet(raw)}")
    message = choices[0].get("message")
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, str):
        raise Failure("invalid_response", f"200 whose message content is not text: {_snippet(raw)}")
    finish = choices[0].get("finish_reason")
    if not isinstance(finish, str) or not finish:
        raise Failure("invalid_response", f"200 without a finish_reason: {_snippet(raw)}")
    usage = doc.get("usage") if isinstance(doc.get("usage"), dict) else None
    served = doc.get("model") if isinstance(doc.get("model"), str) else None
    return content, finish, usage, served


def _snippet(raw, n=200):
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    text = " ".join(text.split())
    return text[:n] + ("..." if len(text) > n else "") if text else "(empty body)"


def api_key_from_env():
    return os.environ.get("TEACHER_API_KEY") or os.environ.get("OPENAI_API_KEY") or None


# ------------------------------------------------------------------ the cache (OUT itself)

def errors_path_for(out_path):
    out_path = os.fspath(out_path)
    stem = out_path[:-len(".jsonl")] if out_path.endswith(".jsonl") else out_path
    return stem + ".errors.jsonl"


def _fsync_replace(path, lines):
    """Write `lines` to a temporary file, fsync it, rename it over `path`: readers see the old
    file or the new one, never half of one, whatever happens to this process."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(lines)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
             f"response): {_snippet(line, 80)} - treated as missing, moved to {out_path}.rejected")
    if dups:
        warn(f"{out_path}: {dups} repeated request_hash line(s); keeping the first of each")
    if bad or dups:
        if bad:
            with open(out_path + ".rejected", "ab") as f:
                f.writelines(line + b"\n" for _, line in bad)
        _fsync_replace(out_path, [line.decode("utf-8") for line in good])
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


# ------------------------------------------------------------------ concurrency and retries

class AdaptiveLimit:
    """How many requests may be in flight. Halves on a 429 and grows by one after `limit`
    successes in a row (AIMD, as TCP does), so a 429 storm slows the whole pool down instead of
    every worker retrying into it. A 429 halves the limit only if its request was sent after the
    last cut (same epoch): the burst of 429s from one overload counts once, not N times."""

    def __init__(self, maximum):
        self.maximum = self.limit = self.lowest = max(1, int(maximum))
        self.in_flight = self.epoch = self._ok = 0
        self.cond = threading.Condition()

    def acquire(self, stop):
        """Wait for a slot; returns the epoch to hand back to throttled(), None if stopped."""
        with self.cond:
            while self.in_flight >= self.limit:
                if stop.is_set():
                    return None
                self.cond.wait(0.05)
            if stop.is_set():
                return None
            self.in_flight += 1
            return self.epoch

    def release(self):
        with self.cond:
            self.in_flight -= 1
            self.cond.notify_all()

    def throttled(self, epoch):
        with self.cond:
            if epoch == self.epoch:
                self.limit = max(1, self.limit // 2)
                self.lowest = min(self.lowest, self.limit)
                self.epoch += 1
                self._ok = 0

    def succeeded(self):
        with self.cond:
            self._ok += 1
            if self._ok >= self.limit and self.limit < self.maximum:
                self.limit += 1
                self._ok = 0
                self.cond.notify_all()


def backoff_delay(attempt, base, cap):
    """Exponential backoff with jitter in [d/2, d]: spreads retries out so that workers hit by the
    same outage do not come back in lockstep, while the wait still grows with every attempt."""
    d = min(cap, base * 2 ** (attempt - 1))
    return d * random.uniform(0.5, 1.0)


class Fetcher:
    """What every worker thread shares: the endpoint, the limiter, the stop flag, the counters.
    Each thread has its own requests.Session (keep-alive pool); Sessions are not thread-safe."""

    def __init__(self, base_url, api_key, timeout, connect_timeout, max_retries, backoff_base,
                 backoff_max, max_retry_after, concurrency):
        self.url = base_url.strip().rstrip("/") + "/chat/completions"
        self.api_key = api_key
        self.timeout, self.connect_timeout = float(timeout), min(float(connect_timeout), float(timeout))
        self.max_retries, self.backoff_base, self.backoff_max = max_retries, backoff_base, backoff_max
        self.max_retry_after = max_retry_after
        self.limit = AdaptiveLimit(concurrency)
        self.stop = threading.Event()
        self.fatal = None  # the Failure that stopped the job
        self.local = threading.local()
        self.sessions, self.lock = [], threading.Lock()
        self.requests_sent, self.attempt_failures = 0, Counter()

    def _session(self):
        s = getattr(self.local, "session", None)
        if s is None:
            s = self.local.session = requests.Session()
            s.headers["User-Agent"] = "proxykd-teacher-client/1"
            if self.api_key:
                s.headers["Authorization"] = f"Bearer {self.api_key}"
            with self.lock:
                self.sessions.append(s)
        return s

    def close(self):
        for s in self.sessions:
            s.close()

    def redact(self, text):
        return text.replace(self.api_key, "***") if self.api_key else text

    def attempt(self, body):
        """One POST. Returns parse_completion's tuple or raises Failure. The response is read in
        small pieces against a total deadline: requests' read timeout is per socket read, so a
        server dripping one byte a second would otherwise hold the worker forever."""
        deadline = time.monotonic() + self.timeout
        try:
            resp = self._session().post(self.url, json=body, stream=True, allow_redirects=False,
                                        timeout=(self.connect_timeout, self.timeout))
        except requests.exceptions.Timeout as e:
            raise Failure("timeout", f"no response within {self.timeout:g} s ({type(e).__name__})")
        except requests.exceptions.RequestException as e:
            raise Failure("connection_error", f"{type(e).__name__}: {e}")
        with resp:
            raw = self._read_body(resp, deadline)
            if resp.status_code != 200:
                cls = classify(resp.status_code, raw)
                raise Failure(cls, f"HTTP {resp.status_code}: {_snippet(raw)}", resp.status_code,
                              retry_after_seconds(resp.headers))
            return parse_completion(raw)

    def _read_body(self, resp, deadline):
        # read1 returns as soon as any bytes arrive (urllib3 >= 2), so the deadline is checked
        # between every piece; a partial body from a reset is never returned, only a Failure.
        read = getattr(resp.raw, "read1", None) or (lambda n: resp.raw.read(1))
        chunks, size = [], 0
        try:
            while True:
                if time.monotonic() > deadline:
                    raise Failure("timeout", f"response not complete within {self.timeout:g} s "
                                  f"({size} bytes so far)", resp.status_code)
                piece = read(65536)
                if not piece:
                    return b"".join(chunks)
                chunks.append(piece)
                size += len(piece)
                if size > MAX_BODY:
                    raise Failure("invalid_response", f"body larger than {MAX_BODY} bytes")
        except (urllib3.exceptions.ReadTimeoutError, TimeoutError) as e:
            raise Failure("timeout", f"read timed out after {size} bytes ({type(e).__name__})",
                          resp.status_code)
        except (urllib3.exceptions.HTTPError, OSError) as e:
            # ProtocolError / IncompleteRead / ConnectionResetError: the body was cut short.
            raise Failure("connection_error", f"connection broken after {size} bytes "
                          f"({type(e).__name__})", resp.status_code)

    def fetch(self, body):
        """Retry one request until it succeeds, fails for good, or the job stops.
        Returns ("ok", (content, finish, usage, served), attempts) or ("failed", Failure, attempts)."""
        attempts = invalid = 0
        last = Failure(CANCELLED, "not sent: the job stopped before this request")
        while True:
            epoch = self.limit.acquire(self.stop)
            if epoch is None:  # stopped by a fatal error elsewhere, or interrupted
                return "failed", last, attempts
            attempts += 1
            with self.lock:
                self.requests_sent += 1
            try:
                result = self.attempt(body)
            except Failure as f:
                f.message = self.redact(f.message)
                last = f
            else:
                self.limit.succeeded()
                return "ok", result, attempts
            finally:
                self.limit.release()
            with self.lock:
                self.attempt_failures[last.cls] += 1
            if last.cls in FATAL:
                self.fatal = self.fatal or last
                self.stop.set()
                return "failed", last, attempts
            if last.cls == "rate_limited":
                self.limit.throttled(epoch)
            if last.cls in PERMANENT:
                return "failed", last, attempts
            if last.cls == "invalid_response":
                invalid += 1
                if invalid > min(INVALID_RETRIES, self.max_retries):
                    return "failed", last, attempts
            if attempts > self.max_retries:
                last.message += f" (gave up after {attempts} attempts)"
                return "failed", last, attempts
            if last.retry_after is not None:
                if last.retry_after > self.max_retry_after:
                    last.message += (f" (retry-after {last.retry_after:g} s is over the "
                                     f"{self.max_retry_after:g} s cap; a rerun will retry it)")
                    return "failed", last, attempts
                # At least what the server asked for, plus a little jitter against lockstep.
                delay = last.retry_after * random.uniform(1.0, 1.1)
            else:
                delay = backoff_delay(attempts, self.backoff_base, self.backoff_max)
            if self.stop.wait(delay):
                return "failed", last, attempts


# ------------------------------------------------------------------ the job

class Job:
    """One distinct request: the first input row that asked for it, its messages and sample."""
    __slots__ = ("row", "messages", "params", "sample_index")

    def __init__(self, row, messages, params, sample_index):
        self.row, self.messages, self.params, self.sample_index = row, messages, params, sample_index


def plan(rows, base_url, model, params, samples=1):
    """{request_hash: Job} in input order, and how many (row, sample) pairs were duplicates
    (same messages and parameters as an earlier row: they share its one request and line)."""
    import data  # lazily: data.py owns the prompt formats, and --help must work without it
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
            progress=True, warn=None):
    """Get one teacher response per distinct (prompt, sample) into `out_path`; return a summary.

    `prompts` is a JSONL path (read with data.read_prompts) or a list of such rows. The API key
    defaults to the environment. Delays are parameters so that tests can make them tiny."""
    t_start = time.monotonic()
    warn = warn or (lambda msg: print(msg, file=sys.stderr))
    out_path = os.fspath(out_path)
    err_path = errors_path_for(out_path)
    if isinstance(prompts, (str, os.PathLike)):
        import data
        rows = data.read_prompts(prompts)
    else:
        rows = list(prompts)
    params = sampling_params(temperature, max_tokens, seed)
    jobs, duplicates = plan(rows, base_url, model, params, samples)

    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    cache = load_cache(out_path, warn)
    missing = [k for k in jobs if k not in cache]
    if os.path.exists(err_path):  # last run's failures are retried now; this run writes its own
        os.remove(err_path)

    fetcher = Fetcher(base_url, api_key if api_key is not None else api_key_from_env(), timeout,
                      connect_timeout, max_retries, backoff_base, backoff_max, max_retry_after,
                      concurrency)
    finished = {k: cache[k]["finish_reason"] for k in jobs if k in cache}
    failures = {}  # key -> (Failure, attempts), this run's
    bar = tqdm(total=len(jobs), initial=len(finished), unit="req", desc="teacher",
               disable=not progress, file=sys.stderr, dynamic_ncols=True)
    t_net = time.monotonic()
    out, errors = Appender(out_path), None
    try:
        if missing:
            errors = Appender(err_path)
            with concurrent.futures.ThreadPoolExecutor(concurrency, "teacher") as pool:
                futures = {pool.submit(fetcher.fetch, request_body(model, jobs[k].messages,
                                                                   jobs[k].params)): k
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
                        bar.set_postfix(done=len(finished) - (len(jobs) - len(missing)),
                                        cached=len(jobs) - len(missing), failed=len(failures),
                                        refresh=False)
                finally:
                    # Whatever ended the loop (a fatal error, Ctrl-C), the queued jobs see the
                    # flag and return without sending; in-flight ones end within the timeout.
                    fetcher.stop.set()
    finally:
        bar.close()
        out.close()
        if errors:
            errors.close()
        fetcher.close()
    t_end = time.monotonic()

    # Exactly once: every key is now in OUT or in the errors file, never in both, never twice.
    # Keys the loop never reached (stopped early) are recorded as cancelled.
    never = Failure(CANCELLED, "not sent: the job stopped before this request")
    still_failing = [error_row(k, jobs[k], *failures.get(k, (never, 0)))
                     for k in jobs if k not in finished]
    if still_failing:
        _fsync_replace(err_path, [json.dumps(r, ensure_ascii=False) + "\n" for r in still_failing])
    elif os.path.exists(err_path):
        os.remove(err_path)

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


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", required=True, help="input JSONL: id, prompt or messages, optional answer")
    ap.add_argument("--out", required=True,
                    help="output JSONL, also the cache: rerunning the same command sends only what is missing")
    ap.add_argument("--base-url", required=True, help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
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
    return args


def main(argv=None):
    args = parse_args(argv)
    import data
    try:
        rows = data.read_prompts(args.prompts)
    except (data.DataError, OSError) as e:
        print(f"teacher_client: {e}", file=sys.stderr)
        return 2
    try:
        summary = collect(rows, args.out, args.base_url, args.model,
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
