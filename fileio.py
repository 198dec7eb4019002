"""Files written safely: temp file then rename, the temp-name rule, locks, JSON, stderr redirects.

Nothing here imports torch.
"""
import contextlib
import fcntl
import json
import math
import os
import re
import signal
import sys
import threading

from errors import UserError

TMP = re.compile(r"\.(\d+)\.tmp(\.[\w.]*)?$")  # <target>.<pid>.tmp[<suffix>]


def tmp_path(path, suffix=""):
    """The temp name a write to `path` goes through; `suffix` keeps a format's extension."""
    return f"{path}.{os.getpid()}.tmp{suffix}"


def write_synced(path, write):
    """Call write(f) on `path` opened for writing, then flush and fsync it (no rename: see atomic_write)."""
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def atomic_write(path, write):
    """Call write(f) on a temp file beside `path`, fsync it, then rename it over `path`."""
    tmp = tmp_path(path)
    try:
        write_synced(tmp, write)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_text(text, path):
    atomic_write(path, lambda f: f.write(text.encode()))


def finite(obj):
    """obj with every NaN or infinite float replaced by None, so strict JSON parsers read it."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def json_text(obj):
    return json.dumps(finite(obj), indent=2, allow_nan=False) + "\n"


def save_json(obj, path):
    save_text(json_text(obj), path)


def clean_stale_tmp(folder):
    """Remove temp files a killed process left in `folder` (their pid no longer runs)."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        m = TMP.search(name)
        if m and not pid_alive(int(m.group(1))):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(folder, name))


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_out_file(path, flag):
    """Fail now, not after the long work, if `path` cannot be written as a file."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UserError(f"{flag} {path} is a folder; give a file name")
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise UserError(f"cannot write {flag} {path}: folder {folder} is missing or read-only")


def check_out_dir(folder, flag):
    """Create `folder` if needed and probe that files can be written in it."""
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write-test-{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write to {flag} folder {folder}: {e.strerror}") from None
    clean_stale_tmp(folder)


def check_keeps_inputs(outputs, inputs, flag="--out"):
    """Fail before the work if writing `outputs` (each renamed over its name) would replace one of the
    `inputs`: the same directory entry once symlinks are resolved. A symlink at an output's name is
    replaced, not written through, and a hard link keeps its own name, so neither is refused."""
    for out in outputs:
        entry = os.path.join(os.path.realpath(os.path.dirname(os.path.abspath(out))), os.path.basename(out))
        for src in inputs:
            if os.path.realpath(src) == entry:
                raise UserError(f"{flag} {os.path.dirname(out) or '.'} would replace the input {src} with the "
                                f"{os.path.basename(out)} it writes; choose another {flag} folder or rename the input")


@contextlib.contextmanager
def defer_sigint():
    """Hold Ctrl-C while a set of files is written, so they always form a consistent set."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    old = signal.signal(signal.SIGINT, lambda *a: caught.append(a))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
    if caught:
        raise KeyboardInterrupt


def replace_all(files):
    """Write {path: bytes} as one set: every temp file first (a full disk or a bad input stops
    before anything is replaced), then all renames with Ctrl-C held."""
    tmps = {}
    try:
        for path, blob in files.items():
            tmps[path] = tmp_path(path)
            write_synced(tmps[path], lambda f, b=blob: f.write(b))
        with defer_sigint():
            for path, tmp in tmps.items():
                os.replace(tmp, path)
    finally:
        for tmp in tmps.values():
            if os.path.exists(tmp):
                os.remove(tmp)


def lock(folder, name=".lock", holder="another train.py process", wait=False):
    """Hold an exclusive lock on `folder` (on its file `name`, or with name=None on the folder itself,
    leaving no file behind) until unlock() or this process ends, any exit and kill -9 included (the OS
    releases it). A second process is refused in one line, or with wait=True waits its turn."""
    if name is None:
        fd = os.open(folder, os.O_RDONLY)
    else:
        os.makedirs(folder, exist_ok=True)
        fd = os.open(os.path.join(folder, name), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        pid = (os.read(fd, 32).decode(errors="replace").strip() if name else "") or "?"
        os.close(fd)
        raise UserError(f"{folder} is in use by {holder} (pid {pid})") from None
    if name is not None:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
    return fd


def unlock(fd):
    with contextlib.suppress(OSError):
        os.close(fd)


@contextlib.contextmanager
def stderr_into(path=os.devnull):
    """File descriptor 2 (what libraries and child processes print) goes to `path` for the duration
    (default: nowhere). Our own errors are raised, not printed, so nothing the user needs is lost."""
    sys.stderr.flush()
    saved = os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 2)
    os.close(fd)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def read_json_dict(path):
    """A JSON object from `path`, or UserError (garbage, NaN, not an object)."""
    try:
        with open(path) as f:
            obj = json.load(f, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    except (OSError, UnicodeDecodeError, ValueError):
        raise UserError(f"{path} is not valid JSON") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} holds a JSON {type(obj).__name__}, not an object")
    return obj
