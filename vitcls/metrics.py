"""Evaluation metrics as pure NumPy functions of per-example arrays gathered on the host.

Why on the host: evaluators collect the exact per-example outputs (logits, features,
labels) of a whole split and only then compute metrics here, so every number is exact
and independent of the batch size, padding or device layout (no per-batch averaging
of non-additive quantities such as ECE, AUROC or average precision). Being plain NumPy,
each function is tested against scikit-learn or a hand computation.

Conventions, shared by every function below:
  * Inputs are NumPy arrays; arithmetic is float64; scalars come back as Python floats.
  * `labels` are int class indices in [0, K); `argmax` ties go to the lowest index.
  * OOD scores: higher = more out-of-distribution, and OOD is the positive class of
    AUROC / AUPR / FPR@TPR. MSP and energy are negated to follow this.
  * Brier score is the multi-class one, mean_i sum_c (p_ic - y_ic)^2 in [0, 2]; for K=2
    it is twice the binary Brier score of p(class 1) (sklearn's `brier_score_loss`).
  * A quantity with nothing to average over (a class with no examples, a label with no
    positives) is NaN, and means over classes or labels skip NaNs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, NamedTuple

import numpy as np
import scipy.optimize


# ------------------------------------------------------------------------- helpers


def logsumexp(x, axis=-1):
  """log sum_c exp(x_c) along `axis`, shifted by the max so it never overflows."""
  x = np.asarray(x, np.float64)
  m = np.max(x, axis=axis, keepdims=True)
  m = np.where(np.isfinite(m), m, 0.0)
  return np.squeeze(m, axis) + np.log(np.sum(np.exp(x - m), axis=axis))


def log_softmax(logits, axis=-1):
  """logits - logsumexp(logits): exact log-probabilities, no log(0)."""
  z = np.asarray(logits, np.float64)
  return z - np.expand_dims(logsumexp(z, axis), axis)


def softmax(logits, axis=-1):
  """exp(z - max z) / sum exp(z - max z): stable for any finite logits."""
  return np.exp(log_softmax(logits, axis))


def sigmoid(x):
  """1 / (1 + exp(-x)) written through exp(-|x|), so neither branch overflows."""
  x = np.asarray(x, np.float64)
  e = np.exp(-np.abs(x))
  return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def _labels(labels, num_classes: int | None = None) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be a 1-D int array, got {labels.dtype} {labels.shape}")
  if num_classes is not None and labels.size and (labels.min() < 0
                                                  or labels.max() >= num_classes):
    raise ValueError(f"labels must lie in [0, {num_classes})")
  return labels.astype(np.int64)


def _scores_2d(x, labels) -> np.ndarray:
  x = np.asarray(x, np.float64)
  if x.ndim != 2 or x.shape[0] != len(labels):
    raise ValueError(f"expected [N, K] with N={len(labels)}, got {x.shape}")
  return x


# ------------------------------------------------------------------ classification


def topk_accuracy(logits, labels, k: int = 1) -> float:
  """Fraction of examples whose label is among the k highest logits.

  Ties are broken like a stable descending sort (lower class index first), so k=1 is
  exactly `argmax(logits) == label`: the label's rank is the number of classes scoring
  strictly higher plus the equal-scoring classes with a lower index.
  """
  labels = _labels(labels)
  z = _scores_2d(logits, labels)
  _labels(labels, z.shape[1])
  true = z[np.arange(len(labels)), labels][:, None]
  lower_index = np.arange(z.shape[1])[None, :] < labels[:, None]
  rank = np.sum(z > true, axis=1) + np.sum((z == true) & lower_index, axis=1)
  return float(np.mean(rank < k))


def confusion_matrix(pred, labels, num_classes: int) -> np.ndarray:
  """[K, K] int64 counts; row = true class, column = predicted class."""
  labels = _labels(labels, num_classes)
  pred = _labels(pred, num_classes)
  if pred.shape != labels.shape:
    raise ValueError(f"pred {pred.shape} and labels {labels.shape} differ")
  flat = np.bincount(labels * num_classes + pred, minlength=num_classes * num_classes)
  return flat.reshape(num_classes, num_classes).astype(np.int64)


def per_class_accuracy(confusion) -> np.ndarray:
  """Recall of each class, C[c, c] / sum_j C[c, j]; NaN for a class with no examples."""
  c = np.asarray(confusion, np.float64)
  support = c.sum(axis=1)
  out = np.full(len(c), np.nan)
  np.divide(np.diag(c), support, out=out, where=support > 0)
  return out


def balanced_accuracy(confusion) -> float:
  """Mean per-class recall over the classes that have examples (sklearn's definition)."""
  acc = per_class_accuracy(confusion)
  return float(np.mean(acc[~np.isnan(acc)])) if np.any(~np.isnan(acc)) else float("nan")


def worst_class_accuracy(confusion) -> float:
  """Lowest per-class recall among the classes that have examples."""
  acc = per_class_accuracy(confusion)
  return float(np.min(acc[~np.isnan(acc)])) if np.any(~np.isnan(acc)) else float("nan")


def _group_key(value):
  value = value.item() if isinstance(value, np.generic) else value
  return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def group_metrics(logits, labels, groups) -> dict[Any, Any]:
  """Top-1 accuracy within each value of `groups` (e.g. a `slice_by` feature).

  Returns {value: {"top1": float, "count": int} for each group value (as Python
  scalars, bytes decoded as UTF-8), "worst_group_accuracy": the lowest of those
  top-1s (NaN with no examples)}.
  """
  labels = _labels(labels)
  z = _scores_2d(logits, labels)
  groups = np.asarray(groups)
  if groups.shape != labels.shape:
    raise ValueError(f"groups {groups.shape} and labels {labels.shape} differ")
  correct = np.argmax(z, axis=1) == labels
  values, index = np.unique(groups, return_inverse=True)
  counts = np.bincount(index, minlength=len(values))
  top1 = np.bincount(index, weights=correct, minlength=len(values)) / np.maximum(counts, 1)
  out: dict[Any, Any] = {_group_key(v): {"top1": float(a), "count": int(n)}
                         for v, a, n in zip(values, top1, counts)}
  out["worst_group_accuracy"] = float(top1.min()) if len(values) else float("nan")
  return out


# --------------------------------------------------------------------- calibration


def reliability_bins(probs, labels, num_bins: int = 15):
  """(bin_confidence, bin_accuracy, bin_count), each [num_bins], over max-prob bins.

  Confidence is max_c p_c and the prediction its argmax. Bins are equal-width and
  right-closed, (i/M, (i+1)/M], the first also taking 0. Empty bins have NaN
  confidence and accuracy and count 0.
  """
  labels = _labels(labels)
  p = _scores_2d(probs, labels)
  confidence = p.max(axis=1)
  correct = (np.argmax(p, axis=1) == labels).astype(np.float64)
  edges = np.linspace(0.0, 1.0, num_bins + 1)
  # searchsorted 'left' finds the first edge >= conf, so conf in (e_i, e_i+1] -> i.
  bins = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, num_bins - 1)
  count = np.bincount(bins, minlength=num_bins)
  conf_sum = np.bincount(bins, weights=confidence, minlength=num_bins)
  acc_sum = np.bincount(bins, weights=correct, minlength=num_bins)
  bin_conf = np.full(num_bins, np.nan)
  bin_acc = np.full(num_bins, np.nan)
  np.divide(conf_sum, count, out=bin_conf, where=count > 0)
  np.divide(acc_sum, count, out=bin_acc, where=count > 0)
  return bin_conf, bin_acc, count


def ece(probs, labels, num_bins: int = 15) -> float:
  """Expected calibration error, sum_b |B_b|/N |acc_b - conf_b| over `reliability_bins`.

  Temperature-scaled ECE is `ece(softmax(logits / fit_temperature(...)), labels)`.
  """
  conf, acc, count = reliability_bins(probs, labels, num_bins)
  full = count > 0
  return float(np.sum(count[full] * np.abs(acc[full] - conf[full])) / np.sum(count))


def nll(probs, labels, *, from_logits: bool = False, eps: float = 1e-12) -> float:
  """Mean negative log-likelihood of the true class, mean_i -log p_i[y_i].

  With `from_logits=True` the first argument is logits and log p is an exact
  log-softmax (preferred: no clipping needed). With probabilities, p_i[y_i] is clipped
  below at `eps` so a zero probability costs -log(eps) instead of infinity.
  """
  labels = _labels(labels)
  x = _scores_2d(probs, labels)
  _labels(labels, x.shape[1])
  rows = np.arange(len(labels))
  if from_logits:
    return float(-np.mean(log_softmax(x)[rows, labels]))
  return float(-np.mean(np.log(np.clip(x[rows, labels], eps, None))))


def brier(probs, labels) -> float:
  """Multi-class Brier score, mean_i sum_c (p_ic - [c == y_i])^2, in [0, 2].

  For K=2 this is twice sklearn's binary `brier_score_loss` on p(class 1), since both
  classes contribute the same squared error.
  """
  labels = _labels(labels)
  p = _scores_2d(probs, labels)
  _labels(labels, p.shape[1])
  err = p.copy()
  err[np.arange(len(labels)), labels] -= 1.0
  return float(np.mean(np.sum(err * err, axis=1)))


def fit_temperature(logits, labels, bounds=(1e-2, 1e2)) -> float:
  """T > 0 minimising mean NLL of softmax(logits / T) (Guo et al. 2017).

  The NLL is convex in beta = 1/T (logsumexp of a linear function minus a linear
  function), hence unimodal in t = log T; bounded Brent search over log T within
  `bounds` (scipy's minimize_scalar) therefore finds the global minimum to ~1e-7
  relative precision. A perfectly separable set would push T to the lower bound.
  """
  labels = _labels(labels)
  z = _scores_2d(logits, labels)
  _labels(labels, z.shape[1])
  true = z[np.arange(len(labels)), labels]

  def loss(log_t):
    beta = np.exp(-log_t)
    return float(np.mean(logsumexp(beta * z) - beta * true))

  res = scipy.optimize.minimize_scalar(
      loss, bounds=(np.log(bounds[0]), np.log(bounds[1])), method="bounded",
      options={"xatol": 1e-7})
  return float(np.exp(res.x))


# ----------------------------------------------------------------------------- OOD


def msp_score(logits) -> np.ndarray:
  """-max_c softmax(logits)_c per example (Hendrycks & Gimpel 2017), higher = more OOD."""
  return -np.max(softmax(logits), axis=-1)


def energy_score(logits) -> np.ndarray:
  """Energy -logsumexp(logits) per example (Liu et al. 2020, T=1), higher = more OOD."""
  return -logsumexp(logits)


@dataclasses.dataclass(frozen=True)
class MahalanobisFit:
  """Gaussians fitted to in-distribution training features (float64).

  `means` [C, D] are the class means of the C classes seen in training (`classes`
  their labels), sharing one covariance whose inverse is `precision`; `background_*`
  is one Gaussian over all training features, for the relative score.
  """
  means: np.ndarray
  classes: np.ndarray
  precision: np.ndarray
  background_mean: np.ndarray
  background_precision: np.ndarray


def _stable_inverse(cov, ridge: float) -> np.ndarray:
  """pinv(cov + ridge * mean(diag(cov)) * I), symmetric (ridge is relative to scale)."""
  d = cov.shape[0]
  scale = np.trace(cov) / d if d else 0.0
  return np.linalg.pinv(cov + ridge * scale * np.eye(d), hermitian=True)


def fit_mahalanobis(features, labels, num_classes: int, *,
                    ridge: float = 1e-6) -> MahalanobisFit:
  """Class means and tied covariance (Lee et al. 2018), plus a background Gaussian.

  Shared covariance: (1/N) sum_c sum_{i in c} (x_i - mu_c)(x_i - mu_c)^T; background:
  mean mu_0 and (1/N) sum_i (x_i - mu_0)(x_i - mu_0)^T (Ren et al. 2021). Both are
  inverted as pinv(S + ridge * mean(diag S) * I): the relative ridge keeps a
  rank-deficient covariance (fewer examples than dimensions) invertible whatever the
  feature scale; ridge=0 gives the plain pseudo-inverse. Classes with no training
  examples are left out.
  """
  labels = _labels(labels, num_classes)
  x = _scores_2d(features, labels)
  counts = np.bincount(labels, minlength=num_classes)
  classes = np.flatnonzero(counts)
  sums = np.zeros((num_classes, x.shape[1]))
  np.add.at(sums, labels, x)
  means = sums[classes] / counts[classes, None]
  background_mean = x.mean(axis=0)
  centred = x - background_mean
  lookup = np.zeros(num_classes, np.int64)
  lookup[classes] = np.arange(len(classes))
  within = x - means[lookup[labels]]
  n = len(labels)
  return MahalanobisFit(
      means=means, classes=classes,
      precision=_stable_inverse(within.T @ within / n, ridge),
      background_mean=background_mean,
      background_precision=_stable_inverse(centred.T @ centred / n, ridge))


def _class_distances(fit: MahalanobisFit, x, chunk: int = 8192):
  """(min_c MD_c(x), MD_0(x)) per row, by x'Px - 2 x'P mu + mu'P mu in row chunks.

  Everything is centred on the background mean first, which keeps the expansion's
  cancellation small; tiny negative round-off is clipped to 0.
  """
  x = np.asarray(x, np.float64) - fit.background_mean
  mu = fit.means - fit.background_mean
  p_mu = mu @ fit.precision  # [C, D]
  mu_term = np.sum(p_mu * mu, axis=1)
  best, background = [], []
  for start in range(0, len(x), chunk):
    xs = x[start:start + chunk]
    quad = np.sum((xs @ fit.precision) * xs, axis=1)
    md = quad[:, None] - 2.0 * xs @ p_mu.T + mu_term[None, :]
    best.append(np.maximum(md.min(axis=1), 0.0))
    background.append(np.maximum(np.sum((xs @ fit.background_precision) * xs, axis=1), 0.0))
  if not best:
    return np.zeros(0), np.zeros(0)
  return np.concatenate(best), np.concatenate(background)


def mahalanobis_score(fit: MahalanobisFit, features) -> np.ndarray:
  """min_c (x - mu_c)^T S^-1 (x - mu_c) per example, higher = more OOD."""
  return _class_distances(fit, features)[0]


def relative_mahalanobis_score(fit: MahalanobisFit, features) -> np.ndarray:
  """min_c [MD_c(x) - MD_0(x)] (Ren et al. 2021), MD_0 the background Gaussian's."""
  best, background = _class_distances(fit, features)
  return best - background


def _in_out(scores_in, scores_out):
  s_in = np.asarray(scores_in, np.float64).ravel()
  s_out = np.asarray(scores_out, np.float64).ravel()
  if not s_in.size or not s_out.size:
    raise ValueError("need at least one in-distribution and one OOD score")
  return s_in, s_out


def _average_ranks(x) -> np.ndarray:
  """1-based ranks of x, tied values sharing the mean of their ranks."""
  _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
  last = np.cumsum(counts)
  return (last - (counts - 1) / 2.0)[inverse]


def auroc(scores_in, scores_out) -> float:
  """Area under the ROC curve with OOD positive: P(s_out > s_in) + P(s_out = s_in) / 2.

  Computed as the Mann-Whitney U statistic from average ranks, so ties count half and
  all-equal scores give 0.5.
  """
  s_in, s_out = _in_out(scores_in, scores_out)
  ranks = _average_ranks(np.concatenate([s_in, s_out]))
  n_in, n_out = len(s_in), len(s_out)
  u = ranks[n_in:].sum() - n_out * (n_out + 1) / 2.0
  return float(u / (n_in * n_out))


def _ranked_counts(scores, positive):
  """(thresholds, tp, fp) at each distinct score, from the highest down (score >= t)."""
  scores = np.asarray(scores, np.float64)
  if not scores.size:
    return np.zeros(0), np.zeros(0, np.int64), np.zeros(0, np.int64)
  order = np.argsort(-scores, kind="stable")
  s = scores[order]
  y = np.asarray(positive, bool)[order]
  last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # end of each run of ties
  tp = np.cumsum(y)[last]
  return s[last], tp, (last + 1) - tp


def _binary_average_precision(scores, positive) -> float:
  """sum_n (R_n - R_{n-1}) P_n over distinct thresholds, high to low; NaN if no positive.

  The non-interpolated definition of sklearn's `average_precision_score`.
  """
  _, tp, fp = _ranked_counts(scores, positive)
  if not len(tp) or tp[-1] == 0:
    return float("nan")
  recall = tp / tp[-1]
  precision = tp / (tp + fp)
  return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def aupr(scores_in, scores_out) -> float:
  """Average precision with OOD as the positive class (AUPR-Out)."""
  s_in, s_out = _in_out(scores_in, scores_out)
  positive = np.r_[np.zeros(len(s_in), bool), np.ones(len(s_out), bool)]
  return _binary_average_precision(np.concatenate([s_in, s_out]), positive)


def _kth(sorted_desc, fraction: float) -> float:
  """The ceil(fraction * n)-th entry (1-based) of a descending array, at least the 1st."""
  k = int(np.ceil(fraction * len(sorted_desc) - 1e-9))
  return float(sorted_desc[min(max(k, 1), len(sorted_desc)) - 1])


def fpr_at_tpr(scores_in, scores_out, tpr: float = 0.95) -> float:
  """FPR@TPR with OOD positive: fraction of in-distribution scores >= t.

  t is the highest threshold flagging (score >= t) at least `tpr` of the OOD
  examples, i.e. the ceil(tpr * n_out)-th highest OOD score; since both rates fall as
  t rises, this is the lowest FPR among thresholds reaching that TPR (the FPR at the
  first ROC point with TPR >= tpr).
  """
  s_in, s_out = _in_out(scores_in, scores_out)
  t = _kth(np.sort(s_out)[::-1], tpr)
  return float(np.mean(s_in >= t))


def threshold_at_tpr(scores_in, tpr: float = 0.95) -> float:
  """Threshold t with at least `tpr` of in-distribution scores <= t, as low as possible.

  It is the ceil(tpr * n)-th lowest validation score; prediction flags an example as
  "I don't know" (OOD) when its score is strictly greater than t, so about 1 - tpr of
  in-distribution examples get flagged.
  """
  s = np.asarray(scores_in, np.float64).ravel()
  if not s.size:
    raise ValueError("need at least one in-distribution score")
  return _kth(np.sort(s), tpr)


# ------------------------------------------------------------- few-shot linear probe


def _ridge_fit(x, labels, num_classes: int, l2_reg: float):
  """(W [D, K], b [K]) of ridge regression to 2 * onehot - 1 with an unpenalised bias.

  The bias is fitted exactly by centring X and Y on their training means (what
  sklearn's Ridge(Classifier) does with fit_intercept=True): W solves
  (Xc^T Xc + l2 I) W = Xc^T Yc, b = mean(Y) - mean(X) W. When D > N it uses the
  equal dual form W = Xc^T (Xc Xc^T + l2 I)^-1 Yc, the smaller system.
  """
  y = 2.0 * np.eye(num_classes)[labels] - 1.0
  x_mean, y_mean = x.mean(axis=0), y.mean(axis=0)
  xc, yc = x - x_mean, y - y_mean
  n, d = xc.shape
  if n >= d:
    w = np.linalg.solve(xc.T @ xc + l2_reg * np.eye(d), xc.T @ yc)
  else:
    w = xc.T @ np.linalg.solve(xc @ xc.T + l2_reg * np.eye(n), yc)
  return w, y_mean - x_mean @ w


def ridge_probe(train_features, train_labels, test_features, num_classes: int,
                l2_reg: float = 2.0 ** 10, *, standardize: bool = True) -> np.ndarray:
  """Test predictions argmax(x W + b) of a closed-form ridge probe on frozen features.

  As big_vision's few-shot evaluator: targets 2 * onehot - 1, L2 penalty `l2_reg` on W
  (not on the bias; see `_ridge_fit`), and with `standardize` each feature is z-scored
  by the training mean and std + 1e-5 first. big_vision appends a constant-100 bias
  column instead, which is nearly but not exactly unpenalised; with standardize=False
  this equals sklearn's RidgeClassifier(alpha=l2_reg). Solved in float64; l2_reg > 0.
  """
  if not l2_reg > 0:
    raise ValueError(f"l2_reg must be > 0, got {l2_reg}")
  labels = _labels(train_labels, num_classes)
  x = _scores_2d(train_features, labels)
  x_test = np.asarray(test_features, np.float64)
  if standardize:
    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-5
    x, x_test = (x - mean) / std, (x_test - mean) / std
  w, b = _ridge_fit(x, labels, num_classes, l2_reg)
  return np.argmax(x_test @ w + b, axis=1)


def fewshot_indices(train_labels, shots: int, seed: int, num_classes: int) -> np.ndarray:
  """`shots` training indices per class, classes in order, without replacement.

  Drawn with np.random.default_rng([seed, shots]), so each (seed, shots) pair is
  deterministic and independent of the other shot counts. A class with fewer than
  `shots` examples contributes all it has, possibly none (as in big_vision), so a
  small probe split never fails an evaluation: a class without examples just gets
  all -1 targets and is in effect never predicted.
  """
  labels = _labels(train_labels, num_classes)
  rng = np.random.default_rng([seed, shots])
  picked = []
  for c in range(num_classes):
    members = np.flatnonzero(labels == c)
    picked.append(rng.choice(members, size=min(shots, len(members)), replace=False))
  return np.concatenate(picked)


def fewshot_accuracy(train_features, train_labels, test_features, test_labels,
                     shots: int, seeds: int | Iterable[int], num_classes: int,
                     l2_reg: float = 2.0 ** 10, *, standardize: bool = True) -> float:
  """Mean over seeds of the test accuracy of `ridge_probe` on `shots` examples a class.

  `seeds` is a count (seeds 0..n-1) or the seeds themselves; see `fewshot_indices`.
  """
  test_labels = _labels(test_labels, num_classes)
  train_features = np.asarray(train_features)
  seeds = range(seeds) if isinstance(seeds, (int, np.integer)) else list(seeds)
  accs = []
  for seed in seeds:
    idx = fewshot_indices(train_labels, shots, int(seed), num_classes)
    pred = ridge_probe(train_features[idx], np.asarray(train_labels)[idx], test_features,
                       num_classes, l2_reg, standardize=standardize)
    accs.append(np.mean(pred == test_labels))
  if not accs:
    raise ValueError("need at least one seed")
  return float(np.mean(accs))


# --------------------------------------------------------------------- multi-label


def _multilabel(scores, targets):
  s = np.asarray(scores, np.float64)
  t = np.asarray(targets)
  if s.ndim != 2 or s.shape != t.shape:
    raise ValueError(f"scores {s.shape} and targets {t.shape} must both be [N, K]")
  return s, t.astype(bool)


def average_precision(scores, targets) -> np.ndarray:
  """[K] average precision of each label (sklearn's definition); NaN if no positives."""
  s, t = _multilabel(scores, targets)
  return np.array([_binary_average_precision(s[:, k], t[:, k]) for k in range(s.shape[1])])


def mean_average_precision(scores, targets) -> float:
  """Mean of `average_precision` over the labels that have positives (mAP)."""
  ap = average_precision(scores, targets)
  return float(np.mean(ap[~np.isnan(ap)])) if np.any(~np.isnan(ap)) else float("nan")


def _best_f1_threshold(scores, positive) -> float:
  """The score t maximising F1 of (score >= t); the highest such t; +inf if no positive.

  F1 = 2 TP / (TP + FP + P) at every distinct score, from cumulative counts.
  """
  thresholds, tp, fp = _ranked_counts(scores, positive)
  if not len(tp) or tp[-1] == 0:
    return float("inf")
  f1 = 2.0 * tp / (tp + fp + tp[-1])
  return float(thresholds[np.argmax(f1)])


class Thresholds(NamedTuple):
  """Decision thresholds chosen on validation: positive iff score >= threshold."""
  per_label: np.ndarray  # [K], each maximising its label's F1 (for macro F1).
  shared: float  # One threshold for every label, maximising micro F1.


def choose_thresholds(val_scores, val_targets) -> Thresholds:
  """Thresholds maximising F1 on validation; positive iff score >= threshold.

  Each label's threshold maximises that label's F1 (so, used together, the macro F1);
  the shared one maximises micro F1 over all (example, label) pairs pooled. Candidates
  are the observed scores (any threshold between two consecutive distinct scores gives
  the same predictions); on a tie the highest is kept. A label with no validation
  positives gets +inf (never predicted).
  """
  s, t = _multilabel(val_scores, val_targets)
  per_label = np.array([_best_f1_threshold(s[:, k], t[:, k]) for k in range(s.shape[1])])
  return Thresholds(per_label, _best_f1_threshold(s.ravel(), t.ravel()))


def f1_scores(scores, targets, thresholds) -> dict[str, float]:
  """{"micro", "macro"} F1 of the predictions score >= threshold.

  `thresholds` is a scalar or [K] array used for both, or a `Thresholds` from
  `choose_thresholds`, whose shared threshold gives micro F1 and per-label ones macro.
  F1 = 2 TP / (2 TP + FP + FN). Micro pools the counts of all labels; macro averages
  per-label F1 over the labels where it is defined (any positive or any prediction),
  i.e. sklearn's f1_score with zero_division=np.nan.
  """
  if isinstance(thresholds, Thresholds):
    return {"micro": f1_scores(scores, targets, thresholds.shared)["micro"],
            "macro": f1_scores(scores, targets, thresholds.per_label)["macro"]}
  s, t = _multilabel(scores, targets)
  pred = s >= np.asarray(thresholds, np.float64)
  tp = np.sum(pred & t, axis=0).astype(np.float64)
  fp = np.sum(pred & ~t, axis=0)
  fn = np.sum(~pred & t, axis=0)
  denom = 2.0 * tp + fp + fn
  per_label = np.full(len(tp), np.nan)
  np.divide(2.0 * tp, denom, out=per_label, where=denom > 0)
  total = denom.sum()
  micro = float(2.0 * tp.sum() / total) if total > 0 else float("nan")
  defined = ~np.isnan(per_label)
  macro = float(np.mean(per_label[defined])) if np.any(defined) else float("nan")
  return {"micro": micro, "macro": macro}


# ------------------------------------------------------------------ ImageNet-ReaL


class RealAccuracy(NamedTuple):
  """ReaL top-1 over the images that have a label set, and how many had none."""
  top1: float  # NaN when no image has a label.
  count: int  # Images with a non-empty set: the denominator.
  skipped: int  # Images whose set is empty (the ReaL raters kept no label).


def real_accuracy(logits, label_sets) -> RealAccuracy:
  """Top-1 against ImageNet-ReaL's label sets (Beyer et al. 2020, arXiv 2006.07159).

  A prediction is right when the argmax class (lowest index on ties, as np.argmax) is in
  the image's set; images with an empty set are left out of both counts, as ReaL's
  authors and big_vision's classification evaluator do (`mask *= labels.max(axis=1)`,
  big_vision/evaluators/classification.py:41). `label_sets`: [N, K] multi-hot (what
  `multihot` makes of TFDS's `real_label`), any value > 0 meaning "in the set".
  """
  z = np.asarray(logits)
  sets = np.asarray(label_sets) > 0
  if z.ndim != 2 or sets.shape != z.shape:
    raise ValueError(f"expected logits and label sets of the same [N, K] shape, got "
                     f"{z.shape} and {sets.shape}")
  labelled = sets.any(axis=1)
  hits = sets[np.arange(len(z)), np.argmax(z, axis=1)] & labelled
  count = int(labelled.sum())
  top1 = float(hits.sum() / count) if count else float("nan")
  return RealAccuracy(top1, count, int(len(z) - count))
