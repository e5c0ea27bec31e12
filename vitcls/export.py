"""`python -m vitcls.export --workdir=DIR --output=PATH [--format=npz|savedmodel] [--step=N]`.

Nothing trained with vitcls is locked in: `npz` writes the parameters of a workdir's
checkpoint (the latest, or `--step`) as flat `/`-joined keys, big_vision's layout, which
big_vision's own `load` functions and vitcls's `model_init` read unchanged; `savedmodel`
writes a TensorFlow SavedModel that takes uint8 RGB images of any size and returns class
probabilities, with the eval preprocessing inside, servable without vitcls or JAX.
`--output` replaces only its own kind (an npz; a SavedModel or an empty folder) and is
checked before the checkpoint is read.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

from absl import app, logging

from vitcls import flags, inspection
from vitcls.run import checkpoint
from vitcls.run import workdir as wdir
from vitcls.errors import UserError
from vitcls.models import loading

FLAGS = flags.FLAGS


def _define_flags() -> list[str]:
  """This CLI's flags (defined when it starts); their names."""
  return [
      *flags.define_checkpoint(),
      flags.define("string", "output", None, "FILE.npz, or a directory for savedmodel."),
      flags.define("enum", "format", "npz", "What to write.",
                   enum_values=["npz", "savedmodel"]),
  ]


def export_npz(workdir: str, output: str, step: int | None = None) -> str:
  """Writes the params of `workdir`'s checkpoint to `output` in big_vision's npz layout."""
  wdir.check_output(output, wdir.NPZ)
  params = checkpoint.load_params(workdir, step)
  loading.write_npz(output, params)
  return output


def export_savedmodel(workdir: str, output: str, step: int | None = None) -> str:
  """Writes a TF SavedModel of `workdir`'s checkpoint: uint8 RGB in, probabilities out."""
  from vitcls import serving  # pylint: disable=g-import-not-at-top
  wdir.check_output(output, serving.SAVEDMODEL)
  config, model, params = inspection.load_run(workdir, step)
  pp_spec, image_shape, label_names = inspection.serving_inputs(config)
  return serving.export_savedmodel(output, model=model, params=params, pp_spec=pp_spec,
                                   image_shape=image_shape, label_names=label_names)


_EXPORTERS = {"npz": export_npz, "savedmodel": export_savedmodel}


def main(argv) -> None:
  """absl entry point: exports `--workdir` as `--format` to `--output`; a user error exits 2."""
  del argv
  try:
    if not FLAGS.workdir or not FLAGS.output:
      raise UserError("both --workdir=DIR and --output=PATH are required")
    path = _EXPORTERS[FLAGS.format](FLAGS.workdir, FLAGS.output, FLAGS.step)
  except UserError as e:
    print(f"vitcls: error: {e}", file=sys.stderr)
    sys.exit(2)
  logging.info("Exported %s.", path)
  print(f"Exported {FLAGS.format} to {path}")


def run() -> None:
  """Entry point shared by `python -m vitcls.export` and `vitcls export`."""
  app.run(main, flags_parser=flags.parser(None, _define_flags()))


if __name__ == "__main__":
  run()
