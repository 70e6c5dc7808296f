"""The trainable tokenizer's vocabulary comes from the training captions of a folder /
TFDS source, is kept with the run (config.json, the checkpoint) and its coverage is
reported (issue 22: a real caption used to be mostly ``<unk>``)."""
import json

import jax
import numpy as np
from PIL import Image

from jaxdit.data.pipeline import make_tokenizer
from jaxdit.data.tokenizer import UNK
from jaxdit.data.vocabulary import build_vocabulary, resolve_vocabulary
from jaxdit.train.checkpoint import config_differences
from jaxdit.train.load import load_experiment
from jaxdit.train.loop import train_and_evaluate
from tests.helpers import tiny_config

TRAIN = ["a photo of a golden retriever dog playing on the beach at sunset",
         "a golden retriever asleep on a sofa", "two dogs on the beach", "a dog at sunset"]


def _folder(root, captions):
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, caption in enumerate(captions):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), np.uint8)).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(caption + "\n")
    return str(root)


def _config(train_dir, val_dir=""):
    cfg = tiny_config(batch_size=2, steps=2, ckpt_every=2)
    cfg.data.update(source="folder", folder=train_dir, val_folder=val_dir)
    return cfg


def test_build_vocabulary_keeps_the_most_frequent_words():
    assert build_vocabulary(["b a c a", "c a <unk>", "d"], 2) == ["a", "c"]
    assert build_vocabulary(["Zebra, zebra! 2 zebras"], 10) == ["zebra", "2", "zebras"]


def test_folder_captions_are_in_vocabulary_and_coverage_is_reported(tmp_path):
    val = ["a golden retriever on the beach", "a tabby cat chasing a laser pointer"]
    cfg = _config(_folder(tmp_path / "train", TRAIN), _folder(tmp_path / "val", val))
    lines = []
    resolve_vocabulary(cfg, log=lines.append)
    tok = make_tokenizer(cfg)
    ids, mask = tok.encode(TRAIN[0], 16)
    assert mask.sum() == 14 and not (ids[mask] == UNK).any()  # was 10 <unk> of 13 words
    assert "golden" in cfg.text.vocab.split()
    # val: 5 of 13 words unseen (tabby cat chasing laser pointer): warned, with the remedies
    assert len(lines) == 1 and lines[0].startswith("Warning: Tokenizer:")
    assert "0.0% of the training captions' words, 38.5% of the validation" in lines[0]
    assert "text.vocab_max_words" in lines[0] and "text.kind=pretrained" in lines[0]
    cfg.text.vocab = ""
    cfg.text.vocab_max_words = 3  # the 3 most frequent words only
    resolve_vocabulary(cfg, log=lines.append)
    assert cfg.text.vocab.split() == ["a", "on", "at"]  # 7, 3, then 2 (ties: alphabetical)


def test_run_keeps_its_vocabulary_when_the_captions_change(tmp_path):
    """The vocabulary is recorded in config.json and the checkpoint: a rerun of the workdir
    after the captions changed keeps it (same parameters, so it resumes), and sampling
    tokenizes with it, with the data gone."""
    train_dir = _folder(tmp_path / "train", TRAIN)
    wd = str(tmp_path / "run")
    train_and_evaluate(_config(train_dir), wd, devices=jax.devices()[:1])
    with open(f"{wd}/config.json", encoding="utf-8") as f:
        vocab = json.load(f)["text"]["vocab"]
    assert "retriever" in vocab.split()
    for i in range(len(TRAIN)):  # other captions, other words
        (tmp_path / "train" / f"{i}.txt").write_text("an entirely new caption vocabulary\n")
    cfg = _config(train_dir)
    cfg.train.steps = 3
    out = train_and_evaluate(cfg, wd, devices=jax.devices()[:1])
    with open(f"{wd}/config.json", encoding="utf-8") as f:
        rerun_vocab = json.load(f)["text"]["vocab"]
    assert out["checkpoint_step"] == 3 and rerun_vocab == vocab
    assert cfg.text.vocab == ""  # resolved on a copy: the caller's config is as it was
    for f in (tmp_path / "train").iterdir():  # sampling needs the run, not its data
        f.unlink()
    exp, _, step = load_experiment(wd)
    assert step == 3 and exp.config.text.vocab == vocab
    cfg.text.vocab = vocab
    assert exp.tokenizer.vocab == make_tokenizer(cfg).vocab


def test_a_vocabulary_difference_is_named_briefly():
    old, new = tiny_config(), tiny_config()
    old.text.vocab, new.text.vocab = " ".join(f"w{i}" for i in range(500)), "a b"
    (line,) = config_differences(old, new)
    assert line.startswith("text.vocab 'w0 w1") and "500 words" in line and len(line) < 200
