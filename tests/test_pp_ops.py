"""The ImageNet-style pp ops: decode, resize_small, inception_crop, randaug, normalize,
random_erasing, drop, and their TF twins for serving.

Every check is against an independent computation: a NumPy formula written here, PIL's
own ImageOps/ImageEnhance, known pixel moves, or bounds the sampling must respect.
"""

import io
import math

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from vitcls import serving
from vitcls.data import pp as pp_lib
from vitcls.data.pp import image as pp_image
from vitcls.data.pp import randaug as ra
from vitcls.errors import UserError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _run(spec, example, seed=0):
  return pp_lib.parse(spec)(example, np.random.default_rng(seed))


def _gradient(size=16):
  """A uint8 RGB image whose channels vary differently over rows and columns."""
  y, x = np.mgrid[0:size, 0:size]
  return np.stack([16 * x + 7, 16 * y + 3, 255 - 8 * (x + y)], -1).astype(np.uint8)


def _encode(arr, fmt="PNG", **kw):
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, fmt, **kw)
  return buf.getvalue()


def _luma(img):
  return img.astype(np.float64) @ [0.299, 0.587, 0.114]


# inception_crop.

def _coords(h, w):
  """An int32 image whose pixel holds (row, column): a crop tells where it came from."""
  return np.stack(np.mgrid[0:h, 0:w], -1).astype(np.int32)


def test_inception_crop_area_and_aspect_stay_in_bounds_and_reach_them():
  img = _coords(200, 300)
  op, rng = pp_lib.parse("inception_crop"), np.random.default_rng(0)
  areas, aspects = [], []
  for _ in range(2000):
    crop = op({"image": img}, rng)["image"]
    h, w = crop.shape[:2]
    top, left = crop[0, 0]
    np.testing.assert_array_equal(crop, img[top:top + h, left:left + w])  # A window.
    # Sides are rounded from a real box with area in [5%, 100%] and w/h in [3/4, 4/3].
    assert (h + .5) * (w + .5) >= 0.05 * 60000 and (h - .5) * (w - .5) <= 60000
    assert (w + .5) / (h - .5) >= 3 / 4 and (w - .5) / (h + .5) <= 4 / 3
    areas.append(h * w / 60000)
    aspects.append(w / h)
  assert min(areas) < 0.055 and max(areas) > 0.85  # 0.89: w <= 4/3 h and h <= 200.
  assert min(aspects) < 0.76 and max(aspects) > 1.32
  # Boxes that do not fit are redrawn, so the area is uniform given that it fits.
  area, log_aspect = np.meshgrid(np.linspace(0.05, 1, 500),
                                 np.linspace(math.log(3 / 4), math.log(4 / 3), 500))
  fits = ((area * 60000 * np.exp(log_aspect) <= 300**2)
          & (area * 60000 / np.exp(log_aspect) <= 200**2))
  assert abs(np.mean(areas) - area[fits].mean()) < 0.02


def test_inception_crop_is_reproducible_and_resizes():
  img = _coords(200, 300)
  def corners(seed):
    crops = [_run("inception_crop", {"image": img}, seed * 100 + i)["image"]
             for i in range(5)]
    return [tuple(c[[0, -1], [0, -1]].ravel()) for c in crops]
  assert corners(1) == corners(1) and corners(1) != corners(2)
  out = _run("inception_crop(32)", {"image": _gradient(40)})["image"]
  assert out.shape == (32, 32, 3) and out.dtype == np.uint8


@pytest.mark.parametrize("h, w, box", [(200, 300, (0, 16, 200, 267)),
                                       (300, 200, (16, 0, 267, 200)),
                                       (200, 250, (0, 0, 200, 250))])
def test_inception_crop_falls_back_to_the_largest_central_crop_in_aspect(h, w, box):
  """area_min=100 fits only when the image's own aspect is in [3/4, 4/3]."""
  top, left, ch, cw = box
  img = _coords(h, w)
  for seed in range(3):
    crop = _run("inception_crop(area_min=100)", {"image": img}, seed)["image"]
    np.testing.assert_array_equal(crop, img[top:top + ch, left:left + cw])


def _torchvision_box(height, width, area_min, rng):
  """torchvision's RandomResizedCrop sampling, written out: the default's reference."""
  for _ in range(10):
    area = height * width * rng.uniform(area_min, 100) / 100
    aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
    if 0 < h <= height and 0 < w <= width:
      return rng.integers(0, height - h + 1), rng.integers(0, width - w + 1), h, w
  return None


def test_inception_crop_default_is_torchvisions_sampling_draw_for_draw():
  img = _coords(60, 90)
  for seed in range(200):
    box = _torchvision_box(60, 90, 30, np.random.default_rng(seed))
    got = _run("inception_crop(area_min=30)", {"image": img}, seed)["image"]
    if box is not None:
      top, left, h, w = box
      np.testing.assert_array_equal(got, img[top:top + h, left:left + w])
  for spec in ("inception_crop(area_min=30)", "inception_crop(area_min=30, "
               "sampling='torchvision', rounding='nearest')"):
    op = pp_lib.parse("decode|" + spec)
    assert type(op.ops[0]).__name__ == "_DecodeThenPil"


def _tf_boxes(n, h, w, area_min, area_max=100, seed=0):
  rng = np.random.default_rng(seed)
  return np.array([pp_image.tf_crop_box(h, w, area_min, area_max, rng) for _ in range(n)])


def _uniform_counts_ok(values, lo, hi, bins=10):
  """Counts in `bins` equal bins of [lo, hi] are binomial(n, 1/bins) within 5 sigma."""
  n = len(values)
  counts, _ = np.histogram(np.clip(values, lo, hi), bins=bins, range=(lo, hi))
  sigma = math.sqrt(n / bins * (1 - 1 / bins))
  return np.abs(counts - n / bins).max() < 5 * sigma, counts


def test_tf_sampling_draws_the_aspect_and_the_side_uniformly():
  """TF's sampler: aspect uniform in [0.75, 1.33]; at that aspect the height is uniform,
  so sqrt(area) is uniform in [sqrt(area_min), sqrt(area_max)] and the area is not.
  In a 400x400 image with areas up to 25% every attempt fits, so nothing is redrawn."""
  boxes = _tf_boxes(4000, 400, 400, 5, 25)
  h, w = boxes[:, 2].astype(float), boxes[:, 3].astype(float)
  ok, counts = _uniform_counts_ok(w / h, 0.75, 1.33)
  assert ok, counts
  root = np.sqrt(h * w / 400**2)
  ok, counts = _uniform_counts_ok(root, math.sqrt(0.05), 0.5)
  assert ok, counts
  # E[s^2] for s uniform in [a, b] is (a^2 + ab + b^2) / 3 = 0.137; uniform area: 0.15.
  a, b = math.sqrt(0.05), 0.5
  assert abs(np.mean(root**2) - (a * a + a * b + b * b) / 3) < 0.004
  assert (w / h).min() >= 0.75 - 0.5 / 100 and (w / h).max() <= 1.33 + 0.5 / 100


def test_tf_sampling_offsets_stop_one_short_of_the_far_edge():
  """TF draws the offset with Uniform(side - crop), which excludes side - crop."""
  boxes = _tf_boxes(3000, 10, 12, 5)
  top, left, h, w = boxes.T
  for start, side, full in ((top, h, 10), (left, w, 12)):
    part = side < full
    assert (start[part] + side[part] <= full - 1).all()
    assert (start[part] + side[part] == full - 1).any() and (start[part] == 0).any()
    assert (start[~part] == 0).all()


@pytest.mark.parametrize("h, w, area_min", [(200, 300, 100), (300, 60, 50)])
def test_tf_sampling_falls_back_to_the_whole_image(h, w, area_min):
  """Nothing fits: 100% of 200x300 needs aspect 1.5; 50% of 300x60 needs h >= 150, so
  w / h <= 0.4. torchvision's way would take a central crop of the first."""
  img = _coords(h, w)
  for seed in range(3):
    crop = _run(f"inception_crop(area_min={area_min}, sampling='tf')", {"image": img},
                seed)["image"]
    np.testing.assert_array_equal(crop, img)


def test_tf_sampling_matches_tensorflows_distribution():
  """TF's own sampler on a small image: the same boxes with the same frequencies."""
  tf = pytest.importorskip("tensorflow")
  # Both seeds fixed here: TF's draws do not depend on the random ops other tests ran
  # before in this process (the global seed alone left them to an op counter).
  tf.random.set_seed(0)
  n, shape = 2000, (9, 13)
  theirs = []
  for _ in range(n):
    begin, size, _ = tf.image.sample_distorted_bounding_box(
        shape + (3,), tf.zeros([0, 0, 4]), area_range=(0.3, 1.0), seed=7,
        min_object_covered=0, use_image_if_no_bounding_boxes=True)
    theirs.append((*begin.numpy()[:2], *size.numpy()[:2]))
  ours = _tf_boxes(n, *shape, 30)
  def freq(boxes):
    keys, counts = np.unique(np.asarray(boxes)[:, 2:], axis=0, return_counts=True)
    return {tuple(k): c / n for k, c in zip(keys, counts)}
  f, g = freq(theirs), freq(ours)
  assert sum(abs(f.get(k, 0) - g.get(k, 0)) for k in f.keys() | g.keys()) / 2 < 0.06
  for boxes in (np.asarray(theirs), ours):
    part = boxes[:, 2] < shape[0]
    assert (boxes[part, 0] + boxes[part, 2] <= shape[0] - 1).all()


# RandAugment: each operation against a reference.

def test_point_operations_match_formulas():
  img = _gradient()
  x = img.astype(np.int64)
  np.testing.assert_array_equal(ra.invert(img), 255 - x)
  for t in (0, 100, 128, 256):
    np.testing.assert_array_equal(ra.solarize(img, t), np.where(x < t, x, 255 - x))
  np.testing.assert_array_equal(ra.solarize(img, 128), np.asarray(ImageOps.solarize(
      Image.fromarray(img), 128)))
  for a in (0, 55, 110):
    np.testing.assert_array_equal(ra.solarize_add(img, a),
                                  np.where(x < 128, np.minimum(x + a, 255), x))
  for bits in (1, 2, 4, 8):
    step = 2**(8 - bits)
    np.testing.assert_array_equal(ra.posterize(img, bits), x // step * step)
  np.testing.assert_array_equal(ra.posterize(img, 0), ra.posterize(img, 1))
  np.testing.assert_array_equal(ra.LAYERS["Identity"](img, 10, None), img)


def test_auto_contrast_and_equalize_match_pil_and_formulas():
  img = (_gradient() // 3 + 50).astype(np.uint8)  # Low contrast: [52, 135] or so.
  out = ra.auto_contrast(img)
  lo, hi = img.min(axis=(0, 1)), img.max(axis=(0, 1))
  expected = np.floor((img - lo) * 255.0 / (hi - lo))
  np.testing.assert_array_equal(out, expected)
  assert (out.min(axis=(0, 1)) == 0).all() and (out.max(axis=(0, 1)) == 255).all()
  np.testing.assert_array_equal(out,
                                np.asarray(ImageOps.autocontrast(Image.fromarray(img))))
  flat = np.full((4, 4, 3), 9, np.uint8)
  np.testing.assert_array_equal(ra.auto_contrast(flat), flat)
  np.testing.assert_array_equal(ra.equalize(img),
                                np.asarray(ImageOps.equalize(Image.fromarray(img))))
  np.testing.assert_array_equal(ra.equalize(flat), flat)
  # One pixel per value: step (256 - 1) // 255 = 1, and value v has v pixels below it.
  ramp = np.arange(256, dtype=np.uint8).reshape(16, 16, 1)
  np.testing.assert_array_equal(ra.equalize(ramp), ramp)
  # Half the pixels 0, half 255 over 512 pixels: step 1, 255 -> 256 pixels below, clipped.
  halves = np.repeat(np.array([0, 255], np.uint8), 256).reshape(32, 16, 1)
  np.testing.assert_array_equal(ra.equalize(halves), halves)


@pytest.mark.parametrize("factor", [0.0, 0.3, 1.0, 1.9])
def test_enhance_operations_match_formulas_and_pil(factor):
  img = _gradient()
  x = img.astype(np.float64)
  def blend(deg):
    return np.clip(np.floor(deg + factor * (x - deg)), 0, 255)
  grey = np.round(_luma(img))[..., None]
  smooth = x.copy()
  smooth[1:-1, 1:-1] = np.floor(sum(x[1 + dy:15 + dy, 1 + dx:15 + dx]
                                    for dy in (-1, 0, 1) for dx in (-1, 0, 1)) / 13
                                + 4 * x[1:-1, 1:-1] / 13)
  references = {
      "brightness": (blend(np.zeros_like(x)), ImageEnhance.Brightness),
      "color": (blend(grey), ImageEnhance.Color),
      "contrast": (blend(np.full_like(grey, np.round(_luma(img).mean()))),
                   ImageEnhance.Contrast),
      "sharpness": (blend(smooth), ImageEnhance.Sharpness),
  }
  for name, (expected, enhancer) in references.items():
    out = getattr(ra, name)(img, factor)
    assert out.dtype == np.uint8 and out.shape == img.shape
    # Rounding of the grey level, float32 and truncation: within 1 level (times factor).
    assert np.abs(out - expected).max() <= 1 + abs(factor - 1), name
    np.testing.assert_array_equal(out, enhancer(Image.fromarray(img)).enhance(factor),
                                  err_msg=name)
  np.testing.assert_array_equal(ra.sharpness(img, 1.9)[0], img[0])  # Border kept.


def test_rotate_moves_pixels_about_the_centre():
  img = _gradient()
  np.testing.assert_array_equal(ra.rotate(img, 90), np.rot90(img))  # Counter-clockwise.
  np.testing.assert_array_equal(ra.rotate(img, -90), np.rot90(img, -1))
  np.testing.assert_array_equal(ra.rotate(img, 180), img[::-1, ::-1])
  odd = _gradient(15)
  out = ra.rotate(odd, 30)
  np.testing.assert_array_equal(out[7, 7], odd[7, 7])  # The centre stays.
  for corner in [(0, 0), (0, -1), (-1, 0), (-1, -1)]:
    np.testing.assert_array_equal(out[corner], [128, 128, 128])  # Rotated out: grey.


def test_shear_moves_rows_and_columns():
  img = _gradient(8)
  cols = np.arange(8)
  for level in (1, -1):
    out_x, out_y = ra.shear_x(img, level), ra.shear_y(img, level)
    for y in range(8):
      src = cols + level * y
      inside = (src >= 0) & (src < 8)
      np.testing.assert_array_equal(out_x[y, inside], img[y, src[inside]])
      assert (out_x[y, ~inside] == 128).all()
      np.testing.assert_array_equal(out_y[inside, y], img[src[inside], y])
      assert (out_y[~inside, y] == 128).all()
  big = _gradient(16)
  out = ra.shear_x(big, 0.3)
  for y in set(range(16)) - {5, 15}:  # Rows where x + 0.3 y is not a tie.
    src = np.floor(np.arange(16) + 0.3 * y + 0.5).astype(int)
    inside = src < 16
    np.testing.assert_array_equal(out[y, inside], big[y, src[inside]])
    assert (out[y, ~inside] == 128).all()


def test_translate_moves_by_whole_pixels_with_grey_fill():
  img = _gradient(8)
  out = ra.translate_x(img, 3)
  np.testing.assert_array_equal(out[:, 3:], img[:, :5])
  assert (out[:, :3] == 128).all()
  out = ra.translate_x(img, -2)
  np.testing.assert_array_equal(out[:, :6], img[:, 2:])
  assert (out[:, 6:] == 128).all()
  out = ra.translate_y(img, 2)
  np.testing.assert_array_equal(out[2:], img[:6])
  assert (out[:2] == 128).all()
  assert (ra.translate_y(img, -100) == 128).all()


def test_cutout_greys_one_square_around_a_random_pixel():
  img = _gradient(40)
  for seed in range(20):
    out = ra.cutout(img, 5, np.random.default_rng(seed))
    rows, cols = np.nonzero((out != img).any(-1))
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    assert (out[top:bottom, left:right] == 128).all()
    np.testing.assert_array_equal(np.delete(np.delete(out, np.s_[top:bottom], 0),
                                            np.s_[left:right], 1),
                                  np.delete(np.delete(img, np.s_[top:bottom], 0),
                                            np.s_[left:right], 1))
    assert bottom - top <= 10 and right - left <= 10
    if 5 <= top and bottom <= 35 and 5 <= left and right <= 35:
      assert bottom - top == right - left == 10


def test_magnitude_maps_to_big_visions_arguments():
  img = _gradient()
  def outs(name, m, seeds=range(12)):
    return [ra.LAYERS[name](img, m, np.random.default_rng(s)) for s in seeds]
  def same(a, b):
    return np.array_equal(a, b)
  signed = {"Rotate": (ra.rotate, 30), "ShearX": (ra.shear_x, 0.3),
            "ShearY": (ra.shear_y, 0.3), "TranslateX": (ra.translate_x, 10),
            "TranslateY": (ra.translate_y, 10)}
  for name, (fn, at_10) in signed.items():
    m = 1 if name.startswith("Translate") else 10  # 100 px at m=10: all grey on 16 px.
    results = outs(name, m)
    plus, minus = fn(img, at_10), fn(img, -at_10)
    assert all(same(r, plus) or same(r, minus) for r in results), name
    assert any(same(r, plus) for r in results) and any(same(r, minus) for r in results)
  for m, bits in ((10, 4), (5, 2), (1, 1), (20, 8)):
    assert same(outs("Posterize", m, [0])[0], ra.posterize(img, bits))
  # Threshold 256, cast to uint8 by TF as big_vision passes it: 0, every pixel inverted.
  assert same(outs("Solarize", 10, [0])[0], 255 - img)
  assert same(outs("Solarize", 15, [0])[0], ra.solarize(img, 128))
  assert same(outs("Solarize", 5, [0])[0], ra.solarize(img, 128))
  assert same(outs("SolarizeAdd", 10, [0])[0], ra.solarize_add(img, 110))
  for name in ("Color", "Contrast", "Brightness", "Sharpness"):
    fn = getattr(ra, name.lower())
    assert same(outs(name, 10, [0])[0], fn(img, 1.9)), name
    assert same(outs(name, 5, [0])[0], img), name  # Factor 1.0.
  big = _gradient(100)
  cut = ra.LAYERS["Cutout"](big, 10, np.random.default_rng(3))
  rows, cols = np.nonzero((cut != big).any(-1))
  assert rows.max() - rows.min() < 80 and cols.max() - cols.min() < 80
  assert (cut == 128).all(-1).sum() >= 40 * 40  # A corner's quarter at least.


def test_randaug_is_deterministic_uint8_and_draws_ops_uniformly():
  img = _gradient(32)
  a = _run("randaug(2, 10)", {"image": img}, seed=5)["image"]
  b = _run("randaug(2, 10)", {"image": img}, seed=5)["image"]
  np.testing.assert_array_equal(a, b)
  assert a.dtype == np.uint8 and a.shape == img.shape
  changed = [not np.array_equal(_run("randaug(2, 10)", {"image": img}, s)["image"], img)
             for s in range(20)]
  assert sum(changed) >= 15
  grey = _run("randaug(2, 10)", {"image": img[..., :1]}, seed=1)["image"]
  assert grey.shape == (32, 32, 1) and grey.dtype == np.uint8
  for name in ra.LAYERS:  # Every operation on one channel: the same as on a grey RGB.
    out = ra.LAYERS[name](img[..., :1], 3, np.random.default_rng(0))
    rgb = ra.LAYERS[name](np.repeat(img[..., :1], 3, -1), 3, np.random.default_rng(0))
    assert out.shape == (32, 32, 1) and out.dtype == np.uint8, name
    assert np.abs(out.astype(int) - rgb).max() <= 1, name  # Grey of grey: luma rounding.
  np.testing.assert_array_equal(ra.color(img[..., :1], 1.9), img[..., :1])
  inverted = [np.array_equal(_run("randaug(1, ops=('Invert', 'Identity'))",
                                  {"image": img}, s)["image"], 255 - img)
              for s in range(400)]
  assert 0.42 < np.mean(inverted) < 0.58
  np.testing.assert_array_equal(
      _run("randaug(2, ops=['Invert'])", {"image": img})["image"], img)
  assert ra.PRESETS["paper"] == ra.PAPER_OPS and len(ra.PAPER_OPS) == 14
  assert len(ra.BIG_VISION_OPS) == 16 and set(ra.LAYERS) == set(ra.PAPER_OPS) | set(
      ra.BIG_VISION_OPS)


@pytest.mark.parametrize("spec, message", [
    ("randaug(2, 10, ops='timm')", "bad arguments for pp op"),
    ("randaug(2, 10, ops=['Rotate', 'Zoom'])", "unknown RandAugment operations ['Zoom']"),
    ("inception_crop(area_min=50, area_max=20)", "area_min <= area_max"),
    ("normalize((0.5,), (0.0,))", "std must be positive"),
    ("random_erasing(mode='rand')", "mode must be pixel or const"),
    ("decode(channels=4)", "channels must be 1 or 3"),
    ("resize_small(8, method='lanczos')", "method must be"),
    ("inception_crop(sampling='timm')", "sampling must be torchvision or tf"),
    ("resize(8, rounding='floor')", "rounding must be nearest or truncate"),
])
def test_bad_arguments_are_one_line_preprocess_errors(spec, message):
  with pytest.raises(pp_lib.PreprocessError) as e:
    pp_lib.parse(spec)
  assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("spec, image, message", [
    ("randaug(2, 10)", np.zeros((4, 4, 3), np.float32), "randaug works on uint8"),
    ("random_erasing(p=1.0)", np.zeros((4, 4, 3), np.uint8), "after normalize"),
    ("normalize((0.5, 0.5, 0.5), (0.2, 0.2, 0.2))", np.zeros((4, 4, 1), np.uint8),
     "3 mean values for 1-channel images"),
])
def test_ops_in_the_wrong_place_are_one_line_user_errors(spec, image, message):
  with pytest.raises(UserError) as e:
    _run(spec, {"image": image})
  assert message in str(e.value) and "\n" not in str(e.value)


# decode.

def test_decode_png_and_jpeg_to_rgb():
  img = _gradient(24)
  out = _run("decode", {"image": _encode(img), "label": 3})
  np.testing.assert_array_equal(out["image"], img)
  assert out["image"].dtype == np.uint8 and out["label"] == 3
  jpeg = _encode(img, "JPEG", quality=95, subsampling=0)  # 4:4:4: no chroma blur.
  out = _run("decode", {"image": jpeg})["image"]
  assert out.shape == (24, 24, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out,
                                np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")))
  assert np.abs(out.astype(int) - img).mean() < 3  # Lossy, but the same picture.
  for value in (np.bytes_(jpeg), np.array(jpeg), np.array(jpeg, dtype=object),
                np.frombuffer(jpeg, np.uint8), bytearray(jpeg)):
    np.testing.assert_array_equal(_run("decode", {"image": value})["image"], out)


def test_decode_converts_grey_alpha_and_palette_to_rgb_and_rgb_to_grey():
  img = _gradient(8)
  grey = img[..., 0]
  np.testing.assert_array_equal(_run("decode", {"image": _encode(grey)})["image"],
                                np.repeat(grey[..., None], 3, -1))
  rgba = np.concatenate([img, np.full((8, 8, 1), 7, np.uint8)], -1)
  np.testing.assert_array_equal(_run("decode", {"image": _encode(rgba)})["image"], img)
  palette = Image.fromarray(img).quantize(4)
  expected = np.asarray(palette.getpalette()[:12], np.uint8).reshape(4, 3)[
      np.asarray(palette)]
  buf = io.BytesIO()
  palette.save(buf, "PNG")
  np.testing.assert_array_equal(_run("decode", {"image": buf.getvalue()})["image"],
                                expected)
  luma = _run("decode(channels=1)", {"image": _encode(img)})["image"]
  assert luma.shape == (8, 8, 1)
  assert np.abs(luma[..., 0] - _luma(img)).max() <= 0.51  # ITU-R 601, rounded.
  deep = np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000
  np.testing.assert_array_equal(_run("decode", {"image": _encode(deep)})["image"][..., 0],
                                deep >> 8)


def test_decode_passes_arrays_through():
  img = _gradient(8)
  assert _run("decode", {"image": img})["image"] is img
  np.testing.assert_array_equal(_run("decode", {"image": img[..., 0]})["image"],
                                np.repeat(img[..., :1], 3, -1))
  np.testing.assert_array_equal(_run("decode", {"image": img[..., :1]})["image"],
                                np.repeat(img[..., :1], 3, -1))
  grey = _run("decode(channels=1)", {"image": img})["image"]
  np.testing.assert_array_equal(grey,
                                np.asarray(Image.fromarray(img).convert("L"))[..., None])


_NOISE = np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8)


@pytest.mark.parametrize("value, words", [
    (b"not an image at all", ["19 bytes", "not an image format"]),
    (_encode(_NOISE)[:2000], ["PNG image of 2000 bytes"]),
    (_encode(_NOISE, "JPEG")[:1000], ["JPEG image of 1000 bytes"]),
    (np.zeros((4, 4, 3), np.float32), ["float32", "(4, 4, 3)"]),
])
def test_corrupt_image_is_one_line_user_error(value, words):
  with pytest.raises(pp_lib.DecodeError) as e:
    _run("decode", {"image": value})
  assert isinstance(e.value, UserError)
  message = str(e.value)
  assert "\n" not in message and "'image'" in message
  assert all(w in message for w in words), message


# resize_small, normalize, random_erasing, drop.

@pytest.mark.parametrize("hw, size, expected", [
    ((20, 30), 10, (10, 15)), ((30, 20), 10, (15, 10)), ((7, 10), 4, (4, 6)),
    ((4, 6), 3, (3, 4)),  # 4.5 rounds half to even.
    ((10, 10), 10, (10, 10)), ((5, 9), 10, (10, 18)),
])
def test_resize_small_keeps_aspect(hw, size, expected):
  img = np.full(hw + (3,), 77, np.uint8)
  out = _run(f"resize_small({size})", {"image": img})["image"]
  assert out.shape == expected + (3,) and out.dtype == np.uint8 and (out == 77).all()
  assert pp_image.resize_small_shape(*hw, size) == expected


@pytest.mark.parametrize("method", ["bilinear", "bicubic", "area"])
@pytest.mark.parametrize("channels", [1, 3])
def test_uint8_resizes_within_one_level_of_float_resizes(method, channels):
  pil_filters = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "area": Image.BOX}
  # uint8 images resize in 8 bits, as torchvision's PIL resizes; the float32 path
  # (the same PIL filter without rounding between passes) is the reference. Pixels in
  # [40, 200]: bicubic overshoots, and 8 bits clip it between passes near 0 and 255.
  rng = np.random.default_rng(0)
  img = (rng.random((37, 53, channels)) * 60 + np.linspace(40, 140, 53)[:, None]
         ).astype(np.uint8)
  for spec in (f"resize(24, 30, method={method!r})", f"resize(64, 80, method={method!r})",
               f"resize_small(20, method={method!r})"):
    fast = _run(spec, {"image": img})["image"]
    exact = np.round(_run(spec, {"image": img.astype(np.float32)})["image"])
    assert fast.dtype == np.uint8 and fast.shape == exact.shape
    diff = np.abs(fast.astype(np.float32) - exact)
    assert diff.max() <= 1 and diff.mean() < 0.5, (spec, diff.max(), diff.mean())
  # Pixel for pixel what torchvision's PIL path gives (Resize, RandomResizedCrop).
  pil = Image.fromarray(img[..., 0] if channels == 1 else img)
  torchvision = np.asarray(pil.resize((30, 24), resample=pil_filters[method]))
  np.testing.assert_array_equal(
      _run(f"resize(24, 30, method={method!r})", {"image": img})["image"].reshape(
          torchvision.shape), torchvision)


def _one_by_one(spec):
  """`spec` without decode's fusion: each op parsed alone, run in turn."""
  ops = [pp_lib.parse(text).ops[0] for text in spec.split("|")]
  return pp_lib.Preprocess(spec, tuple(ops))


@pytest.mark.parametrize("spec", [
    "decode|inception_crop(24)|flip_lr|randaug(2,10)|value_range(-1,1)",
    "decode|inception_crop|resize(20, 16, method='bicubic')|random_crop(12)",
    "decode|resize_small(20)|central_crop(16)",
    "decode(channels=1)|resize(12)|inception_crop(8, area_min=30)|random_shift(1)",
    "decode|inception_crop(12, sampling='tf')|flip_lr",
])
def test_decode_runs_following_crops_and_resizes_in_pil_with_the_same_result(spec):
  fused = pp_lib.parse(spec)
  assert type(fused.ops[0]).__name__ == "_DecodeThenPil"  # Else nothing is tested.
  img = _gradient(40)[:, :30]
  grey = img[..., :1]
  inputs = [_encode(img, "JPEG", quality=90), _encode(img), _encode(grey[..., 0]),
            img, grey, _encode(np.dstack([img, img[..., :1]]))]  # RGBA: alpha dropped.
  for value in inputs:
    for seed in range(6):
      got = fused({"image": value, "label": 1}, np.random.default_rng(seed))
      want = _one_by_one(spec)({"image": value, "label": 1}, np.random.default_rng(seed))
      assert got.keys() == want.keys()
      np.testing.assert_array_equal(got["image"], want["image"])
      assert got["image"].dtype == want["image"].dtype


def test_normalize_matches_formula():
  img = _gradient()
  out = _run(f"normalize({IMAGENET_MEAN}, {IMAGENET_STD})", {"image": img})["image"]
  expected = (img / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
  assert out.dtype == np.float32
  np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
  out = _run("normalize(0.5, 0.25)", {"image": img[..., :1]})["image"]
  np.testing.assert_allclose(out, (img[..., :1] / 255.0 - 0.5) / 0.25, atol=1e-6)


def _erased_box(before, after):
  rows, cols = np.nonzero((after != before).any(-1))
  if not len(rows):
    return None
  top, left = rows.min(), cols.min()
  h, w = rows.max() + 1 - top, cols.max() + 1 - left
  assert len(rows) == h * w  # One full rectangle, nothing else.
  return top, left, h, w


@pytest.mark.parametrize("mode", ["pixel", "const"])
def test_random_erasing_erases_one_rectangle_in_bounds(mode):
  img = np.ones((40, 60, 3), np.float32)
  noise = []
  for seed in range(60):
    out = _run(f"random_erasing(p=1.0, mode='{mode}')", {"image": img}, seed)["image"]
    assert out.dtype == np.float32 and out.shape == img.shape
    top, left, h, w = _erased_box(img, out)
    assert h < 40 and w < 60  # Strictly inside, as timm.
    assert (h + .5) * (w + .5) >= 0.02 * 2400 and (h - .5) * (w - .5) <= 2400 / 3
    assert (h + .5) / (w - .5) >= 0.3 and (h - .5) / (w + .5) <= 1 / 0.3
    patch = out[top:top + h, left:left + w]
    if mode == "const":
      assert (patch == 0).all()
    else:
      noise.append(patch.ravel())
  if noise:
    noise = np.concatenate(noise)
    assert abs(noise.mean()) < 0.05 and abs(noise.std() - 1) < 0.05
  np.testing.assert_array_equal(_run("random_erasing(p=0.0)", {"image": img})["image"], img)
  hits = [_erased_box(img, _run("random_erasing", {"image": img}, s)["image"]) is not None
          for s in range(400)]
  assert 0.18 < np.mean(hits) < 0.32  # p=0.25.


def test_drop_removes_keys():
  example = {"image": 1, "label": 2, "id": 3}
  assert _run("drop('id', 'absent')", dict(example)) == {"image": 1, "label": 2}
  assert _run("drop", dict(example)) == example


# Together, and for serving.

def test_imagenet_train_spec_on_encoded_images():
  spec = "decode|inception_crop(32)|flip_lr|randaug(2,10)|value_range(-1,1)"
  image = _encode(np.random.default_rng(0).integers(0, 256, (48, 64, 3), np.uint8),
                  "JPEG")
  for seed in range(8):
    out = _run(spec + "|random_erasing|onehot(10)|drop('id')",
               {"image": image, "label": 4, "id": 7}, seed)
    assert set(out) == {"image", "label", "labels"}
    img = out["image"]
    assert img.dtype == np.float32 and img.shape == (32, 32, 3)
    out = _run(spec, {"image": image, "label": 4}, seed)["image"]
    assert out.dtype == np.float32 and out.shape == (32, 32, 3)
    assert out.min() >= -1 and out.max() <= 1


def test_serving_twins_of_resize_small_normalize_and_decode():
  tf = pytest.importorskip("tensorflow")
  norm = f"normalize({IMAGENET_MEAN}, {IMAGENET_STD})"
  spec = f"decode|resize_small(8)|central_crop(8)|{norm}|onehot(10)"
  ops = serving.image_ops(spec)
  assert len(ops) == 3  # decode and onehot have nothing to do.
  images = np.random.default_rng(0).integers(0, 256, (2, 12, 20, 3), np.uint8)
  served = tf.constant(images)
  for op in ops:
    served = op(served)
  host = [_run(spec, {"image": img, "label": 0})["image"] for img in images]
  assert served.shape == (2, 8, 8, 3)
  # PIL and TF resize differ by at most one uint8 level, 1 / (255 std) after normalize.
  np.testing.assert_allclose(served.numpy(), host, atol=1.01 / (255 * 0.224))
  (op,) = serving.image_ops(norm)
  np.testing.assert_array_equal(op(tf.constant(images)).numpy(),
                                [_run(norm, {"image": img})["image"] for img in images])
  (op,) = serving.image_ops("resize_small(3)")
  assert op(tf.zeros((1, 4, 6, 3), tf.uint8)).shape == (1, 3, 4, 3)  # Half to even.
  with pytest.raises(serving.ServingExportError, match="'randaug' is random"):
    serving.image_ops("randaug(2, 10)|value_range(-1,1)")


def _aliased_bilinear_reference(img, out_h, out_w):
  """TF's half-pixel-centre bilinear without antialiasing, pixel by pixel in float64:
  source y = (i + 0.5) * h / out_h - 0.5, neighbours floor/ceil clamped to the image."""
  img = img.astype(np.float64)
  h, w = img.shape[:2]
  out = np.zeros((out_h, out_w, img.shape[2]))
  for i in range(out_h):
    y = (i + 0.5) * h / out_h - 0.5
    y0, y1, fy = max(math.floor(y), 0), min(math.ceil(y), h - 1), y - math.floor(y)
    for j in range(out_w):
      x = (j + 0.5) * w / out_w - 0.5
      x0, x1, fx = max(math.floor(x), 0), min(math.ceil(x), w - 1), x - math.floor(x)
      top = img[y0, x0] * (1 - fx) + img[y0, x1] * fx
      bottom = img[y1, x0] * (1 - fx) + img[y1, x1] * fx
      out[i, j] = top * (1 - fy) + bottom * fy
  return out


def _assert_rounds_to(got, want):
  """uint8 `got` is float `want` rounded, except at .5 ties, which float32 may break
  either way (upscaling makes many: weights 1/4, 3/4 on integer pixels)."""
  tie = np.abs(want - np.floor(want) - 0.5) < 1e-3
  np.testing.assert_array_equal(got[~tie], np.round(want)[~tie])
  assert np.all(np.abs(got[tie] - want[tie]) <= 0.501)


@pytest.mark.parametrize("hw, out", [((23, 31), (10, 12)), ((9, 7), (20, 15)),
                                     ((16, 16), (16, 16))])
def test_resize_without_antialias_is_tf_style_bilinear(hw, out):
  img = np.random.default_rng(0).integers(0, 256, hw + (3,), np.uint8)
  want = _aliased_bilinear_reference(img, *out)
  got = _run(f"resize({out[0]},{out[1]},antialias=False)", {"image": img})["image"]
  assert got.dtype == np.uint8
  _assert_rounds_to(got, want)
  f = _run(f"resize({out[0]},{out[1]},antialias=False)",
           {"image": img.astype(np.float32)})["image"]
  np.testing.assert_allclose(f, want, rtol=0, atol=1e-3)
  if hw != out:  # The default (PIL) differs: it widens its kernel when shrinking.
    assert not np.array_equal(got, _run(f"resize({out[0]},{out[1]})",
                                        {"image": img})["image"])


def test_antialias_false_shrinks_by_sampling_pixels_pil_averages_them():
  """A 1-pixel checkerboard shrunk to 1/3: aliased bilinear samples pixel 3i+1 exactly
  ((i + 0.5) * 3 - 0.5), so it keeps a full-contrast board; PIL averages it to grey."""
  y, x = np.mgrid[0:30, 0:30]
  board = np.repeat((((x + y) % 2) * 255).astype(np.uint8)[..., None], 3, -1)
  third = _run("resize(10,antialias=False)", {"image": board})["image"]
  np.testing.assert_array_equal(third, board[1::3, 1::3])
  pil = _run("resize(10)", {"image": board})["image"]
  assert np.abs(pil.astype(int) - 128).max() <= 2


def test_antialias_reaches_resize_small_and_inception_crop():
  img = np.random.default_rng(1).integers(0, 256, (30, 45, 3), np.uint8)
  got = _run("resize_small(12,antialias=False)", {"image": img})["image"]
  _assert_rounds_to(got, _aliased_bilinear_reference(img, 12, 18))
  spec = "inception_crop(10,area_min=50,antialias=False)"
  for seed in range(4):
    box = pp_image.inception_crop_box(30, 45, 50, 100, np.random.default_rng(seed))
    top, left, h, w = box
    want = _aliased_bilinear_reference(img[top:top + h, left:left + w], 10, 10)
    _assert_rounds_to(_run(spec, {"image": img}, seed)["image"], want)
  # After decode the op runs on arrays (PIL has no aliased kernel): the same pixels.
  spec = "decode|inception_crop(12,antialias=False)|resize_small(8,antialias=False)"
  encoded = _encode(_gradient(40))
  for seed in range(3):
    np.testing.assert_array_equal(
        pp_lib.parse(spec)({"image": encoded}, np.random.default_rng(seed))["image"],
        _one_by_one(spec)({"image": encoded}, np.random.default_rng(seed))["image"])


@pytest.mark.parametrize("spec", ["resize(8,method='bicubic',antialias=False)",
                                  "resize_small(8,method='bicubic',antialias=False)",
                                  "inception_crop(8,method='bicubic',antialias=False)"])
def test_antialias_false_bicubic_is_refused_in_one_line(spec):
  with pytest.raises(UserError, match="antialias=False is implemented for method "
                                      "bilinear, area or nearest, not 'bicubic'"):
    pp_lib.parse(spec)
  with pytest.raises(Exception, match="antialias must be True or False"):
    pp_lib.parse("resize(8,antialias='no')")


def test_serving_twins_follow_antialias_false():
  tf = pytest.importorskip("tensorflow")
  images = np.random.default_rng(0).integers(0, 256, (2, 12, 20, 3), np.uint8)
  for spec in ("resize(7,9,antialias=False)", "resize_small(5,antialias=False)"):
    (op,) = serving.image_ops(spec)
    host = [_run(spec, {"image": img})["image"] for img in images]
    np.testing.assert_array_equal(op(tf.constant(images)).numpy(), host)
  (op,) = serving.image_ops("resize(7,9,antialias=False)")
  want = tf.image.resize(images.astype(np.float32), (7, 9), antialias=False).numpy()
  np.testing.assert_array_equal(op(tf.constant(images)).numpy(), np.round(want))
  # rounding='truncate' (big_vision's tf.cast after the resize) reaches the twins too.
  for spec in ("resize(7,9,antialias=False,rounding='truncate')",
               "resize_small(5,antialias=False,rounding='truncate')"):
    (op,) = serving.image_ops(spec)
    host = [_run(spec, {"image": img})["image"] for img in images]
    np.testing.assert_array_equal(op(tf.constant(images)).numpy(), host)
  (op,) = serving.image_ops("resize(7,9,antialias=False,rounding='truncate')")
  np.testing.assert_array_equal(op(tf.constant(images)).numpy(), np.floor(want))


def test_rounding_truncate_casts_toward_zero_as_big_vision():
  """[10, 21] upsampled to 4 columns, TF bilinear without antialias: taps at -0.25,
  0.25, 0.75, 1.25 give 10, 12.75, 18.25, 21."""
  img = np.array([[[10], [21]]], np.uint8)
  got = {r: _run(f"resize(1, 4, antialias=False, rounding={r!r})",
                 {"image": img})["image"][0, :, 0].tolist() for r in ("nearest", "truncate")}
  assert got == {"nearest": [10, 13, 18, 21], "truncate": [10, 12, 18, 21]}
  # Any kernel: the floor of the float resize (values stay in [0, 255]).
  img = np.random.default_rng(2).integers(0, 256, (23, 31, 3), np.uint8)
  for spec in ("resize(10, 12{})", "resize_small(9, method='area'{})",
               "resize(10, 12, antialias=False{})"):
    want = _run(spec.format(""), {"image": img.astype(np.float32)})["image"]
    got = _run(spec.format(", rounding='truncate'"), {"image": img})["image"]
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, np.floor(want))
  # inception_crop: the same box as without resizing, its resize truncated.
  spec = "inception_crop(10, sampling='tf', antialias=False, rounding='truncate')"
  for seed in range(4):
    top, left, h, w = pp_image.tf_crop_box(23, 31, 5, 100, np.random.default_rng(seed))
    want = _aliased_bilinear_reference(img[top:top + h, left:left + w], 10, 10)
    got = _run(spec, {"image": img}, seed)["image"]
    # Near an integer float32 may land either side of it (159.99998 truncates to 159).
    near = np.abs(want - np.round(want)) < 1e-3
    np.testing.assert_array_equal(got[~near], np.floor(want)[~near])
    assert np.isin(np.round(want[near]) - got[near], (0, 1)).all()


@pytest.mark.parametrize("spec", [
    "decode|resize_small(8, rounding='truncate')|central_crop(6)",
    "decode|inception_crop(12, sampling='tf', antialias=False, rounding='truncate')",
])
def test_decode_does_not_fuse_truncating_resizes_and_gives_the_same_pixels(spec):
  """PIL's 8-bit resize rounds: a truncating op runs on the decoded array instead."""
  assert type(pp_lib.parse(spec).ops[0]).__name__ == "_Decode"
  encoded = _encode(_gradient(40))
  for seed in range(3):
    np.testing.assert_array_equal(
        pp_lib.parse(spec)({"image": encoded}, np.random.default_rng(seed))["image"],
        _one_by_one(spec)({"image": encoded}, np.random.default_rng(seed))["image"])
