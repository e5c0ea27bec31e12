"""Train step (mixing, accumulation, EMA, losses) and eval step against references."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vitcls import steps


class _Linear:
  """A stand-in model: logits = x @ w, aux empty."""

  def apply(self, variables, images, train=False, rngs=None):
    return images.reshape(images.shape[0], -1) @ variables["params"]["w"], {}


def test_train_step_is_one_sgd_update_on_the_mean_loss():
  from vitcls.state import TrainState
  x = np.random.default_rng(0).normal(size=(4, 1, 1, 3)).astype(np.float32)
  y = np.eye(2, dtype=np.float32)[[0, 1, 1, 0]]
  w = np.zeros((3, 2), np.float32)
  tx = optax.sgd(0.5)
  state = TrainState(step=jnp.int32(0), params={"w": jnp.asarray(w)},
                     opt_state=tx.init({"w": w}), rng=jax.random.PRNGKey(0))
  new, metrics = steps.make_train_step(_Linear(), tx, lambda s: 0.5)(state, {
      "image": x, "labels": y})
  # Gradient of mean softmax xent w.r.t. w at w=0: X^T (softmax - y) / n, softmax = 1/2.
  grad = x.reshape(4, 3).T @ (0.5 - y) / 4
  np.testing.assert_allclose(new.params["w"], w - 0.5 * grad, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(metrics["loss"], np.log(2), rtol=1e-6)
  np.testing.assert_allclose(metrics["grad_norm"], np.linalg.norm(grad), rtol=1e-5)
  assert int(new.step) == 1


def test_eval_step_counts_only_unmasked_examples():
  x = np.eye(3, dtype=np.float32).reshape(3, 1, 1, 3)
  w = np.array([[1, 0], [0, 1], [1, 0]], np.float32)  # Predicts 0, 1, 0.
  batch = {"image": x, "labels": np.eye(2, dtype=np.float32)[[0, 0, 1]],
           "_mask": np.array([1, 1, 0], np.float32)}
  out = steps.make_eval_step(_Linear())({"w": w}, batch)
  assert float(out["correct"]) == 1.0 and float(out["count"]) == 2.0
  expected_loss = (np.log(1 + np.e) - 1) + np.log(1 + np.e)  # Examples 0 and 1.
  np.testing.assert_allclose(out["loss"], expected_loss, rtol=1e-6)


def _state(params, tx, ema=False):
  from vitcls.state import TrainState
  params = jax.tree.map(jnp.asarray, params)
  return TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params),
                    rng=jax.random.PRNGKey(0),
                    ema=jax.tree.map(jnp.copy, params) if ema else None)


def _tiny_vit():
  from vitcls.models import vit
  model = vit.Model(num_classes=3, variant="mu/4", head_zeroinit=False)
  x = jax.random.uniform(jax.random.key(1), (16, 8, 8, 3), minval=-1, maxval=1)
  y = jax.nn.one_hot(jnp.arange(16) % 3, 3)
  return model, model.init(jax.random.key(0), x[:1])["params"], {"image": x, "labels": y}


def test_accumulating_4_micro_batches_equals_one_big_batch():
  # SGD with momentum, not Adam: Adam divides by sqrt(v) and so turns the fp32 rounding
  # noise of gradients that are zero in exact arithmetic (attention key biases) into
  # full-size steps, which differ between any two summation orders.
  model, params, batch = _tiny_vit()
  tx = optax.sgd(0.5, momentum=0.9)
  runs = {}
  for accum in (1, 4):
    step = jax.jit(steps.make_train_step(model, tx, lambda s: 1e-2,
                                         steps.StepOptions(grad_accum_steps=accum)))
    state, losses = _state(params, tx), []
    for _ in range(3):
      state, metrics = step(state, batch)
      losses.append(float(metrics["loss"]))
    runs[accum] = (losses, state.params)
  np.testing.assert_allclose(runs[4][0], runs[1][0], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(runs[4][1]), jax.tree.leaves(runs[1][1])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  moved = [np.max(np.abs(a - b)) for a, b in zip(jax.tree.leaves(runs[1][1]),
                                                   jax.tree.leaves(params))]
  assert max(moved) > 1e-3  # The three steps really trained.


def test_micro_batches_are_strided_rows():
  x = np.arange(8)
  np.testing.assert_array_equal(steps._micro_batches(x, 4), [[0, 4], [1, 5], [2, 6], [3, 7]])


@pytest.mark.parametrize("warmup", [False, True])
def test_ema_matches_its_closed_form_after_n_steps(warmup):
  x = np.random.default_rng(0).normal(size=(4, 1, 1, 3)).astype(np.float32)
  batch = {"image": x, "labels": np.eye(2, dtype=np.float32)[[0, 1, 1, 0]]}
  w0 = np.random.default_rng(1).normal(size=(3, 2)).astype(np.float32)
  tx, d = optax.sgd(0.5), 0.9
  step = jax.jit(steps.make_train_step(_Linear(), tx, lambda s: 0.5, steps.StepOptions(
      ema_decay=d, ema_warmup=warmup)))
  state, trajectory = _state({"w": w0}, tx, ema=True), [w0.astype(np.float64)]
  for _ in range(6):
    state, _ = step(state, batch)
    trajectory.append(np.asarray(state.params["w"], np.float64))
  n = len(trajectory) - 1
  if warmup:  # Decay of update t: min(d, 1 - (1+t)^(-2/3)); 0 first, so p_0 drops out.
    decays = [min(d, 1 - (1 + t) ** (-2 / 3)) for t in range(n)]
  else:
    decays = [d] * n
  # Closed form: ema_n = prod(d_t) p_0 + sum_i (1 - d_{i-1}) prod_{t >= i} d_t p_i.
  expected = np.prod(decays) * trajectory[0]
  for i in range(1, n + 1):
    expected += (1 - decays[i - 1]) * np.prod(decays[i:]) * trajectory[i]
  np.testing.assert_allclose(state.ema["w"], expected, rtol=1e-5, atol=1e-6)
  assert not np.allclose(state.ema["w"], state.params["w"], atol=1e-3)


def test_mixing_and_the_loss_are_wired_into_the_step():
  from vitcls import losses, mixing
  model, params, batch = _tiny_vit()
  tx = optax.sgd(0.1)
  options = steps.StepOptions(loss="sigmoid_xent", mixup_alpha=0.4, cutmix_alpha=1.0,
                              class_weights=[1.0, 2.0, 0.5], label_smoothing=0.1)
  state = _state(params, tx)
  _, metrics = jax.jit(steps.make_train_step(model, tx, lambda s: 0.1, options))(state, batch)
  rng = jax.random.fold_in(jax.random.fold_in(state.rng, 0), steps._MIX_SALT)
  images, labels, _ = mixing.mix(rng, batch["image"], batch["labels"], mixup_alpha=0.4,
                                 cutmix_alpha=1.0, switch_prob=0.5)
  logits, _ = model.apply({"params": params}, images, train=True,
                          rngs={"dropout": jax.random.fold_in(state.rng, 0)})
  expected = np.mean(losses.sigmoid_xent(logits, labels, label_smoothing=0.1,
                                         class_weights=np.array([1.0, 2.0, 0.5], np.float32)))
  np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-5)
  assert not np.allclose(images, batch["image"])  # The batch really was mixed.


def test_nonfinite_updates_are_skipped_and_counted():
  """A NaN batch leaves params, Adam moments and EMA bit for bit; finite ones train."""
  x = np.random.default_rng(0).normal(size=(4, 1, 1, 3)).astype(np.float32)
  y = np.eye(2, dtype=np.float32)[[0, 1, 1, 0]]
  bad = {"image": np.where(np.arange(3) == 1, np.nan, x).astype(np.float32), "labels": y}
  good = {"image": x, "labels": y}
  tx = optax.adam(0.1)
  skip = jax.jit(steps.make_train_step(_Linear(), tx, lambda s: 0.1, steps.StepOptions(
      skip_nonfinite=True, ema_decay=0.9)))
  plain = jax.jit(steps.make_train_step(_Linear(), tx, lambda s: 0.1, steps.StepOptions(
      ema_decay=0.9)))
  w0 = {"w": np.random.default_rng(1).normal(size=(3, 2)).astype(np.float32)}
  state = _state(w0, tx, ema=True).replace(skips=jnp.zeros((2,), jnp.int32))
  reference = _state(w0, tx, ema=True)
  counts = []
  for batch in (good, bad, bad, good, bad):
    before = state
    state, metrics = skip(state, batch)
    counts.append((int(metrics["skipped_in_a_row"]), int(metrics["skipped_updates"])))
    if batch is bad:
      assert not np.isfinite(float(metrics["loss"]))
      for a, b in zip(jax.tree.leaves((before.params, before.opt_state, before.ema)),
                      jax.tree.leaves((state.params, state.opt_state, state.ema))):
        np.testing.assert_array_equal(a, b)
    else:  # Finite batches give exactly the updates of a run that never saw the bad ones.
      reference, _ = plain(reference, batch)
      for a, b in zip(jax.tree.leaves((reference.params, reference.opt_state)),
                      jax.tree.leaves((state.params, state.opt_state))):
        np.testing.assert_array_equal(a, b)
  assert counts == [(0, 0), (1, 1), (2, 2), (0, 2), (1, 3)]
  assert int(state.step) == 5  # The step (and with it the data stream) still advances.
