"""ldm_jax.flops against torch.utils.flop_counter.FlopCounterMode on the reference models.

The reference models are built on the meta device (no memory, no arithmetic), where
SDPA decomposes into `bmm`, so FlopCounterMode sees the attention products too.
"""
import pytest

from ldm_jax import flops
from ldm_jax.models import autoencoder, text, unet

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402


def _counted(run):
  """(forward, forward + backward) FLOPs FlopCounterMode counts for `run()` -> output."""
  with FlopCounterMode(display=False) as fc:
    out = run()
    fwd = fc.get_total_flops()
    out.float().sum().backward()
  return fwd, fc.get_total_flops()


def _close(count: flops.Count, ref, rel=0.02):
  assert count.forward() == pytest.approx(ref[0], rel=rel)
  assert count.train() == pytest.approx(ref[1], rel=rel)


_TINY = dict(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2),
             num_res_blocks=1, attention_resolutions=(1,), num_heads=8, context_dim=32,
             norm_num_groups=8)
_TINY_TORCH = dict(in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                   down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                   attention_head_dim=8, norm_num_groups=8)


@pytest.mark.parametrize("variant", ["conv_proj", "context_grad", "linear_scale_shift_adm",
                                     "resblock_updown", "unconditional"])
def test_unet_matches_flop_counter(variant):
  b, s, length = 2, 16, 7
  kw, tkw, ctx_grad = dict(_TINY), dict(_TINY_TORCH, sample_size=s), variant == "context_grad"
  extra = {}
  if variant == "linear_scale_shift_adm":
    kw.update(use_linear_in_transformer=True, use_scale_shift_norm=True,
              num_classes="continuous", adm_in_channels=6, transformer_depth=2)
    tkw.update(use_linear_projection=True, resnet_time_scale_shift="scale_shift",
               class_embed_type="projection", projection_class_embeddings_input_dim=6,
               transformer_layers_per_block=2)
  if variant == "resblock_updown":
    kw.update(resblock_updown=True, attention_resolutions=())
    tkw.update(down_block_types=("ResnetDownsampleBlock2D",) * 2,
               up_block_types=("ResnetUpsampleBlock2D",) * 2)
  with torch.device("meta"):
    if variant == "unconditional":
      kw.update(context_dim=None, num_heads=-1, num_head_channels=8)
      ref = diffusers.UNet2DModel(sample_size=s, in_channels=4, out_channels=4,
                                  block_out_channels=(32, 64), layers_per_block=1,
                                  down_block_types=("AttnDownBlock2D", "DownBlock2D"),
                                  up_block_types=("UpBlock2D", "AttnUpBlock2D"),
                                  attention_head_dim=8, norm_num_groups=8)
      z, t = torch.randn(b, 4, s, s), torch.tensor([1, 2])
      run = lambda: ref(z, t).sample
    else:
      ref = diffusers.UNet2DConditionModel(**tkw)
      z, t = torch.randn(b, 4, s, s), torch.tensor([1, 2])
      ctx = torch.randn(b, length, 32, requires_grad=ctx_grad)
      if variant == "linear_scale_shift_adm":
        extra = dict(class_labels=torch.randn(b, 6))
      run = lambda: ref(z, t, encoder_hidden_states=ctx, **extra).sample
  model = unet.UNetModel(**kw)
  _close(flops.unet(model, b, s, s, length, context_grad=ctx_grad), _counted(run))


def test_unet_context_grad_and_patch_size():
  # Counted by hand: the context gradient adds one matmul per to_k / to_v.
  model = unet.UNetModel(**_TINY)
  frozen, trained = flops.unet(model, 2, 8, 8, 5), flops.unet(model, 2, 8, 8, 5, context_grad=True)
  kv = [o for o in frozen.ops if o.name.endswith(("attn2/to_k", "attn2/to_v"))]
  assert len(kv) == 8  # 4 transformers (down, mid, 2 up) x to_k, to_v
  assert trained.backward() - frozen.backward() == pytest.approx(sum(o.forward for o in kv))
  assert trained.forward() == frozen.forward()
  # patch_size 2 on a 16x16 latent is the p=1 UNet with 4x the channels on 8x8.
  patched = unet.UNetModel(**dict(_TINY, patch_size=2))
  flat = unet.UNetModel(**dict(_TINY, in_channels=16, out_channels=16))
  assert flops.unet(patched, 2, 16, 16, 5).forward() == flops.unet(flat, 2, 8, 8, 5).forward()


def test_autoencoder_matches_flop_counter():
  kw = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, resolution=16,
            attn_resolutions=(8,))
  model = autoencoder.AutoencoderKL(**kw)
  with torch.device("meta"):
    ref = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=32,
        block_out_channels=(32, 64), sample_size=16,
        down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
        up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"))
    x, z = torch.randn(2, 3, 16, 16), torch.randn(2, 4, 8, 8)
  _close(flops.encoder(model, 2, 16, 16), _counted(lambda: ref.encode(x).latent_dist.mean))
  _close(flops.decoder(model, 2, 8, 8), _counted(lambda: ref.decode(z).sample))
  # Stage-1 training: encode, then decode a latent that carries the gradient.
  both = flops.encoder(model, 2, 16, 16) + flops.decoder(model, 2, 8, 8, input_grad=True)
  _close(both, _counted(lambda: ref(x).sample))


@pytest.mark.parametrize("layer", ["last", "penultimate"])
def test_clip_text_matches_flop_counter(layer):
  # SD 2's penultimate layer never builds the last one: the cost of one layer fewer.
  n = 3 if layer == "last" else 2
  cfg = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=n,
             num_attention_heads=4, max_position_embeddings=16, bos_token_id=0, eos_token_id=2,
             pad_token_id=1)
  model = text.CLIPTextTransformer(vocab_size=99, max_length=16, width=32, num_layers=3,
                                   num_heads=4, mlp_dim=37, layer=layer)
  with torch.device("meta"):
    ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(**cfg))
    ids = torch.randint(0, 99, (2, 11))
  _close(flops.text_encoder(model, 2, 11), _counted(lambda: ref(ids).last_hidden_state))
  # The from-scratch encoder has the same blocks with a 4x MLP and no causal mask.
  scratch = text.TextTransformer(vocab_size=99, max_length=16, width=32, num_layers=2,
                                 num_heads=4)
  assert flops.text_encoder(scratch, 2, 11).forward() == pytest.approx(
      flops.text_encoder(text.CLIPTextTransformer(width=32, num_layers=2, num_heads=4,
                                                  mlp_dim=128), 2, 11).forward())


def test_stable_diffusion_unet_count():
  # SD-1.x at a 64x64 latent with a 77 x 768 context, forward + backward of one example:
  # 2,029 GFLOP without the attention products (FlopCounterMode on the CPU, REFERENCE.md).
  model = unet.UNetModel(**unet.preset("sd15"))
  count = flops.unet(model, 1, 64, 64, 77)
  assert count.train(attention_core=False) / 1e9 == pytest.approx(2029, rel=1e-3)
  with torch.device("meta"):
    ref = diffusers.UNet2DConditionModel(sample_size=64, cross_attention_dim=768,
                                         attention_head_dim=8)
    z, t, ctx = torch.randn(1, 4, 64, 64), torch.tensor([500]), torch.randn(1, 77, 768)
  _close(count, _counted(lambda: ref(z, t, encoder_hidden_states=ctx).sample), rel=1e-3)
