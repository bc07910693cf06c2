"""The whole main job at toy size through the Makefile, as a user runs it: world, bases, the embedded teacher
over HTTP, split, warm-up SFT, alignment rounds, the proxy cache, both students, the summary table; then a
second run that finds everything done and trains nothing."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not (ROOT / ".venv" / "bin" / "python").exists() or sys.platform == "win32",
                    reason="needs the Makefile's .venv (make test creates it)")
def test_make_smoke_runs_the_main_job_end_to_end(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    cmd = ["make", "--no-print-directory", "-C", str(ROOT), "smoke", f"SMOKE_DIR={tmp_path}",
           f"SMOKE_PORT={free_port()}"]
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    run = tmp_path / "run"
    for d in ("proxy_sft", "proxy", "student_blackbox", "student_proxykd"):
        acc = json.loads((run / d / "eval.json").read_text())["accuracy"]
        assert 0.0 <= acc <= 1.0
        assert (run / d / "model.safetensors").exists() and (run / d / "tokenizer.json").exists()
    assert (run / "proxy" / "round_02" / "ref_logps.safetensors").exists()
    assert "Proxy-KD" in first.stdout and "black-box KD" in first.stdout
    teacher = [json.loads(line) for line in (tmp_path / "teacher" / "teacher.jsonl").read_text().splitlines()]
    assert len(teacher) == 160 and all(r["finish_reason"] == "stop" for r in teacher)

    second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "proxy_align.py" not in second.stdout and "distill.py" not in second.stdout  # nothing re-ran
