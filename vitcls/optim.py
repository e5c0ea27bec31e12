"""The optax optimiser and learning-rate schedule a config asks for.

Schedule: linear warmup from 0 to `lr`, then cosine / linear / rsqrt decay (or constant).
Optimiser: global-norm clipping, then AdamW, SGD with momentum or Adafactor, each with
decoupled weight decay (`wd`, scaled by the schedule like the update) on the parameters
whose path matches `wd_mask` (kernels by default, so biases, norms and embeddings are
not decayed). Parameter groups by regex on the `/`-joined path: `lr_mults`
(`[(regex, multiplier)]`, first match wins) scales updates; `frozen` (regexes) leaves
parameters bit for bit unchanged and gives them no optimiser state.
"""

from __future__ import annotations

import inspect
import re

import jax
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
  if config.lr_mults:
    tx = optax.chain(tx, scale_by_lr_mults(config.lr_mults))
  if config.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
  if config.frozen:
    tx = freeze(tx, config.frozen)
  return tx, schedule


def _compile(patterns, field: str):
  try:
    return [re.compile(p) for p in patterns]
  except (re.error, TypeError) as e:
    raise ConfigError(f"config.{field}: bad regex in {list(patterns)}: {e}") from None


def lr_mults_tree(params, lr_mults):
  """Per-leaf multipliers: the first `(regex, mult)` whose regex fully matches, else 1."""
  rules = [(regex, float(mult)) for regex, (_, mult) in zip(
      _compile([r for r, _ in lr_mults], "lr_mults"), lr_mults)]
  def mult(path):
    return next((m for regex, m in rules if regex.fullmatch(path)), 1.0)
  return jax.tree_util.tree_map(mult, treeutil.paths(params))


def scale_by_lr_mults(lr_mults) -> optax.GradientTransformation:
  """Multiplies each leaf's update (weight decay included) by its `lr_mults` factor."""
  for rule in lr_mults:
    if not (isinstance(rule, (list, tuple)) and len(rule) == 2):
      raise ConfigError(f"config.lr_mults: each entry must be (regex, multiplier), got "
                        f"{rule!r}")
  def scale(updates, params):
    mults = lr_mults_tree(updates if params is None else params, lr_mults)
    return jax.tree_util.tree_map(lambda u, m: u * m if m != 1.0 else u, updates, mults)
  return optax.stateless(scale)


def frozen_mask(params, patterns):
  """True for leaves whose path fully matches one of the `frozen` regexes."""
  regexes = _compile(patterns, "frozen")
  return jax.tree_util.tree_map(lambda p: any(r.fullmatch(p) for r in regexes),
                                treeutil.paths(params))


def freeze(tx, patterns) -> optax.GradientTransformation:
  """`tx` on the trainable leaves only; frozen leaves get a zero update and no state.

  Through `optax.multi_transform`: `tx` (clipping included) never sees a frozen leaf, so
  the global norm covers trained parameters only and no moment is stored for the others.
  """
  patterns = [patterns] if isinstance(patterns, str) else list(patterns)
  labels = lambda params: jax.tree_util.tree_map(  # noqa: E731
      lambda f: "frozen" if f else "train", frozen_mask(params, patterns))
  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
