"""Training throughput and inference latency, side by side in one run.

    python bench.py --quick                 # gap10k on CPU, under 5 minutes on 2 cores (make bench)
    python bench.py --json bench.json       # every model on every device found (make bench FULL=1)
    python bench.py --model bn_fc --device cpu --task infer --backend eager onnxruntime

train  images/s at the recipe's batch size with its augmentation, for the seed-style pipeline
       (torchvision Dataset + PIL transforms + DataLoader, eager, NCHW) and this project's fast
       pipeline in each variant that applies on the device (channels_last, bfloat16 amp, fast
       dropout on CPU, torch.compile, CUDA graphs on CUDA); the best variant is the fast-pipeline
       figure, the others are reported beside it. On CUDA and MPS a repeat is a whole epoch.
infer  batch-1 p50/p99 latency and batch-1024 images/s for eager, TorchScript, ONNX Runtime (fp32 and,
       on the CPU, static int8 calibrated on 1,024 training images),
       torch.compile (with CUDA graphs on CUDA), torch.export (.pt2, its module()) and AOTInductor
       (a package compiled for the device), on CPU with 1 thread and with all cores; on CUDA timed
       with CUDA events after a synchronisation. Also the load time and size of the file each
       backend runs from (checkpoint, .torchscript.pt, .onnx, .pt2, .aoti.pt2).
Every figure is the median of several timed repeats after a warm-up. A variant or backend that
fails is listed under "not measured" with its error; the rest of the table still comes out.
"""
import argparse
import itertools
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import torch

import artifacts
import data
import loop
import models
import whole_step
from errors import check_at_least, first_line, one_line_errors
from fileio import check_out_file, save_json
from machine import device_name, devices_present, get_device, provenance
from runfiles import load_checkpoint, make_checkpoint, save_checkpoint

NOISY = 0.2  # a figure whose timed repeats spread by more than this share of their median is flagged

BATCH_INFER = 1024


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
    with --quick, else 50), the seed pipeline's DataLoader workers, the fast-pipeline variants, the
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


# ---------------------------------------------------------------------------- training

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
    "amp+fast_dropout+whole-step": ({"amp", "fast_dropout", "whole_step"}, ("cpu",)),
}
# --quick: the variants that have won somewhere, and plain eager for reference
QUICK = ["eager", "amp", "amp+fast_dropout", "channels_last+amp+fast_dropout", "amp+fast_dropout+compile",
         "cudagraphs", "amp+fast_dropout+whole-step", "whole-step"]


def bench_train(name, device, images, labels, opts):
    """(records, skipped) of training images/s for the seed pipeline and each fast-pipeline variant of
    `opts` (a Settings). A variant that fails (say, CUDA graphs on an unusual build) is noted in
    skipped, not fatal."""
    recipe = models.RECIPES[name]
    steps = opts.train_steps(name, device, len(labels))
    bs = recipe["batch_size"]
    timer = Timer(device)
    records, skipped = [], []

    def measure(backend, variant, make_loader):
        on = VARIANTS[variant][0]
        if "whole_step" in on:
            return measure_whole_step(variant, on)
        model, net = models.build(recipe, device, "channels_last" in on, "fast_dropout" in on, "compile" in on,
                                  cudagraphs="cudagraphs" in on)
        opt = models.build_optimizer(recipe, model)
        sched, every = models.build_schedule(recipe, opt, 1000, steps)  # long schedule: no step limit
        trainer = loop.Trainer(net, opt, sched, every, "channels_last" in on, "amp" in on)
        skips = graph_skips() if "cudagraphs" in on else 0
        rates = []
        # first pass: warm-up (compilation, graph capture, worker start-up, allocator), then timed repeats
        for r in range(opts.repeats + 1):
            loader, done = make_loader(), []
            seconds = timer(lambda: done.append(loop.train_epoch(trainer, itertools.islice(loader, steps), steps,
                                                                 progress=False)))
            if r:
                rates.append(done[0][2] / seconds)  # images actually seen (an epoch's last batch is short)
        record(backend, variant, steps, rates)
        if "cudagraphs" in on and graph_skips() > skips:
            records[-1]["note"] = "inductor skipped CUDA graphs (see its warning): this is torch.compile alone"
            skipped.append(f"train {name} {device.type} {backend}/{variant}: {records[-1]['note']}")

    def measure_whole_step(variant, on):
        model = models.build(recipe, device, fast_dropout="fast_dropout" in on)[0]
        ws = whole_step.WholeStep(model, recipe, dev_x, dev_y, bs, 1000, amp="amp" in on)  # long schedule
        rates, compile_s = [], None
        for r in range(opts.repeats + 1):  # the first pass compiles: its time is reported as compile_s
            done = []
            seconds = timer(lambda: done.append(ws.epoch(gen, 1, steps, progress=False)))
            if r:
                rates.append(done[0][2] / seconds)
            else:
                compile_s = seconds
        record("fast-pipeline", variant, min(steps, ws.steps), rates, first_pass_s=round(compile_s, 1))

    def record(backend, variant, steps_done, rates, **extra):
        records.append(dict(task="train", model=name, device=device.type, backend=backend, variant=variant,
                            batch_size=bs, threads=torch.get_num_threads() if device.type == "cpu" else None,
                            steps=steps_done, metric="images_per_s", value=round(statistics.median(rates), 1),
                            unit="images/s", spread=spread(rates), **extra))

    gen = data.generator(0, device)
    dev_x, dev_y = images.to(device), labels.to(device)
    seed_loader = data.seed_loader(images.cpu(), labels.cpu(), bs, recipe["augment"], workers=opts.workers,
                                   pin_memory=device.type == "cuda")
    todo = [("seed-pipeline", "eager", lambda: iter(seed_loader))]
    has_dropout = any(isinstance(m, torch.nn.Dropout) for m in recipe["model"]().modules())
    todo += [("fast-pipeline", v, lambda: data.batches(dev_x, dev_y, bs, recipe["augment"], gen=gen))
             for v in opts.variants if device.type in VARIANTS[v][1]
             and (has_dropout or "fast_dropout" not in VARIANTS[v][0])]  # else it is the same as without
    for i, (backend, variant, make_loader) in enumerate(todo, 1):
        opts.progress(f"train {name} {device.type} {backend}/{variant} ({i} of {len(todo)})")
        try:
            measure(backend, variant, make_loader)
        except Exception as e:  # report and go on: one broken variant must not lose the whole table
            skipped.append(f"train {name} {device.type} {backend}/{variant}: {one_line(e)}")
    fast = [r for r in records if r["backend"] == "fast-pipeline"]
    if fast:
        best = max(fast, key=lambda r: r["value"])
        for r in fast:
            r["best"] = r is best
    return records, skipped


def spread(values):
    """(max - min) / median of the timed repeats: how far apart they were."""
    return round((max(values) - min(values)) / statistics.median(values), 3) if len(values) > 1 else 0.0


def one_line(e):
    return f"{type(e).__name__}: {first_line(e)}"[:300]


# --------------------------------------------------------------------------- inference

BACKENDS = ["eager", "torchscript", "compile", "onnxruntime", "onnxruntime-int8", "pt2", "aoti"]
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
    from torch._inductor import aoti_load_package
    model = models.build_model(name).eval()
    ckpt = make_checkpoint(name, model.state_dict(), 0, 0.0, models.n_params(model))
    meta = artifacts.metadata(ckpt)
    cpu_module = artifacts.Exportable(model).eval()
    provider = ort_provider(device)

    def ort_load(path):
        import onnxruntime as ort
        if provider not in ort.get_available_providers():
            raise RuntimeError(f"{provider} is not in this onnxruntime build (pip install onnxruntime-gpu for CUDA)")
        artifacts.ort_session(path, None, provider)
        return path

    # backend: (file suffix, write it, load it back); all written from the CPU model, before it moves
    files = dict(
        eager=(".pt", lambda p: save_checkpoint(ckpt, p), lambda p: models.from_checkpoint(load_checkpoint(p))),
        torchscript=(".torchscript.pt", lambda p: artifacts.write_torchscript(cpu_module, p, meta),
                     lambda p: torch.jit.load(p, map_location=device).eval()),
        onnxruntime=(".onnx", lambda p: artifacts.write_onnx(cpu_module, p, meta, 18), ort_load),
        pt2=(".pt2", lambda p: artifacts.write_pt2(cpu_module, p, meta), lambda p: torch.export.load(p).module()),
        aoti=(".aoti.pt2", lambda p: artifacts.write_aoti(cpu_module, p, meta, device.type), aoti_load_package),
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
    module = artifacts.Exportable(model).eval().to(device)

    def no_grad(fn):
        def run(x):
            with torch.inference_mode():
                return fn(x)
        return run

    makers = dict(eager=lambda: no_grad(module),
                  torchscript=lambda: no_grad(torch.jit.freeze(loaded["torchscript"])),
                  compile=lambda: no_grad(models.compile_model(module)),  # CUDA graphs on CUDA: launch-bound batch 1
                  onnxruntime=lambda: loaded["onnxruntime"],
                  pt2=lambda: no_grad(loaded["pt2"].to(device)),
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
    """(records, skipped) of batch-1 latency and batch-1024 throughput for each backend of `opts` (a
    Settings) and thread count, and load time and file size for each backend that has a file."""
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        target = Target(name, device, opts)
        backends, figures, skipped = inference_backends(name, device, tmp, opts)
        todo = [(t, b) for t in threads_list for b in backends]
        for i, (threads, backend) in enumerate(todo, 1):
            opts.progress(f"infer {name} {device.type} {backend}, threads {threads or '-'} ({i} of {len(todo)})")
            if device.type == "cpu":
                torch.set_num_threads(threads)
            try:
                got = time_backend(target, backend, backends[backend], threads)
                records += got
                if any("note" in r for r in got):
                    skipped.append(f"infer {name} {device.type} {backend}: {got[0]['note']}")
            except Exception as e:
                skipped.append(f"infer {name} {device.type} {backend}: {one_line(e)}")
    for backend, f in figures.items():
        base = dict(task="infer", model=name, device=where(backend, device), backend=backend, threads=None,
                    batch_size=None)
        records += [dict(base, metric="load_ms", value=f["load_ms"], unit="ms"),
                    dict(base, metric="file_bytes", value=f["file_bytes"], unit="bytes")]
    return records, skipped


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


# ------------------------------------------------------------------------------ report

def environment(devices, threads):
    import onnxruntime
    env = dict(cpu=device_name(torch.device("cpu")), gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available()
               else None, **provenance(torch.device("cpu"), threads), onnxruntime=onnxruntime.__version__,
               load_before=load_average(), devices=[d.type for d in devices])
    del env["device_name"]  # cpu and gpu name the machine here
    return env


def markdown(records):
    lines = ["### Training throughput (images/s, recipe batch size, with augmentation)", "",
             "| model | device | seed-pipeline | fast-pipeline (best variant) | speed-up | epoch of 60k, seed / fast |"
             " other fast variants |",
             "|---|---|---|---|---|---|---|"]
    train_r = [r for r in records if r["task"] == "train"]
    for (m, d) in dict.fromkeys((r["model"], r["device"]) for r in train_r):
        rs = [r for r in train_r if (r["model"], r["device"]) == (m, d)]
        seed = next((r for r in rs if r["backend"] == "seed-pipeline"), None)
        best = next((r for r in rs if r.get("best")), None)
        others = ", ".join(f"{r['variant']} {r['value']:,.0f}" for r in rs if r["backend"] == "fast-pipeline"
                           and not r.get("best"))
        cell = lambda r: "-" if r is None else f"{'~' * (r.get('spread', 0) > NOISY)}{r['value']:,.0f}"  # noqa: E731
        epoch = lambda r: "-" if r is None else f"{60000 / r['value']:.2f} s"  # noqa: E731
        ratio = f"{best['value'] / seed['value']:.1f}x" if seed and best else "-"
        which = f" ({best['variant']})" if best else ""
        lines.append(f"| {m} | {d} | {cell(seed)} | {cell(best)}{which} | {ratio} | "
                     f"{epoch(seed)} / {epoch(best)} | {others} |")
    train_lines = lines if train_r else []  # a task that was not run gets no empty table
    lines = ["### Inference (batch 1 latency in ms, batch 1024 throughput; load time and size of the file "
             "each backend runs from)", "",
             "| model | device | threads | backend | p50 ms | p99 ms | images/s @1024 | p50 vs eager | load ms | file |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    inf = [r for r in records if r["task"] == "infer" and r["metric"] in ("p50_ms", "p99_ms", "images_per_s")]
    files = {}
    for r in records:
        if r["task"] == "infer" and r["metric"] in ("load_ms", "file_bytes"):
            files.setdefault((r["model"], r["device"], r["backend"]), {})[r["metric"]] = r["value"]
    for key in dict.fromkeys((r["model"], r["device"], r["threads"], r["backend"]) for r in inf):
        get = {r["metric"]: r["value"] for r in inf if (r["model"], r["device"], r["threads"], r["backend"]) == key}
        noisy = "~" * any(r.get("spread", 0) > NOISY for r in inf
                          if (r["model"], r["device"], r["threads"], r["backend"]) == key)
        eager = next((r["value"] for r in inf if (r["model"], r["device"], r["threads"]) == key[:3]
                      and r["backend"] == "eager" and r["metric"] == "p50_ms"), None)
        vs = f"{eager / get['p50_ms']:.1f}x" if eager else "-"
        f = files.get((key[0], key[1], key[3]), {})
        load = f"{f['load_ms']:.1f}" if "load_ms" in f else "-"
        size = file_size(f["file_bytes"]) if "file_bytes" in f else "-"
        lines.append(f"| {key[0]} | {key[1]} | {key[2] or '-'} | {key[3]} | {get['p50_ms']:.3f} | {get['p99_ms']:.3f} | "
                     f"{noisy}{get['images_per_s']:,.0f} | {vs} | {load} | {size} |")
    return "\n\n".join("\n".join(part) for part in (train_lines, lines if inf else []) if part)


def file_size(n):
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def load_average():
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def warnings_about_load(env, records):
    """Lines that say when the machine was too busy for the figures to mean much."""
    lines, cores = [], env["cores"]
    for when in ("load_before", "load_after"):
        if env.get(when) is not None and env[when] > cores:
            lines.append(f"warning: load average {env[when]} {when.split('_')[1]} the run, above the {cores} cores: "
                         "other work shared the machine, so absolute figures are low and ratios noisy")
    noisy = [r for r in records if r.get("spread", 0) > NOISY]
    if noisy:
        lines.append(f"warning: {len(noisy)} figure(s) whose timed repeats differ by more than {NOISY:.0%} of their "
                     "median (marked ~ in the table): " + ", ".join(
                         f"{r['task']} {r['model']} {r['backend']}/{r.get('variant', r.get('threads'))}" for r in noisy[:6]))
    return lines


def parser():
    p = argparse.ArgumentParser(description="Benchmark training throughput and inference latency, side by side.")
    p.add_argument("--model", nargs="+", help="models (default: gap10k with --quick, else all five)")
    p.add_argument("--device", nargs="+", help="cpu, cuda, mps (default: every one present; cpu with --quick)")
    p.add_argument("--quick", action="store_true", help="gap10k on CPU, a short list of variants, fewer calls "
                   "(make bench); without it: every model on every device (make bench FULL=1)")
    p.add_argument("--task", nargs="+", default=["train", "infer"], choices=["train", "infer"],
                   help="default: both")
    p.add_argument("--variant", nargs="+", choices=list(VARIANTS), metavar="VARIANT",
                   help=f"fast-pipeline training variants (default: all that apply, or --quick's list): "
                   f"{', '.join(VARIANTS)}")
    p.add_argument("--backend", nargs="+", choices=BACKENDS, default=BACKENDS,
                   help=f"inference backends (default: all of {', '.join(BACKENDS)})")
    p.add_argument("--steps", type=int, help="training steps per timed repeat "
                   "(default: 30 with --quick, 50 otherwise; a whole epoch on CUDA and MPS)")
    p.add_argument("--repeats", type=int, help="timed repeats, median reported (default 3)")
    p.add_argument("--calls", type=int, help="batch-1 calls for p50/p99 (default: 200 with --quick, else 500)")
    p.add_argument("--data-dir", help="MNIST folder (default: $MNIST_DIR, then ./data)")
    p.add_argument("--json", help="also write {environment, records} to this file (default: none)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the seed pipeline (default 2)")
    return p


def settings(args):
    """(models, devices, Settings) of the command line, every choice checked before anything runs."""
    names = args.model or (["gap10k"] if args.quick else list(models.RECIPES))
    for n in names:
        models.get_recipe(n)
    check_at_least(args, 1, "steps", "repeats", "calls")
    check_at_least(args, 0, "workers")
    if args.json:
        check_out_file(args.json, "--json")  # fail now, not after the run
    if args.device:
        devices = [get_device(d) for d in args.device]
    else:
        devices = [torch.device(d) for d in (["cpu"] if args.quick else devices_present())]
    opts = Settings(repeats=args.repeats or 3, calls=args.calls or (200 if args.quick else 500), steps=args.steps,
                    quick=args.quick, workers=args.workers,
                    variants=args.variant or (QUICK if args.quick else list(VARIANTS)), backends=args.backend,
                    progress=lambda what: print(f"  {what}", file=sys.stderr, flush=True))
    return names, devices, opts


def main(argv=None):
    args = parser().parse_args(argv)
    stopped = "interrupted: " + (f"{args.json} holds what was measured before" if args.json else "nothing written")
    with one_line_errors(stopped):
        names, devices, opts = settings(args)
        images, labels = data.load("train", args.data_dir)
        cores = os.cpu_count()
        threads_list = sorted({1, cores})
        env = environment(devices, threads_list)
        records, skipped = [], []

        def keep(records, skipped):  # after each task of each model, so a run stopped part-way keeps its figures
            if args.json:
                save_json(dict(environment=dict(env, partial=True, skipped=skipped), records=records), args.json)

        if "onnxruntime-int8" in opts.backends:
            opts.calibration = data.calibration_set(args.data_dir)
        for device in devices:
            if "amp" in " ".join(opts.variants) and device.type == "cuda":
                models.check_amp(device)
            for name in names:
                if "train" in args.task:
                    torch.set_num_threads(cores)
                    got, bad = bench_train(name, device, images, labels, opts)
                    records, skipped = records + got, skipped + bad
                    print(f"train {name} {device.type}: " + ", ".join(
                        f"{r['backend']}/{r['variant']} {r['value']:,.0f} img/s" for r in got), flush=True)
                    keep(records, skipped)
                if "infer" in args.task:
                    got, bad = bench_infer(name, device, threads_list if device.type == "cpu" else [None], opts)
                    records, skipped = records + got, skipped + bad
                    print(f"infer {name} {device.type}: done", flush=True)
                keep(records, skipped)
        torch.set_num_threads(cores)
        env.update(skipped=skipped, load_after=load_average())
        report(env, records, skipped, args.json)


def report(env, records, skipped, json_path):
    """The closing printout (machine, table, what was not measured, load warnings) and the --json file."""
    print()
    print(f"{env['cpu']} ({env['cores']} cores), {env['gpu'] or 'no GPU'}; torch {env['torch']}, "
          f"onnxruntime {env['onnxruntime']}; {env['date']}; commit {env['git_commit']}")
    print()
    print(markdown(records))
    if skipped:
        print("\nnot measured:\n" + "\n".join(f"- {s}" for s in skipped))
    for line in warnings_about_load(env, records):
        print(line)
    if json_path:
        save_json(dict(environment=env, records=records), json_path)
        print(f"\nwrote {json_path}")


if __name__ == "__main__":
    main()
