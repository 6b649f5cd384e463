"""Metadata records, the ContextMRI prompt and stats files, against the real fastMRI metadata."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from utils.metadata import (
    build_prompt,
    compute_metadata_stats,
    load_metadata_stats,
    load_records,
    mismatched_record,
    parse_pathology,
    record_from_row,
    save_metadata_stats,
)


def test_prompt_reproduces_the_released_example_prompts(test_data_dir):
    """The prompt built from the real knee CSV row equals the prompt shipped with the real slice."""
    knee = [r for r in load_records(test_data_dir / "metadata_val_knee.csv")
            if r["filename"] == "file1001429" and r["slice"] == 20]
    assert len(knee) == 1
    assert build_prompt(knee[0]) == (test_data_dir / "prompt_knee_file1001429_020.txt").read_text().strip()
    brain = record_from_row({"anatomy": "brain", "filename": "file_brain_AXT1_202_2020576", "slice": "8",
                             "contrast": "T1", "pathology": "", "sequence": "TurboSpinEcho", "TR": "446", "TE": "9",
                             "TI": "100", "flip_angle": "140"})
    assert build_prompt(brain) == (test_data_dir / "prompt_brain_AXT1_202_2020576_008.txt").read_text().strip()


def test_records_are_typed_and_missing_stays_missing():
    rec = record_from_row({"anatomy": "knee", "filename": "f", "slice": "12", "contrast": "PDFS",
                           "pathology": "Joint Effusion , Joint Effusion ", "sequence": "", "TR": "nan", "TE": "33",
                           "TI": "", "flip_angle": "null"})
    assert rec["slice_number"] == 12.0 and rec["TE"] == 33.0
    assert rec["TR"] is None and rec["TI"] is None and rec["flip_angle"] is None and rec["sequence"] is None
    assert rec["pathology"] == ["Joint Effusion", "Joint Effusion"]
    prompt = build_prompt(rec)
    assert "Pathology: 2 Joint Effusion" in prompt and "nan" not in prompt and "TR" not in prompt
    assert build_prompt(rec, include_sequence=False) == "knee, Slice 12, PDFS, Pathology: 2 Joint Effusion"
    assert parse_pathology(float("nan")) == [] and parse_pathology("null") == []


def test_stats_schema_round_trip(tmp_path, test_data_dir):
    records = load_records(test_data_dir / "metadata_val_knee.csv")
    stats = compute_metadata_stats(records)
    assert stats["contrast"] == ["PD", "PDFS"]
    assert stats["TR"]["min"] <= 3120 <= stats["TR"]["max"]
    assert "Joint Effusion" in stats["pathology"]
    assert stats["field_strength"] == {"min": 0.0, "max": 0.0}  # not in the reference CSV: a slot, no invention
    save_metadata_stats(stats, tmp_path / "s.json")
    assert load_metadata_stats(tmp_path / "s.json") == json.loads(json.dumps(stats))
    reference = load_metadata_stats(test_data_dir / "metadata_stats_brain_knee.json")
    assert all(isinstance(v, list) or {"min", "max"} <= set(v) for v in reference.values())
    (tmp_path / "bad.json").write_text(json.dumps({"TR": 5}))
    with pytest.raises(ValueError, match="TR"):
        load_metadata_stats(tmp_path / "bad.json")


def test_mismatched_record_changes_the_protocol_only():
    t2 = {"anatomy": "brain", "contrast": "T2", "sequence": "TurboSpinEcho", "TR": 5460.0, "TE": 102.0, "TI": 100.0,
          "flip_angle": 150.0, "slice": 3.0, "pathology": []}
    mis = mismatched_record(t2)
    assert mis["contrast"] == "T1" and mis["TR"] < 1000 and mis["TE"] < 20
    assert mis["slice"] == 3.0 and mis["anatomy"] == "brain" and t2["contrast"] == "T2"
    assert mismatched_record({"contrast": "FLAIR"})["contrast"] == "T1"
    knee = {"contrast": "PDFS", "TR": 3000.0}
    assert mismatched_record(knee) == knee


def test_real_knee_slice_is_percentile_normalised(test_data_dir):
    """The released data layout: complex64 MVUE whose 99th percentile of |x| is exactly 1."""
    x = np.load(test_data_dir / "knee_file1001429_020.npy")
    assert x.dtype == np.complex64 and x.shape == (320, 320)
    assert math.isclose(float(np.percentile(np.abs(x), 99)), 1.0, rel_tol=1e-3)


def test_numbers_must_be_finite_and_plausible():
    from utils.metadata import clean_number

    assert clean_number("TR", "3120") == (3120.0, None)
    assert clean_number("TR", "") == (None, None) and clean_number("TR", "n/a") == (None, None)  # missing, no problem
    for key, raw in [("TR", "abc"), ("TR", "inf"), ("TR", "-1e30"), ("TE", "1e30"), ("flip_angle", "-5"),
                     ("field_strength", "0"), ("field_strength", "25"), ("TI", "-inf"), ("num_coils", "0")]:
        value, problem = clean_number(key, raw)
        assert value is None and problem is not None, (key, raw)
    assert clean_number("TI", "0")[0] == 0.0 and clean_number("field_strength", "0.55")[0] == 0.55
    rec = record_from_row({"filename": "f", "slice": "3", "TR": "Infinity", "TE": "-1e30", "flip_angle": "90"})
    assert rec["TR"] is None and rec["TE"] is None and rec["flip_angle"] == 90.0 and rec["slice_number"] == 3.0
    assert "TR" not in build_prompt({**rec, "TR": math.inf})  # a non-finite number never reaches the prompt


def test_stats_bounds_are_finite(tmp_path):
    stats = compute_metadata_stats([{"TR": math.inf}, {"TR": -1e30}, {"TR": 500.0}, {"TR": "abc"}])
    assert stats["TR"] == {"min": 500.0, "max": 500.0}
    with pytest.raises(ValueError, match="'TR'"):
        save_metadata_stats({"TR": {"min": 0.0, "max": math.inf}}, tmp_path / "s.json")
    assert not (tmp_path / "s.json").exists()
    (tmp_path / "inverted.json").write_text('{"TE": {"min": 10, "max": 1}}')
    with pytest.raises(ValueError, match="min > max"):
        load_metadata_stats(tmp_path / "inverted.json")


def test_prompt_omits_dropped_fields_and_rebuilds_the_same_variant():
    """A dropped attribute leaves the prompt (the released prompt without "TE: 33"); the no-sequence variant stays so."""
    from utils.metadata import PROMPT_FIELDS, rebuild_prompt

    rec = record_from_row({"anatomy": "knee", "filename": "f", "slice": "20", "contrast": "PDFS", "pathology": "",
                           "sequence": "TurboSpinEcho", "TR": "3120", "TE": "33", "TI": "100", "flip_angle": "140"})
    full = build_prompt(rec)
    assert build_prompt(rec, omit=["TE"]) == full.replace(", TE: 33", "")
    assert build_prompt(rec, omit=["slice"]) == full.replace(", Slice 20", "")  # "slice" = "slice_number"
    assert build_prompt(rec, omit=["vendor"]) == full  # not a prompt field: nothing to remove
    assert build_prompt(rec, omit=PROMPT_FIELDS) == ""
    assert rebuild_prompt(full, rec, ["TE"]) == build_prompt(rec, omit=["TE"])
    short = build_prompt(rec, include_sequence=False)
    assert rebuild_prompt(short, rec, ["contrast", "TE"]) == "knee, Slice 20"
    assert rebuild_prompt("", rec, ["TE"]) == ""
    with pytest.raises(ValueError):
        rebuild_prompt("knee, TE 33", rec, ["TE"])


def test_pathology_unknown_vs_no_finding():
    from utils.metadata import parse_pathology_cell

    assert [parse_pathology_cell(c) for c in ("", "null", "n/a", None, float("nan"), ", ")] == [None] * 6
    assert [parse_pathology_cell(c) for c in ("no finding", "None", "No pathology", [])] == [[]] * 4
    assert parse_pathology_cell("Edema, no finding") == ["Edema"]
    # label sets (vocabularies, validation) see neither as a label
    assert parse_pathology("") == parse_pathology("no finding") == []
    stats = compute_metadata_stats([{"pathology": ["no finding", "Edema"]}, {"pathology": None}],
                                   categorical_keys=["pathology"], numerical_keys=[])
    assert stats["pathology"] == ["Edema"]
