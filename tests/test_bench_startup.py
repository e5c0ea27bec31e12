"""Smoke tests of benchmarks/first_step.py and benchmarks/vs_timm.py at tiny sizes.

What can break without a timing changing: the child's phase clock (phases add up to its
first step, which comes before the process exits), its cache verdicts, the cold/warm
arithmetic, the ViT-Ti parameter-count match between vitcls and timm, the attention
swap, and the row saying torch/timm are missing. No assertion is about speed.
"""

import math
import os
import sys

import pytest

from benchmarks import common, first_step, vs_timm


def test_first_step_cold_launch_reports_phases_and_fills_its_cache(tmp_path):
  model = first_step.models(tiny=True)[0]
  cache = str(tmp_path / "cache")
  # Tiny programs compile in under JAX's 1 s threshold for caching: cache them anyway.
  result = first_step.launch_child(model, cache,
                                   env={"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"})
  phases = result["phases"]
  assert list(phases) == list(first_step.PHASES)
  assert all(v >= 0 for v in phases.values()), phases
  assert sum(phases.values()) == pytest.approx(result["first_step_s"], abs=1e-6)
  assert 0 < result["first_step_s"] <= result["exit_s"]  # Child and parent clocks agree.
  assert phases["imports"] > 0 and phases["compile"] > 0 and phases["step"] > 0
  assert result["cache_dir"] == cache and os.listdir(cache)  # The launch wrote its cache.
  step = result["jax"][result["step_function"]]
  assert step["cache"] == "miss" and step["compile"] > 0  # Cold: compiled, not read.
  assert phases["compile"] == pytest.approx(step["compile"])  # Split by JAX's events.


def test_first_step_arithmetic():
  marks = [("python", 1.0), ("imports", 3.0), ("config", 3.5), ("imports", 6.0),
           ("step", 7.0)]
  p = first_step.phases(0.5, marks)
  assert p["python"] == 0.5 and p["imports"] == 4.5 and p["config"] == 0.5
  assert p["step"] == 1.0 and p["compile"] == 0.0 and sum(p.values()) == 6.5

  figures, rows = first_step.summarize("m", [10.0, 12.0, 9.0], [5.0, 4.0, 6.0], goal=2.0)
  assert figures["speedup"] == [2.0, 3.0, 1.5]
  cold, warm, speedup = rows
  assert (cold.value, warm.value) == (10.0, 5.0) and cold.spread == "9.00-12.00"
  assert speedup.value == 2.0 and speedup.met and speedup.goal == ">= 2"
  assert not first_step.summarize("m", [3.0], [2.0], goal=2.0)[1][2].met


def test_vs_timm_tiny_matches_parameter_counts():
  pytest.importorskip("torch")
  pytest.importorskip("timm")
  result = vs_timm.run(tiny=True)
  counts = result.figures["params"]
  # Same layout as timm's no_embed_class; timm's default adds the cls token's posemb.
  assert counts["vitcls"] == counts["timm_no_embed_class"]
  assert counts["timm"] - counts["vitcls"] == vs_timm.TINY.width
  assert result.figures["threads"]["torch"] == result.figures["threads"]["xla"]
  ratio, vitcls_rate, timm_rate, params = result.rows
  assert ratio.goal == ">= 1" and ratio.met is not None and ratio.value > 0
  assert vitcls_rate.value > 0 and timm_rate.value > 0 and params.met
  assert {"vitcls", "timm"} <= set(result.figures["seconds"])
  assert all(len(v) == vs_timm.TINY.rounds for v in result.figures["seconds"].values())


def test_vs_timm_without_torch_or_timm_is_a_skipped_row(monkeypatch):
  monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` now raises ImportError.
  result = vs_timm.run(tiny=True)
  (row,) = result.rows
  assert row.figure.startswith("skipped: torch/timm not installed")
  assert math.isnan(row.value) and row.met is None
  assert "skipped" in common.table([vars(row)])


def test_dot_product_attention_swap_keeps_the_maths():
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from vitcls.models import vit  # pylint: disable=g-import-not-at-top
  model = vit.Model(num_classes=10, width=32, depth=1, mlp_dim=64, num_heads=2,
                    patch_size=8, pool_type="tok")
  images = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  # A new function each time: JAX reuses the trace of a function it has seen.
  apply = lambda: lambda p, x: model.apply({"params": p}, x)[0]  # noqa: E731
  shapes = jax.eval_shape(lambda k: model.init(k, images)["params"], jax.random.key(0))
  plain = str(jax.make_jaxpr(apply())(shapes, images))
  with vs_timm.dot_product_attention():
    swapped = str(jax.make_jaxpr(apply())(shapes, images))
  assert swapped != plain  # The swap reached the traced program,
  assert vit.nn is nn  # and the module is restored after it.

  def both(params, x):  # One program; the swap is on for the second apply only.
    first = apply()(params, x)
    with vs_timm.dot_product_attention():
      return first, apply()(params, x)

  rng = np.random.default_rng(1)
  params = jax.tree_util.tree_map(
      lambda s: rng.normal(0, 0.2, s.shape).astype(np.float32), shapes)
  expected, got = jax.jit(both)(params, images)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)  # Same maths.
  assert np.abs(expected).std() > 1e-2  # (Logits that differ: a real comparison.)
