import json
import os

import pytest
import torch

import data
import errors
import loop
import models
import runfiles
import stats
import train


def run(tmp_path, mnist_dir, *extra, name="run"):
    args = train.parse_args(["--model", "gap10k", "--device", "cpu", "--data-dir", mnist_dir, "--subset", "512",
                             "--epochs", "1", "--no-progress", "--out", str(tmp_path / name), *extra])
    return train.run(args), tmp_path / name


def rows(folder):
    return runfiles.read_metrics(str(folder))


def test_outputs_and_summary(gap10k_run):
    summary, out = gap10k_run  # run(tmp_path, mnist_dir, "--epochs", "2"), shared with test_devices
    assert rows(out)[0].keys() == set(train.METRICS)
    assert len(rows(out)) == 2
    s = json.loads((out / "summary.json").read_text())
    for key in ("best_test_acc", "best_epoch", "final_test_acc", "documented", "params", "python", "torch",
                "torchvision", "device_name", "git_commit", "command", "seed", "wall_seconds", "threads"):
        assert key in s
    assert s["params"] == 9798 and s["documented"]["best_test_acc"] == 99.38
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["test_acc"] == s["best_test_acc"] and best["epoch"] == s["best_epoch"]
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]


def test_best_saved_only_on_improvement(tmp_path, mnist_dir, monkeypatch):
    """Scripted test accuracies 50, 70, 60, 70: best.pt is written at epochs 1 and 2 only."""
    accs = iter([50.0, 70.0, 60.0, 70.0])
    real_score = models.loss_and_accuracy
    monkeypatch.setattr(models, "loss_and_accuracy", lambda logp, y: (*real_score(logp, y)[:2], next(accs)))
    monkeypatch.setattr(models, "log_probs", lambda model, images: torch.zeros(len(images), 10))  # scores are scripted
    writes = []
    real_save = train.save_checkpoint
    monkeypatch.setattr(train, "save_checkpoint",
                        lambda obj, path: (writes.append((os.path.basename(path), obj["epoch"])), real_save(obj, path)))
    summary, out = run(tmp_path, mnist_dir, "--epochs", "4", "--subset", "128")
    assert [w for w in writes if w[0] == "best.pt"] == [("best.pt", 1), ("best.pt", 2)]
    assert [w for w in writes if w[0] == "last.pt"] == [("last.pt", e) for e in (1, 2, 3, 4)]
    assert torch.load(out / "best.pt", weights_only=True)["epoch"] == 2
    assert (summary["best_test_acc"], summary["best_epoch"], summary["final_test_acc"]) == (70.0, 2, 70.0)


def test_torchvision_pipeline_trains(tmp_path, mnist_dir, monkeypatch):
    """bn_fc: the richest transform (RandomAffine: rotation and shift). The pipeline feeds training
    only: the epoch's test-set pass is scripted (as in test_best_saved_only_on_improvement)."""
    monkeypatch.setattr(models, "log_probs", lambda model, images: torch.zeros(len(images), 10))
    summary, out = run(tmp_path, mnist_dir, "--pipeline", "torchvision", "--workers", "0", "--subset", "256",
                       "--model", "bn_fc")
    assert summary["pipeline"] == "torchvision" and len(rows(out)) == 1


def test_training_learns(trained):
    """bn_fc on 4,096 images for one epoch is far above chance (10%) on the real test set: the session's
    `trained` run (conftest.py), which is exactly that run."""
    assert json.loads((trained / "summary.json").read_text())["best_test_acc"] > 50


def test_channels_last_and_amp_train(tmp_path, mnist_dir):
    summary, out = run(tmp_path, mnist_dir, "--channels-last", "--amp", "--fast-dropout", "--subset", "256")
    assert summary["channels_last"] and summary["amp"] and summary["fast_dropout"] and len(rows(out)) == 1
    assert 0 <= summary["final_test_acc"] <= 100


def test_fast_dropout_is_dropout():
    d = models.FastDropout(0.05)
    x = torch.ones(1000, 1000, requires_grad=True)
    out = d.train()(x)
    dropped = (out == 0).float().mean().item()
    assert abs(dropped - 0.05) < 0.002                       # 1e6 draws: 4-sigma band is +-0.0009
    assert torch.allclose(out[out != 0], torch.tensor(1 / 0.95))
    out.sum().backward()
    assert torch.equal(x.grad == 0, out == 0)
    assert torch.allclose(x.grad[x.grad != 0], torch.tensor(1 / 0.95))
    assert d.eval()(x) is x
    # NHWC input: the mask is drawn in NHWC order and the output keeps the layout; views work too
    nhwc = torch.ones(64, 16, 28, 28).contiguous(memory_format=torch.channels_last)
    out = d.train()(nhwc)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert abs((out == 0).float().mean().item() - 0.05) < 0.002
    assert abs((d(nhwc[:, :, ::2]) == 0).float().mean().item() - 0.05) < 0.003
    model = models.use_fast_dropout(__import__("models").build_model("gap10k"))
    assert not any(type(m) is torch.nn.Dropout for m in model.modules())
    assert sum(isinstance(m, models.FastDropout) for m in model.modules()) == 6


def test_seed_pipeline_reshuffles_every_epoch(mnist_dir):
    """--pipeline torchvision: each epoch its own order and augmentations, reproducible per (seed, epoch)."""
    x, y = data.load("train", mnist_dir)
    recipe = __import__("models").RECIPES["gap10k"]

    def first_batch(epoch):
        args = train.parse_args(["--pipeline", "torchvision", "--batch-size", "128", "--workers", "1"])
        r = train.Run(args, recipe, None, torch.device("cpu"), None, (x[:1024], y[:1024]), None, None, None, 8)
        loader = train.epoch_batches(r, epoch)
        return next(iter(loader))
    (x1, y1), (x2, y2), (x1b, y1b) = first_batch(1), first_batch(2), first_batch(1)
    assert not torch.equal(y1, y2) and not torch.equal(x1, x2)
    assert torch.equal(y1, y1b) and torch.equal(x1, x1b)


@pytest.mark.slow  # an Inductor C++ compile of bn_fc's forward and backward: ~30 s of CPU
def test_compile_trains_the_models_own_weights(mnist_dir):
    """--compile trains the module's own parameters and BatchNorm buffers (the compiled wrapper shares
    them, so checkpoints stay plain), and one compiled step does what one eager step does. One step:
    bn_fc's conv biases sit right before a BatchNorm, so their gradient is zero up to rounding noise,
    which Adagrad scales into full-size steps of either sign; they are left out of the comparison."""
    x, y = data.load("train", mnist_dir)
    recipe = models.RECIPES["bn_fc"]
    got = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = models.build(recipe, torch.device("cpu"))
        net = models.compile_model(model) if compiled else model
        before = {k: v.clone() for k, v in model.state_dict().items()}
        opt = models.build_optimizer(recipe, model)
        batches = data.batches(x[:128], y[:128], 128, {}, torch.Generator().manual_seed(0))
        loss = loop.train_epoch(loop.Training(model, net, opt), batches, 1, progress=False)[0]
        got.append((loss, before, {k: v.clone() for k, v in model.state_dict().items()}))
    (le, _, eager), (lc, before, comp) = got
    assert abs(le - lc) < 1e-5                                            # the same forward pass
    free = {k for k in comp if k.startswith("features.") and k.endswith(".0.bias")}
    assert len(free) == 6
    changed = [k for k in comp if k.endswith(("weight", "running_mean", "running_var"))]
    assert all(not torch.equal(before[k], comp[k]) for k in changed)     # the module itself was trained
    assert all(torch.allclose(eager[k].float(), comp[k].float(), rtol=1e-3, atol=1e-4) for k in comp if k not in free)


def test_amp_refuses_gpus_that_emulate_bfloat16(monkeypatch):
    """T4 / V100 only emulate bfloat16: --amp there would be slow without a word, so it is refused."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Tesla T4")
    with pytest.raises(errors.UserError, match="Tesla T4 only emulates"):
        models.check_amp(torch.device("cuda"))
    models.check_amp(torch.device("cpu"))  # the CPU path is never refused


def test_compile_uses_static_shapes(monkeypatch):
    """A short last batch gets its own graph instead of turning every later batch dynamic."""
    seen = {}
    monkeypatch.setattr(torch, "compile", lambda model, **kw: seen.update(kw) or model)
    models.compile_model(models.build_model("bn_fc"))
    assert seen["dynamic"] is False and seen["mode"] is None  # CUDA graphs only on CUDA


def test_resume_refuses_another_device(trained):
    ckpt = torch.load(trained / "last.pt", weights_only=True)
    ckpt["rng"]["device"] = "cuda"
    args = train.parse_args(["--resume", str(trained), "--device", "cpu"])
    with pytest.raises(errors.UserError, match="was trained on cuda; resume it there"):
        train.resume_args(args, ckpt, str(trained))


def test_val_chooses_best_pt_and_summary_keeps_both_figures(tmp_path, mnist_dir, monkeypatch):
    """--val: scripted validation accuracies 50, 70, 60 and test accuracies 80, 60, 90. best.pt is
    epoch 2's (validation's maximum), not epoch 3's (the test maximum); summary.json gives the honest
    figure (60%, epoch 2) beside the seeds' optimistic one (90%, epoch 3), each with its interval."""
    accs = iter([50.0, 80.0, 70.0, 60.0, 60.0, 90.0])   # per epoch: validation, then test
    real_score = models.loss_and_accuracy
    monkeypatch.setattr(models, "loss_and_accuracy", lambda logp, y: (*real_score(logp, y)[:2], next(accs)))
    monkeypatch.setattr(models, "log_probs", lambda model, images: torch.zeros(len(images), 10))
    summary, out = run(tmp_path, mnist_dir, "--epochs", "3", "--subset", "128", "--val", "300")
    assert torch.load(out / "best.pt", weights_only=True)["epoch"] == 2
    s = json.loads((out / "summary.json").read_text())
    assert s == summary and s["val_images"] == 300 and s["checkpoint_chosen_by"] == "validation"
    assert (s["val_chosen_epoch"], s["val_chosen_val_acc"], s["val_chosen_test_acc"]) == (2, 70.0, 60.0)
    assert (s["best_test_acc"], s["best_epoch"]) == (90.0, 3)
    assert s["val_chosen_test_acc_ci95"] == stats.ci95(6000, 10000) and s["best_test_acc_ci95"] == stats.ci95(9000, 10000)
    assert [r["val_acc"] for r in rows(out)] == ["50.0", "70.0", "60.0"]


def test_val_split_is_fixed_disjoint_and_the_same_for_every_seed():
    keep, held = data.split_val(5000)
    assert len(held) == 5000 and len(keep) == 55000 and len(set(keep.tolist()) | set(held.tolist())) == 60000
    assert torch.equal(held, data.split_val(5000)[1])                        # a fixed choice
    assert torch.equal(keep, keep.sort().values) and torch.equal(data.split_val(0)[0], torch.arange(60000))
    assert set(data.split_val(1000)[1].tolist()) <= set(held.tolist())      # smaller splits nest in larger ones


@pytest.mark.parametrize("argv, says", [
    (["--model", "bn_gap", "--subset", "257"], "leave a last batch of one image"),          # 2 x 128 + 1
    (["--model", "bn_fc", "--val", "59743"], "leave a last batch of one image"),           # 257 left by --val
    (["--model", "bn_gap", "--batch-size", "256", "--subset", "513"], "leave a last batch of one image"),
])
def test_a_last_batch_of_one_image_is_refused_up_front(argv, says):
    """BatchNorm cannot train on one image: refused before any work, whichever flag made it."""
    with pytest.raises(errors.UserError, match=says):
        train.check_args(train.parse_args(argv))


def test_a_one_cycle_phase_of_no_steps_is_refused():
    """bn_gap's OneCycleLR over 4 steps in all has a warm-up of no step: one line, not a ZeroDivisionError."""
    recipe = models.RECIPES["bn_gap"]
    optimizer = models.build_optimizer(recipe, models.build_model("bn_gap"))
    with pytest.raises(errors.UserError, match="one of its phases would last no step"):
        models.build_schedule(recipe, optimizer, 1, 4)


def unfinished_copy(trained, tmp_path, edit):
    """A copy of the `trained` run whose last.pt says it wants 2 epochs (so --resume has work), edited."""
    import shutil
    folder = tmp_path / "run"
    shutil.copytree(trained, folder)
    ckpt = torch.load(folder / "last.pt", weights_only=True)
    ckpt["args"]["epochs"] = 2
    ckpt["args"]["out"] = str(folder)
    edit(ckpt)
    torch.save(ckpt, folder / "last.pt")
    return folder


RESUME_DISAGREES = [
    ("saved args name another model", lambda c: c["args"].update(model="gap10k")),
    ("a history row without test_acc", lambda c: c["history"][0].pop("test_acc")),
    ("a best epoch not in the history", lambda c: c.update(best_epoch=7)),
    ("saved epochs not a number", lambda c: c["args"].update(epochs="two")),
    ("saved args not a dict", lambda c: c.update(args=["bn_fc"])),
    ("a wall time that is no number", lambda c: c.update(wall_seconds="long")),
    ("resumed at an epoch it never reached", lambda c: c.update(resumed_at=[9])),
    ("a wall time without its resumes", lambda c: c.pop("resumed_at")),
]


@pytest.mark.parametrize("edit", [e for _, e in RESUME_DISAGREES], ids=[i for i, _ in RESUME_DISAGREES])
def test_resume_refuses_a_last_pt_whose_parts_disagree(trained, tmp_path, mnist_dir, edit):
    """Every part of last.pt is checked against the others before anything is restored: one UserError
    naming last.pt, and the run's files as they were (the folder's .lock holds whoever locked it last)."""
    folder = unfinished_copy(trained, tmp_path, edit)

    def files():
        return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != ".lock"}
    before = files()
    with pytest.raises(errors.UserError, match="last.pt"):
        train.run(train.parse_args(["--resume", str(folder), "--data-dir", mnist_dir, "--no-progress"]))
    assert files() == before


def test_a_name_that_is_not_utf8_is_printed_escaped(tmp_path, mnist_dir):
    """A run folder whose name is not UTF-8, printed to a strict UTF-8 stream: escaped, no traceback."""
    import subprocess
    import sys
    out = os.path.join(os.fsencode(str(tmp_path)), b"\xff-run")
    env = dict(os.environ, PYTHONIOENCODING="utf-8", LC_ALL="C.UTF-8", MNIST_DIR=mnist_dir)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run([sys.executable, "train.py", "--model", "bn_fc", "--subset", "256", "--epochs", "1",
                        "--device", "cpu", "--threads", "1", "--no-progress", "--out", out],
                       cwd=root, env=env, capture_output=True, timeout=300)
    assert p.returncode == 0 and b"Traceback" not in p.stderr, p.stderr[-2000:]
    assert b"\\xff-run" in p.stdout and b"\xff" not in p.stdout
