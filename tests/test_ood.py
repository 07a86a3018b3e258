"""Out-of-distribution scores and prediction sets on synthetic data with a known answer, and the
fitted scores checked against pytorch-ood's own implementation."""
import numpy as np
import pytest
import torch

from cifarkit.errors import CifarkitError
from cifarkit.trust import conformal, ood


def _gaussians(n_per_class=400, k=4, d=8, seed=0, shift=0.0):
    """k classes, each a unit Gaussian around its mean (the same means for every seed); `shift`
    moves the whole sample away from them."""
    means = torch.randn(k, d, generator=torch.Generator().manual_seed(100)) * 4
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(k).repeat_interleave(n_per_class)
    f = means[labels] + torch.randn(len(labels), d, generator=g) + shift
    return f, labels


def test_mahalanobis_separates_a_shifted_cluster_and_not_a_sample_of_the_same_distribution():
    f, y = _gaussians(seed=0)
    stats = ood.fit_stats("mahalanobis", f, y, 4)
    held, same = ood.mahalanobis(f, **stats), ood.mahalanobis(_gaussians(seed=1)[0], **stats)
    far = ood.mahalanobis(_gaussians(seed=2, shift=6.0)[0], **stats)
    assert ood.auroc(held, far) > 0.99
    assert abs(ood.auroc(held, same) - 0.5) < 0.05
    assert ood.fpr_at_tpr(held, far) < 0.01 and abs(ood.fpr_at_tpr(held, same) - 0.95) < 0.03


def test_the_fitted_scores_rank_as_pytorch_ood_ranks_them():
    import pytorch_ood.detector as pytorch_ood  # a dev dependency (pytorch-ood): installed by make test
    f, y = _gaussians(seed=3)
    test = torch.cat([_gaussians(seed=4)[0], _gaussians(seed=5, shift=3.0)[0]])
    ours = ood.mahalanobis(test, **ood.fit_stats("mahalanobis", f, y, 4))
    theirs = pytorch_ood.Mahalanobis(None).fit_features(f, y).predict_features(test)
    assert torch.equal(ours.argsort(), theirs.argsort())
    ours = ood.knn(test, ood.fit_stats("knn", f, y, 4)["bank"])
    theirs = pytorch_ood.KNN(None, k=ood.KNN_K).fit_features(f, y).predict_features(test)
    assert torch.allclose(ours.double(), theirs.double(), atol=1e-5)


def test_the_threshold_keeps_the_asked_share_of_held_out_images():
    f, y = _gaussians(seed=6)
    logits = torch.randn(len(y), 4)
    for method in ood.METHODS:
        det = ood.fit(method, logits, f, y, keep=0.9)
        scores = det.score(logits, f) if method != "knn" else ood.knn(f, det.tensors["bank"], ood.KNN_K + 1)
        assert abs((~det.verdict(scores)).float().mean().item() - 0.9) < 0.01, method
        tensors, meta = det.to_weights()
        back = ood.OODDetector.from_weights(tensors, meta)
        assert back.method == method and back.threshold == det.threshold and back.tensors.keys() == det.tensors.keys()
    assert ood.OODDetector.from_weights({}, {}) is None  # weights from before: no detector


def test_auroc_matches_the_count_over_all_pairs():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 20, 300), rng.integers(5, 25, 200)  # many ties
    pairs = (b[None, :] > a[:, None]).mean() + 0.5 * (b[None, :] == a[:, None]).mean()
    assert ood.auroc(a, b) == pytest.approx(pairs)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("coverage", [0.8, 0.9, 0.95])
def test_prediction_sets_cover_the_true_class_as_often_as_asked(seed, coverage):
    """Exchangeable synthetic images (a calibration half and a test half of one draw): the sets hold
    the true class within a binomial tolerance of the asked coverage, and grow with it."""
    g = torch.Generator().manual_seed(seed)
    n, k = 4000, 10
    labels = torch.randint(0, k, (n,), generator=g)
    logits = torch.randn(n, k, generator=g) * 1.5
    logits[torch.arange(n), labels] += 2.0                                      # a model right about 60%
    probs = torch.softmax(logits, dim=1)
    scores = conformal.fit(probs[:2000], labels[:2000])
    sets = conformal.prediction_sets(probs[2000:], scores, coverage)
    covered, size = conformal.coverage_and_size(sets, labels[2000:])
    tolerance = 3 * (coverage * (1 - coverage) / 2000) ** 0.5 + 1 / 2001
    assert abs(covered - coverage) <= tolerance, (covered, coverage)
    assert 0 < size < k
    assert conformal.prediction_sets(probs[2000:], scores, 0.5).sum() < sets.sum()   # less asked, smaller sets
    # a set holds every class at least as probable as any class in it
    least_inside = torch.where(sets, probs[2000:].double(), torch.inf).amin(1)
    assert ((probs[2000:].double() >= least_inside[:, None]) <= sets).all()


@pytest.mark.parametrize("coverage", [0, 1, 1.5, -0.1])
def test_a_coverage_outside_0_to_1_is_one_line(coverage):
    with pytest.raises(CifarkitError, match="--coverage must be in") as info:
        conformal.check_coverage(coverage)
    assert "\n" not in str(info.value)


def _stored_model(tmp_path, method="mahalanobis"):
    """A fast net (untrained) whose out-of-distribution detector and conformity scores were fitted on
    200 'held-out' images and stored with its weights, as `cifarkit calibrate` stores them."""
    from cifarkit.models import build_model
    from cifarkit.weights import load, save_weights, update_metadata
    torch.manual_seed(0)
    path = tmp_path / "model.safetensors"
    save_weights(build_model("fast", 10, widths=[16, 32, 32]), path, "fast", [f"c{i}" for i in range(10)],
                 [0.5] * 3, [0.25] * 3, {"widths": [16, 32, 32]})
    held = np.random.default_rng(0).integers(0, 256, (200, 32, 32, 3), dtype=np.uint8)
    labels = torch.arange(10).repeat(20)
    features, logits = load(path).features_and_logits(held)
    det = ood.fit(method, logits, features, labels)
    stats, meta = det.to_weights()
    update_metadata(path, stats={**stats, conformal.SCORES: conformal.fit(torch.softmax(logits, 1), labels)}, **meta)
    return path, held


@pytest.mark.parametrize("method", ["mahalanobis", "knn", "energy", "featnorm", "energynorm"])
def test_a_stored_detector_gives_the_verdict_and_never_changes_the_class(tmp_path, method):
    from cifarkit import load
    path, held = _stored_model(tmp_path, method)
    model = load(path)
    blank = np.full((1, 32, 32, 3), 255, np.uint8)
    images = np.concatenate([held[:50], blank])
    a = model.assess(images, coverage=0.9)
    assert torch.equal(a.probabilities.argmax(1), model.probabilities(images).argmax(1))  # the class stays
    assert a.ood_score.shape == (51,) and a.unknown.dtype == torch.bool
    assert torch.equal(a.unknown, a.ood_score > model.detector.threshold)
    assert a.sets.shape == (51, 10) and a.sets.dtype == torch.bool
    assert model.detector.method == method and model.assess(images).sets is None


def test_weights_without_stored_statistics_predict_as_before_and_say_how_to_add_them(tmp_path, capsys, notices):
    from cifarkit.models import build_model
    from cifarkit.serve.predict import load_model, predict_files
    from cifarkit.weights import save_weights
    path = tmp_path / "old.safetensors"
    save_weights(build_model("fast", 10, widths=[16, 32, 32]), path, "fast", [f"c{i}" for i in range(10)],
                 [0.5] * 3, [0.25] * 3, {"widths": [16, 32, 32]})
    from PIL import Image
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "a.png")
    results, errors = predict_files(load_model(path), [tmp_path / "a.png"], coverage=0.9)
    assert not errors and "unknown" not in results[0] and "set" not in results[0] and len(results[0]["top"]) == 3
    assert "cifarkit calibrate RUN_DIR" in notices()


@pytest.mark.slow
def test_the_onnx_export_outputs_the_same_score_and_verdict(tmp_path):
    from cifarkit import load
    from cifarkit.serve.export import OnnxModel, export
    path, held = _stored_model(tmp_path)
    onnx_path = export(path, "onnx", tmp_path / "m.onnx")
    images = np.concatenate([held[:20], np.full((1, 32, 32, 3), 255, np.uint8)])
    ours, theirs = load(path).assess(images, 0.9), OnnxModel(onnx_path).assess(images, 0.9)
    assert torch.allclose(ours.ood_score, theirs.ood_score, rtol=1e-3, atol=1e-3)
    assert torch.equal(ours.unknown, theirs.unknown) and torch.equal(ours.sets, theirs.sets)
    assert torch.allclose(ours.probabilities, theirs.probabilities, atol=1e-5)
