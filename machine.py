"""The machine: which devices it has, their names, the commit the code runs from, and the
provenance record every measured figure carries."""
import os
import platform
import subprocess
import sys

# cuBLAS needs this before CUDA starts to be deterministic (harmless elsewhere)
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
import torch  # noqa: E402

from errors import UserError, printable  # noqa: E402


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
    """The commit this code runs from, with '-dirty' when the tree has uncommitted changes; or
    $MNIST_RECIPES_COMMIT where the sender of a copy set it (a device machine's copy carries no .git,
    or a stale one)."""
    given = printable(os.environ.get("MNIST_RECIPES_COMMIT", ""))[:40]
    if given:
        return given
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        found = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7", "--exclude=*"],
                               capture_output=True, text=True, cwd=here, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        found = ""
    return found or None
