"""Pretrained CLIP / T5 text encoders against transformers' outputs on the same random weights.

The folders and expected outputs under tests/fixtures/text were written by
tests/fixtures/text/make_text_encoder_fixture.py (torch + transformers 5); no torch here.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from diffax.errors import UserError
from diffax.models.text.base import TextEmbedding
from diffax.models.text.pretrained import load_text_encoder, read_tensors
from diffax.models.text.t5 import relative_position_buckets
from diffax.models.text.tokenizer import load_tokenizer

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "text")
FOLDERS = ("clip", "clip_legacy", "t5", "t5_relu")
PROMPTS = [  # as in make_text_encoder_fixture.py
    "a photograph of an astronaut riding a horse",
    "",
    "Two CATS on a red sofa!",
    "an unseen word: zyxwvut",
    "a watercolor landscape with mountains and a lake at sunset, two cats sleeping on a blue sofa in front of a house",
]
TOL = 1e-4
POOLED = {"clip": "text_embeds", "clip_legacy": "pooler_output"}


@pytest.fixture(scope="module")
def expected():
    return dict(np.load(os.path.join(HERE, "expected.npz")))


@nnx.jit
def _encode(encoder, ids, mask):
    return encoder(ids, mask)


def encode(encoder, ids, mask):
    with jax.default_matmul_precision("float32"):  # full float32 products on GPUs too (not TF32)
        return _encode(encoder, ids, mask)


def tokenize(tok, texts):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tok(texts)


@pytest.mark.parametrize("name", FOLDERS)
def test_tokenizer_matches_transformers(name, expected):
    _, tok = load_text_encoder(os.path.join(HERE, name), max_length=None if name.startswith("clip") else 16)
    assert tok.max_length == 16  # CLIP: tokenizer_config.json's model_max_length
    ids, mask = tokenize(tok, PROMPTS)
    assert ids.dtype == np.int32 and mask.dtype == np.int32
    np.testing.assert_array_equal(ids, expected[f"{name}/ids"])
    np.testing.assert_array_equal(mask, expected[f"{name}/mask"])


def test_clip_tokenizer_from_vocab_and_merges(tmp_path, expected):
    """An older CLIP folder without tokenizer.json: CLIP's BPE built from vocab.json + merges.txt."""
    folder = tmp_path / "clip"
    shutil.copytree(os.path.join(HERE, "clip"), folder)
    os.remove(folder / "tokenizer.json")
    tok = load_tokenizer(str(folder), kind="clip", max_positions=16)
    ids, mask = tokenize(tok, PROMPTS + ["<|endoftext|> kept whole"])
    np.testing.assert_array_equal(ids[:-1], expected["clip/ids"])
    np.testing.assert_array_equal(mask[:-1], expected["clip/mask"])
    assert ids[-1, 1] == tok.token_id("<|endoftext|>")


def test_truncation_warns_naming_the_prompt():
    _, tok = load_text_encoder(os.path.join(HERE, "clip"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok(PROMPTS[:3])  # all fit: no warning
    with pytest.warns(UserWarning, match="a watercolor landscape with mountains") as record:
        ids, _ = tok(PROMPTS[4:])
    assert len(record) == 1 and "truncated" in str(record[0].message)
    assert ids[0, -1] == tok.token_id("<|endoftext|>")  # the end token survives truncation


def _check(name, out: TextEmbedding, hidden_ref, pooled_ref, errors):
    err = float(np.abs(np.asarray(out.hidden, np.float32) - hidden_ref).max())
    assert err < TOL, (name, err)
    errors.append(err)
    if pooled_ref is None:
        assert out.pooled is None
    else:
        perr = float(np.abs(np.asarray(out.pooled, np.float32) - pooled_ref).max())
        assert perr < TOL, (name, perr)
        errors.append(perr)


def clip_final_norm(folder: str, h: np.ndarray) -> np.ndarray:
    """CLIP's final LayerNorm in float64 numpy, with the folder's weights."""
    tensors = load_file(os.path.join(folder, "model.safetensors"))
    prefix = "text_model." if "text_model.final_layer_norm.weight" in tensors else ""
    w, b = tensors[f"{prefix}final_layer_norm.weight"], tensors[f"{prefix}final_layer_norm.bias"]
    h = h.astype(np.float64)
    return (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-5) * w + b


@nnx.jit
def _encode_all(encoders, ids, mask):
    return [encoder(ids, mask) for encoder in encoders]


def encode_all(encoders, ids, mask):
    """Every variant of one folder in one compiled program (compile time dominates these tests)."""
    with jax.default_matmul_precision("float32"):
        return _encode_all(encoders, ids, mask)


@pytest.mark.parametrize("name", FOLDERS)
def test_encoder_matches_transformers(name, expected):
    """last_hidden_state, every hidden state (layer=i without the final norm), CLIP's penultimate state with the
    final norm, pooled / projected, with and without the padding mask, under nnx.jit; within 1e-4."""
    folder, errors = os.path.join(HERE, name), []
    ids, mask = expected[f"{name}/ids"], expected[f"{name}/mask"]
    pooled_key = POOLED.get(name)
    cases = []  # (options, expected hidden, expected pooled)
    for masked in (True, False):
        tag = f"{name}/{'masked' if masked else 'unmasked'}"
        pooled = expected[f"{tag}/{pooled_key}"] if pooled_key else None
        states = expected[f"{tag}/hidden_states"]  # masked: all; unmasked: the last two
        cases.append((dict(use_mask=masked), expected[f"{tag}/last_hidden_state"], pooled))
        for layer in range(len(states)) if masked else (-2,):
            if name.startswith("t5") and layer == len(states) - 1:
                continue  # transformers' T5 hidden_states[-1] is after the final norm: last_hidden_state
            cases.append((dict(use_mask=masked, layer=layer, final_norm=False), states[layer], pooled))
        if name.startswith("clip"):  # diffusers' clip_skip=1 (SD 1.x / 2.x): final_layer_norm(hidden_states[-2])
            cases.append((dict(use_mask=masked, layer=-2), clip_final_norm(folder, states[-2]), pooled))
    encoders = [load_text_encoder(folder, **options)[0] for options, _, _ in cases]
    for out, (_, hidden, pooled) in zip(encode_all(encoders, ids, mask), cases):
        _check(name, out, hidden, pooled, errors)
    print(f"{name}: max abs error vs transformers {max(errors):.2e}")


def test_bfloat16_activations_float32_params(expected):
    for name in ("clip", "t5"):
        encoder, _ = load_text_encoder(os.path.join(HERE, name), dtype="bfloat16", use_mask=True)
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(encoder, nnx.Param)))
        out = encode(encoder, expected[f"{name}/ids"], expected[f"{name}/mask"])
        assert out.hidden.dtype == jnp.bfloat16
        ref = expected[f"{name}/masked/last_hidden_state"]
        rel = np.abs(np.asarray(out.hidden, np.float32) - ref).max() / np.abs(ref).max()
        assert rel < 0.08, (name, rel)  # CPU: CLIP 0.9%, T5 3.7% (unscaled logits of wide random weights)


def test_relative_position_buckets_match_transformers(expected):
    np.testing.assert_array_equal(relative_position_buckets(200, 32, 128), expected["t5_buckets_32_128"])


# ----------------------------------------------------------------------------- folders and errors


def _copy(tmp_path, name: str, dest: str | None = None):
    folder = tmp_path / (dest or name)
    shutil.copytree(os.path.join(HERE, name), folder)
    return folder


def _write_bf16(path, tensors: dict[str, np.ndarray]) -> None:
    """A .safetensors file of bfloat16 tensors (safetensors.numpy cannot write them)."""
    header, blobs, offset = {}, [], 0
    for name, value in tensors.items():
        blob = np.ascontiguousarray(value.astype(ml_dtypes.bfloat16)).tobytes()
        header[name] = {"dtype": "BF16", "shape": list(value.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head + b"".join(blobs))


def test_bfloat16_and_sharded_files(tmp_path):
    tensors = load_file(os.path.join(HERE, "t5", "model.safetensors"))
    folder = _copy(tmp_path, "t5")
    os.remove(folder / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for shard, part in shards.items():
        _write_bf16(folder / shard, {n: tensors[n] for n in part})
    weight_map = {n: shard for shard, part in shards.items() for n in part}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    read = read_tensors(str(folder))
    assert sorted(read) == names and read[names[0]].dtype == ml_dtypes.bfloat16
    for n in names:
        np.testing.assert_array_equal(read[n], tensors[n].astype(ml_dtypes.bfloat16))
    encoder, _ = load_text_encoder(str(folder))
    rounded = tensors["encoder.final_layer_norm.weight"].astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(encoder.final_norm.scale[...]), rounded)


def test_diffusers_pipeline_layout_and_full_clip_model(tmp_path, expected):
    """text_encoder_2/ reads its tokenizer from tokenizer_2/; a CLIPModel folder's text tower with its projection
    (vision tensors ignored) gives CLIPTextModelWithProjection's text_embeds."""
    enc_dir, tok_dir = tmp_path / "text_encoder_2", tmp_path / "tokenizer_2"
    shutil.copytree(os.path.join(HERE, "clip"), tok_dir)
    os.makedirs(enc_dir)
    config = json.loads((tok_dir / "config.json").read_text())
    full = {"model_type": "clip", "architectures": ["CLIPModel"], "projection_dim": config.pop("projection_dim"),
            "text_config": config, "vision_config": {"hidden_size": 8}}
    (enc_dir / "config.json").write_text(json.dumps(full))
    tensors = load_file(str(tok_dir / "model.safetensors"))
    tensors.update({"vision_model.post_layernorm.weight": np.ones(8, np.float32),
                    "logit_scale": np.ones((), np.float32), "visual_projection.weight": np.zeros((16, 8), np.float32),
                    "text_model.embeddings.position_ids": np.arange(16)[None]})
    save_file(tensors, str(enc_dir / "model.safetensors"))
    for name in ("config.json", "model.safetensors"):
        os.remove(tok_dir / name)
    encoder, tok = load_text_encoder(str(enc_dir))
    assert tok.source == str(tok_dir / "tokenizer.json")
    out = encode(encoder, *tokenize(tok, PROMPTS))
    assert np.abs(np.asarray(out.pooled) - expected["clip/unmasked/text_embeds"]).max() < TOL


def test_unused_tensor_is_an_error(tmp_path):
    folder = _copy(tmp_path, "t5")
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["decoder.block.0.layer.0.layer_norm.weight"] = np.ones(24, np.float32)  # a decoder: ignored
    save_file(tensors, str(folder / "model.safetensors"))
    load_text_encoder(str(folder))
    tensors["encoder.block.2.layer.0.layer_norm.weight"] = np.ones(24, np.float32)  # a third block: config says 2
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(UserError, match=r"1 tensors have no place.*encoder\.block\.2\.layer\.0\.layer_norm"):
        load_text_encoder(str(folder))


def test_missing_tensor_and_shape_mismatch_are_errors(tmp_path):
    folder = _copy(tmp_path, "clip")
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["text_projection.weight"]
    tensors["text_model.final_layer_norm.bias"] = np.zeros(7, np.float32)
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(UserError, match="text_projection.weight is missing"):
        load_text_encoder(str(folder))
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["CLIPTextModel"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"final_norm\.bias has shape \(7,\).*\(24,\)"):
        load_text_encoder(str(folder))


def test_unknown_model_type_is_an_error(tmp_path):
    folder = _copy(tmp_path, "t5")
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "bert"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"config\.json: model_type 'bert' is not a text encoder"):
        load_text_encoder(str(folder))


def test_mismatched_tokenizer_is_an_error():
    with pytest.raises(UserError, match="tokenizer does not match its encoder.*438 tokens.*vocab_size 120"):
        load_text_encoder(os.path.join(HERE, "t5"), tokenizer=os.path.join(HERE, "clip"))


def test_bad_options_are_errors():
    with pytest.raises(UserError, match="layer=3 is outside"):
        load_text_encoder(os.path.join(HERE, "clip"), layer=3)
    with pytest.raises(UserError, match="max_length 20 exceeds the encoder's 16 positions"):
        load_text_encoder(os.path.join(HERE, "clip"), max_length=20)
    _, tok = load_text_encoder(os.path.join(HERE, "t5"), max_length=40)  # T5: any length
    assert tokenize(tok, PROMPTS)[0].shape == (len(PROMPTS), 40)


def test_benchmark_counts_t5_flops_in_closed_form():
    from benchmarks import text as text_bench

    result = text_bench.main(["--quick", "--layout", "t5", "--repeats", "1", "--batch", "2", "--length", "8"])
    row, c = result["t5_tiny"], text_bench.T5_SIZES["tiny"]
    tokens, inner = 2 * 8, c["num_heads"] * c["d_kv"]
    per_block = (2 * tokens * c["d_model"] * inner * 4  # q, k, v, o
                 + 2 * 2 * tokens * 8 * inner  # q k^T and weights @ v
                 + 2 * tokens * c["d_model"] * c["d_ff"] * 3)  # wi, wi_gate, wo
    assert row["flops"] == per_block * c["num_layers"]
    assert row["prompts_per_s"] == pytest.approx(2 / row["seconds_per_batch"])
