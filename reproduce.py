"""Train every recipe for its documented epochs over several seeds; write REPRODUCTION.md and figures/.

    python reproduce.py                 # all five, 3 seeds on a GPU, 1 on CPU (make reproduce)
    python reproduce.py --seeds 3 --models gap10k bn_fc
    python reproduce.py --no-train      # report and figures from the finished runs only (make figures)

Runs go to runs/reproduce/<model>-seed<k>/; a finished run is not trained again, so the
command can be stopped and restarted, and every finished seed on disk (say from an earlier
`--models bn_fc --seeds 3`) counts in the mean and spread; unfinished runs are left out. The
best.pt of each recipe's seed 1 becomes pretrained/<model>.pt (weights only,
weights_only-loadable).

Sweeps: --executor local runs the runs as jobs at once on one machine (--parallel N, each job on a GPU of
its own), --executor slurm as a Slurm job array; --lr V1 V2 and --set KEY=V1,V2 (any train.py flag) add a
grid, whose runs go to runs/reproduce/<model>-<key><value>...-seed<k>/ (sweep.py runs the jobs).

REPRODUCTION.md holds only what the runs measured and what the registry (models.RECIPES) says;
everything below the line MARKER in it is hand-written analysis, kept byte for byte when the
file is regenerated. The figures (figures/curves-<model>.png, figures/tradeoff.png) are drawn
with fixed sizes, fonts and style and no timestamp, so the same runs give the same files.
"""
import argparse
import io
import itertools
import math
import os
import re
import statistics
import sys
import time

import matplotlib
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter, MaxNLocator

import data
import errors
import fileio
import machine
import models
import runfiles
import stats
import sweep
import train

MARKER = "<!-- hand-written analysis below: reproduce.py keeps it as is -->"
REPORT = "REPRODUCTION.md"
FIGURES = "figures"
RUNS = os.path.join("results", "reproduce")  # the committed run records (checkpoints git-ignored)
TRAIN_SET_FIGURE = "conv4_fc"  # the one recipe whose documented figure was measured on the training images
TARGET = 99.0  # time to accuracy: the first epoch at or above this test accuracy (%)
BENCH = "bench-cpu.json"  # bench.py --json output the trade-off chart takes its latency from


def run_dir(name, seed):
    return os.path.join(RUNS, f"{name}-seed{seed}")


def finished(folder, epochs):
    """A run folder's summary.json if its run finished all `epochs`, else None (none yet, or unreadable)."""
    try:
        s = fileio.read_json_dict(os.path.join(folder, "summary.json"))
    except errors.UserError:
        return None
    return s if s.get("epochs_done") == epochs else None


def collect(name):
    """Every finished run of a recipe on disk, in seed order: its summary.json, with `seed` taken from
    the folder name and `curve`: per epoch (epoch, test_acc, training seconds) from metrics.csv."""
    epochs = models.RECIPES[name]["epochs"]
    pattern = re.compile(re.escape(name) + r"-seed(\d+)")
    try:
        seeds = sorted(int(m.group(1)) for m in map(pattern.fullmatch, os.listdir(RUNS)) if m)
    except OSError:
        return []
    runs = []
    for seed in seeds:
        s = finished(run_dir(name, seed), epochs)
        rows = runfiles.read_metrics(run_dir(name, seed)) if s else []
        if len(rows) != epochs:  # still training, or not a whole run
            continue
        s["seed"] = seed
        s["curve"] = [(int(r["epoch"]), float(r["test_acc"]), float(r["seconds"])) for r in rows]
        runs.append(s)
    return runs


def time_to(run, target=TARGET):
    """(epoch, training seconds up to and including it) of the first epoch whose test accuracy
    reaches `target`, or None. Seconds are metrics.csv's: training only, the test pass excluded."""
    total = 0.0
    for epoch, acc, seconds in run["curve"]:
        total += seconds
        if acc >= target:
            return epoch, total
    return None


def seconds_per_epoch(run):
    return statistics.mean(sec for _, _, sec in run["curve"])


def documented_epoch_to(curve, target=TARGET):
    """The first epoch of the seed's own log at or above target, and the unlogged epochs before it."""
    if not curve:
        return None, []
    for i, acc in enumerate(curve):
        if acc is not None and acc >= target:
            return i + 1, [j + 1 for j in range(i) if curve[j] is None]
    return "never", [j + 1 for j, a in enumerate(curve) if a is None]


def seed_list(runs):
    seeds = [r["seed"] for r in runs]
    return ", ".join(map(str, seeds))


def mean_std(values, title=False):
    """Accuracies over seeds as mean and standard deviation (one seed: its value): '99.50 +- 0.06 (n=3)'
    for the report's table, or with title=True '99.50 ± 0.06% (mean ± std), 3 seeds' ('99.50%, 1 seed')
    for a figure's title."""
    n, mean = len(values), statistics.mean(values)
    std = statistics.stdev(values) if n > 1 else None
    if title:
        return (f"{mean:.2f}%" if std is None else f"{mean:.2f} ± {std:.2f}% (mean ± std)") + \
            f", {n} seed{'s' if n > 1 else ''}"
    return (f"{mean:.2f}" if std is None else f"{mean:.2f} +- {std:.2f}") + f" (n={n})"


def interval(ci):
    return "" if ci is None else f" [{ci[0]:.2f}-{ci[1]:.2f}]"


def honest_table(results):
    """Per recipe: the seed's figure with its Wilson interval; ours the seeds' way (the highest test
    accuracy over epochs) and ours chosen on validation, each as mean +- std over seeds with the 95% t
    interval of the mean; whether the documented figure lies inside our interval of the same figure."""
    lines = ["| recipe | documented [95% Wilson] | ours, the seeds' way: highest test accuracy over epochs, mean +- "
             "std [95% t interval of the mean] | documented inside it? | ours, chosen on validation: test accuracy "
             "at the epoch the held-out images chose, mean +- std [95% t interval] |",
             "|---|---|---|---|---|"]
    for name, runs in results.items():
        doc = models.RECIPES[name]["documented"]["best_test_acc"]
        bests = [r["best_test_acc"] for r in runs]
        chosen = [r["val_chosen_test_acc"] for r in runs if errors.is_number(r.get("val_chosen_test_acc"))]
        ci = stats.mean_ci95(bests)
        inside = "n=1: no interval" if ci is None else "yes" if ci[0] <= doc <= ci[1] else \
            f"no: {'above' if doc > ci[1] else 'below'} it"
        if name == TRAIN_SET_FIGURE:
            inside = "not comparable: the seed's figure is on the training set"
        honest = f"{mean_std(chosen)}{interval(stats.mean_ci95(chosen))}" if chosen else "no run with --val"
        if chosen and len(chosen) < len(runs):
            honest += f"; {len(runs) - len(chosen)} run(s) without --val"
        lines.append(f"| {name} | {doc:.2f}%{interval(stats.ci95(round(doc * 100), 10000))} | "
                     f"{mean_std(bests)}{interval(ci)} | {inside} | {honest} |")
    return lines


@torch.no_grad()
def paired_shipped(results, data_dir, device):
    """The exact McNemar test between the pretrained/ checkpoints of the two recipes with the highest
    mean figure (chosen on validation where every run has one, else the seeds' way): a line for the
    report, or None with fewer than two recipes."""
    def figure(runs):
        chosen = [r.get("val_chosen_test_acc") for r in runs]
        return statistics.mean(chosen if all(errors.is_number(c) for c in chosen) else
                               [r["best_test_acc"] for r in runs])
    top = sorted(results, key=lambda n: -figure(results[n]))[:2]
    if len(top) < 2:
        return None
    x, y = data.load("test", data_dir)
    right = [models.log_probs(models.from_checkpoint(runfiles.load_checkpoint(os.path.join("pretrained", n + ".pt")))
                              .to(device), x).argmax(1) == y for n in top]
    t = stats.paired(*right)
    accs = [100 * int(r.sum()) / len(y) for r in right]
    return (f"The two recipes with the highest mean figure, {top[0]} and {top[1]}: their shipped checkpoints "
            f"(`pretrained/`) score {accs[0]:.2f}% and {accs[1]:.2f}% on the same 10,000 test images; only "
            f"{top[0]} is wrong on {t['only_a_wrong']} of them, only {top[1]} on {t['only_b_wrong']}, both on "
            f"{t['both_wrong']}: {stats.verdict(t, top[0], top[1])} (`python compare.py pretrained/{top[0]}.pt "
            f"pretrained/{top[1]}.pt`).")


@torch.no_grad()
def train_set_accuracy(ckpt_path, data_dir, device):
    """Accuracy on the 60,000 training images (no augmentation): what seed 001 called its test set."""
    model = models.from_checkpoint(runfiles.load_checkpoint(ckpt_path)).to(device)
    x, y = data.load("train", data_dir)
    return models.score(models.log_probs(model, x), y)[2]


def publish_pretrained(name, seed):
    ckpt = runfiles.load_checkpoint(os.path.join(run_dir(name, seed), "best.pt"))
    os.makedirs("pretrained", exist_ok=True)
    keep = runfiles.make_checkpoint(ckpt["model_name"], ckpt["model"], ckpt["epoch"], ckpt["test_acc"], ckpt["params"])
    runfiles.save_checkpoint(keep, os.path.join("pretrained", name + ".pt"))


# ---------------------------------------------------------------------------------------------
# Benchmark figures for the trade-off chart

def bench_latency(path=BENCH):
    """ONNX Runtime batch-1 p50 latency (ms, CPU, 1 thread) per model from bench.py's JSON ({environment,
    records}; the committed one is bench-cpu.json), and a line naming that source (its CPU, commit and
    date); ({}, None) if the file is missing, unreadable or holds no such record."""
    try:
        bench = fileio.read_json_dict(path)
    except errors.UserError:
        return {}, None
    records, env = bench.get("records"), bench.get("environment")
    if not isinstance(records, list) or not isinstance(env, dict):
        return {}, None
    latency = {r["model"]: r["value"] for r in records
               if isinstance(r, dict) and isinstance(r.get("model"), str) and errors.is_number(r.get("value"))
               and (r.get("task"), r.get("device"), r.get("backend"), r.get("threads"), r.get("metric"))
               == ("infer", "cpu", "onnxruntime", 1, "p50_ms")}
    if not latency:
        return {}, None
    said = [env.get("cpu") and f"bench.py on {env['cpu']}", env.get("git_commit") and f"commit {env['git_commit']}",
            str(env.get("date") or "")[:10]]  # the date, not the time of day
    said = ", ".join(str(s) for s in said if s)
    return latency, os.path.basename(path) + (f" ({said})" if said else "")


# ---------------------------------------------------------------------------------------------
# Figures: fixed style, size and resolution; no date or version lands in the file

STYLE = {
    "font.family": "DejaVu Sans", "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9,
    "legend.fontsize": 8, "xtick.labelsize": 8, "ytick.labelsize": 8, "figure.titlesize": 11,
    "axes.grid": True, "grid.alpha": 0.35, "grid.linewidth": 0.5, "axes.spines.top": False,
    "axes.spines.right": False, "lines.linewidth": 1.6, "legend.frameon": False,
    "figure.facecolor": "white", "savefig.facecolor": "white", "image.composite_image": True,
}
DPI = 100
OURS, DOC = "#1f5fa8", "#d2561e"
RECIPE_STYLE = dict(zip(models.RECIPES, zip(("#1f77b4", "#7f7f7f", "#2ca02c", "#9467bd", "#d62728"),
                                             ("o", "s", "^", "D", "v"))))


def _figure(width, height):
    return Figure(figsize=(width, height), dpi=DPI)  # not pyplot: no GUI backend, no global state


def _styled(draw):
    """Run draw() under matplotlib's defaults plus STYLE, whatever the user's matplotlibrc says."""
    def wrapped(*args, **kwargs):
        with matplotlib.rc_context():
            matplotlib.rcdefaults()
            matplotlib.rcParams.update(STYLE)
            return draw(*args, **kwargs)
    return wrapped


def _save(fig, path):
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fileio.atomic_write(path, lambda f: f.write(buf.getvalue()))


def _band(runs):
    """Per epoch: mean, min and max test accuracy over the runs."""
    by_epoch = list(zip(*[[acc for _, acc, _ in r["curve"]] for r in runs]))
    epochs = [e for e, _, _ in runs[0]["curve"]]
    return (epochs, [statistics.mean(v) for v in by_epoch], [min(v) for v in by_epoch],
            [max(v) for v in by_epoch])


@_styled
def plot_curves(name, runs, path):
    """Our per-epoch test accuracy (mean line, min-max band over seeds) with the seed's own log on top:
    all epochs at full scale on the left, the top of the range (>= TARGET) zoomed on the right."""
    doc = models.RECIPES[name]["documented"]
    curve = doc["test_acc_by_epoch"]
    epochs, mean, lo, hi = _band(runs)
    n = len(runs)
    fig = _figure(9.6, 4.3)
    grid = fig.add_gridspec(1, 2, width_ratios=[1, 2.1], wspace=0.16, left=0.065, right=0.985, top=0.78,
                            bottom=0.12)
    full, zoom = fig.add_subplot(grid[0]), fig.add_subplot(grid[1])
    doc_y = [math.nan if a is None else a for a in curve]
    missing = [e for e, a in enumerate(curve, 1) if a is None]
    doc_label = f"seed {doc['source'][:3]}'s own log, best {doc['best_test_acc']:.2f}% (epoch {doc['best_epoch']})"
    if missing:
        doc_label += f"; epochs {', '.join(map(str, missing))} not logged"
    ours_label = f"ours: mean of {n} seeds ({seed_list(runs)})" if n > 1 else f"ours: seed {runs[0]['seed']}"
    for ax in (full, zoom):
        if n > 1:
            ax.fill_between(epochs, lo, hi, color=OURS, alpha=0.18, linewidth=0, label="ours: min-max over seeds")
        ax.plot(epochs, mean, color=OURS, marker="o", markersize=3, label=ours_label)
        ax.plot(range(1, len(curve) + 1), doc_y, color=DOC, marker="s", markersize=3.5, linestyle="--",
                linewidth=1.3, label=doc_label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
    every = [a for a in lo + curve if a is not None]
    full.set_xlim(0.5, len(epochs) + 0.5)
    full.set_ylim(math.floor(min(every)) - 0.5, 100.2)
    full.axhspan(TARGET, 100.2, color="0.5", alpha=0.1, linewidth=0)
    full.set_ylabel("test accuracy (%), 10,000 images")
    full.set_title("all epochs (shaded: the zoomed range)", loc="left")
    top = max(a for a in hi + curve if a is not None)
    # the zoom starts one epoch before anything reaches TARGET, so its left edge shows the climb
    first = min(e for e, h, d in zip(epochs, hi, curve + [None] * len(epochs)) if h >= TARGET or (d or 0) >= TARGET)
    zoom.set_xlim(max(0.5, first - 1.5), len(epochs) + 0.5)
    zoom.set_ylim(TARGET - 0.02, math.ceil((top + 0.06) * 10) / 10)
    zoom.yaxis.set_major_formatter(FormatStrFormatter("%.1f"))
    zoom.set_title(f"zoom: {TARGET:.1f}% and above", loc="left")
    bests = [r["best_test_acc"] for r in runs]
    fig.suptitle(f"{name}: per-epoch test accuracy, ours against the seed's own log.   Our best: "
                 f"{mean_std(bests, title=True)}", x=0.065, ha="left", y=0.975)
    handles, labels = zoom.get_legend_handles_labels()
    order = [labels.index(ours_label), labels.index(doc_label)] + \
        ([labels.index("ours: min-max over seeds")] if n > 1 else [])
    fig.legend([handles[i] for i in order], [labels[i] for i in order], loc="upper left",
               bbox_to_anchor=(0.058, 0.925), ncol=2, fontsize=8, handlelength=2.2, columnspacing=1.5)
    _save(fig, path)


@_styled
def plot_one_epoch(name, runs, train_acc, path):
    """conv4_fc: one epoch, no per-epoch log. Our test-set accuracy after it per seed, and seed 1's
    training-set accuracy, beside the seed's one figure, which it measured on the training set."""
    doc = models.RECIPES[name]["documented"]
    fig = _figure(9.6, 4.3)
    ax = fig.add_axes([0.075, 0.13, 0.58, 0.70])
    test = [r["final_test_acc"] for r in runs]
    xs = [(i - (len(test) - 1) / 2) * 0.07 for i in range(len(test))]
    ax.scatter(xs, test, color=OURS, s=24, zorder=3,
               label=f"ours, test set: seed{'s' if len(runs) > 1 else ''} {seed_list(runs)}")
    if len(test) > 1:
        ax.hlines(statistics.mean(test), -0.2, 0.2, color=OURS, linewidth=2, label=f"ours: mean of {len(test)} seeds")
    ax.annotate(f"{statistics.mean(test):.2f}%", (0.24, statistics.mean(test)), va="center", fontsize=8, color=OURS)
    values = [doc["best_test_acc"]] + test
    if train_acc is not None:
        values.append(train_acc)
        ax.scatter([1], [train_acc], color=OURS, marker="D", s=26, zorder=3, label="ours, training set: seed 1")
        ax.annotate(f"{train_acc:.2f}%", (1.08, train_acc), va="center", fontsize=8, color=OURS)
    ax.scatter([1], [doc["best_test_acc"]], marker="s", color=DOC, s=30, zorder=3,
               label=f"seed {doc['source'][:3]}'s figure, which it called its test set")
    ax.annotate(f"{doc['best_test_acc']:.2f}%", (1.08, doc["best_test_acc"]), va="center", fontsize=8, color=DOC)
    ax.set_xticks([0, 1], ["test set\n(10,000 images)", "training set, no augmentation\n(60,000 images)"])
    ax.set_xlim(-0.5, 1.5)
    ax.set_ylim(math.floor(min(values) - 0.5), math.ceil(max(values) + 0.5))
    ax.set_ylabel("accuracy after epoch 1 (%)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.03, 1.0))
    fig.text(0.685, 0.52, "One epoch, so no curve: the seed logs no\nper-epoch test accuracy. Its one figure\n"
             "counts 57,124 of 60,000 images, so it was\nmeasured on the training set: compare it\nthere.",
             fontsize=8, va="top", color="0.25")
    fig.suptitle(f"{name}: accuracy after its one documented epoch, ours against the seed's one figure",
                 x=0.075, ha="left", y=0.975)
    _save(fig, path)


def _split(values, gap=1.0):
    """Index at which sorted(values) has its one big jump (> gap points), for a broken y axis; else None."""
    v = sorted(values)
    jumps = [(v[i + 1] - v[i], i + 1) for i in range(len(v) - 1)]
    big = max(jumps, default=(0, None))
    return v[big[1] - 1] if big[0] > gap else None


# the trade-off chart's three columns: x label, x of a row (None: not measured), its (min, max) span or None
TRADEOFF_COLUMNS = [
    ("parameters (thousands)", lambda r: r["params"] / 1000, None),
    (f"ONNX Runtime batch-1 p50 latency (ms)\nCPU, 1 thread ({BENCH})", lambda r: r["latency_ms"], None),
    ("training seconds per epoch\n(these runs, CPU)", lambda r: statistics.mean(r["s_epoch"]),
     lambda r: (min(r["s_epoch"]), max(r["s_epoch"]))),
]


@_styled
def plot_tradeoff(rows, latency_source, seconds_source, path):
    """Best test accuracy (mean, min-max over seeds) against parameters, ONNX Runtime batch-1 latency
    and CPU training seconds per epoch, one panel each. rows: dicts name, params, bests, latency_ms
    (or None), s_epoch (per seed). The y axis is broken when one recipe sits far below the rest:
    then a second, lower row of panels holds it."""
    means = [statistics.mean(r["bests"]) for r in rows]
    cut = _split(means)
    parts = [[r for r, m in zip(rows, means) if cut is None or m > cut]]
    if cut is not None:
        parts.append([r for r, m in zip(rows, means) if m <= cut])
    fig = _figure(10.5, 5.0 if cut is not None else 4.5)
    grid = fig.add_gridspec(len(parts), 3, height_ratios=[3.2, 1][:len(parts)], hspace=0.1, wspace=0.1,
                            left=0.075, right=0.985, top=0.83, bottom=0.23 if cut is not None else 0.21)
    axes = [[fig.add_subplot(grid[i, j]) for j in range(3)] for i in range(len(parts))]
    handles = {}
    for i, part in enumerate(parts):
        for j, (xlabel, xof, xspan) in enumerate(TRADEOFF_COLUMNS):
            _tradeoff_points(axes[i][j], part, xof, xspan, handles, names=j == 0)
            _tradeoff_axis(axes[i][j], part, xlabel, left=j == 0, top=i == 0, bottom=i == len(parts) - 1)
    _tradeoff_xlims(axes, rows)
    axes[0][0].set_ylabel("best test accuracy (%)")
    if cut is not None:
        axes[-1][0].set_ylabel("(axis broken)", fontsize=8, color="0.4")
    _tradeoff_text(fig, rows, handles, latency_source, seconds_source)
    _save(fig, path)


def _tradeoff_points(ax, part, xof, xspan, handles, names):
    """One panel's points: per recipe its mean accuracy with the seeds' min-max, at x (with its span);
    the first errorbar of each recipe goes into `handles` for the legend; names: label the points."""
    for r in part:
        x = xof(r)
        if x is None:
            continue
        m = statistics.mean(r["bests"])
        xerr = None
        if xspan:
            a, b = xspan(r)
            xerr = [[x - a], [b - x]]
        color, marker = RECIPE_STYLE.get(r["name"], ("k", "o"))
        h = ax.errorbar([x], [m], yerr=[[m - min(r["bests"])], [max(r["bests"]) - m]], xerr=xerr,
                        fmt=marker, color=color, markersize=6.5, capsize=3, elinewidth=1.1)
        handles.setdefault(r["name"], h)
        if names:
            ax.annotate(r["name"], (x, m), xytext=(7, 3), textcoords="offset points", fontsize=8, color=color)


def _tradeoff_axis(ax, part, xlabel, left, top, bottom):
    """One panel's y range and ticks for the recipes in it; y labels on the left column only, the x label
    on the bottom row only, dashed spines where the y axis is broken."""
    lows = [min(r["bests"]) for r in part]
    highs = [max(r["bests"]) for r in part]
    pad = max(0.08, (max(highs) - min(lows)) * 0.15)
    ax.set_ylim(min(lows) - pad, max(highs) + pad)
    ax.yaxis.set_major_locator(MaxNLocator(nbins=6 if top else 2, steps=[1, 2, 5, 10]))
    step = ax.yaxis.get_major_locator().tick_values(*ax.get_ylim())
    decimals = max(1, math.ceil(-math.log10(step[1] - step[0]) - 1e-9))   # 0.05 steps: 2 decimals
    ax.yaxis.set_major_formatter(FormatStrFormatter(f"%.{decimals}f"))
    if not left:
        ax.tick_params(labelleft=False)
    if not bottom:
        ax.tick_params(labelbottom=False, bottom=False)
        ax.spines["bottom"].set_linestyle((0, (4, 3)))
        ax.spines["bottom"].set_color("0.6")
    else:
        ax.set_xlabel(xlabel)
    if not top:
        ax.spines["top"].set_visible(True)
        ax.spines["top"].set_linestyle((0, (4, 3)))
        ax.spines["top"].set_color("0.6")


def _tradeoff_xlims(axes, rows):
    """One x range per column, the same across the broken axis; 'not measured' where a column has nothing."""
    for j, (_, xof, xspan) in enumerate(TRADEOFF_COLUMNS):
        xs = [xof(r) for r in rows if xof(r) is not None]
        if xspan:
            xs += [v for r in rows for v in xspan(r)]
        if not xs:
            for row in axes:
                row[j].text(0.5, 0.5, "not measured", transform=row[j].transAxes, ha="center", color="0.4")
            continue
        span = (max(xs) - min(xs)) or max(xs) or 1
        for row in axes:
            row[j].set_xlim(min(xs) - 0.12 * span, max(xs) + 0.25 * span)


def _tradeoff_text(fig, rows, handles, latency_source, seconds_source):
    """The legend, the title, what the accuracy is, and the sources of latency and training time."""
    names = [r["name"] for r in rows if r["name"] in handles]
    fig.legend([handles[n] for n in names], names, loc="upper left", bbox_to_anchor=(0.068, 0.91),
               ncol=len(names), handletextpad=0.3, columnspacing=1.6)
    n = sorted({len(r["bests"]) for r in rows})
    fig.suptitle("The recipes: best test accuracy against size, inference latency and training time",
                 x=0.075, ha="left", y=0.975)
    fig.text(0.075, 0.915, f"Accuracy: the best of each run over the documented epochs; mean and min-max over "
             f"{'/'.join(map(str, n))} seed{'s' if n != [1] else ''} per recipe.", fontsize=8, color="0.25",
             va="bottom")
    fig.text(0.075, 0.015, f"Latency: {latency_source or f'not available (no {BENCH})'}.\n"
             f"Training: {seconds_source}", fontsize=7.5, color="0.25", va="bottom")


# ---------------------------------------------------------------------------------------------
# The report

def hand_written(path=REPORT):
    """Everything from MARKER on in the current report, byte for byte (a stub if there is none)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError:
        text = ""
    at = text.find(MARKER)
    if at < 0:
        return MARKER + "\n\n## Analysis (hand-written)\n\nNone yet.\n"
    return text[at:]


def devices(all_runs):
    return ", ".join(sorted({r["device_name"] + (f" ({r['device']})" if r["device"] != "cpu" else "")
                             for r in all_runs}))


def settings(all_runs):
    """The training settings the runs recorded, e.g. 'fast pipeline, fp32, eager'."""
    out = set()
    for r in all_runs:
        flags = [f"{r.get('pipeline', '?')} pipeline", "bfloat16 autocast" if r.get("amp") else "fp32",
                 "torch.compile" if r.get("compile") else "eager"]
        flags += [f for f in ("channels_last", "fast_dropout") if r.get(f)]
        out.add(", ".join(flags))
    return " / ".join(sorted(out))


def time_table(results):
    lines = [f"| recipe | first epoch at >= {TARGET:.1f}%, per seed | training seconds to {TARGET:.1f}%, "
             "mean over seeds (min-max) | the seed's own log: first epoch at >= "
             f"{TARGET:.1f}% (registry) |",
             "|---|---|---|---|"]
    for name, runs in results.items():
        hits = [time_to(r) for r in runs]
        per_seed = ", ".join(str(h[0]) if h else "never" for h in hits)
        secs = [h[1] for h in hits if h]
        if not secs:
            cell = "never"
        else:
            cell = f"{statistics.mean(secs):.1f}" + (f" ({min(secs):.1f}-{max(secs):.1f})" if len(secs) > 1 else "")
            if len(secs) < len(hits):
                cell += f"; {len(hits) - len(secs)} of {len(hits)} seeds never"
        doc = models.RECIPES[name]["documented"]
        doc_epoch, unlogged = documented_epoch_to(doc["test_acc_by_epoch"])
        doc_cell = "no per-epoch log" if doc_epoch is None else str(doc_epoch)
        if unlogged:
            doc_cell += f" (epochs {', '.join(map(str, unlogged))} not logged)"
        if isinstance(doc_epoch, int) and doc["seconds_per_epoch"]:
            doc_cell += (f"; about {doc_epoch * doc['seconds_per_epoch']:.0f} s at the seed's stated "
                         f"{doc['seconds_per_epoch']:g} s/epoch")
        lines.append(f"| {name} | {per_seed} | {cell} | {doc_cell} |")
    return lines


def registry_notes(results):
    lines = []
    for name in results:
        doc = models.RECIPES[name]["documented"]
        curve = doc["test_acc_by_epoch"]
        if curve is None:
            logged = "publishes no per-epoch test accuracy"
        else:
            have = sum(a is not None for a in curve)
            logged = f"logs test accuracy for {have} of its {len(curve)} epochs"
        recon = models.RECIPES[name]["reconstructed"]
        lines.append(f"- **{name}** (seed `{doc['source']}`): {doc['notes']}; the seed {logged}. "
                     f"Our reconstruction, not the seed's: {'; '.join(recon)}.")
    return lines


def threads(runs):
    """What the runs' summary.json say of torch's CPU thread count (recorded since af6a5c3)."""
    counts = sorted({r["threads"] for r in runs if isinstance(r.get("threads"), int)})
    unknown = sum(not isinstance(r.get("threads"), int) for r in runs)
    said = f"torch CPU threads: {', '.join(map(str, counts))}" if counts else ""
    if unknown:
        said += ("; " if said else "") + f"{unknown} run(s) from before threads were recorded"
    return (said[0].upper() + said[1:] + ".") if said else ""


def honest_text(results, paired_line):
    """The generated paragraph on what is and is not distinguishable."""
    means = [statistics.mean(r["best_test_acc"] for r in runs) for runs in results.values()]
    typical = max(means)
    lo, hi = stats.ci95(round(typical * 100), 10000)
    outside = [n for n, runs in results.items()
               if (ci := stats.mean_ci95([r["best_test_acc"] for r in runs])) is not None
               and not ci[0] <= models.RECIPES[n]["documented"]["best_test_acc"] <= ci[1] and n != TRAIN_SET_FIGURE]
    single = [n for n, runs in results.items() if len(runs) < 2]
    text = [f"One checkpoint's accuracy near {typical:.2f}% on 10,000 test images has a 95% Wilson interval of "
            f"{lo:.2f}-{hi:.2f}% (about +-{(hi - lo) / 2:.2f} pp): single-run gaps smaller than that say little. "
            "The seeds' figure is the highest test accuracy over the epochs, chosen on the test set itself, so it "
            "is biased upwards; the validation column is the honest one. The t interval is over the seed means "
            "(n - 1 degrees of freedom), so with 3 seeds it is wide: a documented figure outside it is a real "
            "difference of recipe or setup, one inside it is not shown to differ. "
            + (f"Documented figures outside our interval: {', '.join(outside)}. " if outside else
               "Every documented figure with an interval lies inside ours. " if len(single) < len(results) else "")
            + (f"One seed only, no interval: {', '.join(single)}." if single else "")]
    if paired_line:
        text += ["", paired_line]
    return text


def write_report(results, extra, latency_source, path=REPORT, honest=()):
    """REPRODUCTION.md: measured figures and registry notes, then the hand-written part kept as is."""
    all_runs = [r for runs in results.values() for r in runs]
    commits = sorted({r.get("git_commit") or "unknown" for r in all_runs})
    torches = sorted({r.get("torch", "?") for r in all_runs})
    wall = sum(r["wall_seconds"] for r in all_runs) / 60
    lines = ["# Reproduction of the five documented recipes", "",
             "Generated by reproduce.py from the finished runs in `runs/reproduce/` and the registry in "
             "models.py (`make reproduce` trains what is missing first; `make figures` = "
             "`python reproduce.py --no-train` only re-reads the runs). Each run trains the recipe's documented "
             "epochs and evaluates the full 10,000-image test set after every epoch; 'best' is the highest of "
             "those, as the seeds report it.", "",
             f"Runs: {len(all_runs)} ({', '.join(f'{n} x{len(rs)}' for n, rs in results.items())}); device: "
             f"{devices(all_runs)}; {settings(all_runs)}; torch {', '.join(torches)}; code at commit "
             f"{', '.join(commits)}; "
             f"{wall:.1f} min of wall time in all (training and per-epoch evaluation). {threads(all_runs)} "
             "Machine load is not recorded in a run.", "",
             "| recipe | params | documented best (epoch) | reproduced best (epoch), seed 1 | final, seed 1 "
             "| best, mean +- std over seeds | gap to documented | s/epoch |",
             "|---|---|---|---|---|---|---|---|"]
    for name, runs in results.items():
        doc = models.RECIPES[name]["documented"]
        first = runs[0]
        bests = [r["best_test_acc"] for r in runs]
        gap = statistics.mean(bests) - doc["best_test_acc"]
        secs = statistics.mean(seconds_per_epoch(r) for r in runs)
        lines.append(f"| {name} | {first['params']:,} | {doc['best_test_acc']:.2f}% ({doc['best_epoch']}) | "
                     f"{first['best_test_acc']:.2f}% ({first['best_epoch']}) | {first['final_test_acc']:.2f}% | "
                     f"{mean_std(bests)} | {gap:+.2f} pp | {secs:.1f} |")
    lines += ["", "Seeds in the mean: " + "; ".join(f"{n} {seed_list(rs)}" for n, rs in results.items()) + "."]
    lines += ["", *extra]
    lines += ["", "## How sure are these numbers?", "", *honest_table(results), "", *honest]
    lines += ["", f"## Time to {TARGET:.1f}% test accuracy", "",
              f"Per run, the training seconds (metrics.csv's `seconds`: training only, the per-epoch test pass "
              f"excluded) summed up to and including the first epoch whose test accuracy reaches {TARGET:.1f}%; "
              f"the mean is over the seeds that reach it. Device: {devices(all_runs)}, {settings(all_runs)}. "
              "A run does not record how loaded the machine was: see the conditions of these runs in the "
              "hand-written analysis below before comparing seconds.", "",
              *time_table(results)]
    lines += ["", "## Figures", "",
              "Per recipe: our per-epoch test accuracy over seeds (mean line, min-max band) with the seed's own "
              "per-epoch log on top; left all epochs, right the top of the range zoomed.", ""]
    lines += [f"![{name}]({FIGURES}/curves-{name}.png)" for name in results]
    lines += ["", f"![trade-off]({FIGURES}/tradeoff.png)", "",
              f"Trade-off chart: latency from {latency_source or f'nowhere (no {BENCH})'}; "
              "training seconds per epoch from these runs' metrics.csv.", ""]
    lines += ["## Notes from the registry", "", *registry_notes(results), "", hand_written(path).rstrip("\n")]
    fileio.save_text("\n".join(lines) + "\n", path)


def make_figures(results, train_accs):
    latency, source = bench_latency()
    rows = []
    for name, runs in results.items():
        out = os.path.join(FIGURES, f"curves-{name}.png")
        if models.RECIPES[name]["documented"]["test_acc_by_epoch"] is None:
            plot_one_epoch(name, runs, train_accs.get(name), out)
        else:
            plot_curves(name, runs, out)
        rows.append(dict(name=name, params=runs[0]["params"], bests=[r["best_test_acc"] for r in runs],
                         latency_ms=latency.get(name), s_epoch=[seconds_per_epoch(r) for r in runs]))
    all_runs = [r for runs in results.values() for r in runs]
    seconds_source = (f"mean of metrics.csv's training seconds over each run's epochs, on {devices(all_runs)}, "
                      f"{settings(all_runs)}; error bars: min-max over seeds. Conditions: REPRODUCTION.md.")
    plot_tradeoff(rows, source, seconds_source, os.path.join(FIGURES, "tradeoff.png"))
    return source


# ---------------------------------------------------------------------------------------------
# What to train: recipes x grid x seeds, as train.py argument lists (sweep.py runs them as jobs)

RESERVED = {"model", "seed", "device", "data_dir", "out", "resume", "no_progress", "help"}  # set per run here
SWITCH = {"on": True, "true": True, "yes": True, "1": True, "off": False, "false": False, "no": False, "0": False}


def grid_flags():
    """train.py's flags a grid may vary, {dest: its argparse action}: everything but what reproduce.py
    sets for each run itself."""
    return {a.dest: a for a in train.parser()._actions if a.option_strings and a.dest not in RESERVED}


def grid_value(flag, action, text):
    if action.nargs == 0:  # a switch such as --amp: on or off
        if text.lower() not in SWITCH:
            raise errors.UserError(f"--set {flag}: '{text}' is not on or off")
        return SWITCH[text.lower()]
    try:
        value = (action.type or str)(text)
    except ValueError:
        raise errors.UserError(f"--set {flag}: '{text}' is not {'an integer' if action.type is int else 'a number'}") \
            from None
    if action.choices and value not in action.choices:
        raise errors.UserError(f"--set {flag}: '{text}' is not one of {', '.join(action.choices)}")
    return value


def parse_grid(lrs, sets):
    """{dest: [values]} (sorted by flag) from --lr V ... and --set KEY=V1,V2 (KEY: a train.py flag)."""
    flags, grid = grid_flags(), {}
    for item in ([f"lr={','.join(lrs)}"] if lrs else []) + (sets or []):
        key, eq, values = item.partition("=")
        dest = key.strip().lstrip("-").replace("-", "_")
        if not eq or not values.strip(","):
            raise errors.UserError(f"--set takes KEY=V1,V2,... (a train.py flag and its values), got '{item}'")
        if dest not in flags:
            raise errors.UserError(f"--set {key}: not a train.py flag a sweep can vary; choose from "
                                   f"{', '.join(sorted(d.replace('_', '-') for d in flags))}")
        if dest in grid:
            raise errors.UserError(f"--set {key} is given twice (--lr is --set lr=...)")
        grid[dest] = [grid_value(key, flags[dest], v.strip()) for v in values.split(",") if v.strip()]
    return dict(sorted(grid.items()))


def shown(value):
    return ("on" if value else "off") if isinstance(value, bool) else str(value)


def plan(args, seeds, grid, threads, absolute=False):
    """Every run the command asks for, in order, as sweep.Task (label, folder, train.py's argv) with
    `summary` set where it already finished. A run stopped part-way is resumed (--resume); each new
    run's argv is checked by train.py's own rules before anything starts."""
    flags, tasks = grid_flags(), []
    where = os.path.abspath if absolute else (lambda p: p)  # jobs get whole paths
    common_argv = ["--device", args.device, "--no-progress"] + (["--data-dir", where(args.data_dir)]
                                                                 if args.data_dir else [])
    new_argv = ["--threads", str(threads)]  # part of a CPU run's numbers: every new run records it
    for name in args.models:
        for point in itertools.product(*grid.values()):
            setting = dict(zip(grid, point))
            tag = "".join(f"-{d.replace('_', '-')}{shown(v)}" for d, v in setting.items())
            for seed in range(1, seeds + 1):
                out = run_dir(name + tag, seed)
                label = " ".join([f"{name} seed {seed}"] + [f"{d.replace('_', '-')}={shown(v)}"
                                                            for d, v in setting.items()])
                if os.path.isfile(os.path.join(out, "last.pt")):  # a run stopped part-way goes on
                    argv = ["--resume", where(out)] + common_argv
                else:
                    argv = ["--model", name, "--seed", str(seed), "--out", where(out)] + common_argv
                    argv += [] if "val" in setting else ["--val", str(args.val)]
                    argv += [] if "threads" in setting else new_argv
                    for d, v in setting.items():
                        opt = flags[d].option_strings[0]
                        argv += ([opt] if v else []) if flags[d].nargs == 0 else [opt, str(v)]
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


def train_all(args, tasks, options):
    """Train `tasks` (the unfinished ones) inline, one after another as before, or as jobs; a job that
    fails is listed at the end, one line each, after the others have run."""
    if args.executor == "inline":
        for t in tasks:
            train.run(train.parse_args(t.argv))
        return
    log_dir = os.path.join(RUNS, "jobs")
    os.makedirs(log_dir, exist_ok=True)
    if args.executor == "local":
        sweep.run_local(tasks, log_dir, **options)
    else:
        sweep.run_slurm(tasks, log_dir, **options)
    failed = [t for t in tasks if t.failure]
    for t in failed:
        print("failed: " + t.failure, file=sys.stderr)
    if failed:
        raise errors.UserError(f"{len(failed)} of {len(tasks)} runs failed (listed above); the others are kept: run "
                               "the same command again to retry the failed runs and resume the unfinished ones")


def grid_table(tasks):
    """A grid's outcome, one line per run: its best test accuracy (and the one chosen on validation)."""
    for t in tasks:
        s = fileio.read_json_dict(os.path.join(t.out, "summary.json"))
        chosen = (f", chosen on validation {s['val_chosen_test_acc']:.2f}% (epoch {s['val_chosen_epoch']})"
                  if errors.is_number(s.get("val_chosen_test_acc")) else "")
        print(f"{t.label}: best test accuracy {s['best_test_acc']:.2f}% (epoch {s['best_epoch']}){chosen}; {t.out}")


def main(argv=None):
    p = argparse.ArgumentParser(
        description="Reproduce the recipes: train every seed not yet finished in runs/reproduce/, then write "
                    "REPRODUCTION.md, figures/ and pretrained/ from the finished runs.")
    p.add_argument("--models", nargs="+", default=list(models.RECIPES), metavar="NAME",
                   help=f"recipes to run and report (default: all five: {' '.join(models.RECIPES)})")
    p.add_argument("--seeds", type=int, metavar="N",
                   help="train seeds 1..N of each recipe (default: 3 on a CUDA GPU, else 1); further seeds "
                        "already finished on disk count in the report as well")
    p.add_argument("--device", default="auto",
                   help="auto, cpu, cuda or mps: where to train and to score conv4_fc on the training set "
                        "(default: auto = CUDA, then MPS, then CPU)")
    p.add_argument("--data-dir", metavar="DIR",
                   help="MNIST folder (default: $MNIST_DIR, else ./data); --no-train needs it for conv4_fc's "
                        "training-set score and the McNemar test between the two best shipped checkpoints")
    p.add_argument("--val", type=int, default=5000, metavar="N",
                   help="training images each new run holds out to choose its best.pt on (train.py --val; default "
                        "5000; 0 trains on all 60,000 and chooses by test accuracy, as the seeds did)")
    p.add_argument("--no-train", action="store_true",
                   help="train nothing: rebuild REPRODUCTION.md, figures/ and pretrained/ from the runs "
                        "finished in runs/reproduce/, skipping unfinished ones (seconds; default: off)")
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
    args = p.parse_args(argv)
    with errors.one_line_errors("interrupted: finished runs are kept, running jobs cancelled; run the same command "
                                "again to go on"):
        for name in args.models:
            models.get_recipe(name)
        if args.no_train and (args.seeds or args.lr or args.set or args.executor != "inline"):
            raise errors.UserError("--seeds, --lr, --set and --executor say what to train; with --no-train nothing "
                                   "is trained")
        errors.check_at_least(args, 1, "seeds")
        grid = parse_grid(args.lr, args.set)
        if args.executor == "slurm" and args.device not in ("auto", "cpu", "cuda"):
            raise errors.UserError(f"--executor slurm trains on auto, cpu or cuda, not '{args.device}'")
        # with Slurm the jobs find their own device; this process only writes the report, on the CPU
        device = machine.get_device("cpu" if args.executor == "slurm" else args.device)
        options = executor_options(args, device)
        gpu_jobs = device.type == "cuda" or (args.executor == "slurm" and args.slurm_gpus != 0)
        seeds = args.seeds or (3 if gpu_jobs else 1)
        t0 = time.time()
        if not args.no_train:
            threads = options.get("threads") or options.get("cpus") or torch.get_num_threads()
            plan(args, seeds, grid, threads)  # every run's arguments checked before runs/ is touched
            fileio.lock(RUNS, ".sweep.lock", "another reproduce.py that trains into it; wait for it to end or stop it (Ctrl-C) first")  # held to the end
            tasks = plan(args, seeds, grid, threads, absolute=args.executor != "inline")  # on disk, now locked
            todo = [t for t in tasks if t.summary is None]
            if args.executor != "inline":
                print(f"{len(tasks)} runs: {len(tasks) - len(todo)} finished already (skipped), {len(todo)} to train "
                      f"with --executor {args.executor}; job logs in {os.path.join(RUNS, 'jobs')}/", flush=True)
            train_all(args, todo, options)
            if grid:
                grid_table(tasks)
                return
        results, skipped = {}, []
        for name in args.models:
            runs = collect(name)
            if runs and runs[0]["seed"] == 1:
                results[name] = runs
            else:
                skipped.append(name)
        if not results:
            raise errors.UserError(f"no finished seed-1 run in {RUNS}/ for {', '.join(args.models)}; "
                                   f"run reproduce.py without --no-train first")
        for name in results:
            publish_pretrained(name, 1)
        extra, train_accs = [], {}
        if TRAIN_SET_FIGURE in results:  # one pass over 60,000 images (seconds), for seed 1 only
            tr = train_set_accuracy(os.path.join(run_dir(TRAIN_SET_FIGURE, 1), "best.pt"), args.data_dir, device)
            train_accs[TRAIN_SET_FIGURE] = tr
            te = results[TRAIN_SET_FIGURE][0]["final_test_acc"]
            doc = models.RECIPES[TRAIN_SET_FIGURE]["documented"]["best_test_acc"]
            extra.append(f"conv4_fc after its one epoch (seed 1): {tr:.2f}% on the 60,000 training images "
                         f"(what the seed measured: {doc:.2f}%), {te:.2f}% on the 10,000 test images.")
        if skipped:
            extra.append(f"Not in this report (no finished seed-1 run): {', '.join(skipped)}.")
        source = make_figures(results, train_accs)
        honest = honest_text(results, paired_shipped(results, args.data_dir, device))
        write_report(results, extra, source, honest=honest)
        print(open(REPORT).read())
        print(f"wrote {REPORT}, {FIGURES}/ and pretrained/ in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
