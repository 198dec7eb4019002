"""Train one recipe with its documented settings.

    python train.py --model bn_gap --epochs 20
    python train.py --model gap10k --epochs 1 --subset 2048 --device cpu
    python train.py --resume runs/gap10k/latest

Writes into --out (default runs/<model>/<timestamp>/, runs/<model>/latest points at it):
metrics.csv, best.pt (on every improvement), last.pt (every epoch), summary.json. best.pt is chosen
by test accuracy, as the seeds do (optimistic: the test set picks the checkpoint it is scored on),
or with --val N by the accuracy on N held-out training images, the honest choice.
Every file is written to a temp file and renamed, so a kill leaves the old or the new one.
"""
import argparse
import csv
import io
import math
import os
import time
from dataclasses import dataclass

import torch

import data
import loop
import models
import whole_step
from errors import UserError, check_at_least, check_positive, one_line_errors
from fileio import check_out_dir, defer_sigint, lock, save_json, save_text, tmp_path, unlock
from machine import device_name, get_device, provenance
from runfiles import METRICS, load_checkpoint, make_checkpoint, remove_run, save_checkpoint
from stats import ci95, ci_text

# ------------------------------------------------------------------------ the epoch's batches

def make_loader(args, recipe, images, labels, gen, epoch):
    """Epoch `epoch`'s training batches for args.pipeline. The seed-style DataLoader is seeded from
    (seed, epoch): a new shuffle and new augmentations every epoch, the same ones on --resume."""
    if args.pipeline == "fast":
        return data.batches(images, labels, args.batch_size, recipe["augment"], gen=gen)
    return data.seed_loader(images.cpu(), labels.cpu(), args.batch_size, recipe["augment"],
                            seed=args.seed * 10_000 + epoch, workers=args.workers,
                            pin_memory=images.device.type == "cuda")


# ------------------------------------------------------------------------------ the run

def parser():
    p = argparse.ArgumentParser(description="Train one MNIST recipe with its documented settings, evaluating the "
                                "10,000 test images after every epoch.")
    p.add_argument("--model", default="bn_gap", help=f"recipe to train (default bn_gap): {', '.join(models.RECIPES)}")
    p.add_argument("--epochs", type=int, help="epochs to train (default: the recipe's documented count)")
    p.add_argument("--batch-size", type=int, help="training batch size (default: the recipe's)")
    p.add_argument("--lr", type=float, help="learning rate; for OneCycleLR recipes its max_lr (default: the recipe's)")
    p.add_argument("--seed", type=int, default=1, help="random seed, 0 to 2**63-1 (default 1); the same seed on "
                   "the same device and settings gives the same numbers")
    p.add_argument("--device", default="auto", help="auto (default: CUDA, then MPS, then CPU), cpu, cuda or mps")
    p.add_argument("--data-dir", help="folder with the four MNIST IDX files (default: $MNIST_DIR, then ./data)")
    p.add_argument("--out", help="run folder (default: runs/<model>/<timestamp>/, and runs/<model>/latest "
                   "points at it once its first epoch is written)")
    p.add_argument("--subset", type=int, help="train on the first N training images only (default: all 60,000)")
    p.add_argument("--val", type=int, default=0, help="hold out N of the 60,000 training images (a fixed choice, "
                   "the same for every recipe and seed: data.split_val) and choose best.pt by accuracy on them "
                   "(default 0: best.pt by test accuracy, the seeds' protocol)")
    p.add_argument("--pipeline", default="fast", choices=["fast", "torchvision"],
                   help="fast (default): data and augmentation on the training device; torchvision: the seeds' "
                   "PIL transforms + DataLoader")
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes for --pipeline torchvision "
                   "(default 2)")
    p.add_argument("--channels-last", action="store_true", help="NHWC memory format (off by default; it helps some "
                   "models and hurts others: see BENCHMARKS.md)")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast (off by default; fast on CPUs with "
                   "AMX/AVX512-BF16 and on GPUs with native bfloat16)")
    p.add_argument("--fast-dropout", action="store_true", help="cheaper dropout masks on CPU (off by default; drop "
                   "probability rounded to 1/65536, a different random stream than nn.Dropout)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model, with CUDA graphs on CUDA (off by "
                   "default; see BENCHMARKS.md for when it pays)")
    p.add_argument("--whole-step", action="store_true", help="torch.compile the whole training step (batch, "
                   "augmentation, forward, backward, update, schedule, figures: whole_step.WholeStep), with CUDA graphs "
                   "on CUDA; drops each epoch's short last batch (off by default; see BENCHMARKS.md)")
    p.add_argument("--resume", nargs="?", const="latest", metavar="RUN_DIR",
                   help="continue a run from its last.pt (default RUN_DIR: runs/<model>/latest) with the settings "
                   "it started with; only --device (the run's own), --data-dir and --no-progress may be given")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice, every core or "
                   "$OMP_NUM_THREADS); the same seed, settings, device and thread count give bit-identical runs "
                   "on the CPU, another thread count can change the last bits")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (for logs)")
    return p


def parse_args(argv=None):
    return parser().parse_args(argv)


RESUME_MAY_SET = {"resume", "device", "data_dir", "no_progress", "model"}


def check_args(args):
    models.get_recipe(args.model)
    check_at_least(args, 1, "epochs", "batch_size", "subset", "threads")
    check_at_least(args, 0, "workers", "val")
    if args.val >= data.COUNTS["train"]:
        raise UserError(f"--val {args.val} would hold out every training image; use at most {data.COUNTS['train'] - 1}")
    if args.pipeline not in ("fast", "torchvision"):
        raise UserError(f"unknown pipeline '{args.pipeline}'")
    if not 0 <= args.seed <= 2 ** 63 - 1:
        raise UserError(f"--seed must be between 0 and 2**63-1, got {args.seed}")
    check_positive(args, "lr")
    if getattr(args, "whole_step", False):  # runs from before the flag have none
        clash = [f for f, on in (("--compile", args.compile), ("--channels-last", args.channels_last),
                                 ("--pipeline torchvision", args.pipeline == "torchvision")) if on]
        if clash:
            raise UserError(f"--whole-step compiles the whole step itself; drop {', '.join(clash)}")


def resume_args(args, ckpt, out):
    """The run's own settings, as its last.pt recorded them. Flags that would be silently ignored are
    refused; --device must be the run's own (RNG states do not move between devices)."""
    p = parser()
    defaults = vars(p.parse_args([]))
    given = [k for k, v in vars(args).items() if k not in RESUME_MAY_SET and v != defaults[k]]
    if given:
        raise UserError(f"--resume continues {out} with the settings it started with; drop "
                        + ", ".join("--" + k.replace("_", "-") for k in given))
    saved = ckpt["args"]
    if args.model != defaults["model"] and args.model != saved.get("model"):
        raise UserError(f"{out} is a {saved.get('model')} run, not {args.model}")
    kinds = {a.dest: bool if a.nargs == 0 else a.type or str for a in p._actions}
    merged = dict(defaults)  # the saved settings, where they have the type the flag has
    merged.update({k: v for k, v in saved.items() if k in defaults and (v is None or type(v) is kinds[k])})
    rng = ckpt["rng"]  # runs from before the device was recorded: a CUDA one saved a CUDA state
    ran_on = rng.get("device") or ("cuda" if rng.get("cuda") is not None else "cpu")
    if ran_on not in ("cpu", "cuda", "mps"):
        raise UserError(f"{out}/last.pt names an unknown device '{ran_on}'")
    if args.device not in ("auto", ran_on):
        raise UserError(f"{out} was trained on {ran_on}; resume it there (--device {ran_on}) or start a new run")
    merged.update(resume=args.resume, device=ran_on, no_progress=args.no_progress,
                  data_dir=args.data_dir or saved.get("data_dir"))
    new = argparse.Namespace(**merged)
    check_args(new)
    return new


def prepare_out(args):
    """(run folder, whether this run created it, lock): the folder this run writes, locked
    against a second writer."""
    if args.resume:
        out = os.path.join("runs", args.model, "latest") if args.resume == "latest" else args.resume
        if not os.path.isfile(os.path.join(out, "last.pt")):
            raise UserError(f"nothing to resume: {out}/last.pt does not exist")
        out, created = os.path.realpath(out), False
    else:
        out = args.out or os.path.join("runs", args.model, time.strftime("%Y%m%d-%H%M%S"))
        created = not os.path.exists(out)
        check_out_dir(out, "output")
    held = lock(out)
    if not args.resume and os.path.exists(os.path.join(out, "last.pt")):
        unlock(held)
        raise UserError(f"{out} already holds a run; continue it with --resume {out} or choose another --out")
    return out, created, held


def point_latest(args, out):
    """runs/<model>/latest -> this run, once it has an epoch to show."""
    if args.out or args.resume:
        return
    link = os.path.join("runs", args.model, "latest")
    tmp = tmp_path(link)
    os.symlink(os.path.basename(out), tmp)
    os.replace(tmp, link)


def metrics_csv(history):
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=METRICS, lineterminator="\n")
    w.writeheader()
    w.writerows(history)
    return buf.getvalue()


def write_epoch(out, state, training, is_best, history, summary):
    """One epoch's files, each atomically: best.pt (on improvement), last.pt, metrics.csv, summary.json."""
    with defer_sigint():
        if is_best:
            save_checkpoint(state, os.path.join(out, "best.pt"))
        save_checkpoint(dict(state, **training), os.path.join(out, "last.pt"))
        save_text(metrics_csv(history), os.path.join(out, "metrics.csv"))
        save_json(summary, os.path.join(out, "summary.json"))


def rng_state(device, gen):
    return dict(device=device.type, torch=torch.get_rng_state(), data=gen.get_state().cpu(),
                cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                mps=torch.mps.get_rng_state() if device.type == "mps" else None)


def restore(ckpt, model, optimizer, scheduler, device, gen, out):
    model.load_state_dict(ckpt["model"])
    rng = ckpt["rng"]
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(ckpt["scheduler"])
            scheduler.get_last_lr()
        torch.set_rng_state(rng["torch"])
        gen.set_state(rng["data"])
        if device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], device)
        if device.type == "mps":
            torch.mps.set_rng_state(rng["mps"])
    except (ValueError, KeyError, TypeError, RuntimeError, IndexError, AttributeError):
        raise UserError(f"{out}/last.pt: its optimizer, schedule or RNG state does not fit this run") from None


def run(args):
    """Train as `args` says; returns the summary dict. Raises UserError (Diverged included)."""
    check_args(args)
    out, created, held = prepare_out(args)
    try:
        return train(args, out)
    except BaseException:
        if created and not os.path.exists(os.path.join(out, "last.pt")):
            remove_run(out)  # failed before its first epoch: leave nothing behind
        raise
    finally:
        unlock(held)


@dataclass
class Run:
    """What stays fixed through a run: its settings (the saved ones on --resume), folder, device, data
    generator, images ((x, y) on the device: training, validation (None without --val), test), the
    model and its loop.Trainer, and the steps per epoch."""
    args: argparse.Namespace
    recipe: dict
    out: str
    device: torch.device
    gen: torch.Generator
    train_set: tuple
    val_set: tuple
    test_set: tuple
    model: torch.nn.Module
    trainer: loop.Trainer
    steps: int
    whole_step: "whole_step.WholeStep" = None  # with --whole-step: the compiled step, which trains instead of trainer


def train(args, out):
    """The run in `out` (locked by run()), epoch by epoch from the first or from where last.pt
    stopped; every epoch's files are written before the next starts. Returns the summary dict."""
    ckpt = load_checkpoint(os.path.join(out, "last.pt"), training_state=True) if args.resume else None
    r = start(resume_args(args, ckpt, out) if ckpt else args, out)
    history, best_acc, best_epoch, first = resumed(r, ckpt)
    info = describe(r)
    t_run = time.time()
    for epoch in range(first, r.args.epochs + 1):
        row, correct = train_and_score(r, epoch)
        history.append(row)
        chosen_by = row["val_acc"] if r.args.val else row["test_acc"]  # what picks best.pt
        is_best = chosen_by > best_acc
        if is_best:
            best_acc, best_epoch = chosen_by, epoch
        n_test = len(r.test_set[1])
        summary = dict(info, **results(history, best_epoch, n_test, r.args.val), final_test_acc=row["test_acc"],
                       final_test_acc_ci95=ci95(correct, n_test), epochs_done=epoch,
                       wall_seconds=round(time.time() - t_run, 1))
        state = make_checkpoint(r.args.model, r.model.state_dict(), epoch, row["test_acc"], info["params"],
                                val_acc=row["val_acc"])
        write_epoch(r.out, state, training_state(r, history, best_acc, best_epoch), is_best, history, summary)
        if epoch == first:
            point_latest(r.args, r.out)
    print(last_words(r, summary))
    return summary


def start(args, out):
    """The Run of `args` (already resolved by resume_args on --resume): the recipe's defaults filled in,
    torch seeded, the images loaded, the model, optimizer and schedule built."""
    recipe = models.get_recipe(args.model)
    args.epochs = args.epochs or recipe["epochs"]
    args.batch_size = args.batch_size or recipe["batch_size"]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = get_device(args.device)
    if args.amp:
        models.check_amp(device)
    gen = loop.seed_everything(args.seed, device)
    train_set, val_set, test_set = load_sets(args, device)
    model, net = models.build(recipe, device, args.channels_last, args.fast_dropout, args.compile)
    if getattr(args, "whole_step", False):
        ws = whole_step.WholeStep(model, recipe, *train_set, args.batch_size, args.epochs, args.lr, args.amp)
        trainer = loop.Trainer(model, ws.optimizer, amp=args.amp)  # the schedule is ws's table
        return Run(args, recipe, out, device, gen, train_set, val_set, test_set, model, trainer, ws.steps, ws)
    optimizer = models.build_optimizer(recipe, model, args.lr)
    steps = math.ceil(len(train_set[1]) / args.batch_size)
    scheduler, every = models.build_schedule(recipe, optimizer, args.epochs, steps, args.lr)
    trainer = loop.Trainer(net, optimizer, scheduler, every, args.channels_last, args.amp)
    return Run(args, recipe, out, device, gen, train_set, val_set, test_set, model, trainer, steps)


def load_sets(args, device):
    """((x, y) trained on, (x, y) held out by --val or None, (x, y) test), on `device`: --val's images
    are held out of the 60,000 first, then --subset takes the first N of the rest."""
    train_x, train_y = data.load("train", args.data_dir)
    test_x, test_y = data.load("test", args.data_dir)
    val_set = None
    if args.val:
        keep, held = data.split_val(args.val)
        val_set = train_x[held].to(device), train_y[held].to(device)
        train_x, train_y = train_x[keep], train_y[keep]
    if args.subset:
        train_x, train_y = train_x[:args.subset], train_y[:args.subset]
    return (train_x.to(device), train_y.to(device)), val_set, (test_x.to(device), test_y.to(device))


def resumed(r, ckpt):
    """(history, best accuracy, best epoch, first epoch to train): a new run's, or with `ckpt` (last.pt)
    the run's own, its model, optimizer, schedule and RNG states restored."""
    if ckpt is None:
        return [], -1.0, 0, 1
    restore(ckpt, r.model, r.trainer.optimizer, r.trainer.scheduler, r.device, r.gen, r.out)
    if r.whole_step is not None:
        r.whole_step.own_lr()  # the loaded groups' lr back to its device tensors
    first = ckpt["epoch"] + 1
    if first > r.args.epochs:
        raise UserError(f"{r.out} already finished its {r.args.epochs} epochs; nothing to resume")
    print(f"resuming {r.out} at epoch {first}/{r.args.epochs} on {r.device.type}")
    return ckpt["history"], ckpt["best_acc"], ckpt["best_epoch"], first


def relative(path):
    """`path` relative to the current folder when inside it (jobs get whole paths), else as given."""
    rel = os.path.relpath(path)
    return path if rel.startswith(os.pardir) else rel


def describe(r):
    """summary.json's account of the run; its first part is printed as the run starts."""
    args = r.args
    info = dict(model=args.model, params=models.n_params(r.model), device=str(r.device),
                device_name=device_name(r.device), batch_size=args.batch_size, epochs=args.epochs, seed=args.seed,
                pipeline=args.pipeline, channels_last=args.channels_last, amp=args.amp,
                fast_dropout=args.fast_dropout, compile=args.compile,
                whole_step=getattr(args, "whole_step", False), train_images=len(r.train_set[1]),
                val_images=args.val, out=relative(r.out))
    print(" ".join(f"{k}={v}" for k, v in info.items()))
    info.update(documented=r.recipe["documented"], reconstructed=r.recipe["reconstructed"], lr=args.lr,
                subset=args.subset, **provenance(r.device, torch.get_num_threads()))
    return info


def train_and_score(r, epoch):
    """Train epoch `epoch`, then score the model on the validation images (with --val) and the test set;
    prints the epoch's line. Returns (its metrics.csv row, the count of test images right)."""
    t0 = time.time()
    if r.whole_step is not None:
        lr = r.whole_step.lr(epoch)
        train_loss, train_acc, seen = r.whole_step.epoch(r.gen, epoch, progress=not r.args.no_progress)
    else:
        lr = r.trainer.optimizer.param_groups[0]["lr"]
        loader = make_loader(r.args, r.recipe, *r.train_set, r.gen, epoch)
        train_loss, train_acc, seen = loop.train_epoch(r.trainer, loader, r.steps, epoch,
                                                       progress=not r.args.no_progress)
    if r.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.time() - t0
    val_loss = val_acc = None
    if r.args.val:
        val_loss, _, val_acc = models.score(models.log_probs(r.model, r.val_set[0]), r.val_set[1])
    test_x, test_y = r.test_set
    test_loss, correct, test_acc = models.score(models.log_probs(r.model, test_x), test_y)
    print(f"Epoch {epoch}: train loss {train_loss:.4f} acc {train_acc:.2f}% | "
          + (f"val acc {val_acc:.2f}% | " if r.args.val else "")
          + f"Test set: Average loss: {test_loss:.4f}, Accuracy: {correct}/{len(test_y)} ({test_acc:.2f}%, "
          f"{ci_text(ci95(correct, len(test_y)))}) | {seconds:.1f}s {seen / seconds:.0f} img/s")
    row = dict(epoch=epoch, train_loss=round(train_loss, 6), train_acc=round(train_acc, 4),
               val_loss=None if val_loss is None else round(val_loss, 6), val_acc=val_acc,
               test_loss=round(test_loss, 6), test_acc=test_acc, lr=float(f"{lr:.6g}"),
               seconds=round(seconds, 3), images_per_s=round(seen / seconds, 1), load_1m=round(os.getloadavg()[0], 2))
    return row, correct


def training_state(r, history, best_acc, best_epoch):
    """What last.pt holds beside the checkpoint, for --resume."""
    scheduler = r.trainer.scheduler
    return dict(optimizer=r.trainer.optimizer.state_dict(),
                scheduler=scheduler.state_dict() if scheduler is not None else None,
                rng=rng_state(r.device, r.gen), history=history, best_acc=best_acc, best_epoch=best_epoch,
                args=vars(r.args))


def last_words(r, summary):
    """The run's closing line: the validation-chosen epoch (with --val), the best test accuracy, the seed's."""
    doc = r.recipe["documented"]
    chosen = (f"chosen on validation: epoch {summary['val_chosen_epoch']}, test accuracy "
              f"{summary['val_chosen_test_acc']:.2f}% ({ci_text(summary['val_chosen_test_acc_ci95'])}); "
              if r.args.val else "")
    return (chosen + f"best test accuracy {summary['best_test_acc']:.2f}% at epoch {summary['best_epoch']}"
            + (" (optimistic: the test set chose it)" if r.args.val else "")
            + f" (documented {doc['best_test_acc']}% at epoch {doc['best_epoch']}); run folder {r.out}")


def results(history, chosen_epoch, n_test, val):
    """summary.json's accuracy figures from the epochs so far. best_test_acc / best_epoch: the highest
    test accuracy over epochs, the seeds' figure (optimistic: the test set picks the epoch). With
    --val also val_chosen_*: the epoch whose validation accuracy was highest (best.pt), and its test
    accuracy, the honest figure. Each test accuracy with its 95% Wilson interval."""
    top = max(history, key=lambda h: h["test_acc"])  # the first epoch at the maximum
    ci = lambda acc: ci95(round(acc * n_test / 100), n_test)  # noqa: E731 (accuracies are k / n_test exactly)
    out = dict(best_test_acc=top["test_acc"], best_epoch=top["epoch"], best_test_acc_ci95=ci(top["test_acc"]),
               checkpoint_chosen_by="validation" if val else "test accuracy (the seeds' protocol)")
    if val:
        chosen = next(h for h in history if h["epoch"] == chosen_epoch)
        out.update(val_chosen_epoch=chosen_epoch, val_chosen_val_acc=chosen["val_acc"],
                   val_chosen_test_acc=chosen["test_acc"], val_chosen_test_acc_ci95=ci(chosen["test_acc"]))
    return out


def main(argv=None):
    args = parse_args(argv)
    with one_line_errors("interrupted: last.pt holds the last finished epoch; continue with --resume RUN_DIR"):
        run(args)


if __name__ == "__main__":
    main()
