import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import artifacts
import data
import errors
import evaluate
import export
import manifest
import models
import runfiles

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def exported(exports):
    return exports


def check_verified(out, ckpt, figures):
    """Each file verified on all 10,000 images at batch 1000 and 1, and exactly these files, each in the
    folder's manifest with its sha256 and format. Returns the manifest."""
    for fmt, (path, f) in figures.items():
        assert f["ok"] and f["same_predictions"] == 10000 and f["max_abs_diff"] <= 1e-4
        assert f["batch1_max_abs_diff"] <= 1e-4 and f["accuracy"] == ckpt["test_acc"]
    assert sorted(p.name for p in out.iterdir()) == sorted([os.path.basename(p) for p, _ in figures.values()] +
                                                           ["manifest.json"])
    listed = json.loads((out / "manifest.json").read_text())["files"]
    for fmt, (path, f) in figures.items():
        entry = listed[os.path.basename(path)]
        assert entry["sha256"] == hashlib.sha256(open(path, "rb").read()).hexdigest() and entry["format"] == fmt
    return listed


def test_every_format_verified(exported):
    out, ckpt, figures = exported
    assert set(figures) == {"onnx", "torchscript", "pt2"}  # and aoti: test_aoti_package_verified
    check_verified(out, ckpt, figures)
    assert sorted(p.name for p in out.iterdir()) == ["bn_fc.onnx", "bn_fc.pt2", "bn_fc.torchscript.pt", "manifest.json"]


@pytest.mark.slow
def test_aoti_package_verified(aoti_package):
    path, ckpt, f = aoti_package
    listed = check_verified(Path(path).parent, ckpt, {"aoti": (path, f)})
    assert sorted(listed) == ["bn_fc.aoti.pt2"]
    assert listed["bn_fc.aoti.pt2"]["device"] == "cpu"
    assert listed["bn_fc.aoti.pt2"]["inductor_configs"] == artifacts.AOTI_CONFIGS


def test_format_of_tells_aoti_from_pt2():
    assert artifacts.format_of("x/m.aoti.pt2") == "aoti" and artifacts.format_of("x/m.pt2") == "pt2"
    assert artifacts.format_of("m.torchscript.pt") == "torchscript"
    assert artifacts.CODE == {"torchscript", "pt2", "aoti"}


def test_onnx_metadata_and_contract(exported):
    out, ckpt, _ = exported
    proto = onnx.load(str(out / "bn_fc.onnx"))
    onnx.checker.check_model(proto)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["model"] == "bn_fc" and meta["params"] == "9594"
    assert json.loads(meta["classes"]) == [str(d) for d in range(10)]
    assert meta["test_acc"] == f"{ckpt['test_acc']:.2f}" and meta["torch_version"] == torch.__version__
    assert "0.1307" in meta["input"] and json.loads(meta["recipe"])["optimizer"][0] == "Adagrad"
    assert [i.name for i in proto.graph.input] == ["image"] and [o.name for o in proto.graph.output] == ["log_probs"]
    for name in ("bn_fc.torchscript.pt", "bn_fc.pt2"):  # and the aoti package: test_aoti_metadata_is_the_onnx_files
        got = artifacts.read_metadata(str(out / name))  # vouched for by the manifest: no --trust-code needed
        assert {k: got[k] for k in meta} == meta, name


@pytest.mark.slow
def test_aoti_metadata_is_the_onnx_files(exported, aoti_package):
    out, _, _ = exported
    meta = {p.key: p.value for p in onnx.load(str(out / "bn_fc.onnx")).metadata_props}
    got = artifacts.read_metadata(aoti_package[0])  # vouched for by the manifest: no --trust-code needed
    assert {k: got[k] for k in meta} == meta
    assert got["AOTI_DEVICE_KEY"] == "cpu"


@pytest.mark.parametrize("fmt", ["pt2", pytest.param("aoti", marks=pytest.mark.slow)])
def test_pt2_and_aoti_run_with_torch_alone(fmt, exported, mnist_dir, request):
    """Independent of export.verify and artifacts.load: torch's own loaders, dynamic batch sizes 1, 7, 1000."""
    from torch._inductor import aoti_load_package
    out, ckpt, _ = exported
    x, _ = data.load("test", mnist_dir)
    ref = models.log_probs(models.from_checkpoint(ckpt), x[:1000])
    x01 = x[:1000].unsqueeze(1).float() / 255
    run = torch.export.load(str(out / "bn_fc.pt2")).module() if fmt == "pt2" else \
        aoti_load_package(request.getfixturevalue("aoti_package")[0])
    with torch.no_grad():
        for n in (1, 7, 1000):
            got = run(x01[:n])
            assert got.shape == (n, 10) and got.dtype == torch.float32
            assert (got - ref[:n]).abs().max() < 1e-4 and (got.argmax(1) == ref[:n].argmax(1)).all()


@pytest.mark.slow
def test_aoti_input_is_checked(aoti_package):
    """Compiled code trusts its caller: fed a float64 or a 28x27 image it computes garbage without a
    word, so artifacts.load checks the input contract for it, and makes strided input contiguous."""
    run = artifacts.load(aoti_package[0])
    x = np.random.default_rng(0).random((4, 1, 28, 28), dtype=np.float32)
    for bad in (x.astype(np.float64), x[..., :27], x[:, 0]):
        with pytest.raises(errors.UserError, match=r"cannot run .*it was given"):
            run(bad)
    wide = np.zeros((4, 1, 28, 56), np.float32)
    wide[..., ::2] = x
    assert np.allclose(run(wide[..., ::2]), run(x), atol=1e-6)


def test_onnxruntime_predicts_like_the_checkpoint(exported, mnist_dir):
    """Independent of export.verify: a fresh onnxruntime session on the test set, batches 1 and 1000."""
    out, ckpt, _ = exported
    x, y = data.load("test", mnist_dir)
    ref = models.log_probs(models.from_checkpoint(ckpt), x)
    sess = ort.InferenceSession(str(out / "bn_fc.onnx"), providers=["CPUExecutionProvider"])
    x01 = (x.unsqueeze(1).float() / 255).numpy()
    got = np.concatenate([sess.run(None, {"image": x01[i:i + 1000]})[0] for i in range(0, 10000, 1000)])
    assert got.shape == (10000, 10)
    assert (got.argmax(1) == ref.argmax(1).numpy()).all()
    one = sess.run(None, {"image": x01[:1]})[0]
    assert one.shape == (1, 10) and np.abs(one - ref[:1].numpy()).max() < 1e-4


@pytest.mark.parametrize("fmt", ["onnx", "pt2", pytest.param("aoti", marks=pytest.mark.slow)])
def test_mismatch_fails_and_leaves_nothing(fmt, exported, mnist_dir, tmp_path, monkeypatch, request):
    """The session's verified file stands in for a second export (a minute-long compile for aoti):
    what is tested is export's verification and clean-up; the writers' own output, side files
    included, is test_every_format_verified's."""
    out, ckpt, figures = exported
    made = request.getfixturevalue("aoti_package")[0] if fmt == "aoti" else figures[fmt][0]
    copy = lambda *a, **k: shutil.copy(made, a[1])  # noqa: E731  write_*(module, path, ...)
    monkeypatch.setattr(artifacts, {"onnx": "write_onnx", "pt2": "write_pt2", "aoti": "write_aoti"}[fmt], copy)
    with pytest.raises(errors.UserError, match="does not match PyTorch"):
        export.export(ckpt, fmt, str(tmp_path), 18, mnist_dir, tolerance=-1.0)
    assert list(tmp_path.iterdir()) == []


def test_exporter_failure_is_one_line_and_leaves_nothing(trained, mnist_dir, tmp_path, monkeypatch):
    """torch's exporters fail with their own exception kinds and pages of detail (seen on an H100:
    torch.export's ConstraintViolationError): export.py says it in one line and writes nothing."""
    def fail(module, path, meta):
        open(path, "wb").write(b"half")
        raise RuntimeError("Constraints violated (batch)!\nSuggested fixes: ...")
    monkeypatch.setattr(artifacts, "write_pt2", fail)
    with pytest.raises(SystemExit) as e:
        export.main(["--checkpoint", str(trained / "best.pt"), "--format", "pt2", "--out", str(tmp_path),
                     "--data-dir", mnist_dir])
    assert str(e.value.code) == ("error: pt2 export of bn_fc failed in torch's exporter (RuntimeError: Constraints "
                                 "violated (batch)!); nothing written")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["bn_fc.torchscript.pt", "bn_fc.pt2",
                                  pytest.param("bn_fc.aoti.pt2", marks=pytest.mark.slow)])
def test_code_needs_the_manifest_or_trust_code(name, exported, tmp_path, request):
    out, _, _ = exported
    shutil.copy(request.getfixturevalue("aoti_package")[0] if name.endswith(".aoti.pt2") else out / name,
                tmp_path / name)
    with pytest.raises(errors.UserError, match="not listed in the manifest.json"):
        artifacts.load(str(tmp_path / name))
    assert artifacts.load(str(tmp_path / name), trust_code=True).metadata["model"] == "bn_fc"
    manifest.manifest_add(str(tmp_path / name), {})
    artifacts.load(str(tmp_path / name))  # vouched for now
    with open(tmp_path / name, "ab") as f:
        f.write(b"\0")  # any change to the bytes
    with pytest.raises(errors.UserError, match="sha256 differs"):
        artifacts.load(str(tmp_path / name))


@pytest.mark.parametrize("name", ["bn_fc.torchscript.pt", "bn_fc.pt2",
                                  pytest.param("bn_fc.aoti.pt2", marks=pytest.mark.slow)])
def test_a_file_swapped_after_hashing_is_not_what_loads(name, exported, tmp_path, monkeypatch, request):
    """The file is read once: the bytes hashed against the manifest are the bytes loaded (from memory;
    an AOTInductor package from torch's private temporary copy of them), so a file swapped between the
    check and the load changes nothing. The swap here puts code in its place (a .pt2 whose pickle makes
    a file, a TorchScript file that makes one) right after the hash; loading from the path again would
    run it or fail."""
    import test_hostile
    out, _, _ = exported
    good = request.getfixturevalue("aoti_package")[0] if name.endswith(".aoti.pt2") else out / name
    shutil.copy(good, tmp_path / name)
    manifest.manifest_add(str(tmp_path / name), {})
    monkeypatch.chdir(tmp_path)  # where the TorchScript file's code would create "pwned"
    evil = tmp_path / "evil"
    if name.endswith(".pt2") and not name.endswith(".aoti.pt2"):
        hostile_pt2(good, evil, tmp_path / "pwned")
    else:
        torch.jit.save(torch.jit.script(test_hostile.Evil()), str(evil))
    real, swapped = artifacts.check_trusted, []

    def check_then_swap(path, trust_code, blob=None):
        real(path, trust_code, blob)
        os.replace(evil, path)  # what a second process could do in the gap
        swapped.append(path)
    monkeypatch.setattr(artifacts, "check_trusted", check_then_swap)
    run = artifacts.load(str(tmp_path / name))
    assert swapped and not (tmp_path / "pwned").exists()
    assert run.metadata["model"] == "bn_fc" and run(np.zeros((2, 1, 28, 28), np.float32)).shape == (2, 10)
    monkeypatch.setattr(artifacts, "check_trusted", real)
    with pytest.raises(errors.UserError, match="sha256 differs"):  # the next load reads what is there now
        artifacts.load(str(tmp_path / name))
    assert not (tmp_path / "pwned").exists()


@pytest.mark.slow
def test_evaluate_refuses_an_unvouched_package_in_one_line(aoti_package, tmp_path, mnist_dir):
    shutil.copy(aoti_package[0], tmp_path / "bn_fc.aoti.pt2")
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--artifact", str(tmp_path / "bn_fc.aoti.pt2"), "--data-dir", mnist_dir])
    assert str(e.value.code).startswith("error: refusing") and "\n" not in str(e.value.code)
    assert "AOTInductor package is a program" in str(e.value.code)


class Hostile:
    """A pickle that creates the file `marker` when it is unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def hostile_pt2(good, evil, marker):
    """`good`'s .pt2 archive with its sample inputs swapped for a Hostile pickle, written to `evil`."""
    payload = io.BytesIO()
    torch.save((Hostile(marker), {}), payload)
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(evil, "w") as zout:
        names = [i.filename for i in zin.infolist()]
        assert any(n.endswith("data/sample_inputs/model.pt") for n in names)
        for info in zin.infolist():
            blob = zin.read(info.filename)
            zout.writestr(info, payload.getvalue() if info.filename.endswith("data/sample_inputs/model.pt") else blob)


def test_a_pt2_file_is_code(exported, tmp_path):
    """Why .pt2 follows the trust rule: torch.export.load unpickles the archive's sample inputs with
    torch.load(weights_only=False) once weights_only=True fails. A .pt2 whose sample inputs are a
    hostile pickle runs it on load, so without the manifest or --trust-code nothing of it is read."""
    out, _, _ = exported
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pt2"
    hostile_pt2(out / "bn_fc.pt2", evil, marker)
    with pytest.raises(errors.UserError, match="not listed"):
        artifacts.load(str(evil))
    assert not marker.exists()
    try:
        artifacts.load(str(evil), trust_code=True)  # the user's word: now it is loaded, and the pickle runs
    except errors.UserError:
        pass
    assert marker.exists()


def test_missing_compiler_is_one_line_and_writes_nothing(trained, mnist_dir, tmp_path):
    """No C++ compiler (none on PATH, CXX pointing nowhere): --format all stops before the first
    export with one line, not after three formats and a minute of inductor tracebacks."""
    empty = tmp_path / "bin"
    empty.mkdir()
    env = dict(os.environ, PATH=str(empty), CXX=str(empty / "g++"), MNIST_DIR=mnist_dir)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "export.py"), "--checkpoint", str(trained / "best.pt"),
                        "--format", "all", "--out", str(tmp_path / "x")], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --format aoti needs a C++ compiler"), r.stderr
    assert not (tmp_path / "x").exists()


def test_cli_without_checkpoint_says_what_to_run(tmp_path, monkeypatch, capsys):
    """No run under the current folder and no shipped checkpoint beside the scripts: it says what to run."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(runfiles, "__file__", str(tmp_path / "runfiles.py"))  # no pretrained/ beside it
    with pytest.raises(SystemExit) as e:
        export.main(["--format", "onnx"])
    assert "python train.py --model bn_gap" in str(e.value.code)


def test_a_zero_tolerance_is_met_by_an_exact_export(monkeypatch):
    """--tolerance 0 and --int8-tolerance 0 ask for an exact export, and every check is "at most": a file
    that gives PyTorch's log-probabilities exactly (for int8: the fp32 accuracy exactly) is kept; one off
    by 1e-6 is not."""
    ref = torch.log_softmax(torch.randn(50, 10, generator=torch.Generator().manual_seed(0)), 1)
    images, labels = torch.zeros(50, 28, 28, dtype=torch.uint8), ref.argmax(1)
    src = export.Source(ckpt=None, module=None, meta=None, images=images, labels=labels, reference=ref)
    for off, ok in ((0.0, True), (1e-6, False)):
        monkeypatch.setattr(artifacts, "classifier", lambda *a, **k: lambda x, batch_size=1000: ref + off)
        f = export.verify("m.onnx", ref, images, labels, 0.0)
        # float32 rounds ref + 1e-6 to a neighbour of it: the difference is near 1e-6, not exactly it
        assert f["ok"] is ok and f["max_abs_diff"] == pytest.approx(off, abs=2.5e-7), f
    monkeypatch.setattr(artifacts, "classifier", lambda *a, **k: lambda x, batch_size=1000: ref)
    assert export.verify_int8("m.int8.onnx", src, 0.0)["ok"]
