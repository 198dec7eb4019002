"""What the docs pages generate instead of copying: each script's --help and the recipe table from
the registry. The pages call these inside cog blocks; `make docs` rewrites them and the test suite
checks that they are current (tests/test_docs.py)."""
import importlib
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
WIDTH = 100  # the --help text's width, whatever the terminal that regenerates it


class _Cog:
    """The `cog` module of the Cog run now processing a page (cogapp installs a new one per run; a
    module-level `import cog` would keep writing into the first run's)."""

    def __getattr__(self, name):
        return getattr(sys.modules["cog"], name)


cog = _Cog()


def help(script):
    """`python <script>.py --help`, as a text block."""
    parser = importlib.import_module(script).parser()
    parser.prog = f"{script}.py"
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(WIDTH + 2)  # argparse wraps at COLUMNS - 2
    try:
        text = parser.format_help()
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old
    cog.outl("```text")
    cog.out(text)
    cog.outl("```")


def _schedule(recipe):
    if recipe["schedule"] is None:
        return "none"
    name, kw, every = recipe["schedule"]
    shown = ", ".join(f"{k} {v}" for k, v in kw.items() if k in ("max_lr", "step_size", "gamma", "pct_start"))
    return f"{name} ({shown}), per {every}"


def _augment(aug):
    parts = [f"rotate +-{aug['rotate']}" if "rotate" in aug else "",
             f"shift +-{aug['translate']} px" if "translate" in aug else "",
             f"centre-crop {aug['crop']} p={aug['crop_p']}" if "crop" in aug else ""]
    return ", ".join(p for p in parts if p) or "none"


def recipes_table():
    """One row per recipe: what it trains with, its documented figure, and what we reconstructed."""
    import models
    cog.outl("| name | source | params | optimizer | schedule | augmentation | batch | epochs | documented best "
             "test accuracy | our reconstruction |")
    cog.outl("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in models.RECIPES.items():
        doc = r["documented"]
        opt, kw = r["optimizer"]
        opt_text = f"{opt} " + ", ".join(f"{k} {v}" for k, v in kw.items())
        cog.outl(f"| `{name}` | {doc['source'][:3]} | {models.n_params(models.build_model(name)):,} | {opt_text} | "
                 f"{_schedule(r)} | {_augment(r['augment'])} | {r['batch_size']} | {r['epochs']} | "
                 f"{doc['best_test_acc']:.2f}% (epoch {doc['best_epoch']}) | {'; '.join(r['reconstructed'])} |")
