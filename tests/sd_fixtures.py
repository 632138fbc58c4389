"""Tiny random Stable Diffusion pipelines, built with diffusers + transformers, in both
layouts: a diffusers folder (save_pretrained) and a CompVis single file.

  sd1: eps-prediction, conv proj_in/out, CLIP (quick_gelu, last layer), pad token
       <|endoftext|>, 8 heads per attention; single file .safetensors with
       model_ema.* (the folder's UNet) beside perturbed training weights.
  sd2: v-prediction, linear proj_in/out, OpenCLIP-style text (gelu) whose single
       file carries one more layer (SD 2 reads the penultimate one) and a
       text_projection, attention_head_dim per level (64 channels a head), pad
       token "!"; single file .ckpt (a torch zip pickle).

Both schedulers are SD's DDIM (scaled linear, leading spacing, steps_offset=1,
set_alpha_to_one=False). Each pipeline is built once per process (`build`).
"""
import atexit
import json
import os
import shutil
import tempfile

import numpy as np

VOCAB_LETTERS = "abcdefghijklmnopqrstuvwxyz"
IMAGE = 16  # pixels; the VAE has f = 2, so latents are 8 x 8
PROMPT = "a cat"
_CACHE = {}


def _torch_threads():
  # Two threads on a shared two-core machine spin against each other (a tiny pipeline
  # call took 45 s instead of 0.9 s): one thread for the reference runs.
  import torch
  torch.set_num_threads(1)


def write_tokenizer(folder: str, pad: str, max_length: int = 16, extra: int = 0) -> int:
  """A CLIP BPE tokenizer of 59 (+ `extra`) tokens written to `folder`; returns its size."""
  from transformers import CLIPTokenizer
  os.makedirs(folder, exist_ok=True)
  vocab = {"!": 0, **{c: 1 + i for i, c in enumerate(VOCAB_LETTERS)},
           **{c + "</w>": 27 + i for i, c in enumerate(VOCAB_LETTERS)}}
  vocab.update({"ca": 53, "cat</w>": 54, "do": 55, "dog</w>": 56, "<|startoftext|>": 57,
                "<|endoftext|>": 58})
  vocab.update({f"x{i}</w>": 59 + i for i in range(extra)})
  with tempfile.TemporaryDirectory() as src:
    with open(os.path.join(src, "vocab.json"), "w") as f:
      json.dump(vocab, f)
    with open(os.path.join(src, "merges.txt"), "w") as f:
      f.write("#version: 0.2\nc a\nca t</w>\nd o\ndo g</w>\n")
    tok = CLIPTokenizer(os.path.join(src, "vocab.json"), os.path.join(src, "merges.txt"),
                        pad_token=pad, model_max_length=max_length)
    tok.save_pretrained(folder)
  return len(tok)


def _pipeline(style: str, folder: str):
  import torch
  import transformers
  from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline,
                         UNet2DConditionModel)
  sd2 = style == "sd2"
  torch.manual_seed(1 if sd2 else 0)
  with tempfile.TemporaryDirectory() as tok_dir:
    n_vocab = write_tokenizer(tok_dir, "!" if sd2 else "<|endoftext|>")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(tok_dir)
  width = 64 if sd2 else 128
  text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
      vocab_size=n_vocab, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
      num_attention_heads=width // 64, max_position_embeddings=16,
      hidden_act="gelu" if sd2 else "quick_gelu", projection_dim=width,
      bos_token_id=57, eos_token_id=58, pad_token_id=tokenizer.pad_token_id)).eval()
  kw = dict(sample_size=IMAGE // 2, block_out_channels=(64, 64, 128) if sd2 else (32, 32, 64),
            layers_per_block=2 if sd2 else 1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=width, norm_num_groups=32)
  if sd2:
    kw.update(attention_head_dim=[1, 1, 2], use_linear_projection=True, upcast_attention=True)
  else:
    kw.update(attention_head_dim=8)
  unet = UNet2DConditionModel(**kw).eval()
  with torch.no_grad():  # conv_out starts at zero in diffusers too: make it speak
    for p in unet.parameters():
      p.add_(0.02 * torch.randn_like(p))
  vae = AutoencoderKL(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4,
                      down_block_types=("DownEncoderBlock2D",) * 2,
                      up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=32,
                      sample_size=IMAGE).eval()
  sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                        prediction_type="v_prediction" if sd2 else "epsilon")
  pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                 scheduler=sched, safety_checker=None, feature_extractor=None,
                                 requires_safety_checker=False)
  pipe.save_pretrained(folder)
  return pipe


def compvis_state_dict(pipe, style: str) -> dict:
  """The pipeline's weights in the CompVis single-file layout (numpy float32), written
  here with ldm_jax's key tables and checked against diffusers' own converters by the
  tests, plus what real files carry: schedule buffers, for sd1 an EMA, for sd2 the
  unused last OpenCLIP layer and the text projection."""
  from ldm_jax.diffusion.schedule import make_betas
  from ldm_jax.pretrained import architecture, compvis
  rng = np.random.default_rng(5)
  np_sd = lambda m: {k: v.detach().numpy().copy() for k, v in m.state_dict().items()}
  unet_kw, _ = architecture.unet_kwargs(dict(pipe.unet.config))
  vae_kw, _ = architecture.vae_kwargs(dict(pipe.vae.config))
  unet = compvis.unet_map(unet_kw).to_compvis(np_sd(pipe.unet))
  out = {compvis.VAE + k: v for k, v in compvis.vae_map(vae_kw).to_compvis(np_sd(pipe.vae)).items()}
  text = {k[len("text_model."):] if k.startswith("text_model.") else k: v
          for k, v in np_sd(pipe.text_encoder).items() if not k.endswith("position_ids")}
  if style == "sd1":
    out.update({compvis.UNET + k: v + 0.01 * rng.standard_normal(v.shape).astype(np.float32)
                for k, v in unet.items()})  # "training" weights; the EMA is the folder's
    out.update({compvis.UNET_EMA + compvis.ema_name(k): v for k, v in unet.items()})
    out["model_ema.decay"] = np.array(0.9999, np.float32)
    out["model_ema.num_updates"] = np.array(10, np.int32)
    out.update({compvis.CLIP + "text_model." + k: v for k, v in text.items()})
  else:
    out.update({compvis.UNET + k: v for k, v in unet.items()})
    n = pipe.text_encoder.config.num_hidden_layers
    extra = {k.replace(f"layers.{n - 1}.", f"layers.{n}."): rng.standard_normal(v.shape).astype(
        np.float32) for k, v in text.items() if k.startswith(f"encoder.layers.{n - 1}.")}
    openclip = compvis.transformers_to_openclip({**text, **extra})
    width = pipe.text_encoder.config.hidden_size
    openclip["text_projection"] = rng.standard_normal((width, width)).astype(np.float32)
    openclip["logit_scale"] = np.array(4.6, np.float32)
    out.update({compvis.OPENCLIP + k: v for k, v in openclip.items()})
  betas = make_betas("linear", 1000, 0.00085, 0.012).astype(np.float32)
  out["betas"] = betas
  out["alphas_cumprod"] = np.cumprod(1 - betas.astype(np.float64)).astype(np.float32)
  return out


def _single_file(pipe, style: str, path: str):
  import torch
  sd = compvis_state_dict(pipe, style)
  if path.endswith(".safetensors"):
    from safetensors.numpy import save_file
    save_file(sd, path)
  else:
    torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in sd.items()},
                "global_step": 1}, path)


def build(style: str, root: str = None) -> dict:
  """{'folder', 'file', 'pipe'} of the tiny `style` pipeline, built once per process.

  Args:
    style: 'sd1' or 'sd2'.
    root: where to write (default: a temporary folder).
  """
  _torch_threads()
  if style not in _CACHE:
    if root is None:  # removed when the process ends
      root = tempfile.mkdtemp(prefix=f"tiny_{style}_")
      atexit.register(shutil.rmtree, root, True)
    folder = os.path.join(root, style)
    pipe = _pipeline(style, folder)
    file = os.path.join(root, f"{style}.safetensors" if style == "sd1" else f"{style}.ckpt")
    _single_file(pipe, style, file)
    _CACHE[style] = dict(folder=folder, file=file, pipe=pipe)
  return _CACHE[style]


if __name__ == "__main__":
  # python -m tests.sd_fixtures OUT: the two tiny pipelines, for a CPU smoke run of a
  # fine-tune (docs/pretrained.md): OUT/sd1/ (+ OUT/sd1.safetensors), OUT/sd2/ (+ OUT/sd2.ckpt).
  import sys
  if len(sys.argv) != 2:
    sys.exit("usage: python -m tests.sd_fixtures OUT_DIR")
  os.makedirs(sys.argv[1], exist_ok=True)
  for name in ("sd1", "sd2"):
    made = build(name, sys.argv[1])
    print(f"{name}: {made['folder']} {made['file']}")
