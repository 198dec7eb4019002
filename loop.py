"""The one training loop: seeding, the setup a training step needs (Trainer) and one epoch over a
loader (train_epoch). train.py runs it epoch after epoch; bench.py times it; the tests drive it.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import models
from common import Diverged, UserError


def seed_everything(seed, device):
    """Seed torch and make its kernels deterministic; returns the data generator (data.generator).
    Deterministic on CPU bit for bit; on CUDA cuBLAS is configured (common.py) and cuDNN picks
    deterministic kernels, torch warns about any op without one; fp32 stays fp32 (no TF32)."""
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.allow_tf32 = False
    torch.use_deterministic_algorithms(True, warn_only=True)
    return data.generator(seed, device)


@dataclass
class Trainer:
    """What every training step needs besides the batch: the net to train (maybe compiled), its
    optimizer and schedule ('batch' or 'epoch' steps), and the input format flags."""
    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object = None
    every: str = "epoch"
    channels_last: bool = False
    amp: bool = False


SYNC_EVERY = 20  # steps between host syncs: on CUDA the CPU queues work ahead of the GPU in between


def check_finite(losses, epoch, first):
    """Raise Diverged naming the exact step of the first non-finite loss in `losses` (on the CPU),
    the losses of epoch `epoch`'s steps first, first + 1, ..."""
    bad = (~torch.isfinite(losses)).nonzero()
    if len(bad):
        raise Diverged(f"loss became {losses[int(bad[0])].item()} at epoch {epoch}, step {first + int(bad[0])}; "
                       "stopped, the last good checkpoint is kept")


def train_epoch(trainer, loader, steps, epoch=0, progress=True):
    """One pass of `trainer` over `loader` (yielding (x, y)). Returns (mean loss, accuracy %, images).
    Losses and hits stay on the device and are read every SYNC_EVERY steps, where a non-finite
    loss raises Diverged naming the exact step it first appeared at."""
    model, optimizer, scheduler = trainer.net, trainer.optimizer, trainer.scheduler
    model.train()
    dev = next(model.parameters()).device
    fmt = torch.channels_last if trainer.channels_last else torch.contiguous_format
    total_loss, correct, seen, window, sizes = 0.0, 0, 0, [], []
    hits = torch.zeros((), dtype=torch.int64, device=dev)

    def sync(step):
        nonlocal total_loss, correct
        losses = torch.stack(window).cpu().double()  # one per step since the last sync (MPS has no float64)
        check_finite(losses, epoch, step - len(window) + 1)
        total_loss += float(losses @ torch.tensor(sizes, dtype=torch.float64))
        correct = int(hits)
        window.clear()
        sizes.clear()

    bar = tqdm(loader, total=steps, desc=f"epoch {epoch}", leave=False, disable=not progress, dynamic_ncols=True)
    step = 0
    for step, (x, y) in enumerate(bar, 1):
        x, y = x.to(dev, non_blocking=True).contiguous(memory_format=fmt), y.to(dev, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=trainer.amp):
            out = model(x)
        loss = F.nll_loss(out.float(), y)
        loss.backward()
        optimizer.step()
        if scheduler is not None and trainer.every == "batch":
            scheduler.step()
        n = y.shape[0]
        window.append(loss.detach())
        sizes.append(n)
        hits += (out.argmax(1) == y).sum()
        seen += n
        if step % SYNC_EVERY == 0:
            sync(step)
            if progress:
                bar.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{100 * correct / seen:.2f}")
    if window:
        sync(step)
    if scheduler is not None and trainer.every == "epoch":
        scheduler.step()
    return total_loss / seen, 100 * correct / seen, seen


# ------------------------------------------------------------------ the whole step, compiled

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
