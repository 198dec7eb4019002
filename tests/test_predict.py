"""predict.py and digit.to_mnist: synthetic photos of real test digits with every shipped model, the
identity case, image formats, every bad input, the server's endpoints, and the drawing page driven in
a real headless Chromium.

    python tests/test_predict.py docs/predict-preprocessing.png   # the README's picture
"""
import base64
import fcntl
import http.client
import io
import json
import os
import select
import shutil
import struct
import subprocess
import sys
import threading
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import data  # noqa: E402
import digit  # noqa: E402
import errors  # noqa: E402
import fileio  # noqa: E402
import models  # noqa: E402
import predict  # noqa: E402
import runfiles  # noqa: E402
import serve  # noqa: E402

N_PHOTOS = 500


def pretrained(name):
    return os.path.join(ROOT, "pretrained", name + ".pt")


def photo(digit, rng):
    """A synthetic photo (JPEG or PNG bytes) of an MNIST digit (uint8 [28, 28]): pen or chalk colour,
    paper, size, position, uneven lighting, noise, blur and JPEG compression all drawn from rng."""
    s = int(rng.integers(30, 110)) * 28 // 20                  # the digit's 20-px box becomes 30-110 px
    ink = Image.fromarray(digit).resize((s, s), Image.BICUBIC).filter(ImageFilter.GaussianBlur(rng.uniform(0, s / 60)))
    ink = np.asarray(ink, np.float32) / 255                     # blurred: out of focus
    w, h = s + int(rng.integers(8, s)), s + int(rng.integers(8, s))
    y, x = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
    a = np.zeros((h, w, 1), np.float32)
    a[y:y + s, x:x + s, 0] = np.clip(ink, 0, 1)
    if rng.random() < 0.2:   # chalk on a board
        paper, pen = rng.uniform(0.05, 0.3, 3), rng.uniform(0.75, 1, 3)
    else:                    # a pen of any dark colour on light paper
        paper, pen = rng.uniform(0.75, 1, 3), rng.uniform(0, 0.4, 3) * rng.uniform(0.3, 1, 3)
    img = paper.astype(np.float32) + (pen - paper).astype(np.float32) * a
    angle, k = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.4)   # light falls off by up to 40% across
    img *= (1 - k * (np.cos(angle) * np.arange(w, dtype=np.float32) / w
                     + np.sin(angle) * np.arange(h, dtype=np.float32)[:, None] / h))[..., None]
    img += 0.02 * rng.standard_normal(img.shape, dtype=np.float32)
    pil = Image.fromarray(np.uint8(np.clip(img, 0, 1) * 255 + 0.5))
    buf = io.BytesIO()
    if rng.random() < 0.7:
        pil.save(buf, "JPEG", quality=int(rng.integers(40, 95)))
    else:
        pil.save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def png_bytes(img, fmt="PNG", **kw):
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def test_set(mnist_dir):
    return data.load("test", mnist_dir)


@pytest.fixture(scope="module")
def photos(test_set):
    """N_PHOTOS synthetic photos of the first test digits, and what to_mnist makes of them."""
    x, y = test_set
    rng = np.random.default_rng(0)
    raw = [photo(d, rng) for d in x[:N_PHOTOS].numpy()]
    return raw, torch.from_numpy(np.stack([digit.to_mnist(digit.open_image(r)) for r in raw])), y[:N_PHOTOS]


@pytest.fixture(scope="module")
def classifier():
    return predict.load_classifier(predict.parse_args(["--checkpoint", pretrained("bn_gap"), "--device", "cpu", "--serve"]))


def accuracy(logp, labels):
    return float((logp.argmax(1) == labels).float().mean() * 100)


# ------------------------------------------------------------------------ preprocessing

def test_synthetic_photos_score_like_mnist_with_every_shipped_model(photos, test_set):
    raw, seen, labels = photos
    plain = torch.stack([torch.from_numpy(np.array(digit.open_image(r).convert("L").resize((28, 28)))) for r in raw])
    for name in models.RECIPES:
        model = models.from_checkpoint(runfiles.load_checkpoint(pretrained(name)))
        got, mnist = accuracy(models.log_probs(model, seen), labels), accuracy(models.log_probs(model, test_set[0][:N_PHOTOS]), labels)
        assert got >= mnist - 1.5, f"{name}: {got:.1f}% on the photos, {mnist:.1f}% on the same MNIST digits"
        if name == "bn_gap":
            assert got >= 98.0
            assert accuracy(models.log_probs(model, plain), labels) < 50   # a plain resize fails: the photos are hard


def test_mnist_test_images_pass_unchanged(test_set):
    x, _ = test_set
    assert torch.equal(torch.from_numpy(np.stack([digit.to_mnist(Image.fromarray(a)) for a in x.numpy()])), x)
    assert torch.equal(torch.from_numpy(digit.to_mnist(Image.fromarray(x[0].numpy()).convert("RGB"))), x[0])


def variants(digit):
    """The same digit in the forms a user's file may take: (label, encoded bytes)."""
    big = Image.fromarray(digit).resize((140, 140), Image.BICUBIC)
    ink = np.asarray(big)
    dark = Image.fromarray(255 - ink)
    rgba = np.zeros((140, 140, 4), np.uint8)
    rgba[..., 2], rgba[..., 3] = 120, ink                        # dark blue strokes on a transparent page
    la = np.stack([np.full_like(ink, 255), ink], -1)            # white strokes on a transparent page
    grey16 = Image.fromarray((65535 - ink.astype(np.uint16) * 257).astype(np.uint16))
    gif = [dark.convert("P"), Image.new("P", (140, 140), 0)]
    return [("white on black, large", png_bytes(big)),
            ("black on white 28x28", png_bytes(Image.fromarray(255 - digit))),
            ("RGBA transparent", png_bytes(Image.fromarray(rgba, "RGBA"))),
            ("LA transparent", png_bytes(Image.fromarray(la, "LA"))),
            ("16-bit PNG", png_bytes(grey16)),
            ("16-bit TIFF", png_bytes(grey16, "TIFF")),
            ("GIF, first frame", png_bytes(gif[0], "GIF", save_all=True, append_images=gif[1:])),
            ("WebP", png_bytes(dark.convert("RGB"), "WEBP", quality=80)),
            ("BMP 1-bit", png_bytes(dark.convert("1"), "BMP")),
            ("CMYK JPEG", png_bytes(dark.convert("CMYK"), "JPEG", quality=85))]


def test_image_formats_and_modes(test_set, classifier):
    x, y = test_set
    classify, _ = classifier
    for i in range(3):
        original = x[i].numpy()
        for what, raw in variants(original):
            seen = digit.to_mnist(digit.open_image(raw))
            corr = np.corrcoef(seen.ravel().astype(float), original.ravel().astype(float))[0, 1]
            assert corr > 0.7, f"digit {i}, {what}: correlation {corr:.2f} with the MNIST original"
            assert classify(seen[None])[0].argmax() == y[i], f"digit {i}, {what}"


def test_thin_pen_strokes_are_made_bold(test_set, classifier):
    """A fine pen photographed large: MNIST digits thinned to a third of their stroke width, still read."""
    x, y = test_set
    thin = [Image.fromarray(x[i].numpy()).resize((280, 280), Image.BICUBIC).filter(ImageFilter.MinFilter(7))
            .filter(ImageFilter.MinFilter(7)) for i in range(40)]
    seen = np.stack([digit.to_mnist(Image.fromarray(255 - np.asarray(t))) for t in thin])
    assert seen.mean() > 0.65 * x[:40].float().mean()   # without widening: 0.48
    assert (classifier[0](seen).argmax(1) == y[:40].numpy()).mean() >= 0.975   # without widening: 0.95


# ------------------------------------------------------------------------------ the CLI

def bomb_png(side=30000):
    """A tiny PNG whose header claims side x side pixels (far over Pillow's limit)."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def test_bad_inputs_each_get_one_error_line_and_the_good_ones_answers(tmp_path, test_set, capsys):
    x, y = test_set
    good = png_bytes(Image.fromarray(x[0].numpy()))
    files = {"good.png": good, "text.png": b"not an image\n", "truncated.png": good[:len(good) // 2],
             "empty.jpg": b"", "blank.png": png_bytes(Image.new("RGB", (90, 60), (240, 238, 230))),
             "bomb.png": bomb_png()}
    for name, raw in files.items():
        (tmp_path / name).write_bytes(raw)
    (tmp_path / "no-images").mkdir()
    (tmp_path / "no-images" / "notes.txt").write_text("nothing here")
    args = [str(tmp_path / n) for n in files] + [str(tmp_path / "no-images"), str(tmp_path / "missing.png")]
    with pytest.raises(SystemExit) as e:
        predict.main(args + ["--checkpoint", pretrained("bn_gap"), "--device", "cpu", "--top", "2"])
    assert e.value.code == 1
    out, err = capsys.readouterr()
    head, *answers = out.splitlines()
    acc = runfiles.load_checkpoint(pretrained("bn_gap"))["test_acc"]
    assert head == f"# bn_gap (checkpoint {pretrained('bn_gap')}, test accuracy {acc:.2f}%)"   # what answered
    assert answers == [a for a in answers if a.startswith(str(tmp_path / "good.png"))]
    assert answers[0].startswith(f"{tmp_path / 'good.png'}: {int(y[0])} (") and "top: " in out
    lines = err.strip().splitlines()
    expect = {"text.png": "not an image", "truncated.png": "truncated", "empty.jpg": "empty file",
              "blank.png": "no ink found", "bomb.png": "too large", "no-images": "no images",
              "missing.png": "no such file"}
    assert len(lines) == len(expect) and all(line.startswith("error: ") for line in lines)
    for name, words in expect.items():
        assert any(name in line and words in line for line in lines), (name, err)


@pytest.mark.parametrize("argv, words", [
    (["--top", "0", "x.png"], "--top must be 1 to 10"),
    ([], "name at least one image"),
    (["--model", "nope", "x.png"], "unknown model 'nope'"),
    (["--checkpoint", "missing.pt", "x.png"], "does not exist"),
    (["--artifact", "missing.onnx", "x.png"], "does not exist"),
])
def test_bad_flags(argv, words):
    with pytest.raises(SystemExit) as e:
        predict.main(argv)
    assert str(e.value.code).startswith("error: ") and words in str(e.value.code)


def test_cli_on_real_test_images_predicts_like_models_predict(tmp_path, test_set, forked):
    """predict.py itself (a real process, forked) on a folder of real MNIST test PNGs: the same probabilities as
    models.predict on the raw tensors, --save-preprocessed writes them back unchanged, and one bad
    file among them is one error line and exit code 1."""
    x, _ = test_set
    folder = tmp_path / "digits"
    folder.mkdir()
    n = 200
    for i in range(n):
        Image.fromarray(x[i].numpy()).save(folder / f"{i:04d}.png")
    (folder / "zz-broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    run = forked.run("predict.py", str(folder), "--json", "--checkpoint", pretrained("bn_gap"), "--device", "cpu",
                     "--save-preprocessed", str(tmp_path / "seen"), cwd=tmp_path, timeout=120)
    assert run.returncode == 1
    assert run.stderr.strip().startswith("error: ") and len(run.stderr.strip().splitlines()) == 1
    assert "zz-broken.png" in run.stderr and "Traceback" not in run.stderr
    results = json.loads(run.stdout)
    assert [r["file"] for r in results] == [str(folder / f"{i:04d}.png") for i in range(n)]
    assert all(set(r) == {"file", "prediction", "probability", "probabilities", "preprocessed", "model", "source"}
               for r in results)
    assert all(r["model"] == "bn_gap" and r["source"] == pretrained("bn_gap") for r in results)   # what answered
    assert [r["preprocessed"] for r in results] == [str(tmp_path / "seen" / f"{i:04d}.png") for i in range(n)]
    ref = models.log_probs(models.from_checkpoint(runfiles.load_checkpoint(pretrained("bn_gap"))), x[:n]).exp()
    got = torch.tensor([r["probabilities"] for r in results])
    assert (got - ref).abs().max() < 2e-6
    assert [r["prediction"] for r in results] == ref.argmax(1).tolist()
    assert all(r["probability"] == max(r["probabilities"]) for r in results)
    saved = [np.array(Image.open(tmp_path / "seen" / f"{i:04d}.png")) for i in range(n)]
    assert torch.equal(torch.from_numpy(np.stack(saved)), x[:n])


def test_artifact_and_the_trust_rule(tmp_path, test_set, capsys):
    import artifacts
    x, y = test_set
    model = models.from_checkpoint(runfiles.load_checkpoint(pretrained("bn_fc")))
    path = str(tmp_path / "bn_fc.torchscript.pt")
    torch.jit.save(torch.jit.script(artifacts.Exportable(model).eval()), path,
                   _extra_files={"metadata.json": json.dumps({"model": "bn_fc", "test_acc": "99.50"})})
    image = tmp_path / "digit.png"
    Image.fromarray(x[1].numpy()).save(image)
    with pytest.raises(SystemExit) as e:
        predict.main([str(image), "--artifact", path])
    assert str(e.value.code).startswith("error: ") and "trust" in str(e.value.code)
    with pytest.raises(SystemExit) as e:
        predict.main([str(image), "--artifact", path, "--trust-code", "--top", "1"])
    assert e.value.code == 0
    head, line = capsys.readouterr().out.splitlines()
    assert head == f"# bn_fc (torchscript {path}, test accuracy 99.50%)" and line.startswith(f"{image}: {int(y[1])} (")


# ------------------------------------------------------------- hostile files and folders

def digit_png():
    """A tiny digit already in MNIST's form (28x28, white on black): decoded and passed through unchanged."""
    a = np.zeros((28, 28), np.uint8)
    a[6:22, 12:16] = 255
    return png_bytes(Image.fromarray(a))


def predict_run(forked, cwd, *args, model="bn_gap"):
    r = forked.run("predict.py", *args, "--checkpoint", pretrained(model), "--device", "cpu", cwd=cwd, timeout=120)
    assert "Traceback" not in r.stderr, r.stderr
    assert all(line.startswith("error: ") for line in r.stderr.splitlines()), r.stderr
    return r


def test_folder_of_special_files(forked, tmp_path):
    """A FIFO (it hung predict.py), a socket, a symlink loop and a symlink to itself, a mode-000 file, names
    with a newline and with bytes that are not UTF-8 (printed raw, a UnicodeEncodeError traceback under a
    strict UTF-8 stdout): one error line each for what cannot be read, one answer line each for the rest,
    the names escaped onto their one line. Run as root (here), the mode-000 file is readable and answered;
    otherwise it is one "Permission denied" line."""
    import socket
    d = tmp_path / "dir"
    (d / "sub").mkdir(parents=True)
    for name in ("good.png", "new\nline.png", "locked.png"):
        (d / name).write_bytes(digit_png())
    with open(os.path.join(os.fsencode(d), b"bad\xffutf8.png"), "wb") as f:
        f.write(digit_png())
    os.chmod(d / "locked.png", 0)
    os.mkfifo(d / "fifo.png")
    os.symlink("fifo.png", d / "to-fifo.png")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(d / "sock.png"))
    os.symlink(".", d / "sub" / "loop")   # a folder loop: not followed
    os.symlink("self.png", d / "self.png")
    os.symlink("nowhere", tmp_path / "dangling")
    try:
        r = predict_run(forked, tmp_path, "dir", "dir/fifo.png", "/dev/zero", "dangling", "--top", "1")
    finally:
        sock.close()
    root = os.geteuid() == 0
    answered = ["dir/bad\\xffutf8.png", "dir/good.png"] + ["dir/locked.png"] * root + ["dir/new\\x0aline.png"]
    assert r.returncode == 1
    assert r.stdout.startswith("# bn_gap (checkpoint ")
    assert [line.split(": ")[0] for line in r.stdout.splitlines()[1:]] == answered, r.stdout
    errors = {"dir/fifo.png": "not a regular file", "dir/sock.png": "not a regular file", "dir/to-fifo.png":
              "not a regular file", "dir/self.png": "Too many levels of symbolic links", "/dev/zero": "not a regular file",
              "dangling": "a symbolic link to nothing"}
    if not root:
        errors["dir/locked.png"] = "Permission denied"
    lines = r.stderr.splitlines()
    assert len(lines) == len(errors) + 1, r.stderr   # dir/fifo.png twice: in the folder and named
    for name, words in errors.items():
        assert any(line.startswith(f"error: {name}: {words}") for line in lines), (name, r.stderr)


def test_ten_thousand_files(forked, tmp_path):
    """10,000 files in one folder: 512 tiny digits and 9,488 empty files named .png (the classification of
    10,000 real ones would cost this suite 15 s; the listing, the per-file errors and the batches are the
    same). Every digit answered in order, one error line per empty file, exit 1."""
    d = tmp_path / "many"
    d.mkdir()
    raw = digit_png()
    for i in range(10000):
        (d / f"{i:05d}.png").write_bytes(raw if i % 19 == 0 and i < 512 * 19 else b"")
    r = predict_run(forked, tmp_path, "many", "--top", "1", model="gap10k")
    assert r.returncode == 1
    assert r.stdout.startswith("# gap10k (checkpoint ")
    assert [line.split(":")[0] for line in r.stdout.splitlines()[1:]] == [f"many/{i:05d}.png" for i in range(0, 9728, 19)]
    lines = r.stderr.splitlines()
    assert len(lines) == 9488 and all(line.endswith(": empty file") for line in lines)


def test_files_are_read_classified_and_printed_a_batch_at_a_time(tmp_path, capsys):
    """Memory holds one batch (BATCH images) whatever the file count, and each batch's answers are out
    before the next is read; --json still prints exactly json.dumps(results, indent=1)."""
    for i in range(600):
        (tmp_path / f"{i:03d}.png").write_bytes(digit_png())
    sizes, printed = [], []

    def classify(x):
        sizes.append(len(x))
        printed.append(capsys.readouterr().out)
        return torch.full((len(x), 10), 0.1)
    info = {"model": "bn_fc", "source": "some.onnx"}
    assert predict.run_files(predict.parse_args([str(tmp_path), "--json"]), classify, info) == 0
    printed.append(capsys.readouterr().out)
    assert sizes == [256, 256, 88] and printed[0] == "" and printed[1].count('"file"') == 256
    results = [dict(predict.answer(str(tmp_path / f"{i:03d}.png"), np.full(10, 0.1)), **info) for i in range(600)]
    assert "".join(printed) == json.dumps(results, indent=1) + "\n"


def test_save_preprocessed_rules(forked, tmp_path):
    """--save-preprocessed DIR: refused (one line, nothing written) when DIR is a file, cannot be created or
    written, or when a PNG it writes would replace an input (--save-preprocessed equal to the input's
    folder used to replace a.png by its own 28x28 input); DIR may be an input's folder otherwise, and a
    symlink to a folder (written where it points); a symlink at an output's name is replaced, never
    written through; two inputs of one name get seven.png and seven-2.png, and each answer says which."""
    for sub in ("a", "b", "c", "elsewhere", "links"):
        (tmp_path / sub).mkdir()
    for name in ("a/seven.png", "b/seven.png"):
        (tmp_path / name).write_bytes(digit_png())
    (tmp_path / "c" / "photo.jpg").write_bytes(png_bytes(Image.new("RGB", (28, 28)), "JPEG"))
    Image.fromarray(255 - np.asarray(Image.open(io.BytesIO(digit_png())))).save(tmp_path / "c" / "photo.jpg", "JPEG")
    (tmp_path / "afile").write_text("x")
    os.symlink(tmp_path / "elsewhere", tmp_path / "out-link")
    (tmp_path / "outside.txt").write_text("not yours")
    os.symlink(tmp_path / "outside.txt", tmp_path / "links" / "seven.png")
    (tmp_path / "ro").mkdir(mode=0o555)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and not p.is_symlink()}
    for out, words in (("afile", "is a file; give a folder"), ("/proc/no/where", "cannot write to --save-preprocessed"),
                       ("a", "would replace the input a/seven.png")) + ((("ro", "cannot write"),) if os.geteuid() else ()):
        r = predict_run(forked, tmp_path, "a", "b", "--save-preprocessed", out)
        assert r.returncode == 1 and len(r.stderr.splitlines()) == 1 and words in r.stderr, r.stderr
        assert r.stdout == ""
    assert {p: p.read_bytes() for p in before} == before and sorted(os.listdir(tmp_path / "a")) == ["seven.png"]
    r = predict_run(forked, tmp_path, "a/seven.png", "b/seven.png", "c/photo.jpg", "--save-preprocessed", "out-link",
                    "--json")
    assert r.returncode == 0, r.stderr
    assert [x["preprocessed"] for x in json.loads(r.stdout)] == ["out-link/seven.png", "out-link/seven-2.png",
                                                                  "out-link/photo.png"]
    assert sorted(os.listdir(tmp_path / "elsewhere")) == ["photo.png", "seven-2.png", "seven.png"]
    assert predict_run(forked, tmp_path, "c", "--save-preprocessed", "c").returncode == 0   # the input's folder
    assert sorted(os.listdir(tmp_path / "c")) == ["photo.jpg", "photo.png"]
    assert predict_run(forked, tmp_path, "a", "--save-preprocessed", "links").returncode == 0
    assert not (tmp_path / "links" / "seven.png").is_symlink() and (tmp_path / "outside.txt").read_text() == "not yours"
    assert {p: p.read_bytes() for p in before} == before
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]


# ------------------------------------------------------------------------- what answered

def test_the_model_that_answers_is_found_and_named(tmp_path, monkeypatch, capsys):
    """--model's latest run under the current folder, else the shipped pretrained/<model>.pt found
    beside the scripts from any folder; the header line and --json name it; a lookup that finds
    nothing names every place it looked; a folder as --checkpoint is said to be one."""
    monkeypatch.chdir(tmp_path)
    image = tmp_path / "digit.png"
    image.write_bytes(digit_png())

    def answered_by(*args):
        with pytest.raises(SystemExit) as e:
            predict.main([str(image), "--device", "cpu", "--top", "1", *args])
        assert e.value.code == 0
        return capsys.readouterr().out.splitlines()[0]
    assert answered_by("--model", "bn_fc").startswith(f"# bn_fc (checkpoint {pretrained('bn_fc')}, test accuracy ")
    run = tmp_path / "runs" / "bn_fc" / "latest"
    run.mkdir(parents=True)
    shutil.copy(pretrained("bn_fc"), run / "best.pt")
    assert answered_by("--model", "bn_fc").startswith("# bn_fc (checkpoint runs/bn_fc/latest/best.pt, ")
    assert answered_by().startswith(f"# bn_gap (checkpoint {pretrained('bn_gap')}, ")   # the default model
    with pytest.raises(SystemExit) as e:
        predict.main([str(image), "--json", "--model", "bn_fc"])
    assert e.value.code == 0
    results = json.loads(capsys.readouterr().out)
    assert (results[0]["model"], results[0]["source"]) == ("bn_fc", "runs/bn_fc/latest/best.pt")
    with pytest.raises(errors.UserError) as e:
        runfiles.find_checkpoint("nothing")
    assert str(e.value).startswith(f"no checkpoint for nothing: none at {tmp_path / 'runs/nothing/latest/best.pt'} "
                                   f"(the latest run, under the current folder) or {pretrained('nothing')} (shipped)")
    with pytest.raises(SystemExit) as e:
        predict.main([str(image), "--checkpoint", str(run)])
    assert e.value.code == f"error: checkpoint {run} is a folder, not a checkpoint file (a run folder holds best.pt)"
    with pytest.raises(SystemExit):
        predict.parse_args(["--help"])
    assert "runs/<model>/latest/best.pt under the current folder, else pretrained/<model>.pt" in \
        " ".join(capsys.readouterr().out.split())   # the rule, in --help


HOSTILE = b"ev\xff\x1b]0;owned\x07\x1b[2Jil"   # a name holding byte 0xff and escape sequences (window title, clear)
HOSTILE_SHOWN = "ev\\xff\\x1b]0;owned\\x07\\x1b[2Jil"   # the same, as it must be printed


def hostile_export(src, folder):
    """A copy of the export `src` in `folder` named HOSTILE + its suffix: the path, as a script gets it."""
    path = os.fsdecode(os.path.join(os.fsencode(folder), HOSTILE + b".onnx"))
    shutil.copy(src, path)
    return path


def strict_utf8(monkeypatch):
    """stdout and stderr as PYTHONIOENCODING=utf-8:strict makes stdout: text that is not UTF-8 (a file
    name's byte 0xff, decoded as a lone surrogate) raises instead of printing. Returns a function that
    gives (stdout, stderr) as bytes."""
    out, err = (io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict", write_through=True) for _ in "12")
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    return lambda: (out.buffer.getvalue(), err.buffer.getvalue())


def test_names_print_escaped_on_a_strict_utf8_stream(exports, tmp_path, monkeypatch):
    """An image, a --save-preprocessed folder and an export named with byte 0xff and escape sequences:
    every line printed whole on a strict UTF-8 stream, each name escaped (\\xff, \\x1b), nothing raw."""
    onnx_path = hostile_export(exports[2]["onnx"][0], tmp_path)
    image, out = (os.fsdecode(os.path.join(os.fsencode(tmp_path), HOSTILE + end)) for end in (b".png", b"-seen"))
    with open(image, "wb") as f:
        f.write(digit_png())
    printed = strict_utf8(monkeypatch)
    with pytest.raises(SystemExit) as e:
        predict.main([image, image + "-missing", "--artifact", onnx_path, "--top", "1", "--save-preprocessed", out])
    stdout, stderr = printed()
    shown = f"{tmp_path}/{HOSTILE_SHOWN}"
    assert e.value.code == 1
    head, line = stdout.decode().splitlines()
    assert head.startswith(f"# bn_fc (onnx {shown}.onnx, test accuracy ")
    assert line.startswith(f"{shown}.png: ") and line.endswith(f"-> {shown}-seen/{HOSTILE_SHOWN}.png")
    assert stderr.decode() == f"error: {shown}.png-missing: no such file or folder\n"
    assert b"\x1b" not in stdout + stderr


# ---------------------------------------------------------------------------- the server

@pytest.fixture(scope="module")
def server(classifier):
    classify, info = classifier
    srv = serve.make_server("127.0.0.1", 0, lambda image: predict.answer("upload", classify(image[None])[0]), info)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def request(port, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.getheader("Content-Type"), r.read()
    finally:
        conn.close()


def test_server_page_and_prediction(server, photos):
    raw, _, labels = photos
    status, kind, page = request(server, "GET", "/")
    assert status == 200 and kind.startswith("text/html")
    assert b"<canvas" in page and b'"model": "bn_gap"' in page and b"/predict" in page
    status, kind, body = request(server, "POST", "/predict", raw[0])
    r = json.loads(body)
    assert status == 200 and kind == "application/json"
    assert r["prediction"] == int(labels[0]) and len(r["probabilities"]) == 10 and r["model"] == "bn_gap"
    acc = runfiles.load_checkpoint(pretrained("bn_gap"))["test_acc"]   # numbers as JSON numbers
    assert r["test_acc"] == round(acc, 2) and all(isinstance(v, float) for v in [r["test_acc"], *r["test_acc_ci95"]])
    assert f'"test_acc": {round(acc, 2)}, '.encode() in page
    seen = Image.open(io.BytesIO(base64.b64decode(r["image"].split(",", 1)[1])))
    assert seen.size == (28, 28) and np.array_equal(np.array(seen), digit.to_mnist(digit.open_image(raw[0])))


def test_server_refuses_bad_bodies_and_keeps_serving(server):
    cases = [(b"", 400, "empty"), (b"hello, not an image", 400, "not an image"),
             (png_bytes(Image.new("L", (64, 64), 255)), 400, "no ink found")]
    for body, code, words in cases:
        status, _, reply = request(server, "POST", "/predict", body)
        assert status == code and words in json.loads(reply)["error"], (status, reply)
    conn = http.client.HTTPConnection("127.0.0.1", server, timeout=30)   # 6 MB announced, none sent
    conn.putrequest("POST", "/predict")
    conn.putheader("Content-Length", str(6 * 2 ** 20))
    conn.endheaders()
    r = conn.getresponse()
    assert r.status == 413 and "over 5 MB" in json.loads(r.read())["error"]
    conn.close()
    assert request(server, "POST", "/elsewhere", b"x")[0] == 404
    assert request(server, "GET", "/")[0] == 200


# --------------------------------------------------------------------------- the browser

def chromium_binary():
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


class Chromium:
    """Headless Chromium driven over the DevTools protocol on --remote-debugging-pipe (fd 3 in,
    fd 4 out, NUL-separated JSON): no driver or websocket package needed."""

    def __init__(self, binary, profile):
        def high(fd):   # the child's ends, numbered clear of the 3 and 4 they are moved to
            moved = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
            os.close(fd)
            return moved

        cmd_r, self.cmd_w = os.pipe()
        self.out_r, out_w = os.pipe()
        cmd_r, out_w = high(cmd_r), high(out_w)
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--hide-scrollbars", "--remote-debugging-pipe", f"--user-data-dir={profile}", "about:blank"]
        self.proc = subprocess.Popen(["bash", "-c", f'exec "$0" "$@" 3<&{cmd_r} 4>&{out_w}', binary, *flags],
                                     pass_fds=(cmd_r, out_w), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for fd in (cmd_r, out_w):
            os.close(fd)
        self.buf, self.id, self.session = b"", 0, None

    def send(self, method, timeout=60, **params):
        self.id += 1
        msg = {"id": self.id, "method": method, "params": params}
        if self.session and not method.startswith("Target."):
            msg["sessionId"] = self.session
        os.write(self.cmd_w, json.dumps(msg).encode() + b"\0")
        end = time.monotonic() + timeout
        while True:
            while b"\0" not in self.buf:
                if not select.select([self.out_r], [], [], max(0, end - time.monotonic()))[0]:
                    raise TimeoutError(f"chromium did not answer {method}")
                chunk = os.read(self.out_r, 1 << 16)
                if not chunk:
                    raise RuntimeError("chromium closed its pipe")
                self.buf += chunk
            raw, self.buf = self.buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self.id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def js(self, expression):
        return self.send("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def wait_for(self, expression, timeout=30):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.1)
        raise TimeoutError(f"the page never made {expression} true")

    def close(self):
        self.proc.kill()
        self.proc.wait()
        os.close(self.cmd_w)
        os.close(self.out_r)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    binary = chromium_binary()
    if not binary:
        pytest.skip("no chromium binary (Debian: apt-get install chromium; .ci/run installs it)")
    b = Chromium(binary, tmp_path_factory.mktemp("chromium-profile"))
    target = b.send("Target.createTarget", url="about:blank")["targetId"]
    b.session = b.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
    b.send("Emulation.setDeviceMetricsOverride", width=800, height=520, deviceScaleFactor=1, mobile=False)
    yield b
    b.close()


def test_drawing_page_in_a_real_browser(browser, server, photos, tmp_path):
    browser.send("Page.navigate", url=f"http://127.0.0.1:{server}/")
    browser.wait_for("document.readyState === 'complete' && !!document.getElementById('pad')")
    box = json.loads(browser.js("JSON.stringify(document.getElementById('pad').getBoundingClientRect())"))

    def at(x, y):   # canvas pixels (280 x 280) -> page coordinates
        return box["left"] + x * box["width"] / 280, box["top"] + y * box["height"] / 280

    def mouse(kind, x, y):
        px, py = at(x, y)
        browser.send("Input.dispatchMouseEvent", type=kind, x=px, y=py, button="left",
                     buttons=0 if kind == "mouseReleased" else 1, clickCount=1)

    stroke = [(75, 60), (205, 60), (120, 235)]   # a 7: the bar, then the long diagonal
    mouse("mousePressed", *stroke[0])
    for (x0, y0), (x1, y1) in zip(stroke, stroke[1:]):
        for t in np.linspace(0, 1, 12)[1:]:
            mouse("mouseMoved", x0 + t * (x1 - x0), y0 + t * (y1 - y0))
    mouse("mouseReleased", *stroke[-1])
    browser.wait_for("document.body.dataset.predictions === '1'")
    assert browser.js("document.getElementById('digit').textContent") == "7"
    assert browser.js("document.getElementById('seen').naturalWidth") == 28
    assert "bn_gap" in browser.js("document.getElementById('model').textContent")
    shot = tmp_path / "drawn.png"
    shot.write_bytes(base64.b64decode(browser.send("Page.captureScreenshot", format="png")["data"]))
    assert Image.open(shot).size == (800, 520)
    browser.js("document.getElementById('clear').click()")
    assert browser.js("document.getElementById('digit').textContent") == "?"

    raw, _, labels = photos   # the upload button, with a synthetic photo
    (tmp_path / "photo.jpg").write_bytes(raw[1])
    root = browser.send("DOM.getDocument")["root"]["nodeId"]
    node = browser.send("DOM.querySelector", nodeId=root, selector="#upload")["nodeId"]
    browser.send("DOM.setFileInputFiles", nodeId=node, files=[str(tmp_path / "photo.jpg")])
    browser.wait_for("document.body.dataset.predictions === '2'")
    assert browser.js("document.getElementById('digit').textContent") == str(int(labels[1]))
    (tmp_path / "uploaded.png").write_bytes(base64.b64decode(browser.send("Page.captureScreenshot")["data"]))


# ------------------------------------------------------------------------ README picture

def figure(path, mnist_dir=None, n=8):
    """A few synthetic photos above what the model sees of each (the README's picture)."""
    from PIL import ImageDraw
    x, _ = data.load("test", mnist_dir)
    rng = np.random.default_rng(3)
    cell, pad = 112, 8
    sheet = Image.new("RGB", (n * (cell + pad) + pad + 90, 2 * (cell + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, pad + cell // 2), "photo", fill="black")
    draw.text((pad, 2 * pad + cell + cell // 2), "model input", fill="black")
    for i in range(n):
        raw = photo(x[i].numpy(), rng)
        img = digit.open_image(raw).convert("RGB")
        img.thumbnail((cell, cell))
        left = 90 + pad + i * (cell + pad)
        sheet.paste(img, (left + (cell - img.width) // 2, pad + (cell - img.height) // 2))
        seen = Image.fromarray(digit.to_mnist(digit.open_image(raw))).resize((cell, cell), Image.NEAREST)
        sheet.paste(seen, (left, 2 * pad + cell))
    fileio.atomic_write(path, lambda f: sheet.quantize(256).save(f, "PNG", optimize=True))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/test_predict.py OUT.png   (the README's preprocessing picture)")
    figure(sys.argv[1])
