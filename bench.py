"""Training throughput and inference latency, side by side in one run.

    python bench.py --quick                 # gap10k on CPU, under 5 minutes on 2 cores (make bench)
    python bench.py --full --json bench.json  # every model on every device found (make bench FULL=1)
    python bench.py --model bn_fc --device cpu

train  images/s at the recipe's batch size with its augmentation, for the seed-style pipeline
       (torchvision Dataset + PIL transforms + DataLoader, eager, NCHW) and this project's fast
       pipeline in each variant that applies (eager, channels_last, compile, amp on CUDA); the best
       variant is the fast-pipeline figure, the others are reported beside it.
infer  batch-1 p50/p99 latency and batch-1024 images/s for eager, TorchScript, ONNX Runtime and
       torch.compile, on CPU with 1 thread and with all cores; on CUDA timed with CUDA events.
Every figure is the median of several timed repeats after a warm-up.
"""
import argparse
import datetime
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

import data
import export
import models
import train

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


# ---------------------------------------------------------------------------- training

# fast-pipeline variants: the train.py flags each one turns on (plus torch.compile, bench-only)
VARIANTS = {
    "eager": set(),
    "channels_last": {"channels_last"},
    "amp": {"amp"},
    "channels_last+amp": {"channels_last", "amp"},
    "amp+fast_dropout": {"amp", "fast_dropout"},
    "channels_last+amp+fast_dropout": {"channels_last", "amp", "fast_dropout"},
    "compile": {"compile"},
}


def bench_train(name, device, images, labels, steps, repeats, variants, workers):
    """Records of training images/s for the seed pipeline and each fast-pipeline variant."""
    recipe = models.RECIPES[name]
    bs = recipe["batch_size"]
    timer = Timer(device)
    records = []

    def measure(backend, variant, make_loader):
        on = VARIANTS[variant]
        channels_last, amp = "channels_last" in on, "amp" in on
        model = recipe["model"]().to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        if "fast_dropout" in on:
            train.use_fast_dropout(model)
        opt = models.build_optimizer(recipe, model)
        sched, every = models.build_schedule(recipe, opt, 1000, steps)  # long schedule: no step limit
        if "compile" in on:
            torch._dynamo.reset()
        net = torch.compile(model) if "compile" in on else model
        rates = []
        # first pass: warm-up (compilation, worker start-up, allocator), then timed repeats
        for r in range(repeats + 1):
            loader = make_loader()
            seconds = timer(lambda: train.train_epoch(net, opt, sched, every, itertools.islice(loader, steps), steps,
                                                      progress=False, channels_last=channels_last, amp=amp))
            if r:
                rates.append(steps * bs / seconds)
        records.append(dict(task="train", model=name, device=device.type, backend=backend, variant=variant,
                            batch_size=bs, threads=torch.get_num_threads(), metric="images_per_s",
                            value=round(statistics.median(rates), 1), unit="images/s"))

    gen = torch.Generator(device=device).manual_seed(0)
    dev_x, dev_y = images.to(device), labels.to(device)
    seed_loader = data.seed_loader(images.cpu(), labels.cpu(), bs, recipe["augment"], workers=workers,
                                   pin_memory=device.type == "cuda")
    measure("seed-pipeline", "eager", lambda: iter(seed_loader))
    for v in variants:
        measure("fast-pipeline", v,
                lambda: data.batches(dev_x, dev_y, bs, recipe["augment"], gen=gen))
    fast = [r for r in records if r["backend"] == "fast-pipeline"]
    best = max(fast, key=lambda r: r["value"])
    for r in fast:
        r["best"] = r is best
    return records


# --------------------------------------------------------------------------- inference

def inference_backends(name, device, tmp):
    """name -> (function taking a float32 [N, 1, 28, 28] [0, 1] tensor on `device`), per backend."""
    model = models.build_model(name).eval()
    module = export.Exportable(model).eval().to(device)
    ckpt = dict(model_name=name, model=model.state_dict(), test_acc=0.0, epoch=0)
    out = {}

    def no_grad(fn):
        def run(x):
            with torch.inference_mode():
                return fn(x)
        return run

    out["eager"] = no_grad(module)
    out["torchscript"] = no_grad(torch.jit.freeze(torch.jit.script(module)))
    out["compile"] = no_grad(torch.compile(module))
    onnx_path = os.path.join(tmp, name + ".onnx")
    export.export_onnx(export.Exportable(model).eval(), onnx_path, export.metadata(ckpt), 18)
    import onnxruntime as ort
    providers = ["CUDAExecutionProvider"] if device.type == "cuda" else ["CPUExecutionProvider"]
    if providers[0] in ort.get_available_providers():
        out["onnxruntime"] = onnx_path  # a session per thread count, made in bench_infer
    return out, providers[0]


def bench_infer(name, device, threads_list, repeats, calls):
    torch._dynamo.reset()  # fresh compile caches: one model's recompiles must not exhaust the next one's limit
    records = []
    timer = Timer(device)
    x1 = torch.rand(1, 1, 28, 28, device=device)
    xb = torch.rand(BATCH_INFER, 1, 28, 28, device=device)
    with tempfile.TemporaryDirectory() as tmp:
        backends, provider = inference_backends(name, device, tmp)
        for threads in threads_list:
            if device.type == "cpu":
                torch.set_num_threads(threads)
            for backend, fn in backends.items():
                if backend == "onnxruntime":
                    import onnxruntime as ort
                    opts = ort.SessionOptions()
                    opts.intra_op_num_threads = threads if device.type == "cpu" else 0
                    sess = ort.InferenceSession(fn, opts, providers=[provider])
                    a1, ab = x1.cpu().numpy(), xb.cpu().numpy()
                    run1 = lambda: sess.run(None, {"image": a1})  # noqa: E731
                    runb = lambda: sess.run(None, {"image": ab})  # noqa: E731
                else:
                    run1, runb = (lambda f=fn: f(x1)), (lambda f=fn: f(xb))
                for _ in range(max(10, calls // 10)):   # warm-up (compile, allocator, caches)
                    run1()
                runb()
                lat = sorted(timer(run1) * 1000 for _ in range(calls))
                rate = statistics.median(BATCH_INFER / timer(runb) for _ in range(repeats))
                base = dict(task="infer", model=name, device=device.type, backend=backend,
                            threads=threads if device.type == "cpu" else None)
                records += [dict(base, batch_size=1, metric="p50_ms", value=round(lat[len(lat) // 2], 4), unit="ms"),
                            dict(base, batch_size=1, metric="p99_ms", value=round(lat[int(len(lat) * 0.99) - 1], 4),
                                 unit="ms"),
                            dict(base, batch_size=BATCH_INFER, metric="images_per_s", value=round(rate, 1),
                                 unit="images/s")]
    return records


# ------------------------------------------------------------------------------ report

def environment(devices, threads):
    import onnxruntime
    import torchvision
    env = dict(cpu=train.device_name(torch.device("cpu")), cores=os.cpu_count(), threads=threads,
               gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
               python=platform.python_version(), torch=torch.__version__, torchvision=torchvision.__version__,
               onnxruntime=onnxruntime.__version__, git_commit=train.git_commit(),
               date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
               devices=[d.type for d in devices], command=" ".join(["python"] + sys.argv))
    return env


def markdown(records):
    lines = ["### Training throughput (images/s, recipe batch size, with augmentation)", "",
             "| model | device | seed-pipeline | fast-pipeline (best variant) | speed-up | other fast variants |",
             "|---|---|---|---|---|---|"]
    train_r = [r for r in records if r["task"] == "train"]
    for (m, d) in dict.fromkeys((r["model"], r["device"]) for r in train_r):
        rs = [r for r in train_r if (r["model"], r["device"]) == (m, d)]
        seed = next(r for r in rs if r["backend"] == "seed-pipeline")
        best = next(r for r in rs if r.get("best"))
        others = ", ".join(f"{r['variant']} {r['value']:,.0f}" for r in rs if r["backend"] == "fast-pipeline"
                           and not r.get("best"))
        lines.append(f"| {m} | {d} | {seed['value']:,.0f} | {best['value']:,.0f} ({best['variant']}) | "
                     f"{best['value'] / seed['value']:.1f}x | {others} |")
    lines += ["", "### Inference (batch 1 latency in ms, batch 1024 throughput)", "",
              "| model | device | threads | backend | p50 ms | p99 ms | images/s @1024 | p50 vs eager |",
              "|---|---|---|---|---|---|---|---|"]
    inf = [r for r in records if r["task"] == "infer"]
    for key in dict.fromkeys((r["model"], r["device"], r["threads"], r["backend"]) for r in inf):
        get = {r["metric"]: r["value"] for r in inf if (r["model"], r["device"], r["threads"], r["backend"]) == key}
        eager = next(r["value"] for r in inf if (r["model"], r["device"], r["threads"]) == key[:3]
                     and r["backend"] == "eager" and r["metric"] == "p50_ms")
        lines.append(f"| {key[0]} | {key[1]} | {key[2] or '-'} | {key[3]} | {get['p50_ms']:.3f} | {get['p99_ms']:.3f} | "
                     f"{get['images_per_s']:,.0f} | {eager / get['p50_ms']:.1f}x |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description="Benchmark training throughput and inference latency.")
    p.add_argument("--model", nargs="+", help="models (default: gap10k with --quick, all otherwise)")
    p.add_argument("--device", nargs="+", help="cpu, cuda, mps (default: every one present; cpu with --quick)")
    p.add_argument("--quick", action="store_true", help="gap10k on CPU, fewer repeats (make bench)")
    p.add_argument("--full", action="store_true", help="every model on every device found")
    p.add_argument("--task", nargs="+", default=["train", "infer"], choices=["train", "infer"])
    p.add_argument("--data-dir", help="MNIST folder (default: $MNIST_DIR, then ./data)")
    p.add_argument("--json", help="write {environment, records} here")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the seed pipeline")
    args = p.parse_args(argv)
    with train.one_line_errors():
        names = args.model or (["gap10k"] if args.quick else list(models.RECIPES))
        for n in names:
            models.get_recipe(n)
        if args.device:
            devices = [train.get_device(d) for d in args.device]
        else:
            present = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) + \
                      (["mps"] if torch.backends.mps.is_available() else [])
            devices = [torch.device(d) for d in (["cpu"] if args.quick else present)]
        images, labels = data.load("train", args.data_dir)
    cores = os.cpu_count()
    steps, repeats, calls = (30, 3, 200) if args.quick else (50, 3, 500)
    threads_list = sorted({1, cores})
    env = environment(devices, threads_list)
    records = []
    for device in devices:
        for name in names:
            if "train" in args.task:
                torch.set_num_threads(cores)
                variants = [v for v in VARIANTS if not (args.quick and v == "compile")]
                records += bench_train(name, device, images, labels, steps, repeats, variants, args.workers)
                print(f"train {name} {device.type}: " + ", ".join(
                    f"{r['backend']}/{r['variant']} {r['value']:,.0f} img/s" for r in records if r["task"] == "train"
                    and r["model"] == name and r["device"] == device.type), flush=True)
            if "infer" in args.task:
                records += bench_infer(name, device, threads_list if device.type == "cpu" else [None], repeats, calls)
                print(f"infer {name} {device.type}: done", flush=True)
    torch.set_num_threads(cores)
    print()
    print(f"{env['cpu']} ({cores} cores), {env['gpu'] or 'no GPU'}; torch {env['torch']}, "
          f"onnxruntime {env['onnxruntime']}; {env['date']}; commit {env['git_commit']}")
    print()
    print(markdown(records))
    if args.json:
        train.save_text(json.dumps(dict(environment=env, records=records), indent=2) + "\n", args.json)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
