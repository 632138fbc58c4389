"""Stage 1 alone: a KL-regularised autoencoder (the paper's kl-f4 ... kl-f32).

arg: f=4|8|16|32, size=ref|tiny (tiny: 32 px on the embedded shapes data, CPU),
data=shapes|wds|tfds. autoencoder_vq.py is this recipe with a codebook.
"""
from ldm_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, f=4, size="tiny", data="shapes")
  return autoencoder(arg, "kl", (4, 8, 16, 32)).lock()


def autoencoder(arg, kind: str, factors: tuple):
  """The first stage `kind`-f`arg.f` trained alone on `arg.data`."""
  config_lib.check_arg(arg, "f", factors)
  config_lib.check_arg(arg, "size", ("ref", "tiny"))
  ref = arg.size == "ref"
  # ref: the paper's batch and steps; tiny: the default run's first stage (batch
  # 16), trained about twice as long.
  c = config_lib.spine(batch_size=96 if ref else 16, total_steps=200_000 if ref else 3000)
  c.stages = ("autoencoder",)
  c.data = config_lib.data(arg.data, 256 if ref else 32)
  c.stage1 = config_lib.autoencoder_stage(kind, arg.f, arg.size, c.data.resolution)
  return c
