"""Reading Stable Diffusion weights: pickles read without running code, the single-file
layout checked against diffusers' own converters, folder == single file, fsspec URLs,
and a clear error for every bad input."""
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from ldm_jax import pretrained
from ldm_jax.pretrained import files, safe_pickle, stage2

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from tests import sd_fixtures  # noqa: E402  (needs torch and diffusers)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _equal_trees(a, b) -> bool:
  same = jax.tree.map(lambda x, y: x.shape == y.shape and bool(np.array_equal(x, y)), a, b)
  return jax.tree.structure(a) == jax.tree.structure(b) and all(jax.tree.leaves(same))


def _tensors():
  import collections
  sd = collections.OrderedDict(
      w=torch.randn(3, 4), t=torch.randn(4, 3).t(), h=torch.randn(2, 5).half()[:, 1:4],
      b=torch.nn.Parameter(torch.randn(6, dtype=torch.bfloat16)), i=torch.arange(5),
      s=torch.tensor(2.5))
  return sd


@pytest.mark.parametrize("zip_format", [True, False])
def test_safe_pickle_matches_torch_load(tmp_path, zip_format):
  path = str(tmp_path / "w.ckpt")
  torch.save({"state_dict": _tensors(), "global_step": 7, "meta": {"name": "x"}}, path,
             _use_new_zipfile_serialization=zip_format)
  ours = safe_pickle.load(path)
  ref = torch.load(path, weights_only=True)
  assert ours["global_step"] == 7 and ours["meta"] == {"name": "x"}
  for k, v in ref["state_dict"].items():
    got = ours["state_dict"][k]
    assert got.shape == tuple(v.shape) and str(got.dtype) == str(v.dtype).replace("torch.", "")
    np.testing.assert_array_equal(got.astype(np.float32), v.detach().float().numpy())


class _Payload:
  """Unpickling this creates a file: what a malicious checkpoint would do."""

  def __init__(self, target):
    self.target = target

  def __reduce__(self):
    return (open, (self.target, "w"))


@pytest.mark.parametrize("how", ["torch_zip", "plain_pickle"])
def test_pickle_that_would_run_code_is_refused(tmp_path, how):
  import pickle
  target = str(tmp_path / "created_by_unpickling")
  path = str(tmp_path / "evil.bin")
  if how == "torch_zip":
    torch.save({"state_dict": {"w": torch.ones(2)}, "x": _Payload(target)}, path)
  else:
    with open(path, "wb") as f:
      pickle.dump({"x": _Payload(target)}, f, protocol=2)
  with pytest.raises(safe_pickle.UnsafePickleError, match=r"refused to unpickle .*open"):
    files.read_weights(path)
  assert not os.path.exists(target)
  if how == "torch_zip":  # the payload is real: an unrestricted load does create the file
    torch.load(path, weights_only=False)
    assert os.path.exists(target)


def test_reading_a_checkpoint_needs_no_torch(tmp_path):
  path = str(tmp_path / "w.ckpt")
  torch.save({"state_dict": {"a.weight": torch.arange(6.).reshape(2, 3)}}, path)
  code = ("import sys; sys.modules['torch'] = None\n"  # any `import torch` now fails
          "from ldm_jax.models.convert import load_torch_file\n"
          f"print(load_torch_file({path!r})['a.weight'].sum())")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=ROOT))
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == "15.0"


def _torch_state_dict(path):
  if path.endswith(".safetensors"):
    from safetensors.torch import load_file
    return load_file(path)
  return torch.load(path, weights_only=True)["state_dict"]


def _assert_same(converted: dict, module, what: str, extra_ok=()):
  ref = {k: v for k, v in module.state_dict().items() if not k.endswith("position_ids")}
  missing = set(ref) - set(converted)
  extra = {k for k in set(converted) - set(ref) if not k.startswith(extra_ok)}
  assert not missing and not extra, (what, sorted(missing)[:5], sorted(extra)[:5])
  for k, v in ref.items():
    np.testing.assert_array_equal(converted[k].float().numpy(), v.numpy(), err_msg=f"{what} {k}")


@pytest.mark.parametrize("style", ["sd1", "sd2"])
def test_single_file_fixture_is_what_diffusers_reads(style):
  """The single files are in diffusers' CompVis layout, not only ours: diffusers'
  converters turn them back into the folder's exact weights (sd1: its EMA; sd2: its
  OpenCLIP tower split into q/k/v, the unused last layer left over)."""
  from diffusers.loaders import single_file_utils as sfu
  fx = sd_fixtures.build(style)
  pipe, ckpt = fx["pipe"], _torch_state_dict(fx["file"])
  if style == "sd1":
    assert sum(k.startswith("model_ema.") for k in ckpt) > 100  # diffusers' EMA threshold
  _assert_same(sfu.convert_ldm_unet_checkpoint(ckpt, pipe.unet.config, extract_ema=True),
               pipe.unet, "unet")
  _assert_same(sfu.convert_ldm_vae_checkpoint(ckpt, pipe.vae.config), pipe.vae, "vae")
  if style == "sd1":
    text = sfu.convert_ldm_clip_checkpoint(ckpt)
    extra_ok = ()
  else:
    text = sfu.convert_open_clip_checkpoint(pipe.text_encoder, ckpt)
    extra_ok = ("text_model.encoder.layers.2.", "text_projection")
  text = {k[len("text_model."):] if k.startswith("text_model.") and not hasattr(
      pipe.text_encoder, "text_model") else k: v for k, v in text.items()}
  _assert_same(text, pipe.text_encoder, "text encoder",
               tuple(e.replace("text_model.", "") for e in extra_ok))


@pytest.mark.parametrize("style", ["sd1", "sd2"])
def test_folder_and_single_file_give_the_same_model(style):
  fx = sd_fixtures.build(style)
  p = pretrained.load(fx["folder"])
  tok = os.path.join(fx["folder"], "tokenizer")
  q = pretrained.load(fx["file"], tokenizer=tok)  # architecture from the shapes alone
  c = pretrained.load(fx["file"], config=fx["folder"])  # and from the folder's configs
  assert (p.layout, q.layout) == ("diffusers", "single_file")
  for other in (q, c):
    assert other.unet == p.unet
    assert {k: v for k, v in other.vae.items() if k != "resolution"} == {
        k: v for k, v in p.vae.items() if k != "resolution"}
    assert (other.schedule, other.sampling, other.scale_factor) == (
        p.schedule, p.sampling, p.scale_factor)
    assert other.prediction_type == p.prediction_type == ("v" if style == "sd2" else "eps")
    for k in ("unet", "vae", "text"):
      assert _equal_trees(other.params[k], p.params[k]), (style, k)
  if style == "sd2":  # SD 2 reads the penultimate layer of the file's 3-layer tower
    assert q.text == dict(p.text, num_layers=3, layer="penultimate") == c.text
  else:
    assert q.text == p.text == c.text
    noema = pretrained.load(fx["file"], tokenizer=tok, ema=False)  # the training weights
    assert not _equal_trees(noema.params["unet"], p.params["unet"])
    assert _equal_trees(noema.params["vae"], p.params["vae"])
  assert pretrained.load(fx["folder"], prediction_type="x0").prediction_type == "x0"


def test_folder_from_an_fsspec_url():
  import fsspec
  fx = sd_fixtures.build("sd1")
  fs = fsspec.filesystem("memory")
  fs.put(fx["folder"], "/sd1_url", recursive=True)
  p = pretrained.load("memory://sd1_url")
  ref = pretrained.load(fx["folder"])
  assert p.unet == ref.unet and _equal_trees(p.params["unet"], ref.params["unet"])
  assert p.tokenizer(["a cat"]).tolist() == ref.tokenizer(["a cat"]).tolist()


def _folder_copy(tmp_path, style="sd1"):
  dst = str(tmp_path / style)
  shutil.copytree(sd_fixtures.build(style)["folder"], dst)
  return dst


def _edit_json(path, **changes):
  with open(path) as f:
    cfg = json.load(f)
  cfg.update(changes)
  with open(path, "w") as f:
    json.dump(cfg, f)


def test_folder_errors(tmp_path):
  folder = _folder_copy(tmp_path)
  shutil.rmtree(os.path.join(folder, "vae"))
  with pytest.raises(FileNotFoundError, match=r"no vae/config.json"):
    pretrained.load(folder)
  folder = _folder_copy(tmp_path / "a")
  os.remove(os.path.join(folder, "text_encoder", "model.safetensors"))
  with pytest.raises(FileNotFoundError, match=r"text_encoder/ has no weights"):
    pretrained.load(folder)
  folder = _folder_copy(tmp_path / "b")
  _edit_json(os.path.join(folder, "unet", "config.json"), class_embed_type="timestep")
  with pytest.raises(ValueError, match=r"unet/config.json: class_embed_type='timestep'"):
    pretrained.load(folder)
  _edit_json(os.path.join(folder, "unet", "config.json"), class_embed_type=None,
             down_block_types=["SimpleCrossAttnDownBlock2D"] * 3)
  with pytest.raises(ValueError, match=r"down block type 'SimpleCrossAttnDownBlock2D'"):
    pretrained.load(folder)
  folder = _folder_copy(tmp_path / "c")
  _edit_json(os.path.join(folder, "vae", "config.json"), latent_channels=8)
  with pytest.raises(ValueError, match=r"quant_conv.weight: \(1, 1, 8, 8\) vs expected "
                                       r"\(1, 1, 16, 16\)"):
    pretrained.load(folder)
  folder = _folder_copy(tmp_path / "d")
  tok = str(tmp_path / "tok")
  sd_fixtures.write_tokenizer(tok, "<|endoftext|>", extra=5)
  with pytest.raises(ValueError, match=r"tokenizer has 64 tokens but the text encoder's "
                                       r"vocab_size is 59"):
    pretrained.load(folder, tokenizer=tok)
  with pytest.raises(ValueError, match="prediction_type"):
    pretrained.load(folder, prediction_type="epsilon")
  with pytest.raises(FileNotFoundError, match="no such folder or file"):
    pretrained.load(str(tmp_path / "nothing"))


def test_single_file_errors(tmp_path):
  from safetensors.numpy import save_file
  fx = sd_fixtures.build("sd2")
  sd = files.read_weights(fx["file"])
  tok = os.path.join(fx["folder"], "tokenizer")

  def load_edited(name, edit, **kw):
    path = str(tmp_path / f"{name}.safetensors")
    save_file(edit(dict(sd)), path)
    return pretrained.load(path, **kw)

  key = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
  with pytest.raises(ValueError, match=r"parameters missing .* down_blocks_0/resnets_0/conv1"):
    load_edited("missing", lambda d: {k: v for k, v in d.items() if k != key}, tokenizer=tok)
  with pytest.raises(ValueError, match=r"unet tensors have no place .* input_blocks.1.0.bogus"):
    load_edited("extra", lambda d: dict(d, **{"model.diffusion_model.input_blocks.1.0.bogus.weight":
                                              np.zeros(2, np.float32)}), tokenizer=tok)
  with pytest.raises(ValueError, match=r"belong to no part of Stable Diffusion, e.g. stray"):
    load_edited("stray", lambda d: dict(d, stray=np.zeros(2, np.float32)), tokenizer=tok)
  with pytest.raises(ValueError, match=r"no first_stage_model\.\* tensors"):
    load_edited("novae", lambda d: {k: v for k, v in d.items()
                                    if not k.startswith("first_stage_model.")})
  with pytest.raises(ValueError, match=r"time_emb_proj.* vs expected"):
    load_edited("shape", lambda d: dict(d, **{
        "model.diffusion_model.input_blocks.1.0.emb_layers.1.weight": np.zeros((63, 256),
                                                                               np.float32)}))
  with pytest.raises(ValueError, match=r"label_emb\) is not a supported architecture"):
    load_edited("classes", lambda d: dict(d, **{"model.diffusion_model.label_emb.0.0.weight":
                                                np.zeros((2, 2), np.float32)}))
  # Without a tokenizer the weights load, but nothing can be sampled from them.
  p = pretrained.load(fx["file"])
  assert p.tokenizer is None
  with pytest.raises(ValueError, match="no tokenizer was read"):
    stage2.for_sampling(p)


def test_state_pieces_fit_the_config_or_fail_by_leaf():
  from ldm_jax import parallel
  from ldm_jax.training.ldm import LDMTask
  p = pretrained.load(sd_fixtures.build("sd1")["folder"])
  for trainable in (False, True):
    config = stage2.stage2_config(p, text_trainable=trainable)
    # every field the files fix is theirs; the recipe keeps the rest (the attention kernel)
    unet, clip = config.stage2.unet.to_dict(), config.stage2.text.clip.to_dict()
    assert {k: unet[k] for k in p.unet} == p.unet and {k: clip[k] for k in p.text} == p.text
    task = LDMTask(config)
    mesh = parallel.make_mesh(config, jax.devices()[:1])
    abstract, shardings = parallel.abstract_state(task.init, jax.random.key(0), mesh,
                                                  parallel.rules_of(config))
    pieces = stage2.state_pieces(p, text_trainable=trainable)
    assert ("cond" in pieces["params"]) == trainable != ("cond" in pieces["frozen"])
    state = stage2.place(abstract, shardings, pieces)
    assert state["opt"] is abstract["opt"]  # what the files do not hold is left alone
    np.testing.assert_array_equal(state["frozen"]["first_stage"]["params"]["quant_conv"]["bias"],
                                  p.params["vae"]["quant_conv"]["bias"])
  with pytest.raises(ValueError, match=r"state.params and the pretrained weights differ in "
                                       r".*'cond'"):  # a frozen text encoder vs a trainable one
    stage2.place(abstract, shardings, stage2.state_pieces(p))
  bad = stage2.state_pieces(p, text_trainable=True)
  conv_in = bad["params"]["unet"]["params"]["conv_in"]
  conv_in["kernel"] = conv_in["kernel"][..., :8]
  with pytest.raises(ValueError, match=r"state.params\['unet'\]\['params'\]\['conv_in'\]"
                                       r"\['kernel'\]: shape \(3, 3, 4, 8\) in the files"):
    stage2.place(abstract, shardings, bad)
