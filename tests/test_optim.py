"""Schedules, weight-decay masks, clipping and optimiser choice against closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vitcls import configs, optim, validate
from vitcls.models import loading, vit


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


def _previous_schedule(lr, s, warmup, total):
  """make_schedule before warmup_start / decay_from_start / steps_per_update existed."""
  decay_steps = max(total - warmup, 1)
  scales = {}
  for b in s["boundaries"]:
    step = round(b * total) - warmup
    scales[step] = scales.get(step, 1.0) * 0.1
  decay = {
      "cosine": optax.cosine_decay_schedule(lr, decay_steps, alpha=s["end_factor"]),
      "linear": optax.linear_schedule(lr, lr * s["end_factor"], decay_steps),
      "rsqrt": lambda step: lr * (1.0 + step / 8) ** -0.5,
      "constant": optax.constant_schedule(lr),
      "stair": optax.piecewise_constant_schedule(lr, scales),
  }[s["decay_type"]]
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


@pytest.mark.parametrize("decay", ["cosine", "linear", "rsqrt", "constant", "stair"])
@pytest.mark.parametrize("warmup", [0, 7])
def test_default_schedule_fields_leave_every_schedule_bitwise_unchanged(decay, warmup):
  s = {"decay_type": decay, "end_factor": 0.05, "timescale": 8,
       "boundaries": [0.5, 0.8] if decay == "stair" else []}
  c = _config(lr=0.3, **{f"schedule.{k}": v for k, v in s.items()},
              **{"schedule.warmup_steps": warmup})
  new, old = optim.make_schedule(c, 50), _previous_schedule(0.3, s, warmup, 50)
  steps = jnp.arange(51)
  assert np.asarray(new(steps)).tobytes() == np.asarray(old(steps)).tobytes()
  for step in (0, 6, 7, 25, 40, 50):  # Python ints, as make_optimizer's users pass them.
    assert np.asarray(new(step)).tobytes() == np.asarray(old(step)).tobytes()


def _timm_cosine(t, *, lr, warmup_lr, min_lr, warmup_t, t_initial):
  """timm 0.3.2 CosineLRScheduler._get_lr(t), one cycle, t in epochs (or steps)."""
  if t < warmup_t:
    return warmup_lr + t * (lr - warmup_lr) / warmup_t
  return min_lr + 0.5 * (lr - min_lr) * (1 + np.cos(np.pi * t / t_initial))


def _deit_fields(lr, steps_per_epoch, warmup_epochs=5, lag=1):
  return {"lr": lr, "schedule.decay_type": "cosine",
          "schedule.warmup_steps": warmup_epochs * steps_per_epoch,
          "schedule.warmup_start": 1e-6 / lr, "schedule.end_factor": 1e-5 / lr,
          "schedule.decay_from_start": True,
          "schedule.steps_per_update": steps_per_epoch, "schedule.update_lag": lag}


def test_timm_cosine_with_warmup_start_and_decay_from_start_per_step():
  """t in steps (t_in_epochs=False): warmup from warmup_lr, cosine counted from step 0."""
  lr, warmup, total = 2e-3, 10, 100
  fields = _deit_fields(lr, steps_per_epoch=1, warmup_epochs=warmup, lag=0)
  sched = optim.make_schedule(_config(**fields), total)
  for t in (0, 1, 5, 9, 10, 11, 37, 99, 100):
    expected = _timm_cosine(t, lr=lr, warmup_lr=1e-6, min_lr=1e-5, warmup_t=warmup,
                            t_initial=total)
    np.testing.assert_allclose(sched(t), expected, rtol=1e-5, err_msg=f"step {t}")


def test_deit_schedule_is_timm_per_epoch_one_epoch_late():
  """DeiT: lr_scheduler.step(epoch) after each epoch, so epoch e trains at lr(e - 1)."""
  lr, spe, epochs = 1e-3, 3, 20
  sched = optim.make_schedule(_config(**_deit_fields(lr, spe)), epochs * spe)
  timm = lambda e: _timm_cosine(e, lr=lr, warmup_lr=1e-6, min_lr=1e-5,  # noqa: E731
                                warmup_t=5, t_initial=epochs)
  for step in range(epochs * spe):
    expected = timm(max(step // spe - 1, 0))
    np.testing.assert_allclose(sched(step), expected, rtol=1e-5, err_msg=f"step {step}")
  assert float(sched(0)) == float(sched(2 * spe - 1))  # Epochs 0 and 1: both 1e-6.


def test_deit_schedule_at_full_scale():
  """300 epochs of 1,251 steps: 1e-6 twice, the jump to 0.9993e-3 at epoch 6, 1e-5 end."""
  lr, spe = 5e-4 * 1024 / 512, 1251
  sched = optim.make_schedule(_config(**_deit_fields(lr, spe)), 300 * spe)
  cases = {0: 1e-6, 2 * spe - 1: 1e-6, 2 * spe: 1e-6 + (lr - 1e-6) / 5,
           6 * spe - 1: 1e-6 + 4 * (lr - 1e-6) / 5,
           6 * spe: 1e-5 + 0.5 * (lr - 1e-5) * (1 + np.cos(np.pi * 5 / 300)),
           300 * spe - 1: 1e-5 + 0.5 * (lr - 1e-5) * (1 + np.cos(np.pi * 298 / 300))}
  for step, expected in cases.items():
    np.testing.assert_allclose(sched(step), expected, rtol=1e-5, err_msg=f"step {step}")
  np.testing.assert_allclose(sched(6 * spe), 0.9993e-3, rtol=1e-4)
  jitted = jax.jit(sched)(jnp.arange(0, 300 * spe, 997))  # Traced steps (float32).
  np.testing.assert_allclose(jitted, [sched(int(t)) for t in range(0, 300 * spe, 997)],
                             rtol=1e-5)


def test_decay_from_start_counts_stair_boundaries_from_step_0_too():
  c = _config(lr=0.4, **{"schedule.warmup_steps": 5, "schedule.decay_type": "stair",
                         "schedule.boundaries": [1 / 3], "schedule.decay_from_start": True})
  sched = optim.make_schedule(c, total_steps=90)
  for step, value in {2: 0.4 * 2 / 5, 5: 0.4, 29: 0.4, 30: 0.04, 90: 0.04}.items():
    np.testing.assert_allclose(sched(step), value, rtol=1e-5, err_msg=f"step {step}")


def test_bad_schedule_stepping_fields_are_errors():
  for field, value, message in [
      ("warmup_start", -0.1, "schedule.warmup_start must be a finite number >= 0"),
      ("steps_per_update", 0, "schedule.steps_per_update must be >= 1"),
      ("update_lag", -1, "schedule.update_lag must be >= 0")]:
    with pytest.raises(configs.ConfigError, match=message):
      _check(_config(**{f"schedule.{field}": value}))


def test_sgd_bfloat16_momentum_matches_a_numpy_reference():
  """big_vision's momentum_hp: the trace stored in bfloat16, the step from g + mu * m.

  Momentum 0.5 keeps mu * m exact in bfloat16, so the reference is the same whether XLA
  rounds the product (eager) or keeps it in float32 (jit, excess precision).
  """
  import ml_dtypes
  bf16 = ml_dtypes.bfloat16
  lr, mu = 0.1, 0.5
  c = _config(lr=lr, wd=0.0, optax_name="sgd", grad_clip_norm=0.0,
              optax=configs.ConfigDict({"momentum": mu, "accumulator_dtype": "bfloat16"}),
              **{"schedule.decay_type": "constant"})
  _check(c)
  tx, _ = optim.make_optimizer(c, total_steps=10)
  rng = np.random.default_rng(0)
  p0 = rng.normal(size=64).astype(np.float32)
  for update in (tx.update, jax.jit(tx.update)):
    p, state = {"w": {"kernel": jnp.asarray(p0)}}, tx.init({"w": {"kernel": p0}})
    ref_p, ref_m = p0.copy(), np.zeros(64, bf16)
    for _ in range(4):
      g = rng.normal(size=64).astype(np.float32)
      updates, state = update({"w": {"kernel": jnp.asarray(g)}}, state, p)
      p = optax.apply_updates(p, updates)
      step = g + np.float32(mu) * ref_m.astype(np.float32)
      ref_m = step.astype(bf16)
      ref_p = ref_p - np.float32(lr) * step
      (trace,) = [x for x in jax.tree_util.tree_leaves(state) if np.ndim(x)]
      assert trace.dtype == jnp.bfloat16
      assert np.asarray(trace).tobytes() == ref_m.tobytes()
    np.testing.assert_allclose(p["w"]["kernel"], ref_p, rtol=1e-6, atol=1e-7)
  assert not np.allclose(ref_m.astype(np.float32), step, rtol=1e-4)  # Rounding was real.
  with pytest.raises(configs.ConfigError, match="optax.accumulator_dtype must be one of"):
    _check(_config(optax_name="sgd",
                   optax=configs.ConfigDict({"accumulator_dtype": "bf16"})))


# Layer-wise lr decay: the models number their layers (`layer_ids`), the optimiser scales.
_TINY_VIT = dict(width=8, depth=3, mlp_dim=16, num_heads=2, patch_size=4, pool_type="tok",
                 head_zeroinit=False)
_TINY_MIXER = dict(hidden_dim=8, num_blocks=3, tokens_mlp_dim=6, channels_mlp_dim=12,
                   patch_size=4, head_zeroinit=False)


def _model_params(name, **fields):
  from vitcls import models  # pylint: disable=g-import-not-at-top
  model = models.build(name, 3, fields)
  params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"]
  return jax.tree_util.tree_map(np.asarray, params)


def _stacked(params, prefix, depth, into):
  """`prefix{i}` subtrees (i < depth) of a params dict stacked into one, named `into`."""
  rest = {k: v for k, v in params.items() if not k.startswith(prefix)}
  blocks = [params[f"{prefix}{i}"] for i in range(depth)]
  return dict(rest, **{into: jax.tree_util.tree_map(lambda *xs: np.stack(xs), *blocks)})


def _sgd_step(params, grads, **fields):
  """One update of plain SGD (lr 0.1, wd 0.01 on kernels) with `fields` in the config."""
  c = _config(lr=0.1, wd=0.01, optax_name="sgd", grad_clip_norm=0.0,
              optax=configs.ConfigDict({"momentum": 0.0}),
              **{"schedule.decay_type": "constant"}, **fields)
  tx, _ = optim.make_optimizer(c, total_steps=10)
  updates, _ = tx.update(grads, tx.init(params), params)
  return jax.tree_util.tree_map(np.asarray, updates)


def _plain_sgd(params, grads):
  """The closed form of `_sgd_step` without multipliers: -lr (g + wd p), wd on kernels."""
  return jax.tree_util.tree_map_with_path(
      lambda path, p, g: -0.1 * (g + (0.01 * p if path[-1].key == "kernel" else 0.0)),
      params, grads)


def _random_like(params, seed=3):
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda p: rng.normal(size=np.shape(p)).astype(np.float32), params)


def _vit_factor(path, decay, depth):
  """BEiT's closed form: block i decay**(depth+1 - (i+1)); embeddings decay**(depth+1)."""
  if path.startswith("Transformer/encoderblock_"):
    i = int(path.split("/")[1][len("encoderblock_"):])
    return decay ** (depth + 1 - (i + 1))
  if path.split("/")[0] in ("embedding", "pos_embedding", "cls"):
    return decay ** (depth + 1)
  return 1.0  # Transformer/encoder_norm, head.


def _mixer_factor(path, decay, depth):
  if path.startswith("MixerBlock_"):
    return decay ** (depth - int(path.split("/")[0][len("MixerBlock_"):]))
  return decay ** (depth + 1) if path.startswith("stem/") else 1.0


@pytest.mark.parametrize("name, fields, factor, prefix, into", [
    ("vit", _TINY_VIT, _vit_factor, "encoderblock_", "encoderblock"),
    ("mixer", _TINY_MIXER, _mixer_factor, "MixerBlock_", None),
])
def test_layer_decay_scales_each_update_by_its_layers_closed_form(name, fields, factor,
                                                                  prefix, into):
  decay, depth = 0.5, 3
  params = _model_params(name, **fields)
  grads = _random_like(params)
  decayed = _sgd_step(params, grads, model_name=name, layer_decay=decay)
  plain = _plain_sgd(params, grads)
  flat_decayed, flat_plain = loading.flatten(decayed), loading.flatten(plain)
  seen = set()
  for path, update in flat_decayed.items():
    mult = factor(path, decay, depth)
    seen.add(mult)
    np.testing.assert_allclose(update, mult * flat_plain[path], rtol=1e-6, atol=1e-9,
                               err_msg=path)
  assert seen == {decay ** k for k in range(depth + 2)}
  if into is None:  # Mixer has no scanned form.
    return
  # Scanned: the blocks stacked on a leading axis, each slice scaled by its own factor,
  # and the update the unscanned run's, restacked.
  stacked = lambda t: dict(t, Transformer=_stacked(t["Transformer"], prefix, depth, into))  # noqa: E731
  scanned = _sgd_step(stacked(params), stacked(grads), model_name=name, layer_decay=decay,
                      model=configs.ConfigDict(dict(fields, scan=True)))
  jax.tree_util.tree_map(np.testing.assert_array_equal, scanned, stacked(decayed))
  block = scanned["Transformer"][into]["MlpBlock_0"]["Dense_0"]["kernel"]
  block_plain = stacked(plain)["Transformer"][into]["MlpBlock_0"]["Dense_0"]["kernel"]
  for i in range(depth):
    np.testing.assert_allclose(block[i], decay ** (depth - i) * block_plain[i], rtol=1e-6)


def test_vit_scanned_params_get_one_id_per_slice():
  params = _model_params("vit", **dict(_TINY_VIT, scan=True))
  ids, top = vit.layer_ids(params)
  assert top == 4
  np.testing.assert_array_equal(
      ids["Transformer"]["encoderblock"]["MlpBlock_0"]["Dense_0"]["kernel"], [1, 2, 3])
  factors = optim.layer_decay_tree(params, 0.5, "vit")
  kernel = factors["Transformer"]["encoderblock"]["MlpBlock_0"]["Dense_0"]["kernel"]
  assert kernel.shape == (3, 1, 1) and kernel.dtype == np.float32
  np.testing.assert_array_equal(kernel.ravel(), [0.125, 0.25, 0.5])
  assert factors["head"]["kernel"] == 1.0 and factors["cls"] == 0.5 ** 4


def test_layer_decay_multiplies_lr_mults_leaves_frozen_alone_and_jits():
  decay, depth = 0.5, 3
  params = _model_params("vit", **_TINY_VIT)
  grads = _random_like(params)
  mults = [("head/.*", 10.0), (".*encoderblock_1/.*", 3.0)]
  c = _config(lr=0.1, wd=0.01, optax_name="sgd", grad_clip_norm=0.0, model_name="vit",
              optax=configs.ConfigDict({"momentum": 0.0}), layer_decay=decay,
              lr_mults=mults, frozen=["embedding/.*"], **{"schedule.decay_type": "constant"})
  tx, _ = optim.make_optimizer(c, total_steps=10)
  state = tx.init(params)
  eager, _ = tx.update(grads, state, params)
  jitted, _ = jax.jit(tx.update)(grads, state, params)
  flat, flat_jit = loading.flatten(eager), loading.flatten(jitted)
  plain = loading.flatten(_plain_sgd(params, grads))
  for path, update in flat.items():
    np.testing.assert_allclose(flat_jit[path], update, rtol=1e-6, atol=1e-9, err_msg=path)
    if path.startswith("embedding/"):
      assert not np.any(update)  # Frozen: a zero update, scaled or not.
      continue
    mult = 10.0 if path.startswith("head/") else 3.0 if "encoderblock_1/" in path else 1.0
    np.testing.assert_allclose(update, mult * _vit_factor(path, decay, depth) * plain[path],
                               rtol=1e-6, atol=1e-9, err_msg=path)


def test_layer_decay_is_checked():
  for bad in (0.0, 1.5, float("nan")):
    with pytest.raises(configs.ConfigError, match=r"config.layer_decay must be in \(0, 1\]"):
      _check(_config(layer_decay=bad))
  with pytest.raises(configs.ConfigError) as e:
    _check(_config(layer_decay=0.75, model_name="bit"))
  message = str(e.value)
  assert message.startswith("config.layer_decay needs a model that numbers its layers "
                            "(`layer_ids`), which 'bit' does not: use one of ")
  assert "mixer" in message and "vit" in message and "\n" not in message
  _check(_config(layer_decay=0.75, model_name="mixer"))
