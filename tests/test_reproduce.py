"""reproduce.py without training: finished runs on disk -> REPRODUCTION.md, figures/ and pretrained/.
Synthetic run folders stand in for real runs, so this takes seconds."""
import json
import os

import pytest
import torch
from test_pretrained import recorded

import models
import reproduce

FIELDS = "epoch,train_loss,train_acc,test_loss,test_acc,lr,seconds,images_per_s"


def fake_run(name, seed, accs, seconds=None, epochs_done=None, checkpoint=False):
    """A run folder as train.py leaves it (metrics.csv, summary.json, best.pt), with made-up figures."""
    out = reproduce.run_dir(name, seed)
    os.makedirs(out, exist_ok=True)
    seconds = seconds or [10.0 + e for e in range(len(accs))]
    done = len(accs) if epochs_done is None else epochs_done
    rows = [f"{e},0.1,97.0,0.05,{a:.2f},0.01,{s:.3f},5000.0" for e, (a, s) in enumerate(zip(accs, seconds), 1)]
    with open(os.path.join(out, "metrics.csv"), "w") as f:
        f.write("\n".join([FIELDS] + rows[:done]) + "\n")
    best = max(accs[:done])
    params = models.n_params(models.build_model(name))
    summary = dict(model=name, params=params, device="cpu", device_name="Test CPU", seed=seed, pipeline="fast",
                   amp=False, compile=False, channels_last=False, fast_dropout=False, torch="2.14.1",
                   git_commit="abc1234", best_test_acc=best, best_epoch=accs.index(best) + 1,
                   final_test_acc=accs[done - 1], epochs_done=done, wall_seconds=sum(seconds[:done]) + done)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f)
    if checkpoint:
        torch.manual_seed(seed)
        state = models.build_model(name).state_dict()
        torch.save(dict(model_name=name, model=state, epoch=summary["best_epoch"], test_acc=best, params=params),
                   os.path.join(out, "best.pt"))
    return out


def curve(name, shift=0.0):
    """The seed's own curve moved by `shift`, its unlogged epochs filled in: a plausible run."""
    acc, out = 90.0, []
    for a in models.RECIPES[name]["documented"]["test_acc_by_epoch"]:
        acc = a if a is not None else acc + 0.01
        out.append(round(min(acc + shift, 99.99), 2))
    return out


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_collect_counts_every_finished_seed_and_skips_the_rest(workdir):
    fake_run("bn_fc", 1, curve("bn_fc"))
    fake_run("bn_fc", 2, curve("bn_fc", 0.05))
    fake_run("bn_fc", 3, curve("bn_fc"), epochs_done=4)   # still training
    fake_run("bn_fc", 5, curve("bn_fc", -0.05))           # seed 4 never started
    runs = reproduce.collect("bn_fc")
    assert [r["seed"] for r in runs] == [1, 2, 5]
    assert runs[1]["curve"][0] == (1, 95.15, 10.0)
    assert reproduce.collect("gap10k") == []


def test_time_to_accuracy(workdir):
    fake_run("bn_fc", 1, [95.0, 98.99, 99.0, 99.5] + [99.5] * 6, seconds=[10.0] * 10)
    fake_run("bn_fc", 2, [95.0] * 10, seconds=[10.0] * 10)
    one, never = reproduce.collect("bn_fc")
    assert reproduce.time_to(one) == (3, 30.0)     # the epoch that reaches it counts; later ones do not
    assert reproduce.time_to(never) is None
    row = reproduce.time_table({"bn_fc": [one, never]})[2]
    assert row == "| bn_fc | 3, never | 30.0; 1 of 2 seeds never | 4; about 344 s at the seed's stated 86 s/epoch |"
    assert reproduce.time_table({"bn_fc": [never]})[2].startswith("| bn_fc | never | never |")


def test_documented_epoch_to_target():
    doc = {n: r["documented"]["test_acc_by_epoch"] for n, r in models.RECIPES.items()}
    assert reproduce.documented_epoch_to(doc["gap10k"]) == (10, [8, 9])   # 98.98% at 7, then unlogged
    assert reproduce.documented_epoch_to(doc["bn_gap"]) == (2, [])
    assert reproduce.documented_epoch_to(doc["bn_fc"]) == (4, [])
    assert reproduce.documented_epoch_to(None) == (None, [])


def test_benchmark_latency_from_bench_json():
    latency, source = reproduce.bench_latency(os.path.join(os.path.dirname(reproduce.__file__), "bench-cpu.json"))
    assert sorted(latency) == sorted(models.RECIPES)
    assert all(0 < ms < 10 for ms in latency.values())
    assert source.startswith("bench-cpu.json") and "commit" in source
    assert reproduce.bench_latency("no-such-file.json") == ({}, None)


def plot_all(tag):
    runs = {n: reproduce.collect(n) for n in ("gap10k", "conv4_fc", "bn_fc")}
    reproduce.plot_curves("gap10k", runs["gap10k"], f"{tag}/curves-gap10k.png")
    reproduce.plot_one_epoch("conv4_fc", runs["conv4_fc"], 96.94, f"{tag}/curves-conv4_fc.png")
    rows = [dict(name=n, params=r[0]["params"], bests=[x["best_test_acc"] for x in r], latency_ms=0.05,
                 s_epoch=[reproduce.seconds_per_epoch(x) for x in r]) for n, r in runs.items()]
    reproduce.plot_tradeoff(rows, "a test", "a test", f"{tag}/tradeoff.png")
    return {f: open(os.path.join(tag, f), "rb").read() for f in sorted(os.listdir(tag))}


def test_figures_are_the_same_bytes_every_time(workdir):
    for seed, shift in ((1, 0.0), (2, 0.08)):
        fake_run("gap10k", seed, curve("gap10k", shift))
        fake_run("bn_fc", seed, curve("bn_fc", shift))
        fake_run("conv4_fc", seed, [96.9 + shift])   # far below the rest: the trade-off axis breaks
    first, second = plot_all("a"), plot_all("b")
    assert list(first) == ["curves-conv4_fc.png", "curves-gap10k.png", "tradeoff.png"]
    assert first == second
    for png in first.values():
        assert png.startswith(b"\x89PNG") and len(png) < 150_000
        assert b"matplotlib" not in png and b"Software" not in png   # no version, no date in the file


def test_no_train_writes_report_figures_and_pretrained_and_keeps_the_hand_written_part(workdir, capsys, mnist_dir):
    for seed, shift in ((1, 0.0), (2, 0.06), (3, -0.04)):
        fake_run("gap10k", seed, curve("gap10k", shift), checkpoint=seed == 1)
        fake_run("bn_fc", seed, curve("bn_fc", shift), checkpoint=seed == 1)
    fake_run("bn_fc", 4, curve("bn_fc"), epochs_done=2)
    mine = f"{reproduce.MARKER}\n\n## Analysis\n\nWritten by hand: 99.99% on a toaster.\n"
    (workdir / "REPRODUCTION.md").write_text("# old generated text, 12.34% somewhere\n\n" + mine)
    reproduce.main(["--no-train", "--models", "gap10k", "bn_fc", "--data-dir", mnist_dir])  # McNemar reads the test set
    report = (workdir / "REPRODUCTION.md").read_text()
    assert report.endswith(mine) and report.count(reproduce.MARKER) == 1
    assert "12.34%" not in report
    g = curve("gap10k")   # its unlogged epochs 17 and 18 are filled in above the logged 99.38%
    assert recorded(str(workdir / "REPRODUCTION.md")) == {"gap10k": (max(g), g.index(max(g)) + 1),
                                                         "bn_fc": (99.64, 10)}
    assert "(n=3)" in report and "bn_fc 1, 2, 3" in report           # the unfinished seed 4 is left out
    assert "| bn_fc | 4, 4, 4 |" in report                            # first epoch at >= 99.0% per seed
    assert "## How sure are these numbers?" in report and "exact McNemar p = " in report  # shipped bn_fc vs gap10k
    assert "| bn_fc | 99.64% [99.50-99.74] | " in report and "no run with --val" in report
    for f in ("curves-gap10k.png", "curves-bn_fc.png", "tradeoff.png"):
        assert f"figures/{f}" in report and (workdir / "figures" / f).stat().st_size > 10_000
    ckpt = torch.load(workdir / "pretrained" / "bn_fc.pt", weights_only=True)
    assert (ckpt["test_acc"], ckpt["epoch"]) == (99.64, 10)
    before = {p: p.read_bytes() for p in workdir.glob("**/*") if p.is_file() and "runs" not in p.parts}
    reproduce.main(["--no-train", "--models", "gap10k", "bn_fc", "--data-dir", mnist_dir])
    after = {p: p.read_bytes() for p in workdir.glob("**/*") if p.is_file() and "runs" not in p.parts}
    changed = [str(p) for p in before if before[p] != after[p] and p.suffix != ".pt"]
    assert not changed and before.keys() == after.keys()   # same runs, same report and figures


def test_no_train_without_finished_runs_is_one_line_error(workdir, capsys):
    fake_run("bn_fc", 1, curve("bn_fc"), epochs_done=3)
    with pytest.raises(SystemExit) as e:
        reproduce.main(["--no-train", "--models", "bn_fc"])
    assert str(e.value).startswith("error: no finished seed-1 run") and "\n" not in str(e.value)
    with pytest.raises(SystemExit) as e:
        reproduce.main(["--no-train", "--seeds", "2"])
    assert str(e.value).startswith("error: --seeds")


def test_help_states_meaning_and_default_of_every_flag(capsys):
    with pytest.raises(SystemExit):
        reproduce.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--models", "--seeds", "--device", "--data-dir", "--no-train", "--executor", "--parallel",
                 "--job-timeout", "--lr", "--set", "--slurm-partition", "--slurm-time", "--slurm-gpus", "--slurm-cpus"):
        part = text.split(flag, 2)[-1].split(" --")[0]   # the flag's own help text
        assert "default" in part, flag


def test_the_report_says_what_the_runs_say_of_threads():
    assert reproduce.threads([{"threads": 1}, {"threads": 2}]) == "Torch CPU threads: 1, 2."
    assert reproduce.threads([{"threads": 1}, {}]) == "Torch CPU threads: 1; 1 run(s) from before threads were recorded."
    assert reproduce.threads([{}]) == "1 run(s) from before threads were recorded."


def test_honest_table_intervals_and_the_validation_column():
    """t interval of the seed means (n - 1 = 2 degrees of freedom: t = 4.303) and the documented figure
    against it; the validation-chosen figures where the runs have them."""
    runs = [dict(best_test_acc=a, val_chosen_test_acc=v) for a, v in ((99.53, 99.50), (99.62, 99.58), (99.63, 99.60))]
    row = reproduce.honest_table({"bn_gap": runs})[2]
    mean, sd = 99.59333, 0.05508
    half = 4.302653 * sd / 3 ** 0.5
    assert f"[{mean - half:.2f}-{mean + half:.2f}]" == "[99.46-99.73]" and "[99.46-99.73]" in row
    assert row.startswith("| bn_gap | 99.55% [") and "| yes |" in row and "99.56 +- 0.05 (n=3)" in row
    low = reproduce.honest_table({"bn_fc": [dict(best_test_acc=a) for a in (99.50, 99.52, 99.51)]})[2]
    assert "| no: above it |" in low and "no run with --val" in low
    one = reproduce.honest_table({"gap10k": [dict(best_test_acc=99.4)]})[2]
    assert "n=1: no interval" in one
