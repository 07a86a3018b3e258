import numpy as np

from cifarkit.trust.analysis import Predictions, confusion, correct, mistakes, per_class_accuracy


def _preds(n=500, k=10, seed=0):
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(k), n).astype(np.float32)
    labels = rng.integers(0, k, n)
    return Predictions(np.zeros((n, 32, 32, 3), np.uint8), labels, probs, [str(i) for i in range(k)])


def test_mistakes_equal_a_brute_force_comparison_most_confident_first():
    p = _preds()
    brute = [i for i in range(len(p.labels)) if np.argmax(p.probs[i]) != p.labels[i]]
    got = mistakes(p)
    assert sorted(got.tolist()) == brute
    conf = p.probs.max(1)[got]
    assert np.all(conf[:-1] >= conf[1:])
    assert len(mistakes(p, 7)) == 7
    only = mistakes(p, true=3, pred=5)
    assert all(p.labels[i] == 3 and p.preds[i] == 5 for i in only)
    assert set(correct(p).tolist()) == set(range(len(p.labels))) - set(brute)


def test_confusion_rows_sum_to_the_class_counts():
    p = _preds()
    c = confusion(p)
    assert c.shape == (10, 10)
    assert np.array_equal(c.sum(1), np.bincount(p.labels, minlength=10))
    assert np.array_equal(c.sum(0), np.bincount(p.preds, minlength=10))
    assert np.allclose(per_class_accuracy(c),
                       [(p.preds[p.labels == k] == k).mean() for k in range(10)])
    assert np.trace(c) / c.sum() == p.accuracy
