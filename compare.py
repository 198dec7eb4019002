"""Compare two models on the same 10,000 MNIST test images: is one really better?

    python compare.py pretrained/bn_fc.pt pretrained/gap10k.pt
    python compare.py bn_gap exports/bn_gap.onnx --json     # a name: its latest best.pt, else pretrained/
    python compare.py runs/a/best.pt runs/b/best.pt --trust-code

Each of A and B is a checkpoint written by train.py, a file written by export.py (code-bearing
formats under the trust rule, as in evaluate.py), or a model name. Prints each accuracy with its 95%
Wilson interval, the 2x2 table of right and wrong answers on the same images, and the exact McNemar
test (the two-sided binomial test on the images exactly one of them gets wrong): two accuracies
0.1 pp apart can differ significantly or not at all, depending on how often they disagree.
"""
import argparse
import filecmp
import json
import os

import artifacts
import data
import models
from errors import UserError, one_line_errors, printable
from machine import get_device
from stats import ci95, ci_text, paired, verdict


def score(clf, images, labels):
    """Which test images `clf` gets right (bool tensor), and its summary figures."""
    logp = clf(images)
    if logp.shape != (len(labels), 10) or not bool(logp.isfinite().all()):
        raise UserError(f"{clf.source} gives NaN or infinite log-probabilities")
    right = logp.argmax(1) == labels
    correct = int(right.sum())
    return right, dict(source=clf.source, model=clf.model, kind=clf.kind, correct=correct, images=len(labels),
                       accuracy=round(100 * correct / len(labels), 2), ci95=ci95(correct, len(labels)))


def compare(a, b, images, labels):
    """The JSON object of compare.py --json for two Classifiers on the same images."""
    a_right, fa = score(a, images, labels)
    b_right, fb = score(b, images, labels)
    t = paired(a_right.tolist(), b_right.tolist())
    return dict(a=fa, b=fb, images=len(labels), **t, verdict=verdict(t))


def side(r, k):
    """One model's line: which file and model answered (as printable text), and its accuracy."""
    m = r[k]
    return (printable(f"{k.upper()}  {m['source']} ({m['model']}, {m['kind']})") +
            f": {m['correct']}/{r['images']} = {m['accuracy']:.2f}% ({ci_text(m['ci95'])})")


def text(r):
    rows = [side(r, "a"), side(r, "b"),
            "",
            f"{'':>10}{'B right':>10}{'B wrong':>10}",
            f"{'A right':>10}{r['both_right']:>10}{r['only_b_wrong']:>10}",
            f"{'A wrong':>10}{r['only_a_wrong']:>10}{r['both_wrong']:>10}",
            "",
            f"only A wrong: {r['only_a_wrong']}, only B wrong: {r['only_b_wrong']}: {r['verdict']}"]
    return "\n".join(rows)


def check_source(s):
    """Refuse, before anything loads, an argument that names a folder, or a word that names neither a
    file nor a model (the valid names listed). A model's name is its name even beside a folder of it."""
    if s in models.RECIPES and not os.path.isfile(s):
        return
    if os.path.isdir(s):
        raise UserError(f"{s} is a folder: A and B are each a checkpoint file, an exported file or a model name")
    if not os.path.lexists(s) and "." not in s and os.sep not in s:
        models.get_recipe(s)   # unknown model 'bn_fx'; choose one of: ...


def parser():
    p = argparse.ArgumentParser(description="Compare two models on the 10,000 MNIST test images: accuracies with "
                                "95% intervals, the 2x2 table of right/wrong, and the exact McNemar test.")
    p.add_argument("a", metavar="A", help="a checkpoint, an exported file, or a model name (its latest best.pt, "
                   "else pretrained/<model>.pt)")
    p.add_argument("b", metavar="B", help="the same for B")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--trust-code", action="store_true", help="load code-bearing exports (TorchScript, .pt2, "
                   ".aoti.pt2) even when no manifest.json beside them vouches for them")
    p.add_argument("--data-dir", help="MNIST folder (default: $MNIST_DIR, then ./data)")
    p.add_argument("--device", default="auto", help="where checkpoints run: auto (default), cpu, cuda or mps")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    with one_line_errors():
        device = get_device(args.device)
        for s in (args.a, args.b):
            check_source(s)
        a, b = (artifacts.classifier(s, args.trust_code, device) for s in (args.a, args.b))
        if filecmp.cmp(a.source, b.source, shallow=False):
            raise UserError(f"A and B are the same file ({a.source} and {b.source} hold the same bytes): a model "
                            "against itself has nothing to compare")
        images, labels = data.load("test", args.data_dir)
        r = compare(a, b, images, labels)
    print(json.dumps(r, indent=1) if args.json else text(r))


if __name__ == "__main__":
    main()
