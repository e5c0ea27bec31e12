"""Cluster launchers: the sbatch scripts (one run, a sweep's job array) and the TPU pod
command are valid shell that hands every override to the trainer unchanged."""

import os
import shlex
import subprocess
import sys

import pytest

from vitcls import cluster, launch
from vitcls.sweep import __main__ as sweep_cli
from vitcls.sweep import members as sweep_members
from conftest import DEFAULT_EXPERIMENT, write_sweep_experiment

# An override that shell quoting must not break: spaces, parentheses, `|` and quotes.
PP = "random_shift(2)|value_range(-1, 1)|onehot(10, key=\"label\")|keep('image', 'labels')"


def _bash_n(path):
  proc = subprocess.run(["bash", "-n", path], capture_output=True, text=True, timeout=30)
  assert proc.returncode == 0, proc.stderr


def _srun_argv(path, task=None):
  """The words the script hands to srun, by running it with srun replaced by printf."""
  env = dict(os.environ, SLURM_CPUS_PER_TASK="4")
  if task is not None:
    env["SLURM_ARRAY_TASK_ID"] = str(task)
  script = 'srun() { printf "%s\\0" "$@"; }; export -f srun; bash "$1"'
  proc = subprocess.run(["bash", "-c", script, "bash", path], capture_output=True,
                        env=env, timeout=30)
  assert proc.returncode == 0, proc.stderr.decode()
  return proc.stdout.decode().split("\0")[:-1]


def _experiment(tmp_path):
  return write_sweep_experiment(
      tmp_path, f"sweep.product({{'input.pp': ['value_range(-1,1)', {PP!r}]}}, lr=[0.1, 0.2])")


def test_sweep_job_array_runs_each_member_on_two_nodes(tmp_path, capsys):
  spec, workdir = _experiment(tmp_path), str(tmp_path / "sweep")
  assert sweep_cli.main(["vitcls sweep", f"--config={spec}", f"--workdir={workdir}",
                         "--launcher=slurm", "--nodes=2", "--gpus_per_node=8",
                         "--cpus_per_task=32", "--max_parallel=2", "--time=2:00:00",
                         "--partition=gpu", "--sbatch_args=--qos=high",
                         "--config.total_steps=50"]) == 0
  path = os.path.join(workdir, "sweep.sbatch")
  assert f"sbatch {path}" in capsys.readouterr().out.splitlines()
  _bash_n(path)
  text = open(path).read()
  for line in ["#SBATCH --array=0-3%2", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1",
               "#SBATCH --gpus-per-node=8", "#SBATCH --cpus-per-task=32",
               "#SBATCH --time=2:00:00", "#SBATCH --partition=gpu", "#SBATCH --qos=high",
               f"#SBATCH --output={workdir}/slurm/%x-%A_%a.out",
               "export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7"]:
    assert line in text.splitlines(), line
  assert os.path.isdir(os.path.join(workdir, "slurm"))  # sbatch does not create it.
  members, _ = sweep_members.load_members(spec)
  assert [m.values["input.pp"] for m in members] == ["value_range(-1,1)"] * 2 + [PP] * 2
  for task, member in enumerate(members):
    argv = _srun_argv(path, task)
    assert argv == [
        "--kill-on-bad-exit=1", sys.executable, "-m", "vitcls.train", "--distributed",
        f"--config={spec}", f"--workdir={workdir}/{member.name}",
        "--config.total_steps=50", f"--config.input.pp={member.values['input.pp']}",
        f"--config.lr={member.values['lr']}"]


def test_one_multi_node_run(tmp_path, capsys):
  workdir = str(tmp_path / "run dir")
  assert launch.main(["vitcls launch", "--launcher=slurm", "--nodes=2", "--gpus_per_node=4",
                      f"--config={DEFAULT_EXPERIMENT}", f"--workdir={workdir}",
                      f"--config.input.pp={PP}", "--config.model.depth=12",
                      "--account=proj", "--python=/opt/env/bin/python"]) == 0
  path = os.path.join(workdir, "launch.sbatch")
  assert shlex.split(capsys.readouterr().out.splitlines()[-1]) == ["sbatch", path]
  _bash_n(path)
  lines = open(path).read().splitlines()
  for line in ["#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=4",
               "#SBATCH --account=proj", "export JAX_LOCAL_DEVICE_IDS=0,1,2,3"]:
    assert line in lines, line
  assert not any("--array" in l for l in lines)
  assert _srun_argv(path) == [
      "--kill-on-bad-exit=1", "/opt/env/bin/python", "-m", "vitcls.train", "--distributed",
      f"--config={DEFAULT_EXPERIMENT}", f"--workdir={workdir}",
      f"--config.input.pp={PP}", "--config.model.depth=12"]


def test_tpu_pod_command_runs_on_every_worker(capsys):
  assert launch.main(["vitcls launch", "--launcher=tpu", "--tpu=my-pod", "--zone=us-east5-a",
                      "--project=lab", "--config=experiments/mnist5k_vit.py",
                      "--workdir=/mnt/shared/runs/a", f"--config.input.pp={PP}"]) == 0
  captured = capsys.readouterr()
  words = shlex.split(captured.out.strip())
  assert words[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-pod"]
  assert {"--zone=us-east5-a", "--project=lab", "--worker=all"} <= set(words)
  remote = [w for w in words if w.startswith("--command=")][0][len("--command="):]
  assert remote.startswith("cd ~/vitcls && ")
  assert shlex.split(remote.split(" && ", 1)[1]) == [
      "python3", "-m", "vitcls.train", "--distributed",
      "--config=experiments/mnist5k_vit.py", "--workdir=/mnt/shared/runs/a",
      f"--config.input.pp={PP}"]
  assert "storage every worker sees" in captured.err


@pytest.mark.parametrize("args, message", [
    (["--launcher=slurm", "--gpus_per_node=8", "--config.lrr=1"],
     "unknown config key 'lrr' (did you mean 'lr'?)"),
    (["--launcher=slurm"], "--gpus_per_node=G is required"),
    (["--launcher=tpu", "--zone=z"], "--launcher=tpu needs --tpu"),
    (["--launcher=k8s"], "got --launcher=k8s"),
    (["--gpus_per_node=8"], "--launcher is missing"),
    (["--launcher=slurm", "--nodes=2", "--gpus_per_node=8", "--config.input.batch_size=100"],
     "config.input.batch_size 100 is not divisible by the 16 devices: use a multiple of 16"),
    (["--launcher=slurm", "--gpus_per_node=8", "--config.model.widht=3"],
     "unknown config key 'model.widht' for model 'vit'"),
    (["--launcher=slurm", "--gpus_per_node=8", "--config.mesh=[('data', 4)]"],
     "config.mesh [('data', 4)] needs 4 devices but 8 are present"),
    (["--launcher=tpu", "--tpu=pod", "--zone=z", "--accelerator_type=v4-32",
      "--config.input.batch_size=100"],
     "config.input.batch_size 100 is not divisible by the 16 devices: use a multiple of 16"),
    (["--launcher=tpu", "--tpu=pod", "--zone=z", "--accelerator_type=v9-8"],
     "--accelerator_type=v9-8 is not a TPU type vitcls knows"),
], ids=["bad-key", "no-gpus", "no-tpu", "bad-launcher", "no-launcher", "batch-on-16-gpus",
        "model-field", "mesh-on-8-gpus", "batch-on-v4-32", "unknown-tpu"])
def test_mistakes_are_one_line_and_write_nothing(tmp_path, capsys, args, message):
  workdir = tmp_path / "run"
  assert launch.main(["vitcls launch", f"--config={DEFAULT_EXPERIMENT}",
                      f"--workdir={workdir}", *args]) == 2
  captured = capsys.readouterr()
  lines = captured.err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("vitcls: error: ") and message in lines[0]
  assert not captured.out and not workdir.exists()


def test_tpu_slices_give_their_devices_and_hosts():
  assert [cluster.tpu_topology(t) for t in ("v3-8", "v3-32", "v4-8", "v4-32", "v5p-16",
                                            "v5litepod-8", "v5litepod-16", "v6e-256")] == [
      (8, 1), (32, 4), (4, 1), (16, 4), (8, 2), (8, 1), (16, 4), (256, 64)]


def test_tpu_launch_leaves_the_workers_files_to_them(capsys):
  """The data and model_init are on the workers' storage, not necessarily here."""
  assert launch.main(["vitcls launch", "--launcher=tpu", "--tpu=pod", "--zone=z",
                      "--accelerator_type=v4-32", f"--config={DEFAULT_EXPERIMENT}",
                      "--workdir=/mnt/shared/runs/a",
                      "--config.input.data_dir=/mnt/shared/no-such-tfds"]) == 0
  assert "--config.input.data_dir=/mnt/shared/no-such-tfds" in capsys.readouterr().out


def test_sweep_job_array_checks_every_member_on_the_jobs_devices(tmp_path, capsys):
  spec = write_sweep_experiment(tmp_path, "sweep.product({'input.batch_size': [128, 100]})")
  workdir = tmp_path / "sweep"
  assert sweep_cli.main(["vitcls sweep", f"--config={spec}", f"--workdir={workdir}",
                         "--launcher=slurm", "--nodes=2", "--gpus_per_node=8"]) == 2
  captured = capsys.readouterr()
  assert captured.err.strip().splitlines() == [
      "vitcls: error: sweep member 2 of 2 (input.batch_size=100): config.input.batch_size "
      "100 is not divisible by the 16 devices: use a multiple of 16"]
  assert not captured.out and not workdir.exists()
