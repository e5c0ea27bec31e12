"""Checkpoint files other than .npz: safetensors read without torch, PyTorch pickles never."""

import pickle
import zipfile

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from vitcls.models import loading


class _Trap:
  """Unpickling this writes a file: the tests check that file never appears."""

  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return (open, (self.path, "w"))


def _torch_zip(path, trap):
  """What `torch.save` writes since PyTorch 1.6: a zip with `<name>/data.pkl` inside."""
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", pickle.dumps({"weight": _Trap(trap)}, protocol=2))
    z.writestr("archive/version", "3\n")


@pytest.mark.parametrize("name, write", [
    ("model.pth", "zip"), ("weights.bin", "zip"), ("checkpoint.npz", "zip"),
    ("legacy.pt", "pickle"), ("no_suffix", "pickle")])
def test_pytorch_pickles_are_refused_unread_with_how_to_convert(tmp_path, name, write):
  path, trap = str(tmp_path / name), tmp_path / "unpickled"
  if write == "zip":
    _torch_zip(path, str(trap))
  else:
    with open(path, "wb") as f:
      pickle.dump({"weight": _Trap(str(trap))}, f, protocol=2)
  with pytest.raises(loading.CheckpointError) as e:
    loading.read_params(path)
  message = str(e.value)
  assert "\n" not in message and "is a PyTorch pickle, which vitcls never unpickles" in message
  assert "safetensors.torch" in message and "weights_only=True" in message
  assert not trap.exists()  # Nothing was unpickled.


def test_safetensors_are_read_flat_with_their_dtypes(tmp_path):
  path = str(tmp_path / "model.safetensors")
  tensors = {"cls_token": np.arange(4, dtype=np.float32).reshape(1, 1, 4),
             "blocks.0.attn.qkv.weight": np.ones((12, 4), ml_dtypes.bfloat16)}
  save_file(tensors, path)
  tree = loading.read_params(path)
  assert sorted(tree) == sorted(tensors) and loading.is_torch_layout(tree)
  np.testing.assert_array_equal(tree["cls_token"], tensors["cls_token"])
  assert tree["blocks.0.attn.qkv.weight"].dtype == ml_dtypes.bfloat16
  assert not loading.is_torch_layout({"Transformer": {"encoder_norm": {}}})


def test_a_truncated_or_missing_safetensors_file_is_one_line(tmp_path):
  path = tmp_path / "model.safetensors"
  save_file({"head.weight": np.ones((10, 8), np.float32)}, str(path))
  path.write_bytes(path.read_bytes()[:-16])
  with pytest.raises(loading.CheckpointError, match="is not a complete .safetensors file"):
    loading.read_params(str(path))
  with pytest.raises(loading.CheckpointError, match="does not exist"):
    loading.read_params(str(tmp_path / "absent.safetensors"))
