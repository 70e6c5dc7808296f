"""Embedded shapes data, image-folder and TFDS sources, tokenizer and Grain pipeline."""
import numpy as np
import pytest
from PIL import Image

from jaxdit.data import shapes
from jaxdit.data.pipeline import make_dataset, make_tokenizer
from jaxdit.errors import ConfigError
from jaxdit.data.sources import ImageFolderSource, TfdsSource
from jaxdit.data.tokenizer import BOS, UNK
from tests.helpers import tiny_config


def _mean_pos(img, rgb):
    ys, xs = np.nonzero(np.all(np.abs(img.astype(int) - rgb) < 30, axis=-1))
    return xs.mean(), ys.mean(), len(xs)


def test_shapes_are_deterministic_and_match_captions():
    src = shapes.ShapesSource(500, image_size=32, seed=7)
    a, b = src[123], src[123]
    np.testing.assert_array_equal(a["image"], b["image"])
    assert a["caption"] == b["caption"]
    assert a["image"].shape == (32, 32, 3) and a["image"].dtype == np.uint8
    checked = 0
    for i in range(200):
        r = src[i]
        n = int(r["num_objects"])
        words = r["caption"].split()
        assert words.count("a") == n
        for k in range(n):
            assert shapes.COLOR_NAMES[r["obj_color"][k]] in words
            assert shapes.SHAPES[r["obj_shape"][k]] in r["caption"]
        assert 0 <= r["label"] < shapes.NUM_CLASSES
        if n == 2:  # the pixels agree with the spatial relation in the caption
            c0 = shapes.COLORS[shapes.COLOR_NAMES[r["obj_color"][0]]]
            c1 = shapes.COLORS[shapes.COLOR_NAMES[r["obj_color"][1]]]
            x0, y0, n0 = _mean_pos(r["image"], c0)
            x1, y1, n1 = _mean_pos(r["image"], c1)
            assert n0 > 3 and n1 > 3
            rel = r["caption"]
            ok = {"left of": x0 < x1, "right of": x0 > x1, "above": y0 < y1, "below": y0 > y1}
            assert [v for k, v in ok.items() if f" {k} " in rel] == [True]
            checked += 1
    assert checked > 20
    assert src[0]["caption"] != shapes.ShapesSource(500, 32, seed=8)[0]["caption"] or \
        not np.array_equal(src[0]["image"], shapes.ShapesSource(500, 32, seed=8)[0]["image"])
    with pytest.raises(IndexError):
        src[500]
    with pytest.raises(ValueError, match="max_objects"):
        shapes.ShapesSource(10, 32, max_objects=4)


def test_single_object_labels_are_the_class_of_the_shape():
    src = shapes.ShapesSource(50, 32, seed=1, max_objects=1)
    for i in range(50):
        r = src[i]
        assert shapes.class_name(r["label"]) == r["caption"]


def test_tokenizer():
    tok = make_tokenizer(tiny_config())
    ids, mask = tok.encode("A red circle LEFT of a blue zebra", 6)
    assert ids[0] == BOS and mask.sum() == 6 and ids.dtype == np.int32
    assert tok.decode(ids) == "a red circle left of"
    ids, mask = tok.encode("zebra", 4)
    assert list(ids) == [BOS, UNK, 0, 0] and list(mask) == [True, True, False, False]
    ids, mask = tok.encode("", 4)
    assert list(mask) == [True, False, False, False]


def test_grain_pipeline_batches_and_resumes_exactly():
    cfg = tiny_config()
    ds = make_dataset(cfg, "train", batch_size=4)
    it = iter(ds)
    first = next(it)
    assert first["image"].shape == (4, 16, 16, 3) and first["image"].dtype == np.float32
    assert -1.0 <= first["image"].min() and first["image"].max() <= 1.0
    assert first["text_ids"].shape == (4, 8) and first["text_mask"].dtype == bool
    state = it.get_state()
    expected = [next(it) for _ in range(3)]
    it2 = iter(make_dataset(cfg, "train", batch_size=4))
    it2.set_state(state)
    for e in expected:
        got = next(it2)
        np.testing.assert_array_equal(got["image"], e["image"])
        np.testing.assert_array_equal(got["text_ids"], e["text_ids"])
    # Hosts see disjoint data.
    h0 = next(iter(make_dataset(cfg, "train", 4, process_index=0, process_count=2)))
    h1 = next(iter(make_dataset(cfg, "train", 4, process_index=1, process_count=2)))
    assert not np.array_equal(h0["image"], h1["image"])


def test_validation_split_is_held_out():
    cfg = tiny_config()
    tr = next(iter(make_dataset(cfg, "train", 4)))
    va = next(iter(make_dataset(cfg, "val", 4)))
    assert not np.array_equal(tr["image"], va["image"])


def test_image_folder_source(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (40, 30, 3), np.uint8)).save(
                tmp_path / cls / f"{i}.png")
            (tmp_path / cls / f"{i}.txt").write_text(f"a photo of {cls} {i}\n")
    src = ImageFolderSource(str(tmp_path), 16)
    assert len(src) == 6
    r = src[4]
    assert r["image"].shape == (16, 16, 3) and r["caption"] == "a photo of dogs 1"
    assert int(r["label"]) == 1
    cfg = tiny_config()
    cfg.data.update(source="folder", folder=str(tmp_path))
    batch = next(iter(make_dataset(cfg, "train", 2)))
    assert batch["image"].shape == (2, 16, 16, 3)
    with pytest.raises(FileNotFoundError):
        ImageFolderSource(str(tmp_path / "missing"), 16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="No images"):
        ImageFolderSource(str(tmp_path / "empty"), 16)


def test_unreadable_images_and_captions_are_skipped_or_refused(tmp_path, capsys):
    """One corrupt image, one truncated one (its header reads) and one caption that is not
    UTF-8 among 6: left out with one warning naming them (the run goes on), or, under
    ``data.strict``, refused in one line."""
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), np.uint8)).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(f"a red circle {i}\n")
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    Image.fromarray(rng.integers(0, 255, (20, 20, 3), np.uint8)).save(tmp_path / "latin1.png")
    (tmp_path / "latin1.txt").write_bytes("un caf\xe9 rouge".encode("latin-1"))
    whole = (tmp_path / "0.png").read_bytes()  # a header that reads, pixels that do not
    (tmp_path / "truncated.png").write_bytes(whole[:len(whole) // 2])
    src = ImageFolderSource(str(tmp_path), 16)
    assert len(src) == 3 and all(src[i]["caption"].startswith("a red circle") for i in range(3))
    out = capsys.readouterr().out
    assert ("skipping 3 of 6 images under" in out and "broken.png (not an image" in out
            and "latin1.png (caption latin1.txt is not UTF-8)" in out
            and "truncated.png (does not decode" in out)
    with pytest.raises(ConfigError, match=r"3 of 6 images under .* cannot be read: .*"
                       r"data.strict=False to skip them"):
        ImageFolderSource(str(tmp_path), 16, strict=True)


def test_tfds_source_with_mock_data():
    import tensorflow_datasets as tfds
    with tfds.testing.mock_data(num_examples=6):
        src = TfdsSource("mnist", "train", image_size=16)
        assert len(src) == 6
        r = src[2]
        assert r["image"].shape == (16, 16, 3) and r["image"].dtype == np.uint8
        assert r["caption"] == str(int(r["label"]))  # mnist class names are the digits
        cfg = tiny_config()
        cfg.data.update(source="tfds", tfds_name="mnist", extra_vocab="0 1 2 3 4 5 6 7 8 9")
        batch = next(iter(make_dataset(cfg, "train", 3)))
        assert batch["image"].shape == (3, 16, 16, 3)
        assert (batch["text_ids"][:, 1] != UNK).all()
