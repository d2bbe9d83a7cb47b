"""A reader for IDX files, the format of MNIST and Fashion-MNIST (LeCun et al.), raw or gzipped.

An IDX file is a 4-byte magic number `00 00 <type> <ndim>`, then `ndim` big-endian uint32
dimensions, then the values in C order, big-endian.
"""

from __future__ import annotations

import gzip
import pathlib
import zlib

import numpy as np

# The type byte of the magic number -> the big-endian numpy dtype of the values.
_IDX_DTYPES = {
  0x08: np.dtype('>u1'),
  0x09: np.dtype('>i1'),
  0x0B: np.dtype('>i2'),
  0x0C: np.dtype('>i4'),
  0x0D: np.dtype('>f4'),
  0x0E: np.dtype('>f8'),
}
_GZIP_MAGIC = b'\x1f\x8b'


def _read_bytes(path: pathlib.Path) -> bytes:
  """The file's bytes, gunzipped when it starts with the gzip magic (whatever its name)."""
  raw = path.read_bytes()
  if not raw.startswith(_GZIP_MAGIC):
    return raw
  try:
    return gzip.decompress(raw)
  except (EOFError, OSError, zlib.error) as e:
    raise ValueError(f'{path} is a truncated or corrupt gzip file ({e})') from e


def read_idx(path: str | pathlib.Path) -> np.ndarray:
  """The array stored in an IDX file (`.gz` or raw), in native byte order.

  Args:
    path: an IDX file, e.g. `train-images-idx3-ubyte.gz` (gzip is detected from the content).

  Returns:
    An array of the file's shape, e.g. `[60000, 28, 28]` uint8 for MNIST training images.

  Raises:
    FileNotFoundError: `path` is not a file.
    ValueError: the magic number, the dimensions or the data length are wrong (a truncated or
      corrupt file).
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f'path {str(path)!r} is not a file; expected an IDX file')
  data = _read_bytes(path)
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
    raise ValueError(
      f'{path} does not start with an IDX magic number (00 00 <type> <ndim>, type one of '
      f'{", ".join(f"{t:#04x}" for t in _IDX_DTYPES)}); got {data[:4].hex(" ") or "no bytes"}'
    )
  dtype, ndim = _IDX_DTYPES[data[2]], data[3]
  header = 4 + 4 * ndim
  if ndim == 0:
    raise ValueError(f'{path} declares 0 dimensions; expected at least 1')
  if len(data) < header:
    raise ValueError(f'{path} declares {ndim} dimensions but its header is cut short')
  shape = tuple(int(d) for d in np.frombuffer(data, dtype='>u4', count=ndim, offset=4))
  expected = int(np.prod(shape)) * dtype.itemsize
  if len(data) - header != expected:
    raise ValueError(
      f'{path} declares shape {shape} of {dtype.str[1:]} ({expected} bytes of data) but holds '
      f'{len(data) - header} bytes after its header; the file is truncated or corrupt'
    )
  return (
    np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder('='))
  )
