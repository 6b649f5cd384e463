"""Run identity (:mod:`utils.run_identity`): existing result folders must keep resuming, so the fingerprint hash of a
given run may not change when the code around it is reorganised.

The pinned hashes were computed by ``utils/reconstruction.py`` before it was split by job (commit ac03d3f); every
sampler field is given explicitly, so a change of a default elsewhere does not move them.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from utils.recon_settings import ReconSettings
from utils.run_identity import data_identity, out_dir_for, run_fingerprint

# The sampler's and the CS baseline's fields, with the values the pinned hashes were computed from.
SAMPLER = dict(sampler="dds", num_steps=100, eta=0.8, gamma=5.0, cg_iter=5, dps_step=1.0, guidance_scale=1.0,
               clip_x0=None, drop_metadata_keys=[], uncond_drop_keys=None, cs_lambda=0.005, cs_iter=100)
RUN = dict(mask_type="uniform1d", acc_factor=4.0, center_fraction=0.08, noise_sigma=0.0, metadata_override={},
           mismatch_metadata=False, num_samples=1, seed=0, mixed_precision="no")

PINNED = [
    (dict(method="zero_filled"), "8f1c44b45918eaf4a905fbd1d6a624f4168c8938de0d98defad1088679f787a9",
     "zero_filled-8f1c44b4"),
    (dict(method="cs"), "74669e1073d7b952e21ff2ee26dc41c45e2c38fdc1eb7b69ec0bf81c35068274", "cs-74669e10"),
    (dict(method="diffusion"), "2161972a1f584d2aa520ee2fdc17290100255a52310a14480c09d7cb60811ac0",
     "dds_steps100_w1_n1-2161972a"),
    (dict(method="diffusion", sampler="dps", noise_sigma=0.02, num_samples=4, guidance_scale=2.0,
          drop_metadata_keys=["te"]),
     "f47ad454981c219676841081db0c75508df12c547430dedac7f68572871e4736", "dps_steps100_w2_n4-f47ad454"),
]


def _fingerprint(settings: ReconSettings) -> dict:
    items = [SimpleNamespace(anatomy="brain", filename="file_brain_1", slice_idx=i) for i in range(3)]
    return run_fingerprint(settings, model={"files": {"finetune/unet/x": "0" * 64}},
                           data=data_identity(items, split="val", crop_size=320))


@pytest.mark.parametrize("changes, hash_, folder", PINNED, ids=[p[2].split("-")[0] for p in PINNED])
def test_fingerprint_hash_and_folder_name_are_those_of_existing_folders(changes, hash_, folder) -> None:
    settings = ReconSettings(**{**SAMPLER, **RUN, **changes})
    fp = _fingerprint(settings)
    assert fp["hash"] == hash_, "the run fingerprint changed: existing result folders would no longer resume"
    assert out_dir_for("save", settings, fp).as_posix() == f"save/uniform1d/acc_4/{folder}"


def test_only_settings_that_change_a_result_change_the_hash() -> None:
    base = _fingerprint(ReconSettings(**SAMPLER, **RUN, method="diffusion"))["hash"]
    same = ReconSettings(**SAMPLER, **{**RUN, "center_fraction": None}, method="diffusion", batch_size=4,
                         save_png=False, tag="mine")  # None resolves to the default 0.08 for R = 4
    assert _fingerprint(same)["hash"] == base
    other = ReconSettings(**{**SAMPLER, "gamma": 10.0}, **RUN, method="diffusion")
    assert _fingerprint(other)["hash"] != base
