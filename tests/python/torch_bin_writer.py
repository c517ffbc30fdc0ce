#!/usr/bin/env python3
"""Write a `pytorch_model.bin` in torch.save's zip layout from a `model.safetensors`, without
PyTorch: Python's own pickle module writes the state_dict pickle (an OrderedDict of
`torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())` calls,
storages as persistent ids `('storage', torch.<X>Storage, key, 'cpu', numel)`), and zipfile stores
one uncompressed entry per storage — the same records torch.save writes.

It is an independent writer for ggpt's reader: shapes PyTorch fixtures do not cover (GPT-2 XL,
distilgpt2, GPT-2 Medium for timing) are made from `ggpt synth` checkpoints with it.

Usage: torch_bin_writer.py SRC_DIR DST_DIR [--tie-head]
Copies config.json / vocab.json / merges.txt from SRC_DIR and writes DST_DIR/pytorch_model.bin.
--tie-head adds `lm_head.weight` sharing `wte.weight`'s storage (as GPT2LMHeadModel saves it).
"""

import collections
import json
import mmap
import pickle
import shutil
import sys
import types
import zipfile
from pathlib import Path

# Stand-ins for the few torch names the pickle refers to. pickle stores a global as
# "module\nname" after checking that importing it gives back the same object, so they are
# registered as modules; nothing here is ever called.
_torch = types.ModuleType("torch")
_utils = types.ModuleType("torch._utils")


def _rebuild_tensor_v2(*args):
    raise RuntimeError("only pickled, never called")


_rebuild_tensor_v2.__module__ = "torch._utils"
_utils._rebuild_tensor_v2 = _rebuild_tensor_v2
_torch._utils = _utils
STORAGE = {}
for st_dtype, cls_name, size in [
    ("F32", "FloatStorage", 4),
    ("F16", "HalfStorage", 2),
    ("BF16", "BFloat16Storage", 2),
    ("U8", "ByteStorage", 1),
    ("BOOL", "BoolStorage", 1),
]:
    cls = type(cls_name, (), {"__module__": "torch"})
    setattr(_torch, cls_name, cls)
    STORAGE[st_dtype] = (cls, size)
sys.modules.setdefault("torch", _torch)
sys.modules.setdefault("torch._utils", _utils)


class Storage:
    def __init__(self, cls, key, numel):
        self.cls, self.key, self.numel = cls, key, numel


class Tensor:
    def __init__(self, storage, shape):
        self.storage, self.shape = storage, tuple(shape)

    def __reduce__(self):
        stride, acc = [], 1
        for d in reversed(self.shape):
            stride.append(acc)
            acc *= d
        return (_rebuild_tensor_v2, (self.storage, 0, self.shape, tuple(reversed(stride)), False, collections.OrderedDict()))


class Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return ("storage", obj.cls, obj.key, "cpu", obj.numel)
        return None


def main():
    src, dst = Path(sys.argv[1]), Path(sys.argv[2])
    tie = "--tie-head" in sys.argv[3:]
    dst.mkdir(parents=True, exist_ok=True)
    for f in ("config.json", "vocab.json", "merges.txt"):
        shutil.copy(src / f, dst / f)
    with open(src / "model.safetensors", "rb") as fh:
        m = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        n = int.from_bytes(m[:8], "little")
        header = json.loads(m[8 : 8 + n])
        header.pop("__metadata__", None)
        base = 8 + n
        sd = collections.OrderedDict()
        blobs = []
        for i, (name, info) in enumerate(sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])):
            cls, size = STORAGE[info["dtype"]]
            a, b = info["data_offsets"]
            st = Storage(cls, str(i), (b - a) // size)
            sd[name] = Tensor(st, info["shape"])
            blobs.append((st.key, base + a, base + b))
        if tie:
            wte = next(k for k in sd if k.endswith("wte.weight"))
            sd["lm_head.weight"] = Tensor(sd[wte].storage, sd[wte].shape)
        out = dst / "pytorch_model.bin"
        with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as z:
            with z.open("archive/data.pkl", "w") as f:
                Pickler(f, protocol=2).dump(sd)
            z.writestr("archive/byteorder", "little")
            for key, a, b in blobs:
                with z.open(f"archive/data/{key}", "w", force_zip64=(b - a) > 2**31) as f:
                    for off in range(a, b, 1 << 24):
                        f.write(m[off : min(b, off + (1 << 24))])
            z.writestr("archive/version", "3\n")


if __name__ == "__main__":
    main()
