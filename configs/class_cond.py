"""Class-conditional LDM (ImageNet style, 'adm' conditioning with a null class for
guidance). arg: size=tiny|base, data=shapes|wds|tfds, classes=N (shapes: the shape kind)."""
from ldm_jax import config_lib

txt2img = config_lib.sibling(__file__, "txt2img")  # the recipe; this file sets the conditioning


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, size="tiny", data="shapes", classes=0)
  from ldm_jax.data import shapes
  classes = arg.classes or len(shapes.KINDS)
  c = txt2img.ldm(arg, context="none", classes=classes, sizes=("tiny", "base"))
  c.stage2.sample.guidance = 1.5  # the paper's LDM-4-G scale
  return c.lock()
