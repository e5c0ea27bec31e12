"""Is a checkpoint on disk whole? Damage found from orbax's files, and damaged steps set
aside instead of ending (or silently restarting) a run.

orbax writes each step into a temporary folder and renames it only once complete, so a
crash or SIGKILL mid-save never replaces a good checkpoint. But a finished step can still be
damaged afterwards (a full or flaky disk, an interrupted copy of the workdir, a file removed
by hand), and orbax lists it as if it were whole: its restore then fails deep inside
TensorStore, or, for a missing `_METADATA`, with an error that looks like a config mismatch.
So a step is checked before it is trusted, cheapest first:
1. its files (`find_damage`): the commit marker (`commit_success.txt`),
   `_CHECKPOINT_METADATA` with a commit time, each item's `_METADATA` tree, and the OCDBT
   database: `manifest.ocdbt`, its b-tree nodes (small; read with TensorStore's OCDBT
   dump), and every data file the b-tree points into, which must exist and reach the end
   of the last value stored in it (a stat, not a read): this finds deleted and truncated
   array files without reading an array;
2. its tree and shapes against what the reader wants (`checkpoint`): a checkpoint that does
   not fit is the user's "does not fit this config" error, not damage;
3. the read itself (`read_or_damage`): an I/O or decoding error there (bytes damaged inside
   a data file) condemns the step too.
4. the values read against the checksums written with them (`vitcls.run.checksums`):
   bytes flipped inside a stored chunk usually still decode (OCDBT keeps no checksum of
   the values), and only this finds them.
A damaged step is moved, never deleted, to `WORKDIR/checkpoints_broken/<step>[.<n>]`, with a
`.reason.txt` beside it, outside the folder orbax scans (`move_aside`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import json
import os
import sys
import time
from typing import Any, Callable

from absl import logging
import jax

from vitcls.run import lock as workdir_lock
from vitcls.run import workdir as wdir

_COMMIT_MARKER = "commit_success.txt"  # orbax 0.12 writes it last, then renames the step.
_STEP_METADATA = "_CHECKPOINT_METADATA"
_TREE_METADATA = "_METADATA"
_OCDBT_MANIFEST = "manifest.ocdbt"
# TensorStore status codes that mean "the stored bytes are not what they should be".
_STORAGE_CODES = ("NOT_FOUND", "OUT_OF_RANGE", "DATA_LOSS", "FAILED_PRECONDITION",
                  "INVALID_ARGUMENT", "UNAVAILABLE", "INTERNAL", "UNKNOWN")


# Finding damage.

def find_damage(step_dir: str) -> str | None:
  """Why the step folder is not a whole orbax checkpoint, from its files; None if it looks
  whole. Cheap: reads metadata and the OCDBT index, never the arrays."""
  if not os.path.isdir(step_dir):
    return "not a folder"
  if not os.path.isfile(os.path.join(step_dir, _COMMIT_MARKER)):
    return f"no commit marker ({_COMMIT_MARKER})"
  meta, problem = _read_json(os.path.join(step_dir, _STEP_METADATA))
  if problem:
    return f"{_STEP_METADATA} {problem}"
  if not meta.get("commit_timestamp_nsecs"):
    return f"{_STEP_METADATA} has no commit time: the save never finished"
  for item in meta.get("item_handlers") or {"default": None}:
    item_dir = os.path.join(step_dir, item)
    if not os.path.isdir(item_dir):
      return f"its item folder '{item}' is missing"
    tree, problem = _read_json(os.path.join(item_dir, _TREE_METADATA))
    if problem:
      return f"{item}/{_TREE_METADATA} {problem}"
    if not isinstance(tree.get("tree_metadata"), dict) or not tree["tree_metadata"]:
      return f"{item}/{_TREE_METADATA} lists no arrays"
    uses_ocdbt = os.path.exists(os.path.join(item_dir, _OCDBT_MANIFEST)) or any(
        n.startswith("ocdbt.process_") for n in os.listdir(item_dir))
    problem = _ocdbt_problem(item_dir) if uses_ocdbt else None
    if problem:
      return f"{item}: {problem}"
  return None


def custom_metadata(step_dir: str) -> dict:
  """What the save passed as `custom_metadata` (vitcls's checksums), from the step's
  `_CHECKPOINT_METADATA`; {} when absent or unreadable (`find_damage` judges the file)."""
  meta, _ = _read_json(os.path.join(step_dir, _STEP_METADATA))
  custom = meta.get("custom_metadata") if isinstance(meta, dict) else None
  return custom if isinstance(custom, dict) else {}


def _read_json(path: str):
  """(object, None) or (None, what is wrong with the file)."""
  try:
    with open(path, "rb") as f:
      data = f.read()
  except FileNotFoundError:
    return None, "is missing"
  except OSError as e:
    return None, f"cannot be read ({type(e).__name__}: {e.strerror or e})"
  try:
    value = json.loads(data)
  except ValueError:
    return None, f"is not valid JSON ({len(data)} bytes: truncated or overwritten?)"
  if not isinstance(value, dict):
    return None, "is not a JSON object"
  return value, None


def _ocdbt_problem(item_dir: str) -> str | None:
  """What is wrong with an item's OCDBT database: its manifest, its b-tree, or a data file
  that is missing or shorter than the values the b-tree places in it. Reads the manifest
  and the b-tree nodes (small), then only sizes of the data files."""
  manifest = os.path.join(item_dir, _OCDBT_MANIFEST)
  if not os.path.isfile(manifest):
    return f"{_OCDBT_MANIFEST} is missing"
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  ends: dict[str, int] = {}  # data file -> the end of the last value stored in it.
  try:
    base = ts.KvStore.open({"driver": "file", "path": item_dir + os.sep}).result()
    versions = ts.ocdbt.dump(base).result().get("versions") or []
    if not versions:
      return f"{_OCDBT_MANIFEST} holds no version of the database"
    nodes, keys = [versions[-1]["root"].get("location")], 0
    while nodes:
      location = nodes.pop()
      if not location:
        continue
      for entry in ts.ocdbt.dump(base, location).result().get("entries", []):
        keys += "key" in entry
        for value in entry.values():
          if isinstance(value, str) and value.startswith("btreenode:"):
            nodes.append(value)
          elif isinstance(value, str) and value.startswith("value:"):
            # value:<prefix>:<file>:<offset>:<length>, the file being <prefix><file>.
            head, offset, length = value[len("value:"):].rsplit(":", 2)
            path = head.replace(":", "", 1)
            ends[path] = max(ends.get(path, 0), int(offset) + int(length))
  except Exception as e:  # pylint: disable=broad-exception-caught
    return f"its OCDBT index cannot be read ({first_line(e)})"
  if not keys:
    return "its OCDBT index lists no arrays"
  for name, end in sorted(ends.items()):
    try:
      size = os.path.getsize(os.path.join(item_dir, name))
    except OSError:
      return f"data file {name} is missing"
    if size < end:
      return f"data file {name} is truncated ({size} bytes, values up to byte {end})"
  return None


def storage_problem(e: BaseException) -> str | None:
  """A one-line reason if the read error `e` says the stored files are damaged."""
  chain, seen = [], set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    chain.append(e)
    e = e.__cause__ or e.__context__
  for x in reversed(chain):  # The innermost cause is the most specific.
    text = first_line(x)
    if isinstance(x, (OSError, EOFError, json.JSONDecodeError)):
      return f"{type(x).__name__}: {text}"
    if text.startswith(_STORAGE_CODES) or "Encountered error while reading" in text:
      return text
  return None


def read_or_damage(read: Callable[[], Any]):
  """(read(), None), or (None, why) when the read fails on damaged stored bytes; any other
  error propagates."""
  with _quiet_abandoned_reads() as reads:
    try:
      return read(), None
    except Exception as e:  # pylint: disable=broad-exception-caught
      why = storage_problem(e)
      if why is None:
        raise
      reads.failed()
  return None, why


@contextlib.contextmanager
def _quiet_abandoned_reads():
  """When one array read of a restore fails, orbax abandons the others, and each of their
  coroutines would print a traceback of the same damage when collected: they are collected
  here, silently, so that the one warning naming the damage is what is seen. Call
  `.failed()` from the `except` clause; the collection runs once it has ended."""
  previous = sys.unraisablehook

  def hook(unraisable):
    if not asyncio.iscoroutine(unraisable.object):
      previous(unraisable)

  class Failure:
    happened = False

    def failed(self):
      self.happened = True

  failure = Failure()
  sys.unraisablehook = hook
  try:
    yield failure
  finally:
    if failure.happened:
      gc.collect()
    sys.unraisablehook = previous


def first_line(e: BaseException) -> str:
  """The first line of an error's message (at most 300 characters), for one-line reasons."""
  text = str(e).strip()
  return (text.splitlines()[0] if text else type(e).__name__)[:300]


# Setting damaged steps aside.

def move_aside(checkpoints_dir: str, step: int, reason: str) -> str | None:
  """Moves `checkpoints/<step>` to `checkpoints_broken/<step>[.<n>]`; its new path, or None
  if it could not be moved (an empty string if another process moved it first)."""
  broken = os.path.join(os.path.dirname(checkpoints_dir), wdir.BROKEN_CHECKPOINTS_DIR)
  source = os.path.join(checkpoints_dir, str(step))
  try:
    os.makedirs(broken, exist_ok=True)
  except OSError:
    return None
  for n in range(1000):
    dest = os.path.join(broken, str(step) if n == 0 else f"{step}.{n}")
    if os.path.lexists(dest):
      continue
    try:
      os.rename(source, dest)
    except FileNotFoundError:
      return ""
    except OSError as e:
      if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
        continue  # Taken meanwhile.
      return None
    try:
      with open(dest + ".reason.txt", "w") as f:
        f.write(f"Step {step} was moved here from {checkpoints_dir} at "
                f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}: {reason}.\n"
                f"Nothing in it was changed. Move it back to resume from it.\n")
    except OSError:
      pass
    return dest
  return None


def set_aside_if_idle(workdir: str, step: int, reason: str) -> None:
  """Moves a damaged step aside, unless a live trainer holds the workdir (it may be
  writing or rotating checkpoints right now) or this is not process 0; warns either way."""
  directory = wdir.checkpoints_dir(workdir)
  holder = workdir_lock.live_holder(workdir)
  if holder is not None:
    logging.warning("The checkpoint of step %d in %s is damaged (%s); left in place because "
                    "a training run holds the workdir (%s); using an older one.", step,
                    directory, reason, holder.describe())
    return
  dest = move_aside(directory, step, reason) if jax.process_index() == 0 else ""
  logging.warning("The checkpoint of step %d in %s is damaged (%s)%s; using an older one.",
                  step, directory, reason, f": moved it to {dest}" if dest else "")
