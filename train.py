"""Train one recipe with its documented settings.

    python train.py --model bn_gap --epochs 20
    python train.py --model gap10k --epochs 1 --subset 2048 --device cpu
    python train.py --resume runs/gap10k/latest

Writes into --out (default runs/<model>/<timestamp>/, runs/<model>/latest points at it):
metrics.csv, best.pt (on every test-accuracy improvement), last.pt (every epoch), summary.json.
Every file is written to a temp file and renamed, so a kill leaves the old or the new one.
"""
import argparse
import contextlib
import csv
import io
import json
import logging
import math
import os
import platform
import signal
import subprocess
import sys
import threading
import time

import torch
import torch.nn.functional as F
import torchvision
from tqdm import tqdm

import data
import models

METRICS = ["epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "seconds", "images_per_s"]


class UsageError(Exception):
    """Bad input from the user; the message is one line."""


class Diverged(Exception):
    pass


# ------------------------------------------------------------------------------ helpers

def atomic_write(path, write):
    """Call write(f) on a temp file beside `path`, fsync it, then rename it over `path`."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def defer_sigint():
    """Hold Ctrl-C while an epoch's files are written, so they always form a consistent set."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    old = signal.signal(signal.SIGINT, lambda *a: caught.append(a))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
    if caught:
        raise KeyboardInterrupt


def save_checkpoint(obj, path):
    atomic_write(path, lambda f: torch.save(obj, f))


def save_text(text, path):
    atomic_write(path, lambda f: f.write(text.encode()))


def load_checkpoint(path, model_name=None):
    """Read a checkpoint with weights_only=True (no code runs); one-line errors for the rest."""
    if not os.path.isfile(path):
        raise UsageError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "Weights only load failed" in str(e) or "Unsupported global" in str(e):
            raise UsageError(f"refusing {path}: it holds more than tensors and plain values, and loading it "
                             f"could run code (only checkpoints written by train.py are read)") from None
        raise UsageError(f"cannot read checkpoint {path}: {first} (truncated or not a torch file)") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_name" not in ckpt:
        raise UsageError(f"{path} is not a checkpoint written by train.py")
    if model_name and ckpt["model_name"] != model_name:
        raise UsageError(f"{path} holds a {ckpt['model_name']} model, not {model_name}")
    return ckpt


def model_from_checkpoint(ckpt):
    model = models.build_model(ckpt["model_name"])
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError:
        raise UsageError(f"checkpoint weights do not fit the {ckpt['model_name']} model") from None
    return model.eval()


def devices_present():
    """The device types this machine has: cpu, then cuda and mps where present."""
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) + \
        (["mps"] if torch.backends.mps.is_available() else [])


def get_device(name="auto"):
    present = devices_present()
    if name == "auto":  # CUDA, then MPS, then CPU
        return torch.device(next(d for d in ("cuda", "mps", "cpu") if d in present))
    if name not in ("cpu", "cuda", "mps"):
        raise UsageError(f"unknown device '{name}'; choose auto, cpu, cuda or mps")
    if name not in present:
        raise UsageError(f"device '{name}' is not present on this machine; use --device cpu or auto")
    return torch.device(name)


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple MPS"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def git_commit():
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=here, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def seed_everything(seed, device):
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    return torch.Generator(device=device).manual_seed(seed)


# ------------------------------------------------------------------------ the training loop

class FastDropout(torch.nn.Module):
    """nn.Dropout with a cheaper mask on CPU, where torch's bernoulli_ takes ~40% of a gap10k
    training step (BENCHMARKS.md): 16-bit uniform draws carved from 64-bit random words, so the
    drop probability is p rounded to 1/65536. Same expectation and scaling; identity in eval;
    other devices use F.dropout. Opt-in (--fast-dropout): it draws a different random stream."""

    def __init__(self, p):
        super().__init__()
        self.p = p
        self.threshold = round(p * 65536) - 32768

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, True)
        if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
            x = x.contiguous()
        n = x.numel()
        words = torch.randint(-2 ** 63, 2 ** 63 - 1, ((n + 3) // 4,), dtype=torch.int64)
        # the mask in x's own memory layout (NCHW or NHWC): mixed layouts make every later op slow
        keep = words.view(torch.int16)[:n].as_strided(x.shape, x.stride()) >= self.threshold
        return torch.where(keep, x * (1 / (1 - self.p)), 0)  # one masked op each way, no mask cast


def use_fast_dropout(model):
    for name, child in model.named_children():
        if isinstance(child, torch.nn.Dropout):
            setattr(model, name, FastDropout(child.p))
        else:
            use_fast_dropout(child)
    return model


def compile_model(model, cudagraphs=None):
    """torch.compile(model); on CUDA also CUDA graphs (mode reduce-overhead) unless cudagraphs=False.
    Returns the compiled wrapper: it shares the module's parameters and buffers."""
    torch._dynamo.reset()  # fresh caches: an earlier model's recompiles must not use up this one's limit
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime" on CPU hosts
    graphs = next(model.parameters()).device.type == "cuda" and cudagraphs is not False
    return torch.compile(model, mode="reduce-overhead" if graphs else None)


def build(recipe, device, channels_last=False, fast_dropout=False, compile=False, cudagraphs=None):
    """The recipe's model on `device` with the speed flags applied, as (model, net): train `net`
    (the torch.compile wrapper with compile=True, else the model itself); save and evaluate `model`."""
    model = recipe["model"]().to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if fast_dropout:
        use_fast_dropout(model)
    return model, (compile_model(model, cudagraphs) if compile else model)


SYNC_EVERY = 20  # steps between host syncs: on CUDA the CPU queues work ahead of the GPU in between


def train_epoch(model, optimizer, scheduler, step_every, loader, steps, desc="", progress=True, epoch=0,
                channels_last=False, amp=False):
    """One pass over `loader` (yielding (x, y)). Returns (mean loss, accuracy %, images).
    channels_last: feed NHWC batches (the model must be converted too); amp: bfloat16 autocast.
    Losses and hits stay on the device and are read every SYNC_EVERY steps, where a non-finite
    loss raises Diverged naming the exact step it first appeared at."""
    model.train()
    dev = next(model.parameters()).device
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    total_loss, correct, seen, window, sizes = 0.0, 0, 0, [], []
    hits = torch.zeros((), dtype=torch.int64, device=dev)

    def sync(step):
        nonlocal total_loss, correct
        losses = torch.stack(window).cpu().double()  # one per step since the last sync (MPS has no float64)
        bad = (~torch.isfinite(losses)).nonzero()
        if len(bad):
            first = step - len(window) + 1 + int(bad[0])
            raise Diverged(f"loss became {losses[int(bad[0])].item()} at epoch {epoch}, step {first}")
        total_loss += float(losses @ torch.tensor(sizes, dtype=torch.float64))
        correct = int(hits)
        window.clear()
        sizes.clear()

    bar = tqdm(loader, total=steps, desc=desc, leave=False, disable=not progress, dynamic_ncols=True)
    step = 0
    for step, (x, y) in enumerate(bar, 1):
        x, y = x.to(dev, non_blocking=True).contiguous(memory_format=fmt), y.to(dev, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            out = model(x)
        loss = F.nll_loss(out.float(), y)
        loss.backward()
        optimizer.step()
        if scheduler is not None and step_every == "batch":
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
    if scheduler is not None and step_every == "epoch":
        scheduler.step()
    return total_loss / seen, 100 * correct / seen, seen


@torch.no_grad()
def predict(model, images, batch_size=1000):
    """Log-probabilities [N, 10] on the CPU for uint8 images [N, 28, 28] (on any device); each batch is
    moved to the model's device and normalised there."""
    model.eval()
    dev = next(model.parameters()).device
    return torch.cat([model(data.normalize(images[i:i + batch_size].to(dev))).float().cpu()
                      for i in range(0, len(images), batch_size)])


def score(logp, y):
    """(mean NLL, correct count, accuracy % rounded to 2 decimals) of log-probabilities against labels."""
    correct = int((logp.argmax(1) == y.cpu()).sum())
    return F.nll_loss(logp, y.cpu()).item(), correct, round(100 * correct / len(y), 2)


def make_loader(pipeline, images, labels, recipe, batch_size, gen, device, seed, workers, epoch):
    """Epoch `epoch`'s training batches, for either pipeline. The seed-style DataLoader is seeded
    from (seed, epoch): a new shuffle and new augmentations every epoch, the same ones on --resume."""
    if pipeline == "fast":
        return data.batches(images, labels, batch_size, recipe["augment"], gen=gen)
    return data.seed_loader(images.cpu(), labels.cpu(), batch_size, recipe["augment"], seed=seed * 10_000 + epoch,
                            workers=workers, pin_memory=device.type == "cuda")


# ------------------------------------------------------------------------------ the run

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train one MNIST recipe with its documented settings.")
    p.add_argument("--model", default="bn_gap", help=f"recipe name: {', '.join(models.RECIPES)}")
    p.add_argument("--epochs", type=int, help="default: the recipe's")
    p.add_argument("--batch-size", type=int, help="default: the recipe's")
    p.add_argument("--lr", type=float, help="learning rate (OneCycleLR: max_lr); default: the recipe's")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda or mps")
    p.add_argument("--data-dir", help="folder with the four MNIST IDX files (default: $MNIST_DIR, then ./data)")
    p.add_argument("--out", help="run folder (default: runs/<model>/<timestamp>/)")
    p.add_argument("--subset", type=int, help="train on the first N training images only")
    p.add_argument("--pipeline", default="fast", choices=["fast", "torchvision"],
                   help="fast: device-resident batched augmentation; torchvision: seed-style PIL + DataLoader")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers for --pipeline torchvision")
    p.add_argument("--channels-last", action="store_true", help="NHWC memory format (faster on CPU, see BENCHMARKS.md)")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast (faster on AMX/AVX512-BF16 CPUs and GPUs)")
    p.add_argument("--fast-dropout", action="store_true", help="cheaper dropout masks on CPU (see train.FastDropout)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model (on CUDA with CUDA graphs); see BENCHMARKS.md for when it pays")
    p.add_argument("--resume", nargs="?", const="latest", metavar="RUN_DIR",
                   help="continue a run from its last.pt (default: runs/<model>/latest)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    return p.parse_args(argv)


def check_at_least_one(args, *flags):
    """One-line error for an integer option (None: not given) below 1."""
    for flag in flags:
        v = getattr(args, flag)
        if v is not None and v < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be at least 1, got {v}")


def check_args(args):
    models.get_recipe(args.model)
    check_at_least_one(args, "epochs", "batch_size", "subset")
    if args.lr is not None and not (args.lr > 0 and math.isfinite(args.lr)):
        raise UsageError(f"--lr must be a positive number, got {args.lr}")


def prepare_out(args):
    if args.resume:
        out = os.path.join("runs", args.model, "latest") if args.resume == "latest" else args.resume
        if not os.path.isfile(os.path.join(out, "last.pt")):
            raise UsageError(f"nothing to resume: {out}/last.pt does not exist")
        return os.path.realpath(out)
    out = args.out or os.path.join("runs", args.model, time.strftime("%Y%m%d-%H%M%S"))
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, f".write-test-{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise UsageError(f"cannot write to output folder {out}: {e.strerror}") from None
    if not args.out:  # runs/<model>/latest -> newest run
        link = os.path.join("runs", args.model, "latest")
        tmp = link + ".tmp"
        if os.path.lexists(tmp):
            os.remove(tmp)
        os.symlink(os.path.basename(out), tmp)
        os.replace(tmp, link)
    return out


def read_metrics(run_dir):
    """The rows of a run folder's metrics.csv as dicts of strings ([] where there is none)."""
    path = os.path.join(run_dir, "metrics.csv")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def metrics_csv(history):
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=METRICS, lineterminator="\n")
    w.writeheader()
    w.writerows(history)
    return buf.getvalue()


def run(args):
    """Train as `args` says; returns the summary dict. Raises UsageError / DataError / Diverged."""
    check_args(args)
    out = prepare_out(args)
    ckpt = None
    if args.resume:
        ckpt = load_checkpoint(os.path.join(out, "last.pt"))
        keep = {k: getattr(args, k) for k in ("device", "no_progress", "workers", "resume")}
        vars(args).update(ckpt["args"])  # the run continues with the settings it started with
        vars(args).update(keep)
    recipe = models.get_recipe(args.model)
    epochs = args.epochs or recipe["epochs"]
    batch_size = args.batch_size or recipe["batch_size"]
    device = get_device(args.device)
    gen = seed_everything(args.seed, device)

    train_x, train_y = data.load("train", args.data_dir)
    test_x, test_y = data.load("test", args.data_dir)
    if args.subset:
        train_x, train_y = train_x[:args.subset], train_y[:args.subset]
    train_x, train_y = train_x.to(device), train_y.to(device)
    test_x, test_y = test_x.to(device), test_y.to(device)

    model, net = build(recipe, device, args.channels_last, args.fast_dropout, args.compile)
    optimizer = models.build_optimizer(recipe, model, args.lr)
    steps = math.ceil(len(train_y) / batch_size)
    scheduler, every = models.build_schedule(recipe, optimizer, epochs, steps, args.lr)

    history, best_acc, best_epoch, start = [], -1.0, 0, 1
    if ckpt:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if device.type == "cuda":
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"])
        gen.set_state(ckpt["rng"]["data"])
        history, best_acc, best_epoch = ckpt["history"], ckpt["best_acc"], ckpt["best_epoch"]
        start = ckpt["epoch"] + 1
        if start > epochs:
            raise UsageError(f"{out} already finished its {epochs} epochs; nothing to resume")
        print(f"resuming {out} at epoch {start}/{epochs}")

    n_params = models.n_params(model)
    info = dict(model=args.model, params=n_params, device=str(device), device_name=device_name(device),
                batch_size=batch_size, epochs=epochs, seed=args.seed, pipeline=args.pipeline,
                channels_last=args.channels_last, amp=args.amp, fast_dropout=args.fast_dropout,
                compile=args.compile, train_images=len(train_y), out=out)
    print(" ".join(f"{k}={v}" for k, v in info.items()))
    info.update(documented=recipe["documented"], reconstructed=recipe["reconstructed"], lr=args.lr,
                subset=args.subset, python=platform.python_version(), torch=torch.__version__,
                torchvision=torchvision.__version__, git_commit=git_commit(),
                command=" ".join([os.path.basename(sys.executable)] + sys.argv))
    t_run = time.time()
    loader_args = (args.pipeline, train_x, train_y, recipe, batch_size, gen, device, args.seed, args.workers)
    for epoch in range(start, epochs + 1):
        lr = optimizer.param_groups[0]["lr"]
        loader = make_loader(*loader_args, epoch)
        t0 = time.time()
        train_loss, train_acc, seen = train_epoch(net, optimizer, scheduler, every, loader, steps,
                                                  desc=f"epoch {epoch}/{epochs}", epoch=epoch,
                                                  progress=not args.no_progress,
                                                  channels_last=args.channels_last, amp=args.amp)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.time() - t0
        test_loss, correct, test_acc = score(predict(model, test_x), test_y)
        print(f"Epoch {epoch}: train loss {train_loss:.4f} acc {train_acc:.2f}% | "
              f"Test set: Average loss: {test_loss:.4f}, Accuracy: {correct}/{len(test_y)} ({test_acc:.2f}%) | "
              f"{seconds:.1f}s {seen / seconds:.0f} img/s")
        history.append(dict(epoch=epoch, train_loss=round(train_loss, 6), train_acc=round(train_acc, 4),
                            test_loss=round(test_loss, 6), test_acc=test_acc, lr=float(f"{lr:.6g}"),
                            seconds=round(seconds, 3), images_per_s=round(seen / seconds, 1)))
        with defer_sigint():
            state = dict(model_name=args.model, model={k: v.cpu() for k, v in model.state_dict().items()},
                         epoch=epoch, test_acc=test_acc, params=n_params)
            if test_acc > best_acc:
                best_acc, best_epoch = test_acc, epoch
                save_checkpoint(state, os.path.join(out, "best.pt"))
            save_checkpoint(dict(state, optimizer=optimizer.state_dict(),
                                 scheduler=scheduler.state_dict() if scheduler is not None else None,
                                 rng=dict(torch=torch.get_rng_state(), data=gen.get_state().cpu(),
                                          cuda=torch.cuda.get_rng_state() if device.type == "cuda" else None),
                                 history=history, best_acc=best_acc, best_epoch=best_epoch,
                                 args=vars(args)), os.path.join(out, "last.pt"))
            save_text(metrics_csv(history), os.path.join(out, "metrics.csv"))
            summary = dict(info, best_test_acc=best_acc, best_epoch=best_epoch, final_test_acc=test_acc,
                           epochs_done=epoch, wall_seconds=round(time.time() - t_run, 1))
            save_text(json.dumps(summary, indent=2) + "\n", os.path.join(out, "summary.json"))
    print(f"best test accuracy {best_acc:.2f}% at epoch {best_epoch} "
          f"(documented {recipe['documented']['best_test_acc']}% at epoch {recipe['documented']['best_epoch']}); "
          f"run folder {out}")
    return summary


@contextlib.contextmanager
def one_line_errors():
    """Every script's main runs inside this: bad input becomes 'error: ...' and a non-zero exit."""
    try:
        yield
    except (UsageError, data.DataError, models.UnknownModel) as e:
        sys.exit(f"error: {e}")
    except Diverged as e:
        sys.exit(f"error: {e}; stopped, the last good checkpoint is kept")
    except OSError as e:
        sys.exit(f"error: {e.strerror or e}: {e.filename or ''}")


def main(argv=None):
    args = parse_args(argv)
    try:
        with one_line_errors():
            run(args)
    except KeyboardInterrupt:
        print("\ninterrupted: last.pt holds the last finished epoch; continue with --resume RUN_DIR", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
