"""The members of a sweep: its experiment's `get_sweep` list, resolved, checked by the
trainer's gate (`vitcls.validate`) all together before any member starts, and named; and
the record (`sweep_member.json`) a local runner keeps in each member's workdir.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any, Mapping, Sequence

from vitcls import configs, validate
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
  """One run of a sweep: its overrides (values and their text) and its workdir name.

  `settings`: its value of every swept key, its own or else its config's (a key no
  member's config holds is left out): the table's parameter columns, so members that
  override different keys still have a value on each column where they have one.
  """

  def __init__(self, index: int, values: dict, texts: list[str], name: str = ""):
    self.index, self.values, self.texts, self.name = index, values, texts, name
    self.settings = dict(values)  # load_members adds the config's values.

  def __repr__(self) -> str:
    return f"Member({self.index}, {self.name!r})"


class MemberError(builders.SweepError, configs.ConfigError):
  """Members of a sweep have config problems: every one is listed, naming its member."""


def _same(a: Any, b: Any) -> bool:
  """Config values equal up to list/tuple and int/float differences."""
  if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
  if isinstance(a, Mapping) and isinstance(b, Mapping):
    return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
  return a == b


_MISSING = object()


def _get(config, dotted: str) -> Any:
  """The value at a dotted key, `_MISSING` where the config has no such key (a model
  field only some members set, say)."""
  node = config
  for part in dotted.split("."):
    if not isinstance(node, (configs.ConfigDict, Mapping)) or part not in node:
      return _MISSING
    node = node[part]
  return node.to_dict() if isinstance(node, configs.ConfigDict) else node


def _where(index: int, count: int, texts: Sequence[str]) -> str:
  return f"sweep member {index + 1} of {count} ({','.join(texts) or 'no overrides'})"


def _raise(found: Sequence[tuple[str, str]], count: int) -> None:
  """One MemberError for every (member, problem) found, one line each; a problem every
  member of a larger sweep has (from the base config, say) is one line, not `count`."""
  if not found:
    return
  shared = [p for p in dict.fromkeys(p for _, p in found)
            if count > 1 and sum(p == q for _, q in found) == count]
  lines = [f"every sweep member: {p}" for p in shared]
  lines += [f"{where}: {p}" for where, p in found if p not in shared]
  if len(lines) == 1:
    raise MemberError(lines[0])
  raise MemberError(f"{len(lines)} problems in the sweep (no member was started):\n  "
                    + "\n  ".join(lines))


def _resolve(base, overrides: Sequence[str], values: Mapping) -> tuple[Any, list[str]]:
  """(a member's resolved config or None, its bad overrides), as the trainer resolves it."""
  bad: list[str] = []
  try:
    config = configs.resolve(base, overrides, errors=bad)
  except configs.ConfigError as e:
    return None, [str(e)]
  if not bad:  # A refused override leaves the key as it was: no need to compare.
    for key, value in values.items():
      got = _get(config, key)
      if not _same(got, value):
        bad.append(f"'{key}' became {got!r} instead of {value!r} through the command "
                   f"line: give it as a {type(got).__name__}")
  return config, bad


def _read_sweep(spec: str) -> tuple[Any, list]:
  """(the experiment module, its get_sweep list), or a SweepError saying what is wrong."""
  path, _, arg = spec.partition(":")
  module = configs.import_experiment(path)
  if not hasattr(module, "get_sweep"):
    raise builders.SweepError(f"config file '{path}' has no get_sweep(arg=None) function: add "
                              f"one returning a list of override dicts, e.g. "
                              f"vitcls.sweep.product(lr=[1e-3, 3e-3])")
  raw = module.get_sweep(arg or None)
  if isinstance(raw, Mapping) or isinstance(raw, (str, bytes)) or raw is None:
    raise builders.SweepError(f"get_sweep of '{path}' must return a list of override dicts, "
                              f"got {type(raw).__name__}")
  raw = list(raw)
  if not raw:
    raise builders.SweepError(f"get_sweep of '{path}' returned no members: return at least "
                              f"one override dict")
  for i, values in enumerate(raw):
    if not isinstance(values, Mapping):
      raise builders.SweepError(f"sweep member {i + 1} of '{path}' must be a dict of "
                                f"overrides, got {values!r}")
  return module, raw


def load_members(spec: str, common: Sequence[str] = (), *, check: bool = True,
                 num_devices: int | None = None, process_count: int = 1,
                 local_files: bool = True) -> tuple[list[Member], list]:
  """The members of `spec`'s get_sweep and their resolved configs, all validated.

  `common` are `KEY=VALUE` overrides applied to every member before its own. With
  `check`, each member's config also goes through the trainer's gate (`vitcls.validate`,
  with `num_devices` and `process_count` where known), so no member starts while another
  would fail (`local_files=False`: not whether datasets and model_init exist here, for
  members that run on a cluster's nodes); `check=False` (collecting results) only
  resolves them. Raises one error
  listing every problem of every member, one line each, naming the member.
  """
  module, raw = _read_sweep(spec)
  arg = spec.partition(":")[2] or None
  base = configs.experiment_config(module, spec.partition(":")[0], arg)
  configs.resolve(base, common)  # A bad common override is reported once, as it is.
  members, resolved, found, seen = [], [], [], {}
  for i, values in enumerate(raw):
    values = {k: _plain(v) for k, v in values.items()}
    texts = [f"{k}={to_text(v, k)}" for k, v in values.items()]
    where = _where(i, len(raw), texts)
    config, problems = _resolve(base, [*common, *texts], values)
    if check and config is not None:
      problems += validate.problems(config, num_devices=num_devices,
                                    process_count=process_count, local_files=local_files)
    found += [(where, p) for p in problems]
    if config is not None and not problems:
      key = configs.to_json(config)
      if key in seen:
        found.append((f"{where} gives the same config as sweep member {seen[key] + 1}",
                      "remove one of them from get_sweep"))
      seen.setdefault(key, i)
    members.append(Member(i, values, texts))
    resolved.append(config)
  _raise(found, len(raw))
  for m, name in zip(members, member_names([m.texts for m in members])):
    m.name = name
  keys = swept_keys(members)
  for m, config in zip(members, resolved):
    inherited = {k: _get(config, k) for k in keys}
    m.settings = {k: m.values.get(k, inherited[k]) for k in keys
                  if k in m.values or inherited[k] is not _MISSING}
  return members, resolved


def check_devices(members: Sequence[Member], resolved: Sequence, num_devices: int,
                  process_count: int = 1) -> None:
  """Raises one error listing the members whose batch or mesh does not fit `num_devices`
  devices (a local sweep knows them only after the quick checks of `load_members`)."""
  _raise([(_where(m.index, len(members), m.texts), p)
          for m, config in zip(members, resolved)
          for p in validate.problems(config, num_devices=num_devices,
                                     process_count=process_count)], len(members))


def swept_keys(members: Sequence[Member]) -> list[str]:
  """Every key some member overrides, in first-seen order: the table's parameter columns."""
  keys = []
  for m in members:
    keys += [k for k in m.values if k not in keys]
  return keys


def planned_steps(config) -> int | None:
  """A member's training length in steps, when its config gives it without the data."""
  if config.total_steps is not None or config.total_examples is not None:
    return configs.total_steps(config, 0)  # The trainer's own rounding.
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
