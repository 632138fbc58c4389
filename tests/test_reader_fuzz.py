"""Hostile shards against the webdataset reader: malformed tar headers, truncation,
zero-byte shards, repeated keys, wrong-typed and non-finite metadata, decompression
bombs and data of which nothing is usable.

Each case runs under a deadline in a thread, so a reader that loops fails the case
instead of stalling the suite. Over two epochs every complete good sample must be
emitted exactly once per epoch and every bad one counted under its cause.
"""
import gzip
import io
import json
import tarfile
import threading

import numpy as np
import pytest
from PIL import Image

from ldm_jax import data
from ldm_jax.data import decode

DEADLINE_S = 3  # a case takes well under a second; only a hang comes near this
_END = bytes(1024)


def _png(w=24, h=20, seed=0) -> bytes:
  """Noise, or one colour for large images (a few hundred bytes, as a bomb is)."""
  if w * h > 10000:
    img = Image.new("RGB", (w, h), (seed, 80, 160))
  else:
    img = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8))
  buf = io.BytesIO()
  img.save(buf, format="PNG")
  return buf.getvalue()


def member(name: str, payload: bytes, kind=tarfile.REGTYPE, size=None) -> bytes:
  """One tar member: its header (GNU base-256 for a `size` past 11 octal digits),
  then the payload padded to 512 bytes."""
  info = tarfile.TarInfo(name)
  info.size, info.type = len(payload) if size is None else size, kind
  fmt = tarfile.GNU_FORMAT if info.size >= 8 ** 11 else tarfile.USTAR_FORMAT
  return info.tobuf(fmt) + payload + bytes(-len(payload) % 512)


def sample(key: str, caption="", meta=None, image=None) -> bytes:
  """A sample's members: key.png, key.txt (when `caption` is not None), key.json."""
  out = member(f"{key}.png", image if image is not None else _png(seed=len(key)))
  if caption is not None:
    out += member(f"{key}.txt", (caption or f"caption {key}").encode())
  return out + member(f"{key}.json", json.dumps(meta or {}).encode())


def with_field(header: bytes, start: int, end: int, value: bytes) -> bytes:
  """A header block with bytes [start, end) replaced and a valid checksum (so only
  the field itself is wrong)."""
  h = bytearray(header[:start] + value.ljust(end - start, b"\0") + header[end:512])
  h[148:156] = b" " * 8
  h[148:156] = b"%06o\0 " % sum(h)
  return bytes(h) + header[512:]


def run(cfg, n_good: int, epochs: int = 2) -> dict:
  """Reads `epochs` epochs of `n_good` samples plus one, one sample a batch, under the
  deadline. Returns {'caps': [...], 'stats': {...}} or {'error': exception}."""
  out = {}

  def work():
    try:
      it = data.make_iterator(cfg, batch_size=1)
      out["caps"] = [next(it)["caption"][0] for _ in range(epochs * n_good + 1)]
      out["stats"] = it.stats()
    except Exception as e:  # the case decides whether an error is the right answer
      out["error"], out["stats"] = e, it.stats() if "it" in locals() else {}

  t = threading.Thread(target=work, daemon=True)
  t.start()
  t.join(DEADLINE_S)
  assert not t.is_alive(), f"the reader did not finish within {DEADLINE_S} s"
  return out


def config(paths, **kw):
  c = data.default_config()
  c.source, c.shards, c.resolution, c.shuffle_buffer, c.workers = "wds", ",".join(paths), 16, 4, 2
  for k, v in kw.items():
    c[k] = v
  return c


def check(out: dict, good: list, per_epoch: dict, epochs: int = 2) -> None:
  """Each epoch delivers `good` exactly once; each cause is counted once per epoch
  (the read one sample into the next epoch may have counted some a third time)."""
  assert "error" not in out, repr(out.get("error"))
  caps, n = out["caps"], len(good)
  for e in range(epochs):
    assert sorted(caps[e * n:(e + 1) * n]) == sorted(good), f"epoch {e}"
  stats = {k: v for k, v in out["stats"].items() if k != "upscaled"}
  assert set(stats) == set(per_epoch), stats
  for kind, count in per_epoch.items():
    assert epochs * count <= stats[kind] <= (epochs + 1) * count, (kind, stats)


def caps(*keys):
  return [f"caption {k}" for k in keys]


# -- malformed tar headers: the shard is bad, the reader moves on --------------------
def _pax_case(length: bytes) -> bytes:
  record = b" path=p3\xc3\xa9.png\n"
  return member("PaxHeader", length + record, kind=tarfile.XHDTYPE) + member("p3.png", _png())


_GOOD_SHARD = sample("g0") + sample("g1") + _END


@pytest.mark.parametrize("name,broken", [
    ("pax record length 0", _pax_case(b"0")),
    ("pax record length negative", _pax_case(b"-5")),
    ("pax record length past its data", _pax_case(b"99999999999999999999")),
    ("pax record length shorter than its key", _pax_case(b"3")),
    ("size past the end of the file", with_field(member("p3.png", _png()), 124, 136, b"77777777777")),
    ("negative size", with_field(member("p3.png", _png()), 124, 136, b"-0000001000")),
    ("base-256 size of 2**80", member("p3.png", _png(), size=2 ** 80)),
    ("size field not a number", with_field(member("p3.png", _png()), 124, 136, b"0x10")),
])
def test_malformed_header_marks_the_shard_bad(tmp_path, name, broken):
  # p1 is complete only when the header after it names another key: where the bad
  # header's name is unreadable, p1 may lack members and is dropped.
  name_known = name.startswith(("size past", "base-256"))
  (tmp_path / "bad.tar").write_bytes(sample("p0") + sample("p1") + broken + sample("p4") + _END)
  (tmp_path / "good.tar").write_bytes(_GOOD_SHARD)
  out = run(config([str(tmp_path / "bad.tar"), str(tmp_path / "good.tar")]), 3 + name_known)
  check(out, caps("g0", "g1", "p0", *(["p1"] if name_known else [])), {"bad_shard": 1})


def test_garbage_and_zero_byte_shards_are_bad(tmp_path):
  (tmp_path / "zero.tar").write_bytes(b"")
  (tmp_path / "noise.tar").write_bytes(np.random.default_rng(0).bytes(3000))
  (tmp_path / "gz.tar").write_bytes(b"\x1f\x8b" + np.random.default_rng(1).bytes(3000))
  (tmp_path / "good.tar").write_bytes(_GOOD_SHARD)
  names = ["zero", "noise", "gz", "good", "missing"]
  out = run(config([str(tmp_path / f"{n}.tar") for n in names]), 2)
  check(out, caps("g0", "g1"), {"bad_shard": 3, "missing_shard": 1})


def test_truncation_keeps_every_complete_sample(tmp_path):
  raw = b"".join(sample(f"tr_{i:03d}") for i in range(10)) + _END
  png9 = raw.index(b"tr_009.png")  # its header; the data starts one block later
  (tmp_path / "cut_data.tar").write_bytes(raw[:png9 + 512 + 40])     # inside tr_009.png
  txt9 = raw.index(b"tr_009.txt")
  (tmp_path / "cut_member.tar").write_bytes(raw[:txt9 + 512 + 3])    # inside tr_009.txt
  (tmp_path / "cut_boundary.tar").write_bytes(raw[:txt9])  # no end blocks: tr_009 may be short
  (tmp_path / "cut_header.tar").write_bytes(raw[:png9 + 100])        # inside tr_009.png's header
  for cut in ("cut_data", "cut_member", "cut_boundary"):
    out = run(config([str(tmp_path / f"{cut}.tar")]), 9)
    check(out, caps(*(f"tr_{i:03d}" for i in range(9))), {"bad_shard": 1})
  out = run(config([str(tmp_path / "cut_header.tar")]), 8)  # tr_008 might have gone on
  check(out, caps(*(f"tr_{i:03d}" for i in range(8))), {"bad_shard": 1})
  gz = tmp_path / "cut.tar.gz"  # compressed shards go through tarfile: the same rule
  gz.write_bytes(gzip.compress(raw[:png9 + 512 + 40]))
  out = run(config([str(gz)]), 9)
  check(out, caps(*(f"tr_{i:03d}" for i in range(9))), {"bad_shard": 1})


def test_repeated_keys_are_emitted_once(tmp_path):
  raw = (sample("a") + sample("b") + sample("a", caption="again")
         + member("c.png", _png()) + member("c.txt", b"caption c") + member("c.png", _png(seed=9))
         + _END)
  (tmp_path / "dup.tar").write_bytes(raw)
  out = run(config([str(tmp_path / "dup.tar")]), 3)
  check(out, caps("a", "b", "c"), {"duplicate_key": 2})
  # with fewer shards than processes the shard's samples are split: still once each
  seen = []  # members 1, 3, 5 go to process 0 (a; the two repeats), 2, 4 to process 1 (b, c)
  for p, n in [(0, 1), (1, 2)]:
    it = data.make_iterator(config([str(tmp_path / "dup.tar")]), batch_size=1, process_index=p,
                            process_count=2)
    seen += [next(it)["caption"][0] for _ in range(n)]
  assert sorted(seen) == caps("a", "b", "c")


def test_bad_metadata_and_captions_skip_the_sample(tmp_path):
  raw = b"".join([
      sample("ok1", meta={"label": 3, "width": 24, "height": 20, "aesthetic": 6.0}),
      sample("ok2", meta={"label": "4", "aesthetic": 7}),       # decimal text is a label
      sample("inf", meta={"label": float("inf")}),              # json Infinity
      sample("big", meta={"label": 1e30}),
      sample("huge", meta={"label": 10 ** 30}),
      sample("half", meta={"label": 3.5}),
      sample("cat", meta={"label": "cat"}),
      sample("w", meta={"width": "wide", "aesthetic": 6}),       # read by min_size
      sample("aes", meta={"aesthetic": "high"}),                 # read by min_aesthetic
      sample("nan", meta={"aesthetic": float("nan")}),
      sample("low", meta={"aesthetic": 1.0}),                    # filtered, not bad
      sample("empty", caption=None, meta={"caption": ""}),       # json caption empty
      sample("blank", caption="  \n"),                           # .txt of whitespace
      sample("nocap", caption=None),
      sample("numcap", caption=None, meta={"caption": 42}),
      # unreadable json: counted, read as no metadata, so it has no aesthetic score
      member("js.png", _png()) + member("js.txt", b"caption js") + member("js.json", b"[1, 2"),
  ]) + _END
  (tmp_path / "meta.tar").write_bytes(raw)
  out = run(config([str(tmp_path / "meta.tar")], min_size=8, min_aesthetic=5.0), 2)
  check(out, caps("ok1", "ok2"), {
      "bad_label": 5, "bad_metadata": 3, "filtered": 2, "bad_json": 1,
      "empty_caption": 2, "no_caption": 1, "bad_caption": 1})


def test_image_caps_skip_bombs_before_decoding(tmp_path):
  # A 1 x 200000 PNG is a few hundred bytes; resizing all of it to the training
  # resolution once cost seconds and a GB. Over the side cap it is skipped unread;
  # a thin image under the caps is resampled only where it is cropped.
  raw = b"".join([
      sample("thin", image=_png(1, 200000)),
      sample("square", image=_png(1200, 1200)),   # over max_image_pixels below
      sample("narrow", image=_png(1, 3000)),       # within the caps: kept
      sample("ok")]) + _END
  (tmp_path / "bomb.tar").write_bytes(raw)
  out = run(config([str(tmp_path / "bomb.tar")], resolution=64, max_image_pixels=1_000_000), 2)
  check(out, caps("narrow", "ok"), {"image_too_large": 2})


def test_a_negative_cap_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match="config.data.max_image_side"):
    data.make_iterator(config([str(tmp_path / "x.tar")], max_image_side=-1), batch_size=1)


def test_any_decoding_failure_is_counted_by_its_type(tmp_path, monkeypatch):
  real = decode.decode_sample

  def flaky(smp, *a, **kw):
    if smp["__key__"] == "boom":
      raise RuntimeError("a decoder bug")
    return real(smp, *a, **kw)

  monkeypatch.setattr(decode, "decode_sample", flaky)
  (tmp_path / "s.tar").write_bytes(sample("boom") + sample("ok") + _END)
  check(run(config([str(tmp_path / "s.tar")]), 1), caps("ok"), {"error_RuntimeError": 1})


@pytest.mark.parametrize("why", ["no caption", "all filtered", "all bombs"])
def test_data_with_no_usable_sample_is_an_error(tmp_path, why):
  kw, make = {}, lambda i: sample(f"s{i}", caption=None)
  if why == "all filtered":
    kw, make = {"min_aesthetic": 5.0}, lambda i: sample(f"s{i}", meta={"aesthetic": 1})
  elif why == "all bombs":
    make = lambda i: sample(f"s{i}", image=_png(1, 20000))
    kw = {"max_image_side": 4096}
  for s in range(2):
    (tmp_path / f"d{s}.tar").write_bytes(b"".join(make(s * 5 + i) for i in range(5)) + _END)
  out = run(config([str(tmp_path / "d0.tar"), str(tmp_path / "d1.tar")], **kw), 1)
  assert isinstance(out.get("error"), ValueError), out
  assert "no usable sample" in str(out["error"]) and "d0.tar" in str(out["error"])
  assert sum(out["stats"].values()) >= 10  # the whole pass was counted before giving up


def test_class_conditional_data_skips_unusable_labels(tmp_path):
  """With data.num_classes (class-conditional runs) one sample without a label, or
  with one past the classes, is skipped and counted instead of failing the step."""
  raw = b"".join([
      sample("l0", meta={"label": 0}), sample("l2", meta={"label": "2"}),
      sample("none"), sample("neg", meta={"label": -1}), sample("past", meta={"label": 3}),
  ]) + _END
  (tmp_path / "cls.tar").write_bytes(raw)
  out = run(config([str(tmp_path / "cls.tar")], num_classes=3), 2)
  check(out, caps("l0", "l2"), {"no_label": 1, "bad_label": 2})
  out = run(config([str(tmp_path / "cls.tar")]), 5)  # labels optional: all five, -1 for none
  check(out, caps("l0", "l2", "none", "neg", "past"), {})
