"""Analytic FLOP counts of the UNet, the autoencoder and the text encoders, layer by layer.

The counts follow `torch.utils.flop_counter.FlopCounterMode`, so they can be checked
against it on the diffusers / transformers reference models (tests/test_flops.py):

* a matmul of an (M, K) by a (K, N) operand counts 2 M K N, a convolution 2 x output
  pixels x kernel area x C_in x C_out; bias adds, normalisations, activations, softmax
  and the optimizer are not counted;
* the backward pass of a dense layer or convolution counts the gradient with respect
  to its weight (as many FLOPs as the forward) and, unless its input needs none, with
  respect to its input (as many again): the noisy latent at `conv_in`, the sinusoidal
  timestep features, an image at the encoder's `conv_in` and a frozen text encoder's
  context at the cross-attention's `to_k` / `to_v` need none;
* attention's two batched products (Q K^T and A V, every head, full square even when
  causal) count 2 x (batch x heads x N x M x d) each forward and twice that backward.
  FlopCounterMode counts them when SDPA decomposes into `bmm` (on the meta device); on
  the CPU it does not see the fused kernel at all, which is why REFERENCE's 2,029
  GFLOP for SD-1.x forward + backward at a 64x64 latent is this module's count
  without `attention_core` (2,406.8 GFLOP with it).

Every MFU the benches print divides these counts by time and peak: XLA's
`cost_analysis()` misses the work inside cuDNN calls on a GPU.
"""
import dataclasses
from typing import List, Optional

CONV, DENSE, ATTENTION = "conv", "dense", "attention_core"


@dataclasses.dataclass(frozen=True)
class Op:
  """One counted operation: `forward` FLOPs and what its backward pass computes."""
  name: str
  kind: str            # CONV, DENSE or ATTENTION
  forward: float
  input_grad: bool = True

  @property
  def backward(self) -> float:
    if self.kind == ATTENTION:
      return 2 * self.forward   # d(QK^T) -> dQ, dK; d(AV) -> dA, dV
    return self.forward * (2 if self.input_grad else 1)


@dataclasses.dataclass
class Count:
  """The operations of one model call, in call order."""
  ops: List[Op] = dataclasses.field(default_factory=list)

  def forward(self, attention_core: bool = True) -> float:
    return sum(o.forward for o in self.ops if attention_core or o.kind != ATTENTION)

  def backward(self, attention_core: bool = True) -> float:
    return sum(o.backward for o in self.ops if attention_core or o.kind != ATTENTION)

  def train(self, attention_core: bool = True) -> float:
    """Forward + backward FLOPs of one training step of this model."""
    return self.forward(attention_core) + self.backward(attention_core)

  def by_prefix(self, depth: int = 1) -> dict:
    """Forward FLOPs per module path cut to `depth` segments (e.g. per block)."""
    out = {}
    for o in self.ops:
      key = "/".join(o.name.split("/")[:depth])
      out[key] = out.get(key, 0.0) + o.forward
    return out

  def __add__(self, other: "Count") -> "Count":
    return Count(self.ops + other.ops)

  # -- builders ------------------------------------------------------------------------
  def conv(self, name, b, h, w, c_in, c_out, k=3, input_grad=True):
    """A k x k convolution with an h x w output."""
    self.ops.append(Op(name, CONV, 2.0 * b * h * w * k * k * c_in * c_out, input_grad))

  def dense(self, name, rows, d_in, d_out, input_grad=True):
    self.ops.append(Op(name, DENSE, 2.0 * rows * d_in * d_out, input_grad))

  def attention(self, name, b, heads, n, m, d_qk, d_v=None):
    """Q K^T over n queries and m keys, then A V (heads of d_qk / d_v features)."""
    d_v = d_qk if d_v is None else d_v
    self.ops.append(Op(name, ATTENTION, 2.0 * b * heads * n * m * (d_qk + d_v)))


# -- shared blocks ------------------------------------------------------------------------
def _resnet(c: Count, name, b, h, w, c_in, c_out, temb=None):
  """ResnetBlock2D at an h x w output: conv1, (time_emb_proj), conv2, (conv_shortcut)."""
  c.conv(f"{name}/conv1", b, h, w, c_in, c_out)
  if temb is not None:
    c.dense(f"{name}/time_emb_proj", b, temb[0], temb[1])
  c.conv(f"{name}/conv2", b, h, w, c_out, c_out)
  if c_in != c_out:
    c.conv(f"{name}/conv_shortcut", b, h, w, c_in, c_out, k=1)


def _mha(c: Count, name, b, n, m, d_q, d_kv, inner, heads, out, kv_grad=True):
  """to_q, to_k, to_v, the attention products and to_out."""
  c.dense(f"{name}/to_q", b * n, d_q, inner)
  c.dense(f"{name}/to_k", b * m, d_kv, inner, input_grad=kv_grad)
  c.dense(f"{name}/to_v", b * m, d_kv, inner, input_grad=kv_grad)
  c.attention(f"{name}/attention", b, heads, n, m, inner // heads)
  c.dense(f"{name}/to_out_0", b * n, inner, out)


# -- the UNet -----------------------------------------------------------------------------
def unet(model, batch: int, height: int, width: int, context_len: Optional[int] = None, *,
         context_grad: bool = False) -> Count:
  """FLOPs of one `UNetModel` call on (batch, height, width, in_channels) latents.

  Args:
    model: a `ldm_jax.models.unet.UNetModel` (only its fields are read).
    context_len: tokens of tau(y) (needed when the model has a context_dim).
    context_grad: the context needs a gradient (tau trained jointly): the backward
      pass then also computes it at every to_k / to_v.
  """
  from ldm_jax.models.unet import BlockConfig
  m, c = model, Count()
  p = m.patch_size
  h, w = height // p, width // p
  mc, ted = m.model_channels, 4 * m.model_channels
  cfg = BlockConfig(m.num_heads, m.num_head_channels)
  c.dense("time_embedding/linear_1", batch, mc, ted, input_grad=False)
  c.dense("time_embedding/linear_2", batch, ted, ted)
  if m.num_classes == "continuous":
    c.dense("class_embedding/linear_1", batch, m.adm_in_channels, ted, input_grad=False)
    c.dense("class_embedding/linear_2", batch, ted, ted)
  temb = lambda ch: (ted, 2 * ch if m.use_scale_shift_norm else ch)

  def attn(name, ch, hh, ww):
    heads, dim_head = cfg.heads(ch)
    n = hh * ww
    if m.context_dim is None:  # AttentionBlock: self-attention over pixels at ch
      _mha(c, name, batch, n, n, ch, ch, ch, heads, ch)
      return
    inner = heads * dim_head
    proj = (lambda nm, a, o: c.dense(nm, batch * n, a, o)) if m.use_linear_in_transformer \
        else (lambda nm, a, o: c.conv(nm, batch, hh, ww, a, o, k=1))
    proj(f"{name}/proj_in", ch, inner)
    for k in range(m.transformer_depth):
      blk = f"{name}/transformer_blocks_{k}"
      _mha(c, f"{blk}/attn1", batch, n, n, inner, inner, inner, heads, inner)
      _mha(c, f"{blk}/attn2", batch, n, context_len, inner, m.context_dim, inner, heads, inner,
           kv_grad=context_grad)
      c.dense(f"{blk}/ff/net_0/proj", batch * n, inner, 8 * inner)
      c.dense(f"{blk}/ff/net_2", batch * n, 4 * inner, inner)
    proj(f"{name}/proj_out", inner, ch)

  c.conv("conv_in", batch, h, w, m.in_channels * p * p, mc, input_grad=False)
  chans, ch, levels = [mc], mc, len(m.channel_mult)
  for i, mult in enumerate(m.channel_mult):
    out, has_attn = mult * mc, 2 ** i in m.attention_resolutions
    for j in range(m.num_res_blocks):
      _resnet(c, f"down_blocks_{i}/resnets_{j}", batch, h, w, ch, out, temb(out))
      ch = out
      if has_attn:
        attn(f"down_blocks_{i}/attentions_{j}", ch, h, w)
      chans.append(ch)
    if i < levels - 1:
      h, w = h // 2, w // 2
      if m.resblock_updown:
        _resnet(c, f"down_blocks_{i}/downsamplers_0", batch, h, w, ch, ch, temb(ch))
      else:
        c.conv(f"down_blocks_{i}/downsamplers_0/conv", batch, h, w, ch, ch)
      chans.append(ch)
  _resnet(c, "mid_block/resnets_0", batch, h, w, ch, ch, temb(ch))
  attn("mid_block/attentions_0", ch, h, w)
  _resnet(c, "mid_block/resnets_1", batch, h, w, ch, ch, temb(ch))
  for k, i in enumerate(reversed(range(levels))):
    out, has_attn = m.channel_mult[i] * mc, 2 ** i in m.attention_resolutions
    for j in range(m.num_res_blocks + 1):
      _resnet(c, f"up_blocks_{k}/resnets_{j}", batch, h, w, ch + chans.pop(), out, temb(out))
      ch = out
      if has_attn:
        attn(f"up_blocks_{k}/attentions_{j}", ch, h, w)
    if i > 0:
      h, w = 2 * h, 2 * w
      if m.resblock_updown:
        _resnet(c, f"up_blocks_{k}/upsamplers_0", batch, h, w, ch, ch, temb(ch))
      else:
        c.conv(f"up_blocks_{k}/upsamplers_0/conv", batch, h, w, ch, ch)
  c.conv("conv_out", batch, h, w, mc, m.out_channels * p * p)
  return c


# -- the autoencoder ----------------------------------------------------------------------
def _vae_attn(c: Count, name, b, h, w, ch):
  _mha(c, name, b, h * w, h * w, ch, ch, ch, 1, ch)  # one head of all channels


def _vae_mid(c: Count, name, b, h, w, ch):
  _resnet(c, f"{name}/resnets_0", b, h, w, ch, ch)
  _vae_attn(c, f"{name}/attentions_0", b, h, w, ch)
  _resnet(c, f"{name}/resnets_1", b, h, w, ch, ch)


def encoder(model, batch: int, height: int, width: int, *, input_grad: bool = False) -> Count:
  """FLOPs of `AutoencoderKL.encode` / `VQModel.encode` on (batch, height, width, 3) images
  (the encoder and quant_conv). `model` is the AutoencoderKL or VQModel."""
  m, c, h, w = model, Count(), height, width
  kl = not hasattr(m, "n_embed")
  ch = m.ch * m.ch_mult[0]
  c.conv("encoder/conv_in", batch, h, w, 3, ch, input_grad=input_grad)
  res = m.resolution
  for i, mult in enumerate(m.ch_mult):
    out = m.ch * mult
    for j in range(m.num_res_blocks):
      _resnet(c, f"encoder/down_blocks_{i}/resnets_{j}", batch, h, w, ch, out)
      ch = out
      if res in m.attn_resolutions:
        _vae_attn(c, f"encoder/down_blocks_{i}/attentions_{j}", batch, h, w, ch)
    if i < len(m.ch_mult) - 1:
      h, w, res = h // 2, w // 2, res // 2
      c.conv(f"encoder/down_blocks_{i}/downsamplers_0/conv", batch, h, w, ch, ch)
  _vae_mid(c, "encoder/mid_block", batch, h, w, ch)
  z_out = 2 * m.z_channels if kl else m.z_channels
  c.conv("encoder/conv_out", batch, h, w, ch, z_out)
  c.conv("quant_conv", batch, h, w, z_out, z_out if kl else m.embed_dim, k=1)
  return c


def decoder(model, batch: int, height: int, width: int, *, input_grad: bool = False) -> Count:
  """FLOPs of `decode` (post_quant_conv and the decoder) on (batch, height, width, z)
  latents; `input_grad`: the latent needs a gradient (stage-1 training)."""
  m, c, h, w = model, Count(), height, width
  z_in = m.z_channels if not hasattr(m, "n_embed") else m.embed_dim
  c.conv("post_quant_conv", batch, h, w, z_in, m.z_channels, k=1, input_grad=input_grad)
  ch = m.ch * m.ch_mult[-1]
  c.conv("decoder/conv_in", batch, h, w, m.z_channels, ch)
  _vae_mid(c, "decoder/mid_block", batch, h, w, ch)
  n = len(m.ch_mult)
  res = m.resolution // 2 ** (n - 1)
  for i, mult in enumerate(reversed(m.ch_mult)):
    out = m.ch * mult
    for j in range(m.num_res_blocks + 1):
      _resnet(c, f"decoder/up_blocks_{i}/resnets_{j}", batch, h, w, ch, out)
      ch = out
      if res in m.attn_resolutions:
        _vae_attn(c, f"decoder/up_blocks_{i}/attentions_{j}", batch, h, w, ch)
    if i < n - 1:
      h, w, res = 2 * h, 2 * w, 2 * res
      c.conv(f"decoder/up_blocks_{i}/upsamplers_0/conv", batch, h, w, ch, ch)
  c.conv("decoder/conv_out", batch, h, w, ch, 3)
  return c


# -- text encoders ------------------------------------------------------------------------
def text_encoder(model, batch: int, length: int) -> Count:
  """FLOPs of a `CLIPTextTransformer` or `TextTransformer` call on (batch, length) ids."""
  m, c = model, Count()
  width, heads = m.width, m.num_heads
  layers = m.num_layers - (getattr(m, "layer", "last") == "penultimate")
  mlp = getattr(m, "mlp_dim", 4 * width)
  rows = batch * length
  for i in range(layers):
    name = f"encoder/layers_{i}"
    c.dense(f"{name}/self_attn/q_proj", rows, width, width)
    c.dense(f"{name}/self_attn/k_proj", rows, width, width)
    c.dense(f"{name}/self_attn/v_proj", rows, width, width)
    c.attention(f"{name}/self_attn/attention", batch, heads, length, length, width // heads)
    c.dense(f"{name}/self_attn/out_proj", rows, width, width)
    c.dense(f"{name}/mlp/fc1", rows, width, mlp)
    c.dense(f"{name}/mlp/fc2", rows, mlp, width)
  return c
