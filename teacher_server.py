"""The embedded black-box teacher: an OpenAI-compatible chat-completions server on 127.0.0.1.

    python teacher_server.py --port 0            # prints "listening on http://127.0.0.1:PORT/v1"
    python teacher_server.py --port 8000 --rate-429 0.1 --rate-500 0.05 --rate-reset 0.02

It stands in for the API model of the paper: text in, text out, nothing else visible. It solves
the embedded world's arithmetic problem found in the prompt (world.teacher_solution) and writes
the solution in one of several phrasings, drawn like an LLM sampling: the request's temperature
sets how often it leaves the first (greedy) phrasing, and a request `seed` makes the draw
reproducible. With --slip-rate P a sampled answer makes one arithmetic slip with probability P
(a wrong final answer, as a real teacher sometimes gives). A prompt it cannot parse gets an
honest "I cannot solve this" answer.

Routes: POST /v1/chat/completions, GET /v1/models, and GET /stats (request counts per distinct
body, so tests can prove "one request per distinct request" and "zero requests on a rerun").

Faults (the FAULTS table), drawn per request with --fault-seed, let tests and users watch the
client survive what real APIs do: 429 with Retry-After (or without), 500/502/503 with HTML or
empty bodies, hangs, slowly dripped bodies, connections reset mid-body, malformed 200s, and
forced 401/403/quota responses. Requests whose prompt exceeds --max-context tokens get a 400 context_length_exceeded,
and max_tokens cuts the answer with finish_reason "length", as the real APIs do.
"""

import argparse
import functools
import hashlib
import json
import math
import random
import re
import socket
import struct
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import data
import world

CANNOT = ("I cannot solve this: I could not find an arithmetic problem I understand in the "
          "prompt, so I will not guess an answer.")
MALFORMED_KINDS = ("not_json", "truncated_json", "empty_choices", "null_content",
                   "no_finish_reason", "not_an_object")


@dataclass
class Faults:
    """Per-request fault rates (each a probability; they must sum to <= 1) and their knobs.
    Defaults inject nothing."""
    rate_429: float = 0.0
    retry_after: float | None = 1.0  # seconds sent as retry-after(-ms); None: no header at all
    rate_500: float = 0.0
    rate_reset: float = 0.0          # 200 headers, half the body, then a TCP reset
    rate_malformed: float = 0.0      # a 200 whose body is one of MALFORMED_KINDS
    rate_slow: float = 0.0           # say nothing for slow_seconds, then answer
    slow_seconds: float = 5.0
    rate_drip: float = 0.0           # send the body a few bytes at a time over drip_seconds
    drip_seconds: float = 5.0
    latency: float = 0.0             # every request takes this long (a real model is not instant)
    force_status: int | None = None  # answer every request after the first force_after with this
    force_after: int = 0
    force_code: str | None = None    # the error code for force_status, e.g. insufficient_quota
    seed: int = 0


def count_tokens(text):
    # A crude word/punctuation count stands in for a tokenizer: the usage fields only need to be
    # plausible and consistent, and max_tokens/--max-context only need something to cut on.
    return len(_TOKEN.findall(text))


_TOKEN = re.compile(r"\w+|[^\w\s]")


def body_key(body):
    """sha256 of the canonical JSON of a request body: what /stats counts requests by."""
    return data.content_hash(body, 64)


def prompt_text(messages):
    """The text of the last user message (content as a string or as OpenAI content parts)."""
    for m in reversed(messages):
        if m.get("role") == "user":
            content = m.get("content")
            if isinstance(content, list):
                return "\n".join(p.get("text", "") for p in content if isinstance(p, dict))
            return content if isinstance(content, str) else ""
    return ""


class _Greedy(random.Random):
    """Every draw is the lowest possible value: choice() returns the first item, so a solver given
    this rng writes its first phrasing. Temperature 0 is greedy decoding."""

    def random(self):
        return 0.0

    def getrandbits(self, k):
        return 0


def sampler(temperature, seed, messages, index=0):
    """The rng a solution is drawn with. With a seed it derives from (seed, messages, choice
    index), so identical seeded requests get identical answers; without one it is fresh. The
    temperature is the chance of a free draw instead of the greedy phrasing: 0 is always the
    first phrasing, >= 1 always random, in between a mixture, lower = closer to the mode."""
    if seed is None:
        rng = random.Random()
    else:
        digest = hashlib.sha256(json.dumps([seed, messages, index], sort_keys=True).encode()).digest()
        rng = random.Random(int.from_bytes(digest[:8], "big"))
    return rng if rng.random() < min(1.0, temperature) else _Greedy()


class TeacherServer(ThreadingHTTPServer):
    daemon_threads = True  # a hung fault response must not keep the process alive at shutdown

    def __init__(self, port=0, model="proxykd-teacher", faults=None, solver=None, api_key=None,
                 max_context=4096, filter_words=(), quiet=True, slip_rate=0.0):
        faults = faults or Faults()
        rates = [getattr(faults, f"rate_{kind}") for kind in FAULTS]
        if any(r < 0 for r in rates) or sum(rates) > 1 + 1e-9:
            raise ValueError(f"fault rates must be >= 0 and sum to <= 1, got {rates}")
        if not 0 <= slip_rate <= 1 or (slip_rate and solver is not None):
            raise ValueError(f"slip_rate must be in [0, 1] and is for the world's solver, got {slip_rate}")
        super().__init__(("127.0.0.1", port), Handler)  # binds the port: after the checks
        self.model, self.faults = model, faults
        self.solver = solver or functools.partial(world.teacher_solution, slip_rate=slip_rate)
        self.api_key, self.max_context = api_key, max_context
        self.filter_words = tuple(w.lower() for w in filter_words)
        self.quiet = quiet
        self.fault_rng = random.Random(self.faults.seed)
        self.lock = threading.Lock()
        self.requests = 0
        self.by_key = Counter()      # body_key -> requests that arrived with that body
        self.arrivals = {}           # body_key -> [time.monotonic() of each arrival]
        self.outcomes = Counter()    # "ok", "429", "500", "reset", "malformed", ...
        self.in_flight = self.max_in_flight = 0

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def stats(self):
        with self.lock:
            return {"requests": self.requests, "by_key": dict(self.by_key),
                    "outcomes": dict(self.outcomes), "max_in_flight": self.max_in_flight}

    def arrive(self, key):
        """Count one chat request; returns its 1-based number and the fault drawn for it."""
        with self.lock:
            self.requests += 1
            self.by_key[key] += 1
            self.arrivals.setdefault(key, []).append(time.monotonic())
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            return self.requests, self._draw_fault()

    def leave(self, outcome):
        with self.lock:
            self.in_flight -= 1
            self.outcomes[outcome] += 1

    def _draw_fault(self):
        u = self.fault_rng.random()
        for kind in FAULTS:  # one draw, cut into the rates in the table's order
            rate = getattr(self.faults, f"rate_{kind}")
            if u < rate:
                return kind
            u -= rate
        return None

    def handle_error(self, request, client_address):
        # A client that timed out and hung up is what the fault tests are about, not an error.
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


def _error(message, type_="invalid_request_error", code=None, param=None):
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


FORCED = {  # what the real APIs send with these statuses
    400: _error("Bad request (forced by --force-status).", code="bad_request"),
    401: _error("Incorrect API key provided.", code="invalid_api_key"),
    403: _error("You are not allowed to access this model.", "permission_error", "permission_denied"),
    429: _error("Rate limit reached (forced by --force-status).", "requests", "rate_limit_exceeded"),
}
QUOTA = _error("You exceeded your current quota, please check your plan and billing details.",
               "insufficient_quota", "insufficient_quota")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the client's Sessions reuse their connections
    # Headers and body go out in two writes; with Nagle on, the body waits for the client's
    # delayed ACK, 40 ms a response (measured: 63 -> 179 responses/s, 4 workers, 20 ms latency).
    disable_nagle_algorithm = True
    server_version = "proxykd-teacher/1"
    timeout = 60  # an idle keep-alive connection is closed after this long

    def log_message(self, fmt, *args):
        if not self.server.quiet:
            super().log_message(fmt, *args)

    def reply_head(self, status, length, headers=(), content_type="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(length))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()

    def reply(self, status, payload, headers=(), content_type="application/json"):
        raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode("utf-8")
        self.reply_head(status, len(raw), headers, content_type)
        self.wfile.write(raw)

    def _route(self):
        path = urlsplit(self.path).path.rstrip("/")
        return path[3:] if path.startswith("/v1/") else path

    def do_GET(self):
        route = self._route()
        if route == "/models":
            self.reply(200, {"object": "list", "data": [
                {"id": self.server.model, "object": "model", "created": 0, "owned_by": "proxykd"}]})
        elif route == "/stats":
            self.reply(200, self.server.stats())
        else:
            self.reply(404, _error(f"no route GET {self.path}", code="not_found"))

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)  # read the body first, whatever the route: keep-alive needs it
        if self._route() != "/chat/completions":
            return self.reply(404, _error(f"no route POST {self.path}", code="not_found"))
        try:
            body = json.loads(raw)
        except ValueError:
            return self.reply(400, _error("We could not parse the JSON body of your request."))
        number, fault = self.server.arrive(body_key(body))
        outcome = fault or "error"  # what /stats counts if the client hangs up on us mid-answer
        try:
            outcome = self._chat(body, number, fault)
        finally:
            self.server.leave(outcome)

    def _chat(self, body, number, fault):
        """Answer one chat request; returns the outcome name counted in /stats. The order is a real
        API's: the key and the account first, overload before the request is looked at, then the
        request's own errors, then the answer, which a damage fault may break on its way out."""
        srv = self.server
        if srv.faults.latency:
            time.sleep(srv.faults.latency)
        refused = self._refusal(number)
        if refused is None and fault in REFUSALS:
            return REFUSALS[fault](self)
        refused = refused or validate(body, srv.model, srv.max_context)
        if refused:
            self.reply(*refused)
            return str(refused[0])
        raw = json.dumps(complete(body, srv)).encode("utf-8")
        if fault in DAMAGES:
            return DAMAGES[fault](self, raw)
        self.reply(200, raw)
        return "ok"

    def _refusal(self, number):
        """(status, payload) for a missing or wrong key (--require-key) or --force-status, else None."""
        srv, f = self.server, self.server.faults
        if srv.api_key and self.headers.get("Authorization") != f"Bearer {srv.api_key}":
            # Echo the key that was sent, as careless real servers do, so tests can check the
            # client redacts it from everything it records.
            sent = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
            return 401, _error(f"Incorrect API key provided: {sent or '(none)'}.", code="invalid_api_key")
        if f.force_status and number > f.force_after:
            return f.force_status, (QUOTA if f.force_code == "insufficient_quota" else FORCED.get(
                f.force_status, _error(f"forced status {f.force_status}", code=f.force_code)))
        return None


# ------------------------------------------------------------------ the faults
# Each takes the handler (and, for damages, the finished answer's bytes), sends what that fault
# sends, and returns the outcome name /stats counts.

def _rate_limited(h):
    f = h.server.faults
    headers = []
    if f.retry_after is not None:
        headers = [("retry-after", str(math.ceil(f.retry_after))),
                   ("retry-after-ms", str(int(f.retry_after * 1000)))]
    h.reply(429, _error(f"Rate limit reached for requests. Please try again in {f.retry_after or 1:g}s.",
                       "requests", "rate_limit_exceeded"), headers)
    return "429"


def _server_error(h):
    status = h.server.fault_rng.choice((500, 502, 503))
    if h.server.fault_rng.random() < 0.5:  # what a proxy in front of a dead backend sends
        h.reply(status, f"<html><body><h1>{status} Bad Gateway</h1></body></html>".encode(),
               content_type="text/html")
    else:
        h.reply(status, b"", content_type="text/plain")
    return "500"


def _reset_mid_body(h, raw):
    h.reply_head(200, len(raw))
    h.wfile.write(raw[:len(raw) // 2])
    # SO_LINGER 0: close() sends a TCP RST instead of a FIN, a reset mid-body.
    h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    h.connection.close()
    h.close_connection = True
    return "reset"


def _malformed(h, raw):
    kind = h.server.fault_rng.choice(MALFORMED_KINDS)
    bad = {"not_json": b"<html>upstream error</html>", "truncated_json": raw[:len(raw) // 2],
           "not_an_object": b"[]"}.get(kind)
    if bad is None:  # valid JSON with a broken first choice
        doc = json.loads(raw)
        if kind == "empty_choices":
            doc["choices"] = []
        elif kind == "null_content":
            doc["choices"][0]["message"]["content"] = None
        else:
            del doc["choices"][0]["finish_reason"]
        bad = json.dumps(doc).encode("utf-8")
    h.reply(200, bad)
    return "malformed"


def _slow(h, raw):
    time.sleep(h.server.faults.slow_seconds)
    h.reply(200, raw)
    return "slow"


def _drip(h, raw, pieces=20):
    h.reply_head(200, len(raw))
    step = max(1, math.ceil(len(raw) / pieces))
    for i in range(0, len(raw), step):
        h.wfile.write(raw[i:i + step])
        time.sleep(h.server.faults.drip_seconds / pieces)
    return "drip"


REFUSALS = {"429": _rate_limited, "500": _server_error}  # sent before the request is looked at
DAMAGES = {"reset": _reset_mid_body, "malformed": _malformed, "slow": _slow, "drip": _drip}
FAULTS = (*REFUSALS, *DAMAGES)  # the draw order: Faults.rate_<kind> of each, cut from one number


# ------------------------------------------------------------------ the API's answers

def validate(body, model, max_context):
    """(status, error payload) for a request the real API would refuse, else None."""
    if not isinstance(body, dict):
        return 400, _error("The request body must be a JSON object.")
    if body.get("model") != model:
        return 404, _error(f"The model `{body.get('model')}` does not exist; this server "
                           f"serves `{model}`.", code="model_not_found", param="model")
    messages = body.get("messages")
    if (not isinstance(messages, list) or not messages
            or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                       and isinstance(m.get("content"), (str, list)) for m in messages)):
        return 400, _error("'messages' must be a non-empty list of {role, content}.", param="messages")
    temperature = body.get("temperature", 1.0)
    if not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
        return 400, _error("'temperature' must be a number in [0, 2].", param="temperature")
    max_tokens = body.get("max_tokens", 4096)
    if not isinstance(max_tokens, int) or max_tokens < 1:
        return 400, _error("'max_tokens' must be a positive integer.", param="max_tokens")
    n = body.get("n", 1)
    if not isinstance(n, int) or not 1 <= n <= 8:
        return 400, _error("'n' must be an integer in [1, 8].", param="n")
    if body.get("stream"):
        return 400, _error("This server does not stream; send stream=false.", param="stream")
    used = sum(count_tokens(prompt_text([m])) for m in messages if m.get("role") == "user")
    used += sum(count_tokens(m["content"]) for m in messages
                if m.get("role") != "user" and isinstance(m["content"], str))
    if used > max_context:
        return 400, _error(f"This model's maximum context length is {max_context} tokens, "
                           f"your messages resulted in {used} tokens.",
                           code="context_length_exceeded", param="messages")
    return None


def complete(body, srv):
    """The chat.completion document for a valid request: n choices, each drawn with its own rng."""
    messages = body["messages"]
    text = prompt_text(messages)
    prompt_tokens = sum(count_tokens(m["content"]) if isinstance(m["content"], str)
                        else count_tokens(prompt_text([m])) for m in messages)
    choices, completion_tokens = [], 0
    for index in range(body.get("n", 1)):
        rng = sampler(body.get("temperature", 1.0), body.get("seed"), messages, index)
        if any(w in text.lower() for w in srv.filter_words):
            content, finish = "", "content_filter"
        else:
            content = srv.solver(text, rng) or CANNOT
            content, finish = _truncate(content, body.get("max_tokens"))
        completion_tokens += count_tokens(content)
        choices.append({"index": index, "message": {"role": "assistant", "content": content},
                        "logprobs": None, "finish_reason": finish})
    return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion",
            "created": int(time.time()), "model": srv.model,
            "system_fingerprint": "proxykd-embedded", "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


def _truncate(content, max_tokens):
    """Cut after max_tokens tokens, as a real API stops generating: finish_reason "length"."""
    if max_tokens is None:
        return content, "stop"
    for i, m in enumerate(_TOKEN.finditer(content)):
        if i == max_tokens:
            return content[:m.start()].rstrip(), "length"
    return content, "stop"


def start_server(port=0, **kwargs):
    """Start a TeacherServer in a daemon thread: (server, thread, base_url). Stop it with
    server.shutdown(); server.server_close()."""
    server = TeacherServer(port, **kwargs)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True, name="teacher-server")
    thread.start()
    return server, thread, server.url


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, default=8000, help="port on 127.0.0.1; 0 picks a free one (printed)")
    ap.add_argument("--model", default="proxykd-teacher", help="the one model name served; others get 404")
    ap.add_argument("--max-context", type=int, default=4096, help="prompt tokens above this get 400 context_length_exceeded")
    ap.add_argument("--require-key", action="store_true",
                    help="answer 401 unless the request carries Bearer $TEACHER_API_KEY")
    ap.add_argument("--filter-word", action="append", default=[],
                    help="prompts containing this word get finish_reason content_filter (repeatable)")
    ap.add_argument("--slip-rate", type=float, default=0.0,
                    help="chance that a sampled answer makes one arithmetic slip (a wrong final answer)")
    ap.add_argument("--latency", type=float, default=0.0, help="seconds every request takes")
    ap.add_argument("--rate-429", type=float, default=0.0, help="fraction of requests answered 429")
    ap.add_argument("--retry-after", type=float, default=1.0,
                    help="seconds sent in retry-after / retry-after-ms with a 429; negative: no header")
    ap.add_argument("--rate-500", type=float, default=0.0, help="fraction answered 500/502/503 with an HTML or empty body")
    ap.add_argument("--rate-slow", type=float, default=0.0, help="fraction that say nothing for --slow-seconds first")
    ap.add_argument("--slow-seconds", type=float, default=5.0, help="how long a slow response hangs")
    ap.add_argument("--rate-drip", type=float, default=0.0, help="fraction whose body is dripped over --drip-seconds")
    ap.add_argument("--drip-seconds", type=float, default=5.0, help="how long a dripped body takes")
    ap.add_argument("--rate-reset", type=float, default=0.0, help="fraction whose connection is reset mid-body")
    ap.add_argument("--rate-malformed", type=float, default=0.0,
                    help="fraction answered 200 with a malformed body (bad JSON, no choices, null content, ...)")
    ap.add_argument("--force-status", type=int, default=None,
                    help="answer every request after --force-after with this status (401, 403, 429, 400, ...)")
    ap.add_argument("--force-after", type=int, default=0, help="requests answered normally before --force-status starts")
    ap.add_argument("--force-code", default=None, help="error code with --force-status, e.g. insufficient_quota")
    ap.add_argument("--fault-seed", type=int, default=0, help="seed of the fault draws")
    ap.add_argument("--verbose", action="store_true", help="log every request to stderr")
    return ap.parse_args(argv)


def main(argv=None):
    import os
    args = parse_args(argv)
    faults = Faults(rate_429=args.rate_429, retry_after=None if args.retry_after < 0 else args.retry_after,
                    rate_500=args.rate_500, rate_reset=args.rate_reset,
                    rate_malformed=args.rate_malformed, rate_slow=args.rate_slow,
                    slow_seconds=args.slow_seconds, rate_drip=args.rate_drip,
                    drip_seconds=args.drip_seconds, latency=args.latency,
                    force_status=args.force_status, force_after=args.force_after,
                    force_code=args.force_code, seed=args.fault_seed)
    api_key = None
    if args.require_key:
        api_key = os.environ.get("TEACHER_API_KEY")
        if not api_key:
            print("teacher_server: --require-key needs TEACHER_API_KEY in the environment", file=sys.stderr)
            return 2
    try:
        server = TeacherServer(args.port, model=args.model, faults=faults, api_key=api_key,
                               max_context=args.max_context, filter_words=args.filter_word,
                               quiet=not args.verbose, slip_rate=args.slip_rate)
    except (OSError, ValueError) as e:
        print(f"teacher_server: {e}", file=sys.stderr)
        return 2
    # The one line a Makefile or test reads to learn the port.
    print(f"listening on {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
