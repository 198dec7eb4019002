"""The committed pretrained/<name>.pt weights score on the real test set exactly what
REPRODUCTION.md records for them (seed 1's best), to the image."""
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


def test_every_recipe_is_recorded():
    assert sorted(recorded()) == sorted(models.RECIPES)


@pytest.mark.parametrize("name", list(models.RECIPES))
def test_pretrained_matches_reproduction(name, mnist_dir, pretrained_log_probs):
    path = os.path.join(ROOT, "pretrained", name + ".pt")
    ckpt = torch.load(path, weights_only=True)
    assert set(ckpt) == {"model_name", "model", "epoch", "test_acc", "params"}
    models.from_checkpoint(ckpt)
    x, y = data.load("test", mnist_dir)
    _, correct, acc = models.loss_and_accuracy(pretrained_log_probs(name), y)  # models.log_probs of this file on x
    best, epoch = recorded()[name]
    assert correct == round(best * 100)          # 10,000 images: 0.01% is one image
    assert (acc, ckpt["epoch"]) == (best, epoch)
    assert os.path.getsize(path) < 200_000
