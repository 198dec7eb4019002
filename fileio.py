"""Files written safely: temp file then rename (one temp-name rule for every writer), what an output
may replace, locks, JSON, stderr redirects.

Nothing here imports torch.
"""
import contextlib
import fcntl
import hashlib
import io
import json
import math
import os
import re
import signal
import stat
import sys
import threading

from errors import UserError

TMP_MARK = ".mnist-recipes.tmp"  # in every temp name this project writes, and in no name a user plausibly gives
NAME_MAX = 255  # bytes in one file name (Linux and macOS file systems)
PID_MAX = 1 << 22  # Linux's PID_MAX_LIMIT: no process has a larger pid
STALE = re.compile(r"\.(?P<stem>.+)\.(?P<pid>[1-9]\d{0,6})" + re.escape(TMP_MARK) + r"(?:\.[\w.]+)?")
_stale_seen = {}  # folder -> [(stem, name)] of dead processes' temp files, listed once per process


def tmp_path(path, suffix="", pid=None):
    """The temp name a write to `path` goes through, beside it: hidden, `path`'s name, the writer's pid
    and TMP_MARK, then `suffix` (a format's extension, which loaders go by). A name too long to carry
    all that is stood in for by its sha256's first 16 hex digits (tmp_stem), so every name that fits
    NAME_MAX can be written."""
    folder, base = os.path.split(path)
    return os.path.join(folder, f".{tmp_stem(base, suffix)}.{os.getpid() if pid is None else pid}{TMP_MARK}{suffix}")


def tmp_stem(base, suffix=""):
    """The part of tmp_path's name that says whose temp file it is: `base`, or its hash if too long."""
    if len(os.fsencode(f".{base}.{PID_MAX}{TMP_MARK}{suffix}")) <= NAME_MAX:
        return base
    return hashlib.sha256(os.fsencode(base)).hexdigest()[:16]


def remove_stale_tmp(path):
    """Remove the temp files of `path` (tmp_path's names for it, any suffix) that a killed process left:
    only those, only of a pid that no longer runs, only plain files or links. The folder is listed once
    per process, so a writer of thousands of files in one folder lists it once."""
    folder = os.path.dirname(os.path.abspath(path))
    if folder not in _stale_seen:
        try:
            names = os.listdir(folder)
        except OSError:
            names = []
        found = [(m["stem"], n, int(m["pid"])) for n in names if (m := STALE.fullmatch(n))]
        _stale_seen[folder] = [(stem, n) for stem, n, pid in found if pid <= PID_MAX and not pid_alive(pid)]
    base = os.path.basename(path)
    stems = {base, tmp_stem(base)}
    mine = [n for stem, n in _stale_seen[folder] if stem in stems]
    _stale_seen[folder] = [(s, n) for s, n in _stale_seen[folder] if n not in mine]
    for name in mine:
        full = os.path.join(folder, name)
        with contextlib.suppress(OSError):
            if stat.S_ISREG(os.lstat(full).st_mode) or os.path.islink(full):
                os.remove(full)


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


# ------------------------------------------------------------------------ what an output may replace

KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
         (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def read_open_file(fd, limit):
    """(at most limit + 1 bytes of the open file `fd`, its mode), or (None, mode) where it is not a
    regular file (a FIFO or a device is never read, so never waited on). Closes fd. A caller refuses
    more than `limit` bytes in its own words."""
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            return None, mode
        with open(fd, "rb", closefd=False) as f:
            return f.read(limit + 1), mode
    finally:
        os.close(fd)


def kind_of(mode):
    return next((what for test, what in KINDS if test(mode)), "not a regular file")


def check_target(path, flag=None):
    """Refuse, in one line, to write `path` (a temp file renamed over it) where what stands at that name
    is not ours to replace: a folder, a FIFO, a device or a socket (renaming over one would replace the
    node itself, as root /dev/null), a symbolic link to one of those (/dev/stdout), a read-only file (kept
    as its owner made it), or a name longer than NAME_MAX. A symbolic link to a regular file, or to
    nothing, is replaced by the new file, never written through. `flag` names the option in the message."""
    label = f"{flag} {path}" if flag else str(path)
    size = len(os.fsencode(os.path.basename(path)))
    if size > NAME_MAX:
        raise UserError(f"{label}: file name too long ({size} bytes; the limit is {NAME_MAX})")
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return
    if stat.S_ISLNK(st.st_mode):
        to = link_end(path)
        if to:
            raise UserError(f"{label} is a symbolic link to {to}: refusing to replace it; give another name")
        return
    if stat.S_ISDIR(st.st_mode):
        raise UserError(f"{label} is a folder, not a file; give another name, or move the folder away")
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"{label} is {kind_of(st.st_mode)}, not a regular file: refusing to replace it; "
                        "give another name")
    if not st.st_mode & 0o222 or not os.access(path, os.W_OK):
        raise UserError(f"{label} is read-only: refusing to replace it (make it writable, or remove it)")


SPECIAL = ("/dev", "/proc", "/sys")  # folders of devices and of processes' open files (/dev/stdout -> /proc/self/fd/1)


def link_end(path):
    """What the chain of symbolic links at `path` ends in when that is not a regular file or nothing: a
    description (a device, a folder, a file of /dev or /proc such as /dev/stdout), else None."""
    for _ in range(40):
        target = os.path.join(os.path.realpath(os.path.dirname(os.path.abspath(path))), os.readlink(path))
        where = os.path.realpath(os.path.dirname(target))
        special = next((s for s in SPECIAL if where == s or where.startswith(s + "/")), None)
        if special:
            return f"{target} (in {special})"
        try:
            mode = os.lstat(target).st_mode
        except OSError:
            return None  # dangling: replaced
        if not stat.S_ISLNK(mode):
            return None if stat.S_ISREG(mode) else kind_of(mode)
        path = target
    return "a loop of links"


def check_out_file(path, flag):
    """Fail now, not after the long work, if `path` cannot be written as a file (check_target's rules)."""
    folder = os.path.dirname(os.path.abspath(path))
    check_target(path, flag)
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


def check_keeps_inputs(outputs, inputs, flag="--out"):
    """Fail before the work if one of `outputs` cannot be written (check_target: a folder, a device, a
    read-only file or too long a name at its name), or if writing it (renamed over its name) would
    replace one of the `inputs`: the same directory entry once symlinks are resolved. A symlink at an
    output's name is replaced, not written through, and a hard link keeps its own name, so neither is
    refused."""
    for out in outputs:
        check_target(out, flag)
        entry = os.path.join(os.path.realpath(os.path.dirname(os.path.abspath(out))), os.path.basename(out))
        for src in inputs:
            if os.path.realpath(src) == entry:
                raise UserError(f"{flag} {os.path.dirname(out) or '.'} would replace the input {src} with the "
                                f"{os.path.basename(out)} it writes; choose another {flag} folder or rename the input")


# ------------------------------------------------------------------------------------ writing

class _Recorded(io.FileIO):
    """A file whose write errors are remembered: torch's writers turn an OSError (a full disk) from
    write() into a RuntimeError that names neither the error nor the file."""
    error = None

    def write(self, b):
        try:
            return super().write(b)
        except OSError as e:
            self.error = e
            raise


def write_synced(path, write):
    """Call write(f) on a new file `path` (never an existing one, nor through a link), then flush and
    fsync it (no rename: see staged). A failed write (a full disk) is an OSError naming `path`."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)  # a temp name of this pid's earlier life; O_EXCL below then never follows a link
    raw = _Recorded(path, "x")
    try:
        with io.BufferedWriter(raw) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except Exception as e:
        err = raw.error or (e if isinstance(e, OSError) and e.filename is None else None)
        if err is None:
            raise
        raise OSError(err.errno, err.strerror, path) from None


@contextlib.contextmanager
def staged(path, suffix=""):
    """Yield the temp name to write `path` through (staged_tmp); when the block ends without an error,
    rename it over `path` (finish), else remove it. An error writing the temp file names `path`, the
    file the user asked for."""
    with staged_tmp(path, suffix) as tmp:
        try:
            yield tmp
        except OSError as e:
            if e.filename != tmp:
                raise
            raise OSError(e.errno, e.strerror, path) from None
        finish(tmp, path)


@contextlib.contextmanager
def staged_tmp(path, suffix=""):
    """The temp name for `path` (tmp_path), removed when the block ends if it is still there. check_target
    refuses first what may not be replaced, and the stale temps of `path` are removed."""
    check_target(path)
    remove_stale_tmp(path)
    tmp = tmp_path(path, suffix)
    try:
        yield tmp
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def finish(tmp, path):
    """Rename the written `tmp` over `path`, with the mode of the file it replaces (check_target again:
    what stands at `path` may have changed during the work)."""
    check_target(path)
    with contextlib.suppress(FileNotFoundError):
        os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))  # only regular files and links to one get here
    os.replace(tmp, path)


def atomic_write(path, write):
    """Call write(f) on a temp file beside `path`, fsync it, then rename it over `path` (see staged)."""
    with staged(path) as tmp:
        write_synced(tmp, write)


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
    with contextlib.ExitStack() as stack:
        tmps = {path: stack.enter_context(staged_tmp(path)) for path in files}
        for path, tmp in tmps.items():
            try:
                write_synced(tmp, lambda f, b=files[path]: f.write(b))
            except OSError as e:
                raise OSError(e.errno, e.strerror, path) from None
        with defer_sigint():
            for path, tmp in tmps.items():
                finish(tmp, path)


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
