"""Run records as a careless or hostile user leaves them: every damaged field of summary.json and
metrics.csv is refused in one line naming the file and the field (records.py), a damaged run is left
out of the report, nothing is written before every record is checked, text from files reaches
documents and figures escaped, and pretrained/ is published only from a full recipe run."""
import json
import os

import pytest
from test_reproduce import curve, fake_run, workdir  # noqa: F401 (workdir: a fixture)

import records
import report
import reproduce


def damage(folder, summary=None, metrics=None, raw_summary=None):
    """Rewrite a run folder's files: summary fields replaced (or removed: value ...), summary.json's
    text or metrics.csv's bytes through a function."""
    path = os.path.join(folder, "summary.json")
    if summary is not None:
        s = json.load(open(path))
        for k, v in summary.items():
            if v is ...:
                del s[k]
            else:
                s[k] = v
        with open(path, "w") as f:
            json.dump(s, f)
    if raw_summary is not None:
        text = open(path).read()
        with open(path, "w") as f:
            f.write(raw_summary(text))
    if metrics is not None:
        mpath = os.path.join(folder, "metrics.csv")
        data = open(mpath, "rb").read()
        with open(mpath, "wb") as f:
            f.write(metrics(data))


DAMAGES = [  # (what, how, the line's file and field, its reason)
    ("accuracy as a string", dict(summary={"best_test_acc": "99.5"}), "summary.json: best_test_acc", "not a number"),
    ("accuracy NaN", dict(raw_summary=lambda t: t.replace('"best_test_acc": 99.64', '"best_test_acc": NaN')),
     "summary.json: file", "no NaN or Infinity"),
    ("accuracy infinite", dict(raw_summary=lambda t: t.replace('"final_test_acc": 99.64', '"final_test_acc": 1e999')),
     "summary.json: final_test_acc", "not a number"),
    ("accuracy out of range", dict(summary={"best_test_acc": 101.0}), "summary.json: best_test_acc",
     "from 0 to 100"),
    ("accuracy negative", dict(summary={"val_chosen_test_acc": -3.0}), "summary.json: val_chosen_test_acc",
     "from 0 to 100"),
    ("a missing key", dict(summary={"date": ...}), "summary.json: date", "missing"),
    ("a null where a number belongs", dict(summary={"wall_seconds": None}), "summary.json: wall_seconds",
     "not a number"),
    ("fractional epochs", dict(summary={"epochs_done": 9.5}), "summary.json: epochs_done", "whole number"),
    ("a bool as a number", dict(summary={"threads": True}), "summary.json: threads", "whole number"),
    ("a list for an object", dict(raw_summary=lambda t: "[1, 2, 3]"), "summary.json: file", "not a JSON object"),
    ("garbage JSON", dict(raw_summary=lambda t: t[:40]), "summary.json: file", "not a JSON object"),
    ("a device name on two lines", dict(summary={"device_name": "CPU\n# Owned"}), "summary.json: device_name",
     "not a line of text"),
    ("a device name of 5,000 characters", dict(summary={"device_name": "x" * 5000}), "summary.json: device_name",
     "not a line of text"),
    ("HTML for a commit", dict(summary={"git_commit": "<script>alert(1)</script>"}), "summary.json: git_commit",
     "not a git commit"),
    ("a marker line for a commit", dict(summary={"git_commit": report.END}), "summary.json: git_commit",
     "not a git commit"),
    ("a pipe in a version", dict(summary={"torch": "2.14 | x"}), "summary.json: torch", "not a version"),
    ("a date that is none", dict(summary={"date": "yesterday"}), "summary.json: date", "not an ISO date"),
    ("resume epochs that are no list", dict(summary={"resumed_at_epochs": "3"}), "summary.json: resumed_at_epochs",
     "not a list of epochs"),
    ("a resume past the last epoch", dict(summary={"resumed_at_epochs": [11]}), "summary.json: resumed_at_epochs",
     "beyond the epochs"),
    ("an unknown model", dict(summary={"model": "bn_fx"}), "summary.json: model", "not one of"),
    ("a best figure metrics.csv does not hold", dict(summary={"best_test_acc": 99.99}),
     "summary.json: best_test_acc", "not the highest test_acc"),
    ("more epochs done than metrics.csv holds", dict(summary={"epochs_done": 10},
                                                     metrics=lambda b: b.rsplit(b"\n", 2)[0] + b"\n"),
     "summary.json: epochs_done", "metrics.csv has 9 epochs"),
    ("an empty cell", dict(metrics=lambda b: b.replace(b",95.10,", b",,", 1)), "metrics.csv: row 1, test_acc",
     "not a number"),
    ("a word for a number", dict(metrics=lambda b: b.replace(b",95.10,", b",abc,", 1)),
     "metrics.csv: row 1, test_acc", "not a number"),
    ("nan in metrics.csv", dict(metrics=lambda b: b.replace(b",95.10,", b",nan,", 1)),
     "metrics.csv: row 1, test_acc", "from 0 to 100"),
    ("inf seconds", dict(metrics=lambda b: b.replace(b",10.000,", b",inf,", 1)), "metrics.csv: row 1, seconds",
     "from 0 to inf"),
    ("a fractional epoch", dict(metrics=lambda b: b.replace(b"\n1,", b"\n1.5,", 1)), "metrics.csv: row 1, epoch",
     "not 1"),
    ("a missing column", dict(metrics=lambda b: b.replace(b"test_acc", b"tset_acc", 1)), "metrics.csv: test_acc",
     "no such column"),
    ("a short row", dict(metrics=lambda b: b.replace(b",1.5\n", b"\n", 1)), "metrics.csv: row 1",
     "not as many cells"),
    ("bytes that are not UTF-8", dict(metrics=lambda b: b + b"\xff\xfe\n"), "metrics.csv: file", "not a CSV file"),
]


@pytest.mark.parametrize("how, where, why", [d[1:] for d in DAMAGES], ids=[d[0] for d in DAMAGES])
def test_a_damaged_record_is_refused_in_one_line_naming_its_file_and_field(workdir, how, where, why):  # noqa: F811
    folder = fake_run("bn_fc", 1, curve("bn_fc"))
    damage(folder, **how)
    with pytest.raises(records.BadRecord) as e:
        records.read_run(folder)
    line = str(e.value)
    assert line.startswith(f"{folder}/{where}: ") and why in line and "\n" not in line, line
    assert "<script>" not in line and "Owned" not in line and "xxxx" not in line   # never the field's text


def test_damaged_runs_are_left_out_and_nothing_is_written_before_every_record_is_checked(workdir, capsys):  # noqa: F811
    fake_run("bn_fc", 1, curve("bn_fc"))
    damage(fake_run("bn_fc", 2, curve("bn_fc")), summary={"best_test_acc": "high"})
    results, notes = records.run_set(reproduce.RUNS, ["bn_fc"], report.VAL)
    assert [r["seed"] for r in results["bn_fc"]] == [1]
    assert notes == ["left out: results/reproduce/bn_fc-seed2/summary.json: best_test_acc: not a number from 0 to 100"]
    damage(reproduce.run_dir("bn_fc", 1), metrics=lambda b: b.replace(b",95.10,", b",NaN,", 1))
    readme = (workdir / "README.md").read_bytes()
    with pytest.raises(SystemExit) as e:
        reproduce.main(["--no-train", "--models", "bn_fc"])
    assert str(e.value).startswith("error: no finished seed-1 run in results/reproduce/ for bn_fc")
    err = capsys.readouterr().err.splitlines()
    assert err == ["left out: results/reproduce/bn_fc-seed1/metrics.csv: row 1, test_acc: not a number from 0 to 100",
                   "left out: results/reproduce/bn_fc-seed2/summary.json: best_test_acc: not a number from 0 to 100"]
    assert sorted(os.listdir(workdir)) == ["README.md", "results"] and (workdir / "README.md").read_bytes() == readme


def test_a_readme_without_its_markers_is_refused_before_anything_is_written(workdir):  # noqa: F811
    fake_run("bn_fc", 1, curve("bn_fc"))
    (workdir / "README.md").write_text(f"# x\n\n{report.BEGIN}\n| old |\n")   # no end marker
    with pytest.raises(SystemExit) as e:
        reproduce.main(["--no-train", "--models", "bn_fc"])
    assert "README.md needs the line" in str(e.value) and "\n" not in str(e.value)
    assert sorted(os.listdir(workdir)) == ["README.md", "results"]


HOSTILE = f"<script>alert(1)</script> | # heading [x](y) **b** `c` $\\frac{{$ &amp; {report.END}"


def test_text_from_files_reaches_documents_and_figures_escaped(workdir):  # noqa: F811
    """A device name and a bench CPU name holding HTML, table pipes, a heading, a link, emphasis, a code
    span, mathtext and the README's own end marker: the documents show them as text, every table row
    keeps its columns, the README keeps one pair of markers, and the trade-off chart draws them."""
    for seed in (1, 2):
        fake_run("bn_fc", seed, curve("bn_fc", 0.01 * seed), device_name=HOSTILE)
    os.makedirs(os.path.dirname(report.BENCH))
    with open(report.BENCH, "w") as f:
        json.dump({"environment": {"cpu": HOSTILE, "cores": 2, "date": "2026-12-04T10:00:00+00:00",
                                   "command": "python bench.py", "git_commit": "abc1234", "torch": "2.14.1",
                                   "load_before": 0.1},
                   "records": [{"task": "train", "model": "bn_fc", "device": "cpu", "backend": "fast-pipeline",
                                "variant": "eager", "metric": "images_per_s", "value": 2750.0, "threads": 1},
                               {"task": "infer", "model": "bn_fc", "device": "cpu", "backend": "onnxruntime",
                                "metric": "p50_ms", "value": 0.05, "threads": 1}]}, f)
    files = report.build(["bn_fc"], None)   # one recipe: nothing to score on images
    doc, readme = files[report.REPORT].decode(), files[report.README].decode()
    assert "<script>" not in doc and "\\<script\\>" in doc and "\\$\\\\frac{\\$" in doc
    assert "\n#" not in doc.replace("\n## ", "\n") and not doc.startswith("#\n")
    for block in doc.split("\n\n"):
        rows = [r for r in block.split("\n") if r.startswith("|")]
        cells = {len(r.replace("\\|", "").split("|")) for r in rows}
        assert len(cells) <= 1, block   # an escaped pipe does not add a column
    assert readme.count(report.BEGIN) == readme.count(report.END) == 1
    assert "| bn_fc | 4; about 344 s at the source's stated 86 s/epoch | 4, 4 | 80 |" in doc   # 4 x 55,000 / 2,750
    assert files["figures/tradeoff.png"].startswith(b"\x89PNG")


PUBLISH_REFUSED = [  # (what, fake_run's arguments for bn_fc seed 1, what the line says)
    ("a --subset run", dict(subset=4096), "trained on --subset 4096"),
    ("fewer epochs than the recipe", dict(epochs=2, accs=curve("bn_fc")[:2]), "2 epochs, not the recipe's 10"),
    ("an unfinished run", dict(epochs_done=5), "unfinished: 5 of 10 epochs"),
    ("another --val", dict(val_images=0, val_chosen_epoch=None, val_chosen_test_acc=None), "--val 0, not 5000"),
    ("an accuracy far below the documented figure", dict(accs=[90.0] * 10),
     "more than 2 points below the documented figure"),
]


@pytest.mark.parametrize("args, says", [p[1:] for p in PUBLISH_REFUSED], ids=[p[0] for p in PUBLISH_REFUSED])
def test_pretrained_is_published_only_from_full_recipe_runs(workdir, args, says):  # noqa: F811
    fake_run("gap10k", 1, curve("gap10k"), checkpoint=True)   # good: checked first, and still not written
    args = dict(args)
    fake_run("bn_fc", 1, args.pop("accs", curve("bn_fc")), **args)
    with pytest.raises(SystemExit) as e:
        reproduce.main(["--publish-pretrained", "--models", "gap10k", "bn_fc"])
    line = str(e.value)
    assert line.startswith("error: not publishing pretrained/bn_fc.pt: results/reproduce/bn_fc-seed1: ") and \
        says in line, line
    assert not (workdir / "pretrained").exists()


def test_pretrained_is_not_published_from_a_best_pt_of_another_epoch(workdir):  # noqa: F811
    fake_run("bn_fc", 1, curve("bn_fc"), checkpoint=True)
    damage(reproduce.run_dir("bn_fc", 1), summary={"val_chosen_epoch": 9, "val_chosen_test_acc": curve("bn_fc")[8]})
    with pytest.raises(SystemExit) as e:
        reproduce.main(["--publish-pretrained", "--models", "bn_fc"])
    assert "best.pt holds epoch 10, not the epoch its summary.json chose on validation (9)" in str(e.value)
    assert not (workdir / "pretrained").exists()
