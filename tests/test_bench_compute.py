"""benchmarks/mfu.py and benchmarks/scaling.py at tiny sizes: they run and write their
results, XLA's FLOP count agrees with the closed form, and FSDP's per-device state is
what the shapes imply. No timing is asserted (tiny speeds mean nothing)."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import common, mfu, scaling
from vitcls import models


@pytest.mark.parametrize("pool_type, rep_size", [("gap", False), ("tok", True)])
def test_xla_forward_flops_match_the_closed_form(pool_type, rep_size):
  model = models.build("vit", 10, dict(width=128, depth=2, mlp_dim=512, num_heads=4,
                                       patch_size=4, pool_type=pool_type,
                                       rep_size=rep_size))
  images = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(images.shape)))
  lowered = jax.jit(lambda p, x: model.apply(p, x)[0]).lower(params, images)
  analytic = 2 * mfu.vit_flops(model, 32, 10)["forward"]
  # XLA also counts LayerNorm, softmax and GELU, which the closed form leaves out.
  assert 1.0 <= mfu.xla_flops(lowered) / analytic < 1.05


def test_xla_train_step_flops_are_three_forwards_of_the_closed_form():
  """Backward = 2 x forward (but the patch embedding's input gradient) in the real step."""
  spec = mfu.Spec("ViT", mfu.VIT_EXPERIMENT, dict(variant=None, width=128, depth=2,
                                                  mlp_dim=512, num_heads=4, patch_size=4),
                  image_size=32, batch=8, num_classes=10, fast_compile=True)
  bench = mfu.make_step(spec)
  analytic = spec.batch * mfu.vit_flops(bench.model, 32, 10)["train"]
  # Beyond the matmuls: norms, activations, the loss and the optimiser's updates.
  assert 1.0 <= mfu.xla_flops(bench.lower()) / analytic < 1.05


def test_mfu_tiny_runs_and_writes_its_json(tmp_path):
  result = mfu.run(tiny=True)
  with open(common.write(result, str(tmp_path))) as f:
    written = json.load(f)
  assert written["rows"] and all(r["benchmark"] == "mfu" for r in written["rows"])
  model = written["figures"]["models"]["ViT-S/16"]
  assert written["figures"]["peak_flops_per_s"] > 0 and model["mfu"]["median"] > 0
  # The step is forward + backward + optimiser: about 3 forwards of matmuls, a little more.
  assert 1.0 <= model["xla_over_analytic"] < 1.5


def test_datasheet_peaks_pick_the_specific_chip():
  assert mfu.datasheet_peak("NVIDIA H100 PCIe") == 756e12
  assert mfu.datasheet_peak("NVIDIA H100 80GB HBM3") == 989e12
  assert mfu.datasheet_peak("NVIDIA A100-SXM4-80GB") == 312e12
  assert mfu.datasheet_peak("cpu") is None


@pytest.fixture(scope="module")
def scaling_tiny(tmp_path_factory):
  results_dir = str(tmp_path_factory.mktemp("results"))
  return scaling.run(tiny=True, results_dir=results_dir), results_dir


def test_scaling_tiny_runs_and_writes_its_json_and_plot(scaling_tiny):
  result, results_dir = scaling_tiny
  with open(common.write(result, results_dir)) as f:
    written = json.load(f)
  assert written["rows"] and written["plots"] == ["scaling_tiny.png"]
  assert os.path.getsize(os.path.join(results_dir, "scaling_tiny.png")) > 0
  figures = written["figures"]
  assert [p["image_size"] for p in figures["resolution"]] == [16, 32]
  assert figures["compile"]["median_s"] > 0
  assert all(m["peak"] > 0 for m in figures["memory"].values())
  assert all(figures["fsdp"][k]["memory"]["peak"] > 0 for k in ("replicated", "fsdp"))


def test_fsdp_state_per_device_is_what_the_shapes_imply(scaling_tiny):
  fsdp = scaling_tiny[0].figures["fsdp"]
  assert fsdp["devices"] == scaling.FSDP_DEVICES
  abstract = jax.eval_shape(mfu.make_step(scaling.memory_spec(tiny=True)).init_fn)
  total = per_device = 0
  for field in scaling.STATE_FIELDS:
    for leaf in jax.tree_util.tree_leaves(getattr(abstract, field)):
      size = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
      split = any(d % scaling.FSDP_DEVICES == 0 for d in leaf.shape)
      total += size
      per_device += size // scaling.FSDP_DEVICES if split else size
  assert fsdp["replicated"]["state_bytes"] == {"total": total, "per_device": total}
  assert fsdp["fsdp"]["state_bytes"] == {"total": total, "per_device": per_device}
  assert fsdp["fraction"] == pytest.approx(per_device / total)
  assert 1 / scaling.FSDP_DEVICES < fsdp["fraction"] <= 1 / 6
