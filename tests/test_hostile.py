"""Hostile and careless input, each class run as a real process: exit code, exactly one stderr line
starting 'error:', no traceback, no partial file, and for code-bearing artifacts no code run.

The cases run in one batch through the session's fork server (conftest.py `forked`, forked_cli.py):
it imports torch and the scripts once, then forks one child per case (its own exit code, stderr and
working folder), which keeps ~40 process runs fast. Warnings are off in them (PYTHONWARNINGS=ignore),
as they always were here: a hostile file may well make a library warn; the one line is ours."""
import hashlib
import json
import os
import shutil
import stat
import zipfile
import zlib

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

import artifacts
import errors
import fileio
import manifest
import runfiles

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# --------------------------------------------------------------------------- hostile files

class Evil(torch.nn.Module):
    """A TorchScript module whose __setstate__ creates a file when torch.jit.load runs it."""

    def __init__(self):
        super().__init__()
        self.w = torch.zeros(1)

    def forward(self, x):
        return torch.zeros(x.shape[0], 10).log_softmax(1)

    @torch.jit.export
    def __getstate__(self) -> list[torch.Tensor]:
        return [self.w]

    @torch.jit.export
    def __setstate__(self, state: list[torch.Tensor]) -> None:
        self.training = False
        self.w = torch.from_file("pwned", True, 8) + state[0].sum()


class TupleOut(torch.nn.Module):
    def forward(self, x):
        return x.flatten(1)[:, :10], x.flatten(1)[:, :10]


def onnx_file(path, inputs, outputs, nodes):
    graph = helper.make_graph(nodes, "g", inputs, outputs)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)


def tensor(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def gzip_bomb(path, head, inflated):
    """A .gz whose IDX header is right but whose body inflates to `inflated` bytes of zeros (level 1:
    1 GiB from 4.5 MB, in a third of level 9's time; the reader sees the same stream)."""
    comp, chunk = zlib.compressobj(1, zlib.DEFLATED, 31), bytes(1 << 24)
    with open(path, "wb") as f:
        f.write(comp.compress(head))
        for _ in range(inflated // len(chunk)):
            f.write(comp.compress(chunk))
        f.write(comp.flush())


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, mnist_dir, trained):
    d = tmp_path_factory.mktemp("hostile")
    best = torch.load(trained / "best.pt", weights_only=True)
    last = torch.load(trained / "last.pt", weights_only=True)
    save = lambda obj, name: torch.save(obj, d / name)  # noqa: E731
    save(dict(best, model={"features.0.0.weight": 1}), "not-tensors.pt")
    save(dict(best, model_name=5), "name-not-str.pt")
    save({k: v for k, v in best.items() if k != "epoch"}, "no-epoch.pt")
    save(dict(best, test_acc="high"), "acc-not-number.pt")
    save(dict(best, model_name="gap10k"), "wrong-shapes.pt")
    nan = {k: v.clone() for k, v in best["model"].items()}
    nan["fc.weight"][0, 0] = float("nan")
    save(dict(best, model=nan), "nan.pt")
    # a zip checkpoint with a deflated entry: torch never writes one, and it could inflate without bound
    with zipfile.ZipFile(trained / "best.pt") as src, zipfile.ZipFile(d / "deflated.pt", "w") as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info), compress_type=zipfile.ZIP_DEFLATED)
    with open(d / "huge.pt", "wb") as f:
        f.truncate(runfiles.MAX_CHECKPOINT_BYTES + 1)  # sparse: costs no disk
    for name, ckpt in (("best-copy", best), ("bad-optimizer", dict(last, optimizer={"state": {}, "param_groups": [
            {"params": [0, 1], "lr": 0.1}]}))):
        (d / name).mkdir()
        torch.save(ckpt, d / name / "last.pt")
    # data: a gzip with a corrupt deflate stream, and a gzip bomb
    for name in ("badzlib", "bomb"):
        shutil.copytree(mnist_dir, d / name, ignore=shutil.ignore_patterns("README*"))
    raw = (d / "badzlib" / "t10k-labels-idx1-ubyte.gz").read_bytes()
    (d / "badzlib" / "t10k-labels-idx1-ubyte.gz").write_bytes(raw[:40] + bytes(200) + raw[240:])
    head = (2051).to_bytes(4, "big") + (10000).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    gzip_bomb(d / "bomb" / "t10k-images-idx3-ubyte.gz", head, 1 << 30)
    # exported files: code, and files that break the output contract
    meta = {"metadata.json": json.dumps({"model": "bn_fc"})}  # what every export carries: each case tests its own point
    torch.jit.save(torch.jit.script(Evil()), d / "evil.torchscript.pt", _extra_files=meta)
    (d / "listed").mkdir()
    shutil.copy(d / "evil.torchscript.pt", d / "listed" / "evil.torchscript.pt")
    (d / "listed" / "manifest.json").write_text(json.dumps({"files": {"evil.torchscript.pt": {"sha256": "0" * 64}}}))
    torch.jit.save(torch.jit.script(TupleOut()), d / "tuple.torchscript.pt", _extra_files=meta)
    onnx_file(str(d / "out5.onnx"), [tensor("image", ["N", 1, 28, 28])], [tensor("y", ["N", 5])],
              [helper.make_node("Flatten", ["image"], ["y0"]),
               helper.make_node("Slice", ["y0", "s", "e", "a"], ["y"])])
    m = onnx.load(str(d / "out5.onnx"))
    m.graph.initializer.extend([helper.make_tensor(n, TensorProto.INT64, [1], [v])
                                for n, v in (("s", 0), ("e", 5), ("a", 1))])
    onnx.save(m, str(d / "out5.onnx"))
    onnx_file(str(d / "two-out.onnx"), [tensor("image", ["N", 1, 28, 28])],
              [tensor("a", ["N", 1, 28, 28]), tensor("b", ["N", 1, 28, 28])],
              [helper.make_node("Identity", ["image"], ["a"]), helper.make_node("Identity", ["image"], ["b"])])
    onnx_file(str(d / "flat-in.onnx"), [tensor("image", ["N", 784])], [tensor("y", ["N", 784])],
              [helper.make_node("Identity", ["image"], ["y"])])
    # a run folder with garbage beside a good checkpoint, read through a symlink to it (so --out, the run
    # folder by default, is a symlink elsewhere), and a symlink at report.html pointing out of it
    (d / "garbage-run").mkdir()
    shutil.copy(trained / "best.pt", d / "garbage-run" / "best.pt")
    (d / "garbage-run" / "metrics.csv").write_text("epoch,test_acc\n1,abc\n\x00\x01")
    (d / "garbage-run" / "summary.json").write_text("[1, 2, 3]")
    os.symlink(d / "garbage-run", d / "run-link")
    (d / "outside.html").write_text("not yours")
    os.symlink(d / "outside.html", d / "garbage-run" / "report.html")
    os.symlink(d / "nowhere", d / "dangling")
    # manifests export.py never writes, each beside a copy of the evil TorchScript file
    sha = hashlib.sha256((d / "evil.torchscript.pt").read_bytes()).hexdigest()
    vouch = lambda name: {"files": {name: {"sha256": sha}}}  # noqa: E731
    for name, text in (("garbage", '{"files": {'), ("list", "[1, 2]"),
                       ("no-sha", '{"files": {"evil.torchscript.pt": {}}}'),
                       ("dotdot", json.dumps(vouch("../dotdot/evil.torchscript.pt"))),
                       ("absolute", json.dumps(vouch(str(d / "absolute" / "evil.torchscript.pt")))),
                       ("good", json.dumps(vouch("evil.torchscript.pt"))), ("huge", None), ("link", None)):
        (d / "m" / name).mkdir(parents=True)
        shutil.copy(d / "evil.torchscript.pt", d / "m" / name / "evil.torchscript.pt")
        if text is not None:
            (d / "m" / name / "manifest.json").write_text(text)
    with open(d / "m" / "huge" / "manifest.json", "wb") as f:
        f.truncate(manifest.MAX_MANIFEST_BYTES + 1)  # sparse
    os.symlink(d / "m" / "good" / "manifest.json", d / "m" / "link" / "manifest.json")  # vouches for these bytes
    # files whose bytes are another format than their names say
    pt2 = torch._C.PyTorchFileWriter(str(d / "archive.pt2"))  # a PT2 archive (no program) as torch's
    for name, value in (("archive_format", b"pt2"), ("archive_version", b"0"), ("extra/metadata.json", b"{}")):
        pt2.write_record(name, value, len(value))  # PT2ArchiveWriter writes one (without importing torch.export)
    pt2.write_end_of_file()
    (d / "kinds").mkdir()
    for src, name in (("evil.torchscript.pt", "evil.onnx"), ("archive.pt2", "archive.onnx"), ("out5.onnx", "onnx.pt2"),
                      ("evil.torchscript.pt", "evil.pt2"), ("archive.pt2", "archive.torchscript.pt"),
                      ("archive.pt2", "archive.aoti.pt2"), ("evil.torchscript.pt", "evil.aoti.pt2"),
                      ("evil.torchscript.pt", "evil.int8.onnx")):
        shutil.copy(d / src, d / "kinds" / name)
    # outputs that would replace the command's own input: a checkpoint named as export's or evaluate's output
    (d / "clash").mkdir()
    for name in ("bn_fc.onnx", "report.json"):
        shutil.copy(trained / "best.pt", d / "clash" / name)
    # a data folder whose training images include a test image: never an int8 calibration set
    (d / "leaky").mkdir()
    for stem in ("train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        os.symlink(os.path.join(mnist_dir, stem + ".gz"), d / "leaky" / (stem + ".gz"))
    import data
    train = np.zeros((60000, 28, 28), np.uint8)  # blank, but for image 700: the first test image
    train[700] = data.load("test", mnist_dir)[0][0].numpy()
    head = (2051).to_bytes(4, "big") + (60000).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    (d / "leaky" / "train-images-idx3-ubyte").write_bytes(head + train.tobytes())
    (d / "a-folder.json").mkdir()
    # what may stand at an output's name: a FIFO, a link to /dev/stdout, a read-only file; a folder at
    # export.py's own output name and at its manifest's; evaluate's report.json a FIFO
    (d / "out").mkdir()
    os.mkfifo(d / "out" / "fifo.json")
    os.symlink("/dev/stdout", d / "out" / "stdout.json")
    (d / "out" / "ro.json").write_text("{}")
    os.chmod(d / "out" / "ro.json", 0o444)
    (d / "taken" / "bn_fc.onnx").mkdir(parents=True)
    (d / "manifest-dir" / "manifest.json").mkdir(parents=True)
    (d / "fifo-out").mkdir()
    os.mkfifo(d / "fifo-out" / "report.json")
    (d / "a-file").write_text("not MNIST")
    # user files beside evaluate's outputs that look like temp files: never removed
    for name in LOOKALIKES:
        (d / "garbage-run" / name).write_text("mine")
    # ONNX files that loop, ask for 2**40 floats, give logits or carry escape sequences in their metadata
    import test_contract
    (d / "onnx").mkdir()
    crafted = {case: kw for case, kw, _ in test_contract.HOSTILE}
    for name, case in (("loop", "a Loop of 10**15 iterations"), ("bomb", "a ConstantOfShape of 2**40 floats")):
        test_contract.classifier_onnx(d / "onnx" / f"{name}.onnx", **crafted[case])
    test_contract.classifier_onnx(d / "onnx" / "logits.onnx", log_softmax=False)
    title = dict(test_contract.META, model="bn_fc\x1b]0;owned\x07\x1b[2J")  # retitles the window, clears the screen
    test_contract.classifier_onnx(d / "onnx" / "title.onnx", meta=title)
    (d / "held").mkdir()
    (d / "cuda-run").mkdir()
    torch.save(dict(last, rng=dict(last["rng"], device="cuda")), d / "cuda-run" / "last.pt")
    return d


LOOKALIKES = ["holiday.2019.tmp.jpg", "report.json.12.tmp", f"report.html.{'9' * 20}.tmp", "notes.99999.tmp.txt"]
CASES = [  # (id, script, args, expected exit code, what stderr must say)
    ("code: TorchScript without a manifest", "evaluate.py", ["--artifact", "{h}/evil.torchscript.pt"], 1,
     "is not listed in the manifest.json"),
    ("code: TorchScript whose sha256 differs", "evaluate.py", ["--artifact", "{h}/listed/evil.torchscript.pt"], 1,
     "sha256 differs"),
    ("ckpt: model not tensors", "evaluate.py", ["--checkpoint", "{h}/not-tensors.pt"], 1, "not a dict of tensors"),
    ("ckpt: model_name not a string", "evaluate.py", ["--checkpoint", "{h}/name-not-str.pt"], 1, "needs model_name"),
    ("ckpt: epoch missing", "export.py", ["--checkpoint", "{h}/no-epoch.pt", "--out", "x"], 1, "epoch missing"),
    ("ckpt: test_acc not a number", "evaluate.py", ["--checkpoint", "{h}/acc-not-number.pt"], 1, "test_acc"),
    ("ckpt: shapes do not fit", "evaluate.py", ["--checkpoint", "{h}/wrong-shapes.pt"], 1, "do not fit the gap10k"),
    ("ckpt: NaN weights (evaluate)", "evaluate.py", ["--checkpoint", "{h}/nan.pt"], 1, "NaN or infinite weights"),
    ("ckpt: NaN weights (export)", "export.py", ["--checkpoint", "{h}/nan.pt", "--out", "x"], 1, "NaN or infinite"),
    ("ckpt: compressed entries", "evaluate.py", ["--checkpoint", "{h}/deflated.pt"], 1, "compressed entries"),
    ("ckpt: too large", "evaluate.py", ["--checkpoint", "{h}/huge.pt"], 1, "larger than any checkpoint"),
    ("resume: best.pt copied as last.pt", "train.py", ["--resume", "{h}/best-copy", "--device", "cpu"], 1,
     "no training state"),
    ("resume: optimizer state does not fit", "train.py", ["--resume", "{h}/bad-optimizer"], 1,
     "optimizer, schedule or RNG state do not fit"),
    ("resume: flags it would ignore", "train.py", ["--resume", "{t}", "--epochs", "5", "--amp"], 1,
     "drop --epochs, --amp"),
    ("resume: another recipe", "train.py", ["--resume", "{t}", "--model", "gap10k"], 1, "is a bn_fc run, not gap10k"),
    ("export: output not [N, 10]", "evaluate.py", ["--artifact", "{h}/out5.onnx"], 1, "[N, 10] output"),
    ("export: two outputs", "evaluate.py", ["--artifact", "{h}/two-out.onnx"], 1, "[N, 10] output"),
    ("export: input not [N, 1, 28, 28]", "evaluate.py", ["--artifact", "{h}/flat-in.onnx"], 1, "[N, 1, 28, 28] input"),
    ("export: TorchScript tuple output", "evaluate.py", ["--artifact", "{h}/tuple.torchscript.pt", "--trust-code"], 1,
     "breaks the output contract"),
    ("data: corrupt deflate stream", "train.py", ["--data-dir", "{h}/badzlib", "--device", "cpu"], 1,
     "cannot read t10k-labels-idx1-ubyte.gz"),
    ("data: gzip bomb", "evaluate.py", ["--checkpoint", "{t}/best.pt", "--data-dir", "{h}/bomb"], 1,
     "truncated or padded: more than"),
    ("args: --seed below 0", "train.py", ["--seed", "-1"], 1, "--seed must be between 0 and 2**63-1"),
    ("args: --seed above 2**63-1", "train.py", ["--seed", str(2 ** 63)], 1, "--seed must be between"),
    ("args: --workers -1", "train.py", ["--workers", "-1"], 1, "--workers must be at least 0"),
    ("args: --opset the exporter cannot produce", "export.py", ["--checkpoint", "{t}/best.pt", "--opset", "9",
                                                                "--out", "x"], 1, "not the asked 9"),
    ("args: --tolerance below 0", "export.py", ["--checkpoint", "{t}/best.pt", "--tolerance=-1e-9"], 1,
     "--tolerance must be a number of 0 or more"),
    ("args: --tolerance nan", "export.py", ["--checkpoint", "{t}/best.pt", "--tolerance", "nan"], 1,
     "--tolerance must be a number of 0 or more"),
    ("args: --int8-tolerance inf", "export.py",
     ["--checkpoint", "{t}/best.pt", "--format", "onnx-int8", "--int8-tolerance", "inf"], 1,
     "--int8-tolerance must be a number of 0"),
    ("args: --json names a folder", "bench.py", ["--json", "{h}/a-folder.json"], 1, "is a folder"),
    ("out: --json a FIFO", "bench.py", ["--json", "{h}/out/fifo.json"], 1, "is a FIFO, not a regular file"),
    ("out: --json a link to /dev/stdout", "bench.py", ["--json", "{h}/out/stdout.json"], 1,
     "is a symbolic link to /dev/stdout (in /dev)"),
    ("out: --json a read-only file", "bench.py", ["--json", "{h}/out/ro.json"], 1, "is read-only"),
    ("out: --json too long a name", "bench.py", ["--json", "{h}/out/" + "j" * 300 + ".json"], 1, "file name too long"),
    ("out: evaluate's report.json a FIFO", "evaluate.py", ["--checkpoint", "{t}/best.pt", "--out", "{h}/fifo-out"], 1,
     "report.json is a FIFO"),
    ("out: a folder at export's own output name (and --tolerance 0 is accepted)", "export.py",
     ["--checkpoint", "{t}/best.pt", "--tolerance", "0", "--int8-tolerance", "0", "--out", "{h}/taken"], 1,
     "taken/bn_fc.onnx is a folder, not a file"),
    ("out: a folder named manifest.json", "export.py", ["--checkpoint", "{t}/best.pt", "--out", "{h}/manifest-dir"], 1,
     "manifest.json is not a manifest export.py writes: it is a folder"),
    ("data: --data-dir a file", "evaluate.py", ["--checkpoint", "{t}/best.pt", "--data-dir", "{h}/a-file"], 1,
     "is a file, not a folder"),
    ("onnx: a Loop of 10**15 iterations (compare)", "compare.py", ["{h}/onnx/loop.onnx", "{t}/best.pt"], 1,
     "'Loop' node"),
    ("onnx: a Loop of 10**15 iterations (evaluate)", "evaluate.py", ["--artifact", "{h}/onnx/loop.onnx"], 1,
     "'Loop' node"),
    ("onnx: a Loop of 10**15 iterations (predict)", "predict.py", ["--artifact", "{h}/onnx/loop.onnx", "x.png"], 1,
     "'Loop' node"),
    ("onnx: 2**40 floats (evaluate)", "evaluate.py", ["--artifact", "{h}/onnx/bomb.onnx"], 1, "'ConstantOfShape' node"),
    ("export: logits, not log-probabilities (predict)", "predict.py",
     ["--artifact", "{h}/onnx/logits.onnx", "x.png"], 1, "its rows are not log-probabilities"),
    ("export: escape sequences in its metadata (compare)", "compare.py", ["{h}/onnx/title.onnx", "{t}/best.pt"], 1,
     "names the model 'bn_fc\\x1b]0;owned"),
    ("compare: a folder", "compare.py", ["{h}/taken", "{t}/best.pt"], 1, "taken is a folder"),
    ("args: --json unwritable", "bench.py", ["--json", "/proc/no/where.json"], 1, "missing or read-only"),
    ("args: --out unwritable", "evaluate.py", ["--checkpoint", "{t}/best.pt", "--out", "/proc/x"], 1,
     "cannot write to --out folder"),
    ("run folder: garbage metrics.csv and summary.json; --out a symlink, report.html a symlink out", "evaluate.py",
     ["--checkpoint", "{h}/run-link/best.pt"], 0, "warning:"),
    ("args: --out a dangling symlink", "evaluate.py", ["--checkpoint", "{t}/best.pt", "--out", "{h}/dangling"], 1,
     "cannot write to --out folder"),
    ("out: export would replace its own checkpoint", "export.py",
     ["--checkpoint", "{h}/clash/bn_fc.onnx", "--out", "{h}/clash"], 1, "would replace the input"),
    ("out: evaluate would replace its own checkpoint", "evaluate.py",
     ["--checkpoint", "{h}/clash/report.json", "--out", "{h}/clash"], 1, "would replace the input"),
    ("manifest: not JSON", "evaluate.py", ["--artifact", "{h}/m/garbage/evil.torchscript.pt"], 1,
     "is not a manifest export.py writes: not a JSON object"),
    ("manifest: a JSON list", "compare.py", ["{h}/m/list/evil.torchscript.pt", "{t}/best.pt"], 1,
     "is not a manifest export.py writes: not a JSON object"),
    ("manifest: an entry without sha256", "evaluate.py", ["--artifact", "{h}/m/no-sha/evil.torchscript.pt"], 1,
     "has no sha256"),
    ("manifest: larger than any export.py writes", "evaluate.py", ["--artifact", "{h}/m/huge/evil.torchscript.pt"], 1,
     "larger than 1,048,576 bytes"),
    ("manifest: a symlink (to one that vouches for the file)", "evaluate.py",
     ["--artifact", "{h}/m/link/evil.torchscript.pt"], 1, "it is a symbolic link"),
    ("manifest: lists ../ (with the file's sha256)", "evaluate.py", ["--artifact", "{h}/m/dotdot/evil.torchscript.pt"],
     1, "not a file name in its own folder"),
    ("manifest: lists an absolute path (with the file's sha256)", "evaluate.py",
     ["--artifact", "{h}/m/absolute/evil.torchscript.pt"], 1, "not a file name in its own folder"),
    ("manifest: export.py into a folder with a garbage one", "export.py",
     ["--checkpoint", "{t}/best.pt", "--out", "{h}/m/garbage"], 1, "delete it and export again"),
    ("kind: TorchScript named .onnx", "evaluate.py", ["--artifact", "{h}/kinds/evil.onnx"], 1,
     "(an ONNX file): it is a TorchScript file"),
    ("kind: TorchScript named .int8.onnx", "compare.py", ["{h}/kinds/evil.int8.onnx", "{t}/best.pt"], 1,
     "(an int8 ONNX file): it is a TorchScript file"),
    ("kind: .pt2 archive named .onnx", "evaluate.py", ["--artifact", "{h}/kinds/archive.onnx"], 1,
     "(an ONNX file): it is a torch.export .pt2 file"),
    ("kind: ONNX named .pt2 (trusted)", "evaluate.py", ["--artifact", "{h}/kinds/onnx.pt2", "--trust-code"], 1,
     "(a torch.export .pt2 file): it is not a zip archive"),
    ("kind: TorchScript named .pt2 (trusted)", "evaluate.py", ["--artifact", "{h}/kinds/evil.pt2", "--trust-code"], 1,
     "(a torch.export .pt2 file): it is a TorchScript file"),
    ("kind: .pt2 archive named .torchscript.pt (trusted)", "compare.py",
     ["{h}/kinds/archive.torchscript.pt", "{t}/best.pt", "--trust-code"], 1,
     "(a TorchScript file): it is a torch.export"),
    ("kind: .pt2 archive named .aoti.pt2 (trusted)", "evaluate.py",
     ["--artifact", "{h}/kinds/archive.aoti.pt2", "--trust-code"], 1, "(an AOTInductor package): it is a torch.export"),
    ("kind: TorchScript named .aoti.pt2 (trusted)", "evaluate.py",
     ["--artifact", "{h}/kinds/evil.aoti.pt2", "--trust-code"], 1, "(an AOTInductor package): it is a TorchScript"),
    ("compare: a file and itself", "compare.py", ["{t}/best.pt", "{t}/best.pt"], 1, "A and B are the same file"),
    ("compare: a file and a copy of it", "compare.py", ["{t}/best.pt", "{h}/garbage-run/best.pt"], 1,
     "hold the same bytes"),
    ("compare: an export that breaks the contract", "compare.py", ["{h}/out5.onnx", "{t}/best.pt"], 1,
     "[N, 10] output"),
    ("compare: a trusted export whose output breaks the contract", "compare.py",
     ["{h}/tuple.torchscript.pt", "{t}/best.pt", "--trust-code"], 1, "breaks the output contract"),
    ("compare: code without the manifest or --trust-code", "compare.py", ["{h}/evil.torchscript.pt", "{t}/best.pt"], 1,
     "is not listed in the manifest.json"),
    ("int8: a calibration set that would include test images", "export.py",
     ["--checkpoint", "{t}/best.pt", "--format", "onnx-int8", "--data-dir", "{h}/leaky", "--out", "x"], 1,
     "the int8 calibration set would include test images: 1 of the first 1,024"),
    ("run: folder another train.py is writing", "train.py", ["--out", "{h}/held", "--device", "cpu"], 1,
     "is in use by another train.py process"),
    ("resume: run from another device", "train.py", ["--resume", "{h}/cuda-run", "--device", "cpu"], 1,
     "was trained on cuda; resume it there"),
    ("run: fails before its first epoch", "train.py", ["--model", "gap10k", "--data-dir", "{h}/badzlib",
                                                       "--device", "cpu"], 1, "cannot read"),
]


@pytest.fixture(scope="module")
def results(hostile, trained, forked, tmp_path_factory):
    cases = []
    for cid, script, args, _, _ in CASES:
        cwd = tmp_path_factory.mktemp("case")
        cases.append(dict(script=script, cwd=str(cwd),
                          args=[a.format(h=hostile, t=trained) for a in args]))
    held = fileio.lock(str(hostile / "held"))  # as a running train.py holds its folder
    try:
        got = [forked.run(c["script"], *c["args"], cwd=c["cwd"], ignore_warnings=True, timeout=900) for c in cases]
    finally:
        fileio.unlock(held)
    return {cid: dict(code=r.returncode, err=r.stderr, cwd=c["cwd"]) for (cid, *_), c, r in zip(CASES, cases, got)}


@pytest.mark.parametrize("cid, script, args, code, message", CASES, ids=[c[0] for c in CASES])
def test_hostile_input_gets_one_line(results, hostile, cid, script, args, code, message):
    r = results[cid]
    err = r["err"].strip()
    assert r["code"] == code, err
    assert "Traceback" not in err, err
    if code:
        assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err
    else:
        assert message in err, err
    leftovers = [os.path.join(dp, f) for dp, _, fs in os.walk(r["cwd"]) for f in fs]
    assert not [f for f in leftovers if ".tmp" in f or f.endswith((".pt", ".onnx"))], leftovers
    assert not (hostile / "pwned").exists() and not os.path.exists(os.path.join(r["cwd"], "pwned"))
    assert "\x1b" not in r["err"]  # what a file holds reaches the terminal printable


def test_refused_outputs_are_left_as_they_were(hostile, results):
    """A FIFO, a link to /dev/stdout, a read-only file, folders at an output's name: still there, as they were."""
    out = hostile / "out"
    assert stat.S_ISFIFO(os.lstat(out / "fifo.json").st_mode) and os.readlink(out / "stdout.json") == "/dev/stdout"
    assert (out / "ro.json").read_text() == "{}" and stat.S_IMODE(os.stat(out / "ro.json").st_mode) == 0o444
    assert os.listdir(hostile / "taken") == ["bn_fc.onnx"] and os.listdir(hostile / "manifest-dir") == ["manifest.json"]
    assert stat.S_ISFIFO(os.lstat(hostile / "fifo-out" / "report.json").st_mode)


def test_failed_run_leaves_no_folder_and_latest_unmoved(results):
    cwd = results["run: fails before its first epoch"]["cwd"]
    assert not os.path.exists(os.path.join(cwd, "runs", "gap10k")) or \
        os.listdir(os.path.join(cwd, "runs", "gap10k")) == []


def test_garbage_run_folder_still_gets_a_strict_report(hostile, results):
    """Also the rule for output folders: --out may be an input's folder (the run folder is evaluate's
    default) and a symlink to a folder (written where it points); a symlink at an output's name is
    replaced by the new file, never written through."""
    assert results["run folder: garbage metrics.csv and summary.json; --out a symlink, report.html a symlink out"][
        "code"] == 0
    strict = lambda c: (_ for _ in ()).throw(ValueError(c))  # noqa: E731  NaN / Infinity are not JSON
    report = json.loads((hostile / "garbage-run" / "report.json").read_text(), parse_constant=strict)
    assert report["model"] == "bn_fc" and not (hostile / "garbage-run" / "curves.png").exists()
    assert (hostile / "run-link").is_symlink() and not (hostile / "garbage-run" / "report.html").is_symlink()
    assert (hostile / "outside.html").read_text() == "not yours"
    assert "<html>" in (hostile / "garbage-run" / "report.html").read_text()
    assert all((hostile / "garbage-run" / name).read_text() == "mine" for name in LOOKALIKES)  # a user's, never removed


def test_refusals_left_their_folders_alone(hostile, results):
    """An output that would replace an input, a garbage manifest where export.py would write: nothing
    written, the input and the manifest as they were."""
    assert sorted(os.listdir(hostile / "clash")) == ["bn_fc.onnx", "report.json"]
    assert sorted(os.listdir(hostile / "m" / "garbage")) == ["evil.torchscript.pt", "manifest.json"]
    assert (hostile / "m" / "garbage" / "manifest.json").read_text() == '{"files": {'
    assert runfiles.load_checkpoint(str(hostile / "clash" / "bn_fc.onnx"))["model_name"] == "bn_fc"


def test_trusted_code_runs_only_with_trust_code(hostile, tmp_path, monkeypatch):
    """--trust-code is the user's explicit word: then the file loads (and its code runs)."""
    shutil.copy(hostile / "evil.torchscript.pt", tmp_path / "evil.torchscript.pt")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(errors.UserError, match="not listed"):
        artifacts.load(str(tmp_path / "evil.torchscript.pt"))
    assert not (tmp_path / "pwned").exists()
    artifacts.load(str(tmp_path / "evil.torchscript.pt"), trust_code=True)
    assert (tmp_path / "pwned").exists()


def test_bomb_fails_fast_under_a_4gib_address_space(hostile, trained, forked, tmp_path):
    """A 1 GiB gzip bomb is refused after reading the bytes its header promises plus one, by an
    evaluate.py that may map no more than 4 GiB."""
    r = forked.run("evaluate.py", "--checkpoint", trained / "best.pt", "--data-dir", hostile / "bomb", "--out", tmp_path,
                   cwd=tmp_path, address_space=4 << 30)
    assert r.returncode == 1 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "truncated or padded" in r.stderr


def test_report_files_are_one_set(tmp_path, monkeypatch):
    """A write that fails mid-way (the disk full at the third file) leaves the old report files as they
    were, no temp file behind, and says which file could not be written."""
    old = {tmp_path / n: n.encode() for n in ("report.json", "report.html", "confusion.png")}
    for p, b in old.items():
        p.write_bytes(b)
    real, written = fileio._Recorded.write, []

    def full_disk(self, b):
        if self.name not in written:
            written.append(self.name)
        if len(written) == 3:
            raise OSError(28, "No space left on device")
        return real(self, b)
    monkeypatch.setattr(fileio._Recorded, "write", full_disk)
    with pytest.raises(OSError) as e:
        fileio.replace_all({str(p): b"new" for p in old})
    monkeypatch.undo()
    assert errors.error_line(e.value) == f"error: No space left on device: {tmp_path / 'confusion.png'}"
    assert {p: p.read_bytes() for p in old} == old
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in old)


def test_json_is_strict_everywhere(tmp_path):
    fileio.save_json({"loss": float("nan"), "x": [float("inf"), 1.0]}, str(tmp_path / "a.json"))
    assert json.loads((tmp_path / "a.json").read_text()) == {"loss": None, "x": [None, 1.0]}
