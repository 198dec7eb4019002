"""What every script shares: one-line errors, safe files, checkpoints, run folders, devices, metadata.

Nothing here imports another module of this project, so data.py and models.py can use it too.
"""
import contextlib
import csv
import fcntl
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import zipfile

# cuBLAS needs this before CUDA starts to be deterministic (harmless elsewhere)
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
import torch  # noqa: E402

MAX_CHECKPOINT_BYTES = 64 << 20  # ours are 0.1-0.4 MB; anything near this is not one of ours
METRICS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc", "lr", "seconds",
           "images_per_s", "load_1m"]  # metrics.csv; val_* are empty without --val; load_1m: the machine's
# 1-minute load average as the epoch's scoring ends (seconds taken under load say so)


# ------------------------------------------------------------------------------ errors

class UserError(Exception):
    """Bad input, or a state the user must fix. The message is the one line they see."""


class Diverged(UserError):
    pass


def first_line(e):
    """An exception's message cut to its first line (libraries raise pages), else its type's name."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def error_line(e):
    """The one line a user sees for an error."""
    if isinstance(e, OSError) and not isinstance(e, UserError):
        return f"error: {e.strerror or e}" + (f": {e.filename}" if e.filename else "")
    return f"error: {first_line(e)}"


@contextlib.contextmanager
def one_line_errors(interrupted="interrupted"):
    """Every script's main runs inside this: a UserError or OSError becomes one 'error: ...' line and
    exit 1; Ctrl-C becomes one line and exit 130. Anything else is a bug and keeps its traceback."""
    try:
        yield
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        sys.exit(130)
    except (UserError, OSError) as e:
        sys.exit(error_line(e))


def check_at_least(args, minimum, *flags):
    """One-line error for an integer option (None: not given) below `minimum`."""
    for flag in flags:
        v = getattr(args, flag)
        if v is not None and v < minimum:
            raise UserError(f"--{flag.replace('_', '-')} must be at least {minimum}, got {v}")


FLOAT32_MAX = 3.4028234663852886e38


def check_positive(args, *flags):
    for flag in flags:
        v = getattr(args, flag)
        if v is not None and not (v > 0 and math.isfinite(v)):
            raise UserError(f"--{flag.replace('_', '-')} must be a positive number, got {v}")
        if v is not None and v > FLOAT32_MAX:  # torch keeps it in float32 tensors: 1e300 would not fit
            raise UserError(f"--{flag.replace('_', '-')} must be at most {FLOAT32_MAX:.4g} (float32's largest), got {v}")


# ------------------------------------------------------------------------------- files

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


def save_checkpoint(obj, path):
    atomic_write(path, lambda f: torch.save(obj, f))


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


# ------------------------------------------------------------------------- run folders

def lock_run(folder):
    """Hold an exclusive lock on a run folder for the life of this process (released on any exit,
    kill -9 included, by the OS); a second process writing the same folder is refused."""
    fd = os.open(os.path.join(folder, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError(f"run folder {folder} is in use by another train.py process") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def unlock_run(fd):
    with contextlib.suppress(OSError):
        os.close(fd)


def remove_run(folder):
    shutil.rmtree(folder, ignore_errors=True)


def read_metrics(run_dir, columns=None):
    """The rows of a run folder's metrics.csv as dicts of strings ([] where there is none).
    Raises UserError when it is not the CSV train.py writes (header, numbers)."""
    path = os.path.join(run_dir, "metrics.csv")
    if not os.path.isfile(path):
        return []
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        for r in rows:
            for k in columns or ("epoch", "test_acc"):
                float(r[k])
    except (OSError, UnicodeDecodeError, csv.Error, KeyError, TypeError, ValueError):
        raise UserError(f"{path} is not a metrics.csv written by train.py") from None
    return rows


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


# -------------------------------------------------------------------------- statistics

def ci95(correct, n):
    """The 95% Wilson score interval of an accuracy of `correct` out of `n`, as [low, high] in percent
    rounded to 2 decimals (scipy.stats.binomtest(...).proportion_ci(method="wilson"))."""
    from scipy.stats import binomtest
    ci = binomtest(int(correct), int(n)).proportion_ci(0.95, method="wilson")
    return [round(100 * float(ci.low), 2), round(100 * float(ci.high), 2)]


def ci_text(ci):
    return f"95% CI {ci[0]:.2f}-{ci[1]:.2f}"


def mean_ci95(values):
    """The 95% Student t interval of the mean of `values` (say, one accuracy per seed: n - 1 degrees
    of freedom) as [low, high] rounded to 2 decimals; None for fewer than two values."""
    if len(values) < 2:
        return None
    from scipy import stats
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    if sd == 0:
        return [round(mean, 2), round(mean, 2)]
    low, high = stats.t.interval(0.95, n - 1, loc=mean, scale=sd / math.sqrt(n))
    return [round(float(low), 2), round(float(high), 2)]


def paired(a_right, b_right):
    """Two models' right/wrong on the same images (bool tensors or arrays): the 2x2 table and the
    exact McNemar test, i.e. the two-sided binomial test (p = 1/2) on the discordant pairs."""
    from scipy.stats import binomtest
    a_right, b_right = [bool(v) for v in a_right], [bool(v) for v in b_right]
    table = dict(both_right=sum(a and b for a, b in zip(a_right, b_right)),
                 only_a_wrong=sum(b and not a for a, b in zip(a_right, b_right)),
                 only_b_wrong=sum(a and not b for a, b in zip(a_right, b_right)),
                 both_wrong=sum(not a and not b for a, b in zip(a_right, b_right)))
    discordant = table["only_a_wrong"] + table["only_b_wrong"]
    p = binomtest(table["only_a_wrong"], discordant).pvalue if discordant else 1.0
    return dict(table, mcnemar_p=float(p))


def verdict(t, a="A", b="B", level=0.05):
    """One line on a paired() result: which is better at `level`, or no significant difference."""
    if t["mcnemar_p"] < level:
        better, worse = (b, a) if t["only_a_wrong"] > t["only_b_wrong"] else (a, b)
        return f"{better} is better than {worse} at the {level:.0%} level (exact McNemar p = {t['mcnemar_p']:.3g})"
    return f"no significant difference at the {level:.0%} level (exact McNemar p = {t['mcnemar_p']:.3g})"


# ------------------------------------------------------------------------- checkpoints

def is_number(v):
    """A real, finite int or float (not a bool): what a figure read from a file must be."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_zip(path):
    """A torch checkpoint is a zip of stored (uncompressed) entries: refuse anything that could
    inflate beyond its size on disk, and anything too large to be one of ours."""
    size = os.path.getsize(path)
    if size > MAX_CHECKPOINT_BYTES:
        raise UserError(f"refusing {path}: {size:,} bytes, larger than any checkpoint train.py writes "
                        f"(limit {MAX_CHECKPOINT_BYTES:,})")
    try:
        with zipfile.ZipFile(path) as z:
            entries = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        raise UserError(f"cannot read checkpoint {path}: not a torch zip file (truncated or not a torch file)") from None
    if any(e.compress_type != zipfile.ZIP_STORED for e in entries) or \
            sum(e.file_size for e in entries) > size:
        raise UserError(f"refusing {path}: it holds compressed entries (a torch checkpoint never does; "
                        "it could inflate without bound)")


def load_checkpoint(path, model_name=None, training_state=False):
    """Read and validate a checkpoint written by train.py. torch.load with weights_only=True, so
    no code runs; every field is checked here, once, so callers can trust what they get.
    training_state: also require what --resume needs (optimizer, scheduler, RNG, history, args)."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist")
    _check_zip(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if "Weights only load failed" in str(e) or "Unsupported global" in str(e):
            raise UserError(f"refusing {path}: it holds more than tensors and plain values, and loading it "
                            f"could run code (only checkpoints written by train.py are read)") from None
        raise UserError(f"cannot read checkpoint {path}: {first_line(e)} (truncated or not a torch file)") from None
    bad = f"{path} is not a checkpoint written by train.py"
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model_name"), str) or \
            not isinstance(ckpt.get("model"), dict) or not ckpt["model"]:
        raise UserError(bad + " (it needs model_name and model weights)")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in ckpt["model"].items()):
        raise UserError(bad + " (its model is not a dict of tensors)")
    if not (isinstance(ckpt.get("epoch"), int) and not isinstance(ckpt["epoch"], bool) and ckpt["epoch"] >= 0):
        raise UserError(bad + " (epoch missing or not a whole number)")
    if not (is_number(ckpt.get("test_acc")) and 0 <= ckpt["test_acc"] <= 100):
        raise UserError(bad + " (test_acc missing or not a percentage)")
    for k, v in ckpt["model"].items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise UserError(f"{path} holds NaN or infinite weights ({k}): the run that wrote it diverged")
    if model_name and ckpt["model_name"] != model_name:
        raise UserError(f"{path} holds a {ckpt['model_name']} model, not {model_name}")
    if training_state:
        rng = ckpt.get("rng")
        ok = isinstance(ckpt.get("optimizer"), dict) and isinstance(ckpt.get("args"), dict) and \
            isinstance(ckpt.get("history"), list) and all(isinstance(h, dict) for h in ckpt["history"]) and \
            is_number(ckpt.get("best_acc")) and isinstance(ckpt.get("best_epoch"), int) and \
            (ckpt.get("scheduler") is None or isinstance(ckpt["scheduler"], dict)) and \
            isinstance(rng, dict) and isinstance(rng.get("torch"), torch.Tensor) and \
            isinstance(rng.get("data"), torch.Tensor)
        if not ok:
            raise UserError(f"{path} has no training state to resume from (is it a copy of best.pt?)")
    return ckpt


def make_checkpoint(model_name, weights, epoch, test_acc, params, **more):
    """The checkpoint format load_checkpoint reads, made in this one place for train.py (best.pt; last.pt
    is it plus the training state), reproduce.py (pretrained/) and bench.py: the recipe name, its
    weights (a state dict, as CPU tensors), the epoch and test accuracy (%) they were taken at, the
    parameter count, then any `more` fields (best.pt's val_acc)."""
    return dict(model_name=model_name, model={k: v.cpu() for k, v in weights.items()}, epoch=epoch,
                test_acc=test_acc, params=params, **more)


def find_checkpoint(model_name, checkpoint=None):
    """--checkpoint, else runs/<model>/latest/best.pt, else pretrained/<model>.pt."""
    if checkpoint:
        return checkpoint
    for path in (os.path.join("runs", model_name, "latest", "best.pt"), os.path.join("pretrained", model_name + ".pt")):
        if os.path.isfile(path):
            return path
    raise UserError(f"no checkpoint for {model_name}: train one with 'python train.py --model {model_name}' "
                    "or pass --checkpoint PATH")


# ----------------------------------------------------------------------------- devices

def devices_present():
    """The device types this machine has: cpu, then cuda and mps where present."""
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) + \
        (["mps"] if torch.backends.mps.is_available() else [])


def get_device(name="auto"):
    present = devices_present()
    if name == "auto":  # CUDA, then MPS, then CPU
        return torch.device(next(d for d in ("cuda", "mps", "cpu") if d in present))
    if name not in ("cpu", "cuda", "mps"):
        raise UserError(f"unknown device '{name}'; choose auto, cpu, cuda or mps")
    if name not in present:
        raise UserError(f"device '{name}' is not present on this machine; use --device cpu or auto")
    return torch.device(name)


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple MPS"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def provenance(device, threads):
    """Where and how a figure was measured (summary.json's and bench JSON's shared fields): the device's
    name, the machine's cores, torch's CPU threads, the versions, the commit, the date, the command."""
    import datetime
    import importlib.metadata
    return dict(device_name=device_name(device), cores=os.cpu_count(), threads=threads,
                python=platform.python_version(), torch=torch.__version__,
                torchvision=importlib.metadata.version("torchvision"), git_commit=git_commit(),
                date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                command=" ".join(["python", os.path.basename(sys.argv[0])] + sys.argv[1:]))


def git_commit():
    """The commit this code runs from, with '-dirty' when the tree has uncommitted changes."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7", "--exclude=*"],
                              capture_output=True, text=True, cwd=here, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
