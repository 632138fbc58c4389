"""Text-to-image LDM: a KL autoencoder, then a UNet with cross-attention on a text encoder.

arg: size=tiny|base|sd15|sd2 (tiny: 32 px on the embedded shapes data, trains on a
CPU in minutes), data=shapes|wds|tfds. Overrides: --config.stage2.lr=5e-5 etc.
"""
from ldm_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, size="tiny", data="shapes")
  return config_lib.ldm(arg, context="text").lock()
