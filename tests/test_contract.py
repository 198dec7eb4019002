"""What an exported file must be before it runs and what it must give (contract.py, artifacts.load):
ONNX graphs of this project's operators only, bounded in size and work; outputs that are
log-probabilities; metadata that is checked and printable. Each hostile file is a few kB built here
with onnx.helper or a tiny torch module, and each load runs under an alarm, so a regression fails
the test instead of hanging it."""
import contextlib
import json
import signal

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

import artifacts
import contract
import errors

META = {"model": "bn_fc", "test_acc": "99.10", "params": "7850", "epoch": "1"}


@contextlib.contextmanager
def within(seconds):
    """Fail (not hang) if the block takes longer than `seconds`."""
    def expired(*_):
        raise TimeoutError(f"took more than {seconds} s")
    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


node = helper.make_node


def value(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def const(name, dims, vals, dtype=TensorProto.FLOAT):
    return helper.make_tensor(name, dtype, dims, vals)


def classifier_onnx(path, tail=(), inits=(), meta=META, opsets=(("", 18),), log_softmax=True, edit=None):
    """A real (if untrained) classifier of the exports' operators only: Reshape, Gemm, LogSoftmax (or,
    without log_softmax, its logits as they are), its output "z" until `tail` nodes make "log_probs"."""
    w = np.random.default_rng(0).normal(0, 0.05, (784, 10)).astype(np.float32)
    nodes = [helper.make_node("Reshape", ["image", "flat"], ["x"]),
             helper.make_node("Gemm", ["x", "w"], ["logits" if log_softmax else "z"])]
    if log_softmax:
        nodes.append(helper.make_node("LogSoftmax", ["logits"], ["z"], axis=1))
    nodes += tail
    if not tail:
        nodes[-1].output[0] = "log_probs"
    graph = helper.make_graph(nodes, "g", [value("image", ["batch", 1, 28, 28])], [value("log_probs", ["batch", 10])],
                              initializer=[const("flat", [2], [-1, 784], TensorProto.INT64),
                                           helper.make_tensor("w", TensorProto.FLOAT, [784, 10], w.tobytes(), raw=True),
                                           *inits])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])
    helper.set_model_props(model, meta)
    if edit:
        edit(model)
    onnx.save(model, str(path))
    return str(path)


def loop_body():
    """A Loop body that only passes its value on: a trip count of 10**15 spins for ever."""
    return helper.make_graph([node("Identity", ["c"], ["c2"]), node("Identity", ["v"], ["v2"])], "body",
                             [value("i", [], TensorProto.INT64), value("c", [], TensorProto.BOOL), value("v", None)],
                             [value("c2", [], TensorProto.BOOL), value("v2", None)])


def external(model):
    t = model.graph.initializer[1]
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    t.external_data.add(key="location", value="../../weights.bin")


def graph_attribute(model):
    model.graph.node[1].attribute.append(helper.make_attribute("then_branch", loop_body()))


def deep(model):
    """The classifier with MAX_NODES Relus after it (each keeps log-probabilities, all <= 0, as they are)."""
    last = contract.MAX_NODES - 1
    model.graph.node[-1].output[0] = "r0"
    model.graph.node.extend(node("Relu", [f"r{i}"], [f"r{i + 1}" if i < last else "log_probs"])
                            for i in range(last + 1))


def claims_small(model):
    """The file declares the broadcast tensor "wide" as one image's size: a claim that is not believed."""
    model.graph.value_info.append(value("wide", ["batch", 1, 28, 28]))


INT64, BOOL = TensorProto.INT64, TensorProto.BOOL
MEAN_OUT = [node("ReduceMean", ["big"], ["m"], keepdims=0), node("Sub", ["z", "m"], ["log_probs"])]  # "big" -> scalar
HOSTILE = [  # (id, classifier_onnx keyword arguments, what the refusal says)
    ("a Loop of 10**15 iterations", dict(tail=[node("Loop", ["n", "t", "z"], ["log_probs"], body=loop_body())],
                                         inits=[const("n", [], [10 ** 15], INT64), const("t", [], [True], BOOL)]),
     "'Loop' node"),
    ("a ConstantOfShape of 2**40 floats", dict(
        tail=[node("ConstantOfShape", ["s"], ["big"], value=const("v", [1], [0.0])), *MEAN_OUT],
        inits=[const("s", [1], [1 << 40], INT64)]), "'ConstantOfShape' node"),
    ("an Expand to a huge shape", dict(tail=[node("Expand", ["z", "s"], ["log_probs"])],
                                       inits=[const("s", [2], [1 << 30, 10], INT64)]), "'Expand' node"),
    ("a node of an unknown domain", dict(tail=[node("Identity", ["z"], ["log_probs"], domain="com.evil")],
                                         opsets=(("", 18), ("com.evil", 1))), "domain 'com.evil'"),
    ("an allowed operator name in another domain",
     dict(tail=[node("Relu", ["z"], ["log_probs"], domain="com.microsoft")], opsets=(("", 18), ("com.microsoft", 1))),
     "'Relu' node of the domain 'com.microsoft'"),
    ("a graph attribute on an allowed node", dict(edit=graph_attribute), "attribute holding a graph"),
    ("weights in an external file", dict(edit=external), "lives in an external data file"),
    ("a local function", dict(edit=lambda m: m.functions.append(helper.make_function("x", "f", [], [], [], []))),
     "defines functions"),
    ("more nodes than any export", dict(edit=deep), f"more than {contract.MAX_NODES:,}"),
    ("a broadcast to 4096 copies of each image", dict(
        tail=[node("Sub", ["image", "many"], ["wide"]), node("ReduceMean", ["wide"], ["big"]), *MEAN_OUT],
        inits=[const("many", [4096, 1, 1, 1, 1], [0.0] * 4096)], edit=claims_small), "elements per image"),
    ("a convolution padded by 10,000 pixels", dict(
        tail=[node("Conv", ["image", "k"], ["big"], pads=[10000] * 4), *MEAN_OUT],
        inits=[const("k", [1, 1, 1, 1], [1.0])]),
     "elements per image"),
    ("two copies of the batch broadcast against each other", dict(
        tail=[node("Reshape", ["image", "col"], ["c"]), node("Reshape", ["image", "row"], ["r"]),
              node("Sub", ["c", "r"], ["big"]), *MEAN_OUT],
        inits=[const("col", [2], [-1, 1], INT64), const("row", [2], [1, -1], INT64)]), "grows faster than the batch"),
]


@pytest.mark.parametrize("case, kw, says", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_onnx_is_refused_before_it_runs(case, kw, says, tmp_path, monkeypatch):
    """Refused in one line by artifacts.load before any onnxruntime session exists (none is made)."""
    path = classifier_onnx(tmp_path / "m.onnx", **kw)
    sessions = []
    monkeypatch.setattr(artifacts, "ort_session", lambda *a, **k: sessions.append(a))
    with within(30), pytest.raises(errors.UserError) as e:
        artifacts.load(path)
    assert says in str(e.value) and "\n" not in str(e.value) and not sessions, str(e.value)


def test_a_plain_classifier_of_those_operators_loads_and_runs(tmp_path):
    """The control for the cases above: the same file without their additions passes every rule, at a
    work per image far under the bounds."""
    with within(30):
        run = artifacts.load(classifier_onnx(tmp_path / "m.onnx"))
        out = run(np.random.default_rng(1).random((7, 1, 28, 28), dtype=np.float32))
    assert out.shape == (7, 10) and np.allclose(np.exp(out).sum(1), 1, atol=1e-5)
    assert run.metadata == META and run.format == "onnx"


def test_every_operator_of_the_real_exports_is_allowed(exports):
    out, _, _ = exports
    ops = {n.op_type for n in onnx.load(str(out / "bn_fc.onnx")).graph.node}
    assert ops <= contract.OPS and {"Conv", "Gemm", "LogSoftmax"} <= ops


# --------------------------------------------------------------------------- log-probabilities

class Head(torch.nn.Module):
    """A tiny classifier whose output is `kind`: log-probabilities, logits, probabilities, or
    log-probabilities for the 4-image probe batch and logits for any other batch."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.fc = torch.nn.Linear(784, 10)

    def forward(self, image):
        z = self.fc(image.flatten(1)) * 10
        if self.kind == "logits" or self.kind == "probe-only" and image.shape[0] != 4:
            return z
        if self.kind == "probabilities":
            return z.softmax(1)
        return z.log_softmax(1)


def torch_export(tmp_path, fmt, kind):
    """A Head of `kind` as a TorchScript file (`fmt`) with the metadata every export carries."""
    assert fmt == "torchscript"  # pt2: torch.export takes seconds; test_every_format_is_probed_at_load covers it
    torch.manual_seed(0)
    path = tmp_path / f"{kind}.torchscript.pt"
    torch.jit.save(torch.jit.script(Head(kind).eval()), str(path), _extra_files={"metadata.json": json.dumps(META)})
    return str(path)


@pytest.mark.parametrize("fmt, kind", [("onnx", "logits"), ("torchscript", "logits"), ("torchscript", "probabilities")])
def test_outputs_that_are_not_log_probabilities_are_refused_at_load(fmt, kind, tmp_path):
    """The contract promises log-probabilities, and a file of the right dtype and shape that gives logits
    or probabilities is refused at load, on the probe batch (for code, once the user trusts it); the
    same file giving log-probabilities loads."""
    def make(kind):
        if fmt == "onnx":
            return classifier_onnx(tmp_path / f"{kind}.onnx", log_softmax=kind != "logits")
        return torch_export(tmp_path, fmt, kind)
    bad, good = make(kind), make("log-probabilities")
    with within(60), pytest.raises(errors.UserError, match="output contract: its rows are not log-probabilities"):
        artifacts.load(bad, trust_code=True)
    assert artifacts.load(good, trust_code=True).metadata["model"] == "bn_fc"


@pytest.mark.parametrize("name", ["bn_fc.onnx", "bn_fc.torchscript.pt", "bn_fc.pt2"])
def test_every_format_is_probed_at_load(name, exports, monkeypatch):
    """Each format's loaded file runs the probe batch through the log-probability check before load
    returns (the tests above give each a file that fails it)."""
    seen = []
    real = contract.check_log_probs
    monkeypatch.setattr(contract, "check_log_probs", lambda path, out: seen.append(out.shape) or real(path, out))
    artifacts.load(str(exports[0] / name))
    assert seen == [(len(contract.probe_batch()), 10)]


def test_every_call_is_held_to_the_contract(tmp_path):
    """A file that gives log-probabilities for the probe batch only is caught on the next batch."""
    run = artifacts.load(torch_export(tmp_path, "torchscript", "probe-only"), trust_code=True)
    with pytest.raises(errors.UserError, match="rows are not log-probabilities"):
        run(np.zeros((5, 1, 28, 28), np.float32))


def test_check_log_probs_allows_probability_zero_and_refuses_nan():
    with np.errstate(divide="ignore"):
        good = np.log(np.array([[1, 0, 0, 0, 0, 0, 0, 0, 0, 0], [0.1] * 10], np.float32))  # -inf: probability 0
    contract.check_log_probs("x", good)
    for bad in (np.full((1, 10), np.nan, np.float32), np.full((1, 10), -np.inf, np.float32), good * 2, good + 1e-3):
        with pytest.raises(errors.UserError):
            contract.check_log_probs("x", bad)


# ---------------------------------------------------------------------------------- metadata

@pytest.mark.parametrize("field, text, says", [
    ("model", "bn_fc\x1b]0;owned\x07\x1b[2J", "names the model 'bn_fc\\x1b]0;owned\\x07\\x1b[2J'"),
    ("model", "resnet50", "names the model 'resnet50', not one of"),
    ("test_acc", "nan", "test_acc is 'nan', not a number"),
    ("test_acc", "1e999", "test_acc is '1e999'"),
    ("test_acc", "101", "test_acc is '101'"),
    ("params", "-5", "params is '-5'"),
    ("epoch", "1.5", "epoch is '1.5'"),
    ("recipe", "x" * (contract.MAX_TEXT + 1), "longer than"),
])
def test_metadata_is_checked_where_it_is_read(field, text, says, tmp_path):
    path = classifier_onnx(tmp_path / "m.onnx", meta=dict(META, **{field: text}))
    with pytest.raises(errors.UserError) as e:
        artifacts.load(path)
    assert says in str(e.value) and "\x1b" not in str(e.value), str(e.value)


def test_metadata_texts_reach_callers_printable(tmp_path):
    path = classifier_onnx(tmp_path / "m.onnx", meta=dict(META, torch_version="2\x1b[2J\x9b31m\n"))
    clf = artifacts.classifier(path)
    assert clf.model == "bn_fc" and clf.test_acc == 99.10
    assert clf.metadata["torch_version"] == "2\\x1b[2J\\x9b31m\\x0a"
    with pytest.raises(errors.UserError, match="names the model 'None'"):
        artifacts.load(classifier_onnx(tmp_path / "none.onnx", meta={"test_acc": "99"}))


# ----------------------------------------------------------------------------- the one loader

def test_load_offers_each_formats_own_runnable(tmp_path):
    """bench.py times .native: an onnxruntime session with the threads asked, a torch callable on the
    device asked; both under the same trust rule and contract as every other loader."""
    import onnxruntime as ort
    run = artifacts.load(classifier_onnx(tmp_path / "m.onnx"), threads=1, provider="CPUExecutionProvider")
    assert isinstance(run.native, ort.InferenceSession) and run.native.get_session_options().intra_op_num_threads == 1
    x = np.random.default_rng(2).random((3, 1, 28, 28), dtype=np.float32)
    assert np.allclose(run.native.run(None, {"image": x})[0], run(x))
    path = torch_export(tmp_path, "torchscript", "log-probabilities")
    with pytest.raises(errors.UserError, match="not listed in the manifest"):
        artifacts.load(path)
    ts = artifacts.load(path, trust_code=True, device="cpu")
    with torch.no_grad():
        assert np.allclose(ts.native(torch.from_numpy(x)).numpy(), ts(x), atol=1e-6)
