"""What the run records cannot say alone: which MNIST images a recipe's seed-1 best.pt gets right, for
the report's paired comparison and conv4_fc's training-set figure. Answers come from the scores record
beside the run set when it was made from the same checkpoint bytes, so the documents regenerate without
the images; otherwise the checkpoint is loaded, checked against its run record and scored on the CPU.
"""
import hashlib
import os
import statistics

import numpy as np

import data
import models
import records
import runfiles
import stats
from errors import UserError, printable


def best_pt(run):
    path = os.path.join(run["folder"], "best.pt")
    if not os.path.isfile(path):
        raise UserError(f"{printable(path)} is missing: the report scores seed 1's best.pt of each recipe")
    return path


def checkpoint_of(run):
    """A seed's best.pt, checked against its record (the epoch and test accuracy chosen on validation)."""
    path = best_pt(run)
    ckpt = runfiles.load_checkpoint(path, run["model"])
    if (ckpt["epoch"], ckpt["test_acc"]) != (run["val_chosen_epoch"], run["val_chosen_test_acc"]):
        raise UserError(f"{printable(path)} holds epoch {ckpt['epoch']}, not the epoch its summary.json chose on "
                        f"validation ({run['val_chosen_epoch']})")
    return ckpt


def right_answers(run, images, labels):
    """Which of `images` seed `run`'s best.pt classifies right (a bool tensor), on the CPU."""
    logp = models.log_probs(models.from_checkpoint(checkpoint_of(run)), images)
    return logp.argmax(1) == labels


class Scorer:
    """Which images a recipe's seed-1 best.pt gets right, per MNIST split: from the scores record
    (report.SCORES, records.read_scores) where the checkpoint's sha256 is the one recorded, else scored
    on the images in data_dir. `entries` is what the next scores record holds: the answers used."""

    def __init__(self, results, data_dir, recorded):
        self.results, self.data_dir, self.recorded, self.entries = results, data_dir, recorded, {}

    def right(self, name, split):
        run = self.results[name][0]
        key = f"{name}-seed1/best.pt"
        with open(best_pt(run), "rb") as f:
            sha = hashlib.sha256(f.read()).hexdigest()
        entry = self.entries.setdefault(key, {"sha256": sha})
        old = self.recorded.get(key, {})
        bitmap = old.get(split) if old.get("sha256") == sha else None
        if bitmap is None:
            bitmap = np.packbits(right_answers(run, *data.load(split, self.data_dir)).numpy()).tobytes().hex()
        entry[split] = bitmap
        return np.unpackbits(np.frombuffer(bytes.fromhex(bitmap), np.uint8))[:records.SPLIT_IMAGES[split]] == 1

    def accuracy(self, name, split):
        right = self.right(name, split)
        acc = round(100 * int(right.sum()) / len(right), 2)
        run = self.results[name][0]
        if split == "test" and acc != run["val_chosen_test_acc"]:
            raise UserError(f"{printable(run['folder'])}/best.pt scores {acc:.2f}% on the test set, not the "
                            f"{run['val_chosen_test_acc']:.2f}% its summary.json records")
        return right, acc


def measure(results, scorer, train_set_figure):
    """The seed-1 accuracy of `train_set_figure` (conv4_fc, whose documented figure was measured there)
    on the 60,000 training images, and the exact McNemar test between the seed-1 checkpoints of the two
    recipes with the highest mean chosen on validation: {train_acc: % or None, paired: stats.paired's
    dict with names and accs, or None}."""
    out = dict(train_acc=None, paired=None)
    if train_set_figure in results:
        out["train_acc"] = scorer.accuracy(train_set_figure, "train")[1]
    top = sorted(results, key=lambda n: -statistics.mean(r["val_chosen_test_acc"] for r in results[n]))[:2]
    if len(top) == 2:
        (ra, a), (rb, b) = (scorer.accuracy(n, "test") for n in top)
        out["paired"] = dict(stats.paired(ra.tolist(), rb.tolist()), names=top, accs=[a, b])
    return out
