"""Training throughput and inference latency, side by side in one run.

    python bench.py --quick                 # gap10k on CPU, under 2 minutes on 2 cores (make bench)
    python bench.py --json bench.json       # every model on every device found (make bench FULL=1)
    python bench.py --model bn_fc --device cpu --task infer --backend eager onnxruntime

train  images/s at the recipe's batch size with its augmentation, for the sources' pipeline
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
import os
import sys

import torch

import data
import models
from errors import UserError, check_at_least, one_line_errors, printable
from fileio import check_out_file, save_json
from machine import device_name, devices_present, get_device, provenance
from timing import BACKENDS, QUICK, QUICK_BACKENDS, VARIANTS, Settings, bench_infer, bench_train, mark_best

NOISY = 0.2  # a figure whose timed repeats spread by more than this share of their median is flagged




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
             "| model | device | sources-pipeline | fast-pipeline (best variant) | speed-up | epoch of 60k, sources / fast |"
             " other fast variants |",
             "|---|---|---|---|---|---|---|"]
    train_r = [r for r in records if r["task"] == "train"]
    for (m, d) in dict.fromkeys((r["model"], r["device"]) for r in train_r):
        rs = [r for r in train_r if (r["model"], r["device"]) == (m, d)]
        seed = next((r for r in rs if r["backend"] == "sources-pipeline"), None)
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
    p.add_argument("--quick", action="store_true", help="the two headline ratios only: gap10k on the CPU, its "
                   "training in the sources' pipeline and the fast one (eager), batch-1 latency of eager PyTorch and "
                   "ONNX Runtime (make bench); without it: every model, variant and backend on every device "
                   "(make bench FULL=1)")
    p.add_argument("--task", nargs="+", default=["train", "infer"], choices=["train", "infer"],
                   help="default: both")
    p.add_argument("--variant", nargs="+", choices=list(VARIANTS), metavar="VARIANT",
                   help=f"fast-pipeline training variants (default: all that apply, or --quick's list): "
                   f"{', '.join(VARIANTS)}")
    p.add_argument("--backend", nargs="+", choices=BACKENDS,
                   help=f"inference backends (default: {', '.join(QUICK_BACKENDS)} with --quick, else all of "
                   f"{', '.join(BACKENDS)})")
    p.add_argument("--steps", type=int, help="training steps per timed repeat "
                   "(default: 30 with --quick, 50 otherwise; a whole epoch on CUDA and MPS)")
    p.add_argument("--repeats", type=int, help="timed repeats, median reported (default 3)")
    p.add_argument("--calls", type=int, help="batch-1 calls for p50/p99 (default: 200 with --quick, else 500)")
    p.add_argument("--data-dir", help="MNIST folder (default: $MNIST_DIR, then ./data)")
    p.add_argument("--json", help="also write {environment, records} to this file, rewritten as each figure is "
                   "measured (default: none)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the sources' pipeline (default 2)")
    return p


def settings(args):
    """(models, devices, Settings) of the command line, every choice checked before anything runs."""
    names = args.model or (["gap10k"] if args.quick else list(models.RECIPES))
    for n in names:
        models.get_recipe(n)
    for flag in ("model", "device", "task", "variant", "backend"):
        given = getattr(args, flag) or []
        twice = next((v for i, v in enumerate(given) if v in given[:i]), None)
        if twice is not None:
            raise UserError(f"--{flag} {twice} is given twice; each is measured once")
    check_at_least(args, 1, "steps", "repeats", "calls")
    check_at_least(args, 0, "workers")
    if args.json is not None:
        check_out_file(args.json, "--json")  # fail now, not after the run
    if args.device:
        devices = [get_device(d) for d in args.device]
    else:
        devices = [torch.device(d) for d in (["cpu"] if args.quick else devices_present())]
    opts = Settings(repeats=args.repeats or 3, calls=args.calls or (200 if args.quick else 500), steps=args.steps,
                    quick=args.quick, workers=args.workers,
                    variants=args.variant or (QUICK if args.quick else list(VARIANTS)),
                    backends=args.backend or (QUICK_BACKENDS if args.quick else BACKENDS),
                    progress=lambda what: print(f"  {what}", file=sys.stderr, flush=True))
    return names, devices, opts


def main(argv=None):
    args = parser().parse_args(argv)
    stopped = "interrupted: " + (f"{printable(args.json)} holds what was measured before" if args.json
                                 else "nothing written")
    with one_line_errors(stopped):
        names, devices, opts = settings(args)
        images, labels = data.load("train", args.data_dir)
        cores = os.cpu_count()
        threads_list = sorted({1, cores})
        env = environment(devices, threads_list)
        records, skipped = [], []

        def keep(kind, item):  # every figure is saved the moment it exists: a cut run keeps what it measured
            (records if kind == "record" else skipped).append(item)
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
                    first = len(records)
                    for kind, item in bench_train(name, device, images, labels, opts):
                        keep(kind, item)
                    mark_best(records[first:])
                    print(f"train {name} {device.type}: " + ", ".join(
                        f"{r['backend']}/{r['variant']} {r['value']:,.0f} img/s" for r in records[first:]), flush=True)
                if "infer" in args.task:
                    for kind, item in bench_infer(name, device, threads_list if device.type == "cpu" else [None], opts):
                        keep(kind, item)
                    print(f"infer {name} {device.type}: done", flush=True)
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
