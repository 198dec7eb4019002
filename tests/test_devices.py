"""The behaviours that must hold on every device, run on the CPU always and on CUDA (and MPS) where
present: `make gpu-check` runs this file on the GPU machine. Small subsets keep the CPU run short."""
import json
import os
import warnings

import pytest
import torch
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode

import artifacts
import data
import loop
import machine
import models
import runfiles
import train
import whole_step

DEVICES = machine.devices_present()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def short_run(tmp_path, mnist_dir, device, name, *extra):
    args = train.parse_args(["--model", "gap10k", "--device", device, "--data-dir", mnist_dir, "--subset", "512",
                             "--epochs", "2", "--no-progress", "--out", str(tmp_path / name), *extra])
    return train.run(args), tmp_path / name


def resume_and_compare(a, c, mnist_dir):
    """Resume the stopped run c and check it ends where the uninterrupted run a did: the same two
    metrics rows (times aside) and the same last.pt weights. Its summary counts both parts' wall time and
    names the epoch it resumed at."""
    before = torch.load(c / "last.pt", weights_only=True)["wall_seconds"]  # epoch 1's part
    train.run(train.parse_args(["--resume", str(c), "--data-dir", mnist_dir, "--no-progress"]))
    sa, sc = (json.loads((f / "summary.json").read_text()) for f in (a, c))
    assert sa["resumed_at_epochs"] == [] and sc["resumed_at_epochs"] == [2]
    assert sc["wall_seconds"] >= before + float(runfiles.read_metrics(str(c))[1]["seconds"]) - 0.1  # rounding
    cols = ["epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr"]
    rows = [[[r[k] for k in cols] for r in runfiles.read_metrics(str(f))] for f in (a, c)]
    assert len(rows[0]) == 2 and rows[0] == rows[1]
    wa, wc = (torch.load(f / "last.pt", weights_only=True)["model"] for f in (a, c))
    assert all(torch.equal(wa[k], wc[k]) for k in wa)


@pytest.mark.xdist_group("gap10k_run")
@pytest.mark.parametrize("device", DEVICES)
def test_same_seed_same_numbers_and_exact_resume(tmp_path, mnist_dir, device, monkeypatch, request):
    """A run stopped after epoch 1 and resumed ends exactly where an uninterrupted one with the same
    seed does (metrics and weights): two runs, one seed, the same numbers, across a resume; another
    seed gives other numbers. On the CPU the uninterrupted run is the session's gap10k_run (the same
    arguments as short_run's), which trains with one thread: so do these."""
    if device == "cpu":
        _, a = request.getfixturevalue("gap10k_run")
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        request.addfinalizer(lambda: torch.set_num_threads(threads))
    else:
        _, a = short_run(tmp_path, mnist_dir, device, "a")
    real = loop.train_epoch

    def stop_in_epoch_2(step, loader, steps, epoch=0, progress=True):
        if epoch == 2:
            raise KeyboardInterrupt
        return real(step, loader, steps, epoch, progress)
    monkeypatch.setattr(loop, "train_epoch", stop_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        short_run(tmp_path, mnist_dir, device, "c")
    monkeypatch.setattr(loop, "train_epoch", real)
    resume_and_compare(a, tmp_path / "c", mnist_dir)
    # another seed, other numbers: a's arguments but the seed (so the same schedule: with --epochs 1
    # the one-cycle schedule alone made epoch 1 differ), stopped after epoch 1 like c; its training
    # figures are what the seed decides (the test-set pass they feed is scripted: a and c compare theirs)
    monkeypatch.setattr(models, "log_probs", lambda model, images: torch.zeros(len(images), 10))
    monkeypatch.setattr(loop, "train_epoch", stop_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        short_run(tmp_path, mnist_dir, device, "d", "--seed", "2")
    first = lambda f: {k: runfiles.read_metrics(str(f))[0][k] for k in ("train_loss", "train_acc")}  # noqa: E731
    assert first(tmp_path / "d") != first(a)


@pytest.mark.parametrize("device", DEVICES)
def test_augmentation_matches_torchvision_on_device(mnist_dir, device):
    x = data.load("test", mnist_dir)[0][:16].unsqueeze(1).float().div(255)
    for angle, shift in ((7.0, (0, 0)), (-12.5, (2, -1))):
        grid = data.affine_grid(torch.full((16,), angle), torch.tensor([shift] * 16, dtype=torch.float),
                                device=torch.device(device))
        ours = torch.nn.functional.grid_sample(x.to(device), grid, mode="nearest", padding_mode="zeros",
                                               align_corners=False).cpu()
        theirs = TF.affine(x, angle=-angle, translate=list(shift), scale=1.0, shear=[0.0],
                           interpolation=InterpolationMode.NEAREST, fill=0)
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("device", DEVICES)
def test_device_predictions_match_cpu_and_exports(tmp_path, mnist_dir, device):
    """A model on `device` predicts what it predicts on the CPU, and an ONNX export of its weights
    (exported from the CPU copy) agrees with it."""
    model = models.from_checkpoint(runfiles.load_checkpoint(os.path.join(ROOT, "pretrained", "bn_fc.pt")))
    x = data.load("test", mnist_dir)[0][:1000]
    cpu = models.log_probs(model, x)
    dev = models.log_probs(model.to(device), x)
    assert torch.equal(cpu.argmax(1), dev.argmax(1)) and (cpu - dev).abs().max() < 1e-4
    path = str(tmp_path / "m.onnx")
    ck = runfiles.make_checkpoint("bn_fc", model.state_dict(), 0, 0.0, models.n_params(model))
    artifacts.write_onnx(artifacts.Exportable(model.cpu()).eval(), path, artifacts.metadata(ck), 18)
    got = artifacts.log_probs(path, x)
    assert torch.equal(got.argmax(1), dev.argmax(1)) and (got - dev).abs().max() < 1e-4


@pytest.mark.parametrize("device", DEVICES)
def test_training_step_never_waits_for_the_device(mnist_dir, device):
    """Between the every-SYNC_EVERY-steps reads, the step makes no tensor from Python values on the
    training device (a blocking copy) and, on CUDA, no synchronising call at all."""
    made, real = [], torch.tensor

    def spy(*a, **k):
        made.append(k.get("device"))
        return real(*a, **k)
    x, y = data.load("train", mnist_dir)
    dev = torch.device(device)
    for name in ("bn_fc", "conv4_fc"):  # rotation + translation; crop + rotation
        recipe = models.RECIPES[name]
        model = models.build(recipe, dev)
        step = loop.Training(model, model, models.build_optimizer(recipe, model))
        loader = data.batches(x[:512].to(dev), y[:512].to(dev), 32, recipe["augment"], data.generator(0, dev))
        torch.tensor = spy
        try:
            if device == "cuda":
                torch.cuda.set_sync_debug_mode("warn")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                loop.train_epoch(step, (b for _, b in zip(range(loop.SYNC_EVERY - 1), loader)),
                                 loop.SYNC_EVERY - 1, progress=False)
        finally:
            torch.tensor = real
            if device == "cuda":
                torch.cuda.set_sync_debug_mode(0)
        # on the training device (a CPU tensor, like the one foreach SGD/Adam make for the step, waits for nothing)
        assert [d for d in made if d is not None and torch.device(d).type == dev.type] == [], made
        # the one sync at the end of the (short) epoch is allowed; nothing per step
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
        assert len(syncs) <= 3, [str(w.message) for w in syncs]


# ------------------------------------------------------- the whole step on CUDA (whole_step.py)

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")


def whole_step_on(mnist_dir, device, name, n, batch_size, **kw):
    recipe = models.RECIPES[name]
    x, y = data.load("train", mnist_dir)
    torch.manual_seed(0)
    model = models.build(recipe, device)
    return whole_step.WholeStep(model, recipe, x[:n].to(device), y[:n].to(device), batch_size, 2, **kw)


@cuda_only
def test_whole_step_graphs_replay_the_eager_steps_on_cuda(mnist_dir):
    """bn_fc (no dropout: no random numbers in the step) for an epoch of 22 steps as CUDA graphs (one
    of 20 steps, one of 2) against the same step() called eagerly: the same losses, hits and weights."""
    dev = torch.device("cuda")
    runs = []
    for graphs in (True, False):
        ws = whole_step_on(mnist_dir, dev, "bn_fc", 22 * 32, 32, cudagraphs=graphs, compile=False)
        loss, acc, seen = ws.epoch(data.generator(0, dev), 1, progress=False)
        runs.append((ws, loss, acc))
    (g, gl, ga), (e, el, ea) = runs
    assert sorted(g.graphs) == [2, 20] and e.graphs is None and int(g.t) == 22
    assert ga == ea and abs(gl - el) <= 1e-6 * el and torch.allclose(g.losses, e.losses, rtol=1e-6, atol=0)
    for a, b in zip(g.model.state_dict().values(), e.model.state_dict().values()):
        assert torch.allclose(a.double(), b.double(), rtol=1e-5, atol=1e-7)


@cuda_only
@pytest.mark.parametrize("compile", [False, True], ids=["eager-kernels", "compiled"])
def test_whole_step_explained_on_cuda(mnist_dir, compile):
    """explain()'s figures on CUDA: a replay's time, the kernels of 5 steps, memory, no recompile after
    the warm-up and no CUDA graph that inductor skipped."""
    ws = whole_step_on(mnist_dir, torch.device("cuda"), "gap10k", 40 * 128, 128, compile=compile)
    got = whole_step.explain(ws, data.generator(0, torch.device("cuda")), timed=40)
    print(got)
    assert got["replay_ms"] > 0 and got["kernels"] > 5 * 20 and got["peak_mem_mb"] > 0 and got["steps_per_s"] > 0
    assert got["recompiles"] == 0 and got["cudagraph_skips"] == 0 and got["compile_s"] > 0
    assert sorted(ws.graphs) == [20]  # the 5 steps counted run eagerly: the same kernels a graph holds


@cuda_only
def test_whole_step_resumes_exactly_on_cuda(tmp_path, mnist_dir, monkeypatch):
    """gap10k (dropout: CUDA's random numbers drawn inside the graphs) with --whole-step, stopped after
    epoch 1 and resumed, ends where the uninterrupted run does: the same metrics and weights."""
    _, a = short_run(tmp_path, mnist_dir, "cuda", "a", "--whole-step")
    real = whole_step.WholeStep.epoch

    def stop_in_epoch_2(self, gen, epoch, **kw):
        if epoch == 2:
            raise KeyboardInterrupt
        return real(self, gen, epoch, **kw)
    monkeypatch.setattr(whole_step.WholeStep, "epoch", stop_in_epoch_2)
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        short_run(tmp_path, mnist_dir, "cuda", "c", "--whole-step")
    monkeypatch.setattr(whole_step.WholeStep, "epoch", real)
    resume_and_compare(a, tmp_path / "c", mnist_dir)
