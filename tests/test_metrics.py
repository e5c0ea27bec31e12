"""Metrics against scikit-learn, direct NumPy formulas and hand-worked examples."""

import warnings

import numpy as np
import pytest
from sklearn import linear_model
from sklearn import metrics as skm

from vitcls import metrics

pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")


def _rng(seed=0):
  return np.random.default_rng(seed)


def _onehot(labels, k):
  return np.eye(k)[labels]


# ------------------------------------------------------------------------- helpers


def test_softmax_sigmoid_are_stable():
  z = np.array([[1000.0, 0.0, -1000.0], [1.0, 2.0, 3.0]])
  p = metrics.softmax(z)
  np.testing.assert_allclose(p[0], [1.0, 0.0, 0.0])
  np.testing.assert_allclose(p[1], np.exp([1, 2, 3]) / np.exp([1, 2, 3]).sum())
  np.testing.assert_allclose(metrics.log_softmax(z)[0], [0.0, -1000.0, -2000.0])
  np.testing.assert_allclose(metrics.sigmoid([-1000.0, 0.0, 1000.0, 2.0]),
                             [0.0, 0.5, 1.0, 1 / (1 + np.exp(-2.0))])


# ------------------------------------------------------------------ classification


def test_topk_accuracy_by_hand_with_ties():
  logits = np.array([[0.1, 0.5, 0.4],   # label 2: one class above -> rank 1
                     [1.0, 1.0, 0.0],   # label 1: tied with class 0 (lower index) -> rank 1
                     [0.2, 0.2, 0.2],   # label 2: tied with 0 and 1 -> rank 2
                     [3.0, 0.0, 0.0]])  # label 0: rank 0
  labels = np.array([2, 1, 2, 0])
  assert metrics.topk_accuracy(logits, labels, 1) == 0.25
  assert metrics.topk_accuracy(logits, labels, 2) == 0.75
  assert metrics.topk_accuracy(logits, labels, 3) == 1.0
  # k=1 is argmax, ties included.
  assert metrics.topk_accuracy(logits, labels, 1) == np.mean(logits.argmax(1) == labels)


def test_topk_accuracy_matches_sklearn():
  rng = _rng(1)
  logits = rng.normal(size=(300, 7))
  labels = rng.integers(0, 7, 300)
  for k in (1, 3, 5):
    assert metrics.topk_accuracy(logits, labels, k) == pytest.approx(
        skm.top_k_accuracy_score(labels, logits, k=k, labels=np.arange(7)))


def test_confusion_and_class_accuracies_match_sklearn():
  rng = _rng(2)
  labels = rng.integers(0, 6, 500)
  pred = np.where(rng.random(500) < 0.6, labels, rng.integers(0, 6, 500))
  cm = metrics.confusion_matrix(pred, labels, 6)
  assert cm.dtype == np.int64
  np.testing.assert_array_equal(cm, skm.confusion_matrix(labels, pred, labels=range(6)))
  np.testing.assert_allclose(metrics.per_class_accuracy(cm),
                             skm.recall_score(labels, pred, average=None))
  assert metrics.balanced_accuracy(cm) == pytest.approx(
      skm.balanced_accuracy_score(labels, pred))


def test_class_with_no_examples_is_nan_and_excluded():
  # True classes 0 (3 examples, 2 right), 1 (none), 2 (2 examples, 0 right); 1 is predicted.
  labels = np.array([0, 0, 0, 2, 2])
  pred = np.array([0, 0, 1, 1, 0])
  cm = metrics.confusion_matrix(pred, labels, 3)
  np.testing.assert_array_equal(cm, [[2, 1, 0], [0, 0, 0], [1, 1, 0]])
  acc = metrics.per_class_accuracy(cm)
  np.testing.assert_allclose(acc[[0, 2]], [2 / 3, 0.0])
  assert np.isnan(acc[1])
  assert metrics.balanced_accuracy(cm) == pytest.approx(1 / 3)
  assert metrics.worst_class_accuracy(cm) == 0.0
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)  # "y_pred contains classes not in y_true"
    assert metrics.balanced_accuracy(cm) == pytest.approx(
        skm.balanced_accuracy_score(labels, pred))


def test_confusion_rejects_out_of_range():
  with pytest.raises(ValueError):
    metrics.confusion_matrix(np.array([0, 3]), np.array([0, 1]), 3)


def test_group_metrics_by_hand():
  logits = np.array([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0], [0.0, 5.0], [1.0, 0.0]])
  labels = np.array([0, 1, 1, 1, 1])  # correct: yes, yes, no, yes, no
  groups = np.array(["a", "a", "b", "b", "b"])
  out = metrics.group_metrics(logits, labels, groups)
  assert out == {"a": {"top1": 1.0, "count": 2},
                 "b": {"top1": pytest.approx(1 / 3), "count": 3},
                 "worst_group_accuracy": pytest.approx(1 / 3)}
  out = metrics.group_metrics(logits, labels, np.array([7, 3, 3, 7, 7]))
  assert set(out) == {3, 7, "worst_group_accuracy"}
  assert all(type(k) is int for k in out if k != "worst_group_accuracy")
  assert out[3] == {"top1": 0.5, "count": 2} and out[7]["top1"] == pytest.approx(2 / 3)
  assert out["worst_group_accuracy"] == 0.5
  out = metrics.group_metrics(logits, labels, np.array([b"x", b"y", b"x", b"y", b"y"]))
  assert set(out) == {"x", "y", "worst_group_accuracy"}


# --------------------------------------------------------------------- calibration


def test_ece_by_hand():
  # 4 classes, 3 bins (0, 1/3], (1/3, 2/3], (2/3, 1]; confidence = max prob.
  probs = np.array([[0.30, 0.25, 0.25, 0.20],   # conf .30, pred 0, label 0: right
                    [0.22, 0.32, 0.24, 0.22],   # conf .32, pred 1, label 0: wrong
                    [0.50, 0.20, 0.20, 0.10],   # conf .50, pred 0, label 1: wrong
                    [0.10, 0.60, 0.20, 0.10],   # conf .60, pred 1, label 2: wrong
                    [0.05, 0.05, 0.80, 0.10],   # conf .80, pred 2, label 2: right
                    [0.02, 0.03, 0.05, 0.90]])  # conf .90, pred 3, label 3: right
  labels = np.array([0, 0, 1, 2, 2, 3])
  # bin 0: conf (.30+.32)/2 = .31, acc 1/2 -> |.5 - .31| = .19
  # bin 1: conf (.50+.60)/2 = .55, acc 0   -> .55
  # bin 2: conf (.80+.90)/2 = .85, acc 1   -> .15
  # ECE = 2/6 * .19 + 2/6 * .55 + 2/6 * .15 = 1.78 / 6 = 0.296666...
  assert metrics.ece(probs, labels, num_bins=3) == pytest.approx(1.78 / 6)
  conf, acc, count = metrics.reliability_bins(probs, labels, num_bins=3)
  np.testing.assert_allclose(conf, [0.31, 0.55, 0.85])
  np.testing.assert_allclose(acc, [0.5, 0.0, 1.0])
  np.testing.assert_array_equal(count, [2, 2, 2])
  # A perfectly calibrated-by-bin case: 15 bins, the only used bin has gap 0.
  assert metrics.ece(np.array([[0.5, 0.5], [0.5, 0.5]]), np.array([0, 1])) == 0.0


def test_reliability_bins_are_right_closed():
  # Bins (0, .25], (.25, .5], (.5, .75], (.75, 1]; the edges are exact in binary.
  probs = np.array([[0.25] * 4,                 # exactly .25 -> bin 0
                    [0.26, 0.25, 0.25, 0.24],   # -> bin 1
                    [0.5, 0.5, 0.0, 0.0],       # exactly .5 -> bin 1
                    [0.75, 0.25, 0.0, 0.0],     # exactly .75 -> bin 2
                    [1.0, 0.0, 0.0, 0.0]])      # exactly 1 -> bin 3
  conf, acc, count = metrics.reliability_bins(probs, np.zeros(5, np.int64), num_bins=4)
  np.testing.assert_array_equal(count, [1, 2, 1, 1])
  np.testing.assert_allclose(conf, [0.25, 0.38, 0.75, 1.0])
  np.testing.assert_allclose(acc, [1.0, 1.0, 1.0, 1.0])
  conf, acc, count = metrics.reliability_bins(probs[:1], np.zeros(1, np.int64), 4)
  assert np.isnan(conf[1:]).all() and np.isnan(acc[1:]).all()


def test_nll_matches_sklearn_log_loss():
  rng = _rng(3)
  logits = rng.normal(scale=2.0, size=(200, 5))
  labels = rng.integers(0, 5, 200)
  probs = metrics.softmax(logits)
  ref = skm.log_loss(labels, probs, labels=np.arange(5))
  assert metrics.nll(probs, labels) == pytest.approx(ref, rel=1e-9)
  assert metrics.nll(logits, labels, from_logits=True) == pytest.approx(ref, rel=1e-9)
  # A zero probability for the true class is clipped, not infinite.
  assert metrics.nll(np.array([[1.0, 0.0]]), np.array([1]), eps=1e-12) == pytest.approx(
      -np.log(1e-12))


def test_brier_binary_matches_sklearn_and_multiclass_formula():
  rng = _rng(4)
  p1 = rng.random(100)
  y = rng.integers(0, 2, 100)
  probs = np.stack([1 - p1, p1], axis=1)
  # Multi-class convention: K=2 counts both classes' squared errors, twice the binary one.
  assert metrics.brier(probs, y) == pytest.approx(2 * skm.brier_score_loss(y, p1))
  probs = rng.dirichlet(np.ones(6), size=150)
  labels = rng.integers(0, 6, 150)
  ref = np.mean(np.sum((probs - _onehot(labels, 6)) ** 2, axis=1))
  assert metrics.brier(probs, labels) == pytest.approx(ref)
  assert metrics.brier(_onehot(labels, 6), labels) == 0.0


@pytest.mark.parametrize("t0", [0.5, 2.5])
def test_fit_temperature_recovers_known_temperature(t0):
  rng = _rng(5)
  true_logits = rng.normal(scale=2.0, size=(5000, 10))
  cdf = np.cumsum(metrics.softmax(true_logits), axis=1)
  labels = np.minimum((rng.random((5000, 1)) > cdf).sum(axis=1), 9)  # ~ softmax(true)
  logits = true_logits * t0
  t = metrics.fit_temperature(logits, labels)
  assert t == pytest.approx(t0, rel=0.05)
  before = metrics.nll(logits, labels, from_logits=True)
  after = metrics.nll(logits / t, labels, from_logits=True)
  assert after <= before
  for other in (0.9 * t, 1.1 * t):  # It is a minimum.
    assert after <= metrics.nll(logits / other, labels, from_logits=True)
  assert metrics.ece(metrics.softmax(logits / t), labels) < metrics.ece(
      metrics.softmax(logits), labels)


# ----------------------------------------------------------------------------- OOD


def test_msp_and_energy_scores():
  logits = np.array([[0.0, 0.0], [10.0, 0.0]])
  np.testing.assert_allclose(metrics.msp_score(logits),
                             [-0.5, -1 / (1 + np.exp(-10.0))])
  np.testing.assert_allclose(metrics.energy_score(logits),
                             [-np.log(2.0), -np.log(np.exp(10.0) + 1.0)])
  # Higher = more OOD: the confident row scores lower on both.
  assert np.all(np.diff(metrics.msp_score(logits)) < 0)
  assert np.all(np.diff(metrics.energy_score(logits)) < 0)


def _gaussian_classes(rng, n=600, d=4, k=3):
  means = rng.normal(scale=3.0, size=(k, d))
  mix = rng.normal(size=(d, d)) + 2 * np.eye(d)
  labels = rng.integers(0, k, n)
  x = means[labels] + rng.normal(size=(n, d)) @ mix
  return x, labels


def test_mahalanobis_matches_direct_inverse():
  rng = _rng(6)
  x, labels = _gaussian_classes(rng)
  test = rng.normal(scale=4.0, size=(50, 4))
  fit = metrics.fit_mahalanobis(x, labels, 3, ridge=0.0)
  mus = np.stack([x[labels == c].mean(0) for c in range(3)])
  within = x - mus[labels]
  prec = np.linalg.inv(within.T @ within / len(x))
  md = np.stack([np.einsum("nd,de,ne->n", test - m, prec, test - m) for m in mus], 1)
  np.testing.assert_allclose(metrics.mahalanobis_score(fit, test), md.min(1), rtol=1e-8)
  mu0 = x.mean(0)
  prec0 = np.linalg.inv(np.cov(x.T, bias=True))
  md0 = np.einsum("nd,de,ne->n", test - mu0, prec0, test - mu0)
  np.testing.assert_allclose(metrics.relative_mahalanobis_score(fit, test),
                             md.min(1) - md0, rtol=1e-7, atol=1e-8)
  # The default relative ridge barely moves a well-conditioned case.
  default = metrics.fit_mahalanobis(x, labels, 3)
  np.testing.assert_allclose(metrics.mahalanobis_score(default, test), md.min(1), rtol=1e-4)
  # Far points score higher than training points (higher = more OOD).
  assert (np.median(metrics.mahalanobis_score(fit, 10 * test))
          > np.median(metrics.mahalanobis_score(fit, x)))


def test_mahalanobis_skips_absent_classes_and_handles_rank_deficiency():
  rng = _rng(7)
  x, labels = _gaussian_classes(rng, n=60, d=4, k=3)
  fit = metrics.fit_mahalanobis(x, labels, 5)  # classes 3 and 4 have no examples
  np.testing.assert_array_equal(fit.classes, [0, 1, 2])
  assert fit.means.shape == (3, 4)
  few = rng.normal(size=(5, 20))  # 5 examples in 20 dims: singular covariances
  fit = metrics.fit_mahalanobis(few, np.array([0, 0, 1, 1, 1]), 2)
  assert np.all(np.isfinite(metrics.relative_mahalanobis_score(fit, rng.normal(size=(3, 20)))))


def test_auroc_and_aupr_match_sklearn():
  rng = _rng(8)
  s_in = np.round(rng.normal(size=300), 1)  # Rounded: many ties.
  s_out = np.round(rng.normal(loc=1.0, size=200), 1)
  y = np.r_[np.zeros(300), np.ones(200)]
  s = np.r_[s_in, s_out]
  assert metrics.auroc(s_in, s_out) == pytest.approx(skm.roc_auc_score(y, s))
  assert metrics.aupr(s_in, s_out) == pytest.approx(skm.average_precision_score(y, s))
  s_in, s_out = rng.normal(size=100), rng.normal(loc=0.5, size=70)
  s = np.r_[s_in, s_out]
  y = np.r_[np.zeros(100), np.ones(70)]
  assert metrics.auroc(s_in, s_out) == pytest.approx(skm.roc_auc_score(y, s))
  assert metrics.aupr(s_in, s_out) == pytest.approx(skm.average_precision_score(y, s))


def test_auroc_edge_cases():
  assert metrics.auroc(np.ones(5), np.ones(3)) == 0.5
  assert metrics.aupr(np.ones(5), np.ones(3)) == pytest.approx(3 / 8)
  assert metrics.auroc([0.0, 1.0], [2.0, 3.0]) == 1.0
  assert metrics.auroc([2.0, 3.0], [0.0, 1.0]) == 0.0
  assert metrics.aupr([0.0, 1.0], [2.0, 3.0]) == 1.0
  with pytest.raises(ValueError):
    metrics.auroc([], [1.0])


def test_fpr_at_tpr_by_hand():
  s_out = np.r_[0.05, 0.35, np.linspace(0.65, 2.0, 18)]  # 20 OOD scores
  s_in = np.array([0.1, 0.2, 0.3, 0.35, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
  # 95% of 20 = 19 OOD examples: threshold = 19th highest OOD score = 0.35.
  # In-distribution scores >= 0.35: 0.35 (tie counts), 0.4 ... 0.9 -> 7 of 10.
  assert metrics.fpr_at_tpr(s_in, s_out, 0.95) == pytest.approx(0.7)
  # TPR 1: threshold 0.05, below every in-distribution score.
  assert metrics.fpr_at_tpr(s_in, s_out, 1.0) == 1.0
  # TPR 0.9: 18th highest = 0.65 -> 0.7, 0.8, 0.9 -> 3 of 10.
  assert metrics.fpr_at_tpr(s_in, s_out, 0.9) == pytest.approx(0.3)


def test_fpr_at_tpr_matches_roc_curve():
  rng = _rng(9)
  s_in, s_out = np.round(rng.normal(size=400), 2), np.round(rng.normal(1.5, size=300), 2)
  y = np.r_[np.zeros(400), np.ones(300)]
  fpr, tpr, _ = skm.roc_curve(y, np.r_[s_in, s_out], drop_intermediate=False)
  for target in (0.8, 0.95):
    ref = fpr[np.searchsorted(tpr, target, side="left")]
    assert metrics.fpr_at_tpr(s_in, s_out, target) == pytest.approx(ref)


def test_threshold_at_tpr():
  s = _rng(10).permutation(np.arange(1, 101)).astype(float)
  t = metrics.threshold_at_tpr(s, 0.95)
  assert t == 95.0  # 95 of 100 scores are <= 95; flagged (> t): 5%.
  assert np.mean(s > t) == pytest.approx(0.05)
  s = np.r_[np.zeros(10), np.ones(10)]
  assert metrics.threshold_at_tpr(s, 0.95) == 1.0
  assert metrics.threshold_at_tpr(s, 0.5) == 0.0


# ------------------------------------------------------------- few-shot linear probe


def _blobs(rng, n, d, k, spread=1.0):
  centres = rng.normal(scale=2.0, size=(k, d))
  labels = np.r_[np.arange(k), rng.integers(0, k, n - k)]
  return centres[labels] + spread * rng.normal(size=(n, d)), labels


@pytest.mark.parametrize("n,d", [(300, 12), (40, 60)])  # primal and dual solves
def test_ridge_probe_matches_ridge_classifier(n, d):
  rng = _rng(11)
  x, y = _blobs(rng, n, d, 5, spread=3.0)
  x_test, _ = _blobs(rng, 200, d, 5, spread=3.0)
  for lam in (0.1, 10.0):
    ref = linear_model.RidgeClassifier(alpha=lam).fit(x, y)
    pred = metrics.ridge_probe(x, y, x_test, 5, lam, standardize=False)
    np.testing.assert_array_equal(pred, ref.predict(x_test))
    w, b = metrics._ridge_fit(x, y, 5, lam)
    np.testing.assert_allclose(w.T, ref.coef_, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(b, ref.intercept_, rtol=1e-6, atol=1e-9)
    # Independently: least squares on the augmented system, bias column unpenalised.
    a = np.block([[x, np.ones((n, 1))], [np.sqrt(lam) * np.eye(d), np.zeros((d, 1))]])
    target = np.r_[2 * _onehot(y, 5) - 1, np.zeros((d, 5))]
    wb = np.linalg.lstsq(a, target, rcond=None)[0]
    np.testing.assert_allclose(w, wb[:-1], rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(b, wb[-1], rtol=1e-6, atol=1e-8)
  # standardize=True is RidgeClassifier on features z-scored by training statistics.
  mean, std = x.mean(0), x.std(0) + 1e-5
  ref = linear_model.RidgeClassifier(alpha=3.0).fit((x - mean) / std, y)
  np.testing.assert_array_equal(metrics.ridge_probe(x, y, x_test, 5, 3.0),
                                ref.predict((x_test - mean) / std))


def test_fewshot_accuracy_is_deterministic_and_sensible():
  rng = _rng(12)
  x, y = _blobs(rng, 400, 16, 4, spread=0.3)
  x_test, y_test = x[300:], y[300:]
  x, y = x[:300], y[:300]
  acc = metrics.fewshot_accuracy(x, y, x_test, y_test, 5, 3, 4, l2_reg=1.0)
  assert acc == metrics.fewshot_accuracy(x, y, x_test, y_test, 5, [0, 1, 2], 4, l2_reg=1.0)
  assert acc == 1.0  # Well-separated blobs.
  idx = metrics.fewshot_indices(y, 5, 1, 4)
  np.testing.assert_array_equal(idx, metrics.fewshot_indices(y, 5, 1, 4))
  np.testing.assert_array_equal(y[idx], np.repeat(np.arange(4), 5))
  assert len(set(idx)) == 20
  assert not np.array_equal(idx, metrics.fewshot_indices(y, 5, 2, 4))
  # One seed by hand, on noisy data so the accuracy is not trivially 1.
  x, y = _blobs(rng, 400, 16, 4, spread=4.0)
  idx = metrics.fewshot_indices(y[:300], 3, 7, 4)
  manual = np.mean(metrics.ridge_probe(x[idx], y[idx], x[300:], 4, 8.0) == y[300:])
  assert metrics.fewshot_accuracy(x[:300], y[:300], x[300:], y[300:], 3, [7], 4,
                                  l2_reg=8.0) == manual
  # A class with fewer examples than shots gives all it has (here class 3 has 2).
  y_small = np.r_[np.repeat([0, 1, 2], 10), 3, 3]
  idx = metrics.fewshot_indices(y_small, 5, 0, 4)
  np.testing.assert_array_equal(np.bincount(y_small[idx]), [5, 5, 5, 2])
  assert metrics.fewshot_indices(y_small, 5, 0, 5).size == 17  # class 4: none


# --------------------------------------------------------------------- multi-label


def _multilabel_data(seed, n=200, k=6):
  rng = _rng(seed)
  targets = (rng.random((n, k)) < rng.uniform(0.1, 0.5, k)).astype(np.int64)
  scores = metrics.sigmoid(1.5 * (2 * targets - 1) + rng.normal(scale=1.5, size=(n, k)))
  return scores, targets


def test_average_precision_matches_sklearn():
  scores, targets = _multilabel_data(13)
  for s in (scores, np.round(scores, 1)):  # and with many ties
    ap = metrics.average_precision(s, targets)
    ref = skm.average_precision_score(targets, s, average=None)
    np.testing.assert_allclose(ap, ref)
    assert metrics.mean_average_precision(s, targets) == pytest.approx(np.mean(ref))
  targets[:, 2] = 0  # A label with no positives: NaN, left out of the mean.
  ap = metrics.average_precision(scores, targets)
  assert np.isnan(ap[2])
  assert metrics.mean_average_precision(scores, targets) == pytest.approx(
      np.mean(np.delete(ap, 2)))


def test_f1_scores_match_sklearn():
  scores, targets = _multilabel_data(14)
  thresholds = _rng(15).uniform(0.2, 0.8, 6)
  for t in (0.5, thresholds):
    pred = (scores >= t).astype(np.int64)
    out = metrics.f1_scores(scores, targets, t)
    for avg in ("micro", "macro"):
      ref = skm.f1_score(targets, pred, average=avg, zero_division=np.nan)
      assert out[avg] == pytest.approx(ref)
  # A label with no positives and no predictions is left out of the macro mean.
  targets[:, 0] = 0
  t = np.r_[np.inf, np.full(5, 0.5)]
  ref = skm.f1_score(targets, (scores >= t).astype(int), average="macro",
                     zero_division=np.nan)
  assert metrics.f1_scores(scores, targets, t)["macro"] == pytest.approx(ref)


def test_chosen_thresholds_maximise_f1_on_validation():
  scores, targets = _multilabel_data(16)
  chosen = metrics.choose_thresholds(scores, targets)
  per_label, shared = chosen
  assert per_label.shape == (6,) and np.isscalar(shared)
  at_half = metrics.f1_scores(scores, targets, 0.5)
  macro = metrics.f1_scores(scores, targets, per_label)["macro"]
  micro = metrics.f1_scores(scores, targets, shared)["micro"]
  assert macro >= at_half["macro"] and micro >= at_half["micro"]
  assert metrics.f1_scores(scores, targets, chosen) == {"micro": micro, "macro": macro}
  # Against sklearn on a grid of candidate thresholds (plus every observed score of one label).
  grid = np.linspace(0.0, 1.0, 41)
  for k in range(6):
    best = skm.f1_score(targets[:, k], scores[:, k] >= per_label[k])
    for t in np.r_[grid, scores[:, k]] if k == 0 else grid:
      assert best >= skm.f1_score(targets[:, k], scores[:, k] >= t, zero_division=0.0)
  assert micro == pytest.approx(skm.f1_score(targets, scores >= shared, average="micro"))
  for t in grid:
    assert micro >= skm.f1_score(targets, scores >= t, average="micro", zero_division=0.0)
  targets[:, 3] = 0
  assert metrics.choose_thresholds(scores, targets).per_label[3] == np.inf
