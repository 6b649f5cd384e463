"""LoRA adapters saved by the project load with diffusers' and peft's own calls (no project loader involved).

Every check compares the loaded UNet's output with the output of the UNet that carried the trained adapter.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler, IFPipeline, UNet2DConditionModel
from peft import LoraConfig, PeftModel, inject_adapter_in_model, set_peft_model_state_dict
from safetensors.torch import load_file

from models.lora import (LORA_WEIGHT_NAME, PEFT_CONFIG_NAME, PEFT_WEIGHT_NAME, add_lora, load_lora,
                         lora_wrapped_modules, save_lora)
from models.unet import build_unet


def _base() -> UNet2DConditionModel:
    torch.manual_seed(0)  # every call: the same random base weights
    return build_unet("tiny").eval()


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 2, 32, 32, generator=g), torch.tensor([3, 700]), torch.randn(2, 9, 32, generator=g)


def _out(unet: torch.nn.Module) -> torch.Tensor:
    x, t, cond = _inputs()
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=cond).sample


def _trained(rank: int, alpha: float) -> UNet2DConditionModel:
    """A UNet with an adapter whose B is non-zero (as after training)."""
    unet = add_lora(_base(), rank=rank, alpha=alpha)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return unet


def _diffusers_file(unet, folder):
    unet.load_lora_adapter(str(folder / LORA_WEIGHT_NAME))  # every default: prefix="transformer", no header read
    return unet


def _diffusers_folder(unet, folder):
    unet.load_lora_adapter(str(folder), use_safetensors=True)
    return unet


def _diffusers_pipeline(unet, folder):
    # A DeepFloyd-IF pipeline (the released UNet's layout), built offline around the tiny UNet; no text encoder.
    pipe = IFPipeline(tokenizer=None, text_encoder=None, unet=unet, scheduler=DDPMScheduler(), safety_checker=None,
                      feature_extractor=None, watermarker=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(folder))
    assert list(pipe.get_list_adapters()) == ["unet"]
    return pipe.unet


def _peft_model(unet, folder):
    return PeftModel.from_pretrained(unet, str(folder))


def _peft_state_dict(unet, folder):
    inject_adapter_in_model(LoraConfig.from_pretrained(str(folder)), unet)
    state = {k.removeprefix("base_model.model."): v for k, v in load_file(str(folder / PEFT_WEIGHT_NAME)).items()}
    result = set_peft_model_state_dict(unet, state)
    assert not result.unexpected_keys
    return unet


LOADERS = {"diffusers-file-defaults": _diffusers_file, "diffusers-folder": _diffusers_folder,
           "diffusers-pipeline": _diffusers_pipeline, "peft-from_pretrained": _peft_model,
           "peft-set_state_dict": _peft_state_dict}


@pytest.mark.parametrize("rank,alpha", [(4, 8.0), (2, 3.0)])
def test_saved_adapter_loads_with_diffusers_and_peft(tmp_path, rank, alpha):
    trained = _trained(rank, alpha)
    expected = _out(trained)
    atol = 1e-5  # float32 rounding (the scale folded into B; peft's forward path); the adapter's effect is >1000x
    assert (expected - _out(_base())).abs().max() > 1e3 * atol
    save_lora(trained, tmp_path / "lora")
    assert {p.name for p in (tmp_path / "lora").iterdir()} == {LORA_WEIGHT_NAME, PEFT_WEIGHT_NAME, PEFT_CONFIG_NAME}
    keys = set(load_file(str(tmp_path / "lora" / LORA_WEIGHT_NAME)))
    assert keys and all(k.startswith(("unet.", "transformer.")) for k in keys)
    for name, load in LOADERS.items():
        loaded = load(_base(), tmp_path / "lora")
        wrapped = loaded.get_base_model() if isinstance(loaded, PeftModel) else loaded
        assert set(lora_wrapped_modules(wrapped)) == set(lora_wrapped_modules(trained)), name
        torch.testing.assert_close(_out(loaded), expected, rtol=0, atol=atol, msg=lambda m: f"{name}: {m}")
    # The project's loader reads the same folder.
    torch.testing.assert_close(_out(load_lora(_base(), tmp_path / "lora")), expected, rtol=0, atol=atol)


def test_project_loader_reads_adapters_saved_the_old_way(tmp_path):
    trained = _trained(4, 8.0)
    # The earlier layout: keys relative to the UNet, alpha 8 (scale 2) in the header, only the diffusers file.
    trained.save_lora_adapter(tmp_path / "old", safe_serialization=True, weight_name=LORA_WEIGHT_NAME)
    assert not any(k.startswith("unet.") for k in load_file(str(tmp_path / "old" / LORA_WEIGHT_NAME)))
    torch.testing.assert_close(_out(load_lora(_base(), tmp_path / "old")), _out(trained), rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="no LoRA adapter"):
        load_lora(_base(), tmp_path)


def test_exported_lora_is_recorded_and_loads_with_peft(tmp_path):
    from utils.training.config import TrainConfig
    from utils.training.export import save_inference_snapshot
    from models.loading import CorruptExportError, verify_export

    trained = _trained(4, 4.0)
    model = SimpleNamespace(unet=trained, conditioner=SimpleNamespace(metadata=None, text=None))
    config = TrainConfig(pretrained_model_name_or_path=str(tmp_path / "MRI_checkpoint"), use_lora=True)
    out = save_inference_snapshot(model, DDPMScheduler(), config, tmp_path / "run", global_step=1)
    files = verify_export(out)["files"]
    assert {f"lora/{n}" for n in (LORA_WEIGHT_NAME, PEFT_WEIGHT_NAME, PEFT_CONFIG_NAME)} <= set(files)
    torch.testing.assert_close(_out(PeftModel.from_pretrained(_base(), str(out / "lora"))), _out(trained),
                               rtol=0, atol=1e-5)
    path = out / "lora" / PEFT_WEIGHT_NAME
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptExportError, match=PEFT_WEIGHT_NAME):
        verify_export(out)
