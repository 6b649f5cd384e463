"""One-line hints for the two input mistakes a new user makes most: reading the slices at another size than they were
preprocessed at, and reading a split (or a metadata CSV) that was never preprocessed.

Without them the dataset reports every row it cannot find ("image file not found: ..." once per slice), which names
the symptom but not the fix. Both hints are built from what is on disk only (folder names), so they are cheap and
never guess: no hint when the disk does not tell.
"""

from __future__ import annotations

import re
from pathlib import Path

#: Metadata CSV names of the preprocessing layout (``docs/formats.md``): ``metadata_{anatomy}_{split}.csv``.
_CSV_NAME = re.compile(r"^metadata_(?P<anatomy>brain|knee|cardiology)_(?P<split>train|val)\.csv$")


def _shown(path: Path) -> str:
    return str(path) if str(path) else "."


def preprocess_command(anatomy: str, split: str, root: str | Path) -> str:
    """The command that writes ``{root}``'s slices and ``metadata_{anatomy}_{split}.csv`` (input folder left to fill
    in). ``anatomy``: ``brain`` / ``knee``, or ``heart`` / ``cardiology`` / ``cardiac`` for CMRxRecon."""
    root = _shown(Path(root))
    if anatomy in ("heart", "cardiology", "cardiac"):
        return (f"python pre_process_cmrx.py --input_dir <CMRxRecon folder> --output_dir {root}"
                + ("" if split == "train" else f" --split {split}"))
    return (f"python pre_processing_final.py --input_dir <folder of the {anatomy} {split} .h5 files> "
            f"--output_root {root}" + (" --train" if split == "train" else ""))


def slice_folder_hint(data_root: str | Path, anatomy: str, crop_size: int, split: str) -> str | None:
    """Why ``{data_root}/{anatomy}_mvue_{crop_size}_{split}/`` does not exist, in one line naming the fix, or None
    when it exists (the problem is then with single files, which the caller lists).

    * the same anatomy and split exist at other sizes: name them and the flag that selects one;
    * the anatomy exists only in the other split: name the preprocessing command of the missing split;
    * nothing of the anatomy: the same command.
    """
    root = Path(data_root)
    if (root / f"{anatomy}_mvue_{crop_size}_{split}").is_dir():
        return None
    sizes = sorted(int(m.group(1)) for p in root.glob(f"{anatomy}_mvue_*_{split}") if p.is_dir()
                   if (m := re.fullmatch(rf"{re.escape(anatomy)}_mvue_(\d+)_{split}", p.name)))
    if sizes:
        found = ", ".join(f"{anatomy}_mvue_{s}_{split}/" for s in sizes)
        return (f"the {anatomy} {split} slices under {_shown(root)} were preprocessed at {' / '.join(map(str, sizes))}"
                f" px ({found}), not {crop_size}: pass --resolution {sizes[0]} (alias --crop_size {sizes[0]}), or "
                f"preprocess again with --crop_size {crop_size}")
    return (f"no {anatomy} {split} split under {_shown(root)} ({anatomy}_mvue_{crop_size}_{split}/ does not exist): "
            f"preprocess it first: {preprocess_command(anatomy, split, root)}")


def missing_csv_hint(path: str | Path) -> str:
    """`` (make it with: ...)`` for a metadata CSV path that does not exist and is named as the preprocessing
    writes it; an empty string when the name does not say which split it is."""
    p = Path(path)
    m = _CSV_NAME.match(p.name)
    if m is None:
        return ""
    return f" (preprocess that split first: {preprocess_command(m['anatomy'], m['split'], p.parent)})"
