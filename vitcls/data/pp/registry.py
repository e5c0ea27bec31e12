"""The one registry of pp ops: each op's host factory and every fact about it.

A spec is ops joined by `|`, each a call with literal arguments, e.g.
`random_shift(2)|resize(32)|value_range(-1,1)|onehot(10)`. An op is registered once, with
`@register(name, ...)` on its host factory, and that entry says all the rest: whether it
draws from the rng, whether it only touches labels, whether it may close a spec on the
device (`input.normalize_on_device`), and the names of its JAX twin (in
`vitcls.data.pp.device`) and TF twin (in `vitcls.data.pp.tf_twins`), imported only when
asked for. So validation, the plan and the serving export read one table, and this
module imports neither JAX nor TensorFlow.

Every host op maps `(example: dict, rng: np.random.Generator) -> dict` on one NumPy
example. Random ops draw only from `rng`, which the pipeline derives from (seed, position
in the stream), so preprocessing is reproducible per example.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
from typing import Any, Callable, NamedTuple, Optional

import numpy as np

from vitcls.errors import UserError, shown

Example = dict[str, Any]
Op = Callable[[Example, np.random.Generator], Example]

JAX_TWINS = "vitcls.data.pp.device"  # Where `OpInfo.jax_twin` names a factory.
TF_TWINS = "vitcls.data.pp.tf_twins"  # Where `OpInfo.tf_twin` names a factory.


class PreprocessError(UserError):
  """A preprocessing spec names an unknown op or gives it bad arguments."""


class DeviceInputError(PreprocessError):
  """`input.on_device` was asked for a spec or dataset it cannot serve."""


@dataclasses.dataclass(frozen=True)
class OpInfo:
  """A registered op: its host factory and its properties.

  random: draws from the rng (so it cannot run once, ahead, for `input.on_device`).
  label: touches only labels or which keys an example has, never the image.
  device_tail: may move, with the label ops after it, to the end of the train step
    (`input.normalize_on_device`).
  jax_twin, tf_twin: the name of its twin factory in `JAX_TWINS` / `TF_TWINS`, taking
    the host factory's arguments, or None when it has none.
  """
  name: str
  factory: Callable[..., Op]
  random: bool = False
  label: bool = False
  device_tail: bool = False
  jax_twin: Optional[str] = None
  tf_twin: Optional[str] = None

  def jax_factory(self) -> Callable:
    """The JAX twin's factory (imports JAX)."""
    return getattr(importlib.import_module(JAX_TWINS), self.jax_twin)

  def tf_factory(self) -> Callable:
    """The TF twin's factory (TensorFlow itself is imported only by the ops it makes)."""
    return getattr(importlib.import_module(TF_TWINS), self.tf_twin)


_ENTRIES: dict[str, OpInfo] = {}


def register(name: str, *, random: bool = False, label: bool = False,
             device_tail: bool = False, jax_twin: Optional[str] = None,
             tf_twin: Optional[str] = None):
  """Registers `factory(*args, **kw) -> op` under `name`, with its properties (`OpInfo`)."""
  def wrap(factory):
    _ENTRIES[name] = OpInfo(name, factory, random=random, label=label,
                            device_tail=device_tail, jax_twin=jax_twin, tf_twin=tf_twin)
    return factory
  return wrap


def get(name: str) -> Optional[OpInfo]:
  """The entry of op `name`, or None when no op has that name."""
  return _ENTRIES.get(name)


def available_ops(where: Optional[Callable[[OpInfo], bool]] = None) -> list[str]:
  """Names of the registered ops (those `where(entry)` holds for), sorted."""
  return sorted(n for n, e in _ENTRIES.items() if where is None or where(e))


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """A parsed spec: callable on one example with a NumPy generator."""
  spec: str
  ops: tuple[Op, ...]

  def __call__(self, example: Example, rng: np.random.Generator) -> Example:
    example = dict(example)
    for op in self.ops:
      example = op(example, rng)
    return example


class Call(NamedTuple):
  """One op of a spec as written: its text, name and literal arguments."""
  text: str
  name: str
  args: tuple
  kwargs: dict


def parse_call(text: str) -> tuple[str, tuple, dict]:
  """(name, args, kwargs) of one op's text such as `resize(32, method='area')`."""
  try:
    node = ast.parse(text, mode="eval").body
  except SyntaxError as e:
    raise PreprocessError(f"cannot parse pp op {shown(text)}: write ops like 'resize(32)'") from e
  if isinstance(node, ast.Name):
    return node.id, (), {}
  if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
    raise PreprocessError(f"cannot parse pp op {shown(text)}: write ops like 'resize(32)'")
  try:
    args = tuple(ast.literal_eval(a) for a in node.args)
    kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
  except ValueError as e:
    raise PreprocessError(f"pp op {shown(text)} takes literal arguments only") from e
  return node.func.id, args, kwargs


def calls(spec: str) -> list[Call]:
  """Each op of `spec` as a `Call`, in order; empty ops skipped. Names are not checked."""
  texts = (t.strip() for t in spec.split("|"))
  return [Call(text, *parse_call(text)) for text in texts if text]


def op_arguments(name: str, args: tuple, kwargs: dict) -> dict[str, Any]:
  """The registered op `name`'s arguments by name, defaults filled in."""
  bound = inspect.signature(_ENTRIES[name].factory).bind(*args, **kwargs)
  bound.apply_defaults()
  return dict(bound.arguments)


def parse(spec: str) -> Preprocess:
  """Parses `op1(...)|op2(...)` into a `Preprocess`; errors name the bad op.

  An op with a `fuse(ops, i) -> (op, i)` method may take over the ops from `i` on
  that it can run better itself (`decode` does, see vitcls.data.pp.decode).
  """
  ops = []
  for text, name, args, kwargs in calls(spec):
    if name not in _ENTRIES:
      raise PreprocessError(f"unknown pp op {shown(name)} in {shown(spec)}: known ops are "
                            f"{', '.join(available_ops())}")
    try:
      ops.append(_ENTRIES[name].factory(*args, **kwargs))
    except (TypeError, ValueError, ArithmeticError) as e:
      raise PreprocessError(f"bad arguments for pp op {shown(text)}: {shown(e)}") from e
  fused, i = [], 0
  while i < len(ops):
    op, i = ops[i], i + 1
    if hasattr(op, "fuse"):
      op, i = op.fuse(ops, i)
    fused.append(op)
  return Preprocess(spec, tuple(fused))
