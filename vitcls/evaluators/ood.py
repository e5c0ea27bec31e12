"""Out-of-distribution detection: can the model tell it is looking at something new?

The in-distribution split and an OOD dataset are scored four ways (higher = more OOD):
maximum softmax probability (Hendrycks & Gimpel 2017), energy (logsumexp of the logits,
Liu et al. 2020), and Mahalanobis and relative Mahalanobis distance (Lee et al. 2018,
Ren et al. 2021) on pre-logit features, with class means and a tied covariance fitted on
`fit_examples` training examples. For each score: AUROC, AUPR (OOD positive) and the
false-positive rate on in-distribution data at 95% true-positive rate on OOD data.
`threshold_<score>` is the score below which 95% of in-distribution examples fall, the
cut prediction uses to flag "I don't know".
"""

from __future__ import annotations

from vitcls.configs import ConfigDict, ConfigError
from vitcls import evaluators as _evaluators
metrics = _evaluators.lazy_import("vitcls.metrics")
inference = _evaluators.lazy_import("vitcls.inference")


def defaults() -> ConfigDict:
  """Config keys of an OOD eval and their defaults; `ood_data` has none and must be set."""
  return ConfigDict({
      "type": "ood",
      "data": "",  # In-distribution dataset; empty: the training dataset.
      "split": "test",
      "pp": "value_range(-1,1)|onehot(10)",
      "ood_data": "",  # Required: the OOD dataset (TFDS name or folder:PATH).
      "ood_split": "test",
      "ood_pp": "",  # Empty: `pp`. Must produce the model's input size and `labels`.
      "fit_split": "train",  # Where the Mahalanobis class statistics come from.
      "fit_examples": 2000,
      "batch_size": 500,
      "every": 500,
  })


SCORES = ("msp", "energy", "mahalanobis", "relative_mahalanobis")


class Evaluator:
  """`run(params)` -> `<score>/auroc`, `<score>/aupr`, `<score>/fpr95`, thresholds; every
  per-example score as arrays."""

  def __init__(self, config, **context):
    if not config.ood_data:
      raise ConfigError("evals: an 'ood' evaluator needs ood_data (a TFDS name or "
                        "folder:PATH of images unlike the training data)")
    make = inference.factory(config, **context)
    self.inside = make(config.split)
    self.outside = make(config.ood_split, name=config.ood_data,
                        pp=config.ood_pp or config.pp)
    self.fit = make(config.fit_split, max_examples=config.fit_examples)
    self.num_classes = context["train_config"].num_classes

  def scores(self, params) -> tuple[dict, dict]:
    """Per-example scores of each kind for the in- and out-of-distribution sets."""
    fit = self.fit.run(params)
    gaussian = metrics.fit_mahalanobis(
        fit["pre_logits"], inference.class_labels(fit["labels"]), self.num_classes)
    def score(out):
      return {"msp": metrics.msp_score(out["logits"]),
              "energy": metrics.energy_score(out["logits"]),
              "mahalanobis": metrics.mahalanobis_score(gaussian, out["pre_logits"]),
              "relative_mahalanobis": metrics.relative_mahalanobis_score(
                  gaussian, out["pre_logits"])}
    return score(self.inside.run(params)), score(self.outside.run(params))

  def run(self, params) -> _evaluators.Result:
    """`<score>/auroc`, `aupr`, `fpr95` and `threshold` per score, count_in and count_out;
    every per-example score as arrays, for the report's histograms."""
    inside, outside = self.scores(params)
    results, arrays = {}, {}
    for kind in SCORES:
      s_in, s_out = inside[kind], outside[kind]
      results[f"{kind}/auroc"] = metrics.auroc(s_in, s_out)
      results[f"{kind}/aupr"] = metrics.aupr(s_in, s_out)
      results[f"{kind}/fpr95"] = metrics.fpr_at_tpr(s_in, s_out, 0.95)
      results[f"{kind}/threshold"] = float(metrics.threshold_at_tpr(s_in, 0.95))
      arrays[f"in_{kind}"] = s_in
      arrays[f"out_{kind}"] = s_out
    results["count_in"] = float(len(inside["msp"]))
    results["count_out"] = float(len(outside["msp"]))
    return _evaluators.Result(results, arrays)
