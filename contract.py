"""What an exported file must be before anything of it runs, and what it must give when it does.

An ONNX file is data, loaded without --trust-code, so its graph is checked before any onnxruntime
session exists (check_onnx): only the operators a classifier export of this project contains (OPS,
collected from the exports of all five models, fp32 and int8, at every opset export.py can write),
no control flow, subgraphs, functions or external data, and every tensor's shape known from the
file with its size per image bounded, as is the work per image (MAX_ELEMENTS, MAX_MACS). What every
format must give (check_log_probs): rows of log-probabilities, on a fixed probe batch at load and on
every call. Its metadata is read once, checked and made printable (clean_metadata).
"""
import json
import math

import numpy as np

from errors import UserError, first_line, printable

# Node types of `python export.py --format onnx` / onnx-int8 for bn_gap, conv4_fc, gap10k, bn_drop and
# bn_fc at opsets 16-28 (torch 2.14's exporter, onnxruntime 1.32's quantiser): BatchNorm is folded into
# the convolutions except in the models where it follows a ReLU, and int8 adds QDQ pairs.
OPS = {"Sub", "Div", "Conv", "Relu", "BatchNormalization", "MaxPool", "ReduceMean", "Reshape", "Gemm",
       "LogSoftmax", "QuantizeLinear", "DequantizeLinear"}
NODE_DOMAINS = {"", "ai.onnx"}
# the quantiser declares these opset domains without using them; a node in any of them is still refused
DECLARED_DOMAINS = NODE_DOMAINS | {"ai.onnx.ml", "ai.onnx.training", "ai.onnx.preview", "ai.onnx.preview.training",
                                   "com.microsoft", "com.microsoft.experimental", "com.microsoft.nchwc",
                                   "org.pytorch.aten"}
ATTRIBUTE_TYPES = {1, 2, 3, 7}  # FLOAT, INT, STRING, INTS: the only kinds those nodes carry (no graphs, tensors)
MAX_ONNX_BYTES = 16 << 20  # ours are 25-130 kB
MAX_NODES = 1000  # ours have 15-88
MAX_ELEMENTS = 1 << 20  # in any one tensor for one image (ours: at most 18,432) or any weight (ours: 11,088)
MAX_ALL_ELEMENTS = 1 << 23  # all tensors together for one image (ours: at most 266,025)
MAX_MACS = 1 << 26  # multiply-adds for one image, the whole graph (ours: 1.1-3.8 million)
LOG_PROB_TOLERANCE = 1e-4  # |logsumexp of a row| and its largest entry (ours: at most 2.2e-7, fp32 and int8)


def check_onnx(path, blob):
    """The ModelProto of the ONNX bytes `blob` once its graph passes every rule above; UserError naming
    the first it breaks. Nothing runs the graph: onnx parses it and infers its shapes."""
    import onnx
    try:
        model = onnx.ModelProto.FromString(blob)
    except Exception:
        raise UserError(f"{path} is not an ONNX file (it does not parse)") from None
    g = model.graph
    check_onnx_io(path, g)
    if model.functions or len(g.sparse_initializer):
        refuse(path, "it defines functions or sparse tensors, which export.py's files never hold")
    if len(g.node) > MAX_NODES:
        refuse(path, f"it has {len(g.node):,} nodes, more than {MAX_NODES:,}")
    for o in model.opset_import:
        if o.domain not in DECLARED_DOMAINS:
            refuse(path, f"it imports the operator domain '{printable(o.domain)}'")
    for n in g.node:
        if n.domain not in NODE_DOMAINS or n.op_type not in OPS:
            where = f" of the domain '{printable(n.domain)}'" if n.domain else ""
            refuse(path, f"it holds a '{printable(n.op_type)}' node{where}; only the operators of this project's "
                   f"exports run ({', '.join(sorted(OPS))})")
        if any(a.type not in ATTRIBUTE_TYPES or a.ref_attr_name for a in n.attribute):
            refuse(path, f"its {printable(n.op_type)} node has an attribute holding a graph or a tensor")
    for t in g.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL or len(t.external_data):
            refuse(path, f"its tensor '{printable(t.name)}' lives in an external data file")
        if math.prod(t.dims) > MAX_ELEMENTS:
            refuse(path, f"its tensor '{printable(t.name)}' has {math.prod(t.dims):,} elements, more than "
                   f"{MAX_ELEMENTS:,}")
    check_sizes(path, model)
    return model


def check_onnx_io(path, graph):
    """One float32 [N, 1, 28, 28] input and one float32 [N, 10] output, as the graph declares them."""
    fixed = {t.name for t in graph.initializer}
    ins, outs = [v for v in graph.input if v.name not in fixed], list(graph.output)
    if len(ins) != 1 or signature(ins[0])[0] != 1 or (signature(ins[0])[1] or [])[1:] != [1, 28, 28] or \
            len(signature(ins[0])[1]) != 4:
        raise UserError(f"{path} does not take one float32 [N, 1, 28, 28] input (it takes {shown(ins)})")
    if len(outs) != 1 or signature(outs[0])[0] != 1 or (signature(outs[0])[1] or [])[1:] != [10] or \
            len(signature(outs[0])[1]) != 2:
        raise UserError(f"{path} does not give one float32 [N, 10] output (it gives {shown(outs)})")


def signature(v):
    """(element type, dims with None for a symbolic one, or None for no shape) of a graph input or output."""
    t = v.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim] if t.HasField("shape") else None
    return t.elem_type, dims


def shown(values):
    """Graph inputs or outputs as a user reads them: name, element type, shape."""
    return "; ".join(f"{printable(v.name)} {'float32' if signature(v)[0] == 1 else f'element type {signature(v)[0]}'} "
                     f"{['N' if d is None else d for d in signature(v)[1] or []]}" for v in values) or "nothing"


def refuse(path, why):
    raise UserError(f"refusing {path}: {why}")


def check_sizes(path, model):
    """Every tensor's size known from the graph and bounded, as is the graph's work: a graph of allowed
    operators can still ask for huge tensors (padding, broadcasting) or a deep stack of them. Sizes are
    inferred at batch 1 and 2, so a tensor that grows faster than the batch (two reshaped copies of it
    broadcast against each other) is refused too."""
    outputs = [o for n in model.graph.node for o in n.output if o]
    one, two = shapes_at(path, model, 1), shapes_at(path, model, 2)
    size = {o: math.prod(one[o]) for o in outputs}
    faster = next((o for o in outputs if math.prod(two[o]) not in (size[o], 2 * size[o])), None)
    if faster is not None:
        refuse(path, f"its tensor '{printable(faster)}' grows faster than the batch ({one[faster]} for one image, "
               f"{two[faster]} for two)")
    largest, total = max(size.values(), default=0), sum(size.values())
    if largest > MAX_ELEMENTS or total > MAX_ALL_ELEMENTS:
        refuse(path, f"its tensors hold up to {largest:,} elements per image, {total:,} in all (the limits: "
               f"{MAX_ELEMENTS:,} and {MAX_ALL_ELEMENTS:,})")
    macs = [sum(node_macs(n, shapes) for n in model.graph.node) for shapes in (one, two)]
    if macs[0] > MAX_MACS or macs[1] > 2 * macs[0]:
        refuse(path, f"it takes {macs[0]:,} multiply-adds for one image and {macs[1]:,} for two (the limit: "
               f"{MAX_MACS:,} per image)")


def shapes_at(path, model, batch):
    """{tensor name: dims} of every tensor of `model`, its input's batch dimension set to `batch`, inferred
    by onnx from the graph alone: the shapes a file declares for its tensors are claims, and are dropped."""
    import onnx
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.value_info[:]
    for v in m.graph.output:
        v.type.tensor_type.ClearField("shape")
    fixed = {t.name for t in m.graph.initializer}
    first = next(v for v in m.graph.input if v.name not in fixed).type.tensor_type.shape.dim[0]
    if not first.HasField("dim_value"):
        first.dim_value = batch
    try:
        g = onnx.shape_inference.infer_shapes(m, strict_mode=True, data_prop=True).graph
    except Exception as e:
        refuse(path, f"its tensor shapes cannot be inferred ({printable(first_line(e))})")
    shapes = {t.name: list(t.dims) for t in g.initializer}
    for v in [*g.input, *g.value_info, *g.output]:
        t = v.type.tensor_type
        shapes[v.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim] \
            if t.HasField("shape") else [None]
    unknown = next((o for n in g.node for o in n.output if o and None in shapes.get(o, [None])), None)
    if unknown is not None:
        refuse(path, f"the shape of its tensor '{printable(unknown)}' is not known from the file")
    return shapes


def node_macs(node, shapes):
    """Multiply-adds of one node: its output's elements times the work behind each."""
    out = math.prod(shapes[node.output[0]]) if node.output and node.output[0] else 0
    ins = [shapes[i] for i in node.input if i]
    attr = {a.name: a for a in node.attribute}
    if node.op_type == "Conv" and len(ins) > 1:
        return out * math.prod(ins[1][1:])  # weight [C_out, C_in/group, kh, kw]
    if node.op_type == "Gemm" and ins and len(ins[0]) == 2:
        return out * ins[0][0 if "transA" in attr and attr["transA"].i else 1]  # K
    if node.op_type == "MaxPool":
        return out * math.prod(attr["kernel_shape"].ints if "kernel_shape" in attr else [1])
    return max([out, *(math.prod(s) for s in ins)])


# ------------------------------------------------------------------------------- the output

def probe_batch():
    """Four fixed images, float32 [4, 1, 28, 28] in [0, 1]: blank, white, a vertical stroke, noise."""
    x = np.zeros((4, 1, 28, 28), np.float32)
    x[1] = 1
    x[2, 0, 4:24, 12:16] = 1
    x[3] = np.random.default_rng(0).random((1, 28, 28), dtype=np.float32)
    return x


def check_log_probs(path, out):
    """Refuse an output whose rows are not log-probabilities: every entry at most 0 and the row's
    logsumexp 0, within LOG_PROB_TOLERANCE (-inf entries are probability 0; NaN or +inf never pass).
    Logits, probabilities, log2 or a scaled row all fail, and say which row and by how much."""
    with np.errstate(all="ignore"):
        out = out.astype(np.float64)
        top = out.max(1)
        lse = top + np.log(np.exp(out - top[:, None]).sum(1))
        bad = ~((np.abs(lse) <= LOG_PROB_TOLERANCE) & (top <= LOG_PROB_TOLERANCE))
    if bad.any():
        i = int(np.argmax(bad))
        raise UserError(f"{path} breaks the output contract: its rows are not log-probabilities (row {i}: "
                        f"largest {top[i]:.4g}, logsumexp {lse[i]:.4g}, where log-probabilities give at most 0 "
                        f"and 0); it may give logits or probabilities")


def checked(path, raw):
    """`raw` with every call's output held to the contract: one float32 [N, 10] array of log-probabilities."""
    def run(x):
        try:
            out = raw(x)
        except Exception as e:
            raise UserError(f"cannot run {path} on float32 [N, 1, 28, 28] input: {first_line(e)}") from None
        if not (isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (len(x), 10)):
            got = f"{out.dtype} {list(out.shape)}" if isinstance(out, np.ndarray) else type(out).__name__
            raise UserError(f"{path} breaks the output contract: it gave {got}, not one float32 [N, 10] array")
        check_log_probs(path, out)
        return out
    return run


# ----------------------------------------------------------------------------- metadata

MAX_TEXT = 64 << 10  # characters in one metadata value (ours: under 1,000)
NUMBERS = {"test_acc": (float, 0, 100), "params": (int, 1, 10 ** 9), "epoch": (int, 0, 10 ** 6)}


def clean_metadata(path, meta, recipes):
    """An export's metadata made safe for every caller: a dict of strings whose model is one of
    `recipes` (the registry's names), whose test_acc, params and epoch (where present) are finite
    numbers in range, and whose other texts are printable (escape sequences shown, not sent).
    UserError naming the file and the field for anything else."""
    if isinstance(meta, (str, bytes)):  # TorchScript and pt2 files: their metadata.json
        try:
            meta = json.loads(meta or "{}")
        except (ValueError, UnicodeDecodeError):
            raise UserError(f"{path}: its metadata is not JSON") from None
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise UserError(f"{path}: its metadata is not a set of named texts")
    long = next((k for k, v in meta.items() if len(v) > MAX_TEXT or len(k) > 256), None)
    if long is not None:
        raise UserError(f"{path}: its metadata field '{printable(long[:40])}' is longer than {MAX_TEXT:,} characters")
    if meta.get("model") not in recipes:
        raise UserError(f"{path}: its metadata names the model '{printable(str(meta.get('model'))[:40])}', not one of "
                        f"{', '.join(recipes)}")
    for key, (kind, low, high) in NUMBERS.items():
        if key in meta and not in_range(meta[key], kind, low, high):
            raise UserError(f"{path}: its metadata field {key} is '{printable(meta[key][:40])}', not a number "
                            f"from {low} to {high:,}")
    return {printable(k): printable(v) for k, v in meta.items()}


def in_range(text, kind, low, high):
    try:
        v = kind(text)
    except (TypeError, ValueError, OverflowError):
        return False
    return math.isfinite(v) and low <= v <= high
