"""The one plan of a pp spec: which ops run on the host, which in the jitted step.

`plan(spec, open_source, on_device=, normalize_on_device=)` is what training, the
evaluators, the serving export and the benchmarks all call, so they cut a spec alike:

  * by default every op runs on the host, per example, in the grain pipeline;
  * `input.normalize_on_device`: the spec's closing value_range / normalize ops (and
    only label ops after them, which stay on the host) move to the step when the image
    is uint8 just before them, so batches cross to the device as a quarter of the bytes;
  * `input.on_device`: the ops before the first random one run once per example on the
    host (`device.load`), the rest in the step on the global batch, by their JAX twins.

Either way the device part is a list of calls whose ops have a JAX twin; `device` builds
them. This module reads only the registry, so the validator can plan without JAX.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import numpy as np

from vitcls.data.pp import registry
from vitcls.data.pp.registry import Call, DeviceInputError, Preprocess
from vitcls.errors import shown


@dataclasses.dataclass(frozen=True)
class Plan:
  """Where each op of `spec` (parsed into `calls`) runs (see the module docstring).

  encoded_images: the spec begins with `decode` of "image", so its source hands over
    encoded images (`sources.get_source(encoded_images=True)`) and decoding is fused with
    the crops after it.
  source: what `open_source(encoded_images)` gave, or None.
  host_spec: the ops run per example on the host (streamed, or once at load when
    `resident`); `host` is it parsed.
  device: the calls run in the jitted step, in order, each with a JAX twin.
  resident: `input.on_device`: the host part's results live on the devices, and the
    device part draws from the step's key (`augmenter`); else it draws nothing
    (`finisher`).
  """
  spec: str
  calls: tuple[Call, ...]
  encoded_images: bool
  source: Any
  host_spec: str
  device: tuple[Call, ...]
  resident: bool

  @functools.cached_property
  def host(self) -> Preprocess:
    """The host part, parsed."""
    return registry.parse(self.host_spec)

  @functools.cached_property
  def whole(self) -> Preprocess:
    """The whole spec run on the host: what the split computes, as one NumPy pipeline."""
    return self.host if self.host_spec == self.spec else registry.parse(self.spec)

  def augmenter(self) -> Callable:
    """`augment(batch, key)`: the device part on a global batch (`device.augmenter`)."""
    from vitcls.data.pp import device  # pylint: disable=g-import-not-at-top
    return device.augmenter(self.device)

  def finisher(self) -> Callable:
    """`finish(batch)`: the device part, which draws nothing (`device.finisher`)."""
    from vitcls.data.pp import device  # pylint: disable=g-import-not-at-top
    return device.finisher(self.device)


def _decodes_first(calls: list[Call]) -> bool:
  if not calls or calls[0].name != "decode":
    return False
  _, name, args, kwargs = calls[0]
  try:
    return registry.op_arguments(name, args, kwargs).get("key") == "image"
  except TypeError:  # Bad arguments: parsing the spec names them.
    return False


def _split(calls: list[Call], start: int, moves: Callable[[Call], bool]):
  """(host spec, device calls): the calls from `start` on that `moves` leave the host."""
  device = [c for c in calls[start:] if moves(c)]
  host = [c.text for c in calls if not any(c is d for d in device)]
  return "|".join(host), device


def _has(name: str, prop: str) -> bool:
  """Whether op `name` is registered with `prop` set (an unknown op has none)."""
  entry = registry.get(name)
  return entry is not None and bool(getattr(entry, prop))


def resident_split(spec: str) -> tuple[str, list[Call]]:
  """(host prefix spec, the calls from the first random op on) for `input.on_device`.

  Raises DeviceInputError naming the first op after a random one with no JAX twin.
  """
  calls = registry.calls(spec)
  first = next((i for i, c in enumerate(calls) if _has(c.name, "random")), len(calls))
  for text, name, _, _ in calls[first:]:
    if not _has(name, "jax_twin"):
      twins = ", ".join(registry.available_ops(lambda e: e.jax_twin is not None))
      raise DeviceInputError(
          f"input.on_device: pp op {shown(text)} comes after the first random op and has "
          f"no on-device version (those are {twins}): move it before the random ops or "
          f"set config.input.on_device=False")
  return _split(calls, first, lambda c: True)


def tail_split(spec: str) -> tuple[str, list[Call]]:
  """(spec without its closing device-tail ops, those ops as calls).

  Closing: after them come only label ops, which touch other keys and stay in the host
  spec, in their order. A spec with no such ops gives its ops joined again and [].
  Whether the image really is uint8 there is for `plan` to check.
  """
  calls = registry.calls(spec)
  start = len(calls)
  while start > 0 and (_has(calls[start - 1].name, "device_tail")
                       or _has(calls[start - 1].name, "label")):
    start -= 1
  return _split(calls, start, lambda c: _has(c.name, "device_tail"))


def plan(spec: str, open_source: Optional[Callable[[bool], Any]] = None, *,
         on_device: bool = False, normalize_on_device: bool = False) -> Plan:
  """Plans `spec`: opens its source (`open_source(encoded_images)`) and cuts the spec.

  on_device wins over normalize_on_device, which needs the source: the closing ops
  move only when the host part leaves a uint8 image under each one's key in the
  source's first example (float or absent there: the host finishes as written).
  """
  calls = registry.calls(spec)
  encoded = _decodes_first(calls)
  source = None if open_source is None else open_source(encoded)
  host_spec, device = spec, []
  if on_device:
    registry.parse(spec)  # An unknown op is named as such, before any twin is missing.
    host_spec, device = resident_split(spec)
  elif normalize_on_device:
    if source is None:
      raise ValueError("normalize_on_device plans need the source (open_source)")
    host_spec, device = tail_split(spec)
    if device:
      example = registry.parse(host_spec)(source[0], np.random.default_rng(0))
      for _, name, args, kwargs in device:
        key = registry.op_arguments(name, args, kwargs).get("key", "image")
        if getattr(example.get(key), "dtype", None) != np.uint8:
          host_spec, device = spec, []
          break
    else:
      host_spec = spec
  return Plan(spec, tuple(calls), encoded, source, host_spec, tuple(device), on_device)
