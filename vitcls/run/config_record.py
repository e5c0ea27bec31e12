"""The workdir's `config.json` across starts: what a resumed run may change, and when the
file is written.

`config.json` is what `vitcls.evaluate`, `predict`, `export` and `model_init` read to rebuild
the model of the checkpoints beside it, so it must describe them. A start rewrites it only
once it is accepted and will train (`write`), never for a refused start or one with nothing
left to do, and the version it replaces is kept (`superseded/config_to_step_<N>.json`, N the
step the old config trained up to). A resume whose config differs from the recorded one is
checked first (`check_resume`): a change to what the parameters mean (the model, its
fields, the classes) is refused in one line; any other change (lr, schedule, length,
evaluators...) is named in a warning, since the run continues under it.
"""

from __future__ import annotations

import json
import os
from typing import Any

from absl import logging

from vitcls import configs
from vitcls.errors import UserError, shown
from vitcls.run import workdir as wdir

# Model fields that change how the parameters are computed with, not what they mean; any
# other `model.*` field, `model_name` or `num_classes` changed on resume is refused.
EXECUTION_ONLY_MODEL_FIELDS = frozenset({
    "dtype", "remat", "remat_policy", "scan", "dropout", "stoch_depth", "head_zeroinit",
    "weight_init"})
_SHOWN_CHANGES = 8


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, dict) and tree:
    out = {}
    for key, value in tree.items():
      out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return out
  return {prefix: tree}


def changes(before: dict, after: dict) -> list[tuple[str, Any, Any]]:
  """[(dotted key, value before, value after)] where two configs (as JSON objects) differ;
  a key only one of them has shows None on the other side."""
  a, b = _flat(before), _flat(after)
  return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def changes_meaning(key: str) -> bool:
  """Whether changing `key` on resume changes what the checkpoint's parameters mean."""
  if key in ("model_name", "num_classes"):
    return True
  return key.startswith("model.") and key.split(".")[1] not in EXECUTION_ONLY_MODEL_FIELDS


def _listed(found: list[tuple[str, Any, Any]]) -> str:
  text = ", ".join(f"{k} {json.dumps(a)} -> {json.dumps(b)}" for k, a, b in
                   found[:_SHOWN_CHANGES])
  return text + (f" and {len(found) - _SHOWN_CHANGES} more" if len(found) > _SHOWN_CHANGES
                 else "")


def recorded(workdir: str) -> dict | None:
  """The workdir's `config.json` as a JSON object, or None if absent or unreadable."""
  try:
    with open(wdir.config_path(workdir)) as f:
      value = json.load(f)
  except (OSError, ValueError):
    return None
  return value if isinstance(value, dict) else None


def check_resume(workdir: str, config) -> list[tuple[str, Any, Any]]:
  """The changes from the recorded config to `config`, for a workdir that holds
  checkpoints; raises UserError (one line) if one changes what the parameters mean."""
  before = recorded(workdir)
  if before is None:
    return []
  found = changes(before, json.loads(configs.to_json(config)))
  refused = [c for c in found if changes_meaning(c[0])]
  if refused:
    key, was, now = refused[0]
    raise UserError(
        f"config.{key} is {json.dumps(now)} here but {json.dumps(was)} in the run whose "
        f"checkpoints are in workdir {shown(workdir)}: that changes what its parameters "
        f"mean. Use a new --workdir (with --config.model_init={workdir} to start from this "
        f"run's weights), or drop the override to resume")
  return found


def write(workdir: str, config, found: list[tuple[str, Any, Any]],
          resume_step: int | None, trains: bool) -> None:
  """Records `config` as the workdir's config once its start is accepted (process 0).

  `found`: the changes `check_resume` reported. Nothing to train: the file is left as it
  is and the changes are said not to apply. Otherwise the previous file, when it differs,
  is kept under `superseded/` and the changes are named in a warning.
  """
  if not trains:
    if found:
      logging.warning("Nothing to train, so these changes are not applied and %s is left "
                      "as it is: %s.", wdir.CONFIG_FILE, _listed(found))
    return
  path = wdir.config_path(workdir)
  text = configs.to_json(config)
  if os.path.exists(path):
    with open(path) as f:
      old = f.read()
    if old != text:
      kept = wdir.superseded_config_path(workdir, resume_step or 0)
      wdir.atomic_write(kept, old)
      if found:
        logging.warning("Resuming from step %d with a changed config (was -> now): %s. "
                        "%s records it; the previous one is kept as %s.", resume_step or 0,
                        _listed(found), wdir.CONFIG_FILE, kept)
  wdir.atomic_write(path, text)
