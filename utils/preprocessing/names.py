"""Names of the preprocessed layout that light command lines offer as ``choices`` (standard library only, so that
``recon_complex_multi.py --help`` and ``metadata_report.py --help`` need not import numpy/torch for them).

:mod:`utils.preprocessing.layout` (which writes the layout) re-exports them.
"""

from __future__ import annotations

#: The splits of a dataset (the ``{split}`` of its folder name); metadata stats come from ``train`` only.
SPLITS: tuple[str, ...] = ("train", "val")
