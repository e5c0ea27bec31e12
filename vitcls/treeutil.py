"""Names for pytree leaves, so regexes can select parameters (weight decay, sharding)."""

from __future__ import annotations

import re

import jax


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def leaf_path(path) -> str:
  """'Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel' for a tree_util key path."""
  return "/".join(_key_name(k) for k in path)


def paths(tree):
  """A tree shaped like `tree` whose leaves are their '/'-joined paths."""
  return jax.tree_util.tree_map_with_path(lambda p, _: leaf_path(p), tree)


def regex_mask(tree, pattern: str):
  """A bool tree: True where the leaf path matches `pattern` (re.fullmatch)."""
  regex = re.compile(pattern)
  return jax.tree_util.tree_map(lambda p: bool(regex.fullmatch(p)), paths(tree))
