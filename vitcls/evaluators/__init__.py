"""Evaluators by name: `config.evals.<name>.type` picks `vitcls.evaluators.<type>`.

Each evaluator module defines `defaults()` (its config keys) and `Evaluator(config,
**context)` (context: model, train_config, mesh, batch_sharding) whose `run(params)`
returns a `Result`: the scalars logged as `<eval name>/<key>`, and the arrays the report
plots (`vitcls.run.evaluation` runs them and saves both). Adding one is adding a file. Modules
import their heavy dependencies (JAX, the input pipeline, SciPy) through `lazy_import`,
so reading every evaluator's `defaults()` to check a config costs milliseconds.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import sys
from typing import Any, NamedTuple

from vitcls.configs import ConfigDict, ConfigError


class Result(NamedTuple):
  """What an evaluator's `run(params)` gives: scalars to log, arrays for the report's plots."""
  scalars: dict[str, float]
  arrays: dict[str, Any]  # NumPy arrays by name; empty when there is nothing to plot.


def lazy_import(name: str):
  """The module `name`, loaded on its first attribute access (importlib.util.LazyLoader)."""
  if name in sys.modules:
    return sys.modules[name]
  spec = importlib.util.find_spec(name)
  loader = importlib.util.LazyLoader(spec.loader)
  spec.loader = loader
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  loader.exec_module(module)
  return module


def available() -> list[str]:
  """Evaluator type names: this package's modules, private (`_`) ones aside."""
  return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def get(kind: str):
  """The evaluator module for `kind`, or a clear error listing the known ones."""
  if kind not in available():
    raise ConfigError(f"unknown evaluator type '{kind}': available: {', '.join(available())}")
  return importlib.import_module(f"{__name__}.{kind}")


def resolve(name: str, config) -> ConfigDict:
  """Lays one `evals.<name>` entry over its evaluator's defaults; unknown keys are errors."""
  kind = config.get("type", "classification")
  merged = get(kind).defaults()
  for key, value in config.items():
    if key not in merged:
      raise ConfigError(f"unknown config key 'evals.{name}.{key}' for evaluator '{kind}': "
                        f"known ones are {', '.join(sorted(merged))}")
    merged[key] = value
  return merged
