"""reproduce.py without training: run records on disk -> REPRODUCTION.md, figures/ and the README's
results table (report.py, figures.py), and pretrained/ only when asked. Synthetic run folders stand in
for real runs (their best.pt holds the committed pretrained/ weights, so they score what they say), so
this takes seconds; one test regenerates the committed documents from the committed records."""
import json
import os
import shutil

import pytest
import torch
from test_pretrained import recorded

import errors
import figures
import models
import records
import report
import reproduce
import scoring

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = "epoch,train_loss,train_acc,val_loss,val_acc,test_loss,test_acc,lr,seconds,images_per_s,load_1m"


def fake_run(name, seed, accs, seconds=None, epochs_done=None, checkpoint=False, **override):
    """A run folder as train.py leaves it with --val 5000 (metrics.csv, summary.json, with checkpoint=True
    best.pt), with made-up figures; the last epoch is the one chosen on validation. checkpoint=True puts
    the committed pretrained/<name>.pt weights in best.pt and their real test accuracy at that epoch."""
    out = reproduce.run_dir(name, seed)
    os.makedirs(out, exist_ok=True)
    seconds = seconds or [10.0 + e for e in range(len(accs))]
    done = len(accs) if epochs_done is None else epochs_done
    accs = list(accs)
    if checkpoint:
        shipped = torch.load(os.path.join(ROOT, "pretrained", name + ".pt"), weights_only=True)
        accs[done - 1] = shipped["test_acc"]
    rows = [f"{e},0.1,97.0,0.06,98.5,0.05,{a:.2f},0.01,{s:.3f},5000.0,1.5"
            for e, (a, s) in enumerate(zip(accs, seconds), 1)]
    with open(os.path.join(out, "metrics.csv"), "w") as f:
        f.write("\n".join([FIELDS] + rows[:done]) + "\n")
    best = max(accs[:done])
    recipe = models.RECIPES[name]
    summary = dict(model=name, params=models.n_params(models.build_model(name)), epochs=recipe["epochs"],
                   epochs_done=done, seed=seed, batch_size=recipe["batch_size"], subset=None, val_images=5000,
                   train_images=55000, lr=None, pipeline="fast", device="cpu", device_name="Test CPU", amp=False,
                   compile=False, channels_last=False, fast_dropout=False, cores=2, threads=1, python="3.11.7",
                   torch="2.14.1", torchvision="0.29.1", git_commit="abc1234", date="2026-12-04T13:22:58+00:00",
                   command="python train.py", reconstructed=recipe["reconstructed"],
                   wall_seconds=sum(seconds[:done]) + done, best_test_acc=best, best_epoch=accs.index(best) + 1,
                   final_test_acc=accs[done - 1], val_chosen_epoch=done, val_chosen_test_acc=accs[done - 1])
    summary.update(override)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f)
    if checkpoint:
        torch.save(dict(shipped, epoch=done), os.path.join(out, "best.pt"))
    return out


def curve(name, shift=0.0):
    """The source's own curve moved by `shift`, its unlogged epochs filled in: a plausible run."""
    acc, out = 90.0, []
    for a in models.RECIPES[name]["documented"]["test_acc_by_epoch"]:
        acc = a if a is not None else acc + 0.01
        out.append(round(min(acc + shift, 99.99), 2))
    return out


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copy(os.path.join(ROOT, "README.md"), tmp_path / "README.md")
    return tmp_path


ANSWERS = {}  # (model, images): which images its committed pretrained/ weights get right


@pytest.fixture
def scored_once(monkeypatch):
    """scoring.right_answers runs each model's inference once per session: the fake runs' best.pt all
    hold the committed pretrained/ weights, so the answers are the same every time they are asked for."""
    real = scoring.right_answers

    def once(run, images, labels):
        key = (run["model"], len(labels))
        if key not in ANSWERS:
            ANSWERS[key] = real(run, images, labels)
        return ANSWERS[key]
    monkeypatch.setattr(scoring, "right_answers", once)


def run_set(names=tuple(models.RECIPES)):
    return records.run_set(reproduce.RUNS, list(names), report.VAL)


def test_the_run_set_counts_every_finished_seed_and_skips_the_rest(workdir):
    fake_run("bn_fc", 1, curve("bn_fc"))
    fake_run("bn_fc", 2, curve("bn_fc", 0.05))
    fake_run("bn_fc", 3, curve("bn_fc"), epochs_done=4)   # still training
    fake_run("bn_fc", 5, curve("bn_fc", -0.05))           # seed 4 never started
    fake_run("bn_fc", 6, curve("bn_fc"), subset=4096)     # not the recipe as documented
    results, notes = run_set()
    runs = results["bn_fc"]
    assert [r["seed"] for r in runs] == [1, 2, 5]
    assert (runs[1]["rows"][0]["epoch"], runs[1]["rows"][0]["test_acc"], runs[1]["rows"][0]["seconds"]) == \
        (1, 95.15, 10.0)
    assert "gap10k" not in results
    assert notes == ["left out results/reproduce/bn_fc-seed3: unfinished: 4 of 10 epochs",
                     "left out results/reproduce/bn_fc-seed6: trained on --subset 4096"]


def test_time_to_accuracy_in_epochs_from_the_runs_and_seconds_from_the_bench(workdir):
    fake_run("bn_fc", 1, [95.0, 98.99, 99.0, 99.5] + [99.5] * 6, seconds=[10.0] * 10)
    fake_run("bn_fc", 2, [95.0] * 10, seconds=[10.0] * 10)
    one, never = run_set()[0]["bn_fc"]
    assert report.first_epoch_at([r["test_acc"] for r in one["rows"]]) == 3   # the epoch that reaches it
    bench = {"train": {"bn_fc": {"value": 5500.0, "threads": 1}}}             # 55,000 images: 10 s an epoch
    row = report.time_row("bn_fc", [one, never], bench)
    assert row == ["bn_fc", "4; about 344 s at the source's stated 86 s/epoch", "3, never", "30 (1 of 2 seeds never)"]
    assert report.time_row("bn_fc", [never], bench)[2:] == ["never", "never"]
    assert report.time_row("bn_fc", [one], None)[3] == "not measured"        # no bench file: no seconds


def test_documented_epoch_to_target():
    doc = {n: r["documented"]["test_acc_by_epoch"] for n, r in models.RECIPES.items()}
    assert report.documented_epoch_to(doc["gap10k"]) == (10, [8, 9])   # 98.98% at 7, then unlogged
    assert report.documented_epoch_to(doc["bn_gap"]) == (2, [])
    assert report.documented_epoch_to(doc["bn_fc"]) == (4, [])
    assert report.documented_epoch_to(None) == (None, [])


def test_benchmark_latency_and_throughput_from_bench_json(tmp_path):
    bench = records.read_bench(os.path.join(ROOT, "results", "bench", "2026-11-25-cpu-infer.json"))
    assert sorted(bench["infer"]) == sorted(models.RECIPES)
    assert all(0 < r["value"] < 10 and r["threads"] == 1 for r in bench["infer"].values())
    assert bench["env"]["cpu"].startswith("Intel") and bench["env"]["git_commit"] == "8b00190"
    assert records.read_bench(str(tmp_path / "no-such-file.json")) is None
    (tmp_path / "b.json").write_text(json.dumps({"environment": dict(bench["env"], cpu="x"), "records": [
        {"task": "train", "model": "bn_fc", "device": "cpu", "backend": "fast-pipeline", "variant": "eager",
         "metric": "images_per_s", "value": 1234.5, "threads": 1},
        {"task": "train", "model": "bn_fc", "device": "cpu", "backend": "sources-pipeline", "variant": "eager",
         "metric": "images_per_s", "value": 99.0, "threads": 1}]}))
    assert records.read_bench(str(tmp_path / "b.json"))["train"] == {"bn_fc": {"model": "bn_fc", "value": 1234.5,
                                                                                "threads": 1}}


def all_figures(results):
    rows, _ = report.tradeoff_rows(results, None)
    return {"gap10k": figures.recipe_curves("gap10k", results["gap10k"]),
            "conv4_fc": figures.one_epoch("conv4_fc", results["conv4_fc"], 96.94),
            "tradeoff": figures.tradeoff(rows, "a test with $\\frac{ in it")}   # not mathtext: drawn as it is


def test_figures_are_the_same_bytes_every_time(workdir):
    for seed, shift in ((1, 0.0), (2, 0.08)):
        fake_run("gap10k", seed, curve("gap10k", shift))
        fake_run("bn_fc", seed, curve("bn_fc", shift))
        fake_run("conv4_fc", seed, [96.9 + shift])   # far below the rest: the trade-off axis breaks
    results = run_set()[0]
    first, second = all_figures(results), all_figures(results)
    assert first == second
    for png in first.values():
        assert png.startswith(b"\x89PNG") and len(png) < 150_000
        assert b"matplotlib" not in png and b"Software" not in png   # no version, no date in the file
    assert figures.plain("$x$ and \x1b[2J") == r"\$x\$ and \x1b[2J"


def test_no_train_writes_documents_and_figures_but_never_pretrained(workdir, capsys, mnist_dir, scored_once):
    for seed, shift in ((1, 0.0), (2, 0.06), (3, -0.04)):
        fake_run("gap10k", seed, curve("gap10k", shift), checkpoint=seed == 1)
        fake_run("bn_fc", seed, curve("bn_fc", shift), checkpoint=seed == 1)
    fake_run("bn_fc", 4, curve("bn_fc"), epochs_done=2)
    (workdir / "REPRODUCTION.md").write_text("# old generated text, 12.34% somewhere\n\nhand-written part\n")
    reproduce.main(["--no-train", "--models", "gap10k", "bn_fc", "--data-dir", mnist_dir])  # McNemar reads the test set
    doc = (workdir / "REPRODUCTION.md").read_text()
    assert "12.34%" not in doc and "hand-written" not in doc and "<!--" not in doc   # generated whole
    shipped = {n: torch.load(os.path.join(ROOT, "pretrained", n + ".pt"), weights_only=True) for n in ("gap10k", "bn_fc")}
    assert recorded(str(workdir / "REPRODUCTION.md")) == {n: (c["test_acc"], 10 if n == "bn_fc" else 19)
                                                         for n, c in shipped.items()}   # seed 1's best.pt
    assert "| bn_fc | source 004 | 99.64% [99.50-99.74] | " in doc and "| 1-3 |" in doc  # unfinished seed 4 left out
    assert "| bn_fc | 4; about 344 s at the source's stated 86 s/epoch | 4, 4, 4 | not measured |" in doc
    assert "exact McNemar p = " in doc and "Not in this report (no usable seed-1 run yet): bn_gap" not in doc
    for f in ("curves-gap10k.png", "curves-bn_fc.png"):
        assert f"figures/{f}" in doc and (workdir / "figures" / f).stat().st_size > 10_000
    assert (workdir / "figures" / "tradeoff.png").stat().st_size > 10_000
    readme = (workdir / "README.md").read_text()
    assert readme.count(report.BEGIN) == readme.count(report.END) == 1 and "| `bn_fc` | 99.64% [99.50-99.74] |" in readme
    assert not (workdir / "pretrained").exists()                       # --no-train never touches pretrained/
    before = {p: p.read_bytes() for p in workdir.glob("**/*") if p.is_file()}
    reproduce.main(["--no-train", "--models", "gap10k", "bn_fc", "--data-dir", str(workdir / "no-mnist")])
    after = {p: p.read_bytes() for p in workdir.glob("**/*") if p.is_file()}
    assert before == after   # same records, same bytes: the scores record answers without the images
    assert "left out results/reproduce/bn_fc-seed4: unfinished: 2 of 10 epochs" in capsys.readouterr().err
    reproduce.main(["--publish-pretrained", "--models", "bn_fc"])
    ckpt = torch.load(workdir / "pretrained" / "bn_fc.pt", weights_only=True)
    assert (ckpt["test_acc"], ckpt["epoch"]) == (shipped["bn_fc"]["test_acc"], 10)
    assert set(ckpt) == {"model_name", "model", "epoch", "test_acc", "params"}


def test_the_scores_record_is_used_only_for_the_checkpoint_it_was_made_from(workdir, mnist_dir, scored_once,
                                                                           capsys):
    """A scores record whose sha256 is another checkpoint's is scored again on the images; one whose
    answers disagree with the run's record is refused; a damaged one is scored again, said in one line."""
    for name in ("gap10k", "bn_fc"):
        fake_run(name, 1, curve(name), checkpoint=True)
    first = report.build(["gap10k", "bn_fc"], mnist_dir)
    scores = json.loads(first[report.SCORES])
    assert sorted(scores["checkpoints"]) == ["bn_fc-seed1/best.pt", "gap10k-seed1/best.pt"]
    entry = scores["checkpoints"]["bn_fc-seed1/best.pt"]
    flipped = format(int(entry["test"][:2], 16) ^ 0x80, "02x") + entry["test"][2:]   # image 1 right <-> wrong
    os.makedirs(os.path.dirname(report.SCORES), exist_ok=True)
    for sha, test, expect in ((entry["sha256"], flipped, "best.pt scores"), ("0" * 64, flipped, None),
                              (entry["sha256"], "zz", None)):
        with open(report.SCORES, "w") as f:
            json.dump({"checkpoints": dict(scores["checkpoints"], **{"bn_fc-seed1/best.pt": dict(entry, sha256=sha,
                                                                                                test=test)})}, f)
        if expect:
            with pytest.raises(errors.UserError, match=expect):
                report.build(["gap10k", "bn_fc"], str(workdir / "no-mnist"))
        else:
            assert report.build(["gap10k", "bn_fc"], mnist_dir) == first   # scored again: the same answers
    assert capsys.readouterr().err == ("scored again: results/reproduce/scores.json: checkpoints.bn_fc-seed1/best.pt."
                                       "test: not a bitmap of 10,000 images\n")


def test_no_train_without_finished_runs_is_one_line_error(workdir, capsys):
    fake_run("bn_fc", 1, curve("bn_fc"), epochs_done=3)
    with pytest.raises(SystemExit) as e:
        reproduce.main(["--no-train", "--models", "bn_fc"])
    assert str(e.value).startswith("error: no finished seed-1 run") and "\n" not in str(e.value)
    with pytest.raises(SystemExit) as e:
        reproduce.main(["--no-train", "--seeds", "2"])
    assert str(e.value).startswith("error: --seeds")
    with pytest.raises(SystemExit) as e:
        reproduce.main(["--publish-pretrained", "--set", "amp=on"])
    assert str(e.value).startswith("error: --set say what to train; with --publish-pretrained nothing is trained")
    assert sorted(os.listdir(workdir)) == ["README.md", "results"]


def test_help_states_meaning_and_default_of_every_flag(capsys):
    with pytest.raises(SystemExit):
        reproduce.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--models", "--seeds", "--device", "--data-dir", "--no-train", "--publish-pretrained", "--executor",
                 "--parallel", "--job-timeout", "--lr", "--set", "--slurm-partition", "--slurm-time", "--slurm-gpus",
                 "--slurm-cpus"):
        part = text.split(flag, 2)[-1].split(" --")[0]   # the flag's own help text
        assert "default" in part, flag


def test_the_report_says_what_the_runs_say_of_threads(workdir):
    fake_run("bn_fc", 1, curve("bn_fc"), threads=1)
    fake_run("bn_fc", 2, curve("bn_fc"), threads=2)
    lines = report.runs_section(run_set()[0])
    assert lines[-2].startswith("| bn_fc seed 1 | ") and lines[-2].split(" | ")[4] == "1"
    assert lines[-1].startswith("| bn_fc seed 2 | ") and lines[-1].split(" | ")[4] == "2"
    assert "2 runs on Test CPU (2 cores), torch 2.14.1, fast pipeline, fp32, eager step." in lines[3]


def test_intervals_and_the_verdict_against_the_documented_figure():
    """t interval of the seed means (n - 1 = 2 degrees of freedom: t = 4.303) and the documented figure
    against it; the validation-chosen figures beside it."""
    runs = [dict(best_test_acc=a, val_chosen_test_acc=v) for a, v in ((99.53, 99.50), (99.62, 99.58), (99.63, 99.60))]
    mean, sd = 99.59333, 0.05508
    half = 4.302653 * sd / 3 ** 0.5
    assert f"[{mean - half:.2f}-{mean + half:.2f}]" == "[99.46-99.73]"
    assert report.with_interval(report.bests(runs)) == "99.59 +- 0.06 [99.46-99.73]"
    assert report.wilson(99.55) == "99.55% [99.40-99.66]" and report.verdict("bn_gap", runs) == "inside our interval"
    assert report.with_interval(report.chosen(runs)).startswith("99.56 +- 0.05 [")
    low = [dict(best_test_acc=a) for a in (99.50, 99.52, 99.51)]
    assert report.verdict("bn_fc", low) == "above our interval"
    assert report.verdict("gap10k", [dict(best_test_acc=99.4)]) == "one seed: no interval"
    assert report.with_interval([99.4]) == "99.40 (one seed)"
    assert report.verdict("conv4_fc", low).startswith("not comparable")
    # two seeds (t = 12.71 at 1 degree of freedom): the interval stops at 100%, where accuracy does
    assert report.with_interval([99.31, 99.42]) == "99.37 +- 0.08 [98.67-100.00]"


def test_committed_documents_regenerate_byte_for_byte(mnist_dir, tmp_path):
    """REPRODUCTION.md, figures/ and the README's results table are what the committed records in
    results/reproduce/ give, to the byte: a document can never drift from its data."""
    runs = os.path.join(ROOT, report.RUNS)
    if not any(os.path.isfile(os.path.join(runs, e, "summary.json")) for e in (os.listdir(runs) if os.path.isdir(runs)
                                                                               else [])):
        pytest.skip(f"no run records in {report.RUNS}/ yet")
    files = report.build(list(models.RECIPES), mnist_dir, root=ROOT)
    report.write(files, str(tmp_path))
    for path in sorted(files):
        with open(os.path.join(ROOT, path), "rb") as f:
            assert (tmp_path / path).read_bytes() == f.read(), f"{path} differs from what {report.RUNS}/ gives: " \
                                                               "run `make figures` and commit the result"
