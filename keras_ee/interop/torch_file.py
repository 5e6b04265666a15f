"""A torch-free reader of `torch.save` files: tensors come back as numpy arrays.

Both serialisations of `torch.save` are read:

* zip (torch >= 1.6, the default): `<name>/data.pkl` is a pickle whose tensors are persistent
  ids `('storage', storage_type, key, location, numel)`; each storage's raw little-endian bytes
  are the archive member `<name>/data/<key>`.
* legacy (torch 0.4-1.5, or `_use_new_zipfile_serialization=False`): one stream of pickles,
  a magic number, the protocol version, system information, the main object (persistent ids
  `('storage', storage_type, key, location, numel, view_metadata)`), the list of storage keys,
  then every storage as an 8-byte element count followed by its raw bytes.

A pickle can run any code while it loads (a `REDUCE` of `os.system`, say). The unpickler here
resolves only the few globals a state_dict and an optimizer state need, each to a function of
this module (never to the real `torch` or `collections` object of that name unless it is a plain
container), and refuses every other global with `UnsafeCheckpointError` before anything runs:
the same idea as `torch.load(..., weights_only=True)`.
"""

from __future__ import annotations

import collections
import hashlib
import io
import math
import os
import pickle
import struct
import threading
import zipfile
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

# torch storage type -> numpy dtype (little-endian, as torch writes on every supported machine).
STORAGE_DTYPES: dict[str, np.dtype[Any]] = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype("<u2"),  # no numpy bfloat16: read as bits, widened to float32
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


class CheckpointError(ValueError):
    """A file that is not a readable `torch.save` checkpoint (truncated, damaged, other format)."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint whose pickle names a global outside the allowed few (it could run code)."""


class _Storage:
    """A storage named by a persistent id; its bytes are attached once read."""

    __slots__ = ("key", "type_name", "numel", "array")

    def __init__(self, key: str, type_name: str, numel: int):
        self.key = key
        self.type_name = type_name
        self.numel = numel
        self.array: np.ndarray | None = None


class _StorageView:
    """Legacy view metadata: a storage that is a slice of another one."""

    __slots__ = ("base", "offset", "numel")

    def __init__(self, base: _Storage, offset: int, numel: int):
        self.base, self.offset, self.numel = base, offset, numel


class TensorRef:
    """A tensor as `_rebuild_tensor_v2` describes it; `resolve()` makes the numpy array."""

    __slots__ = ("storage", "offset", "size", "stride")

    def __init__(self, storage: object, offset: int, size: tuple[int, ...], stride: tuple[int, ...]):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def resolve(self) -> np.ndarray:
        storage, offset = self.storage, self.offset
        if isinstance(storage, _StorageView):
            offset += storage.offset
            storage = storage.base
        if not isinstance(storage, _Storage) or storage.array is None:
            raise CheckpointError("a tensor refers to a storage the file does not hold")
        size, stride = tuple(self.size), tuple(self.stride)
        ints = (offset, *size, *stride)
        if (
            len(size) != len(stride)
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in ints)
            or min(ints, default=0) < 0
        ):
            raise CheckpointError(f"a tensor has an invalid layout (offset {offset}, size {size}, stride {stride})")
        base = storage.array
        count = math.prod(size)
        last = offset + sum((n - 1) * s for n, s in zip(size, stride)) if count else offset - 1
        if last >= base.size:
            raise CheckpointError(
                f"a tensor of size {size} reaches element {last} of storage {storage.key!r}, which holds "
                f"{base.size} (the file is damaged)"
            )
        if count == 0:
            out = np.zeros(size, base.dtype)
        else:
            contiguous = tuple(int(np.prod(size[i + 1 :])) for i in range(len(size)))
            if all(s == c or n == 1 for n, s, c in zip(size, stride, contiguous)):
                out = base[offset : offset + count].reshape(size)  # a view: no copy
            else:
                item = base.itemsize
                out = np.lib.stride_tricks.as_strided(
                    base[offset:], shape=size, strides=tuple(s * item for s in stride), writeable=False
                ).copy()
        if storage.type_name == "BFloat16Storage":
            out = (out.astype(np.uint32) << 16).view(np.float32)
        return out


def _rebuild_tensor_v2(
    storage: object,
    storage_offset: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    requires_grad: bool = False,
    backward_hooks: object = None,
    *metadata: object,
) -> TensorRef:
    return TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(
    data: object, requires_grad: bool = False, backward_hooks: object = None, *state: object
) -> object:
    return data


def _codecs_encode(text: object, encoding: str = "utf-8") -> bytes:
    # Protocol-2 pickles (the legacy format) write `bytes` as `_codecs.encode(str, "latin1")`.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafeCheckpointError("the checkpoint calls _codecs.encode with other arguments than a pickle writes")
    return text.encode("latin1")


class _StorageType:
    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name


class SavedArguments:
    """A script's `argparse.Namespace` saved beside its weights (gphi_MSDNet's `args`): a plain
    object that only receives the attributes (pickle's BUILD sets `__dict__`; nothing is called)."""

    def __repr__(self) -> str:
        return f"SavedArguments({vars(self)})"


_ALLOWED: dict[tuple[str, str], object] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("_codecs", "encode"): _codecs_encode,
    ("__builtin__", "set"): set,
    ("builtins", "set"): set,
    ("argparse", "Namespace"): SavedArguments,
    **{("torch", name): _StorageType(name) for name in STORAGE_DTYPES},
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: BinaryIO, storages: dict[str, _Storage], legacy: bool):
        super().__init__(file)
        self._storages = storages
        self._legacy = legacy

    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED.get((module, name))
        if allowed is None:
            raise UnsafeCheckpointError(
                f"refused: the checkpoint's pickle names {module}.{name}, which a state_dict never needs "
                "(a pickle can run code while it loads); nothing was executed"
            )
        return allowed

    def persistent_load(self, pid: object) -> object:
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage" or len(pid) < 5:
            raise CheckpointError(f"unknown persistent id {str(pid)[:80]!r} (expected a torch storage)")
        storage_type, key, _location, numel = pid[1:5]
        if not isinstance(storage_type, _StorageType):
            raise CheckpointError(f"a storage of unsupported type {storage_type!r}")
        key = str(key)
        if not isinstance(numel, int) or numel < 0:
            raise CheckpointError(f"storage {key!r} has an invalid element count {numel!r}")
        storage = self._storages.get(key)
        if storage is None:
            storage = self._storages[key] = _Storage(key, storage_type.name, numel)
        view = pid[5] if self._legacy and len(pid) > 5 else None
        if view is not None:
            try:
                view_key, offset, view_numel = view
            except (TypeError, ValueError):
                raise CheckpointError(f"storage {key!r} has invalid view metadata {view!r}") from None
            return _StorageView(storage, int(offset), int(view_numel))
        return storage


def resolve_tensors(obj: object) -> Any:
    """`obj` with every `TensorRef` inside (dicts, lists, tuples) replaced by its numpy array."""
    if isinstance(obj, TensorRef):
        return obj.resolve()
    if isinstance(obj, dict):
        out: dict[Any, Any] = collections.OrderedDict() if isinstance(obj, collections.OrderedDict) else {}
        for k, v in obj.items():
            out[k] = resolve_tensors(v)
        return out
    if isinstance(obj, list):
        return [resolve_tensors(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(resolve_tensors(v) for v in obj)
    return obj


def _unpickle(data: BinaryIO, storages: dict[str, _Storage], legacy: bool, what: str) -> Any:
    try:
        return _RestrictedUnpickler(data, storages, legacy).load()
    except CheckpointError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        raise CheckpointError(f"{what} is damaged or truncated ({type(e).__name__}: {str(e)[:120]})") from None


class FileChecks:
    """The sha256 of a checkpoint's bytes and the CRC-32 of its zip members, computed in a thread
    while the caller maps the tensors (hashlib and zlib release the GIL on large buffers)."""

    def __init__(self, data: bytes, members: Iterable[tuple[str, int, int, int]] = ()):
        self._data, self.members = data, list(members)  # (name, offset, size, crc)
        self._digest: str | None = None
        self._bad: list[str] = []
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="keras-ee-checkpoint-checks", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            view = memoryview(self._data)
            self._digest = hashlib.sha256(view).hexdigest()
            for name, offset, size, crc in self.members:
                if zlib.crc32(view[offset : offset + size]) != crc:
                    self._bad.append(name)
        except BaseException as e:  # handed to the caller by `sha256()`
            self._error = e

    def sha256(self) -> str:
        """The file's sha256 (hex); raises CheckpointError if a member's CRC-32 does not match."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        if self._bad:
            raise CheckpointError(
                f"member {self._bad[0]!r} fails its CRC-32 check"
                + (f" (and {len(self._bad) - 1} more)" if len(self._bad) > 1 else "")
                + " (the file is damaged)"
            )
        assert self._digest is not None  # set by _run unless it raised, handled above
        return self._digest


def _stored_member_offset(data: bytes, info: zipfile.ZipInfo) -> int:
    """Where an uncompressed zip member's bytes start (after its local header)."""
    head = bytes(data[info.header_offset : info.header_offset + 30])
    if len(head) < 30 or head[:4] != b"PK\x03\x04":
        raise CheckpointError(f"member {info.filename!r} has no local header (the file is damaged)")
    name_length, extra_length = struct.unpack("<HH", head[26:30])
    return info.header_offset + 30 + name_length + extra_length


def _read_zip(data: bytes) -> tuple[Any, list[tuple[str, int, int, int]]]:
    storages: dict[str, _Storage] = {}
    members: list[tuple[str, int, int, int]] = []
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = archive.namelist()
            pickles = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
            if len(pickles) != 1:
                raise CheckpointError(f"a zip archive without one <name>/data.pkl (members: {names[:5]})")
            prefix = pickles[0][: -len("data.pkl")]
            if f"{prefix}byteorder" in names and archive.read(f"{prefix}byteorder").strip() != b"little":
                raise CheckpointError("a big-endian checkpoint; only little-endian files are read")
            obj = _unpickle(io.BytesIO(archive.read(pickles[0])), storages, legacy=False, what="data.pkl")
            for key, storage in storages.items():
                member = f"{prefix}data/{key}"
                if member not in names:
                    raise CheckpointError(f"storage {key!r} is missing from the archive (the file is damaged)")
                dtype = STORAGE_DTYPES[storage.type_name]
                info = archive.getinfo(member)
                if info.compress_type != zipfile.ZIP_STORED:  # re-zipped by hand: zipfile inflates and checks it
                    raw: bytes | memoryview = archive.read(member)
                else:  # torch's own layout: a view of the file's bytes, checked by FileChecks
                    offset = _stored_member_offset(data, info)
                    if offset + info.file_size > len(data):
                        raise CheckpointError(f"storage {key!r} is cut short (the file is truncated)")
                    raw = memoryview(data)[offset : offset + info.file_size]
                    members.append((member, offset, info.file_size, info.CRC))
                if len(raw) < storage.numel * dtype.itemsize:
                    raise CheckpointError(f"storage {key!r} holds {len(raw)} bytes, fewer than its tensors need")
                storage.array = np.frombuffer(raw, dtype, count=len(raw) // dtype.itemsize)
    except zipfile.BadZipFile as e:
        raise CheckpointError(f"a damaged or truncated zip archive ({e})") from None
    except (OSError, EOFError) as e:  # a member cut short raises these from zipfile
        raise CheckpointError(f"a damaged or truncated zip archive ({type(e).__name__}: {e})") from None
    return obj, members


def _read_legacy(data: bytes) -> Any:
    storages: dict[str, _Storage] = {}
    f = io.BytesIO(data)
    header = []
    for what in ("magic number", "protocol version", "system information"):
        header.append(_unpickle(f, storages, legacy=True, what=f"the legacy header ({what})"))
    if header[0] != LEGACY_MAGIC:
        raise CheckpointError("not a torch.save file: neither a zip archive nor the legacy magic number")
    if header[1] != LEGACY_PROTOCOL:
        raise CheckpointError(f"legacy protocol version {header[1]!r}; expected {LEGACY_PROTOCOL}")
    info = header[2] if isinstance(header[2], dict) else {}
    if info.get("little_endian", True) is not True:
        raise CheckpointError("a big-endian checkpoint; only little-endian files are read")
    obj = _unpickle(f, storages, legacy=True, what="the legacy main object")
    keys = _unpickle(f, storages, legacy=True, what="the legacy storage list")
    if not isinstance(keys, list):
        raise CheckpointError("the legacy storage list is not a list (the file is damaged)")
    offset = f.tell()
    for key in keys:
        storage = storages.get(str(key))
        if storage is None:
            raise CheckpointError(f"the legacy storage list names {key!r}, which no tensor uses")
        dtype = STORAGE_DTYPES[storage.type_name]
        if offset + 8 > len(data):
            raise CheckpointError(f"storage {key!r} is cut short (the file is truncated)")
        (count,) = struct.unpack("<q", data[offset : offset + 8])
        if count != storage.numel:
            raise CheckpointError(f"storage {key!r} holds {count} elements, its id says {storage.numel}")
        offset += 8
        if offset + count * dtype.itemsize > len(data):
            raise CheckpointError(f"storage {key!r} is cut short (the file is truncated)")
        storage.array = np.frombuffer(data, dtype, count=count, offset=offset)  # a view: no copy
        offset += count * dtype.itemsize
    return obj


def read_checkpoint(path: str | os.PathLike[str]) -> tuple[Any, str, FileChecks]:
    """`read_torch_file`, and the `FileChecks` of the file (sha256; zip CRC-32s), still running.

    Storages are views of the file's bytes, read once: a tensor is copied only where its
    layout needs it (non-contiguous) or its consumer does (`keras_ee.interop.torch_import`).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist or is not a file")
    try:
        with open(path, "rb") as f:
            data = f.read()
        if data[:4] == b"PK\x03\x04" or zipfile.is_zipfile(io.BytesIO(data)):
            obj, members = _read_zip(data)
            serialisation = "zip"
        else:
            if len(data) < 2 or data[0] != 0x80:  # every pickle of protocol >= 2 starts with PROTO
                raise CheckpointError("not a torch.save file: neither a zip archive nor a pickle stream")
            obj, members, serialisation = _read_legacy(data), [], "legacy"
        checks = FileChecks(data, members)
        return resolve_tensors(obj), serialisation, checks
    except CheckpointError as e:
        raise type(e)(f"checkpoint {str(path)!r}: {e}") from None


def read_torch_file(path: str | os.PathLike[str]) -> tuple[Any, str]:
    """Reads a `torch.save` file without torch.

    Args:
        path: the checkpoint file.

    Returns:
        `(obj, serialisation)`: the saved object with every tensor a numpy array (float32 for
        bfloat16), and `"zip"` or `"legacy"`.

    Raises:
        FileNotFoundError: no such file.
        UnsafeCheckpointError: the pickle names a global a state_dict never needs (nothing ran).
        CheckpointError: the file is truncated, damaged or not a `torch.save` file.
    """
    obj, serialisation, checks = read_checkpoint(path)
    try:
        checks.sha256()  # the CRC-32 of every zip member
    except CheckpointError as e:
        raise type(e)(f"checkpoint {str(Path(path))!r}: {e}") from None
    return obj, serialisation
