"""Look inside a trained run: its model and parameters, what it predicts, where it attends.

For notebooks and scripts that study a workdir in-process, without the CLIs:

  config, model, params = inspection.load_run("workdir/default")
  examples = inspection.eval_examples(config, count=16)       # the first evaluator's data
  probs = inspection.probabilities(model, params, examples.images)
  maps = inspection.relevance_maps(model, params, examples.images)  # (16, 4, 4)

Attention weights are read from flax's own attention code: every
`MultiHeadDotProductAttention` call is intercepted (`flax.linen.intercept_methods`) and
asked to `sow_weights`, so the model, its parameters and their names stay as they are,
and the weights are exactly the softmax(q k^T / sqrt(d)) the forward pass used. Attention
rollout follows Abnar & Zuidema 2020 ("Quantifying Attention Flow in Transformers"):
average the heads, add the identity for the residual connection, renormalise the rows,
and multiply the layers' matrices from the first block to the last.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitcls import configs, evaluators, metrics, models, sharding
from vitcls.run import checkpoint, report
from vitcls.run import workdir as wdir
from vitcls.data import pp as pp_lib
from vitcls.data import sources

_INTERMEDIATES = "intermediates"
_WEIGHTS = "attention_weights"


class LoadedRun(NamedTuple):
  """A workdir's resolved config, its model (a linen module) and a checkpoint's params."""
  config: configs.ConfigDict
  model: nn.Module
  params: dict


class Examples(NamedTuple):
  """Preprocessed examples of one split: model inputs, integer labels, class names."""
  images: np.ndarray        # float32 [N, H, W, C], as the model takes them ([-1, 1]).
  labels: np.ndarray        # int64 [N].
  label_names: list[str] | None


def load_run(workdir: str, step: int | None = None, ema: bool = False) -> LoadedRun:
  """(config, model, params) of a workdir: its `config.json` and a checkpoint.

  The latest intact checkpoint by default, or `step`; `ema=True` gives the EMA of the
  params (an error when the run kept none). Params are NumPy arrays on the host.
  """
  config = configs.load_workdir_config(workdir)
  model = models.build(config.model_name, config.num_classes, config.model)
  found, params, averaged = checkpoint.load_weights(workdir, step)
  if ema:
    if averaged is None:
      raise configs.ConfigError(f"the checkpoint of step {found} in {workdir} has no EMA of "
                                f"the params (config.ema_decay was off): pass ema=False")
    params = averaged
  return LoadedRun(config, model, params)


def serving_inputs(config):
  """(eval pp spec, model input shape HWC, label names or None) for serving the run.

  The pp is the first evaluator's (what the reported numbers were measured with); the
  input shape is what that pp makes of one example of the eval split. Used by the
  SavedModel export and by `vitcls.predict`.
  """
  if not config.evals:
    raise configs.ConfigError("the run has no config.evals: the serving export takes its "
                              "preprocessing from the first evaluator's pp")
  name, raw = next(iter(config.evals.items()))
  eval_config = evaluators.resolve(name, raw)
  name, data_dir = eval_config.data or config.input.data.name, config.input.data_dir or None
  source = sources.get_source(name, eval_config.split, data_dir)
  example = pp_lib.parse(eval_config.pp)(source[0], np.random.default_rng(0))
  names = sources.label_names(name, eval_config.split, data_dir)
  return eval_config.pp, tuple(np.shape(example["image"])), names


def ood_threshold(workdir: str, config, model, params, mesh) -> float:
  """The run's chosen MSP-score threshold; computed on the first eval split if none."""
  finals = report.final_metrics(workdir, wdir.read_metrics(workdir))
  chosen = [v for k, (_, v) in sorted(finals.items()) if k.endswith("/msp/threshold")]
  if chosen:
    return float(chosen[0])
  from vitcls import inference  # pylint: disable=g-import-not-at-top
  name, raw = next(iter(config.evals.items()))
  cfg = evaluators.resolve(name, raw)
  split = inference.factory(cfg, model=model, train_config=config, mesh=mesh,
                            batch_sharding=sharding.batch_sharding(mesh))(cfg.split)
  scores = metrics.msp_score(split.run(params)["logits"])
  return float(metrics.threshold_at_tpr(scores, 0.95))


def eval_examples(config, count: int | None = None, eval_name: str | None = None,
                  split: str | None = None) -> Examples:
  """The first `count` examples (all by default) of an evaluator's split, preprocessed.

  The evaluator is `eval_name` (default: the first of `config.evals`), whose data, split
  and pp are used, so the images are what the reported metrics were measured on; `split`
  overrides the split. Labels are the pp's one-hot `labels` (argmax) when it makes them,
  else the source's `label`.
  """
  if not config.evals:
    raise configs.ConfigError("config.evals is empty: there is no evaluator to take the "
                              "data, split and pp from")
  name = eval_name or next(iter(config.evals))
  if name not in config.evals:
    raise configs.ConfigError(f"no evaluator '{name}' in config.evals (it has "
                              f"{', '.join(config.evals)})")
  cfg = evaluators.resolve(name, config.evals[name])
  data = cfg.data or config.input.data.name
  split = split or cfg.split
  data_dir = config.input.data_dir or None
  source = sources.get_source(data, split, data_dir)
  pp = pp_lib.parse(cfg.pp)
  n = len(source) if count is None else min(count, len(source))
  images, labels = [], []
  for i in range(n):
    raw = source[i]
    example = pp(dict(raw), np.random.default_rng(0))
    images.append(np.asarray(example["image"], np.float32))
    if "labels" in example and np.ndim(example["labels"]) == 1:
      labels.append(int(np.argmax(example["labels"])))
    else:
      labels.append(int(raw["label"]))
  return Examples(np.stack(images), np.asarray(labels, np.int64),
                  sources.label_names(data, split, data_dir))


def probabilities(model, params, images, batch_size: int = 256) -> np.ndarray:
  """Softmax of the model's logits for `images` (float [N, H, W, C]), in batches."""
  forward = jax.jit(lambda p, x: jax.nn.softmax(model.apply({"params": p}, x)[0]))
  images = np.asarray(images, np.float32)
  out = [np.asarray(forward(params, images[i:i + batch_size]))
         for i in range(0, len(images), batch_size)]
  return np.concatenate(out) if out else np.zeros((0, model.num_classes), np.float32)


def _sow_attention(next_fun, args, kwargs, context):
  """Interceptor: every attention call also stores its weights in `intermediates`."""
  if (isinstance(context.module, nn.MultiHeadDotProductAttention)
      and context.method_name == "__call__"):
    kwargs = dict(kwargs, sow_weights=True)
  return next_fun(*args, **kwargs)


def _unrolled(model, params):
  """The same ViT with one module per block (no scan, no remat), and its params.

  The model's `nn.scan` carries only the `params` collection, so weights sown inside it
  would be dropped; the blocks are therefore split out of the stacked params, which
  changes their layout, never their values.
  """
  if not (getattr(model, "scan", False) or getattr(model, "remat", False)):
    return model, params
  params = dict(params)
  encoder = dict(params.get("Transformer", {}))
  if "encoderblock" in encoder:
    stacked = encoder.pop("encoderblock")
    depth = len(jax.tree_util.tree_leaves(stacked)[0])
    for i in range(depth):
      encoder[f"encoderblock_{i}"] = jax.tree_util.tree_map(lambda x, i=i: x[i], stacked)
    params["Transformer"] = encoder
  return model.clone(scan=False, remat=False), params


def _sown(model, params, images) -> dict:
  """{module path: attention weights float32 [N, heads, queries, keys]} of one forward."""
  if not isinstance(model, models.get("vit")):
    raise ValueError(f"attention weights need a ViT (vitcls.models.vit.Model), got "
                     f"{type(model).__module__}.{type(model).__name__}")
  model, params = _unrolled(model, params)

  @jax.jit
  def forward(p, x):
    with nn.intercept_methods(_sow_attention):
      _, state = model.apply({"params": p}, x, train=False, mutable=[_INTERMEDIATES])
    return state[_INTERMEDIATES]

  found = {}
  def visit(node, path):
    for key, value in node.items():
      if key == _WEIGHTS:
        found["/".join(path)] = np.asarray(value[0], np.float32)
      elif isinstance(value, dict):
        visit(value, path + (key,))
  visit(jax.tree_util.tree_map(np.asarray, forward(params, jnp.asarray(images, jnp.float32))),
        ())
  return found


def attention_weights(model, params, images) -> np.ndarray:
  """Attention weights of every encoder block: float32 [depth, N, heads, tokens, tokens].

  Row q of `[l, n, h]` is how query token q of image n spreads head h of block l over the
  key tokens (rows sum to 1). Tokens are the patches in row-major order, after the class
  token when `pool_type="tok"`. A MAP head's own attention is not included.
  """
  return _blocks(_sown(model, params, images), model.sizes()["depth"])


def _blocks(found: dict, depth: int) -> np.ndarray:
  """The encoder blocks' weights of `_sown`'s dict, stacked in block order."""
  blocks = []
  for i in range(depth):
    prefix = f"Transformer/encoderblock_{i}/"
    block = [w for path, w in found.items() if path.startswith(prefix)]
    if len(block) != 1:
      raise ValueError(f"expected one attention in encoder block {i}, found {len(block)}")
    blocks.append(block[0])
  return np.stack(blocks)


def attention_rollout(weights) -> np.ndarray:
  """Attention rollout (Abnar & Zuidema 2020) of [depth, N, heads, tokens, tokens] weights.

  Each block's heads are averaged, the identity added (the residual connection carries
  each token on) and the rows renormalised to sum to 1; the rollout is the product
  A_depth ... A_2 A_1, float64 [N, tokens, tokens]: row q is how much of each input token
  reaches output token q through the attention of all blocks.
  """
  weights = np.asarray(weights, np.float64)
  if weights.ndim != 5 or weights.shape[-1] != weights.shape[-2]:
    raise ValueError(f"expected weights of shape [depth, N, heads, tokens, tokens], got "
                     f"{weights.shape}")
  tokens = weights.shape[-1]
  rollout = np.broadcast_to(np.eye(tokens), weights.shape[1:2] + (tokens, tokens))
  for block in weights:
    a = block.mean(axis=1) + np.eye(tokens)
    a = a / a.sum(axis=-1, keepdims=True)
    rollout = a @ rollout
  return rollout


def token_relevance(rollout, pool_type: str, probe=None) -> np.ndarray:
  """How much each patch token reaches what the head reads: float64 [N, patches].

  pool_type "tok": the class token's row of the rollout, class column dropped.
  "gap": the head reads the mean of all output tokens, so the mean of the rows.
  "map": the MAP probe's attention over the output tokens (`probe`, [N, heads, 1,
    tokens], averaged over heads) times the rollout; without `probe`, the mean of the
    rows as for "gap".
  Each image's values sum to 1 (to the share of the patches for "tok").
  """
  rollout = np.asarray(rollout, np.float64)
  if pool_type == "tok":
    return rollout[:, 0, 1:]
  if pool_type == "map" and probe is not None:
    reads = np.asarray(probe, np.float64).mean(axis=1)[:, 0]  # [N, tokens]
    return np.einsum("nq,nqk->nk", reads, rollout)
  if pool_type in ("gap", "map"):
    return rollout.mean(axis=1)
  raise ValueError(f"unknown pool_type {pool_type!r}: expected tok, gap or map")


def relevance_maps(model, params, images) -> np.ndarray:
  """Attention-rollout relevance of each patch, float64 [N, grid_h, grid_w].

  `token_relevance` of the `attention_rollout` of the model's blocks, for its pool_type
  (a MAP head's probe attention included), laid out on the patch grid; upsample it to
  the image (each cell covers one patch) to overlay it.
  """
  images = np.asarray(images, np.float32)
  found = _sown(model, params, images)
  weights = _blocks(found, model.sizes()["depth"])
  probe = next((w for path, w in found.items() if path.startswith("MAPHead")), None)
  relevance = token_relevance(attention_rollout(weights), model.pool_type, probe)
  ph, pw = model.sizes()["patch_size"]
  grid = (images.shape[1] // ph, images.shape[2] // pw)
  return relevance.reshape(len(images), *grid)
