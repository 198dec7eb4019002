import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED_MNIST = os.path.join(ROOT, "..", "shared", "mnist")

# inductor compiles kernels in-process instead of starting a pool of worker processes (each imports
# torch) for the few kernels a test compiles: the same generated code, less CPU on 2 cores
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
# glibc hands every allocation above a threshold back to the kernel when it is freed, so each training
# step's and test pass's activations come back as fresh zero pages: 10-25% of a short run's CPU went to
# page faults (system time). Heap allocations kept for reuse instead: read by glibc when a process
# starts, so it holds for the xdist workers (started after this file loads in the controller), the fork
# servers and every process they start; the same numbers, the same code paths.
os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 32))
os.environ.setdefault("MALLOC_TRIM_THRESHOLD_", str(1 << 32))
if os.environ.get("PYTEST_XDIST_WORKER"):  # set by xdist before this file loads, and before torch is imported
    # two workers share two cores: a thread that waits for work sleeps instead of spinning on a core
    # the other worker needs (what bench.py's two-thread figures and its training otherwise cost twice)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# With pytest-xdist (make test: pytest -n 2; not in pytest.ini, where it would switch pytest-benchmark
# off for make bench-pytest), tests that share something expensive run in one worker, so it is made
# once: the session fixtures below (the exports, gap10k_run, pretrained_log_probs, the fork server),
# each module's module-scoped fixtures, and what an explicit xdist_group mark names; tests that share
# any of these with each other are one group (the kill/resume test, say, joins test_hostile's forked
# runs and gap10k_run's readers). xdist 3.8's loadgroup reads groups from renamed node ids, which
# pytest 9 no longer allows, so the workers write their groups down and the controller's scheduler
# (below) reads them.
SHARED_SESSION_FIXTURES = {"exports": "exports", "aoti_package": "exports", "gap10k_run": "gap10k_run",
                           "pretrained_log_probs": "pretrained_log_probs", "forked": "forked"}  # fixture: key


def pytest_configure(config):
    if hasattr(config, "workerinput"):  # two workers on two cores: one torch thread each
        import torch
        torch.set_num_threads(1)
    elif getattr(config.option, "numprocesses", None):
        import tempfile
        config.test_groups = tempfile.mkdtemp(prefix="pytest-groups-")


def pytest_unconfigure(config):
    if getattr(config, "test_groups", None):
        import shutil
        shutil.rmtree(config.test_groups, ignore_errors=True)


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """A test that sets torch's thread count (bench.py does, export.verify for its batch-1 pass) leaves
    the next test the count it found."""
    import torch
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def shared_keys(item):
    """What expensive things a collected test uses: its xdist_group mark, the shared session fixtures
    it asks for, and its module's module-scoped fixtures, if it asks for any."""
    mark = item.get_closest_marker("xdist_group")
    keys = [str(mark.args[0] if mark.args else mark.kwargs.get("name", "default"))] if mark else []
    used = getattr(item, "fixturenames", ())
    keys += [key for f, key in SHARED_SESSION_FIXTURES.items() if f in used]
    defs = getattr(item, "_fixtureinfo", None)
    if any(d and d[-1].scope == "module" for d in (defs.name2fixturedefs.values() if defs else ())):
        keys.append(item.module.__name__)
    return keys


def xdist_groups(items):
    """{node id: group} for the tests that share something (shared_keys), joined transitively."""
    parent = {}

    def root(k):
        while parent.setdefault(k, k) != k:
            k = parent[k]
        return k
    keyed = [(item.nodeid, shared_keys(item)) for item in items]
    for _, keys in keyed:
        for k in keys[1:]:
            parent[root(k)] = root(keys[0])
    return {nodeid: root(keys[0]) for nodeid, keys in keyed if keys}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    folder = getattr(config, "workerinput", {}).get("test_groups")
    if folder:
        import json
        with open(os.path.join(folder, config.workerinput["workerid"] + ".json"), "w") as f:
            json.dump(xdist_groups(items), f)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    node.workerinput["test_groups"] = node.config.test_groups


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") not in ("load", "loadgroup"):  # -n alone means load
        return None
    import glob
    import json

    from xdist.scheduler import LoadScopeScheduling

    class Grouped(LoadScopeScheduling):
        """Whole groups to one worker (the biggest first), every other test on its own."""
        groups = None

        def _split_scope(self, nodeid):
            if self.groups is None:  # called once every worker has collected (and written its groups)
                self.groups = {}
                for path in glob.glob(os.path.join(config.test_groups, "*.json")):
                    self.groups.update(json.load(open(path)))
            return self.groups.get(nodeid, nodeid)
    return Grouped(config, log)


@pytest.fixture(scope="session")
def mnist_dir():
    """The real MNIST, found as the scripts find it ($MNIST_DIR, ./data, ./data/MNIST/raw), then in
    ../shared/mnist beside the repo; else fetched as train.py does (torchvision). Without any, the
    session stops with one line instead of failing every test that needs data."""
    import data
    if os.environ.get("MNIST_DIR"):
        candidates = [os.environ["MNIST_DIR"]]
    else:
        candidates = [os.path.join(ROOT, "data"), os.path.join(ROOT, "data", "MNIST", "raw"), SHARED_MNIST]
    for folder in candidates:
        if data.has_mnist(folder):
            return os.path.abspath(folder)
    try:
        cwd = os.getcwd()
        os.chdir(ROOT)
        try:
            return os.path.abspath(data.resolve_dir())
        finally:
            os.chdir(cwd)
    except data.DataError as e:
        pytest.exit(f"error: the tests need the real MNIST: {e}", returncode=1)


@pytest.fixture(scope="session")
def forked(mnist_dir, tmp_path_factory):
    """The scripts' command lines as real processes, each forked from one server that imported torch
    and the scripts once (forked_cli.py): forked.run("train.py", *args, cwd=...) gives returncode,
    stdout and stderr; forked.start(...) a running child to signal. MNIST_DIR is set, one thread each."""
    import forked_cli
    env = dict(os.environ, MNIST_DIR=mnist_dir, OMP_NUM_THREADS="1")
    server = forked_cli.ForkServer(ROOT, env, tmp_path_factory.mktemp("cli-io"))
    yield server
    server.close()


@pytest.fixture(scope="session")
def trained(tmp_path_factory, mnist_dir):
    """A real (short) training run: bn_fc, one epoch on 4,096 images. Returns its run folder. With
    xdist the first worker that needs it trains it and the others get a copy (once_per_run)."""
    import train

    def make(folder):
        train.run(train.parse_args(["--model", "bn_fc", "--device", "cpu", "--data-dir", mnist_dir, "--subset",
                                    "4096", "--epochs", "1", "--no-progress", "--out", str(folder / "bn_fc")]))
    return once_per_run(tmp_path_factory, "trained", make) / "bn_fc"


def once_per_run(tmp_path_factory, name, make):
    """A fresh folder that make(folder) fills. Under xdist it is made once for the whole run, by the
    first worker that asks (the others wait for it under a file lock), and each worker gets its own
    copy to use as it likes; without xdist, simply made."""
    mine = tmp_path_factory.mktemp(name)
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        make(mine)
        return mine
    import shutil

    from filelock import FileLock  # a dependency of torch's
    root = tmp_path_factory.getbasetemp().parent  # shared by the workers of this run
    made, done = root / f"{name}.made", root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(made, ignore_errors=True)
            made.mkdir()
            make(made)
            done.touch()
    shutil.copytree(made, mine, dirs_exist_ok=True)
    return mine


GAP10K_RUN = ["--model", "gap10k", "--device", "cpu", "--subset", "512", "--epochs", "2", "--no-progress"]


@pytest.fixture(scope="session")
def gap10k_run(tmp_path_factory, mnist_dir):
    """A real short gap10k run on the CPU (GAP10K_RUN: two epochs on 512 images, seed 1) with one torch
    thread, as the `forked` runs have. Returns (summary, run folder). test_train reads its files;
    test_devices (on the CPU, one thread) and test_reliability (a killed and resumed train.py) check
    that a stopped and resumed run ends where this uninterrupted one does."""
    import torch

    import train
    out = tmp_path_factory.mktemp("gap10k") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = train.run(train.parse_args([*GAP10K_RUN, "--data-dir", mnist_dir, "--out", str(out)]))
    finally:
        torch.set_num_threads(threads)
    return summary, out


@pytest.fixture(scope="session")
def pretrained_log_probs(mnist_dir):
    """name -> models.log_probs of the committed pretrained/<name>.pt on the 10,000 test images, each
    computed once: test_pretrained scores them, test_compare checks compare.py against them."""
    import data
    import models
    import runfiles
    images, cache = data.load("test", mnist_dir)[0], {}

    def get(name):
        if name not in cache:
            ckpt = runfiles.load_checkpoint(os.path.join(ROOT, "pretrained", name + ".pt"))
            cache[name] = models.log_probs(models.from_checkpoint(ckpt), images)
        return cache[name]
    return get


@pytest.fixture(scope="session")
def exports(trained, mnist_dir, tmp_path_factory):
    """Every format export.py writes but two, of the `trained` checkpoint, each verified on the whole
    test set as export.py --format all does it (one export.source: the model, the test set and
    PyTorch's log-probabilities on it, for every format); done once per session. int8 has its own
    tests (test_int8.py), and the AOTInductor package its own fixture (aoti_package), for the slow
    tests only. Returns (folder, checkpoint, {format: (path, figures)}); tests copy files out, never
    change them."""
    import artifacts
    import export
    import runfiles
    out = tmp_path_factory.mktemp("exports")
    ckpt = runfiles.load_checkpoint(str(trained / "best.pt"))
    src = export.source(ckpt, mnist_dir)
    fp32 = [fmt for fmt in artifacts.FORMATS if fmt not in ("onnx-int8", "aoti")]
    figures = {fmt: export.export_verified(src, fmt, str(out), 18, 1e-4) for fmt in fp32}
    return out, ckpt, figures


@pytest.fixture(scope="session")
def aoti_package(trained, mnist_dir, tmp_path_factory):
    """The `trained` checkpoint as an AOTInductor package through export.export (compiled for this CPU,
    verified on the whole test set at batch 1000 and 1), in a folder of its own with its manifest.
    Returns (path, checkpoint, figures). Its C++ compile is the most expensive single step of the
    suite (about 20 s of CPU), so only tests marked slow use it: pytest -m slow (.ci/run runs them
    after make test's suite)."""
    import export
    import runfiles
    out = tmp_path_factory.mktemp("aoti")
    ckpt = runfiles.load_checkpoint(str(trained / "best.pt"))
    path, figures = export.export(ckpt, "aoti", str(out), 18, mnist_dir, 1e-4)
    return path, ckpt, figures
