"""The data pipeline: shapes shards stream, resume is exact, every good sample is
delivered once per epoch across processes, and bad input is skipped and counted."""
import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from ldm_jax import data
from ldm_jax.data import decode, latents, make_shapes, shards, shapes


def cfg(**kw):
  c = data.default_config()
  c.resolution = 16
  c.shuffle_buffer = 7
  c.workers = 2
  for k, v in kw.items():
    c[k] = v
  return c


def _png(img: Image.Image, fmt="PNG") -> bytes:
  buf = io.BytesIO()
  img.save(buf, format=fmt)
  return buf.getvalue()


def write_tar(path, members):
  with tarfile.open(path, "w") as tar:
    for name, payload in members:
      info = tarfile.TarInfo(name)
      info.size = len(payload)
      tar.addfile(info, io.BytesIO(payload))


def good_members(start, n, size=20):
  """n samples keyed by index: a noise image (so any crop or flip shows), a caption
  and a json label."""
  out = []
  for i in range(start, start + n):
    img = Image.fromarray(np.random.default_rng(i).integers(0, 256, (size, size + 4, 3), np.uint8))
    out += [(f"{i:05d}.png", _png(img)), (f"{i:05d}.txt", f"caption {i}".encode()),
            (f"{i:05d}.json", json.dumps({"label": i}).encode())]
  return out


def test_brace_expansion():
  assert shards.expand_braces("a-{00..02}.tar,b.tar") == ["a-00.tar", "a-01.tar", "a-02.tar", "b.tar"]
  assert len(shards.expand_braces("x{0..1}-{0..2}")) == 6


def test_tar_reader_matches_tarfile(tmp_path):
  # The shard reader parses tar headers itself; it must list the same files as
  # Python's tarfile for every format that writes them, and for compressed shards.
  long_dir = "d" * 120
  members = [("00001.npy", b"\x93NUMPY" + bytes(300)), ("00001.txt", b""),  # empty member
             (f"{long_dir}/00002.txt", b"long name"), ("00003.caf\u00e9.txt", b"non-ascii"),
             ("00004.json", b"{}" * 700)]
  for fmt, suffix, mode in [(tarfile.USTAR_FORMAT, ".tar", "w"), (tarfile.GNU_FORMAT, ".tar", "w"),
                            (tarfile.PAX_FORMAT, ".tar", "w"), (tarfile.PAX_FORMAT, ".tar.gz", "w:gz")]:
    if fmt == tarfile.USTAR_FORMAT:  # ustar splits a long path into prefix + name; no non-ASCII
      use = [m for m in members if "caf" not in m[0]]
    else:
      use = members
    path = tmp_path / f"f{fmt}{suffix}"
    with tarfile.open(path, mode, format=fmt) as tar:
      info = tarfile.TarInfo("subdir")
      info.type = tarfile.DIRTYPE
      tar.addfile(info)
      for name, payload in use:
        info = tarfile.TarInfo(name)
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    with tarfile.open(path) as tar:
      want = [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]
    with open(path, "rb") as f:
      got = list(shards._files(f))
    assert got == want == use, fmt
  raw = (tmp_path / f"f{tarfile.PAX_FORMAT}.tar").read_bytes()
  bad = bytearray(raw)
  bad[512] ^= 1  # the first file header's name: its checksum no longer matches
  after_pax = raw.index(b"00003.caf?.txt")  # the header that a pax header announced
  for broken in (raw[:after_pax], raw[:len(raw) // 2 + 100], raw[:700], bytes(bad)):
    with pytest.raises(tarfile.ReadError):
      list(shards._files(io.BytesIO(broken)))


def test_shapes_shards_stream(tmp_path):
  pattern = make_shapes.write_shards(str(tmp_path), 30, 32, shard_size=10)
  it = data.make_iterator(cfg(source="wds", shards=pattern, resolution=32), batch_size=8)
  b = next(it)
  assert b["image"].shape == (8, 32, 32, 3) and b["image"].dtype == np.float32
  assert -1 <= b["image"].min() and b["image"].max() <= 1
  for c, lab in zip(b["caption"], b["label"]):
    assert shapes.parse_caption(c).label == lab
  # deterministic by seed
  it2 = data.make_iterator(cfg(source="wds", shards=pattern, resolution=32), batch_size=8)
  np.testing.assert_array_equal(next(it2)["image"], b["image"])


def test_layout_maps_get_the_image_crop_and_flip(tmp_path):
  # shapes shards carry key.seg.png: the shape's region in its kind's colour
  pattern = make_shapes.write_shards(str(tmp_path / "s"), 8, 32, shard_size=8)
  b = next(data.make_iterator(cfg(source="wds", shards=pattern, resolution=32,
                                  layout_ext="seg.png", shuffle_buffer=1), batch_size=8))
  for i in range(8):
    want = shapes.layout_map(shapes.sample_attrs(0, i, "train"), 32)
    np.testing.assert_allclose(b["layout"][i], want / 127.5 - 1.0, atol=1e-6)
  # a wide image and its map, randomly cropped and flipped: the same geometry for both
  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, (16, 40, 3), np.uint8)
  seg = (img // 128 * 255).astype(np.uint8)  # only 0 / 255 values
  write_tar(str(tmp_path / "w.tar"), [("a.png", _png(Image.fromarray(img))),
                                      ("a.seg.png", _png(Image.fromarray(seg))),
                                      ("a.txt", b"x"), ("b.png", _png(Image.fromarray(img))),
                                      ("b.txt", b"no map")])
  it = data.make_iterator(cfg(source="wds", shards=str(tmp_path / "w.tar"), resolution=16,
                              crop="random", flip=True, layout_ext="seg.png"), batch_size=1)
  b = next(it)
  got_img = np.round((b["image"][0] + 1) * 127.5).astype(np.uint8)
  np.testing.assert_array_equal((got_img // 128 * 255), np.round((b["layout"][0] + 1) * 127.5))
  next(it)  # past 'b' in any order
  assert it.stats()["no_layout"] >= 1  # 'b' has no map: skipped and counted


def test_crop_resamples_like_resizing_the_whole_image():
  # apply_geometry resamples only the crop (PIL's resize box); it must equal resizing
  # the whole image and cropping, up to the rounding of the intermediate pass.
  rng = np.random.default_rng(0)
  compared = 0
  for t in range(40):
    w, h = (int(v) for v in rng.integers(3, 90, 2))
    res = int(rng.integers(4, 40))
    yy, xx = np.mgrid[0:h, 0:w]
    a = 127 + 60 * np.sin(xx / 5 + t) + 60 * np.cos(yy / 7)
    img = Image.fromarray(np.stack([a, a[::-1], a[:, ::-1]], -1).astype(np.uint8))
    geometry = decode.crop_geometry(img.size, res, "random", True, rng)
    nw, nh, x0, y0, flipped = geometry
    for nearest in (False, True):
      f = Image.NEAREST if nearest else (Image.BICUBIC if nw > w else Image.LANCZOS)
      want = np.asarray(img.resize((nw, nh), f).crop((x0, y0, x0 + res, y0 + res))).astype(int)
      want = want[:, ::-1] if flipped else want
      got = decode.apply_geometry(img, geometry, res, nearest).astype(int)
      if not nearest:
        assert np.abs(got - want).max() <= 1
        continue
      # the same source pixel, except where a centre lies within PIL's fixed-point
      # error of a pixel edge
      u = (np.arange(x0, x0 + res) + 0.5) * w / nw
      v = (np.arange(y0, y0 + res) + 0.5) * h / nh
      clear = lambda c: np.abs(c - np.round(c)) > 0.02
      keep = clear(v)[:, None] & (clear(u)[::-1] if flipped else clear(u))[None, :]
      np.testing.assert_array_equal(got[keep], want[keep])
      compared += keep.sum()
  assert compared > 40 * 10 * 10


def test_make_shapes_cli(tmp_path):
  out = subprocess.run([sys.executable, "-m", "ldm_jax.data.make_shapes", "--out", str(tmp_path),
                        "--num", "5", "--resolution", "32"], capture_output=True, text=True)
  assert out.returncode == 0, out.stderr
  with tarfile.open(tmp_path / "shapes-00000.tar") as t:
    assert sorted(m.name for m in t)[:4] == ["00000000.json", "00000000.png", "00000000.seg.png",
                                             "00000000.txt"]


def test_resume_is_exact(tmp_path):
  # With random crops and flips on, the resumed stream repeats the images too.
  for s in range(3):
    write_tar(tmp_path / f"d-{s}.tar", good_members(s * 10, 10))
  c = cfg(source="wds", shards=str(tmp_path / "d-{0..2}.tar"), crop="random", flip=True)
  ref = data.make_iterator(c, batch_size=4, seed=3)
  stream = [next(ref) for _ in range(20)]  # crosses epochs
  it = data.make_iterator(c, batch_size=4, seed=3)
  for _ in range(5):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  assert state["emitted"] not in (0, c.shuffle_buffer)  # mid-block
  resumed = data.make_iterator(c, batch_size=4, seed=3)
  resumed.set_state(state)
  for want in stream[5:]:
    got = next(resumed)
    assert got["caption"].tolist() == want["caption"].tolist()
    np.testing.assert_array_equal(got["image"], want["image"])
  # the same image in two epochs: another crop / flip (the epoch is in the draw)
  first = {c_: im for b in stream[:7] for c_, im in zip(b["caption"], b["image"])}
  later = {c_: im for b in stream[8:15] for c_, im in zip(b["caption"], b["image"])}
  assert any(not np.array_equal(first[k], later[k]) for k in set(first) & set(later))


_STREAM = """
import hashlib, json, sys
from ldm_jax import data
c = data.default_config()
c.source, c.shards, c.resolution, c.shuffle_buffer, c.workers = "wds", sys.argv[1], 16, 7, 2
c.crop, c.flip = "random", True
def digest(b):
  return hashlib.sha256(b["image"].tobytes()).hexdigest() + repr(b["caption"].tolist())
fresh = data.make_iterator(c, batch_size=4, seed=5)
out = {"fresh": [digest(next(fresh)) for _ in range(3)]}
fresh = data.make_iterator(c, batch_size=4, seed=5)
next(fresh)
out["state"] = fresh.get_state()
if len(sys.argv) > 2:
  resumed = data.make_iterator(c, batch_size=4, seed=5)
  resumed.set_state(json.loads(sys.argv[2]))
  out["resumed"] = [digest(next(resumed)) for _ in range(2)]
print(json.dumps(out))
"""


def test_augmentation_is_the_same_in_every_interpreter(tmp_path):
  # Two fresh processes with different string hashing read the same first batches
  # (random crop and flip on), and one resumes the other's saved position exactly.
  for s in range(2):
    write_tar(tmp_path / f"d-{s}.tar", good_members(s * 6, 6))
  pattern = str(tmp_path / "d-{0..1}.tar")

  def run(hash_seed, *args):
    env = dict(os.environ, PYTHONHASHSEED=str(hash_seed))
    out = subprocess.run([sys.executable, "-c", _STREAM, pattern, *args], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)

  a = run(1)
  b = run(2, json.dumps(a["state"]))
  assert b["fresh"] == a["fresh"]
  assert b["resumed"] == a["fresh"][1:]


def test_key_hash_is_stable():
  from ldm_jax.data.pipeline import key_hash
  assert key_hash("000000001") == key_hash("000000001") != key_hash("000000002")
  assert 0 <= key_hash("caf\udce9") < 2 ** 64  # undecodable bytes of a tar name


@pytest.mark.parametrize("n_shards", [4, 1])
def test_two_processes_deliver_every_sample_once(tmp_path, n_shards):
  per = 24 // n_shards
  for s in range(n_shards):
    write_tar(tmp_path / f"d-{s}.tar", good_members(s * per, per))
  c = cfg(source="wds", shards=str(tmp_path / f"d-{{0..{n_shards - 1}}}.tar"))
  seen = []
  for p in range(2):
    it = data.make_iterator(c, batch_size=4, process_index=p, process_count=2, seed=1)
    for _ in range(3):  # 12 samples per process = one epoch
      seen += next(it)["caption"].tolist()
  assert sorted(seen) == sorted(f"caption {i}" for i in range(24))


def test_bad_input_is_skipped_and_counted(tmp_path, caplog):
  good = good_members(0, 6)
  rgba = Image.new("RGBA", (20, 20), (255, 0, 0, 0))
  i16 = Image.fromarray(np.full((20, 20), 40000, np.uint16))
  members = good + [
      ("g.png", _png(Image.new("L", (20, 20), 128))), ("g.txt", b"grey"),
      ("c.jpg", _png(Image.new("CMYK", (20, 20), (0, 255, 0, 0)), "JPEG")), ("c.txt", b"cmyk"),
      ("p.png", _png(Image.new("P", (20, 20), 3))), ("p.txt", b"palette"),
      ("a.png", _png(rgba)), ("a.txt", b"alpha"),
      ("i.png", _png(i16)), ("i.txt", b"sixteen"),
      ("s.png", _png(Image.new("RGB", (4, 6)))), ("s.txt", b"small"),
      ("u.png", _png(Image.new("RGB", (20, 20)))), ("u.txt", b"caf\xe9 latin-1"),
      ("z.png", b""), ("z.txt", b"zero bytes"),
      ("x.png", b"not an image at all"), ("x.txt", b"corrupt"),
      ("n.png", _png(Image.new("RGB", (20, 20)))),           # no caption
      ("t.txt", b"caption without an image"),
  ]
  write_tar(tmp_path / "mixed.tar", members)
  write_tar(tmp_path / "trunc_src.tar", good_members(100, 3))
  raw = (tmp_path / "trunc_src.tar").read_bytes()
  (tmp_path / "trunc.tar").write_bytes(raw[:len(raw) // 2])
  c = cfg(source="wds", shuffle_buffer=100,
          shards=",".join([str(tmp_path / "mixed.tar"), str(tmp_path / "trunc.tar"),
                           str(tmp_path / "missing.tar")]))
  it = data.make_iterator(c, batch_size=1)
  caps = [next(it)["caption"][0] for _ in range(20)]  # more than one epoch
  st = it.stats()
  # 20 deliveries span more than one epoch: each problem is counted at least once
  assert st["corrupt_image"] >= 2 and st["no_caption"] >= 1 and st["no_image"] >= 1
  assert st["bad_shard"] >= 1 and st["missing_shard"] >= 1
  assert st["upscaled"] >= 1 and st["caption_not_utf8"] >= 1
  for c_ in ("grey", "cmyk", "palette", "alpha", "sixteen", "small"):
    assert c_ in caps
  assert any(c_.startswith("caf") for c_ in caps)
  warnings = [r.message for r in caplog.records if "this is the only warning" in r.getMessage()]
  assert len(warnings) == len({r.getMessage().split(" (")[0] for r in caplog.records
                               if "this is the only warning" in r.getMessage()})


def test_all_shards_bad_is_a_clear_error(tmp_path):
  it = data.make_iterator(cfg(source="wds", shards=str(tmp_path / "none-{0..1}.tar")), batch_size=2)
  with pytest.raises(ValueError, match="no readable sample"):
    next(it)


def test_latent_cache_round_trip(tmp_path):
  pattern = make_shapes.write_shards(str(tmp_path / "img"), 12, 32, shard_size=12)
  src = data.make_iterator(cfg(source="wds", shards=pattern, resolution=32, shuffle_buffer=1),
                           batch_size=4)
  pool = lambda x: x.reshape(x.shape[0], 8, 4, 8, 4, 3).mean((2, 4))
  out = latents.write_latent_shards(src, pool, str(tmp_path / "lat"), num_batches=3, shard_size=5)
  it = data.make_iterator(cfg(source="latents", shards=out, shuffle_buffer=1), batch_size=4)
  got = [next(it) for _ in range(3)]
  ref = data.make_iterator(cfg(source="wds", shards=pattern, resolution=32, shuffle_buffer=1),
                           batch_size=12)
  first = next(ref)
  expected = dict(zip(first["caption"], pool(first["image"])))
  assert len(expected) == 12
  for b in got:
    for cap, z in zip(b["caption"], b["latent"]):
      np.testing.assert_allclose(z, expected[cap], atol=2e-3)


def test_tfds_adapter_on_an_in_memory_source():
  from ldm_jax.data.tfds import TFDSIterator
  rng = np.random.default_rng(0)
  source = [{"image": rng.integers(0, 255, (24, 20, 3), np.uint8), "label": i} for i in range(10)]
  c = cfg()
  c.tfds.label_key = "label"
  a = TFDSIterator(c, batch_size=5, process_index=0, process_count=2, source=source)
  b = TFDSIterator(c, batch_size=5, process_index=1, process_count=2, source=source)
  labels = sorted(next(a)["label"].tolist() + next(b)["label"].tolist())
  assert labels == list(range(10))
  assert next(a)["image"].shape == (5, 16, 16, 3)


def test_tfds_source_through_make_iterator(monkeypatch):
  """config.data.source='tfds' through `make_iterator`, with an in-memory stand-in for
  `tensorflow_datasets.data_source` (the package is optional): the config's name,
  split and data_dir reach it, and every record comes back decoded once an epoch."""
  import types
  rng = np.random.default_rng(0)
  records = [{"image": _png(Image.fromarray(rng.integers(0, 255, (24, 20, 3), np.uint8)))
              if i % 2 else rng.integers(0, 255, (20, 24, 3), np.uint8),
              "label": i, "caption": f"record {i}".encode()} for i in range(6)]
  calls = []
  fake = types.ModuleType("tensorflow_datasets")
  fake.data_source = lambda name, split, data_dir: calls.append((name, split, data_dir)) or records
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
  c = cfg(source="tfds")
  c.tfds.update(name="my_set", split="train[:6]", caption_key="caption", label_key="label")
  it = data.make_iterator(c, batch_size=3, seed=4)
  assert calls == [("my_set", "train[:6]", None)]
  batches = [next(it) for _ in range(2)]
  labels = np.concatenate([b["label"] for b in batches])
  assert sorted(labels.tolist()) == list(range(6))
  for b in batches:
    assert b["image"].shape == (3, 16, 16, 3) and b["image"].dtype == np.float32
    assert b["caption"].tolist() == [f"record {i}" for i in b["label"]]
    for img, i in zip(b["image"], b["label"]):  # the record's pixels, resized and centre-cropped
      src = records[i]["image"]
      src = Image.open(io.BytesIO(src)) if isinstance(src, bytes) else Image.fromarray(src)
      want, _ = decode.resize_crop(src.convert("RGB"), 16, "center", False, None)
      np.testing.assert_allclose(img, want.astype(np.float32) / 127.5 - 1, atol=1e-6)
  st = it.get_state()
  again = data.make_iterator(c, batch_size=3, seed=4)
  again.set_state(st)
  np.testing.assert_array_equal(next(again)["label"], next(it)["label"])
  c.tfds.name = ""
  with pytest.raises(ValueError, match="tfds.name"):
    data.make_iterator(c, batch_size=3)
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # not installed
  with pytest.raises(ValueError, match="tfds extra"):
    data.make_iterator(cfg(source="tfds"), batch_size=3)


def test_shapes_captions_round_trip_and_classifier_reads_renders():
  for i in range(40):
    img, cap, meta = shapes.example(3, i, 32)
    a = shapes.parse_caption(cap)
    assert (a.kind, a.colour, a.size, a.position, a.background) == tuple(
        meta[k] for k in ("kind", "colour", "size", "position", "background"))
    got = shapes.classify_image(img)
    assert (got.kind, got.colour, got.size, got.position, got.background) == (
        a.kind, a.colour, a.size, a.position, a.background), cap
  assert shapes.sample_attrs(1, 5) == shapes.sample_attrs(1, 5)  # deterministic
  held = [shapes.sample_attrs(0, i, "heldout") for i in range(20)]
  assert all(shapes.split_of(a) == "heldout" for a in held)
  with pytest.raises(ValueError, match="not a shapes caption"):
    shapes.parse_caption("a photo of a cat")


def test_load_npy_matches_np_load_and_never_unpickles():
  # load_npy parses each distinct header once and reads the data with frombuffer;
  # it must read what np.load reads (orders, byte orders, header versions) and
  # refuse what np.load would refuse.
  def npy(a, version=None, allow_pickle=False):
    buf = io.BytesIO()
    np.lib.format.write_array(buf, a, version=version, allow_pickle=allow_pickle)
    return buf.getvalue()

  rng = np.random.default_rng(0)
  arrays = [rng.normal(size=(8, 8, 3)).astype(np.float16), np.asfortranarray(rng.normal(size=(4, 5))),
            np.float64(2.5) * np.ones(()), np.arange(7, dtype=">i4")]
  for a in arrays:
    for version in (None, (2, 0)):
      for _ in range(2):  # the second read takes the parsed header
        got = decode.load_npy(npy(a, version))
        assert got.dtype == np.float32 and got.shape == a.shape
        np.testing.assert_array_equal(got, np.load(io.BytesIO(npy(a, version))).astype(np.float32))
  pickled = npy(np.array([{"a": 1}], dtype=object), allow_pickle=True)
  for bad in (pickled, npy(arrays[0])[:-8], b"\x93NUMPY", b"junk", b""):
    with pytest.raises(ValueError):
      decode.load_npy(bad)
