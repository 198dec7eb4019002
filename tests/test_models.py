import pytest
import torch

import models

# Pinned parameter counts: the four documented by their seeds, and bn_gap's own design.
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
