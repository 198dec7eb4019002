"""The drawing page's server (predict.py --serve): GET / (or HEAD /) the page, POST /predict an image
body -> one prediction's JSON; every other request a 4xx and a one-line JSON error.

The standard library's http.server, held to what a local tool needs: at most MAX_CLIENTS connections
at once (one request each, HTTP/1.0), each within its request time; one image decoded and classified
at a time, so memory stays bounded whatever the clients do; bound to loopback, it answers only the
Host names that reach its address (no DNS rebinding). The page is static/predict.html.
"""
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

import digit
import errors
from errors import printable

MAX_BODY = 5 * 1024 * 1024   # bytes a POST /predict may send
MAX_PIXELS = 4096 * 4096   # pixels an uploaded image may decode to (a 12 Mpx phone photo fits)
MAX_CLIENTS = 16   # connections the page's server serves at once; more get 503 at once
REQUEST_SECONDS = 15   # default --request-timeout: a whole request (headers and body) must arrive within it
ENDPOINTS = {"/": "GET", "/predict": "POST"}   # all the page's server answers (HEAD / as GET / without the body)
ALLOW = {"/": "GET, HEAD", "/predict": "POST"}   # a 405's Allow header, by path
PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static", "predict.html")


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


# ------------------------------------------------------------------------ where it listens

def is_loopback(host):
    """Every address `host` names is this machine's loopback ('' and 0.0.0.0, all interfaces, are not)."""
    try:
        return all(ipaddress.ip_address(a[4][0]).is_loopback for a in socket.getaddrinfo(host or None, None))
    except (OSError, ValueError):
        return False


def addresses(name):
    """The IP addresses (short form) `name` resolves to; none when it does not resolve."""
    try:
        return {ipaddress.ip_address(a[4][0].split("%")[0]).compressed for a in socket.getaddrinfo(name, None)}
    except (OSError, ValueError):
        return set()


def bind_family(host):
    """AF_INET when `host` has an IPv4 address (what http.server binds by default: --host localhost stays
    127.0.0.1), AF_INET6 for a name or literal with IPv6 addresses only (::1)."""
    try:
        families = {a[0] for a in socket.getaddrinfo(host or None, None, type=socket.SOCK_STREAM,
                                                     flags=socket.AI_PASSIVE)}
    except OSError:
        return socket.AF_INET   # bind() says why, in one line
    return socket.AF_INET6 if families == {socket.AF_INET6} else socket.AF_INET


def host_names(host, address):
    """The names a Host header may give to a loopback server bound to `address`: the address itself
    (what the server prints), 'localhost' (browsers send it for 127.0.0.1 and ::1) and the --host name
    when they reach that address. Lower case: host names are case-insensitive."""
    names = [address]
    for name in ("localhost", host.lower().rstrip(".")):
        if name not in names and (address in addresses(name) or name == "localhost" and address in ("127.0.0.1", "::1")):
            names.append(name)
    return names


def host_of(header):
    """A Host header's name without its port, lower case, an IP address in its short form; None when
    the header is not host[:port] (an IPv6 address in brackets, with or without a port)."""
    m = re.fullmatch(r"(?:\[([0-9a-f:.]+)\]|([^\[\]:/@\s]+))(?::[0-9]*)?", header.strip().lower())
    if not m:
        return None
    name = m[1] or m[2].rstrip(".")
    try:
        ip = ipaddress.ip_address(name)
    except ValueError:
        return None if m[1] else name
    return ip.compressed if bool(m[1]) == (ip.version == 6) else None


def shown(address):
    """An address as a URL or Host header writes it: IPv6 in brackets."""
    return f"[{address}]" if ":" in address else address


def url(server):
    host, port = server.server_address[:2]
    return f"http://{shown(host)}:{port}/"


# ------------------------------------------------------------------------------ the page

def page_and_headers(info):
    """The page's HTML (bytes) with `info` (model, source, test accuracy) written in, and the headers
    every answer carries: among them a Content-Security-Policy that runs only the page's own script and
    style (by their sha256), nothing fetched from elsewhere."""
    with open(PAGE, encoding="utf-8") as f:
        page = f.read().replace("{{INFO}}", json.dumps(info).replace("<", "\\u003c"))

    def sha(tag):
        code = re.search(f"<{tag}>(.*?)</{tag}>", page, re.S)[1].encode()
        return "'sha256-%s'" % base64.b64encode(hashlib.sha256(code).digest()).decode()
    headers = {"X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer",
               "Cache-Control": "no-store", "Cross-Origin-Resource-Policy": "same-origin",
               "Content-Security-Policy": f"default-src 'none'; script-src {sha('script')}; style-src {sha('style')}; "
                                          "img-src data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
                                          "frame-ancestors 'none'"}
    return page.encode(), headers


class Handler(BaseHTTPRequestHandler):
    """One connection, one request; what it serves and its limits are its server's (Server)."""
    server_version, sys_version = "predict.py", ""

    def setup(self):
        super().setup()
        self.rfile.close()
        self.rfile = io.BufferedReader(Deadline(self.connection, self.server.request_seconds))

    def reply(self, code, body, kind="application/json"):
        body = body if isinstance(body, bytes) else (json.dumps(body) + "\n").encode()
        self.connection.settimeout(self.server.request_seconds)
        if self.request_version == "HTTP/0.9":   # never answered headerless
            self.request_version = "HTTP/1.0"
        self.send_response(code)
        for k, v in dict(self.server.page_headers, **{"Content-Type": kind, "Content-Length": str(len(body))}).items():
            self.send_header(k, v)
        if code == 405:
            self.send_header("Allow", ALLOW.get(getattr(self, "path", "").partition("?")[0], "GET, HEAD, POST"))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def refuse(self, code, message):
        self.close_connection = True   # what is left of the request stays unread
        self.reply(code, {"error": message})

    def send_error(self, code, message=None, explain=None):
        """http.server's own refusals (request line, headers, method, version) as one-line JSON."""
        if code == HTTPStatus.NOT_IMPLEMENTED:
            code, message = 405, (f"{printable(self.command)[:20]} is not a method here: GET / for the page, "
                                  "POST /predict for an image")
        elif code >= 500:   # 505: an HTTP version other than 1.x
            code = 400
        self.refuse(code, message or HTTPStatus(code).phrase)

    def route(self):
        """The (status, message) refusing a request that is not GET / (or HEAD /) or POST /predict, else None."""
        where, names = self.headers.get("Host"), self.server.host_names
        path, query = self.path.partition("?")[::2]
        if self.request_version == "HTTP/0.9":
            return 400, "HTTP/0.9 is not spoken here: use HTTP/1.0 or 1.1"
        if names and where is not None and host_of(where) not in names:
            return 403, f"this page answers requests for {' or '.join(map(shown, names))} only, not {printable(where)[:100]}"
        if path not in ENDPOINTS:
            return 404, f"no such page {printable(self.path)[:100]}: GET / is the page, POST /predict takes an image"
        if query:
            return 400, f"{path} takes no query string"
        if {"HEAD": "GET"}.get(self.command, self.command) != ENDPOINTS[path]:
            return 405, f"{path} answers {ENDPOINTS[path]} only"
        return None

    def do_GET(self):
        if refusal := self.route():
            return self.refuse(*refusal)
        self.reply(200, self.server.page, "text/html; charset=utf-8")

    do_HEAD = do_GET   # the same answer, its body left out (reply)

    def read_body(self):
        """(the request's body, None), or (None, (status, message)) for a body that is chunked, has no
        single whole Content-Length, is over MAX_BODY, or ends or stalls before its length."""
        size = self.headers.get_all("Content-Length", [])
        if self.headers.get("Transfer-Encoding"):
            return None, (411, "chunked (or other Transfer-Encoding) bodies are not read: "
                               "send the image as the body, with a Content-Length")
        if not size:
            return None, (411, "send the image as the body, with a Content-Length")
        if len(set(size)) > 1 or not re.fullmatch(r"[0-9]{1,12}", size[0].strip()):
            return None, (400, f"Content-Length must be one whole number of bytes, not {printable(', '.join(size))[:40]}")
        size = int(size[0])
        if size > MAX_BODY:
            return None, (413, f"the image is over {MAX_BODY // 2 ** 20} MB; send a smaller one")
        try:
            body = self.rfile.read(size)
        except TimeoutError:
            return None, (408, f"the body did not arrive within {self.server.request_seconds:g} s")
        if len(body) < size:
            return None, (400, f"the body ended after {len(body)} of its Content-Length's {size} bytes")
        return body, None

    def do_POST(self):
        refusal, body = self.route(), None
        if not refusal:
            body, refusal = self.read_body()
        if refusal:
            return self.refuse(*refusal)
        try:
            with self.server.lock:   # one image at a time: memory is one decode's, whatever the clients send
                image = digit.to_mnist(digit.open_image(body, MAX_PIXELS))
                r = self.server.answer(image)
        except errors.UserError as e:
            return self.refuse(400, f"request body: {e}")
        r.update(self.server.info, image="data:image/png;base64," + base64.b64encode(digit.to_png(image)).decode())
        self.reply(200, r)

    def log_message(self, fmt, *a):
        sys.stderr.write(printable(f"{self.address_string()} {fmt % a}") + "\n")   # one write: threads' lines never mix


class Server(ThreadingHTTPServer):
    """The page's server: answer(uint8 [28, 28] image) -> the prediction's JSON, info (model, source,
    test accuracy) written into the page and every answer. At most max_clients handler threads; a
    connection beyond them gets 503 at once. host_names: the Host names it answers (None: any, when
    bound beyond loopback)."""
    request_queue_size = 128   # the listen backlog (socketserver's 5 left a burst of clients unanswered for seconds)

    def __init__(self, host, port, answer, info, request_seconds=REQUEST_SECONDS, max_clients=MAX_CLIENTS):
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host   # --host [::1]
        self.address_family = bind_family(host)
        self.answer, self.info, self.request_seconds, self.max_clients = answer, info, request_seconds, max_clients
        self.page, self.page_headers = page_and_headers(info)
        self.slots, self.lock = threading.BoundedSemaphore(max_clients), threading.Lock()
        super().__init__((host, port), Handler)
        address = ipaddress.ip_address(self.server_address[0].split("%")[0]).compressed
        self.host_names = host_names(host, address) if is_loopback(host) else None

    def process_request(self, request, client_address):
        if self.slots.acquire(blocking=False):
            return super().process_request(request, client_address)
        body = json.dumps({"error": f"busy: {self.max_clients} requests in progress; try again"}).encode() + b"\n"
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


def make_server(host, port, answer, info, request_seconds=REQUEST_SECONDS, max_clients=MAX_CLIENTS):
    return Server(host, port, answer, info, request_seconds, max_clients)


def serve(host, port, answer, info, request_seconds=REQUEST_SECONDS):
    """predict.py --serve: bind, say what answers and where (the URL its own Host check accepts), serve
    until Ctrl-C."""
    server = make_server(host, port, answer, info, request_seconds)
    try:
        if server.host_names is None:
            print(f"warning: --host {printable(host)} serves the page to other machines too, with no Host check",
                  file=sys.stderr)
        print(printable(f"{info['model']} ({info['source']}) on {url(server)}") + "  (Ctrl-C stops)", flush=True)
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
