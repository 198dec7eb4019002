"""Train one recipe with its documented settings.

    python train.py --model bn_gap --epochs 20
    python train.py --model gap10k --epochs 1 --subset 2048 --device cpu
    python train.py --resume runs/gap10k/latest

Writes into --out (default runs/<model>/<timestamp>/, runs/<model>/latest points at it):
metrics.csv, best.pt (on every improvement), last.pt (every epoch), summary.json. best.pt is chosen
by test accuracy, as the sources do (optimistic: the test set picks the checkpoint it is scored on),
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
from errors import Diverged, UserError, check_at_least, check_positive, is_number, one_line_errors, printable
from fileio import check_out_dir, defer_sigint, lock, save_json, save_text, tmp_path, unlock
from machine import device_name, get_device, provenance
from runfiles import METRICS, load_checkpoint, make_checkpoint, remove_run, save_checkpoint
from stats import ci95, ci_text


def main(argv=None):
    args = parse_args(argv)
    with one_line_errors("interrupted: last.pt holds the last finished epoch; continue with --resume RUN_DIR"):
        run(args)


# ------------------------------------------------------------------------------- the run

def run(args):
    """Train as `args` says, in its run folder (locked while this runs); returns the summary dict.
    A run that fails before its first epoch is written leaves no folder behind."""
    check_args(args)
    out, created, held = prepare_out(args)
    try:
        ckpt = load_checkpoint(os.path.join(out, "last.pt"), training_state=True) if args.resume else None
        r = build_run(resume_args(args, ckpt, out) if ckpt else args, out)
        return fit(r, ckpt)
    except BaseException as e:
        kept = os.path.exists(os.path.join(out, "last.pt"))
        if created and not kept:
            remove_run(out)
        if isinstance(e, Diverged):
            raise Diverged(f"{e}; " + (f"{printable(out)}/last.pt keeps the last finished epoch" if kept else
                                       "no epoch had finished, so nothing was kept")) from None
        raise
    finally:
        unlock(held)


def fit(r, ckpt=None):
    """The epoch loop of Run `r`, from its first epoch or from where `ckpt` (last.pt) stopped: train,
    score, write every epoch's files before the next starts. Returns the summary dict."""
    history, best_acc, best_epoch, first = resumed(r, ckpt)
    info = describe(r)
    # wall time and resumes carried in last.pt, so a resumed run's summary counts every part; a last.pt
    # written before they were kept counts from its resume on, and its summary names no resumes
    earlier = (ckpt.get("wall_seconds"), ckpt.get("resumed_at")) if ckpt else (0.0, [])
    resumes = None if earlier[0] is None else earlier[1] + ([first] if ckpt else [])
    t_run = time.time() - (earlier[0] or 0.0)
    for epoch in range(first, r.args.epochs + 1):
        train_loss, train_acc, seen, seconds, lr = train_one_epoch(r, epoch)
        row, correct = score(r, epoch, train_loss, train_acc, seen, seconds, lr)
        history.append(row)
        chosen_by = row["val_acc"] if r.args.val else row["test_acc"]  # what picks best.pt
        is_best = chosen_by > best_acc
        if is_best:
            best_acc, best_epoch = chosen_by, epoch
        n_test = len(r.test_set[1])
        summary = dict(info, **results(history, best_epoch, n_test, r.args.val), final_test_acc=row["test_acc"],
                       final_test_acc_ci95=ci95(correct, n_test), epochs_done=epoch,
                       wall_seconds=round(time.time() - t_run, 1))
        if resumes is not None:
            summary["resumed_at_epochs"] = resumes
        state = make_checkpoint(r.args.model, r.training.model.state_dict(), epoch, row["test_acc"], info["params"],
                                val_acc=row["val_acc"])
        kept = training_state(r, history, best_acc, best_epoch)
        if resumes is not None:
            kept.update(wall_seconds=summary["wall_seconds"], resumed_at=resumes)
        write_epoch(r.out, state, kept, is_best, history, summary)
        if epoch == first:
            point_latest(r.args, r.out)
    print(last_words(r, summary))
    return summary


def train_one_epoch(r, epoch):
    """Train epoch `epoch` of Run `r`: the eager step over this epoch's batches (loop.train_epoch), or
    the compiled whole step. Returns (mean loss, accuracy %, images, seconds, the epoch's first lr)."""
    t0, t = time.time(), r.training
    if t.whole_step is not None:
        lr = t.whole_step.lr(epoch)
        figures = t.whole_step.epoch(r.gen, epoch, progress=not r.args.no_progress)
    else:
        lr = t.optimizer.param_groups[0]["lr"]
        figures = loop.train_epoch(t, epoch_batches(r, epoch), r.steps, epoch, progress=not r.args.no_progress)
    if r.device.type == "cuda":
        torch.cuda.synchronize()
    return (*figures, time.time() - t0, lr)


def epoch_batches(r, epoch):
    """Epoch `epoch`'s training batches for --pipeline. The sources' DataLoader is seeded from
    (seed, epoch): a new shuffle and new augmentations every epoch, the same ones on --resume."""
    images, labels = r.train_set
    if r.args.pipeline == "fast":
        return data.batches(images, labels, r.args.batch_size, r.recipe["augment"], gen=r.gen)
    return data.seed_loader(images.cpu(), labels.cpu(), r.args.batch_size, r.recipe["augment"],
                            seed=r.args.seed * 10_000 + epoch, workers=r.args.workers,
                            pin_memory=images.device.type == "cuda")


def score(r, epoch, train_loss, train_acc, seen, seconds, lr):
    """Score the model on the validation images (with --val) and the test set, print the epoch's line.
    Returns (its metrics.csv row, the count of test images right)."""
    model = r.training.model
    val_loss = val_acc = None
    if r.args.val:
        val_loss, _, val_acc = models.loss_and_accuracy(models.log_probs(model, r.val_set[0]), r.val_set[1])
    test_x, test_y = r.test_set
    test_loss, correct, test_acc = models.loss_and_accuracy(models.log_probs(model, test_x), test_y)
    print(f"Epoch {epoch}: train loss {train_loss:.4f} acc {train_acc:.2f}% | "
          + (f"val acc {val_acc:.2f}% | " if r.args.val else "")
          + f"Test set: Average loss: {test_loss:.4f}, Accuracy: {correct}/{len(test_y)} ({test_acc:.2f}%, "
          f"{ci_text(ci95(correct, len(test_y)))}) | {seconds:.1f}s {seen / seconds:.0f} img/s")
    row = dict(epoch=epoch, train_loss=round(train_loss, 6), train_acc=round(train_acc, 4),
               val_loss=None if val_loss is None else round(val_loss, 6), val_acc=val_acc,
               test_loss=round(test_loss, 6), test_acc=test_acc, lr=float(f"{lr:.6g}"),
               seconds=round(seconds, 3), images_per_s=round(seen / seconds, 1), load_1m=round(os.getloadavg()[0], 2))
    return row, correct


# ------------------------------------------------------------------------ building a run

@dataclass
class Run:
    """What stays fixed through a run: its settings (the saved ones on --resume), recipe, folder,
    device, data generator, images ((x, y) on the device: training, validation (None without --val),
    test), the model in training (loop.Training) and the steps of an epoch."""
    args: argparse.Namespace
    recipe: dict
    out: str
    device: torch.device
    gen: torch.Generator
    train_set: tuple
    val_set: tuple
    test_set: tuple
    training: loop.Training
    steps: int


def build_run(args, out):
    """The Run of `args` (resolved by resume_args on --resume): the recipe's defaults filled in, torch
    seeded, the images loaded, then the model, optimizer and schedule built (in that order: the
    model's initial weights come from the seeded generator)."""
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
    steps = math.ceil(len(train_set[1]) / args.batch_size)
    training = build_training(args, recipe, device, steps, train_set)
    return Run(args, recipe, out, device, gen, train_set, val_set, test_set, training, training_steps(training, steps))


def build_training(args, recipe, device, steps, train_set, cudagraphs=True):
    """The loop.Training that train.py's flags `args` ask for (bench.py builds its runs here too;
    cudagraphs=False: --compile and --whole-step without CUDA graphs on CUDA)."""
    if args.whole_step:
        return loop.build(recipe, device, args.epochs, steps, args.lr, amp=args.amp, fast_dropout=args.fast_dropout,
                          compile=args.compile, cudagraphs=cudagraphs, whole_step=(*train_set, args.batch_size))
    return loop.build(recipe, device, args.epochs, steps, args.lr, args.channels_last, args.amp, args.fast_dropout,
                      args.compile, cudagraphs)


def training_steps(training, steps):
    """Steps an epoch trains: the whole step drops the short last batch."""
    return training.whole_step.steps if training.whole_step is not None else steps


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


# -------------------------------------------------------------------------- the command line

def parser():
    p = argparse.ArgumentParser(description="Train one MNIST recipe with its documented settings, evaluating the "
                                "10,000 test images after every epoch.")
    p.flags = {}  # dest -> its argparse action (type, nargs): what --resume and sweep grids check values against

    def add(*names, **kw):
        action = p.add_argument(*names, **kw)
        p.flags[action.dest] = action

    add("--model", default="bn_gap", help=f"recipe to train (default bn_gap): {', '.join(models.RECIPES)}")
    add("--epochs", type=int, help="epochs to train (default: the recipe's documented count)")
    add("--batch-size", type=int, help="training batch size (default: the recipe's)")
    add("--lr", type=float, help="learning rate; for OneCycleLR recipes its max_lr (default: the recipe's)")
    add("--seed", type=int, default=1, help="random seed, 0 to 2**63-1 (default 1); the same seed on "
        "the same device and settings gives the same numbers")
    add("--device", default="auto", help="auto (default: CUDA, then MPS, then CPU), cpu, cuda or mps")
    add("--data-dir", help="folder with the four MNIST IDX files (default: $MNIST_DIR, then ./data)")
    add("--out", help="run folder (default: runs/<model>/<timestamp>/, and runs/<model>/latest "
        "points at it once its first epoch is written)")
    add("--subset", type=int, help="train on the first N training images only (default: all 60,000, or what --val "
        "leaves); a size that leaves a last batch of one image is refused (BatchNorm cannot train on one)")
    add("--val", type=int, default=0, help="hold out N of the 60,000 training images (a fixed choice, "
        "the same for every recipe and seed: data.split_val) and choose best.pt by accuracy on them "
        "(default 0: best.pt by test accuracy, the sources' protocol)")
    add("--pipeline", default="fast", choices=["fast", "torchvision"],
        help="fast (default): data and augmentation on the training device; torchvision: the sources' "
        "PIL transforms + DataLoader")
    add("--workers", type=int, default=2, help="DataLoader worker processes for --pipeline torchvision "
        "(default 2)")
    add("--channels-last", action="store_true", help="NHWC memory format (off by default; it helps some "
        "models and hurts others: see BENCHMARKS.md)")
    add("--amp", action="store_true", help="bfloat16 autocast (off by default; fast on CPUs with "
        "AMX/AVX512-BF16 and on GPUs with native bfloat16)")
    add("--fast-dropout", action="store_true", help="cheaper dropout masks on CPU (off by default; drop "
        "probability rounded to 1/65536, a different random stream than nn.Dropout)")
    add("--compile", action="store_true", help="torch.compile the model, with CUDA graphs on CUDA; with "
        "--whole-step, inductor's kernels inside the whole step's graphs (off by default; see BENCHMARKS.md for "
        "when it pays)")
    add("--whole-step", action="store_true", help="the whole training step (batch, "
        "augmentation, forward, backward, update, schedule, figures: whole_step.WholeStep) on the device, "
        "replayed as CUDA graphs on CUDA; drops each epoch's short last batch (off by default; see BENCHMARKS.md)")
    add("--resume", nargs="?", const="latest", metavar="RUN_DIR",
        help="continue a run from its last.pt (default RUN_DIR: runs/<model>/latest) with the settings "
        "it started with; only --device (the run's own), --data-dir and --no-progress may be given")
    add("--threads", type=int, help="torch CPU threads (default: torch's choice, every core or "
        "$OMP_NUM_THREADS); the same seed, settings, device and thread count give bit-identical runs "
        "on the CPU, another thread count can change the last bits")
    add("--no-progress", action="store_true", help="no progress bars (for logs)")
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
    left = data.COUNTS["train"] - args.val
    if args.subset and args.subset > left:
        raise UserError(f"--subset {args.subset} asks for more than the {left:,} training images "
                        + (f"--val {args.val} leaves" if args.val else "there are"))
    if args.pipeline not in ("fast", "torchvision"):
        raise UserError(f"unknown pipeline '{args.pipeline}'")
    if not 0 <= args.seed <= 2 ** 63 - 1:
        raise UserError(f"--seed must be between 0 and 2**63-1, got {args.seed}")
    check_positive(args, "lr")
    if args.whole_step:
        clash = [f for f, on in (("--channels-last", args.channels_last),
                                 ("--pipeline torchvision", args.pipeline == "torchvision")) if on]
        if clash:
            raise UserError(f"--whole-step builds the whole step itself; drop {', '.join(clash)}")
    batch = args.batch_size or models.RECIPES[args.model]["batch_size"]
    if not args.whole_step and (args.subset or left) % batch == 1:  # the whole step drops short batches
        raise UserError(f"{args.subset or left:,} training images in batches of {batch} leave a last batch of one "
                        "image, which BatchNorm cannot train on; change --subset, --val or --batch-size by one")


def resume_args(args, ckpt, out):
    """The run's own settings, as its last.pt recorded them (checked by check_training_state). Flags
    that would be silently ignored are refused; --device must be the run's own (RNG states do not move
    between devices)."""
    defaults = vars(parse_args([]))
    given = [k for k, v in vars(args).items() if k not in RESUME_MAY_SET and v != defaults[k]]
    if given:
        raise UserError(f"--resume continues {printable(out)} with the settings it started with; drop "
                        + ", ".join("--" + k.replace("_", "-") for k in given))
    saved = check_training_state(ckpt, out)
    if args.model != defaults["model"] and args.model != saved["model"]:
        raise UserError(f"{printable(out)} is a {saved['model']} run, not {args.model}")
    ran_on = ckpt["rng"].get("device")
    if ran_on not in ("cpu", "cuda", "mps"):
        raise UserError(f"{printable(out)}/last.pt names no device it ran on (cpu, cuda or mps)")
    if args.device not in ("auto", ran_on):
        raise UserError(f"{printable(out)} was trained on {ran_on}; resume it there (--device {ran_on}) or start a "
                        "new run")
    merged = dict(defaults, **saved)
    merged.update(resume=args.resume, device=ran_on, no_progress=args.no_progress,
                  data_dir=args.data_dir or saved.get("data_dir"))
    new = argparse.Namespace(**merged)
    check_args(new)
    return new


def check_training_state(ckpt, out):
    """last.pt's saved settings, once every part of its training state agrees with the others: each
    setting has its flag's type, the settings name the model its weights are, the history holds every
    metrics.csv field of epochs 1..its epoch, the best epoch is one of them. Raises UserError naming
    the first part that does not; nothing is restored before this passes."""
    bad = f"{printable(out)}/last.pt cannot be resumed: "
    flags = parser().flags
    saved = ckpt["args"]
    for k, v in saved.items():
        if k not in flags:
            raise UserError(bad + f"its saved settings hold '{printable(k)}', which is no train.py flag")
        kind = bool if flags[k].nargs == 0 else flags[k].type or str
        if not (v is None and flags[k].default is None or type(v) is kind):
            raise UserError(bad + f"its saved --{k.replace('_', '-')} is {type(v).__name__}, not {kind.__name__}")
    if saved.get("model") != ckpt["model_name"]:
        raise UserError(bad + f"its saved settings name {printable(saved.get('model'))} but its weights are "
                        f"{printable(ckpt['model_name'])}")
    history, epoch = ckpt["history"], ckpt["epoch"]
    if [h.get("epoch") for h in history] != list(range(1, epoch + 1)):
        raise UserError(bad + f"its history does not list epochs 1 to {epoch}")
    for h in history:
        missing = [k for k in METRICS if k not in h or not (h[k] is None and k.startswith("val_") or is_number(h[k]))]
        if missing:
            raise UserError(bad + f"its history's epoch {h['epoch']} lacks a number for {missing[0]}")
    if not 1 <= ckpt["best_epoch"] <= epoch:
        raise UserError(bad + f"its best epoch {ckpt['best_epoch']} is not one of its epochs 1 to {epoch}")
    wall, at = ckpt.get("wall_seconds"), ckpt.get("resumed_at")  # both, or neither (a last.pt from before them)
    if (wall is None) != (at is None) or wall is not None and not (is_number(wall) and wall >= 0 and isinstance(
            at, list) and all(type(e) is int and 1 < e <= epoch for e in at)):
        raise UserError(bad + "its wall time or resume epochs are not what train.py writes")
    return saved


# ------------------------------------------------------------------------ files and records

def prepare_out(args):
    """(run folder, whether this run created it, lock): the folder this run writes, locked
    against a second writer."""
    if args.resume:
        out = os.path.join("runs", args.model, "latest") if args.resume == "latest" else args.resume
        if not os.path.isfile(os.path.join(out, "last.pt")):
            raise UserError(f"nothing to resume: {printable(out)}/last.pt does not exist")
        out, created = os.path.realpath(out), False
    else:
        out = args.out or os.path.join("runs", args.model, time.strftime("%Y%m%d-%H%M%S"))
        created = not os.path.exists(out)
        check_out_dir(out, "output")
    held = lock(out)
    if not args.resume and os.path.exists(os.path.join(out, "last.pt")):
        unlock(held)
        raise UserError(f"{printable(out)} already holds a run; continue it with --resume {printable(out)} or choose "
                        "another --out")
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
    rng = ckpt["rng"]
    try:
        model.load_state_dict(ckpt["model"])
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
        raise UserError(f"{printable(out)}/last.pt: its weights, optimizer, schedule or RNG state do not fit this "
                        "run") from None


def resumed(r, ckpt):
    """(history, best accuracy, best epoch, first epoch to train): a new run's, or with `ckpt` (last.pt)
    the run's own, its model, optimizer, schedule and RNG states restored."""
    if ckpt is None:
        return [], -1.0, 0, 1
    t = r.training
    restore(ckpt, t.model, t.optimizer, t.scheduler, r.device, r.gen, r.out)
    if t.whole_step is not None:
        t.whole_step.adopt_optimizer_state()  # the loaded optimizer state into the step's own tensors
    first = ckpt["epoch"] + 1
    if first > r.args.epochs:
        raise UserError(f"{printable(r.out)} already finished its {r.args.epochs} epochs; nothing to resume")
    print(f"resuming {printable(r.out)} at epoch {first}/{r.args.epochs} on {r.device.type}")
    return ckpt["history"], ckpt["best_acc"], ckpt["best_epoch"], first


def relative(path):
    """`path` relative to the current folder when inside it (jobs get whole paths), else as given."""
    rel = os.path.relpath(path)
    return path if rel.startswith(os.pardir) else rel


def describe(r):
    """summary.json's account of the run; its first part is printed as the run starts."""
    args = r.args
    info = dict(model=args.model, params=models.n_params(r.training.model), device=str(r.device),
                device_name=device_name(r.device), batch_size=args.batch_size, epochs=args.epochs, seed=args.seed,
                pipeline=args.pipeline, channels_last=args.channels_last, amp=args.amp,
                fast_dropout=args.fast_dropout, compile=args.compile,
                whole_step=args.whole_step, train_images=len(r.train_set[1]),
                val_images=args.val, out=relative(r.out))
    print(printable(" ".join(f"{k}={v}" for k, v in info.items())))
    info.update(documented=r.recipe["documented"], reconstructed=r.recipe["reconstructed"], lr=args.lr,
                subset=args.subset, **provenance(r.device, torch.get_num_threads()))
    return info


def training_state(r, history, best_acc, best_epoch):
    """What last.pt holds beside the checkpoint, for --resume."""
    scheduler = r.training.scheduler
    return dict(optimizer=r.training.optimizer.state_dict(),
                scheduler=scheduler.state_dict() if scheduler is not None else None,
                rng=rng_state(r.device, r.gen), history=history, best_acc=best_acc, best_epoch=best_epoch,
                args=vars(r.args))


def last_words(r, summary):
    """The run's closing line: the validation-chosen epoch (with --val), the best test accuracy, the source's."""
    doc = r.recipe["documented"]
    chosen = (f"chosen on validation: epoch {summary['val_chosen_epoch']}, test accuracy "
              f"{summary['val_chosen_test_acc']:.2f}% ({ci_text(summary['val_chosen_test_acc_ci95'])}); "
              if r.args.val else "")
    return (chosen + f"best test accuracy {summary['best_test_acc']:.2f}% at epoch {summary['best_epoch']}"
            + (" (optimistic: the test set chose it)" if r.args.val else "")
            + f" (documented {doc['best_test_acc']}% at epoch {doc['best_epoch']}); run folder {printable(r.out)}")


def results(history, chosen_epoch, n_test, val):
    """summary.json's accuracy figures from the epochs so far. best_test_acc / best_epoch: the highest
    test accuracy over epochs, the sources' figure (optimistic: the test set picks the epoch). With
    --val also val_chosen_*: the epoch whose validation accuracy was highest (best.pt), and its test
    accuracy, the honest figure. Each test accuracy with its 95% Wilson interval."""
    top = max(history, key=lambda h: h["test_acc"])  # the first epoch at the maximum
    ci = lambda acc: ci95(round(acc * n_test / 100), n_test)  # noqa: E731 (accuracies are k / n_test exactly)
    out = dict(best_test_acc=top["test_acc"], best_epoch=top["epoch"], best_test_acc_ci95=ci(top["test_acc"]),
               checkpoint_chosen_by="validation" if val else "test accuracy (the sources' protocol)")
    if val:
        chosen = next(h for h in history if h["epoch"] == chosen_epoch)
        out.update(val_chosen_epoch=chosen_epoch, val_chosen_val_acc=chosen["val_acc"],
                   val_chosen_test_acc=chosen["test_acc"], val_chosen_test_acc_ci95=ci(chosen["test_acc"]))
    return out


if __name__ == "__main__":
    main()
