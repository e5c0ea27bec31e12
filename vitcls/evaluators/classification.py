"""Top-1/top-5, loss, per-class and balanced accuracy, confusion matrix, group fairness.

Every example of the split is seen once (the last batch is padded and masked), and the
metrics are computed on the host from the exact per-example logits, so they do not
depend on the batch size or the number of devices and processes. With `slice_by`, the
same accuracy is reported per value of that dataset feature, with the worst group's: the
usual measure of how unevenly a model serves the groups in its data.
"""

from __future__ import annotations

import numpy as np

from vitcls.configs import ConfigDict
from vitcls import evaluators as _evaluators
losses = _evaluators.lazy_import("vitcls.losses")
metrics = _evaluators.lazy_import("vitcls.metrics")
inference = _evaluators.lazy_import("vitcls.inference")
sources = _evaluators.lazy_import("vitcls.data.sources")


def defaults() -> ConfigDict:
  """Config keys of a classification eval and their defaults (the training data's test split)."""
  return ConfigDict({
      "type": "classification",
      "data": "",  # TFDS name or folder:PATH; empty: the training dataset.
      "split": "test",
      "pp": "value_range(-1,1)|onehot(10)",
      "batch_size": 500,
      "every": 500,  # Steps between runs; it also runs at the end of training.
      "slice_by": "",  # A dataset feature (kept by the pp) to report accuracy per value of.
  })


class Evaluator:
  """`run(params)` -> scalars, and as arrays the confusion matrix and per-class accuracy
  for the report's plots, with the class names when the dataset has them."""

  def __init__(self, config, **context):
    train_config = context["train_config"]
    self.inference = inference.factory(config, **context)(
        config.split, extra_keys=(config.slice_by,) if config.slice_by else ())
    self.config = config
    self.loss = losses.get(train_config.loss)
    try:  # For the report's plots; a label feature without names is numbered there.
      self.class_names = sources.label_names(config.data or train_config.input.data.name,
                                             config.split, train_config.input.data_dir or None)
    except sources.LabelFeatureError:
      self.class_names = None

  def run(self, params) -> _evaluators.Result:
    """top1, top5, loss, balanced and worst-class accuracy, count; with `slice_by`, per group."""
    out = self.inference.run(params)
    logits, labels = out["logits"], inference.class_labels(out["labels"])
    confusion = metrics.confusion_matrix(np.argmax(logits, -1), labels, logits.shape[-1])
    per_class = metrics.per_class_accuracy(confusion)
    results = {
        "top1": metrics.topk_accuracy(logits, labels, 1),
        "top5": metrics.topk_accuracy(logits, labels, min(5, logits.shape[-1])),
        "loss": float(np.mean(self.loss(logits, out["labels"]))),
        "balanced_accuracy": metrics.balanced_accuracy(confusion),
        "worst_class_accuracy": metrics.worst_class_accuracy(confusion),
        "count": float(len(labels)),
    }
    arrays = {"confusion": confusion, "per_class_accuracy": per_class}
    if self.class_names and len(self.class_names) == logits.shape[-1]:
      arrays["class_names"] = np.asarray(self.class_names, dtype=str)
    if self.config.slice_by:
      groups = metrics.group_metrics(logits, labels, out[self.config.slice_by])
      for key, value in groups.items():
        if isinstance(value, dict):
          results[f"group_{key}/top1"] = value["top1"]
        else:
          results[key] = value
    return _evaluators.Result(results, arrays)
