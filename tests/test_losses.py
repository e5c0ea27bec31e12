"""Losses against float64 NumPy references; class weights and their resolution."""

import numpy as np
import optax
import pytest

from vitcls import configs, losses, validate
from vitcls.configs import ConfigError


def _random_batch(seed, b=6, k=5):
  rng = np.random.default_rng(seed)
  logits = rng.normal(scale=3.0, size=(b, k)).astype(np.float32)
  soft = rng.dirichlet(np.ones(k), size=b).astype(np.float32)
  multi_hot = (rng.random((b, k)) < 0.4).astype(np.float32)
  weights = rng.uniform(0.2, 3.0, size=k).astype(np.float32)
  return logits, soft, multi_hot, weights


def _np_softmax_xent(logits, labels, ls=0.0, w=None):
  z = logits.astype(np.float64)
  y = labels.astype(np.float64) * (1 - ls) + ls / z.shape[-1]
  w = np.ones(z.shape[-1]) if w is None else w.astype(np.float64)
  m = z.max(-1, keepdims=True)
  logp = z - (m + np.log(np.exp(z - m).sum(-1, keepdims=True)))
  return -(w * y * logp).sum(-1)


def _np_sigmoid_xent(logits, labels, ls=0.0, w=None):
  z = logits.astype(np.float64)
  y = labels.astype(np.float64) * (1 - ls) + ls / z.shape[-1]
  w = np.ones(z.shape[-1]) if w is None else w.astype(np.float64)
  p = 1.0 / (1.0 + np.exp(-z))
  return (w * (-y * np.log(p) - (1 - y) * np.log(1 - p))).sum(-1)


@pytest.mark.parametrize("name", ["softmax_xent", "sigmoid_xent"])
@pytest.mark.parametrize("ls", [0.0, 0.1])
@pytest.mark.parametrize("weighted", [False, True])
def test_losses_match_numpy(name, ls, weighted):
  """softmax_xent on soft labels, sigmoid_xent on multi-hot ones."""
  logits, soft, multi_hot, weights = _random_batch(0 if name == "softmax_xent" else 1)
  labels, reference = ((soft, _np_softmax_xent) if name == "softmax_xent"
                       else (multi_hot, _np_sigmoid_xent))
  w = weights if weighted else None
  got = losses.get(name)(logits, labels, label_smoothing=ls, class_weights=w)
  assert got.shape == (6,) and got.dtype == np.float32
  np.testing.assert_allclose(got, reference(logits, labels, ls, w), rtol=1e-5)


def test_softmax_xent_unweighted_is_optax():
  logits, soft, _, _ = _random_batch(2, b=16, k=10)
  np.testing.assert_allclose(losses.softmax_xent(logits, soft),
                             optax.softmax_cross_entropy(logits, soft), rtol=1e-6)
  smooth = soft * 0.8 + 0.2 / 10
  np.testing.assert_allclose(losses.softmax_xent(logits, soft, label_smoothing=0.2),
                             optax.softmax_cross_entropy(logits, smooth), rtol=1e-6)


def test_softmax_xent_unit_weights_equal_no_weights():
  logits, soft, _, _ = _random_batch(3)
  np.testing.assert_array_equal(
      losses.softmax_xent(logits, soft, label_smoothing=0.1, class_weights=np.ones(5)),
      losses.softmax_xent(logits, soft, label_smoothing=0.1))


def test_sigmoid_xent_is_stable_for_large_logits():
  logits = np.array([[100.0, -100.0, 100.0, -100.0]], np.float32)
  labels = np.array([[1.0, 0.0, 0.0, 1.0]], np.float32)
  got = np.asarray(losses.sigmoid_xent(logits, labels))
  assert np.all(np.isfinite(got))
  # Right answers cost ~e^-100 each; each wrong one costs 100.
  np.testing.assert_allclose(got, [200.0], rtol=1e-6)
  assert np.all(np.isfinite(np.asarray(
      losses.sigmoid_xent(logits, labels, label_smoothing=0.1))))


def test_sigmoid_xent_sums_over_classes():
  logits = np.zeros((2, 7), np.float32)
  labels = np.zeros((2, 7), np.float32)
  np.testing.assert_allclose(losses.sigmoid_xent(logits, labels), 7 * np.log(2), rtol=1e-6)


def test_get_by_name():
  assert losses.get("softmax_xent") is losses.softmax_xent
  assert losses.get("sigmoid_xent") is losses.sigmoid_xent
  config = configs.resolve(configs.ConfigDict(), ["total_steps=10", "loss=focal"])
  with pytest.raises(ConfigError, match="loss: unknown value 'focal'.*softmax_xent, "
                     "sigmoid_xent"):
    validate.check(config)


def test_balanced_class_weights():
  counts = [10, 30, 60]
  w = losses.balanced_class_weights(counts)
  assert w.dtype == np.float32
  np.testing.assert_allclose(w, [100 / 30, 100 / 90, 100 / 180], rtol=1e-6)
  np.testing.assert_allclose(np.dot(counts, w), 100.0, rtol=1e-6)
  counts = np.random.default_rng(0).integers(1, 1000, size=37)
  np.testing.assert_allclose(np.dot(counts, losses.balanced_class_weights(counts)),
                             counts.sum(), rtol=1e-5)


def test_balanced_class_weights_reject_empty_class():
  with pytest.raises(ConfigError, match="class 2 has no examples"):
    validate.check_class_counts([5, 3, 0, 1], 4)


def test_resolve_class_weights():
  def no_scan():
    raise AssertionError("counts_fn must only run for 'balanced'")
  assert losses.resolve_class_weights(None, no_scan) is None
  w = losses.resolve_class_weights([1, 2.5, 0], no_scan)
  assert w.dtype == np.float32
  np.testing.assert_array_equal(w, [1, 2.5, 0])
  np.testing.assert_array_equal(losses.resolve_class_weights((1.0, 2.0), no_scan), [1, 2])
  calls = []
  w = losses.resolve_class_weights("balanced", lambda: calls.append(1) or [10, 30, 60])
  assert calls == [1]
  np.testing.assert_allclose(w, losses.balanced_class_weights([10, 30, 60]))


@pytest.mark.parametrize("spec, num_classes, message", [
    ("inverse", 3, "class_weights must be None, 'balanced' or a list of 3 weights, got "
     "'inverse'"),
    ([1.0, 2.0], 3, "must list 3 non-negative weights"),
    ([1.0, "a", 2.0], 3, r"must list 3 non-negative weights \(finite numbers\)"),
    ([1.0, -1.0, 2.0], 3, r"must list 3 non-negative weights \(finite numbers\)"),
    ([1.0, float("nan"), 2.0], 3, r"must list 3 non-negative weights \(finite numbers\)"),
    ([1.0, float("inf"), 2.0], 3, r"must list 3 non-negative weights \(finite numbers\)"),
    (1.5, 3, "class_weights must be a string or a list"),
    ({"a": 1}, 3, "class_weights must be a string or a list"),
    ("balanced", 4, "class counts have 3 classes but num_classes is 4"),
])
def test_resolve_class_weights_errors(spec, num_classes, message):
  """The checks of `validate`: the config's spec, then the split's counts at build time."""
  config = configs.resolve(configs.ConfigDict(), ["total_steps=10"])
  with config.unlocked(), config.ignore_type():
    config.class_weights, config.num_classes = spec, num_classes
  # The default data has 10 classes: only the class-weight problems are of interest here.
  found = [p for p in validate.problems(config) if "class_weights" in p]
  assert len(found) <= 1 and all("\n" not in p for p in found)
  with pytest.raises(ConfigError, match=message) as e:
    if found:
      raise ConfigError(found[0])
    validate.check_class_counts([10, 30, 60], num_classes)
  assert "\n" not in str(e.value)
