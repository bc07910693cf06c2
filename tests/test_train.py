"""The shared loop on its own: the LR schedule, fit's log/save/stop steps and its window-normalised accumulation
(one micro-batch or four take the same step), the metrics log trimmed on resume, and the checkpoint a kill
between the two renames leaves behind."""
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import train


def test_lr_schedule():
    assert train.lr_at(0, 100, 1e-3, "constant", warmup=4) == pytest.approx(2.5e-4)
    assert train.lr_at(50, 100, 1e-3, "constant", warmup=4) == 1e-3
    assert train.lr_at(4, 100, 1e-3, "cosine", warmup=4, min_ratio=0.1) == pytest.approx(1e-3)
    assert train.lr_at(100, 100, 1e-3, "cosine", warmup=4, min_ratio=0.1) == pytest.approx(1e-4)


def loop_args(**kw):
    return SimpleNamespace(**{"lr": 1e-2, "lr_schedule": "constant", "warmup_steps": 0, "min_lr_ratio": 0.1,
                              "grad_clip": 0.0, "log_every": 2, "save_every": 4, **kw})


def regression(n_samples=8):
    """A linear model, samples x -> y, and a masked-mean-style loss: each sample's squared error over the window's
    sample count (the loop's normaliser), as the stages divide by the window's response tokens."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n_samples, 3, generator=g), torch.randn(n_samples, generator=g)
    model = torch.nn.Linear(3, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.1, -0.2, 0.3]]))
        model.bias.zero_()

    def loss_fn(fwd, batch, norm):
        s = ((fwd(batch["x"]).squeeze(-1) - batch["y"]) ** 2).sum()
        return s / norm["n"], {"loss": s / norm["n"]}

    def stage(windows, log, save, stop_after=None):
        return train.Stage("test", windows, lambda idx: {"x": x[idx], "y": y[idx]},
                           lambda w: {"n": sum(len(mb) for mb in w)}, loss_fn, log, save, stop_after)
    return model, stage


def test_fit_logs_saves_and_stops_where_told():
    model, stage = regression()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    windows = [[[i]] for i in range(6)]
    logged, saved = [], []
    done = train.fit(model, model, opt, stage(windows, logged.append, saved.append, stop_after=5), loop_args(),
                     torch.device("cpu"))
    assert done == 5 and [r["step"] for r in logged] == [2, 4, 5] and saved == [4, 5]
    assert list(logged[0]) == ["stage", "step", "steps", "lr", "grad_norm", "loss", "tok_per_s"]
    done = train.fit(model, model, opt, stage(windows, logged.append, saved.append), loop_args(), torch.device("cpu"),
                     start=5)
    assert done == 6 and logged[-1]["step"] == 6 and saved == [4, 5, 6]


def test_one_micro_batch_or_four_take_the_same_step():
    """The window, not the micro-batch, normalises the loss: 4 samples as 1 x 4 or 4 x 1 give the same gradient."""
    after = []
    for window in ([[0, 1, 2, 3]], [[0], [1], [2], [3]]):
        model, stage = regression()
        opt = torch.optim.SGD(model.parameters(), lr=1e-1)
        rows = []
        train.fit(model, model, opt, stage([window], rows.append, lambda step: None), loop_args(), torch.device("cpu"))
        after.append((model.weight.detach().clone(), rows[0]["loss"], rows[0]["grad_norm"]))
    (w1, l1, g1), (w4, l4, g4) = after
    torch.testing.assert_close(w4, w1)
    assert l4 == pytest.approx(l1, rel=1e-6) and g4 == pytest.approx(g1, rel=1e-6)


def test_metrics_log_drops_the_rows_after_the_resume_point(tmp_path):
    rows = [{"stage": "align", "round": 1, "step": s} for s in (1, 2, 3)] + [{"stage": "round_end", "round": 1}]
    rows += [{"stage": "align", "round": 2, "step": s} for s in (1, 2)] + [{"stage": "round_end", "round": 2}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"stage": "al')
    log = train.MetricsLog(tmp_path, resume_from={"round": 2, "stage": "align", "step": 1,
                                                  "stage_order": ["align", "round_end"]}, quiet=True)
    kept = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert kept == rows[:5]  # round 1 whole, round 2 up to step 1; the torn last line is gone
    log({"stage": "align", "round": 2, "step": 2})
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2


def test_find_checkpoint_falls_back_to_the_old_one(tmp_path):
    ck = tmp_path / "checkpoint"
    assert train.find_checkpoint(ck) is None
    (tmp_path / "checkpoint.old").mkdir()
    (tmp_path / "checkpoint.old" / "train_state.pt").write_bytes(b"")
    assert train.find_checkpoint(ck) == tmp_path / "checkpoint.old"  # a kill between the two renames
    ck.mkdir()
    assert train.find_checkpoint(ck) == tmp_path / "checkpoint.old"  # a directory without train_state.pt is none
    (ck / "train_state.pt").write_bytes(b"")
    assert train.find_checkpoint(ck) == ck


def test_timed_keeps_each_phase_of_a_stage_in_its_timing_json(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "_setup_recorded", False)  # as in a fresh process
    with train.timed(tmp_path / "stage", "train"):
        pass
    with train.timed(tmp_path / "stage", "round_01/sample"):
        pass
    with pytest.raises(RuntimeError):
        with train.timed(tmp_path / "stage", "eval"):
            raise RuntimeError("a failed phase")  # records nothing
    phases = json.loads((tmp_path / "stage" / "timing.json").read_text())
    # setup: the process's start to its first block (this test process's age, so only bounded below)
    assert list(phases) == ["setup", "train", "round_01/sample"] and phases["setup"] > 0
    assert all(0 <= phases[k] < 5 for k in ("train", "round_01/sample"))
    train.record_time(tmp_path / "stage", "train", 12.5)  # run again (a resume): the last run's seconds
    assert train.read_timing(tmp_path / "stage" / "timing.json") == {**phases, "train": 12.5}
    (tmp_path / "stage" / "timing.json").write_text('{"train": 1')  # torn: read as nothing, then rewritten
    assert train.read_timing(tmp_path / "stage" / "timing.json") == {}


def test_cpu_optimizer_steps_as_torchs_default_adamw_to_the_bit():
    """make_optimizer's foreach AdamW on CPU (less Python per step) moves a Llama's weights exactly as torch's
    default for-loop AdamW does, weight decay included: choosing it changes no stage's result."""
    from model import Config, Llama
    models = []
    for foreach in (None, False):
        m = Llama(Config.preset("toy", vocab_size=64)).init_weights(seed=0)
        if foreach is None:
            opt = train.make_optimizer(m, lr=3e-3, weight_decay=0.1, device=torch.device("cpu"))
        else:
            groups = [{"params": [p for p in m.parameters() if p.dim() >= 2], "weight_decay": 0.1},
                      {"params": [p for p in m.parameters() if p.dim() < 2], "weight_decay": 0.0}]
            opt = torch.optim.AdamW(groups, lr=3e-3, betas=(0.9, 0.95), eps=1e-8, foreach=False)
        g = torch.Generator().manual_seed(1)
        for _ in range(12):
            ids = torch.randint(0, m.cfg.vocab_size, (4, 16), generator=g)
            logits = m(ids)
            torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        models.append(m.state_dict())
    assert models[0].keys() == models[1].keys()
    assert all(torch.equal(models[0][k], models[1][k]) for k in models[0])


KEEP_HEAP_RUN = """
import sys, torch, train
from model import Config, Llama
if sys.argv[1] == "keep":
    assert train.keep_freed_memory(), "mallopt refused"
torch.manual_seed(0)
model = Llama(Config.preset("toy", vocab_size=700))
model.init_weights(seed=0)
opt = train.make_optimizer(model, lr=1e-2, weight_decay=0.1, device=torch.device("cpu"))
for _ in range(4):  # [B, T, V] = [8, 40, 700] fp32 logits: 0.9 MB, above glibc's default mmap threshold
    ids = torch.randint(0, 700, (8, 40))
    loss = -train.token_logprobs(model, ids).mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
torch.save({k: v.clone() for k, v in model.state_dict().items()}, sys.argv[2])
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's mallopt")
def test_keeping_freed_memory_changes_no_result(tmp_path):
    """train.keep_freed_memory only moves where tensors' memory comes from: the same steps give the same weights to
    the bit with it and without it (each in a fresh process, as glibc's settings are the process's)."""
    root = Path(__file__).resolve().parent.parent
    out = {}
    for mode in ("keep", "default"):
        out[mode] = tmp_path / f"{mode}.pt"
        subprocess.run([sys.executable, "-c", KEEP_HEAP_RUN, mode, str(out[mode])], cwd=root, check=True,
                       env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"})
    a, b = (torch.load(out[m], weights_only=True) for m in ("keep", "default"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
