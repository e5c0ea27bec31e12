"""`input.on_device`: the split kept on devices, augmented in the step, same stream contract."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitcls import configs, validate
from vitcls.run import build
from vitcls.data import pp as pp_lib
from vitcls.data.pp import device, planning, registry
from tests.conftest import DEFAULT_EXPERIMENT


def _images(n=64, h=6, w=7, c=2, seed=0):
  return np.random.default_rng(seed).integers(1, 256, size=(n, h, w, c), dtype=np.uint8)


def _run(spec, batch, key=None):
  key = jax.random.key(3) if key is None else key
  return jax.device_get(jax.jit(pp_lib.plan(spec, on_device=True).augmenter())(batch, key))


def test_the_spec_splits_before_its_first_random_op():
  plan = pp_lib.plan("decode|resize(32)|random_shift(2)|value_range(-1,1)", on_device=True)
  assert plan.host_spec == "decode|resize(32)"
  assert [c[1] for c in plan.device] == ["random_shift", "value_range"]
  plan = pp_lib.plan("resize(8)|onehot(10)", on_device=True)
  assert (plan.host_spec, plan.device) == ("resize(8)|onehot(10)", ())
  with pytest.raises(pp_lib.DeviceInputError, match="'randaug.2,10.'.*on_device=False"):
    pp_lib.plan("random_shift(2)|randaug(2,10)|value_range(-1,1)", on_device=True)
  # Each twin the JAX-free registry names (the validator reads it) is a device factory.
  twins = pp_lib.available_ops(lambda e: e.jax_twin is not None)
  assert twins == ["drop", "flip_lr", "keep", "normalize", "onehot", "random_crop",
                   "random_shift", "value_range"]
  assert all(callable(registry.get(n).jax_factory()) for n in twins)
  assert device.random_shift is registry.get("random_shift").jax_factory()


def test_the_validator_names_an_op_without_a_twin_before_anything_is_built():
  config = configs.resolve(configs.load_experiment(DEFAULT_EXPERIMENT + ":runlocal=True"),
                           ["input.pp=random_shift(2)|randaug(2,10)|onehot(10)"])
  problems = validate.problems(config, num_devices=1, process_count=1)
  assert any("input.on_device" in p and "randaug" in p for p in problems), problems
  config.input.on_device = False
  assert validate.problems(config, num_devices=1, process_count=1) == []


def test_random_shift_is_a_zero_filled_shift_of_at_most_max_px_and_draws_every_shift():
  images = _images(n=400)
  out = _run("random_shift(2)", {"image": images})["image"]
  assert out.shape == images.shape and out.dtype == images.dtype
  seen = set()
  for img, got in zip(images, out):
    padded = np.pad(img, ((2, 2), (2, 2), (0, 0)))
    matches = [(dy, dx) for dy in range(5) for dx in range(5)
               if np.array_equal(padded[dy:dy + 6, dx:dx + 7], got)]
    assert len(matches) == 1  # Pixels are never 0, so exactly one window fits.
    seen.add(matches[0])
  assert len(seen) == 25  # All (2*2+1)^2 shifts, 400 draws: each has p ~ 1e-7 of missing.


def test_random_crop_and_flip_are_windows_and_mirrors_of_each_example():
  images = _images(n=200)
  out = _run("random_crop(4, 5)|flip_lr", {"image": images})["image"]
  assert out.shape == (200, 4, 5, 2)
  flipped = 0
  for img, got in zip(images, out):
    windows = [img[t:t + 4, l:l + 5] for t in range(3) for l in range(3)]
    plain = any(np.array_equal(w, got) for w in windows)
    mirrored = any(np.array_equal(w[:, ::-1], got) for w in windows)
    assert plain or mirrored
    flipped += mirrored and not plain
  assert 70 < flipped < 130  # Binomial(200, 1/2): outside this range has p < 1e-4.


def test_deterministic_ops_equal_the_host_ops():
  images, labels = _images(n=8), np.arange(8, dtype=np.int32) % 5
  spec = "value_range(-1,1)|onehot(5, on=0.9, off=0.025)"
  # random_shift(0) draws but moves nothing: the ops after it run on the device.
  got = _run("random_shift(0)|" + spec, {"image": images, "label": labels})
  host = pp_lib.parse(spec)
  for i in range(8):
    want = host({"image": images[i], "label": labels[i]}, np.random.default_rng(0))
    np.testing.assert_allclose(got["image"][i], want["image"], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(got["labels"][i], want["labels"])
  norm = "normalize((0.485, 0.456), (0.229, 0.224))"
  got = _run("random_shift(0)|" + norm, {"image": images})["image"]
  want = np.stack([pp_lib.parse(norm)({"image": x}, None)["image"] for x in images])
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  assert _run("random_shift(0)|keep('image')", {"image": images, "label": labels}).keys() == {"image"}


def test_draws_depend_on_the_key_and_the_position_only():
  images = np.repeat(_images(n=1), 16, axis=0)  # 16 copies of one image.
  a = _run("random_shift(3)", {"image": images})["image"]
  b = _run("random_shift(3)", {"image": images})["image"]
  c = _run("random_shift(3)", {"image": images}, key=jax.random.key(4))["image"]
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert len({x.tobytes() for x in a}) > 1  # Positions draw apart, even for equal images.
  # Example i's draw does not depend on the batch it sits in.
  head = _run("random_shift(3)", {"image": images[:5]})["image"]
  np.testing.assert_array_equal(head, a[:5])


def test_the_device_stream_trains_on_the_same_examples_as_the_host_stream():
  experiment = configs.load_experiment(DEFAULT_EXPERIMENT + ":runlocal=True")
  runs = {}
  for on_device in (False, True):
    config = configs.resolve(experiment, [f"input.on_device={on_device}"])
    runs[on_device] = build.build(config)
  device = runs[True]
  assert device.device_data["image"].shape == (4000, 28, 28, 1)
  assert device.device_data["image"].dtype == jnp.uint8
  host_batches, device_batches = runs[False].batches(0), device.batches(0)
  later = device.batches(2)
  for step in range(4):
    host, index = next(host_batches), next(device_batches)["_index"]
    labels = np.asarray(device.device_data["label"])[np.asarray(index)]
    np.testing.assert_array_equal(labels, np.asarray(host["label"]))
    if step >= 2:  # A resumed stream starts at its step, not replaying the earlier ones.
      np.testing.assert_array_equal(np.asarray(next(later)["_index"]), np.asarray(index))


def test_a_train_step_on_device_input_is_a_pure_function_of_state_and_step():
  config = configs.resolve(configs.load_experiment(DEFAULT_EXPERIMENT + ":runlocal=True"), [])
  run = build.build(config)
  batch = next(run.batches(0))
  first = [float(run.train_step(run.init_state(), batch)[1]["loss"]) for _ in range(2)]
  assert first[0] == first[1] and np.isfinite(first[0])
  lowered = run.train_step.lower(run.init_state(), batch)
  assert lowered.compile().cost_analysis()  # Benchmarks read FLOPs through `.lower`.


# `input.normalize_on_device`: the host pipeline's closing value_range / normalize.

@pytest.mark.parametrize("spec, host, tail", [
    ("decode|inception_crop(24)|flip_lr|value_range(-1,1)|onehot(10)|keep('image','labels')",
     "decode|inception_crop(24)|flip_lr|onehot(10)|keep('image','labels')", ["value_range"]),
    ("resize(8)|normalize(0.5, 0.25)|value_range(0, 1, -2, 2)",
     "resize(8)", ["normalize", "value_range"]),
    ("value_range(-1,1)|random_shift(2)", "value_range(-1,1)|random_shift(2)", []),
    ("resize(8)|onehot(10)", "resize(8)|onehot(10)", []),
])
def test_the_closing_value_range_and_normalize_split_off(spec, host, tail):
  got_host, got_tail = planning.tail_split(spec)
  assert got_host == host and [c[1] for c in got_tail] == tail


def test_closing_value_range_runs_in_the_step_on_uint8_batches():
  experiment = configs.load_experiment(DEFAULT_EXPERIMENT + ":runlocal=True")
  runs = {flag: build.build(configs.resolve(experiment, [
      "input.on_device=False", f"input.normalize_on_device={flag}"])) for flag in (True, False)}
  assert "value_range" not in runs[True].pp.spec and "value_range" in runs[False].pp.spec
  small, full = next(runs[True].batches(0)), next(runs[False].batches(0))
  assert small["image"].dtype == jnp.uint8 and full["image"].dtype == jnp.float32
  _, tail = planning.tail_split(experiment.input.pp)
  finished = jax.jit(device.finisher(tail))(small)
  np.testing.assert_allclose(finished["image"], full["image"], rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(small["labels"], full["labels"])
  losses = {}
  for flag, run in runs.items():
    state, batches = run.init_state(), run.batches(0)
    for _ in range(3):
      state, metrics = run.train_step(state, next(batches))
    losses[flag] = float(metrics["loss"])
  assert losses[True] == pytest.approx(losses[False], rel=1e-5) and losses[True] != pytest.approx(
      float(np.log(10)), rel=1e-3)  # It trained: the zero-init head's loss has moved.


def test_a_float_image_before_value_range_stays_on_the_host():
  experiment = configs.load_experiment(DEFAULT_EXPERIMENT + ":runlocal=True")
  config = configs.resolve(experiment, [
      "input.on_device=False", "input.pp=value_range(0,1)|resize(28)|value_range(-1,1,0,1)"])
  source = build.sources.get_source(config.input.data.name, config.input.data.split)
  plan = pp_lib.plan(config.input.pp, lambda encoded: source, normalize_on_device=True)
  assert (plan.host_spec, plan.device) == (config.input.pp, ())
  assert build.build(config).pp.spec == config.input.pp


def test_evaluators_ship_uint8_batches_and_compute_the_same_logits():
  from vitcls import sharding  # pylint: disable=g-import-not-at-top
  from vitcls import inference  # pylint: disable=g-import-not-at-top
  experiment = configs.load_experiment(DEFAULT_EXPERIMENT + ":runlocal=True")
  runs, outs = {}, {}
  for flag in (True, False):
    config = configs.resolve(experiment, [f"input.normalize_on_device={flag}"])
    run = runs.setdefault(flag, build.build(config))
    mesh = sharding.make_mesh([("data", -1)])
    split = inference.Inference(
        model=run.model, name="mnist5k", split="test", pp=config.evals.test.pp,
        batch_size=100, train_config=config, mesh=mesh,
        batch_sharding=sharding.batch_sharding(mesh), max_examples=300)
    assert split.dataset[0]["image"].dtype == (np.uint8 if flag else np.float32)
    params = jax.tree_util.tree_map(  # Not the zero head: logits that vary.
        lambda x: x + 0.01 * jnp.arange(x.size, dtype=x.dtype).reshape(x.shape) % 1.3,
        run.init_state().params)
    outs[flag] = split.run(params)
  np.testing.assert_allclose(outs[True]["logits"], outs[False]["logits"], rtol=1e-5,
                             atol=1e-5)
  assert np.ptp(outs[True]["logits"]) > 0.1
  np.testing.assert_array_equal(outs[True]["labels"], outs[False]["labels"])
