"""Classify your own digits: image files, folders of them, or a drawing page in the browser (serve.py).

    python predict.py photo.jpg scans/ --top 3          # bn_gap's latest run, else pretrained/bn_gap.pt
    python predict.py digit.png --artifact exports/bn_gap.onnx --json
    python predict.py --serve                           # http://127.0.0.1:8000: draw or upload a digit

Every picture goes through digit.to_mnist, MNIST's own preprocessing (greyscale, ink polarity,
background and lighting removed, digit scaled into 20x20 and centred by its centre of mass in 28x28),
so a photo of dark ink on paper is seen the way the models were trained. An image already in MNIST's
form passes unchanged. Every answer names the model and the file it came from.
"""
import argparse
import json
import os
import sys

import numpy as np
import torch

import artifacts
import digit
import errors
import fileio
import machine
import models
import runfiles
import serve
import stats
from errors import printable

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
BATCH = 256   # images read, classified and printed at a time: memory does not grow with the file count
WHICH_MODEL = ("Which model answers: --artifact FILE, else --checkpoint FILE, else the model --model names "
               "(default bn_gap): its latest run, runs/<model>/latest/best.pt under the current folder, else "
               "pretrained/<model>.pt shipped beside this script (found whatever the current folder). The "
               "answers name the model and the file.")


def load_classifier(args):
    """(classify: uint8 images numpy [N, 28, 28] -> probabilities numpy [N, 10], info: model, source
    (the file that answers), kind, test_acc and its 95% interval, as numbers) of --artifact,
    --checkpoint or --model's checkpoint (WHICH_MODEL)."""
    if args.artifact:
        clf = artifacts.classifier(args.artifact, trust_code=args.trust_code, kind="artifact")
    else:
        name = args.model or "bn_gap"
        models.get_recipe(name)
        clf = artifacts.classifier(runfiles.find_checkpoint(name, args.checkpoint), device=machine.get_device(args.device),
                                   model_name=args.model, kind="checkpoint")
    acc = clf.test_acc
    info = {"model": clf.model, "test_acc": None if acc is None else round(float(acc), 2), "source": clf.source,
            "kind": clf.kind,
            "test_acc_ci95": None if acc is None or not args.serve   # the page shows it; scipy's import costs 1-2 s
            else stats.ci95(round(acc * 100), 10000)}  # scored on all 10,000
    return lambda x: clf(torch.from_numpy(np.asarray(x))).exp().numpy(), info


def header(info):
    """The line above the answers that says what gave them: model, kind, file, recorded test accuracy."""
    acc = "" if info["test_acc"] is None else f", test accuracy {info['test_acc']:.2f}%"
    return printable(f"# {info['model']} ({info['kind']} {info['source']}{acc})")


def answer(name, probs):
    """The JSON of one prediction."""
    return {"file": name, "prediction": int(probs.argmax()), "probability": round(float(probs.max()), 6),
            "probabilities": [round(float(p), 6) for p in probs]}


def top_line(r, k):
    order = np.argsort(r["probabilities"])[::-1][:k]
    return f"{r['file']}: {r['prediction']} ({100 * r['probability']:.1f}%)" + (
        "   top: " + ", ".join(f"{d} {100 * r['probabilities'][d]:.1f}%" for d in order) if k > 1 else "")


def image_files(paths):
    """(files, problems): the files named and the images under the folders named (symlinked folders
    are not followed, so a symlink loop is not walked); one problem per path that gives none and per
    folder that cannot be listed."""
    files, problems = [], []
    for p in paths:
        if os.path.isdir(p):
            unreadable = lambda e: problems.append(f"{printable(e.filename)}: {e.strerror}")  # noqa: E731
            found = sorted(os.path.join(d, f) for d, _, names in os.walk(p, onerror=unreadable) for f in names
                           if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))
            files += found
            if not found:
                problems.append(f"{printable(p)}: no images in this folder ({', '.join(IMAGE_EXTENSIONS)})")
        elif os.path.exists(p):
            files.append(p)
        elif os.path.lexists(p):
            problems.append(f"{printable(p)}: a symbolic link to nothing (or a loop of them)")
        else:
            problems.append(f"{printable(p)}: no such file or folder")
    return files, problems


def saved_names(folder, files):
    """Where --save-preprocessed writes each file's model input: <folder>/<file's stem>.png, -2, -3...
    where stems repeat (two inputs of one name from different folders), so no input's PNG replaces
    another's."""
    used, out = set(), []
    for name in files:
        stem = base = os.path.splitext(os.path.basename(name))[0]
        n = 1
        while stem in used:
            n += 1
            stem = f"{base}-{n}"
        used.add(stem)
        out.append(os.path.join(folder, stem + ".png"))
    return out


def read_batch(files, saved):
    """(names, images): each readable file's (name, --save-preprocessed output) and its model input,
    uint8 numpy [28, 28]; one error line for each file that is not a picture of a digit."""
    names, images = [], []
    for f, out in zip(files, saved):
        try:
            images.append(digit.to_mnist(digit.open_image(f)))
            names.append((f, out))
        except (errors.UserError, OSError) as e:
            print(f"error: {printable(f)}: {getattr(e, 'strerror', None) or e}", file=sys.stderr)
    return names, images


def show(args, r, answered):
    """Print one answer: an item of the --json list (json.dumps(results, indent=1), one item at a
    time), else its top line."""
    if args.json:
        print("[\n" if not answered else ",\n", end="")
        print(" " + json.dumps(r, indent=1).replace("\n", "\n "), end="")
    else:
        out = r.get("preprocessed")
        print(top_line(dict(r, file=printable(r["file"])), args.top) + (f"   -> {printable(out)}" if out else ""))


def run_files(args, classify, info):
    """Answer every image named, BATCH at a time (read, classified, printed, saved), so memory holds
    one batch whatever the file count and the answers appear as they come; report the bad ones. The
    text answers follow a header line (what answers); each --json item names the model and its file.
    Returns how many inputs failed."""
    files, problems = image_files(args.inputs)
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    saved = saved_names(args.save_preprocessed, files) if args.save_preprocessed else [None] * len(files)
    if args.save_preprocessed:   # before any work: an output never replaces an input
        fileio.check_keeps_inputs(saved, files, "--save-preprocessed")
    answered, failed = 0, len(problems)
    for start in range(0, len(files), BATCH):
        names, images = read_batch(files[start:start + BATCH], saved[start:start + BATCH])
        failed += len(files[start:start + BATCH]) - len(names)
        if not images:
            continue
        for (f, out), image, probs in zip(names, images, classify(np.stack(images))):
            r = dict(answer(f, probs), model=info["model"], source=info["source"])
            if out:
                fileio.atomic_write(out, lambda fh, b=digit.to_png(image): fh.write(b))
                r["preprocessed"] = out
            if not answered and not args.json:
                print(header(info))
            show(args, r, answered)
            answered += 1
        sys.stdout.flush()
    if args.json:
        print("\n]" if answered else "[]")
    return failed


def parser():
    p = argparse.ArgumentParser(description="Classify your own digit images, or draw them on a local web page.",
                                epilog=WHICH_MODEL)
    p.add_argument("inputs", nargs="*", metavar="IMAGE_OR_FOLDER", help="image files and folders of them")
    p.add_argument("--model", help="the model whose latest run (else pretrained/<model>.pt) answers (default bn_gap)")
    p.add_argument("--checkpoint", help="a checkpoint written by train.py")
    p.add_argument("--artifact", help="an exported file (.onnx, .torchscript.pt, ...) written by export.py")
    p.add_argument("--trust-code", action="store_true", help="run a code-bearing artifact not in its manifest")
    p.add_argument("--top", type=int, default=3, help="how many digits to list per image (1-10, default 3)")
    p.add_argument("--json", action="store_true", help="print a JSON list: file, prediction, probability, "
                                                       "probabilities, model, source")
    p.add_argument("--save-preprocessed", metavar="DIR", help="write each 28x28 model input as a PNG into DIR")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (checkpoints only)")
    p.add_argument("--serve", action="store_true", help="start the drawing page instead")
    p.add_argument("--port", type=int, default=8000, help="the page's port (default 8000; 0: any free one)")
    p.add_argument("--host", default="127.0.0.1", help="the address to bind (default 127.0.0.1: this machine only; "
                                                       "only an address named here is served beyond it)")
    p.add_argument("--request-timeout", type=float, default=serve.REQUEST_SECONDS, metavar="S",
                   help=f"seconds a request (headers and body) may take to arrive (default {serve.REQUEST_SECONDS})")
    return p


def parse_args(argv=None):
    return parser().parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    failed = 0
    with errors.one_line_errors():
        if not 1 <= args.top <= 10:
            raise errors.UserError(f"--top must be 1 to 10, not {args.top}")
        if not args.serve and not args.inputs:
            raise errors.UserError("name at least one image or folder, or start the page with --serve")
        if not 0 <= args.port <= 65535:
            raise errors.UserError(f"--port must be 0 to 65535, not {args.port}")
        errors.check_positive(args, "request_timeout")
        if args.save_preprocessed and os.path.exists(args.save_preprocessed) and not os.path.isdir(args.save_preprocessed):
            raise errors.UserError(f"--save-preprocessed {args.save_preprocessed} is a file; give a folder")
        if args.save_preprocessed:
            fileio.check_out_dir(args.save_preprocessed, "--save-preprocessed")
        classify, info = load_classifier(args)
        if args.serve:
            serve.serve(args.host, args.port, lambda image: answer("upload", classify(image[None])[0]), info,
                        args.request_timeout)
        else:
            failed = run_files(args, classify, info)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
