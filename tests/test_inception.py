"""The FID Inception against a PyTorch build of pytorch-fid's network on random
weights (pool3 features and the Inception Score's logits), and rFID."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.models import inception

torch = pytest.importorskip("torch")
nn_t = torch.nn
F = torch.nn.functional


class _Conv(nn_t.Module):  # torchvision's BasicConv2d
  def __init__(self, cin, cout, k=1, s=1, p=0):
    super().__init__()
    self.conv = nn_t.Conv2d(cin, cout, k, stride=s, padding=p, bias=False)
    self.bn = nn_t.BatchNorm2d(cout, eps=0.001)

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)))


def _avg(x):
  return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class _A(nn_t.Module):
  def __init__(self, cin, pool):
    super().__init__()
    self.branch1x1 = _Conv(cin, 64)
    self.branch5x5_1, self.branch5x5_2 = _Conv(cin, 48), _Conv(48, 64, 5, p=2)
    self.branch3x3dbl_1 = _Conv(cin, 64)
    self.branch3x3dbl_2, self.branch3x3dbl_3 = _Conv(64, 96, 3, p=1), _Conv(96, 96, 3, p=1)
    self.branch_pool = _Conv(cin, pool)

  def forward(self, x):
    return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                      self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                      self.branch_pool(_avg(x))], 1)


class _B(nn_t.Module):
  def __init__(self, cin):
    super().__init__()
    self.branch3x3 = _Conv(cin, 384, 3, s=2)
    self.branch3x3dbl_1 = _Conv(cin, 64)
    self.branch3x3dbl_2, self.branch3x3dbl_3 = _Conv(64, 96, 3, p=1), _Conv(96, 96, 3, s=2)

  def forward(self, x):
    return torch.cat([self.branch3x3(x),
                      self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                      F.max_pool2d(x, 3, stride=2)], 1)


class _C(nn_t.Module):
  def __init__(self, cin, c7):
    super().__init__()
    self.branch1x1 = _Conv(cin, 192)
    self.branch7x7_1 = _Conv(cin, c7)
    self.branch7x7_2 = _Conv(c7, c7, (1, 7), p=(0, 3))
    self.branch7x7_3 = _Conv(c7, 192, (7, 1), p=(3, 0))
    self.branch7x7dbl_1 = _Conv(cin, c7)
    self.branch7x7dbl_2 = _Conv(c7, c7, (7, 1), p=(3, 0))
    self.branch7x7dbl_3 = _Conv(c7, c7, (1, 7), p=(0, 3))
    self.branch7x7dbl_4 = _Conv(c7, c7, (7, 1), p=(3, 0))
    self.branch7x7dbl_5 = _Conv(c7, 192, (1, 7), p=(0, 3))
    self.branch_pool = _Conv(cin, 192)

  def forward(self, x):
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    bd = x
    for i in range(1, 6):
      bd = getattr(self, f"branch7x7dbl_{i}")(bd)
    return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(_avg(x))], 1)


class _D(nn_t.Module):
  def __init__(self, cin):
    super().__init__()
    self.branch3x3_1, self.branch3x3_2 = _Conv(cin, 192), _Conv(192, 320, 3, s=2)
    self.branch7x7x3_1 = _Conv(cin, 192)
    self.branch7x7x3_2 = _Conv(192, 192, (1, 7), p=(0, 3))
    self.branch7x7x3_3 = _Conv(192, 192, (7, 1), p=(3, 0))
    self.branch7x7x3_4 = _Conv(192, 192, 3, s=2)

  def forward(self, x):
    b7 = x
    for i in range(1, 5):
      b7 = getattr(self, f"branch7x7x3_{i}")(b7)
    return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class _E(nn_t.Module):
  def __init__(self, cin, pool):
    super().__init__()
    self.pool = pool
    self.branch1x1 = _Conv(cin, 320)
    self.branch3x3_1 = _Conv(cin, 384)
    self.branch3x3_2a = _Conv(384, 384, (1, 3), p=(0, 1))
    self.branch3x3_2b = _Conv(384, 384, (3, 1), p=(1, 0))
    self.branch3x3dbl_1, self.branch3x3dbl_2 = _Conv(cin, 448), _Conv(448, 384, 3, p=1)
    self.branch3x3dbl_3a = _Conv(384, 384, (1, 3), p=(0, 1))
    self.branch3x3dbl_3b = _Conv(384, 384, (3, 1), p=(1, 0))
    self.branch_pool = _Conv(cin, 192)

  def forward(self, x):
    b3 = self.branch3x3_1(x)
    b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
    bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
    pooled = _avg(x) if self.pool == "avg" else F.max_pool2d(x, 3, stride=1, padding=1)
    return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)


class _FIDInception(nn_t.Module):
  """pytorch-fid's InceptionV3 up to pool3 (inputs in [0, 1], resize_input optional)."""

  def __init__(self, resize):
    super().__init__()
    self.resize = resize
    self.Conv2d_1a_3x3, self.Conv2d_2a_3x3 = _Conv(3, 32, 3, s=2), _Conv(32, 32, 3)
    self.Conv2d_2b_3x3, self.Conv2d_3b_1x1 = _Conv(32, 64, 3, p=1), _Conv(64, 80)
    self.Conv2d_4a_3x3 = _Conv(80, 192, 3)
    self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = _A(192, 32), _A(256, 64), _A(288, 64)
    self.Mixed_6a = _B(288)
    self.Mixed_6b, self.Mixed_6c = _C(768, 128), _C(768, 160)
    self.Mixed_6d, self.Mixed_6e = _C(768, 160), _C(768, 192)
    self.Mixed_7a, self.Mixed_7b, self.Mixed_7c = _D(768), _E(1280, "avg"), _E(2048, "max")
    self.fc = nn_t.Linear(2048, 1008)  # in the weights file, unused for features

  def forward(self, x):
    if self.resize:
      x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    x = 2 * x - 1
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = F.max_pool2d(x, 3, stride=2)
    x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
    for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
      x = getattr(self, f"Mixed_{name}")(x)
    return x.mean((2, 3))


def _random_reference(resize, seed=0):
  torch.manual_seed(seed)
  net = _FIDInception(resize).eval()
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, nn_t.BatchNorm2d):
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.2, 0.2)
        m.running_mean.uniform_(-0.2, 0.2)
        m.running_var.uniform_(0.5, 2.0)
  return net


@pytest.mark.parametrize("resize,size", [(False, 75), (True, 40)])
def test_matches_pytorch_fid_network(tmp_path, resize, size):
  net = _random_reference(resize)
  path = str(tmp_path / "inception.pth")
  torch.save(net.state_dict(), path)  # the layout of pt_inception-2015-12-05-*.pth
  model, params = inception.load_inception(path, resize=resize)
  x01 = np.random.default_rng(0).uniform(size=(2, size, size, 3)).astype(np.float32)
  with torch.no_grad():
    want = net(torch.from_numpy(x01.transpose(0, 3, 1, 2)))
    want_logits = (want @ net.fc.weight.T).numpy()  # the original IS code: no bias
    want = want.numpy()
  apply = jax.jit(lambda p, x: model.apply({"params": p}, x, logits=True))
  got, logits = map(np.asarray, apply(params, jnp.asarray(2 * x01 - 1)))
  assert got.shape == (2, 2048) and logits.shape == (2, 1008)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
  np.testing.assert_allclose(logits, want_logits, rtol=1e-4, atol=1e-4 * np.abs(want_logits).max())


def test_load_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.pth"):
    inception.load_inception(str(tmp_path / "nope.pth"))
  torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(32, 3, 3, 3)}, tmp_path / "part.pth")
  with pytest.raises(ValueError, match="parameters missing"):
    inception.load_inception(str(tmp_path / "part.pth"))


def test_evaluate_autoencoder_on_heldout_shapes(tmp_path, monkeypatch):
  """evaluate() on 8 devices: a perfect reconstruction has rFID ~0 and SSIM 1; a
  random autoencoder's is worse on every metric; images come from the held-out split."""
  monkeypatch.setattr(inception, "FID_SIZE", 75)  # the smallest Inception input: a faster test
  import importlib.util
  import os
  from ldm_jax import parallel
  from ldm_jax.evaluate_autoencoder import evaluate
  from ldm_jax.training.autoencoder import AutoencoderTask
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location("c", os.path.join(root, "configs", "autoencoder_kl.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  config = mod.get_config("f=4,size=tiny")
  config.data.cache_dir = str(tmp_path / "cache")
  task = AutoencoderTask(config)
  mesh = parallel.make_mesh(config)
  state = parallel.create_sharded(task.init, jax.random.key(0), mesh, parallel.rules_of(config))[0]
  net = _random_reference(resize=True)
  torch.save(net.state_dict(), tmp_path / "inception.pth")
  inc = inception.load_inception(str(tmp_path / "inception.pth"))
  random_ae = evaluate(task, state, mesh, config, num=12, batch=6, inception=inc)
  assert random_ae["num"] == 12  # batch 6 rounds up to 8 (the devices); 16 read, 12 kept

  class Perfect:
    def sample(self, state, batch, rng):
      return batch["image"]
  perfect = evaluate(Perfect(), state, mesh, config, num=12, batch=8, inception=inc)
  assert perfect["ssim"] == pytest.approx(1.0, abs=1e-6) and perfect["psnr"] > 100
  assert abs(perfect["rfid"]) < 1e-3 * random_ae["rfid"]
  assert random_ae["psnr"] < 20 and random_ae["ssim"] < 0.9 and random_ae["rfid"] > 0
  assert [p for p in os.listdir(config.data.cache_dir) if p.endswith("-heldout-k12")]
