"""Crash safety, exact resume, safe loading, and one-line errors for bad input."""
import csv
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import errors
import fileio
import loop
import models
import runfiles
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STABLE = ["epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr"]  # all but the timings


def fresh_process(script, *args, cwd, mnist_dir):
    """`python SCRIPT ARGS` started from scratch (the other CLI tests fork the `forked` server)."""
    env = dict(os.environ, MNIST_DIR=mnist_dir, OMP_NUM_THREADS="1")
    cmd = [sys.executable, os.path.join(ROOT, script), *args]
    # Ctrl-C reaches the child even where the test runner was started with SIGINT ignored
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def metrics(folder):
    with open(os.path.join(folder, "metrics.csv")) as f:
        return [{k: r[k] for k in STABLE} for r in csv.DictReader(f)]


def check_files_whole(folder):
    """Every output file parses: nothing truncated, no temp file left behind."""
    for name in ("best.pt", "last.pt"):
        if os.path.exists(os.path.join(folder, name)):
            runfiles.load_checkpoint(os.path.join(folder, name))
    json.load(open(os.path.join(folder, "summary.json")))
    metrics(folder)


# conftest.py's GAP10K_RUN: 4 steps an epoch, then the 10,000 test images, so epoch 2 lasts seconds and
# a kill 0.3 s into it lands before its files; gap10k has dropout, augmentation and a per-batch
# schedule, so a resumed run must restore the RNG, data-generator and scheduler states too
TRAIN = ["--model", "gap10k", "--subset", "512", "--epochs", "2", "--device", "cpu", "--no-progress"]
SETTINGS = ("model", "subset", "epochs", "seed", "batch_size", "lr", "device", "pipeline", "amp", "compile")


def test_kill_mid_epoch_then_resume_matches_uninterrupted(tmp_path, forked, gap10k_run):
    """A train.py killed (SIGKILL) in epoch 2 and resumed ends exactly where the session's uninterrupted
    gap10k_run does: the same arguments, one thread each."""
    _, full = gap10k_run
    proc = forked.start("train.py", *TRAIN, "--out", "cut", cwd=tmp_path)
    csv_path = tmp_path / "cut" / "metrics.csv"
    deadline = time.time() + 240
    while not (csv_path.exists() and len(csv_path.read_text().splitlines()) == 2):  # epoch 1 written
        assert proc.alive() and time.time() < deadline, "training ended before it could be killed"
        time.sleep(0.02)
    time.sleep(0.3)                         # into epoch 2
    # a second writer of the same folder is refused while the run holds it (and train.py takes the
    # lock before anything else: test_hostile runs the CLI against a held folder)
    with pytest.raises(errors.UserError, match="is in use by another train.py process"):
        fileio.lock(str(tmp_path / "cut"))
    proc.send_signal(signal.SIGKILL)
    assert proc.wait().returncode == -signal.SIGKILL
    check_files_whole(tmp_path / "cut")
    assert len(metrics(tmp_path / "cut")) == 1
    resumed = forked.run("train.py", "--resume", "cut", "--device", "cpu", "--no-progress", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout
    a, b = (torch.load(f / "last.pt", weights_only=True) for f in (tmp_path / "cut", full))
    assert {k: a["args"][k] for k in SETTINGS} == {k: b["args"][k] for k in SETTINGS}  # the same run
    assert metrics(tmp_path / "cut") == metrics(full)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_ctrl_c_stops_cleanly(tmp_path, mnist_dir):
    """A fresh interpreter (not a fork): Ctrl-C as Python itself sets it up for a script. bn_fc, whose
    test-set pass is the cheapest (the loop and its files are the same for every model)."""
    proc = fresh_process("train.py", *TRAIN, "--model", "bn_fc", "--out", "run", cwd=tmp_path, mnist_dir=mnist_dir)
    csv_path = tmp_path / "run" / "metrics.csv"
    deadline = time.time() + 240
    while not csv_path.exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err and "--resume" in err
    check_files_whole(tmp_path / "run")


class Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_checkpoint_that_runs_code_is_refused(tmp_path, forked):
    path = tmp_path / "evil.pt"
    torch.save({"model_name": "gap10k", "model": {}, "x": Evil()}, path)
    r = forked.run("evaluate.py", "--checkpoint", str(path), cwd=tmp_path)
    assert r.returncode != 0 and "could run code" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(errors.UserError, match="could run code"):
        runfiles.load_checkpoint(str(path))
    assert not (tmp_path / "pwned").exists()


def test_nan_loss_stops_at_once(tmp_path, forked):
    r = forked.run("train.py", "--model", "conv4_fc", "--lr", "1e12", "--subset", "512", "--epochs", "1",
                   "--device", "cpu", "--no-progress", "--out", "nan", cwd=tmp_path)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "at epoch 1, step" in r.stderr and ("nan" in r.stderr or "inf" in r.stderr)
    assert not (tmp_path / "nan" / "best.pt").exists()


@pytest.fixture(scope="module")
def broken(tmp_path_factory, mnist_dir, trained):
    """A folder with a truncated IDX file, and a few bad checkpoints."""
    d = tmp_path_factory.mktemp("broken")
    (d / "mnist").mkdir()
    for f in os.listdir(mnist_dir):
        if f.endswith(".gz"):
            shutil.copy(os.path.join(mnist_dir, f), d / "mnist" / f)
    raw = gzip.decompress((d / "mnist" / "t10k-images-idx3-ubyte.gz").read_bytes())
    (d / "mnist" / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(raw[:5000]))
    good = (trained / "best.pt").read_bytes()
    (d / "truncated.pt").write_bytes(good[:len(good) // 2])
    (d / "text.pt").write_text("hello")
    return d


BAD_INPUT = [  # (script, args, what the one line must say)
    ("train.py", ["--model", "resnet"], "unknown model 'resnet'; choose one of: bn_gap"),
    ("train.py", ["--data-dir", "/nonexistent"], "/nonexistent does not exist"),
    ("train.py", ["--data-dir", "{broken}/mnist"], "t10k-images-idx3-ubyte.gz in"),
    ("evaluate.py", ["--checkpoint", "{broken}/truncated.pt"], "cannot read checkpoint"),
    ("evaluate.py", ["--checkpoint", "{broken}/text.pt"], "cannot read checkpoint"),
    ("evaluate.py", ["--checkpoint", "{broken}/missing.pt"], "does not exist"),
    ("export.py", ["--model", "gap10k", "--checkpoint", "{trained}/best.pt"], "holds a bn_fc model, not gap10k"),
    ("train.py", ["--out", "/proc/no/such/place"], "cannot write to output folder"),
    ("train.py", ["--epochs", "0"], "--epochs must be at least 1"),
    ("train.py", ["--batch-size", "-3"], "--batch-size must be at least 1"),
    ("train.py", ["--whole-step", "--subset", "100"],
     "--whole-step needs at least one full batch of 128 images, got 100"),  # was a ValueError traceback
    ("train.py", ["--lr", "1e300"], "--lr must be at most 3.403e+38 (float32's largest)"),  # was a traceback
    ("train.py", ["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "tpu"], "device"),
    ("train.py", ["--resume", "{broken}"], "nothing to resume"),
    ("train.py", ["--resume", "{trained}"], "already finished its 1 epochs"),
]


@pytest.mark.parametrize("script, args, message", BAD_INPUT, ids=[f"{s}:{' '.join(a)}" for s, a, _ in BAD_INPUT])
def test_bad_input_one_line(tmp_path, forked, broken, trained, script, args, message):
    args = [a.format(broken=broken, trained=trained) for a in args]
    r = forked.run(script, *args, "--device", "cpu", cwd=tmp_path) if "--device" not in args and \
        script != "export.py" else forked.run(script, *args, cwd=tmp_path)
    err = r.stderr.strip()
    assert r.returncode != 0
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and message.format(broken=broken) in err, err
    leftovers = [os.path.join(dp, f) for dp, _, fs in os.walk(tmp_path) for f in fs]
    assert not [f for f in leftovers if f.endswith((".pt", ".tmp", ".onnx"))]


def poison_loss(monkeypatch, first_bad_step):
    """Make the training loss NaN from the given training step (counted across epochs) on."""
    real, calls = torch.nn.functional.nll_loss, []

    def poisoned(out, y, *a, **k):
        loss = real(out, y, *a, **k)
        if out.requires_grad:
            calls.append(1)
            if len(calls) >= first_bad_step:
                return loss * float("nan")
        return loss
    monkeypatch.setattr(loop.F, "nll_loss", poisoned)


def nan_run(tmp_path, mnist_dir, *extra):
    """bn_fc (batch 128, like gap10k's): the cheapest test-set pass; the loop is every model's."""
    return train.parse_args(["--model", "bn_fc", "--device", "cpu", "--data-dir", mnist_dir, "--subset", "256",
                             "--no-progress", "--out", str(tmp_path / "run"), *extra])


def test_nan_in_a_later_epoch_keeps_the_last_good_checkpoint(tmp_path, mnist_dir, monkeypatch):
    """The loss turns NaN at epoch 2, step 1: training stops there, epoch 1's files stay whole. The
    test-set pass between the epochs is scripted: the NaN is in training."""
    poison_loss(monkeypatch, 3)   # 2 steps per epoch (256 images, batch 128): epoch 2, step 1
    monkeypatch.setattr(models, "log_probs", lambda model, images: torch.zeros(len(images), 10))
    with pytest.raises(errors.Diverged, match="at epoch 2, step 1; stopped"):
        train.run(nan_run(tmp_path, mnist_dir, "--epochs", "3"))
    check_files_whole(tmp_path / "run")
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["epoch"] == 1
    assert torch.load(tmp_path / "run" / "best.pt", weights_only=True)["epoch"] == 1
    assert len(metrics(tmp_path / "run")) == 1


def test_nan_between_host_syncs_names_its_exact_step(tmp_path, mnist_dir, monkeypatch):
    """Losses are read every loop.SYNC_EVERY steps; a NaN in between still names the step it hit."""
    poison_loss(monkeypatch, 23)  # 32 steps per epoch (256 images, batch 8): epoch 1, step 23
    with pytest.raises(errors.Diverged, match="at epoch 1, step 23; stopped"):
        train.run(nan_run(tmp_path, mnist_dir, "--batch-size", "8", "--epochs", "1"))
    assert not (tmp_path / "run" / "last.pt").exists()
