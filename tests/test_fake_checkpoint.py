"""make_fake_checkpoint.py: the released layout loads back, bad arguments give one line and exit 2, nothing is
written over an existing folder."""

from __future__ import annotations

import pytest

import make_fake_checkpoint
from models.unet import condition_dim, load_released_checkpoint


def test_written_folder_loads_as_a_released_checkpoint(tmp_path, one_thread, capsys):
    out = tmp_path / "fake"
    assert make_fake_checkpoint.main(["--output_dir", str(out), "--model_types", "fastmri", "--text_hidden_size",
                                      "16", "--seed", "3"]) == 0
    assert str(out) in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {"fastmri", "scheduler", "text_encoder", "tokenizer", "model_index.json"}
    ckpt = load_released_checkpoint(out, model_type="fastmri")
    assert ckpt.unet.config.sample_size == 32 and condition_dim(ckpt.unet) == 32  # configs/unet/tiny.json
    assert ckpt.text_encoder.config.hidden_size == 16
    assert ckpt.scheduler.config.num_train_timesteps == 1000
    ids = ckpt.tokenizer("knee, PDFS").input_ids
    assert ids[0] == ckpt.tokenizer.bos_token_id and ids[-1] == ckpt.tokenizer.eos_token_id and len(ids) > 3
    with pytest.raises(FileNotFoundError):
        load_released_checkpoint(out, model_type="skm-tea")  # only the UNet asked for


@pytest.mark.parametrize("args, words", [
    (["--text_hidden_size", "30"], "multiple of 4"),
    (["--unet_config", "no_such_config"], "--unet_config no_such_config"),
    (["--model_types", "imagenet"], "invalid choice"),
])
def test_bad_arguments_exit_2_with_one_line_and_write_nothing(tmp_path, capsys, args, words):
    out = tmp_path / "fake"
    with pytest.raises(SystemExit) as exc:
        make_fake_checkpoint.main(["--output_dir", str(out), *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert words in err and "Traceback" not in err
    assert not out.exists()


def test_an_existing_folder_is_never_written_over(tmp_path, capsys):
    out = tmp_path / "MRI_checkpoint"
    (out / "fastmri").mkdir(parents=True)
    (out / "fastmri" / "config.json").write_text("{}")
    with pytest.raises(SystemExit) as exc:
        make_fake_checkpoint.main(["--output_dir", str(out)])
    assert exc.value.code == 2 and "not an empty folder" in capsys.readouterr().err
    assert [p.name for p in out.rglob("*")] == ["fastmri", "config.json"]
    assert (out / "fastmri" / "config.json").read_text() == "{}"


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit) as exc:
        make_fake_checkpoint.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "--output_dir" in text and "tiny" in text and "skm-tea" in text and "LoRA" in text
