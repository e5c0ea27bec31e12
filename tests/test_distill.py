"""Knowledge distillation: the teacher's config checked before JAX, loaded whole or refused
in one line, frozen inside the one jitted step, recorded by digest in the checkpoints (a
resumed run is bitwise equal; another teacher is refused), and measured beside the
student by the `distill` evaluator and the report.

The teacher is a runlocal mnist5k ViT trained once for this module."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vitcls import configs, losses, models, steps, train, validate
from vitcls.errors import UserError
from vitcls.models import loading
from vitcls.run import build, checkpoint, evaluation, report
from vitcls.run import teacher as teacher_lib
from conftest import DEFAULT_EXPERIMENT, REPO
from conftest import assert_same_run, train_command, xla_flags

EXPERIMENT = DEFAULT_EXPERIMENT + ":runlocal=True"


def _resolve(*overrides):
  return configs.resolve(configs.load_experiment(EXPERIMENT), list(overrides))


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  """A runlocal mnist5k ViT trained for 60 steps: the teacher."""
  workdir = str(tmp_path_factory.mktemp("teacher"))
  train.train(_resolve("total_steps=60", "evals.test.every=1000", "checkpoint_every=60"),
              workdir)
  return workdir


def _teacher_fields(teacher_dir):
  with open(os.path.join(teacher_dir, "config.json")) as f:
    saved = json.load(f)
  return saved["model"]


def _npz_teacher(teacher_dir, path, change=None):
  """The teacher's params as an .npz file (changed by `change(params)` first)."""
  params = checkpoint.load_params(teacher_dir)
  if change:
    change(params)
  loading.write_npz(str(path), params)
  return [f"distill.teacher_init={path}", "distill.teacher_model_name=vit",
          f"distill.teacher_model={_teacher_fields(teacher_dir)!r}"]


# The config, before JAX: one line per problem.

def test_every_distill_field_is_checked_one_line_each(tmp_path):
  config = _resolve("distill.loss=mse", "distill.temperature=0", "distill.weight=1.5",
                    "distill.teacher_res=-2",
                    "distill.teacher_pp=random_shift(2)|value_range(-1,1)|onehot(10)")
  found = validate.problems(config)
  assert all("\n" not in p for p in found)
  expected = ["config.distill.loss: unknown value 'mse': use one of kl",
              "config.distill.temperature must be a finite number > 0, got 0",
              "config.distill.weight must be in [0, 1] (the teacher's share of the target), "
              "got 1.5",
              "config.distill.teacher_res must be >= 0",
              "config.distill.teacher_pp: op 'random_shift(2)' draws at random",
              "config.distill.teacher_pp: op 'onehot(10)' works on labels"]
  for fragment in expected:
    assert sum(p.startswith(fragment) for p in found) == 1, (fragment, found)
  assert len(found) == len(expected), found
  assert "normalize, value_range" in found[-1]  # The ops that may prepare its input.
  bad_op = validate.problems(_resolve("distill.teacher_pp=valu_range(-1,1)"))
  assert len(bad_op) == 1 and "unknown pp op 'valu_range'" in bad_op[0]


def _fake_workdir(tmp_path, **changes):
  """A folder with only a config.json (what validation reads of a teacher workdir)."""
  folder = tmp_path / "fake_teacher"
  folder.mkdir()
  saved = json.loads(configs.to_json(_resolve()))
  saved.update(changes)
  (folder / "config.json").write_text(json.dumps(saved))
  return str(folder)


@pytest.mark.parametrize("case", ["missing", "not_a_workdir", "classes", "unknown_model",
                                  "unknown_field", "file_without_model", "no_teacher_eval",
                                  "loss", "class_weights", "patch"])
def test_a_teacher_that_does_not_fit_is_one_line_before_jax(tmp_path, case):
  """Each mistake that configs and files tell is one line of `validate`, in-process."""
  key = "config.distill.teacher_init: "
  plain = tmp_path / "plain"
  plain.mkdir()
  overrides, message = {
      "missing": lambda: ([f"distill.teacher_init={tmp_path}/nothing.npz"],
                  f"{key}'{tmp_path}/nothing.npz' does not exist: give a vitcls workdir, "
                  f"an .npz or .safetensors checkpoint, or hf-hub:<repo>"),
      "not_a_workdir": lambda: ([f"distill.teacher_init={plain}"],
                        f"{key}'{plain}' is a folder but not a vitcls workdir"),
      "classes": lambda: ([f"distill.teacher_init={_fake_workdir(tmp_path, num_classes=5)}"],
                  f"{key}the teacher in workdir '{tmp_path}/fake_teacher' was trained for 5 "
                  f"classes but config.num_classes is 10"),
      "unknown_model": lambda: ([f"distill.teacher_init={_fake_workdir(tmp_path)}",
                         "distill.teacher_model_name=vitt"],
                        "config.distill.teacher_model_name: unknown model 'vitt': available "
                        "models: "),
      "unknown_field": lambda: ([f"distill.teacher_init={_fake_workdir(tmp_path)}",
                         "distill.teacher_model.widht=3"],
                        "unknown config key 'distill.teacher_model.widht' for model 'vit'"),
      "file_without_model": lambda: ([f"distill.teacher_init={REPO}/setup.cfg"],
                             f"{key}'{REPO}/setup.cfg' is a file, which does not say which "
                             f"vitcls model it holds: set "
                             f"config.distill.teacher_model_name"),
      "no_teacher_eval": lambda: (["evals.dist.type=distill"],
                          "config.evals.dist: a distill evaluator compares the student with "
                          "its teacher, and there is none"),
      "loss": lambda: ([f"distill.teacher_init={_fake_workdir(tmp_path)}", "loss=sigmoid_xent"],
               "config.loss is 'sigmoid_xent' but config.distill.loss replaces it"),
      "class_weights": lambda: ([f"distill.teacher_init={_fake_workdir(tmp_path)}",
                         "class_weights=balanced"],
                        "config.class_weights: distillation losses take no class weights"),
      "patch": lambda: ([f"distill.teacher_init={_fake_workdir(tmp_path)}",
                         "distill.teacher_res=5"],
                        "config.distill.teacher_res=5: the teacher's 7x7 patches "
                        "(config.distill.teacher_model.patch_size) do not fit in 5x5 images: "
                        "give a teacher_res of at least 7"),
  }[case]()
  found = validate.problems(_resolve(*overrides))
  assert len(found) == 1 and found[0].startswith(message), found
  with pytest.raises(configs.ConfigError) as error:
    validate.check(_resolve(*overrides))
  assert "\n" not in str(error.value)


def test_a_good_teacher_workdir_passes_and_the_check_imports_no_jax(teacher_dir):
  code = f"""
import sys, time
from vitcls import configs, validate
c = configs.resolve(configs.load_experiment({EXPERIMENT!r}),
                    ['distill.teacher_init={teacher_dir}', 'evals.dist.type=distill',
                     'distill.teacher_model.dtype=bfloat16'])
start = time.perf_counter()
print(validate.problems(c), round(time.perf_counter() - start, 3))
print(sorted(m for m in ('jax', 'flax', 'tensorflow', 'grain') if m in sys.modules))
"""
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  checked, modules = proc.stdout.splitlines()[:2]
  assert checked.startswith("[] ") and float(checked.split()[-1]) < 1.0
  assert modules == "[]"


def test_the_teacher_architecture_comes_from_its_workdir_with_fields_laid_over(teacher_dir):
  name, fields, saved = validate.teacher_architecture(_resolve(
      f"distill.teacher_init={teacher_dir}", "distill.teacher_model.dtype=bfloat16"))
  assert name == "vit" and saved["num_classes"] == 10
  assert fields == {**_teacher_fields(teacher_dir), "dtype": "bfloat16"}
  name, fields, _ = validate.teacher_architecture(_resolve(
      f"distill.teacher_init={teacher_dir}", "distill.teacher_model_name=bit"))
  assert name == "bit" and fields == {}  # Another model: the workdir's fields do not apply.


# Loading: what only the weights tell, one line each, before training starts.

@pytest.mark.parametrize("case", ["head", "corrupt", "nonfinite", "model"])
def test_weights_that_do_not_fit_are_one_line_when_built(tmp_path, teacher_dir, case):
  path = tmp_path / "teacher.npz"

  def five_classes(params):
    params["head"] = {"kernel": params["head"]["kernel"][:, :5],
                      "bias": params["head"]["bias"][:5]}

  def nan(params):
    params["head"]["bias"] = params["head"]["bias"].copy()
    params["head"]["bias"][3] = np.nan

  overrides = _npz_teacher(teacher_dir, path, {"head": five_classes, "nonfinite": nan}.get(
      case))
  key = "config.distill.teacher_init: "
  expected = {
      "head": f"{key}'{path}' does not fill the teacher's head/bias of shape (10,) (and 1 "
              f"more) (num_classes=10); it has head/bias of shape (5,): a teacher is loaded "
              f"whole, head included: give one trained for these 10 classes, or the "
              f"config.distill.teacher_model that matches it",
      "corrupt": f"{key}checkpoint '{path}' is not an .npz file (not a zip archive)",
      "nonfinite": f"{key}'{path}' holds non-finite values in head/bias: it cannot teach",
      "model": f"{key}parameter 'Transformer/encoderblock_0/MlpBlock_0/Dense_0/bias' has "
               f"shape (64,) in the '{path}' but (128,) in the model: use a config of the "
               f"same size",
  }[case]
  if case == "corrupt":
    path.write_bytes(b"not a checkpoint")
  if case == "model":
    overrides.append("distill.teacher_model.mlp_dim=128")
  config = _resolve(*overrides)
  assert validate.problems(config) == []  # Only the weights tell.
  with pytest.raises(UserError) as error:
    build.build(config)
  message = str(error.value)
  assert "\n" not in message and message.startswith(expected), message


# The step: the teacher inside it, frozen.

def _tiny(num_classes=4, width=16):
  return models.build("vit", num_classes, dict(width=width, depth=1, mlp_dim=32,
                                               num_heads=2, patch_size=4))


def _params(model, seed, size=8):
  return jax.jit(lambda: model.init(jax.random.PRNGKey(seed), jnp.zeros((1, size, size, 3)),
                                    train=False)["params"])()


@pytest.mark.parametrize("accum", [1, 2])
def test_the_step_minimises_the_distillation_loss_on_the_teachers_logits(accum):
  student, teacher = _tiny(), _tiny(width=24)
  params, teacher_params = _params(student, 0), _params(teacher, 1)
  teacher_params = jax.tree_util.tree_map(lambda x: x + 0.05, teacher_params)  # Not 0.
  tx = optax.sgd(0.1)
  options = steps.StepOptions(distill_loss="kl", distill_temperature=2.0,
                              grad_accum_steps=accum, ema_decay=0.5,
                              skip_nonfinite=True)
  step = jax.jit(steps.make_train_step(student, tx, lambda s: 0.1, options,
                                       teacher=steps.Teacher(teacher)))
  from vitcls.state import TrainState
  state = TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params),
                     rng=jax.random.PRNGKey(3), ema=params,
                     skips=jnp.zeros((2,), jnp.int32))
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.uniform(-1, 1, (8, 8, 8, 3)), jnp.float32)
  labels = jax.nn.one_hot(rng.integers(0, 4, 8), 4)
  new, metrics = step(state, {"image": images, "labels": labels}, teacher_params)

  taught = jax.jit(teacher.apply)({"params": teacher_params}, images)[0]
  logits = jax.jit(student.apply)({"params": params}, images)[0]  # No dropout here.
  per_example = losses.distillation("kl")({"logits": logits}, taught, labels,
                                          temperature=2.0, weight=1.0, label_smoothing=0.0)
  np.testing.assert_allclose(metrics["loss"], np.mean(per_example), rtol=1e-5)
  agreement = np.mean(np.argmax(logits, -1) == np.argmax(taught, -1))
  assert float(metrics[steps.AGREEMENT]) == pytest.approx(agreement)
  grads = jax.jit(jax.grad(lambda p: jnp.mean(losses.distillation("kl")(
      {"logits": student.apply({"params": p}, images, train=False)[0]}, taught, labels,
      temperature=2.0))))(params)
  expected = jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, params, grads)
  for a, b in zip(jax.tree_util.tree_leaves(new.params), jax.tree_util.tree_leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)
  assert int(new.skips[1]) == 0 and new.teacher_digest is None


def test_the_teacher_sees_the_images_resized_and_prepared():
  model = _tiny()
  params = _params(model, 0, size=12)
  from vitcls.data.pp import device, registry
  spec = "value_range(0,255,-1,1)|normalize((0.5,0.4,0.3),(0.2,0.3,0.4))"
  teacher = steps.Teacher(model, res=12, prepare=device.finisher(registry.calls(spec)))
  images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 8, 8, 3)), jnp.float32)
  resized = jax.image.resize(images, (2, 12, 12, 3), "bilinear")
  prepared = ((resized + 1) * 127.5 - np.array([0.5, 0.4, 0.3]) * 255) / (
      np.array([0.2, 0.3, 0.4]) * 255)
  want = jax.jit(model.apply)({"params": params}, prepared.astype(jnp.float32))[0]
  np.testing.assert_allclose(jax.jit(teacher.logits)(params, images), want, rtol=1e-5,
                             atol=1e-5)
  # No gradient reaches the teacher's weights or the images through it.
  grads = jax.jit(jax.grad(lambda p, x: jnp.sum(teacher.logits(p, x)), argnums=(0, 1)))(
      params, images)
  assert all(not np.any(g) for g in jax.tree_util.tree_leaves(grads))


STUDENT = ["evals.test.every=1000", "evals.dist.type=distill", "evals.dist.batch_size=250",
           "evals.dist.every=1000", "mixup.alpha=0.2", "ema_decay=0.9"]


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, teacher_dir):
  """A runlocal student distilled from the teacher, with a distill evaluator."""
  workdir = str(tmp_path_factory.mktemp("student"))
  train.train(_resolve(f"distill.teacher_init={teacher_dir}", *STUDENT), workdir)
  return workdir


def test_the_built_run_passes_the_frozen_teacher_to_its_step(teacher_dir, student_dir):
  config = _resolve(f"distill.teacher_init={teacher_dir}", "total_steps=8")
  run = build.build(config)
  teacher = run.teacher
  expected = teacher_lib.digest(checkpoint.load_params(teacher_dir))
  assert np.array_equal(teacher.digest, expected) and teacher.digest.dtype == np.uint32
  state = run.init_state()
  assert np.array_equal(np.asarray(state.teacher_digest), expected)
  batch = next(run.batches(0))
  lowered = run.train_step.lower(state, batch)
  # An argument, not a constant: state, device data, batch, and the teacher's leaves.
  leaves = (jax.tree_util.tree_leaves(state) + jax.tree_util.tree_leaves(run.device_data)
            + jax.tree_util.tree_leaves(batch) + jax.tree_util.tree_leaves(teacher.params))
  assert len(jax.tree_util.tree_leaves(lowered.args_info)) == len(leaves)
  before = jax.device_get(teacher.params)
  for _ in range(2):
    state, metrics = run.train_step(state, next(run.batches(int(state.step))))
  assert np.isfinite(float(metrics["loss"])) and 0 <= float(metrics["teacher_agreement"]) <= 1
  assert np.array_equal(teacher_lib.digest(jax.device_get(teacher.params)),
                        teacher_lib.digest(before))
  # The student's checkpoint holds the digest, never the teacher's weights.
  shapes = checkpoint._shapes(checkpoint._tree_metadata(  # pylint: disable=protected-access
      os.path.join(student_dir, "checkpoints", "6", "default")))
  assert shapes["teacher_digest"] == (2,)
  assert not any(k.startswith("teacher") and k != "teacher_digest" for k in shapes)
  assert len([k for k in shapes if k.startswith("params/")]) == len(
      jax.tree_util.tree_leaves(state.params))


def test_a_teacher_in_bfloat16_teaches(teacher_dir, tmp_path):
  config = _resolve(f"distill.teacher_init={teacher_dir}", "distill.teacher_model.dtype=bfloat16",
                    "distill.teacher_res=14", "grad_accum_steps=2",
                    "distill.teacher_pp=value_range(0,1,-1,1)")
  run = build.build(config)
  state, metrics = run.train_step(run.init_state(), next(run.batches(0)))
  assert np.isfinite(float(metrics["loss"])) and int(state.step) == 1


# The checkpoint's teacher.

def test_resuming_with_another_teacher_or_none_is_one_line(tmp_path, teacher_dir,
                                                           student_dir):
  workdir = str(tmp_path / "student")
  shutil.copytree(student_dir, workdir)
  other = _npz_teacher(teacher_dir, tmp_path / "other.npz",
                       lambda p: p["head"].update(bias=p["head"]["bias"] + 1.0))
  with pytest.raises(UserError) as error:
    train.train(_resolve(*other, *STUDENT, "total_steps=9"), workdir)
  digest = teacher_lib.format_digest(teacher_lib.digest(checkpoint.load_params(teacher_dir)))
  message = str(error.value)
  assert "\n" not in message and message.startswith(
      f"config.distill.teacher_init: the checkpoint of step 6 in {workdir}/checkpoints was "
      f"trained with another teacher (weights digest {digest}; '{tmp_path}/other.npz' has ")
  assert message.endswith(": set config.distill.teacher_init back to the teacher it was "
                          "trained with, or use a new --workdir")
  with pytest.raises(checkpoint.CheckpointMismatchError) as error:
    train.train(_resolve("ema_decay=0.9", "total_steps=9"), workdir)
  assert "(it was trained with a teacher (config.distill.teacher_init), this config has " \
         "none)" in str(error.value)
  # The same weights from another place are the same teacher: the run resumes.
  same = _npz_teacher(teacher_dir, tmp_path / "same.npz")
  results = train.train(_resolve(*same, *STUDENT, "total_steps=7"), workdir)
  assert "dist/teacher_top1" in results


STEPS = 40
KILL_OVERRIDES = [f"--config.total_steps={STEPS}", "--config.checkpoint_every=4",
                  "--config.log_every=4", "--config.evals.test.every=1000",
                  "--config.mixup.alpha=0.2", "--config.cutmix.alpha=1.0",
                  "--config.ema_decay=0.99", "--config.grad_accum_steps=2",
                  "--config.distill.temperature=2.0", "--config.input.on_device=False",
                  "--config.input.pp=random_shift(2)|value_range(-1,1)|onehot(10)"]


def test_sigkill_mid_distillation_then_resume_is_bitwise_equal(tmp_path, teacher_dir):
  env = dict(os.environ, XLA_FLAGS=xla_flags(1), TF_CPP_MIN_LOG_LEVEL="2",
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  overrides = [*KILL_OVERRIDES, f"--config.distill.teacher_init={teacher_dir}"]
  straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
  proc = subprocess.run(train_command(straight, *overrides), cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]

  log_path = tmp_path / "killed.log"
  with open(log_path, "a") as log:
    proc = subprocess.Popen(train_command(killed, *overrides), cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    checkpoints = os.path.join(killed, "checkpoints")
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
      if os.path.exists(os.path.join(checkpoints, "8", "_CHECKPOINT_METADATA")):
        break
      time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, log_path.read_text()[-3000:]
    saved = sorted(int(n) for n in os.listdir(checkpoints) if n.isdigit())
    assert saved and max(saved) < STEPS, saved
    resumed = subprocess.run(train_command(killed, *overrides), cwd=REPO, env=env,
                             stdout=log, stderr=subprocess.STDOUT, timeout=600)
  text = log_path.read_text()
  assert resumed.returncode == 0, text[-3000:]
  assert "Resuming from the checkpoint of step" in text
  assert_same_run(straight, killed, STEPS)


# Evaluation and report.

def test_the_distill_evaluator_matches_numpy_on_the_same_logits(teacher_dir, student_dir):
  """Its numbers from the logits its inferences give; the teacher's logits those of the
  teacher model applied directly to the split (pp'd on the host)."""
  config = configs.load_workdir_config(student_dir)
  assert config.distill.teacher_init == teacher_dir
  from vitcls import sharding
  mesh = sharding.make_mesh(config.mesh)
  model = models.build(config.model_name, config.num_classes, config.model)
  evals = evaluation.Evaluations(config, student_dir, model=model, mesh=mesh,
                                 batch_sharding=sharding.batch_sharding(mesh))
  params = checkpoint.load_params(student_dir)
  results, arrays = evals.measure(params, names=["dist"])
  assert arrays == {"dist": {}}

  evaluator = evals._evaluators["dist"]  # pylint: disable=protected-access
  out = evaluator.student.run(params)
  student = np.asarray(out["logits"], np.float64)
  labels = np.argmax(out["labels"], -1)
  teacher = np.asarray(evaluator.teacher_logits(), np.float64)
  p_t = np.exp(teacher - teacher.max(1, keepdims=True))
  p_t /= p_t.sum(1, keepdims=True)
  p_s = np.exp(student - student.max(1, keepdims=True))
  p_s /= p_s.sum(1, keepdims=True)
  want = {"dist/top1": np.mean(student.argmax(1) == labels),
          "dist/teacher_top1": np.mean(teacher.argmax(1) == labels),
          "dist/agreement": np.mean(student.argmax(1) == teacher.argmax(1)),
          "dist/kl_to_teacher": np.mean(np.sum(p_t * np.log(p_t / p_s), 1)),
          "dist/count": 1000.0}
  assert set(results) == set(want)
  for key, value in want.items():
    assert results[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key

  from vitcls.data import pp, sources
  source = sources.get_source("mnist5k", "test", None)
  prep = pp.parse(evals.configs["dist"].pp)
  images = np.stack([prep(source[i], np.random.default_rng(0))["image"]
                     for i in range(len(source))])
  name, fields, _ = validate.teacher_architecture(config)
  direct = models.build(name, 10, fields).apply(
      {"params": checkpoint.load_params(teacher_dir)}, images, train=False)[0]
  np.testing.assert_allclose(teacher, direct, rtol=1e-4, atol=1e-4)
  assert results["dist/teacher_top1"] > 0.2  # The teacher has learnt something.


def test_the_report_sets_student_and_teacher_side_by_side(student_dir, teacher_dir):
  text = open(report.write(student_dir, configs.load_workdir_config(student_dir))).read()
  assert f"- teacher: `{teacher_dir}`, loss `kl` (temperature 1, weight 1)" in text
  lines = text.split("## Student and teacher\n\n", 1)[1].splitlines()
  assert lines[0] == ("| eval | student top-1 | teacher top-1 | agreement | "
                      "KL(teacher, student) | step |")
  finals = {k: v for k, v in report.final_metrics(student_dir, [
      json.loads(x) for x in open(os.path.join(student_dir, "metrics.jsonl"))]).items()}
  for name in ("dist", "dist_ema"):
    cells = [f"{finals[f'{name}/{k}'][1]:.4f}" for k in
             ("top1", "teacher_top1", "agreement", "kl_to_teacher")]
    assert f"| {name} | {' | '.join(cells)} | 6 |" in lines
