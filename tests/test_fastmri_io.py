"""fastMRI h5 reading and ISMRMRD header parsing."""

from __future__ import annotations

import numpy as np
import pytest

from utils.fastmri_io import FastMRIFile, header_metadata, parse_ismrmrd_header, write_fastmri_h5


@pytest.fixture(scope="module")
def real_header_xml(test_data_dir) -> str:
    return (test_data_dir / "brain_AXFLAIR_siemens_aera_1p5T.xml").read_text()


def test_real_header_values(real_header_xml):
    h = parse_ismrmrd_header(real_header_xml)
    assert (h.TR, h.TE, h.TI, h.flipAngle_deg) == (9000.0, 86.0, 2500.0, 150.0)
    assert h.systemFieldStrength_T == pytest.approx(1.494)
    assert not h.field_strength_from_frequency
    assert (h.systemVendor, h.systemModel) == ("SIEMENS", "Aera")
    assert h.sequence_type == "TurboSpinEcho"
    assert h.echo_spacing == pytest.approx(9.6)
    assert h.receiverChannels == 16
    assert h.institutionName == "TH RADIOLOGY"
    assert h.protocolName == "AX FLAIR_FBB"
    assert h.encoded_matrix == (640, 264, 1)
    assert h.recon_matrix == (320, 260, 1)
    assert h.encoded_fov_mm == pytest.approx((440.0, 181.4312, 7.5))
    assert h.recon_fov_mm == pytest.approx((220.0, 178.75, 5.0))
    assert (h.pe_min, h.pe_max, h.pe_center) == (0, 197, 99)
    assert h.echoTrainLength is None  # absent in this header: missing, not invented


def test_field_strength_falls_back_to_larmor_frequency(real_header_xml):
    xml = real_header_xml.replace("<systemFieldStrength_T>1.494</systemFieldStrength_T>", "")
    h = parse_ismrmrd_header(xml.encode())
    assert h.field_strength_from_frequency
    assert h.systemFieldStrength_T == pytest.approx(63690796 / 42.577e6, abs=1e-3)


def test_missing_fields_are_none():
    h = parse_ismrmrd_header('<ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD"><sequenceParameters><TR>500</TR>'
                             "</sequenceParameters></ismrmrdHeader>")
    assert h.TR == 500.0
    assert h.TE is None and h.systemVendor is None and h.systemFieldStrength_T is None
    meta = header_metadata(h)
    assert meta["TR"] == 500.0 and meta["vendor"] is None and meta["matrix_x"] is None


def test_malformed_header_raises():
    with pytest.raises(ValueError, match="malformed"):
        parse_ismrmrd_header("<ismrmrdHeader><TR>")


def test_h5_round_trip(tmp_path, real_header_xml):
    rng = np.random.default_rng(0)
    k = (rng.standard_normal((3, 4, 16, 8)) + 1j * rng.standard_normal((3, 4, 16, 8))).astype(np.complex64)
    path = tmp_path / "file_brain_AXFLAIR_200_1.h5"
    write_fastmri_h5(path, k, real_header_xml, {"acquisition": "AXFLAIR", "max": 1.5, "patient_id": "abc"})
    with FastMRIFile.open(path) as f:
        assert (f.num_slices, f.num_coils, f.shape) == (3, 4, (16, 8))
        assert f.attrs["acquisition"] == "AXFLAIR" and f.attrs["max"] == 1.5
        np.testing.assert_array_equal(f.read_slice(1), k[1])
        np.testing.assert_array_equal(f.read_kspace(), k)
        assert f.header.TR == 9000.0
        with pytest.raises(IndexError):
            f.read_slice(3)
    meta = header_metadata(f.header, num_coils=4)
    assert meta["num_coils"] == 4 and meta["field_strength"] == pytest.approx(1.494) and meta["fov_x"] == 440.0


def test_truncated_file_raises(tmp_path):
    path = tmp_path / "bad.h5"
    write_fastmri_h5(path, np.zeros((2, 2, 8, 8), np.complex64))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(OSError):
        with FastMRIFile.open(path) as f:
            f.read_kspace()


def test_unusable_header_numbers_are_missing_and_reported(real_header_xml):
    xml = (real_header_xml.replace("<TR>9000</TR>", "<TR>abc</TR>").replace("<TE>86</TE>", "<TE>-1e30</TE>")
           .replace("<TI>2500</TI>", "<TI>inf</TI>")
           .replace("<systemFieldStrength_T>1.494</systemFieldStrength_T>",
                    "<systemFieldStrength_T>300</systemFieldStrength_T>"))  # fmt: skip
    assert xml.count("abc") == 1 and "-1e30" in xml and ">inf<" in xml and ">300<" in xml
    h = parse_ismrmrd_header(xml)
    assert h.TR is None and h.TI is None and h.TE == -1e30  # parsing keeps what is a number; the range check is next
    assert h.unparsable == {"sequenceParameters/TR": "abc", "sequenceParameters/TI": "inf"}
    problems: list[str] = []
    meta = header_metadata(h, num_coils=16, problems=problems)
    assert meta["TR"] is None and meta["TE"] is None and meta["TI"] is None and meta["field_strength"] is None
    assert meta["flip_angle"] == 150.0 and meta["matrix_x"] == 640 and isinstance(meta["matrix_x"], int)
    assert sorted(p.split(":")[0] for p in problems) == ["TE", "TI", "TR", "field_strength"]
    problems = []
    meta = header_metadata(None, num_coils=4, problems=problems)
    assert len(problems) == 1 and "no ismrmrd_header" in problems[0]
    assert meta["num_coils"] == 4 and all(meta[k] is None for k in ("TR", "TE", "vendor", "field_strength"))
