"""How bench.py measures: a timer, training throughput through train.py's own training setup, and
inference latency and throughput of each backend, loaded from the file a user would ship.
"""
import itertools
import math
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import torch

import artifacts
import data
import loop
import models
from errors import first_line
from runfiles import load_checkpoint, make_checkpoint, save_checkpoint

BATCH_INFER = 1024  # the batch of the inference throughput figure


class Timer:
    """Wall-clock on CPU; CUDA events after a synchronisation on CUDA."""

    def __init__(self, device):
        self.device = device

    def __call__(self, fn):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1000
        if self.device.type == "mps":
            torch.mps.synchronize()
        t = time.perf_counter()
        fn()
        if self.device.type == "mps":
            torch.mps.synchronize()
        return time.perf_counter() - t


@dataclass
class Settings:
    """How a run measures, the same for every model and device: timed repeats (the median is reported),
    batch-1 calls per latency figure, training steps per repeat (None: a whole epoch off the CPU, 30
    with --quick, else 50), the sources' pipeline's DataLoader workers, the fast-pipeline variants, the
    inference backends, the images onnxruntime-int8 is calibrated on (None: not wanted), and where
    progress lines go."""
    repeats: int = 3
    calls: int = 500
    steps: int = None
    quick: bool = False
    workers: int = 2
    variants: list = field(default_factory=lambda: list(VARIANTS))
    backends: list = field(default_factory=lambda: list(BACKENDS))
    calibration: object = None
    progress: object = lambda what: None

    def train_steps(self, name, device, n_images):
        if self.steps:
            return self.steps
        if device.type != "cpu":
            return math.ceil(n_images / models.RECIPES[name]["batch_size"])
        return 30 if self.quick else 50


# fast-pipeline variants: the train.py flags each turns on, and the devices where it can differ
# from the others (fast_dropout only changes CPU; CUDA graphs exist only on CUDA)
VARIANTS = {
    "eager": (set(), ("cpu", "cuda", "mps")),
    "channels_last": ({"channels_last"}, ("cpu", "cuda", "mps")),
    "amp": ({"amp"}, ("cpu", "cuda", "mps")),
    "channels_last+amp": ({"channels_last", "amp"}, ("cpu", "cuda", "mps")),
    "amp+fast_dropout": ({"amp", "fast_dropout"}, ("cpu",)),
    "channels_last+amp+fast_dropout": ({"channels_last", "amp", "fast_dropout"}, ("cpu",)),
    "compile": ({"compile"}, ("cpu", "cuda", "mps")),
    "amp+compile": ({"amp", "compile"}, ("cpu", "cuda", "mps")),
    "amp+fast_dropout+compile": ({"amp", "fast_dropout", "compile"}, ("cpu",)),
    "channels_last+amp+fast_dropout+compile": ({"channels_last", "amp", "fast_dropout", "compile"}, ("cpu",)),
    "cudagraphs": ({"compile", "cudagraphs"}, ("cuda",)),
    "amp+cudagraphs": ({"amp", "compile", "cudagraphs"}, ("cuda",)),
    "whole-step": ({"whole_step"}, ("cpu", "cuda", "mps")),  # whole_step.WholeStep: train.py --whole-step
    "amp+whole-step": ({"amp", "whole_step"}, ("cpu", "cuda", "mps")),
    "whole-step+compile": ({"whole_step", "compile"}, ("cuda",)),  # inductor's kernels inside the step's graphs
    "amp+fast_dropout+whole-step": ({"amp", "fast_dropout", "whole_step"}, ("cpu",)),
}
QUICK = ["eager"]  # --quick's training variant (beside the sources' pipeline): the headline ratio


def bench_train(name, device, images, labels, opts):
    """Training images/s of `name` for the sources' pipeline and each fast-pipeline variant of `opts`
    (a Settings) that applies on `device`, yielded one at a time as ("record", dict) or, for a variant
    that fails (say, CUDA graphs on an unusual build), ("skipped", its one line), so the caller can
    keep every figure the moment it exists."""
    recipe = models.RECIPES[name]
    steps = opts.train_steps(name, device, len(labels))
    train_set = images.to(device), labels.to(device)
    todo = [("sources-pipeline", "eager")] + [("fast-pipeline", v) for v in fast_variants(recipe, device, opts)]
    for i, (pipeline, variant) in enumerate(todo, 1):
        what = f"train {name} {device.type} {pipeline}/{variant}"
        opts.progress(f"{what} ({i} of {len(todo)})")
        try:
            rates, extra = time_training(name, device, pipeline, variant, steps, train_set, opts)
        except Exception as e:  # report and go on: one broken variant must not lose the whole table
            yield "skipped", f"{what}: {one_line(e)}"
            continue
        record = dict(task="train", model=name, device=device.type, backend=pipeline, variant=variant,
                      batch_size=recipe["batch_size"], threads=torch.get_num_threads() if device.type == "cpu" else None,
                      steps=extra.pop("steps"), metric="images_per_s", value=round(statistics.median(rates), 1),
                      unit="images/s", spread=spread(rates), **extra)
        yield "record", record
        if "note" in record:
            yield "skipped", f"{what}: {record['note']}"


def fast_variants(recipe, device, opts):
    """The variants of `opts` that can differ on `device` (fast dropout only where there is dropout)."""
    has_dropout = any(isinstance(m, torch.nn.Dropout) for m in recipe["model"]().modules())
    return [v for v in opts.variants if device.type in VARIANTS[v][1]
            and (has_dropout or "fast_dropout" not in VARIANTS[v][0])]


LONG = 1000  # epochs of the schedule a timed run is built with: long enough that no repeat reaches its end


def time_training(name, device, pipeline, variant, steps, train_set, opts):
    """(images/s of each timed repeat, extra record fields) of one variant, built by train.py's own
    build_training from the flags the variant names; the first pass warms up (compilation, graph
    capture, worker start-up, the allocator) and is not counted."""
    import train
    recipe = models.RECIPES[name]
    on = VARIANTS[variant][0]
    args = train.parse_args(["--model", name, "--epochs", str(LONG)]
                            + ["--" + f.replace("_", "-") for f in sorted(on - {"cudagraphs"})])
    args.batch_size = recipe["batch_size"]
    torch.manual_seed(0)
    # the whole step replays CUDA graphs as train.py --whole-step does; --compile's graphs are a variant
    t = train.build_training(args, recipe, device, steps, train_set, cudagraphs=bool({"cudagraphs", "whole_step"} & on))
    gen, timer, rates, extra = data.generator(0, device), Timer(device), [], {}
    skips = graph_skips() if "cudagraphs" in on else 0
    for r in range(opts.repeats + 1):
        done = []
        if t.whole_step is not None:
            seconds = timer(lambda: done.append(t.whole_step.epoch(gen, 1, steps, progress=False)))
        else:
            batches = training_batches(pipeline, recipe, train_set, gen, opts)
            seconds = timer(lambda: done.append(loop.train_epoch(t, itertools.islice(batches, steps), steps,
                                                                 progress=False)))
        if r:
            rates.append(done[0][2] / seconds)  # images actually seen (an epoch's last batch is short)
        elif t.whole_step is not None:
            extra["first_pass_s"] = round(seconds, 1)  # the whole step compiles in its first pass
    extra["steps"] = min(steps, t.whole_step.steps) if t.whole_step is not None else steps
    if "cudagraphs" in on and graph_skips() > skips:
        extra["note"] = "inductor skipped CUDA graphs (see its warning): this is torch.compile alone"
    return rates, extra


def training_batches(pipeline, recipe, train_set, gen, opts):
    """An iterator of training batches: the sources' DataLoader + PIL transforms, or the fast pipeline."""
    x, y = train_set
    if pipeline == "sources-pipeline":
        return iter(data.seed_loader(x.cpu(), y.cpu(), recipe["batch_size"], recipe["augment"],
                                     workers=opts.workers, pin_memory=x.device.type == "cuda"))
    return data.batches(x, y, recipe["batch_size"], recipe["augment"], gen=gen)


def mark_best(records):
    """Flag the fastest fast-pipeline variant among `records` (one model on one device) as best."""
    fast = [r for r in records if r["backend"] == "fast-pipeline"]
    best = max(fast, key=lambda r: r["value"], default=None)
    for r in fast:
        r["best"] = r is best


def spread(values):
    """(max - min) / median of the timed repeats: how far apart they were."""
    return round((max(values) - min(values)) / statistics.median(values), 3) if len(values) > 1 else 0.0


def one_line(e):
    return f"{type(e).__name__}: {first_line(e)}"[:300]


# --------------------------------------------------------------------------- inference

BACKENDS = ["eager", "torchscript", "compile", "onnxruntime", "onnxruntime-int8", "pt2", "aoti"]
QUICK_BACKENDS = ["eager", "onnxruntime"]  # --quick's: the headline batch-1 latency ratio
ORT = {"onnxruntime", "onnxruntime-int8"}  # the backends ONNX Runtime runs
LOADS = 3  # timed loads of each backend's file, after one warm-up load


def file_figures(path, load):
    """(what the last load returned, {load_ms, file_bytes}): load_ms is the median of LOADS loads after a
    warm-up one, in a process that has imported everything already (a fresh process pays imports too)."""
    times = []
    for _ in range(LOADS + 1):
        t = time.perf_counter()
        got = load(path)
        times.append(time.perf_counter() - t)
    return got, dict(load_ms=round(statistics.median(times[1:]) * 1000, 3), file_bytes=os.path.getsize(path))


def inference_backends(name, device, tmp, opts):
    """(backend -> function of a float32 [N, 1, 28, 28] [0, 1] tensor on `device` (onnxruntime: the .onnx
    path; a session is made per thread count in bench_infer), backend -> {load_ms, file_bytes} of the
    file a user would ship for it, skipped).
    Every backend that has a file runs what was loaded back from that file: eager a checkpoint,
    torchscript a .torchscript.pt (then frozen), onnxruntime a .onnx, pt2 a torch.export .pt2,
    aoti an AOTInductor package compiled for `device`; onnxruntime-int8 a .int8.onnx calibrated on
    opts.calibration. `opts`: a Settings (its backends are the ones wanted)."""
    model = models.build_model(name).eval()
    ckpt = make_checkpoint(name, model.state_dict(), 0, 0.0, models.n_params(model))
    meta = artifacts.metadata(ckpt)
    cpu_module = artifacts.Exportable(model).eval()
    provider = ort_provider(device)

    def ort_load(path):  # the loader checks the file; bench_infer makes a session per thread count
        import onnxruntime as ort
        if provider not in ort.get_available_providers():
            raise RuntimeError(f"{provider} is not in this onnxruntime build (pip install onnxruntime-gpu for CUDA)")
        artifacts.load(path, provider=provider)
        return path

    def torch_load(path):  # the loader every script uses; bench wrote the file itself, so it is trusted
        return artifacts.load(path, trust_code=True, device=device).native

    # backend: (file suffix, write it, load it back); all written from the CPU model, before it moves
    files = dict(
        eager=(".pt", lambda p: save_checkpoint(ckpt, p), lambda p: models.from_checkpoint(load_checkpoint(p))),
        torchscript=(".torchscript.pt", lambda p: artifacts.write_torchscript(cpu_module, p, meta), torch_load),
        onnxruntime=(".onnx", lambda p: artifacts.write_onnx(cpu_module, p, meta, 18), ort_load),
        pt2=(".pt2", lambda p: artifacts.write_pt2(cpu_module, p, meta), torch_load),
        aoti=(".aoti.pt2", lambda p: artifacts.write_aoti(cpu_module, p, meta, device.type), torch_load),
    )
    files["onnxruntime-int8"] = (".int8.onnx", lambda p: artifacts.write_onnx_int8(cpu_module, p, meta, 18,
                                                                                  opts.calibration), ort_load)
    loaded, figures, skipped = {}, {}, []
    for backend in [b for b in opts.backends if b in files]:
        suffix, write, load = files[backend]
        path = os.path.join(tmp, name + suffix)
        try:
            if backend == "aoti":
                opts.progress(f"infer {name} {device.type} aoti: compiling the package (a minute on 2 cores)")
            write(path)
            loaded[backend], figures[backend] = file_figures(path, load)
        except Exception as e:
            skipped.append(f"infer {name} {device.type} {backend}: {one_line(e)}")
    # eager runs the model loaded back from its checkpoint (the in-memory one where that load failed)
    module = artifacts.Exportable(loaded.get("eager", model)).eval().to(device)

    def no_grad(fn):
        def run(x):
            with torch.inference_mode():
                return fn(x)
        return run

    makers = dict(eager=lambda: no_grad(module),
                  torchscript=lambda: no_grad(torch.jit.freeze(loaded["torchscript"])),
                  compile=lambda: no_grad(models.compile_model(module)),  # CUDA graphs on CUDA: launch-bound batch 1
                  onnxruntime=lambda: loaded["onnxruntime"],
                  pt2=lambda: no_grad(loaded["pt2"]),
                  **{"onnxruntime-int8": lambda: loaded["onnxruntime-int8"]},
                  aoti=lambda: no_grad(loaded["aoti"]))
    out = {}
    for backend in opts.backends:
        if backend in files and backend not in loaded and backend != "eager":
            continue  # its file failed: already in skipped
        try:
            out[backend] = makers[backend]()
        except Exception as e:
            skipped.append(f"infer {name} {device.type} {backend}: {one_line(e)}")
    return out, figures, skipped


def ort_provider(device):
    return "CUDAExecutionProvider" if device.type == "cuda" else "CPUExecutionProvider"


def where(backend, device):
    """On MPS, onnxruntime runs on the CPU (it has no MPS provider): its records say so."""
    return "cpu" if backend in ORT and device.type == "mps" else device.type


@dataclass
class Target:
    """One model on one device, as each of its inference timings sees it: the inputs (batch 1 and
    BATCH_INFER, on the device), the timer, the ONNX Runtime provider and the run's Settings."""
    name: str
    device: torch.device
    opts: Settings
    provider: str = None
    timer: Timer = None
    x1: torch.Tensor = None
    xb: torch.Tensor = None

    def __post_init__(self):
        self.provider = ort_provider(self.device)
        self.timer = Timer(self.device)
        self.x1 = torch.rand(1, 1, 28, 28, device=self.device)
        self.xb = torch.rand(BATCH_INFER, 1, 28, 28, device=self.device)


def bench_infer(name, device, threads_list, opts):
    """Batch-1 latency and batch-1024 throughput of `name` for each backend of `opts` (a Settings) and
    thread count, then the load time and size of each backend's file, yielded one at a time as
    ("record", dict) or ("skipped", its one line)."""
    with tempfile.TemporaryDirectory() as tmp:
        target = Target(name, device, opts)
        backends, figures, skipped = inference_backends(name, device, tmp, opts)
        for line in skipped:
            yield "skipped", line
        todo = [(t, b) for t in threads_list for b in backends]
        for i, (threads, backend) in enumerate(todo, 1):
            what = f"infer {name} {device.type} {backend}"
            opts.progress(f"{what}, threads {threads or '-'} ({i} of {len(todo)})")
            if device.type == "cpu":
                torch.set_num_threads(threads)
            try:
                got = time_backend(target, backend, backends[backend], threads)
            except Exception as e:
                yield "skipped", f"{what}: {one_line(e)}"
                continue
            for r in got:
                yield "record", r
            if "note" in got[0]:
                yield "skipped", f"{what}: {got[0]['note']}"
    for backend, f in figures.items():
        base = dict(task="infer", model=name, device=where(backend, device), backend=backend, threads=None,
                    batch_size=None)
        yield "record", dict(base, metric="load_ms", value=f["load_ms"], unit="ms")
        yield "record", dict(base, metric="file_bytes", value=f["file_bytes"], unit="bytes")


def ort_runners(sess, provider, x1, xb):
    """Batch-1 and batch-1024 calls of an ORT session. On CUDA the inputs and outputs stay on the GPU
    (IO binding), so ORT does the same work the torch backends do; on the CPU, numpy in and out."""
    if provider == "CUDAExecutionProvider":
        def bound(x):
            b = sess.io_binding()
            b.bind_input("image", "cuda", x.device.index or 0, np.float32, list(x.shape), x.data_ptr())
            b.bind_output("log_probs", "cuda", x.device.index or 0)
            return lambda: sess.run_with_iobinding(b)
        return bound(x1), bound(xb)
    a1, ab = x1.cpu().numpy(), xb.cpu().numpy()
    return (lambda: sess.run(None, {"image": a1})), (lambda: sess.run(None, {"image": ab}))


def graph_skips():
    """How many calls inductor has run without CUDA graphs so far (torch._dynamo is imported only when
    asked: 2-3 s that a run without torch.compile or torch.export does not need)."""
    from torch._dynamo.utils import counters
    return counters["inductor"]["cudagraph_skips"]


def time_backend(t, backend, fn, threads):
    """The p50, p99 and batch-BATCH_INFER records of one backend's function `fn` (onnxruntime: its file)
    on Target `t` at `threads`."""
    skips = graph_skips() if backend == "compile" else 0
    if backend in ORT:
        sess = artifacts.ort_session(fn, threads, t.provider)  # threads is None off the CPU
        run1, runb = ort_runners(sess, t.provider, t.x1, t.xb)
    else:
        run1, runb = (lambda: fn(t.x1)), (lambda: fn(t.xb))
    for _ in range(max(10, t.opts.calls // 10)):   # warm-up (compile, graph capture, allocator, caches)
        run1()
    runb()
    runb()
    lat = sorted(t.timer(run1) * 1000 for _ in range(t.opts.calls))
    rates = [BATCH_INFER / t.timer(runb) for _ in range(t.opts.repeats)]
    base = dict(task="infer", model=t.name, device=where(backend, t.device), backend=backend, threads=threads)
    if backend == "compile" and t.device.type == "cuda" and graph_skips() > skips:
        base["note"] = "inductor skipped CUDA graphs (see its warning): this is torch.compile alone"
    return [dict(base, batch_size=1, metric="p50_ms", value=round(lat[len(lat) // 2], 4), unit="ms"),
            dict(base, batch_size=1, metric="p99_ms", value=round(lat[math.ceil(len(lat) * 0.99) - 1], 4), unit="ms"),
            dict(base, batch_size=BATCH_INFER, metric="images_per_s", value=round(statistics.median(rates), 1),
                 unit="images/s", spread=spread(rates))]


