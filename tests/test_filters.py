"""The LAION-style filters (config.data.min_size, max_aspect_ratio, min_caption_words,
min_aesthetic, max_punsafe, max_pwatermark) through the real webdataset pipeline: exactly the samples that fail
one are skipped, and counted."""
import json

from PIL import Image

from ldm_jax import data
from tests.test_data import _png, cfg, write_tar

SAMPLES = {  # caption -> json metadata; the images themselves are all 20x20
    "kept": dict(width=512, height=384, punsafe=0.1, pwatermark=0.2, aesthetic=6.0),
    "kept, LAION's original size keys": dict(original_width=300, original_height=260,
                                             aesthetic=5.5),
    "small": dict(width=512, height=200, aesthetic=6.0),
    "wide panorama": dict(width=1600, height=400, aesthetic=6.0),
    "nsfw": dict(width=512, height=512, punsafe=0.9, aesthetic=6.0),
    "watermarked": dict(width=512, height=512, pwatermark=0.7, aesthetic=6.0),
    "plain": dict(width=512, height=512, aesthetic=4.0),
    "unscored": dict(width=512, height=512),
    "no metadata": None,
}


def _shard(tmp_path):
  members = []
  for i, (caption, meta) in enumerate(SAMPLES.items()):
    members += [(f"{i:03d}.png", _png(Image.new("RGB", (20, 20), (i * 30, 0, 0)))),
                (f"{i:03d}.txt", caption.encode())]
    if meta is not None:
      members.append((f"{i:03d}.json", json.dumps(meta).encode()))
  write_tar(tmp_path / "laion.tar", members)
  return str(tmp_path / "laion.tar")


def _epoch(c):
  it = data.make_iterator(c, batch_size=1)
  return {next(it)["caption"][0] for _ in range(20)}, it.stats()


def test_laion_filters(tmp_path):
  shard = _shard(tmp_path)
  everything, stats = _epoch(cfg(source="wds", shards=shard, shuffle_buffer=100))
  assert everything == set(SAMPLES) and "filtered" not in stats
  c = cfg(source="wds", shards=shard, shuffle_buffer=100, min_size=256, min_aesthetic=5.0,
          max_punsafe=0.5, max_pwatermark=0.5, max_aspect_ratio=3.0)
  kept, stats = _epoch(c)
  assert kept == {"kept", "kept, LAION's original size keys"}
  assert stats["filtered"] >= 7  # 20 draws span 2 epochs of 9 samples
  # each filter alone drops its own samples
  for field, value, dropped in [("min_size", 256, {"small", "no metadata"}),  # the latter by its pixels
                                ("max_aspect_ratio", 3.0, {"wide panorama"}),
                                ("min_caption_words", 2, {"kept", "small", "nsfw", "watermarked",
                                                          "plain", "unscored"}),
                                ("max_punsafe", 0.5, {"nsfw"}),
                                ("max_pwatermark", 0.5, {"watermarked"}),
                                ("min_aesthetic", 5.0, {"plain", "unscored", "no metadata"})]:
    got, _ = _epoch(cfg(source="wds", shards=shard, shuffle_buffer=100, **{field: value}))
    assert got == set(SAMPLES) - dropped, field
