"""Train every recipe for its documented epochs over several seeds; write REPRODUCTION.md.

    python reproduce.py                 # all five, 3 seeds on a GPU, 1 on CPU
    python reproduce.py --seeds 3 --models gap10k bn_fc

Runs go to runs/reproduce/<model>-seed<k>/; a finished run is not trained again, so the
command can be stopped and restarted, and further seeds finished earlier (say by
`--models bn_fc --seeds 3`) count in the mean and spread. The best.pt of each recipe's first seed becomes
pretrained/<model>.pt (weights only, weights_only-loadable).
"""
import argparse
import itertools
import json
import os
import statistics
import time

import torch

import data
import models
import train
from common import check_at_least, get_device, load_checkpoint, one_line_errors, read_metrics, save_checkpoint, save_text

NOTES = """\
## Notes

- **conv4_fc**: the seed's "95.21%" was measured on the 60,000 *training* images
  (57124/60000), not on the 10,000-image test set. The table gives the real test-set figure;
  the line below the table gives both the training-set and test-set accuracy after its one epoch,
  measured here without augmentation. Its pools sit after conv2 and conv4 (the only layout that
  gives the documented 896-wide flatten), and `CrossEntropyLoss` on a `log_softmax` output equals
  NLL, because log_softmax is idempotent.
- **bn_gap** is a reconstruction: seed 000 documents the family (ReLU+BN+Dropout 0.05 blocks,
  1x1 convs, final conv + GAP) and its accuracy log, not its layers, parameter count, optimizer,
  schedule, batch size or augmentation. Ours: 18,304 parameters, SGD momentum 0.9 with
  OneCycleLR (max_lr 0.1, pct_start 0.25) per batch, batch 128, rotation +-7 degrees.
- **bn_drop** is a reconstruction matched to the documented 13,808 parameters
  (1-16-32, 1x1 to 10, pool, 16-16-16-16, GAP, 1x1 to 10). The seed names SGD lr 0.01 momentum
  0.9, batch 64, 20 epochs and nothing else: no schedule and no augmentation are used here.
- **gap10k**: OneCycleLR settings other than max_lr 0.015 are not documented; torch's defaults
  (pct_start 0.3, div_factor 25, cosine) are used, stepped per batch.
- **bn_fc**: "rotation +-15 and translation up to 2 px" is applied as one RandomAffine
  (whole-pixel shifts, as torchvision rounds them). The seed does not state OneCycleLR's
  final_div_factor, but its log's per-epoch learning rates match final_div_factor=7.5 to 5e-7
  (torch's default 1e4 anneals to ~0 and misses the logged 0.049657 at epoch 10 by 0.013); that
  change alone moved seed 1 from 99.43% to 99.49%. Our per-epoch *training* loss and accuracy track
  the seed's log within 0.2 pp at every epoch, while our test accuracy is higher early (98.47% vs
  95.10% after epoch 1) and 0.1-0.15 pp lower at the end; over 3 seeds the best is
  99.53 +- 0.05%, inside the 0.15 pp target. A single favourable seed is the likeliest reading of
  the documented 99.64%.
- Timing: these CPU runs used one thread each, mostly two runs at a time on the 2-core machine,
  so s/epoch is a lower bound on speed; see BENCHMARKS.md for controlled throughput figures. No
  GPU was available for this reproduction, so the "5 recipes x 3 seeds under 10 minutes on CUDA"
  wall time is not measured yet.
- Augmentation runs batched on the training device with torchvision's semantics (nearest
  sampling, fill 0; tests check pixel-exact agreement with torchvision's functional ops).
"""


def run_dir(name, seed):
    return os.path.join("runs", "reproduce", f"{name}-seed{seed}")


def finished(folder, epochs):
    try:
        with open(os.path.join(folder, "summary.json")) as f:
            s = json.load(f)
        return s if s.get("epochs_done") == epochs else None
    except (OSError, ValueError):
        return None


@torch.no_grad()
def train_set_accuracy(ckpt_path, data_dir, device):
    """Accuracy on the 60,000 training images (no augmentation): what seed 001 called its test set."""
    model = models.from_checkpoint(load_checkpoint(ckpt_path)).to(device)
    x, y = data.load("train", data_dir)
    return models.score(models.predict(model, x), y)[2]


def publish_pretrained(name, seed):
    ckpt = load_checkpoint(os.path.join(run_dir(name, seed), "best.pt"))
    os.makedirs("pretrained", exist_ok=True)
    keep = {k: ckpt[k] for k in ("model_name", "model", "epoch", "test_acc", "params")}
    save_checkpoint(keep, os.path.join("pretrained", name + ".pt"))


def write_report(results, seeds, device_label, wall, extra):
    lines = ["# Reproduction of the five documented recipes", "",
             f"Device: {device_label}. Seeds requested per recipe: {seeds}; n in the table counts every "
             f"finished seed (seeds 1..n). Wall time of the runs: {wall}.",
             "Command: `make reproduce` (`python reproduce.py`). Each run trains the recipe's documented",
             "epochs and evaluates the full 10,000-image test set after every epoch; 'best' is the",
             "highest of those, as the seeds report it. Generated by reproduce.py.", "",
             "| recipe | params | documented best (epoch) | reproduced best (epoch), seed 1 | final, seed 1 "
             "| best, mean +- std over seeds | gap to documented | s/epoch |",
             "|---|---|---|---|---|---|---|---|"]
    for name, runs in results.items():
        doc = models.RECIPES[name]["documented"]
        first = runs[0]
        bests = [r["best_test_acc"] for r in runs]
        spread = f"{statistics.mean(bests):.2f} +- {statistics.stdev(bests):.2f} (n={len(bests)})" \
            if len(bests) > 1 else f"{bests[0]:.2f} (n=1)"
        gap = statistics.mean(bests) - doc["best_test_acc"]
        secs = statistics.mean(r["seconds_per_epoch"] for r in runs)
        lines.append(f"| {name} | {first['params']:,} | {doc['best_test_acc']:.2f}% ({doc['best_epoch']}) | "
                     f"{first['best_test_acc']:.2f}% ({first['best_epoch']}) | {first['final_test_acc']:.2f}% | "
                     f"{spread} | {gap:+.2f} pp | {secs:.1f} |")
    lines += ["", *extra, "", NOTES]
    save_text("\n".join(lines) + "\n", "REPRODUCTION.md")


def main(argv=None):
    p = argparse.ArgumentParser(description="Reproduce the five recipes and write REPRODUCTION.md.")
    p.add_argument("--models", nargs="+", default=list(models.RECIPES))
    p.add_argument("--seeds", type=int, help="seeds per recipe (default: 3 on a GPU, 1 on CPU)")
    p.add_argument("--device", default="auto")
    p.add_argument("--data-dir")
    args = p.parse_args(argv)
    with one_line_errors("interrupted: finished runs are kept; run the same command again to go on"):
        for name in args.models:
            models.get_recipe(name)
        check_at_least(args, 1, "seeds")
        device = get_device(args.device)
        seeds = args.seeds or (3 if device.type == "cuda" else 1)
        results, t0 = {}, time.time()
        for name in args.models:
            epochs = models.RECIPES[name]["epochs"]
            results[name] = []
            # the requested seeds, then any further seeds already finished on disk
            for seed in itertools.count(1):
                out = run_dir(name, seed)
                s = finished(out, epochs)
                if s is None:
                    if seed > seeds:
                        break
                    again = os.path.isfile(os.path.join(out, "last.pt"))  # a run stopped part-way goes on
                    targs = train.parse_args(["--device", args.device, "--no-progress"]
                                             + (["--resume", out] if again else
                                                ["--model", name, "--seed", str(seed), "--out", out])
                                             + (["--data-dir", args.data_dir] if args.data_dir else []))
                    s = train.run(targs)
                s["seconds_per_epoch"] = statistics.mean(float(row["seconds"]) for row in read_metrics(out))
                results[name].append(s)
            publish_pretrained(name, 1)
        extra = []
        if "conv4_fc" in results:
            tr = train_set_accuracy(os.path.join(run_dir("conv4_fc", 1), "best.pt"), args.data_dir, device)
            te = results["conv4_fc"][0]["final_test_acc"]
            extra.append(f"conv4_fc after its one epoch (seed 1): {tr:.2f}% on the 60,000 training images "
                         f"(what the seed measured: 95.21%), {te:.2f}% on the 10,000 test images.")
        label = results[args.models[0]][0]["device_name"]
        wall = f"{sum(r['wall_seconds'] for rs in results.values() for r in rs) / 60:.1f} min of training " \
               f"(this invocation: {(time.time() - t0) / 60:.1f} min)"
        write_report(results, seeds, label, wall, extra)
        print(open("REPRODUCTION.md").read())


if __name__ == "__main__":
    main()
