"""vitcls's ViT-Ti/16 train step against timm's, on the same CPU cores, in one process.

    python -m benchmarks.vs_timm [--tiny]

The same work on both sides: ViT-Ti/16 (width 192, depth 12, 3 heads, MLP 768, cls
token, 1000 classes, no dropout or drop path) at 224 px, batch 32, fp32, AdamW (lr 1e-3,
weight decay 0.05), softmax cross-entropy, no clipping, on the same images (GELU is
the tanh approximation in vitcls, as in the original ViT, and exact in timm). timm:
`vit_tiny_patch16_224`, `zero_grad / backward / step` with `torch.set_num_threads` set
to the cores XLA uses. vitcls: its real jitted train step (`vitcls.run.build`) on a batch
already on the device. Headline: vitcls img/s over timm img/s, each round timing every
step once in turn (A B A B ...), so load from elsewhere falls on both alike.

Parameter counts: timm keeps a position embedding for the cls token too (197 entries);
vitcls, as big_vision, adds the position embedding before prepending the cls token (196
entries, one `width` vector fewer). timm's `no_embed_class=True` is that same layout, so
vitcls must equal it exactly and differ from the default by `width`.

What limits vitcls (figures, not rows): forward passes alone, in the same rounds; and
in child processes (flags and core counts need a fresh process) an XLA CPU flag, and
one core each, where forward+backward alone, vitcls's default clipping at 1.0, a bare
step (no clipping, no metrics) and attention through `jax.nn.dot_product_attention` are
timed too. The one-core ratio is also a row: on a shared machine the two-thread ratio
moves with other work (torch's threads wait for each other), the one-core one much less.
torch and timm are optional (`bench` extra): without them the row says it was skipped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import numpy as np

from benchmarks import common

NAME = "vs_timm"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMM_MODEL = "vit_tiny_patch16_224"
TIMM_VIT_TI16_PARAMS = 5_717_416  # timm's own count for vit_tiny_patch16_224, 1000 classes.
SKIPPED = "skipped: torch/timm not installed (the optional `bench` extra)"
_PREFIX = "VS_TIMM_JSON "


@dataclasses.dataclass(frozen=True)
class Sizes:
  """The model and batch compared, and how much is timed (rounds, variants, children)."""
  image: int = 224
  patch: int = 16
  width: int = 192
  depth: int = 12
  heads: int = 3
  mlp: int = 768
  classes: int = 1000
  batch: int = 32
  rounds: int = 4
  child_rounds: int = 2
  # Timed beside the two steps, in the same rounds (see `measure`).
  variants: tuple[str, ...] = ("forward",)
  children: tuple[str, ...] = ("no_eigen_threads", "one_core")  # Names in CHILDREN.


FULL = Sizes()
TINY = Sizes(image=32, patch=8, width=32, depth=1, heads=2, mlp=64, classes=10, batch=4,
             rounds=2, child_rounds=1, variants=(), children=())


ALL_VARIANTS = ("clip1", "bare", "dot_product_attention", "grad", "forward")
# Child processes, each timing vitcls and timm again: name -> (XLA_FLAGS, cores to use
# (0 = all), variants). One core each gives the per-core speed without thread
# synchronisation: on a shared machine torch's OpenMP threads lose far more than XLA's
# pool when other work takes a core, so the variants are timed there. This XLA ignores
# `--xla_cpu_use_thunk_runtime=false` ("no longer supported").
CHILDREN = {"no_eigen_threads": ("--xla_cpu_multi_thread_eigen=false", 0, ()),
            "one_core": ("", 1, ALL_VARIANTS)}


def threads() -> int:
  """The cores XLA's CPU client uses (those this process may run on)."""
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def import_torch_timm():
  """(torch, timm), or None when either is missing."""
  try:
    import timm  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return torch, timm


# ---------------------------------------------------------------------------------------
# The two models.


def vitcls_config(s: Sizes, clip: float = 0.0):
  """vitcls doing timm's work at sizes `s` (same ViT, AdamW, loss); `clip`: grad-norm clip."""
  from vitcls import configs  # pylint: disable=g-import-not-at-top
  pp = f"resize({s.image})|to_rgb|value_range(-1,1)|onehot({s.classes})"
  return configs.resolve(configs.ConfigDict(dict(
      num_classes=s.classes, total_steps=1000, lr=1e-3, wd=0.05, grad_clip_norm=clip,
      label_smoothing=0.0, loss="softmax_xent",
      # The pp whole on the host: both sides train on the same float batch.
      input=dict(data=dict(name="mnist5k", split="train"), pp=pp, batch_size=s.batch,
                 normalize_on_device=False),
      model=dict(width=s.width, depth=s.depth, mlp_dim=s.mlp, num_heads=s.heads,
                 patch_size=s.patch, pool_type="tok", posemb="learn", dropout=0.0,
                 stoch_depth=0.0),
      schedule=dict(decay_type="cosine", warmup_steps=0))))


def timm_model(timm, s: Sizes, **kw):
  """timm's ViT-Ti/16 (at full size exactly `vit_tiny_patch16_224`), resized by `s`."""
  if s != FULL:
    kw.update(img_size=s.image, patch_size=s.patch, embed_dim=s.width, depth=s.depth,
              num_heads=s.heads, mlp_ratio=s.mlp / s.width)
  return timm.create_model(TIMM_MODEL, pretrained=False, num_classes=s.classes,
                           drop_rate=0.0, drop_path_rate=0.0, **kw)


def num_params(torch_module) -> int:
  """A torch module's parameter count, to check both sides train the same model."""
  return sum(p.numel() for p in torch_module.parameters())


def host_batch(run, n: int) -> dict[str, np.ndarray]:
  """n training images through the experiment's preprocessing (the same for both)."""
  rng = np.random.default_rng(0)
  examples = [run.pp(dict(run.source[i]), rng) for i in range(n)]
  return {k: np.stack([e[k] for e in examples]) for k in ("image", "labels")}


class _LinenWith:
  """flax.linen as vitcls's ViT module sees it, with another attention function."""

  def __init__(self, attention_fn):
    import flax.linen as nn  # pylint: disable=g-import-not-at-top
    self._nn = nn
    self._mha = functools.partial(nn.MultiHeadDotProductAttention, attention_fn=attention_fn)

  def __getattr__(self, name):
    return self._mha if name == "MultiHeadDotProductAttention" else getattr(self._nn, name)


@contextlib.contextmanager
def dot_product_attention():
  """Traces vitcls's ViT with `jax.nn.dot_product_attention` (same params, same maths)."""
  import jax  # pylint: disable=g-import-not-at-top
  from vitcls.models import vit  # pylint: disable=g-import-not-at-top
  original = vit.nn
  vit.nn = _LinenWith(jax.nn.dot_product_attention)
  try:
    yield
  finally:
    vit.nn = original


# ---------------------------------------------------------------------------------------
# Steps: each a callable that runs one step and returns once it is done.


def build_run(config):
  """`vitcls.run.build.build(config)`, imported here so that loading this module skips JAX."""
  from vitcls.run import build  # pylint: disable=g-import-not-at-top
  return build.build(config)


def vitcls_step(run, batch_np, tracing=contextlib.nullcontext):
  """vitcls's real train step, compiled (under `tracing`), on a device-resident batch.

  `run` must be freshly built when `tracing` changes the model: jit keeps the first
  trace of a function.
  """
  import jax  # pylint: disable=g-import-not-at-top
  batch = jax.device_put(batch_np, run.batch_sharding)
  holder = [run.init_state()]
  with tracing():
    compiled = run.train_step.lower(holder[0], batch).compile()

  def step():
    holder[0], metrics = compiled(holder[0], batch)
    jax.block_until_ready((holder[0], metrics))
  return step


def _mean_loss(run):
  """loss(params, batch): the step's softmax cross-entropy, nothing else."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from vitcls import losses  # pylint: disable=g-import-not-at-top
  loss_of = losses.get("softmax_xent")

  def loss(params, batch):
    logits, _ = run.model.apply({"params": params}, batch["image"], train=True)
    return jnp.mean(loss_of(logits, batch["labels"]))
  return loss


def bare_step(run, config, batch_np):
  """The same update without clipping or metrics: loss, grads, AdamW, nothing else."""
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from vitcls import optim  # pylint: disable=g-import-not-at-top
  tx, _ = optim.make_optimizer(config, run.total_steps)
  loss = _mean_loss(run)

  def update(params, opt_state, batch):
    updates, opt_state = tx.update(jax.grad(loss)(params, batch), opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  params = run.init_state().params
  batch = jax.device_put(batch_np, run.batch_sharding)
  holder = [params, jax.jit(tx.init)(params)]
  shardings = jax.tree_util.tree_map(lambda x: x.sharding, holder)
  compiled = jax.jit(update, in_shardings=(*shardings, run.batch_sharding),
                     out_shardings=tuple(shardings), donate_argnums=(0, 1)).lower(
                         *holder, batch).compile()

  def step():
    holder[:] = jax.block_until_ready(compiled(*holder, batch))
  return step


def vitcls_grad(run, batch_np):
  """Forward and backward only (loss and gradients, no optimiser)."""
  import jax  # pylint: disable=g-import-not-at-top
  params = run.init_state().params
  batch = jax.device_put(batch_np, run.batch_sharding)
  grad = jax.jit(jax.value_and_grad(_mean_loss(run)))
  return lambda: jax.block_until_ready(grad(params, batch))


def vitcls_forward(run, batch_np):
  """vitcls's forward pass alone (eval mode) on a device-resident batch: the `forward` variant."""
  import jax  # pylint: disable=g-import-not-at-top
  params = run.init_state().params
  images = jax.device_put(batch_np["image"], run.batch_sharding)
  apply = jax.jit(lambda p, x: run.model.apply({"params": p}, x, train=False)[0])
  return lambda: jax.block_until_ready(apply(params, images))


def timm_steps(torch, model, batch_np) -> dict[str, Callable[[], None]]:
  """A timm model's train step, forward+backward, and forward, on the same images."""
  x = torch.from_numpy(np.ascontiguousarray(batch_np["image"].transpose(0, 3, 1, 2)))
  y = torch.from_numpy(batch_np["labels"].argmax(-1))
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
  model.train()

  def grad():
    optimizer.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(x), y).backward()

  def step():
    grad()
    optimizer.step()

  def forward():
    with torch.inference_mode():
      model(x)
  return {"step": step, "grad": grad, "forward": forward}


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int,
                warmup: int = 1) -> dict[str, list[float]]:
  """Seconds per call of each fn, timed in turn, round after round (A B C A B C ...)."""
  for fn in fns.values():
    for _ in range(warmup):
      fn()
  seconds = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      start = time.perf_counter()
      fn()
      seconds[name].append(time.perf_counter() - start)
  return seconds


def _timing(seconds: list[float]) -> common.Timing:
  return common.Timing(statistics.median(seconds), min(seconds), max(seconds), len(seconds))


def _over(seconds: dict[str, list[float]], name: str, base: str) -> list[float]:
  """Per-round speed ratio name/base (img/s over img/s = base seconds / name seconds)."""
  return [b / a for a, b in zip(seconds[name], seconds[base])]


# ---------------------------------------------------------------------------------------
# Measuring.


def measure(s: Sizes, variants: tuple[str, ...], rounds: int) -> dict:
  """In this process: both models built, counted, compiled, then timed in rounds.

  variants: "clip1" (vitcls's default clipping at 1.0), "bare" (no clipping, no
  metrics), "dot_product_attention" (`jax.nn.dot_product_attention`); and, for both
  models, "grad" (forward and backward, no optimiser) and "forward".
  """
  torch, timm = import_torch_timm()
  torch.set_num_threads(threads())
  torch.manual_seed(0)
  config = vitcls_config(s)
  run = build_run(config)
  batch_np = host_batch(run, s.batch)
  timm_net = timm_model(timm, s)
  counts = {"vitcls": run.num_params, "timm": num_params(timm_net),
            "timm_no_embed_class": num_params(timm_model(timm, s, no_embed_class=True))}
  timm_fns = timm_steps(torch, timm_net, batch_np)
  fns = {"timm": timm_fns["step"], "vitcls": vitcls_step(run, batch_np)}
  if "clip1" in variants:
    fns["vitcls_clip1"] = vitcls_step(build_run(vitcls_config(s, clip=1.0)), batch_np)
  if "bare" in variants:
    fns["vitcls_bare"] = bare_step(run, config, batch_np)
  if "dot_product_attention" in variants:
    fns["vitcls_dot_product_attention"] = vitcls_step(build_run(config), batch_np,
                                                      dot_product_attention)
  if "grad" in variants:
    fns["timm_grad"], fns["vitcls_grad"] = timm_fns["grad"], vitcls_grad(run, batch_np)
  if "forward" in variants:
    fns["timm_forward"] = timm_fns["forward"]
    fns["vitcls_forward"] = vitcls_forward(run, batch_np)
  seconds = interleaved(fns, rounds)
  out = {"params": counts, "threads": {"torch": torch.get_num_threads(), "xla": threads()},
         "seconds": seconds, "img_per_s": {}, "over_timm": {}}
  for name, values in seconds.items():
    out["img_per_s"][name] = _timing(values).rate(s.batch)
    base = next((f"timm_{p}" for p in ("grad", "forward") if name.endswith(p)), "timm")
    if name != base:
      ratios = _over(seconds, name, base)
      out["over_timm"][name] = {"median": statistics.median(ratios), "low": min(ratios),
                                "high": max(ratios)}
  return out


def launch_child(s: Sizes, name: str, timeout: float = 900) -> dict:
  """vitcls and timm timed again in a fresh process, as CHILDREN[name] says."""
  flags, cores, variants = CHILDREN[name]
  env = dict(os.environ, XLA_FLAGS=flags, TF_CPP_MIN_LOG_LEVEL="2")
  command = [sys.executable, "-m", "benchmarks.vs_timm", "--child", f"--cores={cores}",
             f"--variants={','.join(variants if s != TINY else ())}"]
  proc = subprocess.run(command + (["--tiny"] if s == TINY else []), cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)
  lines = [l for l in proc.stdout.splitlines() if l.startswith(_PREFIX)]
  if proc.returncode != 0 or not lines:
    return {"error": f"exit {proc.returncode}: {proc.stderr[-1500:]}"}
  return dict(json.loads(lines[-1][len(_PREFIX):]), xla_flags=flags, cores=cores)


def _child_main(argv: list[str]) -> None:
  args = dict(a[2:].split("=", 1) for a in argv if "=" in a)
  cores = int(args["cores"])
  if cores and hasattr(os, "sched_setaffinity"):  # Before XLA and torch size their pools.
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:cores])
  sizes = TINY if "--tiny" in argv else FULL
  result = measure(sizes, tuple(v for v in args["variants"].split(",") if v),
                   rounds=sizes.child_rounds)
  print(_PREFIX + json.dumps(result), flush=True)
  os._exit(0)  # Measured; tearing down torch's and XLA's pools takes seconds.


def skipped(tiny: bool) -> common.Result:
  """The result without torch/timm: one NaN row saying the comparison was skipped."""
  return common.Result(NAME, {"skipped": SKIPPED}, [common.Row(NAME, SKIPPED, math.nan)],
                       tiny=tiny)


def run(tiny: bool) -> common.Result:
  """vitcls / timm img/s of the ViT-Ti/16 step (goal >= 1), one-core ratio, parameter check."""
  if import_torch_timm() is None:
    return skipped(tiny)
  s = TINY if tiny else FULL
  figures = {"sizes": dataclasses.asdict(s), "timm_model": TIMM_MODEL,
             "timm_reference_params": TIMM_VIT_TI16_PARAMS,
             "load_average": {"start": os.getloadavg()}}  # Others' work on the machine.
  figures.update(measure(s, s.variants, s.rounds))
  print(f"vitcls/timm {figures['over_timm']['vitcls']['median']:.3f}", flush=True)
  figures["children"] = {}
  for name in s.children:
    child = figures["children"][name] = launch_child(s, name)
    print(f"{name}: vitcls/timm "
          f"{child['over_timm']['vitcls']['median'] if 'error' not in child else child}",
          flush=True)
  figures["load_average"]["end"] = os.getloadavg()
  one = figures["children"].get("one_core", {}).get("over_timm", {}).get("vitcls")
  counts = figures["params"]
  same = (counts["vitcls"] == counts["timm_no_embed_class"]
          and counts["timm"] - counts["vitcls"] == s.width
          and (tiny or counts["timm"] == TIMM_VIT_TI16_PARAMS))
  ratio = figures["over_timm"]["vitcls"]
  rates = figures["img_per_s"]
  rows = [
      common.ratio_row(NAME, "vitcls img/s over timm img/s (ViT-Ti/16 train step)",
                       ratio["median"], 1.0, f"{ratio['low']:.2f}-{ratio['high']:.2f}"),
      common.Row(NAME, "vitcls ViT-Ti/16 train step", rates["vitcls"]["median"], "img/s",
                 f"{rates['vitcls']['low']:.2f}-{rates['vitcls']['high']:.2f}"),
      common.Row(NAME, "timm ViT-Ti/16 train step", rates["timm"]["median"], "img/s",
                 f"{rates['timm']['low']:.2f}-{rates['timm']['high']:.2f}"),
      common.Row(NAME, f"parameters: vitcls {counts['vitcls']:,} / timm no_embed_class "
                 f"{counts['timm_no_embed_class']:,} (default {counts['timm']:,})",
                 counts["vitcls"] / counts["timm_no_embed_class"], "x", goal="== 1",
                 met=same)]
  if one:
    rows.insert(1, common.ratio_row(
        NAME, "vitcls img/s over timm img/s, one core each (less moved by others' load)",
        one["median"], spread=f"{one['low']:.2f}-{one['high']:.2f}"))
  return common.Result(NAME, figures, rows, tiny=tiny)


if __name__ == "__main__":
  if "--child" in sys.argv:
    _child_main(sys.argv[1:])
  else:
    common.main(run)
