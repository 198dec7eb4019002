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
import contextlib
import hashlib
import io
import ipaddress
import json
import os
import re
import socket
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import torch
from PIL import Image

import artifacts
import digit
import errors
import fileio
import machine
import models
import runfiles
import stats
from errors import printable

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
BATCH = 256   # images read, classified and printed at a time: memory does not grow with the file count
MAX_BODY = 5 * 1024 * 1024   # bytes a POST /predict may send
MAX_PIXELS = 4096 * 4096   # pixels an uploaded image may decode to (a 12 Mpx phone photo fits)
MAX_CLIENTS = 16   # connections the page's server serves at once; more get 503 at once
REQUEST_SECONDS = 15   # default --request-timeout: a whole request (headers and body) must arrive within it
ENDPOINTS = {"/": "GET", "/predict": "POST"}   # all the page's server answers
PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "predict.html")


def load_classifier(args):
    """(classify: uint8 images [N, 28, 28] -> probabilities numpy [N, 10], info: model, test_acc, its 95%
    interval, source) of --artifact, --checkpoint or --model's checkpoint."""
    if args.artifact:
        clf = artifacts.classifier(args.artifact, trust_code=args.trust_code, kind="artifact")
    else:
        name = args.model or "bn_gap"
        models.get_recipe(name)
        clf = artifacts.classifier(runfiles.find_checkpoint(name, args.checkpoint), device=machine.get_device(args.device),
                                   model_name=args.model, kind="checkpoint")
    acc = clf.test_acc
    info = {"model": clf.model, "test_acc": None if acc is None else f"{acc:.2f}", "source": clf.source,
            "test_acc_ci95": None if acc is None or not args.serve   # the page shows it; scipy's import costs 1-2 s
            else stats.ci95(round(acc * 100), 10000)}  # scored on all 10,000
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


def run_files(args, classify):
    """Answer every image named, BATCH at a time (read, classified, printed, saved), so memory holds
    one batch whatever the file count and the answers appear as they come; report the bad ones.
    Returns how many inputs failed."""
    files, problems = image_files(args.inputs)
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    saved = saved_names(args.save_preprocessed, files) if args.save_preprocessed else [None] * len(files)
    if args.save_preprocessed:   # before any work: an output never replaces an input
        fileio.check_keeps_inputs(saved, files, "--save-preprocessed")
    answered = 0
    for start in range(0, len(files), BATCH):
        names, images = [], []
        for f, out in zip(files[start:start + BATCH], saved[start:start + BATCH]):
            try:
                images.append(digit.to_mnist(digit.open_image(f)))
                names.append((f, out))
            except (errors.UserError, OSError) as e:
                problems.append(f)
                print(f"error: {printable(f)}: {getattr(e, 'strerror', None) or e}", file=sys.stderr)
        if not images:
            continue
        for (f, out), image, probs in zip(names, images, classify(torch.stack(images))):
            r = answer(f, probs)
            if out:
                fileio.atomic_write(out, lambda fh, b=png(image): fh.write(b))
                r["preprocessed"] = out
            if args.json:   # the list json.dumps(results, indent=1) prints, one item at a time
                print("[\n" if not answered else ",\n", end="")
                print(" " + json.dumps(r, indent=1).replace("\n", "\n "), end="")
            else:
                print(top_line(dict(r, file=printable(f)), args.top) + (f"   -> {printable(out)}" if out else ""))
            answered += 1
        sys.stdout.flush()
    if args.json:
        print("\n]" if answered else "[]")
    return len(problems)


class Deadline(io.RawIOBase):
    """A socket's reads, each allowed only the time left until the request's deadline: a client that
    trickles a byte every few seconds is dropped at the deadline, not kept for as long as it trickles."""

    def __init__(self, sock, seconds):
        self.sock, self.end = sock, time.monotonic() + seconds

    def readable(self):
        return True

    def readinto(self, b):
        left = self.end - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request did not arrive within its time")
        self.sock.settimeout(left)
        return self.sock.recv_into(b)


def is_loopback(host):
    try:
        return all(ipaddress.ip_address(a[4][0]).is_loopback for a in socket.getaddrinfo(host or None, None))
    except (OSError, ValueError):
        return False


def make_server(host, port, classify, info, request_seconds=REQUEST_SECONDS, max_clients=MAX_CLIENTS):
    """The drawing page's server: GET / the page, POST /predict an image body -> one prediction's JSON.
    Every other request gets a 4xx and a one-line JSON error. At most max_clients connections are
    served at once (one request each, HTTP/1.0), each within request_seconds; one image is decoded
    and classified at a time, so memory stays bounded whatever the clients do."""
    with open(PAGE, encoding="utf-8") as f:
        page = f.read().replace("{{INFO}}", json.dumps(info).replace("<", "\\u003c"))
    sha = lambda tag: "'sha256-%s'" % base64.b64encode(hashlib.sha256(  # noqa: E731
        re.search(f"<{tag}>(.*?)</{tag}>", page, re.S)[1].encode()).digest()).decode()
    headers = {"X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer",
               "Cache-Control": "no-store", "Cross-Origin-Resource-Policy": "same-origin",
               "Content-Security-Policy": f"default-src 'none'; script-src {sha('script')}; style-src {sha('style')}; "
                                          "img-src data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
                                          "frame-ancestors 'none'"}
    page, lock = page.encode(), threading.Lock()
    loopback = is_loopback(host)

    class Handler(BaseHTTPRequestHandler):
        server_version, sys_version = "predict.py", ""

        def setup(self):
            super().setup()
            self.rfile.close()
            self.rfile = io.BufferedReader(Deadline(self.connection, request_seconds))

        def reply(self, code, body, kind="application/json"):
            body = body if isinstance(body, bytes) else (json.dumps(body) + "\n").encode()
            self.connection.settimeout(request_seconds)
            if self.request_version == "HTTP/0.9":   # never answered headerless
                self.request_version = "HTTP/1.0"
            self.send_response(code)
            for k, v in dict(headers, **{"Content-Type": kind, "Content-Length": str(len(body))}).items():
                self.send_header(k, v)
            if code == 405:
                self.send_header("Allow", "GET, POST")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def refuse(self, code, message):
            self.close_connection = True   # what is left of the request stays unread
            self.reply(code, {"error": message})

        def send_error(self, code, message=None, explain=None):
            """http.server's own refusals (request line, headers, method, version) as one-line JSON."""
            if code == HTTPStatus.NOT_IMPLEMENTED:
                code, message = 405, f"{printable(self.command)[:20]} is not a method here: GET / for the page, POST /predict for an image"
            elif code >= 500:   # 505: an HTTP version other than 1.x
                code = 400
            self.refuse(code, message or HTTPStatus(code).phrase)

        def route(self):
            """The (status, message) refusing a request that is not GET / or POST /predict, else None."""
            where = self.headers.get("Host")
            path, query = self.path.partition("?")[::2]
            if self.request_version == "HTTP/0.9":
                return 400, "HTTP/0.9 is not spoken here: use HTTP/1.0 or 1.1"
            if loopback and where is not None and where.rsplit(":", 1)[0] not in ("127.0.0.1", "localhost", "[::1]"):
                return 403, f"this page answers requests for 127.0.0.1 or localhost only, not {printable(where)[:100]}"
            if path not in ENDPOINTS:
                return 404, f"no such page {printable(self.path)[:100]}: GET / is the page, POST /predict takes an image"
            if query:
                return 400, f"{path} takes no query string"
            if self.command != ENDPOINTS[path]:
                return 405, f"{path} answers {ENDPOINTS[path]} only"
            return None

        def do_GET(self):
            if refusal := self.route():
                return self.refuse(*refusal)
            self.reply(200, page, "text/html; charset=utf-8")

        def do_POST(self):
            if refusal := self.route():
                return self.refuse(*refusal)
            size = self.headers.get_all("Content-Length", [])
            if self.headers.get("Transfer-Encoding"):
                return self.refuse(411, "chunked (or other Transfer-Encoding) bodies are not read: "
                                        "send the image as the body, with a Content-Length")
            if not size:
                return self.refuse(411, "send the image as the body, with a Content-Length")
            if len(set(size)) > 1 or not re.fullmatch(r"[0-9]{1,12}", size[0].strip()):
                return self.refuse(400, f"Content-Length must be one whole number of bytes, not {printable(', '.join(size))[:40]}")
            size = int(size[0])
            if size > MAX_BODY:
                return self.refuse(413, f"the image is over {MAX_BODY // 2 ** 20} MB; send a smaller one")
            try:
                body = self.rfile.read(size)
            except TimeoutError:
                return self.refuse(408, f"the body did not arrive within {request_seconds:g} s")
            if len(body) < size:
                return self.refuse(400, f"the body ended after {len(body)} of its Content-Length's {size} bytes")
            try:
                with lock:   # one image at a time: memory is one decode's, whatever the clients send
                    image = digit.to_mnist(digit.open_image(body, MAX_PIXELS))
                    r = answer("upload", classify(image[None])[0])
            except errors.UserError as e:
                return self.refuse(400, f"request body: {e}")
            r.update(info, image="data:image/png;base64," + base64.b64encode(png(image)).decode())
            self.reply(200, r)

        def log_message(self, fmt, *a):
            sys.stderr.write(printable(f"{self.address_string()} {fmt % a}") + "\n")   # one write: threads' lines never mix

    class Server(ThreadingHTTPServer):
        """At most max_clients handler threads; a connection beyond them gets 503 at once."""
        slots = threading.BoundedSemaphore(max_clients)
        request_queue_size = 128   # the listen backlog (socketserver's 5 left a burst of clients unanswered for seconds)

        def process_request(self, request, client_address):
            if self.slots.acquire(blocking=False):
                return super().process_request(request, client_address)
            body = json.dumps({"error": f"busy: {max_clients} requests in progress; try again"}).encode() + b"\n"
            try:
                request.settimeout(0.1)
                request.recv(65536)   # the request, read so that closing does not reset the connection
            except OSError:
                pass
            with contextlib.suppress(OSError):
                request.sendall(b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                b"Retry-After: 1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            self.shutdown_request(request)

        def process_request_thread(self, request, client_address):
            try:
                super().process_request_thread(request, client_address)
            finally:
                self.slots.release()

        def handle_error(self, request, client_address):
            """A client that went away (a reset, a broken pipe, a write that timed out) is one line; anything
            else is a bug and keeps its traceback."""
            e = sys.exc_info()[1]
            if not isinstance(e, OSError):
                return super().handle_error(request, client_address)
            sys.stderr.write(printable(f"{client_address[0]} connection lost: {e.strerror or e}") + "\n")

    return Server((host, port), Handler)


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
    p.add_argument("--port", type=int, default=8000, help="the page's port (default 8000; 0: any free one)")
    p.add_argument("--host", default="127.0.0.1", help="the address to bind (default 127.0.0.1: this machine only; "
                                                       "only an address named here is served beyond it)")
    p.add_argument("--request-timeout", type=float, default=REQUEST_SECONDS, metavar="S",
                   help=f"seconds a request (headers and body) may take to arrive (default {REQUEST_SECONDS})")
    return p.parse_args(argv)


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
            server = make_server(args.host, args.port, classify, info, args.request_timeout)
            host, port = server.server_address[:2]
            if not is_loopback(args.host):
                print(f"warning: --host {args.host} serves the page to other machines too, with no Host check",
                      file=sys.stderr)
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
