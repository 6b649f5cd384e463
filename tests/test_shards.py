"""Work split over machines: ``--num_shards N --shard_index I`` runs, started as separate processes into one output,
merge to what one unsharded run gives (reconstruction summary, preprocessing CSV); a shard that finishes first leaves
a summary that says what is missing; bad shard arguments exit 2 with one line. Also the README's multi-node command:
two ``accelerate launch --num_machines 2 --machine_rank R`` launchers on this machine stand in for two nodes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from utils.distributed import shard_items, shard_problem

REPO = Path(__file__).resolve().parents[1]
CROP = 32


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


def _run(cmd: list[str], cwd: Path, expect: int = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == expect, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _comparable(summary: dict) -> dict:
    """A summary without what depends on the wall clock (per-slice time)."""
    return {k: v for k, v in summary.items() if k != "time_s"}


def _one_dir(save_dir: Path) -> Path:
    found = sorted((save_dir / "uniform1d" / "acc_4").glob("zero_filled-*"))
    assert len(found) == 1, found
    return found[0]


def _slices(folder: Path) -> list[dict]:
    import pandas as pd

    table = pd.read_csv(folder / "slices.csv").drop(columns=["time_s"]).sort_values(["filename", "slice"])
    return json.loads(table.to_json(orient="records"))  # NaN (an empty cell) -> None, so equal rows compare equal


# --------------------------------------------------------------------------------------------- the split itself
def test_shares_are_disjoint_cover_everything_and_are_deterministic():
    items = list(range(23))
    shares = [shard_items(items, 3, i, p, 2) for i in range(3) for p in range(2)]
    flat = sorted(x for share in shares for x in share)
    assert flat == items  # disjoint and complete
    assert max(map(len, shares)) - min(map(len, shares)) <= 1  # balanced
    assert shard_items(items, 3, 1, 1, 2) == shares[3]  # the same arguments, the same share
    # machines first: shard I of N with P processes = the shard's items, split over its processes
    assert sorted(shares[2] + shares[3]) == shard_items(items, 3, 1)
    assert shard_items(items[:2], 4, 3) == []  # more shards than items: an empty share, not an error
    for bad in ((0, 0), (2, 2), (2, -1)):
        assert shard_problem(*bad) is not None
        with pytest.raises(ValueError):
            shard_items(items, *bad)


@pytest.mark.parametrize("flags", [["--num_shards", "2", "--shard_index", "2"], ["--num_shards", "0"],
                                   ["--num_shards", "2", "--shard_index", "-1"]])
def test_bad_shard_arguments_exit_2_with_one_line(flags, capsys, tmp_path):
    import recon_complex_multi

    with pytest.raises(SystemExit) as err:
        recon_complex_multi.main(["--data_root", str(tmp_path), "--method", "zero_filled", *flags])
    assert err.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and ("--shard_index" in lines[0] or "--num_shards" in lines[0]), lines


# --------------------------------------------------------------------------------------------- reconstruction
@pytest.fixture(scope="module")
def val_root(tmp_path_factory) -> Path:
    from tests.training_helpers import write_tiny_dataset

    root = tmp_path_factory.mktemp("shards_recon")
    write_tiny_dataset(root / "data", "brain", "val", num_files=3, slices_per_file=2, crop=CROP, coils=2)
    return root


def _recon(root: Path, save_dir: str) -> list[str]:
    return ["recon_complex_multi.py", "--data_root", str(root / "data"), "--load_dir_meta_brain",
            str(root / "data" / "metadata_brain_val.csv"), "--crop_size", str(CROP), "--method", "zero_filled",
            "--no_png", "--save_dir", str(root / save_dir)]


def _reference_run(root: Path) -> None:
    """The plain one-process run (in this process: the shards are the separate processes), once per module."""
    import recon_complex_multi

    if not (root / "one").is_dir():
        assert recon_complex_multi.main(_recon(root, "one")[1:]) == 0


def test_recon_shards_as_separate_processes_merge_to_the_one_run_summary(val_root):
    root = val_root
    py = sys.executable
    _reference_run(root)
    one_dir = _one_dir(root / "one")
    one = json.loads((one_dir / "summary.json").read_text())
    assert one["complete"] and one["num_slices"] == 6

    first = _run([py, str(REPO / "recon_complex_multi.py"), *_recon(root, "sharded")[1:],
                  "--num_shards", "2", "--shard_index", "0"], root)
    shard_dir = _one_dir(root / "sharded")
    assert shard_dir.name == one_dir.name  # the shard range is not part of the run's identity
    early = json.loads((shard_dir / "summary.json").read_text())
    # shard 0 of 2 did every other slice: no volume is whole yet, and the summary says so instead of scoring halves
    assert not early["complete"] and early["num_slices_done"] == 3 and early["num_slices_missing"] == 3
    assert early["num_volumes"] == 0 and early["num_volumes_incomplete"] == 3
    assert early["fastmri_psnr"]["mean"] is None and "INCOMPLETE" in first.stdout

    _run([py, str(REPO / "recon_complex_multi.py"), *_recon(root, "sharded")[1:],
          "--num_shards", "2", "--shard_index", "1"], root)
    merged = json.loads((shard_dir / "summary.json").read_text())
    assert _comparable(merged) == _comparable(one)
    assert _slices(shard_dir) == _slices(one_dir)
    log = json.loads((shard_dir / "command.json").read_text())
    assert [entry["shard"] for entry in log] == [[0, 2], [1, 2]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: The README's multi-node command (run on each of the 2 machines; RANK 0 on the first, 1 on the second, HOST the
#: first machine's address). tests/test_readme_workflow.py checks that the README holds exactly this line.
MULTI_NODE_COMMAND = (
    "accelerate launch --multi_gpu --num_machines 2 --num_processes 2 --machine_rank $RANK "
    "--main_process_ip $HOST --main_process_port 29500 --mixed_precision no --dynamo_backend no "
    "recon_complex_multi.py --data_root ./fastmri --load_dir_meta_brain ./fastmri/metadata_brain_val.csv "
    "--method zero_filled --save_dir ./results"
)


def test_readme_multi_node_command_two_launchers_stand_in_for_two_nodes(val_root):
    """The README's two-node command, one launcher per ``--machine_rank``, rendezvous over localhost: one run of 2
    processes on 2 "machines", whose summary equals the plain one-process run's. Only the placeholders change
    ($RANK, $HOST, the port, the tiny data folder), plus ``--crop_size 32 --no_png`` for the tiny data."""
    import shlex

    root = val_root
    port = str(_free_port())
    fill = {"$HOST": "127.0.0.1", "29500": port, "./fastmri": str(root / "data"),
            "./fastmri/metadata_brain_val.csv": str(root / "data" / "metadata_brain_val.csv"),
            "./results": str(root / "nodes")}
    procs = []
    for rank in ("0", "1"):
        argv = [fill.get(tok, rank if tok == "$RANK" else tok) for tok in shlex.split(MULTI_NODE_COMMAND)]
        assert argv[:2] == ["accelerate", "launch"]
        cmd = [sys.executable, "-m", "accelerate.commands.launch", *argv[2:], "--crop_size", str(CROP), "--no_png"]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    _reference_run(root)
    nodes_dir, one_dir = _one_dir(root / "nodes"), _one_dir(root / "one")
    assert nodes_dir.name == one_dir.name
    assert _comparable(json.loads((nodes_dir / "summary.json").read_text())) == \
        _comparable(json.loads((one_dir / "summary.json").read_text()))
    # one run of 2 processes: the main process (machine rank 0) saw both
    assert json.loads((nodes_dir / "command.json").read_text())[-1]["num_processes"] == 2


# --------------------------------------------------------------------------------------------- preprocessing
def _tree(root: Path) -> dict[str, bytes]:
    """Every slice/map/scale file under ``root`` -> its bytes (the CSVs and lock files aside)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and "_mvue_" in str(p.relative_to(root))}


def test_preprocessing_shards_as_separate_processes_give_the_one_run_csv_slices_and_stats(tmp_path, capsys):
    import make_metadata_stats
    import pre_processing_final
    from tests.test_faults_preprocessing import ESPIRIT, make_file

    for i in range(3):
        make_file(tmp_path / "raw", i, num_slices=2)
    common = ["--input_dir", str(tmp_path / "raw"), "--train", "--crop_size", str(CROP), "--no_progress", *ESPIRIT]
    assert pre_processing_final.main([*common, "--output_root", str(tmp_path / "one"), "--write_stats"]) == 0
    for index in ("0", "1"):  # separate processes, one after the other (as array tasks may run)
        _run([sys.executable, str(REPO / "pre_processing_final.py"), *common, "--output_root",
              str(tmp_path / "sharded"), "--num_shards", "2", "--shard_index", index], tmp_path)
    one, sharded = tmp_path / "one", tmp_path / "sharded"
    csv = "metadata_brain_train.csv"
    assert (sharded / csv).read_bytes() == (one / csv).read_bytes()  # the union, sorted like one run's
    assert len((one / csv).read_text().splitlines()) == 1 + 3 * 2
    assert _tree(sharded) == _tree(one)
    # the documented merge step for the stats: make_metadata_stats.py on the union = one run's --write_stats
    assert make_metadata_stats.main([str(sharded / csv), "--output", str(sharded / "metadata_stats.json")]) == 0
    assert json.loads((sharded / "metadata_stats.json").read_text()) == \
        json.loads((one / "metadata_stats.json").read_text())
    capsys.readouterr()
    # bad shard arguments, and --write_stats on a shard: exit 2, one line, nothing written
    for flags in (["--num_shards", "2", "--shard_index", "2"], ["--num_shards", "2", "--write_stats"]):
        assert pre_processing_final.main([*common, "--output_root", str(tmp_path / "bad"), *flags]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and ("--shard_index" in lines[0] or "make_metadata_stats.py" in lines[0]), lines
    assert not (tmp_path / "bad").exists()
    # more shards than files: an empty shard is not a failure
    assert pre_processing_final.main([*common, "--output_root", str(sharded), "--num_shards", "4",
                                      "--shard_index", "3"]) == 0


def test_cardiac_preprocessing_shards_give_the_one_run_csv(tmp_path, capsys):
    import pre_process_cmrx
    from tests._synthetic import generate_cmrx
    from tests.test_faults_preprocessing import ESPIRIT

    generate_cmrx(tmp_path / "raw", "2023")
    common = ["--input_dir", str(tmp_path / "raw"), "--crop_size", str(CROP), "--no_progress", "--frames", "0",
              *ESPIRIT]
    assert pre_process_cmrx.main([*common, "--output_dir", str(tmp_path / "one")]) == 0
    for index in ("0", "1"):
        assert pre_process_cmrx.main([*common, "--output_dir", str(tmp_path / "sharded"), "--num_shards", "2",
                                      "--shard_index", index]) == 0
        # each shard processed one of the two series (cine_lax, cine_sax)
        assert "files: 1/1 ok" in capsys.readouterr().out
    csv = "metadata_cardiology_train.csv"
    assert (tmp_path / "sharded" / csv).read_bytes() == (tmp_path / "one" / csv).read_bytes()
    assert _tree(tmp_path / "sharded") == _tree(tmp_path / "one")
    assert pre_process_cmrx.main([*common, "--output_dir", str(tmp_path / "x"), "--num_shards", "0"]) == 2


def test_raw_recon_shards_merge_to_the_one_run_summary(tmp_path, capsys):
    """``--raw_dir``: shards take whole files; the first shard's summary lists the other file as incomplete, the
    last one's equals the unsharded run's (each shard assembles only its own ``.h5``)."""
    import recon_complex_multi
    from tests.test_faults_preprocessing import make_file

    for i in range(2):
        make_file(tmp_path / "raw", i, num_slices=2)
    base = ["--raw_dir", str(tmp_path / "raw"), "--method", "zero_filled", "--mask_type", "uniform1d",
            "--acc_factor", "4"]
    assert recon_complex_multi.main([*base, "--save_dir", str(tmp_path / "one")]) == 0
    assert recon_complex_multi.main([*base, "--save_dir", str(tmp_path / "sharded"), "--num_shards", "2",
                                     "--shard_index", "0"]) == 0
    assert "INCOMPLETE: 1 of 2 volume(s)" in capsys.readouterr().out
    (one_dir,) = (tmp_path / "one").glob("raw/*/*/zero_filled-*")
    (shard_dir,) = (tmp_path / "sharded").glob("raw/*/*/zero_filled-*")
    early = json.loads((shard_dir / "summary.json").read_text())
    assert not early["complete"] and early["num_volumes"] == 1 and early["num_volumes_incomplete"] == 1
    assert [p.name for p in (shard_dir / "reconstructions").glob("*.h5")] == ["file_brain_AXT2_200_600000.h5"]
    assert recon_complex_multi.main([*base, "--save_dir", str(tmp_path / "sharded"), "--num_shards", "2",
                                     "--shard_index", "1"]) == 0
    merged = json.loads((shard_dir / "summary.json").read_text())
    one = json.loads((one_dir / "summary.json").read_text())
    assert merged["complete"] and one["complete"]
    assert _comparable(merged) == _comparable(one)
    assert sorted(p.name for p in (shard_dir / "reconstructions").glob("*.h5")) == \
        sorted(p.name for p in (one_dir / "reconstructions").glob("*.h5"))
