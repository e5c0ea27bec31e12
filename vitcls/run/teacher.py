"""The teacher of knowledge distillation (`config.distill`): which model it is, its weights
read once and checked whole, their digest, and their place on the mesh.

The teacher is frozen: no gradient, no optimiser state, not in the checkpoints. `load`
builds its model with the student's `num_classes`, imports its weights through the
model's `load` (as `model_init` is imported) onto a tree that is NaN until loaded, so any
parameter the checkpoint does not fill (a head for another class count, an option the
file lacks) is one `TeacherError` line instead of a fresh init, then places the params on
the mesh with the student's `sharding_rules`. They are an argument of the jitted train
step, not a constant baked into the program; what the step does with them is
`vitcls.steps.Teacher`. A checkpoint records `digest` (the first 8 bytes of a SHA-256 of
the teacher's leaves, as two uint32 in `TrainState.teacher_digest`), and `check_resumed`
refuses to resume it with another teacher.

Which model the teacher is, and which pp ops may prepare its input, are read from the
config by `vitcls.validate` (`teacher_architecture`, `teacher_op`) before JAX loads; `load`
builds exactly what was checked.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Mapping

import numpy as np

from vitcls import validate
from vitcls.errors import UserError, shown

KEY = validate.TEACHER_KEY


class TeacherError(UserError):
  """A teacher that cannot be loaded whole, or a checkpoint trained with another one."""


def digest(params: Mapping) -> np.ndarray:
  """uint32 [2]: the first 8 bytes of a SHA-256 over the teacher's leaves (each one's
  '/'-joined path, dtype, shape and bytes, in path order)."""
  sha = hashlib.sha256()
  for name, leaf in sorted(_flat(params).items()):
    leaf = np.ascontiguousarray(leaf)
    sha.update(f"{name}|{leaf.dtype.str}|{leaf.shape}|".encode())
    sha.update(leaf.reshape(-1).view(np.uint8).data)
  return np.frombuffer(sha.digest()[:8], ">u4").astype(np.uint32)


def format_digest(value) -> str:
  """'3f2a...': a digest's 16 hex digits, as messages show it."""
  return "".join(f"{int(w):08x}" for w in np.asarray(value).reshape(-1))


def _flat(tree: Mapping, prefix: str = "") -> dict[str, np.ndarray]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(_flat(value, f"{prefix}{key}/"))
    else:
      out[f"{prefix}{key}"] = np.asarray(value)
  return out


@dataclasses.dataclass(frozen=True)
class Teacher:
  """A loaded teacher: what the step runs (`spec`), its params on the mesh and their
  shardings, the digest of its weights, and where they came from."""
  spec: Any  # vitcls.steps.Teacher
  params: Any
  shardings: Any
  digest: np.ndarray  # uint32 [2]
  origin: str


def load(config, mesh, image_shape=None) -> Teacher:
  """The teacher `config.distill` names, checked whole, on `mesh`.

  `image_shape`: the student's training images (H, W, C), which the teacher sees unless
  `teacher_res` resizes them; None reads it from the training data. Raises TeacherError
  (one line) for weights that cannot be read or do not fill the teacher.
  """
  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp
  from vitcls import models, sharding, steps
  from vitcls.configs import ConfigError
  from vitcls.data.pp import registry
  from vitcls.run import checkpoint
  # pylint: enable=g-import-not-at-top
  d, origin = config.distill, config.distill.teacher_init
  name, fields, _ = validate.teacher_architecture(config)
  try:
    model = models.build(name, config.num_classes, fields)
  except ConfigError as e:
    raise TeacherError(validate.as_teacher(str(e))) from None
  if image_shape is None:
    image_shape = _student_image_shape(config)
  shape = ((d.teacher_res, d.teacher_res, image_shape[-1]) if d.teacher_res
           else tuple(image_shape))
  abstract = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, *shape), jnp.float32), train=False))["params"]
  unset = jax.tree_util.tree_map(_unset, abstract)
  try:
    weights = checkpoint.weights_of(origin, name)
    params = models.load(name, unset, weights, fields, (), origin=origin)
  except UserError as e:
    raise TeacherError(f"{KEY}: {validate.as_teacher(str(e))}") from None
  _check_whole(params, weights, origin, config.num_classes)
  params = jax.tree_util.tree_map(np.asarray, params)
  shardings = sharding.tree_shardings(mesh, {"params": params},
                                      config.sharding_rules)["params"]
  placed = jax.tree_util.tree_map(
      lambda x, s: jax.make_array_from_callback(x.shape, s, lambda i, x=x: x[i]),
      params, shardings)
  prepare = None
  if d.teacher_pp:
    from vitcls.data.pp import device  # pylint: disable=g-import-not-at-top
    prepare = device.finisher(registry.calls(d.teacher_pp))
  spec = steps.Teacher(model=model, res=int(d.teacher_res), prepare=prepare)
  return Teacher(spec=spec, params=placed, shardings=shardings, digest=digest(params),
                 origin=origin)


def _unset(leaf) -> np.ndarray:
  """A leaf before loading: NaN where it is a float (what the checkpoint fills shows)."""
  if np.issubdtype(leaf.dtype, np.floating) or leaf.dtype.name == "bfloat16":
    return np.full(leaf.shape, np.nan, leaf.dtype)
  return np.zeros(leaf.shape, leaf.dtype)


def _check_whole(params, weights, origin: str, num_classes: int) -> None:
  """TeacherError unless the checkpoint filled every parameter with finite values."""
  flat = _flat(params)
  floats = {k: v.astype(np.float32) for k, v in flat.items()
            if np.issubdtype(v.dtype, np.floating) or v.dtype.name == "bfloat16"}
  unfilled = sorted(k for k, v in floats.items() if v.size and np.isnan(v).all())
  if unfilled:
    first = unfilled[0]
    theirs = _stored_shape(weights, first)
    more = f" (and {len(unfilled) - 1} more)" if len(unfilled) > 1 else ""
    found = f"; it has {first} of shape {theirs}" if theirs else ""
    raise TeacherError(
        f"{KEY}: {shown(origin)} does not fill the teacher's {first} of shape "
        f"{tuple(flat[first].shape)}{more} (num_classes={num_classes}){found}: a teacher is "
        f"loaded whole, head included: give one trained for these {num_classes} classes, "
        f"or the config.distill.teacher_model that matches it")
  bad = sorted(k for k, v in floats.items() if not np.isfinite(v).all())
  if bad:
    raise TeacherError(f"{KEY}: {shown(origin)} holds non-finite values in {bad[0]}: it "
                       f"cannot teach; give another checkpoint")


def _stored_shape(weights, name: str) -> tuple | None:
  """The shape of parameter `name` in the checkpoint as stored, when it can be told."""
  try:
    from vitcls.models import loading  # pylint: disable=g-import-not-at-top
    value = loading.flatten(loading.read_params(weights)).get(name)
  except Exception:  # pylint: disable=broad-except
    return None
  return None if value is None else tuple(np.shape(value))


def _student_image_shape(config) -> tuple:
  """The shape of one training image after `config.input.pp` (the student's input)."""
  # pylint: disable=g-import-not-at-top
  from vitcls.data import pp as pp_lib
  from vitcls.data import sources
  # pylint: enable=g-import-not-at-top
  data = config.input.data
  plan = pp_lib.plan(config.input.pp, lambda encoded: sources.get_source(
      data.name, data.split, config.input.data_dir or None, encoded_images=encoded))
  return np.shape(plan.whole(plan.source[0], np.random.default_rng(0))["image"])


def check_resumed(state, teacher: Teacher, step: int, directory: str) -> None:
  """TeacherError unless the checkpoint `state` (restored from `step` in `directory`) was
  trained with `teacher`."""
  stored = state.teacher_digest
  if hasattr(stored, "addressable_data"):
    stored = stored.addressable_data(0)
  stored = np.asarray(stored, np.uint32)
  if not np.array_equal(stored, teacher.digest):
    raise TeacherError(
        f"{KEY}: the checkpoint of step {step} in {directory} was trained with another "
        f"teacher (weights digest {format_digest(stored)}; {shown(teacher.origin)} has "
        f"{format_digest(teacher.digest)}): set {KEY} back to the teacher it was trained "
        f"with, or use a new --workdir")
