"""Webdataset shards: names from brace patterns / globs on any fsspec filesystem,
the samples of one tar file grouped by key, and the one way members are written.

A sample is the group of tar members that share a key (the member's path up to
the first dot of its basename, as webdataset does): `000123.jpg`, `000123.txt`,
`000123.json` -> {'__key__': '000123', 'jpg': b'...', 'txt': b'...', 'json': b'...'}.

Shards are untrusted input: every length read from a header is bounded, a
malformed or truncated shard raises `ShardError` (the reader counts the shard as
bad and goes on), and no header can make the reader loop.
"""
import glob as globlib
import io
import itertools
import lzma
import re
import tarfile
import zlib
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
_CHUNK = 1 << 24  # read a member in pieces, so a bogus header size costs no more memory than the file
_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ")  # gzip, bzip2, xz: read through tarfile
_PAX_RECORD = re.compile(rb"(\d{1,20}) ([^=\0]+)=")


class ShardError(tarfile.ReadError):
  """A malformed or truncated shard. `member` names the file whose data could not
  be read (None when a header itself was bad): a sample of another key read before
  it is complete."""

  def __init__(self, message: str, member=None):
    super().__init__(message)
    self.member = member


def _number(field: bytes) -> int:
  """A header number: octal text, or GNU base-256 (first byte 0x80) for large sizes."""
  if field[:1] == b"\x80":
    return int.from_bytes(field[1:], "big")
  text = field.split(b"\0", 1)[0].strip()
  try:
    value = int(text, 8) if text else 0
  except ValueError:
    value = -1
  if value < 0:  # int() takes a sign
    raise ShardError(f"bad number {bytes(field)!r} in a tar header")
  return value


def _read(f, n: int) -> bytes:
  """n bytes (fewer only at the end of the stream), over short reads of remote files;
  never asks for more than _CHUNK at once (a file read allocates what it is asked)."""
  out = f.read(n if n <= _CHUNK else _CHUNK)
  if len(out) == n or not out:
    return out
  parts, got = [out], len(out)
  while got < n:
    more = f.read(n - got if n - got <= _CHUNK else _CHUNK)
    if not more:
      break
    parts.append(more)
    got += len(more)
  return b"".join(parts)


def _pax_path(records: bytes):
  """The 'path' of a pax extended header ('%d path=...\\n' records), or None.

  Raises:
    ShardError: for a record whose length does not cover it or runs past the end
      (a length of 0 would otherwise never advance).
  """
  i, path = 0, None
  while i < len(records) and records[i] != 0:  # NUL padding ends the records
    m = _PAX_RECORD.match(records, i)
    length = int(m.group(1)) if m else 0
    if not m or length <= m.end() - i or i + length > len(records):
      raise ShardError(f"malformed pax record at byte {i}")
    if m.group(2) == b"path":
      path = records[m.end():i + length - 1]
    i += length
  return path


def _tar_files(f, head: bytes) -> Iterator[tuple]:
  """(name, data) of each regular file of an uncompressed tar stream whose first
  512 bytes, already read, are `head`.

  Reads the headers directly (ustar, GNU long names, pax paths): on shards of many
  small members (a latent cache holds four per sample, some 100 bytes each) Python's
  tarfile spent most of the reading time building its member objects. Every length
  is bounded: a size past the end of the file (when its size is known) fails before
  it is read. A stream that stops without the end-of-archive block is truncated.

  Raises:
    ShardError: on a bad header (checksum, number, pax record) or a truncated member.
  """
  total = getattr(f, "size", None)  # fsspec files know their size
  total = total if isinstance(total, int) else None
  pos, long_name, header = _BLOCK, None, head
  while True:
    if not header:  # a tar ends with zero blocks: a shard cut at a member boundary lacks them
      raise ShardError("the shard ends without the tar end-of-archive block")
    if len(header) < _BLOCK:
      raise ShardError("truncated tar header")
    if header == _END:
      if long_name is not None:
        raise ShardError("tar ends after a long-name header")
      return
    stored, unsigned = _number(header[148:156]), sum(header[:148]) + 256 + sum(header[156:])
    if stored != unsigned and stored != unsigned - 256 * sum(  # old tars summed signed bytes
        1 for byte in header[:148] + header[156:] if byte > 127):
      raise ShardError("bad tar header checksum")
    size, kind = _number(header[124:136]), header[156:157]
    name = None
    if kind in (b"0", b"\0", b"7"):    # a regular file
      name = long_name
      if name is None:
        name = header[:100].split(b"\0", 1)[0]
        prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
        if prefix:
          name = prefix + b"/" + name
      name = name.decode("utf-8", "surrogateescape")
    padded = size + (-size % _BLOCK)
    if total is not None and pos + padded > total:
      raise ShardError(f"member of {size} bytes runs past the end of the file", name)
    data = _read(f, padded)  # with its padding: one read a member
    if len(data) < padded:
      raise ShardError("truncated tar member", name)
    if padded != size:
      data = data[:size]
    pos += padded + _BLOCK
    if kind == b"L":                     # GNU: the next member's long name
      long_name = data.split(b"\0", 1)[0]
    elif kind == b"x":                   # pax: the next member's attributes
      long_name = _pax_path(data) or long_name
    elif name is not None:
      long_name = None
      yield name, data
    elif kind != b"g":                   # directories, links, devices: skipped
      long_name = None
    header = _read(f, _BLOCK)


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
        try:
          data = tar.extractfile(member).read()
        except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as e:
          raise ShardError(f"truncated tar member: {e}", member.name) from e
        yield member.name, data


def _files(f) -> Iterator[tuple]:
  head = _read(f, _BLOCK)
  if not head:
    raise ShardError("zero-byte shard")
  if head.startswith(_COMPRESSED):
    yield from tarfile_files(_Prefixed(head, f))
  else:
    yield from _tar_files(f, head)


def group(files: Iterator[tuple], url: str) -> Iterator[dict]:
  """Samples from (name, data) pairs in tar order: consecutive members sharing a key.

  A member whose extension the sample already holds starts a new sample of the same
  key (the reader then drops it as a duplicate). When reading fails, the sample in
  hand is yielded first if the failure lies in a member of another key: it is
  complete (`tr_008` before a cut inside `tr_009.png`).
  """
  current, key = None, None
  try:
    for name, data in files:
      k, ext = _key_and_ext(name)
      if k != key or ext in current:
        if current is not None:
          yield current
        current, key = {"__key__": k, "__url__": url}, k
      current[ext] = data
  except ShardError as e:
    if current is not None and e.member is not None and _key_and_ext(e.member)[0] != key:
      yield current
    raise
  if current is not None:
    yield current


def iter_samples(url: str) -> Iterator[dict]:
  """Yields the grouped samples of one tar shard (plain, or gzip / bzip2 / xz
  compressed), in tar order.

  Raises whatever opening or reading raises (missing shard, zero bytes, a malformed
  header, truncation); the caller counts and skips. Every complete sample read
  before an error has been yielded.
  """
  with fsspec.open(url, "rb") as f:
    yield from group(_files(f), url)


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  """Appends one file to a shard being written (mtime 0: the same content gives
  byte-identical shards)."""
  info = tarfile.TarInfo(name)
  info.size = len(data)
  info.mtime = 0
  tar.addfile(info, io.BytesIO(data))
