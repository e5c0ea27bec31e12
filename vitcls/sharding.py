"""Device mesh and shardings, declared from the config.

`mesh = [("data", -1)]` is plain data parallelism; `[("data", 2), ("fsdp", -1)]` adds
fully-sharded parameters. Batches are split along their first axis over every mesh axis.
Parameters (and the optimiser state that mirrors them) follow `sharding_rules`: the first
`(regex, kind)` whose regex fully matches the leaf path decides; `replicate` copies the
leaf to every device, `fsdp` splits its largest dimension divisible by the `fsdp` axis.
"""

from __future__ import annotations

import math
import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vitcls import treeutil, validate


def make_mesh(axes, devices=None) -> Mesh:
  """A mesh with the named axis sizes; one size may be -1 (all devices left over).

  The axes are checked against these devices by `validate.check_mesh`: `vitcls.evaluate`
  validates a workdir's config without devices (it may run on others than it trained on).
  """
  devices = list(jax.devices() if devices is None else devices)
  validate.check_mesh(axes, len(devices))
  names = [str(name) for name, _ in axes]
  sizes = [int(size) for _, size in axes]
  if -1 in sizes:
    sizes[sizes.index(-1)] = len(devices) // math.prod(s for s in sizes if s != -1)
  return Mesh(np.asarray(devices).reshape(sizes), names)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over all mesh axes; other axes whole."""
  return NamedSharding(mesh, P(mesh.axis_names))


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array: step metrics, eval outputs, unmatched leaves."""
  return NamedSharding(mesh, P())


def _fsdp_spec(shape, mesh: Mesh) -> P:
  size = dict(zip(mesh.axis_names, mesh.devices.shape)).get("fsdp", 1)
  if size == 1:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % size == 0:
      spec = [None] * len(shape)
      spec[dim] = "fsdp"
      return P(*spec)
  return P()


# The partition spec of a leaf (shape, mesh) for each kind of `configs.SHARDING_KINDS`.
_KINDS = {"replicate": lambda shape, mesh: P(), "fsdp": _fsdp_spec}


def tree_shardings(mesh: Mesh, tree, rules):
  """NamedShardings for every leaf of `tree` (arrays or ShapeDtypeStructs) by `rules`.

  The rules were checked by `vitcls.validate` (regexes, kinds).
  """
  compiled = [(re.compile(regex), kind) for regex, kind in rules]

  def one(path, leaf):
    name = treeutil.leaf_path(path)
    for regex, kind in compiled:
      if regex.fullmatch(name):
        return NamedSharding(mesh, _KINDS[kind](np.shape(leaf), mesh))
    return replicated(mesh)

  return jax.tree_util.tree_map_with_path(one, tree)
