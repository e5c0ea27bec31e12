"""Few-shot linear probes on frozen pre-logit features (big_vision's fewshot evaluator).

How much does the representation know, independent of the head? For k shots per class
(sampled per seed from the probe's train split), a closed-form ridge regression onto
±1 one-hot targets is fitted on the pre-logit features and scored on the test split;
accuracies are averaged over seeds. Cheap enough to run during training.
"""

from __future__ import annotations

from vitcls.configs import ConfigDict
from vitcls import evaluators as _evaluators
metrics = _evaluators.lazy_import("vitcls.metrics")
inference = _evaluators.lazy_import("vitcls.inference")


def defaults() -> ConfigDict:
  """Config keys of a few-shot probe and their defaults (1 to 25 shots, 3 seeds, l2 2^10)."""
  return ConfigDict({
      "type": "fewshot",
      "data": "",  # Probe dataset; empty: the training dataset.
      "train_split": "train",
      "split": "test",
      "pp": "value_range(-1,1)|onehot(10)",
      "shots": [1, 5, 10, 25],
      "seeds": 3,
      "l2_reg": 2.0 ** 10,
      "max_train_examples": 5000,  # Features of at most this many train examples.
      "num_classes": 0,  # 0: the training config's num_classes.
      "batch_size": 500,
      "every": 500,
  })


class Evaluator:
  """`run(params)` -> `{k}shot` accuracy for each k in `shots`."""

  def __init__(self, config, **context):
    make = inference.factory(config, **context)
    self.train = make(config.train_split, max_examples=config.max_train_examples)
    self.test = make(config.split)
    self.config = config
    self.num_classes = config.num_classes or context["train_config"].num_classes

  def run(self, params) -> _evaluators.Result:
    """`{k}shot`: test accuracy of the ridge probe fitted on k shots per class, seed-averaged."""
    train, test = self.train.run(params), self.test.run(params)
    args = (train["pre_logits"], inference.class_labels(train["labels"]), test["pre_logits"],
            inference.class_labels(test["labels"]))
    return _evaluators.Result({f"{k}shot": float(metrics.fewshot_accuracy(
        *args, shots=int(k), seeds=range(int(self.config.seeds)),
        num_classes=self.num_classes, l2_reg=float(self.config.l2_reg)))
        for k in self.config.shots}, {})
