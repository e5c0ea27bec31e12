"""Time to first step: launch -> first completed train step, cold and warm cache.

    python -m benchmarks.first_step [--tiny]

Each launch is a fresh Python process (imports are part of what a user waits for). A
child (`--child`) does what `python -m vitcls.train` does up to its first step, in the
same order, and reports when each phase ended (absolute clock; the parent notes the
spawn time):
  python   interpreter start-up, up to this module's first line;
  imports  absl + vitcls.configs/validate, then jax and everything `vitcls.run.loop` pulls in;
  config   loading, resolving and checking the experiment;
  backend  the first device query (XLA client start-up);
  build    `build.build`: opens the data source, builds model and optimiser, traces shapes;
  init     the initialiser compiled and run;
  data     what the loop opens before its first step (checkpoint manager, evaluators,
           metric files; clu's writers are imported in the background after it), and
           the first batch through the input pipeline, on device;
  trace / lower / compile   the train step's jaxpr, StableHLO and executable (a warm
           cache still traces and lowers: the cache key is a hash of the lowered module);
  step     the first step's execution.
The step is called as the loop calls it; JAX's own compile events split that call into
its last four phases.
The child also lists, per jitted function, JAX's own trace/lower/compile seconds and
whether its executable came from the persistent cache (`jax` in the figures): where
warm time still goes.

Each repeat uses a new empty cache directory ($JAX_COMPILATION_CACHE_DIR, which the CLI
honours): a cold launch fills it, the next launch (warm) reads it. JAX's defaults stay
as users get them (only programs that took 1 s or more to compile are stored). Models: the default experiment and a ViT-B/16 at 224 px on mnist5k
(batch 8; resized, grey repeated to 3 channels). For the default experiment the real CLI
is also timed from launch to exit (`--config.total_steps=1`: one step, the final eval,
checkpoint and report), cold and warm.
"""

from __future__ import annotations

import time

_MODULE_START = time.time()  # Before any other import: where the child's `python` ends.

# pylint: disable=g-import-not-at-top,wrong-import-position
import dataclasses
import json
import logging
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from typing import ClassVar

from benchmarks import common

NAME = "first_step"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = "experiments/mnist5k_vit.py"
_PREFIX = "FIRST_STEP_JSON "
# Phases in the order the child ends them; `imports` ends twice (light, then heavy).
PHASES = ("python", "imports", "config", "backend", "build", "init", "data", "trace",
          "lower", "compile", "step")
GROUPS = {"startup": ("python", "imports", "config", "backend"),
          "data_and_build": ("build", "data"),
          "compilation": ("init", "trace", "lower", "compile"),
          "step": ("step",)}


@dataclasses.dataclass(frozen=True)
class Model:
  """One experiment as launched: config spec, overrides, repeats of (cold, warm)."""
  name: str
  spec: str
  overrides: tuple[str, ...] = ()
  repeats: int = 1
  cli_repeats: int = 0  # Also time the real CLI, launch to exit, this many times.


def _vit_b16(image: int, width: int, depth: int, mlp: int, heads: int, patch: int,
             batch: int) -> tuple[str, ...]:
  """mnist5k fed to a ViT-B/16-shaped model: resized, grey repeated to RGB."""
  pp = f"resize({image})|to_rgb|value_range(-1,1)|onehot(10)"
  return (f"model.width={width}", f"model.depth={depth}", f"model.mlp_dim={mlp}",
          f"model.num_heads={heads}", f"model.patch_size={patch}", "model.pool_type=tok",
          f"input.pp={pp}", f"input.batch_size={batch}", f"evals.test.pp={pp}")


def models(tiny: bool) -> list[Model]:
  """The launched models: the default experiment (with the CLI timed) and ViT-B/16."""
  from vitcls import configs
  # 4,000 images at 224 px would take 2.4 GB on the device: ViT-B/16 streams them.
  big = ("input.on_device=False",) if "on_device" in configs.defaults().input else ()
  if tiny:
    return [Model("default", DEFAULT + ":runlocal=True", cli_repeats=1),
            Model("vit_b16", DEFAULT + ":runlocal=True",
                  _vit_b16(32, 32, 1, 64, 2, 16, 8) + big)]
  # Repeats fit the whole in about 5 minutes on 2 cores (a ViT-B/16 pair takes 2).
  return [Model("default", DEFAULT, repeats=3, cli_repeats=1),
          Model("vit_b16", DEFAULT, _vit_b16(224, 768, 12, 3072, 12, 16, 8) + big)]


# ---------------------------------------------------------------------------------------
# The child: one launch up to its first step.


def _short(name: str) -> str:
  """Events name `f` or `jit(f)`, log lines the module `jit_f`: all become `f`."""
  return re.sub(r"^jit_", "", re.sub(r"^jit\((.*)\)$", r"\1", name))


class _JaxEvents(logging.Handler):
  """Collects JAX's per-function compile events and persistent-cache verdicts."""
  _EVENTS: ClassVar[dict[str, str]] = {"/jax/core/compile/jaxpr_trace_duration": "trace",
             "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
             "/jax/core/compile/backend_compile_duration": "compile"}
  _VERDICTS = (("cache hit for '", "hit"), ("CACHE MISS for '", "miss"),
               ("Not writing persistent cache entry for '", "miss, not written"))

  def __init__(self):
    super().__init__(logging.DEBUG)
    self.functions: dict[str, dict] = {}
    self.log: list[tuple[str, float, str]] = []  # (phase, seconds, function), in order.

  def _entry(self, name: str) -> dict:
    return self.functions.setdefault(_short(name),
                                     {"trace": 0.0, "lower": 0.0, "compile": 0.0})

  def duration(self, event: str, seconds: float, **kw) -> None:
    if event in self._EVENTS:
      name = str(kw.get("fun_name", "?"))
      self._entry(name)[self._EVENTS[event]] += seconds
      self.log.append((self._EVENTS[event], seconds, name))

  def split(self, start: int, seconds: float) -> tuple[str, list[tuple[str, float]]]:
    """How the first call of a jitted function spent `seconds`, from events since
    `start`: its name (that of the outermost, i.e. longest, trace: nested jits trace
    inside it), its trace, lower and compile, and the rest (`step`: dispatch and
    execution; the input pipeline's threads may compile small programs meanwhile)."""
    log = self.log[start:]
    traces = [(t, name) for kind, t, name in log if kind == "trace"] or [(0.0, "?")]
    trace, name = max(traces)
    mine = [(kind, t) for kind, t, n in log if _short(n) == _short(name)]
    lower = sum(t for kind, t in mine if kind == "lower")
    compile_ = sum(t for kind, t in mine if kind == "compile")
    parts, left = [], seconds
    for kind, t in (("trace", trace), ("lower", lower), ("compile", compile_)):
      parts.append((kind, min(t, left)))
      left -= parts[-1][1]
    return _short(name), parts + [("step", left)]

  def emit(self, record: logging.LogRecord) -> None:
    message = record.getMessage()
    for marker, verdict in self._VERDICTS:
      if marker in message:
        self._entry(message.split(marker, 1)[1].split("'", 1)[0])["cache"] = verdict

  def install(self) -> None:
    import jax
    jax.monitoring.register_event_duration_secs_listener(self.duration)
    logger = logging.getLogger("jax._src.compiler")
    logger.setLevel(logging.DEBUG)
    logger.propagate = False  # Debug lines collected here, not printed.
    logger.addHandler(self)


def child(argv: list[str]) -> dict:
  """Runs like `vitcls.train` up to the first completed step; returns the phase clock."""
  spawn = float(_flag(argv, "spawn"))
  marks = [("python", _MODULE_START)]
  mark = lambda name: marks.append((name, time.time()))  # noqa: E731
  # What `vitcls.train` imports before it reads the config.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
  from absl import logging as absl_logging  # noqa: F401  pylint: disable=unused-import
  from vitcls import configs, validate
  mark("imports")
  spec = _flag(argv, "config")
  overrides = [a.split("--config.", 1)[1] for a in argv if a.startswith("--config.")]
  config = configs.resolve(configs.load_experiment(spec), overrides)
  validate.check(config, process_count=1)
  mark("config")
  import jax  # The cache directory comes from $JAX_COMPILATION_CACHE_DIR, as in the CLI.
  events = _JaxEvents()
  events.install()
  from vitcls.run import build, loop  # noqa: F401  pylint: disable=unused-import
  mark("imports")
  validate.check(config, num_devices=jax.device_count(), process_count=jax.process_count())
  mark("backend")
  run = build.build(config)
  mark("build")
  state = jax.block_until_ready(run.init_state())
  mark("init")
  from vitcls.run import checkpoint, evaluation, writers  # pylint: disable=g-import-not-at-top
  workdir = tempfile.mkdtemp(prefix="first-step-")
  ckpt = checkpoint.Checkpointer(workdir, keep=config.keep_checkpoints,
                                 asynchronous=config.async_checkpoints)
  ckpt.restore_latest(run.abstract_state)
  evaluation.Evaluations(config, workdir, model=run.model, mesh=run.mesh,
                         batch_sharding=run.batch_sharding)
  writers.DeferredWriter(workdir, None, run.total_steps, config.log_every)
  batch = jax.block_until_ready(next(run.batches(0)))
  mark("data")
  start, first = time.time(), len(events.log)
  state, metrics = run.train_step(state, batch)  # As the loop calls it.
  jax.block_until_ready((state, metrics))
  step_function, parts = events.split(first, time.time() - start)
  for name, seconds in parts:
    start += seconds
    marks.append((name, start))
  return {"spawn": spawn, "marks": marks, "phases": phases(spawn, marks),
          "step_function": step_function,
          "first_step_s": marks[-1][1] - spawn, "jax": events.functions,
          "cache_dir": jax.config.jax_compilation_cache_dir}


def phases(spawn: float, marks: list[tuple[str, float]]) -> dict[str, float]:
  """Seconds per phase from consecutive marks (a name marked twice adds up)."""
  out = dict.fromkeys(PHASES, 0.0)
  before = spawn
  for name, when in marks:
    out[name] += when - before
    before = when
  return out


def _flag(argv: list[str], name: str) -> str:
  for a in argv:
    if a.startswith(f"--{name}="):
      return a.split("=", 1)[1]
  raise SystemExit(f"first_step --child: --{name}= is required")


# ---------------------------------------------------------------------------------------
# The parent: launches, cold then warm, and what they add up to.


def _env(cache_dir: str, extra: dict[str, str] | None) -> dict[str, str]:
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache_dir, TF_CPP_MIN_LOG_LEVEL="2")
  env.update(extra or {})
  return env


def launch_child(model: Model, cache_dir: str, env: dict[str, str] | None = None,
                 timeout: float = 900) -> dict:
  """One fresh child process; its phase clock plus the parent's launch-to-exit time."""
  command = [sys.executable, "-m", "benchmarks.first_step", "--child",
             f"--config={model.spec}", *[f"--config.{o}" for o in model.overrides]]
  spawn = time.time()
  proc = subprocess.run(command + [f"--spawn={spawn!r}"], cwd=REPO,
                        env=_env(cache_dir, env), capture_output=True, text=True,
                        timeout=timeout)
  exit_s = time.time() - spawn
  lines = [l for l in proc.stdout.splitlines() if l.startswith(_PREFIX)]
  if proc.returncode != 0 or not lines:
    raise RuntimeError(f"first_step child for {model.name} failed "
                       f"(exit {proc.returncode}):\n{proc.stderr[-3000:]}")
  result = json.loads(lines[-1][len(_PREFIX):])
  result["exit_s"] = exit_s
  return result


def launch_cli(model: Model, cache_dir: str, workdir: str,
               env: dict[str, str] | None = None, timeout: float = 900) -> float:
  """`python -m vitcls.train ... --config.total_steps=1`: seconds from launch to exit."""
  command = [sys.executable, "-m", "vitcls.train", f"--config={model.spec}",
             f"--workdir={workdir}", "--config.total_steps=1",
             "--config.schedule.warmup_steps=0",
             *[f"--config.{o}" for o in model.overrides]]
  start = time.time()
  proc = subprocess.run(command, cwd=REPO, env=_env(cache_dir, env), capture_output=True,
                        text=True, timeout=timeout)
  seconds = time.time() - start
  if proc.returncode != 0:
    raise RuntimeError(f"vitcls.train for {model.name} failed (exit {proc.returncode}):\n"
                       f"{proc.stderr[-3000:]}")
  return seconds


def _cache_entries(cache_dir: str) -> int:
  return sum(len(files) for _, _, files in os.walk(cache_dir))


def _spread(values: list[float], digits: int = 2) -> str:
  return f"{min(values):.{digits}f}-{max(values):.{digits}f}"


def _grouped(p: dict[str, float]) -> dict[str, float]:
  return {g: sum(p[n] for n in names) for g, names in GROUPS.items()}


def summarize(name: str, cold: list[float], warm: list[float], goal: float | None,
              what: str = "s to first step") -> tuple[dict, list[common.Row]]:
  """Rows for paired (cold_i, warm_i) launches: medians, and the median of the speedups."""
  speedups = [c / w for c, w in zip(cold, warm)]
  figures = {"cold_s": cold, "warm_s": warm, "speedup": speedups,
             "cold_median_s": statistics.median(cold),
             "warm_median_s": statistics.median(warm),
             "speedup_median": statistics.median(speedups)}
  rows = [common.Row(NAME, f"{name}: cold {what}", figures["cold_median_s"], "s",
                     _spread(cold)),
          common.Row(NAME, f"{name}: warm {what}", figures["warm_median_s"], "s",
                     _spread(warm)),
          common.ratio_row(NAME, f"{name}: warm-cache speedup (cold/warm)",
                           figures["speedup_median"], goal, _spread(speedups))]
  return figures, rows


def _median_phases(results: list[dict]) -> dict[str, float]:
  return {p: statistics.median(r["phases"][p] for r in results) for p in PHASES}


def _prepare_data(model: Model) -> None:
  """Prepares the embedded dataset now, so no launch counts its one-time preparation."""
  from vitcls import configs
  from vitcls.data import sources
  config = configs.resolve(configs.load_experiment(model.spec), list(model.overrides))
  sources.get_source(config.input.data.name, config.input.data.split,
                     config.input.data_dir or None)


def run(tiny: bool) -> common.Result:
  """Cold then warm launches of every model, each repeat in a new cache directory."""
  todo = models(tiny)
  for m in todo:
    _prepare_data(m)
  root = tempfile.mkdtemp(prefix="vitcls-first-step-")
  figures: dict = {"groups": {g: list(p) for g, p in GROUPS.items()},
                   "load_average": {"start": os.getloadavg()}}  # Others' work meanwhile.
  rows: list[common.Row] = []
  try:
    for m in todo:
      colds, warms, entries = [], [], []
      for r in range(m.repeats):
        cache = os.path.join(root, f"{m.name}-cache-{r}")
        colds.append(launch_child(m, cache))
        entries.append(_cache_entries(cache))
        warms.append(launch_child(m, cache))
        print(f"{m.name} #{r}: cold {colds[-1]['first_step_s']:.1f} s, "
              f"warm {warms[-1]['first_step_s']:.1f} s", flush=True)
      fig, model_rows = summarize(m.name, [c["first_step_s"] for c in colds],
                                  [w["first_step_s"] for w in warms], goal=2.0)
      cold_p, warm_p = _median_phases(colds), _median_phases(warms)
      # What a cache can change at most: everything but executing the step.
      fig["speedup_without_step_execution"] = statistics.median(
          (c["first_step_s"] - c["phases"]["step"]) / (w["first_step_s"] - w["phases"]["step"])
          for c, w in zip(colds, warms))
      fig.update(spec=m.spec, overrides=list(m.overrides), cache_entries=entries,
                 phases={"cold": cold_p, "warm": warm_p},
                 groups={"cold": _grouped(cold_p), "warm": _grouped(warm_p)},
                 exit_s={"cold": [c["exit_s"] for c in colds],
                         "warm": [w["exit_s"] for w in warms]},
                 jax={"cold": colds[0]["jax"], "warm": warms[0]["jax"]})
      rows += model_rows
      if m.cli_repeats:
        cold, warm = [], []
        for r in range(m.cli_repeats):
          cache = os.path.join(root, f"{m.name}-cli-cache-{r}")
          cold.append(launch_cli(m, cache, os.path.join(root, f"{m.name}-cli-{r}-cold")))
          warm.append(launch_cli(m, cache, os.path.join(root, f"{m.name}-cli-{r}-warm")))
          print(f"{m.name} CLI #{r}: cold {cold[-1]:.1f} s, warm {warm[-1]:.1f} s",
                flush=True)
        fig["cli"], cli_rows = summarize(f"{m.name} CLI", cold, warm, None,
                                         what="s launch to exit (1 step)")
        rows += cli_rows
      figures[m.name] = fig
  finally:
    shutil.rmtree(root, ignore_errors=True)
  figures["load_average"]["end"] = os.getloadavg()
  return common.Result(NAME, figures, rows, tiny=tiny)


if __name__ == "__main__":
  if "--child" in sys.argv:
    print(_PREFIX + json.dumps(child(sys.argv[1:])), flush=True)
    os._exit(0)  # Measured up to here; tearing down threads and caches takes seconds.
  else:
    common.main(run)
