"""Multi-label classification: mAP, per-label AP, micro and macro F1.

Scores are sigmoid probabilities of the logits. F1 needs a decision threshold per label;
it is chosen on validation data (`val_split`, or the even positions of the evaluated
split, F1 being reported on the odd ones) so the reported F1 is not tuned on its own
examples. AP and mAP need no threshold and use the whole split.
"""

from __future__ import annotations

from vitcls.configs import ConfigDict
from vitcls import evaluators as _evaluators
metrics = _evaluators.lazy_import("vitcls.metrics")
inference = _evaluators.lazy_import("vitcls.inference")


def defaults() -> ConfigDict:
  """Config keys of a multi-label eval and their defaults (F1 thresholds fit on half the split)."""
  return ConfigDict({
      "type": "multilabel",
      "data": "",
      "split": "test",
      "pp": "value_range(-1,1)|multihot(10)",
      "val_split": "",  # Where F1 thresholds are chosen; empty: half of `split`.
      "batch_size": 500,
      "every": 500,
  })


class Evaluator:
  """`run(params)` -> map, micro_f1, macro_f1; per-label AP as an array."""

  def __init__(self, config, **context):
    make = inference.factory(config, **context)
    self.inference = make(config.split)
    self.val = make(config.val_split) if config.val_split else None

  def run(self, params) -> _evaluators.Result:
    """map, micro_f1, macro_f1 (thresholds chosen on validation data), count; per-label AP kept."""
    out = self.inference.run(params)
    scores, targets = metrics.sigmoid(out["logits"]), out["labels"] > 0.5
    if self.val is not None:
      val = self.val.run(params)
      val_scores, val_targets = metrics.sigmoid(val["logits"]), val["labels"] > 0.5
      test_scores, test_targets = scores, targets
    else:
      val_scores, val_targets = scores[0::2], targets[0::2]
      test_scores, test_targets = scores[1::2], targets[1::2]
    thresholds = metrics.choose_thresholds(val_scores, val_targets)
    f1 = metrics.f1_scores(test_scores, test_targets, thresholds)
    ap = metrics.average_precision(scores, targets)
    return _evaluators.Result(
        {"map": float(metrics.mean_average_precision(scores, targets)),
         "micro_f1": float(f1["micro"]), "macro_f1": float(f1["macro"]),
         "count": float(len(scores))},
        {"ap_per_label": ap})
