"""Self/cross attention and the SpatialTransformer of the LDM UNet.

The cross-attention `softmax(Q K^T / sqrt(d)) V` with `Q` from the UNet
features and `K, V` from `tau(y)` is how text (or any sequence) conditions the
denoiser. Modules mirror diffusers' `Attention`, `BasicTransformerBlock` and
`Transformer2DModel` (names to_q, to_k, to_v, to_out_0, ff.net_0.proj, ...) so
`ldm_jax.models.convert.torch_to_flax` converts their weights directly.

The kernel is a module field, `implementation` (UNetModel's `attention`):
'auto' asks for cuDNN flash attention on a GPU with bf16/fp16 inputs (falling
back to XLA where cuDNN's rules refuse the shapes) and takes the explicit
heads-major form elsewhere; 'xla' and 'cudnn' force `jax.nn.dot_product_attention`
with that kernel; 'explicit' is the heads-major form: the heads moved in front of
the tokens once, two batched matmuls and a float32 softmax between them, which on
the CPU runs SD's 1024-token self-attention about 2x and the tiny UNet's 1.5x
faster than XLA's kernel (bench/README.md). Heads carry the logical name `heads` so
they can be sharded over the `tensor` mesh axis; kernels whose input is the heads
use axes ('mlp', 'embed') so a tensor-parallel block needs one reduction only.
"""
import logging
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models import layers

# Activation axis names of (batch, tokens, heads, head features).
QKV_AXES = ("batch", "length", "heads", "kv")
# Kernels whose input features are the heads (to_out_0, ff.net_2).
OUT_AXES = ("mlp", "embed")
_LECUN = nn.initializers.lecun_normal()
IMPLEMENTATIONS = ("auto", "explicit", "xla", "cudnn")


def check_implementation(name: str) -> None:
  """Raises ValueError naming the field unless `name` is a known attention kernel."""
  if name not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation: expected one of {IMPLEMENTATIONS}, got {name!r}")


def _explicit(q, k, v, is_causal):
  """(B, T, N, d) attention, heads-major: softmax(Q K^T / sqrt(d)) V with the softmax in f32."""
  d = q.shape[-1]
  q, k, v = (a.transpose(0, 2, 1, 3) for a in (q * jnp.asarray(d ** -0.5, q.dtype), k, v))
  logits = jnp.einsum("bhnd,bhmd->bhnm", q, k, preferred_element_type=jnp.float32)
  if is_causal:
    n, m = logits.shape[-2:]
    logits = jnp.where(jnp.tril(jnp.ones((n, m), bool), m - n), logits, -jnp.inf)
  w = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhnm,bhmd->bhnd", w, v).transpose(0, 2, 1, 3)


def _attend(q, k, v, is_causal, implementation):
  """(B, T, N, d) attention with the kernel `implementation` names (chosen at trace time)."""
  check_implementation(implementation)
  attend = lambda impl: jax.nn.dot_product_attention(q, k, v, is_causal=is_causal,
                                                       implementation=impl)
  if implementation == "explicit":
    return _explicit(q, k, v, is_causal)
  if implementation != "auto":
    return attend(implementation)
  if jax.default_backend() != "gpu":
    return _explicit(q, k, v, is_causal)
  if q.dtype in (jnp.bfloat16, jnp.float16):
    try:  # cuDNN's own checks (head size <= 128/256 and a multiple of 8, ...) run while tracing
      return attend("cudnn")
    except (NotImplementedError, RuntimeError, ValueError) as e:
      logging.info("attention %s x %s: XLA kernel (cuDNN: %s)", q.shape, k.shape, e)
  return attend("xla")


def multi_head_attention(q: jax.Array, k: jax.Array, v: jax.Array, heads: int, *,
                         is_causal: bool = False, dtype=None,
                         implementation: str = "auto") -> jax.Array:
  """Scaled dot-product attention over heads.

  Args:
    q: (B, N, heads * d) queries; k, v: (B, M, heads * d).
    heads: number of heads.
    is_causal: mask query i from keys j > i.
    dtype: compute dtype (None keeps the input dtype).
    implementation: the kernel, one of IMPLEMENTATIONS (see the module docstring).

  Returns:
    (B, N, heads * d).
  """
  def split(a):
    a = a.reshape(a.shape[:2] + (heads, a.shape[-1] // heads))
    a = a if dtype is None else a.astype(dtype)
    return nn.with_logical_constraint(a, QKV_AXES)
  o = _attend(split(q), split(k), split(v), is_causal, implementation)
  o = nn.with_logical_constraint(o, QKV_AXES)
  return o.reshape(o.shape[:2] + (-1,))


class Attention(nn.Module):
  """Multi-head attention (diffusers `Attention`); cross-attention when `context` is given.

  Attributes:
    heads: number of heads.
    dim_head: features per head; the inner width is heads * dim_head.
    qkv_bias: bias on to_q/to_k/to_v (False in transformer blocks as in SD).
    dtype: compute dtype.
    implementation: the attention kernel (IMPLEMENTATIONS).
  """
  heads: int
  dim_head: int
  qkv_bias: bool = False
  dtype: Optional[jnp.dtype] = None
  implementation: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, context: Optional[jax.Array] = None) -> jax.Array:
    """Args: x (B, N, C) queries; context (B, M, D) keys/values, None = self-attention.

    Returns: (B, N, C).
    """
    context = x if context is None else context
    inner = self.heads * self.dim_head
    dense = lambda name: layers.Dense(inner, use_bias=self.qkv_bias, dtype=self.dtype, name=name)
    o = multi_head_attention(dense("to_q")(x), dense("to_k")(context), dense("to_v")(context),
                             self.heads, dtype=self.dtype, implementation=self.implementation)
    return layers.Dense(x.shape[-1], axes=OUT_AXES, dtype=self.dtype, name="to_out_0")(o)


class GEGLU(nn.Module):
  """`h * gelu(gate)` with both halves from one projection (Shazeer 2020)."""
  inner: int
  dtype: Optional[jnp.dtype] = None

  @nn.compact
  def __call__(self, x):
    h, gate = jnp.split(layers.Dense(2 * self.inner, dtype=self.dtype, name="proj")(x), 2, -1)
    return h * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
  """diffusers `FeedForward` with GEGLU: net_0 (GEGLU), net_1 (dropout), net_2."""
  mult: int = 4
  dtype: Optional[jnp.dtype] = None

  @nn.compact
  def __call__(self, x):
    h = GEGLU(self.mult * x.shape[-1], dtype=self.dtype, name="net_0")(x)
    return layers.Dense(x.shape[-1], axes=OUT_AXES, dtype=self.dtype, name="net_2")(h)


class BasicTransformerBlock(nn.Module):
  """Pre-LayerNorm [self-attention, cross-attention on `context`, GEGLU MLP], each residual.

  Without a context, attn2 attends to the features themselves (as the reference).
  """
  heads: int
  dim_head: int
  dtype: Optional[jnp.dtype] = None
  implementation: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, context: Optional[jax.Array] = None) -> jax.Array:
    attn = lambda name: Attention(self.heads, self.dim_head, dtype=self.dtype,
                                  implementation=self.implementation, name=name)
    x = attn("attn1")(layers.LayerNorm(epsilon=1e-5, name="norm1")(x)) + x
    x = attn("attn2")(layers.LayerNorm(epsilon=1e-5, name="norm2")(x), context) + x
    x = FeedForward(dtype=self.dtype, name="ff")(layers.LayerNorm(epsilon=1e-5, name="norm3")(x)) + x
    return nn.with_logical_constraint(x, ("batch", "length", "channels"))


class SpatialTransformer(nn.Module):
  """diffusers `Transformer2DModel`: GroupNorm -> proj_in -> blocks -> proj_out -> + x.

  Attributes:
    heads: number of heads; dim_head: features per head (inner = heads * dim_head).
    depth: number of BasicTransformerBlocks (transformer_blocks_k).
    use_linear_projection: proj_in/proj_out are Dense (SD 2) instead of 1x1 convs.
    num_groups: GroupNorm groups (32 in SD).
    dtype: compute dtype.
    implementation: the attention kernel (IMPLEMENTATIONS).
  """
  heads: int
  dim_head: int
  depth: int = 1
  use_linear_projection: bool = False
  num_groups: int = 32
  dtype: Optional[jnp.dtype] = None
  implementation: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, context: Optional[jax.Array] = None) -> jax.Array:
    """Args: x (B, H, W, C) features; context (B, L, D) = tau(y) or None.

    Returns: (B, H, W, C).
    """
    b, h, w, c = x.shape
    inner = self.heads * self.dim_head
    if self.use_linear_projection:
      proj = lambda n, name, init=_LECUN: layers.Dense(
          n, dtype=self.dtype, kernel_init=init, name=name)
    else:
      proj = lambda n, name, init=_LECUN: layers.Conv(
          n, 1, padding=0, dtype=self.dtype, kernel_init=init, name=name)
    hid = layers.GroupNorm(self.num_groups, epsilon=1e-6, name="norm")(x)
    hid = proj(inner, "proj_in")(hid.astype(self.dtype or hid.dtype)).reshape(b, h * w, inner)
    for k in range(self.depth):
      hid = BasicTransformerBlock(self.heads, self.dim_head, dtype=self.dtype,
                                  implementation=self.implementation,
                                  name=f"transformer_blocks_{k}")(hid, context)
    # proj_out starts at zero so a fresh block is the identity.
    hid = proj(c, "proj_out", layers.zeros_init())(hid.reshape(b, h, w, inner))
    return hid + x


class AttentionBlock(nn.Module):
  """Self-attention over pixels with a GroupNorm in front and a residual: openaimodel's
  `AttentionBlock` (diffusers `Attention` with group_norm, as in UNet2DModel) and, with
  one head, the VAE's mid-block attention.

  Attributes:
    heads: number of heads (1 in the VAE: one head of all channels).
    num_groups, epsilon: the GroupNorm's (1e-5 in the UNet, 1e-6 in the VAE).
    zero_out: to_out_0 starts at zero, as the reference UNet's proj_out (the VAE's
      does not).
    dtype: compute dtype.
    implementation: the attention kernel (IMPLEMENTATIONS).
  """
  heads: int
  num_groups: int = 32
  epsilon: float = 1e-5
  zero_out: bool = True
  dtype: Optional[jnp.dtype] = None
  implementation: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, context=None) -> jax.Array:
    del context
    b, h, w, c = x.shape
    hid = layers.GroupNorm(self.num_groups, epsilon=self.epsilon, name="group_norm")(x)
    hid = hid.astype(self.dtype or x.dtype).reshape(b, h * w, c)
    dense = lambda name: layers.Dense(c, dtype=self.dtype, name=name)
    o = multi_head_attention(dense("to_q")(hid), dense("to_k")(hid), dense("to_v")(hid),
                             self.heads, dtype=self.dtype, implementation=self.implementation)
    out_init = layers.zeros_init() if self.zero_out else _LECUN
    o = layers.Dense(c, axes=OUT_AXES, dtype=self.dtype, kernel_init=out_init,
                     name="to_out_0")(o)
    return o.reshape(b, h, w, c).astype(x.dtype) + x
