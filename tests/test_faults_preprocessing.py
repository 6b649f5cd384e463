"""Fault injection into preprocessing: bad k-space, bad metadata numbers, batches, bad folders, killed runs.

Inputs are tiny fastMRI-format files built here (a smooth phantom seen by 4 smooth coils, 64x32, a hand-written
ISMRMRD header whose numbers each test can spoil), so no test waits for the anatomical simulator. The scripts' own
``main`` runs in-process where only its result matters; the kill tests start the real script in subprocesses.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

import make_metadata_stats
import pre_process_cmrx
import pre_processing_final
from utils.fastmri_io import write_fastmri_h5
from utils.metadata import compute_metadata_stats, load_metadata_stats, load_records

REPO = Path(__file__).resolve().parents[1]
CROP = 32
ESPIRIT = ["--espirit_calib_width", "16", "--espirit_kernel_width", "5"]

HEADER = """<?xml version="1.0" encoding="utf-8"?>
<ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD">
  <measurementInformation><protocolName>AX T2</protocolName></measurementInformation>
  <acquisitionSystemInformation>
    <systemVendor>SIEMENS</systemVendor><systemModel>Skyra</systemModel>
    <systemFieldStrength_T>{B0}</systemFieldStrength_T><receiverChannels>4</receiverChannels>
  </acquisitionSystemInformation>
  <encoding>
    <encodedSpace><matrixSize><x>64</x><y>32</y><z>1</z></matrixSize>
      <fieldOfView_mm><x>440</x><y>220</y><z>5</z></fieldOfView_mm></encodedSpace>
  </encoding>
  <sequenceParameters><TR>{TR}</TR><TE>{TE}</TE><TI>{TI}</TI><flipAngle_deg>{FA}</flipAngle_deg>
    <sequence_type>TurboSpinEcho</sequence_type></sequenceParameters>
</ismrmrdHeader>
"""
GOOD = {"B0": "2.89", "TR": "5000", "TE": "100", "TI": "100", "FA": "150"}


def _kspace(num_slices: int, seed: int) -> np.ndarray:
    """complex64 ``[S, 4, 64, 32]``: an ellipse with a smooth texture, 4 smooth coil profiles, a little noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[-1 : 1 : 64j, -1 : 1 : 32j]
    coils = np.stack([np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2)) for cy, cx in [(-1, -1), (-1, 1), (1, -1), (1, 1)]])
    out = []
    for s in range(num_slices):
        obj = ((yy / 0.4) ** 2 + (xx / 0.8) ** 2 < 1) * (1 + 0.3 * np.sin(4 * yy + s)) * np.exp(0.5j * xx)
        img = coils * obj + 1e-3 * (rng.standard_normal(coils.shape) + 1j * rng.standard_normal(coils.shape))
        out.append(np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(img, axes=(-2, -1)), norm="ortho"), axes=(-2, -1)))
    return np.asarray(out, dtype=np.complex64)


def make_file(folder: Path, index: int, num_slices: int = 3, header: dict | None = GOOD) -> Path:
    """``file_brain_AXT2_200_60000{index}.h5`` (``header=None``: no ``ismrmrd_header`` at all)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"file_brain_AXT2_200_60000{index}.h5"
    xml = None if header is None else HEADER.format(**{**GOOD, **header})
    write_fastmri_h5(path, _kspace(num_slices, index), header_xml=xml, attrs={"acquisition": "AXT2"})
    return path


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = pre_processing_final.main([*argv, "--no_progress", "--crop_size", str(CROP), *ESPIRIT])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_nonfinite_and_zero_slices_are_reported_and_skipped(tmp_path, capsys):
    inp, out = tmp_path / "in", tmp_path / "out"
    nan_file, zero_file, good_file = (make_file(inp, i) for i in range(3))
    with h5py.File(nan_file, "r+") as f:
        k = f["kspace"][1]
        k[:, 10:14, 5:9] = np.nan
        f["kspace"][1] = k
    with h5py.File(zero_file, "r+") as f:
        f["kspace"][2] = np.zeros_like(f["kspace"][2])
    rc, printed, _ = run_main(["--input_dir", str(inp), "--output_root", str(out), "--train", "--write_stats"], capsys)
    assert rc == 1
    assert f"FAILED {nan_file.stem}: 1 slice(s) skipped: slice 1: non-finite k-space (64 of 8192" in printed
    assert f"FAILED {zero_file.stem}: 1 slice(s) skipped: slice 2: all-zero k-space" in printed
    assert "1/3 ok" in printed and "2 skipped as unusable" in printed
    ds = out / f"brain_mvue_{CROP}_train" / "slice"
    assert not (ds / nan_file.stem / "001.npy").exists() and not (ds / zero_file.stem / "002.npy").exists()
    written = sorted(ds.rglob("*.npy"))
    assert len(written) == 7 and all(np.isfinite(np.load(p)).all() for p in written)
    csv = pd.read_csv(out / "metadata_brain_train.csv")
    rows = set(zip(csv["filename"], csv["slice"]))
    assert len(rows) == 7 and (nan_file.stem, 1) not in rows and (zero_file.stem, 2) not in rows
    assert (nan_file.stem, 0) in rows and (nan_file.stem, 2) in rows and (good_file.stem, 1) in rows
    # A rerun does not mistake the skipped slices for finished ones.
    rc, printed, _ = run_main(["--input_dir", str(inp), "--output_root", str(out), "--train"], capsys)
    assert rc == 1 and "slices: 0 written, 7 already present, 2 skipped as unusable" in printed


@pytest.mark.parametrize(
    "field, text",
    [("TR", "abc"), ("TR", "-1e30"), ("TE", "inf"), ("TI", "1e30"), ("FA", "nan"), ("B0", "0"), ("B0", "300")],
)
def test_bad_header_numbers_become_missing_with_one_warning_per_file(tmp_path, capsys, field, text):
    inp, out = tmp_path / "in", tmp_path / "out"
    bad = make_file(inp, 0, header={field: text})
    good = make_file(inp, 1)
    column = {"TR": "TR", "TE": "TE", "TI": "TI", "FA": "flip_angle", "B0": "field_strength"}[field]
    rc, printed, _ = run_main(["--input_dir", str(inp), "--output_root", str(out), "--train", "--write_stats"], capsys)
    assert rc == 0, printed
    warnings = [line for line in printed.splitlines() if line.startswith("  WARNING")]
    assert len(warnings) == 1 and f"{bad.stem}: {column}:" in warnings[0] and "missing" in warnings[0], warnings
    csv = pd.read_csv(out / "metadata_brain_train.csv", dtype=str, keep_default_na=False)
    assert set(csv.loc[csv["filename"] == bad.stem, column]) == {""}
    assert set(csv.loc[csv["filename"] == good.stem, column]) == {f"{float(GOOD[field]):g}"}
    text_out = (out / "metadata_stats.json").read_text()
    stats = json.loads(text_out)
    assert "Infinity" not in text_out and "NaN" not in text_out
    for key in ("TR", "TE", "TI", "flip_angle", "field_strength"):
        assert all(math.isfinite(stats[key][b]) for b in ("min", "max")) and stats[key]["min"] <= stats[key]["max"]
    if column in stats:
        assert stats[column]["min"] == stats[column]["max"] == float(GOOD[field])  # only the good file's value


def test_missing_header_is_warned_and_leaves_the_fields_empty(tmp_path, capsys):
    inp, out = tmp_path / "in", tmp_path / "out"
    bare = make_file(inp, 0, num_slices=2, header=None)
    rc, printed, _ = run_main(["--input_dir", str(inp), "--output_root", str(out)], capsys)
    assert rc == 0
    assert sum("no ismrmrd_header" in line for line in printed.splitlines()) == 1
    rec = load_records(out / "metadata_brain_val.csv")
    assert len(rec) == 2 and rec[0]["filename"] == bare.stem
    assert all(rec[0][k] is None for k in ("TR", "TE", "TI", "flip_angle", "field_strength", "sequence", "vendor"))
    assert rec[0]["num_coils"] == 4.0  # from the k-space, not the header


def test_csv_cells_inf_abc_huge_are_missing_and_stats_finite(tmp_path, capsys, caplog):
    csv = tmp_path / "metadata_brain_train.csv"
    csv.write_text("anatomy,filename,slice,contrast,pathology,sequence,TR,TE,TI,flip_angle,field_strength\n"
                   "brain,a,0,T2,,TurboSpinEcho,inf,100,abc,150,3\n"
                   "brain,a,1,T2,,TurboSpinEcho,-1e30,90,100,-inf,1e30\n"
                   "brain,b,0,T1,,TurboSpinEcho,500,10,100,90,1.5\n")  # fmt: skip
    out = tmp_path / "stats.json"
    with caplog.at_level("WARNING"):
        assert make_metadata_stats.main([str(csv), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    # one warning per file and column (TR holds two bad cells: still one line)
    lines = [r.getMessage() for r in caplog.records if "unusable" in r.getMessage()]
    assert sorted(line.split("column ")[1].split(":")[0] for line in lines) == sorted(
        ["TR", "TI", "flip_angle", "field_strength"]
    )
    stats = load_metadata_stats(out)
    assert stats["TR"] == {"min": 500.0, "max": 500.0} and stats["TE"] == {"min": 10.0, "max": 100.0}
    assert stats["field_strength"] == {"min": 1.5, "max": 3.0} and stats["flip_angle"] == {"min": 90.0, "max": 150.0}
    assert "wrote" in printed
    # records built by hand (not through the CSV reader) are checked too; empty keys are reported
    problems: list[str] = []
    stats = compute_metadata_stats([{"TR": math.inf, "TE": "abc"}, {"TR": 3.0, "TE": -1e30}], problems=problems)
    assert stats["TR"] == {"min": 3.0, "max": 3.0} and stats["TE"] == {"min": 0.0, "max": 0.0}
    assert "TR: 1 non-finite or implausible value(s) ignored" in problems
    assert any(line.startswith("TE: no finite value") for line in problems)
    # a stats file with a non-finite or inverted bound is refused with the key named
    for bad in ('{"TR": {"min": 0, "max": Infinity}}', '{"TR": {"min": 0, "max": null}}',
                '{"TR": {"min": 5, "max": 1}}', '{"TR": {"min": NaN, "max": 1}}'):  # fmt: skip
        (tmp_path / "bad.json").write_text(bad)
        with pytest.raises(ValueError, match="'TR'"):
            load_metadata_stats(tmp_path / "bad.json")


def test_batches_accumulate_in_the_csv(tmp_path, capsys):
    out = tmp_path / "out"
    a0, a1 = make_file(tmp_path / "A", 0), make_file(tmp_path / "A", 1)
    b2 = make_file(tmp_path / "B", 2, num_slices=2)
    b1 = make_file(tmp_path / "B", 1, num_slices=2, header={"TR": "6000"})  # a1 again, re-acquired: 2 slices, new TR
    rc, printed, _ = run_main(["--input_dir", str(tmp_path / "A"), "--output_root", str(out), "--train",
                               "--write_stats"], capsys)  # fmt: skip
    assert rc == 0 and "metadata rows: 6 added, 0 replaced, 0 kept" in printed
    stats_a = load_metadata_stats(out / "metadata_stats.json")
    rc, printed, _ = run_main(["--input_dir", str(tmp_path / "B"), "--output_root", str(out), "--train",
                               "--write_stats", "--overwrite"], capsys)  # fmt: skip
    # B: file 2 new (2 rows), file 1 re-processed (2 rows replace 2 of its 3; its slice 2 row is dropped), file 0 kept
    assert rc == 0 and "metadata rows: 2 added, 2 replaced, 3 kept, 1 dropped" in printed, printed
    csv = pd.read_csv(out / "metadata_brain_train.csv")
    assert list(zip(csv["filename"], csv["slice"])) == [(a0.stem, 0), (a0.stem, 1), (a0.stem, 2), (b1.stem, 0),
                                                        (b1.stem, 1), (b2.stem, 0), (b2.stem, 1)]  # fmt: skip
    assert set(csv.loc[csv["filename"] == b1.stem, "TR"]) == {6000}
    assert set(csv.loc[csv["filename"] == a0.stem, "TR"]) == {5000}
    stats_b = load_metadata_stats(out / "metadata_stats.json")  # from the union: batch A's TR is still in range
    assert stats_a["TR"] == {"min": 5000.0, "max": 5000.0} and stats_b["TR"] == {"min": 5000.0, "max": 6000.0}
    assert not list(out.glob(".*.tmp"))


def test_bad_arguments_and_folders(tmp_path, capsys):
    make_file(tmp_path / "in", 0, num_slices=1)
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    cases = [
        (["--input_dir", str(tmp_path / "in"), "--output_root", str(out), "--write_stats"], 2, "train split only"),
        (["--input_dir", str(tmp_path / "nope"), "--output_root", str(out)], 2, "is not a folder"),
        (["--input_dir", str(tmp_path / "empty"), "--output_root", str(out)], 1, "no .h5 files"),
        (["--input_dir", str(tmp_path / "in"), "--output_root", str(out), "--num_workers", "0"], 2, "num_workers"),
    ]
    for argv, status, message in cases:
        rc, printed, err = run_main(argv, capsys)
        assert rc == status and message in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert not out.exists()  # nothing was written by a refused run
    for argv, status, message in [(["--input_dir", str(tmp_path / "nope")], 2, "is not a folder"),
                                  (["--input_dir", str(tmp_path / "empty")], 1, "no .mat files")]:  # fmt: skip
        assert pre_process_cmrx.main([*argv, "--output_dir", str(out), "--no_progress"]) == status
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------------------------------------------------
# Killed runs leave no process behind
# ----------------------------------------------------------------------------------------------------------------------


def _descendants(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _alive(procs: list) -> list:
    import psutil

    alive = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


def _ppid(proc) -> int | None:
    import psutil

    try:
        return proc.ppid()
    except psutil.NoSuchProcess:
        return None


def test_killed_parent_leaves_no_process_behind(tmp_path):
    """SIGKILL and SIGTERM of the parent, and Ctrl-C (SIGINT to the process group), of a 2-worker run.

    Before the fix the pool workers (waiting on a queue whose write end they hold themselves) and the forkserver
    survived a killed parent forever. The three runs start together to share their start-up time.
    """
    import psutil  # noqa: F401  (accelerate requires it, so it is always installed: fail, never skip)
    inp = tmp_path / "in"
    for i in range(4):
        make_file(inp, i, num_slices=6)
    # sigpy ESPIRiT with many iterations: each file takes long enough that the run is still busy when it is killed
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    runs = {}
    for sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT):
        cmd = [sys.executable, str(REPO / "pre_processing_final.py"), "--input_dir", str(inp), "--output_root",
               str(tmp_path / f"out_{sig.name}"), "--num_workers", "2", "--no_progress", "--crop_size", str(CROP),
               *ESPIRIT, "--espirit_backend", "sigpy", "--espirit_max_iter", "3000"]  # fmt: skip
        runs[sig] = subprocess.Popen(cmd, env=env, cwd=tmp_path, start_new_session=True,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    tracked: dict[signal.Signals, list] = {}
    try:
        deadline = time.monotonic() + 120
        while len(tracked) < len(runs) and time.monotonic() < deadline:
            for sig, proc in runs.items():
                if sig in tracked:
                    continue
                assert proc.poll() is None, f"run for {sig.name} ended before it was killed: {proc.stderr.read()}"
                desc = _descendants(proc.pid)
                workers = [p for p in _alive(desc) if _ppid(p) not in (proc.pid, None)]  # the forkserver's children
                if len(workers) >= 2:
                    tracked[sig] = desc  # forkserver, resource tracker, workers
                    if sig is signal.SIGINT:
                        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
                    else:
                        proc.send_signal(sig)
            time.sleep(0.05)
        assert len(tracked) == len(runs), "the workers never started"
        for sig, proc in runs.items():
            rc = proc.wait(timeout=30)
            assert rc == (-9 if sig is signal.SIGKILL else 128 + sig), (sig.name, rc, proc.stderr.read())
        deadline = time.monotonic() + 15
        while any(_alive(desc) for desc in tracked.values()) and time.monotonic() < deadline:
            time.sleep(0.1)
        survivors = {sig.name: [(p.pid, p.name()) for p in _alive(desc)] for sig, desc in tracked.items()}
        assert not any(survivors.values()), f"processes left behind: {survivors}"
    finally:
        for proc in runs.values():
            if proc.poll() is None:
                proc.kill()
        for desc in tracked.values():
            for p in _alive(desc):
                p.kill()


SLOW_START_SCRIPT = '''
import time

from utils.preprocessing.summary import FileReport
from utils.preprocessing.workers import run_in_pool

if __name__ == "__mp_main__":  # a pool worker imports the run's script before its initializer: hold it there
    time.sleep(120)


def job(name):
    return FileReport(name=name)


if __name__ == "__main__":
    run_in_pool([("a", job, ("a",)), ("b", job, ("b",))], 2, "slow start", show_progress=False)
'''


def test_worker_killed_before_its_initializer_dies_with_the_run(tmp_path):
    """A run SIGKILLed while its workers are still starting (forked, not yet in ``_worker_init``) leaves nothing.

    The window is seconds wide on a loaded machine (a worker unpickles its job and imports the run's script first); the
    script here widens it to two minutes, so the workers' watchdog cannot be what ends them: the forkserver must die
    with the run, and each worker with the forkserver, from the fork on.
    """
    import psutil  # noqa: F401

    script = tmp_path / "slow_start.py"
    script.write_text(SLOW_START_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(script)], env=env, cwd=tmp_path, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    desc: list = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"the run ended before it was killed: {proc.stderr.read()}"
            desc = _descendants(proc.pid)
            if len([p for p in _alive(desc) if _ppid(p) not in (proc.pid, None)]) >= 2:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the workers never started")
        proc.kill()
        assert proc.wait(timeout=30) == -9
        deadline = time.monotonic() + 15
        while _alive(desc) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(desc), f"processes left behind: {[(p.pid, p.name()) for p in _alive(desc)]}"
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in _alive(desc):
            p.kill()
