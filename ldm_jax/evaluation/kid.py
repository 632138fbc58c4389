"""The Kernel Inception Distance (Bińkowski et al. 2018): the unbiased estimate of
the squared maximum mean discrepancy between two feature sets under the cubic
polynomial kernel k(x, y) = (x . y / d + 1)^3, averaged over random subsets.

For subsets X, Y of m features each,
  MMD^2_u = sum_{i != j} k(x_i, x_j) / (m (m - 1)) + sum_{i != j} k(y_i, y_j) / (m (m - 1))
            - 2 sum_{i, j} k(x_i, y_j) / m^2,
whose expectation is the population MMD^2: zero for equal distributions (it can
come out negative on one draw). Defaults follow the literature (and clean-fid,
torch-fidelity): 100 subsets of 1000 features, drawn without replacement.
"""
import numpy as np

NUM_SUBSETS = 100
SUBSET_SIZE = 1000


def check_sizes(num_generated: int, num_reference: int, subset_size: int = SUBSET_SIZE) -> None:
  """Raises ValueError when a set is smaller than one subset (a biased, silent
  fallback to smaller subsets would not compare with published KIDs)."""
  if subset_size < 2:
    raise ValueError(f"KID subset size {subset_size} must be at least 2")
  for what, n in (("generated images", num_generated), ("reference features", num_reference)):
    if n < subset_size:
      raise ValueError(f"KID needs at least {subset_size} {what} (the subset size), got {n}: "
                       "raise the number or lower the KID subset size")


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
  """MMD^2_u of two (m, d) feature subsets of equal size under the cubic kernel."""
  m, d = x.shape
  cubic = lambda g: g * g * g  # faster than ** 3 on large arrays
  k_xx = cubic(x @ x.T / d + 1)
  k_yy = cubic(y @ y.T / d + 1)
  k_xy = cubic(x @ y.T / d + 1)
  within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
  return float(within - 2 * k_xy.sum() / m ** 2)


def kernel_inception_distance(generated, reference, *, num_subsets: int = NUM_SUBSETS,
                              subset_size: int = SUBSET_SIZE, seed: int = 0) -> tuple:
  """KID between two feature sets.

  Args:
    generated, reference: (N, d) and (M, d) features (Inception pool3).
    num_subsets: random subset pairs averaged over.
    subset_size: features per subset, drawn without replacement from each set.
    seed: the subsets' seed.
  Returns:
    (mean, standard deviation) of MMD^2_u over the subsets.
  """
  g = np.asarray(generated, np.float64)
  r = np.asarray(reference, np.float64)
  if g.ndim != 2 or r.ndim != 2 or g.shape[1] != r.shape[1]:
    raise ValueError(f"KID: feature sets of shapes {g.shape} and {r.shape} do not match")
  check_sizes(len(g), len(r), subset_size)
  rng = np.random.default_rng(seed)
  values = [mmd2_unbiased(g[rng.choice(len(g), subset_size, replace=False)],
                          r[rng.choice(len(r), subset_size, replace=False)])
            for _ in range(num_subsets)]
  return float(np.mean(values)), float(np.std(values))
