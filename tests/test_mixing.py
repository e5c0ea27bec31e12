"""Mixup and CutMix against NumPy loops, box statistics, and `mix` under jit."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitcls import configs, mixing, validate
from vitcls.configs import ConfigError

B, H, W, C, K = 5, 8, 12, 3, 4


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(B, H, W, C)).astype(np.float32)
  labels = np.eye(K, dtype=np.float32)[rng.integers(0, K, size=B)]
  return images, labels


def test_mixup_with_matches_numpy():
  images, labels = _batch()
  lam = 0.7
  want_x, want_y = np.empty_like(images), np.empty_like(labels)
  for i in range(B):
    j = (i - 1) % B
    want_x[i] = lam * images[i] + (1 - lam) * images[j]
    want_y[i] = lam * labels[i] + (1 - lam) * labels[j]
  x, y = mixing.mixup_with(images, labels, lam)
  np.testing.assert_allclose(x, want_x, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(y, want_y, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(np.sum(y, -1), 1.0, rtol=1e-6)


def test_cutmix_with_matches_numpy():
  images, labels = _batch(1)
  top, left, bh, bw = 2, 7, 3, 5  # Rows 2..4, columns 7..11 (touches the right edge).
  want_x, want_y = images.copy(), np.empty_like(labels)
  area = bh * bw / (H * W)
  for i in range(B):
    j = (i - 1) % B
    want_x[i, top:top + bh, left:left + bw, :] = images[j, top:top + bh, left:left + bw, :]
    want_y[i] = (1 - area) * labels[i] + area * labels[j]
  box = tuple(jnp.int32(v) for v in (top, left, bh, bw))
  x, y = jax.jit(mixing.cutmix_with)(images, labels, box)
  np.testing.assert_array_equal(x, want_x)
  np.testing.assert_allclose(y, want_y, rtol=1e-6, atol=1e-7)


def test_cutmix_with_empty_box_changes_nothing():
  images, labels = _batch(2)
  x, y = mixing.cutmix_with(images, labels, (jnp.int32(3), jnp.int32(3), 0, 0))
  np.testing.assert_array_equal(x, images)
  np.testing.assert_allclose(y, labels)


def test_cutmix_with_full_box_is_the_partner_exactly():
  images, labels = _batch(3)
  full = (0, 0, H, W)
  x, y = jax.jit(mixing.cutmix_with)(images, labels, full)
  np.testing.assert_array_equal(x, np.roll(images, 1, 0))
  np.testing.assert_array_equal(y, np.roll(labels, 1, 0))
  assert float(jax.jit(mixing.cutmix_lam, static_argnums=(1, 2))(full, H, W)) == 0.0


def test_cutmix_box_is_deterministic_and_inside_the_image():
  box_fn = jax.jit(functools.partial(mixing.cutmix_box, height=32, width=48))
  keys = jax.random.split(jax.random.PRNGKey(0), 500)
  lams = jax.random.uniform(jax.random.PRNGKey(1), (500,))
  boxes = np.asarray(jax.vmap(box_fn)(keys, lam=lams)).T  # [500, 4]
  again = np.asarray(jax.vmap(box_fn)(keys, lam=lams)).T
  np.testing.assert_array_equal(boxes, again)
  assert np.asarray(box_fn(keys[0], lam=0.3)[0]).dtype == np.int32
  top, left, bh, bw = boxes.T
  assert np.all(top >= 0) and np.all(left >= 0) and np.all(bh >= 0) and np.all(bw >= 0)
  assert np.all(top + bh <= 32) and np.all(left + bw <= 48)
  # Never larger than the cut size int(H * sqrt(1 - lam)).
  ratio = np.sqrt(1 - np.asarray(lams, np.float64))
  assert np.all(bh <= np.floor(32 * ratio) + 1e-9) and np.all(bw <= np.floor(48 * ratio))


def test_cutmix_box_area_is_one_minus_lam_away_from_edges():
  height = width = 224
  lam = 0.6
  keys = jax.random.split(jax.random.PRNGKey(3), 400)
  boxes = np.asarray(jax.vmap(lambda k: jnp.stack(
      mixing.cutmix_box(k, height, width, lam)))(keys))
  top, left, bh, bw = boxes.T
  cut = int(224 * np.sqrt(1 - lam))
  unclipped = (bh == cut) & (bw == cut)
  away = ((top > 0) & (left > 0) & (top + bh < height) & (left + bw < width))
  assert away.sum() > 20 and np.all(unclipped[away])
  frac = (bh * bw / (height * width))[away]
  np.testing.assert_allclose(frac.mean(), 1 - lam, atol=0.01)
  # Clipped boxes exist (centres near edges) and are smaller.
  assert np.any(~unclipped) and np.all((bh * bw)[~unclipped] < cut * cut)


def _jit_mix(**config):
  """jit(mix) for one static config, compiled once per test session."""
  return _jit_mix_cached(tuple(sorted(config.items())))


@functools.lru_cache(maxsize=None)
def _jit_mix_cached(config):
  return jax.jit(functools.partial(mixing.mix, **dict(config)))


@pytest.mark.parametrize("config", [
    dict(mixup_alpha=0.8),
    dict(mixup_p=0.2),
    dict(cutmix_alpha=1.0),
    dict(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5),
])
def test_mix_keeps_one_hot_labels_distributions(config):
  images, labels = _batch(4)
  fn = _jit_mix(**config)
  for seed in range(50):
    x, y, info = fn(jax.random.PRNGKey(seed), images, labels)
    assert x.shape == images.shape and x.dtype == images.dtype
    np.testing.assert_allclose(np.sum(y, -1), 1.0, rtol=1e-5)
    assert np.all(np.asarray(y) >= 0) and np.all(np.isfinite(np.asarray(x)))
    lam = float(info["mix_lam"])
    assert 0.0 <= lam <= 1.0
    # Each label row is lam * own + (1 - lam) * partner.
    np.testing.assert_allclose(y, lam * labels + (1 - lam) * np.roll(labels, 1, 0),
                               atol=1e-5)


def test_mix_mixup_pixels_use_the_reported_lam():
  images, labels = _batch(5)
  x, y, info = _jit_mix(mixup_alpha=0.4)(jax.random.PRNGKey(7), images, labels)
  want_x, want_y = mixing.mixup_with(images, labels, info["mix_lam"])
  np.testing.assert_allclose(x, want_x, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(y, want_y, rtol=1e-6, atol=1e-7)
  assert float(info["mix_cutmix"]) == 0.0


def test_mix_cutmix_pixels_come_from_the_partner():
  images, labels = _batch(6)
  partner = np.roll(images, 1, 0)
  fn = _jit_mix(cutmix_alpha=1.0)
  for seed in range(20):
    x, _, info = fn(jax.random.PRNGKey(seed), images, labels)
    x = np.asarray(x)
    assert float(info["mix_cutmix"]) == 1.0
    pasted = np.all(x == partner, axis=(0, 3)) & ~np.all(x == images, axis=(0, 3))
    np.testing.assert_array_equal(np.all((x == images) | (x == partner)), True)
    np.testing.assert_allclose(1 - pasted.mean(), info["mix_lam"], atol=1e-6)


def test_mixup_p_folds_lam_to_at_least_a_half():
  images, labels = _batch(7)
  fn, lams = _jit_mix(mixup_p=0.2), []
  for seed in range(100):
    lams.append(float(fn(jax.random.PRNGKey(seed), images, labels)[2]["mix_lam"]))
  assert min(lams) >= 0.5
  unfolded = _jit_mix(mixup_alpha=0.2)
  lams = [float(unfolded(jax.random.PRNGKey(s), images, labels)[2]["mix_lam"])
          for s in range(100)]
  assert min(lams) < 0.5 < max(lams)


def test_mix_switches_at_about_switch_prob():
  images, labels = _batch(8)
  fn = _jit_mix(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.3)
  keys = jax.random.split(jax.random.PRNGKey(11), 200)
  cut = np.array([float(fn(k, images, labels)[2]["mix_cutmix"]) for k in keys])
  # Binomial(200, 0.3): mean 60, sd 6.5.
  assert 60 - 4 * 6.5 < cut.sum() < 60 + 4 * 6.5
  assert 0 < cut.sum() < 200


def test_mix_switch_prob_edges():
  images, labels = _batch(9)
  keys = jax.random.split(jax.random.PRNGKey(12), 20)
  for prob, want in [(0.0, 0.0), (1.0, 1.0)]:
    fn = _jit_mix(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=prob)
    assert all(float(fn(k, images, labels)[2]["mix_cutmix"]) == want for k in keys)


def test_mix_all_off_returns_inputs():
  images, labels = _batch(10)
  x, y, info = mixing.mix(jax.random.PRNGKey(0), images, labels)
  assert x is images and y is labels and info == {}
  x, y, info = mixing.mix(jax.random.PRNGKey(0), images, labels, mixup_alpha=0.0,
                          cutmix_alpha=0.0, switch_prob=0.7)
  assert x is images and y is labels and info == {}


def test_mix_same_rng_same_bits():
  images, labels = _batch(11)
  config = dict(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5)
  key = jax.random.fold_in(jax.random.PRNGKey(5), 17)
  a = _jit_mix(**config)(key, images, labels)
  b = jax.jit(lambda k, x, y: mixing.mix(k, x, y, **config))(key, images, labels)
  for other in (b, _jit_mix(**config)(key, images, labels)):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(other)):
      np.testing.assert_array_equal(u, v)


def _mix_config(mixup_alpha=0.0, mixup_p=0.0, cutmix_alpha=0.0, switch_prob=0.5):
  """A runnable config with `mix`'s settings (they are checked by `vitcls.validate`)."""
  config = configs.resolve(configs.ConfigDict(), ["total_steps=10"])
  with config.unlocked(), config.ignore_type():
    config.mixup.alpha, config.mixup.p = mixup_alpha, mixup_p
    config.cutmix.alpha, config.mix_switch_prob = cutmix_alpha, switch_prob
  return config


@pytest.mark.parametrize("kwargs, message", [
    (dict(mixup_alpha=-0.1), "mixup.alpha must be a finite number >= 0"),
    (dict(mixup_p=-1), "mixup.p must be a finite number >= 0"),
    (dict(cutmix_alpha=-1.0), "cutmix.alpha must be a finite number >= 0"),
    (dict(mixup_alpha=0.8, mixup_p=0.2), "set alpha .* or p .*, not both"),
    (dict(switch_prob=1.5), r"mix_switch_prob must be in \[0, 1\]"),
    (dict(switch_prob=-0.1), r"mix_switch_prob must be in \[0, 1\]"),
    (dict(mixup_alpha="0.8"), "mixup.alpha must be a number"),
    (dict(cutmix_alpha=float("inf")), "cutmix.alpha must be a finite number"),
])
def test_validate_errors(kwargs, message):
  with pytest.raises(ConfigError, match=message) as e:
    validate.check(_mix_config(**kwargs))
  assert "\n" not in str(e.value)


def test_validate_accepts_good_settings():
  assert validate.problems(_mix_config(0.0, 0.0, 0.0, 0.5)) == []
  assert validate.problems(_mix_config(0.8, 0.0, 1.0, 0.0)) == []
  assert validate.problems(_mix_config(0.0, 1, 1.0, 1.0)) == []
