"""The Inception Score (Salimans et al. 2016): exp E_x KL(p(y|x) || p(y)) over the
1008 classes of the TensorFlow Inception, as the original code computes it.

p(y|x) is the softmax of pool3 @ W, the graph's `softmax/logits/MatMul` without
its bias (the original code multiplies the weights itself; torch-fidelity's
`logits_unbiased` does the same). The N samples are cut into `splits` consecutive
parts, the score is computed on each with p(y) the part's mean, and the mean and
standard deviation over the parts are reported (10 splits in the literature).
"""
import numpy as np

SPLITS = 10


def inception_score(logits, splits: int = SPLITS) -> tuple:
  """IS of (N, classes) logits.

  Args:
    logits: unnormalised class scores, one row per image.
    splits: consecutive parts the score is averaged over.
  Returns:
    (mean, standard deviation) over the parts.
  """
  z = np.asarray(logits, np.float64)
  if z.ndim != 2:
    raise ValueError(f"inception_score: logits must be (N, classes), got shape {z.shape}")
  if not 1 <= splits <= len(z):
    raise ValueError(f"Inception Score: {len(z)} images cannot be cut into {splits} splits")
  z = z - z.max(1, keepdims=True)
  log_p = z - np.log(np.exp(z).sum(1, keepdims=True))  # log p(y|x)
  scores = []
  n = len(log_p)
  for i in range(splits):  # the original's boundaries i N // splits
    part = log_p[i * n // splits:(i + 1) * n // splits]
    # log p(y) of the part, as a log-sum-exp: finite where every p(y|x) underflows
    top = part.max(0)
    log_py = top + np.log(np.exp(part - top).mean(0))
    kl = np.sum(np.exp(part) * (part - log_py), axis=1)
    scores.append(np.exp(kl.mean()))
  return float(np.mean(scores)), float(np.std(scores))
