"""Export a trained model to ONNX and TorchScript, verified against PyTorch on the full test set.

    python export.py --format onnx                  # bn_gap, latest run's best.pt (or pretrained/)
    python export.py --model gap10k --format all --checkpoint runs/gap10k/latest/best.pt

Input contract of every export (the same for ONNX and TorchScript):
    input  "image"      float32 [N, 1, 28, 28], pixel values in [0, 1] (ToTensor scaling,
                        white digit on black); N is dynamic. Normalisation with mean 0.1307 and
                        std 0.3081 happens inside the graph.
    output "log_probs"  float32 [N, 10], log-probabilities of the digits 0-9.
An export is written to a temp file, run on all 10,000 test images and kept only if every
prediction matches PyTorch and log-probabilities agree within --tolerance.
"""
import argparse
import json
import os
import warnings

import numpy as np
import torch
import torch.nn as nn

import data
import models
import train

CLASSES = [str(d) for d in range(10)]
# TorchScript is deprecated in favour of torch.export, but it is a format this project ships.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.", category=FutureWarning)
SUFFIX = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}


class Exportable(nn.Module):
    """The model with normalisation in front: [0, 1] pixels in, log-probabilities out."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(data.MEAN))
        self.register_buffer("std", torch.tensor(data.STD))

    def forward(self, image):
        return self.model((image - self.mean) / self.std)


def metadata(ckpt):
    recipe = models.RECIPES[ckpt["model_name"]]
    return {
        "model": ckpt["model_name"],
        "recipe": json.dumps({k: v for k, v in recipe.items() if k != "model"}, default=str),
        "input": "image: float32 [N, 1, 28, 28], pixels in [0, 1] (white digit on black); "
                 f"normalised inside the graph with mean {data.MEAN}, std {data.STD}",
        "output": "log_probs: float32 [N, 10], log-probabilities",
        "classes": json.dumps(CLASSES),
        "params": str(models.n_params(models.build_model(ckpt["model_name"]))),
        "test_acc": f"{ckpt['test_acc']:.2f}",
        "epoch": str(ckpt["epoch"]),
        "torch_version": torch.__version__,
    }


def export_onnx(module, path, meta, opset):
    import onnx
    example = torch.rand(2, 1, 28, 28)
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    program = torch.onnx.export(module, (example,), dynamo=True, input_names=["image"], output_names=["log_probs"],
                                dynamic_shapes={"image": {0: batch}}, opset_version=opset, verbose=False)
    proto = program.model_proto
    onnx.helper.set_model_props(proto, meta)
    onnx.checker.check_model(proto, full_check=True)
    train.atomic_write(path, lambda f: f.write(proto.SerializeToString()))


def export_torchscript(module, path, meta):
    scripted = torch.jit.script(module)
    train.atomic_write(path, lambda f: torch.jit.save(scripted, f, _extra_files={"metadata.json": json.dumps(meta)}))


def ort_session(path, threads=None, provider="CPUExecutionProvider"):
    """An onnxruntime session on exactly `provider`: one that cannot start it raises, and a failing run
    may not fall back to the CPU quietly (bench.py would then time the CPU as CUDA)."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(path, opts, providers=[provider])
    sess.disable_fallback()
    if sess.get_providers()[0] != provider:
        raise RuntimeError(f"onnxruntime could not start {provider} (it offered {sess.get_providers()})")
    return sess


def artifact_runner(path, threads=None):
    """A function [N, 1, 28, 28] float32 [0, 1] numpy -> log-probabilities numpy, for an exported file."""
    if path.endswith(".onnx"):
        sess = ort_session(path, threads)
        name = sess.get_inputs()[0].name
        return lambda x: sess.run(None, {name: x})[0]
    module = torch.jit.load(path, map_location="cpu").eval()

    def run(x):
        with torch.no_grad():
            return module(torch.from_numpy(x)).numpy()
    return run


def artifact_metadata(path):
    """The metadata dict written by export.py into an ONNX or TorchScript file."""
    if path.endswith(".onnx"):
        import onnx
        return {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}
    extra = {"metadata.json": ""}
    torch.jit.load(path, map_location="cpu", _extra_files=extra)
    return json.loads(extra["metadata.json"] or "{}")


def predict_artifact(path, images, batch_size=1000):
    """Log-probabilities [N, 10] of an exported file for uint8 images [N, 28, 28]."""
    run = artifact_runner(path)
    x = data.to_unit(images).numpy()
    return torch.from_numpy(np.concatenate([run(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]))


def verify(path, reference, images, labels, tolerance):
    """Compare an exported file with the PyTorch log-probabilities on every test image."""
    got = predict_artifact(path, images)
    single = predict_artifact(path, images[:1], batch_size=1)  # batch 1 must work too
    same = int((got.argmax(1) == reference.argmax(1)).sum())
    diff = float((got - reference).abs().max())
    diff1 = float((single - reference[:1]).abs().max())
    return dict(same_predictions=same, images=len(reference), max_abs_diff=diff, batch1_max_abs_diff=diff1,
                accuracy=train.score(got, labels)[2],
                ok=same == len(reference) and diff <= tolerance and diff1 <= tolerance)


def export(ckpt, fmt, out_dir, opset, data_dir, tolerance):
    """Export, verify, keep. Returns (path, figures); raises train.UsageError on a mismatch."""
    name = ckpt["model_name"]
    model = train.model_from_checkpoint(ckpt)
    module = Exportable(model).eval()
    images, labels = data.load("test", data_dir)
    reference = train.predict(model, images)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name + SUFFIX[fmt])
    staged = path + ".staged" + SUFFIX[fmt]
    try:
        if fmt == "onnx":
            export_onnx(module, staged, metadata(ckpt), opset)
        else:
            export_torchscript(module, staged, metadata(ckpt))
        figures = verify(staged, reference, images, labels, tolerance)
        if not figures["ok"]:
            raise train.UsageError(f"{fmt} export of {name} does not match PyTorch: {figures['same_predictions']}/"
                                   f"{figures['images']} same predictions, max |diff| {figures['max_abs_diff']:.2e} "
                                   f"(tolerance {tolerance:g}); nothing written")
        os.replace(staged, path)
    finally:
        if os.path.exists(staged):
            os.remove(staged)
    return path, figures


def find_checkpoint(model_name, checkpoint=None):
    """--checkpoint, else runs/<model>/latest/best.pt, else pretrained/<model>.pt."""
    if checkpoint:
        return checkpoint
    for path in (os.path.join("runs", model_name, "latest", "best.pt"), os.path.join("pretrained", model_name + ".pt")):
        if os.path.isfile(path):
            return path
    raise train.UsageError(f"no checkpoint for {model_name}: train one with 'python train.py --model {model_name}' "
                           "or pass --checkpoint PATH")


def main(argv=None):
    p = argparse.ArgumentParser(description="Export a trained model to ONNX / TorchScript and verify it.")
    p.add_argument("--model", help=f"one of: {', '.join(models.RECIPES)} (default: the checkpoint's, else bn_gap)")
    p.add_argument("--checkpoint", help="default: runs/<model>/latest/best.pt, then pretrained/<model>.pt")
    p.add_argument("--format", default="onnx", choices=["onnx", "torchscript", "all"])
    p.add_argument("--out", default="exports", help="output folder (default: exports/)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max |log-prob difference| allowed")
    p.add_argument("--data-dir", help="MNIST folder for the verification (default: $MNIST_DIR, then ./data)")
    args = p.parse_args(argv)
    with train.one_line_errors():
        if args.model:
            models.get_recipe(args.model)
        path = find_checkpoint(args.model or "bn_gap", args.checkpoint)
        ckpt = train.load_checkpoint(path, args.model)
        print(f"{ckpt['model_name']}: {path} (epoch {ckpt['epoch']}, test accuracy {ckpt['test_acc']:.2f}%)")
        for fmt in (["onnx", "torchscript"] if args.format == "all" else [args.format]):
            out, f = export(ckpt, fmt, args.out, args.opset, args.data_dir, args.tolerance)
            print(f"{fmt:12s} {out}: {f['same_predictions']}/{f['images']} predictions match PyTorch, "
                  f"max |log-prob diff| {f['max_abs_diff']:.2e} (batch 1: {f['batch1_max_abs_diff']:.2e}), "
                  f"accuracy {f['accuracy']:.2f}%")


if __name__ == "__main__":
    main()
