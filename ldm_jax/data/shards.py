"""Webdataset shards: names from brace patterns / globs on any fsspec filesystem,
and the samples of one tar file grouped by key.

A sample is the group of tar members that share a key (the member's path up to
the first dot of its basename, as webdataset does): `000123.jpg`, `000123.txt`,
`000123.json` -> {'__key__': '000123', 'jpg': b'...', 'txt': b'...', 'json': b'...'}.
"""
import glob as globlib
import itertools
import re
import tarfile
from typing import Iterator

import fsspec

_BRACE = re.compile(r"\{(\d+)\.\.(\d+)\}")


def expand_braces(pattern: str) -> list[str]:
  """'data-{000..002}.tar' -> ['data-000.tar', 'data-001.tar', 'data-002.tar'] (zero
  padding kept; several ranges multiply). Comma-separated patterns are concatenated."""
  out = []
  for part in pattern.split(","):
    part = part.strip()
    if not part:
      continue
    ranges = _BRACE.findall(part)
    if not ranges:
      out.append(part)
      continue
    pieces = _BRACE.split(part)  # text, lo, hi, text, lo, hi, text ...
    choices = []
    for lo, hi in ranges:
      width = len(lo)
      choices.append([str(i).zfill(width) for i in range(int(lo), int(hi) + 1)])
    texts = pieces[0::3]
    for combo in itertools.product(*choices):
      s = texts[0]
      for value, text in zip(combo, texts[1:]):
        s += value + text
      out.append(s)
  return out


def list_shards(pattern: str) -> list[str]:
  """Shard URLs of a brace pattern, a glob, or a comma list; local or fsspec URLs.

  Globs are resolved (sorted); brace-expanded names are kept even when missing, so
  a missing shard is reported (and skipped) when it is read.
  """
  names = []
  for name in expand_braces(pattern):
    if any(ch in name for ch in "*?["):
      if "://" in name:
        fs, _, paths = fsspec.get_fs_token_paths(name)
        proto = name.split("://")[0]
        names += sorted(f"{proto}://{p}" for p in fs.glob(paths[0]))
      else:
        names += sorted(globlib.glob(name))
    else:
      names.append(name)
  return names


def _key_and_ext(name: str) -> tuple[str, str]:
  slash = name.rfind("/")
  dot = name.find(".", slash + 1)
  if dot < 0:
    return name, ""
  return name[:dot], name[dot + 1:].lower()


def iter_samples(url: str) -> Iterator[dict]:
  """Yields the grouped samples of one tar shard, in tar order.

  Raises whatever opening or reading raises (missing shard, truncated tar); the
  caller counts and skips. Samples read before an error have been yielded.
  """
  with fsspec.open(url, "rb") as f:
    with tarfile.open(fileobj=f, mode="r|*") as tar:
      current, key = None, None
      for member in tar:
        if not member.isfile():
          continue
        k, ext = _key_and_ext(member.name)
        data = tar.extractfile(member).read()
        if k != key:
          if current is not None:
            yield current
          current, key = {"__key__": k, "__url__": url}, k
        current[ext] = data
      if current is not None:
        yield current
