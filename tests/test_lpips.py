"""LPIPS against an independent PyTorch computation: random VGG16 features + lpips' shipped heads."""
import importlib.util
import logging
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ldm_jax.models.lpips import load_lpips  # noqa: E402

_VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def _lin_path():
  spec = importlib.util.find_spec("lpips")  # not imported: its backbone needs torchvision
  if spec is None:
    pytest.skip("lpips not installed")
  path = os.path.join(spec.submodule_search_locations[0], "weights", "v0.1", "vgg.pth")
  if not os.path.exists(path):
    pytest.skip(f"{path} missing")
  return path


class _VGG(torch.nn.Module):
  """torchvision's vgg16().features layout, built by hand."""

  def __init__(self):
    super().__init__()
    mods, c = [], 3
    for v in _VGG16:
      if v == "M":
        mods.append(torch.nn.MaxPool2d(2, 2))
      else:
        mods += [torch.nn.Conv2d(c, v, 3, padding=1), torch.nn.ReLU()]
        c = v
    self.features = torch.nn.Sequential(*mods)


def _torch_lpips(vgg, lins, x0, x1):
  shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
  scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
  taps = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3

  def feats(x):
    h, out = (x - shift) / scale, []
    for i, m in enumerate(vgg.features):
      h = m(h)
      if i in taps:
        out.append(h)
    return out

  total = 0
  for k, (a, b) in enumerate(zip(feats(x0), feats(x1))):
    na = a / (torch.sqrt(torch.sum(a ** 2, 1, keepdim=True)) + 1e-10)
    nb = b / (torch.sqrt(torch.sum(b ** 2, 1, keepdim=True)) + 1e-10)
    d = torch.nn.functional.conv2d((na - nb) ** 2, lins[f"lin{k}.model.1.weight"])
    total = total + d.mean(dim=(2, 3))
  return total[:, 0]


def test_lpips_matches_torch(tmp_path):
  lin_path = _lin_path()
  torch.manual_seed(0)
  vgg = _VGG().eval()
  vgg_path = str(tmp_path / "vgg16.pth")
  torch.save(vgg.state_dict(), vgg_path)
  model, params = load_lpips(vgg_path, lin_path)
  rs = np.random.RandomState(0)
  x0 = rs.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  x1 = np.clip(x0 + 0.3 * rs.randn(*x0.shape), -1, 1).astype(np.float32)
  got = jax.jit(model.apply)({"params": params}, x0, x1)
  lins = torch.load(lin_path, map_location="cpu", weights_only=True)
  with torch.no_grad():
    t = lambda a: torch.tensor(a).permute(0, 3, 1, 2)
    want = _torch_lpips(vgg, lins, t(x0), t(x1)).numpy()
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert np.all(want > 0)
  np.testing.assert_allclose(jax.jit(model.apply)({"params": params}, x0, x0), 0, atol=1e-6)


def test_lpips_paths(tmp_path, caplog):
  with caplog.at_level(logging.INFO):
    assert load_lpips(None, None) is None
  assert "perceptual loss is off" in caplog.text
  missing = str(tmp_path / "nope.pth")
  with pytest.raises(FileNotFoundError, match="nope.pth"):
    load_lpips(missing, _lin_path())
  with pytest.raises(ValueError, match="lpips_lin_path"):
    load_lpips(missing, None)
