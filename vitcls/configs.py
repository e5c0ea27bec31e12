"""Experiment configs: load, override from the command line, validate, resolve durations.

An experiment is a Python file with `get_config(arg=None) -> ConfigDict`; `arg` is the
text after `:` in `--config=experiments/x.py:variant=S/16,steps=100` and is parsed with
`parse_arg`. The experiment's config is laid over `defaults()` (the full list of knobs);
`--config.KEY=VALUE` then overrides single fields. Any key that `defaults()` does not know
is an error naming the key and the closest known one, so a typo never silently does
nothing. Subtrees whose keys belong to another component (`model`, `optax`, each entry of
`evals`) are free-form here and checked by that component.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import os
import traceback
from typing import Any, Sequence

import ml_collections
from ml_collections import config_dict

from vitcls.errors import UserError, shown
from vitcls.run import workdir as wdir

ConfigDict = ml_collections.ConfigDict

# Subtrees whose keys are validated by the component that consumes them.
FREE_FORM = ("model", "optax", "evals", "expected", "distill.teacher_model")

# The names a config may choose from: `vitcls.validate` checks against these before JAX
# loads, and the code that implements them (optim, losses, sharding) is keyed by them.
OPTIMIZERS = ("adamw", "sgd", "adafactor")
DECAY_TYPES = ("cosine", "linear", "rsqrt", "stair", "constant")
WD_MODES = ("times_lr", "times_schedule", "l2")
LOSSES = ("softmax_xent", "sigmoid_xent")
DISTILL_LOSSES = ("kl", "soft_hard", "deit_hard", "deit_soft")
SHARDING_KINDS = ("replicate", "fsdp")


class ConfigError(UserError):
  """A config names an unknown key, has a bad value, or cannot be loaded."""


def defaults() -> ConfigDict:
  """Every knob the trainer reads, with its default. Experiments override these."""
  c = ConfigDict()
  c.seed = 0
  c.model_name = "vit"
  c.num_classes = 10
  c.model = ConfigDict()
  # Checkpoint to start from: an .npz or .safetensors file, a vitcls workdir, or
  # hf-hub:<repo> (a Hugging Face Hub repo's model.safetensors, e.g. timm's).
  c.model_init = ""
  c.model_load = ConfigDict()
  c.model_load.dont_load = []  # Regexes of params kept from the fresh init (e.g. 'head/.*').

  c.input = ConfigDict()
  c.input.data = ConfigDict({"name": "mnist5k", "split": "train"})
  c.input.data_dir = ""  # Empty: $TFDS_DATA_DIR, else ~/tensorflow_datasets.
  c.input.pp = "value_range(-1,1)|onehot(10)"
  c.input.batch_size = 128  # Global batch, split over processes and devices.
  c.input.num_threads = 4  # Host threads running preprocessing.
  c.input.prefetch = 4  # Batches prepared ahead on the host.
  c.input.num_workers = 0  # Worker processes for preprocessing; 0 = threads only.
  c.input.device_prefetch = 2  # Batches already on device ahead of the step.
  c.input.balanced_sampling = False  # Every class equally often (stream stays (seed, step)).
  # Repeated augmentation (DeiT's RASampler, deit@7e160fe samplers.py; DeiT uses 3): each
  # example of the stream seen k times, each copy with its own augmentation, the copies
  # at least batch_size // k positions apart (mostly in one global batch, as in DeiT; on
  # different processes when there are >= k). 1: off. An epoch stays len(dataset)
  # positions, as in DeiT (main.py:420 loops epochs over a sampler of ~len(dataset),
  # samplers.py:35,61), so it covers 1/k of the examples k times each; every k epochs
  # cover every example exactly k times (DeiT instead redraws an order each epoch from
  # the epoch alone, samplers.py:41-43, keeps its first ~N/k examples, :58, and trims the
  # epoch to a multiple of 256, :35). With balanced_sampling: each balanced position k times.
  c.input.repeated_augmentation = 1
  # Keep the prepared training split on the devices and augment in the train step (small
  # datasets; the pp's ops after its first random one must have JAX twins).
  c.input.on_device = False
  # The pp's closing value_range / normalize run in the jitted step, on uint8 batches: a
  # quarter of the bytes through worker processes and onto the device (host pipeline;
  # the evaluators' pp too).
  c.input.normalize_on_device = True

  # Durations: total_steps wins over total_examples, which wins over total_epochs.
  c.total_steps = config_dict.placeholder(int)
  c.total_examples = config_dict.placeholder(int)
  c.total_epochs = config_dict.placeholder(float)

  c.optax_name = "adamw"  # adamw | sgd | adafactor
  c.optax = ConfigDict()  # Extra keyword arguments of the optax optimiser (b1, momentum...).
  c.lr = 1e-3
  c.wd = 1e-4  # Weight decay, applied to params matching wd_mask, as wd_mode says.
  c.wd_mask = r".*/kernel$"
  # times_lr: -lr(t)*wd*p (AdamW, timm); times_schedule: -lr(t)/lr*wd*p (big_vision's
  # decoupled wd); l2: wd*p added to the gradient (the ResNet/BiT papers' SGD).
  c.wd_mode = "times_lr"
  c.grad_clip_norm = 1.0  # Global-norm clipping; 0 disables it.
  c.label_smoothing = 0.0
  # The head's bias at init (big_vision's `init_head_bias`: -6.9 = log(1/1000) starts a
  # sigmoid_xent run near each class's prior); 0 leaves the model's init.
  c.init_head_bias = 0.0
  c.loss = "softmax_xent"  # softmax_xent | sigmoid_xent (multi-label).
  c.class_weights = None  # None | "balanced" (n / (k * n_c) from the train split) | list.
  c.lr_mults = []  # [(regex, multiplier)]: per-parameter lr factors, first match wins.
  # Layer-wise lr decay (BEiT, DeiT-III, ConvNeXt fine-tuning; e.g. 0.65): the update of
  # a parameter of layer i scaled by layer_decay ** (L - i), times its lr_mults factor;
  # layers as the model numbers them (`layer_ids` in vitcls/models/<model_name>.py:
  # embeddings layer 0, block i layer i+1, the head layer L). 1.0: off.
  c.layer_decay = 1.0
  c.frozen = []  # Regexes of parameters never updated (and given no optimiser state).
  c.grad_accum_steps = 1  # Micro-batches per step: same result, 1/n of the memory.
  c.ema_decay = 0.0  # EMA of the params (e.g. 0.9998); 0 = off. Evaluated beside the params.
  c.ema_warmup = False  # timm ModelEmaV3 warm-up: decay min(ema_decay, 1-(1+t)^(-2/3)).
  # A non-finite loss stops the run; with this on, an update whose loss or gradient is
  # not finite is skipped instead (counted in the metrics), and the run stops after
  # `max_skipped_in_a_row` skips in a row.
  c.skip_nonfinite_updates = False
  c.max_skipped_in_a_row = 10
  # Mixing on device, per batch: mixup (`alpha`: lam ~ Beta(alpha, alpha), timm/DeiT; or
  # big_vision's `p`: Beta(p, p) folded to max(lam, 1 - lam)), CutMix (a box of area
  # 1 - lam, lam ~ Beta(alpha, alpha)); both on: CutMix with probability mix_switch_prob.
  c.mixup = ConfigDict({"alpha": 0.0, "p": 0.0})
  c.cutmix = ConfigDict({"alpha": 0.0})
  c.mix_switch_prob = 0.5
  c.schedule = ConfigDict()
  c.schedule.decay_type = "cosine"  # cosine | linear | rsqrt | stair | constant
  c.schedule.warmup_steps = 0
  c.schedule.warmup_percent = 0.0  # Used when warmup_steps is 0.
  c.schedule.end_factor = 0.0  # Final lr as a fraction of `lr` (cosine, linear).
  c.schedule.timescale = 10_000  # rsqrt decay timescale in steps.
  c.schedule.boundaries = []  # stair: fractions of the run where lr *= stair_factor.
  c.schedule.stair_factor = 0.1
  # The warmup starts at warmup_start * lr (timm's warmup_lr / lr; DeiT: 1e-6 / lr).
  c.schedule.warmup_start = 0.0
  # False: the decay runs over the steps after the warmup. True (timm): its clock starts
  # at step 0 and the warmup replaces its first steps (a jump at the warmup's end).
  c.schedule.decay_from_start = False
  # The lr changes once per steps_per_update steps (timm's t_in_epochs: steps per epoch),
  # update_lag updates late, never before step 0 (DeiT's step(epoch) after the epoch: 1).
  c.schedule.steps_per_update = 1
  c.schedule.update_lag = 0

  # Knowledge distillation (Hinton et al. 2015; DeiT; function matching, Beyer et al.
  # 2022): a frozen teacher runs inside the train step on the images the student sees
  # (after mixup / CutMix), and `loss` compares their outputs; it replaces config.loss.
  # Off while teacher_init is empty. The checkpoints record a digest of the teacher's
  # weights: a run resumes only with the teacher it was trained with.
  c.distill = ConfigDict()
  # The teacher's weights, as model_init takes them: a vitcls workdir, an .npz or
  # .safetensors file, or hf-hub:<repo>. Loaded whole (its head too: trained for
  # num_classes classes), never updated, not in the checkpoints. Empty: no teacher.
  c.distill.teacher_init = ""
  # The teacher's model; empty: the workdir's (its config.json). Required for a file.
  c.distill.teacher_model_name = ""
  # Its fields, as config.model; laid over the workdir's (e.g. {"dtype": "bfloat16"}).
  c.distill.teacher_model = ConfigDict()
  # 0: the teacher sees the student's images at their size; else they are resized for it
  # (bilinear, in the step) to teacher_res x teacher_res.
  c.distill.teacher_res = 0
  # Ops applied in the step to the student's images before the teacher (after the
  # resize): pp ops with a JAX twin that draw nothing, e.g. a teacher trained on
  # ImageNet-normalised inputs under a student in [-1, 1]:
  # "value_range(0,255,-1,1)|normalize((0.485,0.456,0.406),(0.229,0.224,0.225))".
  c.distill.teacher_pp = ""
  c.distill.loss = "kl"  # One of DISTILL_LOSSES (vitcls.losses.distillation).
  c.distill.temperature = 1.0  # Softmax temperature of student and teacher (> 0).
  c.distill.weight = 1.0  # The teacher's share of the target, for losses that mix in labels.

  c.evals = ConfigDict()  # name -> evaluator config (see vitcls.evaluators).
  # Published results this run should reproduce, `{"<eval>/<metric>": value}`; the
  # report sets the final metrics beside them (paper experiments name their source).
  c.expected = ConfigDict()

  c.mesh = [("data", -1)]  # (axis, size); -1 takes the devices left over.
  c.sharding_rules = [(".*", "replicate")]  # (regex on param path, replicate | fsdp)
  # Several processes: one that stops answering for this long (dead, hung, cut off)
  # makes the others exit with an error instead of waiting forever.
  c.heartbeat_timeout_s = 100

  # JAX's persistent compilation cache: a second launch of the same program skips most of
  # its compilation. "" turns it off; $JAX_COMPILATION_CACHE_DIR, when set, wins.
  c.compilation_cache_dir = "~/.cache/vitcls/jax"

  c.log_every = 50
  c.checkpoint_every = 500
  c.keep_checkpoints = 2
  c.async_checkpoints = True
  return c


def parse_arg(arg: str | None, **spec: Any) -> ConfigDict:
  """Parses `k=v,k2=v2` into a ConfigDict typed like the defaults given in `spec`.

  `parse_arg("variant=B/32,steps=10", variant="S/16", steps=100)` gives
  `{variant: "B/32", steps: 10}`. A key not in `spec` is an error.
  """
  out = ConfigDict(dict(spec))
  for item in filter(None, (arg or "").split(",")):
    if "=" not in item:
      raise ConfigError(f"config argument {shown(item)} must look like key=value")
    key, value = item.split("=", 1)
    if key not in spec:
      raise ConfigError(f"unknown config argument {shown(key)}: known ones are "
                        f"{', '.join(sorted(spec)) or 'none'}")
    out[key] = _convert(value, spec[key], key)
  return out


def import_experiment(path: str):
  """The experiment file at `path` as a module (its `get_config`, maybe `get_sweep`)."""
  if not os.path.isfile(path):
    raise ConfigError(f"config file {shown(path)} does not exist: pass "
                      f"--config=experiments/NAME.py[:k=v,...]")
  module_spec = importlib.util.spec_from_file_location("vitcls_experiment", path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except Exception as e:  # pylint: disable=broad-except
    raise _experiment_error(path, "cannot be imported", e) from e
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {shown(path)} has no get_config(arg=None) function")
  return module


def load_experiment(spec: str) -> ConfigDict:
  """Loads `path.py[:arg]` by calling its `get_config(arg)`."""
  path, _, arg = spec.partition(":")
  return experiment_config(import_experiment(path), path, arg or None)


def experiment_config(module, path: str, arg: str | None = None) -> ConfigDict:
  """`module.get_config(arg)` of the experiment file at `path`, or one ConfigError line:
  what it raised, with the file's line, or what it returned when not a config."""
  try:
    config = module.get_config(arg)
  except UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise _experiment_error(path, "failed in get_config", e) from e
  if not isinstance(config, (ConfigDict, dict)):
    raise ConfigError(f"experiment {path}: get_config returned {type(config).__name__}, "
                      f"not a ConfigDict: end it with `return config`")
  return config


def _experiment_error(path: str, what: str, error: Exception) -> ConfigError:
  """One line naming the experiment file's line that raised `error`."""
  line = getattr(error, "lineno", None) if isinstance(error, SyntaxError) else None
  if line is None:
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if os.path.abspath(f.filename) == os.path.abspath(path)]
    line = frames[-1].lineno if frames else None
  where = f"{path}:{line}" if line else path
  message = " ".join(str(error).split())  # One line, whatever the exception says.
  return ConfigError(f"experiment {where} {what}: {type(error).__name__}: {message}")


def resolve(config: ConfigDict, overrides: Sequence[str] = (),
            errors: list[str] | None = None) -> ConfigDict:
  """Lays `config` over `defaults()`, then applies `KEY=VALUE` overrides; validates keys.

  With an `errors` list, each bad override is appended to it (and skipped) instead of
  raised, so a command line with several mistakes reports them all at once.
  """
  merged = defaults()
  _merge(merged, config, prefix="")
  for item in overrides:
    try:
      _apply(merged, item)
    except ConfigError as e:
      if errors is None:
        raise
      errors.append(str(e))
  for key, value in merged.expected.items():
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ConfigError(f"config.expected[{shown(key)}] must be a number (the published value "
                        f"of that metric), got {shown(value)}")
  merged.lock()
  return merged


def _apply(config: ConfigDict, item: str) -> None:
  key, sep, value = item.partition("=")
  if not sep:
    raise ConfigError(f"override {shown(item)} must look like --config.KEY=VALUE")
  try:
    set_value(config, key, value)
  except ConfigError:
    raise
  except (ValueError, TypeError) as e:  # ConfigDict's own refusals (dotted keys, ...).
    raise ConfigError(f"override {shown(item)}: {shown(e)}") from None


def _suggest(key: str, known, prefix: str = "") -> str:
  close = difflib.get_close_matches(key, list(known), n=1)
  return f" (did you mean '{prefix}{close[0]}'?)" if close else ""


def _merge(base: ConfigDict, new: ConfigDict, prefix: str) -> None:
  for key, value in new.items():
    path = prefix + key
    if key not in base:
      raise ConfigError(f"unknown config key {shown(path)}{_suggest(key, base.keys(), prefix)}: "
                        f"see vitcls.configs.defaults() for the known keys")
    if path in FREE_FORM:
      base[key] = ConfigDict(value.to_dict() if isinstance(value, ConfigDict) else value)
    elif isinstance(base[key], ConfigDict):
      if not isinstance(value, (ConfigDict, dict)):
        raise ConfigError(f"config key {shown(path)} must be a dict, not {shown(value)}")
      _merge(base[key], ConfigDict(value), path + ".")
    else:
      with base.ignore_type():
        base[key] = value


def set_value(config: ConfigDict, dotted_key: str, text: str) -> None:
  """Sets `config.<dotted_key>` from command-line text, converted to the field's type."""
  parts = dotted_key.split(".")
  node, prefix = config, ""
  for i, part in enumerate(parts):
    path = prefix + part
    free = any(path == f or path.startswith(f + ".") for f in FREE_FORM)
    last = i == len(parts) - 1
    if part not in node:
      if not (free and prefix):  # New keys only inside free-form subtrees.
        raise ConfigError(f"unknown config key {shown(dotted_key)}"
                          f"{_suggest(part, node.keys(), prefix)}: check the spelling, or see "
                          f"vitcls.configs.defaults() for the known keys")
      with node.unlocked():
        node[part] = _literal(text) if last else ConfigDict()
      if last:
        return
    if last:
      current = node[part]
      if isinstance(current, ConfigDict):
        _set_dict(node, part, path, text, free)
        return
      kind = node.get_type(part) if isinstance(node, ConfigDict) else type(current)
      with node.ignore_type():
        node[part] = _convert(text, current, dotted_key, kind)
      return
    node, prefix = node[part], prefix + part + "."
    if not isinstance(node, ConfigDict):
      raise ConfigError(f"config key '{prefix[:-1]}' is a value, not a dict: cannot set "
                        f"{shown(dotted_key)}")


def _set_dict(node: ConfigDict, key: str, path: str, text: str, free: bool) -> None:
  """`--config.evals={...}`: a whole subtree from a dict literal (its keys checked)."""
  value = _literal(text)
  if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
    raise ConfigError(f"config key {shown(path)} is a dict: set one field with "
                      f"--config.{path}.KEY=VALUE, or give a dict literal like "
                      f"{{'key': value}}")
  try:
    value = ConfigDict(value)
  except ValueError as e:  # Keys with dots.
    raise ConfigError(f"config key {shown(path)}: {shown(e)}") from None
  if free:
    with node.unlocked(), node.ignore_type():
      node[key] = value
  else:
    _merge(node[key], value, path + ".")


def _literal(text: str) -> Any:
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def _convert(text: str, current: Any, key: str, kind: type | None = None) -> Any:
  """Converts command-line text to the type of the field's current value."""
  kind = kind or type(current)
  if text == "None":
    return None
  try:
    if kind is bool:
      if text.lower() in ("true", "1", "yes"):
        return True
      if text.lower() in ("false", "0", "no"):
        return False
      raise ValueError(text)
    if kind is int:
      value = _literal(text)
      if isinstance(value, float) and value.is_integer():
        value = int(value)
      if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(text)
      return value
    if kind is float:
      return float(text)
    if kind is str:
      return text
    if kind in (list, tuple):
      value = ast.literal_eval(text)
      if not isinstance(value, (list, tuple)):
        raise ValueError(text)
      return kind(value)
  except (ValueError, SyntaxError) as e:
    raise ConfigError(f"config key {shown(key)} expects a {kind.__name__}, got {shown(text)}") from e
  return _literal(text)


def imagenet_runlocal(c: ConfigDict, model: dict, *, batch: int = 16,
                      steps: int = 4) -> ConfigDict:
  """Shrinks an ImageNet experiment to seconds on a CPU, for `runlocal=True`.

  The same pp ops on mnist5k (decoded to RGB) at 32 px instead of 224 (eval: resize to
  36, crop 32), 10 classes, `model` (a tiny one of the same family), and the experiment's
  `val` evaluator on the first 200 test digits: every op and model path runs, in seconds.
  """
  def shrink(pp: str) -> str:
    return pp.replace("(256", "(36").replace("(224", "(32").replace("(1000)", "(10)")
  val = c.evals.val
  c.input.data = ConfigDict(dict(name="mnist5k", split="train"))
  c.num_classes = 10
  c.total_steps = steps
  c.input.batch_size = batch
  c.input.num_workers = 0
  c.input.pp = shrink(c.input.pp)
  c.model = ConfigDict(model)
  c.schedule.warmup_steps = 1
  c.evals = ConfigDict({"val": dict(type=val.type, split="test[:200]", pp=shrink(val.pp),
                                    batch_size=200, every=2)})
  c.log_every = 1
  c.checkpoint_every = 2
  return c


def total_steps(config: ConfigDict, num_train_examples: int) -> int:
  """Training length in steps: total_steps, else total_examples, else total_epochs.

  Examples and epochs round to the nearest step, at least one, as big_vision's
  `utils.steps` does (big_vision/utils.py:1043-1053 at 0127fb6b): its configs' step
  counts are reproduced exactly.
  """
  batch = config.input.batch_size
  if config.total_steps is not None:
    steps = config.total_steps
  elif config.total_examples is not None:
    steps = max(1, round(config.total_examples / batch)) if config.total_examples else 0
  elif config.total_epochs is not None:
    steps = (max(1, round(config.total_epochs * num_train_examples / batch))
             if config.total_epochs else 0)
  else:
    raise ConfigError("no training length: set total_steps, total_examples or "
                      "total_epochs")
  if steps <= 0:
    raise ConfigError(f"training length must be positive, got {steps} steps")
  return int(steps)


def warmup_steps(config: ConfigDict, total_steps: int) -> int:
  """Warmup length in steps: `schedule.warmup_steps`, else `warmup_percent` of the run."""
  s = config.schedule
  return int(s.warmup_steps or round(s.warmup_percent * total_steps))


def load_workdir_config(workdir: str, overrides: Sequence[str] = ()) -> ConfigDict:
  """The resolved config a run saved in `workdir/config.json`, with `KEY=VALUE` overrides."""
  path = wdir.config_path(workdir)
  if not os.path.isfile(path):
    raise ConfigError(f"{shown(workdir)} is not a vitcls workdir (no {wdir.CONFIG_FILE}): "
                      f"pass the --workdir of a training run")
  with open(path) as f:
    return resolve(ConfigDict(json.load(f)), overrides)


def to_json(config: ConfigDict) -> str:
  """The resolved config as indented JSON (tuples become lists)."""
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)
