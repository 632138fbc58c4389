"""`Pretrained`: everything a Stable Diffusion checkpoint gives ldm_jax, in its terms."""
import dataclasses
from typing import Optional

from ldm_jax.models.text import CLIPTokenizerFromFolder


@dataclasses.dataclass
class Pretrained:
  """A Stable Diffusion model read from a diffusers folder or a single file.

  Attributes:
    path: where it was read from (a folder, a file, or an fsspec URL of either).
    layout: 'diffusers' or 'single_file'.
    unet: `models.unet.UNetModel` kwargs.
    vae: `models.autoencoder.AutoencoderKL` kwargs.
    text: `models.text.CLIPTextTransformer` kwargs, `layer` relative to the tower in
      the files ('penultimate' for an SD 2 single file's OpenCLIP tower).
    tokenizer: the CLIP tokenizer (None for a single file read without one).
    tokenizer_path: the folder it came from ('' if none).
    schedule: `config.stage2.schedule` fields (kind, T, linear_start, linear_end,
      zero_terminal_snr).
    prediction_type: 'eps' | 'v' | 'x0'.
    sampling: the DDIM grid of the scheduler: timestep_spacing, steps_offset,
      set_alpha_to_one (`config.stage2.sample` fields).
    scale_factor: z = scale_factor * E(x) (the VAE's scaling_factor).
    resolution: the image size the model was trained at.
    params: {'unet', 'vae', 'text'}: flax parameter trees of numpy float32 arrays.
  """
  path: str
  layout: str
  unet: dict
  vae: dict
  text: dict
  tokenizer: Optional[CLIPTokenizerFromFolder]
  tokenizer_path: str
  schedule: dict
  prediction_type: str
  sampling: dict
  scale_factor: float
  resolution: int
  params: dict

  @property
  def factor(self) -> int:
    """The VAE's downsampling factor f."""
    return 2 ** (len(self.vae["ch_mult"]) - 1)
