"""Hyper-parameter sweeps: `get_sweep` helpers, and `python -m vitcls.sweep` to run one.

An experiment file may define `get_sweep(arg=None)` next to `get_config(arg=None)`
(`arg` is the same text after `:`); it returns a list of override dicts whose keys are
dotted config keys, one dict per run ("member"). The helpers below build such lists
(they import nothing heavy, since experiment files import this module):

  sweep.product(lr=[1e-3, 3e-3], wd=[0.05, 0.1])           # 4 members, lr slowest
  sweep.product(sweep.zipped({"model.width": [64, 128], "model.mlp_dim": [256, 512]}),
                {"schedule.warmup_steps": [0, 100]})       # 2 x 2 members

`python -m vitcls.sweep --config=experiments/NAME.py[:arg] --workdir=DIR` checks every
member's config first (a typo fails before anything runs), then trains each member in
`DIR/<member name>` (`python -m vitcls.train` subprocesses, `--parallel` at a time) or
writes one SLURM job array for them (`--launcher=slurm`). It keeps `DIR/sweep.csv`,
`DIR/sweep.md` and `DIR/sweep.png` current as members finish. Running the same command
again skips the members that are done and resumes the others from their checkpoints,
so a sweep survives being killed, a reboot or a failed member fixed in between.
`--config.KEY=VALUE` given to the sweep applies to every member, before its own values.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
import sys
from typing import Any, Iterable, Mapping, Sequence

from vitcls import configs
from vitcls.errors import UserError

MEMBER_FILE = "sweep_member.json"
LOG_FILE = "train.log"
_MAX_NAME = 80  # Longer member names are cut and get a hash suffix.


class SweepError(UserError):
  """A sweep definition or a sweep command line is wrong."""


# ---------------------------------------------------------------- building sweeps


def _as_members(part: Any, combine: str) -> list[dict]:
  """A list of override dicts from one argument of `product` / `zipped`: a list of dicts
  as it is, or a `{key: values}` dict combined over its keys with `combine`."""
  if isinstance(part, Mapping):
    axes = []
    for key, values in part.items():
      if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise SweepError(f"sweep values of '{key}' must be a list, got {values!r}: write "
                         f"{{'{key}': [{values!r}]}} for a single value")
      axes.append([{key: v} for v in values])
    return product(*axes) if combine == "product" else zipped(*axes)
  if isinstance(part, (str, bytes)) or not isinstance(part, Iterable):
    raise SweepError(f"a sweep part must be a list of override dicts or a "
                     f"{{key: [values]}} dict, got {part!r}")
  members = list(part)
  for m in members:
    if not isinstance(m, Mapping):
      raise SweepError(f"a sweep member must be a dict of overrides, got {m!r}")
  return [dict(m) for m in members]


def _merge(dicts: Sequence[Mapping]) -> dict:
  out = {}
  for d in dicts:
    for key, value in d.items():
      if key in out:
        raise SweepError(f"sweep key '{key}' is set by two parts of the same "
                         f"product/zipped: sweep each key in one place")
      out[key] = value
  return out


def product(*parts, **values) -> list[dict]:
  """All combinations of the parts, the first varying slowest (like nested for loops).

  Each part is a list of override dicts (e.g. the result of `zipped`) or a dict
  `{key: [values]}`, itself a product over its keys; keyword arguments are a last such
  part for keys without dots: `product(lr=[1e-3, 3e-3], wd=[0.05, 0.1])`.
  """
  if values:
    parts = parts + (values,)
  lists = [_as_members(p, "product") for p in parts]
  return [_merge(combo) for combo in itertools.product(*lists)]


def zipped(*parts, **values) -> list[dict]:
  """The parts taken together, member by member: all must have the same length.

  `zipped({"model.width": [64, 128], "model.mlp_dim": [256, 512]})` gives 2 members.
  """
  if values:
    parts = parts + (values,)
  lists = [_as_members(p, "zipped") for p in parts]
  lengths = sorted({len(l) for l in lists})
  if len(lengths) > 1:
    raise SweepError(f"zipped sweep parts must have the same length, got lengths "
                     f"{', '.join(str(len(l)) for l in lists)}: use product to combine "
                     f"them instead")
  return [_merge(combo) for combo in zip(*lists)]


# ---------------------------------------------------------------- members


def _plain(value: Any) -> Any:
  """NumPy scalars and arrays (e.g. from np.logspace) as Python numbers and lists."""
  return value.tolist() if hasattr(value, "tolist") and callable(value.tolist) else value


def to_text(value: Any, key: str = "") -> str:
  """The command-line text of an override value, which `configs.set_value` reads back."""
  value = _plain(value)
  if isinstance(value, str):
    return value
  if value is None or isinstance(value, (bool, int, float, list, tuple)):
    return repr(value)
  raise SweepError(f"sweep value {value!r} of '{key}' must be a str, number, bool, None, "
                   f"list or tuple")


def _slug(text: str) -> str:
  return re.sub(r"_+", "_", re.sub(r"[^A-Za-z0-9._=+-]", "_", text)).strip("_")


def _digest(texts: Sequence[str]) -> str:
  return hashlib.sha1("\n".join(texts).encode()).hexdigest()[:8]


def member_names(members: Sequence[Sequence[str]]) -> list[str]:
  """Readable, filesystem-safe, unique names from each member's `KEY=VALUE` overrides:
  `lr=0.001,wd=0.05`; cut with a hash suffix when long or when two would collide."""
  names = []
  for texts in members:
    name = ",".join(_slug(t) for t in texts) or "default"
    if len(name) > _MAX_NAME:
      name = name[:_MAX_NAME - 9].rstrip(",") + "-" + _digest(texts)
    names.append(name)
  for i, texts in enumerate(members):
    if names.count(names[i]) > 1:
      names[i] = names[i][:_MAX_NAME - 9] + "-" + _digest(texts)
  return names


class Member:
  """One run of a sweep: its overrides (values and their text) and its workdir name."""

  def __init__(self, index: int, values: dict, texts: list[str], name: str = ""):
    self.index, self.values, self.texts, self.name = index, values, texts, name

  def __repr__(self) -> str:
    return f"Member({self.index}, {self.name!r})"


def _same(a: Any, b: Any) -> bool:
  """Config values equal up to list/tuple and int/float differences."""
  if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
  if isinstance(a, Mapping) and isinstance(b, Mapping):
    return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
  return a == b


def _get(config, dotted: str) -> Any:
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node.to_dict() if isinstance(node, configs.ConfigDict) else node


def load_members(spec: str, common: Sequence[str] = ()) -> tuple[list[Member], list]:
  """The members of `spec`'s get_sweep and their resolved configs, all validated.

  `common` are `KEY=VALUE` overrides applied to every member before its own. Raises a
  one-line SweepError / ConfigError naming the member and the fix.
  """
  path, _, arg = spec.partition(":")
  module = configs.import_experiment(path)
  if not hasattr(module, "get_sweep"):
    raise SweepError(f"config file '{path}' has no get_sweep(arg=None) function: add one "
                     f"returning a list of override dicts, e.g. "
                     f"vitcls.sweep.product(lr=[1e-3, 3e-3])")
  raw = module.get_sweep(arg or None)
  if isinstance(raw, Mapping) or isinstance(raw, (str, bytes)) or raw is None:
    raise SweepError(f"get_sweep of '{path}' must return a list of override dicts, got "
                     f"{type(raw).__name__}")
  raw = list(raw)
  if not raw:
    raise SweepError(f"get_sweep of '{path}' returned no members: return at least one "
                     f"override dict")
  base = module.get_config(arg or None)
  configs.resolve(base, common)  # A bad common override is reported as it is.
  members, resolved, seen = [], [], {}
  for i, values in enumerate(raw):
    if not isinstance(values, Mapping):
      raise SweepError(f"sweep member {i + 1} of '{path}' must be a dict of overrides, "
                       f"got {values!r}")
    values = {k: _plain(v) for k, v in values.items()}
    texts = [f"{k}={to_text(v, k)}" for k, v in values.items()]
    where = f"sweep member {i + 1} of {len(raw)} ({','.join(texts) or 'no overrides'})"
    try:
      config = configs.resolve(base, [*common, *texts])
    except configs.ConfigError as e:
      raise configs.ConfigError(f"{where}: {e}") from e
    for key, value in values.items():
      got = _get(config, key)
      if not _same(got, value):
        raise SweepError(f"{where}: '{key}' became {got!r} instead of {value!r} through "
                         f"the command line: give it as a {type(got).__name__}")
    key = configs.to_json(config)
    if key in seen:
      raise SweepError(f"{where} gives the same config as sweep member {seen[key] + 1}: "
                       f"remove one of them from get_sweep")
    seen[key] = i
    members.append(Member(i, values, texts))
    resolved.append(config)
  for m, name in zip(members, member_names([m.texts for m in members])):
    m.name = name
  return members, resolved


def swept_keys(members: Sequence[Member]) -> list[str]:
  """Every key some member overrides, in first-seen order: the table's parameter columns."""
  keys = []
  for m in members:
    keys += [k for k in m.values if k not in keys]
  return keys


# ---------------------------------------------------------------- results


def read_member_file(member_dir: str) -> dict:
  """A member's `sweep_member.json` (status, attempts, wall time), or {} if unreadable."""
  try:
    with open(os.path.join(member_dir, MEMBER_FILE)) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def write_atomic(path: str, data: str | bytes) -> None:
  """Writes a file so readers see the old or the new content, never half of it."""
  tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.tmp")
  with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
    f.write(data)
  os.replace(tmp, path)


def read_results(member_dir: str) -> tuple[dict[str, float], int]:
  """(the last value of each eval metric, the last training step) in a member's
  metrics.jsonl; eval metrics are the `<eval>/<name>` keys. Tolerates a half line."""
  final, steps = {}, 0
  try:
    with open(os.path.join(member_dir, "metrics.jsonl")) as f:
      for line in f:
        try:
          row = json.loads(line)
        except ValueError:
          continue
        if "loss" in row:
          steps = max(steps, int(row.get("step", 0)))
        for key, value in row.items():
          if "/" in key:  # Keys keep the order they first appeared in.
            final[key] = value
  except OSError:
    pass
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


def collect(workdir: str, members: Sequence[Member], totals: Sequence[int | None],
            running: Iterable[str] = (), metric: str | None = None) -> dict:
  """The table of a sweep: one row per member, from the members' workdirs."""
  running = set(running)
  rows = []
  for m, total in zip(members, totals):
    member_dir = os.path.join(workdir, m.name)
    info = read_member_file(member_dir)
    final, steps = read_results(member_dir)
    finished = os.path.exists(os.path.join(member_dir, "report", "report.md"))
    rows.append(dict(member=m, metrics=final, steps=steps,
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
  return dict(rows=rows, keys=swept_keys(members), metrics=names, main=main)


def _value_text(value: Any) -> str:
  return value if isinstance(value, str) else repr(value)


def table_csv(table: dict) -> str:
  """`sweep.csv`: one row per member, its swept values, metrics (full precision), status."""
  import csv  # pylint: disable=g-import-not-at-top
  import io  # pylint: disable=g-import-not-at-top
  out = io.StringIO()
  writer = csv.writer(out, lineterminator="\n")
  writer.writerow(["name", *table["keys"], *table["metrics"], "steps", "wall_time_s",
                   "status"])
  for r in table["rows"]:
    values = r["member"].values
    wall = r["wall_time_s"]
    writer.writerow([r["member"].name,
                     *[_value_text(values[k]) if k in values else "" for k in table["keys"]],
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
    values = r["member"].values
    cells = [f"`{r['member'].name}`",
             *[_value_text(values[k]) if k in values else "" for k in table["keys"]],
             *[f"{r['metrics'][k]:.4f}" if k in r["metrics"] else "" for k in table["metrics"]],
             str(r["steps"]), format_duration(r["wall_time_s"]), r["status"]]
    lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
  return "\n".join(lines) + "\n"


def _numeric(values: Sequence[Any]) -> bool:
  return all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
             for v in values)


def plot(table: dict, path: str) -> None:
  """The main metric against each swept value, one panel per swept key (PNG)."""
  import io  # pylint: disable=g-import-not-at-top
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  keys, main = table["keys"] or ["member"], table["main"]
  fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
  for ax, key in zip(axes[0], keys):
    points = [(r["member"].values.get(key, r["member"].name) if key != "member"
               else r["member"].name, r["metrics"][main])
              for r in table["rows"] if main and main in r["metrics"]]
    every = [r["member"].values[key] for r in table["rows"] if key in r["member"].values]
    ax.set_xlabel(key)
    ax.set_ylabel(main or "no metric yet")
    ax.grid(alpha=0.3)
    if not points:
      ax.text(0.5, 0.5, "no results yet", ha="center", va="center", transform=ax.transAxes)
      continue
    xs, ys = zip(*points)
    if _numeric(every) and _numeric(xs):
      ax.plot(xs, ys, "o", alpha=0.8)
      if min(every) > 0 and max(every) / min(every) > 10:
        ax.set_xscale("log")
    else:  # Categorical, in the order of the sweep.
      labels = []
      for v in every or xs:
        if _value_text(v) not in labels:
          labels.append(_value_text(v))
      ax.plot([labels.index(_value_text(x)) for x in xs], ys, "o", alpha=0.8)
      ax.set_xticks(range(len(labels)))
      ax.set_xticklabels(labels, rotation=30 if len(labels) > 3 else 0, ha="right"
                         if len(labels) > 3 else "center")
  fig.suptitle(f"{main or 'sweep'} per swept value")
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=100)
  plt.close(fig)
  write_atomic(path, buffer.getvalue())


def write_reports(workdir: str, table: dict, spec: str, common: Sequence[str]) -> None:
  """Rewrites `sweep.csv`, `sweep.md` and `sweep.png` in `workdir`, each atomically."""
  write_atomic(os.path.join(workdir, "sweep.csv"), table_csv(table))
  write_atomic(os.path.join(workdir, "sweep.md"), table_markdown(table, spec, common))
  plot(table, os.path.join(workdir, "sweep.png"))


# ---------------------------------------------------------------- local runner


def _die_with_parent(parent: int):
  """preexec_fn: the child gets SIGKILL when the sweep dies (Linux), so a killed sweep
  leaves no training behind."""
  def preexec():
    try:
      import ctypes  # pylint: disable=g-import-not-at-top
      import signal  # pylint: disable=g-import-not-at-top
      libc = ctypes.CDLL(None, use_errno=True)
      libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
      return
    if os.getppid() != parent:  # The sweep died before prctl took effect.
      os._exit(1)
  return preexec


class _Stop(Exception):
  """SIGTERM / SIGINT reached the sweep."""


def _total_steps(config) -> int | None:
  if config.total_steps is not None:
    return int(config.total_steps)
  if config.total_examples is not None:
    return -(-int(config.total_examples) // int(config.input.batch_size))
  return None


def _lock(workdir: str):
  import fcntl  # pylint: disable=g-import-not-at-top
  handle = open(os.path.join(workdir, ".sweep.lock"), "a")
  try:
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    handle.close()
    raise SweepError(f"another sweep is running in {workdir}: wait for it to end (or stop "
                     f"it) before running this one there") from e
  return handle


_GPU_MEMORY_VARS = ("XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_PREALLOCATE",
                    "XLA_PYTHON_CLIENT_ALLOCATOR")


class LocalRunner:
  """Trains the members as `python -m vitcls.train` subprocesses, `parallel` at a time."""

  def __init__(self, spec: str, workdir: str, members: Sequence[Member], configs_,
               common: Sequence[str], parallel: int = 1, metric: str | None = None,
               out=None):
    self.spec, self.workdir, self.members = spec, workdir, list(members)
    self.common, self.parallel, self.metric = list(common), parallel, metric
    self.totals = [_total_steps(c) for c in configs_]
    self.out = out or sys.stdout
    self.trainer = [sys.executable, "-m", "vitcls.train"]  # + --config, --workdir, ...
    self.running: dict[str, tuple] = {}  # name -> (member, Popen, start, info, log)

  def say(self, text: str) -> None:
    """Prints one `[sweep]` progress line to `out`, flushed so logs read live keep up."""
    print(f"[sweep] {text}", file=self.out, flush=True)

  def _dir(self, m: Member) -> str:
    return os.path.join(self.workdir, m.name)

  def _record(self, m: Member, info: dict) -> None:
    write_atomic(os.path.join(self._dir(m), MEMBER_FILE),
                 json.dumps(info, indent=2, sort_keys=True) + "\n")

  def _refresh(self) -> dict:
    table = collect(self.workdir, self.members, self.totals, self.running, self.metric)
    write_reports(self.workdir, table, self.spec, self.common)
    return table

  def _start(self, m: Member) -> None:
    import subprocess  # pylint: disable=g-import-not-at-top
    import time  # pylint: disable=g-import-not-at-top
    directory = self._dir(m)
    os.makedirs(directory, exist_ok=True)
    info = read_member_file(directory)
    info.update(name=m.name, overrides=m.values, command_overrides=self.common + m.texts,
                status="running", returncode=None, attempts=info.get("attempts", 0) + 1,
                wall_time_s=info.get("wall_time_s", 0.0))
    argv = [*self.trainer, f"--config={self.spec}",
            f"--workdir={directory}", *[f"--config.{o}" for o in self.common + m.texts]]
    log = open(os.path.join(directory, LOG_FILE), "ab")
    log.write((f"==== vitcls.sweep: attempt {info['attempts']}, "
               f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(argv)}\n").encode())
    log.flush()
    env = dict(os.environ)
    if self.parallel > 1 and not any(k in env for k in _GPU_MEMORY_VARS):
      # jax takes 75% of each GPU's memory up front: members sharing GPUs split it.
      env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{0.9 / self.parallel:.3f}"
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, env=env,
                            preexec_fn=_die_with_parent(os.getpid())
                            if sys.platform.startswith("linux") else None)
    info["pid"] = proc.pid
    self._record(m, info)
    self.running[m.name] = (m, proc, time.monotonic(), info, log)
    self.say(f"start {m.name} (member {m.index + 1} of {len(self.members)}, attempt "
             f"{info['attempts']}): log in {os.path.join(directory, LOG_FILE)}")

  def _finish(self, name: str, returncode: int | None, left: int) -> None:
    import time  # pylint: disable=g-import-not-at-top
    m, _, start, info, log = self.running.pop(name)
    log.close()
    elapsed = time.monotonic() - start
    info.update(wall_time_s=round(info["wall_time_s"] + elapsed, 3), returncode=returncode,
                pid=None,
                status="done" if returncode == 0 else
                "failed" if returncode is not None else "interrupted")
    self._record(m, info)
    table = self._refresh()
    if returncode is None:
      self.say(f"stopped {m.name} after {format_duration(elapsed)}")
      return
    if returncode == 0:
      main = table["main"]
      score = next((r["metrics"].get(main) for r in table["rows"] if r["member"] is m), None)
      result = f"{main}={score:.4f}, " if score is not None else ""
      self.say(f"done {m.name}: {result}{format_duration(elapsed)}; {left} left")
    else:
      self.say(f"FAILED {m.name} (exit code {returncode}) after "
               f"{format_duration(elapsed)}: see {os.path.join(self._dir(m), LOG_FILE)}; "
               f"{left} left")

  def _note_times(self) -> None:
    import time  # pylint: disable=g-import-not-at-top
    for m, _, start, info, _ in self.running.values():
      self._record(m, {**info, "wall_time_s": round(
          info["wall_time_s"] + time.monotonic() - start, 3)})

  def _stop_all(self) -> None:
    import signal  # pylint: disable=g-import-not-at-top
    import subprocess  # pylint: disable=g-import-not-at-top
    for _, proc, *_ in self.running.values():
      if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    for name, (_, proc, *_) in list(self.running.items()):
      try:
        proc.wait(timeout=30)
      except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
      self._finish(name, None, 0)

  def run(self) -> int:
    """Trains every member not yet done (a rerun resumes the sweep); returns the exit status.

    0 when all are done, 1 when any failed, 128 + the signal number when interrupted.
    """
    import signal  # pylint: disable=g-import-not-at-top
    import time  # pylint: disable=g-import-not-at-top
    os.makedirs(self.workdir, exist_ok=True)
    lock = _lock(self.workdir)
    todo = []
    for m in self.members:
      info = read_member_file(self._dir(m))
      if info.get("status") == "done":
        if info.get("command_overrides") != self.common + m.texts:
          self.say(f"note: {m.name} finished with other overrides "
                   f"({' '.join(info.get('command_overrides') or [])}); it is kept: delete "
                   f"{self._dir(m)} to train it again")
        continue
      todo.append(m)
    done = len(self.members) - len(todo)
    self.say(f"{len(self.members)} members in {self.workdir}: {done} already done, "
             f"{len(todo)} to run, {self.parallel} at a time")

    def stop(signum, frame):
      del frame
      raise _Stop(signum)
    import threading  # pylint: disable=g-import-not-at-top
    previous = ({s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
                if threading.current_thread() is threading.main_thread() else {})
    try:
      self._refresh()
      last_note = time.monotonic()
      while todo or self.running:
        while todo and len(self.running) < self.parallel:
          self._start(todo.pop(0))
        time.sleep(0.1)
        if time.monotonic() - last_note > 15:  # A killed sweep keeps most of the time.
          last_note = time.monotonic()
          self._note_times()
        for name, (_, proc, *_) in list(self.running.items()):
          returncode = proc.poll()
          if returncode is not None:
            self._finish(name, returncode, len(todo) + len(self.running) - 1)
    except _Stop as e:
      signal.signal(signal.SIGINT, signal.SIG_IGN)
      signal.signal(signal.SIGTERM, signal.SIG_IGN)
      self.say("interrupted: stopping the running members")
      self._stop_all()
      print("vitcls: sweep interrupted: run the same command again to resume it",
            file=sys.stderr)
      return 128 + int(e.args[0])
    finally:
      for s, handler in previous.items():
        signal.signal(s, handler)
      lock.close()

    table = collect(self.workdir, self.members, self.totals, (), self.metric)
    failed = [r["member"] for r in table["rows"] if r["status"] != "done"]
    self.say(f"finished: {len(self.members) - len(failed)} of {len(self.members)} done; "
             f"table in {os.path.join(self.workdir, 'sweep.md')}")
    if table["main"] and not any(table["main"] in r["metrics"] for r in table["rows"]):
      self.say(f"note: no member logged the metric '{table['main']}'; known ones: "
               f"{', '.join(table['metrics']) or 'none'}")
    if failed:
      print(f"vitcls: error: {len(failed)} of {len(self.members)} sweep members failed: "
            + ", ".join(f"{m.name} (see {os.path.join(self._dir(m), LOG_FILE)})"
                        for m in failed)
            + ": fix the cause and run the same command again to retry them",
            file=sys.stderr)
      return 1
    return 0


# ---------------------------------------------------------------- SLURM


def slurm_script(spec: str, workdir: str, members: Sequence[Member], common: Sequence[str],
                 slurm, python: str | None = None, max_parallel: int | None = None,
                 job_name: str | None = None) -> str:
  """One SLURM job array: task i trains member i, on `slurm.nodes` nodes."""
  import shlex  # pylint: disable=g-import-not-at-top
  from vitcls import launch  # pylint: disable=g-import-not-at-top
  workdir = os.path.abspath(workdir)
  path, sep, arg = spec.partition(":")
  spec = os.path.abspath(path) + sep + arg
  array = f"0-{len(members) - 1}" + (f"%{max_parallel}" if max_parallel else "")
  head = [python or sys.executable, "-m", "vitcls.train", "--distributed", f"--config={spec}"]
  body = ["# Task i trains member i: its workdir name and its overrides (shell words).",
          "NAMES=("]
  body += [f"  {shlex.quote(m.name)}" for m in members]
  body += [")", "OVERRIDES=("]
  body += [f"  {shlex.quote(shlex.join('--config.' + t for t in m.texts))}"
           for m in members]
  body += [")",
           'i="${SLURM_ARRAY_TASK_ID:?submit this script with sbatch}"',
           'eval "member_overrides=(${OVERRIDES[$i]})"',
           f"SWEEP_DIR={shlex.quote(workdir)}",
           # The sweep's own overrides, then the member's (empty-array safe on old bash).
           "srun --kill-on-bad-exit=1 " + shlex.join(head)
           + ' --workdir="$SWEEP_DIR/${NAMES[$i]}"'
           + "".join(" " + shlex.quote(f"--config.{o}") for o in common)
           + ' ${member_overrides[@]+"${member_overrides[@]}"}']
  return launch.sbatch_script(
      job_name=job_name or launch.default_job_name(spec, "sweep-"), slurm=slurm,
      array=array, log_file=os.path.join(workdir, "slurm", "%x-%A_%a.out"),
      comment=[f"vitcls sweep of {spec}: {len(members)} members, one array task each.",
               "Submit with sbatch; resubmitting resumes every member from its checkpoint."],
      body=body)


# ---------------------------------------------------------------- command line


KEY_FLAGS = ("config", "workdir", "launcher", "parallel", "metric", "collect", "nodes",
             "gpus_per_node", "cpus_per_task", "time", "partition", "account", "job_name",
             "sbatch_args", "python", "max_parallel")


def _define_flags() -> None:
  from vitcls import launch  # pylint: disable=g-import-not-at-top
  launch.define_common_flags()
  launch.define_slurm_flags()
  define = launch.define_flag
  define("integer", "parallel", 1, "local: members trained at the same time.")
  define("string", "metric", None, "Main metric of the table and plot; default: the first "
         "*/top1, else */map, else the first eval metric.")
  define("integer", "max_parallel", None, "slurm: array tasks running at the same time.")
  define("bool", "collect", False, "Only write the table and plot from the members' "
         "workdirs (e.g. after a SLURM sweep); run nothing.")


def sweep(overrides: Sequence[str]) -> int:
  """The CLI body, with flags parsed; returns the exit status."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from vitcls import launch  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  if not f.config or not f.workdir:
    raise SweepError("both --config=experiments/NAME.py and --workdir=DIR are required")
  launcher = f.launcher or "local"
  if launcher not in ("local", "slurm"):
    raise SweepError(f"got --launcher={launcher}: a sweep runs with --launcher=local "
                     f"(here) or --launcher=slurm (an sbatch job array)")
  if f.parallel < 1:
    raise SweepError(f"--parallel must be at least 1, got {f.parallel}")
  slurm = launch.Slurm.from_flags() if launcher == "slurm" and not f.collect else None
  if slurm:
    slurm.check()
  members, resolved = load_members(f.config, overrides)
  for key in swept_keys(members):
    if any(o.partition("=")[0] == key for o in overrides):
      print(f"[sweep] note: --config.{key} is replaced by each member's own {key}",
            flush=True)
  if f.collect:
    os.makedirs(f.workdir, exist_ok=True)
    table = collect(f.workdir, members, [_total_steps(c) for c in resolved], (), f.metric)
    write_reports(f.workdir, table, f.config, overrides)
    print(f"Wrote {os.path.join(f.workdir, 'sweep.md')}, sweep.csv and sweep.png")
    return 0
  if slurm:
    if f.max_parallel is not None and f.max_parallel < 1:
      raise SweepError(f"--max_parallel must be at least 1, got {f.max_parallel}")
    text = slurm_script(f.config, f.workdir, members, overrides, slurm, python=f.python,
                        max_parallel=f.max_parallel, job_name=f.job_name)
    os.makedirs(os.path.join(f.workdir, "slurm"), exist_ok=True)
    path = os.path.join(f.workdir, "sweep.sbatch")
    launch.write_file(path, text)
    import shlex  # pylint: disable=g-import-not-at-top
    print(f"Wrote {path}: a job array of {len(members)} members x {slurm.nodes} node(s) "
          f"x {slurm.gpus_per_node} GPU(s). Submit it with:")
    print(f"sbatch {shlex.quote(path)}")
    collect_argv = [sys.executable, "-m", "vitcls.sweep", f"--config={f.config}",
                    f"--workdir={f.workdir}", *[f"--config.{o}" for o in overrides],
                    "--collect"]
    print(f"When the tasks end, write the table with:\n{shlex.join(collect_argv)}")
    return 0
  return LocalRunner(f.config, f.workdir, members, resolved, overrides, f.parallel,
                     f.metric).run()


def _execute(rest: Sequence[str], overrides: Sequence[str]) -> int:
  try:
    if len(rest) > 1:
      raise SweepError(f"unexpected argument(s) {' '.join(rest[1:])}: flags look like "
                       f"--name=value")
    return sweep(overrides)
  except UserError as e:
    print(f"vitcls: error: {e}", file=sys.stderr)
    return 2


def main(argv: Sequence[str]) -> int:
  """Runs the CLI in-process on `argv` (program name first); returns the exit status."""
  from vitcls import launch  # pylint: disable=g-import-not-at-top
  _define_flags()
  try:
    rest, overrides = launch.parse(argv)
  except UserError as e:
    print(f"vitcls: error: {e}", file=sys.stderr)
    return 2
  return _execute(rest, overrides)


_OVERRIDES: list[str] = []


def run(argv: Sequence[str] | None = None) -> None:
  """Entry point shared by `python -m vitcls.sweep` and `vitcls sweep`."""
  from absl import app  # pylint: disable=g-import-not-at-top
  from vitcls import launch  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(lambda rest: _execute(rest, _OVERRIDES), argv=argv,
          flags_parser=launch.flags_parser(_OVERRIDES, KEY_FLAGS))


if __name__ == "__main__":
  run()
