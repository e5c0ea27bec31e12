"""Calibration: is a model's confidence worth what it says?

ECE (15 equal-width confidence bins), NLL and Brier score of the softmax probabilities,
the reliability diagram's bins, and temperature scaling (Guo et al. 2017): one
temperature fitted on held-out examples, with the ECE and NLL after scaling reported on
the examples it was not fitted on. Held out: `holdout_split` when given, else the even
positions of the evaluated split (scaled metrics then use the odd ones).
"""

from __future__ import annotations

from vitcls.configs import ConfigDict
from vitcls import evaluators as _evaluators
metrics = _evaluators.lazy_import("vitcls.metrics")
inference = _evaluators.lazy_import("vitcls.inference")


def defaults() -> ConfigDict:
  """Config keys of a calibration eval and their defaults (15 bins, fitted on half the split)."""
  return ConfigDict({
      "type": "calibration",
      "data": "",
      "split": "test",
      "pp": "value_range(-1,1)|onehot(10)",
      "batch_size": 500,
      "every": 500,
      "num_bins": 15,
      "holdout_split": "",  # Split to fit the temperature on; empty: half of `split`.
  })


class Evaluator:
  """`run(params)` -> ece, nll, brier, temperature, ece_scaled, nll_scaled; the
  reliability diagram's bins as arrays."""

  def __init__(self, config, **context):
    make = inference.factory(config, **context)
    self.inference = make(config.split)
    self.holdout = make(config.holdout_split) if config.holdout_split else None
    self.config = config

  def run(self, params) -> _evaluators.Result:
    """ece, nll, brier, temperature, ece_scaled, nll_scaled and count of `params`; the
    reliability diagram's bins, before and after scaling, as arrays."""
    out = self.inference.run(params)
    logits, labels = out["logits"], inference.class_labels(out["labels"])
    probs = metrics.softmax(logits)
    bins = self.config.num_bins
    if self.holdout is not None:
      held = self.holdout.run(params)
      fit_logits, fit_labels = held["logits"], inference.class_labels(held["labels"])
      test_logits, test_labels = logits, labels
    else:
      fit_logits, fit_labels = logits[0::2], labels[0::2]
      test_logits, test_labels = logits[1::2], labels[1::2]
    temperature = metrics.fit_temperature(fit_logits, fit_labels)
    scaled = metrics.softmax(test_logits / temperature)
    confidence, accuracy, count = metrics.reliability_bins(probs, labels, bins)
    scaled_bins = metrics.reliability_bins(scaled, test_labels, bins)
    arrays = {"bin_confidence": confidence, "bin_accuracy": accuracy,
              "bin_count": count, "scaled_bin_confidence": scaled_bins[0],
              "scaled_bin_accuracy": scaled_bins[1], "scaled_bin_count": scaled_bins[2]}
    return _evaluators.Result({
        "ece": metrics.ece(probs, labels, bins),
        "nll": metrics.nll(logits, labels, from_logits=True),
        "brier": metrics.brier(probs, labels),
        "temperature": float(temperature),
        "ece_scaled": metrics.ece(scaled, test_labels, bins),
        "nll_scaled": metrics.nll(test_logits / temperature, test_labels, from_logits=True),
        "count": float(len(labels)),
    }, arrays)
