"""Pure, jit-able train and eval steps.

The train step is the whole update of one global batch: on-device mixing (mixup /
CutMix), the loss (by name, with label smoothing and class weights), gradient
accumulation over micro-batches (a `lax.scan`, so a batch that does not fit in memory
gives the same update as if it did), the optimiser, and the EMA of the parameters; with
`skip_nonfinite_updates`, an update whose loss or gradient is not finite is dropped and
counted. All its randomness comes from `fold_in(state.rng, state.step)`, so a resumed run
is bitwise equal.

With a teacher (`config.distill`, a `Teacher` here), the step takes the teacher's params
as a third argument and runs it on the images the student sees, after mixing (each
micro-batch's own, under accumulation); the distillation loss of `distill_loss`
(`losses.distillation`) replaces the plain loss, and the metrics gain the top-1 agreement
of student and teacher. Without one, the step is the same program as before.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vitcls import losses, mixing

_MIX_SALT = 0x6d6978  # fold_in salt of the mixing key ("mix"); dropout keeps the step key.
# The step's metric with a teacher: the fraction of the batch where the student's top-1
# class is the teacher's (no "/": the report reads names with one as eval metrics).
AGREEMENT = "teacher_agreement"


@dataclasses.dataclass(frozen=True)
class StepOptions:
  """What the train step does besides the optimiser update; built from the config."""
  loss: str = "softmax_xent"
  label_smoothing: float = 0.0
  class_weights: Optional[Any] = None  # float32 [num_classes] or None.
  mixup_alpha: float = 0.0
  mixup_p: float = 0.0
  cutmix_alpha: float = 0.0
  mix_switch_prob: float = 0.5
  grad_accum_steps: int = 1
  ema_decay: float = 0.0
  ema_warmup: bool = False
  skip_nonfinite: bool = False
  distill_loss: str = ""  # One of configs.DISTILL_LOSSES; empty: no teacher.
  distill_temperature: float = 1.0
  distill_weight: float = 1.0

  @classmethod
  def from_config(cls, config, class_weights=None) -> "StepOptions":
    """The options a resolved config asks for; `class_weights` come from the data."""
    return cls(loss=config.loss, label_smoothing=config.label_smoothing,
               class_weights=class_weights, mixup_alpha=config.mixup.alpha,
               mixup_p=config.mixup.p, cutmix_alpha=config.cutmix.alpha,
               mix_switch_prob=config.mix_switch_prob,
               grad_accum_steps=config.grad_accum_steps, ema_decay=config.ema_decay,
               ema_warmup=config.ema_warmup,
               skip_nonfinite=config.skip_nonfinite_updates,
               distill_loss=config.distill.loss if config.distill.teacher_init else "",
               distill_temperature=config.distill.temperature,
               distill_weight=config.distill.weight)

  @property
  def mixes(self) -> bool:
    """Whether any mixup / CutMix is on: without it the step skips mixing entirely."""
    return bool(self.mixup_alpha or self.mixup_p or self.cutmix_alpha)


@dataclasses.dataclass(frozen=True)
class Teacher:
  """A frozen teacher as the step runs it: `model` on the student's images, resized to
  `res` x `res` (bilinear, antialiased when shrinking; 0: as they are), then through
  `prepare` (`config.distill.teacher_pp`'s JAX twins, which draw nothing).

  `apply` has a model's signature (`({"params": p}, images, train) -> (logits, aux)`,
  always in inference mode), so the evaluators run a teacher as they run a model;
  `logits` is what the train step takes, without a gradient.
  """
  model: Any
  res: int = 0
  prepare: Optional[Callable[[dict], dict]] = None

  def apply(self, variables, images, train: bool = False, **unused):
    """(logits, aux) of the teacher on the student's `images`, always in inference mode
    (`train` and rngs are ignored: no dropout, no stochastic depth)."""
    del train, unused
    if self.res:
      images = jax.image.resize(images.astype(jnp.float32),
                                (images.shape[0], self.res, self.res, images.shape[-1]),
                                method="bilinear")
    if self.prepare is not None:
      images = self.prepare({"image": images})["image"]
    return self.model.apply(jax.lax.stop_gradient(variables), images, train=False)

  def logits(self, params, images):
    """[B, K] logits of the teacher on the student's `images`, a constant to autodiff."""
    return jax.lax.stop_gradient(self.apply({"params": params}, images)[0])


def ema_decay_at(step, decay: float, warmup: bool):
  """The EMA decay of the update after `step` earlier ones.

  With warm-up (timm's ModelEmaV3, power 2/3): min(decay, 1 - (1 + step)^(-2/3)), which
  is 0 for the first update (the EMA starts as the params) and nears `decay` later.
  """
  if not warmup:
    return jnp.float32(decay)
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(jnp.float32(decay), 1.0 - (1.0 + step) ** (-2.0 / 3.0))


def _micro_batches(x, n: int):
  """[B, ...] -> [n, B/n, ...], micro-batch a = rows a, a+n, a+2n, ...

  Strided rather than contiguous so every device keeps its own rows (a batch sharded
  over devices in contiguous blocks needs no data movement when B/devices % n == 0).
  """
  return x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)


def make_train_step(model, tx, schedule, options: StepOptions = StepOptions(),
                    teacher: Optional[Teacher] = None) -> Callable:
  """train_step(state, batch) -> (state, metrics); dropout key fold_in(state.rng, step).

  With `teacher` (and `options.distill_loss`): train_step(state, batch, teacher_params).
  """
  loss_of = losses.get(options.loss)
  weights = None if options.class_weights is None else np.asarray(options.class_weights,
                                                                 np.float32)
  accum = int(options.grad_accum_steps)
  if bool(options.distill_loss) != (teacher is not None):
    raise ValueError("a teacher and options.distill_loss go together")
  distill_of = losses.distillation(options.distill_loss) if teacher is not None else None

  def mean_loss(params, images, labels, key):
    logits, _ = model.apply({"params": params}, images, train=True, rngs={"dropout": key})
    return jnp.mean(loss_of(logits, labels, label_smoothing=options.label_smoothing,
                            class_weights=weights))

  def distill_loss(params, images, labels, key, teacher_params):
    """(mean distillation loss, its metrics) of the student against the teacher, both on
    `images` (already mixed); `labels` as mixing left them (the loss smooths them)."""
    logits, aux = model.apply({"params": params}, images, train=True, rngs={"dropout": key})
    student = {"logits": logits}
    if "logits_dist" in aux:  # A distillation token's head (DeiT).
      student["logits_dist"] = aux["logits_dist"]
    taught = teacher.logits(teacher_params, images)
    loss = distill_of(student, taught, labels, temperature=options.distill_temperature,
                      weight=options.distill_weight, label_smoothing=options.label_smoothing)
    agree = jnp.argmax(logits, -1) == jnp.argmax(taught, -1)
    return jnp.mean(loss), {AGREEMENT: jnp.mean(agree.astype(jnp.float32))}

  def value_and_grads(params, images, labels, key, teacher_params):
    """((loss, metrics), grads) of one (micro-)batch; no metrics without a teacher."""
    if teacher is None:
      loss, grads = jax.value_and_grad(mean_loss)(params, images, labels, key)
      return (loss, {}), grads
    return jax.value_and_grad(distill_loss, has_aux=True)(params, images, labels, key,
                                                          teacher_params)

  def loss_and_grads(params, images, labels, rng, teacher_params):
    if accum == 1:
      return value_and_grads(params, images, labels, rng, teacher_params)

    def one(carry, micro):
      x, y, index = micro
      (loss, aux), grads = value_and_grads(params, x, y, jax.random.fold_in(rng, index),
                                           teacher_params)
      return (carry[0] + loss, jax.tree_util.tree_map(jnp.add, carry[1], aux),
              jax.tree_util.tree_map(jnp.add, carry[2], grads)), None

    aux = {} if teacher is None else {AGREEMENT: jnp.float32(0)}
    zeros = (jnp.float32(0), aux, jax.tree_util.tree_map(jnp.zeros_like, params))
    (loss, aux, grads), _ = jax.lax.scan(
        one, zeros, (_micro_batches(images, accum), _micro_batches(labels, accum),
                     jnp.arange(accum)))
    mean = lambda tree: jax.tree_util.tree_map(lambda g: g / accum, tree)  # noqa: E731
    return (loss / accum, mean(aux)), mean(grads)

  def train_step(state, batch, teacher_params=None):
    rng = jax.random.fold_in(state.rng, state.step)
    images, labels = batch["image"], batch["labels"]
    metrics = {}
    if options.mixes:
      images, labels, info = mixing.mix(
          jax.random.fold_in(rng, _MIX_SALT), images, labels,
          mixup_alpha=options.mixup_alpha, mixup_p=options.mixup_p,
          cutmix_alpha=options.cutmix_alpha, switch_prob=options.mix_switch_prob)
      metrics.update(info)
    (loss, aux), grads = loss_and_grads(state.params, images, labels, rng, teacher_params)
    metrics.update(aux)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema
    if options.ema_decay:
      decay = ema_decay_at(state.step, options.ema_decay, options.ema_warmup)
      ema = jax.tree_util.tree_map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)
      metrics["ema_decay"] = decay
    metrics.update({"loss": loss, "grad_norm": optax.tree.norm(grads),
                    "lr": schedule(state.step)})
    new = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema)
    if options.skip_nonfinite:
      new, metrics = _skip_if_nonfinite(state, new, loss, grads, metrics)
    return new, metrics
  return train_step


def _skip_if_nonfinite(old, new, loss, grads, metrics):
  """Keeps `old`'s params, optimiser state and EMA when the loss or a gradient is not
  finite (the step and its data still advance), and counts the skips."""
  finite = jnp.isfinite(loss) & jnp.all(jnp.stack(
      [jnp.all(jnp.isfinite(g)) for g in jax.tree_util.tree_leaves(grads)]))
  keep = lambda a, b: jax.tree_util.tree_map(  # noqa: E731
      lambda x, y: jnp.where(finite, x, y), a, b)
  in_a_row = jnp.where(finite, 0, old.skips[0] + 1)
  skips = jnp.stack([in_a_row, old.skips[1] + (~finite).astype(jnp.int32)])
  new = new.replace(params=keep(new.params, old.params),
                    opt_state=keep(new.opt_state, old.opt_state),
                    ema=keep(new.ema, old.ema), skips=skips)
  return new, {**metrics, "skipped_in_a_row": skips[0], "skipped_updates": skips[1]}


def make_eval_step(model, loss: str = "softmax_xent"):
  """eval_step(params, batch) -> sums over real (mask=1) examples: correct, loss, count."""
  loss_of = losses.get(loss)

  def eval_step(params, batch):
    logits, _ = model.apply({"params": params}, batch["image"], train=False)
    mask = batch["_mask"]
    labels = batch["labels"]
    correct = jnp.argmax(logits, -1) == jnp.argmax(labels, -1)
    return {"correct": jnp.sum(correct * mask),
            "loss": jnp.sum(loss_of(logits, labels) * mask),
            "count": jnp.sum(mask)}
  return eval_step
