"""The teacher client's contract (OUT is the cache, every key ends in exactly one file, fatal errors
stop at once, transient ones are retried within bounds), each fault injected through a real HTTP
server on 127.0.0.1 (teacher_server.py), plus the server's own behaviour and --serve-embedded.

Every run ends with the same check: every line of every output parses, and every input key is in
the results or in the failures file, exactly once. Delays are tiny parameters so the file runs in
seconds."""

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import requests

import teacher_api as api
import teacher_client as tc
import teacher_server as ts

ROOT = Path(__file__).resolve().parents[1]
MODEL = "proxykd-teacher"
# Transient fault rates below are <= 0.3 with 9 attempts: a key fails them all with p < 2e-5.
FAST = dict(concurrency=4, timeout=2.0, connect_timeout=2.0, max_retries=8, backoff_base=0.005,
            backoff_max=0.05, progress=False)


def echo_solver(text, rng):
    # Stands in for the world's solver where the tests are about HTTP, not arithmetic: the
    # phrasing letter shows which draw the sampler made.
    return f"Solving {text!r} in phrasing {rng.choice('ABCDE')}. #### 7"


@pytest.fixture
def serve():
    servers = []

    def start(solver=echo_solver, **kwargs):
        srv, _, url = ts.start_server(solver=solver, **kwargs)
        servers.append(srv)
        return srv, url

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def make_rows(n, prefix="q"):
    return [{"id": f"{prefix}{i}", "prompt": f"question {prefix}{i}"} for i in range(n)]


def collect(rows, out, url, **kwargs):
    return tc.collect(rows, out, url, MODEL, **{**FAST, **kwargs})


def jobs_of(rows, url, temperature=1.0, max_tokens=1024, seed=None):
    return tc.plan(rows, url, MODEL, tc.sampling_params(temperature, max_tokens, seed))[0]


def body_key(job):
    """The server's counter key for a client job: lets tests count requests per cache key."""
    return ts.body_key(api.request_body(MODEL, job.messages, job.params))


def read_lines(path):
    """Every line must parse: that is part of the contract, so a bad one fails the test here."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def exactly_once(out, expected_keys):
    """Every expected key in OUT or in the errors file, once, never both; nothing else."""
    results, errors = read_lines(out), read_lines(tc.errors_path_for(out))
    r = [row["request_hash"] for row in results]
    e = [row["request_hash"] for row in errors]
    assert len(r) == len(set(r)), "a key was written twice to OUT"
    assert len(e) == len(set(e)), "a key was written twice to the errors file"
    assert not set(r) & set(e), "a key is both a result and a failure"
    assert set(r) | set(e) == set(expected_keys)
    return results, errors


# ------------------------------------------------------------------ pure functions

def test_request_hash_covers_the_answer_not_the_formatting():
    msgs = [{"role": "user", "content": "2+2?"}]
    p = tc.sampling_params(1, 64)
    base = tc.request_hash("http://127.0.0.1:8000/v1", MODEL, msgs, p)
    # Same request spelled differently: URL case/slash/default port, key order, int vs float.
    assert tc.request_hash("HTTP://127.0.0.1:8000/v1/", MODEL, [{"content": "2+2?", "role": "user"}],
                           tc.sampling_params(1.0, 64.0)) == base
    assert (tc.request_hash("https://u:secret@API.example.com:443/v1", MODEL, msgs, p)
            == tc.request_hash("https://api.example.com/v1", MODEL, msgs, p))
    # Anything that changes the answer changes the key.
    # The keys of caches already written: the bytes hashed must never change.
    assert tc.request_hash("http://127.0.0.1:18765/v1", MODEL, [{"role": "user", "content": "Mia has 3 apples. é ✓"}],
                           tc.sampling_params(1.0, 1024, 0)) == \
        "f4beede721e8939bc685c334f151765deb88ae99d2ee868e193931853c64078c"
    for other in [tc.request_hash("http://127.0.0.1:8001/v1", MODEL, msgs, p),
                  tc.request_hash("http://127.0.0.1:8000/v1", "other", msgs, p),
                  tc.request_hash("http://127.0.0.1:8000/v1", MODEL, [{"role": "user", "content": "2+3?"}], p),
                  tc.request_hash("http://127.0.0.1:8000/v1", MODEL, msgs, tc.sampling_params(0.7, 64)),
                  tc.request_hash("http://127.0.0.1:8000/v1", MODEL, msgs, tc.sampling_params(1, 64, seed=1)),
                  tc.request_hash("http://127.0.0.1:8000/v1", MODEL, msgs, p, sample_index=1)]:
        assert other != base


def test_classify_and_retry_after():
    assert [api.classify(s) for s in (401, 403, 404, 400, 422, 413, 408, 500, 502, 503, 429, 302)] == [
        "unauthorized", "forbidden", "not_found", "bad_request", "bad_request", "bad_request",
        "timeout", "server_error", "server_error", "server_error", "rate_limited", "unexpected_status"]
    assert api.classify(429, b'{"error": {"code": "insufficient_quota"}}') == "insufficient_quota"
    assert api.classify(500, b"<html>oops</html>") == "server_error"  # HTML body: no JSON decoding
    assert api.retry_after_seconds({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert api.retry_after_seconds({"retry-after": "3"}) == 3.0
    when = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 < api.retry_after_seconds({"retry-after": when}) <= 31
    assert api.retry_after_seconds({"retry-after": "soon"}) is None
    assert api.retry_after_seconds({}) is None


@pytest.mark.parametrize("raw", [
    b"", b"<html>502</html>", b'{"choices": [', b"[]", b"null", b'{"choices": []}',
    b'{"choices": [1]}', b'{"choices": [{"message": null, "finish_reason": "stop"}]}',
    b'{"choices": [{"message": {"content": null}, "finish_reason": "stop"}]}',
    b'{"choices": [{"message": {"content": "hi"}}]}',
    b'{"choices": [{"message": {"content": "hi"}, "finish_reason": ""}]}',
])
def test_malformed_200_bodies_are_invalid_response(raw):
    with pytest.raises(api.Failure) as e:
        api.parse_completion(raw)
    assert e.value.cls == "invalid_response"


def test_adaptive_limit_halves_once_per_overload_and_grows_back():
    lim, stop = api.AdaptiveLimit(8), __import__("threading").Event()
    epochs = [lim.acquire(stop) for _ in range(4)]
    for e in epochs:  # four 429s from the same burst cut once, not four times
        lim.release()
        lim.throttled(e)
    assert lim.limit == 4
    lim.throttled(lim.acquire(stop))  # a request sent after the cut may cut again
    lim.release()
    assert lim.limit == 2 and lim.lowest == 2
    for _ in range(2 + 3):
        lim.succeeded()
    assert lim.limit == 4  # additive increase: +1 after `limit` successes


# ------------------------------------------------------------------ collecting, cache, rerun

def test_collect_rerun_sends_nothing_and_duplicates_share_one_request(serve, tmp_path):
    srv, url = serve()
    rows = make_rows(20) + [{"id": f"dup{i}", "prompt": f"question q{i}"} for i in range(5)]
    out = str(tmp_path / "teacher.jsonl")
    s = collect(rows, out, url)
    assert (s["requests"], s["duplicates"], s["done"], s["failed"]) == (20, 5, 20, 0)
    jobs = jobs_of(rows, url)
    results, errors = exactly_once(out, jobs)
    assert not errors and not os.path.exists(tc.errors_path_for(out))
    assert srv.stats()["requests"] == 20
    assert all(srv.by_key[body_key(j)] == 1 for j in jobs.values())  # one request per distinct request
    row = results[0]
    assert {"id", "prompt", "response", "finish_reason", "model", "temperature", "max_tokens",
            "usage", "request_hash"} <= row.keys()
    assert row["usage"]["completion_tokens"] > 0 and row["usage"]["prompt_tokens"] > 0

    s2 = collect(rows, out, url)  # rerun of a finished job: zero requests
    assert (s2["cached"], s2["done"], s2["requests_sent"]) == (20, 0, 0)
    assert srv.stats()["requests"] == 20
    assert read_lines(out) == results


def test_torn_and_garbage_cache_lines_are_reported_and_redone(serve, tmp_path):
    srv, url = serve()
    rows, out = make_rows(10), str(tmp_path / "t.jsonl")
    collect(rows, out, url)
    lines = Path(out).read_bytes().split(b"\n")[:-1]
    lost = [json.loads(lines[i])["request_hash"] for i in (3, 6)]
    lines[3] = b'{"request_hash": "garbage'            # a line that is not JSON
    lines[6] = json.dumps({"request_hash": lost[1]}).encode()  # JSON, but no response
    Path(out).write_bytes(b"\n".join(lines) + b"\n" + b'{"id": "q99", "resp')  # + a torn tail
    warnings = []
    s = collect(rows, out, url, warn=warnings.append)
    text = "\n".join(warnings)
    assert ":4:" in text and ":7:" in text and ":11: dropping a torn last line" in text
    assert (s["cached"], s["done"]) == (8, 2)  # bad lines were misses, never hits
    jobs = jobs_of(rows, url)
    exactly_once(out, jobs)
    assert all(srv.by_key[body_key(jobs[k])] == 2 for k in lost)
    assert len(Path(out + ".rejected").read_text().splitlines()) == 2  # set aside, not deleted


def test_kill_9_mid_run_then_rerun_loses_nothing_and_sends_nothing_twice(serve, tmp_path):
    srv, url = serve(faults=ts.Faults(latency=0.02))
    rows = make_rows(300)
    prompts, out = tmp_path / "prompts.jsonl", str(tmp_path / "teacher.jsonl")
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cmd = [sys.executable, str(ROOT / "teacher_client.py"), "--prompts", str(prompts), "--out", out,
           "--base-url", url, "--model", MODEL, "--concurrency", "4", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not os.path.exists(out) or Path(out).read_bytes().count(b"\n") < 40:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    time.sleep(0.3)  # requests already on the wire still reach the server: count them too
    written = set()
    for line in Path(out).read_bytes().split(b"\n"):
        try:
            written.add(json.loads(line)["request_hash"])
        except ValueError:
            pass  # a torn last line, if the kill landed mid-write
    assert 40 <= len(written) < 300, "the kill did not land mid-run"
    at_kill = Counter(srv.by_key)
    with open(out, "ab") as f:  # make sure the torn-line path runs whatever the kill hit
        f.write(b'{"id": "q1", "prompt": "question num')

    rerun = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert rerun.returncode == 0, rerun.stderr
    assert "torn last line" in rerun.stderr
    jobs = jobs_of(rows, url)
    results, errors = exactly_once(out, jobs)
    assert len(results) == 300 and not errors
    for key, job in jobs.items():
        sent_in_rerun = srv.by_key[body_key(job)] - at_kill[body_key(job)]
        assert sent_in_rerun == (0 if key in written else 1), key


# ------------------------------------------------------------------ each fault

def test_retry_after_is_honoured(serve, tmp_path):
    srv, url = serve(faults=ts.Faults(rate_429=0.3, retry_after=0.15, seed=1))
    rows, out = make_rows(12), str(tmp_path / "t.jsonl")
    s = collect(rows, out, url)
    assert s["done"] == 12 and s["attempt_failures"]["rate_limited"] > 0
    exactly_once(out, jobs_of(rows, url))
    gaps = [b - a for times in srv.arrivals.values() for a, b in zip(times, times[1:])]
    assert gaps and min(gaps) >= 0.15  # every retry here followed a 429 asking for 150 ms


def test_retry_after_over_the_cap_is_a_transient_failure_a_rerun_completes(serve, tmp_path):
    srv, url = serve(faults=ts.Faults(rate_429=1.0, retry_after=30))
    rows, out = make_rows(6), str(tmp_path / "t.jsonl")
    t = time.monotonic()
    s = collect(rows, out, url, max_retry_after=0.5)
    assert time.monotonic() - t < 5  # did not sit out the 30 s
    assert s["failed"] == 6 and s["failed_by_class"] == {"rate_limited": 6}
    assert s["requests_sent"] == 6
    jobs = jobs_of(rows, url)
    _, errors = exactly_once(out, jobs)
    assert "cap" in errors[0]["message"]
    srv.faults.rate_429 = 0.0
    s = collect(rows, out, url, max_retry_after=0.5)
    assert (s["done"], s["failed"]) == (6, 0)
    exactly_once(out, jobs)
    assert not os.path.exists(tc.errors_path_for(out))  # keys that succeed are failures no more


def test_429_storm_without_header_backs_off_with_bounded_attempts(serve, tmp_path):
    srv, url = serve(faults=ts.Faults(rate_429=0.6, retry_after=None, seed=2))
    rows, out = make_rows(40), str(tmp_path / "t.jsonl")
    s = collect(rows, out, url, concurrency=8, max_retries=10)
    assert s["lowest_concurrency"] < 8  # the pool slowed down
    assert srv.stats()["requests"] == s["requests_sent"] <= 40 * 11  # no retry explosion
    assert all(n <= 11 for n in srv.by_key.values())
    exactly_once(out, jobs_of(rows, url))


@pytest.mark.parametrize("status,code,cls", [(401, None, "unauthorized"), (403, None, "forbidden"),
                                             (429, "insufficient_quota", "insufficient_quota")])
def test_auth_and_quota_errors_stop_at_once(serve, tmp_path, status, code, cls):
    srv, url = serve(faults=ts.Faults(force_status=status, force_code=code, force_after=5))
    rows, out = make_rows(60), str(tmp_path / "t.jsonl")
    s = collect(rows, out, url)
    assert s["fatal"]["class"] == cls and s["fatal"]["status"] == status
    # Five answered, then at most the requests already in flight: nothing is sent after the stop.
    assert srv.stats()["requests"] <= 5 + FAST["concurrency"]
    results, errors = exactly_once(out, jobs_of(rows, url))
    assert len(results) == 5
    classes = Counter(e["class"] for e in errors)
    assert set(classes) == {cls, "cancelled"} and classes[cls] <= FAST["concurrency"]
    srv.faults.force_status = None  # fixed the key / topped up: the rerun completes the job
    s = collect(rows, out, url)
    assert s["done"] == 55 and s["failed"] == 0


def test_cli_stops_on_401_with_exit_code_and_the_code_named(serve, tmp_path):
    srv, url = serve(faults=ts.Faults(force_status=401))
    prompts, out = tmp_path / "p.jsonl", str(tmp_path / "t.jsonl")
    prompts.write_text("".join(json.dumps(r) + "\n" for r in make_rows(30)))
    r = subprocess.run([sys.executable, str(ROOT / "teacher_client.py"), "--prompts", str(prompts),
                        "--out", out, "--base-url", url, "--model", MODEL, "--concurrency", "2",
                        "--no-progress"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 3
    assert "HTTP 401" in r.stderr and "unauthorized" in r.stderr
    assert srv.stats()["requests"] <= 2


def test_wrong_model_is_fatal_not_30_retries(serve, tmp_path):
    srv, url = serve()
    rows, out = make_rows(30), str(tmp_path / "t.jsonl")
    s = tc.collect(rows, out, url, "no-such-model", **FAST)
    assert s["fatal"]["class"] == "not_found" and srv.stats()["requests"] <= FAST["concurrency"]


def test_bad_request_is_permanent_and_the_job_goes_on(serve, tmp_path):
    srv, url = serve(max_context=50)
    rows = make_rows(10) + [{"id": "long", "prompt": "word " * 200}]
    out = str(tmp_path / "t.jsonl")
    s = collect(rows, out, url)
    assert (s["done"], s["failed"], s["failed_by_class"]) == (10, 1, {"bad_request": 1})
    jobs = jobs_of(rows, url)
    _, errors = exactly_once(out, jobs)
    assert errors[0]["id"] == "long" and errors[0]["status"] == 400
    assert "context length" in errors[0]["message"]
    assert srv.by_key[body_key(jobs[errors[0]["request_hash"]])] == 1  # not retried


def test_5xx_with_html_or_empty_bodies_are_retried(serve, tmp_path):
    srv, url = serve(faults=ts.Faults(rate_500=0.3, seed=3))
    rows, out = make_rows(20), str(tmp_path / "t.jsonl")
    s = collect(rows, out, url)
    assert s["done"] == 20 and s["attempt_failures"]["server_error"] > 0
    exactly_once(out, jobs_of(rows, url))


def test_hang_and_slow_drip_are_bounded_by_the_total_deadline(serve):
    for faults in (ts.Faults(rate_slow=1.0, slow_seconds=3), ts.Faults(rate_drip=1.0, drip_seconds=3)):
        _, url = serve(faults=faults)
        f = api.Endpoint(url, None, timeout=0.3, connect_timeout=0.3)
        t = time.monotonic()
        with pytest.raises(api.Failure) as e:
            f.attempt(api.request_body(MODEL, [{"role": "user", "content": "x"}], {}))
        f.close()
        # The drip sends a byte-run every 0.15 s, so a per-read timeout alone would never fire.
        assert e.value.cls == "timeout" and time.monotonic() - t < 1.0


def test_hangs_and_drips_are_retried_to_completion(serve, tmp_path):
    srv, url = serve(faults=ts.Faults(rate_slow=0.15, slow_seconds=2, rate_drip=0.15,
                                      drip_seconds=2, seed=4))
    rows, out = make_rows(16), str(tmp_path / "t.jsonl")
    s = collect(rows, out, url, timeout=0.3)
    assert s["done"] == 16 and s["attempt_failures"]["timeout"] > 0
    exactly_once(out, jobs_of(rows, url))


def test_reset_mid_body_is_retried_and_partial_text_never_cached(serve, tmp_path):
    srv, url = serve(faults=ts.Faults(rate_reset=0.3, seed=5))
    rows, out = make_rows(20), str(tmp_path / "t.jsonl")
    s = collect(rows, out, url)
    assert s["done"] == 20 and s["attempt_failures"]["connection_error"] > 0
    results, _ = exactly_once(out, jobs_of(rows, url))
    for row in results:  # whole answers only
        assert row["response"].startswith(f"Solving {row['prompt']!r}") and row["response"].endswith("#### 7")


def test_malformed_200s_get_limited_retries_and_are_never_cached(serve, tmp_path):
    srv, url = serve(faults=ts.Faults(rate_malformed=1.0, seed=6))
    rows, out = make_rows(12), str(tmp_path / "t.jsonl")
    s = collect(rows, out, url)
    assert s["failed_by_class"] == {"invalid_response": 12}
    assert read_lines(out) == []
    assert all(n == api.INVALID_RETRIES + 1 for n in srv.by_key.values())
    srv.faults.rate_malformed = 0.0
    assert collect(rows, out, url)["done"] == 12
    exactly_once(out, jobs_of(rows, url))


def test_length_and_content_filter_are_kept_flagged_and_counted(serve, tmp_path):
    srv, url = serve(filter_words=["forbidden"])
    rows = make_rows(4) + [{"id": "f", "prompt": "a forbidden question"}]
    out = str(tmp_path / "t.jsonl")
    s = collect(rows, out, url, max_tokens=3)
    assert s["done"] == 5 and s["flagged"] == {"length": 4, "content_filter": 1}
    results, _ = exactly_once(out, jobs_of(rows, url, max_tokens=3))
    assert all(r["flagged"] for r in results)
    assert {r["usage"]["completion_tokens"] for r in results if r["id"] != "f"} == {3}
    assert tc.collect(rows, out, url, MODEL, **{**FAST, "max_tokens": 3})["flagged"] == s["flagged"]


def test_api_key_comes_from_the_environment_and_is_never_written(serve, tmp_path, monkeypatch, capsys):
    secret = "sk-test-DO-NOT-LEAK-1234"
    monkeypatch.setenv("TEACHER_API_KEY", secret)
    srv, url = serve(api_key=secret)
    rows, out = make_rows(5), str(tmp_path / "t.jsonl")
    assert collect(rows, out, url)["done"] == 5
    monkeypatch.delenv("TEACHER_API_KEY")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong-ALSO-SECRET")  # the fallback variable
    s = collect(make_rows(5, "r"), out, url)
    assert s["fatal"]["class"] == "unauthorized"
    assert "ALSO-SECRET" not in s["fatal"]["message"]  # the server echoed it; we redacted it
    written = "".join(p.read_text() for p in tmp_path.iterdir()) + str(s)
    captured = capsys.readouterr()
    for text in (written, captured.out, captured.err):
        assert secret not in text and "ALSO-SECRET" not in text


# ------------------------------------------------------------------ the server itself

def post(url, **body):
    return requests.post(url + "/chat/completions", json={"model": MODEL, **body}, timeout=5)


def test_server_sampling_temperature_and_seed(serve):
    srv, url = serve()
    msgs = [{"role": "user", "content": "what is 2+2?"}]
    text = lambda r: r.json()["choices"][0]["message"]["content"]
    greedy = {text(post(url, messages=msgs, temperature=0)) for _ in range(5)}
    assert greedy == {"Solving 'what is 2+2?' in phrasing A. #### 7"}  # temperature 0: first phrasing
    seeded = {text(post(url, messages=msgs, temperature=1, seed=42)) for _ in range(5)}
    assert len(seeded) == 1  # same seed, same request: same answer
    free = {text(post(url, messages=msgs, temperature=1.0)) for _ in range(30)}
    assert len(free) > 1
    across_seeds = {text(post(url, messages=msgs, temperature=1, seed=s)) for s in range(30)}
    assert len(across_seeds) > 1
    r = post(url, messages=msgs, temperature=0.5, n=3)
    assert [c["index"] for c in r.json()["choices"]] == [0, 1, 2]


def test_server_slip_rate_makes_sampled_answers_wrong_not_greedy_ones(serve):
    import data
    import world
    text = lambda r: r.json()["choices"][0]["message"]["content"]
    _, clean = serve(solver=None)
    _, slipping = serve(solver=None, slip_rate=1.0)
    _, sometimes = serve(solver=None, slip_rate=0.3)
    for p in world.make_problems(12, seed=0, split="eval"):
        msgs = [{"role": "user", "content": p["prompt"]}]
        assert data.is_correct(text(post(clean, messages=msgs, temperature=1, seed=3)), p["answer"])
        wrong = {text(post(slipping, messages=msgs, temperature=1, seed=3)) for _ in range(2)}
        assert len(wrong) == 1  # seeded: the same slip every time
        wrong = wrong.pop()
        assert "\n#### " in wrong and not data.is_correct(wrong, p["answer"])
        assert data.is_correct(text(post(sometimes, messages=msgs, temperature=0)), p["answer"])  # greedy
    with pytest.raises(ValueError, match="slip_rate"):
        ts.TeacherServer(solver=echo_solver, slip_rate=0.1)  # a slip is the world solver's


def test_server_refuses_like_the_real_api(serve):
    srv, url = serve(solver=lambda text, rng: None)
    r = post(url, messages=[{"role": "user", "content": "tell me a joke"}])
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == ts.CANNOT
    assert post(url, messages=[]).status_code == 400
    assert post(url, messages=[{"role": "user", "content": "x"}], temperature=3).status_code == 400
    assert post(url, messages=[{"role": "user", "content": "x"}], stream=True).status_code == 400
    assert requests.post(url + "/chat/completions", data=b"{nope", timeout=5).status_code == 400
    assert requests.get(url + "/models", timeout=5).json()["data"][0]["id"] == MODEL
    assert requests.get(url.removesuffix("/v1") + "/stats", timeout=5).json()["requests"] == 4


def test_server_cli_picks_a_free_port_and_prints_it():
    proc = subprocess.Popen([sys.executable, str(ROOT / "teacher_server.py"), "--port", "0"],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().strip()
        assert line.startswith("listening on http://127.0.0.1:") and line.endswith("/v1")
        url = line.split()[-1]
        assert requests.get(url + "/models", timeout=5).status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_a_complete_last_line_without_newline_is_kept(serve, tmp_path):
    srv, url = serve()
    rows, out = make_rows(3), str(tmp_path / "t.jsonl")
    collect(rows, out, url)
    Path(out).write_bytes(Path(out).read_bytes().rstrip(b"\n"))  # e.g. saved by an editor
    s = collect(rows, out, url)
    assert (s["cached"], s["requests_sent"]) == (3, 0)
    assert Path(out).read_bytes().endswith(b"\n") and len(read_lines(out)) == 3


def test_the_embedded_world_end_to_end(serve, tmp_path):
    import data
    import world
    srv, url = serve(solver=None)  # the real teacher: world.teacher_solution
    problems = world.make_problems(24, seed=0, split="eval")
    rows = problems + [{"id": "nonsense", "prompt": "Write a poem about the sea."}]
    prompts, out = tmp_path / "p.jsonl", str(tmp_path / "t.jsonl")
    data.write_jsonl(prompts, rows)
    s = collect(str(prompts), out, url, temperature=1.0, seed=0)
    assert (s["done"], s["failed"]) == (25, 0)
    results = {r["id"]: r for r in read_lines(out)}
    assert all(data.is_correct(results[p["id"]]["response"], p["answer"]) for p in problems)
    assert results["nonsense"]["response"] == ts.CANNOT  # honest, not a crash or a guess
    assert len({results[p["id"]]["response"].split("\n")[0][:5] for p in problems}) > 1  # phrasings vary
    assert len(data.read_teacher(out)) == 25  # what the training scripts read
    # Seeded: a second collection into another file gets the very same text.
    s2 = collect(str(prompts), str(tmp_path / "t2.jsonl"), url, temperature=1.0, seed=0)
    again = {r["id"]: r["response"] for r in read_lines(str(tmp_path / "t2.jsonl"))}
    assert s2["done"] == 25 and again == {i: r["response"] for i, r in results.items()}


def test_serve_embedded_runs_the_teacher_for_the_run_only(tmp_path, capsys):
    import data
    import world
    problems = world.make_problems(16, seed=0, split="eval")
    prompts, out = tmp_path / "p.jsonl", tmp_path / "t.jsonl"
    data.write_jsonl(prompts, problems)
    args = ["--prompts", str(prompts), "--out", str(out), "--model", MODEL, "--seed", "0",
            "--serve-embedded", "--no-progress", "--concurrency", "4"]
    servers = lambda: [t for t in __import__("threading").enumerate() if t.name == "teacher-server"]
    assert tc.main(args) == 0 and not servers()  # stopped at the end
    results = read_lines(out)
    assert len(results) == 16 and all(data.is_correct(r["response"], r["answer"]) for r in results)
    assert tc.main(args) == 0 and "0 done, 16 cached" in capsys.readouterr().err  # another port, the same keys
    slipped = tmp_path / "slipped.jsonl"  # a slip rate is another teacher: its own keys, wrong answers
    assert tc.main([*args[:3], str(slipped), *args[4:], "--slip-rate", "1"]) == 0
    assert not any(data.is_correct(r["response"], r["answer"]) for r in read_lines(slipped))
    assert not {r["request_hash"] for r in results} & {r["request_hash"] for r in read_lines(slipped)}
    # stopped on an error too: OUT is a directory
    assert tc.main([*args[:3], str(tmp_path), *args[4:]]) == 2 and not servers()
    with pytest.raises(SystemExit):
        tc.parse_args([*args[:4], "--model", MODEL, "--base-url", "http://x/v1", "--slip-rate", "0.5"])
