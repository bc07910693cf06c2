"""One request to an OpenAI-compatible chat-completions API, retried until it succeeds or fails
for good: the error classes, Retry-After, reading a body against a total deadline, checking a 200
body, backoff with jitter, and a concurrency limit that halves on 429 (teacher_client.py runs the
job around it: the cache, the pool, the summary).
"""

import email.utils
import json
import os
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass

import requests
import urllib3


# Error classes. FATAL stops the whole job: every further request would fail the same way and
# some of them cost money. PERMANENT fails one item without retrying it. Everything else
# (rate_limited, server_error, timeout, connection_error, invalid_response) is transient:
# retried within the run, and a rerun tries again.
FATAL = {"unauthorized", "forbidden", "not_found", "insufficient_quota"}
PERMANENT = {"bad_request", "unexpected_status"}
CANCELLED = "cancelled"  # never attempted (or abandoned) because the job stopped

INVALID_RETRIES = 2      # a malformed 200 is usually systematic: retry it, but not for long
MAX_BODY = 64 << 20      # no completion is this large; refuse rather than fill memory


class Failure(Exception):
    """One failed attempt, with its class and, for 429/503, how long the server asked us to wait."""

    def __init__(self, cls, message, status=None, retry_after=None):
        super().__init__(message)
        self.cls, self.message, self.status, self.retry_after = cls, message, status, retry_after


# ------------------------------------------------------------------ one attempt

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
        raise Failure("invalid_response", f"200 with a body that is not JSON: {snippet(raw)}")
    choices = doc.get("choices") if isinstance(doc, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise Failure("invalid_response", f"200 without choices: {snippet(raw)}")
    message = choices[0].get("message")
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, str):
        raise Failure("invalid_response", f"200 whose message content is not text: {snippet(raw)}")
    finish = choices[0].get("finish_reason")
    if not isinstance(finish, str) or not finish:
        raise Failure("invalid_response", f"200 without a finish_reason: {snippet(raw)}")
    usage = doc.get("usage") if isinstance(doc.get("usage"), dict) else None
    served = doc.get("model") if isinstance(doc.get("model"), str) else None
    return content, finish, usage, served


def snippet(raw, n=200):
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    text = " ".join(text.split())
    return text[:n] + ("..." if len(text) > n else "") if text else "(empty body)"


def api_key_from_env():
    return os.environ.get("TEACHER_API_KEY") or os.environ.get("OPENAI_API_KEY") or None


class Endpoint:
    """One chat-completions URL. Each thread has its own requests.Session (keep-alive pool;
    Sessions are not thread-safe); attempt() is one POST, read against a total deadline."""

    def __init__(self, base_url, api_key, timeout, connect_timeout):
        self.url = base_url.strip().rstrip("/") + "/chat/completions"
        self.api_key = api_key
        self.timeout, self.connect_timeout = float(timeout), min(float(connect_timeout), float(timeout))
        self.local = threading.local()
        self.sessions, self.lock = [], threading.Lock()

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

    def attempt(self, body):
        """One POST: parse_completion's tuple, or raises Failure (its message never holds the key)."""
        try:
            return self._post(body)
        except Failure as f:
            if self.api_key:
                f.message = f.message.replace(self.api_key, "***")
            raise

    def _post(self, body):
        # The response is read in small pieces against a total deadline: requests' read timeout is
        # per socket read, so a server dripping one byte a second would otherwise hold the worker.
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
                raise Failure(cls, f"HTTP {resp.status_code}: {snippet(raw)}", resp.status_code,
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


@dataclass
class Retry:
    """How long one request is retried (delays in seconds; tests make them tiny)."""
    max_retries: int = 6
    backoff_base: float = 1.0
    backoff_max: float = 30.0
    max_retry_after: float = 60.0

    def delay(self, failure, attempts, invalid):
        """Seconds to wait before the next attempt after `failure` (the attempts-th, invalid of them
        malformed 200s), or None to give up on the request, saying why in failure.message."""
        if failure.cls in PERMANENT:
            return None
        if failure.cls == "invalid_response" and invalid > min(INVALID_RETRIES, self.max_retries):
            return None
        if attempts > self.max_retries:
            failure.message += f" (gave up after {attempts} attempts)"
            return None
        if failure.retry_after is None:
            return backoff_delay(attempts, self.backoff_base, self.backoff_max)
        if failure.retry_after > self.max_retry_after:
            failure.message += (f" (retry-after {failure.retry_after:g} s is over the "
                                f"{self.max_retry_after:g} s cap; a rerun will retry it)")
            return None
        return failure.retry_after * random.uniform(1.0, 1.1)  # what was asked, plus jitter against lockstep


class Fetcher:
    """What every worker thread shares: the endpoint, the retry policy, the concurrency limit, the
    stop flag (set by a fatal error or Ctrl-C), and the counters of the summary."""

    def __init__(self, endpoint, retry, concurrency):
        self.endpoint, self.retry = endpoint, retry
        self.limit = AdaptiveLimit(concurrency)
        self.stop = threading.Event()
        self.fatal = None  # the Failure that stopped the job
        self.lock = threading.Lock()
        self.requests_sent, self.attempt_failures = 0, Counter()

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
                result = self.endpoint.attempt(body)
            except Failure as f:
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
            invalid += last.cls == "invalid_response"
            delay = self.retry.delay(last, attempts, invalid)
            if delay is None or self.stop.wait(delay):
                return "failed", last, attempts
