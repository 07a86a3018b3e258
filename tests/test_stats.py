"""Numbers you can trust (trust/stats.py): intervals that cover the truth as often as they say,
McNemar's exact test against the binomial by hand, the too-few-images rule, and the per-class
numbers as results.json and the model card carry them."""
import json
from math import comb

import numpy as np
import pytest
from scipy.stats import binomtest

from cifarkit.trust import stats

SEEDS = 200   # independent test sets per coverage check


def _within_binomial_tolerance(hits: int, trials: int = SEEDS, rate: float = stats.LEVEL) -> bool:
    """hits of trials within 3 standard deviations of Binomial(trials, rate)'s mean."""
    return abs(hits - trials * rate) <= 3 * np.sqrt(trials * rate * (1 - rate))


def test_a_recall_interval_covers_the_true_rate_at_its_nominal_95_percent():
    truth, n, hits = 0.8, 400, 0
    for seed in range(SEEDS):
        rng = np.random.default_rng(1000 + seed)
        labels = np.zeros(n, int)
        preds = np.where(rng.random(n) < truth, 0, 1)               # each image right with probability 0.8
        recall = stats.per_class(labels, preds, ["a", "b"], resamples=1000, seed=seed)[0].recall
        assert recall.low <= recall.value <= recall.high
        hits += recall.low <= truth <= recall.high
    assert _within_binomial_tolerance(hits), f"covered {hits} of {SEEDS}"


def test_a_paired_difference_interval_covers_the_true_difference_at_its_nominal_rate():
    (pa, pb), n, hits = (0.80, 0.85), 600, 0
    for seed in range(SEEDS):
        rng = np.random.default_rng(5000 + seed)
        labels = rng.integers(0, 3, n)
        wrong = (labels + 1) % 3
        preds_a = np.where(rng.random(n) < pa, labels, wrong)
        preds_b = np.where(rng.random(n) < pb, labels, wrong)
        overall, _ = stats.paired_differences(labels, preds_a, preds_b, 3, resamples=1000, seed=seed)
        hits += overall.diff.low <= pb - pa <= overall.diff.high
    assert _within_binomial_tolerance(hits), f"covered {hits} of {SEEDS}"


def test_the_same_seed_gives_the_same_interval_and_another_seed_nearly_the_same():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 2000)
    preds = np.where(rng.random(2000) < 0.7, labels, (labels + 1) % 4)
    first, again = (stats.per_class(labels, preds, list("abcd"))[2].f1 for _ in range(2))
    other = stats.per_class(labels, preds, list("abcd"), seed=1)[2].f1
    assert first == again
    assert abs(first.low - other.low) < 0.01 and abs(first.high - other.high) < 0.01


def test_mcnemar_of_identical_predictions_is_p_1():
    right = np.random.default_rng(0).random(500) < 0.9
    t = stats.mcnemar(right, right)
    assert (t.only_a, t.only_b, t.p) == (0, 0, 1.0)
    labels = np.arange(500) % 10
    overall, per_class = stats.paired_differences(labels, labels, labels, 10)
    assert overall.test.p == 1.0 and overall.diff.value == 0 and not overall.beyond_chance
    assert all(d.test.p == 1.0 for d in per_class)


def test_mcnemar_on_a_known_discordance_is_the_exact_binomial_p():
    # 100 images: both right on 80, A alone right on 10, B alone on 2, both wrong on 8
    a = np.array([1] * 80 + [1] * 10 + [0] * 2 + [0] * 8, bool)
    b = np.array([1] * 80 + [0] * 10 + [1] * 2 + [0] * 8, bool)
    t = stats.mcnemar(a, b)
    by_hand = 2 * sum(comb(12, i) for i in range(3)) / 2 ** 12      # two-sided: P(X <= 2) + P(X >= 10)
    assert (t.only_a, t.only_b) == (10, 2)
    assert t.p == pytest.approx(by_hand, rel=1e-12) == binomtest(10, 12, 0.5).pvalue
    assert stats.mcnemar(b, a).p == t.p


def test_a_class_with_fewer_than_20_images_gets_no_interval_and_says_so():
    classes = ["few", "enough", "many"]
    labels = np.array([0] * 7 + [1] * 20 + [2] * 19)
    preds = labels.copy()
    preds[[0, 10, 30]] = [1, 2, 0]
    few, enough, nineteen = stats.per_class(labels, preds, classes)
    assert few.recall.low is None and few.recall.text() == f"{6 / 7:.1%} (too few images (n=7) for an interval)"
    assert "too few images (n=7) for an interval" in few.f1.text()
    assert enough.recall.low is not None and "95% CI" in enough.recall.text()
    assert nineteen.recall.low is None and "(n=19)" in nineteen.recall.text()
    # precision counts the images predicted as the class: 'enough' is predicted for 20 images
    assert enough.precision.n == 20 and enough.precision.low is not None
    overall, per_class = stats.paired_differences(labels, labels, preds, 3)
    assert overall.diff.low is not None and per_class[0].diff.low is None
    assert "too few images (n=7) for an interval" in stats.verdict("A", "B", per_class[0])


def test_per_class_numbers_match_the_confusion_counts_by_hand():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    preds = np.array([0, 0, 0, 1, 1, 1, 0, 2, 2, 1])
    s = stats.per_class(labels, preds, ["x", "y", "z"])
    assert [c.images for c in s] == [4, 3, 3]
    assert s[0].precision.value == pytest.approx(3 / 4) and s[0].recall.value == pytest.approx(3 / 4)
    assert s[1].precision.value == pytest.approx(2 / 4) and s[1].recall.value == pytest.approx(2 / 3)
    assert s[1].f1.value == pytest.approx(2 * 2 / (3 + 4))
    assert s[2].precision.value == 1.0 and s[2].recall.value == pytest.approx(2 / 3)
    assert stats.top_confusions(labels, preds, ["x", "y", "z"]) == [("x", "y", 1), ("y", "x", 1), ("z", "y", 1)]
    never = stats.per_class(labels, np.zeros_like(labels), ["x", "y", "z"])[1]
    assert never.precision.value is None and never.precision.text() == "n/a (no images)"


def test_per_class_ece_is_the_ece_of_each_class_own_images():
    from cifarkit.trust.calibration import ece
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 600)
    probs = rng.dirichlet(np.ones(3), 600)
    s = stats.per_class(labels, probs.argmax(1), list("abc"), probs)
    for c in range(3):
        assert s[c].ece == pytest.approx(ece(probs[labels == c], labels[labels == c]))


def test_the_verdict_says_which_run_is_above_by_how_much_and_whether_beyond_chance():
    n = 2000
    labels = np.arange(n) % 4
    right_a, right_b = np.ones(n, bool), np.ones(n, bool)
    right_a[:100], right_b[:60] = False, False                      # A alone wrong on 40 images, B never alone
    preds_a, preds_b = np.where(right_a, labels, (labels + 1) % 4), np.where(right_b, labels, (labels + 1) % 4)
    overall, _ = stats.paired_differences(labels, preds_a, preds_b, 4)
    sentence = stats.verdict("A", "B", overall)
    assert sentence.startswith("B is 2.0 points above A (95% CI ")
    assert sentence.endswith("McNemar p < 0.001): beyond chance")
    swapped = stats.verdict("B", "A", stats.paired_differences(labels, preds_b, preds_a, 4)[0])
    assert swapped.startswith("B is 2.0 points above A")
    right_b[:99] = False                                            # B alone wrong on one of 4, A on 2: too close
    right_b[99] = True
    right_b[100:103] = [False, False, True]
    preds_b = np.where(right_b, labels, (labels + 1) % 4)
    close = stats.verdict("A", "B", stats.paired_differences(labels, preds_a, preds_b, 4)[0])
    assert "within chance" in close and "McNemar p = " in close


def test_results_json_keeps_the_per_class_numbers_and_gives_them_back():
    rng = np.random.default_rng(0)
    labels = np.concatenate([rng.integers(0, 3, 300), np.full(5, 3)])
    probs = rng.dirichlet(np.ones(4), len(labels))
    summary = json.loads(json.dumps(stats.summary(labels, probs.argmax(1), list("abcd"), probs), allow_nan=False))
    back = stats.from_summary(summary["per_class"])
    direct = stats.per_class(labels, probs.argmax(1), list("abcd"), probs)
    assert [b.recall.text() for b in back] == [d.recall.text() for d in direct]
    assert back[3].recall.low is None and summary["per_class"]["min_images"] == stats.MIN_IMAGES
    assert summary["confusions"][0]["images"] >= summary["confusions"][-1]["images"]


def test_the_model_card_shows_per_class_intervals_and_the_too_few_phrase(tmp_path):
    from cifarkit.models import build_model
    from cifarkit.serve.card import model_card
    from cifarkit.weights import load, save_weights
    classes = ["cat", "dog", "owl"]
    save_weights(build_model("fast", 3), tmp_path / "model.safetensors", "fast", classes, [0.5] * 3, [0.25] * 3)
    labels = np.array([0] * 50 + [1] * 50 + [2] * 6)
    preds = labels.copy()
    preds[:10] = 1
    res = {"test_acc": 0.9, "data": "CIFAR-10", **stats.summary(labels, preds, classes, np.eye(3)[preds])}
    text = str(model_card(load(tmp_path), res))
    row = next(line for line in text.splitlines() if line.startswith("| cat |"))
    assert "80.0% (95% CI" in row                                   # cat's recall: 40 of 50
    assert "too few images (n=6) for an interval" in next(ln for ln in text.splitlines() if ln.startswith("| owl |"))
    assert "cat as dog (10)" in text
    assert "not measured" in str(model_card(load(tmp_path), {"test_acc": 0.9, "data": "CIFAR-10"}))


def test_calibrate_writes_the_per_class_numbers_after_its_temperature_into_results_json(tmp_path):
    from cifarkit.models import build_model
    from cifarkit.presets import TrainConfig
    from cifarkit.rundir import RunDir
    from cifarkit.trust.calibration import calibrate_run
    from cifarkit.weights import save_weights
    from conftest import CLASSES, make_image_folder
    data = make_image_folder(tmp_path / "data", n_train=40, n_test=6)     # 160 training images, 24 test
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.write_config(TrainConfig(data=str(data), dataset="folder", val_size=120, out=str(run.path)))
    save_weights(build_model("fast", 4), run.weights_file, "fast", CLASSES[:4], [0.5] * 3, [0.25] * 3)
    calibrate_run(run.path)                                                # an untrained net: any answers do
    res = run.read_results()
    assert list(res.per_class["classes"]) == CLASSES[:4] and res.temperature is not None
    assert all(c["images"] == 6 and c["recall"]["low"] is None for c in res.per_class["classes"].values())
    assert sum(c["images"] for c in res.confusions) <= 24


def test_mean_and_sd_over_seeds():
    assert stats.mean_sd([0.90, 0.92, 0.94]) == (pytest.approx(0.92), pytest.approx(0.02))
