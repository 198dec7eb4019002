"""reproduce.py's grids and runs as jobs. The grid: --lr and --set KEY=V1,V2 parsed into train.py
values and one folder tag per point (`parse_grid`, `tag`), and a grid's outcome table. The jobs: on
every GPU of one machine (submitit's local executor) or on a Slurm cluster (submitit's Slurm
executor). Each job is one run of train.py (`job`: train.run on the same arguments `python train.py`
takes) into its usual run folder, locked while written; the jobs' logs go to results/reproduce/jobs/.
Failed jobs are reported one line each at the end and do not stop the others; Ctrl-C cancels the jobs
this process started.
"""
import contextlib
import logging
import os
import re
import shutil
import sys
import time

from tqdm import tqdm

import records
from errors import UserError, error_line, first_line, printable
from fileio import stderr_into

ROOT = os.path.dirname(os.path.abspath(__file__))
NO_LIMIT_S = 365 * 24 * 3600  # submitit's local jobs always have a time limit: without --job-timeout, a year


# ---------------------------------------------------------------------------------- the job

def job(argv):
    """One run of train.py inside a job, as `python train.py ARGV` would run it. Returns ("done", None),
    ("error", its one `error:` line) or ("interrupted", ...) (Ctrl-C, a cancel, a local time limit);
    the line is also printed to the job's log. A bug keeps its traceback (submitit records it)."""
    import train
    sys.argv = ["train.py"] + list(argv)  # what summary.json records as the run's command
    try:
        train.run(train.parse_args(argv))
        return "done", None
    except (UserError, OSError) as e:
        line = error_line(e)
    except KeyboardInterrupt:
        line = "interrupted: last.pt holds the last finished epoch"
    print(line, file=sys.stderr, flush=True)
    return ("interrupted" if line.startswith("interrupted") else "error"), line


# ------------------------------------------------------------------------------- the grid

RESERVED = {"model", "seed", "device", "data_dir", "out", "resume", "no_progress"}  # reproduce.py sets these per run
SWITCH = {"on": True, "true": True, "yes": True, "1": True, "off": False, "false": False, "no": False, "0": False}


def grid_flags():
    """train.py's flags a grid may vary, {dest: its argparse action (option_strings, nargs, type,
    choices)} from train.parser().flags: every flag but those reproduce.py sets for each run itself."""
    import train
    return {dest: action for dest, action in train.parser().flags.items() if dest not in RESERVED}


def grid_value(flag, action, text):
    """One --set value as train.py's flag takes it: on/off for a switch, else its type and choices."""
    if action.nargs == 0:  # a switch such as --amp: on or off
        if text.lower() not in SWITCH:
            raise UserError(f"--set {flag}: '{printable(text)}' is not on or off")
        return SWITCH[text.lower()]
    try:
        value = (action.type or str)(text)
    except ValueError:
        raise UserError(f"--set {flag}: '{printable(text)}' is not "
                        f"{'an integer' if action.type is int else 'a number'}") from None
    if action.choices and value not in action.choices:
        raise UserError(f"--set {flag}: '{printable(text)}' is not one of {', '.join(action.choices)}")
    return value


def as_text(value):
    """A grid value as a folder tag and a label show it: on/off for a switch, else str()."""
    return ("on" if value else "off") if isinstance(value, bool) else str(value)


def parse_grid(lrs, sets):
    """{dest: [values]} (sorted by flag) from --lr V ... and --set KEY=V1,V2 (KEY: a train.py flag). Two
    texts of one value (64 and 064, 0.1 and 1e-1) would be one run folder: refused."""
    flags, grid = grid_flags(), {}
    for item in ([f"lr={','.join(lrs)}"] if lrs else []) + (sets or []):
        key, eq, values = item.partition("=")
        dest = key.strip().lstrip("-").replace("-", "_")
        if not eq or not values.strip(","):
            raise UserError(f"--set takes KEY=V1,V2,... (a train.py flag and its values), got '{printable(item)}'")
        if dest not in flags:
            raise UserError(f"--set {printable(key)}: not a train.py flag a sweep can vary; choose from "
                            f"{', '.join(sorted(d.replace('_', '-') for d in flags))}")
        if dest in grid:
            raise UserError(f"--set {printable(key)} is given twice (--lr is --set lr=...)")
        texts = [v.strip() for v in values.split(",") if v.strip()]
        grid[dest] = [grid_value(key, flags[dest], v) for v in texts]
        for i, v in enumerate(grid[dest]):
            if v in grid[dest][:i]:
                first = texts[grid[dest].index(v)]
                raise UserError(f"--set {printable(key)}: '{printable(texts[i])}' and '{printable(first)}' are the "
                                f"same value ({as_text(v)}), one run folder; give each value once")
    return dict(sorted(grid.items()))


def tag(setting):
    """A grid point's part of its folder name, e.g. '-batch-size64-lr0.1' ('' outside a grid)."""
    return "".join(f"-{d.replace('_', '-')}{as_text(v)}" for d, v in setting.items())


def argv_of(setting):
    """A grid point as train.py arguments, e.g. ['--batch-size', '64', '--amp']."""
    flags, argv = grid_flags(), []
    for d, v in setting.items():
        opt = flags[d].option_strings[0]
        argv += ([opt] if v else []) if flags[d].nargs == 0 else [opt, str(v)]
    return argv


def grid_table(tasks):
    """A grid's outcome, one line per run: its best test accuracy (and the one chosen on validation)."""
    for t in tasks:
        try:
            s = records.read_summary(t.out)
        except records.BadRecord as e:
            print(f"{t.label}: left out: {e}")
            continue
        chosen = (f", chosen on validation {s['val_chosen_test_acc']:.2f}% (epoch {s['val_chosen_epoch']})"
                  if s["val_chosen_test_acc"] is not None else "")
        print(f"{t.label}: best test accuracy {s['best_test_acc']:.2f}% (epoch {s['best_epoch']}){chosen}; "
              f"{printable(t.out)}")


# ------------------------------------------------------------------------------- checking

TIME = re.compile(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?")


def parse_time(text, flag):
    """Seconds in one of Slurm's time formats: MINUTES, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS."""
    m = TIME.fullmatch(text or "")
    if not m:
        raise UserError(f"{flag} must be in Slurm's time format (MINUTES, MM:SS, HH:MM:SS, D-HH, D-HH:MM or "
                        f"D-HH:MM:SS), got '{text}'")
    days, parts = int(m.group(1) or 0), [int(p) for p in m.groups()[1:] if p is not None]
    if m.group(1) is not None:  # D-HH[:MM[:SS]]
        h, mi, s = (parts + [0, 0])[:3]
    else:  # MINUTES, MM:SS or HH:MM:SS
        h, mi, s = [(0, parts[0], 0), (0, *parts), tuple(parts)][len(parts) - 1]
    seconds = ((days * 24 + h) * 60 + mi) * 60 + s
    if seconds <= 0:
        raise UserError(f"{flag} must be longer than 0, got '{text}'")
    return seconds


def local_gpus(device):
    """The GPU indices a local job may be given (one each), [] where jobs train on the CPU. The
    user's CUDA_VISIBLE_DEVICES is honoured: its indices are the ones handed out."""
    import torch
    if device.type != "cuda":
        return []
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    if given is None:
        return list(range(torch.cuda.device_count()))
    ids = [g.strip() for g in given.split(",") if g.strip()]
    if not all(g.isdigit() for g in ids):
        raise UserError(f"--executor local gives each job one GPU by its index; CUDA_VISIBLE_DEVICES={given} "
                        "names GPUs another way (UUIDs, MIG): set it to indices, or unset it")
    return [int(g) for g in ids]


def check_slurm():
    if shutil.which("sbatch") is None:
        raise UserError("--executor slurm needs Slurm's sbatch on PATH, and there is none here; run on a "
                        "cluster's login node, or use --executor local")


# --------------------------------------------------------------------------------- running

class Task:
    """One run to train: its label for people ('bn_fc seed 2 lr=0.01'), its folder, train.py's argv."""

    def __init__(self, label, out, argv):
        self.label, self.out, self.argv = label, out, argv
        self.job = self.started = self.slot = None
        self.failure = None  # the one line saying why, once it failed
        self.ended = False


def prepare(log_dir):
    """PYTHONPATH for the jobs (they unpickle sweep.job, which needs this folder importable), and
    submitit's own messages in this process (sacct retries, say) into log_dir/submitit.log instead of
    between the progress bar and the report."""
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = ROOT + (os.pathsep + old if old else "")
    handler = logging.FileHandler(os.path.join(log_dir, "submitit.log"))
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s (%(asctime)s) - %(message)s"))
    logging.getLogger("submitit").handlers = [handler]


def failure(task, timeout_s):
    """Why a finished job did not train its run, in one line; None if it did."""
    import submitit
    from submitit.core.utils import FailedJobError, UncompletedJobError
    j = task.job
    log = os.path.relpath(j.paths.stdout)
    timed_out = timeout_s and time.time() - task.started >= timeout_s - 1
    if isinstance(j, submitit.LocalJob) and not j.paths.result_pickle.exists():
        why = (f"timed out after {timeout_s:g} s (--job-timeout) and was stopped" if timed_out else
               "ended without a result: killed (kill -9, out of memory?) or crashed outside Python")
    else:
        try:
            kind, line = j.result()
            why = None if kind == "done" else (f"timed out after {timeout_s:g} s (--job-timeout): {line}"
                                              if timed_out else line)
        except FailedJobError as e:  # a bug (the trace's last line), or Slurm's time limit reached
            trace = str(e).split("-" * 22)
            last = trace[1].strip().splitlines()[-1] if len(trace) > 2 else first_line(e)
            why = ("ran out of its --slurm-time and was stopped" if "timed-out and not checkpointable" in last
                   else "crashed: " + last)
        except UncompletedJobError:  # (FailedJobError is one too)
            why = "ended without a result (cancelled, killed, out of memory or out of time?)"
    return None if why is None else f"{task.label}: {why} (log: {log})"


def bar(total, out=None):
    """One progress bar over the jobs on a terminal; elsewhere (CI, logs) one line per finished job."""
    out = out or sys.stderr
    return tqdm(total=total, unit="run", desc="runs", file=out, disable=not out.isatty(), dynamic_ncols=True)


def progress(b, tasks, task, running, state="running"):
    ended = [t for t in tasks if t.job is not None and (t.failure is not None or t is task or t.ended)]
    task.ended = True
    failed = sum(t.failure is not None for t in tasks)
    b.update(1)
    b.set_postfix_str(f"{state} {running}, failed {failed}")
    if b.disable:
        said = task.failure[len(task.label) + 2:].split(" (log: ")[0] if task.failure else "finished"
        print(f"[{len(ended)}/{len(tasks)}] {task.label}: {said}", flush=True)


def wait_cancelled(tasks, seconds=15):
    """Cancel the jobs still running and wait (a little) until they are gone."""
    live = [t for t in tasks if t.job is not None and not t.job.done()]
    for t in live:
        with contextlib.suppress(Exception):
            t.job.cancel(check=False)
    end = time.time() + seconds
    while time.time() < end and any(not t.job.done() for t in live):
        time.sleep(0.1)


def run_local(tasks, log_dir, parallel, gpus, threads, timeout_s):
    """Every task as a job of submitit's LocalExecutor, at most `parallel` at once; each gets a GPU of
    its own from `gpus` (CUDA_VISIBLE_DEVICES), or `threads` CPU threads where there are none."""
    import submitit  # only sweeps need it (the GPU image has none)
    prepare(log_dir)
    ex = submitit.LocalExecutor(folder=log_dir)
    ex.update_parameters(timeout_min=(timeout_s or NO_LIMIT_S) / 60, signal_delay_s=0, stderr_to_stdout=True)
    slots = list(gpus[:parallel]) if gpus else [None] * parallel
    pending, running = list(tasks), []
    with bar(len(tasks)) as b:
        try:
            while pending or running:
                while pending and slots:
                    t = pending.pop(0)
                    t.slot = slots.pop(0)
                    ex.update_parameters(gpus_per_node=0 if t.slot is None else 1,
                                         visible_gpus=() if t.slot is None else (t.slot,))
                    with stderr_into(os.path.join(log_dir, "controllers.log")):
                        t.job = ex.submit(job, t.argv)
                    t.started = time.time()
                    running.append(t)
                for t in [t for t in running if t.job.done()]:
                    running.remove(t)
                    slots.append(t.slot)
                    t.failure = failure(t, timeout_s)
                    progress(b, tasks, t, len(running))
                time.sleep(0.1)
        except KeyboardInterrupt:
            b.close()
            wait_cancelled(running)
            raise


def run_slurm(tasks, log_dir, parallel, partition, time_s, gpus, cpus):
    """Every task as one task of a Slurm job array (sbatch), at most `parallel` running at once."""
    import submitit
    prepare(log_dir)
    ex = submitit.SlurmExecutor(folder=log_dir)
    ex.update_parameters(time=max(1, -(-time_s // 60)), gpus_per_node=gpus, cpus_per_task=cpus, ntasks_per_node=1,
                         stderr_to_stdout=True, job_name="reproduce", array_parallelism=parallel or 256,
                         **({"partition": partition} if partition else {}))
    log = os.path.join(log_dir, "slurm.log")  # what sbatch, sacct and scancel print
    try:
        with stderr_into(log), ex.batch():  # a refusal's own words are in the error
            for t in tasks:
                t.job = ex.submit(job, t.argv)
    except Exception as e:  # sbatch refused (partition, account, limits): nothing was submitted
        raise UserError(f"sbatch refused the jobs: {first_line(e)}") from None
    for t in tasks:
        t.started = time.time()
    waiting = list(tasks)
    with open(os.dup(2), "w") as terminal, bar(len(tasks), terminal) as b:
        try:
            with stderr_into(log):
                while waiting:
                    for t in [t for t in waiting if t.job.done()]:
                        waiting.remove(t)
                        t.failure = failure(t, None)
                        progress(b, tasks, t, len(waiting), "queued or running")
                    time.sleep(2)
        except KeyboardInterrupt:
            b.close()
            with stderr_into(log):
                wait_cancelled(waiting, seconds=0)  # scancel; Slurm ends them
            raise
