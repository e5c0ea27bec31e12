"""Student beside its distillation teacher on one split: both top-1s, how often they agree,
and KL(teacher || student).

For a run with `config.distill`: the teacher sees each image as in training (resized to
`teacher_res`, through `teacher_pp`), in inference mode. Every example is seen once (the
last batch padded and masked) and the numbers are computed on the host from the exact
per-example logits, like the classification evaluator's, so they do not depend on the
batch size or the devices. The teacher's logits are computed once, on the first run: its
weights never change. KL is at temperature 1, in nats, averaged over the examples.
"""

from __future__ import annotations

import numpy as np

from vitcls.configs import ConfigDict
from vitcls import evaluators as _evaluators
metrics = _evaluators.lazy_import("vitcls.metrics")
inference = _evaluators.lazy_import("vitcls.inference")

NEEDS_TEACHER = True  # `vitcls.run.evaluation` passes the run's teacher as `teacher`.


def defaults() -> ConfigDict:
  """Config keys of a distill eval and their defaults (the training data's test split)."""
  return ConfigDict({
      "type": "distill",
      "data": "",  # TFDS name or folder:PATH; empty: the training dataset.
      "split": "test",
      "pp": "value_range(-1,1)|onehot(10)",  # The student's; the teacher's input follows.
      "batch_size": 500,
      "every": 500,  # Steps between runs; it also runs at the end of training.
  })


def log_softmax(logits: np.ndarray) -> np.ndarray:
  """Row-wise log softmax in float64."""
  x = np.asarray(logits, np.float64)
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def kl(teacher_logits: np.ndarray, student_logits: np.ndarray) -> np.ndarray:
  """Per-example KL(softmax(teacher) || softmax(student)) in nats, float64 [N]."""
  t, s = log_softmax(teacher_logits), log_softmax(student_logits)
  return np.sum(np.exp(t) * (t - s), axis=-1)


def agreement(student_logits: np.ndarray, teacher_logits: np.ndarray) -> float:
  """The fraction of examples whose top-1 class is the same for both."""
  return float(np.mean(np.argmax(student_logits, -1) == np.argmax(teacher_logits, -1)))


class Evaluator:
  """`run(params)` -> top1 (the student's), teacher_top1, agreement, kl_to_teacher, count."""

  def __init__(self, config, *, teacher, **context):
    make = inference.factory(config, **context)
    self.student = make(config.split)
    self.teacher = teacher
    self._teacher_inference = make(config.split, model=teacher.spec)
    self._teacher_logits = None

  def teacher_logits(self) -> np.ndarray:
    """The teacher's logits on the split, [N, K], computed once."""
    if self._teacher_logits is None:
      self._teacher_logits = self._teacher_inference.run(self.teacher.params)["logits"]
    return self._teacher_logits

  def run(self, params) -> _evaluators.Result:
    """The student's (`params`) and the teacher's top-1, their agreement, mean
    KL(teacher || student) and the example count; no arrays."""
    out = self.student.run(params)
    student, labels = out["logits"], inference.class_labels(out["labels"])
    teacher = self.teacher_logits()
    return _evaluators.Result({
        "top1": metrics.topk_accuracy(student, labels, 1),
        "teacher_top1": metrics.topk_accuracy(teacher, labels, 1),
        "agreement": agreement(student, teacher),
        "kl_to_teacher": float(np.mean(kl(teacher, student))),
        "count": float(len(labels)),
    }, {})
