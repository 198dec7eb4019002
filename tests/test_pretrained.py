"""The committed pretrained/<name>.pt weights score on the real test set exactly what they say, to the
image: what REPRODUCTION.md records for them (the canonical run set's seed-1 best.pt, published by
`make pretrained`) where the report has the recipe, else the test accuracy the checkpoint carries."""
import os
import re

import pytest
import torch

import data
import models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def recorded(path=os.path.join(ROOT, "REPRODUCTION.md")):
    """{recipe: (seed 1's best test accuracy, its epoch)} from the table rows of REPRODUCTION.md."""
    text = open(path, encoding="utf-8").read()
    rows = re.findall(r"^\| (\w+) \| [\d,]+ \| [\d.]+% \(\d+\) \| ([\d.]+)% \((\d+)\) \|", text, re.M)
    return {name: (float(acc), int(epoch)) for name, acc, epoch in rows}


def test_every_recipe_ships_and_the_report_names_only_recipes():
    assert all(os.path.isfile(os.path.join(ROOT, "pretrained", n + ".pt")) for n in models.RECIPES)
    assert recorded() and set(recorded()) <= set(models.RECIPES)


@pytest.mark.parametrize("name", list(models.RECIPES))
def test_pretrained_matches_reproduction(name, mnist_dir, pretrained_log_probs):
    path = os.path.join(ROOT, "pretrained", name + ".pt")
    ckpt = torch.load(path, weights_only=True)
    assert set(ckpt) == {"model_name", "model", "epoch", "test_acc", "params"}
    models.from_checkpoint(ckpt)
    x, y = data.load("test", mnist_dir)
    _, correct, acc = models.loss_and_accuracy(pretrained_log_probs(name), y)  # models.log_probs of this file on x
    best, epoch = recorded().get(name, (ckpt["test_acc"], ckpt["epoch"]))
    assert correct == round(best * 100)          # 10,000 images: 0.01% is one image
    assert (acc, ckpt["epoch"]) == (best, epoch)
    assert os.path.getsize(path) < 200_000
