"""Sampling from Stable Diffusion weights equals diffusers' StableDiffusionPipeline: the
same initial latents, prompts, DDIM 10 steps (SD's grid: leading, steps_offset 1,
ending at alphas_cumprod[0]), guidance 7.5, float32, from the folder and from the
single file; and `python -m ldm_jax.sample --pretrained` end to end."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from ldm_jax import pretrained
from ldm_jax.pretrained import stage2

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from tests import sd_fixtures  # noqa: E402  (needs torch and diffusers)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = [sd_fixtures.PROMPT, "a dog"]
HW = sd_fixtures.IMAGE


def _reference(pipe, z_T, prompts=PROMPTS, steps=10):
  """diffusers' images in [0, 1] from NHWC latents z_T."""
  return pipe(prompts, latents=torch.from_numpy(np.array(z_T)).permute(0, 3, 1, 2),
              num_inference_steps=steps, guidance_scale=7.5, output_type="np", height=HW,
              width=HW).images


@pytest.mark.parametrize("style", ["sd1", "sd2"])
def test_images_equal_stable_diffusion_pipeline(style):
  fx = sd_fixtures.build(style)
  z_T = np.random.default_rng(3).standard_normal((2, HW // 2, HW // 2, 4)).astype(np.float32)
  ref = _reference(fx["pipe"], z_T)
  assert ref.std() > 0.05  # the pipeline draws something, not a flat image

  # One device: a replicated state would run the same sampler on all 8 CPU devices.
  one = jax.devices()[:1]
  task, state, _, config = stage2.for_sampling(pretrained.load(fx["folder"]), devices=one)
  assert config.stage2.sample.steps_offset == 1 and not config.stage2.sample.set_alpha_to_one
  batch = dict(task.prepare_batch({"caption": np.array(PROMPTS, object)}), z_T=z_T)
  sample = jax.jit(lambda s, b: task.sample(s, b, jax.random.key(0), steps=10, guidance=7.5,
                                            height=HW, width=HW))
  from_folder = np.asarray(sample(state, batch))
  # The single file's weights (CompVis names, sd1's EMA, sd2's fused OpenCLIP
  # attention) through the same compiled sampler: they load to the folder's
  # architecture (test_pretrained_load), so only the weights are under test here.
  _, file_state, _, _ = stage2.for_sampling(pretrained.load(
      fx["file"], tokenizer=os.path.join(fx["folder"], "tokenizer")), devices=one)
  from_file = np.asarray(sample(file_state, batch))
  for name, img in (("folder", from_folder), ("single file", from_file)):
    err = np.abs((img + 1) / 2 - ref).max()
    assert err <= 1e-3, (style, name, err)


def test_sample_cli_from_a_single_file(tmp_path):
  """The real entry point on the sd2 single file, its architecture, schedule and image
  size from --pretrained_config, its tokenizer from --pretrained_tokenizer (one that
  pads with <|endoftext|>, not the folder's "!"): the PNG is the pipeline's image with
  that tokenizer for the noise the CLI draws from --seed (one device, reproducible)."""
  import transformers
  fx = sd_fixtures.build("sd2")
  tok = str(tmp_path / "tokenizer")
  sd_fixtures.write_tokenizer(tok, "<|endoftext|>")
  out = tmp_path / "out"
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=1 "
             "--xla_backend_optimization_level=0")  # compiling, not running, is the cost
  cmd = [sys.executable, "-m", "ldm_jax.sample", f"--pretrained={fx['file']}",
         f"--pretrained_config={fx['folder']}", f"--pretrained_tokenizer={tok}",
         "--prompt=a cat", "--num=1", "--steps=4", "--guidance=7.5", "--seed=3", f"--out={out}"]
  run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  png = np.asarray(Image.open(out / "00000.png"), np.float32) / 255
  assert png.shape == (HW, HW, 3)  # the config's size: SD 2's default would be 768
  # samplers.sample: z_T ~ N(0, I) from the first half of the split seed key
  z_T = jax.random.normal(jax.random.split(jax.random.key(3))[0], (1, HW // 2, HW // 2, 4))
  pipe = diffusers.StableDiffusionPipeline(**dict(
      fx["pipe"].components, tokenizer=transformers.CLIPTokenizer.from_pretrained(tok)))
  ref = _reference(pipe, np.asarray(z_T), ["a cat"], steps=4)[0]
  other = _reference(fx["pipe"], np.asarray(z_T), ["a cat"], steps=4)[0]
  assert np.abs(ref - other).max() > 0.02  # the tokenizer matters to the image
  assert np.abs(png - ref).max() <= 0.5 / 255 + 1e-3
