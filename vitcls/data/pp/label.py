"""Label ops on the host: onehot, multihot, and keep / drop, which choose an example's keys.

They never touch the image, so a spec's closing image ops may move to the device ahead
of them (`OpInfo.label`), and serving skips those with a TF twin.
"""

from __future__ import annotations

import numpy as np

from vitcls.data.pp.registry import Op, PreprocessError, register
from vitcls.errors import shown


@register("onehot", label=True, jax_twin="onehot", tf_twin="label_only")
def onehot(depth, key="label", key_result="labels", on=1.0, off=0.0) -> Op:
  """Writes `key_result`: a float32 one-hot of the integer `key` (`on`/`off` values)."""
  def op(example, rng):
    label = int(example[key])
    if not 0 <= label < depth:
      raise ValueError(f"label {label} is outside onehot({depth})")
    vec = np.full((depth,), off, np.float32)
    vec[label] = on
    example[key_result] = vec
    return example
  return op


@register("multihot", label=True)
def multihot(num_classes, key="labels", key_result="labels", on=1.0, off=0.0) -> Op:
  """Writes `key_result`: a float32 multi-hot of the integer labels in `key`.

  For multi-label data, where `key` holds the set of classes an example shows (a TFDS
  Sequence(ClassLabel) decodes to a 1-D int array, maybe empty; a scalar counts as one
  label). Duplicates count once. A label outside [0, num_classes) is an error.
  """
  num_classes = int(num_classes)
  def op(example, rng):
    labels = np.atleast_1d(np.asarray(example[key]))
    if labels.ndim != 1 or not (labels.size == 0 or np.issubdtype(labels.dtype, np.integer)):
      raise PreprocessError(f"multihot({shown(key)}) takes a 1-D array of integer labels, got "
                            f"{labels.dtype} of shape {labels.shape}")
    outside = labels[(labels < 0) | (labels >= num_classes)]
    if outside.size:
      raise PreprocessError(f"label {int(outside[0])} is outside multihot({num_classes}): "
                            f"give num_classes covering every label")
    vec = np.full((num_classes,), off, np.float32)
    vec[labels.astype(np.int64)] = on
    example[key_result] = vec
    return example
  return op


# keep and drop only choose dict keys and draw nothing: the host op serves device
# batches too, so each is its own JAX twin (vitcls.data.pp.device names them).

@register("keep", label=True, jax_twin="keep", tf_twin="label_only")
def keep(*keys) -> Op:
  """Drops every key but `keys`."""
  return lambda example, rng: {k: example[k] for k in keys}


@register("drop", label=True, jax_twin="drop", tf_twin="label_only")
def drop(*keys) -> Op:
  """Removes `keys` (absent ones are ignored, as big_vision's drop); see `keep`."""
  return lambda example, rng: {k: v for k, v in example.items() if k not in keys}
