"""Offline preprocessing of fully sampled multi-coil k-space into the ContextMRI training layout (docs/formats.md).

Per slice: ESPIRiT maps from the k-space, MVUE coil combination, centre crop/pad in the image domain (which removes the
2x readout oversampling of fastMRI), division by the 99th percentile of the magnitude. Written as::

    {output_root}/{anatomy}_mvue_{crop}_{split}/slice/{file}/{idx:03d}.npy   complex64 [crop, crop]  (image / scale)
    {output_root}/{anatomy}_mvue_{crop}_{split}/mps/{file}/{idx:03d}.npy     complex64 [C, crop, crop] (unit-norm maps)
    {output_root}/{anatomy}_mvue_{crop}_{split}/scale/{file}.json            {"scale": {"000": s, ...}, ...}
    {output_root}/metadata_{anatomy}_{split}.csv

The maps are never rescaled (Σ_c|S_c|² = 1 inside the object, 0 outside); the image is divided by ``scale``, so the
matching k-space is ``kspace / scale``. Every file is written to a temporary name then ``os.replace``d
(:mod:`utils.files`), so a killed run leaves only complete files (and possibly ``*.tmp`` files, removed on the next
run); a rerun skips finished slices.

What a run never does silently:

- a slice whose k-space is non-finite or all zero (or whose result is) is reported and not written; its file counts
  as failed (the other slices of the file are kept);
- unparsable, non-finite or implausible header numbers become empty cells, with one warning per file and column;
- the metadata CSV of an output root is the union of every file ever processed into it: a run replaces the rows of
  the files it processed and keeps the others (:func:`utils.preprocessing.metadata_csv.merge_metadata_csv`);
- ``metadata_stats.json`` is built from the train split only;
- worker processes die with the run (:func:`utils.preprocessing.workers.run_in_pool`).

One module per job:

- :mod:`~utils.preprocessing.slices`: the per-slice math (ESPIRiT settings, MVUE, crop/pad, scale, bad-slice checks);
- :mod:`~utils.preprocessing.names`: the split names (standard library only, for light ``--help``);
- :mod:`~utils.preprocessing.layout`: output paths, the scale sidecar, the resumable atomic slice writer;
- :mod:`~utils.preprocessing.metadata_csv`: CSV columns, writing, and the locked merge of a run into a root's CSV;
- :mod:`~utils.preprocessing.stats`: ``metadata_stats.json`` from the train CSVs;
- :mod:`~utils.preprocessing.summary`: per-file reports, the run summary, and the shared end of a run;
- :mod:`~utils.preprocessing.workers`: the process pool (watchdog, ``PR_SET_PDEATHSIG``, signal handling);
- :mod:`~utils.preprocessing.fastmri`: the fastMRI ``.h5`` pipeline (``pre_processing_final.py``);
- :mod:`~utils.preprocessing.cmrx`: the CMRxRecon ``.mat`` pipeline (``pre_process_cmrx.py``).
"""
