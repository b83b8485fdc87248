"""TFRecord framing, tf.train.Example encoding, index files, and local/remote file access.

A TFRecord file is a sequence of ``uint64 length | uint32 masked_crc32c(length) | data |
uint32 masked_crc32c(data)`` entries (little endian); ``data`` here is a serialized
``tf.train.Example`` whose features are int64 lists (``indices``, and ``mask`` for chat records).
Each ``part-NNNNN.tfrecord`` has a ``part-NNNNN.index`` next to it in the tfrecord package's format:
one ``<byte offset> <entry size>`` line per record, which gives the reader random access.

Paths with a scheme (``gs://``, ``s3://``, ``hdfs://``) go through ``tf.io.gfile`` (the ``tfio``
extra, installed in its own environment); local paths use plain Python I/O.
"""

from __future__ import annotations

import contextlib
import glob as _glob
import os
import struct
from collections.abc import Iterator, Sequence
from typing import IO

import numpy as np

from minima.core.errors import DataError, InputError

REMOTE_SCHEMES = ("gs://", "s3://", "hdfs://")
_CRC_MASK = 0xA282EAD8


def is_remote(path: str | os.PathLike) -> bool:
    return str(path).startswith(REMOTE_SCHEMES)


def _gfile():
    try:
        import tensorflow as tf
    except ImportError:
        raise InputError(
            "remote paths (gs://, s3://, hdfs://) need tensorflow and tensorflow-io",
            fix="install the tfio extra in its own environment: pip install 'minima[tfio]' (see README)",
        ) from None
    import tensorflow as tf

    with contextlib.suppress(ImportError):  # registers s3:// and hdfs:// file systems
        import tensorflow_io  # noqa: F401
    return tf.io.gfile


def open_read(path: str | os.PathLike) -> IO[bytes]:
    """A binary file object for a local or remote path."""
    if is_remote(path):
        return _gfile().GFile(str(path), "rb")
    return open(path, "rb")


def read_text(path: str | os.PathLike) -> str:
    with open_read(path) as f:
        return f.read().decode("utf-8")


def exists(path: str | os.PathLike) -> bool:
    return _gfile().exists(str(path)) if is_remote(path) else os.path.exists(path)


def glob(pattern: str) -> list[str]:
    """Sorted matches of a glob pattern, local or remote."""
    if is_remote(pattern):
        return sorted(_gfile().glob(pattern))
    return sorted(_glob.glob(pattern, recursive=True))


def join(base: str | os.PathLike, *parts: str) -> str:
    if is_remote(base):
        return "/".join([str(base).rstrip("/"), *parts])
    return os.path.join(base, *parts)


# ------------------------------------------------------------------------------------ framing
def masked_crc(data: bytes | memoryview) -> int:
    """TFRecord's masked CRC32C."""
    import crc32c

    crc = crc32c.crc32c(data)
    return (((crc >> 15) | (crc << 17)) + _CRC_MASK) & 0xFFFFFFFF


def frame(data: bytes) -> bytes:
    """One TFRecord entry around ``data``."""
    head = struct.pack("<Q", len(data))
    return head + struct.pack("<I", masked_crc(head)) + data + struct.pack("<I", masked_crc(data))


def unframe(entry: bytes | memoryview, where: str = "", verify: bool = True) -> memoryview:
    """The data of one TFRecord entry (CRCs checked when ``verify``)."""
    view = memoryview(entry)
    if len(view) < 16:
        raise DataError("truncated TFRecord entry", where=where, fix="rebuild the records with --force")
    (length,) = struct.unpack_from("<Q", view, 0)
    if 16 + length != len(view):
        raise DataError(
            f"TFRecord entry size {len(view)} does not match its length field {length}",
            where=where,
            fix="the .index file does not belong to this .tfrecord; rebuild with --force",
        )
    data = view[12 : 12 + length]
    if verify:
        (hcrc,) = struct.unpack_from("<I", view, 8)
        (dcrc,) = struct.unpack_from("<I", view, 12 + length)
        if hcrc != masked_crc(view[:8]) or dcrc != masked_crc(data):
            raise DataError("TFRecord CRC mismatch (corrupt file)", where=where, fix="rebuild the records with --force")
    return data


def iter_entries(f: IO[bytes], where: str = "", verify: bool = True) -> Iterator[memoryview]:
    """Every record's data in a TFRecord stream, in order."""
    while True:
        head = f.read(12)
        if not head:
            return
        if len(head) < 12:
            raise DataError("truncated TFRecord header", where=where, fix="rebuild the records with --force")
        (length,) = struct.unpack_from("<Q", head, 0)
        rest = f.read(length + 4)
        if len(rest) < length + 4:
            raise DataError("truncated TFRecord entry", where=where, fix="rebuild the records with --force")
        yield unframe(head + rest, where, verify)


# ---------------------------------------------------------------------------- Example encoding
def encode_example(features: dict[str, Sequence[int] | np.ndarray]) -> bytes:
    """A serialized ``tf.train.Example`` with int64-list features (keys in sorted order)."""
    from tfrecord import example_pb2

    ex = example_pb2.Example()
    for key in sorted(features):
        values = features[key]
        if isinstance(values, np.ndarray):
            values = values.tolist()
        ex.features.feature[key].int64_list.value.extend(values)
    # deterministic=True sorts map keys, so equal inputs give equal bytes in every process.
    return ex.SerializeToString(deterministic=True)


def decode_example(data: bytes | memoryview, where: str = "") -> dict[str, np.ndarray]:
    """int64-list features of a serialized ``tf.train.Example`` as int64 numpy arrays."""
    from google.protobuf.message import DecodeError
    from tfrecord import example_pb2

    try:
        ex = example_pb2.Example.FromString(bytes(data))
    except DecodeError as e:
        raise DataError(f"not a tf.train.Example ({e})", where=where, fix="rebuild the records with --force") from None
    out = {}
    for key, feat in ex.features.feature.items():
        if feat.WhichOneof("kind") != "int64_list":
            raise DataError(
                f"feature {key!r} is not an int64 list", where=where, fix="records must be written by `minima records`"
            )
        out[key] = np.fromiter(feat.int64_list.value, dtype=np.int64, count=len(feat.int64_list.value))
    return out


# -------------------------------------------------------------------------------------- index
def index_path(tfrecord_path: str) -> str:
    """``part-00000.tfrecord`` -> ``part-00000.index``."""
    base = tfrecord_path[: -len(".tfrecord")] if tfrecord_path.endswith(".tfrecord") else tfrecord_path
    return base + ".index"


def read_index(tfrecord_path: str) -> np.ndarray:
    """``(n, 2)`` int64 array of (offset, size) per record; built by scanning when no index exists."""
    ipath = index_path(tfrecord_path)
    if exists(ipath):
        text = read_text(ipath)
        if not text.strip():
            return np.zeros((0, 2), dtype=np.int64)
        lines = text.count("\n") + (not text.endswith("\n"))
        try:
            arr = np.array(text.split(), dtype=np.int64)
        except ValueError:
            arr = np.zeros(1, dtype=np.int64)  # odd length: reported below
        if arr.size != 2 * lines:
            raise DataError(
                "index lines must be '<offset> <size>'",
                where=ipath,
                fix="delete it (the reader then scans the .tfrecord) or rebuild the records with --force",
            )
        return arr.reshape(-1, 2)
    rows = []
    with open_read(tfrecord_path) as f:
        offset = 0
        for data in iter_entries(f, tfrecord_path, verify=False):
            size = len(data) + 16
            rows.append((offset, size))
            offset += size
    return np.array(rows, dtype=np.int64).reshape(-1, 2)


class ShardWriter:
    """Writes records into ``<dir>/part-NNNNN.tfrecord`` files of ``shard_size`` records each.

    Every shard gets its ``.index`` file as it is closed. Local paths only (the build publishes its
    output atomically through a local temp dir).
    """

    def __init__(self, out_dir: str | os.PathLike, shard_size: int):
        self.out_dir = str(out_dir)
        os.makedirs(self.out_dir, exist_ok=True)
        self.shard_size = shard_size
        self.num_records = 0
        self.num_bytes = 0
        self.files: list[str] = []
        self._f: IO[bytes] | None = None
        self._index: list[str] = []
        self._offset = 0
        # Range of the token ids written ("indices"), kept in the manifest so a trainer can check its vocab
        # without reading the shards.
        self.min_id: int | None = None
        self.max_id: int | None = None

    def _open(self) -> None:
        path = os.path.join(self.out_dir, f"part-{len(self.files):05d}.tfrecord")
        self.files.append(path)
        # The shard stays open across write() calls; _close() closes it when the shard is full or on close().
        self._f = open(path, "wb")  # noqa: SIM115
        self._index = []
        self._offset = 0

    def _close(self) -> None:
        if self._f is None:
            return
        self._f.close()
        with open(index_path(self.files[-1]), "w") as f:
            f.write("".join(self._index))
        self._f = None

    def write(self, features: dict[str, Sequence[int] | np.ndarray]) -> None:
        if self._f is None or len(self._index) >= self.shard_size:
            self._close()
            self._open()
        ids = features.get("indices")
        if ids is not None and len(ids):
            lo, hi = int(np.min(ids)), int(np.max(ids))
            self.min_id = lo if self.min_id is None else min(self.min_id, lo)
            self.max_id = hi if self.max_id is None else max(self.max_id, hi)
        entry = frame(encode_example(features))
        self._f.write(entry)
        self._index.append(f"{self._offset} {len(entry)}\n")
        self._offset += len(entry)
        self.num_records += 1
        self.num_bytes += len(entry)

    def close(self) -> None:
        self._close()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
