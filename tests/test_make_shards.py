"""make_shards: a folder of images with jsonl or sidecar captions becomes shards in
img2dataset's layout that the framework's own iterator reads back."""
import io
import json
import subprocess
import sys
import tarfile

import numpy as np
from PIL import Image

from ldm_jax import data
from ldm_jax.data import make_shards


def _save(path, size, fmt, seed):
  path.parent.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), np.uint8)).save(path, format=fmt)


def image_folder(root, sidecar: bool):
  """Five images (a PNG, a JPEG, a PNG in a subfolder, a BMP, a corrupt JPEG); with
  `sidecar`, a .txt beside each but the BMP."""
  _save(root / "a.png", (24, 20), "PNG", 0)
  _save(root / "b.jpg", (30, 18), "JPEG", 1)
  _save(root / "sub" / "c.png", (18, 26), "PNG", 2)
  _save(root / "d.bmp", (20, 20), "BMP", 3)
  (root / "e.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
  if sidecar:
    for name in ("a", "b", "sub/c", "e"):
      (root / f"{name}.txt").write_text(f"sidecar {name}\n")
  return root


def cfg(pattern, **kw):
  c = data.default_config()
  c.source, c.shards, c.resolution, c.shuffle_buffer, c.workers = "wds", pattern, 16, 1, 1
  for k, v in kw.items():
    c[k] = v
  return c


def read_all(pattern, n, **kw):
  it = data.make_iterator(cfg(pattern, **kw), batch_size=n)
  b = next(it)
  return dict(zip(b["caption"].tolist(), b["label"].tolist())), it.stats()


def test_jsonl_captions_round_trip(tmp_path):
  images = image_folder(tmp_path / "img", sidecar=False)
  lines = [{"file_name": "a.png", "text": "a red square", "label": 1},
           {"file_name": "b.jpg", "caption": "a wide one", "label": 2},
           {"file_name": "sub/c.png", "text": "in a subfolder", "label": 3},
           {"file_name": "d.bmp", "text": "a bitmap", "label": 4},
           {"file_name": "e.jpg", "text": "corrupt"},
           {"file_name": "gone.png", "text": "no such image"}]
  (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
  pattern, counts = make_shards.write_shards(str(images), str(tmp_path / "out"),
                                             captions=str(tmp_path / "captions.jsonl"),
                                             shard_size=3, progress=False)
  assert counts == {"written": 4, "unreadable": 1, "no_caption": 0, "missing_image": 1}
  assert pattern == str(tmp_path / "out" / "{00000..00001}.tar")
  got, stats = read_all(pattern, 4)
  assert got == {"a red square": 1, "a wide one": 2, "in a subfolder": 3, "a bitmap": 4}
  assert not stats  # nothing skipped
  with tarfile.open(tmp_path / "out" / "00000.tar") as t:
    files = {m.name: t.extractfile(m).read() for m in t}
  # img2dataset's names: %09d keys of the sorted paths (a, b, d, e, sub/c; e unreadable),
  # the image bytes as they were, the BMP as a PNG
  assert list(files) == [f"00000000{i}.{ext}" for i, img in [(0, "png"), (1, "jpg"), (2, "png")]
                         for ext in (img, "txt", "json")]
  assert files["000000001.jpg"] == (images / "b.jpg").read_bytes()
  assert Image.open(io.BytesIO(files["000000002.png"])).size == (20, 20)
  meta = json.loads(files["000000001.json"])
  assert (meta["width"], meta["height"], meta["original_width"], meta["original_height"]) == (
      30, 18, 30, 18)
  assert meta["key"] == "000000001" and meta["url"] == "b.jpg" and meta["label"] == 2
  assert meta["caption"] == "a wide one" and meta["status"] == "success"
  with tarfile.open(tmp_path / "out" / "00001.tar") as t:
    assert [m.name for m in t] == ["000000004.png", "000000004.txt", "000000004.json"]


def test_sidecar_captions_and_a_missing_one(tmp_path):
  images = image_folder(tmp_path / "img", sidecar=True)
  pattern, counts = make_shards.write_shards(str(images), str(tmp_path / "out"), shard_size=10,
                                             progress=False)
  assert counts == {"written": 4, "unreadable": 1, "no_caption": 1, "missing_image": 0}
  it = data.make_iterator(cfg(pattern), batch_size=3)
  assert sorted(next(it)["caption"].tolist()) == ["sidecar a", "sidecar b", "sidecar sub/c"]
  assert it.stats()["no_caption"] == 1  # d.bmp: written without a .txt, skipped by the reader
  # the same folder gives byte-identical shards
  again, _ = make_shards.write_shards(str(images), str(tmp_path / "again"), shard_size=10,
                                      progress=False)
  assert (tmp_path / "again" / "00000.tar").read_bytes() == (tmp_path / "out" / "00000.tar").read_bytes()


def test_fsspec_output(tmp_path):
  images = image_folder(tmp_path / "img", sidecar=True)
  pattern, counts = make_shards.write_shards(str(images), "memory://make-shards-test/out",
                                             shard_size=2, progress=False)
  assert pattern == "memory://make-shards-test/out/{00000..00001}.tar"
  it = data.make_iterator(cfg(pattern), batch_size=3)
  assert sorted(next(it)["caption"].tolist()) == ["sidecar a", "sidecar b", "sidecar sub/c"]


def test_cli(tmp_path, capsys):
  images = image_folder(tmp_path / "img", sidecar=True)
  out = subprocess.run([sys.executable, "-m", "ldm_jax.data.make_shards", "--images", str(images),
                        "--out", str(tmp_path / "out"), "--shard_size", "2"],
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  assert "wrote 4 samples" in out.stdout and "unreadable 1" in out.stdout
  assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["00000.tar", "00001.tar"]
  # bad input: one line naming it, exit code 2
  (tmp_path / "bad.jsonl").write_text('{"file_name": "a.png"}\n{"text": "no file"}\n')
  for args, names in [(["--images", str(tmp_path / "nowhere")], "nowhere"),
                      (["--images", str(images), "--captions", str(tmp_path / "bad.jsonl")],
                       "bad.jsonl:2"),
                      (["--images", str(images), "--shard_size", "0"], "shard_size")]:
    assert make_shards.main(args + ["--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and names in err, err
