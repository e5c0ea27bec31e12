"""Builds the pieces of a run from a resolved config: it reads the data (and the
`model_init` weights, and a distillation teacher's) onto devices and jits the steps; the
loop writes the files.

`build(config)` gives the mesh, data stream, model, optimiser, state shardings and the
compiled train step: what `vitcls.train` loops over and what `benchmarks/` measure, so
both run the same code. With `config.distill`, the teacher (`vitcls.run.teacher`) is
loaded here, before training starts, and bound to the train step as its last argument.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterator

import jax
import numpy as np

from vitcls import configs, losses, models, optim, sharding, state, steps, validate
from vitcls.data import pipeline, sources
from vitcls.data import pp as pp_lib
from vitcls.data.pp import device as pp_device
from vitcls.run import checkpoint
from vitcls.run import teacher as teacher_lib


@dataclasses.dataclass
class Run:
  """Everything a training loop needs besides files, clocks and logs."""
  config: Any
  mesh: jax.sharding.Mesh
  batch_sharding: jax.sharding.NamedSharding
  source: Any
  pp: pp_lib.Preprocess  # The whole spec on the host (with input.on_device too).
  total_steps: int
  model: Any
  schedule: Callable[[int], Any]
  init_fn: Callable[[], state.TrainState]
  abstract_state: state.TrainState  # ShapeDtypeStructs carrying the state shardings.
  train_step: Callable  # jitted (state, batch) -> (state, metrics), state donated.
  # With `input.on_device`: the prepared training split on every device; batches are
  # then {"_index": example indices} and `train_step` gathers and augments them.
  device_data: dict[str, jax.Array] | None = None
  # With `input.balanced_sampling`: the training split's labels, read once by `build`.
  balanced_labels: np.ndarray | None = None
  # With `config.distill`: the frozen teacher; `train_step` passes its params.
  teacher: teacher_lib.Teacher | None = None

  @property
  def num_params(self) -> int:
    """The model's parameter count, from the abstract state (nothing is allocated)."""
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(
        self.abstract_state.params))

  def init_state(self) -> state.TrainState:
    """The step-0 state: fresh, or with params imported from `config.model_init`."""
    shardings = jax.tree_util.tree_map(lambda x: x.sharding, self.abstract_state)
    init = jax.jit(self.init_fn, out_shardings=shardings)
    c = self.config
    if not c.model_init:
      return init()
    # Computed on each host, unsharded: identical everywhere, so every process loads alike.
    fresh = jax.device_get(jax.jit(lambda: self.init_fn().params)())
    params = models.load(c.model_name, fresh, model_init_weights(c), c.model,
                         c.model_load.dont_load, origin=c.model_init)
    return init(params)

  def check_resumed(self, train_state, step: int, directory: str) -> None:
    """Raises `teacher.TeacherError` when a restored state was trained with another
    teacher than this run's (its `teacher_digest`); nothing to check without one."""
    if self.teacher is not None:
      teacher_lib.check_resumed(train_state, self.teacher, step, directory)

  def _index_batches(self, start_step: int, labels) -> Iterator[dict[str, jax.Array]]:
    """`input.on_device`: the example indices of each step's batch, read in this thread.

    The same stream positions as the host pipeline's (see data.pipeline), looked up
    directly: grain's iterator and thread pool cost more per step than the step's own
    host work for 128 integers.
    """
    c = self.config
    stream = pipeline.example_stream(_Indices(len(self.source)), c.seed, labels,
                                     repeats=c.input.repeated_augmentation,
                                     global_batch=c.input.batch_size)
    local = c.input.batch_size // jax.process_count()
    step = start_step
    while True:
      first = step * c.input.batch_size + jax.process_index() * local
      index = np.fromiter((stream[q]["_index"] for q in range(first, first + local)),
                          np.int32, local)
      yield pipeline.to_global({"_index": index}, self.batch_sharding)
      step += 1

  def batches(self, start_step: int) -> Iterator[dict[str, jax.Array]]:
    """Global batches of steps start_step+1, start_step+2, ... (see data.pipeline)."""
    c, labels = self.config, self.balanced_labels
    if self.device_data is not None:
      return self._index_batches(start_step, labels)
    source, pp = self.source, self.pp
    dataset = pipeline.train_dataset(
        source, pp, global_batch=c.input.batch_size, seed=c.seed,
        start_step=start_step, process_index=jax.process_index(),
        process_count=jax.process_count(), balanced_labels=labels,
        repeats=c.input.repeated_augmentation)
    return pipeline.iterate(dataset, self.batch_sharding, num_threads=c.input.num_threads,
                            prefetch=c.input.prefetch, num_workers=c.input.num_workers,
                            device_prefetch=c.input.device_prefetch)


def model_init_weights(config):
  """What `config.model_init` names, as `models.load` takes it (`checkpoint.weights_of`:
  a file's path, an `hf-hub:` repo's local weights, a workdir's newest intact params)."""
  return checkpoint.weights_of(config.model_init, config.model_name)


class _Indices:
  """A source whose example i is just {"_index": i}: the stream of `input.on_device`."""

  def __init__(self, n: int):
    self._n = n

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {"_index": np.int32(index)}


class _DeviceInputStep:
  """`train_step(state, {"_index": ...})` over the device-resident split.

  Gathers the batch's examples, runs the device part of the pp spec, then the usual
  step, all in one jitted call; the dataset is an argument (not a constant baked into
  the program), so compilation and the compilation cache do not depend on its size; so
  are the teacher's params (`extra`), when there is one.
  """

  def __init__(self, jitted, data, extra=()):
    self._jitted, self._data, self._extra = jitted, data, tuple(extra)

  def __call__(self, train_state, batch):
    return self._jitted(train_state, self._data, batch, *self._extra)

  def lower(self, train_state, batch):
    return self._jitted.lower(train_state, self._data, batch, *self._extra)


class _BoundStep:
  """`train_step(state, batch)` of a jitted step that takes more arguments (the teacher's
  params), passed on every call as arguments, never baked into the program."""

  def __init__(self, jitted, extra):
    self._jitted, self._extra = jitted, tuple(extra)

  def __call__(self, train_state, batch):
    return self._jitted(train_state, batch, *self._extra)

  def lower(self, train_state, batch):
    return self._jitted.lower(train_state, batch, *self._extra)


def _device_data(plan: pp_lib.Plan, mesh) -> dict[str, jax.Array]:
  """The training split through the plan's host part, replicated on every device."""
  data = pp_device.load(plan.source, plan.host)
  pp_device.check_labels(data, plan.device)
  whole = sharding.replicated(mesh)
  return {k: jax.make_array_from_callback(v.shape, whole, lambda i, v=v: v[i])
          for k, v in data.items()}


def _device_input_step(core, augment, shardings, batch_sharding, mesh, extra_shardings=()):
  def step(train_state, data, batch, *extra):
    examples = pp_device.gather(data, batch["_index"])
    examples = jax.lax.with_sharding_constraint(examples, batch_sharding)
    examples = augment(examples, pp_device.augmentation_key(train_state.rng,
                                                            train_state.step))
    return core(train_state, examples, *extra)

  return jax.jit(step, in_shardings=(shardings, sharding.replicated(mesh), batch_sharding,
                                     *extra_shardings),
                 out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)


def _finishing_on_device(core, finish):
  def step(train_state, batch, *extra):
    return core(train_state, finish(batch), *extra)
  return step


def step_options(config) -> steps.StepOptions:
  """The train step's fields (loss, mixing, accumulation, EMA), checked by `validate`.

  Class weights "balanced" read the training split's label counts here, once.
  """
  data = config.input.data

  def counts():
    found = sources.label_counts(data.name, data.split, config.input.data_dir or None,
                                 num_classes=config.num_classes)
    validate.check_class_counts(found, config.num_classes)
    return found

  weights = losses.resolve_class_weights(config.class_weights, counts)
  return steps.StepOptions.from_config(config, weights)


def state_and_step(config, mesh, model, image_shape, total_steps: int, teacher=None):
  """(init_fn, abstract state carrying its shardings, the shardings, lr schedule, train step).

  The train step is not jitted yet. `build` and the benchmarks that time the step on
  synthetic inputs share this, so both run the same state and step. With `teacher` (a
  `vitcls.run.teacher.Teacher`), the state records its digest and the step takes its
  params as a third argument.
  """
  options = step_options(config)
  tx, schedule = optim.make_optimizer(config, total_steps)
  init_fn = state.make_init_fn(model, tx, image_shape, config.seed,
                               ema=bool(config.ema_decay),
                               count_skips=config.skip_nonfinite_updates,
                               head_bias=config.init_head_bias,
                               teacher_digest=None if teacher is None else teacher.digest)
  abstract = jax.eval_shape(init_fn)
  shardings = sharding.tree_shardings(mesh, abstract, config.sharding_rules)
  if teacher is not None:  # Every process reads it whole to compare on resume.
    shardings = shardings.replace(teacher_digest=sharding.replicated(mesh))
  abstract = jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
  return init_fn, abstract, shardings, schedule, steps.make_train_step(
      model, tx, schedule, options, teacher=None if teacher is None else teacher.spec)


def build(config) -> Run:
  """Checks the config (`vitcls.validate`, on these devices) and builds what it names.

  In-process callers (tests, notebooks, `run.loop.train`) get the CLI's one-line errors.
  """
  validate.check(config, num_devices=jax.device_count(), process_count=jax.process_count())
  mesh = sharding.make_mesh(config.mesh)
  batch_sharding = sharding.batch_sharding(mesh)
  data, data_dir = config.input.data, config.input.data_dir or None
  plan = pp_lib.plan(
      config.input.pp,
      lambda encoded: sources.get_source(data.name, data.split, data_dir,
                                         encoded_images=encoded),
      on_device=config.input.on_device,
      normalize_on_device=config.input.normalize_on_device)
  source = plan.source
  pp = plan.whole if plan.resident else plan.host
  labels = None
  if config.input.balanced_sampling:
    labels = sources.labels(data.name, data.split, data_dir)
  total_steps = configs.total_steps(config, len(source))
  validate.check_built(config, total_steps=total_steps,
                       optax_arguments=optim.optimizer_arguments(config.optax_name))
  model = models.build(config.model_name, config.num_classes, config.model)
  image_shape = np.shape(pp(source[0], np.random.default_rng(0))["image"])
  teacher = None
  if config.distill.teacher_init:
    teacher = teacher_lib.load(config, mesh, image_shape)
  init_fn, abstract, shardings, schedule, core = state_and_step(
      config, mesh, model, image_shape, total_steps, teacher)
  # The teacher's params: an argument of the step after the batch, with their shardings.
  extra, extra_shardings = ((), ()) if teacher is None else (
      (teacher.params,), (teacher.shardings,))
  device_data = None
  if plan.resident:
    device_data = _device_data(plan, mesh)
    train_step = _DeviceInputStep(
        _device_input_step(core, plan.augmenter(), shardings, batch_sharding, mesh,
                           extra_shardings),
        device_data, extra)
  else:
    if plan.device:
      core = _finishing_on_device(core, plan.finisher())
    train_step = jax.jit(core, in_shardings=(shardings, batch_sharding, *extra_shardings),
                         out_shardings=(shardings, sharding.replicated(mesh)),
                         donate_argnums=0)
    if teacher is not None:
      train_step = _BoundStep(train_step, extra)
  return Run(config=config, mesh=mesh, batch_sharding=batch_sharding, source=source, pp=pp,
             total_steps=total_steps, model=model, schedule=schedule, init_fn=init_fn,
             abstract_state=abstract, train_step=train_step, device_data=device_data,
             balanced_labels=labels, teacher=teacher)
