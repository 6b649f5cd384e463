"""Reading fastMRI multi-coil h5 files and their ISMRMRD XML header (docs/formats.md).

A fastMRI file holds ``kspace`` complex64 ``[slices, coils, H, W]`` (H = readout, 2x oversampled; W = phase encode),
optionally ``reconstruction_rss`` ``[slices, 320, 320]``, the XML header ``ismrmrd_header`` and attributes
(``acquisition``, ``max``, ``norm``, ``patient_id``; test files also ``acceleration``, ``num_low_frequency``).
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

ISMRMRD_NS = "http://www.ismrm.org/ISMRMRD"
#: Gyromagnetic ratio of 1H over 2π, Hz/T: B0 = f / γ̄ when systemFieldStrength_T is absent.
GAMMA_BAR_HZ_PER_T = 42.577e6


@dataclass
class IsmrmrdHeader:
    """The fields of an ISMRMRD header this project uses; ``None`` where the header does not say.

    Times are in ms, angles in degrees, field strength in T, field of view in mm.
    """

    TR: float | None = None
    TE: float | None = None
    TI: float | None = None
    flipAngle_deg: float | None = None
    sequence_type: str | None = None
    echo_spacing: float | None = None
    systemFieldStrength_T: float | None = None
    systemVendor: str | None = None
    systemModel: str | None = None
    receiverChannels: int | None = None
    institutionName: str | None = None
    protocolName: str | None = None
    patientPosition: str | None = None
    H1resonanceFrequency_Hz: float | None = None
    #: ``(x, y, z)`` of ``encoding/encodedSpace/matrixSize`` etc.; entries ``None`` when absent.
    encoded_matrix: tuple[int | None, int | None, int | None] = (None, None, None)
    encoded_fov_mm: tuple[float | None, float | None, float | None] = (None, None, None)
    recon_matrix: tuple[int | None, int | None, int | None] = (None, None, None)
    recon_fov_mm: tuple[float | None, float | None, float | None] = (None, None, None)
    #: ``encodingLimits/kspace_encoding_step_1`` minimum / maximum / center.
    pe_min: int | None = None
    pe_max: int | None = None
    pe_center: int | None = None
    echoTrainLength: int | None = None
    #: True when the field strength came from the H1 resonance frequency (no ``systemFieldStrength_T``).
    field_strength_from_frequency: bool = False
    #: Header paths whose text is not a number (e.g. ``sequenceParameters/TR: "abc"``): read as ``None``.
    unparsable: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _find(root: ET.Element, path: str) -> ET.Element | None:
    ns_path = "/".join(f"{{{ISMRMRD_NS}}}{p}" for p in path.split("/"))
    el = root.find(ns_path)
    if el is None:  # headers written without the namespace
        el = root.find(path)
    return el


def _text(root: ET.Element, path: str) -> str | None:
    el = _find(root, path)
    if el is None or el.text is None or not el.text.strip():
        return None
    return el.text.strip()


def _float(root: ET.Element, path: str, bad: dict[str, str] | None = None) -> float | None:
    """The number at ``path``; ``None`` when absent, unparsable or non-finite (recorded in ``bad``)."""
    text = _text(root, path)
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        if bad is not None:
            bad[path] = text
        return None
    return value


def _int(root: ET.Element, path: str, bad: dict[str, str] | None = None) -> int | None:
    value = _float(root, path, bad)
    return None if value is None else int(round(value))


def parse_ismrmrd_header(xml: str | bytes) -> IsmrmrdHeader:
    """Parse an ISMRMRD XML header (namespace ``http://www.ismrm.org/ISMRMRD``).

    Only the first ``encoding`` element is read. Missing, unparsable or non-finite fields are ``None`` (the
    unparsable/non-finite ones are listed in :attr:`IsmrmrdHeader.unparsable`). The field strength falls
    back to ``H1resonanceFrequency_Hz / 42.577e6`` (rounded to 3 decimals) when ``systemFieldStrength_T`` is absent.

    Args:
        xml: the header text (``str`` or the ``bytes`` stored in ``ismrmrd_header``).

    Raises:
        ValueError: the text is not well-formed XML.
    """
    if isinstance(xml, (bytes, bytearray, np.bytes_)):
        xml = bytes(xml).decode("utf-8", errors="replace")
    try:
        root = ET.fromstring(xml.strip())
    except ET.ParseError as exc:
        raise ValueError(f"malformed ISMRMRD header: {exc}") from exc

    bad: dict[str, str] = {}
    seq = "sequenceParameters"
    sysinfo = "acquisitionSystemInformation"
    enc = "encoding"
    hdr = IsmrmrdHeader(
        TR=_float(root, f"{seq}/TR", bad),
        TE=_float(root, f"{seq}/TE", bad),
        TI=_float(root, f"{seq}/TI", bad),
        flipAngle_deg=_float(root, f"{seq}/flipAngle_deg", bad),
        sequence_type=_text(root, f"{seq}/sequence_type"),
        echo_spacing=_float(root, f"{seq}/echo_spacing", bad),
        systemFieldStrength_T=_float(root, f"{sysinfo}/systemFieldStrength_T", bad),
        systemVendor=_text(root, f"{sysinfo}/systemVendor"),
        systemModel=_text(root, f"{sysinfo}/systemModel"),
        receiverChannels=_int(root, f"{sysinfo}/receiverChannels", bad),
        institutionName=_text(root, f"{sysinfo}/institutionName"),
        protocolName=_text(root, "measurementInformation/protocolName"),
        patientPosition=_text(root, "measurementInformation/patientPosition"),
        H1resonanceFrequency_Hz=_float(root, "experimentalConditions/H1resonanceFrequency_Hz", bad),
        encoded_matrix=tuple(_int(root, f"{enc}/encodedSpace/matrixSize/{a}", bad) for a in "xyz"),
        encoded_fov_mm=tuple(_float(root, f"{enc}/encodedSpace/fieldOfView_mm/{a}", bad) for a in "xyz"),
        recon_matrix=tuple(_int(root, f"{enc}/reconSpace/matrixSize/{a}", bad) for a in "xyz"),
        recon_fov_mm=tuple(_float(root, f"{enc}/reconSpace/fieldOfView_mm/{a}", bad) for a in "xyz"),
        pe_min=_int(root, f"{enc}/encodingLimits/kspace_encoding_step_1/minimum", bad),
        pe_max=_int(root, f"{enc}/encodingLimits/kspace_encoding_step_1/maximum", bad),
        pe_center=_int(root, f"{enc}/encodingLimits/kspace_encoding_step_1/center", bad),
        echoTrainLength=_int(root, f"{enc}/echoTrainLength", bad),
        unparsable=bad,
    )
    if hdr.systemFieldStrength_T is None and hdr.H1resonanceFrequency_Hz:
        hdr.systemFieldStrength_T = round(hdr.H1resonanceFrequency_Hz / GAMMA_BAR_HZ_PER_T, 3)
        hdr.field_strength_from_frequency = True
    return hdr


def _decode_attr(value: Any) -> Any:
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, np.generic):
        return value.item()
    return value


@dataclass
class FastMRIFile:
    """An open fastMRI h5 file; read slices lazily so a 20-coil volume never sits whole in memory.

    Use as a context manager::

        with FastMRIFile.open(path) as f:
            k = f.read_slice(3)   # complex64 [C, H, W]

    Attributes:
        path: the file.
        num_slices, num_coils, shape: ``kspace`` is ``[num_slices, num_coils, *shape]``.
        attrs: the file attributes (bytes decoded to ``str``, numpy scalars to Python).
        header: the parsed ISMRMRD header, or ``None`` if the file has none.
        header_xml: the raw header text, or ``None``.
    """

    path: Path
    num_slices: int
    num_coils: int
    shape: tuple[int, int]
    attrs: dict[str, Any]
    header: IsmrmrdHeader | None
    header_xml: str | None
    _h5: h5py.File | None = field(default=None, repr=False)

    @classmethod
    def open(cls, path: str | Path) -> "FastMRIFile":
        """Open ``path`` and validate the ``kspace`` dataset.

        Raises:
            OSError: the file is not a readable HDF5 file (e.g. truncated).
            ValueError: no 4-D ``kspace`` dataset.
        """
        path = Path(path)
        h5 = h5py.File(path, "r")
        try:
            if "kspace" not in h5:
                raise ValueError(f"{path}: no 'kspace' dataset")
            ds = h5["kspace"]
            if ds.ndim != 4:
                raise ValueError(f"{path}: expected kspace [slices, coils, H, W], got shape {ds.shape}")
            attrs = {k: _decode_attr(v) for k, v in h5.attrs.items()}
            header_xml = None
            header = None
            if "ismrmrd_header" in h5:
                raw = h5["ismrmrd_header"][()]
                header_xml = bytes(raw).decode("utf-8", errors="replace") if not isinstance(raw, str) else raw
                header = parse_ismrmrd_header(header_xml)
        except Exception:
            h5.close()
            raise
        return cls(
            path=path,
            num_slices=int(ds.shape[0]),
            num_coils=int(ds.shape[1]),
            shape=(int(ds.shape[2]), int(ds.shape[3])),
            attrs=attrs,
            header=header,
            header_xml=header_xml,
            _h5=h5,
        )

    def read_slice(self, idx: int) -> np.ndarray:
        """K-space of one slice, complex64 ``[C, H, W]``."""
        if self._h5 is None:
            raise RuntimeError(f"{self.path} is closed")
        if not 0 <= idx < self.num_slices:
            raise IndexError(f"slice {idx} out of range [0, {self.num_slices})")
        return np.asarray(self._h5["kspace"][idx], dtype=np.complex64)

    def read_kspace(self) -> np.ndarray:
        """The whole volume, complex64 ``[S, C, H, W]``."""
        if self._h5 is None:
            raise RuntimeError(f"{self.path} is closed")
        return np.asarray(self._h5["kspace"][()], dtype=np.complex64)

    def close(self) -> None:
        if self._h5 is not None:
            self._h5.close()
            self._h5 = None

    def __enter__(self) -> "FastMRIFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_fastmri_h5(
    path: str | Path,
    kspace: np.ndarray,
    header_xml: str | None = None,
    attrs: dict[str, Any] | None = None,
    reconstruction_rss: np.ndarray | None = None,
) -> None:
    """Write a file in the fastMRI multi-coil format (used by tests and tools; the simulator has its own writer).

    Args:
        kspace: complex ``[S, C, H, W]``.
        header_xml: ISMRMRD XML text stored as bytes in ``ismrmrd_header``.
        attrs: file attributes (e.g. ``acquisition``, ``max``, ``norm``, ``patient_id``).
        reconstruction_rss: optional float32 ``[S, h, w]``.
    """
    with h5py.File(path, "w") as f:
        f.create_dataset("kspace", data=np.asarray(kspace, dtype=np.complex64))
        if header_xml is not None:
            f.create_dataset("ismrmrd_header", data=np.bytes_(header_xml.encode("utf-8")))
        if reconstruction_rss is not None:
            f.create_dataset("reconstruction_rss", data=np.asarray(reconstruction_rss, dtype=np.float32))
        for key, value in (attrs or {}).items():
            f.attrs[key] = value


#: CSV column of each header field we read as a number (for the per-file warnings).
_HEADER_COLUMN = {
    "sequenceParameters/TR": "TR",
    "sequenceParameters/TE": "TE",
    "sequenceParameters/TI": "TI",
    "sequenceParameters/flipAngle_deg": "flip_angle",
    "acquisitionSystemInformation/systemFieldStrength_T": "field_strength",
    "experimentalConditions/H1resonanceFrequency_Hz": "field_strength",
    "encoding/encodedSpace/matrixSize/x": "matrix_x",
    "encoding/encodedSpace/matrixSize/y": "matrix_y",
    "encoding/encodedSpace/fieldOfView_mm/x": "fov_x",
    "encoding/encodedSpace/fieldOfView_mm/y": "fov_y",
}


def header_metadata(
    header: IsmrmrdHeader | None, num_coils: int | None = None, problems: list[str] | None = None
) -> dict[str, Any]:
    """Metadata-CSV values from a header (columns ``sequence, TR, TE, TI, flip_angle`` and the extra columns).

    ``num_coils`` (the k-space coil count) wins over ``receiverChannels``: fastMRI data may be coil-compressed.
    Matrix and FOV come from the encoded space (the acquired grid). Missing values are ``None``; so are unparsable,
    non-finite and implausible numbers (``utils.metadata.NUMERIC_RANGES``: a negative TR, a 0 T or 300 T field).

    Args:
        header: the parsed header, or ``None`` when the file has none (every header column is then empty).
        num_coils: coils of the k-space.
        problems: if given, receives one line per dropped value (or one line for a missing header).
    """
    from utils.metadata import clean_numbers

    notes: list[str] = []
    if header is None:
        notes.append("no ismrmrd_header: sequence, TR, TE, TI, flip angle, field strength, scanner, matrix, FOV "
                     "left empty")
    h = header or IsmrmrdHeader()
    for path, text in h.unparsable.items():
        column = _HEADER_COLUMN.get(path)
        if column is not None:
            notes.append(f"{column}: header {path} = {text!r} is not a finite number -> missing")
    raw = {
        "sequence": h.sequence_type,
        "TR": h.TR,
        "TE": h.TE,
        "TI": h.TI,
        "flip_angle": h.flipAngle_deg,
        "field_strength": h.systemFieldStrength_T,
        "vendor": h.systemVendor,
        "scanner_model": h.systemModel,
        "protocol_name": h.protocolName,
        "num_coils": num_coils if num_coils is not None else h.receiverChannels,
        "matrix_x": h.encoded_matrix[0],
        "matrix_y": h.encoded_matrix[1],
        "fov_x": h.encoded_fov_mm[0],
        "fov_y": h.encoded_fov_mm[1],
    }
    meta, dropped = clean_numbers(raw)
    # clean_numbers returns floats; keep the header's ints as ints (they are written the same way in the CSV)
    meta = {k: (raw[k] if meta[k] is not None and isinstance(raw[k], int) else meta[k]) for k in raw}
    notes += [f"{line} (header value)" for line in dropped]
    if problems is not None:
        problems.extend(notes)
    return meta
