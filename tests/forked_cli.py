"""The scripts' command lines as real processes, without a Python start-up (torch's import) each.

One server process imports torch and the scripts once; every run is a fork of it that executes the
script as `python SCRIPT ARGS` would (runpy as __main__, its own working folder, environment, exit
code, stdout and stderr; SIGINT as a fresh interpreter sets it), so a test sees what a user's shell
sees, at a fraction of a second per run instead of seconds. A started run is a real child process:
it can be killed (SIGKILL, SIGINT) part-way.

    server = ForkServer(root, env, io_dir)          # conftest.py's session fixture `forked`
    r = server.run("train.py", "--epochs", "0", cwd=tmp_path)        # r.returncode, r.stdout, r.stderr
    child = server.start("train.py", ..., cwd=tmp_path); child.pid; child.alive(); child.wait()

What the fork shares with the server is only what importing the scripts made: the server never runs
a model (no thread pool exists to be forked), and it checks that the imports print nothing, which a
fresh `python SCRIPT` would print before every one of its lines.
"""
import json
import os
import select
import signal
import subprocess
import sys
from dataclasses import dataclass

SERVER = r'''
import atexit, json, os, resource, runpy, signal, sys, traceback, warnings
root = sys.argv[1]
sys.path.insert(0, root)
proto = os.fdopen(os.dup(1), "w", buffering=1)
devnull = os.open(os.devnull, os.O_RDWR)
os.dup2(devnull, 1)
imported = []
for name in sys.argv[2:]:       # imported once here; a module that fails to import fails in the child, as it would
    try:
        __import__(name)
        imported.append(name)
    except BaseException:
        pass
sys.stdout.flush()
sys.stderr.flush()
proto.write(json.dumps({"imported": imported}) + "\n")


def child(c):
    os.dup2(devnull, 0)
    os.dup2(os.open(c["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 1)
    os.dup2(os.open(c["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
    os.chdir(c["cwd"])
    os.environ.update(c["env"])
    if c["address_space"]:  # RLIMIT_AS in bytes, as a shell's ulimit -v before the command
        resource.setrlimit(resource.RLIMIT_AS, (c["address_space"], c["address_space"]))
    signal.signal(signal.SIGINT, signal.default_int_handler)   # what a fresh interpreter installs
    if c["ignore_warnings"]:
        warnings.simplefilter("ignore")                         # PYTHONWARNINGS=ignore
    sys.argv = [c["script"], *c["args"]]
    code = 0
    try:
        runpy.run_path(os.path.join(root, c["script"]), run_name="__main__")
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        traceback.print_exc()
        code = -signal.SIGINT
    except BaseException:
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    if code == -signal.SIGINT:  # an uncaught KeyboardInterrupt: Python dies of the SIGINT itself
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(code & 0xFF)


for line in sys.stdin:
    req = json.loads(line)
    if req["op"] == "start":
        pid = os.fork()
        if pid == 0:
            try:
                proto.close()
                child(req)
            finally:
                os._exit(70)
        proto.write(json.dumps({"pid": pid}) + "\n")
    elif req["op"] == "wait":
        _, status, usage = os.wait4(req["pid"], 0)
        proto.write(json.dumps({"code": os.waitstatus_to_exitcode(status),
                                "cpu": usage.ru_utime + usage.ru_stime}) + "\n")
'''

# what the server imports before it forks: the scripts and the modules they import when they run
# (torch._inductor.config: torch.use_deterministic_algorithms, in every train.py run; scipy.stats: the
# 95% intervals every epoch and report prints; sklearn.metrics: evaluate.py's report)
MODULES = ["torch", "torch._inductor.config", "numpy", "scipy.stats", "onnx", "onnxruntime", "sklearn.metrics", "errors", "fileio", "machine", "runfiles", "stats",
           "data", "digit", "models", "loop", "artifacts", "train", "evaluate", "export", "bench", "predict", "compare"]


def alive(pid):
    """Process `pid` is running (not yet exited: a finished child stays a zombie until wait())."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


class Child:
    def __init__(self, server, pid, out, err):
        self.server, self.pid, self.out, self.err = server, pid, out, err
        self.returncode = self.cpu_seconds = None

    def alive(self):
        return alive(self.pid)

    def send_signal(self, sig):
        os.kill(self.pid, sig)

    def wait(self, timeout=300):
        """Exit code, stdout, stderr; a child still running after `timeout` seconds is killed first."""
        if self.returncode is None:
            self.returncode = self.server._wait(self, timeout)
        read = lambda p: open(p, encoding="utf-8", errors="replace").read()  # noqa: E731
        return Result(self.returncode, read(self.out), read(self.err))


class ForkServer:
    def __init__(self, root, env, io_dir):
        self.root, self.io_dir, self.n = root, str(io_dir), 0
        err = os.path.join(self.io_dir, "server.err")
        with open(err, "w") as f:
            self.proc = subprocess.Popen([sys.executable, "-c", SERVER, root, *MODULES], env=env, text=True,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=f)
        hello = self._reply(300)
        printed = open(err).read()
        # a fresh `python SCRIPT` prints this before anything of its own: every one-line check would fail
        assert printed == "", f"importing {', '.join(hello['imported'])} printed to stderr:\n{printed[-3000:]}"

    def _reply(self, timeout):
        if not select.select([self.proc.stdout], [], [], timeout)[0]:
            raise TimeoutError(f"the fork server did not answer in {timeout} s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the fork server died: " + open(os.path.join(self.io_dir, "server.err")).read()[-3000:])
        return json.loads(line)

    def _send(self, **req):
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()

    def start(self, script, *args, cwd, env=None, ignore_warnings=False, address_space=None):
        """`python SCRIPT ARGS` in `cwd` (env: variables to set on top of the server's; address_space: a
        RLIMIT_AS in bytes), started."""
        self.n += 1
        out, err = (os.path.join(self.io_dir, f"{self.n}.{s}") for s in ("out", "err"))
        self._send(op="start", script=script, args=[str(a) for a in args], cwd=str(cwd), env=env or {},
                   ignore_warnings=ignore_warnings, address_space=address_space, stdout=out, stderr=err)
        return Child(self, self._reply(60)["pid"], out, err)

    def run(self, script, *args, cwd, env=None, ignore_warnings=False, address_space=None, timeout=300):
        return self.start(script, *args, cwd=cwd, env=env, ignore_warnings=ignore_warnings,
                          address_space=address_space).wait(timeout)

    def _wait(self, child, timeout):
        self._send(op="wait", pid=child.pid)
        try:
            reply = self._reply(timeout)
            child.cpu_seconds = reply["cpu"]  # what the run cost (its own children included)
            return reply["code"]
        except TimeoutError:
            os.kill(child.pid, signal.SIGKILL)
            self._reply(60)
            raise TimeoutError(f"{child.pid} still ran after {timeout} s; killed") from None

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
