"""TensorBoard event files without TensorFlow.

An event file is a sequence of TFRecords (length, masked CRC32C of the length,
the serialized `Event` proto, masked CRC32C of the data). The few proto messages
needed (Event, Summary, Summary.Value, Summary.Image) are encoded by hand here,
which is less code than a dependency that carries all of TensorBoard's protos.
"""
import io
import os
import socket
import struct
import time

import numpy as np

_CRC_TABLE = []
for _i in range(256):
  _c = _i
  for _ in range(8):
    _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
  _CRC_TABLE.append(_c)


def crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  table = _CRC_TABLE
  for b in data:
    crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
  out = bytearray()
  while True:
    b = n & 0x7F
    n >>= 7
    if n:
      out.append(b | 0x80)
    else:
      out.append(b)
      return bytes(out)


def _field(num: int, wire: int, payload: bytes) -> bytes:
  return _varint((num << 3) | wire) + payload


def _bytes_field(num: int, data: bytes) -> bytes:
  return _field(num, 2, _varint(len(data)) + data)


def _event(step: int, summary_values: list[bytes] | None = None, file_version: str | None = None) -> bytes:
  msg = _field(1, 1, struct.pack("<d", time.time())) + _field(2, 0, _varint(step))
  if file_version:
    msg += _bytes_field(3, file_version.encode())
  if summary_values:
    msg += _bytes_field(5, b"".join(_bytes_field(1, v) for v in summary_values))
  return msg


def _scalar_value(tag: str, value: float) -> bytes:
  return _bytes_field(1, tag.encode()) + _field(2, 5, struct.pack("<f", float(value)))


def _image_value(tag: str, image: np.ndarray) -> bytes:
  from PIL import Image
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  h, w = image.shape[:2]
  channels = 1 if image.ndim == 2 else image.shape[2]
  img = (_field(1, 0, _varint(h)) + _field(2, 0, _varint(w)) + _field(3, 0, _varint(channels)) +
         _bytes_field(4, buf.getvalue()))
  return _bytes_field(1, tag.encode()) + _bytes_field(4, img)


class SummaryWriter:
  """Appends scalars and images to `logdir/events.out.tfevents.*`."""

  def __init__(self, logdir: str):
    os.makedirs(logdir, exist_ok=True)
    name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
    self.path = os.path.join(logdir, name)
    self._f = open(self.path, "ab")
    self._write(_event(0, file_version="brain.Event:2"))

  def _write(self, data: bytes) -> None:
    header = struct.pack("<Q", len(data))
    self._f.write(header + struct.pack("<I", _masked_crc(header)) + data +
                  struct.pack("<I", _masked_crc(data)))

  def scalars(self, step: int, values: dict) -> None:
    self._write(_event(step, [_scalar_value(k, v) for k, v in values.items()]))
    self._f.flush()

  def image(self, step: int, tag: str, image: np.ndarray) -> None:
    """image: HxWx3 uint8."""
    self._write(_event(step, [_image_value(tag, image)]))
    self._f.flush()

  def close(self) -> None:
    self._f.close()


def read_events(path: str):
  """Yields the raw Event records of a file (used by tests to check framing)."""
  with open(path, "rb") as f:
    while header := f.read(8):
      (n,) = struct.unpack("<Q", header)
      (crc,) = struct.unpack("<I", f.read(4))
      assert crc == _masked_crc(header), "corrupt length"
      data = f.read(n)
      (crc,) = struct.unpack("<I", f.read(4))
      assert crc == _masked_crc(data), "corrupt record"
      yield data
