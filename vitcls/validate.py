"""Checks a whole config before anything heavy is imported, built or compiled.

A run that fails after minutes of imports, data opening and compilation because of a
misspelt name or a batch that does not split over the devices wastes the time of the
person waiting for it, and often a queue slot. `problems(config)` runs in well under a
second (NumPy and PIL are its heaviest imports; no JAX, TensorFlow or flax) and returns
every problem it finds, one line each: field types against `configs.defaults()`, ranges,
names (model and its fields, optimiser, schedule, loss, evaluators and their keys, pp
ops), regexes, the mesh and batch against a device and process count when given, and
the files the config names. `check(config)` raises one `ConfigError` listing them all.
"""

from __future__ import annotations

import ast
import math
import os
import re
from typing import Any, Callable, Sequence

from vitcls import configs

ConfigError = configs.ConfigError

OPTIMIZERS = ("adamw", "sgd", "adafactor")
DECAY_TYPES = ("cosine", "linear", "rsqrt", "stair", "constant")
WD_MODES = ("times_lr", "times_schedule", "l2")
LOSSES = ("softmax_xent", "sigmoid_xent")
SHARDING_KINDS = ("replicate", "fsdp")
# Fields that may be None besides their default's type.
_OPTIONAL = {"total_steps": int, "total_examples": int, "total_epochs": float,
             "class_weights": (str, list, tuple)}


def check(config, *, num_devices: int | None = None, process_count: int = 1,
          known: Sequence[str] = ()) -> None:
  """Raises one ConfigError naming every problem of `config` (one per line), if any.

  `known`: problems found before (e.g. bad command-line overrides), listed first.
  """
  found = [*known, *problems(config, num_devices=num_devices, process_count=process_count)]
  if len(found) == 1:
    raise ConfigError(found[0])
  if found:
    raise ConfigError(f"{len(found)} problems in the config:\n  " + "\n  ".join(found))


def problems(config, *, num_devices: int | None = None,
             process_count: int = 1) -> list[str]:
  """Every problem found in a resolved config, one line each (empty: none found)."""
  out: list[str] = []
  _types(config, configs.defaults(), "", out)
  if out:  # Range checks below assume the types are right.
    return out
  for check_fn in (_durations, _optimiser, _schedule, _regularisation, _input, _model,
                   _evals, _files, _logging):
    check_fn(config, out)
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
      out.append(f"config.{path} must be {_describe(expected)}, got {value!r}")


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
  _one_of(out, "optax_name", c.optax_name, OPTIMIZERS)
  _one_of(out, "wd_mode", c.wd_mode, WD_MODES)
  _one_of(out, "loss", c.loss, LOSSES)
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
        isinstance(w, (int, float)) and w >= 0 for w in cw),
          f"config.class_weights must list {c.num_classes} non-negative weights, got {cw}")


def _schedule(c, out) -> None:
  s = c.schedule
  _one_of(out, "schedule.decay_type", s.decay_type, DECAY_TYPES)
  _need(out, s.warmup_steps >= 0, f"config.schedule.warmup_steps must be >= 0, got "
        f"{s.warmup_steps}")
  _need(out, 0 <= s.warmup_percent <= 1, f"config.schedule.warmup_percent must be in "
        f"[0, 1], got {s.warmup_percent}")
  _need(out, s.end_factor >= 0, f"config.schedule.end_factor must be >= 0, got "
        f"{s.end_factor}")
  if c.total_steps is not None and isinstance(c.total_steps, int):
    _need(out, s.warmup_steps <= c.total_steps, f"config.schedule.warmup_steps "
          f"({s.warmup_steps}) is longer than the run (total_steps {c.total_steps})")
  _need(out, s.timescale > 0, f"config.schedule.timescale must be > 0, got {s.timescale}")
  if s.decay_type == "stair":
    b = list(s.boundaries)
    _need(out, bool(b) and b == sorted(b) and all(
        isinstance(x, (int, float)) and 0 < x <= 1 for x in b),
          f"config.schedule.boundaries must be increasing fractions of the run in (0, 1] "
          f"for decay_type 'stair', got {b}")
    _need(out, s.stair_factor > 0, f"config.schedule.stair_factor must be > 0, got "
          f"{s.stair_factor}")


def _regularisation(c, out) -> None:
  _need(out, 0 <= c.label_smoothing < 1, f"config.label_smoothing must be in [0, 1), got "
        f"{c.label_smoothing}")
  _need(out, 0 <= c.ema_decay < 1, f"config.ema_decay must be in [0, 1) (0 turns EMA off), "
        f"got {c.ema_decay}")
  for key, value in (("mixup.alpha", c.mixup.alpha), ("mixup.p", c.mixup.p),
                     ("cutmix.alpha", c.cutmix.alpha)):
    _need(out, value >= 0, f"config.{key} must be >= 0 (0 turns it off), got {value}")
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
    from vitcls.data import preprocess  # pylint: disable=g-import-not-at-top
    try:
      preprocess.split_for_device(i.pp)
    except preprocess.PreprocessError as e:
      out.append(f"config.{e}")
  _need(out, c.num_classes > 0, f"config.num_classes must be > 0, got {c.num_classes}")


def _model(c, out) -> None:
  from vitcls import models  # pylint: disable=g-import-not-at-top
  names = models.available()
  if c.model_name not in names:
    out.append(f"config.model_name: unknown model '{c.model_name}': available models: "
               f"{', '.join(names)}")
    return
  known = model_fields(c.model_name)
  for key in c.model:
    if key not in known:
      out.append(f"unknown config key 'model.{key}' for model '{c.model_name}': known "
                 f"fields are {', '.join(sorted(known))}")


def model_fields(name: str) -> set[str]:
  """The fields of `vitcls.models.<name>.Model`, read from its source (no flax import)."""
  from vitcls import models  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(models.__file__), f"{name}.py")
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read())
  for node in tree.body:
    if isinstance(node, ast.ClassDef) and node.name == "Model":
      return {n.target.id for n in node.body
              if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)
              } - {"num_classes", "parent", "name"}
  return set()


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


def _files(c, out) -> None:
  if c.model_init and not os.path.exists(c.model_init):
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
  if not all(isinstance(a, (list, tuple)) and len(a) == 2 and isinstance(a[0], str)
             and isinstance(a[1], int) and (a[1] >= 1 or a[1] == -1) for a in axes):
    out.append(f"config.mesh must be a list of (axis name, size >= 1 or -1), got {axes}")
    return
  sizes = [size for _, size in axes]
  if sizes.count(-1) > 1:
    out.append(f"config.mesh {axes}: at most one axis may have size -1")
    return
  rules = list(c.sharding_rules)
  _pairs(out, "sharding_rules", rules, lambda kind: kind in SHARDING_KINDS,
         "(regex, replicate | fsdp)")
  if num_devices is None:
    return
  fixed = math.prod(s for s in sizes if s != -1)
  if num_devices % fixed:
    out.append(f"config.mesh {axes} does not divide the {num_devices} devices")
    return
  _need(out, batch % num_devices == 0, f"config.input.batch_size {batch} is not divisible "
        f"by the {num_devices} devices: use a multiple of {num_devices}")
  accum = c.grad_accum_steps
  if accum >= 1 and batch % num_devices == 0:
    _need(out, batch % (accum * num_devices) == 0, f"config.grad_accum_steps {accum} must "
          f"divide the per-device batch ({batch // num_devices} on each of {num_devices} "
          f"devices)")


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
  from vitcls.data import preprocess, randaug  # pylint: disable=g-import-not-at-top,unused-import
  if not isinstance(spec, str):
    out.append(f"config.{key} must be a pp string like 'resize(32)|value_range(-1,1)'")
    return False
  try:
    preprocess.parse(spec)
  except preprocess.PreprocessError as e:
    out.append(f"config.{key}: {e}")
    return False
  return True
