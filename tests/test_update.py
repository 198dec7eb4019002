"""whole_step.Update, the optimizer update the whole step writes out (so a CUDA graph can replay it with
each step's lr and momentum read from device tables), against torch.optim's own SGD and Adagrad driven
by the recipe's own scheduler: the same parameters and state over a whole schedule of 100+ steps."""
import copy
import math

import pytest
import torch

import models
import whole_step

STEPS = 120  # at least this many steps in all, over the recipe's own epochs


def cases():
    """Every recipe at its own epochs against torch's single-tensor update (its CPU default), and
    conv4_fc long enough for its StepLR (every 15 epochs) to act; the SGD with the most in it (gap10k:
    weight decay, cycled momentum) and Adagrad (bn_fc) against the foreach update too (CUDA's default)."""
    got = [(name, r["epochs"], math.ceil(STEPS / r["epochs"]), False) for name, r in models.RECIPES.items()]
    return got + [("conv4_fc", 16, 8, False), ("gap10k", 19, 7, True), ("bn_fc", 10, 12, True)]


@pytest.fixture(autouse=True)
def one_thread():
    """Tensors of a few thousand numbers: a second thread only adds OpenMP's hand-offs (on a busy
    2-core machine Adagrad's sqrt took 7 ms a call with two threads, 0.04 ms with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def relative_error(ours, theirs):
    """max |ours - theirs| / max |theirs| of one tensor (0 when both are zero)."""
    scale = theirs.abs().max().item()
    return (ours - theirs).abs().max().item() / scale if scale else (ours - theirs).abs().max().item()


@pytest.mark.parametrize("name, epochs, steps, foreach", cases())
def test_written_out_update_equals_torch_optim(name, epochs, steps, foreach):
    """Random gradients of each parameter's shape (the same for both), the recipe's optimizer and
    scheduler on one copy of the model, whole_step's Update with the Schedule's figures as float32
    tensors on the other; after every epoch the parameters and the optimizer state (momentum buffers,
    Adagrad sums) agree to 1e-6 of each tensor's largest value."""
    recipe = models.RECIPES[name]
    torch.manual_seed(0)
    ours_model = models.build_model(name)
    theirs_model = copy.deepcopy(ours_model)
    kind, kw = recipe["optimizer"]
    theirs = getattr(torch.optim, kind)(theirs_model.parameters(), **kw, foreach=foreach)
    scheduler, every = models.build_schedule(recipe, theirs, epochs, steps)
    update = whole_step.Update(models.build_optimizer(recipe, ours_model))
    schedule = whole_step.Schedule(recipe, epochs, steps)
    gen = torch.Generator().manual_seed(1)
    for epoch in range(1, epochs + 1):
        lrs, moms = schedule.epoch(epoch)
        for lr, mom in zip(lrs, moms):
            grads = [torch.randn(p.shape, generator=gen) * 0.1 for p in ours_model.parameters()]
            for p, g in zip(theirs_model.parameters(), grads):
                p.grad = g.clone()
            assert theirs.param_groups[0]["lr"] == lr and theirs.param_groups[0].get("momentum") == mom
            theirs.step()
            if scheduler is not None and every == "batch":
                scheduler.step()
            update(grads, torch.tensor(lr), torch.tensor(mom or 0.0))
        if scheduler is not None and every == "epoch":
            scheduler.step()
        for ours_p, theirs_p in zip(ours_model.parameters(), theirs_model.parameters()):
            assert relative_error(ours_p.detach(), theirs_p.detach()) < 1e-6, (epoch, relative_error(ours_p, theirs_p))
            mine, torch_state = update.optimizer.state[ours_p][update.key], theirs.state[theirs_p][update.key]
            assert relative_error(mine, torch_state) < 1e-6, (epoch, update.key)
    assert not torch.equal(next(ours_model.parameters()), next(models.build_model(name).parameters()))


def test_state_is_the_optimizers_own_and_survives_load_state_dict():
    """The buffers the update writes are optimizer.state's, so state_dict() saves them; after
    load_state_dict (new tensors) adopt_state copies the loaded values back into the same buffers."""
    recipe = models.RECIPES["bn_drop"]  # SGD with momentum, no weight decay
    model = models.build_model("bn_drop")
    update = whole_step.Update(models.build_optimizer(recipe, model))
    grads = [torch.ones_like(p) for p in model.parameters()]
    update(grads, torch.tensor(0.01), torch.tensor(0.9))
    saved = copy.deepcopy(update.optimizer.state_dict())
    buffers = [b.data_ptr() for b in update.own]
    update(grads, torch.tensor(0.01), torch.tensor(0.9))
    update.optimizer.load_state_dict(saved)
    update.adopt_state()
    assert [b.data_ptr() for b in update.own] == buffers
    assert all(update.optimizer.state[p]["momentum_buffer"] is b for p, b in zip(update.params, update.own))
    assert all(torch.equal(b, saved["state"][i]["momentum_buffer"]) for i, b in enumerate(update.own))
    assert torch.equal(update.own[0], torch.ones_like(update.own[0]))  # one step's momentum: the gradient


def test_refuses_an_update_it_does_not_write_out():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(whole_step.UserError, match="writes out SGD and Adagrad"):
        whole_step.Update(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True))
    with pytest.raises(whole_step.UserError, match="writes out SGD and Adagrad"):
        whole_step.Update(torch.optim.Adam(model.parameters()))
