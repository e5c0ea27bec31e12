"""ImageNet-ReaL top-1: a prediction is right when it is in the image's set of real labels.

Beyer et al., "Are we done with ImageNet?" (2020) relabelled the 50,000 validation images
with sets of plausible labels; TFDS's `imagenet2012_real` (split `validation`) has them as
`real_label`, a Sequence of ClassLabel, empty for the images the raters kept no label for.
The pp turns the set into a multi-hot `labels` row (`multihot(1000, key='real_label')`,
big_vision's `onehot` of a sequence); images with an empty set are skipped, as the paper
and big_vision's classification evaluator do, and their number is reported.
"""

from __future__ import annotations

import numpy as np

from vitcls.configs import ConfigDict
from vitcls import evaluators as _evaluators
losses = _evaluators.lazy_import("vitcls.losses")
metrics = _evaluators.lazy_import("vitcls.metrics")
inference = _evaluators.lazy_import("vitcls.inference")


def defaults() -> ConfigDict:
  """Config keys of a ReaL eval and their defaults (TFDS's imagenet2012_real validation)."""
  return ConfigDict({
      "type": "real",
      "data": "imagenet2012_real",
      "split": "validation",
      "pp": ("decode|resize_small(256,method='area')|central_crop(224)|value_range(-1,1)"
             "|multihot(1000,key='real_label',key_result='labels')"),
      "batch_size": 500,
      "every": 500,
  })


class Evaluator:
  """`run(params)` -> top1 over the labelled images, their count, the skipped count, loss."""

  def __init__(self, config, **context):
    self.inference = inference.factory(config, **context)(config.split)
    self.loss = losses.get(context["train_config"].loss)

  def run(self, params) -> _evaluators.Result:
    """top1, count (images with a label set), skipped (empty sets) and the mean loss."""
    out = self.inference.run(params)
    logits, sets = out["logits"], out["labels"]
    real = metrics.real_accuracy(logits, sets)
    labelled = np.asarray(sets).max(axis=1) > 0
    # big_vision's loss on multi-hot rows: the train loss, unnormalised, labelled rows only.
    loss = (float(np.mean(self.loss(logits[labelled], sets[labelled])))
            if labelled.any() else float("nan"))
    return _evaluators.Result(
        {"top1": real.top1, "count": float(real.count), "skipped": float(real.skipped),
         "loss": loss}, {})
