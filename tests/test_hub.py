"""`model_init="hf-hub:<repo>"`: resolution through a real Hugging Face Hub cache, offline.

Each test lays out the cache huggingface_hub reads (`models--<owner>--<name>/` with
`refs/main` holding a commit, `blobs/<sha256>` and `snapshots/<commit>/<file>` links to
them) in a temporary folder, points HF_HUB_CACHE at it with HF_HUB_OFFLINE=1, and runs
the code `vitcls.run.build` and `vitcls.validate` run: nothing goes on the network.
"""

import hashlib
import json
import os
import re

import huggingface_hub
import jax
import numpy as np
import pytest
from safetensors.numpy import save

from vitcls import configs, models, validate
from vitcls.models import hub, loading, mixer
from vitcls.run import build

COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO = "timm/mixer_tiny_16.test_in1k"
TINY = dict(hidden_dim=8, num_blocks=2, tokens_mlp_dim=6, channels_mlp_dim=12,
            patch_size=4, head_zeroinit=False, gelu_approximate=False)


@pytest.fixture
def cache(tmp_path, monkeypatch):
  """An empty Hub cache the user's environment points at, offline, with no token."""
  root = tmp_path / "hf_home"
  monkeypatch.setenv("HF_HOME", str(root))
  monkeypatch.setenv("HF_HUB_CACHE", str(root / "hub"))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.delenv("HF_TOKEN", raising=False)
  return root / "hub"


def _put(cache, repo_id, files, commit=COMMIT):
  """`files` ({name: bytes}) as huggingface_hub stores a download of `repo_id` at `commit`;
  returns the snapshot folder."""
  repo = cache / ("models--" + repo_id.replace("/", "--"))
  snapshot = repo / "snapshots" / commit
  for folder in (repo / "refs", repo / "blobs", snapshot):
    folder.mkdir(parents=True, exist_ok=True)
  (repo / "refs" / "main").write_text(commit)  # No newline: read as it is.
  for name, data in files.items():
    digest = hashlib.sha256(data).hexdigest()
    (repo / "blobs" / digest).write_bytes(data)
    (snapshot / name).symlink_to(os.path.join("..", "..", "blobs", digest))
  return snapshot


def _timm_config(architecture, num_classes=5):
  """config.json as timm's push_to_hf_hub writes it (`save_config_for_hf`)."""
  return json.dumps({
      "architecture": architecture, "num_classes": num_classes, "num_features": 8,
      "global_pool": "avg",
      "pretrained_cfg": {"tag": "test_in1k", "custom_load": False,
                         "input_size": [3, 16, 16], "fixed_input_size": True,
                         "interpolation": "bicubic", "crop_pct": 0.875,
                         "crop_mode": "center", "mean": [0.5, 0.5, 0.5],
                         "std": [0.5, 0.5, 0.5], "num_classes": num_classes,
                         "pool_size": None, "first_conv": "stem.proj",
                         "classifier": "head"}}).encode()


def _images():
  return jax.random.uniform(jax.random.key(7), (2, 16, 16, 3), minval=-1, maxval=1)


def _mixer_params(seed):
  model = mixer.Model(num_classes=5, **TINY)
  return jax.device_get(model.init(jax.random.key(seed), _images())["params"])


def _as_timm(params):
  """vitcls Mixer params in timm's state-dict layout (names and PyTorch shapes)."""
  sd = {"stem.proj.weight": params["stem"]["kernel"].transpose(3, 2, 0, 1),
        "stem.proj.bias": params["stem"]["bias"],
        "norm.weight": params["pre_head_layer_norm"]["scale"],
        "norm.bias": params["pre_head_layer_norm"]["bias"],
        "head.weight": params["head"]["kernel"].T, "head.bias": params["head"]["bias"]}
  for i in range(TINY["num_blocks"]):
    block = params[f"MixerBlock_{i}"]
    for j in (1, 2):
      norm = block[f"LayerNorm_{j - 1}"]
      sd[f"blocks.{i}.norm{j}.weight"], sd[f"blocks.{i}.norm{j}.bias"] = (norm["scale"],
                                                                          norm["bias"])
      for mlp, ours in (("mlp_tokens", "token_mixing"), ("mlp_channels", "channel_mixing")):
        dense = block[ours][f"Dense_{j - 1}"]
        sd[f"blocks.{i}.{mlp}.fc{j}.weight"] = dense["kernel"].T
        sd[f"blocks.{i}.{mlp}.fc{j}.bias"] = dense["bias"]
  return {k: np.ascontiguousarray(v, np.float32) for k, v in sd.items()}


def _config(model_init, model_name="mixer"):
  c = configs.resolve(configs.ConfigDict())
  with c.unlocked():
    c.model_name, c.model_init, c.total_steps = model_name, model_init, 10
    c.model = configs.ConfigDict(TINY if model_name == "mixer" else {})
  return c


def test_a_hub_name_resolves_to_the_cached_snapshot_and_loads(cache):
  params = _mixer_params(seed=1)
  snapshot = _put(cache, REPO, {"model.safetensors": save(_as_timm(params)),
                                "config.json": _timm_config("mixer_s16_224")})
  resolved = hub.resolve(f"hf-hub:{REPO}", "mixer")
  assert os.path.samefile(resolved.path, snapshot / "model.safetensors")
  assert os.path.basename(os.path.dirname(resolved.path)) == COMMIT
  assert resolved.architecture == "mixer_s16_224"
  assert hub.resolve(f"hf-hub:{REPO}@{COMMIT}").path == resolved.path  # A pinned revision.
  # What build.Run.init_state does: resolve, then the model's loader reads the file.
  c = _config(f"hf-hub:{REPO}")
  assert validate.problems(c) == []
  weights = build.model_init_weights(c)
  assert weights == resolved.path
  loaded = models.load("mixer", _mixer_params(seed=2), weights, c.model,
                       origin=c.model_init)
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, params)


def _one_line(error) -> str:
  message = str(error.value)
  assert "\n" not in message, message
  return message


def test_not_cached_while_offline_says_how_to_get_it(cache):
  with pytest.raises(hub.HubError) as e:
    hub.resolve("hf-hub:timm/vit_base_patch16_224.augreg2_in21k_ft_in1k", "vit")
  message = _one_line(e)
  for part in (f"not in the Hugging Face cache {cache}", "HF_HUB_OFFLINE is set",
               "run once online", "`hf download timm/vit_base_patch16_224.augreg2_in21k_"
               "ft_in1k model.safetensors config.json`", "huggingface-cli download",
               "unset HF_HUB_OFFLINE"):
    assert part in message, (part, message)
  c = _config("hf-hub:timm/vit_base_patch16_224.augreg2_in21k_ft_in1k", "vit")
  assert [p for p in validate.problems(c) if "model_init" in p] == [
      f"config.model_init: {message}"]


def test_a_repo_with_only_pickled_weights_is_refused(cache):
  _put(cache, "someone/old_vit", {"pytorch_model.bin": b"\x80\x02pickle",
                                  "config.json": _timm_config("vit_small_patch16_224")})
  with pytest.raises(hub.HubError) as e:
    hub.resolve("hf-hub:someone/old_vit", "vit")
  message = _one_line(e)
  assert ("'hf-hub:someone/old_vit' has no model.safetensors, only pytorch_model.bin, a "
          "PyTorch pickle vitcls never loads") in message
  assert "safetensors.torch.save_file" in message
  assert validate.problems(_config("hf-hub:someone/old_vit", "vit"))[0] == (
      f"config.model_init: {message}")


@pytest.mark.parametrize("architecture, model_name, fragment", [
    ("convnext_tiny", "vit", "holds a timm 'convnext_tiny' but config.model_name is 'vit': "
                             "set config.model_name='convnext'"),
    ("deit3_small_patch16_224", "mixer", "set config.model_name='vit'"),
    ("resnetv2_50x1_bit", "vit", "set config.model_name='bit'"),
    ("regnety_160", "vit", "set config.model_name='regnet'"),
    ("resnet50", "vit", "holds a timm 'resnet50', which no vitcls model reads"),
])
def test_another_architecture_is_refused_at_validate_and_build(cache, architecture,
                                                                model_name, fragment):
  _put(cache, "timm/other", {"model.safetensors": save({"w": np.zeros(2, np.float32)}),
                             "config.json": _timm_config(architecture)})
  with pytest.raises(hub.HubError, match=fragment) as e:
    hub.resolve("hf-hub:timm/other", model_name)
  _one_line(e)
  found = validate.problems(_config("hf-hub:timm/other", model_name))
  assert [p for p in found if "model_init" in p] == [f"config.model_init: {e.value}"]


@pytest.mark.parametrize("name, fragment", [
    ("hf-hub:", re.escape("'hf-hub:' names no repo: write hf-hub:<owner>/<repo>"
                          "[@<revision>], e.g. hf-hub:timm/vit_base_patch16_224")),
    ("hf-hub:@main", "names no repo"),
    ("hf-hub:timm/a--b", "is not a Hub repo id"),
    ("hf-hub:timm/x@", "is not a Hub repo id"),
    ("hf-hub:a/b/c", "is not a Hub repo id"),
    ("hf-hub:timm/-x", "is not a Hub repo id"),
])
def test_malformed_names_are_one_line_everywhere(cache, name, fragment):
  with pytest.raises(hub.HubError, match=fragment) as e:
    hub.resolve(name)
  _one_line(e)
  c = _config(name)
  for local_files in (True, False):  # The form is checked even for a cluster's files.
    assert [p for p in validate.problems(c, local_files=local_files)
            if "model_init" in p] == [f"config.model_init: {e.value}"]


def test_the_cache_and_offline_mode_are_read_when_a_name_is_resolved(cache, monkeypatch):
  assert hub.cache_dir() == str(cache) and hub.offline()
  monkeypatch.delenv("HF_HUB_CACHE")
  assert hub.cache_dir() == os.path.join(os.environ["HF_HOME"], "hub")
  monkeypatch.setenv("HF_HUB_OFFLINE", "0")
  assert not hub.offline()
  # Online, the file is asked of the Hub (here a stand-in): its answers become one line.
  asked = []

  def missing(repo_id, filename, **kw):
    asked.append((repo_id, filename, kw["local_files_only"], kw["cache_dir"]))
    raise huggingface_hub.utils.EntryNotFoundError(f"404: {filename}")

  monkeypatch.setattr(huggingface_hub, "hf_hub_download", missing)
  monkeypatch.setattr(huggingface_hub, "file_exists", lambda *a, **kw: True)
  with pytest.raises(hub.HubError, match="only pytorch_model.bin") as e:
    hub.resolve("hf-hub:someone/pickled")
  _one_line(e)
  assert asked == [("someone/pickled", "model.safetensors", False, hub.cache_dir())]
  monkeypatch.setattr(huggingface_hub, "file_exists", lambda *a, **kw: False)
  with pytest.raises(hub.HubError, match="has no model.safetensors: use a repo that has"):
    hub.resolve("hf-hub:someone/empty")
  not_found = huggingface_hub.utils.RepositoryNotFoundError.__new__(
      huggingface_hub.utils.RepositoryNotFoundError)

  def no_repo(*a, **kw):
    raise not_found

  monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_repo)
  with pytest.raises(hub.HubError, match="no Hugging Face Hub repo 'someone/nothing'.*"
                     "HF_TOKEN") as e:
    hub.resolve("hf-hub:someone/nothing")
  _one_line(e)


def test_local_model_init_paths_are_checked_and_safetensors_accepted(tmp_path):
  path = tmp_path / "weights.safetensors"
  path.write_bytes(save({"head.weight": np.zeros((2, 3), np.float32)}))
  assert not [p for p in validate.problems(_config(str(path))) if "model_init" in p]
  found = [p for p in validate.problems(_config(str(tmp_path / "nope.safetensors")))
           if "model_init" in p]
  assert found == [f"config.model_init: '{tmp_path / 'nope.safetensors'}' does not exist: "
                   f"give an .npz or .safetensors checkpoint, a vitcls workdir, or "
                   f"hf-hub:<repo>"]
  assert loading.is_torch_layout(loading.read_params(str(path)))
