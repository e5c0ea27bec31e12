"""The members of a sweep: its experiment's `get_sweep` list, validated and named, and the
record (`sweep_member.json`) a local runner keeps in each member's workdir.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any, Mapping, Sequence

from vitcls import configs
from vitcls.run import workdir as wdir
from vitcls.sweep import builders

_MAX_NAME = 80  # Longer member names are cut and get a hash suffix.


def _plain(value: Any) -> Any:
  """NumPy scalars and arrays (e.g. from np.logspace) as Python numbers and lists."""
  return value.tolist() if hasattr(value, "tolist") and callable(value.tolist) else value


def to_text(value: Any, key: str = "") -> str:
  """The command-line text of an override value, which `configs.set_value` reads back."""
  value = _plain(value)
  if isinstance(value, str):
    return value
  if value is None or isinstance(value, (bool, int, float, list, tuple)):
    return repr(value)
  raise builders.SweepError(f"sweep value {value!r} of '{key}' must be a str, number, bool, None, "
                   f"list or tuple")


def _slug(text: str) -> str:
  return re.sub(r"_+", "_", re.sub(r"[^A-Za-z0-9._=+-]", "_", text)).strip("_")


def _digest(texts: Sequence[str]) -> str:
  return hashlib.sha1("\n".join(texts).encode()).hexdigest()[:8]


def member_names(members: Sequence[Sequence[str]]) -> list[str]:
  """Readable, filesystem-safe, unique names from each member's `KEY=VALUE` overrides:
  `lr=0.001,wd=0.05`; cut with a hash suffix when long or when two would collide."""
  names = []
  for texts in members:
    name = ",".join(_slug(t) for t in texts) or "default"
    if len(name) > _MAX_NAME:
      name = name[:_MAX_NAME - 9].rstrip(",") + "-" + _digest(texts)
    names.append(name)
  for i, texts in enumerate(members):
    if names.count(names[i]) > 1:
      names[i] = names[i][:_MAX_NAME - 9] + "-" + _digest(texts)
  return names


class Member:
  """One run of a sweep: its overrides (values and their text) and its workdir name."""

  def __init__(self, index: int, values: dict, texts: list[str], name: str = ""):
    self.index, self.values, self.texts, self.name = index, values, texts, name

  def __repr__(self) -> str:
    return f"Member({self.index}, {self.name!r})"


def _same(a: Any, b: Any) -> bool:
  """Config values equal up to list/tuple and int/float differences."""
  if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
  if isinstance(a, Mapping) and isinstance(b, Mapping):
    return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
  return a == b


def _get(config, dotted: str) -> Any:
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node.to_dict() if isinstance(node, configs.ConfigDict) else node


def load_members(spec: str, common: Sequence[str] = ()) -> tuple[list[Member], list]:
  """The members of `spec`'s get_sweep and their resolved configs, all validated.

  `common` are `KEY=VALUE` overrides applied to every member before its own. Raises a
  one-line SweepError / ConfigError naming the member and the fix.
  """
  path, _, arg = spec.partition(":")
  module = configs.import_experiment(path)
  if not hasattr(module, "get_sweep"):
    raise builders.SweepError(f"config file '{path}' has no get_sweep(arg=None) function: add one "
                     f"returning a list of override dicts, e.g. "
                     f"vitcls.sweep.product(lr=[1e-3, 3e-3])")
  raw = module.get_sweep(arg or None)
  if isinstance(raw, Mapping) or isinstance(raw, (str, bytes)) or raw is None:
    raise builders.SweepError(f"get_sweep of '{path}' must return a list of override dicts, got "
                     f"{type(raw).__name__}")
  raw = list(raw)
  if not raw:
    raise builders.SweepError(f"get_sweep of '{path}' returned no members: return at least one "
                     f"override dict")
  base = module.get_config(arg or None)
  configs.resolve(base, common)  # A bad common override is reported as it is.
  members, resolved, seen = [], [], {}
  for i, values in enumerate(raw):
    if not isinstance(values, Mapping):
      raise builders.SweepError(f"sweep member {i + 1} of '{path}' must be a dict of overrides, "
                       f"got {values!r}")
    values = {k: _plain(v) for k, v in values.items()}
    texts = [f"{k}={to_text(v, k)}" for k, v in values.items()]
    where = f"sweep member {i + 1} of {len(raw)} ({','.join(texts) or 'no overrides'})"
    try:
      config = configs.resolve(base, [*common, *texts])
    except configs.ConfigError as e:
      raise configs.ConfigError(f"{where}: {e}") from e
    for key, value in values.items():
      got = _get(config, key)
      if not _same(got, value):
        raise builders.SweepError(f"{where}: '{key}' became {got!r} instead of {value!r} through "
                         f"the command line: give it as a {type(got).__name__}")
    key = configs.to_json(config)
    if key in seen:
      raise builders.SweepError(f"{where} gives the same config as sweep member {seen[key] + 1}: "
                       f"remove one of them from get_sweep")
    seen[key] = i
    members.append(Member(i, values, texts))
    resolved.append(config)
  for m, name in zip(members, member_names([m.texts for m in members])):
    m.name = name
  return members, resolved


def swept_keys(members: Sequence[Member]) -> list[str]:
  """Every key some member overrides, in first-seen order: the table's parameter columns."""
  keys = []
  for m in members:
    keys += [k for k in m.values if k not in keys]
  return keys


def planned_steps(config) -> int | None:
  """A member's training length in steps, when its config gives it without the data."""
  if config.total_steps is not None:
    return int(config.total_steps)
  if config.total_examples is not None:
    return -(-int(config.total_examples) // int(config.input.batch_size))
  return None


def read_record(member_dir: str) -> dict:
  """A member's `sweep_member.json` (status, attempts, wall time), or {} if unreadable."""
  try:
    with open(os.path.join(member_dir, wdir.MEMBER_FILE)) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def write_record(member_dir: str, info: dict) -> None:
  """Rewrites a member's `sweep_member.json`, atomically."""
  wdir.atomic_write(os.path.join(member_dir, wdir.MEMBER_FILE),
                    json.dumps(info, indent=2, sort_keys=True) + "\n")
