"""reproduce.py --executor local: sweeps as jobs of submitit's real LocalExecutor (no mock), each job a
fresh Python process that imports torch (seconds of CPU), so the tests start as few as they can: bn_fc
on 256 images, one torch thread per job. Option errors fork the `forked` server and start no job; the
sweeps fork a server of this module's own (`sweeps`)."""
import glob
import json
import os
import signal
import time

import pytest
from forked_cli import alive

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BASE = ["--models", "bn_fc", "--val", "0", "--device", "cpu", "--set", "subset=256"]
TINY = ["--executor", "local", *BASE]


@pytest.fixture(scope="module")
def sweeps(mnist_dir, tmp_path_factory):
    """reproduce.py's command lines forked from a server of this module's own (forked_cli.ForkServer,
    importing only what reproduce.py needs). The sweeps take the longest here, waiting on their jobs,
    and a module fixture keeps them in an xdist group of their own (conftest.py) instead of on the
    worker of the shared `forked` server, with most of the other command-line tests."""
    import forked_cli
    env = dict(os.environ, MNIST_DIR=mnist_dir, OMP_NUM_THREADS="1")
    shared = forked_cli.MODULES
    forked_cli.MODULES = ["torch", "torch._inductor.config", "numpy", "scipy.stats", "errors", "fileio", "machine", "runfiles", "stats", "data", "models", "loop",
                          "train", "sweep", "records", "figures", "report", "reproduce"]
    try:
        server = forked_cli.ForkServer(ROOT, env, tmp_path_factory.mktemp("sweep-io"))
    finally:
        forked_cli.MODULES = shared
    yield server
    server.close()


def lines(text):
    return [line for line in text.splitlines() if line.strip()]


def one_error(r):
    """The command's stderr ends in exactly one `error:` line and holds no traceback."""
    errors = [line for line in lines(r.stderr) if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    return errors[0]


def folder(tmp_path, name):
    return tmp_path / "results" / "reproduce" / name


def job_logs(tmp_path):
    return sorted(glob.glob(str(tmp_path / "results" / "reproduce" / "jobs" / "*_0_log.out")))


def wait_for(check, seconds=120, what="it"):
    end = time.time() + seconds
    while time.time() < end:
        found = check()
        if found:
            return found
        time.sleep(0.02)
    raise AssertionError(f"waited {seconds} s for {what}")


def no_tmp_files(tmp_path):
    assert not [p for p in (tmp_path / "results").rglob("*") if ".tmp" in p.name]


@pytest.mark.parametrize("args, says", [
    (["--executor", "slurm"], "needs Slurm's sbatch on PATH"),
    (["--executor", "slurm", "--slurm-time", "2h"], "--slurm-time must be in Slurm's time format"),
    (["--executor", "local", "--parallel", "0"], "--parallel must be at least 1, got 0"),
    (["--executor", "local", "--parallel", "-2"], "--parallel must be at least 1, got -2"),
    (["--executor", "slurm", "--slurm-gpus", "-1"], "--slurm-gpus must be at least 0, got -1"),
    (["--executor", "local", "--job-timeout", "0"], "--job-timeout must be longer than 0"),
    (["--parallel", "2"], "--parallel and --job-timeout are for --executor local or slurm"),
    (["--executor", "local", "--slurm-partition", "gpu"], "--slurm-partition is for --executor slurm"),
    (["--set", "seed=1,2"], "--set seed: not a train.py flag a sweep can vary"),
    (["--set", "batch-size=64,big"], "--set batch-size: 'big' is not an integer"),
    (["--lr", "0.1", "-1"], "--lr must be a positive number, got -1.0"),
    (["--set", "subset=64,064"], "--set subset: '064' and '64' are the same value (64), one run folder"),
    (["--lr", "0.1", "1e-1"], "--set lr: '1e-1' and '0.1' are the same value (0.1), one run folder"),
    (["--set", "amp=on,yes"], "--set amp: 'yes' and 'on' are the same value (on), one run folder"),
], ids=["slurm without sbatch", "bad slurm time", "parallel 0", "parallel negative", "slurm gpus negative", "timeout 0",
        "parallel inline", "slurm option for local", "reserved flag", "bad value", "bad lr", "one value twice",
        "one lr twice", "one switch twice"])
def test_sweep_options_refused_in_one_line_before_anything_starts(tmp_path, forked, args, says):
    (tmp_path / "bin").mkdir()  # a PATH without sbatch, on a machine with Slurm too
    r = forked.run("reproduce.py", "--models", "bn_fc", *args, cwd=tmp_path, env={"PATH": str(tmp_path / "bin")})
    assert r.returncode == 1 and says in one_error(r)
    assert os.listdir(tmp_path) == ["bin"]  # no runs/, no lock, no job


def test_slurm_time_formats_and_the_gpus_a_local_sweep_hands_out(monkeypatch):
    import torch

    import errors
    import sweep
    for text, seconds in (("5", 300), ("0:05", 5), ("1:30:00", 5400), ("2-0", 172800), ("1-2:03", 93780),
                          ("1-0:0:9", 86409)):
        assert sweep.parse_time(text, "--slurm-time") == seconds, text
    for bad in ("1h", "", "1:2:3:4", "-5", "0:00"):
        with pytest.raises(errors.UserError):
            sweep.parse_time(bad, "--slurm-time")
    assert sweep.local_gpus(torch.device("cpu")) == []
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 5")  # yours are the ones handed out, one per job
    assert sweep.local_gpus(torch.device("cuda")) == [2, 5]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-8f2c,GPU-11aa")
    with pytest.raises(errors.UserError, match="by its index"):
        sweep.local_gpus(torch.device("cuda"))


def test_two_jobs_in_parallel_one_fails_and_a_rerun_skips_the_finished(tmp_path, sweeps):
    """Two runs at once (--lr 0.1 and 1e30); the second diverges: it is reported in one line (recipe, seed,
    its own error line, its log) and the first still finishes. The same command again trains only
    the failed one."""
    cmd = [*TINY, "epochs=1", "--parallel", "2", "--lr", "0.1", "1e30"]
    r = sweeps.run("reproduce.py", *cmd, cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    assert one_error(r).startswith("error: 1 of 2 runs failed")
    failed = [line for line in lines(r.stderr) if line.startswith("failed:")]
    assert len(failed) == 1 and failed[0].startswith("failed: bn_fc seed 1 epochs=1 lr=1e+30 subset=256: error: loss "
                                                     "became nan at epoch 1")
    log = failed[0].split("(log: ")[1].rstrip(")")
    assert "error: loss became nan" in open(tmp_path / log).read()
    good = folder(tmp_path, "bn_fc-epochs1-lr0.1-subset256-seed1")
    summary = json.loads((good / "summary.json").read_text())
    assert summary["epochs_done"] == 1 and summary["subset"] == 256 and summary["lr"] == 0.1
    assert not folder(tmp_path, "bn_fc-epochs1-lr1e+30-subset256-seed1").exists()  # failed before its first epoch
    started, ended = [], []
    for path in job_logs(tmp_path):  # both ran at once: each started before either ended
        text = open(path).read().splitlines()
        started += [line.split(" - ")[0] for line in text if "Starting with" in line]
        ended += [line.split(" - ")[0] for line in text if "Job completed" in line]
    assert len(started) == 2 and max(started) < min(ended)
    assert "bn_fc seed 1 epochs=1 lr=0.1 subset=256: finished" in r.stdout
    before = (good / "summary.json").stat().st_mtime_ns
    again = sweeps.run("reproduce.py", *cmd, cwd=tmp_path)
    assert again.returncode == 1 and "2 runs: 1 finished already (skipped), 1 to train" in again.stdout
    assert len(job_logs(tmp_path)) == 3 and (good / "summary.json").stat().st_mtime_ns == before
    assert one_error(again).startswith("error: 1 of 1 runs failed")
    no_tmp_files(tmp_path)


def test_ctrl_c_cancels_the_job_a_second_sweep_is_refused_and_the_same_command_resumes(tmp_path, sweeps):
    """While a sweep runs, a second one on the same runs/reproduce/ is refused before it starts a job.
    Ctrl-C (SIGINT to reproduce.py alone: the job does not get the terminal's) cancels the job after
    its epoch 1. The job's folder is a plain train.py run folder: the same command, inline (no job:
    a fork of the server, which has torch imported), resumes it at epoch 2 and finishes."""
    cmd = [*TINY, "epochs=2", "--parallel", "1"]
    run = folder(tmp_path, "bn_fc-epochs2-subset256-seed1")
    sweep = sweeps.start("reproduce.py", *cmd, cwd=tmp_path)
    wait_for(lambda: job_logs(tmp_path), what="the job")
    second = sweeps.run("reproduce.py", *cmd, cwd=tmp_path)
    assert second.returncode == 1 and "is in use by another reproduce.py" in one_error(second)
    assert len(job_logs(tmp_path)) == 1  # the second started nothing
    wait_for(lambda: (run / "summary.json").exists(), what="epoch 1")
    job_pid = int((run / ".lock").read_text())  # train.py's lock holds its pid: the job's process
    sweep.send_signal(signal.SIGINT)
    r = sweep.wait()
    assert r.returncode == 130 and lines(r.stderr) == [
        "interrupted: finished runs are kept, running jobs cancelled; run the same command again to go on"]
    assert not alive(job_pid)
    assert json.loads((run / "summary.json").read_text())["epochs_done"] == 1
    no_tmp_files(tmp_path)
    again = sweeps.run("reproduce.py", *BASE, "epochs=2", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert f"resuming {run} at epoch 2/2 on cpu" in again.stdout
    assert json.loads((run / "summary.json").read_text())["epochs_done"] == 2
    assert again.stdout.splitlines()[-1].startswith("bn_fc seed 1 epochs=2 subset=256: best test accuracy ")


def test_a_hung_job_is_stopped_by_its_timeout_and_a_killed_one_is_reported(tmp_path, sweeps):
    """Two jobs: one hangs (SIGSTOP: a process that never returns), one is killed (SIGKILL, as the OOM
    killer does), both before they import torch. --job-timeout stops the hung one; each is reported in
    one line, the sweep exits 1 with one error line, and nothing is left running."""
    sweep = sweeps.start("reproduce.py", *TINY, "--seeds", "2", "--parallel", "2", "--job-timeout", "0:05",
                         cwd=tmp_path)
    tasks = []
    try:
        def both():  # each job: submitit's controller (its pid names the log) and the task it started
            found = []
            for log in job_logs(tmp_path):
                ctrl = os.path.basename(log).split("_")[0]
                try:
                    found += open(f"/proc/{ctrl}/task/{ctrl}/children").read().split()
                except FileNotFoundError:
                    pass
            return found if len(found) == 2 else None
        tasks = [int(p) for p in wait_for(both, what="two jobs")]
        os.kill(tasks[0], signal.SIGSTOP)
        os.kill(tasks[1], signal.SIGKILL)
        r = sweep.wait()
    finally:
        for pid in tasks:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert r.returncode == 1 and one_error(r).startswith("error: 2 of 2 runs failed")
    failed = sorted(line for line in lines(r.stderr) if line.startswith("failed: bn_fc seed "))
    assert len(failed) == 2
    assert sum("timed out after 5 s (--job-timeout) and was stopped" in line for line in failed) == 1
    assert sum("ended without a result: killed" in line for line in failed) == 1
    assert not any(alive(pid) for pid in tasks)
    no_tmp_files(tmp_path)
