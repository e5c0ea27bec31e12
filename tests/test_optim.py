"""Schedules, weight-decay masks, clipping and optimiser choice against closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vitcls import configs, optim, validate


def _config(**fields):
  c = configs.resolve(configs.ConfigDict())
  c.unlock()
  for key, value in fields.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def test_warmup_then_cosine_matches_the_closed_form():
  c = _config(lr=0.1, **{"schedule.warmup_steps": 10, "schedule.decay_type": "cosine",
                         "schedule.end_factor": 0.01})
  sched = optim.make_schedule(c, total_steps=110)
  for step in [0, 5, 10]:
    np.testing.assert_allclose(sched(step), 0.1 * step / 10, rtol=1e-6)
  for step in [10, 35, 60, 110]:
    t = (step - 10) / 100
    expected = 0.1 * (0.01 + 0.99 * 0.5 * (1 + np.cos(np.pi * t)))
    np.testing.assert_allclose(sched(step), expected, rtol=1e-5)


@pytest.mark.parametrize("decay, expected", [
    ("linear", lambda s: 0.2 * (1 - (s - 4) / 16)),
    ("rsqrt", lambda s: 0.2 / np.sqrt(1 + (s - 4) / 8)),
    ("constant", lambda s: 0.2),
])
def test_linear_rsqrt_constant_decays(decay, expected):
  c = _config(lr=0.2, **{"schedule.warmup_steps": 4, "schedule.decay_type": decay,
                         "schedule.timescale": 8})
  sched = optim.make_schedule(c, total_steps=20)
  for step in [4, 9, 20]:
    np.testing.assert_allclose(sched(step), expected(step), rtol=1e-5)


def _check(config, total_steps=10):
  """`validate`'s checks of the config, before JAX and at build time (they live there)."""
  with config.unlocked(), config.ignore_type():
    config.total_epochs = 1.0  # The length is known at build time only.
  validate.check(config)
  validate.check_built(config, total_steps=total_steps,
                       optax_arguments=optim.optimizer_arguments(config.optax_name))


def test_warmup_percent_and_bad_schedule():
  c = _config(**{"schedule.warmup_percent": 0.25})
  assert configs.warmup_steps(c, 40) == 10
  with pytest.raises(configs.ConfigError, match="schedule.decay_type: unknown value 'cosin'"):
    _check(_config(**{"schedule.decay_type": "cosin"}))
  with pytest.raises(configs.ConfigError, match="warmup .* is longer than the run"):
    _check(_config(**{"schedule.warmup_steps": 50}))


def _params():
  return {"Dense_0": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))},
          "LayerNorm_0": {"scale": jnp.ones((2,))}}


def test_adamw_decays_only_kernels_decoupled_from_the_gradient():
  c = _config(lr=0.1, wd=0.5, optax_name="adamw", grad_clip_norm=0.0,
              **{"schedule.decay_type": "constant"})
  tx, _ = optim.make_optimizer(c, total_steps=10)
  params = _params()
  zero_grads = jax.tree_util.tree_map(jnp.zeros_like, params)
  updates, _ = tx.update(zero_grads, tx.init(params), params)
  # With zero gradients only decoupled decay moves weights: -lr * wd * p on kernels.
  np.testing.assert_allclose(updates["Dense_0"]["kernel"], -0.1 * 0.5 * np.ones((2, 2)),
                             rtol=1e-6)
  np.testing.assert_allclose(updates["Dense_0"]["bias"], 0.0)
  np.testing.assert_allclose(updates["LayerNorm_0"]["scale"], 0.0)


def test_sgd_momentum_matches_a_numpy_reference():
  c = _config(lr=0.1, wd=0.01, optax_name="sgd", grad_clip_norm=0.0,
              optax=configs.ConfigDict({"momentum": 0.9}),
              **{"schedule.decay_type": "constant"})
  tx, _ = optim.make_optimizer(c, total_steps=10)
  p = {"w": {"kernel": jnp.array([1.0, -2.0])}}
  state = tx.init(p)
  ref_p, ref_m = np.array([1.0, -2.0]), np.zeros(2)
  for g in [np.array([0.5, 0.1]), np.array([-0.2, 0.3]), np.array([0.1, 0.1])]:
    updates, state = tx.update({"w": {"kernel": jnp.asarray(g)}}, state, p)
    p = optax.apply_updates(p, updates)
    ref_m = 0.9 * ref_m + g
    ref_p = ref_p - 0.1 * (ref_m + 0.01 * ref_p)
  np.testing.assert_allclose(p["w"]["kernel"], ref_p, rtol=1e-6)


def test_global_norm_clipping_bounds_the_update():
  c = _config(lr=1.0, wd=0.0, optax_name="sgd", grad_clip_norm=1.0,
              optax=configs.ConfigDict({"momentum": 0.0}),
              **{"schedule.decay_type": "constant"})
  tx, _ = optim.make_optimizer(c, total_steps=10)
  p = {"kernel": jnp.zeros(2)}
  updates, _ = tx.update({"kernel": jnp.array([3.0, 4.0])}, tx.init(p), p)
  np.testing.assert_allclose(updates["kernel"], [-0.6, -0.8], rtol=1e-6)


def test_adafactor_builds_and_unknown_options_are_errors():
  tx, _ = optim.make_optimizer(_config(optax_name="adafactor"), total_steps=10)
  p = _params()
  updates, _ = tx.update(jax.tree_util.tree_map(jnp.ones_like, p), tx.init(p), p)
  assert np.isfinite(np.asarray(updates["Dense_0"]["kernel"])).all()
  with pytest.raises(configs.ConfigError, match="optax_name: unknown value 'adam'"):
    _check(_config(optax_name="adam"))
  with pytest.raises(configs.ConfigError, match="unknown config key 'optax.beta1'"):
    _check(_config(optax=configs.ConfigDict({"beta1": 0.9})))


def _run(tx, params, n=4, seed=0):
  """n updates with random gradients; returns (params, opt_state)."""
  state = tx.init(params)
  rng = np.random.default_rng(seed)
  for _ in range(n):
    grads = jax.tree_util.tree_map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype),
                                   params)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def _random_params(seed=1):
  rng = np.random.default_rng(seed)
  return {"embedding": {"kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)},
          "head": {"kernel": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32),
                   "bias": jnp.asarray(rng.normal(size=(2,)), jnp.float32)}}


def test_frozen_parameters_never_change_and_have_no_optimizer_state():
  c = _config(lr=0.1, wd=0.1, optax_name="adamw", frozen=["embedding/.*"])
  tx, _ = optim.make_optimizer(c, total_steps=10)
  params = _random_params()
  new, state = _run(tx, params)
  assert new["embedding"]["kernel"].tobytes() == params["embedding"]["kernel"].tobytes()
  assert not np.allclose(new["head"]["kernel"], params["head"]["kernel"])
  state_sizes = [x.size for x in jax.tree_util.tree_leaves(state) if np.ndim(x) > 0]
  assert sum(state_sizes) == 2 * (6 + 2)  # Adam's mu and nu of the head only.
  with pytest.raises(configs.ConfigError, match="config.frozen: bad regex"):
    _check(_config(frozen=["head/("]))


def test_lr_mults_scale_the_update_of_exactly_the_matching_leaves():
  base = dict(lr=0.1, wd=0.0, optax_name="sgd", grad_clip_norm=0.0,
              optax=configs.ConfigDict({"momentum": 0.9}),
              **{"schedule.decay_type": "constant"})
  params = _random_params()
  plain, _ = _run(optim.make_optimizer(_config(**base), 10)[0], params)
  mults = [("head/kernel", 10.0), ("head/.*", 0.5)]  # First match wins.
  scaled, _ = _run(optim.make_optimizer(_config(**base, lr_mults=mults), 10)[0], params)
  for path, mult in [(("embedding", "kernel"), 1.0), (("head", "kernel"), 10.0),
                     (("head", "bias"), 0.5)]:
    delta_plain = plain[path[0]][path[1]] - params[path[0]][path[1]]
    delta_scaled = scaled[path[0]][path[1]] - params[path[0]][path[1]]
    np.testing.assert_allclose(delta_scaled, mult * delta_plain, rtol=1e-5, atol=1e-7)


def _decay_only_update(mode, lr, wd, step, optax_name="adamw", **fields):
  """The update of a kernel of ones under zero gradients after `step` updates."""
  c = _config(lr=lr, wd=wd, wd_mode=mode, optax_name=optax_name, grad_clip_norm=0.0,
              **{"schedule.warmup_steps": 10, "schedule.decay_type": "cosine"}, **fields)
  tx, sched = optim.make_optimizer(c, total_steps=110)
  params = {"Dense_0": {"kernel": jnp.ones((2,)), "bias": jnp.ones((2,))}}
  state = tx.init(params)
  zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
  for _ in range(step + 1):
    updates, state = tx.update(zeros, state, params)
  return updates["Dense_0"], float(sched(step))


@pytest.mark.parametrize("step", [3, 10, 60])
def test_wd_modes_scale_the_decay_as_documented(step):
  lr, wd = 1e-3, 1e-4
  times_lr, lr_t = _decay_only_update("times_lr", lr, wd, step)
  np.testing.assert_allclose(times_lr["kernel"], -lr_t * wd, rtol=1e-5)
  # big_vision: the schedule's shape, not the base lr: wd=1e-4 at lr=1e-3 is AdamW's 0.1.
  times_sched, _ = _decay_only_update("times_schedule", lr, wd, step)
  np.testing.assert_allclose(times_sched["kernel"], -(lr_t / lr) * wd, rtol=1e-5)
  adamw_01, _ = _decay_only_update("times_lr", lr, 0.1, step)
  np.testing.assert_allclose(times_sched["kernel"], adamw_01["kernel"], rtol=1e-5)
  for upd in (times_lr, times_sched):
    np.testing.assert_allclose(upd["bias"], 0.0)


def test_l2_weight_decay_goes_through_momentum_like_torch_sgd():
  """SGD with L2: g + wd*p enters the momentum buffer (torch.optim.SGD weight_decay)."""
  lr, wd, mu = 0.1, 0.01, 0.9
  c = _config(lr=lr, wd=wd, wd_mode="l2", optax_name="sgd", grad_clip_norm=0.0,
              optax=configs.ConfigDict({"momentum": mu}),
              **{"schedule.decay_type": "constant"})
  tx, _ = optim.make_optimizer(c, total_steps=10)
  p = {"Dense_0": {"kernel": jnp.array([1.0, -2.0]), "bias": jnp.array([0.5, 0.5])}}
  grads = [np.array([0.3, -0.1]), np.array([-0.2, 0.4]), np.array([0.1, 0.1])]
  state, ref, buf = tx.init(p), np.array([1.0, -2.0]), np.zeros(2)
  rb, bbuf = np.array([0.5, 0.5]), np.zeros(2)
  for g in grads:
    g_tree = {"Dense_0": {"kernel": jnp.asarray(g), "bias": jnp.asarray(g)}}
    updates, state = tx.update(g_tree, state, p)
    p = optax.apply_updates(p, updates)
    buf = mu * buf + g + wd * ref  # torch: d_p = g + wd * p; buf = mu * buf + d_p.
    ref = ref - lr * buf
    bbuf = mu * bbuf + g  # Biases are outside wd_mask: plain momentum.
    rb = rb - lr * bbuf
  np.testing.assert_allclose(p["Dense_0"]["kernel"], ref, rtol=1e-5)
  np.testing.assert_allclose(p["Dense_0"]["bias"], rb, rtol=1e-5)


def test_stair_schedule_divides_at_the_boundaries():
  """BiT / ResNet: lr / 10 at epochs 30, 60, 80 of 90; boundaries counted from step 0."""
  c = _config(lr=0.4, **{"schedule.warmup_steps": 5, "schedule.decay_type": "stair",
                         "schedule.boundaries": [1 / 3, 2 / 3, 8 / 9],
                         "schedule.stair_factor": 0.1})
  sched = optim.make_schedule(c, total_steps=90)
  expected = {2: 0.4 * 2 / 5, 5: 0.4, 29: 0.4, 30: 0.04, 59: 0.04, 60: 0.004,
              79: 0.004, 80: 0.0004, 90: 0.0004}
  for step, value in expected.items():
    np.testing.assert_allclose(sched(step), value, rtol=1e-5, err_msg=f"step {step}")
  for bad in ([], [0.5, 0.2], [1.5]):
    with pytest.raises(configs.ConfigError, match="schedule.boundaries"):
      _check(_config(**{"schedule.decay_type": "stair", "schedule.boundaries": bad}), 90)
  with pytest.raises(configs.ConfigError, match="inside the warmup"):
    _check(_config(**{"schedule.decay_type": "stair", "schedule.warmup_steps": 40,
                      "schedule.boundaries": [0.25]}), 90)
  with pytest.raises(configs.ConfigError, match="wd_mode: unknown value 'l3'"):
    _check(_config(wd_mode="l3"))
