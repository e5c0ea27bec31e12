"""`model_init="hf-hub:<repo>"`: weights from a Hugging Face Hub repo, as timm names them.

`hf-hub:timm/vit_base_patch16_224.augreg2_in21k_ft_in1k` (optionally `@<revision>`) is
resolved by `huggingface_hub` to the repo's `model.safetensors` in the local Hub cache,
downloaded on first use, and to its `config.json`, whose `architecture` (timm's
`save_config_for_hf` writes it beside `num_classes` and `pretrained_cfg`) says which
vitcls model reads the weights (`ARCHITECTURES`). The user's Hub settings are read when a
name is resolved, not when a module is imported: the cache from HF_HUB_CACHE, else
HF_HOME/hub, else ~/.cache/huggingface/hub; the token from HF_TOKEN or `hf auth login`;
with HF_HUB_OFFLINE=1 only the cache is read and nothing goes on the network.
`pytorch_model.bin` (a pickle) is never read.

`problems` is what `vitcls.validate` checks (the name's form, and from the cache alone,
in milliseconds, the architecture and, offline, that the weights are there); `resolve` is
what `vitcls.run.build` calls. Each mistake is one `HubError` line naming the fix.
Nothing here imports JAX; `huggingface_hub` is imported only for an `hf-hub:` name.
"""

from __future__ import annotations

import json
import os
import re
from typing import NamedTuple

from vitcls.errors import UserError, shown

PREFIX = "hf-hub:"
WEIGHTS = "model.safetensors"
PICKLED_WEIGHTS = "pytorch_model.bin"
CONFIG = "config.json"
EXAMPLE = "hf-hub:timm/vit_base_patch16_224.augreg2_in21k_ft_in1k"
# timm's `architecture` (a regex matching its start) -> the vitcls model that reads it,
# and how messages name the family.
ARCHITECTURES = (
    (r"(vit|deit|deit3)_", "vit", "vit_*, deit_*, deit3_*"),
    (r"convnext(v2)?_", "convnext", "convnext_*, convnextv2_*"),
    (r"mixer_", "mixer", "mixer_*"),
    (r"regnety_\d+$", "regnet", "regnety_NNN"),  # Not timm's _tv/_sgn: other widths, norms.
    (r"resnetv2_\d+x\d+_bit", "bit", "resnetv2_*_bit"),  # timm's other resnetv2 use BN.
)
# A Hub repo id, as huggingface_hub checks it: [namespace/]name of letters, digits and
# - _ . (no '--' or '..', not starting or ending with - or .), at most 96 characters.
_REPO_ID = re.compile(r"^(?:[\w.-]+/)?[\w.-]{1,96}$")


class HubError(UserError):
  """An `hf-hub:` name that cannot be resolved to weights vitcls reads."""


class Resolved(NamedTuple):
  """Where an `hf-hub:` name's weights are, and what its config.json says they are."""
  path: str  # The local model.safetensors (a file in the Hub cache's snapshots/).
  architecture: str | None  # timm's name, e.g. "vit_base_patch16_224"; None: no config.


def is_hub(name) -> bool:
  """Whether `name` (a config.model_init) names a Hub repo rather than a local path."""
  return isinstance(name, str) and name.startswith(PREFIX)


def parse(name: str) -> tuple[str, str | None]:
  """'hf-hub:owner/repo@rev' -> ('owner/repo', 'rev'); HubError when it is not one."""
  rest = name[len(PREFIX):]
  repo_id, at, revision = rest.partition("@")
  bad = (not _REPO_ID.match(repo_id) or "--" in repo_id or ".." in repo_id
         or any(part.startswith(("-", ".")) or part.endswith(("-", "."))
                for part in repo_id.split("/"))
         or (at and not revision) or "@" in revision)
  if bad:
    what = "names no repo" if not repo_id else "is not a Hub repo id"
    raise HubError(f"{shown(name)} {what}: write hf-hub:<owner>/<repo>[@<revision>], "
                   f"e.g. {EXAMPLE}")
  return repo_id, revision or None


def cache_dir() -> str:
  """The Hub cache the user configured, read from the environment now.

  huggingface_hub reads these variables once, when it is imported; reading them here
  lets a process (or a test) that sets them later be obeyed. Same precedence as
  huggingface_hub's `constants`: HF_HUB_CACHE, HUGGINGFACE_HUB_CACHE, HF_HOME/hub,
  $XDG_CACHE_HOME/huggingface/hub, ~/.cache/huggingface/hub.
  """
  env = os.environ
  path = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
  if not path:
    home = env.get("HF_HOME") or os.path.join(
        env.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface")
    path = os.path.join(home, "hub")
  return os.path.expandvars(os.path.expanduser(path))


def offline() -> bool:
  """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) set to 1 / true / yes / on, read now."""
  value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
  return (value or "").upper() in ("1", "ON", "YES", "TRUE")


def model_for(architecture: str) -> str | None:
  """The vitcls model name that reads timm's `architecture`, or None."""
  return next((model for pattern, model, _ in ARCHITECTURES
               if re.match(pattern, architecture)), None)


def architecture_problem(name: str, architecture: str | None, model_name: str) -> str | None:
  """Why weights of timm's `architecture` do not fit `config.model_name` (None: they do)."""
  if not architecture:
    return None
  model = model_for(architecture)
  if model is None:
    known = "; ".join(f"{names} ({reader})" for _, reader, names in ARCHITECTURES)
    return (f"{shown(name)} holds a timm {architecture!r}, which no vitcls model reads: "
            f"use a repo of one that does: {known}")
  if model != model_name:
    return (f"{shown(name)} holds a timm {architecture!r} but config.model_name is "
            f"{model_name!r}: set config.model_name={model!r} (and a config.model of its "
            f"size)")
  return None


def _not_cached(name: str, repo_id: str) -> str:
  return (f"{shown(name)} is not in the Hugging Face cache {cache_dir()} and HF_HUB_OFFLINE "
          f"is set: run once online, or `hf download {repo_id} {WEIGHTS} {CONFIG}` "
          f"(older huggingface_hub: `huggingface-cli download`) with the same HF_HOME / "
          f"HF_HUB_CACHE, or unset HF_HUB_OFFLINE")


def _pickle_only(name: str) -> str:
  return (f"{shown(name)} has no {WEIGHTS}, only {PICKLED_WEIGHTS}, a PyTorch pickle "
          f"vitcls never loads (unpickling can run code): convert it where torch is "
          f"installed (torch.load(..., weights_only=True), then "
          f"safetensors.torch.save_file) and set config.model_init to the .safetensors "
          f"file, or use a repo that has {WEIGHTS}")


def _cached(repo_id: str, revision: str | None, filename: str) -> str | None:
  """The cached file's path, or None (not cached, or cached as absent)."""
  import huggingface_hub  # pylint: disable=g-import-not-at-top
  path = huggingface_hub.try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir(),
                                                revision=revision)
  return path if isinstance(path, str) else None


def _read_config(path: str | None) -> dict:
  if not path:
    return {}
  try:
    with open(path, encoding="utf-8") as f:
      config = json.load(f)
  except (OSError, ValueError):
    return {}
  return config if isinstance(config, dict) else {}


def _architecture(config: dict) -> str | None:
  value = config.get("architecture")
  return value if isinstance(value, str) else None


def problems(name: str, model_name: str, *, local_files: bool = True) -> list[str]:
  """What `vitcls.validate` reports of an `hf-hub:` model_init, one line each.

  Always the name's form; with `local_files`, from the cache alone (no network): the
  architecture when config.json is cached and, when HF_HUB_OFFLINE is set, whether
  the weights are.
  """
  try:
    repo_id, revision = parse(name)
  except HubError as e:
    return [str(e)]
  if not local_files:
    return []
  found = []
  config = _read_config(_cached(repo_id, revision, CONFIG))
  problem = architecture_problem(name, _architecture(config), model_name)
  if problem:
    found.append(problem)
  if offline() and not _cached(repo_id, revision, WEIGHTS):
    found.append(_pickle_only(name) if _cached(repo_id, revision, PICKLED_WEIGHTS)
                 else _not_cached(name, repo_id))
  return found


def resolve(name: str, model_name: str | None = None) -> Resolved:
  """The local `model.safetensors` of `hf-hub:<repo>[@<revision>]`, downloaded if needed.

  With `model_name`, the repo's architecture (config.json) must be one that model reads.
  Raises HubError, one line naming the fix, for a malformed name, a repo that is not
  cached while offline, has only pickled weights, cannot be found or reached, or holds
  another architecture.
  """
  repo_id, revision = parse(name)
  path = _download(name, repo_id, revision, WEIGHTS)
  try:
    config_path = _download(name, repo_id, revision, CONFIG)
  except HubError:  # Not every repo has one: nothing to check the architecture against.
    config_path = None
  architecture = _architecture(_read_config(config_path))
  if model_name is not None:
    problem = architecture_problem(name, architecture, model_name)
    if problem:
      raise HubError(problem)
  return Resolved(path, architecture)


def _download(name: str, repo_id: str, revision: str | None, filename: str) -> str:
  """huggingface_hub's `hf_hub_download` into the user's cache; its errors as HubError."""
  import huggingface_hub  # pylint: disable=g-import-not-at-top
  from huggingface_hub import utils as errors  # pylint: disable=g-import-not-at-top
  is_offline = offline()
  try:
    return huggingface_hub.hf_hub_download(
        repo_id, filename, revision=revision, cache_dir=cache_dir(),
        local_files_only=is_offline)
  except errors.LocalEntryNotFoundError:
    if filename == WEIGHTS and _cached(repo_id, revision, PICKLED_WEIGHTS):
      raise HubError(_pickle_only(name)) from None
    if is_offline:
      raise HubError(_not_cached(name, repo_id)) from None
    raise HubError(f"cannot reach the Hugging Face Hub for {shown(name)} and it is not in "
                   f"the cache {cache_dir()}: check the network (or HF_ENDPOINT), or "
                   f"download it elsewhere with `hf download {repo_id}` and point "
                   f"HF_HUB_CACHE at that cache") from None
  except errors.GatedRepoError:
    raise HubError(f"{shown(name)} is a gated repo: accept its terms on its Hub page, then "
                   f"set HF_TOKEN or run `hf auth login`") from None
  except errors.RepositoryNotFoundError:
    raise HubError(f"no Hugging Face Hub repo {repo_id!r} for {shown(name)} (or it is "
                   f"private): check the name, or set HF_TOKEN / run `hf auth login` for "
                   f"a private repo") from None
  except errors.RevisionNotFoundError:
    raise HubError(f"{shown(name)}: repo {repo_id!r} has no revision {revision!r}: give an "
                   f"existing branch, tag or commit after '@'") from None
  except errors.EntryNotFoundError:
    if filename == WEIGHTS and _pickle_on_hub(repo_id, revision):
      raise HubError(_pickle_only(name)) from None
    raise HubError(f"{shown(name)} has no {filename}: use a repo that has "
                   f"{WEIGHTS}, or download the weights and set config.model_init to "
                   f"the file") from None
  except (errors.HfHubHTTPError, OSError, ValueError) as e:
    detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise HubError(f"cannot download {filename} of {shown(name)}: {detail}") from None


def _pickle_on_hub(repo_id: str, revision: str | None) -> bool:
  """Whether the repo on the Hub has pickled weights (False when that cannot be told)."""
  import huggingface_hub  # pylint: disable=g-import-not-at-top
  try:
    return huggingface_hub.file_exists(repo_id, PICKLED_WEIGHTS, revision=revision)
  except Exception:  # pylint: disable=broad-except  # Only a better message was at stake.
    return False
