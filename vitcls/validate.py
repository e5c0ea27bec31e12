"""Checks a whole config before anything heavy is imported, built or compiled.

A run that fails after minutes of imports, data opening and compilation because of a
misspelt name or a batch that does not split over the devices wastes the time of the
person waiting for it, and often a queue slot. `problems(config)` runs in well under a
second (NumPy and PIL are its heaviest imports; no JAX, TensorFlow or flax) and returns
every problem it finds, one line each: field types against `configs.defaults()`, ranges,
names (model and its fields, optimiser, schedule, loss, evaluators and their keys, pp
ops), regexes, the mesh and batch against a device and process count when given, and
the files the config names. `check(config)` raises one `ConfigError` listing them all.

It is the only gate: `vitcls.run.build` calls `check` first, and the library modules do
not check the config again. What only a built run knows is checked here too, by functions
`build` calls with the resolved values: `check_built` (the run's length in steps, the
optax optimiser's arguments), `check_class_counts` (class_weights "balanced") and
`check_mesh` (a mesh on the devices present).
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Callable, Collection, Sequence

from vitcls import configs

ConfigError = configs.ConfigError
# Fields that may be None besides their default's type.
_OPTIONAL = {"total_steps": int, "total_examples": int, "total_epochs": float,
             "class_weights": (str, list, tuple)}


def check(config, *, num_devices: int | None = None, process_count: int = 1,
          known: Sequence[str] = (), training: bool = True) -> None:
  """Raises one ConfigError naming every problem of `config` (one per line), if any.

  `known`: problems found before (e.g. bad command-line overrides), listed first.
  `training=False`: the config of a finished run, evaluated again: what only starting
  a run reads (`model_init`) is not checked.
  """
  _raise([*known, *problems(config, num_devices=num_devices, process_count=process_count,
                            training=training)])


def check_built(config, *, total_steps: int, optax_arguments: Collection[str]) -> None:
  """Raises ConfigError for what only `build` knows, after `check` passed.

  `total_steps`: the run's length (with `total_epochs`, it needs the dataset's size);
  `optax_arguments`: the keyword arguments the chosen optax optimiser takes.
  """
  found: list[str] = []
  _length(config, total_steps, found)
  allowed = sorted(optax_arguments)
  for key in config.optax:
    _need(found, key in allowed, f"unknown config key 'optax.{key}' for "
          f"{config.optax_name}: known ones are {', '.join(allowed)}")
  _raise(found)


def check_class_counts(counts, num_classes: int) -> None:
  """Raises ConfigError when class_weights "balanced" cannot weigh these label counts."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  counts = np.asarray(counts, np.float64)
  what = "config.class_weights 'balanced'"
  if counts.ndim != 1 or counts.size == 0:
    raise ConfigError(f"{what}: class counts must be a non-empty list, not shape "
                      f"{counts.shape}")
  empty = np.flatnonzero(counts <= 0)
  if empty.size:
    raise ConfigError(f"{what}: class {int(empty[0])} has no examples ({counts.size} "
                      f"classes, {empty.size} empty): balanced class weights are "
                      f"undefined; give a list of weights instead")
  if counts.size != num_classes:
    raise ConfigError(f"{what}: class counts have {counts.size} classes but num_classes "
                      f"is {num_classes}")


def check_mesh(axes, num_devices: int) -> None:
  """Raises ConfigError unless the mesh `axes` lays out exactly `num_devices` devices."""
  found: list[str] = []
  sizes = _mesh_shape(list(axes), found)
  if sizes is not None:
    _mesh_devices(list(axes), sizes, num_devices, found)
  _raise(found)


def _raise(found: list[str]) -> None:
  if len(found) == 1:
    raise ConfigError(found[0])
  if found:
    raise ConfigError(f"{len(found)} problems in the config:\n  " + "\n  ".join(found))


def problems(config, *, num_devices: int | None = None, process_count: int = 1,
             training: bool = True) -> list[str]:
  """Every problem found in a resolved config, one line each (empty: none found)."""
  out: list[str] = []
  _types(config, configs.defaults(), "", out)
  if out:  # Range checks below assume the types are right.
    return out
  for check_fn in (_durations, _optimiser, _schedule, _regularisation, _input, _model,
                   _evals):
    check_fn(config, out)
  _files(config, out, model_init=training)
  _logging(config, out)
  _devices(config, num_devices, process_count, out)
  return out


def _types(config, reference, prefix: str, out: list[str]) -> None:
  for key, default in reference.items():
    path = prefix + key
    if path in configs.FREE_FORM or key not in config:
      continue
    value = config[key]
    if isinstance(default, configs.ConfigDict):
      if not isinstance(value, configs.ConfigDict):
        out.append(f"config.{path} must be a dict, got {value!r}")
      else:
        _types(value, default, path + ".", out)
      continue
    expected = _OPTIONAL.get(path) or _kind(reference, key, default)
    if value is None and (path in _OPTIONAL or default is None):
      continue
    if not _is(value, expected):
      shown = value.to_dict() if isinstance(value, configs.ConfigDict) else value
      out.append(f"config.{path} must be {_describe(expected)}, got {shown!r}")


def _kind(reference, key, default):
  try:
    kind = reference.get_type(key)
  except (AttributeError, KeyError):
    kind = type(default)
  return (list, tuple) if kind in (list, tuple) else kind


def _is(value, expected) -> bool:
  kinds = expected if isinstance(expected, tuple) else (expected,)
  if isinstance(value, bool):
    return bool in kinds
  if float in kinds and isinstance(value, int):
    return True
  return isinstance(value, kinds)


def _describe(expected) -> str:
  kinds = expected if isinstance(expected, tuple) else (expected,)
  names = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
           list: "a list", tuple: "a list"}
  return " or ".join(dict.fromkeys(names.get(k, k.__name__) for k in kinds))


def _need(out: list[str], ok: bool, message: str) -> None:
  if not ok:
    out.append(message)


def _durations(c, out) -> None:
  given = [k for k in ("total_steps", "total_examples", "total_epochs")
           if c[k] is not None]
  _need(out, bool(given), "no training length: set total_steps, total_examples or "
        "total_epochs")
  for key in given:
    _need(out, c[key] > 0, f"config.{key} must be positive, got {c[key]}")


def _optimiser(c, out) -> None:
  _one_of(out, "optax_name", c.optax_name, configs.OPTIMIZERS)
  _one_of(out, "wd_mode", c.wd_mode, configs.WD_MODES)
  _one_of(out, "loss", c.loss, configs.LOSSES)
  for key in ("lr", "wd", "grad_clip_norm"):
    _need(out, c[key] >= 0, f"config.{key} must be >= 0, got {c[key]}")
  _regex(out, "wd_mask", [c.wd_mask])
  _pairs(out, "lr_mults", c.lr_mults, lambda m: isinstance(m, (int, float)) and m >= 0,
         "(regex, multiplier >= 0)")
  _regex(out, "frozen", [c.frozen] if isinstance(c.frozen, str) else list(c.frozen))
  cw = c.class_weights
  if isinstance(cw, str):
    _need(out, cw == "balanced", f"config.class_weights must be None, 'balanced' or a list "
          f"of {c.num_classes} weights, got '{cw}'")
  elif cw is not None:
    _need(out, len(cw) == c.num_classes and all(
        isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w)
        and w >= 0 for w in cw), f"config.class_weights must list {c.num_classes} "
          f"non-negative weights (finite numbers), got {cw}")


def _schedule(c, out) -> None:
  s = c.schedule
  _one_of(out, "schedule.decay_type", s.decay_type, configs.DECAY_TYPES)
  _need(out, s.warmup_steps >= 0, f"config.schedule.warmup_steps must be >= 0, got "
        f"{s.warmup_steps}")
  _need(out, 0 <= s.warmup_percent <= 1, f"config.schedule.warmup_percent must be in "
        f"[0, 1], got {s.warmup_percent}")
  _need(out, s.end_factor >= 0, f"config.schedule.end_factor must be >= 0, got "
        f"{s.end_factor}")
  _need(out, s.timescale > 0, f"config.schedule.timescale must be > 0, got {s.timescale}")
  if s.decay_type == "stair":
    b = list(s.boundaries)
    _need(out, _fractions(b), f"config.schedule.boundaries must be increasing fractions "
          f"of the run in (0, 1] for decay_type 'stair', got {b}")
    _need(out, s.stair_factor > 0, f"config.schedule.stair_factor must be > 0, got "
          f"{s.stair_factor}")
  steps = _known_steps(c)
  if steps is not None and s.warmup_steps >= 0 and 0 <= s.warmup_percent <= 1:
    _length(c, steps, out)


def _fractions(b: list) -> bool:
  """Whether stair `boundaries` are increasing fractions of the run in (0, 1]."""
  return bool(b) and b == sorted(b) and all(
      isinstance(x, (int, float)) and 0 < x <= 1 for x in b)


def _known_steps(c) -> int | None:
  """The run's length in steps when the config alone gives it (not with total_epochs)."""
  if (c.total_steps is None and c.total_examples is None) or c.input.batch_size <= 0:
    return None
  try:
    return configs.total_steps(c, 0)
  except ConfigError:  # Not positive: _durations reports it.
    return None


def _length(c, steps: int, out) -> None:
  """What needs the run's length: a warmup longer than the run, a stair inside it."""
  s = c.schedule
  warmup = configs.warmup_steps(c, steps)
  if warmup > steps:
    out.append(f"config.schedule: warmup ({warmup} steps) is longer than the run "
               f"({steps} steps): shorten schedule.warmup_steps or the warmup_percent")
    return
  if s.decay_type == "stair" and _fractions(list(s.boundaries)):
    first = round(float(s.boundaries[0]) * steps)
    _need(out, first >= warmup, f"config.schedule.boundaries: the first boundary (step "
          f"{first}) falls inside the warmup ({warmup} steps)")


def _regularisation(c, out) -> None:
  _need(out, 0 <= c.label_smoothing < 1, f"config.label_smoothing must be in [0, 1), got "
        f"{c.label_smoothing}")
  _need(out, 0 <= c.ema_decay < 1, f"config.ema_decay must be in [0, 1) (0 turns EMA off), "
        f"got {c.ema_decay}")
  for key, value in (("mixup.alpha", c.mixup.alpha), ("mixup.p", c.mixup.p),
                     ("cutmix.alpha", c.cutmix.alpha)):
    _need(out, math.isfinite(value) and value >= 0, f"config.{key} must be a finite "
          f"number >= 0 (0 turns it off), got {value}")
  _need(out, not (c.mixup.alpha and c.mixup.p), "config.mixup: set alpha (timm) or p "
        "(big_vision), not both")
  _need(out, 0 <= c.mix_switch_prob <= 1, f"config.mix_switch_prob must be in [0, 1], got "
        f"{c.mix_switch_prob}")
  _need(out, c.max_skipped_in_a_row >= 1, f"config.max_skipped_in_a_row must be >= 1, got "
        f"{c.max_skipped_in_a_row}")
  _need(out, c.grad_accum_steps >= 1, f"config.grad_accum_steps must be >= 1, got "
        f"{c.grad_accum_steps}")


def _input(c, out) -> None:
  i = c.input
  _need(out, i.batch_size > 0, f"config.input.batch_size must be > 0, got {i.batch_size}")
  _need(out, i.num_threads >= 1, f"config.input.num_threads must be >= 1, got "
        f"{i.num_threads}")
  for key in ("prefetch", "num_workers", "device_prefetch"):
    _need(out, i[key] >= 0, f"config.input.{key} must be >= 0, got {i[key]}")
  _need(out, isinstance(i.data.get("name"), str) and bool(i.data.get("name")),
        "config.input.data.name must name a dataset (TFDS name or folder:PATH)")
  if _pp(out, "input.pp", i.pp) and i.on_device:
    from vitcls.data import pp  # pylint: disable=g-import-not-at-top
    try:
      pp.plan(i.pp, on_device=True)  # Reads the registry only: no JAX.
    except pp.PreprocessError as e:
      out.append(f"config.{e}")
  _need(out, c.num_classes > 0, f"config.num_classes must be > 0, got {c.num_classes}")


def _model(c, out) -> None:
  from vitcls import models  # pylint: disable=g-import-not-at-top
  names = models.available()
  if c.model_name not in names:
    out.append(f"config.model_name: unknown model '{c.model_name}': available models: "
               f"{', '.join(names)}")
    return
  known = models.fields(c.model_name)
  for key in c.model:
    if key not in known:
      out.append(f"unknown config key 'model.{key}' for model '{c.model_name}': known "
                 f"fields are {', '.join(sorted(known))}")


def _evals(c, out) -> None:
  from vitcls import evaluators  # pylint: disable=g-import-not-at-top
  for name, ev in c.evals.items():
    try:
      resolved = evaluators.resolve(name, ev)
    except ConfigError as e:
      out.append(str(e))
      continue
    _need(out, isinstance(resolved.every, int) and resolved.every >= 1,
          f"config.evals.{name}.every must be a positive integer, got {resolved.every!r}")
    _need(out, isinstance(resolved.batch_size, int) and resolved.batch_size >= 1,
          f"config.evals.{name}.batch_size must be a positive integer, got "
          f"{resolved.batch_size!r}")
    for key in ("pp", "ood_pp"):
      if resolved.get(key):
        _pp(out, f"evals.{name}.{key}", resolved[key])
    for key in ("data", "ood_data"):
      if resolved.get(key):
        _dataset(out, f"evals.{name}.{key}", resolved[key], c.input.data_dir)


def _files(c, out, model_init: bool = True) -> None:
  if model_init and c.model_init and not os.path.exists(c.model_init):
    out.append(f"config.model_init: '{c.model_init}' does not exist: give an .npz "
               f"checkpoint or a vitcls workdir")
  if c.input.data_dir and not os.path.isdir(os.path.expanduser(c.input.data_dir)):
    out.append(f"config.input.data_dir: '{c.input.data_dir}' is not a folder")
  elif isinstance(c.input.data.get("name"), str) and c.input.data.name:
    _dataset(out, "input.data.name", c.input.data.name, c.input.data_dir)


def _dataset(out, key: str, name: str, data_dir: str) -> None:
  """A folder: path must exist; a TFDS name must be prepared (or built in) in the data dir."""
  from vitcls.data import embedded, folder, sources  # pylint: disable=g-import-not-at-top
  if folder.is_folder(name):
    path = folder.path_of(name)
    _need(out, os.path.isdir(path), f"config.{key}: folder '{path}' does not exist")
    return
  if name in embedded.BUILDERS:
    return
  root = sources.data_dir(data_dir or None)
  base = re.split(r"[:/]", name, maxsplit=1)[0]
  _need(out, os.path.isdir(os.path.join(root, base)),
        f"config.{key}: dataset '{name}' is not prepared in {root}: prepare it with "
        f"`tfds build {base} --file_format=array_record --data_dir={root}` or set "
        f"TFDS_DATA_DIR / config.input.data_dir to where it is")


def _logging(c, out) -> None:
  for key in ("log_every", "checkpoint_every", "keep_checkpoints", "heartbeat_timeout_s"):
    _need(out, c[key] >= 1, f"config.{key} must be >= 1, got {c[key]}")


def _devices(c, num_devices: int | None, process_count: int, out) -> None:
  batch = c.input.batch_size
  if batch <= 0:
    return
  _need(out, batch % process_count == 0, f"config.input.batch_size {batch} is not "
        f"divisible by the {process_count} processes")
  axes = list(c.mesh)
  sizes = _mesh_shape(axes, out)
  if sizes is None:
    return
  rules = list(c.sharding_rules)
  _pairs(out, "sharding_rules", rules, lambda kind: kind in configs.SHARDING_KINDS,
         f"(regex, {' | '.join(configs.SHARDING_KINDS)})")
  if num_devices is None or not _mesh_devices(axes, sizes, num_devices, out):
    return
  _need(out, batch % num_devices == 0, f"config.input.batch_size {batch} is not divisible "
        f"by the {num_devices} devices: use a multiple of {num_devices}")
  accum = c.grad_accum_steps
  if accum >= 1 and batch % num_devices == 0:
    _need(out, batch % (accum * num_devices) == 0, f"config.grad_accum_steps {accum} must "
          f"divide the per-device batch ({batch // num_devices} on each of {num_devices} "
          f"devices)")


def _mesh_shape(axes: list, out) -> list[int] | None:
  """The mesh's axis sizes (one may be -1), or None after appending what is wrong."""
  if not all(isinstance(a, (list, tuple)) and len(a) == 2 and isinstance(a[0], str)
             and isinstance(a[1], int) and (a[1] >= 1 or a[1] == -1) for a in axes):
    out.append(f"config.mesh must be a list of (axis name, size >= 1 or -1), got {axes}")
    return None
  sizes = [size for _, size in axes]
  if sizes.count(-1) > 1:
    out.append(f"config.mesh {axes}: at most one axis may have size -1")
    return None
  return sizes


def _mesh_devices(axes: list, sizes: list[int], num_devices: int, out) -> bool:
  """Whether the mesh lays out exactly `num_devices` devices (else appends why not)."""
  fixed = math.prod(s for s in sizes if s != -1)
  if num_devices % fixed:
    out.append(f"config.mesh {axes} does not divide the {num_devices} devices")
    return False
  if -1 not in sizes and fixed != num_devices:
    out.append(f"config.mesh {axes} needs {fixed} devices but {num_devices} are present: "
               f"fix config.mesh (size -1 takes the devices left over)")
    return False
  return True


def _one_of(out, key: str, value: Any, choices) -> None:
  _need(out, value in choices, f"config.{key}: unknown value {value!r}: use one of "
        f"{', '.join(choices)}")


def _regex(out, key: str, patterns) -> None:
  for pattern in patterns:
    try:
      re.compile(pattern)
    except (re.error, TypeError) as e:
      out.append(f"config.{key}: bad regex {pattern!r}: {e}")


def _pairs(out, key: str, rules, value_ok: Callable[[Any], bool], shape: str) -> None:
  for rule in rules:
    if not (isinstance(rule, (list, tuple)) and len(rule) == 2 and value_ok(rule[1])):
      out.append(f"config.{key}: each entry must be {shape}, got {rule!r}")
      continue
    _regex(out, key, [rule[0]])


def _pp(out, key: str, spec) -> bool:
  """Appends what is wrong with the pp string `spec`; True when it parses."""
  from vitcls.data import pp  # pylint: disable=g-import-not-at-top
  if not isinstance(spec, str):
    out.append(f"config.{key} must be a pp string like 'resize(32)|value_range(-1,1)'")
    return False
  try:
    pp.parse(spec)
  except pp.PreprocessError as e:
    out.append(f"config.{key}: {e}")
    return False
  return True
