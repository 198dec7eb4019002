"""digit.py on its own: the preprocessing pinned to the pixel on a varied set of pictures, and usable
with numpy and Pillow alone (no torch), as docs/predict_onnxruntime.py uses it."""
import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageFilter
from test_predict import photo, variants

import data
import digit
import predict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def on_page(ink, size, at, page=(235, 232, 225)):
    """A dark-ink picture `size` (w, h) of light paper with the white-on-black digit `ink` (uint8) at `at`."""
    img = Image.new("RGB", size, page)
    img.paste((20, 20, 60), at, Image.fromarray(ink))
    return img


def clear_paper(img):
    """A palette image whose top-left (paper) colour is marked transparent."""
    img.info["transparency"] = img.getpixel((0, 0))
    return img


def pinned_cases(x):
    """(what, PIL image) for every path through to_mnist: synthetic photos (pen and chalk, JPEG and PNG,
    off-centre, uneven light), each file format and mode a user's file may take, inverted and
    transparent ones, fine pen strokes (widened), a picture reduced first and one enlarged first, a
    digit far off-centre on a wide page, a flat dash (one aspect extreme), and MNIST's own form."""
    rng = np.random.default_rng(0)
    cases = [(f"photo {i}", photo(x[i], rng)) for i in range(16)]
    for i in range(2):
        cases += [(f"digit {i}, {what}", raw) for what, raw in variants(x[i])]
    cases = [(what, digit.open_image(raw)) for what, raw in cases]
    for i in range(3):
        thin = Image.fromarray(x[i]).resize((280, 280), Image.BICUBIC).filter(ImageFilter.MinFilter(7))
        cases.append((f"digit {i}, thin pen", Image.fromarray(255 - np.asarray(thin.filter(ImageFilter.MinFilter(7))))))
    big = np.asarray(Image.fromarray(x[3]).resize((90, 90), Image.BICUBIC))
    cases += [("far off-centre on a wide page", on_page(big, (640, 360), (530, 250))),
              ("2400 x 1800 photo (reduced first)", on_page(np.asarray(Image.fromarray(x[4]).resize((600, 600))),
                                                           (2400, 1800), (900, 500))),
              ("40 x 40 (enlarged first)", Image.fromarray(255 - np.asarray(Image.fromarray(x[5]).resize((40, 40))))),
              ("float 'F' image", Image.fromarray(x[6].astype(np.float32) / 3)),
              ("palette with a transparent paper colour", clear_paper(Image.fromarray(255 - x[7]).convert("P"))),
              ("a flat dash", on_page(np.pad(np.full((6, 120), 255, np.uint8), 4), (300, 200), (60, 90))),
              ("MNIST's own form", Image.fromarray(x[8])),
              ("MNIST's own form, RGB", Image.fromarray(x[9]).convert("RGB"))]
    return cases


# sha256 of to_mnist's uint8 [28, 28] output (C order) for each of pinned_cases, in order, taken from the
# torch implementation this numpy one replaced: the same pixels, byte for byte.
PINNED = """
e25b93cd4169a5c69bd1486a9c6a1c02675ac4eb495d31532d7fa035902ea6f6
fc4ff1c5a67875ef1ff1cdc9ea05ac15cc85344dd4a085786fab2c7767c64d43
7eba8862ed0c82e4838daa1f44ccec3ca284940a6a20cb2ae01b8ee5abdc8925
96e1cd3812776598fb38591aa0864f85e269763d31179d2a679026d79363e414
fcd152b32ab3b3ed01a315b7e6be91ec0d8ef422ccd8140222dc7894340465f6
18ea8c9d7cc2e63b9fe1292995ed94f3e395e41a5bed10a93939423f1f2c81be
3e2aea1ed8439193d2851f1527f2550cf94e2efdcd242ce7f612320335f2880e
3fa9af41ac06527d5d91e066409a0664562b910629231acb9f9df0b2adc768ec
03f2502426ff33d87efff2d0ee5c72a759f65f02561c985bb9dbcf464dc1348f
d3fd4643a54bfb0c4ec239e015b9eb61acaacf6e16b1c4e099b8bf6ef0b0d3f9
22da19f2525e8aa4a1ab4cf90d1d95273dddffff792df57b0aac9f5bba9721b1
a8c0f4d0a92fe49d184bf780e45253bc6474a0f61b71eb03b0a980a8b530c3fe
ee8331e3d90df10397768c2f44877f4447bf6c6dcbee5c566084e0ed59ff37eb
ec682e0126595096ede7e739a1cc180957c8ad290b215536e28592a6053bf8e3
163d168d4bd4d4540ab0667032784140494ec53f7d0d5b6e085e5b03775a54d1
1040268aabb4b6c86f6fdc6796f75ef48551c2ef3bfbec40e83aa96662ad644f
d42d6ec85b82c4bca446d42e46e3a1e62c3cad28b892a2b56c794bcd6f94b8ad
d193503050bcc1a9b8ee507563448a92340959849658214eeebd33c96ba26d2b
180d57b33fc2c5eaa6f7c3880d7e021225e0d07b56fadfb26486771ed1c9a2de
d42d6ec85b82c4bca446d42e46e3a1e62c3cad28b892a2b56c794bcd6f94b8ad
d42d6ec85b82c4bca446d42e46e3a1e62c3cad28b892a2b56c794bcd6f94b8ad
d42d6ec85b82c4bca446d42e46e3a1e62c3cad28b892a2b56c794bcd6f94b8ad
d42d6ec85b82c4bca446d42e46e3a1e62c3cad28b892a2b56c794bcd6f94b8ad
16c79a743ca97c263635a4b1163669e65d561b54ea344f517c21ed49673edd66
20f7d3c48df1f07ad3a313b73bdc2c06f13659ca3723aab51d5c5f660c4d08eb
36a364ffc6155924647bc85d63826ba5d67d87756902172963ea42a2bf6755d2
3eb4c1725fede6164768dadda45e829626767a834ca62a4c2618226d508798ed
cd338124f5f5e9fb89583ac2394f4f7cf6dae9910d3dbeb5e9efbb17d69bab72
3eb4c1725fede6164768dadda45e829626767a834ca62a4c2618226d508798ed
3eb4c1725fede6164768dadda45e829626767a834ca62a4c2618226d508798ed
3eb4c1725fede6164768dadda45e829626767a834ca62a4c2618226d508798ed
3eb4c1725fede6164768dadda45e829626767a834ca62a4c2618226d508798ed
3eb4c1725fede6164768dadda45e829626767a834ca62a4c2618226d508798ed
204fee6523d7078c242b887d129190ca5aedb41e31361d5f6bcef6b9787a24ee
0c309e511a408437aba3d19239b1cb0da3535d2238b2efe8f0745b6e8c7d0f75
87cefc55fcb1eedbfed1828c5d45d959754c142c5bcda7fa944683377a0234b2
c668530a0404b029ca19560b2f65c7a0b54fce5f7b81ee39d62971a6ab6bedc1
eac0d4548fd11d88283b93a48e30c382b3e7011ba4e59f329a36b6ed91e24a9e
ddd653547e1146ebbeee9ffbfe96a87fc211790a2c1c76d69aa65f87b0387414
bb6cb01b444bf18a4885628c2b1a71abaf56ef311d35f6f3fb52888a5e5a9871
bc44b562213c68f710ef06e590dc98e0a20e01b0f0c9f838e2f9ba2f1401fb65
55b45bcf2afe3601142aed76636f090fc1e85e69865228655468f30e64ea2d92
e237949c2e64042b5f838f33240079622621525a5119a5cd7f152f0dd1d08e5b
4fedac66e9b95ca72eb285dfbe7585bcc0b1d7928f8a6dcacbf186c1e217876c
42bb9072b822b92a9d600997c1d5dc9777771f7a1057853bf1fe2014047d2051
c6915d57f7525d68c2a9af4111daad3c1c819bffaf65404eaa24c3fe293c4c0c
a08bc01acafc5eb45a6ef1cf8d4f29a38ee8677c80ba314dd1653fb0d277d581
""".split()


@pytest.fixture(scope="module")
def test_images(mnist_dir):
    return data.load("test", mnist_dir)[0].numpy()


def test_to_mnist_output_is_pinned_to_the_pixel(test_images):
    got = []
    for what, img in pinned_cases(test_images):
        out = digit.to_mnist(img)
        assert isinstance(out, np.ndarray) and out.dtype == np.uint8 and out.shape == (28, 28), what
        got.append(hashlib.sha256(np.ascontiguousarray(out).tobytes()).hexdigest())
    assert len(got) == len(PINNED)
    changed = [what for (what, _), a, b in zip(pinned_cases(test_images), got, PINNED) if a != b]
    assert not changed, f"to_mnist's output changed for: {changed}"


# runs a script (argv[1], its arguments after it) in a Python where `import torch` fails
WITHOUT_TORCH = """
import runpy, sys
sys.modules["torch"] = None
try:
    import torch
    sys.exit("torch could still be imported")
except ImportError:
    pass
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_onnxruntime_example_needs_no_torch(exports, test_images, tmp_path, capsys):
    """docs/predict_onnxruntime.py (digit.py, a .onnx export, onnxruntime, numpy, Pillow) in a process that
    cannot import torch: the same printed answer as predict.py's on the same file and export."""
    onnx_path = exports[2]["onnx"][0]
    picture = tmp_path / "photo"
    picture.write_bytes(photo(test_images[0], np.random.default_rng(5)))
    script = os.path.join(ROOT, "docs", "predict_onnxruntime.py")
    r = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, script, onnx_path, str(picture)], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    with pytest.raises(SystemExit) as e:
        predict.main([str(picture), "--artifact", onnx_path, "--top", "1"])
    assert e.value.code == 0
    assert r.stdout == capsys.readouterr().out.split("\n", 1)[1]   # the line after predict.py's header
