"""Every figure the project draws, as PNG bytes: the reproduction's curves and trade-off chart
(report.py) and evaluate.py's confusion matrix, most confident mistakes and training curves.

One style for all: matplotlib's defaults plus STYLE whatever the user's matplotlibrc says, fixed sizes
and resolution, no pyplot (no GUI backend, no global state) and no version or date in the file, so
the same figures give the same bytes. Text that comes from a file goes through plain() first, so
matplotlib shows it as it is instead of reading it as mathtext.
"""
import io
import math
import statistics

import matplotlib
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter, MaxNLocator

import models
from errors import printable

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
TARGET = 99.0  # the zoomed range of the curves starts here (report.TARGET)


def plain(text):
    """Text from a file as matplotlib should show it: printable, every $ literal (no mathtext)."""
    return printable(text).replace("$", r"\$")


def styled(draw):
    """draw(...) -> PNG bytes of the Figure it returns, drawn under matplotlib's defaults plus STYLE."""
    def wrapped(*args, **kwargs):
        with matplotlib.rc_context():
            matplotlib.rcdefaults()
            matplotlib.rcParams.update(STYLE)
            fig = draw(*args, **kwargs)
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
        return buf.getvalue()
    wrapped.__doc__ = draw.__doc__
    return wrapped


def seed_list(runs):
    return ", ".join(str(r["seed"]) for r in runs)


def mean_std_title(values):
    """'99.50 ± 0.06% (mean ± std), 3 seeds', or '99.50%, 1 seed'."""
    mean = statistics.mean(values)
    if len(values) == 1:
        return f"{mean:.2f}%, 1 seed"
    return f"{mean:.2f} ± {statistics.stdev(values):.2f}% (mean ± std), {len(values)} seeds"


# ------------------------------------------------------------------------- the reproduction

def _band(runs):
    """Per epoch: mean, min and max test accuracy over the runs."""
    by_epoch = list(zip(*[[row["test_acc"] for row in r["rows"]] for r in runs]))
    epochs = [row["epoch"] for row in runs[0]["rows"]]
    return (epochs, [statistics.mean(v) for v in by_epoch], [min(v) for v in by_epoch],
            [max(v) for v in by_epoch])


@styled
def recipe_curves(name, runs):
    """Our per-epoch test accuracy (mean line, min-max band over seeds) with the source's own log on top:
    all epochs at full scale on the left, the top of the range (>= TARGET) zoomed on the right."""
    doc = models.RECIPES[name]["documented"]
    curve = doc["test_acc_by_epoch"]
    epochs, mean, lo, hi = _band(runs)
    n = len(runs)
    fig = Figure(figsize=(9.6, 4.3), dpi=DPI)
    grid = fig.add_gridspec(1, 2, width_ratios=[1, 2.1], wspace=0.16, left=0.065, right=0.985, top=0.78,
                            bottom=0.12)
    full, zoom = fig.add_subplot(grid[0]), fig.add_subplot(grid[1])
    doc_y = [math.nan if a is None else a for a in curve]
    missing = [e for e, a in enumerate(curve, 1) if a is None]
    doc_label = f"source {doc['source'][:3]}'s own log, best {doc['best_test_acc']:.2f}% (epoch {doc['best_epoch']})"
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
    reach = [e for e, h, d in zip(epochs, hi, curve + [None] * len(epochs)) if h >= TARGET or (d or 0) >= TARGET]
    zoom.set_xlim(max(0.5, min(reach, default=len(epochs)) - 1.5), len(epochs) + 0.5)
    zoom.set_ylim(TARGET - 0.02, max(TARGET + 0.1, math.ceil((top + 0.06) * 10) / 10))
    zoom.yaxis.set_major_formatter(FormatStrFormatter("%.1f"))
    zoom.set_title(f"zoom: {TARGET:.1f}% and above", loc="left")
    fig.suptitle(f"{name}: per-epoch test accuracy, ours against the source's own log.   Our best: "
                 f"{mean_std_title([r['best_test_acc'] for r in runs])}", x=0.065, ha="left", y=0.975)
    handles, labels = zoom.get_legend_handles_labels()
    order = [labels.index(ours_label), labels.index(doc_label)] + \
        ([labels.index("ours: min-max over seeds")] if n > 1 else [])
    fig.legend([handles[i] for i in order], [labels[i] for i in order], loc="upper left",
               bbox_to_anchor=(0.058, 0.925), ncol=2, fontsize=8, handlelength=2.2, columnspacing=1.5)
    return fig


@styled
def one_epoch(name, runs, train_acc):
    """conv4_fc: one epoch, no per-epoch log. Our test-set accuracy after it per seed, and seed 1's
    training-set accuracy, beside the source's one figure, which it measured on the training set."""
    doc = models.RECIPES[name]["documented"]
    fig = Figure(figsize=(9.6, 4.3), dpi=DPI)
    ax = fig.add_axes([0.075, 0.13, 0.58, 0.70])
    test = [r["final_test_acc"] for r in runs]
    xs = [(i - (len(test) - 1) / 2) * 0.07 for i in range(len(test))]
    ax.scatter(xs, test, color=OURS, s=24, zorder=3,
               label=f"ours, test set: seed{'s' if len(runs) > 1 else ''} {seed_list(runs)}")
    if len(test) > 1:
        ax.hlines(statistics.mean(test), -0.2, 0.2, color=OURS, linewidth=2, label=f"ours: mean of {len(test)} seeds")
    ax.annotate(f"{statistics.mean(test):.2f}%", (0.24, statistics.mean(test)), va="center", fontsize=8, color=OURS)
    values = [doc["best_test_acc"], train_acc] + test
    ax.scatter([1], [train_acc], color=OURS, marker="D", s=26, zorder=3, label="ours, training set: seed 1")
    ax.annotate(f"{train_acc:.2f}%", (1.08, train_acc), va="center", fontsize=8, color=OURS)
    ax.scatter([1], [doc["best_test_acc"]], marker="s", color=DOC, s=30, zorder=3,
               label=f"source {doc['source'][:3]}'s figure, which it called its test set")
    ax.annotate(f"{doc['best_test_acc']:.2f}%", (1.08, doc["best_test_acc"]), va="center", fontsize=8, color=DOC)
    ax.set_xticks([0, 1], ["test set\n(10,000 images)", "training set, no augmentation\n(60,000 images)"])
    ax.set_xlim(-0.5, 1.5)
    ax.set_ylim(math.floor(min(values) - 0.5), math.ceil(max(values) + 0.5))
    ax.set_ylabel("accuracy after epoch 1 (%)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.03, 1.0))
    fig.text(0.685, 0.52, "One epoch, so no curve: the source logs no\nper-epoch test accuracy. Its one figure\n"
             "counts 57,124 of 60,000 images, so it was\nmeasured on the training set: compare it\nthere.",
             fontsize=8, va="top", color="0.25")
    fig.suptitle(f"{name}: accuracy after its one documented epoch, ours against the source's one figure",
                 x=0.075, ha="left", y=0.975)
    return fig


def _split(values, gap=1.0):
    """The value below which sorted(values) has its one big jump (> gap points), for a broken y axis; else None."""
    v = sorted(values)
    jumps = [(v[i + 1] - v[i], i + 1) for i in range(len(v) - 1)]
    big = max(jumps, default=(0, None))
    return v[big[1] - 1] if big[0] > gap else None


# the trade-off chart's three columns: x label and the x of a row (None: not measured)
TRADEOFF_COLUMNS = [
    ("parameters (thousands)", lambda r: r["params"] / 1000),
    ("ONNX Runtime batch-1 p50 latency (ms)\nCPU, 1 thread", lambda r: r["latency_ms"]),
    ("training seconds per epoch\n(CPU, fast pipeline, eager)", lambda r: r["s_epoch"]),
]


@styled
def tradeoff(rows, source):
    """Best test accuracy (mean, min-max over seeds) against parameters, ONNX Runtime batch-1 latency
    and CPU training seconds per epoch, one panel each; rows: dicts name, params, bests, latency_ms and
    s_epoch (None: not measured); source: the line naming the measurement of the last two. The y axis
    is broken when one recipe sits far below the rest: then a second, lower row of panels holds it."""
    means = [statistics.mean(r["bests"]) for r in rows]
    cut = _split(means)
    parts = [[r for r, m in zip(rows, means) if cut is None or m > cut]]
    if cut is not None:
        parts.append([r for r, m in zip(rows, means) if m <= cut])
    fig = Figure(figsize=(10.5, 5.0 if cut is not None else 4.5), dpi=DPI)
    grid = fig.add_gridspec(len(parts), 3, height_ratios=[3.2, 1][:len(parts)], hspace=0.1, wspace=0.1,
                            left=0.075, right=0.985, top=0.83, bottom=0.23 if cut is not None else 0.21)
    axes = [[fig.add_subplot(grid[i, j]) for j in range(3)] for i in range(len(parts))]
    handles = {}
    for i, part in enumerate(parts):
        for j, (xlabel, xof) in enumerate(TRADEOFF_COLUMNS):
            _tradeoff_points(axes[i][j], part, xof, handles, names=j == 0)
            _tradeoff_axis(axes[i][j], part, xlabel, left=j == 0, top=i == 0, bottom=i == len(parts) - 1)
    _tradeoff_xlims(axes, rows)
    axes[0][0].set_ylabel("best test accuracy (%)")
    if cut is not None:
        axes[-1][0].set_ylabel("(axis broken)", fontsize=8, color="0.4")
    names = [r["name"] for r in rows if r["name"] in handles]
    fig.legend([handles[n] for n in names], names, loc="upper left", bbox_to_anchor=(0.068, 0.91),
               ncol=len(names), handletextpad=0.3, columnspacing=1.6)
    n = sorted({len(r["bests"]) for r in rows})
    fig.suptitle("The recipes: best test accuracy against size, inference latency and training time",
                 x=0.075, ha="left", y=0.975)
    fig.text(0.075, 0.915, f"Accuracy: the best of each run over the documented epochs; mean and min-max over "
             f"{'/'.join(map(str, n))} seed{'s' if n != [1] else ''} per recipe.", fontsize=8, color="0.25",
             va="bottom")
    fig.text(0.075, 0.015, f"Latency and training time: {plain(source)}", fontsize=7.5, color="0.25", va="bottom")
    return fig


def _tradeoff_points(ax, part, xof, handles, names):
    """One panel's points: per recipe its mean accuracy with the seeds' min-max at x; the first errorbar of
    each recipe goes into `handles` for the legend; names: label the points."""
    for r in part:
        x = xof(r)
        if x is None:
            continue
        m = statistics.mean(r["bests"])
        color, marker = RECIPE_STYLE[r["name"]]
        h = ax.errorbar([x], [m], yerr=[[m - min(r["bests"])], [max(r["bests"]) - m]], fmt=marker, color=color,
                        markersize=6.5, capsize=3, elinewidth=1.1)
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
    for j, (_, xof) in enumerate(TRADEOFF_COLUMNS):
        xs = [xof(r) for r in rows if xof(r) is not None]
        if not xs:
            for row in axes:
                row[j].text(0.5, 0.5, "not measured", transform=row[j].transAxes, ha="center", color="0.4")
            continue
        span = (max(xs) - min(xs)) or max(xs) or 1
        for row in axes:
            row[j].set_xlim(min(xs) - 0.12 * span, max(xs) + 0.25 * span)


# ------------------------------------------------------------------------- evaluate.py's report

DIGITS = list(range(10))


@styled
def confusion(cm):
    """The 10 x 10 confusion matrix (numpy ints), log colour scale, each non-zero count written in."""
    fig = Figure(figsize=(6.4, 5.6), dpi=DPI)
    ax = fig.add_subplot()
    im = ax.imshow(cm, cmap="Blues", norm=LogNorm(vmin=1, vmax=max(cm.max(), 2)))
    for i in DIGITS:
        for j in DIGITS:
            if cm[i, j]:
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if cm[i, j] > cm.max() / 10 else "black")
    ax.set(xticks=DIGITS, yticks=DIGITS, xlabel="predicted", ylabel="true", title="Confusion matrix (test set)")
    ax.grid(False)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


@styled
def mistakes(images, labels, logp, n=24):
    """The n most confident mistakes: image, true label, predicted label, confidence."""
    conf, pred = logp.exp().max(1)
    wrong = (pred != labels).nonzero().flatten()
    order = wrong[conf[wrong].argsort(descending=True)][:n]
    cols = 8
    rows = max(1, (len(order) + cols - 1) // cols)
    fig = Figure(figsize=(cols * 1.35, rows * 1.75 + 0.4), dpi=DPI)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, order.tolist()):
        ax.imshow(images[i].numpy(), cmap="gray")
        ax.set_title(f"true {labels[i].item()} pred {pred[i].item()}\np={100 * conf[i].item():.1f}%", fontsize=8)
    fig.suptitle(f"Most confident mistakes ({len(wrong)} in all; p = the model's probability for its prediction)",
                 fontsize=10)
    fig.tight_layout()
    return fig


@styled
def run_curves(rows):
    """One run's loss and accuracy per epoch, training and test (metrics.csv rows from records.read_run)."""
    ep = [r["epoch"] for r in rows]
    fig = Figure(figsize=(10, 3.8), dpi=DPI)
    a, b = fig.subplots(1, 2)
    a.plot(ep, [r["train_loss"] for r in rows], "o-", label="train")
    a.plot(ep, [r["test_loss"] for r in rows], "o-", label="test")
    a.set(xlabel="epoch", ylabel="loss", title="Loss")
    b.plot(ep, [r["train_acc"] for r in rows], "o-", label="train")
    b.plot(ep, [r["test_acc"] for r in rows], "o-", label="test")
    b.set(xlabel="epoch", ylabel="accuracy (%)", title="Accuracy")
    for ax in (a, b):
        ax.legend()
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return fig
