"""The whole training step as one compiled, replayable unit (train.py --whole-step): the twin of
loop.train_epoch's eager step, with the batch, augmentation, forward, backward, update and schedule
all on the device.
"""
import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import models
from errors import UserError
from loop import SYNC_EVERY, check_finite


def schedule_table(recipe, epochs, steps, lr=None):
    """The learning rate and momentum (None without) of every step of a run, as the recipe's own
    torch.optim scheduler sets them: it is run once on a stand-in optimizer (so the figures are
    torch's, not a copy of its formulas) and read before each step."""
    stand_in = models.build_optimizer(recipe, torch.nn.Linear(1, 1), lr)
    scheduler, every = models.build_schedule(recipe, stand_in, epochs, steps, lr)
    group, lrs, moms = stand_in.param_groups[0], [], []
    for _ in range(epochs):
        for _ in range(steps):
            lrs.append(float(group["lr"]))
            moms.append(group.get("momentum"))
            stand_in.step()  # no gradients: changes nothing, keeps the scheduler's order check quiet
            if scheduler is not None and every == "batch":
                scheduler.step()
        if scheduler is not None and every == "epoch":
            scheduler.step()
    return lrs, moms


class WholeStep:
    """The whole training step as one torch.compile'd function (train.py --whole-step): the step's
    batch gathered from the device-resident training set by a device step counter, its augmentation,
    forward, loss, backward, the optimizer update with the learning rate read from a device table of
    the recipe's schedule, and the loss and hit counts written into device tensors. The host only
    calls it, sets a cycled momentum (a float dynamo keeps symbolic: one recompile, then none), and
    reads the figures every SYNC_EVERY steps. Dynamo splits the step where PyTorch wants it split:
    at backward() (AOTAutograd compiles forward and backward as a pair; torch 2.14's
    trace_autograd_ops, which would trace backward into the step's graph, left the weights untouched
    when tried) and around optimizer.step (on purpose, pytorch/pytorch#104053); with cudagraphs on
    CUDA inductor replays each piece as a CUDA graph. Static shapes: an epoch is len // batch_size
    full batches of a fresh shuffle, the short last batch is dropped (a different remainder every
    epoch), and the figures count the images trained on. One compile per WholeStep, reused by every
    epoch (a new model is a new compile)."""

    def __init__(self, model, recipe, images, labels, batch_size, epochs, lr=None, amp=False, cudagraphs=True):
        dev = images.device
        self.model, self.aug, self.batch_size, self.amp = model, recipe["augment"], batch_size, amp
        self.images, self.labels = images, labels
        self.steps = len(labels) // batch_size
        if self.steps == 0:
            raise UserError(f"--whole-step needs at least one full batch of {batch_size} images, got {len(labels)}")
        self.optimizer = models.build_optimizer(recipe, model, lr)
        self.own_lr()
        self.table, self.moms = schedule_table(recipe, epochs, self.steps, lr)
        self.lrs = torch.tensor(self.table, dtype=torch.float32, device=dev)
        self.order = torch.zeros(self.steps, batch_size, dtype=torch.int64, device=dev)
        probe = data.draw(batch_size, self.aug, None)  # the draws' names and shapes, refilled every epoch
        self.draws = {k: torch.zeros(self.steps, *v.shape, dtype=v.dtype, device=dev) for k, v in probe.items()}
        self.t = torch.zeros(1, dtype=torch.int64, device=dev)       # the step within the epoch
        self.at = torch.zeros(1, dtype=torch.int64, device=dev)      # the step within the run
        self.losses = torch.zeros(self.steps, device=dev)
        self.hits = torch.zeros((), dtype=torch.int64, device=dev)
        self.compiled = models.compile_model(self.step, cudagraphs, dev, dynamic=None)

    def own_lr(self):
        """Each group's lr as a device tensor (again after optimizer.load_state_dict): the step
        changes it in place, so a new value is never a recompile."""
        for g in self.optimizer.param_groups:
            g["lr"] = torch.tensor(float(g["lr"]), device=self.images.device)

    def lr(self, epoch):
        """The learning rate of epoch `epoch`'s first step (what metrics.csv records)."""
        return self.table[(epoch - 1) * self.steps]

    def step(self):
        idx = self.order.index_select(0, self.t).view(-1)
        x = data.to_unit(self.images[idx])
        if self.aug:
            x = data.apply(x, self.aug, {k: v.index_select(0, self.t)[0] for k, v in self.draws.items()})
        x = (x - data.MEAN) / data.STD
        y = self.labels[idx]
        for g in self.optimizer.param_groups:
            g["lr"].copy_(self.lrs.index_select(0, self.at).view(()))
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.amp):
            out = self.model(x)
        loss = F.nll_loss(out.float(), y)
        self.losses.index_copy_(0, self.t, loss.detach().view(1))
        self.hits.add_((out.detach().argmax(1) == y).sum())
        loss.backward()
        self.optimizer.step()
        for p in self.model.parameters():
            p.grad = None
        self.t.add_(1)
        self.at.add_(1)

    def epoch(self, gen, epoch, steps=None, progress=True):
        """Train epoch `epoch` (1-based: its place in the schedule table), or its first `steps` steps.
        Returns (mean loss, accuracy %, images) like train_epoch; a non-finite loss raises Diverged."""
        steps = min(steps or self.steps, self.steps)
        n, dev = self.steps * self.batch_size, self.images.device
        order = torch.randperm(len(self.labels), generator=gen, device=gen.device)[:n]
        self.order.copy_(order.view(self.steps, self.batch_size))
        for k, v in data.draw(n, self.aug, gen).items():
            self.draws[k].copy_(v.view(self.steps, self.batch_size, *v.shape[1:]))
        first = (epoch - 1) * self.steps
        self.t.zero_()
        self.at.fill_(first)
        self.hits.zero_()
        self.model.train()
        checked = 0
        with torch._dynamo.config.patch(specialize_float=False):
            for s in tqdm(range(steps), desc=f"epoch {epoch}", leave=False, disable=not progress, dynamic_ncols=True):
                if self.moms[first + s] is not None:
                    for g in self.optimizer.param_groups:
                        g["momentum"] = self.moms[first + s]
                self.compiled()
                if (s + 1) % SYNC_EVERY == 0 or s + 1 == steps:
                    check_finite(self.losses[checked:s + 1].cpu().double(), epoch, checked + 1)
                    checked = s + 1
        seen = steps * self.batch_size
        return float(self.losses[:steps].double().mean()), 100 * int(self.hits) / seen, seen
