import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED_MNIST = os.path.join(ROOT, "..", "shared", "mnist")


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
    """A real (short) training run: bn_fc, one epoch on 4,096 images. Returns its run folder."""
    import train
    out = tmp_path_factory.mktemp("trained") / "bn_fc"
    train.run(train.parse_args(["--model", "bn_fc", "--device", "cpu", "--data-dir", mnist_dir, "--subset", "4096",
                                "--epochs", "1", "--no-progress", "--out", str(out)]))
    return out


@pytest.fixture(scope="session")
def gap10k_run(tmp_path_factory, mnist_dir):
    """A real short gap10k run on the CPU: two epochs on 512 images, seed 1. Returns (summary, run
    folder). test_train reads its files, test_devices (on the CPU) checks a stopped and resumed run
    against it: the same arguments both tests trained with on their own before."""
    import train
    out = tmp_path_factory.mktemp("gap10k") / "run"
    summary = train.run(train.parse_args(["--model", "gap10k", "--device", "cpu", "--data-dir", mnist_dir, "--subset",
                                          "512", "--epochs", "2", "--no-progress", "--out", str(out)]))
    return summary, out


@pytest.fixture(scope="session")
def exports(trained, mnist_dir, tmp_path_factory):
    """Every format export.py writes, of the `trained` checkpoint, each verified by export.export on
    the whole test set; done once per session (the AOTInductor compile takes about a minute on 2 cores).
    Returns (folder, checkpoint, {format: (path, figures)}); tests copy files out, never change them."""
    import artifacts
    import common
    import export
    out = tmp_path_factory.mktemp("exports")
    ckpt = common.load_checkpoint(str(trained / "best.pt"))
    fp32 = [fmt for fmt in artifacts.FORMATS if fmt != "onnx-int8"]  # int8 has its own tests (test_int8.py)
    figures = {fmt: export.export(ckpt, fmt, str(out), 18, mnist_dir, 1e-4) for fmt in fp32}
    return out, ckpt, figures
