"""MATLAB v7.3 MAT-file writer and reader (the format of CMRxRecon data).

A v7.3 MAT-file is an HDF5 file with a 512-byte user block whose first 128 bytes are MATLAB's text header
(``"MATLAB 7.3 MAT-file, Platform: ..., Created on: ... HDF5 schema 1.00 ."`` padded with spaces to 116 bytes, an
8-byte subsystem offset, version ``0x0200`` and the endian indicator ``"IM"``). Each variable is a root dataset with a
``MATLAB_class`` attribute (``"double"``, ``"single"``, ...). MATLAB stores arrays column-major, so h5py sees the
dimensions reversed: a MATLAB ``kx × ky × coils × slices × time`` array appears as ``(time, slices, coils, ky, kx)``.
Complex arrays are a compound type with fields ``real`` and ``imag``.

:func:`save_mat_v73` takes arrays in MATLAB dimension order (what ``size()`` reports in MATLAB, what the CMRxRecon
documentation states) and :func:`load_mat_v73` returns them in that order again.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

USERBLOCK_SIZE = 512
_MATLAB_CLASS: dict[np.dtype, str] = {
    np.dtype(np.float64): "double",
    np.dtype(np.float32): "single",
    np.dtype(np.int8): "int8",
    np.dtype(np.uint8): "uint8",
    np.dtype(np.int16): "int16",
    np.dtype(np.uint16): "uint16",
    np.dtype(np.int32): "int32",
    np.dtype(np.uint32): "uint32",
    np.dtype(np.int64): "int64",
    np.dtype(np.uint64): "uint64",
}
DEFAULT_CREATED = "Mon Jan  1 00:00:00 2024"


def mat_header(created: str = DEFAULT_CREATED, platform: str = "GLNXA64") -> bytes:
    """The 128-byte MATLAB 7.3 header text block.

    Args:
        created: timestamp text (MATLAB's ``datestr`` style, e.g. ``"Mon Jan  1 00:00:00 2024"``); fixed by default so
            the same inputs give byte-identical files.
        platform: MATLAB platform string.

    Returns:
        Exactly 128 bytes.
    """
    text = f"MATLAB 7.3 MAT-file, Platform: {platform}, Created on: {created} HDF5 schema 1.00 ."
    head = text.encode("ascii").ljust(116, b" ")[:116]
    return head + b" " * 8 + (0x0200).to_bytes(2, "little") + b"IM"


def _complex_compound(dtype: np.dtype) -> np.dtype:
    part = np.float32 if dtype == np.complex64 else np.float64
    return np.dtype([("real", part), ("imag", part)])


def save_mat_v73(path: str | Path, variables: dict[str, np.ndarray], created: str = DEFAULT_CREATED) -> None:
    """Write variables to a MATLAB v7.3 MAT-file.

    Args:
        path: output file.
        variables: name → array in MATLAB dimension order (1-D arrays become row vectors ``1 × n``). Supported: real
            floats/ints, complex64/complex128 (stored as ``single``/``double`` complex), bool (``logical``).
            Written in the given order.
        created: the timestamp text of the header block.

    Raises:
        TypeError: for an unsupported dtype.
    """
    path = Path(path)
    with h5py.File(path, "w", userblock_size=USERBLOCK_SIZE, libver="earliest") as f:
        for name, value in variables.items():
            arr = np.asarray(value)
            if arr.ndim == 0:
                arr = arr.reshape(1, 1)
            elif arr.ndim == 1:
                arr = arr.reshape(1, -1)
            # MATLAB is column-major: its dims reversed are the C-order dims of the transpose.
            data = np.ascontiguousarray(arr.T)
            if np.iscomplexobj(data):
                comp = np.empty(data.shape, dtype=_complex_compound(data.dtype))
                comp["real"], comp["imag"] = data.real, data.imag
                data, cls = comp, "single" if arr.dtype == np.complex64 else "double"
            elif data.dtype == np.bool_:
                data, cls = data.astype(np.uint8), "logical"
            elif data.dtype in _MATLAB_CLASS:
                cls = _MATLAB_CLASS[data.dtype]
            else:
                raise TypeError(f"cannot store dtype {arr.dtype} of {name!r} in a MAT-file")
            ds = f.create_dataset(name, data=data, track_times=False)
            ds.attrs.create("MATLAB_class", np.bytes_(cls))
            if cls == "logical":
                ds.attrs.create("MATLAB_int_decode", np.int32(1))
    with open(path, "r+b") as fh:
        fh.write(mat_header(created))


def is_mat_v73(path: str | Path) -> bool:
    """True if ``path`` starts with a MATLAB 7.3 header and is HDF5."""
    with open(path, "rb") as fh:
        head = fh.read(128)
    return head.startswith(b"MATLAB 7.3 MAT-file") and h5py.is_hdf5(path)


def load_mat_v73(path: str | Path, names: list[str] | None = None) -> dict[str, np.ndarray]:
    """Read variables of a v7.3 MAT-file in MATLAB dimension order.

    Args:
        path: the file.
        names: variables to read (default: every root dataset carrying a ``MATLAB_class`` attribute).

    Returns:
        name → array (complex compounds become complex64/complex128; ``logical`` becomes bool).
    """
    out: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as f:
        keys = names if names is not None else [k for k in f if "MATLAB_class" in f[k].attrs]
        for k in keys:
            ds = f[k]
            data = ds[()]
            if data.dtype.names is not None and {"real", "imag"} <= set(data.dtype.names):
                cdt = np.complex64 if data.dtype["real"] == np.float32 else np.complex128
                data = data["real"] + 1j * data["imag"]
                data = data.astype(cdt)
            cls = ds.attrs.get("MATLAB_class", b"")
            cls = cls.decode() if isinstance(cls, bytes) else str(cls)
            if cls == "logical":
                data = data.astype(bool)
            out[k] = np.asarray(data).T
    return out
