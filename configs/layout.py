"""Layout-to-image LDM (the paper's semantic synthesis): a semantic map is
resized to the latent grid and concatenated to z_t.

arg: size=tiny|base, data=shapes|wds. On the embedded shapes data the map is
each example's `key.seg.png` (the shape's region coloured by its kind); for
your own shards, store the map beside each image under the extension in
`config.data.layout_ext` (same size as the image, colours = classes).
"""
from ldm_jax import config_lib

txt2img = config_lib.sibling(__file__, "txt2img")  # the recipe; this file sets the conditioning


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, size="tiny", data="shapes")
  c = txt2img.ldm(arg, context="none", concat="layout", sizes=("tiny", "base"))
  c.data.layout_ext = "seg.png"
  c.stage2.cond_drop = 0.0       # the map is always given, so no guidance
  c.stage2.sample.guidance = 1.0
  return c.lock()
