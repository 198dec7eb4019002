import gzip
import os
import shutil

import pytest
import torch
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode

import data


def test_real_mnist_shapes_and_labels(mnist_dir):
    x, y = data.load("train", mnist_dir)
    assert x.shape == (60000, 28, 28) and x.dtype == torch.uint8
    assert y.shape == (60000,) and int(y.min()) == 0 and int(y.max()) == 9
    x, y = data.load("test", mnist_dir)
    assert x.shape == (10000, 28, 28)
    assert torch.bincount(y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def _copy(mnist_dir, tmp_path):
    for stem in data.FILES.values():
        shutil.copy(os.path.join(mnist_dir, stem + ".gz"), tmp_path / (stem + ".gz"))
    return tmp_path


def test_missing_file_names_folder_and_file(mnist_dir, tmp_path):
    folder = _copy(mnist_dir, tmp_path)
    os.remove(folder / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(data.DataError, match="t10k-labels-idx1-ubyte.*") as e:
        data.load("test", str(folder))
    assert str(folder) in str(e.value)


@pytest.mark.parametrize("damage, message", [
    (lambda raw: raw[:len(raw) // 2], "truncated"),
    (lambda raw: b"\x00\x00\x09\x99" + raw[4:], "magic number"),
    (lambda raw: raw[:4] + (9999).to_bytes(4, "big") + raw[8:], "shape"),
])
def test_corrupt_images_rejected(mnist_dir, tmp_path, damage, message):
    folder = _copy(mnist_dir, tmp_path)
    path = folder / "t10k-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(damage(raw), compresslevel=1))  # the reader sees the same bytes; level 9 costs 2.5 s
    with pytest.raises(data.DataError, match=message):
        data.load("test", str(folder))


def test_bad_label_and_broken_gzip(mnist_dir, tmp_path):
    folder = _copy(mnist_dir, tmp_path)
    path = folder / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[100] = 42
    path.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(data.DataError, match="label 42"):
        data.load("test", str(folder))
    path.write_bytes(b"not gzip at all")
    with pytest.raises(data.DataError, match="cannot read t10k-labels"):
        data.load("test", str(folder))


def test_decompressed_files_are_read(mnist_dir, tmp_path):
    for stem in data.FILES.values():
        (tmp_path / stem).write_bytes(gzip.decompress(open(os.path.join(mnist_dir, stem + ".gz"), "rb").read()))
    x, _ = data.load("test", str(tmp_path))
    assert torch.equal(x, data.load("test", mnist_dir)[0])


def test_env_var_and_missing_dir(mnist_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("MNIST_DIR", mnist_dir)
    assert data.resolve_dir() == mnist_dir
    with pytest.raises(data.DataError, match="does not exist"):
        data.resolve_dir(str(tmp_path / "nowhere"))


# --------------------------------------------------------------- augmentation agreement

@pytest.fixture(scope="module")
def digits(mnist_dir):
    x, _ = data.load("test", mnist_dir)
    return x[:16].unsqueeze(1).float() / 255


@pytest.mark.parametrize("angle", [-15.0, -7.0, -3.3, 0.0, 5.5, 7.0, 12.25, 15.0])
def test_rotation_matches_torchvision(digits, angle):
    ours = torch.nn.functional.grid_sample(
        digits, data.affine_grid(torch.full((16,), angle), torch.zeros(16, 2)),
        mode="nearest", padding_mode="zeros", align_corners=False)
    theirs = TF.rotate(digits, angle, interpolation=InterpolationMode.NEAREST, fill=0)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("angle, shift", [(0.0, (2, -1)), (9.0, (-2, 2)), (-14.0, (1, 0))])
def test_affine_matches_torchvision(digits, angle, shift):
    ours = torch.nn.functional.grid_sample(
        digits, data.affine_grid(torch.full((16,), angle), torch.tensor([shift] * 16, dtype=torch.float)),
        mode="nearest", padding_mode="zeros", align_corners=False)
    # torchvision's affine() turns clockwise, rotate() counter-clockwise: affine(-a) == rotate(a)
    theirs = TF.affine(digits, angle=-angle, translate=list(shift), scale=1.0, shear=[0.0],
                       interpolation=InterpolationMode.NEAREST, fill=0)
    assert torch.equal(ours, theirs)


def test_center_crop_resize_matches_torchvision(digits):
    gen = torch.Generator().manual_seed(0)
    ours = data.augment(digits, dict(crop=22, crop_p=1.0), gen)
    theirs = TF.resize(TF.center_crop(digits, [22, 22]), [28, 28], antialias=True)
    assert torch.allclose(ours, theirs, atol=1e-6)
    assert torch.equal(data.augment(digits, dict(crop=22, crop_p=0.0), gen), digits)


def test_crop_applies_to_the_drawn_share_only(digits):
    """RandomApply(p): each image is either the crop-resize or untouched, chosen by one draw per image."""
    x = digits.repeat(16, 1, 1, 1)  # 256 images
    cropped = TF.resize(TF.center_crop(x, [22, 22]), [28, 28], antialias=True)
    out = data.augment(x, dict(crop=22, crop_p=0.3), torch.Generator().manual_seed(0))
    same = (out == x).flatten(1).all(1)
    was_cropped = (out - cropped).abs().flatten(1).amax(1) < 1e-6
    assert bool((same ^ was_cropped).all())
    assert 40 < int(was_cropped.sum()) < 115  # ~77 expected of 256


def test_augment_draws_cover_the_range(digits):
    """Uniform angles in [-deg, deg] and whole-pixel shifts in [-px, px], per sample."""
    gen = torch.Generator().manual_seed(0)
    x = digits[:1].expand(4000, -1, -1, -1)
    out = data.augment(x, dict(translate=2), gen)
    # a pure translation moves the digit's centre of mass by whole pixels, -2..2 on each axis
    cols = torch.arange(28.0)
    com = (out[:, 0].sum(1) * cols).sum(1) / out[:, 0].sum((1, 2))
    com0 = (x[0, 0].sum(0) * cols).sum() / x[0, 0].sum()
    moves = torch.round(com - com0).long()
    assert set(moves.tolist()) == {-2, -1, 0, 1, 2}
    assert not torch.equal(data.augment(x[:8], dict(rotate=15), gen), x[:8])


def test_fast_batches_are_normalised_and_shuffled(mnist_dir):
    x, y = data.load("test", mnist_dir)
    gen = torch.Generator().manual_seed(0)
    got = list(data.batches(x[:300], y[:300], 128, {}, gen=gen))
    assert [len(b[1]) for b in got] == [128, 128, 44]
    allx = torch.cat([b[0] for b in got])
    assert allx.shape == (300, 1, 28, 28)
    assert sorted(torch.cat([b[1] for b in got]).tolist()) == sorted(y[:300].tolist())
    assert torch.allclose(allx.min(), torch.tensor(-data.MEAN / data.STD))
