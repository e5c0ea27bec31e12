"""The results of a sweep: one row per member from the members' workdirs, written as
`sweep.csv`, `sweep.md` and `sweep.png` in the sweep's folder.

The plot is drawn on a bare `matplotlib.figure.Figure`, never through pyplot, as the
training report's are: matplotlib's backend (a notebook's, say) stays as it was.
"""

from __future__ import annotations

import csv
import io
import math
import os
from typing import Any, Iterable, Mapping, Sequence

from matplotlib.figure import Figure

from vitcls.run import workdir as wdir
from vitcls.sweep import members as members_lib


def read_results(member_dir: str) -> tuple[dict[str, float], int]:
  """(the last value of each eval metric, the last training step) in a member's
  metrics.jsonl; eval metrics are the `<eval>/<name>` keys."""
  final, steps = {}, 0
  for row in wdir.read_metrics(member_dir):
    if "loss" in row:
      steps = max(steps, int(row.get("step", 0)))
    for key, value in row.items():
      if "/" in key:  # Keys keep the order they first appeared in.
        final[key] = value
  return final, steps


def pick_metric(results: Iterable[Mapping[str, float]], wanted: str | None) -> str | None:
  """`wanted`, else the first `*/top1` key found, else `*/map`, else any eval metric."""
  if wanted:
    return wanted
  keys = []
  for r in results:
    keys += [k for k in r if k not in keys]
  for suffix in ("/top1", "/map"):
    for k in keys:
      if k.endswith(suffix):
        return k
  return keys[0] if keys else None


def lower_is_better(metric: str) -> bool:
  """Whether `metric` is a loss, error, ECE or NLL, so the best member has the lowest."""
  return metric.rsplit("/", 1)[-1].endswith(("loss", "error", "ece", "nll"))


def format_duration(seconds: float | None) -> str:
  """Seconds as people read them ("42.0 s", "3 min 05 s", "2 h 07 min"); "" for None."""
  if seconds is None:
    return ""
  seconds = float(seconds)
  if seconds < 60:
    return f"{seconds:.1f} s"
  minutes, s = divmod(int(round(seconds)), 60)
  if minutes < 60:
    return f"{minutes} min {s:02d} s"
  return f"{minutes // 60} h {minutes % 60:02d} min"


def _status(info: dict, running: bool, steps: int, total: int | None, finished: bool) -> str:
  if running:
    return "running"
  if info.get("status") in ("done", "failed"):
    return info["status"]
  if not info:  # Not run by a local sweep (slurm): judged from the workdir.
    if finished and (total is None or steps >= total):
      return "done"
    if steps:
      return "running"
  return "pending"


def collect(workdir: str, members: Sequence[members_lib.Member], totals: Sequence[int | None],
            running: Iterable[str] = (), metric: str | None = None) -> dict:
  """The table of a sweep: one row per member, from the members' workdirs, with its value
  of every swept key (`Member.settings`: its own, or its config's where it sets none)."""
  running = set(running)
  rows = []
  for m, total in zip(members, totals):
    member_dir = os.path.join(workdir, m.name)
    info = members_lib.read_record(member_dir)
    final, steps = read_results(member_dir)
    finished = os.path.exists(os.path.join(wdir.report_dir(member_dir), wdir.REPORT_FILE))
    rows.append(dict(member=m, values=m.settings, metrics=final, steps=steps,
                     wall_time_s=info.get("wall_time_s"), attempts=info.get("attempts", 0),
                     status=_status(info, m.name in running, steps, total, finished)))
  main = pick_metric([r["metrics"] for r in rows], metric)
  names = []
  for r in rows:
    names += [k for k in r["metrics"] if k not in names]
  names = sorted(names)
  if main in names:
    names.remove(main)
    names.insert(0, main)
  return dict(rows=rows, keys=members_lib.swept_keys(members), metrics=names, main=main)


def _value_text(value: Any) -> str:
  return value if isinstance(value, str) else repr(value)


def _values(row: dict, keys: Sequence[str], missing: str) -> list[str]:
  """A row's swept values as text, `missing` where its config has no such key."""
  return [_value_text(row["values"][k]) if k in row["values"] else missing for k in keys]


def table_csv(table: dict) -> str:
  """`sweep.csv`: one row per member, its swept values, metrics (full precision), status."""
  out = io.StringIO()
  writer = csv.writer(out, lineterminator="\n")
  writer.writerow(["name", *table["keys"], *table["metrics"], "steps", "wall_time_s",
                   "status"])
  for r in table["rows"]:
    wall = r["wall_time_s"]
    writer.writerow([r["member"].name, *_values(r, table["keys"], ""),
                     *[repr(r["metrics"][k]) if k in r["metrics"] else ""
                       for k in table["metrics"]],
                     r["steps"], "" if wall is None else f"{wall:.1f}", r["status"]])
  return out.getvalue()


def _cell(text: str) -> str:
  return text.replace("|", "\\|").replace("\n", " ")


def table_markdown(table: dict, spec: str, common: Sequence[str]) -> str:
  """`sweep.md`: members per status, the best one by the main metric, then the table."""
  rows, main = table["rows"], table["main"]
  counts = {}
  for r in rows:
    counts[r["status"]] = counts.get(r["status"], 0) + 1
  lines = [f"# Sweep of `{spec}`", "",
           f"{len(rows)} members: " + ", ".join(
               f"{counts[s]} {s}" for s in ("done", "running", "failed", "pending")
               if s in counts) + "."]
  if common:
    lines.append("Every member: " + " ".join(f"`--config.{c}`" for c in common) + ".")
  scored = [r for r in rows if main in r["metrics"]]
  if scored:
    pick = min if lower_is_better(main) else max
    best = pick(scored, key=lambda r: r["metrics"][main])
    lines.append(f"Main metric `{main}`; best: `{best['member'].name}` with "
                 f"{best['metrics'][main]:.4f}.")
  header = ["name", *table["keys"], *table["metrics"], "steps", "wall time", "status"]
  lines += ["", "| " + " | ".join(_cell(h) for h in header) + " |",
            "|" + "---|" * len(header)]
  for r in rows:
    cells = [f"`{r['member'].name}`", *_values(r, table["keys"], "—"),
             *[f"{r['metrics'][k]:.4f}" if k in r["metrics"] else "" for k in table["metrics"]],
             str(r["steps"]), format_duration(r["wall_time_s"]), r["status"]]
    lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
  return "\n".join(lines) + "\n"


def _numeric(values: Sequence[Any]) -> bool:
  return all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
             for v in values)


def panel(table: dict, key: str) -> tuple[list, list, list]:
  """One panel of the plot: (x, y) of each member with a result and a value of `key`, and
  the values of `key` of all members in sweep order (the x axis). Both come from the
  members' settings, so a member that does not override `key` sits at its config's value
  (or is left out where its config has none), never at a name the axis lacks."""
  if key == "member":  # No swept key: one point per member, by name.
    every = [r["member"].name for r in table["rows"]]
    scored = [(r["member"].name, r) for r in table["rows"]]
  else:
    every = [r["values"][key] for r in table["rows"] if key in r["values"]]
    scored = [(r["values"][key], r) for r in table["rows"] if key in r["values"]]
  main = table["main"]
  points = [(x, r["metrics"][main]) for x, r in scored if main and main in r["metrics"]]
  return [x for x, _ in points], [y for _, y in points], every


def plot(table: dict, path: str) -> None:
  """The main metric against each swept value, one panel per swept key (PNG)."""
  keys, main = table["keys"] or ["member"], table["main"]
  fig = Figure(figsize=(4.2 * len(keys), 3.4))
  axes = fig.subplots(1, len(keys), squeeze=False)
  for ax, key in zip(axes[0], keys):
    xs, ys, every = panel(table, key)
    ax.set_xlabel(key)
    ax.set_ylabel(main or "no metric yet")
    ax.grid(alpha=0.3)
    if not xs:
      ax.text(0.5, 0.5, "no results yet", ha="center", va="center", transform=ax.transAxes)
      continue
    if _numeric(every):
      ax.plot(xs, ys, "o", alpha=0.8)
      if min(every) > 0 and max(every) / min(every) > 10:
        ax.set_xscale("log")
    else:  # Categorical, in the order of the sweep.
      labels = list(dict.fromkeys(_value_text(v) for v in every))
      ax.plot([labels.index(_value_text(x)) for x in xs], ys, "o", alpha=0.8)
      ax.set_xticks(range(len(labels)))
      ax.set_xticklabels(labels, rotation=30 if len(labels) > 3 else 0, ha="right"
                         if len(labels) > 3 else "center")
  fig.suptitle(f"{main or 'sweep'} per swept value")
  fig.tight_layout()
  with wdir.atomic_file(path, "wb") as f:
    fig.savefig(f, format="png", dpi=100)


def write_reports(workdir: str, table: dict, spec: str, common: Sequence[str]) -> None:
  """Rewrites `sweep.csv`, `sweep.md` and `sweep.png` in `workdir`, each atomically."""
  wdir.atomic_write(os.path.join(workdir, wdir.SWEEP_CSV), table_csv(table))
  wdir.atomic_write(os.path.join(workdir, wdir.SWEEP_MARKDOWN),
                    table_markdown(table, spec, common))
  plot(table, os.path.join(workdir, wdir.SWEEP_PLOT))
