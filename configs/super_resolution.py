"""Super-resolution LDM: the low-resolution image (1/4 per side) is concatenated to z_t.
arg: size=tiny|base, data=shapes|wds|tfds."""
from ldm_jax import config_lib

txt2img = config_lib.sibling(__file__, "txt2img")  # the recipe; this file sets the conditioning


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, size="tiny", data="shapes")
  c = txt2img.ldm(arg, context="none", concat="lowres", sizes=("tiny", "base"))
  c.stage2.cond_drop = 0.0
  c.stage2.sample.guidance = 1.0
  return c.lock()
