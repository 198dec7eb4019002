"""The one training loop: seeding, the setup a training step needs (Trainer) and one epoch over a
loader (train_epoch). train.py runs it epoch after epoch; bench.py times it; the tests drive it.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
from errors import Diverged


def seed_everything(seed, device):
    """Seed torch and make its kernels deterministic; returns the data generator (data.generator).
    Deterministic on CPU bit for bit; on CUDA cuBLAS is configured (machine.py) and cuDNN picks
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
