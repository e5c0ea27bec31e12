"""The README's runnable blocks run, so its commands cannot drift from the code.

A fenced block right after a `<!-- runnable -->` line is runnable: every command in it
is a vitcls command line, run here in README order in one scratch directory (with
`experiments/` linked in), at tiny size: each training command gets
`--config.total_steps=3 --config.schedule.warmup_steps=1` appended, nothing else
changes. Blocks that need what a test machine lacks (ImageNet, published checkpoints,
accelerators, clusters) or start other processes (sweeps, launchers, `make`) are not
marked; their pieces have their own tests.
"""

import json
import os
import re
import shlex
import subprocess
import sys

import pytest

import readme_commands
from conftest import REPO, xla_flags

MARKER = "<!-- runnable -->"
TINY = ("--config.total_steps=3", "--config.schedule.warmup_steps=1")


def runnable_blocks(text: str) -> list[tuple[int, list[list[str]]]]:
  """(line number, command argv lists) of every fenced block right after the marker."""
  lines = text.splitlines()
  blocks = []
  for i, line in enumerate(lines):
    if line.strip() != MARKER:
      continue
    if i + 1 >= len(lines) or not lines[i + 1].startswith("```"):
      raise ValueError(f"README line {i + 1}: {MARKER} must be followed by a fenced block")
    body = []
    for j in range(i + 2, len(lines)):
      if lines[j].startswith("```"):
        break
      body.append(lines[j])
    else:
      raise ValueError(f"README line {i + 2}: unclosed fenced block")
    joined = re.sub(r"\\\n\s*", " ", "\n".join(body))
    commands = [shlex.split(l, comments=True) for l in joined.splitlines()]
    blocks.append((i + 2, [c for c in commands if c]))
  return blocks


def tiny(argv: list[str]) -> list[str]:
  """The command at test size: training commands run 3 steps."""
  module, _ = readme_commands.module_and_args(argv)
  return argv + list(TINY) if module == "vitcls.train" else argv


def _readme_blocks():
  with open(os.path.join(REPO, "README.md")) as f:
    return runnable_blocks(f.read())


def test_the_parser_takes_marked_blocks_only_with_continuations_and_comments():
  text = ("```\nvitcls train --config=a.py\n```\n"
          f"{MARKER}\n```sh\n# a comment\npython -m vitcls.train \\\n  --config=b.py"
          " --workdir=w  # trailing\n\nvitcls evaluate --workdir=w\n```\n")
  assert runnable_blocks(text) == [(5, [
      ["python", "-m", "vitcls.train", "--config=b.py", "--workdir=w"],
      ["vitcls", "evaluate", "--workdir=w"]])]
  with pytest.raises(ValueError, match="followed by a fenced block"):
    runnable_blocks(f"{MARKER}\ntext\n")
  assert tiny(["vitcls", "train", "--workdir=w"])[-2:] == list(TINY)
  assert tiny(["vitcls", "export", "--workdir=w"]) == ["vitcls", "export", "--workdir=w"]


def test_the_readme_marks_its_cpu_runnable_blocks_and_they_are_vitcls_commands():
  blocks = _readme_blocks()
  commands = [c for _, cs in blocks for c in cs]
  assert len(blocks) >= 3 and len(commands) >= 6, blocks
  modules = {readme_commands.module_and_args(c)[0] for c in commands}
  assert {"vitcls.train", "vitcls.evaluate", "vitcls.export"} <= modules


def test_every_runnable_readme_command_runs_at_tiny_size(tmp_path):
  commands = [tiny(c) for _, cs in _readme_blocks() for c in cs]
  os.symlink(os.path.join(REPO, "experiments"), tmp_path / "experiments")
  (tmp_path / "commands.json").write_text(json.dumps(commands))
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO,
             XLA_FLAGS=xla_flags(1))
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "tests", "readme_commands.py"), "commands.json"],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0 and f"ALL {len(commands)} OK" in proc.stdout, (
      proc.stdout[-2000:] + proc.stderr[-6000:])
