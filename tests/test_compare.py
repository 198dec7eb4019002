"""compare.py: two models on the same test images, checked against an independent computation from
their two prediction vectors (counts by numpy, the exact binomial p-value summed by hand)."""
import json
import math
import os
import shutil

import numpy as np
import onnxruntime as ort
import pytest
from test_predict import HOSTILE, HOSTILE_SHOWN, hostile_export, strict_utf8

import artifacts
import compare
import data
import models
import runfiles
import stats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def independent(pred_a, pred_b, y):
    """The figures compare.py must give, from two prediction vectors alone."""
    a, b = pred_a == y, pred_b == y
    only_a, only_b = int((~a & b).sum()), int((a & ~b).sum())
    n, k = only_a + only_b, min(only_a, only_b)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n) if n else 1.0
    z = 1.959963984540054

    def wilson(c):
        q, m = c / len(y), len(y)
        half = z * math.sqrt(q * (1 - q) / m + z * z / (4 * m * m))
        return [round(100 * (q + z * z / (2 * m) + s * half) / (1 + z * z / m), 2) for s in (-1, 1)]
    return dict(a=(round(100 * a.mean(), 2), wilson(int(a.sum()))), b=(round(100 * b.mean(), 2), wilson(int(b.sum()))),
                both_right=int((a & b).sum()), only_a_wrong=only_a, only_b_wrong=only_b, both_wrong=int((~a & ~b).sum()),
                mcnemar_p=p)


def check(got, want):
    for side in "ab":
        assert (got[side]["accuracy"], got[side]["ci95"]) == want[side]
    for k in ("both_right", "only_a_wrong", "only_b_wrong", "both_wrong"):
        assert got[k] == want[k], k
    assert got["mcnemar_p"] == pytest.approx(want["mcnemar_p"], rel=1e-9)
    assert got["both_right"] + got["only_a_wrong"] + got["only_b_wrong"] + got["both_wrong"] == 10000


def run_json(capsys, *argv):
    compare.main([*argv, "--json", "--device", "cpu"])
    return json.loads(capsys.readouterr().out)


def test_two_checkpoints_match_an_independent_computation(mnist_dir, capsys, pretrained_log_probs):
    x, y = data.load("test", mnist_dir)
    a, b = (os.path.join(ROOT, "pretrained", n + ".pt") for n in ("bn_fc", "gap10k"))
    got = run_json(capsys, a, b, "--data-dir", mnist_dir)
    # models.log_probs of each checkpoint on x, computed once for the session (test_pretrained's too)
    pred = [pretrained_log_probs(n).argmax(1).numpy() for n in ("bn_fc", "gap10k")]
    check(got, independent(*pred, y.numpy()))
    assert got["a"]["model"] == "bn_fc" and got["b"]["model"] == "gap10k" and got["a"]["kind"] == "checkpoint"
    assert got["verdict"].startswith("no significant difference" if got["mcnemar_p"] >= 0.05 else ("A is" if
                                     got["only_b_wrong"] > got["only_a_wrong"] else "B is"))


def test_two_exports_match_onnxruntime_itself(exports, mnist_dir, tmp_path, capsys):
    """bn_fc's verified .onnx from the session against gap10k's pretrained weights written as ONNX here;
    the independent side runs both files in fresh onnxruntime sessions."""
    out, _, figures = exports
    ckpt = runfiles.load_checkpoint(os.path.join(ROOT, "pretrained", "gap10k.pt"))
    other = str(tmp_path / "gap10k.onnx")
    artifacts.write_onnx(artifacts.Exportable(models.from_checkpoint(ckpt)).eval(), other, artifacts.metadata(ckpt), 18)
    got = run_json(capsys, figures["onnx"][0], other, "--data-dir", mnist_dir)
    x, y = data.load("test", mnist_dir)
    x01 = (x.unsqueeze(1).float() / 255).numpy()
    pred = [np.concatenate([ort.InferenceSession(p, providers=["CPUExecutionProvider"]).run(None, {"image": x01[i:i + 2000]})[0]
                            for i in range(0, 10000, 2000)]).argmax(1) for p in (figures["onnx"][0], other)]
    check(got, independent(*pred, y.numpy()))
    assert (got["a"]["kind"], got["b"]["kind"], got["b"]["model"]) == ("onnx", "onnx", "gap10k")


def test_a_model_against_itself_and_its_export(exports, mnist_dir, capsys):
    """The same predictions: no discordant pair, p = 1, no difference."""
    _, ckpt, figures = exports
    got = run_json(capsys, figures["pt2"][0], figures["onnx"][0], "--data-dir", mnist_dir)
    assert got["only_a_wrong"] == got["only_b_wrong"] == 0 and got["mcnemar_p"] == 1.0
    assert got["a"]["accuracy"] == got["b"]["accuracy"] == ckpt["test_acc"]
    assert got["verdict"].startswith("no significant difference at the 5% level")


def test_paired_and_verdict_on_a_hand_case():
    # 20 images: both right on 10, only A wrong on 8, only B wrong on 1, both wrong on 1
    a = [True] * 10 + [False] * 8 + [True] + [False]
    b = [True] * 10 + [True] * 8 + [False] + [False]
    t = stats.paired(a, b)
    assert (t["both_right"], t["only_a_wrong"], t["only_b_wrong"], t["both_wrong"]) == (10, 8, 1, 1)
    assert t["mcnemar_p"] == pytest.approx(2 * (1 + 9) / 2 ** 9)        # P(X <= 1 | n=9, 1/2), two-sided
    assert stats.verdict(t).startswith("B is better than A at the 5% level")
    assert stats.verdict(stats.paired(b, a)).startswith("A is better than B at the 5% level")


@pytest.mark.parametrize("argv, words", [
    (["missing.pt", "bn_fc"], "checkpoint missing.pt does not exist"),
    (["bn_fc", "nowhere.onnx"], "artifact nowhere.onnx does not exist"),
    (["bn_fc", "x.txt"], "cannot read checkpoint x.txt"),
    (["bn_fx", "bn_fc"], "unknown model 'bn_fx'; choose one of: " + ", ".join(models.RECIPES)),
    (["runs", "bn_fc"], "runs is a folder: A and B are each a checkpoint file, an exported file or a model name"),
    (["bn_fc", "exports.onnx"], "exports.onnx is a folder"),
])
def test_bad_input_is_one_line(argv, words, tmp_path, monkeypatch, mnist_dir):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.txt").write_text("hello")
    (tmp_path / "runs").mkdir()
    (tmp_path / "exports.onnx").mkdir()
    os.symlink(os.path.join(ROOT, "pretrained"), tmp_path / "pretrained")
    with pytest.raises(SystemExit) as e:
        compare.main([*argv, "--data-dir", mnist_dir])
    assert words in str(e.value.code) and "\n" not in str(e.value.code) and str(e.value.code).startswith("error: ")


def test_code_bearing_export_needs_trust(exports, tmp_path, mnist_dir):
    import shutil
    out, _, _ = exports
    shutil.copy(out / "bn_fc.torchscript.pt", tmp_path / "bn_fc.torchscript.pt")
    with pytest.raises(SystemExit) as e:
        compare.main([str(tmp_path / "bn_fc.torchscript.pt"), str(out / "bn_fc.onnx"), "--data-dir", mnist_dir])
    assert str(e.value.code).startswith("error: refusing") and "not listed in" in str(e.value.code)


def test_names_print_escaped_on_a_strict_utf8_stream(exports, mnist_dir, tmp_path, monkeypatch):
    """A checkpoint and an export named with byte 0xff and escape sequences: each line names the file
    and the model that answered, the names escaped (\\xff, \\x1b), on a strict UTF-8 stream."""
    ckpt = os.fsdecode(os.path.join(os.fsencode(tmp_path), HOSTILE + b".pt"))
    shutil.copy(os.path.join(ROOT, "pretrained", "bn_fc.pt"), ckpt)
    onnx_path = hostile_export(exports[2]["onnx"][0], tmp_path)
    printed = strict_utf8(monkeypatch)
    compare.main([ckpt, onnx_path, "--data-dir", mnist_dir, "--device", "cpu"])
    out, err = printed()
    a, b = out.decode().splitlines()[:2]
    assert a.startswith(f"A  {tmp_path}/{HOSTILE_SHOWN}.pt (bn_fc, checkpoint): ")
    assert b.startswith(f"B  {tmp_path}/{HOSTILE_SHOWN}.onnx (bn_fc, onnx): ")
    assert b"\x1b" not in out and err == b""
