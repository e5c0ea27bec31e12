"""Hyper-parameter sweeps: `get_sweep` helpers, and `python -m vitcls.sweep` to run one.

An experiment file may define `get_sweep(arg=None)` next to `get_config(arg=None)`
(`arg` is the same text after `:`); it returns a list of override dicts whose keys are
dotted config keys, one dict per run ("member"). The helpers here build such lists
(importing this package loads nothing heavy, since experiment files import it):

  sweep.product(lr=[1e-3, 3e-3], wd=[0.05, 0.1])           # 4 members, lr slowest
  sweep.product(sweep.zipped({"model.width": [64, 128], "model.mlp_dim": [256, 512]}),
                {"schedule.warmup_steps": [0, 100]})       # 2 x 2 members

`python -m vitcls.sweep` runs a sweep (see `vitcls.sweep.__main__`).

The parts: `builders` (product, zipped), `members` (get_sweep's list validated and
named), `table` (results table and plot), `local` and `slurm` (the runners), and
`__main__` (the command line).
"""

from __future__ import annotations

from vitcls.sweep.builders import SweepError, product, zipped

__all__ = ["SweepError", "product", "zipped"]
