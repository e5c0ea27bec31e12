"""What the train step costs as it grows: resolution, compile time, memory, FSDP.

(a) ViT-S/16 at 224, 384 and 512 px: img/s and FLOPs per image (XLA's count and the
    closed form), plotted in `scaling.png`. Tokens grow as resolution squared and
    attention as its fourth power, so img/s should fall at least as fast as FLOPs rise;
    the rows set the measured img/s ratio beside the one FLOPs imply.
(b) Compile time of the ViT-B/16 train step: lower + compile wall seconds, median of a
    few fresh compiles (a new jit each time, JAX's persistent cache off), which is what a
    user waits for before step 1 of a run.
(c) Memory per device of the ViT-B/16 step at batch 64, from the compiled step's
    `memory_analysis()` (compile only, nothing runs): without remat, with `remat=True`,
    and with `remat=True, scan=True` (XLA:CPU's scheduler undoes remat across unrolled
    blocks; inside a scan it holds). With FSDP over 8 devices: the parameter +
    optimiser-state bytes each device holds, from the array shardings, as a fraction of
    the replicated case (goal <= 1/6; 8 devices give 1/8 when every large leaf splits),
    and both steps' memory analyses. The 8 fake CPU devices need XLA_FLAGS set before JAX
    starts, so that part runs in a child process
    (`python -m benchmarks.scaling --fsdp_child [--tiny]`, one JSON line on stdout).

GPU sizes (see `mfu.on_gpu`): ViT-B/16 in bf16 for the resolution sweep, batch 256 for
compile and memory; the FSDP child stays on 8 fake CPU devices.
"""

from __future__ import annotations

import functools
import json
import math
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import jax
import numpy as np

from benchmarks import common, mfu

FSDP_DEVICES = 8
STATE_FIELDS = ("params", "opt_state", "ema")  # What FSDP shards; step and rng are tiny.
# (key, label, model fields) of the single-device memory analyses; the first one's step is
# the one whose compile time is measured.
MEMORY_VARIANTS = (("no_remat", "no remat", {}),
                   ("remat", "remat", {"remat": True}),
                   ("remat_scan", "remat + scan", {"remat": True, "scan": True}))


def resolution_specs(tiny: bool, gpu: bool) -> list[mfu.Spec]:
  """ViT-S/16 at 224, 384 and 512 px (GPU: ViT-B/16 in bf16; tiny: 16 and 32 px)."""
  if tiny:
    # 16 px is mfu's tiny step, so the test suite's compilation cache serves it.
    return [mfu.vit("ViT-S/16", "S/16", r, 8, True) for r in (16, 32)]
  if gpu:
    return [mfu.vit("ViT-B/16", "B/16", r, 128, False, "bfloat16") for r in (224, 384, 512)]
  return [mfu.vit("ViT-S/16", "S/16", r, 4, False) for r in (224, 384, 512)]


def memory_spec(tiny: bool, gpu: bool = False, **model) -> mfu.Spec:
  """ViT-B/16 at batch 64 (256 in bf16 on a GPU); tiny: the tiny ViT at batch 8."""
  if tiny:
    return mfu.vit("ViT-B/16", "B/16", 16, FSDP_DEVICES, True, **model)
  if gpu:
    return mfu.vit("ViT-B/16", "B/16", 224, 256, False, "bfloat16", **model)
  return mfu.vit("ViT-B/16", "B/16", 224, 64, False, **model)


def sweep(specs: list[mfu.Spec], tiny: bool, gpu: bool) -> list[dict[str, Any]]:
  """img/s and FLOPs of each spec's step; one initial state serves every resolution
  whose state has the same shapes (sin-cos posemb: all of them)."""
  out, state = [], None
  for spec in specs:
    bench = mfu.make_step(spec)
    compiled = bench.compile()
    flops = mfu.xla_flops(compiled)
    shapes = jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), bench.abstract_state)
    if state is None or state[0] != shapes:
      state = (shapes, jax.device_get(bench.init_state()))
    shardings = jax.tree_util.tree_map(lambda x: x.sharding, bench.abstract_state)
    per_call = 10 if gpu else 1
    timing = mfu.time_steps(bench, compiled, per_call, repeats=2 if tiny else 3,
                            state=jax.device_put(state[1], shardings))
    analytic = mfu.vit_flops(bench.model, spec.image_size, spec.num_classes)
    out.append({"image_size": spec.image_size, "batch": spec.batch, "model": spec.name,
                "img_per_s": timing.rate(spec.batch * per_call), "timing": timing.as_dict(),
                "xla_gflops_per_img": flops / spec.batch / 1e9,
                "analytic_gflops_per_img": analytic["train"] / 1e9})
  return out


def memory_stats(compiled) -> dict[str, int]:
  """Bytes per device of a compiled program; peak = arguments + outputs + temporaries -
  aliased (donated state reused for the new state)."""
  m = compiled.memory_analysis()
  out = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in
         ("argument", "output", "temp", "alias", "generated_code")}
  out["peak"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
  return out


def compile_times(spec: mfu.Spec, repeats: int) -> tuple[dict[str, Any], Any]:
  """Lower and compile seconds of `repeats` fresh jits of `spec`'s step, cache off.

  Returns the figures and the last compiled step (for its memory analysis).
  """
  enabled = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  lower, comp = [], []
  try:
    for _ in range(repeats):
      bench = mfu.make_step(spec)  # A new function: nothing cached in memory either.
      start = time.perf_counter()
      lowered = bench.lower()
      lower.append(time.perf_counter() - start)
      start = time.perf_counter()
      compiled = lowered.compile(bench.compiler_options)
      comp.append(time.perf_counter() - start)
  finally:
    jax.config.update("jax_enable_compilation_cache", enabled)
  total = [a + b for a, b in zip(lower, comp)]
  return {"model": spec.name, "batch": spec.batch, "lower_s": lower, "compile_s": comp,
          "total_s": total, "median_s": statistics.median(total)}, compiled


def state_bytes(abstract_state) -> dict[str, int]:
  """Parameter + optimiser-state (+ EMA) bytes: in all, and held by one device."""
  total = per_device = 0
  for field in STATE_FIELDS:
    for leaf in jax.tree_util.tree_leaves(getattr(abstract_state, field)):
      itemsize = np.dtype(leaf.dtype).itemsize
      total += math.prod(leaf.shape) * itemsize
      per_device += math.prod(leaf.sharding.shard_shape(leaf.shape)) * itemsize
  return {"total": total, "per_device": per_device}


def fsdp_child(tiny: bool) -> dict[str, Any]:
  """In a process with 8 devices: state bytes per device and memory analysis of the
  step, replicated (data parallel) and FSDP."""
  if jax.device_count() != FSDP_DEVICES:
    raise RuntimeError(f"the FSDP child needs {FSDP_DEVICES} devices, got "
                       f"{jax.device_count()}: set XLA_FLAGS before JAX starts")
  spec = memory_spec(tiny)
  out = {"model": spec.name, "batch": spec.batch, "devices": jax.device_count()}
  for name, mesh, rules in (("replicated", [("data", -1)], [(".*", "replicate")]),
                            ("fsdp", [("data", 1), ("fsdp", -1)], [(".*", "fsdp")])):
    bench = mfu.make_step(spec, mesh=mesh, rules=rules)
    out[name] = {"mesh": mesh, "state_bytes": state_bytes(bench.abstract_state),
                 "memory": memory_stats(bench.compile())}
  out["fraction"] = (out["fsdp"]["state_bytes"]["per_device"]
                     / out["replicated"]["state_bytes"]["per_device"])
  return out


def start_fsdp_child(tiny: bool) -> subprocess.Popen:
  """Starts `fsdp_child` in a fresh process on 8 fake CPU devices; see `fsdp_result`."""
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
             XLA_FLAGS=" ".join(flags + [f"--xla_force_host_platform_device_count="
                                         f"{FSDP_DEVICES}"]))
  command = [sys.executable, "-m", "benchmarks.scaling", "--fsdp_child"]
  return subprocess.Popen(command + (["--tiny"] if tiny else []), env=env, cwd=mfu.REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def fsdp_result(child: subprocess.Popen) -> dict[str, Any]:
  """The child's JSON line, once it has finished."""
  stdout, stderr = child.communicate(timeout=1800)
  if child.returncode != 0:
    raise RuntimeError(f"FSDP child failed ({child.returncode}):\n{stderr[-3000:]}")
  return json.loads(stdout.strip().splitlines()[-1])


def _tick_label(value: float, _) -> str:
  """Plain numbers on log axes, only at 1, 2 and 5 times a power of ten (no crowding)."""
  if value <= 0:
    return ""
  mantissa = value / 10 ** math.floor(math.log10(value))
  return f"{value:g}" if any(abs(mantissa - m) < 1e-6 for m in (1, 2, 5)) else ""


def plot(points: list[dict[str, Any]], path: str) -> None:
  """img/s and GFLOPs per image against resolution, log-log."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top

  sizes = [p["image_size"] for p in points]
  ips = [p["img_per_s"]["median"] for p in points]
  xla = [p["xla_gflops_per_img"] for p in points]
  implied = [ips[0] * xla[0] / f for f in xla]
  fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
  left.errorbar(sizes, ips, yerr=[[m - p["img_per_s"]["low"] for m, p in zip(ips, points)],
                                  [p["img_per_s"]["high"] - m for m, p in zip(ips, points)]],
                marker="o", capsize=3, label="measured (median, range)")
  left.plot(sizes, implied, "--", color="gray", label=f"if FLOP/s stayed as at {sizes[0]} px")
  left.set(ylabel="train img/s", title=f"{points[0]['model']} train step, batch "
           f"{points[0]['batch']}")
  right.plot(sizes, xla, marker="o", label="XLA cost analysis")
  right.plot(sizes, [p["analytic_gflops_per_img"] for p in points], "x--",
             label="closed form (matmuls)")
  right.set(ylabel="train GFLOPs per image", title="FLOPs per image (fwd + bwd)")
  # Values beside the points, on the side away from the line (falling left, rising right).
  for ax, values, dx, align in ((left, ips, 6, "left"), (right, xla, -6, "right")):
    for x, y in zip(sizes, values):
      ax.annotate(f"{y:.3g}", (x, y), textcoords="offset points", xytext=(dx, 6),
                  ha=align, fontsize=8)
  for ax in (left, right):
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(sizes)
    ax.xaxis.set_major_formatter(ticker.ScalarFormatter())
    ax.xaxis.set_minor_locator(ticker.NullLocator())
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(_tick_label))
    ax.yaxis.set_minor_formatter(ticker.FuncFormatter(_tick_label))
    ax.set_xlabel("image size (px, log)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def gib(n: float) -> float:
  """Bytes in GiB, for the memory rows."""
  return n / 2 ** 30


def run(tiny: bool, results_dir: str | None = None) -> common.Result:
  """Resolution sweep, compile time, memory with and without remat, FSDP; plots `scaling.png`."""
  gpu = mfu.on_gpu() and not tiny
  points = sweep(resolution_specs(tiny, gpu), tiny, gpu)
  compile_, compiled = compile_times(memory_spec(tiny, gpu), repeats=1 if tiny else 3)
  # Nothing is timed from here on, so the child compiles beside this process's compiles.
  child = start_fsdp_child(tiny)
  memory = {MEMORY_VARIANTS[0][0]: memory_stats(compiled)}
  for key, _, model in MEMORY_VARIANTS[1:]:
    memory[key] = memory_stats(mfu.make_step(memory_spec(tiny, gpu, **model)).compile())
  fsdp = fsdp_result(child)
  figures = {"resolution": points, "compile": compile_, "memory": memory, "fsdp": fsdp,
             "gpu_sizes": gpu}

  base = points[0]
  rows = []
  for p in points[1:]:
    p["img_per_s_ratio"] = p["img_per_s"]["median"] / base["img_per_s"]["median"]
    p["flops_implied_ratio"] = base["xla_gflops_per_img"] / p["xla_gflops_per_img"]
    rows.append(common.ratio_row(
        "scaling", f"img/s {p['image_size']}/{base['image_size']} px, {p['model']} "
        f"(FLOPs imply {p['flops_implied_ratio']:.3f})", p["img_per_s_ratio"]))
  last = points[-1]
  rows.append(common.ratio_row(
      "scaling", f"FLOP/s at {last['image_size']} over {base['image_size']} px",
      last["img_per_s_ratio"] / last["flops_implied_ratio"]))
  rows.append(common.Row(
      "scaling", f"compile {compile_['model']} train step (lower+compile)",
      compile_["median_s"], "s", f"{min(compile_['total_s']):.1f}-"
      f"{max(compile_['total_s']):.1f}"))
  where = f"{compile_['model']} batch {compile_['batch']}"
  none = memory[MEMORY_VARIANTS[0][0]]["peak"]
  for key, label, _ in MEMORY_VARIANTS:
    rows.append(common.Row("scaling", f"peak memory/device, {where}, {label}",
                           gib(memory[key]["peak"]), "GiB"))
  for key, label, _ in MEMORY_VARIANTS[1:]:
    rows.append(common.ratio_row("scaling", f"peak memory {label} / no remat",
                                 memory[key]["peak"] / none))
  rows.append(common.Row(
      "scaling", f"FSDP({fsdp['devices']}) param+opt state per device / replicated, "
      f"{fsdp['model']}", fsdp["fraction"], "x", goal="<= 0.167",
      met=fsdp["fraction"] <= 1 / 6))
  for key, label in (("replicated", "data parallel"), ("fsdp", "FSDP")):
    rows.append(common.Row(
        "scaling", f"peak memory/device, {label}({fsdp['devices']}), {fsdp['model']} "
        f"batch {fsdp['batch']}", gib(fsdp[key]["memory"]["peak"]), "GiB"))

  results_dir = results_dir or common.RESULTS_DIR
  os.makedirs(results_dir, exist_ok=True)
  name = f"scaling{'_tiny' if tiny else ''}.png"
  plot(points, os.path.join(results_dir, name))
  return common.Result("scaling", figures, rows, plots=[name])


def _results_dir(args: list[str]) -> str | None:
  return next((a.split("=", 1)[1] for a in args if a.startswith("--results_dir=")), None)


if __name__ == "__main__":
  if "--fsdp_child" in sys.argv:
    print(json.dumps(fsdp_child("--tiny" in sys.argv)))
  else:
    common.main(functools.partial(run, results_dir=_results_dir(sys.argv)))
