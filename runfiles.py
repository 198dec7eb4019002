"""Run folders and the checkpoint format: what train.py writes, read back and checked once."""
import csv
import os
import shutil
import zipfile

import torch

from errors import UserError, first_line, is_number
from fileio import atomic_write

MAX_CHECKPOINT_BYTES = 64 << 20  # ours are 0.1-0.4 MB; anything near this is not one of ours


METRICS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc", "lr", "seconds",
           "images_per_s", "load_1m"]  # metrics.csv; val_* are empty without --val; load_1m: the machine's
# 1-minute load average as the epoch's scoring ends (seconds taken under load say so)


def save_checkpoint(obj, path):
    atomic_write(path, lambda f: torch.save(obj, f))


def remove_run(folder):
    shutil.rmtree(folder, ignore_errors=True)


def read_metrics(run_dir, columns=None):
    """The rows of a run folder's metrics.csv as dicts of strings ([] where there is none).
    Raises UserError when it is not the CSV train.py writes (header, numbers)."""
    path = os.path.join(run_dir, "metrics.csv")
    if not os.path.isfile(path):
        return []
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        for r in rows:
            for k in columns or ("epoch", "test_acc"):
                float(r[k])
    except (OSError, UnicodeDecodeError, csv.Error, KeyError, TypeError, ValueError):
        raise UserError(f"{path} is not a metrics.csv written by train.py") from None
    return rows


def _check_zip(path):
    """A torch checkpoint is a zip of stored (uncompressed) entries: refuse anything that could
    inflate beyond its size on disk, and anything too large to be one of ours."""
    size = os.path.getsize(path)
    if size > MAX_CHECKPOINT_BYTES:
        raise UserError(f"refusing {path}: {size:,} bytes, larger than any checkpoint train.py writes "
                        f"(limit {MAX_CHECKPOINT_BYTES:,})")
    try:
        with zipfile.ZipFile(path) as z:
            entries = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        raise UserError(f"cannot read checkpoint {path}: not a torch zip file (truncated or not a torch file)") from None
    if any(e.compress_type != zipfile.ZIP_STORED for e in entries) or \
            sum(e.file_size for e in entries) > size:
        raise UserError(f"refusing {path}: it holds compressed entries (a torch checkpoint never does; "
                        "it could inflate without bound)")


def load_checkpoint(path, model_name=None, training_state=False):
    """Read and validate a checkpoint written by train.py. torch.load with weights_only=True, so
    no code runs; every field is checked here, once, so callers can trust what they get.
    training_state: also require what --resume needs (optimizer, scheduler, RNG, history, args)."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist")
    _check_zip(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if "Weights only load failed" in str(e) or "Unsupported global" in str(e):
            raise UserError(f"refusing {path}: it holds more than tensors and plain values, and loading it "
                            f"could run code (only checkpoints written by train.py are read)") from None
        raise UserError(f"cannot read checkpoint {path}: {first_line(e)} (truncated or not a torch file)") from None
    bad = f"{path} is not a checkpoint written by train.py"
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model_name"), str) or \
            not isinstance(ckpt.get("model"), dict) or not ckpt["model"]:
        raise UserError(bad + " (it needs model_name and model weights)")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in ckpt["model"].items()):
        raise UserError(bad + " (its model is not a dict of tensors)")
    if not (isinstance(ckpt.get("epoch"), int) and not isinstance(ckpt["epoch"], bool) and ckpt["epoch"] >= 0):
        raise UserError(bad + " (epoch missing or not a whole number)")
    if not (is_number(ckpt.get("test_acc")) and 0 <= ckpt["test_acc"] <= 100):
        raise UserError(bad + " (test_acc missing or not a percentage)")
    for k, v in ckpt["model"].items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise UserError(f"{path} holds NaN or infinite weights ({k}): the run that wrote it diverged")
    if model_name and ckpt["model_name"] != model_name:
        raise UserError(f"{path} holds a {ckpt['model_name']} model, not {model_name}")
    if training_state:
        rng = ckpt.get("rng")
        ok = isinstance(ckpt.get("optimizer"), dict) and isinstance(ckpt.get("args"), dict) and \
            isinstance(ckpt.get("history"), list) and all(isinstance(h, dict) for h in ckpt["history"]) and \
            is_number(ckpt.get("best_acc")) and isinstance(ckpt.get("best_epoch"), int) and \
            (ckpt.get("scheduler") is None or isinstance(ckpt["scheduler"], dict)) and \
            isinstance(rng, dict) and isinstance(rng.get("torch"), torch.Tensor) and \
            isinstance(rng.get("data"), torch.Tensor)
        if not ok:
            raise UserError(f"{path} has no training state to resume from (is it a copy of best.pt?)")
    return ckpt


def make_checkpoint(model_name, weights, epoch, test_acc, params, **more):
    """The checkpoint format load_checkpoint reads, made in this one place for train.py (best.pt; last.pt
    is it plus the training state), reproduce.py (pretrained/) and bench.py: the recipe name, its
    weights (a state dict, as CPU tensors), the epoch and test accuracy (%) they were taken at, the
    parameter count, then any `more` fields (best.pt's val_acc)."""
    return dict(model_name=model_name, model={k: v.cpu() for k, v in weights.items()}, epoch=epoch,
                test_acc=test_acc, params=params, **more)


def find_checkpoint(model_name, checkpoint=None):
    """The checkpoint a script uses: `checkpoint` (--checkpoint) as given; else the latest run of
    `model_name` where the user works, runs/<model>/latest/best.pt under the current folder; else the
    shipped pretrained/<model>.pt beside these scripts, found whatever the current folder (shown
    relative to it when under it). UserError for a folder given as the checkpoint, and for a lookup
    that finds nothing, naming every place it looked."""
    if checkpoint:
        if os.path.isdir(checkpoint):
            raise UserError(f"checkpoint {checkpoint} is a folder, not a checkpoint file (a run folder holds best.pt)")
        return checkpoint
    run = os.path.join("runs", model_name, "latest", "best.pt")
    shipped = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrained", model_name + ".pt")
    if os.path.isfile(run):
        return run
    if os.path.isfile(shipped):
        inside = os.path.relpath(shipped)
        return shipped if inside.startswith(os.pardir + os.sep) else inside
    raise UserError(f"no checkpoint for {model_name}: none at {os.path.abspath(run)} (the latest run, under the current "
                    f"folder) or {shipped} (shipped); train one with 'python train.py --model {model_name}' or pass "
                    "--checkpoint PATH")
