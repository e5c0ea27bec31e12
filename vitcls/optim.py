"""The optax optimiser and learning-rate schedule a config asks for.

Schedule: linear warmup from 0 to `lr`, then cosine / linear / rsqrt decay (or constant).
Optimiser: global-norm clipping, then AdamW, SGD with momentum or Adafactor, each with
decoupled weight decay (`wd`, scaled by the schedule like the update) on the parameters
whose path matches `wd_mask` (kernels by default, so biases, norms and embeddings are
not decayed).
"""

from __future__ import annotations

import inspect

import optax

from vitcls import treeutil
from vitcls.configs import ConfigError


def warmup_steps(config, total_steps: int) -> int:
  s = config.schedule
  return int(s.warmup_steps or round(s.warmup_percent * total_steps))


def make_schedule(config, total_steps: int) -> optax.Schedule:
  """lr(step): linear warmup to `config.lr`, then the configured decay to the end."""
  s, lr = config.schedule, config.lr
  warmup = warmup_steps(config, total_steps)
  if warmup > total_steps:
    raise ConfigError(f"schedule warmup ({warmup} steps) is longer than the run "
                      f"({total_steps} steps)")
  decay_steps = max(total_steps - warmup, 1)
  end = lr * s.end_factor
  decays = {
      "cosine": lambda: optax.cosine_decay_schedule(lr, decay_steps, alpha=s.end_factor),
      "linear": lambda: optax.linear_schedule(lr, end, decay_steps),
      "rsqrt": lambda: (lambda step: lr * (1.0 + step / s.timescale) ** -0.5),
      "constant": lambda: optax.constant_schedule(lr),
  }
  if s.decay_type not in decays:
    raise ConfigError(f"unknown schedule.decay_type '{s.decay_type}': use one of "
                      f"{', '.join(decays)}")
  decay = decays[s.decay_type]()
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def _sgd(learning_rate, weight_decay, mask, momentum=0.9, nesterov=False):
  """SGD with momentum and decoupled weight decay (added after the momentum)."""
  return optax.chain(
      optax.trace(decay=momentum, nesterov=nesterov) if momentum else optax.identity(),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate))


def _adamw(learning_rate, weight_decay, mask, **kw):
  return optax.adamw(learning_rate, weight_decay=weight_decay, mask=mask, **kw)


def _adafactor(learning_rate, weight_decay, mask, **kw):
  return optax.adafactor(learning_rate, weight_decay_rate=weight_decay or None,
                         weight_decay_mask=mask, **kw)


_OPTIMIZERS = {"adamw": (_adamw, optax.adamw), "sgd": (_sgd, _sgd),
               "adafactor": (_adafactor, optax.adafactor)}
_RESERVED = {"learning_rate", "weight_decay", "mask", "weight_decay_rate",
             "weight_decay_mask"}


def make_optimizer(config, total_steps: int):
  """Returns (optax transformation, lr schedule) for `config`."""
  name = config.optax_name
  if name not in _OPTIMIZERS:
    raise ConfigError(f"unknown optax_name '{name}': use one of {', '.join(_OPTIMIZERS)}")
  build, signature_of = _OPTIMIZERS[name]
  kwargs = dict(config.optax)
  allowed = set(inspect.signature(signature_of).parameters) - _RESERVED
  for key in kwargs:
    if key not in allowed:
      raise ConfigError(f"unknown config key 'optax.{key}' for {name}: known ones are "
                        f"{', '.join(sorted(allowed))}")
  schedule = make_schedule(config, total_steps)
  mask = lambda params: treeutil.regex_mask(params, config.wd_mask)
  tx = build(schedule, config.wd, mask, **kwargs)
  if config.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
  return tx, schedule
