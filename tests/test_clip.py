"""The Flax CLIP against transformers' CLIPModel on tiny random configs, the CLIP
score against transformers' preprocessing and model, presets, missing files."""
import json

import flax.linen as nn
import jax
import numpy as np
import pytest

from ldm_jax import parallel
from ldm_jax.evaluation import clip_score
from ldm_jax.models import clip

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

_TEXT = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
             num_attention_heads=4, max_position_embeddings=16, bos_token_id=55, pad_token_id=56)
_VISION = dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               image_size=30, patch_size=10)


def _tiny_clip(folder, eos_token_id=56, act="quick_gelu"):
  """A random transformers CLIPModel saved as a folder, with a hand-written BPE
  tokenizer (ids < 99; 55 = <|startoftext|>, 56 = <|endoftext|>)."""
  torch.manual_seed(0)
  cfg = transformers.CLIPConfig(
      text_config=dict(_TEXT, eos_token_id=eos_token_id, hidden_act=act),
      vision_config=dict(_VISION, hidden_act=act), projection_dim=24, logit_scale_init_value=2.0)
  tm = transformers.CLIPModel(cfg).eval()
  tm.save_pretrained(folder)
  letters = "abcdefghijklmnopqrstuvwxyz"
  vocab = {"!": 0, **{c: 1 + i for i, c in enumerate(letters)},
           **{c + "</w>": 27 + i for i, c in enumerate(letters)}}
  vocab.update({"ca": 53, "cat</w>": 54, "<|startoftext|>": 55, "<|endoftext|>": 56})
  (folder / "vocab.json").write_text(json.dumps(vocab))
  (folder / "merges.txt").write_text("#version: 0.2\nc a\nca t</w>\n")
  return tm


@pytest.mark.parametrize("eos,act", [(56, "quick_gelu"), (2, "gelu")])
def test_matches_transformers_clip_model(tmp_path, eos, act):
  """eos 2 marks the old configs, pooled at the highest token id."""
  tm = _tiny_clip(tmp_path, eos, act)
  model, params = clip.load_clip(str(tmp_path))
  rng = np.random.default_rng(0)
  pixels = rng.normal(size=(3, 30, 30, 3)).astype(np.float32)
  ids = rng.integers(3, 50, (2, 12)).astype(np.int32)
  ids[0, 5:] = 56  # EOS then EOS padding, as the CLIP tokenizer pads
  ids[1, 9:] = 56
  with torch.no_grad():
    want = tm(input_ids=torch.from_numpy(ids).long(),
              pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)))
  got = jax.jit(model.apply)({"params": params}, pixels, ids)
  for key in ("image_embeds", "text_embeds", "logits_per_image", "logits_per_text"):
    np.testing.assert_allclose(np.asarray(got[key]), getattr(want, key).numpy(), atol=1e-4,
                               rtol=1e-4, err_msg=key)
  # Different EOS positions pool different tokens: the two texts' embeddings differ.
  assert np.abs(np.asarray(got["text_embeds"][0] - got["text_embeds"][1])).max() > 1e-3


def test_presets_have_openais_sizes():
  counts = {}
  for name in ("ViT-B/32", "ViT-L/14"):
    m = clip.CLIPModel(**clip.preset(name))
    shapes = jax.eval_shape(m.init, jax.random.key(0), np.zeros((1, 224, 224, 3), np.float32),
                            np.zeros((1, 77), np.int32))
    counts[name] = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(nn.unbox(shapes)))
  # As transformers counts openai/clip-vit-base-patch32 and clip-vit-large-patch14.
  assert counts == {"ViT-B/32": 151_277_313, "ViT-L/14": 427_616_513}
  with pytest.raises(ValueError, match="unknown CLIP preset"):
    clip.preset("ViT-H/14")


def test_clip_score_on_8_devices_equals_transformers(tmp_path):
  tm = _tiny_clip(tmp_path)
  mesh = parallel.make_mesh(_data_mesh(), jax.devices())
  scorer = clip_score.ClipScorer(str(tmp_path), mesh)
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (8, 40, 40, 3)).astype(np.uint8)  # resized + cropped to 30
  captions = ["a cat", "cat cat", "a b c", "cab", "abc", "z", "a cat a cat", "cat"]
  got = scorer(images, captions)
  processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": 30},
                                                 crop_size={"height": 30, "width": 30})
  pixels = processor(images=list(images), return_tensors="np")["pixel_values"]
  np.testing.assert_allclose(clip_score.preprocess(images, 30), pixels.transpose(0, 2, 3, 1),
                             atol=1e-5)
  tok = transformers.CLIPTokenizer.from_pretrained(str(tmp_path))
  ids = tok(captions, padding="max_length", max_length=16, return_tensors="pt")["input_ids"]
  with torch.no_grad():
    out = tm(input_ids=ids, pixel_values=torch.from_numpy(pixels))
  cos = (out.image_embeds * out.text_embeds).sum(-1).numpy()
  np.testing.assert_allclose(got, 100 * np.maximum(cos, 0), atol=1e-3)
  assert got.shape == (8,) and (got >= 0).all()


def _data_mesh():
  import ml_collections
  return ml_collections.ConfigDict(dict(mesh=[("data", -1), ("fsdp", 1), ("tensor", 1)]))


def test_missing_clip_files_say_what_to_put_where(tmp_path, monkeypatch):
  monkeypatch.delenv(clip_score.ENV, raising=False)
  with pytest.raises(FileNotFoundError, match="--clip=FOLDER or set LDM_CLIP.*huggingface-cli"):
    clip_score.clip_folder(None)
  with pytest.raises(FileNotFoundError, match="config.json not found"):
    clip_score.clip_folder(str(tmp_path / "nowhere"))
  _tiny_clip(tmp_path)
  (tmp_path / "model.safetensors").unlink()
  with pytest.raises(FileNotFoundError, match="model.safetensors not found.*openai/clip-vit"):
    clip.load_clip(str(tmp_path))
  monkeypatch.setenv(clip_score.ENV, str(tmp_path))
  with pytest.raises(FileNotFoundError, match="model.safetensors not found"):
    clip_score.clip_folder(None)
