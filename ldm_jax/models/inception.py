"""The FID Inception-v3 (pytorch-fid's `FIDInceptionA/C/E` variant) in Flax, for rFID / FID.

FID is only comparable across papers when the features come from the network of
the original TensorFlow implementation. pytorch-fid ports it as torchvision's
`Inception3` with three changes, mirrored here:
  * the average pools inside Mixed_5*, Mixed_6b-e and Mixed_7b exclude the
    padding from the mean (`count_include_pad=False`, TensorFlow's behaviour);
  * Mixed_7c's pool branch is a max pool, not an average pool;
  * inputs in [0, 1] are resized bilinearly to 299x299 and mapped to [-1, 1].
The 2048-d features are the global average pool after Mixed_7c ("pool3"); the
1008-way logits the Inception Score needs are pool3 @ fc.weight^T, without the
bias, as the original IS code multiplies the graph's softmax weights itself.

Module and parameter names follow torchvision's (`Conv2d_1a_3x3/conv`,
`Mixed_5b/branch1x1/bn`, ..., `fc`), so the weights file pytorch-fid uses,
`pt_inception-2015-12-05-6726825d.pth`, converts with `torch_to_flax`. Weights
are never downloaded: `load_inception` reads a file the user supplies.
"""
import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models.convert import load_torch_file, torch_to_flax

FID_SIZE = 299
NUM_CLASSES = 1008  # the TF graph's classes: ImageNet's 1000 and 8 unused
WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               + WEIGHTS_FILE)


class BatchNormInference(nn.Module):
  """BatchNorm with frozen statistics, parameters named as torch's (`weight` -> scale)."""
  epsilon: float = 1e-3  # torchvision's BasicConv2d

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones_init(), (c,))
    bias = self.param("bias", nn.initializers.zeros_init(), (c,))
    mean = self.param("running_mean", nn.initializers.zeros_init(), (c,))
    var = self.param("running_var", nn.initializers.ones_init(), (c,))
    return (x - mean) * (scale * jax.lax.rsqrt(var + self.epsilon)) + bias


class BasicConv2d(nn.Module):
  """conv (no bias) -> BN -> ReLU; `kernel` and `padding` as (h, w) pairs."""
  features: int
  kernel: tuple = (1, 1)
  stride: int = 1
  padding: tuple = (0, 0)

  @nn.compact
  def __call__(self, x):
    ph, pw = self.padding
    x = nn.Conv(self.features, self.kernel, strides=(self.stride, self.stride),
                padding=((ph, ph), (pw, pw)), use_bias=False, name="conv")(x)
    return nn.relu(BatchNormInference(name="bn")(x))


def _conv(features, k=1, s=1, p=0, name=None):
  k = k if isinstance(k, tuple) else (k, k)
  p = p if isinstance(p, tuple) else (p, p)
  return BasicConv2d(features, k, s, p, name=name)


def _avg_pool3(x):  # TF's average pool: the padding is not counted
  return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool3(x, stride=2):
  pad = ((1, 1), (1, 1)) if stride == 1 else "VALID"
  return nn.max_pool(x, (3, 3), (stride, stride), padding=pad)


class InceptionA(nn.Module):
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = _conv(64, name="branch1x1")(x)
    b5 = _conv(64, 5, p=2, name="branch5x5_2")(_conv(48, name="branch5x5_1")(x))
    b3 = _conv(64, name="branch3x3dbl_1")(x)
    b3 = _conv(96, 3, p=1, name="branch3x3dbl_3")(_conv(96, 3, p=1, name="branch3x3dbl_2")(b3))
    bp = _conv(self.pool_features, name="branch_pool")(_avg_pool3(x))
    return jnp.concatenate([b1, b5, b3, bp], -1)


class InceptionB(nn.Module):
  @nn.compact
  def __call__(self, x):
    b3 = _conv(384, 3, s=2, name="branch3x3")(x)
    bd = _conv(64, name="branch3x3dbl_1")(x)
    bd = _conv(96, 3, s=2, name="branch3x3dbl_3")(_conv(96, 3, p=1, name="branch3x3dbl_2")(bd))
    return jnp.concatenate([b3, bd, _max_pool3(x)], -1)


class InceptionC(nn.Module):
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    b1 = _conv(192, name="branch1x1")(x)
    b7 = _conv(c7, name="branch7x7_1")(x)
    b7 = _conv(c7, (1, 7), p=(0, 3), name="branch7x7_2")(b7)
    b7 = _conv(192, (7, 1), p=(3, 0), name="branch7x7_3")(b7)
    bd = _conv(c7, name="branch7x7dbl_1")(x)
    bd = _conv(c7, (7, 1), p=(3, 0), name="branch7x7dbl_2")(bd)
    bd = _conv(c7, (1, 7), p=(0, 3), name="branch7x7dbl_3")(bd)
    bd = _conv(c7, (7, 1), p=(3, 0), name="branch7x7dbl_4")(bd)
    bd = _conv(192, (1, 7), p=(0, 3), name="branch7x7dbl_5")(bd)
    bp = _conv(192, name="branch_pool")(_avg_pool3(x))
    return jnp.concatenate([b1, b7, bd, bp], -1)


class InceptionD(nn.Module):
  @nn.compact
  def __call__(self, x):
    b3 = _conv(320, 3, s=2, name="branch3x3_2")(_conv(192, name="branch3x3_1")(x))
    b7 = _conv(192, name="branch7x7x3_1")(x)
    b7 = _conv(192, (1, 7), p=(0, 3), name="branch7x7x3_2")(b7)
    b7 = _conv(192, (7, 1), p=(3, 0), name="branch7x7x3_3")(b7)
    b7 = _conv(192, 3, s=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool3(x)], -1)


class InceptionE(nn.Module):
  pool: str = "avg"  # 'avg' (Mixed_7b) | 'max' (Mixed_7c in the FID network)

  @nn.compact
  def __call__(self, x):
    b1 = _conv(320, name="branch1x1")(x)
    b3 = _conv(384, name="branch3x3_1")(x)
    b3 = jnp.concatenate([_conv(384, (1, 3), p=(0, 1), name="branch3x3_2a")(b3),
                          _conv(384, (3, 1), p=(1, 0), name="branch3x3_2b")(b3)], -1)
    bd = _conv(448, name="branch3x3dbl_1")(x)
    bd = _conv(384, 3, p=1, name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([_conv(384, (1, 3), p=(0, 1), name="branch3x3dbl_3a")(bd),
                          _conv(384, (3, 1), p=(1, 0), name="branch3x3dbl_3b")(bd)], -1)
    pooled = _avg_pool3(x) if self.pool == "avg" else _max_pool3(x, stride=1)
    bp = _conv(192, name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], -1)


class _Logits(nn.Module):
  """The classifier `fc` (weight and bias, as in the weights file); returns x @ W."""

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], NUM_CLASSES))
    self.param("bias", nn.initializers.zeros_init(), (NUM_CLASSES,))  # read, never used
    return x @ kernel


class FIDInceptionV3(nn.Module):
  """NHWC images in [-1, 1] (any size) -> (B, 2048) pool3 features.

  resize: resize to 299x299 first (bilinear, pytorch-fid's default); False feeds
    the input as is (at least 75x75): callers that resize on the host (clean-fid's
    PIL bicubic, `ldm_jax.evaluation.inception_features`), and tests that stay small.
  """
  resize: bool = True

  @nn.compact
  def __call__(self, x, logits: bool = False):
    """Returns pool3 (B, 2048), or (pool3, logits (B, 1008)) when `logits`."""
    x = x.astype(jnp.float32)
    if self.resize and x.shape[1:3] != (FID_SIZE, FID_SIZE):
      # torch's F.interpolate(bilinear, align_corners=False): half-pixel centres, no antialias
      x = jax.image.resize(x, (x.shape[0], FID_SIZE, FID_SIZE, x.shape[3]), "bilinear",
                           antialias=False)
    x = _conv(32, 3, s=2, name="Conv2d_1a_3x3")(x)
    x = _conv(32, 3, name="Conv2d_2a_3x3")(x)
    x = _conv(64, 3, p=1, name="Conv2d_2b_3x3")(x)
    x = _max_pool3(x)
    x = _conv(80, name="Conv2d_3b_1x1")(x)
    x = _conv(192, 3, name="Conv2d_4a_3x3")(x)
    x = _max_pool3(x)
    x = InceptionA(32, name="Mixed_5b")(x)
    x = InceptionA(64, name="Mixed_5c")(x)
    x = InceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x = InceptionC(c7, name=name)(x)
    x = InceptionD(name="Mixed_7a")(x)
    x = InceptionE("avg", name="Mixed_7b")(x)
    x = InceptionE("max", name="Mixed_7c")(x)
    pool3 = jnp.mean(x, axis=(1, 2))
    out = _Logits(name="fc")(pool3)
    return (pool3, out) if logits else pool3


@functools.lru_cache(maxsize=None)
def _template():
  """The parameter shapes (the same at any input size), traced once per process."""
  return jax.eval_shape(FIDInceptionV3(resize=False).init, jax.random.PRNGKey(0),
                        jnp.zeros((1, 75, 75, 3)))["params"]


def load_inception(path: str, *, resize: bool = True):
  """(module, params) of the FID Inception from a torch state dict file (pytorch-fid's
  `pt_inception-2015-12-05-6726825d.pth`, or a `.safetensors` with the same keys).

  Raises FileNotFoundError naming the path and where the file comes from;
  ValueError if the keys or shapes differ.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f"Inception weights: no such file {path!r} (pytorch-fid's "
                            f"{WEIGHTS_FILE}, from {WEIGHTS_URL})")
  model = FIDInceptionV3(resize=resize)
  params = torch_to_flax(load_torch_file(path), _template(),
                         ignore=(r"num_batches_tracked$", r"^AuxLogits\."),
                         what=f"Inception weights {path!r}")
  return model, jax.tree.map(jnp.asarray, params)

