"""Tests for text encoders (models/text_encoders.py) and condition assembly (models/conditioning.py)."""

from __future__ import annotations

import pytest
import torch

from models.condition_embedder import MetadataConditionEmbedder
from models.conditioning import ConditionBuilder
from models.tiny_assets import tiny_clip_text_model, write_tiny_clip_tokenizer, write_tiny_t5_folder
from models.text_encoders import load_text_conditioner

D = 32
PROMPT = "knee, Slice 20, PDFS, Sequence: TurboSpinEcho, TR: 3120, TE: 33, TI: 100, Flip angle: 140"
RECORD = {"anatomy": "knee", "slice": 20, "slice_number": 20.0, "contrast": "PDFS", "sequence": "TurboSpinEcho",
          "TR": 3120.0, "TE": 33.0, "TI": 100.0, "flip_angle": 140.0, "pathology": []}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    ckpt = root / "MRI_checkpoint"
    tiny_clip_text_model(hidden_size=D).save_pretrained(ckpt / "text_encoder")  # same width as D: no projection
    write_tiny_clip_tokenizer(ckpt / "tokenizer")
    write_tiny_t5_folder(root / "t5", d_model=48)  # width 48 != D: projection
    return {"clip": ckpt, "t5": root / "t5"}


@pytest.fixture(scope="module")
def conditioners(folders):
    return {
        "none": load_text_conditioner("none", None, out_dim=D),
        "clip": load_text_conditioner("clip", folders["clip"], out_dim=D),
        "t5": load_text_conditioner("t5", folders["t5"], out_dim=D),
    }


@pytest.fixture(scope="module")
def embedder(test_data_dir):
    torch.manual_seed(0)
    return MetadataConditionEmbedder.from_stats(test_data_dir / "metadata_stats_brain_knee.json", D).eval()


def test_offline_tokenizers_really_tokenize(conditioners):
    clip_tok = conditioners["clip"].tokenizer
    tokens = clip_tok.convert_ids_to_tokens(clip_tok("knee, Slice 20, PDFS")["input_ids"])
    assert tokens == ["<|startoftext|>", "knee</w>", ",</w>", "slice</w>", "2</w>", "0</w>", ",</w>", "pdfs</w>",
                      "<|endoftext|>"]
    t5_tok = conditioners["t5"].tokenizer
    ids = t5_tok("knee, Slice 3")["input_ids"]
    assert t5_tok.convert_ids_to_tokens(ids) == ["▁knee", ",", "▁Slice", "▁", "3", "</s>"]
    assert t5_tok.unk_token_id not in ids


def test_text_conditioner_shapes_frozen_and_projection(conditioners):
    clip, t5, none = conditioners["clip"], conditioners["t5"], conditioners["none"]
    assert clip.encode([PROMPT, ""]).shape == (2, 77, D)
    assert t5.encode([PROMPT, ""]).shape == (2, 77, D)
    assert none.encode([PROMPT, ""]).shape == (2, 0, D)
    assert isinstance(clip.proj, torch.nn.Identity) and isinstance(t5.proj, torch.nn.Linear)
    assert t5.proj.in_features == 48
    for cond in (clip, t5):
        assert not any(p.requires_grad for p in cond.encoder.parameters())
        cond.train()
        assert not cond.encoder.training  # frozen encoder: no dropout in training
        cond.eval()
    assert [p.requires_grad for p in t5.trainable_parameters()] == [True, True]
    # Different prompts give different tokens; the T5 padding positions are zeroed.
    a, b = clip.encode([PROMPT, "brain, Slice 3, FLAIR"])
    assert not torch.allclose(a, b)
    short = t5.encode(["knee"])[0]
    assert short[5:].abs().max() == 0 and short[0].abs().max() > 0


def test_load_from_encoder_folder_directly(folders):
    cond = load_text_conditioner("clip", folders["clip"] / "text_encoder", out_dim=64)
    assert isinstance(cond.proj, torch.nn.Linear) and cond.encode([PROMPT]).shape == (1, 77, 64)
    with pytest.raises(ValueError):
        load_text_conditioner("bert", folders["clip"], out_dim=D)


@pytest.mark.parametrize("text_kind", ["none", "clip", "t5"])
@pytest.mark.parametrize("use_metadata", [False, True])
def test_condition_builder_every_combination(conditioners, embedder, text_kind, use_metadata):
    text = conditioners[text_kind]
    meta = embedder if use_metadata else None
    if text_kind == "none" and not use_metadata:
        with pytest.raises(ValueError):
            ConditionBuilder(text, meta)
        return
    builder = ConditionBuilder(text, meta).eval()
    expected_len = (77 if text_kind != "none" else 0) + (embedder.num_tokens if use_metadata else 0)
    assert builder.num_tokens() == expected_len
    other = {**RECORD, "anatomy": "brain", "contrast": "AX FLAIR_FBB", "TE": 81.0}
    with torch.no_grad():
        cond = builder.build([RECORD, other], [PROMPT, "brain, Slice 20, FLAIR"])
        uncond = builder.unconditional(batch_size=2)
        cond_b, uncond_b = builder.build_cfg_pair([RECORD, other], [PROMPT, "brain"])
    assert cond.shape == uncond.shape == cond_b.shape == (2, expected_len, D)
    torch.testing.assert_close(uncond, uncond_b)
    torch.testing.assert_close(uncond[0], uncond[1])  # unconditional does not depend on the sample
    assert not torch.allclose(cond[0], cond[1])
    if use_metadata:
        # metadata tokens come after the text tokens
        meta_part = cond[:, expected_len - embedder.num_tokens:]
        torch.testing.assert_close(meta_part, embedder([RECORD, other]).tokens)
    if text_kind != "none":
        torch.testing.assert_close(uncond[:, :77], text.encode(["", ""]))


def test_builder_prompts_from_records_and_drop_keys(conditioners, embedder):
    from utils.metadata import build_prompt

    builder = ConditionBuilder(conditioners["clip"], embedder).eval()
    with torch.no_grad():
        from_records = builder.build([RECORD])
        explicit = builder.build([RECORD], [build_prompt(RECORD)])
        dropped = builder.build([RECORD], drop_keys=["TE"])
    torch.testing.assert_close(from_records, explicit)
    k = 77 + 1 + embedder.keys.index("TE")
    torch.testing.assert_close(dropped[0, k], embedder.empty_tokens()[embedder.keys.index("TE")])
    torch.testing.assert_close(dropped[0, 77:k], from_records[0, 77:k])
    # a dropped attribute is taken out of the prompt too: the text tokens are those of the prompt without "TE: 33"
    without_te = build_prompt(RECORD, omit=["TE"])
    assert "TE:" not in without_te and "TR: 3120" in without_te
    torch.testing.assert_close(dropped[0, :77], builder.text.encode([without_te])[0])
    assert not torch.allclose(dropped[0, :77], from_records[0, :77])


def test_builder_trains_embedder_and_projection_only(conditioners, test_data_dir):
    torch.manual_seed(0)
    meta = MetadataConditionEmbedder.from_stats(test_data_dir / "metadata_stats_brain_knee.json", D, cfg_prob=0.5,
                                                cfg_strategy="joint")
    builder = ConditionBuilder(conditioners["t5"], meta, prompt_drop_prob=0.0).train()
    trainable = {n for n, p in builder.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("metadata.", "text.proj.")) for n in trainable)
    out = builder.build([RECORD] * 8, [PROMPT] * 8, generator=torch.Generator().manual_seed(3))
    out.square().mean().backward()
    assert builder.text.proj.weight.grad is not None and meta.empty.grad is not None
    # joint strategy: a sample whose metadata is dropped also gets the empty prompt (the sampling-time null input)
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        out = builder.build([RECORD] * 16, [PROMPT] * 16, generator=g)
        g = torch.Generator().manual_seed(5)
        dropped = meta([RECORD] * 16, generator=g).dropped.all(dim=1)
        builder.eval()
        null = builder.unconditional(batch_size=1)[0]
    assert 0 < dropped.sum() < 16
    for i in range(16):
        assert torch.allclose(out[i], null, atol=1e-6) == bool(dropped[i])
    conditioners["t5"].eval()


def test_builder_rejects_mismatched_widths(conditioners, test_data_dir):
    meta = MetadataConditionEmbedder.from_stats(test_data_dir / "metadata_stats_brain_knee.json", 16)
    with pytest.raises(ValueError):
        ConditionBuilder(conditioners["clip"], meta)


def test_trainable_text_encoder_gets_gradients(folders):
    """A text baseline trained from scratch: the encoder's weights receive gradients and change the tokens."""
    text = load_text_conditioner("clip", folders["clip"], out_dim=32, trainable_encoder=True).train()
    assert all(p.requires_grad for p in text.encoder.parameters())
    assert text.encoder.training
    tokens = text.encode(["brain, Slice 3, T2", "brain, Slice 3, FLAIR"])
    tokens.square().mean().backward()
    grads = [p.grad for p in text.encoder.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)
    frozen = load_text_conditioner("clip", folders["clip"], out_dim=32)
    assert not any(p.requires_grad for p in frozen.encoder.parameters())


def test_unconditional_builder_gives_one_constant_token():
    builder = ConditionBuilder(None, None, null_dim=16)
    out = builder.build([{}, {}, {}])
    assert out.shape == (3, 1, 16) and float(out.abs().sum()) == 0.0
    assert builder.num_tokens() == 1 and builder.is_unconditional
    with pytest.raises(ValueError):
        ConditionBuilder(None, None)
