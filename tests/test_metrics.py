"""FID, KID, the Inception Score and the CLIP score against closed forms; streaming
statistics; reference files; clean-fid's resize."""
import numpy as np
import pytest

from ldm_jax.evaluation import clip_score, fid, inception_score, kid


def _random_cov(rng, d, floor=0.1):
  a = rng.normal(size=(d, d))
  return a @ a.T / d + floor * np.eye(d)


def test_frechet_distance_closed_forms():
  rng = np.random.default_rng(0)
  mu1, mu2 = rng.normal(size=64), rng.normal(size=64)
  dmu = np.sum((mu1 - mu2) ** 2)
  # Diagonal covariances: Tr(S1 + S2 - 2 sqrt(S1 S2)) = sum (sqrt(s1) - sqrt(s2))^2.
  s1, s2 = rng.uniform(0.1, 2, 64), rng.uniform(0.1, 2, 64)
  want = dmu + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
  assert fid.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(want, rel=1e-6)
  # S2 = c^2 S1 for a full S1: Tr sqrt(S1 S2) = c Tr S1, so FID = dmu + (1 - c)^2 Tr S1.
  sigma = _random_cov(rng, 256)
  ma, mb = rng.normal(size=256), rng.normal(size=256)
  want = np.sum((ma - mb) ** 2) + (1 - 1.7) ** 2 * np.trace(sigma)
  assert fid.frechet_distance(ma, sigma, mb, 1.7 ** 2 * sigma) == pytest.approx(want, rel=1e-6)
  # Commuting covariances (shared eigenvectors): Tr sqrt(S1 S2) = sum sqrt(l1 l2).
  q, _ = np.linalg.qr(rng.normal(size=(64, 64)))
  l1, l2 = rng.uniform(0.1, 2, 64), rng.uniform(0.1, 2, 64)
  got = fid.frechet_distance(mu1, q @ np.diag(l1) @ q.T, mu2, q @ np.diag(l2) @ q.T)
  assert got == pytest.approx(dmu + np.sum((np.sqrt(l1) - np.sqrt(l2)) ** 2), rel=1e-6)
  # Non-commuting 2x2: S1 S2 has eigenvalues l >= 0, and
  # Tr sqrt(S1 S2) = sqrt(l1) + sqrt(l2) = sqrt(Tr(S1 S2) + 2 sqrt(det S1 det S2)).
  a, b = _random_cov(rng, 2), _random_cov(rng, 2)
  tr = np.sqrt(np.trace(a @ b) + 2 * np.sqrt(np.linalg.det(a) * np.linalg.det(b)))
  want = np.sum((mu1[:2] - mu2[:2]) ** 2) + np.trace(a) + np.trace(b) - 2 * tr
  assert fid.frechet_distance(mu1[:2], a, mu2[:2], b) == pytest.approx(want, rel=1e-6)
  assert fid.frechet_distance(mu1, sigma[:64, :64], mu1, sigma[:64, :64]) == \
      pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_of_few_features_uses_their_factor():
  """N <= D features: sigma1 = F F^T with F their centred rows, an N x N eigenproblem
  for the same number as the D x D one (singular covariances included)."""
  rng = np.random.default_rng(8)
  f = rng.normal(size=(20, 64)) + 1
  mu2, sigma2 = rng.normal(size=64), _random_cov(rng, 64)
  mu1, sigma1 = fid.feature_stats(f)
  want = fid.frechet_distance(mu1, sigma1, mu2, sigma2)
  # (the D x D route takes square roots of rounding-level eigenvalues of the singular
  # S1: about sqrt(1e-16) each, so the two agree to 1e-7 rather than 1e-12)
  assert fid.frechet_distance_of_features(f, mu2, sigma2) == pytest.approx(want, rel=1e-7)
  assert fid.frechet_distance_of_features(f, mu1, sigma1) == pytest.approx(0, abs=1e-9 * want)


def test_frechet_distance_matches_scipy_sqrtm():
  scipy_linalg = pytest.importorskip("scipy.linalg")
  rng = np.random.default_rng(1)
  a, b = _random_cov(rng, 128), _random_cov(rng, 128)
  mu1, mu2 = rng.normal(size=128), rng.normal(size=128)
  covmean = scipy_linalg.sqrtm(a @ b).real  # pytorch-fid's computation
  want = np.sum((mu1 - mu2) ** 2) + np.trace(a) + np.trace(b) - 2 * np.trace(covmean)
  assert fid.frechet_distance(mu1, a, mu2, b) == pytest.approx(want, rel=1e-6)


def test_streaming_statistics_ignore_order_and_batching():
  rng = np.random.default_rng(2)
  f = rng.normal(size=(300, 16)) * 3 + 50  # a large mean: raw second moments would cancel
  whole = fid.FeatureStats().update(f)
  np.testing.assert_allclose(whole.mean, f.mean(0), rtol=1e-12)
  np.testing.assert_allclose(whole.cov(), np.cov(f, rowvar=False), rtol=1e-10)
  parts = fid.FeatureStats()
  perm = rng.permutation(300)
  for lo, hi in ((0, 1), (1, 7), (7, 150), (150, 300)):
    parts.update(f[perm[lo:hi]])
  assert parts.n == 300
  np.testing.assert_allclose(parts.mean, whole.mean, rtol=1e-12)
  np.testing.assert_allclose(parts.cov(), whole.cov(), rtol=1e-10)
  # Sample statistics of Gaussians recover the population distance.
  g1 = rng.normal(size=(20000, 3))
  g2 = rng.normal(size=(20000, 3)) * 2 + 1
  d = fid.frechet_distance(*fid.feature_stats(g1), *fid.feature_stats(g2))
  assert d == pytest.approx(3 * 1 + 3 * (1 - 2) ** 2, rel=0.05)
  with pytest.raises(ValueError, match="8-d features after 16-d"):
    parts.update(np.zeros((2, 8)))


def test_kid_is_unbiased_and_matches_the_population_mmd():
  rng = np.random.default_rng(3)
  # Equal distributions: the mean over independent draws is ~0 (the biased
  # V-statistic would be positive, about 2 E k(x, x) / m).
  draws = [kid.kernel_inception_distance(rng.normal(size=(200, 8)), rng.normal(size=(200, 8)),
                                         num_subsets=10, subset_size=100, seed=i)[0]
           for i in range(40)]
  sem = np.std(draws) / np.sqrt(len(draws))
  assert abs(np.mean(draws)) < 3 * sem
  assert min(draws) < 0 < max(draws)
  x, y = rng.normal(size=(100, 8)), rng.normal(size=(100, 8))
  biased = ((x @ x.T / 8 + 1) ** 3).mean() + ((y @ y.T / 8 + 1) ** 3).mean() - \
      2 * ((x @ y.T / 8 + 1) ** 3).mean()
  assert biased > 10 * sem
  # Two sets over five feature vectors with known counts c: subsets drawn without
  # replacement estimate, unbiasedly, the sets' own MMD^2_u, which the counts give:
  # sum_{a != b} k(x_a, x_b) = c^T K c - sum_i c_i K_ii.
  v = rng.normal(size=(5, 4))
  K = (v @ v.T / 4 + 1) ** 3
  cx, cy, n = np.array([120] * 5), np.array([240, 180, 60, 60, 60]), 600
  within = lambda c: (c @ K @ c - c @ np.diag(K)) / (n * (n - 1))
  want = within(cx) + within(cy) - 2 * cx @ K @ cy / n ** 2
  got, std = kid.kernel_inception_distance(np.repeat(v, cy, 0), np.repeat(v, cx, 0),
                                           num_subsets=100, subset_size=300)
  assert want > 0.1 and got == pytest.approx(want, rel=0.1)
  assert 0 < std < got


def test_kid_mmd_of_one_subset_by_its_definition():
  rng = np.random.default_rng(4)
  x, y = rng.normal(size=(6, 3)), rng.normal(size=(6, 3)) + 0.3
  k = lambda a, b: (a @ b / 3 + 1) ** 3
  m = 6
  want = sum(k(x[i], x[j]) + k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (
      m * (m - 1)) - 2 * sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m ** 2
  assert kid.mmd2_unbiased(x, y) == pytest.approx(want, rel=1e-12)
  # Subsets of the whole set, drawn without replacement, are the set itself.
  assert kid.kernel_inception_distance(x, y, num_subsets=3, subset_size=6)[0] == \
      pytest.approx(want, rel=1e-12)


def test_kid_needs_a_whole_subset():
  with pytest.raises(ValueError, match="at least 1000 generated images .* got 999"):
    kid.kernel_inception_distance(np.zeros((999, 4)), np.zeros((5000, 4)))
  with pytest.raises(ValueError, match="at least 50 reference features"):
    kid.kernel_inception_distance(np.zeros((60, 4)), np.zeros((40, 4)), subset_size=50)


def test_inception_score_closed_forms():
  # Confident and spread over K classes: p(y|x) one-hot, p(y) uniform -> IS = K.
  k = 7
  logits = np.full((70, 1008), -1e3)
  logits[np.arange(70), np.arange(70) % k] = 0
  mean, std = inception_score.inception_score(logits, splits=10)
  assert mean == pytest.approx(k, rel=1e-9) and std == pytest.approx(0, abs=1e-9)
  # One class for every image, or no confidence at all: IS = 1.
  assert inception_score.inception_score(np.zeros((20, 1008)), 2)[0] == pytest.approx(1.0)
  assert inception_score.inception_score(logits[::k], 2)[0] == pytest.approx(1.0)
  # Random logits: exp(E KL(p(y|x) || p(y))) by its definition, split by split.
  rng = np.random.default_rng(5)
  z = rng.normal(size=(30, 10)) * 3
  p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
  want = [np.exp(np.mean(np.sum(q * (np.log(q) - np.log(q.mean(0))), 1)))
          for q in (p[:10], p[10:20], p[20:])]
  got = inception_score.inception_score(z, 3)
  assert got[0] == pytest.approx(np.mean(want), rel=1e-9)
  assert got[1] == pytest.approx(np.std(want), rel=1e-9)
  with pytest.raises(ValueError, match="cannot be cut into 40 splits"):
    inception_score.inception_score(z, 40)


def test_clip_score_is_100_max_cos_0():
  t = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
  i = np.array([[3.0, 3.0], [-1.0, 0.0], [0.0, 0.5]])
  np.testing.assert_allclose(clip_score.clip_score(i, t), [100 / np.sqrt(2), 0.0, 100.0])


def test_reference_files(tmp_path):
  rng = np.random.default_rng(6)
  f = rng.normal(size=(50, 2048)).astype(np.float32)
  stats = fid.FeatureStats().update(f)
  fid.save_reference(str(tmp_path / "ours.npz"), stats, f, data="shapes:heldout")
  ours = fid.load_reference(str(tmp_path / "ours.npz"), 2048)
  assert ours.num == 50 and ours.meta["data"] == "shapes:heldout"
  np.testing.assert_allclose(ours.sigma, np.cov(f.astype(np.float64), rowvar=False), rtol=1e-9)
  np.testing.assert_array_equal(ours.features, f)
  # pytorch-fid / clean-fid statistics: mu and sigma only.
  np.savez(tmp_path / "pytorch_fid.npz", mu=ours.mu, sigma=ours.sigma)
  theirs = fid.load_reference(str(tmp_path / "pytorch_fid.npz"), 2048)
  assert theirs.features is None
  np.testing.assert_array_equal(theirs.mu, ours.mu)
  np.testing.assert_array_equal(theirs.sigma, ours.sigma)
  # clean-fid's KID files: features only.
  np.savez(tmp_path / "clean_fid_kid.npz", feats=f)
  kid_ref = fid.load_reference(str(tmp_path / "clean_fid_kid.npz"), 2048)
  np.testing.assert_allclose(kid_ref.mu, ours.mu, rtol=1e-9)
  np.savez(tmp_path / "small.npz", mu=np.zeros(64), sigma=np.eye(64))
  with pytest.raises(ValueError, match="64.*2048-d"):
    fid.load_reference(str(tmp_path / "small.npz"), 2048)
  np.savez(tmp_path / "other.npz", mean=np.zeros(3))
  with pytest.raises(ValueError, match="expected 'mu' and 'sigma'"):
    fid.load_reference(str(tmp_path / "other.npz"), 2048)
  with pytest.raises(FileNotFoundError, match="missing.npz.*--make_reference"):
    fid.load_reference(str(tmp_path / "missing.npz"), 2048)


def test_resize_is_clean_fids_pil_bicubic():
  torch = pytest.importorskip("torch")
  from ldm_jax.evaluation import inception_features
  rng = np.random.default_rng(7)
  for side in (32, 600):  # up- and down-sampling
    x = rng.integers(0, 256, (2, side, side, 3)).astype(np.uint8)
    got = inception_features.resize(x, 299)
    assert got.dtype == np.float32 and got.shape == (2, 299, 299, 3)
    # PIL's bicubic (a = -0.5, antialiased when downsampling) is torch's antialiased
    # bicubic; clean-fid clips the result to [0, 255].
    t = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2).double(),
                                        size=(299, 299), mode="bicubic", antialias=True)
    np.testing.assert_allclose(got, np.clip(t.permute(0, 2, 3, 1).numpy(), 0, 255), atol=1e-3)
  # A pixel-wide checkerboard downsampled is flat grey; a filter without
  # antialiasing (pytorch-fid's bilinear) keeps stripes of the full contrast.
  board = (np.indices((600, 600)).sum(0) % 2 * 255).astype(np.uint8)[None, ..., None].repeat(3, -1)
  assert np.ptp(inception_features.resize(board, 299)[0, 5:-5, 5:-5]) < 2
  with pytest.raises(ValueError, match="uint8"):
    inception_features.resize(board.astype(np.float32))
