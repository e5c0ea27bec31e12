"""Mixup and CutMix inside the jitted train step, as pure functions of an explicit key.

Why here and not in the input pipeline: the mix must be reproducible from the train
state alone. The step derives its key as `fold_in(state.rng, step)` and passes it in;
nothing else in this module is random, so a resumed run mixes bitwise the same.

Conventions (facts from the papers and the two reference codebases, own code):
  * Partner of example i is example (i-1) mod B: the batch rolled by one, as
    big_vision does (timm flips the batch instead). No key is spent on the pairing.
  * `lam` is always the weight of the example itself; 1 - lam that of its partner.
  * Mixup (timm/DeiT, `mixup_alpha`): lam ~ Beta(alpha, alpha).
  * Mixup (big_vision, `mixup_p`): big_vision's `utils.get_mixup(rng, p)` draws
    a ~ Beta(p, p), then keeps a = max(a, 1 - a), so every example keeps at least
    half of its own image and label. `mixup_p` implements exactly that fold.
  * CutMix (timm/DeiT, `cutmix_alpha`): lam ~ Beta(alpha, alpha), a box of
    int(H * sqrt(1 - lam)) x int(W * sqrt(1 - lam)) centred uniformly on the image
    and clipped to it; the labels use the area actually pasted (timm's correct_lam).
    The box has exactly that size before clipping (timm's `rand_bbox` spans
    cy -/+ cut_h // 2, one pixel less for odd sizes).
  * Both on: the whole batch is CutMix with probability `switch_prob`, else Mixup
    (timm's per-batch switch). timm's `mix_prob` and per-example modes are not here.

The settings come from a config checked by `vitcls.validate` (finite, >= 0, not both
mixup forms, switch_prob in [0, 1]); they are not checked again here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _partner(x):
  """The rolled batch: row i holds example (i-1) mod B."""
  return jnp.roll(x, shift=1, axis=0)


def _blend(x, partner, lam):
  """lam * x + (1 - lam) * partner, in x's dtype."""
  lam = jnp.asarray(lam, jnp.float32)
  out = lam * x.astype(jnp.float32) + (1.0 - lam) * partner.astype(jnp.float32)
  return out.astype(x.dtype)


def mixup_with(images, labels, lam):
  """Mixup with a given `lam`: images and labels both lam * own + (1 - lam) * partner."""
  return (_blend(images, _partner(images), lam),
          _blend(labels, _partner(labels), lam))


def cutmix_box(rng, height: int, width: int, lam):
  """(top, left, box_h, box_w), int32 scalars: the CutMix box for ratio `lam`.

  Cut size int(H * sqrt(1 - lam)) by int(W * sqrt(1 - lam)), centre uniform over the
  pixels, then clipped to the image (so boxes near an edge are smaller).
  """
  ratio = jnp.sqrt(1.0 - jnp.asarray(lam, jnp.float32))
  cut_h = jnp.floor(height * ratio).astype(jnp.int32)
  cut_w = jnp.floor(width * ratio).astype(jnp.int32)
  rng_y, rng_x = jax.random.split(rng)
  cy = jax.random.randint(rng_y, (), 0, height, dtype=jnp.int32)
  cx = jax.random.randint(rng_x, (), 0, width, dtype=jnp.int32)
  top = jnp.clip(cy - cut_h // 2, 0, height)
  bottom = jnp.clip(cy - cut_h // 2 + cut_h, 0, height)
  left = jnp.clip(cx - cut_w // 2, 0, width)
  right = jnp.clip(cx - cut_w // 2 + cut_w, 0, width)
  return top, left, bottom - top, right - left


def cutmix_lam(box, height: int, width: int):
  """Own weight after pasting `box`: 1 - box area / (H * W), float32 in [0, 1]."""
  _, _, box_h, box_w = (jnp.asarray(v, jnp.int32) for v in box)
  kept = (height * width - box_h * box_w).astype(jnp.float32) / (height * width)
  return jnp.clip(kept, 0.0, 1.0)  # XLA may divide by multiplying by the reciprocal.


def cutmix_with(images, labels, box):
  """CutMix with a given box: the partner's pixels inside it, labels by pasted area."""
  _, height, width, _ = images.shape
  top, left, box_h, box_w = box
  rows = jax.lax.broadcasted_iota(jnp.int32, (height, width), 0)
  cols = jax.lax.broadcasted_iota(jnp.int32, (height, width), 1)
  inside = ((rows >= top) & (rows < top + box_h) &
            (cols >= left) & (cols < left + box_w))
  images = jnp.where(inside[None, :, :, None], _partner(images), images)
  return images, _blend(labels, _partner(labels), cutmix_lam(box, height, width))


def mix(rng, images, labels, *, mixup_alpha=0.0, mixup_p=0.0, cutmix_alpha=0.0,
        switch_prob=0.5):
  """(images, labels, info): the batch mixed as configured; info = scalars for metrics.

  Config values are static Python floats (checked by `vitcls.validate`); `rng` may be
  traced. All off returns the inputs themselves and an empty info. info: `mix_lam`
  (own weight actually used, the pasted-area one for CutMix) and `mix_cutmix` (1.0
  if CutMix, else 0.0).
  """
  mixup_alpha, fold = (mixup_p, True) if mixup_p > 0 else (mixup_alpha, False)
  alphas = [a for a in (mixup_alpha, cutmix_alpha) if a > 0]
  if not alphas:
    return images, labels, {}
  _, height, width, _ = images.shape
  rng_switch, rng_lam, rng_box = jax.random.split(rng, 3)
  # One Beta draw per method that is on, in one call: one sampler to compile.
  alphas = jnp.asarray(alphas, jnp.float32)
  lams = jax.random.beta(rng_lam, alphas, alphas, dtype=jnp.float32)

  def do_mixup(_):
    lam = jnp.maximum(lams[0], 1.0 - lams[0]) if fold else lams[0]
    return (*mixup_with(images, labels, lam), lam, jnp.float32(0.0))

  def do_cutmix(_):
    box = cutmix_box(rng_box, height, width, lams[-1])
    lam = cutmix_lam(box, height, width)
    return (*cutmix_with(images, labels, box), lam, jnp.float32(1.0))

  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cut = jax.random.uniform(rng_switch) < switch_prob
    images, labels, lam, is_cut = jax.lax.cond(use_cut, do_cutmix, do_mixup, None)
  else:
    images, labels, lam, is_cut = (do_cutmix if cutmix_alpha > 0 else do_mixup)(None)
  return images, labels, {"mix_lam": lam, "mix_cutmix": is_cut}
