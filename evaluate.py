"""Evaluate a checkpoint or an exported model on the 10,000 MNIST test images.

    python evaluate.py --model gap10k                     # best.pt of runs/gap10k/latest
    python evaluate.py --checkpoint pretrained/bn_fc.pt
    python evaluate.py --artifact exports/bn_gap.onnx     # judged on the same footing
    python evaluate.py --artifact exports/bn_gap.aoti.pt2 # .torchscript.pt, .pt2 and .aoti.pt2 alike

Prints a classification report and per-class accuracy; writes report.json, confusion.png,
mistakes.png, curves.png (for a run folder) and one self-contained report.html into --out
(default: the run folder of the checkpoint, else <file>-eval/ beside it).
"""
import argparse
import base64
import html
import io
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import artifacts  # noqa: E402
import data  # noqa: E402
import models  # noqa: E402
from errors import UserError, is_number, one_line_errors
from fileio import check_keeps_inputs, check_out_dir, json_text, read_json_dict, replace_all
from machine import get_device
from runfiles import METRICS, find_checkpoint, read_metrics
from stats import ci95, ci_text

DIGITS = list(range(10))
REPORT_FILES = ("report.json", "report.html", "confusion.png", "mistakes.png", "curves.png")  # what --out gets


def report(labels, logp):
    """Every figure of the report from true labels and log-probabilities (CPU tensors)."""
    from sklearn.metrics import classification_report, confusion_matrix  # 1-2 s to import: not for --help or errors
    y, pred = labels.numpy(), logp.argmax(1).numpy()
    cls = classification_report(y, pred, labels=DIGITS, digits=4, output_dict=True, zero_division=0)
    cm = confusion_matrix(y, pred, labels=DIGITS)
    loss, correct, accuracy = models.score(logp, labels)
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


# ---------------------------------------------------------------------------- figures

def plot_confusion(cm):
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    im = ax.imshow(cm, cmap="Blues", norm=matplotlib.colors.LogNorm(vmin=1, vmax=max(cm.max(), 2)))
    for i in DIGITS:
        for j in DIGITS:
            if cm[i, j]:
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if cm[i, j] > cm.max() / 10 else "black")
    ax.set(xticks=DIGITS, yticks=DIGITS, xlabel="predicted", ylabel="true", title="Confusion matrix (test set)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def plot_mistakes(images, labels, logp, n=24):
    """The n most confident mistakes: image, true label, predicted label, confidence."""
    conf, pred = logp.exp().max(1)
    wrong = (pred != labels).nonzero().flatten()
    order = wrong[conf[wrong].argsort(descending=True)][:n]
    cols = 8
    rows = max(1, (len(order) + cols - 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.35, rows * 1.75), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, order.tolist()):
        ax.imshow(images[i].numpy(), cmap="gray")
        ax.set_title(f"true {labels[i].item()} pred {pred[i].item()}\np={100 * conf[i].item():.1f}%", fontsize=8)
    fig.suptitle(f"Most confident mistakes ({len(wrong)} in all; p = the model's probability for its prediction)",
                 fontsize=10)
    fig.tight_layout()
    return fig


def plot_curves(rows):
    ep = [int(r["epoch"]) for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    a.plot(ep, [float(r["train_loss"]) for r in rows], "o-", label="train")
    a.plot(ep, [float(r["test_loss"]) for r in rows], "o-", label="test")
    a.set(xlabel="epoch", ylabel="loss", title="Loss")
    b.plot(ep, [float(r["train_acc"]) for r in rows], "o-", label="train")
    b.plot(ep, [float(r["test_acc"]) for r in rows], "o-", label="test")
    b.set(xlabel="epoch", ylabel="accuracy (%)", title="Accuracy")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    fig.tight_layout()
    return fig


def png_bytes(fig):
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


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


def render_html(title, r, source, name, summary, metrics_rows, pngs):
    doc = models.RECIPES[name]["documented"] if name in models.RECIPES else {}
    img = {k: f'<img alt="{k}" src="data:image/png;base64,{base64.b64encode(v).decode()}">' for k, v in pngs.items()}
    parts = [f"<h1>{html.escape(title)}</h1>",
             "<h2>Result</h2>",
             table([["test accuracy (this evaluation)", f"{r['accuracy']:.2f}% ({r['correct']}/{r['images']}; "
                     f"{ci_text(r['accuracy_ci95'])}, Wilson)"],
                    ["test loss", f"{r['test_loss']:.4f}"],
                    ["best test accuracy (training run: the highest over epochs, optimistic)",
                     f"{summary['best_test_acc']:.2f}% at epoch {summary['best_epoch']}" if summary else "-"],
                    *([["test accuracy at the epoch chosen on validation (training run)",
                        f"{summary['val_chosen_test_acc']:.2f}% at epoch {summary['val_chosen_epoch']} "
                        f"({summary['val_images']:,} validation images)"]]
                      if summary and is_number(summary.get("val_chosen_test_acc")) else []),
                    ["documented by the seed", f"{doc.get('best_test_acc')}% at epoch {doc.get('best_epoch')}"
                     + (f" ({doc['notes']})" if doc.get("notes") else "")],
                    ["source", source]])]
    if summary:
        keep = ["model", "params", "device_name", "pipeline", "batch_size", "epochs", "seed", "lr", "subset",
                "python", "torch", "torchvision", "git_commit", "command", "wall_seconds", "reconstructed"]
        parts += ["<h2>Run configuration</h2>", table([[k, cell(summary.get(k))] for k in keep])]
    if name in models.RECIPES:
        parts += ["<h2>Model</h2>", f"<pre>{html.escape(models.summary(name))}</pre>"]
    if metrics_rows:
        parts += ["<h2>Training curves</h2>", img.get("curves", ""), "<h2>Epochs</h2>",
                  table([[r.get(k, "") for k in METRICS] for r in metrics_rows], METRICS)]
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
    """(summary dict or None, metrics rows) of a run folder. They only decorate the report, so a
    garbage file is skipped with a warning rather than failing the evaluation."""
    summary, rows = None, []
    for name, read in (("summary.json", read_json_dict), ("metrics.csv", read_metrics)):
        path = os.path.join(run_dir, name)
        if not os.path.isfile(path):
            continue
        try:
            got = read(path if name == "summary.json" else run_dir)
        except UserError as e:
            print(f"warning: {e}; the report leaves it out", file=sys.stderr)
            continue
        if name == "summary.json":
            summary = got if is_number(got.get("best_test_acc")) and isinstance(got.get("best_epoch"), int) else None
        else:
            rows = got
    return summary, rows


def evaluate(source_path, kind, out, data_dir, device, trust_code=False):
    """kind: 'checkpoint' or 'artifact'. Writes the report files into `out` as one set (the old set
    stays whole until the new one is complete), returns the report dict."""
    summary, rows = None, []
    clf = artifacts.classifier(source_path, trust_code, device, kind=kind)
    name = clf.model
    recorded = clf.test_acc if clf.kind == "checkpoint" else None
    run_dir = run_folder(source_path) if clf.kind == "checkpoint" else None
    images, labels = data.load("test", data_dir)
    check_out_dir(out, "--out")
    check_keeps_inputs([os.path.join(out, f) for f in REPORT_FILES], [source_path])
    logp = clf(images)
    if not bool(torch.isfinite(logp).all()):
        raise UserError(f"{source_path} gives NaN or infinite log-probabilities")
    r = report(labels, logp)
    r.update(model=name, source=source_path, recorded_accuracy=recorded)
    if run_dir:
        summary, rows = run_record(run_dir)
    pngs = {"confusion": png_bytes(plot_confusion(np.array(r["confusion_matrix"]))),
            "mistakes": png_bytes(plot_mistakes(images, labels, logp))}
    if rows:
        pngs["curves"] = png_bytes(plot_curves(rows))
    page = render_html(f"{name}: MNIST test-set evaluation", r, source_path, name, summary, rows, pngs)
    files = {os.path.join(out, k + ".png"): v for k, v in pngs.items()}
    files[os.path.join(out, "report.json")] = json_text(r).encode()
    files[os.path.join(out, "report.html")] = page.encode()
    replace_all(files)
    stale = os.path.join(out, "curves.png")
    if "curves" not in pngs and os.path.exists(stale):  # left by an earlier report in this folder
        os.remove(stale)
    return r


def main(argv=None):
    p = argparse.ArgumentParser(description="Evaluate a checkpoint or an exported model on the 10,000 MNIST test "
                                "images and write a report.")
    p.add_argument("--model", default="bn_gap", help="evaluate the best.pt of runs/<model>/latest, else "
                   "pretrained/<model>.pt (default: bn_gap)")
    p.add_argument("--checkpoint", help="a checkpoint written by train.py (instead of --model's)")
    p.add_argument("--artifact", help=f"a file written by export.py ({', '.join(artifacts.FORMATS.values())})")
    p.add_argument("--trust-code", action="store_true", help="load a code-bearing --artifact (TorchScript, .pt2, "
                   ".aoti.pt2) even when the manifest.json beside it does not vouch for it")
    p.add_argument("--out", help="output folder (default: the checkpoint's run folder, else <file>-eval/)")
    p.add_argument("--data-dir", help="MNIST folder (default: $MNIST_DIR, then ./data)")
    p.add_argument("--device", default="auto", help="auto (default: CUDA, then MPS, then CPU), cpu, cuda or mps; "
                   "checkpoints only (exported files run on the CPU, an AOTInductor package on the device it was "
                   "compiled for)")
    args = p.parse_args(argv)
    with one_line_errors("interrupted: the previous report files, if any, are unchanged"):
        models.get_recipe(args.model)
        if args.artifact:
            path, kind = args.artifact, "artifact"
        else:
            path, kind = find_checkpoint(args.model, args.checkpoint), "checkpoint"
        out = args.out or (kind == "checkpoint" and run_folder(path)) or os.path.splitext(path)[0] + "-eval"
        print(f"evaluating {path} on the 10,000 test images", flush=True)
        r = evaluate(path, kind, out, args.data_dir, get_device(args.device), args.trust_code)
    print(f"{r['model']} from {path}")
    print(report_text(r))
    if r["recorded_accuracy"] is not None:
        same = "matches" if r["recorded_accuracy"] == r["accuracy"] else "DIFFERS FROM"
        print(f"{same} the accuracy train.py recorded for this checkpoint: {r['recorded_accuracy']:.2f}%")
    print(f"wrote {out}/report.html, report.json, confusion.png, mistakes.png"
          + (", curves.png" if os.path.isfile(os.path.join(out, "curves.png")) else ""))


if __name__ == "__main__":
    main()
