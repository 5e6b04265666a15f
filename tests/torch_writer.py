"""A minimal torch-free writer of `torch.save`'s legacy serialisation, for negative controls.

Writes what torch 0.4-1.5 (or `_use_new_zipfile_serialization=False`) writes for a dict of
tensors: the magic number, the protocol version, system information, the main pickle (tensors as
`torch._utils._rebuild_tensor_v2` of a persistent storage id), the storage keys and the raw
storages. Used to write real files from edited copies of the fixtures' state_dicts.
"""

import collections
import pickle
import struct

import numpy as np

MAGIC = 0x1950A86A20F9469CFC6C
STORAGE_TYPES = {np.dtype("float32"): "FloatStorage", np.dtype("int64"): "LongStorage"}


class Global:
    """A reference to `module.name` in the pickle (the pure-Python pickler writes GLOBAL)."""

    def __init__(self, module, name):
        self.module, self.name = module, name


class Call:
    """`func(*args)` in the pickle (REDUCE)."""

    def __init__(self, func, args):
        self.func, self.args = func, args


class _Storage:
    def __init__(self, key, array):
        self.key, self.array = key, array


class _Pickler(pickle._Pickler):
    dispatch = dict(pickle._Pickler.dispatch)

    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            kind = Global("torch", STORAGE_TYPES[obj.array.dtype])
            return ("storage", kind, obj.key, "cpu", obj.array.size, None)
        return None

    def _save_global(self, obj):
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())

    def _save_call(self, obj):
        self.save(obj.func)
        self.save(obj.args)
        self.write(pickle.REDUCE)

    dispatch[Global] = _save_global
    dispatch[Call] = _save_call


def tensor_calls(state_dict):
    """`(OrderedDict of Call, storages)` for a dict of numpy arrays."""
    storages, out = [], collections.OrderedDict()
    for i, (key, value) in enumerate(state_dict.items()):
        array = np.array(value, order="C")  # (np.ascontiguousarray would make a 0-d array 1-d)
        storage = _Storage(str(i), array.reshape(-1))
        storages.append(storage)
        stride = tuple(int(np.prod(array.shape[j + 1 :])) for j in range(array.ndim))
        rebuild = Global("torch._utils", "_rebuild_tensor_v2")
        out[key] = Call(rebuild, (storage, 0, tuple(array.shape), stride, False, collections.OrderedDict()))
    return out, storages


def write_legacy(path, obj, storages=()):
    """Writes `obj` (plain containers, `Call`s, `Global`s) with `storages` in the legacy layout."""
    with open(path, "wb") as f:
        pickle.dump(MAGIC, f, protocol=2)
        pickle.dump(1001, f, protocol=2)
        pickle.dump({"protocol_version": 1001, "little_endian": True, "type_sizes": {"int": 4}}, f, protocol=2)
        _Pickler(f, protocol=2).dump(obj)
        pickle.dump([s.key for s in storages], f, protocol=2)
        for s in storages:
            f.write(struct.pack("<q", s.array.size))
            f.write(s.array.tobytes())
    return path


def write_state_dict(path, state_dict):
    """A bare state_dict of numpy arrays as a legacy `torch.save` file."""
    obj, storages = tensor_calls(state_dict)
    return write_legacy(path, obj, storages)
