"""Pure, jit-able train and eval steps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def softmax_xent(logits, labels, label_smoothing: float = 0.0):
  """Per-example cross-entropy against (smoothed) one-hot or soft `labels`."""
  if label_smoothing:
    labels = labels * (1.0 - label_smoothing) + label_smoothing / labels.shape[-1]
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), labels)


def make_train_step(model, tx, schedule, label_smoothing: float = 0.0):
  """train_step(state, batch) -> (state, metrics); dropout key fold_in(state.rng, step)."""
  def train_step(state, batch):
    rng = jax.random.fold_in(state.rng, state.step)

    def loss_fn(params):
      logits, _ = model.apply({"params": params}, batch["image"], train=True,
                              rngs={"dropout": rng})
      return jnp.mean(softmax_xent(logits, batch["labels"], label_smoothing))

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
               "lr": schedule(state.step)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics
  return train_step


def make_eval_step(model):
  """eval_step(params, batch) -> sums over real (mask=1) examples: correct, loss, count."""
  def eval_step(params, batch):
    logits, _ = model.apply({"params": params}, batch["image"], train=False)
    mask = batch["_mask"]
    labels = batch["labels"]
    correct = jnp.argmax(logits, -1) == jnp.argmax(labels, -1)
    return {"correct": jnp.sum(correct * mask),
            "loss": jnp.sum(softmax_xent(logits, labels) * mask),
            "count": jnp.sum(mask)}
  return eval_step
