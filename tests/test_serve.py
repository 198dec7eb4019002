"""The drawing page's server (serve.py, started by predict.py --serve) under hostile and careless clients,
as a real process on 127.0.0.1: request shapes, images that decode huge, many connections and slow
clients, what it sends, what it binds and which Host names it answers. One server for the whole module (forked from conftest.py's fork server) with
a 1.5 s --request-timeout so the slow-client cases cost seconds; every case checks the status, a
one-line JSON `error`, and that the server still answers; the last test checks its console held no
traceback and that Ctrl-C stops it cleanly."""
import functools
import io
import json
import os
import signal
import socket
import struct
import threading
import time
import zlib

import numpy as np
import pytest
from PIL import Image, ImageDraw
from test_predict import HOSTILE_SHOWN, hostile_export

import predict
import serve

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 1.5   # the server's --request-timeout here


@pytest.fixture(scope="module")
def served(forked, tmp_path_factory):
    """(port, child) of predict.py --serve on a free loopback port."""
    child = forked.start("predict.py", "--serve", "--port", "0", "--checkpoint", os.path.join(ROOT, "pretrained", "bn_gap.pt"),
                         "--device", "cpu", "--request-timeout", TIMEOUT, cwd=tmp_path_factory.mktemp("serve"))
    end = time.monotonic() + 120
    printed = lambda: open(child.out).read() if os.path.exists(child.out) else ""  # noqa: E731  the child makes it
    while "http://" not in printed():
        assert child.alive() and time.monotonic() < end, child.wait(1).stderr
        time.sleep(0.05)
    url = printed().split("http://", 1)[1].split("/", 1)[0]
    assert url.startswith("127.0.0.1:")   # the default binds this machine only
    yield int(url.split(":")[1]), child
    if child.alive():
        child.send_signal(signal.SIGKILL)
        child.wait()


def exchange(port, data, wait=10.0, close_write=False):
    """Send raw bytes to 127.0.0.1:port (or to the address port), read until the server closes: (status
    or None, headers, body)."""
    with socket.create_connection(port if isinstance(port, tuple) else ("127.0.0.1", port), timeout=wait) as s:
        s.sendall(data)
        if close_write:
            s.shutdown(socket.SHUT_WR)
        buf = b""
        while chunk := s.recv(65536):
            buf += chunk
    if not buf:
        return None, {}, b""
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def post(body, *headers):
    return b"\r\n".join([b"POST /predict HTTP/1.1", b"Host: 127.0.0.1", b"Content-Length: %d" % len(body), *headers,
                         b"", body])


def check_refusal(port, status, headers, body, code, words):
    assert status == code, (status, body)
    assert headers.get("x-content-type-options") == "nosniff" and headers["content-type"] == "application/json"
    assert body.count(b"\n") == 1 and body.endswith(b"\n"), body   # one line of JSON
    assert words in json.loads(body)["error"], body
    assert exchange(port, b"GET / HTTP/1.0\r\n\r\n")[0] == 200   # and it still serves


REQUESTS = [  # (id, raw request, status, words in the error)
    ("Content-Length negative", b"POST /predict HTTP/1.1\r\nContent-Length: -5\r\n\r\n", 400, "whole number"),
    ("Content-Length not a number", b"POST /predict HTTP/1.1\r\nContent-Length: abc\r\n\r\n", 400, "whole number"),
    ("Content-Length twice, differing", b"POST /predict HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\nabcde",
     400, "one whole number"),
    ("Content-Length far over the limit", b"POST /predict HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n", 413, "over 5 MB"),
    ("no Content-Length", b"POST /predict HTTP/1.1\r\n\r\n", 411, "Content-Length"),
    ("chunked", b"POST /predict HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nabcde\r\n0\r\n\r\n", 411, "chunked"),
    ("PUT", b"PUT / HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 405, "PUT is not a method here"),
    ("DELETE", b"DELETE /predict HTTP/1.1\r\n\r\n", 405, "DELETE is not a method here"),
    ("OPTIONS", b"OPTIONS * HTTP/1.1\r\n\r\n", 405, "OPTIONS is not a method here"),
    ("unknown method", b"BREW / HTTP/1.1\r\n\r\n", 405, "BREW is not a method here"),
    ("GET /predict", b"GET /predict HTTP/1.1\r\n\r\n", 405, "/predict answers POST only"),
    ("POST /", b"POST / HTTP/1.1\r\nContent-Length: 1\r\n\r\nx", 405, "/ answers GET only"),
    ("unknown path", b"GET /nope HTTP/1.1\r\n\r\n", 404, "no such page /nope"),
    ("traversal", b"GET /../../etc/passwd HTTP/1.1\r\n\r\n", 404, "no such page"),
    ("traversal, encoded", b"GET /%2e%2e/%2e%2e/etc/passwd HTTP/1.1\r\n\r\n", 404, "no such page"),
    ("traversal, double slash", b"GET //etc/passwd HTTP/1.1\r\n\r\n", 404, "no such page"),
    ("the page's own file", b"GET /predict.html HTTP/1.1\r\n\r\n", 404, "no such page"),
    ("the page's own file, by its path", b"GET /static/predict.html HTTP/1.1\r\n\r\n", 404, "no such page"),
    ("a folder", b"GET /tests/ HTTP/1.1\r\n\r\n", 404, "no such page"),
    ("absolute URI", b"GET http://evil.example/ HTTP/1.1\r\n\r\n", 404, "no such page"),
    ("query string on /", b"GET /?x=1 HTTP/1.1\r\n\r\n", 400, "no query string"),
    ("query string on /predict", b"POST /predict?x=1 HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}", 400, "no query string"),
    ("JSON body", post(b'{"image": "iVBORw0KGgo="}', b"Content-Type: application/json"), 400, "not an image"),
    ("form body", post(b"image=abc&x=1", b"Content-Type: application/x-www-form-urlencoded"), 400, "not an image"),
    ("empty body", post(b""), 400, "empty"),
    ("another Host (DNS rebinding)", b"GET / HTTP/1.1\r\nHost: evil.example\r\n\r\n", 403, "127.0.0.1 or localhost only"),
    ("another Host, localhost's prefix", b"GET / HTTP/1.1\r\nHost: localhost.evil.example\r\n\r\n", 403, "not localhost.evil"),
    ("another Host, with an @", b"GET / HTTP/1.1\r\nHost: localhost@evil.example\r\n\r\n", 403, "localhost only"),
    ("Host [::1], which a server bound to 127.0.0.1 is not reached by", b"GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n",
     403, "127.0.0.1 or localhost only"),
    ("Host 127.0.0.1 in brackets", b"GET / HTTP/1.1\r\nHost: [127.0.0.1]\r\n\r\n", 403, "localhost only"),
    ("an empty Host", b"GET / HTTP/1.1\r\nHost: \r\n\r\n", 403, "localhost only"),
    ("HTTP/2.0", b"GET / HTTP/2.0\r\n\r\n", 400, "HTTP version"),
    ("HTTP/0.9", b"GET /\r\n\r\n", 400, "HTTP/0.9"),
    ("garbage request line", b"\x00\x01\x02 \x1b[2J\r\n\r\n", 400, "Bad"),
    ("request line over 64 KB", b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", 414, "Too Long"),
    ("200 headers", b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(200)) + b"\r\n", 431, "headers"),
    ("body shorter than its Content-Length, then closed", (b"POST /predict HTTP/1.1\r\nContent-Length: 1000\r\n\r\nabc",
                                                           True), 400, "ended after 3 of"),
    ("body shorter than its Content-Length, never finished", b"POST /predict HTTP/1.1\r\nContent-Length: 1000\r\n\r\nabc",
     408, "did not arrive within 1.5 s"),
]


@pytest.mark.parametrize("cid, request_, code, words", REQUESTS, ids=[r[0] for r in REQUESTS])
def test_request_shapes_get_a_4xx_and_one_json_line(served, cid, request_, code, words):
    port, _ = served
    data, close_write = request_ if isinstance(request_, tuple) else (request_, False)
    check_refusal(port, *exchange(port, data, close_write=close_write), code, words)


def test_head_answers_like_get_without_a_body(served):
    """HEAD / is GET / less the body (the same status and headers, Content-Length the page's); HEAD of
    anything else is that request's refusal, without its body."""
    port = served[0]
    status, headers, body = exchange(port, b"HEAD / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    got, got_headers, page = exchange(port, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert status == got == 200 and body == b"" and b"<canvas" in page
    same = lambda h: {k: v for k, v in h.items() if k != "date"}  # noqa: E731
    assert same(headers) == same(got_headers) and int(headers["content-length"]) == len(page)
    for request, code, allow in ((b"HEAD /predict HTTP/1.1\r\n\r\n", 405, "POST"), (b"HEAD /nope HTTP/1.1\r\n\r\n", 404, None),
                                 (b"HEAD / HTTP/1.1\r\nHost: evil.example\r\n\r\n", 403, None)):
        status, headers, body = exchange(port, request)
        assert (status, headers.get("allow"), body) == (code, allow, b""), request
    status, headers, _ = exchange(port, b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
    assert status == 405 and headers["allow"] == "GET, HEAD"


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.1:9", "localhost", "LOCALHOST:9", "Localhost."])
def test_host_names_that_reach_it_are_answered(served, host):
    assert exchange(served[0], b"GET / HTTP/1.1\r\nHost: %s\r\n\r\n" % host.encode())[0] == 200


def test_page_sends_a_local_tools_headers(served):
    status, headers, body = exchange(served[0], b"GET / HTTP/1.1\r\nHost: localhost:1\r\n\r\n")
    assert status == 200 and b"<canvas" in body
    assert headers["x-content-type-options"] == "nosniff" and headers["x-frame-options"] == "DENY"
    assert headers["referrer-policy"] == "no-referrer" and headers["cache-control"] == "no-store"
    csp = headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'sha256-" in csp and "unsafe" not in csp
    assert headers["server"].startswith("predict.py") and "Python" not in headers["server"]


# ------------------------------------------------------------------- images that decode huge

def png_header(w, h, colour=6):
    """A tiny PNG whose header claims w x h pixels (RGBA by default) and holds no pixel data."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, colour, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def webp_header(w, h):
    """A lossless WebP whose header claims w x h pixels and holds nothing else."""
    body = b"\x2f" + struct.pack("<I", (w - 1) | (h - 1) << 14) + bytes(16)
    return b"RIFF" + struct.pack("<I", 12 + len(body)) + b"WEBPVP8L" + struct.pack("<I", len(body)) + body


def encoded(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def seven():
    d = Image.new("L", (60, 60), 255)
    ImageDraw.Draw(d).line([(15, 10), (45, 10), (25, 55)], fill=0, width=5)
    return d


def tiff_pages(first, pages, size=4):
    """A little-endian TIFF: `first` (an 'L' image) then `pages` blank size x size pages, written
    directly (Pillow's multi-page writer rereads every earlier page per page: 3.4 s for 2,000)."""
    images = [(first.width, first.height, first.tobytes())] + [(size, size, bytes(size * size))] * pages
    out, at = [b"II*\0" + struct.pack("<I", 8)], 8   # the header, then each page's IFD and pixels
    for i, (w, h, pixels) in enumerate(images):
        tags = [(256, 4, w), (257, 4, h), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, at + 114), (277, 3, 1),
                (278, 4, h), (279, 4, w * h)]  # size, 8 bits, uncompressed, black is zero, one strip after the IFD
        after = at + 114 + len(pixels)         # an IFD of 9 tags is 114 bytes
        out.append(struct.pack("<H", len(tags)) + b"".join(struct.pack("<HHII", t, k, 1, v) for t, k, v in tags)
                   + struct.pack("<I", after if i < pages else 0) + pixels)
        at = after
    return b"".join(out)


@functools.cache
def images():
    """The cases, built once per process (0.3 s)."""
    d = seven()
    blank = [Image.new("P", (60, 60), i % 250) for i in range(2000)]
    rotated = d.convert("RGB").transpose(Image.Transpose.ROTATE_90)   # stored on its side...
    exif = rotated.getexif()
    exif[0x0112] = 6                                                   # ...and the camera says: turn it back
    sixteen = Image.fromarray((np.asarray(d, np.uint16) * 257).astype(np.uint16))
    return [  # (id, body, status, prediction or words)
        ("PNG claiming 30000 x 30000", png_header(30000, 30000), 400, "over Pillow's limit"),
        ("PNG claiming 9000 x 9000 (under Pillow's limit, over the page's)", png_header(9000, 9000), 400,
         "9000 x 9000 pixels: over this limit"),
        ("GIF claiming 65535 x 65535", b"GIF89a\xff\xff\xff\xff\x00\x00\x00,\x00\x00\x00\x00\xff\xff\xff\xff\x00\x02"
         b"\x02D\x01\x00;", 400, "over Pillow's limit"),
        ("TIFF claiming 60000 x 60000", encoded(Image.new("L", (8, 8)), "TIFF").replace(
            struct.pack("<HHII", 256, 4, 1, 8), struct.pack("<HHII", 256, 4, 1, 60000)).replace(
            struct.pack("<HHII", 257, 4, 1, 8), struct.pack("<HHII", 257, 4, 1, 60000)), 400, "over Pillow's limit"),
        ("WebP claiming 16383 x 16383", webp_header(16383, 16383), 400, "over Pillow's limit"),
        ("PNG claiming 0 x 0", png_header(0, 0), 400, "not an image"),
        ("animated GIF, 2,000 frames", encoded(d.convert("P"), "GIF", save_all=True, append_images=blank), 200, 7),
        ("TIFF, 2,000 pages", tiff_pages(d, 2000), 200, 7),
        ("animated WebP, 100 frames", encoded(d.convert("RGB"), "WEBP", save_all=True,
                                              append_images=[b.convert("RGB") for b in blank[:100]]), 200, 7),
        ("palette PNG", encoded(d.convert("P"), "PNG"), 200, 7),
        ("CMYK JPEG", encoded(d.convert("CMYK"), "JPEG"), 200, 7),
        ("LA PNG", encoded(d.convert("LA"), "PNG"), 200, 7),
        ("I;16 PNG", encoded(sixteen, "PNG"), 200, 7),
        ("EXIF orientation 6", encoded(rotated, "JPEG", exif=exif.tobytes()), 200, 7),
        ("1 x 1 PNG", encoded(Image.new("L", (1, 1)), "PNG"), 400, "no ink found"),
    ]


@pytest.mark.parametrize("cid, body, code, want", images(), ids=[i[0] for i in images()])
def test_images_that_decode_huge_or_odd(served, cid, body, code, want):
    port, _ = served
    status, headers, reply = exchange(port, post(body), wait=60)
    if code == 200:
        assert status == 200 and json.loads(reply)["prediction"] == want, reply[:200]
    else:
        check_refusal(port, status, headers, reply, code, want)


def peak_kb(pid):
    status = open(f"/proc/{pid}/status").read()
    return int(status.split("VmHWM:")[1].split()[0])


def test_a_tiny_body_claiming_81_mpx_costs_no_memory(served):
    """Before the page's pixel limit, Pillow allocated the 9000 x 9000 RGBA image (324 MB) for these 120
    bytes before finding no data; a real one of 315 KB peaked at 680 MB and took 4 s."""
    port, child = served
    before = peak_kb(child.pid)
    exchange(port, post(png_header(9000, 9000)))
    assert peak_kb(child.pid) - before < 50_000


# ------------------------------------------------------------- many connections, slow clients

def thread_count(pid):
    return int(open(f"/proc/{pid}/status").read().split("Threads:")[1].split()[0])


def test_many_connections_and_slow_clients(served):
    """One client that trickles a byte every 0.3 s, then connections that send nothing, 25 in all: the
    server holds at most MAX_CLIENTS handler threads, refuses the others at once with 503, drops the
    stalled ones at the request timeout (the trickler too, though it never pauses for a whole timeout)
    and then answers again."""
    port, child = served
    base = thread_count(child.pid)
    trickler = socket.create_connection(("127.0.0.1", port), timeout=10)
    trickler.send(b"G")
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(serve.MAX_CLIENTS - 1)]
    end = time.monotonic() + TIMEOUT / 2
    while thread_count(child.pid) < base + serve.MAX_CLIENTS and time.monotonic() < end:   # all accepted
        time.sleep(0.02)
    status, _, body = exchange(port, b"GET / HTTP/1.0\r\n\r\n")
    assert status == 503 and "busy" in json.loads(body)["error"]
    more = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(8)]
    assert thread_count(child.pid) <= base + serve.MAX_CLIENTS
    start, dropped = time.monotonic(), None
    try:
        for ch in b"ET / HTTP/1.1\r\nX-Slow: " + b"a" * 100:
            time.sleep(0.3)
            trickler.send(bytes([ch]))
    except OSError:
        dropped = time.monotonic() - start
    assert dropped is not None and dropped < 3 * TIMEOUT, dropped
    for s in idle:   # dropped without an answer: they never sent a request
        assert s.recv(100) == b""
    for s in idle + more + [trickler]:
        s.close()
    time.sleep(0.2)
    assert exchange(port, b"GET / HTTP/1.0\r\n\r\n")[0] == 200
    assert thread_count(child.pid) <= base + 1


def test_clients_that_go_away_mid_answer(served):
    port, _ = served
    for _ in range(5):   # the request, then a reset before the page is sent: one console line, no traceback
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        s.close()
    assert exchange(port, b"GET / HTTP/1.0\r\n\r\n")[0] == 200


# ------------------------------------------------------------------------------ binding

def test_only_loopback_unless_named():
    assert serve.is_loopback("127.0.0.1") and serve.is_loopback("localhost") and serve.is_loopback("::1")
    assert not serve.is_loopback("0.0.0.0") and not serve.is_loopback("") and not serve.is_loopback("192.0.2.1")
    assert predict.parse_args(["--serve"]).host == "127.0.0.1"


def ipv6_loopback():
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.parametrize("host, also", [("127.0.0.2", []), ("LOCALHOST", ["localhost", "LOCALHOST:1"]),
                                        ("::1", ["[::1]", "[0:0::1]:1", "localhost"]), ("[::1]", ["[::1]"])])
def test_the_url_it_prints_is_answered(host, also):
    """Bound to loopback by any spelling of --host, the server answers the URL it prints (url(), the
    start line's: a browser sends its host:port as Host), and the names that reach that address (any
    case; IPv6 in brackets, with or without a port); it refuses others with the names it answers."""
    if ":" in host and not ipv6_loopback():
        pytest.skip("no IPv6 loopback here")
    srv = serve.make_server(host, 0, lambda image: {}, {"model": "m", "source": "s", "test_acc": None})
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        address = srv.server_address[:2]
        for name in [serve.url(srv).split("/")[2], *also]:
            assert exchange(address, b"GET / HTTP/1.1\r\nHost: %s\r\n\r\n" % name.encode())[0] == 200, name
        status, _, body = exchange(address, b"GET / HTTP/1.1\r\nHost: evil.example\r\n\r\n")
        shown = {"127.0.0.2": "127.0.0.2", "LOCALHOST": "127.0.0.1 or localhost"}.get(host, "[::1] or localhost")
        assert status == 403 and json.loads(body)["error"].startswith(f"this page answers requests for {shown} only")
    finally:
        srv.shutdown()
        srv.server_close()


def test_start_line_names_what_answers_printably(forked, exports, tmp_path):
    """predict.py --serve --host 127.0.0.2 with an export named with byte 0xff and escape sequences: its
    start line names the model and the file, escaped, and the URL it prints is answered."""
    path = hostile_export(exports[2]["onnx"][0], tmp_path)
    child = forked.start("predict.py", "--serve", "--host", "127.0.0.2", "--port", "0", "--artifact", path, cwd=tmp_path)
    end = time.monotonic() + 60
    while "http://" not in (printed := open(child.out, "rb").read().decode() if os.path.exists(child.out) else ""):
        assert child.alive() and time.monotonic() < end, child.wait(1).stderr
        time.sleep(0.05)
    port = int(printed.split("http://127.0.0.2:")[1].split("/")[0])
    assert printed == f"bn_fc ({tmp_path}/{HOSTILE_SHOWN}.onnx) on http://127.0.0.2:{port}/  (Ctrl-C stops)\n"
    assert exchange(("127.0.0.2", port), b"GET / HTTP/1.1\r\nHost: 127.0.0.2:%d\r\n\r\n" % port)[0] == 200
    child.send_signal(signal.SIGINT)
    assert child.wait(30).returncode == 0
