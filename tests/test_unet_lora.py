"""Tests for the UNet builder/loader (models/unet.py) and LoRA (models/lora.py)."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from models.condition_embedder import MetadataConditionEmbedder
from models.conditioning import ConditionBuilder
from models.lora import add_lora, load_lora, lora_wrapped_modules, merge_lora, save_lora
from models.tiny_assets import make_fake_released_checkpoint
from models.text_encoders import TextConditioner
from models.unet import build_unet, condition_dim, load_released_checkpoint, resolve_unet_config

RECORD = {"anatomy": "knee", "slice": 20, "slice_number": 20.0, "contrast": "PDFS", "sequence": "TurboSpinEcho",
          "TR": 3120.0, "TE": 33.0, "TI": 100.0, "flip_angle": 140.0, "pathology": []}


def _inputs(batch: int = 1, size: int = 32, tokens: int = 9, dim: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 2, size, size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    cond = torch.randn(batch, tokens, dim, generator=g)
    return x, t, cond


def test_released_config_is_copied_verbatim(repo_root):
    ours = json.loads((repo_root / "configs/unet/config_mri.json").read_text())
    shared = repo_root.parent / "shared/real/contextmri_assets/configs/unet/config_mri.json"
    if shared.is_file():
        assert ours == json.loads(shared.read_text())
    assert ours["addition_embed_type"] == "text" and ours["encoder_hid_dim"] == 768
    with torch.device("meta"):  # no memory, no time: just the structure
        unet = build_unet("config_mri")
    assert 310e6 < sum(p.numel() for p in unet.parameters()) < 325e6


@pytest.mark.parametrize("name,size", [("tiny", 32), ("small", 64)])
def test_small_configs_keep_the_released_structure(name, size):
    cfg = resolve_unet_config(name)
    assert cfg["sample_size"] == size and cfg["in_channels"] == cfg["out_channels"] == 2
    assert cfg["addition_embed_type"] == "text" and cfg["mid_block_type"] == "UNetMidBlock2DSimpleCrossAttn"
    for i, block in enumerate(cfg["down_block_types"]):
        if "CrossAttn" in block:  # attention only at <= 16x16
            assert size // 2**i <= 16
    torch.manual_seed(0)
    unet = build_unet(name)
    n_params = sum(p.numel() for p in unet.parameters())
    assert n_params < (1.5e6 if name == "tiny" else 2.5e6)
    if name == "small":
        assert n_params > 1.5e6
        return
    # A variable number of condition tokens works; appended tokens reach cross-attention and the pooled time path.
    pooled = []
    unet.add_embedding.register_forward_hook(lambda m, i, o: pooled.append(o.detach()))
    x, t, cond = _inputs(dim=condition_dim(unet))
    with torch.no_grad():
        y_short = unet(x, t, encoder_hidden_states=cond).sample
        extra = torch.randn(1, 4, cond.shape[-1], generator=torch.Generator().manual_seed(1))
        y_long = unet(x, t, encoder_hidden_states=torch.cat([cond, extra], dim=1)).sample
    assert y_short.shape == y_long.shape == x.shape
    assert not torch.allclose(y_short, y_long)
    assert not torch.allclose(pooled[0], pooled[1])


def test_fake_released_checkpoint_loads_and_runs_with_metadata_tokens(tmp_path, test_data_dir):
    root = make_fake_released_checkpoint(tmp_path / "MRI_checkpoint")
    assert {p.name for p in root.iterdir()} >= {"fastmri", "skm-tea", "scheduler", "text_encoder", "tokenizer"}
    ckpt = load_released_checkpoint(root, model_type="fastmri")
    assert isinstance(ckpt.unet, UNet2DConditionModel) and isinstance(ckpt.scheduler, DDPMScheduler)
    assert ckpt.scheduler.config.num_train_timesteps == 1000
    assert not any(p.requires_grad for p in ckpt.text_encoder.parameters())
    skm = load_released_checkpoint(root, model_type="skm-tea", load_text_encoder=False)
    assert skm.text_encoder is None and skm.tokenizer is None
    with pytest.raises(FileNotFoundError):
        load_released_checkpoint(root, model_type="cardiac")

    dim = condition_dim(ckpt.unet)
    text = TextConditioner("clip", ckpt.text_encoder, ckpt.tokenizer, out_dim=dim)
    torch.manual_seed(0)
    meta = MetadataConditionEmbedder.from_stats(test_data_dir / "metadata_stats_brain_knee.json", dim).eval()
    builder = ConditionBuilder(text, meta).eval()
    x, t, _ = _inputs(batch=2, size=16)
    with torch.no_grad():
        cond = builder.build([RECORD, {**RECORD, "TE": 81.0}])
        assert cond.shape == (2, 77 + meta.num_tokens, dim)
        eps = ckpt.unet(x, t, encoder_hidden_states=cond).sample
        eps_text_only = ckpt.unet(x, t, encoder_hidden_states=cond[:, :77]).sample
        cond2, uncond = builder.build_cfg_pair([RECORD, RECORD])
        both = torch.cat([uncond, cond2])
        eps_cfg = ckpt.unet(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=both).sample
    assert eps.shape == x.shape and torch.isfinite(eps).all()
    assert not torch.allclose(eps, eps_text_only)  # the appended metadata tokens matter
    assert eps_cfg.shape == (4, 2, 16, 16)


@pytest.fixture
def tiny_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return build_unet("tiny").eval()


def _perturb_lora_b(unet: UNet2DConditionModel, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


def test_lora_wraps_condition_projections_and_freezes_base(tiny_unet):
    torch.manual_seed(0)
    meta = MetadataConditionEmbedder.from_stats({"TE": {"min": 2.0, "max": 126.0}, "anatomy": ["brain", "knee"]}, 32)
    x, t, cond = _inputs()
    with torch.no_grad():
        base = tiny_unet(x, t, encoder_hidden_states=cond).sample
    add_lora(tiny_unet, rank=4)
    wrapped = lora_wrapped_modules(tiny_unet)
    for suffix in ("to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj"):
        assert any(w.endswith(suffix) for w in wrapped), suffix
    n_attn = sum(1 for n, _ in tiny_unet.named_modules() if n.endswith("add_k_proj"))
    assert sum(w.endswith("add_k_proj") for w in wrapped) == n_attn == 4
    assert not any("add_embedding" in w for w in wrapped)  # the pooling's k/v projections are not targets
    # Only adapter (and, in training, embedder) parameters require grad.
    trainable = [n for n, p in tiny_unet.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    params = [p for p in tiny_unet.parameters() if p.requires_grad] + list(meta.parameters())
    assert all(p.requires_grad for p in meta.parameters())
    # Zero-initialised B: exactly the base output.
    with torch.no_grad():
        torch.testing.assert_close(tiny_unet(x, t, encoder_hidden_states=cond).sample, base, rtol=0, atol=0)
    # Gradients reach the adapters and the embedder through the UNet.
    tokens = meta([{"TE": 33.0, "anatomy": "knee"}]).tokens
    loss = tiny_unet(x, t, encoder_hidden_states=torch.cat([cond, tokens], dim=1)).sample.square().mean()
    loss.backward()
    assert all(p.grad is not None for p in params)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in tiny_unet.named_parameters() if "lora_B" in n)


def test_lora_save_load_round_trip_and_merge(tiny_unet, tmp_path):
    x, t, cond = _inputs()
    add_lora(tiny_unet, rank=4, alpha=8.0)
    _perturb_lora_b(tiny_unet)
    with torch.no_grad():
        lora_out = tiny_unet(x, t, encoder_hidden_states=cond).sample
    path = save_lora(tiny_unet, tmp_path / "lora")
    assert path.name.endswith(".safetensors") and path.is_file()

    torch.manual_seed(0)
    fresh = build_unet("tiny").eval()  # the same base weights
    with torch.no_grad():
        base_out = fresh(x, t, encoder_hidden_states=cond).sample
    load_lora(fresh, tmp_path / "lora")
    assert set(lora_wrapped_modules(fresh)) == set(lora_wrapped_modules(tiny_unet))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, t, encoder_hidden_states=cond).sample, lora_out, rtol=0, atol=0)
    assert not torch.allclose(base_out, lora_out)

    merge_lora(tiny_unet)
    assert lora_wrapped_modules(tiny_unet) == []
    with torch.no_grad():
        merged_out = tiny_unet(x, t, encoder_hidden_states=cond).sample
    torch.testing.assert_close(merged_out, lora_out, rtol=0, atol=1e-5)
