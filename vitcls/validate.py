"""Checks a whole config before anything heavy is imported, built or compiled.

A run that fails after minutes of imports, data opening and compilation because of a
misspelt name or a batch that does not split over the devices wastes the time of the
person waiting for it, and often a queue slot. `problems(config)` runs in well under a
second (NumPy and PIL are its heaviest imports, and huggingface_hub for an `hf-hub:`
model_init; no JAX, TensorFlow or flax) and returns every problem it finds, one line
each: field types against `configs.defaults()`, ranges, names (model and its fields,
optimiser, schedule, loss, evaluators and their keys, pp ops), the model's field values
(the rules its file declares, `models.field_rules`), regexes, the mesh and batch against
a device and process count when given, the files the config names (an `hf-hub:`
checkpoint in the Hub cache, never on the network), and what the model is given: each pp is run once on a blank example
of its dataset's image shape (`sources.facts`, or two unlike shapes where images vary),
so its images are checked against the model's patch and its labels' depth, like each
dataset's classes, against the classes they are for. `check(config)` raises one
`ConfigError` listing them all; `check_workdir` does the same for the trainer's workdir.

It is the only gate: `vitcls.run.build` calls `check` first, and the library modules do
not check the config again. What only a built run knows is checked here too, by functions
`build` calls with the resolved values: `check_built` (the run's length in steps, the
optax optimiser's arguments), `check_class_counts` (class_weights "balanced") and
`check_mesh` (a mesh on the devices present). A distillation teacher (`config.distill`) is
checked as far as configs and files tell, before JAX loads (its workdir's config.json,
the model and fields it names, its class count, its pp ops); what only its weights tell
(the head's shape, a corrupt file) is checked by `vitcls.run.teacher.load`, which builds
the teacher these helpers describe (`teacher_architecture`, `teacher_op`).
"""

from __future__ import annotations

import ast
import json
import math
import os
import re
from typing import Any, Callable, Collection, NamedTuple, Sequence

from vitcls import configs
from vitcls.errors import UserError

ConfigError = configs.ConfigError
# Fields that may be None besides their default's type.
_OPTIONAL = {"total_steps": int, "total_examples": int, "total_epochs": float,
             "class_weights": (str, list, tuple)}


def check(config, *, num_devices: int | None = None, process_count: int = 1,
          known: Sequence[str] = (), training: bool = True, local_files: bool = True
          ) -> None:
  """Raises one ConfigError naming every problem of `config` (one per line), if any.

  `known`: problems found before (e.g. bad command-line overrides), listed first.
  `training=False`: the config of a finished run, evaluated again: what only starting
  a run reads (`model_init`) is not checked. `local_files=False`: the run will read its
  files elsewhere (`vitcls.launch` writes for a cluster's nodes, whose data may be on
  their own disks), so whether datasets and `model_init` exist here is not checked.
  """
  _raise([*known, *problems(config, num_devices=num_devices, process_count=process_count,
                            training=training, local_files=local_files)])


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


def check_workdir(path: str) -> None:
  """Raises ConfigError unless `path` is a folder this user can write, or can be made one.

  The trainer calls it with the config check, before JAX loads: a workdir that is a
  file, lies under a file, or is read-only would otherwise fail at the first file it
  writes, after the imports and the compilation.
  """
  full = os.path.abspath(os.path.expanduser(path))
  there = full  # The nearest part of the path that exists: what must be a writable folder.
  while not os.path.lexists(there) and os.path.dirname(there) != there:
    there = os.path.dirname(there)
  if there == full and not os.path.isdir(full):
    raise ConfigError(f"--workdir '{path}' is a file, not a folder: give the path of a "
                      f"folder (it is made when missing)")
  if not os.path.isdir(there):
    raise ConfigError(f"--workdir '{path}' lies under '{there}', which is a file, not a "
                      f"folder: give a path under a folder")
  if not os.access(there, os.W_OK | os.X_OK):
    which = "it" if there == full else f"'{there}', where it would be made,"
    raise ConfigError(f"--workdir '{path}' cannot be written: {which} is read-only for "
                      f"this user: give a folder you can write to")


def _raise(found: list[str]) -> None:
  if len(found) == 1:
    raise ConfigError(found[0])
  if found:
    raise ConfigError(f"{len(found)} problems in the config:\n  " + "\n  ".join(found))


def problems(config, *, num_devices: int | None = None, process_count: int = 1,
             training: bool = True, local_files: bool = True) -> list[str]:
  """Every problem found in a resolved config, one line each (empty: none found)."""
  out: list[str] = []
  _types(config, configs.defaults(), "", out)
  if out:  # Range checks below assume the types are right.
    return out
  for check_fn in (_seed, _durations, _optimiser, _schedule, _regularisation, _input,
                   _model):
    check_fn(config, out)
  _evals(config, out, local_files)
  _distill(config, out, local_files, training)
  if training:
    _model_init(config, out, local_files)
  if local_files:
    _files(config, out)
  _logging(config, out)
  _devices(config, num_devices, process_count, out)
  _given(config, out)
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


def _seed(c, out) -> None:
  _need(out, 0 <= c.seed < 2 ** 63, f"config.seed must be in [0, 2**63) (NumPy and JAX "
        f"take no negative seed), got {c.seed}")


def _durations(c, out) -> None:
  given = [k for k in ("total_steps", "total_examples", "total_epochs")
           if c[k] is not None]
  _need(out, bool(given), "no training length: set total_steps, total_examples or "
        "total_epochs")
  for key in given:
    _need(out, c[key] > 0, f"config.{key} must be positive, got {c[key]}")


_ACCUMULATOR_DTYPES = ("float32", "bfloat16", "float16")  # SGD's momentum (optax.trace).


def _optimiser(c, out) -> None:
  _one_of(out, "optax_name", c.optax_name, configs.OPTIMIZERS)
  _one_of(out, "wd_mode", c.wd_mode, configs.WD_MODES)
  _one_of(out, "loss", c.loss, configs.LOSSES)
  for key in ("lr", "wd", "grad_clip_norm"):
    _need(out, c[key] >= 0, f"config.{key} must be >= 0, got {c[key]}")
  _regex(out, "wd_mask", [c.wd_mask])
  dtype = c.optax.get("accumulator_dtype")
  _need(out, dtype in (None, *_ACCUMULATOR_DTYPES), f"config.optax.accumulator_dtype must "
        f"be one of {', '.join(_ACCUMULATOR_DTYPES)}, got {dtype!r}")
  _pairs(out, "lr_mults", c.lr_mults, lambda m: isinstance(m, (int, float)) and m >= 0,
         "(regex, multiplier >= 0)")
  _regex(out, "frozen", [c.frozen] if isinstance(c.frozen, str) else list(c.frozen))
  _need(out, math.isfinite(c.layer_decay) and 0 < c.layer_decay <= 1, f"config.layer_decay "
        f"must be in (0, 1] (1.0 turns it off; fine-tuning uses e.g. 0.65), got "
        f"{c.layer_decay}")
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
  _need(out, math.isfinite(s.warmup_start) and s.warmup_start >= 0, f"config.schedule."
        f"warmup_start must be a finite number >= 0 (a fraction of lr), got "
        f"{s.warmup_start}")
  _need(out, s.steps_per_update >= 1, f"config.schedule.steps_per_update must be >= 1, "
        f"got {s.steps_per_update}")
  _need(out, s.update_lag >= 0, f"config.schedule.update_lag must be >= 0, got "
        f"{s.update_lag}")
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
  _need(out, i.repeated_augmentation >= 1, f"config.input.repeated_augmentation must be "
        f">= 1 (1: off; DeiT uses 3), got {i.repeated_augmentation}")
  _need(out, isinstance(i.data.get("name"), str) and bool(i.data.get("name")),
        "config.input.data.name must name a dataset (TFDS name or folder:PATH)")
  if _pp(out, "input.pp", i.pp) and i.on_device:
    from vitcls.data import pp  # pylint: disable=g-import-not-at-top
    try:
      pp.plan(i.pp, on_device=True)  # Reads the registry only: no JAX.
    except pp.PreprocessError as e:
      out.append(f"config.{e}")
  if c.loss == "softmax_xent":  # A softmax over one class is 1 whatever the model says.
    _need(out, c.num_classes >= 2, f"config.num_classes must be >= 2 with loss "
          f"softmax_xent (over one class every prediction is right: loss 0, top-1 1.0), "
          f"got {c.num_classes}")
  else:
    _need(out, c.num_classes > 0, f"config.num_classes must be > 0, got {c.num_classes}")


def _model(c, out) -> None:
  from vitcls import models  # pylint: disable=g-import-not-at-top
  names = models.available()
  if c.model_name not in names:
    out.append(f"config.model_name: unknown model '{c.model_name}': available models: "
               f"{', '.join(names)}")
    return
  if c.layer_decay != 1.0 and not _defines(c.model_name, "layer_ids"):
    numbered = [n for n in names if _defines(n, "layer_ids")]
    out.append(f"config.layer_decay needs a model that numbers its layers (`layer_ids`), "
               f"which '{c.model_name}' does not: use one of {', '.join(numbered)}, or "
               f"layer_decay=1.0")
  _model_fields(out, "model", c.model_name, c.model)


def _model_fields(out, key: str, model_name: str, fields) -> None:
  """Each field of `fields` (config.<key>) known to model `model_name`, and its value
  following the model's rule (`models.field_rules`)."""
  from vitcls import models  # pylint: disable=g-import-not-at-top
  known = models.fields(model_name)
  rules = models.field_rules(model_name)
  for field, value in fields.items():
    if field not in known:
      out.append(f"unknown config key '{key}.{field}' for model '{model_name}': known "
                 f"fields are {', '.join(sorted(known))}")
    elif field in rules and value is not None:
      _need(out, _follows(value, rules[field]), f"config.{key}.{field} must be "
            f"{_rule_text(rules[field])}, got {_plain(value)!r}")


def _defines(model_name: str, function: str) -> bool:
  """Whether `vitcls/models/<model_name>.py` defines a top-level `function` (read from
  its source, like the model's fields: no flax)."""
  from vitcls import models  # pylint: disable=g-import-not-at-top
  return any(isinstance(node, ast.FunctionDef) and node.name == function
             for node in models._source(model_name) or ())  # pylint: disable=protected-access


# The kinds of rule a model's FIELD_RULES gives (`vitcls.models.field_rules`): whether a
# value follows it, and what it asks for.
_RULE_KINDS = {
    "positive": (lambda v: _positive_int(v) or (
        isinstance(v, (list, tuple)) and bool(v) and all(map(_positive_int, v))),
                 "a positive integer or a list of them"),
    "rate": (lambda v: _number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "patch": (lambda v: _patch(v) is not None,
              "a positive integer or a (height, width) pair of them"),
}


def _positive_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _plain(value):
  """A config value as it was typed: lists for ConfigDict's tuples."""
  return list(value) if isinstance(value, tuple) else value


def _patch(value) -> tuple[int, int] | None:
  """A "patch" field's (height, width), or None when the value is not one."""
  if _positive_int(value):
    return value, value
  if isinstance(value, (list, tuple)) and len(value) == 2 and all(map(_positive_int, value)):
    return tuple(value)
  return None


def _variant_patch(value, names) -> int | None:
  """The PATCH of a variant 'NAME/PATCH' with NAME in `names`, or None if it is not one."""
  name, _, patch = value.partition("/") if isinstance(value, str) else ("", "", "")
  return int(patch) if name in names and patch.isdigit() and int(patch) > 0 else None


def _follows(value, rule) -> bool:
  if isinstance(rule, dict):
    return _variant_patch(value, rule) is not None
  if isinstance(rule, (list, tuple)):
    return value in rule
  return _RULE_KINDS[rule][0](value)


def _rule_text(rule) -> str:
  if isinstance(rule, dict):
    return f"'NAME/PATCH' with NAME one of {', '.join(rule)} (e.g. 'S/16')"
  if isinstance(rule, (list, tuple)):
    return f"one of {', '.join(map(repr, rule))}"
  return _RULE_KINDS[rule][1]


def _model_patch(c) -> tuple[str, tuple[int, int]] | None:
  """(the field that sets it, (height, width)) of the model's patch, if it has one.

  A "patch" field set wins over a variant's PATCH (see `vitcls.models.field_rules`).
  """
  return _patch_of(c.model_name, c.model)


def _patch_of(model_name: str, fields) -> tuple[str, tuple[int, int]] | None:
  """`_model_patch` of model `model_name` with `fields`."""
  from vitcls import models  # pylint: disable=g-import-not-at-top
  rules = models.field_rules(model_name)
  for key, rule in rules.items():
    if rule == "patch" and fields.get(key) is not None:
      size = _patch(fields[key])
      return (key, size) if size else None
  for key, rule in rules.items():
    if isinstance(rule, dict) and fields.get(key) is not None:
      size = _variant_patch(fields[key], rule)
      return (key, (size, size)) if size else None
  return None


def _evals(c, out, local_files: bool = True) -> None:
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
      if resolved.get(key) and local_files:
        _dataset(out, f"evals.{name}.{key}", resolved[key], c.input.data_dir)


def _model_init(c, out, local_files: bool) -> None:
  """The checkpoint a run starts from: a local path must exist (when local files are
  checked); an `hf-hub:` name must be one, and the Hub cache is read, never the network,
  for what it can tell (`vitcls.models.hub.problems`)."""
  from vitcls.models import hub  # pylint: disable=g-import-not-at-top
  if not c.model_init:
    return
  if hub.is_hub(c.model_init):
    model_name = c.model_name if isinstance(c.model_name, str) else ""
    out.extend(f"config.model_init: {problem}" for problem in
               hub.problems(c.model_init, model_name, local_files=local_files))
  elif local_files and not os.path.exists(c.model_init):
    out.append(f"config.model_init: '{c.model_init}' does not exist: give an .npz or "
               f".safetensors checkpoint, a vitcls workdir, or hf-hub:<repo>")


TEACHER_KEY = "config.distill.teacher_init"


def teacher_op(entry) -> bool:
  """Whether a pp op (its registry entry, None for an unknown name) may prepare the
  teacher's input in the train step (`config.distill.teacher_pp`): one with a JAX twin
  that draws nothing and works on the image."""
  return (entry is not None and entry.jax_twin is not None and not entry.random
          and not entry.label)


def _saved_config(path) -> dict | None:
  """The config.json of the vitcls workdir `path`, or None (not a folder, none readable)."""
  from vitcls.run import workdir as wdir  # pylint: disable=g-import-not-at-top
  if not (isinstance(path, str) and os.path.isdir(path)):
    return None
  try:
    with open(wdir.config_path(path)) as f:
      value = json.load(f)
  except (OSError, ValueError):
    return None
  return value if isinstance(value, dict) else None


def teacher_architecture(c) -> tuple[str, dict, dict | None]:
  """(model name, model fields, the teacher workdir's config.json or None) of the
  distillation teacher: `distill.teacher_model_name`, else the workdir's; the fields of
  `distill.teacher_model` laid over the workdir's when the name is the workdir's, else on
  their own. What `vitcls.run.teacher.load` builds."""
  d = c.distill
  saved = _saved_config(d.teacher_init)
  name = d.teacher_model_name or (saved or {}).get("model_name") or ""
  fields = dict(d.teacher_model)
  if saved and name == saved.get("model_name"):
    fields = {**(saved.get("model") or {}), **fields}
  return name, fields, saved


def as_teacher(message: str) -> str:
  """A message about `config.model*` (the hub's, a model's `load`) as the teacher's
  fields name it; the student-only hint of a fresh init (dont_load) left out."""
  message = re.sub(r",? or add (it|the parameter) to config\.model_load\.dont_load to keep "
                   r"its fresh init", "", message)
  message = message.replace("config.model_name", "config.distill.teacher_model_name")
  message = message.replace("config.model_init", TEACHER_KEY)
  return re.sub(r"config\.model\b", "config.distill.teacher_model", message)


def _distill(c, out, local_files: bool, training: bool) -> None:
  """config.distill: its values always; with a teacher, what the config and files tell of
  it (when training, or when a distill evaluator will run it)."""
  d = c.distill
  _one_of(out, "distill.loss", d.loss, configs.DISTILL_LOSSES)
  _need(out, math.isfinite(d.temperature) and d.temperature > 0, f"config.distill."
        f"temperature must be a finite number > 0, got {d.temperature}")
  _need(out, 0 <= d.weight <= 1, f"config.distill.weight must be in [0, 1] (the teacher's "
        f"share of the target), got {d.weight}")
  _need(out, d.teacher_res >= 0, f"config.distill.teacher_res must be >= 0 (0: the "
        f"student's image size), got {d.teacher_res}")
  if d.teacher_pp:
    _teacher_pp(out, d.teacher_pp)
  evals = sorted(n for n, ev in c.evals.items()
                 if isinstance(ev, configs.ConfigDict) and ev.get("type") == "distill")
  if not d.teacher_init:
    for name in evals:
      out.append(f"config.evals.{name}: a distill evaluator compares the student with its "
                 f"teacher, and there is none: set {TEACHER_KEY}, or use type "
                 f"classification")
    return
  _need(out, c.loss == "softmax_xent", f"config.loss is {c.loss!r} but config.distill."
        f"loss replaces it when distilling, on softmax outputs: use loss 'softmax_xent' "
        f"(or no teacher)")
  _need(out, c.class_weights is None, "config.class_weights: distillation losses take no "
        "class weights: set class_weights=None (or no teacher)")
  if training or evals:
    _teacher(c, out, local_files)


def _teacher(c, out, local_files: bool) -> None:
  """The teacher's files, model, fields and class count, as far as configs tell."""
  from vitcls.models import hub  # pylint: disable=g-import-not-at-top
  d, key = c.distill, TEACHER_KEY
  init = d.teacher_init
  name, fields, saved = teacher_architecture(c)
  if hub.is_hub(init):
    out.extend(f"{key}: {as_teacher(p)}" for p in hub.problems(
        init, name, local_files=local_files and bool(name)))
  elif local_files:
    if not os.path.exists(init):
      out.append(f"{key}: '{init}' does not exist: give a vitcls workdir, an .npz or "
                 f".safetensors checkpoint, or hf-hub:<repo>")
      return
    if os.path.isdir(init) and saved is None:
      out.append(f"{key}: '{init}' is a folder but not a vitcls workdir (no readable "
                 f"config.json): give the --workdir of a training run, or a checkpoint file")
      return
  if saved is not None and saved.get("num_classes") != c.num_classes:
    out.append(f"{key}: the teacher in workdir '{init}' was trained for "
               f"{saved.get('num_classes')} classes but config.num_classes is "
               f"{c.num_classes}: a teacher must predict the student's classes: give one "
               f"trained on them")
  if not name:
    if local_files or hub.is_hub(init):
      what = "a Hub repo" if hub.is_hub(init) else "a file"
      out.append(f"{key}: '{init}' is {what}, which does not say which vitcls model it "
                 f"holds: set config.distill.teacher_model_name (and "
                 f"config.distill.teacher_model)")
    return
  from vitcls import models  # pylint: disable=g-import-not-at-top
  if name not in models.available():
    source = "" if d.teacher_model_name else f" (from workdir '{init}')"
    out.append(f"config.distill.teacher_model_name: unknown model '{name}'{source}: "
               f"available models: {', '.join(models.available())}")
    return
  found = len(out)
  _model_fields(out, "distill.teacher_model", name, fields)
  patch = _patch_of(name, fields) if len(out) == found else None
  res = d.teacher_res
  if patch and res > 0 and (patch[1][0] > res or patch[1][1] > res):
    out.append(f"config.distill.teacher_res={res}: the teacher's {patch[1][0]}x"
               f"{patch[1][1]} patches (config.distill.teacher_model.{patch[0]}) do not fit "
               f"in {res}x{res} images: give a teacher_res of at least {max(patch[1])}")


def _teacher_pp(out, spec) -> None:
  """config.distill.teacher_pp: known ops, each one that may run on the teacher's input."""
  if not _pp(out, "distill.teacher_pp", spec):
    return
  from vitcls.data.pp import registry  # pylint: disable=g-import-not-at-top
  usable = ", ".join(registry.available_ops(teacher_op))
  for call in registry.calls(spec):
    entry = registry.get(call.name)
    if not teacher_op(entry):
      why = ("draws at random" if entry.random else "works on labels" if entry.label
             else "has no JAX version")
      out.append(f"config.distill.teacher_pp: op '{call.text}' {why}; the teacher's input "
                 f"is prepared in the train step by ops that draw nothing: {usable}")


def _files(c, out) -> None:
  if c.input.data_dir and not os.path.isdir(os.path.expanduser(c.input.data_dir)):
    out.append(f"config.input.data_dir: '{c.input.data_dir}' is not a folder")
  elif isinstance(c.input.data.get("name"), str) and c.input.data.name:
    _dataset(out, "input.data.name", c.input.data.name, c.input.data_dir)


def _dataset(out, key: str, name: str, data_dir: str) -> None:
  """A folder: path must exist; a TFDS name must be prepared (or built in) in the data dir."""
  from vitcls.data import embedded, folder, sources  # pylint: disable=g-import-not-at-top
  if folder.is_folder(name):
    path = folder.path_of(name)
    if not os.path.isdir(path):
      out.append(f"config.{key}: folder '{path}' does not exist")
      return
    try:
      folder.class_names(path)  # Its layout, from folder names alone.
    except folder.FolderError as e:
      out.append(f"config.{key}: {e}")
    return
  if name in embedded.BUILDERS:
    return
  root = sources.data_dir(data_dir or None)
  base = re.split(r"[:/]", name, maxsplit=1)[0]
  _need(out, os.path.isdir(os.path.join(root, base)),
        f"config.{key}: dataset '{name}' is not prepared in {root}: prepare it with "
        f"`tfds build {base} --file_format=array_record --data_dir={root}` or set "
        f"TFDS_DATA_DIR / config.input.data_dir to where it is")


class _Feed(NamedTuple):
  """A pp and the dataset it reads, as the model is given them (by training or an eval)."""
  pp_key: str  # Where the config sets the pp, e.g. "input.pp".
  data_key: str  # Where it names the dataset.
  name: str  # The dataset.
  spec: str
  count_key: str | None  # The config key of the classes its labels are for (None: none).
  count: int | None


def _feeds(c) -> list[_Feed]:
  """Every pp the model is given images from: training's, then each evaluator's."""
  from vitcls import evaluators  # pylint: disable=g-import-not-at-top
  train = c.input.data.get("name")
  feeds = [_Feed("input.pp", "input.data.name", train, c.input.pp, "num_classes",
                 c.num_classes)]
  for name, ev in c.evals.items():
    try:
      ev = evaluators.resolve(name, ev)
    except ConfigError:  # `_evals` reports it.
      continue
    own = ev.get("num_classes")  # An evaluator that names its classes (a few-shot probe).
    count = ((f"evals.{name}.num_classes", own) if own else ("num_classes", c.num_classes))
    data = ((f"evals.{name}.data", ev.data) if ev.get("data") else
            ("input.data.name", train))
    feeds.append(_Feed(f"evals.{name}.pp", *data, ev.get("pp"), *count))
    if ev.get("ood_data"):  # Images unlike the training data: their labels go unused.
      feeds.append(_Feed(f"evals.{name}.ood_pp", f"evals.{name}.ood_data", ev.ood_data,
                         ev.get("ood_pp") or ev.get("pp"), None, None))
  return feeds


# Two unlike image shapes: what a pp makes of both, when the data's own shape is not known
# (a folder's images vary), is the size it resizes or crops every image to.
_PROBES = ((37, 53, 3), (61, 41, 3))


def _made(spec, shape) -> tuple[tuple[int, int] | None, int | None] | None:
  """What pp `spec` makes of an example whose image has `shape`: (the image's height and
  width, the labels' depth), each None where it varies or no op makes it; None when the
  spec does not run on such an example (a bad spec is reported by `_pp`, the rest by
  the run). With no `shape`, the spec runs on `_PROBES`. Host ops only, on tiny images:
  milliseconds, no JAX."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from vitcls.data import pp  # pylint: disable=g-import-not-at-top
  given = np.zeros((1,), np.int64)  # A multi-label dataset's own labels, left as they are.
  try:
    run = pp.parse(spec)
    made = [run({"image": np.zeros(s, np.uint8), "label": np.int64(0), "labels": given},
                np.random.default_rng(0)) for s in ([shape] if shape else _PROBES)]
  except Exception:  # pylint: disable=broad-except
    return None  # Any op may refuse a blank example; the run will say why, if it must.
  sizes = {np.shape(m.get("image"))[:2] for m in made}
  size = sizes.pop() if len(sizes) == 1 else None
  labels = made[0].get("labels")
  depth = None if labels is given or np.ndim(labels) < 1 else np.shape(labels)[-1]
  return (size if size is not None and len(size) == 2 else None), depth


def _given(c, out) -> None:
  """What the model is given: each dataset's classes and each pp's labels against the
  classes they are for, and each pp's images against the model's patch (a patch larger
  than the image leaves the model no token, and training NaN)."""
  from vitcls import models  # pylint: disable=g-import-not-at-top
  from vitcls.data import folder, sources  # pylint: disable=g-import-not-at-top
  patch = _model_patch(c) if c.model_name in models.available() else None
  told = set()
  for feed in _feeds(c):
    if not isinstance(feed.name, str) or not isinstance(feed.spec, str):
      continue  # Reported by `_input` / `_evals`.
    if not (isinstance(feed.count, int) and feed.count > 0):
      feed = feed._replace(count_key=None)  # A bad count is reported by `_input`.
    try:
      facts = sources.facts(feed.name, c.input.data_dir or None)
    except UserError:  # A folder not laid out as one: `_dataset` reports it.
      continue
    what = (f"folder '{folder.path_of(feed.name)}'" if folder.is_folder(feed.name) else
            f"dataset '{feed.name}'")
    if (feed.count_key and facts.num_classes not in (None, feed.count)
        and (feed.name, feed.count_key) not in told):
      told.add((feed.name, feed.count_key))
      out.append(_class_count(feed, what, facts))
    made = _made(feed.spec, facts.image_shape)
    if made is None:
      continue
    size, depth = made
    if feed.count_key and depth is not None and depth != feed.count:
      out.append(f"config.{feed.pp_key} makes labels of depth {depth} but config."
                 f"{feed.count_key} is {feed.count}: give its label op (onehot, multihot) "
                 f"depth {feed.count}")
    if patch and size and (patch[1][0] > size[0] or patch[1][1] > size[1]):
      if "patch" not in told:
        told.add("patch")
        key, (ph, pw) = patch
        out.append(f"config.model.{key}={_plain(c.model[key])!r}: its {ph}x{pw} patches "
                   f"do not fit in the {size[0]}x{size[1]} images config.{feed.pp_key} "
                   f"makes of {what}: use a patch of at most {size[0]}x{size[1]} pixels, "
                   f"or a larger resize in the pp")


def _class_count(feed: _Feed, what: str, facts) -> str:
  """The line for a dataset whose classes are not those its labels are made for."""
  names = facts.class_names or []
  shown = f" ({', '.join(names)})" if 0 < len(names) <= 10 else ""
  if feed.data_key == "input.data.name" or feed.count_key != "num_classes":
    return (f"config.{feed.count_key} is {feed.count} but {what} (config.{feed.data_key}) "
            f"has {facts.num_classes} classes{shown}: set config.{feed.count_key}="
            f"{facts.num_classes}")
  return (f"config.{feed.data_key}: {what} has {facts.num_classes} classes{shown} but the "
          f"model has {feed.count} (config.num_classes): evaluate on data with its classes")


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
