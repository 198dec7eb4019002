import json

import pytest
import torch

import evaluate


def test_report_numbers_on_a_hand_checked_case():
    # 10 images: digit 0 x4, 1 x3, 2 x3. Predictions: 0 0 0 1 | 1 1 2 | 2 2 0
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    pred = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 0])
    logp = torch.log_softmax(torch.nn.functional.one_hot(pred, 10).float() * 5, 1)
    r = evaluate.report(labels, logp)
    assert (r["correct"], r["accuracy"]) == (7, 70.0)
    # the 95% Wilson interval, by its closed form: (p + z^2/2n +- z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)
    z, n, p = 1.959963984540054, 10, 0.7
    half = z * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5
    assert r["accuracy_ci95"] == [round(100 * (p + z * z / (2 * n) + s * half) / (1 + z * z / n), 2) for s in (-1, 1)]
    assert r["accuracy_ci95"] == [39.68, 89.22]
    c0, c1, c2 = (r["per_class"][d] for d in "012")
    assert (c0["precision"], c0["recall"], c0["support"]) == (0.75, 0.75, 4)       # 3 of 4 predicted 0 are 0
    assert (c1["precision"], c1["recall"]) == (2 / 3, 2 / 3)
    assert (c2["precision"], c2["recall"]) == (2 / 3, 2 / 3)
    assert c2["f1"] == pytest.approx(2 / 3) and c0["accuracy"] == 75.0
    assert r["confusion_matrix"][0][:3] == [3, 1, 0] and r["confusion_matrix"][2][:3] == [1, 0, 2]
    # averages run over all ten digits; the seven absent here count as 0 in the macro average
    assert r["macro_avg"]["recall"] == pytest.approx((0.75 + 2 / 3 + 2 / 3) / 10)
    assert r["weighted_avg"]["recall"] == pytest.approx(0.7)


def test_checkpoint_report_matches_training_and_html_embeds_images(trained, mnist_dir, capsys):
    evaluate.main(["--checkpoint", str(trained / "best.pt"), "--data-dir", mnist_dir, "--device", "cpu"])
    r = json.loads((trained / "report.json").read_text())
    assert r["accuracy"] == r["recorded_accuracy"] == json.loads((trained / "summary.json").read_text())["best_test_acc"]
    assert r["accuracy_ci95"][0] < r["accuracy"] < r["accuracy_ci95"][1]
    assert f"evaluated model bn_fc from checkpoint {trained}/best.pt" in capsys.readouterr().out  # what answered
    page = (trained / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3           # curves, confusion matrix, mistakes
    assert "src=\"http" not in page and "<link" not in page     # self-contained
    assert "99.64%" in page and "documented by source 004" in page   # the documented figure beside ours
    assert "this run trained 1 of the recipe&#x27;s 10 epochs and trained on 4,096 of the training images" in page
    for name in ("confusion.png", "mistakes.png", "curves.png", "report.json"):
        assert (trained / name).stat().st_size > 0


def test_a_checkpoint_of_another_model_than_model_is_refused(trained, mnist_dir, tmp_path):
    """--model names the model the file must hold, as in export.py and predict.py: no report of another."""
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--model", "gap10k", "--checkpoint", str(trained / "best.pt"), "--out", str(tmp_path / "o"),
                       "--data-dir", mnist_dir])
    assert str(e.value) == f"error: {trained}/best.pt holds a bn_fc model, not gap10k"
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("fmt", ["torchscript", "pt2", pytest.param("aoti", marks=pytest.mark.slow)])
def test_artifact_scores_like_its_checkpoint(fmt, exports, mnist_dir, tmp_path, request):
    _, ckpt, figures = exports  # exported once per session, each verified (conftest.py)
    path = request.getfixturevalue("aoti_package")[0] if fmt == "aoti" else figures[fmt][0]
    r = evaluate.evaluate(path, "artifact", str(tmp_path / "eval"), mnist_dir, torch.device("cpu"))
    assert r["accuracy"] == ckpt["test_acc"] and r["model"] == "bn_fc"
    assert "data:image/png;base64," in (tmp_path / "eval" / "report.html").read_text()
