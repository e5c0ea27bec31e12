"""The other architectures on mnist5k, each small enough for a laptop CPU.

The same data, optimiser and budget as `mnist5k_vit.py` (`make train`: AdamW lr 3e-3, 100
warm-up steps then cosine, weight decay 0.05, label smoothing 0.1, batch 128, random
2-pixel shifts, digits kept on the device), with one of:
  mixer       MLP-Mixer: 4 blocks, 128 channels, patch 7 (16 tokens), token MLP 64,
              channel MLP 256, stochastic depth 0.1;
  convnext    ConvNeXt (v1, LayerScale 1e-6): depths (1, 1, 2, 1), dims
              (32, 64, 96, 128), stochastic depth 0.1, on the digits resized to 32 px
              (the four stages divide the image by 32);
  convnext_v2 the same with ConvNeXt V2's GRN instead of LayerScale;
  vit_reg     `make train`'s ViT with what DINOv2 and DeiT-III add: 4 register tokens,
              LayerScale 1e-5, a SwiGLU MLP, a class token.
Measured in vitcls on 2 CPU cores, 1,000 steps each, one run (test top-1, launch to
exit): mixer 97.5% (148 s), convnext 97.3% (327 s), convnext_v2 98.1% (262 s), vit_reg
96.6% (260 s); `make train`'s ViT reaches 97.5% in 2,000 steps. The README's "Start from
a published checkpoint" fine-tunes their exports on the 8x8 digits.

Arguments (`--config=experiments/mnist5k_models.py:model=mixer,steps=1000`):
  model: one of the names above.
  steps: training steps.
  runlocal: a few steps of a tiny model of the family, for tests.
"""

import os

from vitcls import configs

MODELS = {
    "mixer": ("mixer", dict(hidden_dim=128, num_blocks=4, tokens_mlp_dim=64,
                            channels_mlp_dim=256, patch_size=7, stoch_depth=0.1)),
    "convnext": ("convnext", dict(depths=(1, 1, 2, 1), dims=(32, 64, 96, 128), version=1,
                                  stoch_depth=0.1)),
    "convnext_v2": ("convnext", dict(depths=(1, 1, 2, 1), dims=(32, 64, 96, 128),
                                     version=2, stoch_depth=0.1)),
    "vit_reg": ("vit", dict(width=128, depth=4, mlp_dim=256, num_heads=4, patch_size=7,
                            pool_type="tok", num_registers=4, layer_scale_init=1e-5,
                            mlp_type="swiglu", stoch_depth=0.1)),
}
TINY = {
    "mixer": dict(hidden_dim=32, num_blocks=1, tokens_mlp_dim=16, channels_mlp_dim=64),
    "convnext": dict(dims=(8, 16, 24, 32)),
    "convnext_v2": dict(dims=(8, 16, 24, 32)),
    "vit_reg": dict(width=32, depth=1, mlp_dim=64, num_heads=2),
}


def get_config(arg=None):
  arg = configs.parse_arg(arg, model="mixer", steps=1000, runlocal=False)
  if arg.model not in MODELS:
    raise configs.ConfigError(f"mnist5k_models.py: model must be one of "
                              f"{', '.join(MODELS)}, got {arg.model}")
  # `make train`'s recipe, whose numbers its file explains; only the model changes.
  c = configs.load_experiment(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                           f"mnist5k_vit.py:steps={arg.steps},"
                                           f"runlocal={arg.runlocal}"))
  c.model_name, model = MODELS[arg.model]
  c.model = configs.ConfigDict(dict(model, **(TINY[arg.model] if arg.runlocal else {})))
  if c.model_name == "convnext":  # The four stages divide the image by 32: 28 -> 32 px.
    c.input.pp = "resize(32)|" + c.input.pp
    c.evals.test.pp = "resize(32)|" + c.evals.test.pp
  return c
