"""Inpainting LDM: mask + latent of the masked image concatenated to z_t (random box
masks in training). arg: size=tiny|base|sd2, data=shapes|wds|tfds."""
from ldm_jax import config_lib

txt2img = config_lib.sibling(__file__, "txt2img")  # the recipe; this file sets the conditioning


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, size="tiny", data="shapes")
  text = arg.size == "sd2"  # SD 2 inpainting: 9 input channels and a text prompt
  c = txt2img.ldm(arg, context="text" if text else "none", concat="inpaint",
                  sizes=("tiny", "base", "sd2"))
  if not text:
    c.stage2.cond_drop = 0.0
    c.stage2.sample.guidance = 1.0
  return c.lock()
