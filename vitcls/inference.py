"""Inference over a whole split, sharded like training: each real example's outputs on
the host, in dataset order. What every evaluator (and `vitcls.inspection`) builds on.

Evaluators then compute their metrics in NumPy (`vitcls.metrics`) from exact per-example
arrays: padding rows are dropped by their mask, so the numbers do not depend on the batch
size, the number of devices or processes. Outputs are replicated before they leave the
devices, so every process sees the same arrays (multi-host safe).
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from vitcls.data import pipeline, sources
from vitcls.data import pp as pp_lib
from vitcls import sharding as sharding_lib


def factory(config, *, model, train_config, mesh, batch_sharding):
  """`make(split, **overrides) -> Inference` over an evaluator's dataset, pp and batch.

  Each evaluator builds its inferences from this (its split, a held-out split, an OOD
  dataset via `name=` and `pp=` overrides), so the shared arguments live in one place.
  """
  name = config.data or train_config.input.data.name

  def make(split: str, **overrides) -> "Inference":
    kw = dict(model=model, name=name, pp=config.pp, batch_size=config.batch_size,
              train_config=train_config, mesh=mesh, batch_sharding=batch_sharding)
    kw.update(overrides)
    return Inference(split=split, **kw)
  return make


class Inference:
  """Compiled once per evaluator; `run(params)` -> dict of per-example NumPy arrays.

  Arrays: `logits` [N, K], `pre_logits` [N, D], `labels` [N, K] (one-hot or multi-hot, as
  the pp makes them), plus each of `extra_keys` the pp leaves in the example (e.g. the
  feature an evaluator slices by). N is the size of the split (or `max_examples`).
  """

  def __init__(self, *, model, name: str, split: str, pp: str, batch_size: int,
               train_config, mesh, batch_sharding, extra_keys: Sequence[str] = (),
               max_examples: int = 0):
    def open_source(encoded_images: bool):
      source = sources.get_source(name, split, train_config.input.data_dir or None,
                                  encoded_images=encoded_images)
      if max_examples and max_examples < len(source):
        source = _Prefix(source, max_examples)
      return source

    self.keys = ("image", "labels", *extra_keys)
    keep = ", ".join(repr(k) for k in self.keys)
    plan = pp_lib.plan(  # uint8 batches under normalize_on_device, as training's.
        f"{pp}|keep({keep})", open_source,
        normalize_on_device=train_config.input.normalize_on_device)
    self.source = plan.source
    finish = plan.finisher() if plan.device else (lambda batch: batch)
    global_batch = -(-batch_size // mesh.size) * mesh.size  # Padding rows are masked.
    self.dataset = pipeline.eval_dataset(
        self.source, plan.host, global_batch=global_batch,
        process_index=jax.process_index(), process_count=jax.process_count())
    self.batch_sharding = batch_sharding
    self.input = train_config.input
    extras = tuple(extra_keys)

    def predict(params, batch):
      batch = finish(batch)
      logits, aux = model.apply({"params": params}, batch["image"], train=False)
      out = {"logits": logits, "pre_logits": aux["pre_logits"], "labels": batch["labels"],
             "_mask": batch["_mask"]}
      out.update({k: batch[k] for k in extras})
      return out

    self._predict = jax.jit(predict, out_shardings=sharding_lib.replicated(mesh))

  def __len__(self) -> int:
    return len(self.source)

  def run(self, params) -> dict[str, np.ndarray]:
    """Each output as one NumPy array over the split's real examples, in dataset order."""
    parts = []
    batches = pipeline.iterate(self.dataset, self.batch_sharding,
                               num_threads=self.input.num_threads,
                               prefetch=self.input.prefetch, device_prefetch=1)
    for batch in batches:
      parts.append(jax.device_get(self._predict(params, batch)))
    out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    real = out.pop("_mask") > 0
    return {k: v[real] for k, v in out.items()}


class _Prefix:
  """The first n examples of a source (for evaluators that need only a sample)."""

  def __init__(self, source, n: int):
    self.source, self.n = source, n

  def __len__(self) -> int:
    return self.n

  def __getitem__(self, index):
    if not 0 <= index < self.n:
      raise IndexError(index)
    return self.source[index]


def class_labels(labels: np.ndarray) -> np.ndarray:
  """One-hot (or soft) label rows -> integer classes."""
  return np.argmax(labels, axis=-1)
