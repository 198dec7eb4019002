import hashlib
import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import artifacts
import common
import data
import export
import models


@pytest.fixture(scope="module")
def exported(trained, mnist_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("exports")
    ckpt = common.load_checkpoint(str(trained / "best.pt"))
    figures = {fmt: export.export(ckpt, fmt, str(out), 18, mnist_dir, 1e-4) for fmt in ("onnx", "torchscript")}
    return out, ckpt, figures


def test_both_formats_verified(exported):
    out, ckpt, figures = exported
    for fmt, (path, f) in figures.items():
        assert f["ok"] and f["same_predictions"] == 10000 and f["max_abs_diff"] <= 1e-4
        assert f["accuracy"] == ckpt["test_acc"]
    assert sorted(p.name for p in out.iterdir()) == ["bn_fc.onnx", "bn_fc.torchscript.pt", "manifest.json"]
    manifest = json.loads((out / "manifest.json").read_text())["files"]
    for fmt, (path, f) in figures.items():
        entry = manifest[os.path.basename(path)]
        assert entry["sha256"] == hashlib.sha256(open(path, "rb").read()).hexdigest() and entry["format"] == fmt


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
    assert artifacts.read_metadata(str(out / "bn_fc.torchscript.pt"))["model"] == "bn_fc"


def test_onnxruntime_predicts_like_the_checkpoint(exported, mnist_dir):
    """Independent of export.verify: a fresh onnxruntime session on the test set, batches 1 and 1000."""
    out, ckpt, _ = exported
    x, y = data.load("test", mnist_dir)
    ref = models.predict(models.from_checkpoint(ckpt), x)
    sess = ort.InferenceSession(str(out / "bn_fc.onnx"), providers=["CPUExecutionProvider"])
    x01 = (x.unsqueeze(1).float() / 255).numpy()
    got = np.concatenate([sess.run(None, {"image": x01[i:i + 1000]})[0] for i in range(0, 10000, 1000)])
    assert got.shape == (10000, 10)
    assert (got.argmax(1) == ref.argmax(1).numpy()).all()
    one = sess.run(None, {"image": x01[:1]})[0]
    assert one.shape == (1, 10) and np.abs(one - ref[:1].numpy()).max() < 1e-4


def test_mismatch_fails_and_leaves_nothing(trained, mnist_dir, tmp_path):
    ckpt = common.load_checkpoint(str(trained / "best.pt"))
    with pytest.raises(common.UserError, match="does not match PyTorch"):
        export.export(ckpt, "onnx", str(tmp_path), 18, mnist_dir, tolerance=-1.0)
    assert list(tmp_path.iterdir()) == []


def test_cli_without_checkpoint_says_what_to_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        export.main(["--format", "onnx"])
    assert "python train.py --model bn_gap" in str(e.value.code)
