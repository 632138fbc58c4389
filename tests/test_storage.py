"""The storage layer: workdir files on local paths and URLs, TensorBoard events read
back by TensorBoard's own reader, and the paths Orbax is given."""
import io
import os

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator

from ldm_jax import storage
from ldm_jax.training import images


def _read(logdir):
  acc = event_accumulator.EventAccumulator(logdir, size_guidance={event_accumulator.IMAGES: 0,
                                                                  event_accumulator.SCALARS: 0})
  acc.Reload()
  return acc


@pytest.mark.parametrize("where", ["local", "memory"])
def test_events_read_back_by_tensorboard(tmp_path, where):
  logdir = str(tmp_path / "tb") if where == "local" else "memory://storage-test/tb"
  grid = np.random.default_rng(0).integers(0, 256, (10, 14, 3), dtype=np.uint8)
  w = storage.summary_writer(logdir)
  for step in range(1, 4):
    w.add_scalar("train/loss", 1.0 / step, step)
    w.flush()  # on a URL a flush writes what is queued as a new part of the file
  w.add_image("samples", grid, 3, dataformats="HWC")
  w.close()
  acc = _read(logdir)
  assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [
      (1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
  (img,) = acc.Images("samples")
  assert img.step == 3
  np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(img.encoded_image_string))), grid)
  if where == "local":
    assert len(os.listdir(logdir)) == 1  # appended to one file
  else:
    assert len(storage.listdir(logdir)) >= 2  # parts (how many depends on the writer thread)


def test_files_on_a_url():
  root = "memory://storage-test/files"
  images.save_png(np.full((4, 6, 3), 200, np.uint8), storage.join(root, "samples", "a.png"))
  storage.write_json(storage.join(root, "x.json"), {"a": 1})
  assert storage.read_json(storage.join(root, "x.json")) == {"a": 1}
  assert storage.listdir(storage.join(root, "samples")) == ["a.png"]
  with storage.open(storage.join(root, "samples", "a.png")) as f:
    assert np.asarray(Image.open(f)).shape == (4, 6, 3)
  storage.check_writable(root)
  storage.remove(root, recursive=True)
  assert not storage.exists(root)


def test_unwritable_local_workdir_is_named(tmp_path):
  (tmp_path / "file").write_text("x")
  with pytest.raises(ValueError, match="not writable"):
    storage.check_writable(str(tmp_path / "file" / "w"))


def test_the_paths_orbax_is_given(tmp_path):
  assert storage.orbax_path(f"file://{tmp_path}/c") == f"{tmp_path}/c"
  assert storage.orbax_path("gs://bucket/run/c") == "gs://bucket/run/c"
  assert storage.orbax_path("runs/x") == os.path.abspath("runs/x")
  with pytest.raises(ValueError, match="memory://"):
    storage.orbax_path("memory://run/checkpoints")
