import os
import re

import pytest
import torch

import models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Pinned parameter counts: the four documented by their sources, and bn_gap's own design.
PARAMS = {"bn_gap": 18304, "conv4_fc": 24552, "gap10k": 9798, "bn_drop": 13808, "bn_fc": 9594}


def test_registry_names():
    assert list(models.RECIPES) == list(PARAMS)


@pytest.mark.parametrize("name", PARAMS)
def test_param_count(name):
    assert models.n_params(models.build_model(name)) == PARAMS[name]
    documented = models.RECIPES[name]["documented"]["params"]
    assert documented in (None, PARAMS[name])


@pytest.mark.parametrize("name", PARAMS)
def test_output_is_log_probabilities(name):
    model = models.build_model(name).eval()
    out = model(torch.randn(5, 1, 28, 28))
    assert out.shape == (5, 10)
    assert torch.allclose(out.exp().sum(1), torch.ones(5), atol=1e-5)


@pytest.mark.parametrize("name", PARAMS)
def test_recipe_record_is_complete(name):
    r = models.RECIPES[name]
    for key in ("model", "optimizer", "schedule", "augment", "batch_size", "epochs", "documented",
                "reconstructed"):
        assert key in r
    opt = models.build_optimizer(r, models.build_model(name))
    sched, every = models.build_schedule(r, opt, r["epochs"], 10)
    assert every in ("batch", "epoch")


def test_summary_lists_layers():
    s = str(models.summary("gap10k"))
    assert "9,798" in s and "Conv2d" in s


def test_unknown_model():
    with pytest.raises(models.UnknownModel, match="choose one of: bn_gap"):
        models.build_model("resnet")


def test_bn_fc_schedule_matches_the_seed_log():
    """Seed 004 logs the learning rate at the start of each of its 10 epochs (469 steps each)."""
    logged = [0.100000, 0.262710, 0.587919, 0.750000, 0.713370, 0.611043, 0.463285, 0.299361, 0.151739, 0.049657]
    r = models.RECIPES["bn_fc"]
    opt = models.build_optimizer(r, models.build_model("bn_fc"))
    sched, every = models.build_schedule(r, opt, 10, 469)
    assert every == "batch"
    got = []
    for step in range(10 * 469):
        if step % 469 == 0:
            got.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert got == pytest.approx(logged, abs=1e-6)


SEEDS = os.path.join(ROOT, "..", "shared", "seeds")


@pytest.mark.parametrize("name", PARAMS)
def test_documented_curve_agrees_with_documented_figures(name):
    """The transcribed per-epoch test accuracy peaks at the documented best, in the documented epoch,
    and ends at the documented final figure; one entry per epoch."""
    r = models.RECIPES[name]
    doc = r["documented"]
    curve = doc["test_acc_by_epoch"]
    if name == "conv4_fc":
        assert curve is None   # one epoch, measured on the training set: no test curve to draw
        return
    assert len(curve) == r["epochs"]
    logged = [a for a in curve if a is not None]
    assert curve[0] is not None and curve[-1] is not None
    assert max(logged) == doc["best_test_acc"]
    assert curve[doc["best_epoch"] - 1] == doc["best_test_acc"]
    assert curve.index(max(logged)) == doc["best_epoch"] - 1   # the first epoch at the best is the documented one
    assert curve[-1] == doc["final_test_acc"]


def seed_log(name):
    """The per-epoch test accuracy as the seed file prints it, {epoch (1-based): %}."""
    text = open(os.path.join(SEEDS, models.RECIPES[name]["documented"]["source"]), encoding="utf-8").read()
    if name == "bn_gap":    # "Epoch 14:  Test Accuracy 99.55%", counted from 0
        return {int(e) + 1: float(a) for e, a in re.findall(r"^Epoch (\d+)\s*:\s+Test Accuracy ([\d.]+)%", text, re.M)}
    if name == "gap10k":    # "| 16 | 99.10% | 99.38% ... | 0.0211 |", bold markers around some cells
        rows = re.findall(r"^\| \**(\d+)\** \| \**[\d.]+%\** \| \**([\d.]+)%", text, re.M)
        return {int(e): float(a) for e, a in rows}
    if name == "bn_drop":   # "EPOCH: 15/20" ... "Accuracy: 9944/10000 (99.44%)"
        blocks = re.findall(r"EPOCH: (\d+)/\d+.*?Test set: .*?\(([\d.]+)%\)", text, re.S)
        return {int(e): float(a) for e, a in blocks}
    if name == "bn_fc":     # the closing summary table: epoch, losses, train acc, test acc, lr
        rows = re.findall(r"^\s+(\d+)\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+([\d.]+)\s+[\d.]+$", text, re.M)
        return {int(e): float(a) for e, a in rows}
    raise AssertionError(name)


@pytest.mark.parametrize("name", [n for n in PARAMS if n != "conv4_fc"])
def test_documented_curve_is_the_seed_log(name):
    if not os.path.isdir(SEEDS):
        pytest.skip(f"seed READMEs not found in {SEEDS}")
    logged = seed_log(name)
    curve = models.RECIPES[name]["documented"]["test_acc_by_epoch"]
    assert logged == {e: a for e, a in enumerate(curve, 1) if a is not None}
