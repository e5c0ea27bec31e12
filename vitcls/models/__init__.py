"""Models, looked up by name: `get("vit")` imports `vitcls.models.vit` and returns its `Model`.

Lookup by name keeps configs plain data (`config.model_name = "vit"`) and keeps the trainer
free of model imports: adding a model is adding a file to this folder that defines a linen
module called `Model`: `Model(num_classes=K, **config.model)`, applied as
`apply({"params": p}, images, train=...) -> (logits, {"pre_logits": ...})` on NHWC images
in [-1, 1], and optionally a `load` for checkpoints (see `load` below). Which models exist
and which fields each takes are read from the files' source, so `vitcls.validate` learns
them before JAX or flax is imported; so are the rules their values follow (`field_rules`).
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path


def _source(name: str) -> list[ast.stmt] | None:
  """The top-level statements of `<name>.py` (None: no such file)."""
  try:
    source = (Path(__path__[0]) / f"{name}.py").read_text(encoding="utf-8")
  except OSError:
    return None
  return ast.parse(source).body


def _declared_fields(name: str) -> set[str] | None:
  """The annotated fields of `class Model` in `<name>.py` (None: no such class or file)."""
  for node in _source(name) or ():
    if isinstance(node, ast.ClassDef) and node.name == "Model":
      return {n.target.id for n in node.body
              if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
  return None


def _literal(node: ast.expr, constants: dict):
  """`node`'s value: a literal, or the name of one of the file's literal constants."""
  if isinstance(node, ast.Name) and node.id in constants:
    return constants[node.id]
  return ast.literal_eval(node)


def field_rules(name: str) -> dict:
  """What `vitcls.validate` checks of each field's value: `FIELD_RULES` of `<name>.py`.

  Read from the source, like the fields, so flax is not imported: a dict literal whose
  values are literals or names of the file's literal constants (`POOL_TYPES`). A rule is
    "positive"  an integer >= 1, or a list of them;
    "rate"      a number in [0, 1];
    "patch"     a positive integer or (height, width): the model's patch, which must be
                no larger than the images the pp makes;
    a tuple     one of these values;
    a dict      a variant 'NAME/PATCH' with NAME one of its keys (ViT's 'S/16'); its
                PATCH is the patch when no "patch" field is set.
  A field set to None is left to the model. Fields without a rule are checked by the
  model itself (`Model.validate`) when `build` makes it.
  """
  constants, rules = {}, {}
  for node in _source(name) or ():
    if not (isinstance(node, ast.Assign) and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)):
      continue
    target = node.targets[0].id
    if target == "FIELD_RULES" and isinstance(node.value, ast.Dict):
      rules = {ast.literal_eval(k): _literal(v, constants)
               for k, v in zip(node.value.keys, node.value.values)}
      continue
    try:
      constants[target] = ast.literal_eval(node.value)
    except (ValueError, TypeError, SyntaxError):  # Not a literal: no rule can name it.
      continue
  return rules


def available() -> list[str]:
  """Names of the model modules in this package (files that define `class Model`)."""
  return sorted(info.name for info in pkgutil.iter_modules(__path__)
                if not info.name.startswith("_") and not info.ispkg
                and _declared_fields(info.name) is not None)


def fields(name: str) -> set[str]:
  """The config fields of model `name`: its `Model`'s dataclass fields but num_classes."""
  return (_declared_fields(name) or set()) - {"num_classes"}


def get(name: str):
  """Returns the `Model` class of `vitcls.models.<name>`; unknown names raise ValueError."""
  if not isinstance(name, str) or name not in available():
    raise ValueError(
        f"unknown model {name!r}: available models: {', '.join(available()) or '(none)'}")
  module = importlib.import_module(f"{__name__}.{name}")
  return module.Model


def build(name: str, num_classes: int, config):
  """`get(name)(num_classes=..., **config)`, its field values checked before any tracing.

  Names and fields are checked by `vitcls.validate` (`models.fields`); the values only
  the model knows how to check (`Model.validate`) raise ConfigError here.
  """
  from vitcls.configs import ConfigError  # pylint: disable=g-import-not-at-top
  model = get(name)(num_classes=num_classes, **dict(config))
  try:
    if hasattr(model, "validate"):  # Models check their fields before any tracing.
      model.validate()
  except ValueError as e:
    raise ConfigError(f"config.model: {e}") from e
  return model


def load(name: str, init_params, checkpoint, model_config, dont_load=(),
         origin: str = "") -> dict:
  """`vitcls.models.<name>.load(...)`: `init_params` overwritten from `checkpoint`.

  `checkpoint` is a params tree of arrays or an `.npz` path: models do not read workdirs
  (their caller does, with `vitcls.run.checkpoint`), and `origin` then names the workdir
  in messages.
  """
  module = importlib.import_module(f"{__name__}.{name}")
  if not hasattr(module, "load"):
    from vitcls.configs import ConfigError  # pylint: disable=g-import-not-at-top
    raise ConfigError(f"config.model_init: model '{name}' cannot import checkpoints")
  return module.load(init_params, checkpoint, model_config, tuple(dont_load), origin=origin)
