"""What commands write: results shown before files, only their own kind of output
replaced, every refusal one line before the work, and no temporary left behind."""

import os
import shutil
import stat

import numpy as np
from PIL import Image
import pytest

from vitcls import evaluate, export, predict
from vitcls.errors import UserError
from vitcls.run import workdir as wdir
from conftest import train_runlocal_mnist



@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A runlocal mnist5k ViT trained for 6 steps, with its report; tests copy it to change it."""
  return train_runlocal_mnist(tmp_path_factory)


@pytest.fixture
def images(tmp_path):
  folder = tmp_path / "images"
  folder.mkdir()
  for i in range(3):
    Image.fromarray(np.full((28, 28, 3), 80 * i, np.uint8)).save(folder / f"{i}.png")
  return str(folder)


def _tree(root) -> dict[str, bytes | None]:
  """Every path under `root` with its bytes (None for a folder): what must stay as it was."""
  out = {}
  for parent, folders, files in os.walk(root):
    for name in folders:
      out[os.path.relpath(os.path.join(parent, name), root)] = None
    for name in files:
      with open(os.path.join(parent, name), "rb") as f:
        out[os.path.relpath(os.path.join(parent, name), root)] = f.read()
  return out


# ------------------------------------------------------------------ evaluate


def _unwritable_report(workdir: str, how: str) -> None:
  report = wdir.report_dir(workdir)
  if how == "read_only":
    if os.geteuid() == 0:
      pytest.skip("root writes through file permissions")
    for path in (report, wdir.artifacts_dir(workdir)):
      os.chmod(path, 0o555)
  else:  # Any user: a file where the report's folder must be.
    shutil.rmtree(report)
    with open(report, "w") as f:
      f.write("not a folder")


@pytest.mark.parametrize("how", ["read_only", "report_is_a_file"])
def test_evaluate_prints_its_metrics_then_says_in_one_line_where_it_could_not_write(
    trained, tmp_path, capsys, how):
  workdir = str(tmp_path / "run")
  shutil.copytree(trained, workdir)
  _unwritable_report(workdir, how)
  before = _tree(workdir)
  try:
    status = evaluate.main(["vitcls evaluate", f"--workdir={workdir}"])
    after = _tree(workdir)
  finally:
    if os.path.isdir(wdir.report_dir(workdir)):
      for path in (wdir.report_dir(workdir), wdir.artifacts_dir(workdir)):
        os.chmod(path, stat.S_IRWXU)
  out, err = capsys.readouterr()
  assert status == 1
  metrics = dict(line.split(": ") for line in out.splitlines())
  assert float(metrics["test/count"]) == 1000 and 0 <= float(metrics["test/top1"]) <= 1
  assert "Traceback" not in err
  warnings = [line for line in err.splitlines() if line.startswith("vitcls:")]
  assert len(warnings) == 1 and warnings[0].startswith("vitcls: warning: the metrics above "
                                                       "are not saved (")
  assert wdir.report_dir(workdir) in warnings[0]
  assert after == before  # Nothing half-written, no temporary left.

  if how == "read_only":  # Writable again: the same command saves its results.
    assert evaluate.main(["vitcls evaluate", f"--workdir={workdir}"]) == 0
    assert os.path.isfile(wdir.evaluate_path(workdir))


# ------------------------------------------------------------------ refused outputs


def _foreign(tmp_path, what: str) -> str:
  """An output path that holds something that is no command's own output."""
  if what == "folder":
    path = tmp_path / "folder"
    path.mkdir()
    (path / "keep.txt").write_text("keep me")
  elif what == "file":
    path = tmp_path / "notes.txt"
    path.write_text("keep me")
  else:  # A path under a file.
    (tmp_path / "notes.txt").write_text("keep me")
    path = tmp_path / "notes.txt" / "out"
  return str(path)


@pytest.mark.parametrize("what", ["folder", "file", "under_a_file"])
def test_predict_refuses_an_output_that_is_not_a_predictions_csv_before_any_work(
    trained, tmp_path, images, what):
  output = _foreign(tmp_path, what)
  before = _tree(tmp_path)
  # A run, then no run at all: the output is checked before the checkpoint is read.
  for workdir in (trained, str(tmp_path / "no_run")):
    with pytest.raises(UserError, match="predictions CSV|is a file, not a folder") as e:
      predict.predict(workdir, images, output)
    assert "\n" not in str(e.value) and "choose another output path" in str(e.value)
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("flag", ["batch_size", "topk"])
@pytest.mark.parametrize("value", [0, -1])
def test_predict_refuses_a_count_below_one_in_one_line_before_any_work(
    tmp_path, images, flag, value):
  with pytest.raises(UserError, match=f"^--{flag} must be a positive integer, got {value}$"):
    predict.predict(str(tmp_path / "no_run"), images, str(tmp_path / "p.csv"),
                    **{flag: value})
  assert not os.path.exists(tmp_path / "p.csv")


def test_predict_replaces_its_own_csv_and_leaves_no_temporary(trained, tmp_path, images):
  output = tmp_path / "out" / "preds.csv"
  output.parent.mkdir()
  output.write_text("")  # An empty file holds nothing to lose.
  assert predict.predict(trained, images, str(output), topk=3)["predicted"] == 3
  assert predict.predict(trained, images, str(output), topk=2)["predicted"] == 3
  assert output.read_text().startswith("path,label_1,prob_1,label_2,prob_2,ood_score,")
  assert os.listdir(output.parent) == ["preds.csv"]


@pytest.mark.parametrize("what", ["folder", "file", "under_a_file"])
def test_npz_export_refuses_an_output_that_is_not_an_npz_before_any_work(
    trained, tmp_path, what):
  output = _foreign(tmp_path, what)
  before = _tree(tmp_path)
  for workdir in (trained, str(tmp_path / "no_run")):
    with pytest.raises(UserError, match="an npz|is a file, not a folder") as e:
      export.export_npz(workdir, output)
    assert "\n" not in str(e.value)
    assert _tree(tmp_path) == before


def test_savedmodel_export_refuses_a_file_before_any_work(tmp_path):
  output = _foreign(tmp_path, "file")
  with pytest.raises(UserError, match="is a file, not a SavedModel"):
    export.export_savedmodel(str(tmp_path / "no_run"), output)
  assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_npz_export_replaces_an_npz_and_leaves_no_temporary(trained, tmp_path):
  output = tmp_path / "params.npz"
  np.savez(output, other=np.zeros(3))
  export.export_npz(trained, str(output))
  with np.load(output) as npz:
    assert "head/kernel" in npz.files and "other" not in npz.files
  assert os.listdir(tmp_path) == ["params.npz"]


# ------------------------------------------------------------------ the atomic writers


def test_atomic_file_refuses_a_folder_in_one_line_and_writes_nothing(tmp_path):
  (tmp_path / "out").mkdir()
  with pytest.raises(UserError, match="'.*out' is a folder, not a file"):
    wdir.atomic_write(str(tmp_path / "out"), "text")
  assert os.listdir(tmp_path) == ["out"] and not os.listdir(tmp_path / "out")


def test_failed_writes_leave_no_temporary_and_the_old_content(tmp_path, monkeypatch):
  target = tmp_path / "out"
  target.write_text("old")
  with pytest.raises(RuntimeError):
    with wdir.atomic_file(str(target)) as f:
      f.write("half")
      raise RuntimeError("interrupted")
  folder = tmp_path / "folder"
  folder.mkdir()
  (folder / "a").write_text("old")

  def fill(tmp):
    with open(os.path.join(tmp, "a"), "w") as f:
      f.write("new")

  def broken(tmp):
    fill(tmp)
    raise OSError("disk full")

  with pytest.raises(OSError, match="disk full"):
    wdir.atomic_dir(str(folder), broken)
  rename = os.rename

  def failing_commit(src, dst):  # The last rename, the new folder over the old one's place.
    if os.path.basename(src).endswith(".tmp") and dst == str(folder):
      raise OSError("rename failed")
    rename(src, dst)

  with monkeypatch.context() as m:
    m.setattr(os, "rename", failing_commit)
    with pytest.raises(OSError, match="rename failed"):
      wdir.atomic_dir(str(folder), fill)
  assert sorted(os.listdir(tmp_path)) == ["folder", "out"]
  assert target.read_text() == "old" and (folder / "a").read_text() == "old"


def test_atomic_dir_over_a_link_replaces_the_link_and_leaves_no_temporary(tmp_path):
  kept = tmp_path / "kept"
  kept.mkdir()
  (kept / "a").write_text("keep me")
  os.symlink(kept, tmp_path / "out")
  wdir.atomic_dir(str(tmp_path / "out"),
                  lambda tmp: open(os.path.join(tmp, "b"), "w").close())
  assert sorted(os.listdir(tmp_path)) == ["kept", "out"]
  assert not os.path.islink(tmp_path / "out") and os.listdir(tmp_path / "out") == ["b"]
  assert (kept / "a").read_text() == "keep me"


def test_check_output_takes_a_missing_path_an_empty_one_or_its_own_kind(tmp_path):
  (tmp_path / "empty").write_text("")
  (tmp_path / "empty_folder").mkdir()
  np.savez(tmp_path / "a.npz", x=np.zeros(2))
  for path, kind in [("new/deeper/x.npz", wdir.NPZ), ("empty", wdir.NPZ),
                     ("a.npz", wdir.NPZ), ("empty_folder", wdir.ANY_FOLDER)]:
    wdir.check_output(str(tmp_path / path), kind)
  with pytest.raises(wdir.OutputError, match="names a folder, not an npz"):
    wdir.check_output(str(tmp_path / "new") + "/", wdir.NPZ)
