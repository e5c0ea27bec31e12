"""Models, looked up by name: `get("vit")` imports `vitcls.models.vit` and returns its `Model`.

Lookup by name keeps configs plain data (`config.model_name = "vit"`) and keeps the trainer
free of model imports: adding a model is adding a file to this folder that defines a linen
module called `Model` (see DESIGN.md, "Contracts other parts rely on").
"""

import importlib
import pkgutil
import re
from pathlib import Path

_MODEL_CLASS = re.compile(r"^class Model\b", re.MULTILINE)


def available() -> list[str]:
  """Names of the model modules in this package (files that define `class Model`)."""
  names = []
  for info in pkgutil.iter_modules(__path__):
    if info.name.startswith("_") or info.ispkg:
      continue
    path = Path(__path__[0]) / f"{info.name}.py"
    try:
      source = path.read_text(encoding="utf-8")
    except OSError:
      continue
    if _MODEL_CLASS.search(source):
      names.append(info.name)
  return sorted(names)


def get(name: str):
  """Returns the `Model` class of `vitcls.models.<name>`; unknown names raise ValueError."""
  if not isinstance(name, str) or name not in available():
    raise ValueError(
        f"unknown model {name!r}: available models: {', '.join(available()) or '(none)'}")
  module = importlib.import_module(f"{__name__}.{name}")
  return module.Model


def build(name: str, num_classes: int, config):
  """`get(name)(num_classes=..., **config)`, with unknown fields reported as one error."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from vitcls.configs import ConfigError  # pylint: disable=g-import-not-at-top
  try:
    cls = get(name)
  except ValueError as e:
    raise ConfigError(f"config.model_name: {e}") from e
  known = {f.name for f in dataclasses.fields(cls)} - {"parent", "name", "num_classes"}
  for key in config:
    if key not in known:
      raise ConfigError(f"unknown config key 'model.{key}' for model '{name}': known "
                        f"fields are {', '.join(sorted(known))}")
  model = cls(num_classes=num_classes, **dict(config))
  try:
    if hasattr(model, "validate"):  # Models check their fields before any tracing.
      model.validate()
  except ValueError as e:
    raise ConfigError(f"config.model: {e}") from e
  return model


def load(name: str, init_params, path: str, model_config, dont_load=()) -> dict:
  """`vitcls.models.<name>.load(...)`: `init_params` overwritten from the checkpoint `path`."""
  module = importlib.import_module(f"{__name__}.{name}")
  if not hasattr(module, "load"):
    from vitcls.configs import ConfigError  # pylint: disable=g-import-not-at-top
    raise ConfigError(f"config.model_init: model '{name}' cannot import checkpoints")
  return module.load(init_params, path, model_config, tuple(dont_load))
