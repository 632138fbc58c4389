"""Stage 1 alone: a VQ-regularised autoencoder (the paper's vq-f4, vq-f8, vq-f16).

arg: f=4|8|16, size=ref|tiny (tiny: 32 px on the embedded shapes data, CPU),
data=shapes|wds|tfds. The recipe is autoencoder_kl.py's.
"""
from ldm_jax import config_lib

autoencoder_kl = config_lib.sibling(__file__, "autoencoder_kl")


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, f=4, size="tiny", data="shapes")
  return autoencoder_kl.autoencoder(arg, "vq", (4, 8, 16)).lock()
