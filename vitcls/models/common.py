"""Small pieces shared by the model files: dtype resolution and stochastic depth (drop-path)."""

from typing import Any, Optional

import jax
import jax.numpy as jnp


def as_dtype(dtype: Optional[Any]):
  """Resolves a config dtype ("bfloat16", "float32", a numpy/jax dtype or None) to a jnp dtype.

  None means float32. Raises ValueError with one clear line for names jax does not know.
  """
  if dtype is None:
    return jnp.float32
  try:
    return jnp.dtype(dtype)
  except TypeError:
    raise ValueError(
        f"unknown dtype {dtype!r}: expected e.g. 'float32' or 'bfloat16'") from None


def drop_path(x, rate, rng):
  """Stochastic depth: zeroes whole examples of residual branch `x` with probability `rate`.

  Kept examples are scaled by 1/(1-rate) so the expectation is unchanged. `rate` may be a
  Python float or a traced scalar (e.g. a per-layer rate scanned over blocks); rate=1 drops
  every example (and yields zeros, not NaN).
  """
  keep = 1.0 - jnp.asarray(rate, jnp.float32)
  mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  scale = jnp.where(keep > 0, 1.0 / jnp.maximum(keep, 1e-12), 0.0).astype(x.dtype)
  return jnp.where(mask, x * scale, jnp.zeros((), x.dtype))
