"""The helpers experiment files' `get_sweep` builds its member list with.

`product` and `zipped` combine override dicts (`{dotted config key: value}`); they import
nothing heavy, since every experiment file imports `vitcls.sweep`.
"""

from __future__ import annotations

import itertools
from typing import Any, Iterable, Mapping, Sequence

from vitcls.errors import UserError


class SweepError(UserError):
  """A sweep definition or a sweep command line is wrong."""


def _as_members(part: Any, combine: str) -> list[dict]:
  """A list of override dicts from one argument of `product` / `zipped`: a list of dicts
  as it is, or a `{key: values}` dict combined over its keys with `combine`."""
  if isinstance(part, Mapping):
    axes = []
    for key, values in part.items():
      if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise SweepError(f"sweep values of '{key}' must be a list, got {values!r}: write "
                         f"{{'{key}': [{values!r}]}} for a single value")
      axes.append([{key: v} for v in values])
    return product(*axes) if combine == "product" else zipped(*axes)
  if isinstance(part, (str, bytes)) or not isinstance(part, Iterable):
    raise SweepError(f"a sweep part must be a list of override dicts or a "
                     f"{{key: [values]}} dict, got {part!r}")
  members = list(part)
  for m in members:
    if not isinstance(m, Mapping):
      raise SweepError(f"a sweep member must be a dict of overrides, got {m!r}")
  return [dict(m) for m in members]


def _merge(dicts: Sequence[Mapping]) -> dict:
  out = {}
  for d in dicts:
    for key, value in d.items():
      if key in out:
        raise SweepError(f"sweep key '{key}' is set by two parts of the same "
                         f"product/zipped: sweep each key in one place")
      out[key] = value
  return out


def product(*parts, **values) -> list[dict]:
  """All combinations of the parts, the first varying slowest (like nested for loops).

  Each part is a list of override dicts (e.g. the result of `zipped`) or a dict
  `{key: [values]}`, itself a product over its keys; keyword arguments are a last such
  part for keys without dots: `product(lr=[1e-3, 3e-3], wd=[0.05, 0.1])`.
  """
  if values:
    parts = parts + (values,)
  lists = [_as_members(p, "product") for p in parts]
  return [_merge(combo) for combo in itertools.product(*lists)]


def zipped(*parts, **values) -> list[dict]:
  """The parts taken together, member by member: all must have the same length.

  `zipped({"model.width": [64, 128], "model.mlp_dim": [256, 512]})` gives 2 members.
  """
  if values:
    parts = parts + (values,)
  lists = [_as_members(p, "zipped") for p in parts]
  lengths = sorted({len(l) for l in lists})
  if len(lengths) > 1:
    raise SweepError(f"zipped sweep parts must have the same length, got lengths "
                     f"{', '.join(str(len(l)) for l in lists)}: use product to combine "
                     f"them instead")
  return [_merge(combo) for combo in zip(*lists)]
