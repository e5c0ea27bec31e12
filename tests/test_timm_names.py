"""timm architecture names map to vitcls configs of the published sizes."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitcls import configs, models, validate
from vitcls.models import timm_names
from conftest import REPO


def _count(name, classes, res):
  model_name, cfg, _ = timm_names.model_config(name)
  model = models.build(model_name, classes, cfg)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, res, res, 3)))
  return model_name, sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))


# timm's results-imagenet.csv / model docs, param_count in millions (2 decimals); the
# towers without a classifier (DINOv2, SigLIP) from timm's model cards (num_classes=0).
@pytest.mark.parametrize("name, classes, res, model_name, millions", [
    ("vit_base_patch16_224", 1000, 224, "vit", 86.57),
    ("deit_small_patch16_224", 1000, 224, "vit", 22.05),
    ("deit3_small_patch16_224", 1000, 224, "vit", 22.06),
    ("vit_small_patch14_reg4_dinov2", 0, 518, "vit", 22.06),
    ("vit_base_patch16_siglip_224", 0, 224, "vit", 92.88),
    ("convnext_tiny", 1000, 224, "convnext", 28.59),
    ("convnextv2_atto", 1000, 224, "convnext", 3.71),
    ("mixer_b16_224", 1000, 224, "mixer", 59.88),
])
def test_mapped_configs_have_timms_parameter_counts(name, classes, res, model_name,
                                                     millions):
  got_name, count = _count(f"hf-hub:timm/{name}.some_tag", classes, res)
  assert got_name == model_name
  assert round(count / 1e6, 2) == millions


def test_regnety_maps_to_the_paper_variant_with_timms_parameter_count():
  # timm's BN running statistics are buffers; vitcls's frozen BN holds them as params.
  model_name, cfg, norm = timm_names.model_config("hf-hub:timm/regnety_160.deit_in1k")
  assert (model_name, cfg, norm) == ("regnet", {"variant": "Y-16GF"}, timm_names.IMAGENET)
  model = models.build(model_name, 1000, cfg)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
  flat = jax.tree_util.tree_flatten_with_path(shapes["params"])[0]
  count = sum(int(np.prod(x.shape)) for path, x in flat
              if path[-1].key not in ("mean", "var"))
  assert round(count / 1e6, 2) == 83.59
  with pytest.raises(ValueError, match="'regnety_008_tv' is not one vitcls reads"):
    timm_names.model_config("regnety_008_tv")


def test_names_parse_and_normalisations_follow_the_weights():
  assert timm_names.architecture("hf-hub:timm/convnext_tiny.fb_in1k@main") == "convnext_tiny"
  assert timm_names.architecture("timm/vit_base_patch16_224.augreg2_in21k_ft_in1k") == (
      "vit_base_patch16_224")
  _, cfg, norm = timm_names.model_config("vit_base_patch14_reg4_dinov2")
  assert cfg["num_registers"] == 4 and cfg["layer_scale_init"] == 1e-5
  assert norm == timm_names.IMAGENET
  _, cfg, norm = timm_names.model_config("vit_so400m_patch14_siglip_384")
  assert (cfg["class_token"], cfg["pool_type"], norm) == (False, "map",
                                                          timm_names.MINUS_ONE_TO_ONE)
  assert timm_names.model_config("vit_giant_patch14_dinov2")[1]["mlp_type"] == "swiglu"
  assert timm_names.model_config("mixer_l16_224")[1]["variant"] == "L/16"
  assert timm_names.model_config("deit_base_distilled_patch16_224")[1]["distill_token"]
  for bad in ("resnet50", "vit_enormous_patch16_224"):
    with pytest.raises(ValueError, match=f"'{bad}' is not one vitcls reads"):
      timm_names.model_config(bad)


def test_finetune_takes_a_hub_name_and_says_when_it_cannot():
  spec = os.path.join(REPO, "experiments", "finetune.py")
  c = configs.resolve(configs.load_experiment(
      f"{spec}:init=hf-hub:timm/convnextv2_tiny.fcmae_ft_in1k,res=64,layer_decay=0.8"))
  assert c.model_name == "convnext" and c.model.version == 2 and c.layer_decay == 0.8
  assert timm_names.IMAGENET in c.input.pp and c.model_init.startswith("hf-hub:")
  for model in ("mixer", "convnext"):  # Their tiny runlocal models pass validation.
    tiny = configs.resolve(configs.load_experiment(f"{spec}:model={model},runlocal=True"))
    assert tiny.model_name == model and not validate.problems(tiny)
  with pytest.raises(configs.ConfigError, match="finetune.py: timm architecture 'resnet50'"):
    configs.load_experiment(f"{spec}:init=x.safetensors,arch=resnet50")
