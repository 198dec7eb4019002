"""Evaluate a checkpoint or an exported model on the 10,000 MNIST test images.

    python evaluate.py --model gap10k                     # best.pt of runs/gap10k/latest
    python evaluate.py --checkpoint pretrained/bn_fc.pt
    python evaluate.py --artifact exports/bn_gap.onnx     # judged on the same footing
    python evaluate.py --artifact exports/bn_gap.aoti.pt2 # .torchscript.pt, .pt2 and .aoti.pt2 alike

Prints which model and file it evaluated, a classification report and per-class accuracy; writes
report.json, confusion.png, mistakes.png, curves.png (for a run folder) and one self-contained
report.html into --out (default: the run folder of the checkpoint, else <file>-eval/ beside it). The
run folder's summary.json and metrics.csv are read through records.py's checks; a record it refuses is
left out of the page with one warning line.
"""
import argparse
import base64
import html
import os
import sys

import numpy as np
import torch

import artifacts
import data
import figures
import models
import records
from errors import UserError, one_line_errors, printable
from figures import DIGITS
from fileio import check_keeps_inputs, check_out_dir, json_text, replace_all
from machine import get_device
from runfiles import METRICS, find_checkpoint
from stats import ci95, ci_text

REPORT_FILES = ("report.json", "report.html", "confusion.png", "mistakes.png", "curves.png")  # what --out gets


def report(labels, logp):
    """Every figure of the report from true labels and log-probabilities (CPU tensors)."""
    from sklearn.metrics import classification_report, confusion_matrix  # 1-2 s to import: not for --help or errors
    y, pred = labels.numpy(), logp.argmax(1).numpy()
    cls = classification_report(y, pred, labels=DIGITS, digits=4, output_dict=True, zero_division=0)
    cm = confusion_matrix(y, pred, labels=DIGITS)
    loss, correct, accuracy = models.loss_and_accuracy(logp, labels)
    return {
        "images": len(y),
        "correct": correct,
        "accuracy": accuracy,
        "accuracy_ci95": ci95(correct, len(y)),
        "test_loss": round(loss, 6),
        "per_class": {str(d): {"precision": cls[str(d)]["precision"], "recall": cls[str(d)]["recall"],
                               "f1": cls[str(d)]["f1-score"], "support": int(cls[str(d)]["support"]),
                               "accuracy": round(100 * cm[d, d] / max(cm[d].sum(), 1), 2)} for d in DIGITS},
        "macro_avg": {k.replace("-score", ""): v for k, v in cls["macro avg"].items()},
        "weighted_avg": {k.replace("-score", ""): v for k, v in cls["weighted avg"].items()},
        "confusion_matrix": cm.tolist(),
    }


def report_text(r):
    lines = [f"{'digit':>12} {'precision':>10} {'recall':>10} {'f1':>10} {'support':>8} {'accuracy':>9}"]
    for d, c in r["per_class"].items():
        lines.append(f"{d:>12} {c['precision']:10.4f} {c['recall']:10.4f} {c['f1']:10.4f} {c['support']:8d} "
                     f"{c['accuracy']:8.2f}%")
    for name in ("macro_avg", "weighted_avg"):
        a = r[name]
        lines.append(f"{name.replace('_', ' '):>12} {a['precision']:10.4f} {a['recall']:10.4f} {a['f1']:10.4f} "
                     f"{int(a['support']):8d}")
    lines.append(f"{'accuracy':>12} {r['correct']}/{r['images']} = {r['accuracy']:.2f}% "
                 f"({ci_text(r['accuracy_ci95'])}, Wilson)   test loss {r['test_loss']:.4f}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------- HTML

def cell(v):
    """A configuration value as a person writes it: no None, no Python list reprs."""
    if v is None:
        return "-"
    if isinstance(v, (list, tuple)):
        return "; ".join(cell(x) for x in v) or "-"
    if isinstance(v, dict):
        return ", ".join(f"{k} {cell(x)}" for k, x in v.items()) or "-"
    return str(v)


def table(rows, header=None):
    head = "<tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def cut_short(name, summary):
    """Why a run's figures do not compare with its recipe's documented figure (fewer epochs than the
    recipe, a --subset of the images), or None."""
    if not summary or name not in models.RECIPES:
        return None
    recipe_epochs = models.RECIPES[name]["epochs"]
    why = []
    if summary["epochs_done"] < recipe_epochs:
        why.append(f"trained {summary['epochs_done']} of the recipe's {recipe_epochs} epochs")
    if summary["subset"] is not None:
        why.append(f"trained on {summary['subset']:,} of the training images (--subset)")
    return f"this run {' and '.join(why)}: the documented figure is for the whole recipe" if why else None


def result_rows(r, source, name, summary):
    """The Result table: this evaluation, the run's own figures, and the source's documented figure."""
    doc = models.RECIPES[name]["documented"] if name in models.RECIPES else {}
    rows = [["test accuracy (this evaluation)", f"{r['accuracy']:.2f}% ({r['correct']}/{r['images']}; "
             f"{ci_text(r['accuracy_ci95'])}, Wilson)"],
            ["test loss", f"{r['test_loss']:.4f}"],
            ["best test accuracy (training run: the highest over epochs, optimistic)",
             f"{summary['best_test_acc']:.2f}% at epoch {summary['best_epoch']}" if summary else "-"]]
    if summary and summary["val_chosen_test_acc"] is not None:
        rows.append(["test accuracy at the epoch chosen on validation (training run)",
                     f"{summary['val_chosen_test_acc']:.2f}% at epoch {summary['val_chosen_epoch']} "
                     f"({summary['val_images']:,} validation images)"])
    if doc:
        rows.append([f"documented by source {doc['source'][:3]}", f"{doc['best_test_acc']}% at epoch "
                     f"{doc['best_epoch']} of {models.RECIPES[name]['epochs']}" + (f" ({doc['notes']})" if doc["notes"]
                                                                                    else "")])
    note = cut_short(name, summary)
    if note:
        rows.append(["not comparable", note])
    return rows + [["model and file evaluated", f"{name}: {printable(source)}"]]


def render_html(title, r, source, name, summary, pngs):
    img = {k: f'<img alt="{k}" src="data:image/png;base64,{base64.b64encode(v).decode()}">' for k, v in pngs.items()}
    parts = [f"<h1>{html.escape(title)}</h1>", "<h2>Result</h2>", table(result_rows(r, source, name, summary))]
    if summary:
        keep = ["model", "params", "device_name", "pipeline", "batch_size", "epochs", "epochs_done", "seed", "lr",
                "subset", "python", "torch", "torchvision", "git_commit", "command", "wall_seconds", "reconstructed"]
        parts += ["<h2>Run configuration</h2>", table([[k, cell(summary.get(k))] for k in keep])]
    if name in models.RECIPES:
        parts += ["<h2>Model</h2>", f"<pre>{html.escape(models.summary(name))}</pre>"]
    if summary:
        parts += ["<h2>Training curves</h2>", img.get("curves", ""), "<h2>Epochs</h2>",
                  table([[cell(row.get(k)) for k in METRICS] for row in summary["rows"]], METRICS)]
    parts += ["<h2>Classification report</h2>", f"<pre>{html.escape(report_text(r))}</pre>",
              "<h2>Confusion matrix</h2>", img["confusion"],
              "<h2>Most confident mistakes</h2>", img["mistakes"]]
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
             "font-size:13px;text-align:right}td:first-child{text-align:left}img{max-width:100%}"
             "pre{background:#f6f6f6;padding:8px;font-size:12px;overflow-x:auto}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n")


# ------------------------------------------------------------------------------- main

def run_folder(checkpoint_path):
    """The train.py run folder a checkpoint sits in (it has metrics.csv), else None."""
    folder = os.path.dirname(checkpoint_path)
    return folder if os.path.isfile(os.path.join(folder, "metrics.csv")) else None


def run_record(run_dir):
    """A run folder's record (records.read_run: summary.json's fields and metrics.csv's `rows`), or None.
    It only adds to the report, so a record records.py refuses is left out with a warning rather than
    failing the evaluation."""
    try:
        return records.read_run(run_dir)
    except records.BadRecord as e:
        print(f"warning: {e}; the report leaves the run's record out", file=sys.stderr)
        return None


def evaluate(source_path, kind, out, data_dir, device, trust_code=False, model_name=None):
    """kind: 'checkpoint' or 'artifact'; model_name: the model the file must hold (None: any). Writes the
    report files into `out` as one set (the old set stays whole until the new one is complete), returns
    the report dict."""
    clf = artifacts.classifier(source_path, trust_code, device, model_name=model_name, kind=kind)
    name = clf.model
    if model_name and name != model_name:
        raise UserError(f"{printable(source_path)} holds a {printable(name)} model, not {model_name}")
    recorded = clf.test_acc if clf.kind == "checkpoint" else None
    run_dir = run_folder(source_path) if clf.kind == "checkpoint" else None
    images, labels = data.load("test", data_dir)
    check_out_dir(out, "--out")
    check_keeps_inputs([os.path.join(out, f) for f in REPORT_FILES], [source_path])
    logp = clf(images)
    if not bool(torch.isfinite(logp).all()):
        raise UserError(f"{printable(source_path)} gives NaN or infinite log-probabilities")
    r = report(labels, logp)
    r.update(model=name, source=source_path, recorded_accuracy=recorded)
    summary = run_record(run_dir) if run_dir else None
    pngs = {"confusion": figures.confusion(np.array(r["confusion_matrix"])),
            "mistakes": figures.mistakes(images, labels, logp)}
    if summary:
        pngs["curves"] = figures.run_curves(summary["rows"])
    page = render_html(f"{name}: MNIST test-set evaluation", r, source_path, name, summary, pngs)
    files = {os.path.join(out, k + ".png"): v for k, v in pngs.items()}
    files[os.path.join(out, "report.json")] = json_text(r).encode()
    files[os.path.join(out, "report.html")] = page.encode()
    replace_all(files)
    stale = os.path.join(out, "curves.png")
    if "curves" not in pngs and os.path.exists(stale):  # left by an earlier report in this folder
        os.remove(stale)
    return r


def parser():
    p = argparse.ArgumentParser(description="Evaluate a checkpoint or an exported model on the 10,000 MNIST test "
                                "images and write a report.")
    p.add_argument("--model", help="evaluate the best.pt of runs/<model>/latest, else pretrained/<model>.pt; with "
                   "--checkpoint or --artifact, the model that file must hold (default: bn_gap, or the file's own)")
    p.add_argument("--checkpoint", help="a checkpoint written by train.py (instead of --model's)")
    p.add_argument("--artifact", help=f"a file written by export.py ({', '.join(artifacts.FORMATS.values())})")
    p.add_argument("--trust-code", action="store_true", help="load a code-bearing --artifact (TorchScript, .pt2, "
                   ".aoti.pt2) even when the manifest.json beside it does not vouch for it")
    p.add_argument("--out", help="output folder (default: the checkpoint's run folder, else <file>-eval/)")
    p.add_argument("--data-dir", help="MNIST folder (default: $MNIST_DIR, then ./data)")
    p.add_argument("--device", default="auto", help="auto (default: CUDA, then MPS, then CPU), cpu, cuda or mps; "
                   "checkpoints only (exported files run on the CPU, an AOTInductor package on the device it was "
                   "compiled for)")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    with one_line_errors("interrupted: the previous report files, if any, are unchanged"):
        if args.model:
            models.get_recipe(args.model)
        if args.artifact:
            path, kind = args.artifact, "artifact"
        else:
            path, kind = find_checkpoint(args.model or "bn_gap", args.checkpoint), "checkpoint"
        out = args.out or (kind == "checkpoint" and run_folder(path)) or os.path.splitext(path)[0] + "-eval"
        print(f"evaluating {printable(path)} on the 10,000 test images", flush=True)
        r = evaluate(path, kind, out, args.data_dir, get_device(args.device), args.trust_code, args.model)
    print(f"evaluated model {r['model']} from {kind} {printable(path)}")
    print(report_text(r))
    if r["recorded_accuracy"] is not None:
        same = "matches" if r["recorded_accuracy"] == r["accuracy"] else "DIFFERS FROM"
        print(f"{same} the accuracy train.py recorded for this checkpoint: {r['recorded_accuracy']:.2f}%")
    print(f"wrote {printable(out)}/report.html, report.json, confusion.png, mistakes.png"
          + (", curves.png" if os.path.isfile(os.path.join(out, "curves.png")) else ""))


if __name__ == "__main__":
    main()
