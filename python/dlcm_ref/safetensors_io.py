"""Minimal safetensors reader/writer (SPEC section 9) with struct + json + numpy.

Layout: 8-byte little-endian unsigned header length N, then N bytes of JSON
{name: {"dtype", "shape", "data_offsets": [begin, end]}, optional "__metadata__": {str: str}},
then the data section (offsets are relative to its start). Tensors are little-endian, C order.
"""
import json
import struct

import numpy as np

_DTYPES = {
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "I32": np.dtype("<i4"),
    "I64": np.dtype("<i8"),
    "U8": np.dtype("u1"),
}
_MAX_HEADER = 100 * 1024 * 1024


def _bf16_to_f32(raw):
    u16 = np.frombuffer(raw, dtype="<u2").astype(np.uint32)
    return (u16 << 16).view(np.float32)


def read_safetensors(path):
    """Returns (dict name -> numpy array, metadata dict). BF16 is widened to float32."""
    with open(path, "rb") as f:
        blob = f.read()
    if len(blob) < 8:
        raise ValueError(f"{path}: file too short for a safetensors header")
    (n,) = struct.unpack("<Q", blob[:8])
    if n > _MAX_HEADER or 8 + n > len(blob):
        raise ValueError(f"{path}: header length {n} is out of bounds (file has {len(blob)} bytes)")
    header = json.loads(blob[8:8 + n].decode("utf-8"))
    data = memoryview(blob)[8 + n:]
    meta = header.pop("__metadata__", {}) or {}
    out = {}
    spans = []
    for name, e in header.items():
        dt, shape, (b, en) = e["dtype"], [int(s) for s in e["shape"]], e["data_offsets"]
        if not (0 <= b <= en <= len(data)):
            raise ValueError(f"{path}: tensor '{name}' offsets [{b},{en}) out of bounds")
        count = int(np.prod(shape)) if shape else 1
        if dt == "BF16":
            if en - b != 2 * count:
                raise ValueError(f"{path}: tensor '{name}' size mismatch")
            arr = _bf16_to_f32(bytes(data[b:en])).reshape(shape)
        else:
            if dt not in _DTYPES:
                raise ValueError(f"{path}: tensor '{name}' has unsupported dtype {dt}")
            npdt = _DTYPES[dt]
            if en - b != npdt.itemsize * count:
                raise ValueError(f"{path}: tensor '{name}' size {en - b} != {npdt.itemsize}*{count}")
            arr = np.frombuffer(bytes(data[b:en]), dtype=npdt).reshape(shape).copy()
        spans.append((b, en, name))
        out[name] = arr
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise ValueError(f"{path}: tensors '{n0}' and '{n1}' overlap")
    return out, meta


def write_safetensors(path, tensors, metadata=None):
    """tensors: dict name -> numpy array (float32 -> F32, int32 -> I32; other floats are cast to
    float32, other ints to int32). Names are written in sorted order, data 8-byte aligned."""
    header = {}
    chunks = []
    offset = 0
    for name in sorted(tensors):
        a = np.asarray(tensors[name])
        if a.dtype.kind == "f":
            a, dt = np.ascontiguousarray(a, dtype="<f4"), "F32"
        elif a.dtype.kind in "iub":
            a, dt = np.ascontiguousarray(a, dtype="<i4"), "I32"
        else:
            raise ValueError(f"cannot write tensor '{name}' of dtype {a.dtype}")
        raw = a.tobytes()
        header[name] = {"dtype": dt, "shape": list(a.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    hj = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hj += b" " * ((8 - len(hj) % 8) % 8)  # pad with spaces so the data section is aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hj)))
        f.write(hj)
        for c in chunks:
            f.write(c)
