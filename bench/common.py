"""Helpers the benchmark scripts share: host devices, timing, compile time, FLOPs,
memory, the measured matmul peak, the tiny txt2img config and text tables.

Benchmarks print figures; they are not tests. Import this module after
`force_host_devices` when a script fakes several CPU devices.
"""
import dataclasses
import os
import statistics
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def force_host_devices(n: int) -> None:
  """Makes the CPU backend expose `n` devices (XLA_FLAGS is read when the backend
  starts, so this must run before the first `jax.devices()` or array op)."""
  if n <= 1:
    return
  from jax._src import xla_bridge
  if xla_bridge.backends_are_initialized():
    raise RuntimeError("--devices: the JAX backend is already initialised; "
                       "call force_host_devices before any jax computation")
  flags = os.environ.get("XLA_FLAGS", "")
  os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


@dataclasses.dataclass
class Timing:
  """Seconds per call over the timed repeats (after warm-up)."""
  median: float
  best: float
  times: list


def time_calls(call: Callable[[], object], *, warmup: int = 1, repeats: int = 5) -> Timing:
  """Times `call()`, blocking on its result each time.

  Args:
    call: a zero-argument callable (close over arguments; thread donated state through
      a closure, since each call may consume the previous one's output).
    warmup: untimed calls first (caches, allocator, first-run effects).
    repeats: timed calls.

  Returns:
    Timing with the median and the best of the repeats.
  """
  for _ in range(warmup):
    jax.block_until_ready(call())
  times = []
  for _ in range(max(repeats, 1)):
    t0 = time.perf_counter()
    jax.block_until_ready(call())
    times.append(time.perf_counter() - t0)
  return Timing(statistics.median(times), min(times), times)


def compile_timed(fn, *args, **kwargs):
  """Ahead-of-time compiles `fn` (a jitted function, or a plain one to wrap in jax.jit)
  for `args`, which may be arrays or ShapeDtypeStructs.

  Returns:
    (compiled, seconds spent in lower + compile).
  """
  jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
  t0 = time.perf_counter()
  compiled = jitted.lower(*args, **kwargs).compile()
  return compiled, time.perf_counter() - t0


def flops_of(compiled) -> float:
  """XLA's FLOP count of one call of `compiled` (NaN when the backend gives none).

  `cost_analysis()` returns a dict on current jax and a list of dicts (one per
  program) on older versions; the counts are per device for SPMD programs.
  """
  try:
    cost = compiled.cost_analysis()
  except Exception:  # not every backend implements it
    return float("nan")
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", float("nan")))


def memory_of(compiled) -> dict:
  """`compiled.memory_analysis()` in MiB per device (empty when unavailable)."""
  try:
    m = compiled.memory_analysis()
  except Exception:
    return {}
  if m is None:
    return {}
  mib = lambda b: b / 2**20
  return dict(args=mib(m.argument_size_in_bytes), out=mib(m.output_size_in_bytes),
              temp=mib(m.temp_size_in_bytes), alias=mib(m.alias_size_in_bytes),
              code=mib(m.generated_code_size_in_bytes),
              total=mib(m.argument_size_in_bytes + m.output_size_in_bytes +
                        m.temp_size_in_bytes - m.alias_size_in_bytes))


def hash_params(init: Callable, *, out_shardings=None):
  """Parameters of the shapes `init()` returns, filled by a hash of the index.

  Values do not change the speed, so the benches need no real init: flax's (threefry,
  truncated normal over SD's 860M values) took ~100 s on 2 CPU cores, XLA's
  RngBitGenerator ~60 s; a multiplicative hash of the index, scaled as LeCun-uniform,
  ~25 s (mostly writing 3.4 GB).

  Args:
    init: a zero-argument function returning a (possibly logically boxed) tree;
      only its shapes are used (jax.eval_shape).
    out_shardings: shardings of the result (None: the default device).
  """
  import math
  from ldm_jax import parallel
  abstract = parallel.unbox(jax.eval_shape(init))

  def fill():
    def leaf(i, a):
      fan_in = math.prod(a.shape[:-1]) if len(a.shape) > 1 else 1
      h = (jax.lax.iota(jnp.uint32, math.prod(a.shape)) + jnp.uint32(7919 * i)) * \
          jnp.uint32(2654435761)                                    # Knuth's hash, mod 2^32
      u = (h >> 8).astype(jnp.float32) * 2.0 ** -23 - 1.0           # in [-1, 1)
      return (u * math.sqrt(3.0 / fan_in)).reshape(a.shape).astype(a.dtype)
    leaves, treedef = jax.tree.flatten(abstract)
    return jax.tree.unflatten(treedef, [leaf(i, a) for i, a in enumerate(leaves)])

  return jax.block_until_ready(jax.jit(fill, out_shardings=out_shardings)())


def flax_group_norm(num_groups=32, *, epsilon=1e-6, silu=False, dtype=None, name=None):
  """A stand-in for `layers.GroupNorm` built of flax's nn.GroupNorm with the SiLU after
  it, both differentiated by JAX: what the fused `layers.group_norm` replaced (the
  benches' 'norm=flax' knob assigns it to `layers.GroupNorm` before tracing)."""
  import flax.linen as nn
  del dtype
  gn = nn.GroupNorm(num_groups=num_groups, epsilon=epsilon, dtype=jnp.float32, name=name)
  return (lambda x: nn.silu(gn(x))) if silu else gn


def measure_matmul_peak(dtype=jnp.float32, n: int = 2048, repeats: int = 5) -> float:
  """The machine's measured matmul rate in FLOP/s, the denominator of MFU.

  A jitted (n, n) @ (n, n) product is compute bound for n in the thousands; it
  counts 2 n^3 FLOPs and the best of `repeats` runs is kept (the least disturbed
  by other processes). The operands are on the default device only, so this is the
  peak of ONE device; with several fake CPU devices they share the same cores.

  Args:
    dtype: operand dtype (float32 or bfloat16).
    n: matrix side.
    repeats: timed runs after one warm-up.
  """
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (n, n), dtype)
  b = jax.random.normal(kb, (n, n), dtype)
  matmul = jax.jit(jnp.matmul)
  t = time_calls(lambda: matmul(a, b), warmup=1, repeats=repeats)
  return 2.0 * n ** 3 / t.best


def txt2img_config(size: str = "tiny"):
  """The whole txt2img config of `size` (as configs/txt2img.py builds it)."""
  from ldm_jax import config_lib
  txt2img = config_lib.sibling(config_lib.config_file("configs/txt2img.py"), "txt2img")
  return txt2img.get_config(f"size={size},data=shapes").unlock()


def shapes_batch(n: int, resolution: int, seed: int = 0) -> dict:
  """n host examples of the embedded shapes set: image (n, H, W, 3) in [-1, 1], caption."""
  from ldm_jax.data import shapes
  images, captions = [], []
  for i in range(n):
    img, cap, _ = shapes.example(seed, i, resolution)
    images.append(img)
    captions.append(cap)
  images = np.stack(images).astype(np.float32) / 127.5 - 1.0
  return dict(image=images, caption=np.array(captions, object))


def print_table(headers: Sequence[str], rows: Sequence[Sequence], title: str = "") -> None:
  """A Markdown table (so it can be pasted into bench/README.md as is)."""
  def fmt(v):
    if isinstance(v, float):
      if v != v:
        return "n/a"
      return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)
  cells = [[fmt(v) for v in r] for r in rows]
  widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
  line = lambda vals: "| " + " | ".join(v.rjust(w) for v, w in zip(vals, widths)) + " |"
  if title:
    print(f"\n{title}")
  print(line(headers))
  print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
  for r in cells:
    print(line(r))


def machine_line() -> str:
  """One line naming the backend, devices and host cores, printed above every table."""
  d = jax.devices()
  return (f"jax {jax.__version__}, backend {jax.default_backend()}, {len(d)} x "
          f"{d[0].device_kind}, {os.cpu_count()} host cores, load avg "
          f"{os.getloadavg()[0]:.1f} at the start")
