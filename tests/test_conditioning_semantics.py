"""Conditioning semantics for every model type (issue 13, item 1).

* the training-time null condition is exactly the inference-time one and occurs at the configured rate;
* a dropped attribute leaves both its metadata token and its prompt field, in training and at inference;
* per-attribute guidance changes the output of a text-only model; unreadable drop keys are refused;
* an unknown pathology is "missing", an explicit "no finding" keeps its own row.
"""

from __future__ import annotations

import math

import pytest
import torch

from models.condition_embedder import MetadataConditionEmbedder
from models.conditioning import ConditionBuilder
from models.tiny_assets import tiny_clip_text_model, write_tiny_clip_tokenizer, write_tiny_t5_folder
from models.text_encoders import load_text_conditioner
from utils.metadata import build_prompt, load_records, parse_pathology_cell, record_from_row

D = 32
RECORD = {"anatomy": "brain", "slice": 4.0, "slice_number": 4.0, "contrast": "AX FLAIR_FBB",
          "sequence": "TurboSpinEcho", "TR": 9000.0, "TE": 81.0, "TI": 2500.0, "flip_angle": 150.0,
          "pathology": ["Edema"]}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    root = tmp_path_factory.mktemp("sem")
    tiny_clip_text_model(hidden_size=D).save_pretrained(root / "clip" / "text_encoder")
    write_tiny_clip_tokenizer(root / "clip" / "tokenizer")
    write_tiny_t5_folder(root / "t5", d_model=48)
    return {"clip": load_text_conditioner("clip", root / "clip", out_dim=D),
            "t5": load_text_conditioner("t5", root / "t5", out_dim=D)}


def _embedder(test_data_dir, strategy: str = "independent", cfg_prob: float = 0.5) -> MetadataConditionEmbedder:
    torch.manual_seed(0)
    return MetadataConditionEmbedder.from_stats(test_data_dir / "metadata_stats_brain_knee.json", D,
                                                hidden_dim=16, cfg_prob=cfg_prob, cfg_strategy=strategy)


def _builder(kind: str, text, test_data_dir, strategy: str = "independent", null_prob: float = 0.1):
    use_text = kind in ("text", "text+metadata")
    use_meta = kind in ("metadata", "text+metadata")
    return ConditionBuilder(text["clip"] if use_text else None,
                            _embedder(test_data_dir, strategy) if use_meta else None,
                            prompt_drop_prob=0.1 if use_text else 0.0, null_prob=null_prob)


# ----------------------------------------------------------------------------------------------------------------------
# 1. the null condition: identity and rate


@pytest.mark.parametrize("kind,strategy", [("metadata", "independent"), ("text+metadata", "independent"),
                                           ("text+metadata", "joint"), ("text", "independent")])
def test_training_null_condition_is_the_unconditional_one_at_the_configured_rate(kind, strategy, text,
                                                                                 test_data_dir):
    builder = _builder(kind, text, test_data_dir, strategy)
    batch, rounds = 400, 6
    records = [dict(RECORD) for _ in range(batch)]
    with torch.no_grad():
        null_ref = builder.eval().unconditional(records)
        builder.train()
        g = torch.Generator().manual_seed(11)
        drawn = is_null = 0
        for _ in range(rounds):
            out = builder.assemble(records, [build_prompt(r) for r in records], generator=g)
            equal = torch.tensor([torch.equal(out.tokens[i], null_ref[i]) for i in range(batch)])
            # every sample drawn as null has exactly the inference-time null tokens (bit for bit)
            assert bool(equal[out.null].all())
            drawn += int(out.null.sum())
            is_null += int(equal.sum())
    builder.eval()
    n = batch * rounds
    # the draw itself: Bernoulli(null_prob); the null condition overall: the documented total rate
    for count, p in ((drawn, builder.null_prob), (is_null, builder.expected_null_rate())):
        se = math.sqrt(p * (1 - p) / n)
        assert abs(count / n - p) < 4 * se, (kind, strategy, count / n, p, se)
    expected_total = {("metadata", "independent"): 1 - 0.9 * (1 - 0.5 ** 9),
                      ("text+metadata", "independent"): 1 - 0.9 * (1 - 0.5 ** 9),
                      ("text+metadata", "joint"): 1 - 0.9 * 0.5,
                      ("text", "independent"): 1 - 0.9 * 0.9}[(kind, strategy)]
    assert builder.expected_null_rate() == pytest.approx(expected_total)


def test_null_draw_is_off_in_eval_and_with_zero_probability(text, test_data_dir):
    builder = _builder("text+metadata", text, test_data_dir, null_prob=0.0).train()
    builder.metadata.cfg_prob = 0.0
    builder.prompt_drop_prob = 0.0
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    with torch.no_grad():
        out = builder.assemble([RECORD] * 4, generator=g)
        assert not out.null.any() and torch.equal(g.get_state(), state)  # nothing drawn at all
        builder.null_prob = 1.0
        builder.eval()
        assert not builder.assemble([RECORD] * 4, generator=g).null.any()


# ----------------------------------------------------------------------------------------------------------------------
# 2. dropping an attribute removes it everywhere


def test_training_per_key_drops_leave_the_prompt_too(text, test_data_dir):
    builder = _builder("text+metadata", text, test_data_dir, null_prob=0.0).train()
    builder.prompt_drop_prob = 0.0
    keys = builder.metadata.keys
    records = [dict(RECORD, TE=float(60 + i)) for i in range(32)]
    # half of the prompts without the sequence part, as MRISliceDataset draws them in training
    prompts = [build_prompt(r, include_sequence=i % 2 == 0) for i, r in enumerate(records)]
    with torch.no_grad():
        out = builder.assemble(records, prompts, generator=torch.Generator().manual_seed(2))
    te = keys.index("TE")
    assert 0 < int(out.dropped[:, te].sum()) < 32
    for i, (record, prompt) in enumerate(zip(records, out.prompts)):
        omitted = [k for k, d in zip(keys, out.dropped[i].tolist()) if d]
        assert prompt == build_prompt(record, include_sequence=i % 2 == 0, omit=omitted)
        if bool(out.dropped[i, te]):
            assert "TE:" not in prompt
        elif i % 2 == 0:
            assert f"TE: {60 + i}" in prompt


@pytest.mark.parametrize("kind", ["clip", "t5", "metadata", "clip+metadata"])
def test_inference_drop_keys_change_every_model_type(kind, text, test_data_dir):
    txt = text[kind.split("+")[0]] if kind != "metadata" else None
    meta = _embedder(test_data_dir) if "metadata" in kind else None
    builder = ConditionBuilder(txt, meta).eval()
    with torch.no_grad():
        full = builder.assemble([RECORD])
        no_te = builder.assemble([RECORD], drop_keys=["TE"])
    assert not torch.equal(full.tokens, no_te.tokens)
    if txt is not None:
        assert "TE: 81" in full.prompts[0] and "TE" not in no_te.prompts[0]
        assert no_te.prompts[0] == build_prompt(RECORD, omit=["TE"])
        with torch.no_grad():
            torch.testing.assert_close(no_te.tokens[:, :77], txt.encode([no_te.prompts[0]]))
    if meta is not None:
        k = 1 + meta.keys.index("TE")
        n_text = 77 if txt is not None else 0
        torch.testing.assert_close(no_te.tokens[0, n_text + k], meta.empty_tokens()[k - 1])
    # the prompt's own alias and order-insensitivity: "slice" is "slice_number"
    assert builder.check_drop_keys(["slice", "TE"]) == ["slice_number", "TE"]


def test_unreadable_drop_keys_are_refused(text, test_data_dir):
    from utils.diffusion_recon import DiffusionReconstructor
    from utils.samplers import DiffusionSchedule

    text_only = ConditionBuilder(text["clip"], None).eval()
    with pytest.raises(ValueError, match="field_strength"):  # not in the prompt template, no embedder
        text_only.build([RECORD], drop_keys=["field_strength"])
    meta_only = ConditionBuilder(None, _embedder(test_data_dir)).eval()
    with pytest.raises(ValueError, match="vendor"):  # not among this embedder's keys
        meta_only.build([RECORD], drop_keys=["vendor"])
    uncond = ConditionBuilder(None, None, null_dim=D)
    with pytest.raises(ValueError, match="unconditional"):
        uncond.build([RECORD], drop_keys=["TE"])
    schedule = DiffusionSchedule(torch.linspace(0.99, 0.01, 1000, dtype=torch.float64))
    with pytest.raises(ValueError, match="field_strength"):
        DiffusionReconstructor(torch.nn.Identity(), text_only, schedule, drop_metadata_keys=["field_strength"])
    with pytest.raises(ValueError, match="bogus"):
        DiffusionReconstructor(torch.nn.Identity(), text_only, schedule, guidance_scale=2.0,
                               uncond_drop_keys=["bogus"])
    # a custom prompt (not the record's own) cannot have a field removed: refused, not silently kept
    with pytest.raises(ValueError, match="not the ContextMRI prompt"):
        text_only.build([RECORD], ["a free-text prompt, TE 81"], drop_keys=["TE"])


def test_per_attribute_guidance_changes_a_text_model_output(text):
    """Text-only model (like the released ContextMRI): w = 2 with ``uncond_drop_keys=["TE"]`` guides away from the
    TE-less prompt, so it differs from w = 1 (before, the drop was ignored and ε_u = ε_c made it a no-op)."""
    from models.unet import build_unet
    from utils.diffusion_recon import DiffusionReconstructor
    from utils.operators import SenseOperator
    from utils.samplers import DiffusionSchedule, make_generators

    torch.manual_seed(0)
    unet = build_unet("tiny").eval()
    builder = ConditionBuilder(text["clip"], None).eval()
    acp = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    schedule = DiffusionSchedule(acp)
    mask = torch.zeros(1, 32)
    mask[:, ::3] = 1
    op = SenseOperator.single_coil(mask, (1, 32, 32))
    x_true = torch.randn(1, 32, 32, dtype=torch.complex64, generator=torch.Generator().manual_seed(1))
    y = op.forward(x_true)
    prompts = [build_prompt(RECORD)]
    outs = {}
    for w, drop in ((1.0, None), (2.0, ["TE"]), (2.0, ["TR"])):
        recon = DiffusionReconstructor(unet, builder, schedule, num_steps=3, guidance_scale=w,
                                       uncond_drop_keys=drop)
        cond, uncond = recon.condition([RECORD], prompts)
        if drop is not None:
            assert not torch.equal(cond, uncond)
        outs[(w, tuple(drop or ()))], nfe = recon(y, op, [RECORD], prompts, make_generators([0]))
        assert nfe == (3 if w == 1 else 6)
    base = outs[(1.0, ())]
    for key in ((2.0, ("TE",)), (2.0, ("TR",))):
        assert float((outs[key] - base).abs().max()) > 1e-4 * float(base.abs().max()), key
    assert not torch.equal(outs[(2.0, ("TE",))], outs[(2.0, ("TR",))])


# ----------------------------------------------------------------------------------------------------------------------
# 3. pathology: unknown vs explicit "no finding"


def test_missing_pathology_is_unknown_and_no_finding_keeps_its_row(test_data_dir):
    rows = load_records(test_data_dir / "metadata_val_brain_head.csv")
    assert rows[0]["pathology"] == ["Normal for age"] and rows[1]["pathology"] is None  # empty cell: not annotated
    assert record_from_row({"filename": "f", "slice": "0"})["pathology"] is None  # no column at all
    for cell in ("no finding", "No Findings", "none", "no pathology"):
        assert parse_pathology_cell(cell) == []
    emb = _embedder(test_data_dir, cfg_prob=0.0).eval()
    k = emb.keys.index("pathology")
    # the table keeps its explicit "no finding" row (shape of previously trained embedders unchanged)
    assert emb.tables["k_pathology"].num_embeddings == len(emb.config.multi_label["pathology"]) + 1
    cells = ["", "null", None, float("nan"), "no finding", [], "none", "Edema"]
    with torch.no_grad():
        tokens = emb([{**RECORD, "pathology": c} for c in cells]).tokens[:, 1 + k]
    empty = emb.empty_tokens()[k]
    for i in range(4):
        torch.testing.assert_close(tokens[i], empty)  # unknown = the learned empty embedding
    for i in (4, 5, 6):
        torch.testing.assert_close(tokens[i], tokens[5])  # explicit "no finding" = its own row
    assert not torch.allclose(tokens[5], empty) and not torch.allclose(tokens[5], tokens[7])
    # the prompt: nothing for unknown, a clause for "no finding"
    unknown, none = record_from_row({"anatomy": "brain", "slice": "1", "pathology": ""}), \
        record_from_row({"anatomy": "brain", "slice": "1", "pathology": "no finding"})
    assert build_prompt(unknown) == "brain, Slice 1" and build_prompt(none) == "brain, Slice 1, Pathology: none"


def test_previously_saved_embedder_still_loads_and_reads_no_finding(tmp_path, test_data_dir):
    emb = _embedder(test_data_dir, cfg_prob=0.0).eval()
    emb.save_pretrained(tmp_path / "emb")
    loaded = MetadataConditionEmbedder.from_pretrained(tmp_path / "emb").eval()
    recs = [{**RECORD, "pathology": "no finding"}, {**RECORD, "pathology": ""}]
    with torch.no_grad():
        torch.testing.assert_close(loaded(recs).tokens, emb(recs).tokens)


def test_cfg_null_prob_reaches_the_training_builder(test_data_dir):
    from utils.training.config import ConfigError, TrainConfig, check_config, parse_config
    from utils.training.model import build_components

    stats = str(test_data_dir / "metadata_stats_brain_knee.json")
    argv = ["--unet_config", "configs/unet/tiny.json", "--text_encoder_type", "none", "--enable_condition_emb",
            "--metadata_stats", stats, "--resolution", "32", "--cfg_strategy", "independent",
            "--mri_metadata_dir_brain", str(test_data_dir / "metadata_val_brain_head.csv")]
    assert parse_config(argv).cfg_null_prob == 0.1  # the default
    config = parse_config(argv + ["--cfg_null_prob", "0.3"])
    check_config(config)
    builder = build_components(config).model.conditioner
    assert builder.null_prob == 0.3 and builder.metadata.cfg_strategy == "independent"
    with pytest.raises(ConfigError, match="cfg_null_prob"):
        check_config(TrainConfig(**{**config.to_dict(), "cfg_null_prob": 1.5}))


def test_recon_script_per_attribute_guidance_on_a_released_text_model(tmp_path, capsys):
    """The real script on a tiny released-layout (CLIP-only) checkpoint: per-attribute guidance runs with 2 NFE per
    step and gives another reconstruction than w = 1; a key the text model cannot read exits 2 with one line."""
    import json

    import numpy as np

    import recon_complex_multi
    from models.tiny_assets import make_fake_released_checkpoint
    from tests.training_helpers import write_tiny_dataset

    csv = write_tiny_dataset(tmp_path / "data", "brain", split="val", num_files=1, slices_per_file=1, crop=32,
                             coils=2, seed=5)
    ckpt = make_fake_released_checkpoint(tmp_path / "MRI_checkpoint")
    base = ["--pretrained_model_name_or_path", str(ckpt), "--data_root", str(tmp_path / "data"),
            "--load_dir_meta_brain", str(csv), "--no_png", "--num_steps", "2", "--crop_size", "32",
            "--save_dir", str(tmp_path / "res")]
    recons = {}
    for tag, extra in (("w1", []), ("te", ["--guidance_scale", "2", "--uncond_drop_keys", "TE"])):
        assert recon_complex_multi.main(base + ["--tag", tag] + extra) == 0
        out = next((tmp_path / "res").rglob(f"{tag}*/rows"))
        row = json.loads(next(out.rglob("*.json")).read_text())
        assert row["nfe"] == (2 if tag == "w1" else 4)
        recons[tag] = np.load(next(out.parent.joinpath("recon").rglob("*.npy")))
    assert np.abs(recons["te"] - recons["w1"]).max() > 1e-4 * np.abs(recons["w1"]).max()
    capsys.readouterr()
    assert recon_complex_multi.main(base + ["--tag", "bad", "--drop_metadata_keys", "field_strength"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "field_strength" in err[0]
