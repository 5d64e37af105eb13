"""Captioned data for text models: folder metadata.jsonl / sidecar .txt, npz captions, digits captions,
one caption chosen per step (deterministic), tokens in the batches, and the errors for bad captions."""
import json

import numpy as np
import pytest
from PIL import Image

from configs.default import get_config
from diffax import data
from diffax.data.sources import digit_captions
from diffax.errors import UserError
from diffax.models.text.small import WordTokenizer

TOK = WordTokenizer.build(["a red square", "a blue circle", "the digit one", "number 1"], 32, 6)


def make_config(name, batch_size=4, **fields):
    config = get_config()
    config.data.name = name
    config.data.image_size = 4
    config.data.read_threads = 1
    config.data.shuffle = False
    config.training.batch_size = batch_size
    config.text.encoder = "small"
    for k, v in fields.items():
        setattr(config.data, k, v)
    return config


def take(config, n, tokenizer=TOK):
    it = data.make_iterator(config, tokenizer_for=lambda source: tokenizer)
    out = [it.next_local() for _ in range(n)]
    it.close()
    return out


def write_images(root, names, value=0):
    root.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.fromarray(np.full((4, 4), value + i, np.uint8), "L").save(root / name)


def tokens_text(tokens):
    """Back from tokens [B, 2, L] to the texts (joined words), to check which caption was chosen."""
    return [" ".join(TOK.words[i] for i in row[0][row[1] > 0][1:-1]) for row in tokens]


def test_folder_metadata_jsonl_with_several_captions(tmp_path):
    write_images(tmp_path, ["a.png", "b.png"])
    with open(tmp_path / "metadata.jsonl", "w") as f:
        f.write(json.dumps({"file_name": "a.png", "text": "a red square"}) + "\n")
        f.write(json.dumps({"file_name": "b.png", "text": ["a blue circle", "number 1"]}) + "\n")
    batches = take(make_config(f"folder:{tmp_path}", batch_size=2), 20)
    firsts = [tokens_text(b["tokens"])[0] for b in batches]
    seconds = [tokens_text(b["tokens"])[1] for b in batches]
    assert set(firsts) == {"a red square"}
    assert set(seconds) == {"a blue circle", "number 1"}  # one of its captions per step, both used
    again = [tokens_text(b["tokens"])[1] for b in take(make_config(f"folder:{tmp_path}", batch_size=2), 20)]
    assert again == seconds  # deterministic per seed and step
    config = make_config(f"folder:{tmp_path}", batch_size=2)
    config.seed = 1
    assert [tokens_text(b["tokens"])[1] for b in take(config, 20)] != seconds


def test_folder_sidecar_txt_and_missing_captions(tmp_path):
    write_images(tmp_path, ["a.png", "b.png"])
    (tmp_path / "a.txt").write_text("a red square\n")
    with pytest.raises(UserError, match="b.png"):
        take(make_config(f"folder:{tmp_path}"), 1)
    (tmp_path / "b.txt").write_text("")  # an empty caption: the empty prompt (unconditional)
    batch = take(make_config(f"folder:{tmp_path}", batch_size=2), 1)[0]
    assert tokens_text(batch["tokens"]) == ["a red square", ""]
    np.testing.assert_array_equal(batch["tokens"][1], [[2, 3, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0]])


def test_metadata_without_an_image_is_an_error(tmp_path):
    write_images(tmp_path, ["a.png", "b.png"])
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "x"}) + "\n")
    with pytest.raises(UserError, match="b.png has no caption"):
        take(make_config(f"folder:{tmp_path}"), 1)


def test_a_source_without_captions_is_refused_for_a_text_model(tmp_path):
    write_images(tmp_path, ["a.png"])
    with pytest.raises(UserError, match="no captions"):
        take(make_config(f"folder:{tmp_path}"), 1)


def test_npz_captions_array(tmp_path):
    images = np.zeros((2, 4, 4, 1), np.uint8)
    np.savez(tmp_path / "d.npz", image=images, caption=np.array(["a red square", "number 1"]))
    batch = take(make_config(f"npz:{tmp_path / 'd.npz'}", batch_size=2, caption_key="caption"), 1)[0]
    assert tokens_text(batch["tokens"]) == ["a red square", "number 1"]
    assert batch["tokens"].dtype == np.int32 and batch["tokens"].shape == (2, 2, 6)


def test_digits_captions_name_the_label():
    assert digit_captions(7)[:3] == ("a handwritten 7", "the digit seven", "number 7")
    config = make_config("digits", batch_size=8)
    config.data.image_size = 8
    tok = WordTokenizer.build([c for d in range(10) for c in digit_captions(d)], 64, 8)
    batch = take(config, 1, tok)[0]
    words = {i: w for i, w in enumerate(tok.words)}
    for label, row in zip(batch["label"], batch["tokens"]):
        text = [words[int(i)] for i in row[0][row[1] > 0][1:-1]]
        assert str(label) in text or ("zero one two three four five six seven eight nine".split()[label]) in text
