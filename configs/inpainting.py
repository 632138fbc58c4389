"""Inpainting LDM: mask + latent of the masked image concatenated to z_t (random box
masks in training), Stable Diffusion's order and convention (mask 1 = repaint).

arg: size=tiny|base|sd2, data=shapes|wds|tfds, text=0|1. size=sd2 is SD 2 inpainting
(512-inpainting-ema: 512 px, eps-prediction, a 9-channel UNet input and a text
prompt); text=1 adds a text prompt at the other sizes too (the reference's 'hybrid'
conditioning: cross-attention and concatenation).
"""
from ldm_jax import config_lib

txt2img = config_lib.sibling(__file__, "txt2img")  # the recipe; this file sets the conditioning


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, size="tiny", data="shapes", text=False)
  text = arg.text or arg.size == "sd2"
  c = txt2img.ldm(arg, context="text" if text else "none", concat="inpaint",
                  sizes=("tiny", "base", "sd2"))
  if arg.size == "sd2":  # the SD 2 text-to-image preset is 768 px v-prediction; this one is not
    c.data.resolution = c.stage1.image_size = 512
    c.stage2.prediction_type = "eps"
  if not text:
    c.stage2.cond_drop = 0.0
    c.stage2.sample.guidance = 1.0
  return c.lock()
