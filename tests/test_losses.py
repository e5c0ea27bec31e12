"""Losses and distillation losses against float64 NumPy references; class weights."""

import jax
import jax.numpy as jnp
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


# ---------------------------------------------------------------- distillation losses
# References in float64 from the papers' formulas (and DeiT's losses.py for its two),
# written without vitcls's code: p = softmax(teacher / T), q = softmax(student / T).


def _np_softmax(z):
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _np_kl(teacher, student, t):
  """KL(softmax(teacher/t) || softmax(student/t)) per example, from the probabilities."""
  p, q = _np_softmax(teacher / t), _np_softmax(student / t)
  return (p * np.log(p / q)).sum(-1)


def _np_distill(name, logits, logits_dist, teacher, labels, t, w, ls):
  """Each registered loss, per example; `logits_dist` None: the student has no dist head."""
  head = logits if logits_dist is None else logits_dist
  k = logits.shape[-1]
  hard = _np_softmax_xent(logits, labels, ls)
  if name == "kl":  # Function matching: the teacher is the only target.
    return t * t * _np_kl(teacher, logits, t)
  if name == "soft_hard":  # Hinton et al.: cls logits only.
    return (1 - w) * hard + w * t * t * _np_kl(teacher, logits, t)
  if name == "deit_hard":  # F.cross_entropy(outputs_kd, teacher.argmax(1)), per example.
    nll = -np.log(_np_softmax(head)[np.arange(len(head)), teacher.argmax(-1)])
    return (1 - w) * hard + w * nll
  assert name == "deit_soft"  # kl_div(sum) * T^2 / numel: per example, divided by K.
  return (1 - w) * hard + w * t * t * _np_kl(teacher, head, t) / k


def _distill_batch(seed, b=8, k=7):
  rng = np.random.default_rng(seed)
  logits, logits_dist, teacher = (rng.normal(scale=2.5, size=(b, k)).astype(np.float32)
                                  for _ in range(3))
  one_hot = np.eye(k, dtype=np.float32)[rng.integers(0, k, size=b)]
  mixed = 0.7 * one_hot + 0.3 * one_hot[::-1]  # Mixup of one-hot labels.
  return logits, logits_dist, teacher, mixed


def _student(logits, logits_dist):
  return {"logits": logits} if logits_dist is None else {"logits": logits,
                                                          "logits_dist": logits_dist}


def test_distill_losses_names_are_the_registry():
  """The config's lists of names are the registries' keys (`configs` cannot import JAX)."""
  assert configs.DISTILL_LOSSES == tuple(losses._DISTILL_LOSSES)
  assert configs.LOSSES == tuple(losses._LOSSES)
  for name in configs.DISTILL_LOSSES:
    assert losses.distillation(name) is losses._DISTILL_LOSSES[name]


@pytest.mark.parametrize("name", configs.DISTILL_LOSSES)
@pytest.mark.parametrize("t", [1.0, 2.0, 5.0])
@pytest.mark.parametrize("w", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("dist_head", [False, True], ids=["no_dist", "dist"])
def test_distill_losses_match_numpy(name, t, w, dist_head):
  seed = 100 * configs.DISTILL_LOSSES.index(name) + int(10 * t) + int(10 * w)
  logits, logits_dist, teacher, labels = _distill_batch(seed)
  logits_dist = logits_dist if dist_head else None
  for ls in (0.0, 0.1):
    got = losses.distillation(name)(_student(logits, logits_dist), teacher, labels,
                                    temperature=t, weight=w, label_smoothing=ls)
    assert got.shape == (8,) and got.dtype == np.float32
    expected = _np_distill(name, logits, logits_dist, teacher, labels, t, w, ls)
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=1e-6)


def test_deit_soft_batch_mean_is_deits_numel_normalised_loss():
  """DeiT: base_loss * (1 - alpha) + alpha * kl_div(log q, log p, 'sum', log_target=True)
  * T^2 / outputs_kd.numel(), with base_loss the batch mean; vitcls's step means the
  per-example values over the batch."""
  logits, logits_dist, teacher, labels = _distill_batch(7, b=16, k=10)
  t, alpha = 3.0, 0.5
  log_p = np.log(_np_softmax(teacher / t))
  log_q = np.log(_np_softmax(logits_dist / t))
  kl_sum = (np.exp(log_p) * (log_p - log_q)).sum()  # F.kl_div(input=log_q, target=log_p).
  deit = ((1 - alpha) * _np_softmax_xent(logits, labels, 0.1).mean()
          + alpha * kl_sum * t * t / logits_dist.size)
  got = losses.distillation("deit_soft")(_student(logits, logits_dist), teacher, labels,
                                         temperature=t, weight=alpha, label_smoothing=0.1)
  np.testing.assert_allclose(np.mean(got), deit, rtol=1e-5)


def test_kl_is_zero_at_the_teacher_and_positive_elsewhere():
  rng = np.random.default_rng(3)
  for t in (0.5, 1.0, 4.0):
    teacher = rng.normal(scale=5.0, size=(32, 11)).astype(np.float32)
    same = losses.kl_to_teacher(teacher, teacher, t)
    np.testing.assert_allclose(same, 0.0, atol=1e-6)
    # A constant shift of the logits is the same distribution.
    np.testing.assert_allclose(losses.kl_to_teacher(teacher + 3.0, teacher, t), 0.0,
                               atol=1e-5)
    other = rng.normal(scale=5.0, size=(32, 11)).astype(np.float32)
    kl = np.asarray(losses.kl_to_teacher(other, teacher, t))
    assert np.all(kl >= 0) and np.all(kl > 1e-4)
  # Through the losses: a student equal to its teacher pays only the label term.
  logits, _, teacher, labels = _distill_batch(4)
  for name in ("kl", "soft_hard", "deit_soft"):
    fn = losses.distillation(name)
    got = fn({"logits": teacher, "logits_dist": teacher}, teacher, labels, temperature=2.0,
             weight=1.0, label_smoothing=0.0)
    np.testing.assert_allclose(got, 0.0, atol=1e-6)


def test_t_squared_keeps_the_gradient_scale_at_high_temperature():
  """Hinton et al. 2015, sec. 2.1: for large T, T^2 KL -> sum_c (s_c - t_c)^2 / (2K) of
  zero-mean logits, so its gradient dL/ds -> (s - t) / K, independent of T."""
  rng = np.random.default_rng(5)
  k = 9
  student = rng.normal(size=(4, k))
  teacher = rng.normal(size=(4, k))
  student -= student.mean(-1, keepdims=True)
  teacher -= teacher.mean(-1, keepdims=True)
  limit = ((student - teacher) ** 2).sum(-1) / (2 * k)
  s32, t32 = student.astype(np.float32), teacher.astype(np.float32)
  np.testing.assert_allclose(losses.kl_to_teacher(s32, t32, 100.0), limit, rtol=2e-2)
  for t in (20.0, 100.0):
    grad = jax.grad(lambda s, t=t: losses.kl_to_teacher(s, t32, t).sum())(s32)
    np.testing.assert_allclose(grad, (student - teacher) / k, rtol=0.1, atol=2e-3)
  # And at any T the loss is T^2 times the plain KL of the softened distributions.
  np.testing.assert_allclose(losses.kl_to_teacher(s32, t32, 3.0),
                             9.0 * _np_kl(teacher, student, 3.0), rtol=1e-5)


@pytest.mark.parametrize("name", configs.DISTILL_LOSSES)
def test_distill_gradients_are_finite_and_reach_the_right_head(name):
  """Finite gradients at extreme logits; the label term trains "logits", DeiT's
  distillation term "logits_dist" (and only it), the others "logits"."""
  fn = losses.distillation(name)
  logits, logits_dist, teacher, labels = _distill_batch(6)

  def grads(student, w, scale=1.0):
    student = {k: v * scale for k, v in student.items()}
    loss = lambda s: fn(s, teacher * scale, labels, temperature=2.0, weight=w,  # noqa: E731
                        label_smoothing=0.1).mean()
    return jax.grad(loss)(student)

  both = {"logits": logits, "logits_dist": logits_dist}
  for student in (both, {"logits": logits}):
    for w in (0.0, 0.5, 1.0):
      for scale in (1.0, 100.0):
        for g in grads(student, w, scale).values():
          assert np.all(np.isfinite(np.asarray(g)))
  g = grads(both, 1.0)  # Only the teacher term.
  deit = name.startswith("deit_")
  assert (np.abs(g["logits_dist"]).max() > 0) == deit
  assert (np.abs(g["logits"]).max() > 0) == (not deit)
  g = grads(both, 0.0)  # Only the label term (kl: still the teacher, on "logits").
  assert np.abs(g["logits_dist"]).max() == 0 and np.abs(g["logits"]).max() > 0


def test_deit_hard_targets_the_teachers_argmax_unsmoothed():
  k = 4
  teacher = np.array([[0.0, 5.0, 1.0, 2.0]], np.float32)
  labels = np.eye(k, dtype=np.float32)[[3]]
  dist = np.array([[0.0, 0.0, 0.0, 0.0]], np.float32)
  got = losses.distillation("deit_hard")({"logits": dist, "logits_dist": dist}, teacher,
                                         labels, temperature=7.0, weight=1.0,
                                         label_smoothing=0.3)
  np.testing.assert_allclose(got, [np.log(k)], rtol=1e-6)  # Uniform q: -log(1/K).
  dist = np.array([[-9.0, 9.0, -9.0, -9.0]], np.float32)  # Confident on the argmax.
  got = losses.distillation("deit_hard")({"logits": dist, "logits_dist": dist}, teacher,
                                         labels, temperature=7.0, weight=1.0,
                                         label_smoothing=0.3)
  assert float(got[0]) < 1e-6


def test_distill_losses_return_float32_from_bfloat16_logits():
  logits, logits_dist, teacher, labels = _distill_batch(8)
  bf = lambda x: jnp.asarray(x, jnp.bfloat16)  # noqa: E731
  for name in configs.DISTILL_LOSSES:
    got = losses.distillation(name)({"logits": bf(logits), "logits_dist": bf(logits_dist)},
                                    bf(teacher), labels, temperature=2.0, weight=0.5,
                                    label_smoothing=0.1)
    assert got.dtype == jnp.float32 and got.shape == (8,)
