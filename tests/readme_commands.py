"""Runs vitcls command lines in this one process, in order: the README's runnable blocks.

    python tests/readme_commands.py COMMANDS.json

COMMANDS.json is a list of argument lists (`["python", "-m", "vitcls.train", ...]` or
`["vitcls", "train", ...]`). Each command runs its module as `python -m` would
(`runpy`, under `__main__`), so imports are paid once instead of once per command (about
10 s each). Between commands the absl flags the CLI defined are removed and its module
is forgotten, so the next CLI starts as in a fresh process (the libraries' own flags
stay). Stops at the first command
that exits non-zero, printing which; exits 0 when every one succeeded.
"""

import json
import os
import runpy
import sys
import time

from absl import flags

from vitcls import cli

# Flags defined by vitcls's own modules are registered under their file's path.
_PACKAGE = os.path.dirname(os.path.abspath(cli.__file__)) + os.sep
_CONSOLE = cli._COMMANDS  # `vitcls CMD` -> module, as the console script maps it.


def module_and_args(argv: list[str]) -> tuple[str, list[str]]:
  """The module a command line runs and its arguments."""
  if argv[:2] == ["python", "-m"] and argv[2].startswith("vitcls."):
    return argv[2], argv[3:]
  if argv[0] == "vitcls" and argv[1] in _CONSOLE:
    return _CONSOLE[argv[1]], argv[2:]
  raise SystemExit(f"not a vitcls command: {' '.join(argv)}")


def run(argv: list[str]) -> int:
  """One command, in-process; its exit code."""
  module, args = module_and_args(argv)
  sys.argv = [module] + args
  code = 0
  try:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
  except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
  finally:
    names = {flag.name for owner, defined in flags.FLAGS.flags_by_module_dict().items()
             if owner in ("__main__", module) or owner.startswith(_PACKAGE)
             for flag in defined}
    for name in names & set(flags.FLAGS):  # Collected first: deleting edits those lists.
      delattr(flags.FLAGS, name)
    flags.FLAGS.unparse_flags()
    for name in list(sys.modules):
      if name in _CONSOLE.values():
        del sys.modules[name]
  return code


def main() -> None:
  with open(sys.argv[1]) as f:
    commands = json.load(f)
  for i, argv in enumerate(commands):
    start = time.time()
    print(f"[{i + 1}/{len(commands)}] {' '.join(argv)}", file=sys.stderr, flush=True)
    code = run(argv)
    print(f"[{i + 1}/{len(commands)}] exit {code} after {time.time() - start:.1f} s",
          file=sys.stderr, flush=True)
    if code != 0:
      print(f"FAILED: {' '.join(argv)} (exit {code})", flush=True)
      sys.exit(1)
  print(f"ALL {len(commands)} OK", flush=True)


if __name__ == "__main__":
  main()
