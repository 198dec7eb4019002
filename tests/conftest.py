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
    return folder
