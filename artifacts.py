"""Exported models: writing them, and loading them safely (the manifest that vouches for them is
manifest.py's; what a file must be and give, contract.py's).

Formats, one input contract for all (see README):
    input  "image"      float32 [N, 1, 28, 28], pixels in [0, 1] (white digit on black); N dynamic.
                        Normalisation (mean 0.1307, std 0.3081) happens inside.
    output "log_probs"  float32 [N, 10], log-probabilities of the digits 0-9.
ONNX files are data: ONNX Runtime runs them once their graph passes contract.check_onnx (this
project's operators only, sizes and work bounded). TorchScript, pt2
(torch.export) and AOTInductor files are programs (loading them can run code they carry: see
CODE), so they are loaded only when their sha256 is in the manifest.json that export.py writes
beside its outputs, or when the user passes --trust-code.
"""
import copy
import io
import json
import os
import warnings
import zipfile
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

import contract
import data
import models
from errors import UserError, first_line
from fileio import kind_of, read_open_file, stderr_into, write_synced
from manifest import MANIFEST, read_manifest, sha256
from runfiles import find_checkpoint, load_checkpoint

# TorchScript is deprecated in favour of torch.export, but it is a format this project ships.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.", category=FutureWarning)

FORMATS = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "pt2": ".pt2", "aoti": ".aoti.pt2",
           "onnx-int8": ".int8.onnx"}
ONNX = {"onnx", "onnx-int8"}  # data: checked by contract.check_onnx, then run by ONNX Runtime
# Formats whose loading can run code the file carries. TorchScript: a scripted __setstate__.
# pt2: torch.export.load unpickles the archive's sample inputs with torch.load(weights_only=False)
# when weights_only=True fails (torch/_export/serde/serialize.py deserialize_torch_artifact), and
# weights, constants and objects the archive marks as pickled likewise (torch/export/pt2_archive/
# _package.py _load_state_dict, _load_constants); torch's own docstring: "Never load data from an
# untrusted source". aoti: a shared library that is dlopen'ed.
CODE = {"torchscript", "pt2", "aoti"}
KIND = {"onnx": "an ONNX file", "onnx-int8": "an int8 ONNX file", "torchscript": "a TorchScript file",
        "pt2": "a torch.export .pt2 file", "aoti": "an AOTInductor package"}
# AOTInductor settings, measured side by side (BENCHMARKS.md). freezing (which acts only when
# compiled under no_grad) folds BatchNorm into the conv weights: 4-8% faster at batch 1, but only
# without cpp.weight_prepack, whose oneDNN convolutions are ~2x slower at batch 1 with a dynamic
# batch. max_autotune and cpp.simdlen changed nothing here. dynamic_threads costs 0-7% at batch 1
# but makes the package use the thread count of the process that runs it instead of the exporting
# machine's core count, baked into every parallel loop otherwise.
AOTI_CONFIGS = {"freezing": True, "cpp.weight_prepack": False, "cpp.dynamic_threads": True}
MAX_BATCH = 1 << 20  # the dynamic batch dimension of every export: 1 .. MAX_BATCH
# ... except torch.export on CUDA (pt2, aoti): CUDA kernels launch at most 65,535 blocks along a grid's
# y and z, and torch.export finds that guard there, so exports for CUDA declare 1 .. MAX_BATCH_CUDA
MAX_BATCH_CUDA = 65535

CLASSES = [str(d) for d in range(10)]


def format_of(path):
    for fmt, suffix in sorted(FORMATS.items(), key=lambda kv: -len(kv[1])):  # longest suffix first
        if path.endswith(suffix):
            return fmt
    raise UserError(f"{path}: unknown export format; expected a file ending in {', '.join(FORMATS.values())}")


class Exportable(nn.Module):
    """The model with normalisation in front: [0, 1] pixels in, log-probabilities out."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(data.MEAN))
        self.register_buffer("std", torch.tensor(data.STD))

    def forward(self, image):
        return self.model((image - self.mean) / self.std)


BUFFERS = ("running_mean", "running_var", "num_batches_tracked")  # BatchNorm's: the five models' only buffers


def metadata(ckpt):
    """What every exported file carries. params is counted from the checkpoint's weights, buffers left
    out (the same figure as models.n_params of its model, without building one)."""
    recipe = models.RECIPES[ckpt["model_name"]]
    params = sum(v.numel() for k, v in ckpt["model"].items() if not k.endswith(BUFFERS))
    return {
        "model": ckpt["model_name"],
        "recipe": json.dumps({k: v for k, v in recipe.items() if k != "model"}, default=str),
        "input": "image: float32 [N, 1, 28, 28], pixels in [0, 1] (white digit on black); "
                 f"normalised inside the graph with mean {data.MEAN}, std {data.STD}",
        "output": "log_probs: float32 [N, 10], log-probabilities",
        "classes": json.dumps(CLASSES),
        "params": str(params),
        "test_acc": f"{ckpt['test_acc']:.2f}",
        "epoch": str(ckpt["epoch"]),
        "torch_version": torch.__version__,
    }


# ------------------------------------------------------------------------------ writing
# Each writer writes `path` itself, once: export.py hands it a staged name (the format's suffix kept),
# verifies it and renames it into place; bench.py writes into a temporary folder.

def write_onnx(module, path, meta, opset):
    """ONNX at exactly `opset` (torch's exporter may produce another one: that is refused)."""
    import onnx
    example = torch.rand(2, 1, 28, 28)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    with stderr_into():  # the exporter logs its fallbacks (tracebacks included) straight to stderr
        program = torch.onnx.export(module, (example,), dynamo=True, input_names=["image"],
                                    output_names=["log_probs"], dynamic_shapes={"image": {0: batch}},
                                    opset_version=opset, verbose=False)
    proto = program.model_proto
    got = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if got != opset:
        raise UserError(f"the ONNX exporter produced opset {got}, not the asked {opset}; use --opset {got}")
    onnx.helper.set_model_props(proto, meta)
    onnx.checker.check_model(proto, full_check=True)
    write_synced(path, lambda f: f.write(proto.SerializeToString()))


def write_torchscript(module, path, meta):
    scripted = torch.jit.script(module)
    write_synced(path, lambda f: torch.jit.save(scripted, f, _extra_files={"metadata.json": json.dumps(meta)}))


def exported_program(module, device="cpu"):
    """torch.export of `module` with a dynamic batch (1 .. MAX_BATCH, on CUDA MAX_BATCH_CUDA): the same
    graph for pt2 and aoti. The example batch is 2 so that no size is specialised to 1."""
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH if str(device) == "cpu" else MAX_BATCH_CUDA)
    if str(device) != "cpu":
        module = copy.deepcopy(module).to(device)  # the caller's module stays where it is
    return torch.export.export(module, (torch.rand(2, 1, 28, 28, device=device),),
                               dynamic_shapes={"image": {0: batch}})


def write_pt2(module, path, meta):
    program = exported_program(module)
    write_synced(path, lambda f: torch.export.save(program, f, extra_files={"metadata.json": json.dumps(meta)}))


def check_cxx():
    """AOTInductor compiles C++ at export time: one clear line, before any work, if no compiler works."""
    from torch._inductor import config, cpp_builder, exc
    try:
        cpp_builder.get_cpp_compiler()
    except exc.InvalidCxxCompiler:
        tried = ", ".join(c for c in config.cpp.cxx if c)
        raise UserError(f"--format aoti needs a C++ compiler at export time (AOTInductor builds a shared library) "
                        f"and none works here (tried: {tried}); install g++ or set CXX to one") from None


def write_aoti(module, path, meta, device="cpu"):
    """An AOTInductor package compiled for `device` (cpu or cuda), metadata inside it."""
    check_cxx()
    from torch._inductor import aoti_compile_and_package
    models.quiet_inductor()
    program = exported_program(module, device)
    configs = dict(AOTI_CONFIGS, **{"aot_inductor.metadata": dict(meta)})
    def write(f):
        with torch.no_grad():  # else inductor skips freezing (torch/_inductor/compile_fx.py)
            aoti_compile_and_package(program, package_path=f, inductor_configs=configs)
    write_synced(path, write)


# ------------------------------------------------------------------------- the trust rule

def check_trusted(path, trust_code, blob=None):
    """Refuse a code-bearing file unless the manifest beside it vouches for these exact bytes."""
    fmt = format_of(path)
    if fmt not in CODE or trust_code:
        return
    if blob is None:
        with open(path, "rb") as f:
            blob = f.read()
    try:
        entry = read_manifest(os.path.dirname(os.path.abspath(path))).get(os.path.basename(path))
    except UserError as e:
        raise UserError(f"refusing {path}: {e}") from None
    why = "its sha256 differs from the one in" if isinstance(entry, dict) else "it is not listed in"
    if not (isinstance(entry, dict) and entry.get("sha256") == sha256(blob)):
        raise UserError(f"refusing {path}: {KIND[fmt]} is a program that can run code when loaded, and {why} "
                        f"the {MANIFEST} export.py wrote beside it; pass --trust-code if you trust where it came from")


# ------------------------------------------------------------------------------ loading

MAX_CODE_BYTES = 1 << 30  # a TorchScript, pt2 or AOTInductor file (ours: 0.1-30 MB) is read whole, once
CPU = "CPUExecutionProvider"


def load(path, trust_code=False, threads=None, provider=CPU, device=None):
    """A function float32 numpy [N, 1, 28, 28] in [0, 1] -> log-probabilities numpy [N, 10] for an exported
    file, with .metadata (contract.clean_metadata's), .format and .native, the format's own runnable for
    callers that time it (bench.py): an onnxruntime InferenceSession on `provider` with `threads` intra-op
    threads for ONNX, else a torch callable taking a float32 tensor on `device` (default: the CPU; an
    AOTInductor package's is the one it was compiled for, and another is refused).
    The file is read once, and what is checked is what loads: an ONNX graph passes contract.check_onnx
    before any session exists, a code-bearing file check_trusted before torch sees it; then its metadata
    is checked, and a fixed probe batch must give log-probabilities, as every later call must."""
    fmt = format_of(path)
    blob = read_export(path, fmt)
    try:
        if fmt in ONNX:
            check_kind(path, fmt, io.BytesIO(blob))
            proto = contract.check_onnx(path, blob)
            native = ort_session(blob, threads, provider)
            meta = {p.key: p.value for p in proto.metadata_props}
            name = native.get_inputs()[0].name
            raw = lambda x: native.run(None, {name: x})[0]  # noqa: E731
        else:
            check_trusted(path, trust_code, blob)  # nothing of the file runs before this
            check_kind(path, fmt, io.BytesIO(blob))
            native, raw, meta = _load_torch(fmt, path, blob, device)  # from the bytes hashed, not the path again
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"cannot load {path}: {first_line(e)}") from None
    meta = contract.clean_metadata(path, meta, models.RECIPES)
    run = contract.checked(path, raw)
    run(contract.probe_batch())
    run.metadata, run.format, run.native = meta, fmt, native
    return run


def read_export(path, fmt):
    """The bytes of the exported file `path`: a regular file (a folder, FIFO or device is refused, and
    never waited on) no larger than its format's files get."""
    limit = contract.MAX_ONNX_BYTES if fmt in ONNX else MAX_CODE_BYTES
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise UserError(f"artifact {path} does not exist") from None
    except OSError as e:
        raise UserError(f"cannot read artifact {path}: {e.strerror}") from None
    blob, mode = read_open_file(fd, limit)
    if blob is None:
        raise UserError(f"artifact {path} is {kind_of(mode)}, not a file export.py wrote")
    if len(blob) > limit:
        raise UserError(f"refusing {path}: larger than {limit:,} bytes, which no {fmt} file export.py writes reaches")
    return blob


def ort_session(model, threads=None, provider=CPU):
    """An onnxruntime session of `model` (a path or the bytes) on exactly `provider`: one that cannot start
    it raises, and no node may fall back to the CPU quietly (bench.py would then time the CPU as CUDA).
    It runs what it is given: load() checks a file's graph first."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    if provider != CPU:
        opts.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    sess = ort.InferenceSession(model, opts, providers=[provider])
    sess.disable_fallback()
    if sess.get_providers()[0] != provider:
        raise RuntimeError(f"onnxruntime could not start {provider} (it offered {sess.get_providers()})")
    return sess


def archive_kind(f):
    """What a file (a path or a binary file object) holds by its bytes: 'torchscript', 'pt2' or 'aoti'
    for torch's zip archives, 'zip' for another zip, None for no zip at all (ONNX is protobuf)."""
    if not zipfile.is_zipfile(f):
        return None
    with zipfile.ZipFile(f) as z:  # the central directory only: nothing is inflated
        inner = {n.split("/", 1)[-1] for n in z.namelist()}
    if "archive_format" in inner:  # torch's PT2 archive, which an AOTInductor package is too
        return "aoti" if any(n.startswith("data/aotinductor/") for n in inner) else "pt2"
    return "torchscript" if "constants.pkl" in inner else "zip"


def check_kind(path, fmt, f):
    """Refuse a file whose bytes are not the format its name says (a TorchScript archive named .onnx,
    an ONNX file named .pt2, a .pt2 named .aoti.pt2...) before any loader sees it."""
    kind = archive_kind(f)
    if kind == (None if fmt in ONNX else fmt):
        return
    got = KIND.get(kind) or ("a zip archive of no format export.py writes" if kind else
                             "not a zip archive (an ONNX file, or a damaged one)")
    raise UserError(f"{path} does not hold what its name says ({KIND[fmt]}): it is {got}")


def _load_torch(fmt, path, blob, device=None):
    """(the loaded module on its device, raw run function, metadata) of a TorchScript, pt2 or AOTInductor
    file's bytes. `device`: where TorchScript and pt2 run (default CPU); an AOTInductor package runs where
    it was compiled for, and another `device` is refused."""
    if fmt in ("torchscript", "pt2"):
        device = torch.device(device or "cpu")
        extra = {"metadata.json": ""}  # both carry their metadata as this extra file (see the writers)
        with stderr_into():  # a damaged archive makes torch log a warning with a traceback before it raises
            if fmt == "torchscript":
                module = torch.jit.load(io.BytesIO(blob), map_location=device, _extra_files=extra).eval()
            else:
                module = torch.export.load(io.BytesIO(blob), extra_files=extra).module().to(device)
        meta = extra["metadata.json"]
    else:
        from torch._inductor import aoti_load_package
        models.quiet_inductor()
        with stderr_into():  # likewise ("Loading outdated pt2 file") before it raises
            module = aoti_load_package(io.BytesIO(blob))  # these bytes, copied to a private temp file
        meta = module.get_metadata()
        compiled = torch.device(meta.get("AOTI_DEVICE_KEY", "cpu"))
        if compiled.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"{path} is an AOTInductor package compiled for CUDA, and this machine has no CUDA device")
        if device is not None and torch.device(device).type != compiled.type:
            raise UserError(f"{path} is an AOTInductor package compiled for {compiled.type}, not {device}")
        device = compiled

    def raw(x):
        if fmt == "aoti":
            # compiled code: it trusts its caller on dtype, shape and memory layout, and computes garbage
            # from a float64, a [N, 1, 28, 27] or a strided input (unless AOTI_RUNTIME_CHECK_INPUTS=1)
            if not (isinstance(x, np.ndarray) and x.dtype == np.float32 and x.ndim == 4 and x.shape[1:] == (1, 28, 28)):
                got = f"{x.dtype} {list(x.shape)}" if isinstance(x, np.ndarray) else type(x).__name__
                raise UserError(f"it was given {got}")
            x = np.ascontiguousarray(x)
        with torch.no_grad():
            out = module(torch.from_numpy(x).to(device))
        return out.cpu().numpy() if isinstance(out, torch.Tensor) else out
    return module, raw, meta


def read_metadata(path, trust_code=False):
    return load(path, trust_code).metadata


def log_probs(artifact, images, batch_size=1000, trust_code=False):
    """Log-probabilities [N, 10] (torch, CPU) of an exported file (a path, or a function from load())
    for uint8 images [N, 28, 28]."""
    run = load(artifact, trust_code) if isinstance(artifact, str) else artifact
    x = data.to_unit(images).numpy()
    return torch.from_numpy(np.concatenate([run(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]))



# ---------------------------------------------------------------------- one path for both

@dataclass
class Classifier:
    """A checkpoint or an exported file as one thing: call it on uint8 images [N, 28, 28] for their
    log-probabilities [N, 10] (torch, CPU). kind: 'checkpoint' or the export format; test_acc: the test
    accuracy recorded with it (%, None if it records none); ckpt: the checkpoint dict (checkpoints only)."""
    log_probs: object
    model: str
    source: str
    kind: str
    test_acc: float = None
    metadata: dict = field(default_factory=dict)
    ckpt: dict = None

    def __call__(self, images, batch_size=1000):
        return self.log_probs(images, batch_size)


def is_export(path):
    return any(path.endswith(suffix) for suffix in FORMATS.values())


def classifier(source, trust_code=False, device="cpu", model_name=None, kind=None):
    """The Classifier of `source`: a file export.py wrote (by its suffix, under the trust rule), a
    checkpoint train.py wrote, or a registry name (its runs/<model>/latest/best.pt, else pretrained/).
    kind 'artifact' or 'checkpoint' reads it as that whatever its name (the scripts' --artifact and
    --checkpoint); device is where a checkpoint's model runs."""
    if kind is None and source in models.RECIPES and not os.path.isfile(source):
        source = find_checkpoint(source)
    if os.path.isdir(source):
        raise UserError(f"{source} is a folder; give a checkpoint, a file export.py wrote, or a model name")
    if kind == "artifact" or kind is None and is_export(source):
        run = load(source, trust_code)
        meta = run.metadata  # checked: its model is a registry name, its figures in range, its texts printable
        return Classifier(lambda x, batch_size: log_probs(run, x, batch_size), meta["model"], source,
                          format_of(source), recorded_accuracy(meta.get("test_acc")), meta)
    ckpt = load_checkpoint(source, model_name)
    model = models.from_checkpoint(ckpt).to(device)
    return Classifier(lambda x, batch_size: models.log_probs(model, x, batch_size), ckpt["model_name"], source,
                      "checkpoint", ckpt["test_acc"], ckpt=ckpt)


def recorded_accuracy(text):
    """An export's metadata test_acc ('99.53') as a number, None when it is not a percentage."""
    try:
        acc = float(text)
    except (TypeError, ValueError):
        return None
    return acc if 0 <= acc <= 100 else None


# ------------------------------------------------------------------------------- int8

# The int8 settings, one record: quantize_static is called with exactly these (each name an
# onnxruntime.quantization enum member), and every int8 file carries them in its metadata.
INT8 = dict(quant_format="QDQ", per_channel=True, activation_type="QUInt8", weight_type="QInt8",
            calibrate_method="MinMax")


def quantize_options():
    """INT8 as quantize_static's keyword arguments."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType
    enums = dict(quant_format=QuantFormat, activation_type=QuantType, weight_type=QuantType,
                 calibrate_method=CalibrationMethod)
    return {k: enums[k][v] if k in enums else v for k, v in INT8.items()}


def write_onnx_int8(module, path, meta, opset, calibration):
    """Static int8 ONNX with onnxruntime's own tools: the fp32 export, quant_pre_process (shape
    inference and graph optimisation), then quantize_static with INT8's settings (QDQ, per-channel int8
    weights, uint8 activations, MinMax) calibrated on `calibration`, float32 [n, 1, 28, 28]
    training images (data.calibration_set). Same input and output as the fp32 file; its metadata is
    the fp32 file's plus the quantisation settings and the calibration set."""
    import tempfile

    import onnx
    from onnxruntime.quantization import CalibrationDataReader, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.left = iter(calibration[i:i + 128] for i in range(0, len(calibration), 128))

        def get_next(self):
            batch = next(self.left, None)
            return None if batch is None else {"image": batch}

    with tempfile.TemporaryDirectory() as tmp:
        fp32, pre, q = (os.path.join(tmp, n) for n in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        write_onnx(module, fp32, meta, opset)
        with stderr_into():   # the quantiser logs advice to pre-process (done) and per-node notes
            quant_pre_process(fp32, pre)
            quantize_static(pre, q, Batches(), **quantize_options())
        proto = onnx.load(q)
    onnx.helper.set_model_props(proto, dict(meta, quantization=json.dumps(INT8),
                                            calibration=f"the first {len(calibration):,} MNIST training images "
                                            "(data.calibration_set; never the test set)"))
    onnx.checker.check_model(proto, full_check=True)
    write_synced(path, lambda f: f.write(proto.SerializeToString()))
