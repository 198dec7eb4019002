"""Train every recipe for its documented epochs over several seeds; write REPRODUCTION.md, figures/ and
the README's results table from the run records.

    python reproduce.py                 # all five, 3 seeds on a GPU, 1 on CPU (make reproduce)
    python reproduce.py --seeds 5 --models gap10k bn_fc
    python reproduce.py --no-train      # the documents from results/ alone (make figures)
    python reproduce.py --publish-pretrained   # pretrained/ from each recipe's seed 1 (make pretrained)

Runs go to results/reproduce/<model>-seed<k>/; a finished run is not trained again, so the command can
be stopped and restarted, and every finished seed there counts in the report. What the documents say
is computed by report.py from those records (figures by figures.py); pretrained/ changes only with
--publish-pretrained, which first checks that each seed-1 run is a full recipe run.

Sweeps: --executor local runs the runs as jobs at once on one machine (--parallel N, each job on a GPU of
its own), --executor slurm as a Slurm job array; --lr V1 V2 and --set KEY=V1,V2 (any train.py flag) add a
grid, whose runs go to results/reproduce/<model>-<key><value>...-seed<k>/ (sweep.py parses the grid and
runs the jobs).
"""
import argparse
import itertools
import os
import sys
import time

import torch

import errors
import fileio
import machine
import models
import records
import report
import runfiles
import scoring
import sweep
import train

RUNS = report.RUNS  # the committed run records (checkpoints but seed 1's best.pt git-ignored)
SANE_GAP = 2.0  # a published checkpoint is at most this many points below its recipe's documented figure


def run_dir(name, seed):
    return os.path.join(RUNS, f"{name}-seed{seed}")


def finished(folder, epochs):
    """A run folder's checked summary.json if its run finished all `epochs`, else None (none yet, or
    a record records.py refuses: then the run is trained, or resumed from its last.pt, again)."""
    try:
        s = records.read_summary(folder)
    except records.BadRecord:
        return None
    return s if s["epochs_done"] == epochs else None


# ---------------------------------------------------------------------------- the plan

def plan(args, seeds, grid, threads, absolute=False):
    """Every run the command asks for, in order, as sweep.Task (label, folder, train.py's argv) with
    `summary` set where it already finished. A run stopped part-way is resumed (--resume); each new
    run's argv is checked by train.py's own rules before anything starts."""
    tasks = []
    where = os.path.abspath if absolute else (lambda p: p)  # jobs get whole paths
    common_argv = ["--device", args.device, "--no-progress"] + (["--data-dir", where(args.data_dir)]
                                                                 if args.data_dir else [])
    new_argv = ["--threads", str(threads)]  # part of a CPU run's numbers: every new run records it
    for name in args.models:
        for point in itertools.product(*grid.values()):
            setting = dict(zip(grid, point))
            for seed in range(1, seeds + 1):
                out = run_dir(name + sweep.tag(setting), seed)
                label = " ".join([f"{name} seed {seed}"] + [f"{d.replace('_', '-')}={sweep.as_text(v)}"
                                                            for d, v in setting.items()])
                if os.path.isfile(os.path.join(out, "last.pt")):  # a run stopped part-way goes on
                    argv = ["--resume", where(out)] + common_argv
                else:
                    argv = ["--model", name, "--seed", str(seed), "--out", where(out)] + common_argv
                    argv += [] if "val" in setting else ["--val", str(args.val)]
                    argv += [] if "threads" in setting else new_argv
                    argv += sweep.argv_of(setting)
                    train.check_args(train.parse_args(argv))
                task = sweep.Task(label, out, argv)
                task.summary = finished(out, setting.get("epochs") or models.RECIPES[name]["epochs"])
                tasks.append(task)
    return tasks


def executor_options(args, device):
    """The executor's settings, each checked before anything starts: {parallel, gpus, threads, timeout_s}
    for local, {parallel, partition, time_s, gpus, cpus} for slurm, {} inline."""
    slurm = [f for f in ("slurm_partition", "slurm_time", "slurm_gpus", "slurm_cpus") if getattr(args, f) is not None]
    if args.executor != "slurm" and slurm:
        raise errors.UserError(f"--{slurm[0].replace('_', '-')} is for --executor slurm")
    if args.executor == "inline":
        if args.parallel is not None or args.job_timeout is not None:
            raise errors.UserError("--parallel and --job-timeout are for --executor local or slurm; inline trains "
                                   "one run after another in this process")
        return {}
    errors.check_at_least(args, 1, "parallel", "slurm_cpus")
    errors.check_at_least(args, 0, "slurm_gpus")
    if args.executor == "slurm":
        if args.job_timeout is not None:
            raise errors.UserError("--job-timeout is for --executor local; a Slurm job's limit is --slurm-time")
        time_s = sweep.parse_time(args.slurm_time or "1:00:00", "--slurm-time")
        sweep.check_slurm()
        return dict(parallel=args.parallel, partition=args.slurm_partition, time_s=time_s,
                    gpus=1 if args.slurm_gpus is None else args.slurm_gpus, cpus=args.slurm_cpus or 4)
    timeout_s = args.job_timeout and sweep.parse_time(args.job_timeout, "--job-timeout")
    gpus = sweep.local_gpus(device)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    parallel = args.parallel or len(gpus) or 1
    if gpus and parallel > len(gpus):
        raise errors.UserError(f"--parallel {parallel}: each job gets a GPU of its own and this machine shows "
                               f"{len(gpus)}; use --parallel {len(gpus)} at most, or --device cpu")
    return dict(parallel=parallel, gpus=gpus, threads=max(1, cpus // parallel), timeout_s=timeout_s)


def train_all(args, seeds, grid, options):
    """Plan the runs (every run's arguments checked before results/ is touched), lock the run folder
    and train the unfinished ones, inline one after another or as jobs; a job that fails is listed at
    the end, one line each, after the others have run. Returns every planned task."""
    threads = options.get("threads") or options.get("cpus") or torch.get_num_threads()
    plan(args, seeds, grid, threads)
    fileio.lock(RUNS, ".sweep.lock", "another reproduce.py that trains into it; wait for it to end or stop it "
                "(Ctrl-C) first")  # held to the end
    tasks = plan(args, seeds, grid, threads, absolute=args.executor != "inline")  # on disk, now locked
    todo = [t for t in tasks if t.summary is None]
    if args.executor == "inline":
        for t in todo:
            train.run(train.parse_args(t.argv))
        return tasks
    log_dir = os.path.join(RUNS, "jobs")
    os.makedirs(log_dir, exist_ok=True)
    print(f"{len(tasks)} runs: {len(tasks) - len(todo)} finished already (skipped), {len(todo)} to train "
          f"with --executor {args.executor}; job logs in {log_dir}/", flush=True)
    run = sweep.run_local if args.executor == "local" else sweep.run_slurm
    run(todo, log_dir, **options)
    failed = [t for t in todo if t.failure]
    for t in failed:
        print("failed: " + t.failure, file=sys.stderr)
    if failed:
        raise errors.UserError(f"{len(failed)} of {len(todo)} runs failed (listed above); the others are kept: run "
                               "the same command again to retry the failed runs and resume the unfinished ones")
    return tasks


# ---------------------------------------------------------------------------- pretrained/

def publishable(name):
    """Seed 1's best.pt of `name` as the checkpoint pretrained/ gets, once its run is shown to be a full
    recipe run: checked records, every recipe epoch, no --subset, the canonical --val, an accuracy at
    most SANE_GAP points below the documented figure, and a best.pt that is the epoch chosen on
    validation. UserError otherwise."""
    folder = run_dir(name, 1)
    run = records.read_run(folder)
    why = records.not_canonical(run, name, 1, report.VAL, "cpu")
    floor = models.RECIPES[name]["documented"]["best_test_acc"] - SANE_GAP
    if why is None and run["val_chosen_test_acc"] < floor:
        why = f"its {run['val_chosen_test_acc']:.2f}% is more than {SANE_GAP:g} points below the documented figure"
    if why:
        raise errors.UserError(f"not publishing pretrained/{name}.pt: {errors.printable(folder)}: {why}")
    ckpt = scoring.checkpoint_of(run)
    return runfiles.make_checkpoint(ckpt["model_name"], ckpt["model"], ckpt["epoch"], ckpt["test_acc"],
                                    ckpt["params"])


def publish_pretrained(names):
    """pretrained/<name>.pt for every name; all are checked before any is written."""
    keep = {name: publishable(name) for name in names}
    os.makedirs("pretrained", exist_ok=True)
    for name, ckpt in keep.items():
        path = os.path.join("pretrained", f"{name}.pt")
        runfiles.save_checkpoint(ckpt, path)
        print(f"wrote {path}: seed 1's best.pt, epoch {ckpt['epoch']}, test accuracy {ckpt['test_acc']:.2f}%")


# ---------------------------------------------------------------------------- the command line

def parser():
    p = argparse.ArgumentParser(
        description="Reproduce the recipes: train every seed not yet finished in results/reproduce/, then write "
                    "REPRODUCTION.md, figures/ and the README's results table from the finished runs.")
    p.add_argument("--models", nargs="+", default=list(models.RECIPES), metavar="NAME",
                   help=f"recipes to run and report (default: all five: {' '.join(models.RECIPES)})")
    p.add_argument("--seeds", type=int, metavar="N",
                   help="train seeds 1..N of each recipe (default: 3 on a CUDA GPU, else 1); further seeds "
                        "already finished on disk count in the report as well")
    p.add_argument("--device", default="auto",
                   help="auto, cpu, cuda or mps: where to train (default: auto = CUDA, then MPS, then CPU); the "
                        "report's own scoring runs on the CPU")
    p.add_argument("--data-dir", metavar="DIR",
                   help="MNIST folder (default: $MNIST_DIR, else ./data); the report needs it for conv4_fc's "
                        "training-set score and the McNemar test between the two best recipes' seed-1 checkpoints")
    p.add_argument("--val", type=int, default=report.VAL, metavar="N",
                   help=f"training images each new run holds out to choose its best.pt on (train.py --val; default "
                        f"{report.VAL}, the only value the report counts; 0 trains on all 60,000 and chooses by test "
                        "accuracy, as the sources did)")
    p.add_argument("--no-train", action="store_true",
                   help="train nothing: rebuild REPRODUCTION.md, figures/ and the README's results table from the "
                        "run records in results/ alone (default: off)")
    p.add_argument("--publish-pretrained", action="store_true",
                   help="train nothing and write only pretrained/<model>.pt, from each recipe's seed-1 best.pt, after "
                        "checking that every one is a full recipe run (default: off)")
    g = p.add_argument_group("sweeps", "the runs as jobs at once, and grids beyond seeds (README, 'Sweeps')")
    g.add_argument("--executor", choices=["inline", "local", "slurm"], default="inline",
                   help="inline (default): one run after another in this process; local: submitit jobs on this "
                        "machine, several at once, each on a GPU of its own; slurm: a Slurm job array")
    g.add_argument("--parallel", type=int, metavar="N",
                   help="jobs at once (default: local, one per GPU, else 1; slurm: no limit of ours); without GPUs "
                        "each local job gets its share of the CPU threads")
    g.add_argument("--job-timeout", metavar="TIME",
                   help="local: stop a job still running after TIME (Slurm's format: MINUTES, MM:SS, HH:MM:SS, "
                        "D-HH:MM) and report it; its last finished epoch is kept (default: no limit)")
    g.add_argument("--lr", nargs="+", metavar="LR",
                   help="a grid over learning rates (default: the recipe's, as in train.py): each value is its own "
                        "run folder, <model>-lr<LR>-seed<k>")
    g.add_argument("--set", action="extend", nargs="+", metavar="KEY=V1,V2",
                   help="a grid over any train.py flag (e.g. batch-size=64,128, amp=on,off), repeatable; the runs "
                        "of a grid get their own folders and a table, not REPRODUCTION.md (default: none)")
    g.add_argument("--slurm-partition", metavar="NAME", help="slurm: the partition (default: the cluster's)")
    g.add_argument("--slurm-time", metavar="TIME",
                   help="slurm: time limit per job, Slurm's format (default 1:00:00); one that runs out is "
                        "reported, and the same command resumes it from its last epoch")
    g.add_argument("--slurm-gpus", type=int, metavar="N", help="slurm: GPUs per job (default 1; 0 for CPU jobs)")
    g.add_argument("--slurm-cpus", type=int, metavar="N",
                   help="slurm: CPUs per job, also its torch threads (default 4)")
    return p


def check_modes(args):
    for name in args.models:
        models.get_recipe(name)
    training = [f for f, on in (("--seeds", args.seeds), ("--lr", args.lr), ("--set", args.set),
                                ("--executor", args.executor != "inline")) if on]
    for mode in ("no_train", "publish_pretrained"):
        if getattr(args, mode) and training:
            raise errors.UserError(f"{', '.join(training)} say what to train; with --{mode.replace('_', '-')} "
                                   "nothing is trained")
    if args.no_train and args.publish_pretrained:
        raise errors.UserError("--no-train writes the documents and --publish-pretrained writes pretrained/: "
                               "one at a time")
    errors.check_at_least(args, 1, "seeds")


def main(argv=None):
    args = parser().parse_args(argv)
    with errors.one_line_errors("interrupted: finished runs are kept, running jobs cancelled; run the same command "
                                "again to go on"):
        check_modes(args)
        if args.publish_pretrained:
            publish_pretrained(args.models)
            return
        grid = sweep.parse_grid(args.lr, args.set)
        if args.executor == "slurm" and args.device not in ("auto", "cpu", "cuda"):
            raise errors.UserError(f"--executor slurm trains on auto, cpu or cuda, not '{args.device}'")
        # with Slurm the jobs find their own device; this process only writes the report, on the CPU
        device = machine.get_device("cpu" if args.executor == "slurm" else args.device)
        options = executor_options(args, device)
        gpu_jobs = device.type == "cuda" or (args.executor == "slurm" and args.slurm_gpus != 0)
        if not args.no_train:
            tasks = train_all(args, args.seeds or (3 if gpu_jobs else 1), grid, options)
            if grid:
                sweep.grid_table(tasks)
                return
        t0 = time.time()
        files = report.build(args.models, args.data_dir)
        report.write(files)
    print(f"wrote {', '.join(sorted(files))} in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
