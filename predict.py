"""Classify your own digits: image files, folders of them, or a drawing page in the browser.

    python predict.py photo.jpg scans/ --top 3          # bn_gap's latest best.pt, else pretrained/
    python predict.py digit.png --artifact exports/bn_gap.onnx --json
    python predict.py --serve                           # http://127.0.0.1:8000: draw or upload a digit

Every picture goes through digit.to_mnist, MNIST's own preprocessing (greyscale, ink polarity,
background and lighting removed, digit scaled into 20x20 and centred by its centre of mass in 28x28),
so a photo of dark ink on paper is seen the way the models were trained. An image already in MNIST's
form passes unchanged. The server is the standard library's http.server: no extra dependency.
"""
import argparse
import base64
import io
import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import torch
from PIL import Image

import artifacts
import common
import digit
import models

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
MAX_BODY = 5 * 1024 * 1024   # bytes a POST /predict may send
PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "predict.html")


def load_classifier(args):
    """(classify: uint8 images [N, 28, 28] -> probabilities numpy [N, 10], info: model, test_acc, its 95%
    interval, source) of --artifact, --checkpoint or --model's checkpoint."""
    if args.artifact:
        clf = artifacts.classifier(args.artifact, trust_code=args.trust_code, kind="artifact")
    else:
        name = args.model or "bn_gap"
        models.get_recipe(name)
        clf = artifacts.classifier(common.find_checkpoint(name, args.checkpoint), device=common.get_device(args.device),
                                   model_name=args.model, kind="checkpoint")
    acc = clf.test_acc
    info = {"model": clf.model, "test_acc": None if acc is None else f"{acc:.2f}", "source": clf.source,
            "test_acc_ci95": None if acc is None else common.ci95(round(acc * 100), 10000)}  # scored on all 10,000
    return lambda x: clf(x).exp().numpy(), info


def answer(name, probs):
    """The JSON of one prediction."""
    return {"file": name, "prediction": int(probs.argmax()), "probability": round(float(probs.max()), 6),
            "probabilities": [round(float(p), 6) for p in probs]}


def top_line(r, k):
    order = np.argsort(r["probabilities"])[::-1][:k]
    return f"{r['file']}: {r['prediction']} ({100 * r['probability']:.1f}%)" + (
        "   top: " + ", ".join(f"{d} {100 * r['probabilities'][d]:.1f}%" for d in order) if k > 1 else "")


def png(image):
    """PNG bytes of a uint8 [28, 28] tensor."""
    buf = io.BytesIO()
    Image.fromarray(image.numpy()).save(buf, "PNG")
    return buf.getvalue()


def image_files(paths):
    """(files, problems): the files named and the images under the folders named; one problem per
    path that gives none."""
    files, problems = [], []
    for p in paths:
        if os.path.isdir(p):
            found = sorted(os.path.join(d, f) for d, _, names in os.walk(p) for f in names
                           if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))
            files += found
            if not found:
                problems.append(f"{p}: no images in this folder ({', '.join(IMAGE_EXTENSIONS)})")
        elif os.path.exists(p):
            files.append(p)
        else:
            problems.append(f"{p}: no such file or folder")
    return files, problems


def save_inputs(folder, names, images):
    """Each model input as <folder>/<file's stem>.png (-2, -3... where stems repeat)."""
    used = set()
    for name, image in zip(names, images):
        stem = base = os.path.splitext(os.path.basename(name))[0]
        n = 1
        while stem in used:
            n += 1
            stem = f"{base}-{n}"
        used.add(stem)
        common.atomic_write(os.path.join(folder, stem + ".png"), lambda f, b=png(image): f.write(b))


def run_files(args, classify):
    """Answer every image named; report the bad ones. Returns how many inputs failed."""
    files, problems = image_files(args.inputs)
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    names, images = [], []
    for f in files:
        try:
            images.append(digit.to_mnist(digit.open_image(f)))
            names.append(f)
        except (common.UserError, OSError) as e:
            problems.append(f)
            print(f"error: {f}: {getattr(e, 'strerror', None) or e}", file=sys.stderr)
    results = [answer(n, p) for n, p in zip(names, classify(torch.stack(images)))] if images else []
    if args.save_preprocessed:
        save_inputs(args.save_preprocessed, names, images)
    if args.json:
        print(json.dumps(results, indent=1))
    elif results:
        print("\n".join(top_line(r, args.top) for r in results))
    return len(problems)


def make_server(host, port, classify, info):
    """The drawing page's server: GET / the page, POST /predict an image body -> one prediction's JSON."""
    with open(PAGE, encoding="utf-8") as f:
        page = f.read().replace("{{INFO}}", json.dumps(info).replace("<", "\\u003c")).encode()
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        timeout = 30   # seconds a client may stall mid-request

        def reply(self, code, body, kind="application/json"):
            body = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path.split("?")[0] == "/":
                return self.reply(200, page, "text/html; charset=utf-8")
            self.reply(404, {"error": f"no page {self.path}: the page is /"})

        def do_POST(self):
            if self.path != "/predict":
                return self.reply(404, {"error": f"no endpoint {self.path}: POST images to /predict"})
            size = self.headers.get("Content-Length", "")
            if not size.isdigit():
                self.close_connection = True
                return self.reply(411, {"error": "send the image as the body, with a Content-Length"})
            if int(size) > MAX_BODY:
                self.close_connection = True   # the unread body stays in the socket
                return self.reply(413, {"error": f"the image is over {MAX_BODY // 2 ** 20} MB; send a smaller one"})
            try:
                image = digit.to_mnist(digit.open_image(self.rfile.read(int(size))))
            except common.UserError as e:
                return self.reply(400, {"error": f"request body: {e}"})
            with lock:
                r = answer("upload", classify(image[None])[0])
            r.update(info, image="data:image/png;base64," + base64.b64encode(png(image)).decode())
            self.reply(200, r)

        def log_message(self, fmt, *a):
            print(f"{self.address_string()} {fmt % a}", file=sys.stderr)

    return ThreadingHTTPServer((host, port), Handler)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Classify your own digit images, or draw them on a local web page.")
    p.add_argument("inputs", nargs="*", metavar="IMAGE_OR_FOLDER", help="image files and folders of them")
    p.add_argument("--model", help="use runs/<model>/latest/best.pt, else pretrained/<model>.pt (default bn_gap)")
    p.add_argument("--checkpoint", help="a checkpoint written by train.py")
    p.add_argument("--artifact", help="an exported file (.onnx, .torchscript.pt, ...) written by export.py")
    p.add_argument("--trust-code", action="store_true", help="run a code-bearing artifact not in its manifest")
    p.add_argument("--top", type=int, default=3, help="how many digits to list per image (1-10, default 3)")
    p.add_argument("--json", action="store_true", help="print a JSON list: file, prediction, probability, "
                                                       "probabilities")
    p.add_argument("--save-preprocessed", metavar="DIR", help="write each 28x28 model input as a PNG into DIR")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (checkpoints only)")
    p.add_argument("--serve", action="store_true", help="start the drawing page instead")
    p.add_argument("--port", type=int, default=8000, help="the page's port (default 8000)")
    p.add_argument("--host", default="127.0.0.1", help="the address to bind (default 127.0.0.1: this machine only)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    failed = 0
    with common.one_line_errors():
        if not 1 <= args.top <= 10:
            raise common.UserError(f"--top must be 1 to 10, not {args.top}")
        if not args.serve and not args.inputs:
            raise common.UserError("name at least one image or folder, or start the page with --serve")
        if args.save_preprocessed:
            common.check_out_dir(args.save_preprocessed, "--save-preprocessed")
        classify, info = load_classifier(args)
        if args.serve:
            server = make_server(args.host, args.port, classify, info)
            host, port = server.server_address[:2]
            print(f"{info['model']} ({info['source']}) on http://{host}:{port}/  (Ctrl-C stops)", flush=True)
            try:
                server.serve_forever()
            except KeyboardInterrupt:
                pass
            finally:
                server.server_close()
        else:
            failed = run_files(args, classify)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
