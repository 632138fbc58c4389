"""The Fréchet Inception Distance: streaming feature statistics, the distance, and
reference statistics files.

FID = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) (Heusel et al. 2017) between
Gaussians fitted to two sets of Inception pool3 features. Everything here is
float64: the trace term is a difference of large numbers, and float32 covariances
of 2048-d features lose the digits that separate good models.

Reference files are `.npz` with `mu` (D,) and `sigma` (D, D), the layout that
pytorch-fid and clean-fid publish; ours add `features` (N, D) float32 for KID.
clean-fid's KID files (`feats` only) load too, their statistics computed here.
"""
import os
from typing import Optional

import numpy as np


def frechet_distance(mu1, sigma1, mu2, sigma2, *, factor1=None) -> float:
  """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) in float64.

  With S1 = F F^T, the matrix F^T S2 F is symmetric PSD and has the nonzero
  eigenvalues of S1 S2, so Tr((S1 S2)^(1/2)) is the sum of the square roots of its
  eigenvalues: `eigh` replaces scipy's complex `sqrtm` (and its imaginary-part
  warnings). F = V diag(w)^(1/2) from S1's eigendecomposition, unless given.

  Args:
    mu1, mu2: (D,) means; sigma1, sigma2: (D, D) covariances.
    factor1: optional (D, r) F with sigma1 = F F^T, e.g. the centred features of
      r + 1 < D images over sqrt(r); the eigenproblem is then r x r instead of D x D.
  Returns:
    The distance (a Python float).
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  if factor1 is None:
    w, v = np.linalg.eigh(s1)
    factor1 = v * np.sqrt(np.clip(w, 0, None))
  f = np.asarray(factor1, np.float64)
  m = f.T @ s2 @ f
  tr_sqrt = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)))
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


def frechet_distance_of_features(features, mu2, sigma2) -> float:
  """FID of (N, D) features against (mu2, sigma2); for N <= D images the covariance
  factor is the centred features themselves (the same number, found faster)."""
  stats = FeatureStats().update(features)
  f = np.asarray(features, np.float64)
  factor = (f - stats.mean).T / np.sqrt(stats.n - 1) if stats.n <= f.shape[1] else None
  return frechet_distance(stats.mean, stats.cov(), mu2, sigma2, factor1=factor)


class FeatureStats:
  """Mean and covariance of features seen batch by batch, in float64.

  Each batch's mean and centred scatter are merged into the running ones (Chan et
  al.'s pairwise update), so no raw second moment E[x x^T] is ever differenced
  and the result does not depend on the batch sizes or their order beyond float64
  rounding.
  """

  def __init__(self, dim: Optional[int] = None):
    self.n = 0
    self.mean = None if dim is None else np.zeros(dim)
    self.scatter = None if dim is None else np.zeros((dim, dim))

  def update(self, features) -> "FeatureStats":
    """Adds (B, D) features; returns self."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2:
      raise ValueError(f"FeatureStats: features must be (batch, dim), got shape {f.shape}")
    if self.mean is None:
      self.mean, self.scatter = np.zeros(f.shape[1]), np.zeros((f.shape[1],) * 2)
    if f.shape[1] != self.mean.shape[0]:
      raise ValueError(f"FeatureStats: {f.shape[1]}-d features after {self.mean.shape[0]}-d ones")
    b = f.shape[0]
    if b == 0:
      return self
    mean_b = f.mean(0)
    c = f - mean_b
    delta = mean_b - self.mean
    n = self.n + b
    self.scatter += c.T @ c + np.outer(delta, delta) * (self.n * b / n)
    self.mean += delta * (b / n)
    self.n = n
    return self

  def cov(self) -> np.ndarray:
    """The unbiased covariance (N - 1 in the denominator, as numpy and pytorch-fid)."""
    if self.n < 2:
      raise ValueError(f"a covariance needs at least 2 features, got {self.n}")
    return self.scatter / (self.n - 1)


def feature_stats(features) -> tuple:
  """(mean, covariance) of (N, D) features, float64, N - 1 in the covariance."""
  s = FeatureStats().update(features)
  return s.mean, s.cov()


class Reference:
  """Statistics of a reference set: mu, sigma and, when stored, its features."""

  def __init__(self, mu, sigma, features=None, path: str = "", meta: Optional[dict] = None):
    self.mu, self.sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    self.features = None if features is None else np.asarray(features, np.float32)
    self.path, self.meta = path, dict(meta or {})

  @property
  def dim(self) -> int:
    return self.mu.shape[0]

  @property
  def num(self) -> int:
    """Images behind the statistics (0 when the file does not say)."""
    if self.features is not None:
      return len(self.features)
    return int(self.meta.get("num", 0))


def save_reference(path: str, stats: FeatureStats, features=None, **meta) -> None:
  """Writes mu, sigma (float64), optional features (float32) and scalar metadata."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  arrays = dict(mu=stats.mean, sigma=stats.cov(), num=np.int64(stats.n))
  if features is not None:
    arrays["features"] = np.asarray(features, np.float32)
  arrays.update({k: np.asarray(v) for k, v in meta.items()})
  tmp = path + ".tmp.npz"  # np.savez appends .npz to other names
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def load_reference(path: str, dim: int) -> Reference:
  """Reads reference statistics (ours, pytorch-fid's or clean-fid's `.npz`).

  Args:
    path: the .npz file.
    dim: the feature size the evaluating network gives (2048 for pool3).
  Raises:
    FileNotFoundError naming the path; ValueError when the file holds neither
    mu/sigma nor features, or features of another size than `dim`.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"reference statistics {path!r} not found; make them with "
                            "python -m ldm_jax.evaluate --make_reference --data ... --out "
                            f"{path}")
  with np.load(path, allow_pickle=False) as f:
    keys = set(f.files)
    arrays = {k: f[k] for k in keys}
  features = arrays.get("features", arrays.get("feats"))
  if "mu" in arrays and "sigma" in arrays:
    mu, sigma = arrays["mu"], arrays["sigma"]
  elif features is not None and features.ndim == 2:
    mu, sigma = feature_stats(features)
  else:
    raise ValueError(f"reference {path!r} holds {sorted(keys)}; expected 'mu' and 'sigma' "
                     "(pytorch-fid / clean-fid statistics) or 'features'")
  got = [mu.shape, sigma.shape] + ([features.shape[1:]] if features is not None else [])
  if mu.shape != (dim,) or sigma.shape != (dim, dim) or (
      features is not None and features.shape[1:] != (dim,)):
    raise ValueError(f"reference {path!r} has features of shape {got}; the Inception pool3 "
                     f"features are {dim}-d (was it made with another network or layer?)")
  meta = {k: arrays[k].item() for k in keys - {"mu", "sigma", "features", "feats"}
          if arrays[k].ndim == 0}
  return Reference(mu, sigma, features, path, meta)
