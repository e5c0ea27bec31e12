"""`make bench`: every benchmark, each in its own process, then one summary table.

    python -m benchmarks.run [--only=mfu,pipeline] [--tiny] [--results_dir=DIR]

Each benchmark runs as `python -m benchmarks.NAME` (a fresh process: its own XLA flags,
thread pools and memory, nothing left over from the one before), writes
`results/NAME.json`, and contributes rows to the table printed at the end;
`results/summary.md` holds the latest result of every benchmark (with `--only`, the
others' rows come from their earlier JSON). A benchmark that fails is reported in the table and the others
still run; the exit code is 1 if any failed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from benchmarks import common

# In the order they run (cheap and most telling first).
BENCHMARKS = ("loop_overhead", "mfu", "pipeline", "first_step", "predict",
              "checkpoint_cost", "distill_cost", "vs_timm", "scaling")


def _arg(args: list[str], name: str, default: str | None = None) -> str | None:
  for a in args:
    if a.startswith(f"--{name}="):
      return a.split("=", 1)[1]
  return default


def write_summary(results_dir: str, tiny: bool, failed_rows=()) -> str:
  """`results/summary.md`: the latest result of every benchmark (its JSON), whichever run
  wrote it; `failed_rows` stand in for benchmarks that just failed. Returns the path."""
  failed = {r["benchmark"] for r in failed_rows}
  latest = []
  for name in BENCHMARKS:
    path = os.path.join(results_dir, f"{name}{'_tiny' if tiny else ''}.json")
    if name in failed:
      latest += [r for r in failed_rows if r["benchmark"] == name]
    elif os.path.exists(path):
      with open(path) as f:
        latest.extend(json.load(f)["rows"])
  out = os.path.join(results_dir, f"summary{'_tiny' if tiny else ''}.md")
  with open(out, "w") as f:
    f.write(common.table(latest) + "\n")
  return out


def main(args: list[str]) -> int:
  """Runs `--only` (default: all) benchmarks in fresh processes, prints the summary; exit status."""
  only = _arg(args, "only")
  names = BENCHMARKS if not only else tuple(only.split(","))
  unknown = sorted(set(names) - set(BENCHMARKS))
  if unknown:
    print(f"unknown benchmark(s) {', '.join(unknown)}: choose from {', '.join(BENCHMARKS)}",
          file=sys.stderr)
    return 2
  tiny = "--tiny" in args
  results_dir = _arg(args, "results_dir", common.RESULTS_DIR)
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  rows, failed = [], []
  for i, name in enumerate(names, 1):
    print(f"[{i}/{len(names)}] {name} ...", flush=True)
    start = time.perf_counter()
    command = [sys.executable, "-m", f"benchmarks.{name}", f"--results_dir={results_dir}"]
    proc = subprocess.run(command + (["--tiny"] if tiny else []), cwd=repo)
    seconds = time.perf_counter() - start
    path = os.path.join(results_dir, f"{name}{'_tiny' if tiny else ''}.json")
    if proc.returncode != 0 or not os.path.exists(path):
      failed.append(name)
      rows.append({"benchmark": name, "figure": f"FAILED (exit {proc.returncode})",
                   "value": float("nan")})
      continue
    print(f"[{i}/{len(names)}] {name} done in {seconds:.0f} s", flush=True)
    with open(path) as f:
      rows.extend(json.load(f)["rows"])
  print("\n" + common.table(rows))
  write_summary(results_dir, tiny, [r for r in rows if r["benchmark"] in failed])
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
