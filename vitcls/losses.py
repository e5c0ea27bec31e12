"""Per-example classification losses, chosen by name from the config.

Why a module: the train step should not care which loss a run uses, and class
weights (for imbalanced data) are resolved once on the host, not in the step.
Every loss maps (logits [B, K], labels [B, K]) -> [B] in float32; the step takes
the mean over the batch. Labels may be one-hot, soft (mixup) or multi-hot.

Label smoothing is y * (1 - ls) + ls / K for both losses: for softmax it is the
usual one; for sigmoid it equals timm's BinaryCrossEntropy (off = ls / K,
on = 1 - ls + ls / K). Class weights w [K] multiply each class's term.

Distillation losses (`distillation(name)`, `configs.DISTILL_LOSSES`) also take the
student's outputs as a dict and the teacher's logits; see `_DISTILL_LOSSES`.

Names (`configs.LOSSES`) and class weights are checked by `vitcls.validate`, the label
counts of "balanced" weights by `validate.check_class_counts`; not again here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax


def _smooth(labels, label_smoothing: float):
  labels = labels.astype(jnp.float32)
  if label_smoothing:
    labels = labels * (1.0 - label_smoothing) + label_smoothing / labels.shape[-1]
  return labels


def softmax_xent(logits, labels, *, label_smoothing=0.0, class_weights=None):
  """Per-example -sum_c w_c y_c log softmax(logits)_c, y the smoothed labels."""
  labels = _smooth(labels, label_smoothing)
  if class_weights is not None:
    labels = labels * jnp.asarray(class_weights, jnp.float32)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), labels)


def sigmoid_xent(logits, labels, *, label_smoothing=0.0, class_weights=None):
  """Per-example sum over classes of w_c * binary cross-entropy (multi-label).

  Summed, not averaged, over classes, like big_vision's `utils.sigmoid_xent`
  (which then means over the batch); log_sigmoid keeps it finite for any logit.
  """
  logits = logits.astype(jnp.float32)
  labels = _smooth(labels, label_smoothing)
  nll = -(labels * jax.nn.log_sigmoid(logits)
          + (1.0 - labels) * jax.nn.log_sigmoid(-logits))
  if class_weights is not None:
    nll = nll * jnp.asarray(class_weights, jnp.float32)
  return jnp.sum(nll, axis=-1)


# configs.LOSSES: the loss of each name.
_LOSSES = {
    "softmax_xent": softmax_xent,
    "sigmoid_xent": sigmoid_xent,
}


def get(name: str):
  """The loss function called `name`."""
  return _LOSSES[name]


def kl_to_teacher(student_logits, teacher_logits, temperature: float = 1.0):
  """Per-example T^2 KL(softmax(t/T) || softmax(s/T)): function matching's loss.

  The T^2 factor keeps the gradient's scale independent of T (Hinton et al. 2015).
  """
  t = temperature
  teacher = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / t)
  student = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t)
  return t * t * jnp.sum(jnp.exp(teacher) * (teacher - student), axis=-1)


def distill_kl(student, teacher_logits, labels, *, temperature=1.0, weight=1.0,
               label_smoothing=0.0):
  """Function matching (Beyer et al. 2022): the student matches the teacher's outputs on
  the same view; labels are not used (weight is ignored: the teacher is the only target)."""
  del labels, weight, label_smoothing
  return kl_to_teacher(student["logits"], teacher_logits, temperature)


def _dist_logits(student):
  """What the distillation term reads: the distillation head's logits, else the cls head's."""
  return student.get("logits_dist", student["logits"])


def distill_soft_hard(student, teacher_logits, labels, *, temperature=1.0, weight=0.5,
                      label_smoothing=0.0):
  """Hinton et al. 2015: (1 - w) CE(s, smooth(y)) + w T^2 KL(softmax(t/T) || softmax(s/T)).

  Both terms on the student's "logits" (a distillation head, if any, is not used); the KL
  is per example, summed over classes (big_vision's `distance.dist(kind="kl")`).
  """
  logits = student["logits"]
  hard = softmax_xent(logits, labels, label_smoothing=label_smoothing)
  return (1.0 - weight) * hard + weight * kl_to_teacher(logits, teacher_logits, temperature)


def distill_deit_hard(student, teacher_logits, labels, *, temperature=1.0, weight=0.5,
                      label_smoothing=0.0):
  """DeiT's hard distillation (Touvron et al. 2021; deit/losses.py, type 'hard'):
  (1 - w) CE(cls head, smooth(y)) + w CE(dist head, onehot(argmax t)).

  The teacher's argmax target is not smoothed (DeiT's plain `F.cross_entropy`) and the
  temperature is not used (DeiT ignores tau here). Without a distillation head
  ("logits_dist") both terms read "logits". DeiT's defaults: w (alpha) 0.5.
  """
  del temperature
  hard = softmax_xent(student["logits"], labels, label_smoothing=label_smoothing)
  teacher = jax.nn.one_hot(jnp.argmax(teacher_logits, axis=-1), teacher_logits.shape[-1],
                           dtype=jnp.float32)
  return (1.0 - weight) * hard + weight * softmax_xent(_dist_logits(student), teacher)


def distill_deit_soft(student, teacher_logits, labels, *, temperature=1.0, weight=0.5,
                      label_smoothing=0.0):
  """DeiT's soft distillation (deit/losses.py, type 'soft'):
  (1 - w) CE(cls head, smooth(y)) + w T^2 KL(softmax(t/T) || softmax(dist head/T)) / K.

  DeiT sums the KL over batch and classes and divides by `outputs_kd.numel()` = B K (its
  "legacy PyTorch behaviour", deit issue 61), so the per-example term here is divided by
  K: the batch mean equals DeiT's loss. "soft_hard" is the same mixture without the 1/K
  (per-example KL, as Hinton and big_vision). DeiT's defaults: w (alpha) 0.5, T (tau) 1.
  """
  hard = softmax_xent(student["logits"], labels, label_smoothing=label_smoothing)
  kl = kl_to_teacher(_dist_logits(student), teacher_logits, temperature)
  return (1.0 - weight) * hard + weight * kl / teacher_logits.shape[-1]


# configs.DISTILL_LOSSES: each distillation loss by name. Every one maps
# (student: dict with "logits" [B, K] and, with a distillation token, "logits_dist";
#  teacher_logits [B, K] (stop-gradient'ed by the caller); labels [B, K] (one-hot, soft or
#  mixed; `label_smoothing` is applied here, to the hard-label CE terms only);
#  temperature, weight (the teacher's share), label_smoothing) -> per-example [B] float32.
_DISTILL_LOSSES = {
    "kl": distill_kl,
    "soft_hard": distill_soft_hard,
    "deit_hard": distill_deit_hard,
    "deit_soft": distill_deit_soft,
}


def distillation(name: str):
  """The distillation loss called `name` (see `_DISTILL_LOSSES`)."""
  return _DISTILL_LOSSES[name]


def balanced_class_weights(counts) -> np.ndarray:
  """n / (k * n_c) per class: every class then weighs n / k in total (sum_c n_c w_c = n)."""
  counts = np.asarray(counts, np.float64)
  return (counts.sum() / (counts.size * counts)).astype(np.float32)


def resolve_class_weights(spec, counts_fn):
  """None, or a float32 [num_classes] array of weights, from the config's `spec`.

  spec: None; "balanced" (calls `counts_fn()` for the per-class label counts, and
  only then: it may scan the dataset); or a list/tuple of num_classes numbers.
  """
  if spec is None:
    return None
  if isinstance(spec, str):
    return balanced_class_weights(counts_fn())
  return np.asarray(spec, np.float32)
