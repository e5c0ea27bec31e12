"""What every benchmark shares: repeated timing, results as JSON, one summary row each.

A figure is the median of `repeats` timed runs after `warmup` untimed ones, with the
spread (min and max) beside it, because these machines are shared and noisy: only
ratios measured in one process, one after the other, are results; absolute img/s are
context. Each benchmark module `benchmarks/NAME.py` defines

    def run(tiny: bool) -> Result

and is also runnable alone (`python -m benchmarks.NAME [--tiny]`) through `main(run)`.
`tiny` shrinks every size so the test suite can smoke-test the module in seconds; tiny
figures mean nothing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable

from vitcls.run import workdir as wdir

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@dataclasses.dataclass
class Timing:
  """Seconds per call: the median of the timed repeats and their range."""
  median: float
  low: float
  high: float
  repeats: int

  def rate(self, items: float) -> dict[str, float]:
    """items per second at the median, with the range (low rate = slowest run)."""
    return {"median": items / self.median, "low": items / self.high,
            "high": items / self.low}

  def as_dict(self) -> dict[str, float]:
    """The timing as JSON fields (seconds), for a result's `figures`."""
    return dataclasses.asdict(self)


def time_it(fn: Callable[[], Any], *, repeats: int = 5, warmup: int = 1) -> Timing:
  """Times `fn()` (which must block until its work is done) `repeats` times."""
  for _ in range(warmup):
    fn()
  seconds = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    seconds.append(time.perf_counter() - start)
  return Timing(statistics.median(seconds), min(seconds), max(seconds), repeats)


@dataclasses.dataclass
class Row:
  """One line of the summary table: a headline figure and, where the issue set one, its goal."""
  benchmark: str
  figure: str
  value: float
  unit: str = ""
  spread: str = ""  # e.g. "0.95-0.99": the range over repeats.
  goal: str = ""  # e.g. ">= 0.97"; empty when the figure is informative only.
  met: bool | None = None


@dataclasses.dataclass
class Result:
  """What a benchmark measured: `figures` (anything JSON), and the rows it reports."""
  name: str
  figures: dict[str, Any]
  rows: list[Row]
  tiny: bool = False
  plots: list[str] = dataclasses.field(default_factory=list)

  def to_json(self) -> dict[str, Any]:
    """What `write` stores: figures and rows, with the machine they were measured on."""
    return {"name": self.name, "tiny": self.tiny, "machine": machine(),
            "figures": self.figures, "rows": [dataclasses.asdict(r) for r in self.rows],
            "plots": self.plots}


def ratio_row(benchmark: str, figure: str, value: float, goal: float | None = None,
              spread: str = "") -> Row:
  """A ratio row; `goal` is the smallest value that meets it."""
  return Row(benchmark, figure, value, "x", spread,
             f">= {goal:g}" if goal is not None else "",
             None if goal is None else value >= goal)


def machine() -> dict[str, Any]:
  """Where it ran: enough to tell two results apart, nothing identifying."""
  info = {"python": platform.python_version(), "cpus": os.cpu_count(),
          "processor": platform.processor() or platform.machine()}
  if "jax" in sys.modules:
    import jax  # pylint: disable=g-import-not-at-top
    info.update(jax=jax.__version__, backend=jax.default_backend(),
                devices=[d.device_kind for d in jax.devices()][:1],
                device_count=jax.device_count())
  return info


def write(result: Result, results_dir: str = RESULTS_DIR) -> str:
  """Writes `results_dir/NAME.json` (replacing the previous one) and returns its path."""
  os.makedirs(results_dir, exist_ok=True)
  path = os.path.join(results_dir, f"{result.name}{'_tiny' if result.tiny else ''}.json")
  wdir.atomic_write(path, json.dumps(result.to_json(), indent=2, default=float) + "\n")
  return path


def format_value(value: float) -> str:
  """A figure as the summary table shows it: about 3 significant digits, thousands split."""
  if value == 0 or 0.01 <= abs(value) < 100_000:
    return f"{value:.3g}" if abs(value) < 10 else f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.1f}"
  return f"{value:.3g}"


def table(rows: list[dict[str, Any]]) -> str:
  """The summary as a Markdown table (rows as written in the JSON files)."""
  lines = ["| benchmark | figure | value | spread | goal | met |",
           "| --- | --- | --- | --- | --- | --- |"]
  for r in rows:
    met = {True: "yes", False: "**no**", None: ""}[r.get("met")]
    value = format_value(r["value"]) + (f" {r['unit']}" if r.get("unit") else "")
    lines.append(f"| {r['benchmark']} | {r['figure']} | {value} | {r.get('spread', '')} | "
                 f"{r.get('goal', '')} | {met} |")
  return "\n".join(lines)


def main(run: Callable[[bool], Result]) -> None:
  """`python -m benchmarks.NAME [--tiny] [--results_dir=DIR]`: runs, writes, prints."""
  args = sys.argv[1:]
  tiny = "--tiny" in args
  results_dir = RESULTS_DIR
  for a in args:
    if a.startswith("--results_dir="):
      results_dir = a.split("=", 1)[1]
  result = run(tiny)
  result.tiny = tiny
  path = write(result, results_dir)
  print(table([dataclasses.asdict(r) for r in result.rows]))
  print(f"wrote {path}")
