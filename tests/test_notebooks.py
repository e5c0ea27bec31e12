"""The notebooks in notebooks/ run top to bottom from a fresh install, and are stored stripped.

Each runs in a fresh `python3` kernel of this interpreter, from `notebooks/`, in tiny mode
(`VITCLS_NOTEBOOK_TINY=1`, seconds instead of minutes) with its workdirs in pytest's
temporary folder (`VITCLS_NOTEBOOK_WORKDIR`); the kernel inherits this environment, so it
shares the session's TFDS data dir and JAX compilation cache. A failing cell fails the
test with that cell's error. With `VITCLS_NOTEBOOK_PLOTS=DIR` set, every figure of every
executed notebook is written to `DIR/<notebook>/cell<NN>_<k>.png`, for a person to look at.
"""

import base64
import glob
import os

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
import pytest

from conftest import REPO

NOTEBOOK_DIR = os.path.join(REPO, "notebooks")
NOTEBOOKS = sorted(glob.glob(os.path.join(NOTEBOOK_DIR, "*.ipynb")))
# The figures each notebook draws, at least (tiny mode draws them all too).
MIN_FIGURES = {
    "quickstart.ipynb": 6,  # curves, two grids, attention, confusion, reliability
    "finetune_your_images.ipynb": 5,  # shapes, report: curves, confusion, per class; predictions
    "reproduce_a_paper.ipynb": 3,  # report: curves, confusion, per class
}
CELL_TIMEOUT_S = 600


def _name(path):
  return os.path.basename(path)


def test_every_notebook_is_tested():
  assert sorted(map(_name, NOTEBOOKS)) == sorted(MIN_FIGURES)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_name)
def test_stored_without_outputs(path):
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  dirty = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code"
           and (cell.outputs or cell.execution_count is not None)]
  assert not dirty, f"{_name(path)}: code cells {dirty} hold outputs or execution counts"
  assert nb.metadata.kernelspec.name == "python3"


def _figures(nb):
  """(cell index, PNG bytes) of every image output, in order."""
  return [(i, base64.b64decode(output.data["image/png"]))
          for i, cell in enumerate(nb.cells) if cell.cell_type == "code"
          for output in cell.outputs if "image/png" in output.get("data", {})]


def _save_figures(figures, folder):
  os.makedirs(folder, exist_ok=True)
  for old in glob.glob(os.path.join(folder, "*.png")):
    os.remove(old)
  counts = {}
  for cell, png in figures:
    counts[cell] = counts.get(cell, 0) + 1
    with open(os.path.join(folder, f"cell{cell:02d}_{counts[cell]}.png"), "wb") as f:
      f.write(png)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_name)
def test_runs_top_to_bottom_in_tiny_mode(path, tmp_path):
  nb = nbformat.read(path, as_version=4)
  env = dict(os.environ, VITCLS_NOTEBOOK_TINY="1",
             VITCLS_NOTEBOOK_WORKDIR=str(tmp_path / "workdirs"), TF_CPP_MIN_LOG_LEVEL="2")
  client = NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT_S,
                          resources={"metadata": {"path": NOTEBOOK_DIR}})
  error = None
  try:
    client.execute(cwd=NOTEBOOK_DIR, env=env)
  except CellExecutionError as e:  # Its message: the failing cell and its traceback.
    error = str(e)
  if error:
    pytest.fail(f"{_name(path)} failed:\n{error}", pytrace=False)
  figures = _figures(nb)
  if os.environ.get("VITCLS_NOTEBOOK_PLOTS"):
    _save_figures(figures, os.path.join(os.environ["VITCLS_NOTEBOOK_PLOTS"],
                                        _name(path)[:-len(".ipynb")]))
  assert len(figures) >= MIN_FIGURES[_name(path)], (
      f"{_name(path)} drew {len(figures)} figures, expected {MIN_FIGURES[_name(path)]} or more")
  assert os.listdir(tmp_path / "workdirs")  # It wrote where it was told to.
