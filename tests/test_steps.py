"""Loss, train step and eval step against NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vitcls import steps


def test_label_smoothed_xent_matches_numpy():
  logits = np.array([[2.0, 0.5, -1.0], [0.0, 0.0, 3.0]], np.float32)
  labels = np.eye(3, dtype=np.float32)[[0, 1]]
  smooth = labels * 0.8 + 0.2 / 3
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  np.testing.assert_allclose(steps.softmax_xent(logits, labels, 0.2),
                             -(smooth * logp).sum(-1), rtol=1e-6)


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
