"""The `vitcls` console script: `vitcls train ...` runs `python -m vitcls.train ...`, etc."""

from __future__ import annotations

import importlib
import sys

_COMMANDS = {"train": "vitcls.train", "evaluate": "vitcls.evaluate",
             "predict": "vitcls.predict", "export": "vitcls.export",
             "sweep": "vitcls.sweep.__main__", "launch": "vitcls.launch"}


def main(argv: list[str] | None = None) -> None:
  """Runs `vitcls COMMAND ARGS` as `python -m vitcls.COMMAND ARGS`; unknown commands exit 2."""
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] not in _COMMANDS:
    given = argv[1] if len(argv) > 1 else "nothing"
    print(f"vitcls: error: expected a command ({', '.join(_COMMANDS)}), got {given}: "
          f"e.g. vitcls train --config=experiments/mnist5k_vit.py --workdir=DIR",
          file=sys.stderr)
    sys.exit(2)
  module = importlib.import_module(_COMMANDS[argv[1]])
  sys.argv = [f"vitcls {argv[1]}"] + argv[2:]
  module.run()
