"""The eager training step and the epoch around it. train.py builds a Training and calls train_epoch
once an epoch; bench.py times the same two; whole_step.py is its device-resident twin.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import models
from errors import Diverged, UserError

SYNC_EVERY = 20  # steps between host syncs: on CUDA the CPU queues work ahead of the GPU in between


def seed_everything(seed, device):
    """Seed torch and make its kernels deterministic; returns the data generator (data.generator).
    Deterministic on CPU bit for bit (for one thread count); on CUDA cuBLAS is configured (machine.py)
    and cuDNN picks deterministic kernels, torch warns about any op without one; fp32 stays fp32."""
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.allow_tf32 = False
    torch.use_deterministic_algorithms(True, warn_only=True)
    # deterministic mode also fills every new tensor's memory (extra kernels each step on CUDA); the
    # harness reads no tensor before writing it, so the results are the same without the fill
    torch.utils.deterministic.fill_uninitialized_memory = False
    return data.generator(seed, device)


@dataclass
class Training:
    """A model in training: `model` holds the weights that are trained and saved, `net` is what the
    step calls (the torch.compile wrapper with --compile, else the model itself), then the optimizer,
    its schedule (stepped every 'batch' or every 'epoch'), the input format and, with --whole-step,
    the whole step (whole_step.WholeStep) that trains instead of train_epoch."""
    model: torch.nn.Module
    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object = None
    every: str = "epoch"
    channels_last: bool = False
    amp: bool = False
    whole_step: object = None


def build(recipe, device, epochs, steps, lr=None, channels_last=False, amp=False, fast_dropout=False,
          compile=False, cudagraphs=True, whole_step=None):
    """The recipe's Training on `device` for `epochs` epochs of `steps` steps. whole_step: None, or
    the (images, labels, batch_size) the whole step gathers its batches from (compile: inductor's kernels
    for its forward and loss)."""
    model = models.build(recipe, device, channels_last, fast_dropout)
    if whole_step is not None:
        import whole_step as ws_module  # only --whole-step needs it
        ws = ws_module.WholeStep(model, recipe, *whole_step, epochs, lr, amp, cudagraphs, compile)
        return Training(model, model, ws.optimizer, amp=amp, whole_step=ws)
    net = models.compile_model(model, cudagraphs) if compile else model
    optimizer = models.build_optimizer(recipe, model, lr)
    scheduler, every = models.build_schedule(recipe, optimizer, epochs, steps, lr)
    return Training(model, net, optimizer, scheduler, every, channels_last, amp)


def train_step(t, x, y):
    """One eager training step of Training `t` on the batch (x, y): forward, loss, backward, update,
    and the schedule where it steps every batch. Returns the loss and the outputs, detached."""
    t.optimizer.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=t.amp):
        out = t.net(x)
    loss = F.nll_loss(out.float(), y)
    loss.backward()
    t.optimizer.step()
    if t.scheduler is not None and t.every == "batch":
        t.scheduler.step()
    return loss.detach(), out.detach()


def train_epoch(t, batches, steps, epoch=0, progress=True):
    """One pass of Training `t` over `batches` ((x, y) pairs, `steps` of them). Returns (mean loss,
    accuracy %, images)."""
    t.net.train()
    dev = next(t.model.parameters()).device
    fmt = torch.channels_last if t.channels_last else torch.contiguous_format
    tally = Tally(dev, epoch)
    bar = tqdm(batches, total=steps, desc=f"epoch {epoch}", leave=False, disable=not progress, dynamic_ncols=True)
    for x, y in bar:
        x, y = x.to(dev, non_blocking=True).contiguous(memory_format=fmt), y.to(dev, non_blocking=True)
        loss, out = train_step(t, x, y)
        if tally.add(loss, out, y) and progress:
            bar.set_postfix(loss=f"{tally.loss:.4f}", acc=f"{tally.accuracy:.2f}")
    if t.scheduler is not None and t.every == "epoch":
        t.scheduler.step()
    return tally.result()


class Tally:
    """An epoch's running loss and accuracy. Losses and hits stay on the device and are read every
    SYNC_EVERY steps (a read waits for the device), where a non-finite loss raises Diverged naming
    the exact step it first appeared at."""

    def __init__(self, device, epoch):
        self.epoch, self.steps, self.seen, self.total, self.correct = epoch, 0, 0, 0.0, 0
        self.window, self.sizes = [], []
        self.hits = torch.zeros((), dtype=torch.int64, device=device)

    def add(self, loss, out, y):
        """Count one step; True when this step synced (the figures are current)."""
        self.steps += 1
        self.window.append(loss)
        self.sizes.append(y.shape[0])
        self.hits += (out.argmax(1) == y).sum()
        self.seen += y.shape[0]
        if self.steps % SYNC_EVERY:
            return False
        self.sync()
        return True

    def sync(self):
        losses = torch.stack(self.window).cpu().double()  # one per step since the last sync (MPS has no float64)
        check_finite(losses, self.epoch, self.steps - len(self.window) + 1)
        self.total += float(losses @ torch.tensor(self.sizes, dtype=torch.float64))
        self.correct = int(self.hits)
        self.window.clear()
        self.sizes.clear()

    @property
    def loss(self):
        return self.total / self.seen

    @property
    def accuracy(self):
        return 100 * self.correct / self.seen

    def result(self):
        if self.window:
            self.sync()
        if not self.seen:
            raise UserError("an epoch with no training batches: the training set is empty")
        return self.loss, self.accuracy, self.seen


def check_finite(losses, epoch, first):
    """Raise Diverged naming the exact step of the first non-finite loss in `losses` (on the CPU),
    the losses of epoch `epoch`'s steps first, first + 1, ..."""
    bad = (~torch.isfinite(losses)).nonzero()
    if len(bad):
        raise Diverged(f"loss became {losses[int(bad[0])].item()} at epoch {epoch}, step {first + int(bad[0])}; "
                       "stopped")
