"""The pp op `randaug_timm`: timm 0.3.2's RandAugment, as DeiT trains with it.

References are written here from timm 0.3.2's formulas (timm/data/auto_augment.py at
6504a42832cb): PIL's ImageOps / ImageEnhance / transform called with the argument timm's
level function gives, NumPy pixel formulas, and counts over many seeded draws.
"""

import math

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from vitcls.data import pp as pp_lib
from vitcls.data.pp import randaug as ra

FILL = (124, 116, 104)  # round(255 * (0.485, 0.456, 0.406)).
BILINEAR = ra.Geometry(FILL, (Image.BILINEAR,))


def _image(size=24, seed=0):
  """A smooth RGB gradient plus noise: every op changes it, geometric ones visibly."""
  y, x = np.mgrid[0:size, 0:size]
  base = np.stack([9 * x + 11, 9 * y + 5, 250 - 5 * (x + y)], -1)
  noise = np.random.default_rng(seed).integers(0, 30, base.shape)
  return np.clip(base + noise, 0, 255).astype(np.uint8)


def _run(spec, img, seed=0):
  return pp_lib.parse(spec)({"image": img}, np.random.default_rng(seed))["image"]


# The config string.

@pytest.mark.parametrize("text, expected", [
    ("rand-m9-mstd0.5-inc1", (9, 2, 0.5, True)),  # DeiT's.
    ("rand-m9-n3-mstd0.5", (9, 3, 0.5, False)),  # timm's docstring example.
    ("rand", (10, 2, 0.0, False)),  # Defaults: m10, n2, no noise, plain list.
    ("rand-inc0", (10, 2, 0.0, True)),  # timm tests bool('0'): True.
    ("rand-n1-m15", (15, 1, 0.0, False)),  # Order free; m clipped only when drawn.
])
def test_config_string_parses_like_timm(text, expected):
  c = ra.parse_timm_config(text)
  assert (c.magnitude, c.num_layers, c.magnitude_std, c.increasing) == expected
  assert c.weights is None
  assert c.ops == (ra.TIMM_INCREASING_OPS if expected[3] else ra.TIMM_OPS)


def test_w0_weights_are_timms_normalised():
  c = ra.parse_timm_config("rand-mstd1-w0")
  assert c.magnitude_std == 1.0 and math.isclose(sum(c.weights), 1.0)
  raw = {"Rotate": 0.3, "ShearX": 0.2, "ShearY": 0.2, "TranslateXRel": 0.1,
         "TranslateYRel": 0.1, "Color": .025, "Sharpness": 0.025, "AutoContrast": 0.025,
         "Solarize": .005, "SolarizeAdd": .005, "Contrast": .005, "Brightness": .005,
         "Equalize": .005, "Posterize": 0, "Invert": 0}
  np.testing.assert_allclose(c.weights, [raw[n] / sum(raw.values()) for n in ra.TIMM_OPS])
  assert sum(w > 0 for w in c.weights) == 13


def test_op_lists_are_timms():
  assert len(ra.TIMM_OPS) == len(ra.TIMM_INCREASING_OPS) == 15
  assert "Cutout" not in ra.TIMM_OPS  # timm leaves it to random erasing.
  changed = {a: b for a, b in zip(ra.TIMM_OPS, ra.TIMM_INCREASING_OPS) if a != b}
  assert changed == {n: n + "Increasing" for n in (
      "Posterize", "Solarize", "Color", "Contrast", "Brightness", "Sharpness")}
  assert set(ra.TIMM_LAYERS) == set(ra.TIMM_OPS) | set(ra.TIMM_INCREASING_OPS)


@pytest.mark.parametrize("spec, part", [
    ("randaug_timm('rand-m9-foo')", "'foo'"),
    ("randaug_timm('rand-m9-mstd')", "'mstd'"),  # timm would skip it silently.
    ("randaug_timm('rand-m9.5')", "'m9.5'"),
    ("randaug_timm('rand-p0.5')", "'p0.5'"),  # Not in timm 0.3.2.
    ("randaug_timm('rand-w1')", "'w1'"),
    ("randaug_timm('rand-mstd1e999')", "'mstd1e999'"),
    ("randaug_timm('rand-w0-n14')", "without replacement"),
    ("randaug_timm('augmix-m9')", "must start with 'rand-'"),
    ("randaug_timm(9)", "must be a string"),
    ("randaug_timm(fill=(1, 2))", "fill must be"),
    ("randaug_timm(fill=(1, 2, 256))", "fill must be"),
    ("randaug_timm(interpolation='nearest')", "interpolation must be"),
])
def test_bad_configs_are_one_line_errors_naming_the_part(spec, part):
  with pytest.raises(pp_lib.PreprocessError) as e:
    pp_lib.parse(spec)
  assert part in str(e.value) and "\n" not in str(e.value)


def test_float_images_are_refused():
  with pytest.raises(pp_lib.PreprocessError, match="randaug_timm works on uint8"):
    _run("randaug_timm('rand-m9')", np.zeros((4, 4, 3), np.float32))


# Each op against PIL / NumPy at timm's argument for the magnitude.

def _pil(img):
  return Image.fromarray(img)


def _solarize_add(img, add):
  x = img.astype(int)
  return np.where(x < 128, np.minimum(255, x + add), x).astype(np.uint8)


MAGNITUDES = (0, 2.4, 5, 9, 9.7, 10)

def _posterize(img, bits):
  """PIL's ImageOps.posterize lookup, i & ~(2 ** (8 - bits) - 1): bits 0 gives black as
  the Pillow of timm 0.3.2's day did (today's Pillow refuses bits 0)."""
  if bits >= 1:
    return ImageOps.posterize(_pil(img), bits)
  return img & np.uint8(~(2 ** 8 - 1) & 0xFF)


def _level(m, top):
  return (m / 10.) * top  # timm's arithmetic order, so floats round the same way.


UNSIGNED = {  # name -> m -> reference image, from aa:122-173 and aa:187-257.
    "AutoContrast": lambda img, m: ImageOps.autocontrast(_pil(img)),
    "Equalize": lambda img, m: ImageOps.equalize(_pil(img)),
    "Invert": lambda img, m: 255 - img,
    "Posterize": lambda img, m: _posterize(img, int(_level(m, 4))),
    "PosterizeIncreasing": lambda img, m: _posterize(img, 4 - int(_level(m, 4))),
    "Solarize": lambda img, m: ImageOps.solarize(_pil(img), int(_level(m, 256))),
    "SolarizeIncreasing": lambda img, m: ImageOps.solarize(_pil(img),
                                                           256 - int(_level(m, 256))),
    "SolarizeAdd": lambda img, m: _solarize_add(img, int(_level(m, 110))),
    "Color": lambda img, m: ImageEnhance.Color(_pil(img)).enhance(_level(m, 1.8) + 0.1),
    "Contrast": lambda img, m: ImageEnhance.Contrast(_pil(img)).enhance(
        _level(m, 1.8) + 0.1),
    "Brightness": lambda img, m: ImageEnhance.Brightness(_pil(img)).enhance(
        _level(m, 1.8) + 0.1),
    "Sharpness": lambda img, m: ImageEnhance.Sharpness(_pil(img)).enhance(
        _level(m, 1.8) + 0.1),
}


@pytest.mark.parametrize("name", sorted(UNSIGNED))
def test_unsigned_ops_match_pil_at_timms_argument(name):
  img = _image()
  for m in MAGNITUDES:
    out = ra.TIMM_LAYERS[name](img, m, np.random.default_rng(0), BILINEAR)
    assert out.dtype == np.uint8 and out.shape == img.shape
    np.testing.assert_array_equal(out, np.asarray(UNSIGNED[name](img, m)),
                                  err_msg=f"{name} m={m}")


def test_posterize_to_zero_bits_is_black_as_in_pil():
  img = _image()
  assert not ra.TIMM_LAYERS["Posterize"](img, 2, None, BILINEAR).any()  # int(0.8) = 0.
  assert not ra.TIMM_LAYERS["PosterizeIncreasing"](img, 10, None, BILINEAR).any()
  # Solarize's threshold is 256 at m = 10 (nothing) and 0 increasing (all inverted).
  np.testing.assert_array_equal(ra.TIMM_LAYERS["Solarize"](img, 10, None, BILINEAR), img)
  np.testing.assert_array_equal(
      ra.TIMM_LAYERS["SolarizeIncreasing"](img, 10, None, BILINEAR), 255 - img)


def _affine_pil(img, coeffs, resample=Image.BILINEAR):
  return np.asarray(_pil(img).transform((img.shape[1], img.shape[0]), Image.AFFINE, coeffs,
                                        resample=resample, fillcolor=FILL))


def _enhancer(cls):
  return lambda img, v: np.asarray(cls(_pil(img)).enhance(1 + v))


SIGNED = {  # name -> (reference at signed argument v, v at magnitude m).
    "Rotate": (lambda img, v: np.asarray(_pil(img).rotate(
        v, resample=Image.BILINEAR, fillcolor=FILL)), lambda m: _level(m, 30.)),
    "ShearX": (lambda img, v: _affine_pil(img, (1, v, 0, 0, 1, 0)),
               lambda m: _level(m, 0.3)),
    "ShearY": (lambda img, v: _affine_pil(img, (1, 0, 0, v, 1, 0)),
               lambda m: _level(m, 0.3)),
    # Width for X, height for Y (aa:68-77); 0.45 of it at m = 10 (aa:216).
    "TranslateXRel": (lambda img, v: _affine_pil(img, (1, 0, v * img.shape[1], 0, 1, 0)),
                      lambda m: _level(m, 0.45)),
    "TranslateYRel": (lambda img, v: _affine_pil(img, (1, 0, 0, 0, 1, v * img.shape[0])),
                      lambda m: _level(m, 0.45)),
    "ColorIncreasing": (_enhancer(ImageEnhance.Color), lambda m: _level(m, .9)),
    "ContrastIncreasing": (_enhancer(ImageEnhance.Contrast), lambda m: _level(m, .9)),
    "BrightnessIncreasing": (_enhancer(ImageEnhance.Brightness), lambda m: _level(m, .9)),
    "SharpnessIncreasing": (_enhancer(ImageEnhance.Sharpness), lambda m: _level(m, .9)),
}


@pytest.mark.parametrize("name", sorted(SIGNED))
def test_signed_ops_match_pil_at_plus_or_minus_timms_argument(name):
  img = _image()
  reference, arg = SIGNED[name]
  for m in (2.5, 9, 10):
    plus, minus = reference(img, arg(m)), reference(img, -arg(m))
    assert not np.array_equal(plus, minus)
    signs = []
    for seed in range(16):
      out = ra.TIMM_LAYERS[name](img, m, np.random.default_rng(seed), BILINEAR)
      assert out.dtype == np.uint8 and out.shape == img.shape
      signs.append(1 if np.array_equal(out, plus) else -1 if np.array_equal(out, minus)
                   else 0)
    assert 0 not in signs, f"{name} m={m}: neither sign's reference"
    assert {1, -1} <= set(signs), f"{name} m={m}: one sign only"


def _bilinear_affine(img, coeffs):
  """NumPy reference of PIL's affine bilinear sampling: output pixel centre (x + .5,
  y + .5) maps to (u, v); outside the image -> fill (returned mask True), else bilinear
  between the pixel centres around it. Returns (image, is_fill, has_all_4_neighbours)."""
  h, w = img.shape[:2]
  a, b, c, d, e, f = coeffs
  y, x = np.mgrid[0:h, 0:w] + 0.5
  u, v = a * x + b * y + c, d * x + e * y + f
  outside = (u < 0) | (u >= w) | (v < 0) | (v >= h)
  x0, y0 = np.floor(u - 0.5).astype(int), np.floor(v - 0.5).astype(int)
  dx, dy = (u - 0.5 - x0)[..., None], (v - 0.5 - y0)[..., None]
  inner = (x0 >= 0) & (x0 + 1 < w) & (y0 >= 0) & (y0 + 1 < h) & ~outside
  xc, yc = np.clip(x0, 0, w - 2), np.clip(y0, 0, h - 2)
  p = img.astype(float)
  top = p[yc, xc] * (1 - dx) + p[yc, xc + 1] * dx
  bottom = p[yc + 1, xc] * (1 - dx) + p[yc + 1, xc + 1] * dx
  return top * (1 - dy) + bottom * dy, outside, inner


@pytest.mark.parametrize("name, coeffs", [
    ("ShearX", lambda v, img: (1, v, 0, 0, 1, 0)),
    ("ShearY", lambda v, img: (1, 0, 0, v, 1, 0)),
    ("TranslateXRel", lambda v, img: (1, 0, v * img.shape[1], 0, 1, 0)),
    ("TranslateYRel", lambda v, img: (1, 0, 0, 0, 1, v * img.shape[0])),
    ("Rotate", lambda v, img: _rotation(v, img)),
])
def test_geometric_ops_sample_where_timms_matrix_says(name, coeffs):
  """Independent of PIL: bilinear at the mapped pixel centre, the fill colour outside."""
  img = _image(32)
  arg = SIGNED[name][1](7)
  for seed in range(6):
    out = ra.TIMM_LAYERS[name](img, 7, np.random.default_rng(seed), BILINEAR)
    matches = []
    for v in (arg, -arg):
      expected, outside, inner = _bilinear_affine(img, coeffs(v, img))
      assert outside.any() and inner.sum() > 100
      matches.append((out[outside] == FILL).all()
                     and np.abs(out[inner] - expected[inner]).max() <= 1)
    assert any(matches), (name, seed)


def _rotation(degrees, img):
  """PIL's rotate matrix about the centre, as timm's PIL < 5.2 branch spells it (aa:95-116)."""
  h, w = img.shape[:2]
  t = -math.radians(degrees)
  a, b, d, e = math.cos(t), math.sin(t), -math.sin(t), math.cos(t)
  cx, cy = w / 2, h / 2
  return (a, b, -a * cx - b * cy + cx, d, e, -d * cx - e * cy + cy)


def test_translation_by_whole_pixels_moves_content_left_and_fills_with_the_mean():
  img = _image(20)  # 0.45 * 20 = 9 pixels at m = 10: exact for both filters.
  for interpolation in ("bilinear", "bicubic"):
    g = ra.Geometry(FILL, ra.TIMM_INTERPOLATIONS[interpolation])
    outs = [ra.TIMM_LAYERS["TranslateXRel"](img, 10, np.random.default_rng(s), g)
            for s in range(8)]
    left = [o for o in outs if np.array_equal(o[:, :11], img[:, 9:])]
    right = [o for o in outs if np.array_equal(o[:, 9:], img[:, :11])]
    assert left and right and len(left) + len(right) == 8
    assert (left[0][:, 11:] == FILL).all() and (right[0][:, :9] == FILL).all()


def test_interpolation_is_the_one_asked_for_or_drawn_per_op():
  img = _image()
  v = _level(9, 0.3)  # ShearX at m = 9.
  refs = {r: [_affine_pil(img, (1, s * v, 0, 0, 1, 0), r) for s in (1, -1)]
          for r in (Image.BILINEAR, Image.BICUBIC)}
  assert not np.array_equal(refs[Image.BILINEAR][0], refs[Image.BICUBIC][0])
  def filters(interpolation):
    g = ra.Geometry(FILL, ra.TIMM_INTERPOLATIONS[interpolation])
    seen = []
    for seed in range(40):
      out = ra.TIMM_LAYERS["ShearX"](img, 9, np.random.default_rng(seed), g)
      seen += [r for r, pair in refs.items() if any(np.array_equal(out, p) for p in pair)]
    assert len(seen) == 40
    return set(seen)
  assert filters("bilinear") == {Image.BILINEAR}
  assert filters("bicubic") == {Image.BICUBIC}
  assert filters("random") == {Image.BILINEAR, Image.BICUBIC}


def test_fill_is_configurable_and_grey_images_get_its_luma():
  img = _image()
  out = _run("randaug_timm('rand-m10-n8', fill=(1, 2, 3))", img, seed=3)
  assert out.shape == img.shape
  g = ra.Geometry((1, 2, 3), (Image.BILINEAR,))
  moved = ra.TIMM_LAYERS["TranslateYRel"](img, 10, np.random.default_rng(0), g)
  assert ((moved == (1, 2, 3)).all(-1)).sum() >= 10 * 24
  grey = img[..., :1]
  geometry = ra.Geometry((ra._grey_fill(FILL)[0],), (Image.BILINEAR,))
  assert geometry.fill == (round(0.299 * 124 + 0.587 * 116 + 0.114 * 104),)
  for seed in range(20):
    out = _run("randaug_timm('rand-m10-n4-inc1')", grey, seed)
    assert out.shape == grey.shape and out.dtype == np.uint8


# Probabilities and magnitude noise, by counts over many draws of one seeded rng.

def _record(monkeypatch):
  calls = []
  for name in ra.TIMM_LAYERS:
    monkeypatch.setitem(ra.TIMM_LAYERS, name,
                        lambda img, m, rng, g, name=name: calls.append((name, m)) or img)
  return calls


def test_ops_are_chosen_uniformly_and_applied_with_probability_half(monkeypatch):
  calls = _record(monkeypatch)
  op, rng, img, draws = pp_lib.parse("randaug_timm('rand-m9-inc1')"), \
      np.random.default_rng(0), _image(4), 6000
  for _ in range(draws):
    op({"image": img}, rng)
  # 2 layers, each applied with p 1/2: Binomial(12000, 1/2), 4 sigma = 219.
  assert abs(len(calls) - 6000) < 4 * math.sqrt(12000 / 4)
  counts = {n: 0 for n in ra.TIMM_INCREASING_OPS}
  for name, m in calls:
    counts[name] += 1
    assert m == 9.0  # No mstd: m exactly, every time.
  expected, sd = 12000 * 0.5 / 15, math.sqrt(12000 * (1 / 30) * (29 / 30))
  assert all(abs(c - expected) < 4 * sd for c in counts.values()), counts


def test_magnitude_noise_is_normal_around_m_clipped_to_0_10(monkeypatch):
  calls = _record(monkeypatch)
  op, rng, img = pp_lib.parse("randaug_timm('rand-m9-mstd0.5-n1')"), \
      np.random.default_rng(1), _image(4)
  while len(calls) < 8000:
    op({"image": img}, rng)
  m = np.array([c[1] for c in calls[:8000]])
  assert m.min() >= 0 and m.max() == 10.0
  # P(N(9, 0.5) >= 10) = P(Z >= 2) = 0.02275: those are clipped to exactly 10.
  p_top = 0.5 * math.erfc(2 / math.sqrt(2))
  assert abs((m == 10).mean() - p_top) < 4 * math.sqrt(p_top * (1 - p_top) / 8000)
  p_1sd = math.erf(1 / math.sqrt(2))  # Within 9 +- 0.5.
  assert abs((np.abs(m - 9) < 0.5).mean() - p_1sd) < 4 * math.sqrt(p_1sd * (1 - p_1sd) / 8000)
  inner = m[m < 10]  # Mean of N(9, .5) below 10: 9 - .5 pdf(2) / cdf(2).
  pdf2 = math.exp(-2) / math.sqrt(2 * math.pi)
  assert abs(inner.mean() - (9 - 0.5 * pdf2 / (1 - p_top))) < 4 * 0.5 / math.sqrt(len(inner))
  calls.clear()
  zero = pp_lib.parse("randaug_timm('rand-m0-mstd1-n1')")
  while len(calls) < 4000:
    zero({"image": img}, rng)
  m0 = np.array([c[1] for c in calls[:4000]])
  assert abs((m0 == 0).mean() - 0.5) < 4 * math.sqrt(0.25 / 4000)  # Half clipped at 0.


def test_w0_draws_by_weight_without_replacement(monkeypatch):
  calls = _record(monkeypatch)
  op, rng, img = pp_lib.parse("randaug_timm('rand-w0-n2')"), np.random.default_rng(2), \
      _image(4)
  for _ in range(4000):
    before = len(calls)
    op({"image": img}, rng)
    names = [n for n, _ in calls[before:]]
    assert len(names) == len(set(names))  # Never one op twice in an image.
  counts = {n: sum(c[0] == n for c in calls) for n in ra.TIMM_OPS}
  assert counts["Posterize"] == counts["Invert"] == 0
  assert counts["Rotate"] > counts["ShearX"] > counts["TranslateXRel"] > counts["Color"]


# The op as a whole.

def test_same_rng_same_output_uint8_shape_kept():
  img = _image(32)
  spec = "randaug_timm('rand-m9-mstd0.5-inc1', interpolation='bicubic')"
  outs = [_run(spec, img, seed) for seed in range(30)]
  for seed in (0, 7):
    np.testing.assert_array_equal(_run(spec, img, seed), outs[seed])
  assert all(o.dtype == np.uint8 and o.shape == img.shape for o in outs)
  changed = sum(not np.array_equal(o, img) for o in outs)
  # An image is unchanged when neither layer applies (1/4), about: most change.
  assert changed >= 15
  assert len({o.tobytes() for o in outs}) >= 15
  assert pp_lib.registry.get("randaug_timm").random
