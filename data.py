"""MNIST: reading the IDX files (bounded and validated), the fixed validation split, normalisation,
and the two pipelines that feed the training loop (loop.py):
  fast        the whole set lives as uint8 tensors on the training device; each batch is
              augmented there in one shot (one affine grid per sample, nearest sampling,
              fill 0), with the semantics of the torchvision transforms the sources used.
  torchvision the sources' path: a Dataset that hands out PIL images, torchvision
              transforms per sample, a DataLoader with workers.
"""
import gzip
import math
import os
import zlib

import numpy as np
import torch
import torch.nn.functional as F

from errors import UserError

MEAN, STD = 0.1307, 0.3081
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
COUNTS = {"train": 60000, "test": 10000}


class DataError(UserError):
    """A missing or corrupt MNIST file."""


# ---------------------------------------------------------------------------- reading

def _find(folder, stem):
    for name in (stem, stem + ".gz"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    return None


def has_mnist(folder):
    return all(_find(folder, stem) for stem in FILES.values())


def read_idx(path, magic, count):
    """Read one IDX file, check its header, size and contents, return a uint8 array. Reads the header
    first and then at most the bytes it promises plus one, so a corrupt or hostile file (a gzip bomb
    that inflates to gigabytes, say) fails fast in bounded memory."""
    name = os.path.basename(path)
    folder = os.path.dirname(path) or "."
    ndim = magic - 2049 + 1  # 2049 -> labels (1 dim), 2051 -> images (3 dims)
    head = 4 + 4 * ndim
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            header = f.read(head)
            if len(header) < head or int.from_bytes(header[:4], "big") != magic:
                raise DataError(f"{name} in {folder} is not an IDX file with magic number {magic} "
                                "(corrupt or wrong file)")
            dims = [int.from_bytes(header[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
            if dims[0] != count or dims[1:] not in ([], [28, 28]):
                raise DataError(f"{name} in {folder} has shape {dims}, "
                                f"expected [{count}{', 28, 28' if ndim == 3 else ''}]")
            want = math.prod(dims)
            body = f.read(want + 1)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot read {name} in {folder}: {e} (re-copy the file)") from None
    if len(body) != want:
        raise DataError(f"{name} in {folder} is truncated or padded: "
                        f"{'more than ' if len(body) > want else ''}{head + len(body)} bytes, expected {head + want}")
    arr = np.frombuffer(body, dtype=np.uint8).reshape(dims)
    if ndim == 1 and arr.max() > 9:
        raise DataError(f"{name} in {folder} holds label {arr.max()}, outside 0-9")
    return arr


def resolve_dir(data_dir=None):
    """--data-dir, else $MNIST_DIR, else ./data; an explicit choice must hold the files."""
    if data_dir or os.environ.get("MNIST_DIR"):
        folder = data_dir or os.environ["MNIST_DIR"]
        source = "--data-dir" if data_dir else "$MNIST_DIR"
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise DataError(f"{source} {folder} is a file, not a folder (point it at the folder of the four MNIST "
                            "IDX files)")
        if not os.path.isdir(folder):
            raise DataError(f"{source} folder {folder} does not exist (point it at the four MNIST IDX files)")
        missing = [stem for stem in FILES.values() if not _find(folder, stem)]
        if missing:
            raise DataError(f"{source} folder {folder} lacks {missing[0]}[.gz] (it needs the four MNIST IDX files)")
        return folder
    if has_mnist("data"):
        return "data"
    if has_mnist(os.path.join("data", "MNIST", "raw")):
        return os.path.join("data", "MNIST", "raw")
    return _download("data")


def _download(root):
    """Last resort for users with internet: torchvision's download into ./data."""
    from torchvision import datasets
    print(f"no MNIST files found in --data-dir, $MNIST_DIR or ./{root}; downloading with torchvision")
    try:
        datasets.MNIST(root, train=True, download=True)
        datasets.MNIST(root, train=False, download=True)
    except Exception as e:
        raise DataError(f"no MNIST in ./{root} and the download failed ({type(e).__name__}); "
                        "pass --data-dir or set MNIST_DIR to a folder with the four IDX files") from None
    return os.path.join(root, "MNIST", "raw")


_cache = {}


def load(split, data_dir=None):
    """(images uint8 [N, 28, 28], labels int64 [N]) as CPU tensors for split 'train' or 'test'."""
    folder = resolve_dir(data_dir)
    key = (os.path.abspath(folder), split)
    if key not in _cache:
        prefix = "train" if split == "train" else "test"
        images = read_idx(_find(folder, FILES[prefix + "_images"]), 2051, COUNTS[split])
        labels = read_idx(_find(folder, FILES[prefix + "_labels"]), 2049, COUNTS[split])
        _cache[key] = (torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64)))
    return _cache[key]


VAL_SEED = 0  # the validation split's own fixed seed: the same held-out images for every recipe and run seed


def split_val(n):
    """(training indices, validation indices) of the 60,000 training images for --val n: the first n
    of torch.randperm(60000) under a generator seeded VAL_SEED are held out; both lists are sorted, so
    the images trained on keep MNIST's order (and n = 0 is the plain training set)."""
    perm = torch.randperm(COUNTS["train"], generator=torch.Generator().manual_seed(VAL_SEED))
    return perm[n:].sort().values, perm[:n].sort().values


CALIBRATION_IMAGES = 1024  # int8 calibration: the first 1,024 training images


def calibration_set(data_dir=None, n=CALIBRATION_IMAGES):
    """The images int8 exports are calibrated on: the first n of the 60,000 training images, as
    float32 [n, 1, 28, 28] in [0, 1]. It takes no split: it reads the training split, and refuses it
    (DataError) if any of those n images is byte for byte one of the test images in the same folder (a
    training file built from test images), so no test image can reach a calibration."""
    images = load("train", data_dir)[0][:n]
    test = {im.tobytes() for im in load("test", data_dir)[0].numpy()}
    leaked = [i for i, im in enumerate(images.numpy()) if im.tobytes() in test]
    if leaked:
        raise DataError(f"the int8 calibration set would include test images: {len(leaked)} of the first "
                        f"{len(images):,} training images in {resolve_dir(data_dir)} (the first: image {leaked[0]}) "
                        "are also in the test set; use the real MNIST training files")
    return to_unit(images).numpy()


def to_unit(images):
    """uint8 images [N, 28, 28] -> float [N, 1, 28, 28] in [0, 1] (what ToTensor gives)."""
    return images.unsqueeze(1).float().div_(255)


def normalize(x):
    """uint8 or [0, 1] float images [N, 28, 28] or [N, 1, 28, 28] -> normalised float [N, 1, 28, 28]."""
    if x.dtype == torch.uint8:
        x = x.float().div_(255)
    if x.dim() == 3:
        x = x.unsqueeze(1)
    return (x - MEAN) / STD


# ------------------------------------------------------------------ batched augmentation
# An augmentation is a plain dict: {"rotate": degrees, "translate": pixels, "crop": size, "crop_p": p}.
# Every key is optional; {} means none.

def generator(seed, device):
    """The random stream for shuffling and augmentation. On MPS it lives on the CPU: MPS has no
    float64 for the augmentation's matrices, and reading MPS values back would drain its queue."""
    return torch.Generator(device="cpu" if device.type == "mps" else device).manual_seed(seed)


def affine_grid(angles, shifts, size=28, device=None):
    """Sampling grids [N, H, W, 2] on `device` (default: the angles') that rotate each image by
    `angles` degrees counter-clockwise about its centre, then shift it by `shifts` [N, 2] pixels
    (x, y). The math is torchvision.transforms.functional's for tensors (inverse matrix in float64,
    pixel-centre base grid, align_corners=False): rotate(img, a) is affine_grid(a, 0) and
    affine(img, angle=a, translate=t) is affine_grid(-a, t). Builds no tensor from Python values
    on the device (that would be a blocking host-to-device copy every batch)."""
    n, device = angles.shape[0], device or angles.device
    r = torch.deg2rad(-angles.double())
    cos, sin = torch.cos(r), torch.sin(r)
    tx, ty = shifts[:, 0].double(), shifts[:, 1].double()
    theta = torch.stack([
        torch.stack([cos, sin, -cos * tx - sin * ty], 1),
        torch.stack([-sin, cos, sin * tx - cos * ty], 1),
    ], 1).float().to(device)  # inverse affine matrix, [N, 2, 3]
    xs = torch.linspace(-size * 0.5 + 0.5, size * 0.5 - 0.5, steps=size, device=device)
    base = torch.empty(1, size, size, 3, device=device)
    base[..., 0].copy_(xs)
    base[..., 1].copy_(xs.unsqueeze(-1))
    base[..., 2].fill_(1)
    grid = base.view(1, size * size, 3).expand(n, -1, -1).bmm(theta.transpose(1, 2) / (0.5 * size))
    return grid.view(n, size, size, 2)


def draw(n, aug, gen):
    """A batch's random numbers for `augment`, drawn from `gen` in a fixed order (crop picks, angles,
    shifts) as a dict of tensors on gen's device; {} without augmentation."""
    if not aug:
        return {}
    gdev = gen.device if gen is not None else None
    r = {}
    if aug.get("crop"):
        r["pick"] = torch.rand(n, generator=gen, device=gdev) < aug["crop_p"]
    deg, px = aug.get("rotate", 0), aug.get("translate", 0)
    if deg or px:
        r["angles"] = (torch.rand(n, generator=gen, device=gdev) * 2 - 1) * deg
        # torchvision RandomAffine rounds the uniform draw in [-px, px] to whole pixels
        r["shifts"] = torch.round((torch.rand(n, 2, generator=gen, device=gdev) * 2 - 1) * px)
    return r


def apply(x, aug, r):
    """Augment a float batch [N, 1, 28, 28] in [0, 1] on its device with the numbers `r` of draw()
    (any number of batches' draws concatenated: each image's result depends only on its own)."""
    n, dev = x.shape[0], x.device
    if "pick" in r:
        # RandomApply([CenterCrop(c)], p) then Resize(28): bilinear upsampling of the centre crop
        # (every image is resized and `pick` selects: no host sync on CUDA, and 28x28 resizes are cheap)
        c = aug["crop"]
        lo = int(round((28 - c) / 2.0))  # torchvision's centre-crop offset
        crop = F.interpolate(x[:, :, lo:lo + c, lo:lo + c], size=(28, 28), mode="bilinear", align_corners=False,
                             antialias=True)
        x = torch.where(r["pick"].to(dev).view(n, 1, 1, 1), crop, x)
    if "angles" in r:
        x = F.grid_sample(x, affine_grid(r["angles"], r["shifts"], device=dev), mode="nearest",
                          padding_mode="zeros", align_corners=False)
    return x


def augment(x, aug, gen):
    """Apply a recipe's augmentation to a float batch [N, 1, 28, 28] in [0, 1], on its device.
    Random draws come from `gen` (see generator()); on MPS they are drawn on the CPU and moved."""
    return apply(x, aug, draw(x.shape[0], aug, gen)) if aug else x


CHUNK = 16  # batches augmented together: one pass of ~30 kernels per 16 batches instead of per batch


def batches(images, labels, batch_size, aug=None, gen=None):
    """Yield normalised, shuffled (x, y) batches from uint8 tensors, on the device they are on.
    Every CHUNK batches are augmented in one pass, with each batch's numbers drawn in turn: the
    same images as augmenting batch by batch, for a fraction of the kernel launches."""
    n = images.shape[0]
    order = torch.randperm(n, generator=gen, device=gen.device if gen is not None else images.device)
    order = order.to(images.device)
    for c in range(0, n, batch_size * CHUNK):
        starts = range(c, min(n, c + batch_size * CHUNK), batch_size)
        idx = order[c:c + batch_size * CHUNK]
        x = to_unit(images[idx])
        if aug:
            r = [draw(min(batch_size, n - i), aug, gen) for i in starts]
            x = apply(x, aug, {k: torch.cat([d[k] for d in r]) for k in r[0]})
        x = (x - MEAN) / STD
        for i in starts:
            yield x[i - c:i - c + batch_size], labels[idx[i - c:i - c + batch_size]]


# ----------------------------------------------------------------- the sources' pipeline

def torchvision_transform(aug):
    """The torchvision transform chain the sources wrote for the same augmentation dict."""
    from torchvision import transforms as T
    steps = []
    if aug and aug.get("crop"):
        steps += [T.RandomApply([T.CenterCrop(aug["crop"])], p=aug["crop_p"]), T.Resize((28, 28))]
    if aug and aug.get("translate"):
        px = aug["translate"]
        steps.append(T.RandomAffine(aug.get("rotate", 0), translate=(px / 28, px / 28), fill=0))
    elif aug and aug.get("rotate"):
        steps.append(T.RandomRotation((-aug["rotate"], aug["rotate"]), fill=0))
    steps += [T.ToTensor(), T.Normalize((MEAN,), (STD,))]
    return T.Compose(steps)


class SeedMNIST(torch.utils.data.Dataset):
    """What torchvision.datasets.MNIST does per item (uint8 -> PIL 'L' image -> transform),
    over the tensors read by load(), so no download or raw/ folder layout is needed."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image
        img = Image.fromarray(self.images[i].numpy(), mode="L")
        return self.transform(img), int(self.labels[i])


def seed_loader(images, labels, batch_size, aug=None, seed=0, workers=2, pin_memory=False):
    ds = SeedMNIST(images, labels, torchvision_transform(aug))
    gen = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, generator=gen,
                                       num_workers=workers, pin_memory=pin_memory,
                                       persistent_workers=workers > 0)
