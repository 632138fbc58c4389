"""The workdir's storage: every file the framework reads or writes under a workdir
goes through here.

A path is a local path or an fsspec URL (`gs://bucket/run`, `s3://...`,
`file:///abs/path`, `memory://...` in tests). A URL is always handled by fsspec,
so a bucket workdir never turns into a local folder named `gs:`. Orbax writes
checkpoints through its own etils.epath (local paths and gs://); `orbax_path` says
what it is given.

TensorBoard event files go through `summary_writer`: tensorboardX appends to a
local file, and on a URL writes through fsspec, where an object cannot be
appended to; there each flush stores the events since the last one as the next
part of the file (`events...`, `events....000001`, ...), which TensorBoard reads
in name order as one run.
"""
import io
import json
import os

import fsspec
from fsspec.implementations.local import LocalFileSystem


def is_url(path: str) -> bool:
  return "://" in str(path)


def join(base: str, *parts: str) -> str:
  """`base`/`parts`, keeping a URL's scheme (os.path.join would too, but reads
  more plainly here than on URLs)."""
  if is_url(base):
    return "/".join([base.rstrip("/")] + [p.strip("/") for p in parts])
  return os.path.join(base, *parts)


def display(path: str) -> str:
  """`path` as a log line shows it: absolute when local."""
  return path if is_url(path) else os.path.abspath(path)


def _fs(path: str):
  return fsspec.core.url_to_fs(str(path))


def _local(fs) -> bool:
  return isinstance(fs, LocalFileSystem)


def exists(path: str) -> bool:
  fs, p = _fs(path)
  return fs.exists(p)


def makedirs(path: str) -> None:
  """Creates a local folder (and parents); a no-op on object stores, which have none."""
  fs, p = _fs(path)
  if _local(fs):
    fs.makedirs(p, exist_ok=True)


def open(path: str, mode: str = "rb"):  # pylint: disable=redefined-builtin
  """A file object of `path`; writing makes a local file's folder first."""
  fs, p = _fs(path)
  if "r" not in mode and _local(fs):
    fs.makedirs(os.path.dirname(p), exist_ok=True)
  return fs.open(p, mode)


def write_bytes(path: str, data: bytes) -> None:
  """Writes `data` whole; a local file appears under its name only once complete."""
  fs, p = _fs(path)
  if _local(fs):
    fs.makedirs(os.path.dirname(p), exist_ok=True)
    tmp = f"{p}.tmp{os.getpid()}"
    with fs.open(tmp, "wb") as f:
      f.write(data)
    os.replace(tmp, p)
  else:  # an object store writes an object whole
    with fs.open(p, "wb") as f:
      f.write(data)


def read_json(path: str):
  with open(path, "r") as f:
    return json.load(f)


def write_json(path: str, obj, **kw) -> None:
  write_bytes(path, json.dumps(obj, **kw).encode())


def remove(path: str, recursive: bool = False) -> None:
  fs, p = _fs(path)
  if fs.exists(p):
    fs.rm(p, recursive=recursive)


def listdir(path: str) -> list:
  """The names (not paths) in the folder `path`; [] when there is none."""
  fs, p = _fs(path)
  if not fs.exists(p):
    return []
  return sorted(os.path.basename(q.rstrip("/")) for q in fs.ls(p, detail=False))


def check_writable(path: str) -> None:
  """Fails early, naming the path, when `path` cannot be written (local or bucket).

  Raises:
    ValueError: the folder cannot be made or a file in it cannot be written.
  """
  import jax
  probe = join(path, f".write_probe_{jax.process_index()}")
  try:
    makedirs(path)
    write_bytes(probe, b"ok")
    remove(probe)
  except Exception as e:  # fsspec's stores raise their own kinds (auth, HTTP, OS)
    raise ValueError(f"workdir '{path}' is not writable: {e}") from e


def orbax_path(path: str) -> str:
  """The path Orbax (etils.epath + TensorStore) is given for `path`: a `file://`
  URL becomes its local path; local paths and gs:// pass as they are.

  Raises:
    ValueError: another scheme, which Orbax would write to a local folder named
      after the URL.
  """
  if path.startswith("file://"):
    return path[len("file://"):]
  if is_url(path) and not path.startswith("gs://"):
    raise ValueError(f"checkpoints cannot be written to '{path}': Orbax writes to local "
                     "paths, file:// and gs:// only")
  return path if is_url(path) else os.path.abspath(path)


class _PartWriter:
  """tensorboardX's record sink on a store without append: buffers records and
  writes them as a new part of the event file at each flush."""

  def __init__(self, path: str):
    self.path, self.part, self.buffer = path, 0, io.BytesIO()

  def write(self, data: bytes) -> None:
    self.buffer.write(data)

  def flush(self) -> None:
    data = self.buffer.getvalue()
    if not data:
      return
    name = self.path if self.part == 0 else f"{self.path}.{self.part:06d}"
    write_bytes(name, data)
    self.part, self.buffer = self.part + 1, io.BytesIO()

  def close(self) -> None:
    self.flush()


class _PartWriterFactory:
  def open(self, path: str) -> _PartWriter:
    return _PartWriter(path)

  def directory_check(self, path: str) -> None:
    makedirs(path)


def summary_writer(logdir: str):
  """A tensorboardX SummaryWriter whose event file lives in `logdir` (local or URL).

  Returns:
    tensorboardX.SummaryWriter; `add_scalar`, `add_image`, `flush`, `close`.
  """
  import tensorboardX
  from tensorboardX import record_writer
  if is_url(logdir):
    # tensorboardX picks a sink by the scheme; its own gs:// / s3:// sinks need
    # the cloud SDKs and re-upload the whole file on every flush.
    record_writer.register_writer_factory(logdir.split("://")[0], _PartWriterFactory())
  return tensorboardX.SummaryWriter(logdir)
