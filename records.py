"""Run records (a run folder's summary.json and metrics.csv) and bench.py's JSON, read once and checked
field by field where they are read, so that the report, its figures and evaluate.py's page use what they
get without checking again. A file that fails a check raises BadRecord, whose one line names the file
and the field (never the field's text, which could be anything); callers skip that run with that line.

Free-text fields (a device's name, a command) are kept as text without control characters; whoever
puts one into Markdown, HTML or a figure escapes it there (report.md_text, html.escape, figures.plain).
"""
import csv
import datetime
import math
import os
import re

import fileio
import models
from errors import UserError, is_number, printable

METRICS_NEEDED = ["epoch", "train_loss", "train_acc", "test_loss", "test_acc", "seconds"]
METRICS_OPTIONAL = ["val_loss", "val_acc", "lr", "images_per_s", "load_1m"]  # absent or empty: None


class BadRecord(UserError):
    """A record this module refuses; its message is '<file>: <field>: <why>'."""


def _bad(path, field, why):
    return BadRecord(f"{printable(path)}: {field}: {why}")


# ---------------------------------------------------------------------------- field checks
# Each returns the value if it is acceptable and raises ValueError(why) if not.

def whole(low):
    def check(v):
        if isinstance(v, int) and not isinstance(v, bool) and v >= low:
            return v
        raise ValueError(f"not a whole number >= {low}")
    return check


def number(low, high=math.inf):
    def check(v):
        if is_number(v) and low <= v <= high:
            return v
        raise ValueError(f"not a number from {low:g} to {high:g}")
    return check


def optional(check):
    return lambda v: None if v is None else check(v)


def text(v, longest=300):
    if isinstance(v, str) and 0 < len(v) <= longest and not re.search(r"[\x00-\x1f\x7f-\x9f]", v):
        return v
    raise ValueError(f"not a line of text (1 to {longest} printable characters)")


def matching(pattern, what):
    def check(v):
        if isinstance(v, str) and re.fullmatch(pattern, v):
            return v
        raise ValueError(f"not {what}")
    return check


def date(v):
    try:
        datetime.datetime.fromisoformat(text(v, 40))
    except (TypeError, ValueError):
        raise ValueError("not an ISO date and time") from None
    return v


def one_of(choices):
    def check(v):
        if isinstance(v, str) and v in choices:
            return v
        raise ValueError(f"not one of {', '.join(choices)}")
    return check


def texts(v):
    if isinstance(v, list) and all(isinstance(t, str) for t in v):
        return [text(t) for t in v]
    raise ValueError("not a list of text")


def epochs(v):
    if isinstance(v, list) and all(type(e) is int and e >= 1 for e in v):
        return v
    raise ValueError("not a list of epochs")


def flag(v):
    if isinstance(v, bool):
        return v
    raise ValueError("not true or false")


ACCURACY = number(0, 100)
VERSION = matching(r"[0-9A-Za-z][0-9A-Za-z.+_-]{0,39}", "a version such as 2.14.1+cpu")
COMMIT = matching(r"[0-9a-f]{7,40}(-dirty)?", "a git commit such as 463234d or 463234d-dirty")

SUMMARY = {  # what summary.json must hold for any report to use it
    "model": one_of(list(models.RECIPES)), "params": whole(1), "epochs": whole(1), "epochs_done": whole(1),
    "seed": whole(0), "batch_size": whole(1), "subset": optional(whole(1)), "val_images": whole(0),
    "train_images": whole(1), "lr": optional(number(0)), "pipeline": text, "device": one_of(["cpu", "cuda", "mps"]),
    "device_name": text, "amp": flag, "compile": flag, "channels_last": flag, "fast_dropout": flag,
    "whole_step": optional(flag), "cores": whole(1), "threads": whole(1), "python": VERSION, "torch": VERSION, "torchvision": VERSION,
    "git_commit": optional(COMMIT), "date": date, "command": lambda v: text(v, 2000), "reconstructed": texts,
    "wall_seconds": number(0), "resumed_at_epochs": optional(epochs), "best_test_acc": ACCURACY,
    "best_epoch": whole(1), "final_test_acc": ACCURACY,
    "val_chosen_test_acc": optional(ACCURACY), "val_chosen_epoch": optional(whole(1)),
}


def checked(obj, schema, path, prefix=""):
    """{field: value} of `obj` (a dict) for every field of `schema`, each checked; BadRecord otherwise.
    An absent field reads as null, which only an optional() field accepts."""
    out = {}
    for field, check in schema.items():
        try:
            out[field] = check(obj.get(field))
        except ValueError as e:
            raise _bad(path, prefix + field, "missing" if field not in obj else str(e)) from None
    return out


# ---------------------------------------------------------------------------- run folders

def read_summary(folder):
    path = os.path.join(folder, "summary.json")
    if not os.path.isfile(path):
        raise _bad(path, "file", "missing")
    try:
        obj = fileio.read_json_dict(path)
    except UserError:
        raise _bad(path, "file", "not a JSON object (strict JSON: no NaN or Infinity)") from None
    s = checked(obj, SUMMARY, path)
    for field, top in (("epochs_done", s["epochs"]), ("best_epoch", s["epochs_done"]),
                       ("val_chosen_epoch", s["epochs_done"])):
        if s[field] is not None and s[field] > top:
            raise _bad(path, field, "beyond the epochs the run trained")
    if s["resumed_at_epochs"] and max(s["resumed_at_epochs"]) > s["epochs_done"]:
        raise _bad(path, "resumed_at_epochs", "beyond the epochs the run trained")
    if (s["val_images"] > 0) != (s["val_chosen_epoch"] is not None) or \
            (s["val_chosen_epoch"] is None) != (s["val_chosen_test_acc"] is None):
        raise _bad(path, "val_chosen_epoch", "does not agree with val_images")
    return s


def read_metrics(folder):
    """metrics.csv's rows as dicts of floats (None for an empty optional cell), epochs 1, 2, ... in order."""
    path = os.path.join(folder, "metrics.csv")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            header = reader.fieldnames or []
    except FileNotFoundError:
        raise _bad(path, "file", "missing") from None
    except (OSError, UnicodeDecodeError, csv.Error):
        raise _bad(path, "file", "not a CSV file") from None
    missing = [c for c in METRICS_NEEDED if c not in header]
    if missing:
        raise _bad(path, missing[0], "no such column")
    out = []
    for i, row in enumerate(rows, 1):
        if None in row or any(v is None for v in row.values()):
            raise _bad(path, f"row {i}", "not as many cells as the header")
        if row["epoch"] != str(i):
            raise _bad(path, f"row {i}, epoch", f"not {i}")
        out.append({c: _cell(path, i, c, row.get(c), c in METRICS_NEEDED) for c in METRICS_NEEDED + METRICS_OPTIONAL})
        out[-1]["epoch"] = i
    return out


def _cell(path, i, column, value, needed):
    if value is None or value == "" and not needed:
        return None
    bounds = (0, 100) if column.endswith("_acc") else (0, math.inf)
    try:
        v = float(value)
    except ValueError:
        raise _bad(path, f"row {i}, {column}", "not a number") from None
    if not (math.isfinite(v) and bounds[0] <= v <= bounds[1]):
        raise _bad(path, f"row {i}, {column}", f"not a number from {bounds[0]:g} to {bounds[1]:g}")
    return v


def read_run(folder):
    """A run folder's record: summary.json's checked fields, `rows` (metrics.csv) and `folder`; the two
    files must agree (one row per epoch done; the best, final and chosen figures are those of the rows)."""
    s = read_summary(folder)
    rows = read_metrics(folder)
    path = os.path.join(folder, "summary.json")
    if len(rows) != s["epochs_done"]:
        raise _bad(path, "epochs_done", f"metrics.csv has {len(rows)} epochs")
    accs = [r["test_acc"] for r in rows]
    if s["best_test_acc"] != max(accs) or s["best_epoch"] != accs.index(max(accs)) + 1:
        raise _bad(path, "best_test_acc", "not the highest test_acc of metrics.csv")
    if s["final_test_acc"] != accs[-1]:
        raise _bad(path, "final_test_acc", "not the last test_acc of metrics.csv")
    if s["val_chosen_epoch"] is not None and accs[s["val_chosen_epoch"] - 1] != s["val_chosen_test_acc"]:
        raise _bad(path, "val_chosen_test_acc", "not metrics.csv's test_acc at val_chosen_epoch")
    return dict(s, rows=rows, folder=folder)


# ---------------------------------------------------------------------------- the run set

def not_canonical(run, name, seed, val, device):
    """Why a checked run record is not one of the run set (None if it is): the recipe as documented,
    every epoch done, all training images but `val` held out, on `device`."""
    recipe = models.RECIPES[name]
    why = [(run["model"] != name, f"summary.json names model {run['model']}"),
           (run["seed"] != seed, f"summary.json names seed {run['seed']}"),
           (run["device"] != device, f"trained on {run['device']}, not {device}"),
           (run["epochs"] != recipe["epochs"], f"{run['epochs']} epochs, not the recipe's {recipe['epochs']}"),
           (run["epochs_done"] != run["epochs"], f"unfinished: {run['epochs_done']} of {run['epochs']} epochs"),
           (run["subset"] is not None, f"trained on --subset {run['subset']}"),
           (run["val_images"] != val, f"--val {run['val_images']}, not {val}"),
           (run["batch_size"] != recipe["batch_size"], f"batch size {run['batch_size']}, not the recipe's"),
           (run["lr"] is not None, "a learning rate other than the recipe's")]
    return next((text for bad, text in why if bad), None)


def run_set(runs_dir, names, val, device="cpu"):
    """({recipe: its runs in seed order}, [one line per run or recipe left out, saying why]) from the
    <recipe>-seed<k> folders of `runs_dir`. A recipe counts only with a usable seed-1 run (pretrained/
    and the paired comparison come from it)."""
    try:
        entries = sorted(os.listdir(runs_dir))
    except FileNotFoundError:
        return {}, []
    found, notes = {}, []
    for entry in entries:
        m = re.fullmatch(r"(\w+)-seed(\d+)", entry)
        if not m or m.group(1) not in names:
            continue
        folder = os.path.join(runs_dir, entry)
        try:
            run = read_run(folder)
        except BadRecord as e:
            notes.append(f"left out: {e}")
            continue
        why = not_canonical(run, m.group(1), int(m.group(2)), val, device)
        if why is None and any(r["seed"] == run["seed"] for r in found.get(m.group(1), [])):
            why = f"a second folder of seed {run['seed']}"
        if why:
            notes.append(f"left out {printable(folder)}: {why}")
        else:
            found.setdefault(m.group(1), []).append(run)
    results = {}
    for name in names:
        runs = sorted(found.get(name, []), key=lambda r: r["seed"])
        if runs and runs[0]["seed"] == 1:
            results[name] = runs
        elif runs:
            notes.append(f"left out {name}: no usable seed-1 run in {printable(runs_dir)}")
    return results, notes


# ---------------------------------------------------------------------------- bench.py's JSON

BENCH_ENV = {"cpu": text, "cores": whole(1), "date": date, "command": lambda v: text(v, 2000),
             "git_commit": optional(COMMIT), "torch": VERSION, "load_before": optional(number(0))}


def json_object(path):
    """The JSON object in the file `path`, or None if there is no file; BadRecord if it is not one."""
    if not os.path.exists(path):
        return None
    try:
        return fileio.read_json_dict(path)
    except UserError:
        raise _bad(path, "file", "not a JSON object (strict JSON: no NaN or Infinity)") from None


def read_bench(path):
    """bench.py's --json file as {env: its checked environment, train: {model: record}, infer: {model:
    record}}: CPU training throughput of the fast pipeline in eager fp32 (the runs' setting) and ONNX
    Runtime batch-1 p50 latency on one thread, each record {value, threads}. None if there is no file."""
    obj = json_object(path)
    if obj is None:
        return None
    if not isinstance(obj.get("environment"), dict):
        raise _bad(path, "environment", "missing or not an object")
    if not isinstance(obj.get("records"), list) or not all(isinstance(r, dict) for r in obj["records"]):
        raise _bad(path, "records", "missing or not a list of objects")
    env = checked(obj["environment"], BENCH_ENV, path, "environment.")
    wanted = {"train": ("cpu", "fast-pipeline", "eager", "images_per_s"), "infer": ("cpu", "onnxruntime", None,
                                                                                  "p50_ms")}
    out = dict(env=env, train={}, infer={})
    for i, r in enumerate(obj["records"]):
        task = r.get("task")
        if task not in wanted or (r.get("device"), r.get("backend"), r.get("variant"), r.get("metric")) != wanted[task]:
            continue
        rec = checked(r, {"model": one_of(list(models.RECIPES)), "value": number(1e-9), "threads": whole(1)},
                      path, f"records[{i}].")
        if task == "infer" and rec["threads"] != 1:
            continue
        if rec["model"] in out[task]:
            raise _bad(path, f"records[{i}]", f"a second {task} record of {rec['model']}")
        out[task][rec["model"]] = rec
    return out


# ---------------------------------------------------------------------------- report.py's scores

SPLIT_IMAGES = {"test": 10_000, "train": 60_000}


def read_scores(path):
    """The scores report.py keeps beside the run set (it writes this file): per seed-1 checkpoint
    ('<recipe>-seed1/best.pt') its sha256 and, per MNIST split it was scored on, which images it gets
    right as a hex bitmap (numpy.packbits). {} if there is no file; BadRecord if it is damaged."""
    obj = json_object(path)
    if obj is None:
        return {}
    if not isinstance(obj.get("checkpoints"), dict):
        raise _bad(path, "checkpoints", "missing or not an object")
    schema = {"sha256": matching(r"[0-9a-f]{64}", "a sha256")}
    schema.update({split: optional(matching(f"[0-9a-f]{{{n // 4}}}", f"a bitmap of {n:,} images"))
                   for split, n in SPLIT_IMAGES.items()})
    out = {}
    for key, entry in obj["checkpoints"].items():
        if not re.fullmatch(r"\w+-seed1/best\.pt", key) or not isinstance(entry, dict):
            raise _bad(path, "checkpoints", "an entry that is not '<recipe>-seed1/best.pt': {...}")
        out[key] = checked(entry, schema, path, f"checkpoints.{key}.")
    return out
