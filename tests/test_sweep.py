"""Sweeps: the get_sweep helpers, validation before anything runs, the results table, and
a real sweep killed mid-member then run again to completion."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from vitcls import configs, sweep
from vitcls.run import lock
from vitcls.run import workdir as wdir
from vitcls.sweep import __main__ as sweep_cli
from vitcls.sweep import local as sweep_local
from vitcls.sweep import members as sweep_members
from vitcls.sweep import table as sweep_table
from conftest import (DEFAULT_EXPERIMENT, REPO, read_metrics, write_sweep_experiment,
                      xla_flags)


def test_product_varies_the_first_key_slowest(tmp_path):
  assert sweep.product(lr=[1, 2], wd=[3, 4, 5]) == [
      {"lr": 1, "wd": 3}, {"lr": 1, "wd": 4}, {"lr": 1, "wd": 5},
      {"lr": 2, "wd": 3}, {"lr": 2, "wd": 4}, {"lr": 2, "wd": 5}]
  assert sweep.product({"model.depth": [2, 4]}, [{"lr": 1}, {"lr": 2, "wd": 0}]) == [
      {"model.depth": 2, "lr": 1}, {"model.depth": 2, "lr": 2, "wd": 0},
      {"model.depth": 4, "lr": 1}, {"model.depth": 4, "lr": 2, "wd": 0}]
  assert sweep.product() == [{}]
  members, _ = sweep_members.load_members(_experiment(
      tmp_path, "sweep.product(lr=__import__('numpy').logspace(-3, -2, 2))"))
  assert [(m.name, m.values) for m in members] == [("lr=0.001", {"lr": 0.001}),
                                                   ("lr=0.01", {"lr": 0.01})]


def test_zipped_takes_values_together_and_composes_with_product():
  assert sweep.zipped({"model.width": [64, 128], "model.mlp_dim": [256, 512]}) == [
      {"model.width": 64, "model.mlp_dim": 256}, {"model.width": 128, "model.mlp_dim": 512}]
  grid = sweep.product(sweep.zipped({"model.width": [64, 128], "model.depth": [2, 4]}),
                       {"lr": [1e-3, 3e-3]}, [{"input.pp": "a"}, {"input.pp": "b"}])
  assert len(grid) == 8
  assert grid[:3] == [
      {"model.width": 64, "model.depth": 2, "lr": 1e-3, "input.pp": "a"},
      {"model.width": 64, "model.depth": 2, "lr": 1e-3, "input.pp": "b"},
      {"model.width": 64, "model.depth": 2, "lr": 3e-3, "input.pp": "a"}]
  assert grid[-1] == {"model.width": 128, "model.depth": 4, "lr": 3e-3, "input.pp": "b"}


@pytest.mark.parametrize("build, message", [
    (lambda: sweep.zipped(lr=[1, 2], wd=[1, 2, 3]), "same length, got lengths 2, 3"),
    (lambda: sweep.product(sweep.product(lr=[1]), lr=[2]), "'lr' is set by two parts"),
    (lambda: sweep.product(lr=0.1), "sweep values of 'lr' must be a list"),
], ids=["zip-lengths", "key-twice", "not-a-list"])
def test_helper_mistakes_are_one_line_errors(build, message):
  with pytest.raises(sweep.SweepError) as info:
    build()
  assert message in str(info.value) and "\n" not in str(info.value)


def test_member_names_are_readable_unique_and_filesystem_safe():
  members = [["lr=0.001", "wd=0.05"], ["model.variant=S/16"], ["input.pp=a b|c(1, 2)"],
             ["input.pp=a_b_c_1_2"], ["mesh=[('data', 2), ('fsdp', 4)]"], [],
             [f"input.pp={'x' * 200}"], [f"input.pp={'x' * 199}y"]]
  names = sweep_members.member_names(members)
  assert names[0] == "lr=0.001,wd=0.05"
  assert names[1] == "model.variant=S_16"
  assert names[5] == "default"
  assert len(set(names)) == len(names)
  for name in names:
    assert 0 < len(name) <= 80 and not name.startswith(".")
    assert all(c.isalnum() or c in "._=,+-" for c in name), name
  assert sweep_members.member_names(members) == names  # Stable: a rerun finds its workdirs.


def _experiment(tmp_path, sweep_source):
  return write_sweep_experiment(tmp_path, sweep_source)


@pytest.mark.parametrize("source, error, message", [
    ("sweep.product(lr=[0.1], lrr=[0.2])", configs.ConfigError,
     "sweep member 1 of 1 (lr=0.1,lrr=0.2): unknown config key 'lrr' (did you mean 'lr'?)"),
    ("[{'lr': 0.1}, {'schedule.warmup_stpes': 5}]", configs.ConfigError,
     "sweep member 2 of 2 (schedule.warmup_stpes=5): unknown config key "
     "'schedule.warmup_stpes' (did you mean 'schedule.warmup_steps'?)"),
    ("[]", sweep.SweepError, "returned no members"),
    ("[{'lr': 0.1}, {'lr': 1e-1}]", sweep.SweepError,
     "sweep member 2 of 2 (lr=0.1) gives the same config as sweep member 1"),
    ("[{'total_steps': 'ten'}]", configs.ConfigError,
     "config key 'total_steps' expects a int, got 'ten'"),
], ids=["unknown-key", "unknown-nested-key", "empty", "duplicate", "bad-type"])
def test_bad_sweeps_are_one_line_errors_before_anything_runs(tmp_path, source, error,
                                                              message):
  spec = _experiment(tmp_path, source)
  with pytest.raises(error) as info:
    sweep_members.load_members(spec)
  assert message in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_every_member_passes_the_trainers_gate_before_any_starts(tmp_path):
  """Problems only the trainer's gate finds (a model field, a range), in any member,
  fail the whole sweep at once: one line a member, a problem of all of them once."""
  spec = _experiment(tmp_path, "[{'lr': 0.1}, {'model.widht': 64}, {'input.batch_size': 0},"
                               " {'model.widht': 64, 'input.batch_size': 0}]")
  with pytest.raises(configs.ConfigError) as info:
    sweep_members.load_members(spec)
  lines = str(info.value).splitlines()
  assert lines[0] == "4 problems in the sweep (no member was started):"
  assert [l.strip().split(": ", 1)[0] for l in lines[1:]] == [
      "sweep member 2 of 4 (model.widht=64)", "sweep member 3 of 4 (input.batch_size=0)",
      "sweep member 4 of 4 (model.widht=64,input.batch_size=0)",
      "sweep member 4 of 4 (model.widht=64,input.batch_size=0)"]
  assert "unknown config key 'model.widht' for model 'vit'" in lines[1]
  assert "config.input.batch_size must be > 0, got 0" in lines[2]
  spec = _experiment(tmp_path, "[{'model.widht': 64}]")
  with pytest.raises(sweep.SweepError) as info:  # Also a SweepError, as before.
    sweep_members.load_members(spec)
  assert str(info.value).startswith("sweep member 1 of 1 (model.widht=64): unknown config "
                                    "key 'model.widht' for model 'vit'")
  spec = _experiment(tmp_path, "sweep.product(lr=[0.1, 0.2])")
  with pytest.raises(configs.ConfigError) as info:
    sweep_members.load_members(spec, ["input.batch_size=0"])
  assert str(info.value) == ("every sweep member: config.input.batch_size must be > 0, "
                             "got 0")
  members, _ = sweep_members.load_members(spec, ["input.batch_size=0"], check=False)
  assert len(members) == 2  # --collect only resolves: the members ran elsewhere.


def _no_member_may_start(monkeypatch):
  def run(self):
    raise AssertionError(f"the sweep started its members {self.members}")
  monkeypatch.setattr(sweep_local.LocalRunner, "run", run)


def test_the_cli_refuses_a_mixed_sweep_before_any_member_trains(tmp_path, capsys,
                                                                 monkeypatch):
  _no_member_may_start(monkeypatch)
  spec = _experiment(tmp_path, "[{'model.width': 32}, {'model.widht': 64}]")
  workdir = tmp_path / "sweep"
  assert sweep_cli.main(["vitcls sweep", f"--config={spec}", f"--workdir={workdir}"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith(
      "vitcls: error: sweep member 2 of 2 (model.widht=64): unknown config key "
      "'model.widht' for model 'vit'"), err
  assert not workdir.exists()


def test_a_local_sweep_checks_the_devices_its_members_will_see(tmp_path, capsys,
                                                               monkeypatch):
  """The members train here: with 4 devices, a batch of 6 cannot split over them."""
  _no_member_may_start(monkeypatch)
  monkeypatch.setenv("XLA_FLAGS", xla_flags(4))  # What the members' trainers would see.
  spec = _experiment(tmp_path, "sweep.product({'input.batch_size': [8, 6]})")
  workdir = tmp_path / "sweep"
  assert sweep_cli.main(["vitcls sweep", f"--config={spec}", f"--workdir={workdir}"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err == ["vitcls: error: sweep member 2 of 2 (input.batch_size=6): "
                 "config.input.batch_size 6 is not divisible by the 4 devices: use a "
                 "multiple of 4"]
  assert not workdir.exists()


def test_the_cli_prints_one_error_line_and_writes_nothing(tmp_path, capsys):
  spec = _experiment(tmp_path, "sweep.product(lr=[0.1, 0.2])")
  workdir = tmp_path / "sweep"
  assert sweep_cli.main(["vitcls sweep", f"--config={spec}", f"--workdir={workdir}",
                         "--config.wdd=1"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err == ["vitcls: error: unknown config key 'wdd' (did you mean 'wd'?): check the "
                 "spelling, or see vitcls.configs.defaults() for the known keys"]
  no_sweep = os.path.join(REPO, "experiments", "digits_vit.py")
  assert sweep_cli.main(["vitcls sweep", f"--config={no_sweep}",
                         f"--workdir={workdir}"]) == 2
  assert "has no get_sweep(arg=None) function" in capsys.readouterr().err
  assert not workdir.exists()


def test_the_table_reads_members_workdirs(tmp_path):
  """sweep.csv / sweep.md / sweep.png from members' metrics, without training."""
  spec = _experiment(tmp_path, "sweep.product({'input.pp': ['a|b', 'c'], 'lr': [1e-4, 1e-2]})")
  members, resolved = sweep_members.load_members(spec, check=False)  # As --collect does.
  workdir = str(tmp_path / "sweep")
  for i, m in enumerate(members[:3]):
    os.makedirs(os.path.join(workdir, m.name))
    with open(os.path.join(workdir, m.name, "metrics.jsonl"), "w") as f:
      for step in range(1, 11 if i < 2 else 5):
        f.write(json.dumps({"step": step, "loss": 1.0 / step}) + "\n")
      f.write(json.dumps({"step": 5, "val/loss": 0.5, "val/top1": 0.1 * i}) + "\n")
      if i < 2:
        f.write(json.dumps({"step": 10, "val/loss": 0.4, "val/top1": 0.5 + 0.1 * i}) + "\n")
      f.write('{"step": 11, "lo')  # A line cut by a kill is skipped.
    if i < 2:
      wdir.atomic_write(os.path.join(workdir, m.name, wdir.MEMBER_FILE), json.dumps(
          {"status": ["done", "failed"][i], "wall_time_s": 12.5, "attempts": 1}))
  table = sweep_table.collect(workdir, members, [10] * 4, running=[members[2].name])
  sweep_table.write_reports(workdir, table, spec, ["total_steps=10"])
  with open(os.path.join(workdir, "sweep.csv")) as f:
    rows = list(csv.DictReader(f))
  assert [r["name"] for r in rows] == [m.name for m in members]
  assert [r["status"] for r in rows] == ["done", "failed", "running", "pending"]
  assert [r["val/top1"] for r in rows] == ["0.5", "0.6", "0.2", ""]
  assert [r["steps"] for r in rows] == ["10", "10", "4", "0"]
  assert rows[0]["input.pp"] == "a|b" and rows[0]["lr"] == "0.0001"
  assert list(rows[0])[:4] == ["name", "input.pp", "lr", "val/top1"]  # Main metric first.
  markdown = open(os.path.join(workdir, "sweep.md")).read()
  assert "best: `input.pp=a_b,lr=0.01` with 0.6000" in markdown and "a\\|b" in markdown
  with open(os.path.join(workdir, "sweep.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert sweep_table.pick_metric([{"a/loss": 1, "b/map": 1}, {"c/top1": 1}], None) == "c/top1"
  assert sweep_table.pick_metric([{"a/loss": 1, "b/map": 1}], None) == "b/map"
  assert sweep_table.pick_metric([{"a/loss": 1}], "a/loss") == "a/loss"


def _write_results(member_dir, top1):
  os.makedirs(member_dir)
  with open(os.path.join(member_dir, "metrics.jsonl"), "w") as f:
    f.write(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    f.write(json.dumps({"step": 1, "val/top1": top1}) + "\n")


def test_members_overriding_different_keys_share_one_table_and_plot(tmp_path):
  """Each member has a value on every swept column: its own, its config's, or none."""
  spec = _experiment(tmp_path, "[{'model.width': 32}, {'model.depth': 2}, {'lr': 0.01}]")
  members, resolved = sweep_members.load_members(spec)
  base_lr = resolved[0].lr
  workdir = str(tmp_path / "sweep")
  for m, top1 in zip(members[:2], (0.5, 0.7)):
    _write_results(os.path.join(workdir, m.name), top1)
  table = sweep_table.collect(workdir, members, [10] * 3)
  sweep_table.write_reports(workdir, table, spec, [])
  with open(os.path.join(workdir, "sweep.csv")) as f:
    rows = list(csv.DictReader(f))
  assert [(r["model.width"], r["model.depth"], r["lr"]) for r in rows] == [
      ("32", "", repr(base_lr)), ("", "2", repr(base_lr)), ("", "", "0.01")]
  markdown = open(os.path.join(workdir, "sweep.md")).read()
  assert f"| `model.depth=2` | — | 2 | {base_lr!r} | 0.7000 |" in markdown
  with open(os.path.join(workdir, "sweep.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  # Each panel's points lie on its axis: a member without the key is left out of it, one
  # that inherits the key sits at its config's value.
  assert sweep_table.panel(table, "model.depth") == ([2], [0.7], [2])
  assert sweep_table.panel(table, "lr") == ([base_lr, base_lr], [0.5, 0.7],
                                            [base_lr, base_lr, 0.01])


ANY_KEY_TRAINER = """
import json, os, sys
args = dict(a[2:].split("=", 1) for a in sys.argv[1:])
os.makedirs(args["workdir"], exist_ok=True)
with open(os.path.join(args["workdir"], "metrics.jsonl"), "a") as f:
  f.write(json.dumps({"step": 1, "loss": 1.0}) + "\\n")
  f.write(json.dumps({"step": 1, "val/top1": len(args["workdir"]) / 1000}) + "\\n")
"""


def test_a_sweep_over_different_keys_finishes_and_collects(tmp_path, capsys):
  """The runner refreshes the table after each member: it finishes, and so does a rerun
  and `--collect` (a stand-in trainer that takes milliseconds)."""
  spec = _experiment(tmp_path, "[{'model.width': 32}, {'model.depth': 2}]")
  trainer = tmp_path / "fake_train.py"
  trainer.write_text(ANY_KEY_TRAINER)
  workdir = str(tmp_path / "sweep")

  def run():
    members, resolved = sweep_members.load_members(spec)
    runner = sweep_local.LocalRunner(spec, workdir, members, resolved, [])
    runner.trainer = [sys.executable, str(trainer)]
    return runner.run()

  assert run() == 0
  assert run() == 0  # The rerun refreshes the table before anything else.
  assert "2 already done, 0 to run" in capsys.readouterr().out
  os.remove(os.path.join(workdir, "sweep.csv"))
  assert sweep_cli.main(["vitcls sweep", f"--config={spec}", f"--workdir={workdir}",
                         "--collect"]) == 0
  with open(os.path.join(workdir, "sweep.csv")) as f:
    rows = list(csv.DictReader(f))
  assert [(r["name"], r["model.width"], r["model.depth"], r["status"]) for r in rows] == [
      ("model.width=32", "32", "", "done"), ("model.depth=2", "", "2", "done")]


def test_every_experiment_sweep_resolves():
  specs = [os.path.join(REPO, "experiments", n) for n in sorted(os.listdir(
      os.path.join(REPO, "experiments"))) if n.endswith(".py")]
  with_sweeps = [s for s in specs if "def get_sweep" in open(s).read()]
  assert DEFAULT_EXPERIMENT in with_sweeps
  for spec in with_sweeps:
    members, _ = sweep_members.load_members(spec)
    assert len({m.name for m in members}) == len(members) > 1, spec
  members, _ = sweep_members.load_members(DEFAULT_EXPERIMENT)
  assert [m.values for m in members] == sweep.product(lr=[1e-3, 3e-3], wd=[0.05, 0.1])


FAKE_TRAINER = """
import json, os, sys
args = dict(a[2:].split("=", 1) for a in sys.argv[1:])
os.makedirs(args["workdir"], exist_ok=True)
lr = float(args["config.lr"])
print("training", sys.argv[1:])
if lr > 0.15 and os.path.exists(os.path.join(args["workdir"], "..", "broken")):
  sys.exit(3)
with open(os.path.join(args["workdir"], "metrics.jsonl"), "a") as f:
  f.write(json.dumps({"step": 1, "loss": 1.0}) + "\\n")
  f.write(json.dumps({"step": 1, "val/top1": lr}) + "\\n")
"""


def test_failed_members_exit_1_and_are_retried_by_the_next_run(tmp_path, capsys):
  """The runner's bookkeeping with a stand-in trainer that takes milliseconds."""
  spec = _experiment(tmp_path, "sweep.product(lr=[0.1, 0.2, 0.3])")
  trainer = tmp_path / "fake_train.py"
  trainer.write_text(FAKE_TRAINER)
  workdir = str(tmp_path / "sweep")
  os.makedirs(workdir)
  open(os.path.join(workdir, "broken"), "w").close()

  def run():
    members, resolved = sweep_members.load_members(spec, ["total_steps=1"])
    runner = sweep_local.LocalRunner(spec, workdir, members, resolved, ["total_steps=1"],
                                     parallel=2)
    runner.trainer = [sys.executable, str(trainer)]
    return runner.run()

  assert run() == 1
  # (In-process, with JAX loaded by other tests, Python may also warn about fork.)
  err = [l for l in capsys.readouterr().err.strip().splitlines() if l.startswith("vitcls")]
  assert len(err) == 1 and err[0].startswith("vitcls: error: 2 of 3 sweep members failed: "
                                             "lr=0.2 (see "), err
  assert os.path.join(workdir, "lr=0.3", "train.log") in err[0]
  info = _member(workdir, "lr=0.2")
  assert (info["status"], info["returncode"], info["attempts"]) == ("failed", 3, 1)
  assert info["overrides"] == {"lr": 0.2} and info["wall_time_s"] > 0
  assert _member(workdir, "lr=0.1")["status"] == "done"
  with open(os.path.join(workdir, "sweep.csv")) as f:
    assert [r["status"] for r in csv.DictReader(f)] == ["done", "failed", "failed"]

  os.remove(os.path.join(workdir, "broken"))  # "Fixed": the same command again.
  assert run() == 0
  out = capsys.readouterr().out
  assert "1 already done, 2 to run" in out and "done lr=0.3: val/top1=0.3000" in out
  assert [_member(workdir, f"lr={lr}")["attempts"] for lr in (0.1, 0.2, 0.3)] == [1, 2, 2]
  log = open(os.path.join(workdir, "lr=0.2", "train.log")).read()
  assert log.count("==== vitcls.sweep: attempt") == 2 and "--config.total_steps=1" in log
  with open(os.path.join(workdir, "sweep.csv")) as f:
    rows = list(csv.DictReader(f))
  assert [(r["status"], r["val/top1"]) for r in rows] == [
      ("done", "0.1"), ("done", "0.2"), ("done", "0.3")]


def test_a_second_sweep_runner_in_the_same_folder_stops_at_once(tmp_path):
  spec = _experiment(tmp_path, "sweep.product(lr=[0.1, 0.2])")
  workdir = str(tmp_path / "sweep")
  os.makedirs(workdir)
  members, resolved = sweep_members.load_members(spec)
  with sweep_local.sweep_lock(workdir):  # The first runner, alive: this process.
    runner = sweep_local.LocalRunner(spec, workdir, members, resolved, [])
    with pytest.raises(lock.WorkdirLockedError) as info:
      runner.run()
  assert "in use by another sweep" in str(info.value) and "\n" not in str(info.value)
  assert sorted(os.listdir(workdir)) == []  # Nothing started, the lock released.


def test_console_script_runs_sweep_and_launch(tmp_path):
  script = os.path.join(os.path.dirname(sys.executable), "vitcls")
  for command in ("sweep", "launch"):
    proc = subprocess.run([script, command, f"--config={DEFAULT_EXPERIMENT}",
                           f"--workdir={tmp_path}", "--launcher=slurm", "--gpus_per_node=1",
                           "--config.lrr=1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == ("vitcls: error: unknown config key 'lrr' (did you mean "
                                   "'lr'?): check the spelling, or see "
                                   "vitcls.configs.defaults() for the known keys")


# -------------------------------------------------------------- end to end

NAMES = ["lr=0.001", "lr=0.003", "lr=0.01"]
TOTAL = 60


def _three_member_experiment(tmp_path):
  """The default experiment at runlocal size, swept over 3 learning rates."""
  path = tmp_path / "three.py"
  path.write_text(
      "from vitcls import configs, sweep\n\n"
      "def get_config(arg=None):\n"
      f"  return configs.load_experiment({DEFAULT_EXPERIMENT + ':runlocal=True'!r})\n\n"
      "def get_sweep(arg=None):\n"
      "  return sweep.product(lr=[0.001, 0.003, 0.01])\n")
  return str(path)


def _member(workdir, name):
  try:
    with open(os.path.join(workdir, name, wdir.MEMBER_FILE)) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def _checkpoints(workdir, name):
  """Committed checkpoint steps: orbax writes `commit_success.txt` last into
  `<step>.orbax-checkpoint-tmp-*`, then renames that folder to `<step>`."""
  directory = os.path.join(workdir, name, "checkpoints")
  names = os.listdir(directory) if os.path.isdir(directory) else []
  return sorted(int(n) for n in names if n.isdigit() and os.path.isfile(
      os.path.join(directory, n, "commit_success.txt")))


def _alive(pid):
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except OSError:
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc")
def test_a_killed_sweep_resumes_and_skips_its_finished_members(tmp_path):
  from vitcls.data import sources
  sources.prepare_embedded("mnist5k", os.environ["TFDS_DATA_DIR"])  # Once, not per member.
  workdir = str(tmp_path / "sweep")
  # One member finished, one killed mid-run, one not started.
  command = [sys.executable, "-m", "vitcls.sweep",
             f"--config={_three_member_experiment(tmp_path)}", f"--workdir={workdir}",
             "--parallel=1", f"--config.total_steps={TOTAL}", "--config.checkpoint_every=10",
             "--config.log_every=1", "--config.evals.test.every=1000"]
  # Members share compiled steps through jax's persistent cache: the eval step and the
  # resumed member's train step compile once (the test's cost is mostly compilation).
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
             XLA_FLAGS=xla_flags(1),
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  with open(tmp_path / "first.out", "w") as out:
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)
  try:
    deadline = time.time() + 400
    while not (_member(workdir, NAMES[0]).get("status") == "done"
               and _checkpoints(workdir, NAMES[1])):
      assert proc.poll() is None, (tmp_path / "first.out").read_text()[-3000:]
      assert time.time() < deadline, "the second member wrote no checkpoint in time"
      time.sleep(0.05)
    second = _member(workdir, NAMES[1])
    os.kill(proc.pid, signal.SIGKILL)  # The sweep alone: its trainer must die with it.
    proc.wait()
    trainer = second["pid"]
    for _ in range(200):
      if not _alive(trainer):
        break
      time.sleep(0.05)
    assert not _alive(trainer), "the member's training outlived the killed sweep"
  finally:
    try:
      os.killpg(proc.pid, signal.SIGKILL)  # Whatever is left of the group.
    except ProcessLookupError:
      pass
  killed_at = _checkpoints(workdir, NAMES[1])
  assert killed_at and max(killed_at) < TOTAL  # Killed mid-member.
  assert _member(workdir, NAMES[1])["status"] == "running"
  assert not os.path.exists(os.path.join(workdir, NAMES[2]))
  log = open(os.path.join(workdir, NAMES[0], "train.log")).read()

  again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=400)
  assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
  assert "1 already done, 2 to run" in again.stdout
  with open(os.path.join(workdir, "sweep.csv")) as f:
    rows = list(csv.DictReader(f))
  assert [r["name"] for r in rows] == NAMES
  assert [r["lr"] for r in rows] == ["0.001", "0.003", "0.01"]
  assert all(r["status"] == "done" and r["steps"] == str(TOTAL) for r in rows)
  assert all(0.0 <= float(r["test/top1"]) <= 1.0 and r["test/loss"] for r in rows)
  second_log = open(os.path.join(workdir, NAMES[1], "train.log")).read()
  assert f"Resuming from the checkpoint of step {max(killed_at)}" in second_log
  # Not run again.
  assert open(os.path.join(workdir, NAMES[0], "train.log")).read() == log
  assert [_member(workdir, n)["attempts"] for n in NAMES] == [1, 2, 1]
  for name in NAMES:  # Every step logged once, the resumed member's too.
    steps = [r["step"] for r in read_metrics(os.path.join(workdir, name)) if "loss" in r]
    assert steps == list(range(1, TOTAL + 1)), name
  with open(os.path.join(workdir, "sweep.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert "3 members: 3 done." in open(os.path.join(workdir, "sweep.md")).read()
