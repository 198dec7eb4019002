"""int8 ONNX (export.py --format onnx-int8): written, verified against the fp32 model on all 10,000
test images, refused with nothing written when the tolerance cannot be met, loaded by evaluate.py,
predict.py and compare.py; its calibration set comes from the training images only."""
import hashlib
import json
import os
import shutil
import subprocess

import onnx
import pytest
import torch

import artifacts
import compare
import data
import errors
import evaluate
import export
import predict
import runfiles

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# bn_gap: its shipped checkpoint loses 0.04 pp at int8; the shipped bn_fc loses 0.75 pp (99.49% -> 98.74%),
# which the default --int8-tolerance 0.2 refuses (test_an_impossible_tolerance_writes_nothing is that path)
PRETRAINED = os.path.join(ROOT, "pretrained", "bn_gap.pt")


OLD = bytes(range(256)) * 4096  # 1 MiB: the file an earlier export left, which a reader has open


@pytest.fixture(scope="module")
def int8(tmp_path_factory, mnist_dir):
    """pretrained bn_gap as int8 ONNX, through export.py's own command line (verification included). It
    also stands for the rule on output folders: --out is a symlink to the checkpoint's own folder, where
    an older bn_gap.int8.onnx is being read by another process (a shell holding it open) as the export
    replaces it. Returns (--out, checkpoint, path, figures, what the reader read, the real folder)."""
    real = tmp_path_factory.mktemp("int8")
    shutil.copy(PRETRAINED, real / "bn_gap.pt")
    (real / "bn_gap.int8.onnx").write_bytes(OLD)
    out = real.parent / (real.name + "-link")
    os.symlink(real, out)
    reader = subprocess.Popen(["sh", "-c", 'exec 3< "$1"; echo open; read go; cat <&3', "sh",
                               str(real / "bn_gap.int8.onnx")], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert reader.stdout.readline() == b"open\n"
    made = []
    try:
        with pytest.MonkeyPatch.context() as m:
            verified = export.export_verified
            m.setattr(export, "export_verified", lambda *a, **k: made.append(verified(*a, **k)) or made[-1])
            export.main(["--checkpoint", str(real / "bn_gap.pt"), "--format", "onnx-int8", "--out", str(out),
                         "--data-dir", mnist_dir])
        read, _ = reader.communicate(b"go\n", timeout=60)
    finally:
        reader.kill()
    (path, figures), = made
    return out, runfiles.load_checkpoint(PRETRAINED), path, figures, read, real


def test_int8_is_written_verified_and_recorded(int8):
    out, ckpt, path, f, _, _ = int8
    assert path == str(out / "bn_gap.int8.onnx")
    assert sorted(os.listdir(out)) == ["bn_gap.int8.onnx", "bn_gap.pt", "manifest.json"]  # the checkpoint's folder
    assert f["ok"] and f["fp32_accuracy"] == ckpt["test_acc"] and abs(f["accuracy"] - ckpt["test_acc"]) <= 0.2
    assert abs(f["batch1_accuracy"] - ckpt["test_acc"]) <= 0.2 and 9900 <= f["same_predictions"] <= 10000
    entry = json.loads((out / "manifest.json").read_text())["files"]["bn_gap.int8.onnx"]
    assert entry["format"] == "onnx-int8" and entry["sha256"] == hashlib.sha256(open(path, "rb").read()).hexdigest()
    assert entry["agreement_with_fp32"] == f["same_predictions"] and entry["calibration_images"] == 1024
    proto = onnx.load(path)
    ops = {n.op_type for n in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops            # QDQ: really quantised
    assert any(i.data_type == onnx.TensorProto.INT8 for i in proto.graph.initializer)  # int8 weights
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["model"] == "bn_gap" and "training images" in meta["calibration"]
    assert json.loads(meta["quantization"])["per_channel"] is True
    assert [i.name for i in proto.graph.input] == ["image"] and [o.name for o in proto.graph.output] == ["log_probs"]
    assert artifacts.format_of(path) == "onnx-int8" and "onnx-int8" not in artifacts.CODE


def test_export_over_a_file_being_read_into_a_symlinked_input_folder(int8):
    """The rule for export.py's outputs: each file is written under a temporary name and renamed over
    the old one, so a process reading the old file reads it whole, to its last byte, and a new open
    gets the new file; --out may be a symlink (written where it points) and an input's folder (the
    checkpoint is left as it was, as is the symlink)."""
    out, _, path, _, read, real = int8
    assert read == OLD
    assert open(path, "rb").read(4) != OLD[:4] and not os.path.islink(path)
    assert os.path.islink(out) and os.path.realpath(out) == str(real)
    assert open(real / "bn_gap.pt", "rb").read() == open(PRETRAINED, "rb").read()


def test_an_impossible_tolerance_writes_nothing(int8, mnist_dir, tmp_path, monkeypatch):
    ckpt = runfiles.load_checkpoint(PRETRAINED)
    # the module's int8 file stands in for a second quantisation: the verification is what is tested
    monkeypatch.setattr(artifacts, "write_onnx_int8", lambda module, path, meta, opset, calib: shutil.copy(int8[2], path))
    with pytest.raises(errors.UserError, match="loses too much accuracy.*nothing written"):
        export.export(ckpt, "onnx-int8", str(tmp_path), 18, mnist_dir, 1e-4, int8_tolerance=-1.0)
    assert list(tmp_path.iterdir()) == []


def test_evaluate_predict_and_compare_read_it(int8, mnist_dir, tmp_path, capsys):
    out, ckpt, path, f, _, _ = int8
    r = evaluate.evaluate(path, "artifact", str(tmp_path / "eval"), mnist_dir, torch.device("cpu"))
    assert r["accuracy"] == f["accuracy"] and r["model"] == "bn_gap"
    x, _ = data.load("test", mnist_dir)
    classify, info = predict.load_classifier(predict.parse_args(["--artifact", path, "x.png"]))
    assert info["model"] == "bn_gap" and classify(x[:5]).shape == (5, 10)
    compare.main([PRETRAINED, path, "--json", "--data-dir", mnist_dir, "--device", "cpu"])
    got = json.loads(capsys.readouterr().out)
    assert got["b"]["kind"] == "onnx-int8" and got["b"]["accuracy"] == f["accuracy"]
    assert got["both_right"] + got["only_a_wrong"] + got["only_b_wrong"] + got["both_wrong"] == 10000
    assert 10000 - got["only_a_wrong"] - got["only_b_wrong"] >= f["same_predictions"]  # agreeing on right/wrong


def test_calibration_reads_only_training_images(mnist_dir, monkeypatch):
    """By construction: calibration_set takes no split, its images are the training split's (the test
    split is read only to refuse a training file holding test images: test_hostile's 'int8:' case); and
    none of them is a test image."""
    splits = []
    real = data.load
    monkeypatch.setattr(data, "load", lambda split, data_dir=None: splits.append(split) or real(split, data_dir))
    calib = data.calibration_set(mnist_dir)
    assert splits == ["train", "test"] and calib.shape == (1024, 1, 28, 28) and calib.dtype == "float32"
    test_x, _ = real("test", mnist_dir)
    test_hashes = {hashlib.sha256(im.numpy().tobytes()).digest() for im in test_x}
    as_uint8 = torch.from_numpy(calib[:, 0] * 255).round().to(torch.uint8)
    assert not any(hashlib.sha256(im.numpy().tobytes()).digest() in test_hashes for im in as_uint8)
    assert torch.equal(as_uint8, real("train", mnist_dir)[0][:1024])


def test_bench_times_the_int8_file(tmp_path, mnist_dir):
    import bench
    out = tmp_path / "b.json"
    bench.main(["--task", "infer", "--model", "bn_gap", "--device", "cpu", "--backend", "onnxruntime",
                "onnxruntime-int8", "--repeats", "1", "--calls", "3", "--data-dir", mnist_dir, "--json", str(out)])
    got = json.loads(out.read_text())
    assert got["environment"]["skipped"] == []
    int8 = {(r["threads"], r["metric"]): r["value"] for r in got["records"] if r["backend"] == "onnxruntime-int8"}
    fp32 = {(r["threads"], r["metric"]): r["value"] for r in got["records"] if r["backend"] == "onnxruntime"}
    assert int8.keys() == fp32.keys() and all(v > 0 for v in int8.values())
    assert int8[(None, "file_bytes")] < fp32[(None, "file_bytes")]   # int8 weights: a smaller file
