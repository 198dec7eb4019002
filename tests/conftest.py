import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED_MNIST = os.path.join(ROOT, "..", "shared", "mnist")


@pytest.fixture(scope="session")
def mnist_dir():
    """The real MNIST: $MNIST_DIR, else ../shared/mnist beside the repo."""
    folder = os.environ.get("MNIST_DIR") or SHARED_MNIST
    import data
    if not data.has_mnist(folder):
        pytest.fail(f"real MNIST not found in {folder}: set MNIST_DIR to the folder of the four IDX files")
    return os.path.abspath(folder)


@pytest.fixture(scope="session")
def trained(tmp_path_factory, mnist_dir):
    """A real (short) training run: bn_fc, one epoch on 4,096 images. Returns its run folder."""
    import train
    out = tmp_path_factory.mktemp("trained") / "bn_fc"
    train.run(train.parse_args(["--model", "bn_fc", "--device", "cpu", "--data-dir", mnist_dir, "--subset", "4096",
                                "--epochs", "1", "--no-progress", "--out", str(out)]))
    return out
