"""ISMRMRD XML header writer for simulated fastMRI volumes.

Writes every element of a real fastMRI brain header (docs/formats.md; element order as Siemens-converted fastMRI files
have it), so readers that look up ``sequenceParameters/TR``, ``encoding/encodingLimits/kspace_encoding_step_1/center``
and friends find exactly what they would in a real file. The result validates against the ISMRMRD schema
(``ismrmrd.xsd.CreateFromDocument``).
"""

from __future__ import annotations

from dataclasses import dataclass
from xml.sax.saxutils import escape

from utils.simulation.acquisition import Protocol

NAMESPACE = "http://www.ismrm.org/ISMRMRD"
GYROMAGNETIC_MHZ_PER_T = 42.577478


@dataclass(frozen=True)
class EncodingInfo:
    """Geometry of a fastMRI-style 2-D multi-slice Cartesian acquisition.

    Attributes:
        encoded_matrix: ``(x, y)`` = (oversampled readout H, phase-encode W of the stored k-space).
        recon_matrix: ``(x, y)`` = (H // 2, W).
        encoded_fov_mm: ``(x, y, z)``.
        recon_fov_mm: ``(x, y, z)``.
        pe_center: ``kspace_encoding_step_1/center``.
        pe_maximum: ``kspace_encoding_step_1/maximum`` (acquired lines − 1).
        num_slices: slices in the volume (``encodingLimits/slice/maximum`` = S − 1).
    """

    encoded_matrix: tuple[int, int]
    recon_matrix: tuple[int, int]
    encoded_fov_mm: tuple[float, float, float]
    recon_fov_mm: tuple[float, float, float]
    pe_center: int
    pe_maximum: int
    num_slices: int


@dataclass(frozen=True)
class SessionInfo:
    """Per-series identifiers: study time, measurement ID, frame-of-reference UID, coil element numbers."""

    study_time: str
    measurement_id: str
    frame_of_reference_uid: str
    coil_numbers: tuple[int, ...]


def _num(v: float) -> str:
    """Format a number the way the converter does: integers without a decimal point, otherwise up to 7 digits."""
    f = float(v)
    if f.is_integer():
        return str(int(f))
    return f"{f:.7g}"


def _limit(name: str, minimum: int, maximum: int, center: int) -> str:
    return (
        f"         <{name}><minimum>{minimum}</minimum><maximum>{maximum}</maximum>"
        f"<center>{center}</center></{name}>"
    )


def build_header_xml(protocol: Protocol, enc: EncodingInfo, session: SessionInfo) -> str:
    """Build the ISMRMRD header of one simulated series.

    Args:
        protocol: sampled protocol (sequence parameters, scanner, names).
        enc: encoding geometry.
        session: identifiers.

    Returns:
        The XML document (str, UTF-8 declaration).
    """
    acq, sc = protocol.acq, protocol.scanner
    h1_hz = int(round(sc.field_strength * GYROMAGNETIC_MHZ_PER_T * 1e6))
    coil_labels = "\n".join(
        f"      <coilLabel><coilNumber>{n}</coilNumber><coilName>{escape(sc.coil_name)}:1:H{i + 1}</coilName></coilLabel>"
        for i, n in enumerate(session.coil_numbers)
    )
    lines = [
        '<?xml version="1.0" encoding="utf-8"?>',
        f'<ismrmrdHeader xmlns="{NAMESPACE}" xmlns:xs="http://www.w3.org/2001/XMLSchema" '
        'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
        f'xsi:schemaLocation="{NAMESPACE} ismrmrd.xsd">',
        "   <studyInformation>",
        f"      <studyTime>{session.study_time}</studyTime>",
        "   </studyInformation>",
        "   <measurementInformation>",
        f"      <measurementID>{escape(session.measurement_id)}</measurementID>",
        "      <patientPosition>HFS</patientPosition>",
        f"      <protocolName>{escape(protocol.protocol_name)}</protocolName>",
        f"      <frameOfReferenceUID>{session.frame_of_reference_uid}</frameOfReferenceUID>",
        "   </measurementInformation>",
        "   <acquisitionSystemInformation>",
        f"      <systemVendor>{escape(sc.vendor)}</systemVendor>",
        f"      <systemModel>{escape(sc.model)}</systemModel>",
        f"      <systemFieldStrength_T>{_num(sc.field_strength)}</systemFieldStrength_T>",
        "      <relativeReceiverNoiseBandwidth>0.793</relativeReceiverNoiseBandwidth>",
        f"      <receiverChannels>{len(session.coil_numbers)}</receiverChannels>",
        coil_labels,
        f"      <institutionName>{escape(protocol.institution)}</institutionName>",
        "   </acquisitionSystemInformation>",
        "   <experimentalConditions>",
        f"      <H1resonanceFrequency_Hz>{h1_hz}</H1resonanceFrequency_Hz>",
        "   </experimentalConditions>",
        "   <encoding>",
        "      <encodedSpace>",
        f"         <matrixSize><x>{enc.encoded_matrix[0]}</x><y>{enc.encoded_matrix[1]}</y><z>1</z></matrixSize>",
        "         <fieldOfView_mm><x>{}</x><y>{}</y><z>{}</z></fieldOfView_mm>".format(
            *(_num(v) for v in enc.encoded_fov_mm)
        ),
        "      </encodedSpace>",
        "      <reconSpace>",
        f"         <matrixSize><x>{enc.recon_matrix[0]}</x><y>{enc.recon_matrix[1]}</y><z>1</z></matrixSize>",
        "         <fieldOfView_mm><x>{}</x><y>{}</y><z>{}</z></fieldOfView_mm>".format(*(_num(v) for v in enc.recon_fov_mm)),
        "      </reconSpace>",
        "      <trajectory>cartesian</trajectory>",
        "      <encodingLimits>",
        _limit("kspace_encoding_step_1", 0, enc.pe_maximum, enc.pe_center),
        _limit("kspace_encoding_step_2", 0, 0, 0),
        _limit("average", 0, 0, 0),
        _limit("slice", 0, enc.num_slices - 1, 0),
        _limit("contrast", 0, 0, 0),
        _limit("phase", 0, 0, 0),
        _limit("repetition", 0, 0, 0),
        _limit("set", 0, 0, 0),
        _limit("segment", 0, 0, 0),
        "      </encodingLimits>",
        "      <parallelImaging>",
        "         <accelerationFactor><kspace_encoding_step_1>1</kspace_encoding_step_1>"
        "<kspace_encoding_step_2>1</kspace_encoding_step_2></accelerationFactor>",
        "         <calibrationMode>other</calibrationMode>",
        "      </parallelImaging>",
    ]
    if protocol.echo_train_length is not None:
        lines.append(f"      <echoTrainLength>{protocol.echo_train_length}</echoTrainLength>")
    lines += [
        "   </encoding>",
        "   <sequenceParameters>",
        f"      <TR>{_num(acq.tr)}</TR>",
        f"      <TE>{_num(acq.te)}</TE>",
    ]
    if acq.ti is not None:
        lines.append(f"      <TI>{_num(acq.ti)}</TI>")
    lines += [
        f"      <flipAngle_deg>{_num(acq.flip_angle)}</flipAngle_deg>",
        f"      <sequence_type>{escape(acq.sequence)}</sequence_type>",
        f"      <echo_spacing>{_num(protocol.echo_spacing)}</echo_spacing>",
        "   </sequenceParameters>",
        "   <userParameters>",
        "      <userParameterDouble><name>MaxwellCoefficient_0</name><value>0</value></userParameterDouble>",
        "   </userParameters>",
        "</ismrmrdHeader>",
    ]
    return "\n".join(lines) + "\n"
