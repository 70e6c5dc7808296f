"""The pixel-analysis alignment score on the shapes data: real images pass, mismatched
captions fail, each category is checked."""
import numpy as np
import pytest

from jaxdit.data.shapes import COLORS, ShapesSource
from jaxdit.eval import alignment


@pytest.mark.parametrize("size", [32, 64])
def test_real_images_align_and_shuffled_captions_do_not(size):
    src = ShapesSource(300, size, seed=11)
    recs = [src[i] for i in range(300)]
    images, captions = [r["image"] for r in recs], [r["caption"] for r in recs]
    real = alignment.alignment_scores(images, captions)
    assert real["align/overall"] >= 0.98, real
    assert min(real.values()) >= 0.98
    shuffled = alignment.alignment_scores(images, list(np.random.default_rng(0).permutation(
        captions)))
    assert shuffled["align/overall"] < 0.1, shuffled
    # float images in [-1, 1] (what samplers return) score the same
    floats = [r.astype(np.float32) / 127.5 - 1.0 for r in images[:50]]
    assert alignment.alignment_scores(floats, captions[:50]) == \
        alignment.alignment_scores(images[:50], captions[:50])


def test_each_category():
    img = np.full((64, 64, 3), 20, np.uint8)
    img[8:24, 4:20] = COLORS["red"]  # a red square, top left
    yy, xx = np.mgrid[:64, :64]
    img[(yy - 44) ** 2 + (xx - 44) ** 2 <= 81] = COLORS["blue"]  # a blue circle, lower right
    s = alignment.score(img, "a red square left of a blue circle")
    assert s == {"color": True, "count": True, "shape": True, "position": True, "all": True}
    assert not alignment.score(img, "a red square right of a blue circle")["position"]
    assert not alignment.score(img, "a red circle above a blue circle")["shape"]
    assert not alignment.score(img, "a red square")["count"]
    assert not alignment.score(img, "a green square left of a blue circle")["color"]
    with pytest.raises(ValueError, match="shapes grammar"):
        alignment.parse_caption("a dog on a skateboard")
