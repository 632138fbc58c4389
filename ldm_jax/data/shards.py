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


_BLOCK = 512
_END = bytes(_BLOCK)
_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ")  # gzip, bzip2, xz: read through tarfile


def _number(field: bytes) -> int:
  """A header number: octal text, or GNU base-256 (first byte 0x80) for large sizes."""
  if field[:1] == b"\x80":
    return int.from_bytes(field[1:], "big")
  text = field.split(b"\0", 1)[0].strip()
  return int(text, 8) if text else 0


def _read(f, n: int) -> bytes:
  """n bytes (fewer only at the end of the stream), over short reads of remote files."""
  out = f.read(n)
  while len(out) < n:
    more = f.read(n - len(out))
    if not more:
      break
    out += more
  return out


def _pax_path(records: bytes):
  """The 'path' of a pax extended header ('%d path=...\\n' records), or None."""
  i, path = 0, None
  while i < len(records):
    space = records.index(b" ", i)
    length = int(records[i:space])
    key, _, value = records[space + 1:i + length - 1].partition(b"=")
    if key == b"path":
      path = value
    i += length
  return path


def _tar_files(f, head: bytes) -> Iterator[tuple]:
  """(name, data) of each regular file of an uncompressed tar stream whose first
  512 bytes, already read, are `head`.

  Reads the headers directly (ustar, GNU long names, pax paths): on shards of many
  small members (a latent cache holds four per sample, some 100 bytes each) Python's
  tarfile spent most of the reading time building its member objects. Raises
  tarfile.ReadError on a bad header checksum or a truncated member.
  """
  long_name = None
  header = head
  while header:
    if len(header) < _BLOCK:
      raise tarfile.ReadError("truncated tar header")
    if header == _END:
      return
    stored, unsigned = _number(header[148:156]), sum(header[:148]) + 256 + sum(header[156:])
    if stored != unsigned and stored != unsigned - 256 * sum(  # old tars summed signed bytes
        1 for byte in header[:148] + header[156:] if byte > 127):
      raise tarfile.ReadError("bad tar header checksum")
    size, kind = _number(header[124:136]), header[156:157]
    data = _read(f, size)
    if len(data) < size:
      raise tarfile.ReadError("truncated tar member")
    if size % _BLOCK and len(_read(f, _BLOCK - size % _BLOCK)) < _BLOCK - size % _BLOCK:
      raise tarfile.ReadError("truncated tar member")
    if kind == b"L":                     # GNU: the next member's long name
      long_name = data.split(b"\0", 1)[0]
    elif kind == b"x":                   # pax: the next member's attributes
      long_name = _pax_path(data) or long_name
    elif kind in (b"0", b"\0", b"7"):    # a regular file
      name = long_name
      if name is None:
        name = header[:100].split(b"\0", 1)[0]
        prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
        if prefix:
          name = prefix + b"/" + name
      long_name = None
      yield name.decode("utf-8", "surrogateescape"), data
    elif kind != b"g":                   # directories, links, devices: skipped
      long_name = None
    header = _read(f, _BLOCK)
  if long_name is not None:
    raise tarfile.ReadError("tar ends after a long-name header")


class _Prefixed:
  """A read-only stream: `head`, then the rest of `f` (to hand tarfile a stream
  whose first bytes were already read)."""

  def __init__(self, head: bytes, f):
    self.head, self.f = head, f

  def read(self, n: int = -1) -> bytes:
    if not self.head:
      return self.f.read(n)
    if n < 0:
      out, self.head = self.head + self.f.read(), b""
      return out
    out, self.head = self.head[:n], self.head[n:]
    return out + (self.f.read(n - len(out)) if len(out) < n else b"")


def tarfile_files(f) -> Iterator[tuple]:
  """(name, data) of each regular file, through Python's tarfile (any compression)."""
  with tarfile.open(fileobj=f, mode="r|*") as tar:
    for member in tar:
      if member.isfile():
        yield member.name, tar.extractfile(member).read()


def _files(f) -> Iterator[tuple]:
  head = _read(f, _BLOCK)
  if head.startswith(_COMPRESSED):
    yield from tarfile_files(_Prefixed(head, f))
  else:
    yield from _tar_files(f, head)


def group(files: Iterator[tuple], url: str) -> Iterator[dict]:
  """Samples from (name, data) pairs in tar order: consecutive members sharing a key."""
  current, key = None, None
  for name, data in files:
    k, ext = _key_and_ext(name)
    if k != key:
      if current is not None:
        yield current
      current, key = {"__key__": k, "__url__": url}, k
    current[ext] = data
  if current is not None:
    yield current


def iter_samples(url: str) -> Iterator[dict]:
  """Yields the grouped samples of one tar shard (plain, or gzip / bzip2 / xz
  compressed), in tar order.

  Raises whatever opening or reading raises (missing shard, truncated tar); the
  caller counts and skips. Samples read before an error have been yielded.
  """
  with fsspec.open(url, "rb") as f:
    yield from group(_files(f), url)
