"""The optax optimiser and learning-rate schedule a config asks for.

Schedule: linear warmup from `warmup_start * lr` (0 by default) to `lr`, then cosine /
linear / rsqrt / stair decay (or constant), whose clock starts after the warmup or, with
`decay_from_start`, at step 0 (timm); the lr may be held for `steps_per_update` steps and
lag `update_lag` updates (timm's per-epoch stepping as DeiT calls it).
Optimiser: global-norm clipping, then AdamW, SGD with momentum or Adafactor, with weight
decay `wd` on the parameters whose path matches `wd_mask` (kernels by default, so biases,
norms and embeddings are not decayed), in one of three forms (`wd_mode`): "times_lr"
(decoupled, -lr(t) * wd * p: AdamW / timm / DeiT), "times_schedule" (decoupled,
-lr(t) / lr * wd * p: big_vision, where wd=1e-4 at lr=1e-3 equals AdamW's 0.1) or "l2"
(wd * p added to the gradient before the optimiser: the ResNet / BiT papers' SGD). Parameter groups by regex on the `/`-joined path: `lr_mults`
(`[(regex, multiplier)]`, first match wins) scales updates; `frozen` (regexes) leaves
parameters bit for bit unchanged and gives them no optimiser state. Layer-wise lr decay
(`layer_decay`, BEiT / DeiT-III / ConvNeXt fine-tuning) scales the update of a parameter
of layer `id` by `layer_decay ** (L - id)`, the layers numbered by the model's module
(`vitcls.models.<model_name>.layer_ids`), times any `lr_mults` factor.

The config was checked by `vitcls.validate` (names from `configs.OPTIMIZERS`,
`DECAY_TYPES` and `WD_MODES`, regexes, the warmup and stair boundaries against the run's
length, the optax keys against `optimizer_arguments`); nothing here checks it again.
"""

from __future__ import annotations

import importlib
import inspect
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vitcls import configs, treeutil


def make_schedule(config, total_steps: int) -> optax.Schedule:
  """lr(step): the smooth schedule, held per `steps_per_update` block when asked."""
  s = config.schedule
  smooth = _smooth_schedule(config, total_steps)
  if s.steps_per_update == 1 and s.update_lag == 0:
    return smooth
  return _held(smooth, s.steps_per_update, s.update_lag)


def _smooth_schedule(config, total_steps: int) -> optax.Schedule:
  """Linear warmup from `warmup_start * lr` to `lr`, then the configured decay.

  The decay's clock starts at `origin`: the end of the warmup (the warmup is a prefix), or
  step 0 with `decay_from_start` (timm's CosineLRScheduler: the warmup replaces the
  decay's first steps, so the lr jumps from the warmup to the decay's value there).
  """
  s, lr = config.schedule, config.lr
  warmup = configs.warmup_steps(config, total_steps)
  origin = 0 if s.decay_from_start else warmup
  decay_steps = max(total_steps - origin, 1)
  end = lr * s.end_factor
  decays = {
      "cosine": lambda: optax.cosine_decay_schedule(lr, decay_steps, alpha=s.end_factor),
      "linear": lambda: optax.linear_schedule(lr, end, decay_steps),
      "rsqrt": lambda: (lambda step: lr * (1.0 + step / s.timescale) ** -0.5),
      "constant": lambda: optax.constant_schedule(lr),
      "stair": lambda: _stair(lr, s, total_steps, origin),
  }
  decay = decays[s.decay_type]()
  if warmup == 0:
    return decay
  if origin != warmup:  # join_schedules reads `decay` from the warmup's end.
    decay = _shifted(decay, warmup - origin)
  start = optax.linear_schedule(s.warmup_start * lr, lr, warmup)
  return optax.join_schedules([start, decay], [warmup])


def _shifted(schedule: optax.Schedule, offset: int) -> optax.Schedule:
  return lambda step: schedule(step + offset)


def _held(schedule: optax.Schedule, every: int, lag: int) -> optax.Schedule:
  """`schedule` read once per block of `every` steps, `lag` blocks late (never before 0).

  timm's schedulers with `t_in_epochs=True` change the lr once per epoch; DeiT's main.py
  calls `lr_scheduler.step(epoch)` after epoch `epoch`, so epoch e trains at lr(e - 1)
  and epochs 0 and 1 both at lr(0): `every` = steps per epoch, `lag` = 1.
  """
  def held(step):
    block = jnp.maximum(jnp.floor_divide(step, every) - lag, 0)
    return schedule(block * every)
  return held


def _stair(lr: float, s, total_steps: int, origin: int) -> optax.Schedule:
  """`lr`, multiplied by `stair_factor` at each of `boundaries` (fractions of the run).

  The ResNet / BiT step schedule: boundaries [30/90, 60/90, 80/90] and factor 0.1 divide
  the lr by 10 at epochs 30, 60 and 80 of 90, counted from the first step (warmup
  included); the returned schedule is read from `origin` (the end of the warmup, or 0).
  """
  steps = [round(float(b) * total_steps) - origin for b in s.boundaries]
  scales = {}
  for step in steps:  # Boundaries on the same step multiply.
    scales[step] = scales.get(step, 1.0) * s.stair_factor
  return optax.piecewise_constant_schedule(lr, scales)


def decay_by_schedule(weight_decay: float, factor: optax.Schedule,
                      mask) -> optax.GradientTransformation:
  """Adds `-weight_decay * factor(step) * p` to the update of the masked leaves.

  big_vision's decoupled weight decay: scaled by the schedule's shape (`factor` is the
  lr schedule over the base lr) but not by the base lr, so `wd=1e-4` with `lr=1e-3`
  decays like AdamW's `weight_decay=0.1`. Goes after the optimiser's lr scaling.
  """
  def init(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update(updates, state, params):
    if params is None:
      raise ValueError("decay_by_schedule needs the params")
    rate = weight_decay * factor(state.count)
    leaf_mask = mask(params) if callable(mask) else mask
    updates = jax.tree_util.tree_map(
        lambda u, p, m: u - rate * p if m else u, updates, params, leaf_mask)
    return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init, update)


def _sgd(learning_rate, weight_decay, mask, momentum=0.9, nesterov=False,
         accumulator_dtype=None):
  """SGD with momentum and decoupled weight decay (added after the momentum).

  `accumulator_dtype` ("bfloat16": big_vision's `momentum_hp`) stores the momentum in
  that dtype; the step itself uses the unrounded `g + momentum * m`, as `optax.trace` does.
  """
  dtype = None if accumulator_dtype is None else jnp.dtype(accumulator_dtype)
  trace = optax.trace(decay=momentum, nesterov=nesterov, accumulator_dtype=dtype)
  return optax.chain(
      trace if momentum else optax.identity(),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate))


def _adamw(learning_rate, weight_decay, mask, **kw):
  return optax.adamw(learning_rate, weight_decay=weight_decay, mask=mask, **kw)


def _adafactor(learning_rate, weight_decay, mask, **kw):
  return optax.adafactor(learning_rate, weight_decay_rate=weight_decay or None,
                         weight_decay_mask=mask, **kw)


# configs.OPTIMIZERS: (builder, the function whose signature lists the optax keys).
_OPTIMIZERS = {"adamw": (_adamw, optax.adamw), "sgd": (_sgd, _sgd),
               "adafactor": (_adafactor, optax.adafactor)}
_RESERVED = {"learning_rate", "weight_decay", "mask", "weight_decay_rate",
             "weight_decay_mask"}


def optimizer_arguments(name: str) -> set[str]:
  """The `config.optax` keys optimiser `name` takes (for `validate.check_built`)."""
  return set(inspect.signature(_OPTIMIZERS[name][1]).parameters) - _RESERVED


def _times_lr(build, schedule, config, mask, kwargs):
  return build(schedule, config.wd, mask, **kwargs)


def _times_schedule(build, schedule, config, mask, kwargs):
  base = config.lr or 1.0
  return optax.chain(build(schedule, 0.0, mask, **kwargs),
                     decay_by_schedule(config.wd, lambda t: schedule(t) / base, mask))


def _l2(build, schedule, config, mask, kwargs):
  """wd * p joins the gradient, before momentum / Adam's moments."""
  return optax.chain(optax.add_decayed_weights(config.wd, mask),
                     build(schedule, 0.0, mask, **kwargs))


# configs.WD_MODES: (builder, schedule, config, mask, optax kwargs) -> transformation.
_WD_MODES = {"times_lr": _times_lr, "times_schedule": _times_schedule, "l2": _l2}


def make_optimizer(config, total_steps: int):
  """Returns (optax transformation, lr schedule) for `config`."""
  build = _OPTIMIZERS[config.optax_name][0]
  schedule = make_schedule(config, total_steps)
  mask = lambda params: treeutil.regex_mask(params, config.wd_mask)
  with_wd = _WD_MODES[config.wd_mode] if config.wd else _times_lr
  tx = with_wd(build, schedule, config, mask, dict(config.optax))
  if config.lr_mults:
    tx = optax.chain(tx, scale_by_lr_mults(config.lr_mults))
  if config.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
  if config.frozen:
    tx = freeze(tx, config.frozen)
  if config.layer_decay != 1.0:
    # Outside the freeze, where the model's `layer_ids` sees the whole tree (a frozen
    # leaf's update is zero either way); its factors multiply those of `lr_mults`.
    tx = optax.chain(tx, scale_by_layer_decay(config.layer_decay, config.model_name))
  return tx, schedule


def lr_mults_tree(params, lr_mults):
  """Per-leaf multipliers: the first `(regex, mult)` whose regex fully matches, else 1."""
  rules = [(re.compile(regex), float(mult)) for regex, mult in lr_mults]
  def mult(path):
    return next((m for regex, m in rules if regex.fullmatch(path)), 1.0)
  return jax.tree_util.tree_map(mult, treeutil.paths(params))


def scale_by_lr_mults(lr_mults) -> optax.GradientTransformation:
  """Multiplies each leaf's update (weight decay included) by its `lr_mults` factor."""
  def scale(updates, params):
    mults = lr_mults_tree(updates if params is None else params, lr_mults)
    return jax.tree_util.tree_map(lambda u, m: u * m if m != 1.0 else u, updates, mults)
  return optax.stateless(scale)


def layer_decay_tree(params, layer_decay: float, model_name: str):
  """Per-leaf factors `layer_decay ** (L - id)`, from `vitcls.models.<model_name>.layer_ids`.

  A leaf numbered by an int gets a Python float; a leaf stacked over blocks (`scan`),
  numbered by an int array of shape (depth,), gets a float32 array of shape
  (depth, 1, ...) that broadcasts over its leading axis: one factor per block.
  """
  module = importlib.import_module(f"vitcls.models.{model_name}")
  ids, top = module.layer_ids(params)

  def factor(leaf, layer):
    if np.ndim(layer) == 0:
      return float(layer_decay) ** (top - int(layer))
    powers = float(layer_decay) ** (top - np.asarray(layer, np.float64))
    return powers.astype(np.float32).reshape((-1,) + (1,) * (np.ndim(leaf) - 1))
  return jax.tree_util.tree_map(factor, params, ids)


def scale_by_layer_decay(layer_decay: float, model_name: str) -> optax.GradientTransformation:
  """Multiplies each leaf's update (weight decay included) by `layer_decay_tree`'s factor.

  The factors are constants, read from the tree's structure when the update is traced:
  the jitted step gains one multiply per leaf below the top layer, whatever the sharding.
  """
  def scale(updates, params):
    factors = layer_decay_tree(updates if params is None else params, layer_decay,
                               model_name)
    return jax.tree_util.tree_map(_scaled, updates, factors)
  return optax.stateless(scale)


def _scaled(update, factor):
  if np.ndim(factor) == 0:
    return update if factor == 1.0 else update * factor
  return update * jnp.asarray(factor, update.dtype)


def frozen_mask(params, patterns):
  """True for leaves whose path fully matches one of the `frozen` regexes."""
  regexes = [re.compile(p) for p in patterns]
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
