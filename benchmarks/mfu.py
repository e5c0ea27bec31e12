"""Step efficiency: how much of the chip's matmul speed vitcls's train step turns into
model FLOPs (MFU), for ViT-Ti/16, ViT-S/16 and BiT-R50x1 at 224 px.

MFU = (FLOPs per step / seconds per step) / peak FLOP/s. FLOPs per step come from XLA's
own cost analysis of the compiled step (what the chip is asked to do, optimiser included);
for ViTs a closed-form count (2 x multiply-adds of every matmul, backward = 2 x forward)
is stored beside it as a check. The peak is measured with a large jitted matmul in the
same process, just before each model's step is timed, so MFU compares two figures taken
under the same load of a shared machine; on a GPU it is also set against the chip's
datasheet peak. The step is the real one (the paper
experiments' optimiser, mixing and loss, built from `vitcls` pieces as `build.build` wires
them) on a batch already on the device, so input speed plays no part.

CPU: fp32, batch 32 (ViT-S/16's MFU is the headline). GPU (the backend is "gpu", or
VITCLS_BENCH_GPU=1): bf16 compute, batch 256, and ViT-B/16 added.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from vitcls import configs, models, sharding
from vitcls.run import build

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VIT_EXPERIMENT = os.path.join(REPO, "experiments", "vit_s16_i1k.py")
BIT_EXPERIMENT = os.path.join(REPO, "experiments", "bit_i1k.py")

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from NVIDIA's datasheets; the
# first entry whose key is in the device kind wins, so specific names come first.
DATASHEET_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H200 NVL", 835.0),
    ("H100", 989.0),  # SXM.
    ("H200", 989.0),  # SXM.
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
)
TINY_VIT = dict(variant=None, width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=4)


def on_gpu() -> bool:
  """GPU sizes: on a GPU backend, or forced with VITCLS_BENCH_GPU=1."""
  return os.environ.get("VITCLS_BENCH_GPU") == "1" or jax.default_backend() == "gpu"


def datasheet_peak(device_kind: str) -> Optional[float]:
  """The chip's dense bf16 peak in FLOP/s, or None for a chip not in the table."""
  for key, tflops in DATASHEET_BF16_TFLOPS:
    if key.lower() in device_kind.lower():
      return tflops * 1e12
  return None


@dataclasses.dataclass(frozen=True)
class Spec:
  """One benchmarked model: an experiment file, overrides of its `model`, input size."""
  name: str
  experiment: str
  model: dict
  image_size: int
  batch: int
  num_classes: int = 1000
  # Tiny sizes only: mixup off, and on CPU XLA's backend optimisation and fusion emitters
  # off, which together compile the tiny step about 10x faster (its speed means nothing;
  # at full size the same options make compiles slower).
  fast_compile: bool = False


def vit(name: str, variant: Optional[str], image_size: int, batch: int, tiny: bool,
        dtype: Optional[str] = None, **model) -> Spec:
  """A ViT of the ViT-S/16 paper recipe (gap, sin-cos posemb, tanh pre-logits)."""
  sizes = dict(TINY_VIT) if tiny else dict(variant=variant)
  return Spec(name, VIT_EXPERIMENT, dict(sizes, dtype=dtype, **model), image_size, batch,
              10 if tiny else 1000, fast_compile=tiny)


def specs(tiny: bool, gpu: bool) -> list[Spec]:
  """The models measured: ViT-S/16 first (the headline), then the rest."""
  if tiny:  # One stand-in: a tiny BiT alone compiles for longer than the test budget.
    return [vit("ViT-S/16", "S/16", 16, 8, True)]
  dtype, batch = ("bfloat16", 256) if gpu else (None, 32)
  out = [vit("ViT-S/16", "S/16", 224, batch, False, dtype),
         vit("ViT-Ti/16", "Ti/16", 224, batch, False, dtype)]
  if gpu:
    out.append(vit("ViT-B/16", "B/16", 224, batch, False, dtype))
  out.append(Spec("BiT-R50x1", BIT_EXPERIMENT, dict(depth=50, width=1, dtype=dtype), 224,
                  batch))
  return out


def make_config(spec: Spec, mesh=None, rules=None) -> Any:
  """The experiment's resolved config with the spec's model, batch and classes."""
  config = configs.load_experiment(spec.experiment)
  config.model = configs.ConfigDict({**config.model.to_dict(), **spec.model})
  config.num_classes = spec.num_classes
  config.input.batch_size = spec.batch
  config.total_steps = 100_000
  config.schedule.warmup_steps = min(config.schedule.warmup_steps, 1000)
  if spec.fast_compile:
    config.mixup.p = config.mixup.alpha = config.cutmix.alpha = 0.0
  if mesh is not None:
    config.mesh = mesh
  if rules is not None:
    config.sharding_rules = rules
  return configs.resolve(config)


@dataclasses.dataclass
class StepBench:
  """The jitted train step of `spec`, its abstract inputs, and how to make real ones."""
  spec: Spec
  config: Any
  model: Any
  mesh: jax.sharding.Mesh
  step: Callable
  abstract_state: Any
  abstract_batch: dict
  init_fn: Callable

  @property
  def compiler_options(self) -> Optional[dict]:
    """Tiny CPU steps: XLA options that compile fast; None for steps timed for real."""
    if not self.spec.fast_compile or jax.default_backend() != "cpu":
      return None
    return {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}

  def lower(self):
    """The step lowered on the abstract state and batch: no arrays needed (compile timing)."""
    return self.step.lower(self.abstract_state, self.abstract_batch)

  def compile(self):
    """The compiled step: what is timed, and what XLA's cost and memory analyses read."""
    return self.lower().compile(self.compiler_options)

  def init_state(self):
    """A real initial state, sharded as in training (compiled with `compiler_options`)."""
    shardings = jax.tree_util.tree_map(lambda x: x.sharding, self.abstract_state)
    init = jax.jit(self.init_fn, out_shardings=shardings)
    return init.lower().compile(self.compiler_options)()

  def random_batch(self, seed: int = 0) -> dict:
    """Images uniform in [-1, 1] and one-hot labels, already on the device(s)."""
    rng = np.random.default_rng(seed)
    b, size, k = self.spec.batch, self.spec.image_size, self.spec.num_classes
    images = rng.uniform(-1, 1, (b, size, size, 3)).astype(np.float32)
    labels = np.eye(k, dtype=np.float32)[rng.integers(0, k, b)]
    sharding_ = self.abstract_batch["image"].sharding
    return {"image": jax.device_put(images, sharding_),
            "labels": jax.device_put(labels, sharding_)}


def make_step(spec: Spec, mesh=None, rules=None) -> StepBench:
  """vitcls's train step for `spec` on synthetic inputs: `build.build` without a dataset.

  The same pieces in the same order (model, optimiser and schedule, step options, init,
  state shardings by `sharding_rules`, jit with donated state), so what is timed is what
  `vitcls.train` runs.
  """
  config = make_config(spec, mesh, rules)
  mesh_ = sharding.make_mesh(config.mesh)
  model = models.build(config.model_name, config.num_classes, config.model)
  image_shape = (spec.image_size, spec.image_size, 3)
  init_fn, abstract, shardings, _, core = build.state_and_step(
      config, mesh_, model, image_shape, config.total_steps)
  batch_sharding = sharding.batch_sharding(mesh_)
  batch = {"image": jax.ShapeDtypeStruct((spec.batch, *image_shape), jnp.float32,
                                         sharding=batch_sharding),
           "labels": jax.ShapeDtypeStruct((spec.batch, spec.num_classes), jnp.float32,
                                          sharding=batch_sharding)}
  step = jax.jit(core, in_shardings=(shardings, batch_sharding),
                 out_shardings=(shardings, sharding.replicated(mesh_)), donate_argnums=0)
  return StepBench(spec, config, model, mesh_, step, abstract, batch, init_fn)


def xla_flops(compiled_or_lowered) -> float:
  """Total FLOPs of a compiled (or lowered) program by XLA's cost analysis."""
  cost = compiled_or_lowered.cost_analysis()
  if isinstance(cost, (list, tuple)):  # Older jax: one dict per program.
    cost = cost[0]
  return float(cost["flops"])


def vit_flops(model, image_size: int, num_classes: int) -> dict[str, float]:
  """Closed-form FLOPs per image (2 x multiply-adds) of a ViT's forward and train step.

  Counts the matmuls only: patch embedding, qkv and output projections, attention scores
  and values, the MLP, pre-logits and head (LayerNorm, softmax, GELU, the optimiser are
  left out, so XLA's count is a few % higher). Backward is twice the forward, except the
  patch embedding, whose input needs no gradient.
  """
  if model.pool_type == "map":
    raise ValueError("vit_flops does not count the MAP head; use pool_type gap or tok")
  sizes = model.sizes()
  d, m, depth = sizes["width"], sizes["mlp_dim"], sizes["depth"]
  ph, pw = sizes["patch_size"]
  patches = (image_size // ph) * (image_size // pw)
  n = patches + (model.pool_type == "tok")
  embed = 2 * patches * ph * pw * 3 * d
  block = 2 * n * d * 3 * d + 2 * n * d * d + 2 * 2 * n * n * d + 2 * 2 * n * d * m
  rep = d if model.rep_size is True else int(model.rep_size or 0)
  head = 2 * d * rep + 2 * (rep or d) * num_classes
  forward = embed + depth * block + head
  return {"forward": float(forward), "train": float(3 * forward - embed)}


def matmul(tiny: bool, gpu: bool) -> tuple[Callable[[], None], float, dict[str, Any]]:
  """A large jitted `jnp.dot` (fp32 on CPU, bf16 on GPU): run(), its FLOPs, its shape."""
  n, dtype, calls = (256, jnp.float32, 1) if tiny else (
      (8192, jnp.bfloat16, 20) if gpu else (2048, jnp.float32, 1))
  keys = jax.random.split(jax.random.PRNGKey(0))
  a, b = (jax.random.normal(k, (n, n), dtype) for k in keys)
  dot = jax.jit(jnp.dot)

  def run():  # `calls` dispatches in flight at once, so a fast chip never waits on Python.
    for _ in range(calls):
      out = dot(a, b)
    out.block_until_ready()

  return run, 2.0 * n ** 3 * calls, {"n": n, "dtype": jnp.dtype(dtype).name}


def step_runner(bench: StepBench, compiled, steps_per_call: int,
                state=None) -> Callable[[], None]:
  """run() does `steps_per_call` train steps on one fixed device batch, from `state`
  (donated) or a fresh one, and waits for them."""
  holder = {"state": bench.init_state() if state is None else state}
  batch = bench.random_batch()

  def run():
    for _ in range(steps_per_call):
      holder["state"], metrics = compiled(holder["state"], batch)
    jax.block_until_ready(metrics)
  return run


def time_steps(bench: StepBench, compiled, steps_per_call: int, repeats: int,
               warmup: int = 1, state=None) -> common.Timing:
  """Seconds per call of `steps_per_call` train steps (see `step_runner`)."""
  return common.time_it(step_runner(bench, compiled, steps_per_call, state),
                        repeats=repeats, warmup=warmup)


def timing_of(seconds: list[float]) -> common.Timing:
  """A Timing of seconds timed one call at a time, interleaved with other work (as in `measure`)."""
  return common.Timing(statistics.median(seconds), min(seconds), max(seconds), len(seconds))


def measure(spec: Spec, *, tiny: bool, gpu: bool) -> dict[str, Any]:
  """img/s, FLOPs per step (XLA; closed form for ViTs) and MFU of one model's step.

  Each timed step is bracketed by two short peak measurements and its MFU is taken
  against their mean: a shared machine's load drifts over seconds, and MFU only means
  something between figures taken under the same load.
  """
  bench = make_step(spec)
  compiled = bench.compile()
  flops = xla_flops(compiled)
  per_call = 1 if tiny or not gpu else 10
  step = step_runner(bench, compiled, per_call)
  dot, dot_flops, peak = matmul(tiny, gpu)
  step()  # Warm-up.
  dot()
  step_s, dot_s = [], []
  for _ in range(2 if tiny else 3):
    dot_s.append(common.time_it(dot, repeats=5, warmup=0).median)
    start = time.perf_counter()
    step()
    step_s.append(time.perf_counter() - start)
  dot_s.append(common.time_it(dot, repeats=5, warmup=0).median)
  mfus = [(flops * per_call / s) / (2 * dot_flops / (before + after))
          for s, before, after in zip(step_s, dot_s, dot_s[1:])]
  timing = timing_of(step_s)
  peak.update(flops_per_s=dot_flops / statistics.median(dot_s),
              samples=[dot_flops / s for s in dot_s])
  out = {"batch": spec.batch, "image_size": spec.image_size,
         "dtype": spec.model.get("dtype") or "float32", "peak": peak,
         "img_per_s": timing.rate(spec.batch * per_call), "timing": timing.as_dict(),
         "steps_per_call": per_call, "xla_flops_per_step": flops,
         "achieved_flops_per_s": flops * per_call / timing.median,
         "xla_gflops_per_img": flops / spec.batch / 1e9,
         "mfu": {"median": statistics.median(mfus), "low": min(mfus), "high": max(mfus),
                 "each": mfus}}
  if bench.config.model_name == "vit":
    analytic = vit_flops(bench.model, spec.image_size, spec.num_classes)
    out.update(analytic_flops_per_step=analytic["train"] * spec.batch,
               analytic_forward_flops_per_img=analytic["forward"],
               xla_over_analytic=flops / (analytic["train"] * spec.batch))
  return out


def spread(rates: dict[str, float], scale: float = 1.0, digits: int = 3) -> str:
  """The `low-high` text of `rates` (times `scale`, e.g. 100 for %), for a row's spread."""
  return f"{rates['low'] * scale:.{digits}g}-{rates['high'] * scale:.{digits}g}"


def run(tiny: bool) -> common.Result:
  """MFU and img/s of each model's train step, and the matmul peak they are measured against."""
  gpu = on_gpu() and not tiny
  device_kind = jax.devices()[0].device_kind
  datasheet = datasheet_peak(device_kind) if gpu else None
  figures = {"device_kind": device_kind, "gpu_sizes": gpu,
             "datasheet_bf16_flops_per_s": datasheet, "models": {}}
  rows = []
  for spec in specs(tiny, gpu):
    m = measure(spec, tiny=tiny, gpu=gpu)
    figures["models"][spec.name] = m
    rows.append(common.Row("mfu", f"MFU {spec.name} (vs measured {m['peak']['dtype']} "
                           f"matmul peak)", m["mfu"]["median"] * 100, "%",
                           spread(m["mfu"], 100)))
    if datasheet:
      m["mfu_vs_datasheet"] = m["achieved_flops_per_s"] / datasheet
      rows.append(common.Row("mfu", f"MFU {spec.name} (vs {datasheet / 1e12:.0f} TFLOP/s "
                             f"datasheet)", m["mfu_vs_datasheet"] * 100, "%"))
  for name, m in figures["models"].items():
    rows.append(common.Row("mfu", f"{name} train step, batch {m['batch']}, {m['dtype']}",
                           m["img_per_s"]["median"], "img/s", spread(m["img_per_s"])))
  peaks = [x for m in figures["models"].values() for x in m["peak"]["samples"]]
  figures["peak_flops_per_s"] = statistics.median(peaks)
  first = next(iter(figures["models"].values()))["peak"]
  rows.append(common.Row("mfu", f"peak {first['dtype']} matmul ({first['n']}^3), "
                         f"beside every timed step", figures["peak_flops_per_s"] / 1e9,
                         "GFLOP/s", f"{min(peaks) / 1e9:.3g}-{max(peaks) / 1e9:.3g}"))
  return common.Result("mfu", figures, rows)


if __name__ == "__main__":
  common.main(run)
