"""Export a trained model to ONNX, TorchScript, torch.export (.pt2), AOTInductor (.aoti.pt2) and int8
ONNX (.int8.onnx), verified against PyTorch on the full test set.

    python export.py --format onnx                  # bn_gap, latest run's best.pt (or pretrained/)
    python export.py --model gap10k --format all --checkpoint runs/gap10k/latest/best.pt
    python export.py --model gap10k --format aoti   # compiled for this machine's CPU (or its CUDA GPU)
    python export.py --format onnx-int8             # static int8, calibrated on 1,024 training images

The input contract of every format is in artifacts.py. An export is written to a temp file, run
on all 10,000 test images and kept only if every prediction matches PyTorch and log-probabilities
agree within --tolerance; then its sha256 goes into the output folder's manifest.json. An int8 file
cannot match fp32 to 1e-4; its bar is its own: accuracy on all 10,000 test images (at batch 1000
and at batch 1) within --int8-tolerance percentage points of the fp32 model's.
"""
import argparse
import os
from dataclasses import dataclass

import torch

import artifacts
import data
import manifest
import models
from errors import UserError, first_line, one_line_errors
from fileio import check_keeps_inputs, check_out_dir, staged
from machine import get_device
from runfiles import find_checkpoint, load_checkpoint


def verify(path, reference, images, labels, tolerance):
    """Compare an exported file with the PyTorch log-probabilities on every test image."""
    run = artifacts.classifier(path, trust_code=True)  # our own file, written a moment ago
    got = run(images)
    same = int((got.argmax(1) == reference.argmax(1)).sum())
    diff = float((got - reference).abs().max())
    figures = dict(same_predictions=same, images=len(reference), max_abs_diff=diff, batch1_max_abs_diff=None,
                   accuracy=models.loss_and_accuracy(got, labels)[2], ok=False)
    if same < len(reference) or diff > tolerance:
        return figures  # failed already: no need for the slower batch-1 pass
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # single images gain nothing from threads, and on a busy machine lose 10x or more
    try:
        single = run(images, batch_size=1)  # every image again at batch 1
    finally:
        torch.set_num_threads(old)
    same1 = int((single.argmax(1) == reference.argmax(1)).sum())
    diff1 = float((single - reference).abs().max())
    return dict(figures, same_predictions=min(same, same1), batch1_max_abs_diff=diff1,
                ok=same1 == len(reference) and diff1 <= tolerance)


@dataclass
class Source:
    """One checkpoint made ready for every format, once: the module to export (normalisation in front),
    the metadata each file carries, and the test set with PyTorch's log-probabilities on it."""
    ckpt: dict
    module: torch.nn.Module
    meta: dict
    images: torch.Tensor
    labels: torch.Tensor
    reference: torch.Tensor
    data_dir: str = None  # where the int8 calibration images come from (the training split)


def source(ckpt, data_dir):
    model = models.from_checkpoint(ckpt)
    images, labels = data.load("test", data_dir)
    return Source(ckpt, artifacts.Exportable(model).eval(), artifacts.metadata(ckpt), images, labels,
                  models.log_probs(model, images), data_dir)


def verify_int8(path, src, tolerance):
    """An int8 file against the fp32 model on every test image: accuracy (batch 1000 and batch 1)
    within `tolerance` percentage points of the fp32 accuracy; agreement with its predictions."""
    run = artifacts.classifier(path)  # ONNX: data, no trust needed
    fp32 = models.loss_and_accuracy(src.reference, src.labels)[2]
    got = run(src.images)
    acc = models.loss_and_accuracy(got, src.labels)[2]
    figures = dict(same_predictions=int((got.argmax(1) == src.reference.argmax(1)).sum()), images=len(src.labels),
                   accuracy=acc, batch1_accuracy=None, fp32_accuracy=fp32, accuracy_change=round(acc - fp32, 2),
                   max_abs_diff=float((got - src.reference).abs().max()), batch1_max_abs_diff=None, ok=False)
    if abs(acc - fp32) > tolerance:
        return figures  # failed already: no batch-1 pass
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = run(src.images, batch_size=1)
    finally:
        torch.set_num_threads(old)
    acc1 = models.loss_and_accuracy(single, src.labels)[2]
    return dict(figures, batch1_accuracy=acc1, batch1_max_abs_diff=float((single - src.reference).abs().max()),
                ok=abs(acc1 - fp32) <= tolerance)


def export(ckpt, fmt, out_dir, opset, data_dir, tolerance, device="cpu", int8_tolerance=0.2):
    """One format of `ckpt`: export_verified from a Source of its own. Returns (path, figures)."""
    src = source(ckpt, data_dir)
    check_out(out_dir)
    return export_verified(src, fmt, out_dir, opset, tolerance, device, int8_tolerance)


def check_out(out_dir):
    """The output folder, before any work: writable, and holding no manifest.json but one export.py can
    update (manifest.read_manifest refuses the rest: garbage, huge, a symlink, odd names)."""
    check_out_dir(out_dir, "--out")
    manifest.read_manifest(out_dir)


def write(src, fmt, path, opset, device):
    """The writer of `fmt` writes `path`; torch's exporters' own exceptions become one line."""
    try:
        if fmt == "onnx":
            artifacts.write_onnx(src.module, path, src.meta, opset)
        elif fmt == "torchscript":
            artifacts.write_torchscript(src.module, path, src.meta)
        elif fmt == "pt2":
            artifacts.write_pt2(src.module, path, src.meta)
        elif fmt == "onnx-int8":
            artifacts.write_onnx_int8(src.module, path, src.meta, opset, data.calibration_set(src.data_dir))
        else:
            artifacts.write_aoti(src.module, path, src.meta, str(device))
    except (UserError, OSError, KeyboardInterrupt):
        raise
    except Exception as e:  # torch's exporters raise their own kinds, with pages of detail
        raise UserError(f"{fmt} export of {src.ckpt['model_name']} failed in torch's exporter ({type(e).__name__}: "
                        f"{first_line(e)}); nothing written") from None


def mismatch(fmt, name, figures, tolerance, int8_tolerance):
    """The one line of a verification that failed."""
    if fmt == "onnx-int8":
        at1 = f" and {figures['batch1_accuracy']:.2f}% at batch 1" if figures["batch1_accuracy"] is not None else ""
        return (f"{fmt} export of {name} loses too much accuracy: {figures['accuracy']:.2f}% at batch 1000{at1} "
                f"against fp32's {figures['fp32_accuracy']:.2f}% (--int8-tolerance {int8_tolerance:g} pp); "
                "nothing written")
    return (f"{fmt} export of {name} does not match PyTorch: {figures['same_predictions']}/{figures['images']} same "
            f"predictions, max |diff| {max(figures['max_abs_diff'], figures['batch1_max_abs_diff'] or 0):.2e} "
            f"(tolerance {tolerance:g}); nothing written")


def export_verified(src, fmt, out_dir, opset, tolerance, device="cpu", int8_tolerance=0.2):
    """Export, verify, keep, record in the manifest. Returns (path, figures); raises UserError on a mismatch.
    The writer writes a temp file beside the output (fileio.staged: its name keeps the format's suffix,
    which loaders go by), and only a verified one is renamed into place. `device` is where an
    AOTInductor package is compiled for (the other formats are device-free)."""
    name = src.ckpt["model_name"]
    suffix = artifacts.FORMATS[fmt]
    path = os.path.join(out_dir, name + suffix)
    with staged(path, suffix) as tmp:  # renamed over `path` only if the block ends without an error
        write(src, fmt, tmp, opset, device)
        figures = verify_int8(tmp, src, int8_tolerance) if fmt == "onnx-int8" else \
            verify(tmp, src.reference, src.images, src.labels, tolerance)
        if not figures["ok"]:
            raise UserError(mismatch(fmt, name, figures, tolerance, int8_tolerance))
    info = dict(format=fmt, model=name, test_acc=src.ckpt["test_acc"], epoch=src.ckpt["epoch"],
                verified_accuracy=figures["accuracy"], max_abs_diff=figures["max_abs_diff"])
    if fmt == "onnx-int8":
        info.update(fp32_accuracy=figures["fp32_accuracy"], agreement_with_fp32=figures["same_predictions"],
                    calibration_images=data.CALIBRATION_IMAGES)
    if fmt == "aoti":  # compiled code: for this device type (and, on CPU, this instruction set)
        info.update(device=str(device), inductor_configs=artifacts.AOTI_CONFIGS)
    manifest.manifest_add(path, info)
    return path, figures


def check_tolerances(args):
    """--tolerance and --int8-tolerance: 0 or more (0 asks for an exact export, which the checks, all
    "at most", accept), finite."""
    for flag in ("tolerance", "int8_tolerance"):
        v = getattr(args, flag)
        if not 0 <= v < float("inf"):
            raise UserError(f"--{flag.replace('_', '-')} must be a number of 0 or more, got {v}")


def parser():
    p = argparse.ArgumentParser(description="Export a trained model and verify it against PyTorch on all 10,000 "
                                "test images before keeping it.")
    p.add_argument("--model", help=f"one of: {', '.join(models.RECIPES)} (default: the checkpoint's, else bn_gap)")
    p.add_argument("--checkpoint", help="default: runs/<model>/latest/best.pt, then pretrained/<model>.pt")
    p.add_argument("--format", default="onnx", choices=[*artifacts.FORMATS, "all"],
                   help="default: onnx; all writes every format")
    p.add_argument("--out", default="exports", help="output folder (default: exports/); export.py records every "
                   f"file it writes with its sha256 in {manifest.MANIFEST} there")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18); one the exporter cannot produce "
                   "exactly is refused")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="max |log-prob difference| from PyTorch allowed on any test image (default 1e-4)")
    p.add_argument("--int8-tolerance", type=float, default=0.2, metavar="PP",
                   help="onnx-int8: the most its test accuracy may differ from the fp32 model's, in percentage "
                   "points (default 0.2)")
    p.add_argument("--data-dir", help="MNIST folder for the verification (default: $MNIST_DIR, then ./data)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="what an AOTInductor package is compiled for (default auto: CUDA if present, else CPU)")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    with one_line_errors("interrupted: files already verified are kept; nothing half-written is left"):
        if args.model:
            models.get_recipe(args.model)
        check_tolerances(args)
        path = find_checkpoint(args.model or "bn_gap", args.checkpoint)
        ckpt = load_checkpoint(path, args.model)
        formats = list(artifacts.FORMATS) if args.format == "all" else [args.format]
        device = get_device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                            "cpu" if args.device == "auto" else args.device)
        if "aoti" in formats:
            artifacts.check_cxx()  # before any export, not after the first three
        check_out(args.out)
        check_keeps_inputs([os.path.join(args.out, ckpt["model_name"] + artifacts.FORMATS[f]) for f in formats] +
                           [os.path.join(args.out, manifest.MANIFEST)], [path])
        if "onnx-int8" in formats:
            data.calibration_set(args.data_dir)  # refused now, not after other formats, if it holds test images
        print(f"{ckpt['model_name']}: {path} (epoch {ckpt['epoch']}, test accuracy {ckpt['test_acc']:.2f}%)",
              flush=True)
        src = source(ckpt, args.data_dir)  # one model, one reference, one test set for every format
        for fmt in formats:
            out, f = export_verified(src, fmt, args.out, args.opset, args.tolerance, device, args.int8_tolerance)
            if fmt == "onnx-int8":
                print(f"{fmt:12s} {out}: accuracy {f['accuracy']:.2f}% (batch 1: {f['batch1_accuracy']:.2f}%) against "
                      f"fp32's {f['fp32_accuracy']:.2f}% ({f['accuracy_change']:+.2f} pp); {f['same_predictions']}/"
                      f"{f['images']} predictions agree with fp32")
                continue
            print(f"{fmt:12s} {out}: {f['same_predictions']}/{f['images']} predictions match PyTorch, "
                  f"max |log-prob diff| {f['max_abs_diff']:.2e} (batch 1: {f['batch1_max_abs_diff']:.2e}), "
                  f"accuracy {f['accuracy']:.2f}%")


if __name__ == "__main__":
    main()
