"""Host-side image geometry of the streaming path: inception-style crop boxes, decoding with a
reduced JPEG scale, evaluation centre crops."""

import io

import numpy as np
import pytest
from PIL import Image

from kdjax import images


def smooth_jpeg(h, w, quality=95):
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 255 // max(1, w - 1), y * 255 // max(1, h - 1),
                    (x + y) * 255 // max(1, h + w - 2)], -1).astype(np.uint8)
    return images.encode_jpeg(img, quality), img


def test_inception_crop_box_respects_area_and_ratio():
    rng = np.random.default_rng(0)
    for _ in range(300):
        h, w = int(rng.integers(20, 400)), int(rng.integers(20, 400))
        top, left, ch, cw = images.inception_crop_box(rng, h, w)
        assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w and ch > 0 and cw > 0
    # Impossible ratio: the fallback is the central crop with the ratio clamped.
    top, left, ch, cw = images.inception_crop_box(rng, 10, 100, scale=(1.0, 1.0),
                                                  ratio=(1.0, 1.0))
    assert (ch, cw) == (10, 10) and left == 45 and top == 0


def test_random_resized_crop_decodes_the_box_at_reduced_scale():
    blob, img = smooth_jpeg(400, 480)
    out = images.decode_random_resized_crop(blob, (32, 40), np.random.default_rng(1))
    assert out.shape == (32, 40, 3) and out.dtype == np.uint8
    again = images.decode_random_resized_crop(blob, (32, 40), np.random.default_rng(1))
    np.testing.assert_array_equal(out, again)
    # Same box decoded at full scale and resized: the reduced DCT scale changes little.
    top, left, h, w = images.inception_crop_box(np.random.default_rng(1), 400, 480)
    full = Image.open(io.BytesIO(blob)).convert("RGB").resize(
        (40, 32), Image.BILINEAR, box=(left, top, left + w, top + h))
    assert np.abs(out.astype(int) - np.asarray(full).astype(int)).mean() < 4


def test_center_crop_and_resize():
    blob, img = smooth_jpeg(60, 90)
    out = images.decode_center_crop(blob, (16, 16), crop_fraction=1.0)
    ref = Image.fromarray(images.decode_rgb(blob)).resize((16, 16), Image.BILINEAR,
                                                          box=(15, 0, 75, 60))
    assert out.shape == (16, 16, 3)
    assert np.abs(out.astype(int) - np.asarray(ref).astype(int)).mean() < 3
    assert images.decode_resized(blob, (8, 12)).shape == (8, 12, 3)
    assert images.decode_rgb(blob).shape == (60, 90, 3)


def test_decode_images_rejects_wrong_sizes():
    png = images.encode_png(np.zeros((5, 5, 3), np.uint8))
    with pytest.raises(ValueError, match="expected a 4x4 image"):
        images.decode_images([png], (4, 4, 3))
