"""Text encoders against transformers' CLIPTextModel on tiny random weights; tokenizers."""
import json
import logging

import flax.linen as nn
import jax
import numpy as np
import pytest

from ldm_jax.models import text

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

_CFG = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=3,
            num_attention_heads=4, max_position_embeddings=16, bos_token_id=0,
            eos_token_id=2, pad_token_id=1)


def _torch_clip(tmp_path, act):
  torch.manual_seed(0)
  tm = transformers.CLIPTextModel(transformers.CLIPTextConfig(hidden_act=act, **_CFG)).eval()
  folder = tmp_path / act
  tm.save_pretrained(folder)  # config.json + model.safetensors, read back by load_clip_text
  return tm, str(folder)


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_clip_text_matches_transformers(tmp_path, act):
  tm, folder = _torch_clip(tmp_path, act)
  ids = np.random.default_rng(0).integers(3, 99, (2, 11)).astype(np.int32)
  with torch.no_grad():
    ref = tm(torch.from_numpy(ids).long(), output_hidden_states=True)
    final_ln = getattr(tm, "text_model", tm).final_layer_norm  # transformers 4 nests it
    penult = final_ln(ref.hidden_states[-2]).numpy()
  model, params = text.load_clip_text(folder)
  out = jax.jit(model.apply)({"params": params}, ids)
  np.testing.assert_allclose(np.asarray(out), ref.last_hidden_state.numpy(), atol=1e-4,
                             rtol=1e-4)
  model2, params2 = text.load_clip_text(folder, layer="penultimate")
  assert "layers_2" not in params2["encoder"]  # the unused last layer is not built
  out2 = jax.jit(model2.apply)({"params": params2}, ids)
  np.testing.assert_allclose(np.asarray(out2), penult, atol=1e-4, rtol=1e-4)
  assert np.abs(np.asarray(out2) - np.asarray(out)).max() > 1e-2


def test_text_transformer_shapes_and_presets():
  model = text.TextTransformer(**text.preset("tiny"))
  ids = text.ByteTokenizer(16)(["a photo of a cat", ""])
  # Random params from the abstract shapes: compiling `init` would dominate this test.
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), ids))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: 0.2 * rng.standard_normal(s.shape, np.float32), shapes)
  apply = jax.jit(model.apply)
  out = apply(params, ids)
  assert out.shape == (2, 16, 64) and np.isfinite(np.asarray(out)).all()
  # Bidirectional: an early token sees a later one (CLIP's causal mask would hide it).
  ids2 = ids.copy()
  ids2[0, 10] += 1
  assert np.abs(np.asarray(apply(params, ids2) - out)[0, 0]).max() > 0
  counts = {}
  for size in ("sd15", "sd2"):
    m = text.CLIPTextTransformer(**text.clip_preset(size))
    shapes = jax.eval_shape(m.init, jax.random.key(0), np.zeros((1, 77), np.int32))
    counts[size] = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(nn.unbox(shapes)))
  assert counts["sd15"] == 123_060_480  # CLIP ViT-L/14 text model, as transformers counts it
  # OpenCLIP ViT-H/14 text tower without its last layer (as SD 2's text_encoder/).
  assert counts["sd2"] == 340_387_840


def test_byte_tokenizer_round_trip_and_truncation_warns_once(caplog):
  tok = text.ByteTokenizer(12)
  ids = tok(["héllo", "cat"])
  assert ids.dtype == np.int32 and ids.shape == (2, 12)
  assert ids[0, 0] == tok.BOS and tok.EOS in ids[0] and ids[1, -1] == tok.PAD
  assert tok.decode(ids) == ["héllo", "cat"]
  with caplog.at_level(logging.WARNING, logger="ldm_jax.models.text"):
    long_ids = tok(["a much too long prompt", "another very long prompt"])
    tok(["yet another long prompt!"])
  assert len([r for r in caplog.records if "truncated" in r.getMessage()]) == 1
  assert long_ids[0, -1] == tok.EOS and tok.decode(long_ids)[0] == "a much too"


def test_context_dim_mismatch_names_the_field():
  from ldm_jax.models import unet
  for size in ("tiny", "base"):  # the presets of the same size fit together
    text.check_context_dim(text.preset(size)["width"], unet.preset(size)["context_dim"])
  for size in ("sd15", "sd2"):
    text.check_context_dim(text.clip_preset(size)["width"], unet.preset(size)["context_dim"])
  with pytest.raises(ValueError, match="context_dim"):
    text.check_context_dim(1024, 768)


def test_clip_tokenizer_from_local_folder(tmp_path, caplog):
  # A hand-written BPE vocabulary: nothing is downloaded.
  letters = "abcdefghijklmnopqrstuvwxyz"
  vocab = {"!": 0, **{c: 1 + i for i, c in enumerate(letters)},
           **{c + "</w>": 27 + i for i, c in enumerate(letters)}}
  vocab.update({"ca": 53, "cat</w>": 54, "<|startoftext|>": 55, "<|endoftext|>": 56})
  (tmp_path / "vocab.json").write_text(json.dumps(vocab))
  (tmp_path / "merges.txt").write_text("#version: 0.2\nc a\nca t</w>\n")
  tok = text.CLIPTokenizerFromFolder(str(tmp_path), max_length=8)
  with caplog.at_level(logging.WARNING, logger="ldm_jax.models.text"):
    ids = tok(["a cat", "cat " * 9])
    tok(["cat " * 9])
  assert ids.dtype == np.int32
  np.testing.assert_array_equal(ids, [[55, 27, 54, 56, 56, 56, 56, 56],
                                      [55, 54, 54, 54, 54, 54, 54, 56]])
  assert len([r for r in caplog.records if "truncated" in r.getMessage()]) == 1
  with pytest.raises(FileNotFoundError, match="tokenizer folder"):
    text.CLIPTokenizerFromFolder(str(tmp_path / "missing"))
