"""Tiny offline stand-ins for the released assets (no network, random weights): not models, only their layout.

Used by ``make_fake_checkpoint.py`` (try the fine-tuning and LoRA path without the released weights), by the demo (a
tiny CLIP/T5 text encoder for its offline text baselines), and by the tests and benchmarks.

* :func:`write_tiny_clip_tokenizer` writes a CLIP BPE tokenizer folder (``vocab.json``, ``merges.txt``,
  ``tokenizer_config.json``, the released ``tokenizer/`` layout) over a byte-level alphabet plus a few merges of
  words the ContextMRI prompt uses.
* :func:`tiny_t5_tokenizer` builds a ``T5Tokenizer`` over a small Unigram vocabulary (transformers 5.x tokenizers are
  backed by the ``tokenizers`` library and accept ``vocab=[(piece, score), ...]``; no SentencePiece model needed).
* :func:`make_fake_released_checkpoint` writes a tiny ``MRI_checkpoint/`` with the released layout (docs/formats.md):
  ``fastmri/`` + ``skm-tea/`` (tiny UNet), ``scheduler/``, ``text_encoder/`` (tiny CLIPTextModel), ``tokenizer/``.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

from models.unet import RELEASED_MODEL_TYPES, build_unet
from utils.files import atomic_write_text, to_json

CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"
_PROMPT_WORDS = (
    "knee", "brain", "heart", "slice", "pdfs", "pd", "flair", "t1", "t2", "sequence", "pathology", "tr", "te", "ti",
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode character table."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def tiny_clip_vocab() -> tuple[dict[str, int], list[str]]:
    """A CLIP BPE vocabulary (byte alphabet, word-final variants, merges of a few prompt words, special tokens).

    Returns:
        ``(vocab, merges)``: token -> id, and merge rules ``"a b"`` in priority order.
    """
    chars = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges: list[str] = []
    for word in _PROMPT_WORDS:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            rule = f"{symbols[0]} {symbols[1]}"
            merged = symbols[0] + symbols[1]
            if rule not in merges:
                merges.append(rule)
            vocab.setdefault(merged, len(vocab))
            symbols = [merged] + symbols[2:]
    vocab[CLIP_BOS] = len(vocab)
    vocab[CLIP_EOS] = len(vocab)
    return vocab, merges


def write_tiny_clip_tokenizer(directory: str | Path, model_max_length: int = 77) -> Path:
    """Write a CLIPTokenizer folder in the released layout (``vocab.json``, ``merges.txt``, configs)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = tiny_clip_vocab()
    atomic_write_text(directory / "vocab.json", json.dumps(vocab, ensure_ascii=False))
    atomic_write_text(directory / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {"bos_token": CLIP_BOS, "eos_token": CLIP_EOS, "unk_token": CLIP_EOS, "pad_token": CLIP_EOS}
    atomic_write_text(directory / "special_tokens_map.json", json.dumps(special))
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": model_max_length, **special}
    atomic_write_text(directory / "tokenizer_config.json", json.dumps(config))
    return directory


def tiny_clip_text_model(hidden_size: int = 32, vocab_size: int | None = None, seed: int = 0):
    """A randomly initialised 2-layer ``CLIPTextModel`` (77 positions) matching :func:`tiny_clip_vocab`."""
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab, _ = tiny_clip_vocab()
    config = CLIPTextConfig(
        vocab_size=vocab_size or len(vocab),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=vocab[CLIP_BOS],
        eos_token_id=vocab[CLIP_EOS],
        pad_token_id=vocab[CLIP_EOS],
    )
    torch.manual_seed(seed)
    return CLIPTextModel(config).eval()


def tiny_t5_tokenizer():
    """An offline ``T5Tokenizer`` over characters, digits, punctuation and a few whole prompt words."""
    from transformers import T5Tokenizer

    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -5.0) for c in string.ascii_letters + string.digits + ",.:-_()/"]
    words = ("knee", "brain", "Slice", "Sequence", "Pathology", "TR", "TE", "TI", "PDFS", "FLAIR")
    pieces += [("▁" + w, -3.0) for w in words]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def tiny_t5_encoder(d_model: int = 48, vocab_size: int = 128, seed: int = 0):
    """A randomly initialised 2-layer ``T5EncoderModel``."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size, d_model=d_model, d_kv=12, d_ff=2 * d_model, num_layers=2, num_heads=4,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )
    torch.manual_seed(seed)
    return T5EncoderModel(config).eval()


def write_tiny_t5_folder(directory: str | Path, d_model: int = 48) -> Path:
    """Write a local T5 folder (encoder weights + tokenizer in one folder, like a hub T5 snapshot)."""
    directory = Path(directory)
    tokenizer = tiny_t5_tokenizer()
    tiny_t5_encoder(d_model=d_model, vocab_size=max(128, len(tokenizer))).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def make_fake_released_checkpoint(
    root: str | Path,
    unet_config: str | Path | dict = "tiny",
    text_hidden_size: int = 32,
    model_types: tuple[str, ...] = RELEASED_MODEL_TYPES,
    seed: int = 0,
) -> Path:
    """Write a tiny ``MRI_checkpoint/`` with the released layout and return its path.

    The UNet is built from ``unet_config`` (default ``configs/unet/tiny.json``, 32x32, ``encoder_hid_dim`` 32) and
    saved with ``save_pretrained`` under every ``model_types`` folder; the DDPM scheduler config mirrors the released
    one (1000 steps, linear betas 1e-4..0.02, epsilon prediction); the text encoder is a tiny CLIP text model
    (``text_hidden_size`` wide, 4 attention heads) with the tokenizer of :func:`write_tiny_clip_tokenizer`.

    Args:
        root: the folder to write (created; existing files of the same names are replaced).
        unet_config: a name of ``configs/unet/`` (``"tiny"``, ``"small"``, ...), a JSON path, or a config dict.
        text_hidden_size: width of the CLIP text model (a multiple of 4).
        model_types: the UNet folders to write (:data:`models.unet.RELEASED_MODEL_TYPES` by default).
        seed: seed of the random weights.

    Returns:
        ``Path(root)``.
    """
    from diffusers import DDPMScheduler

    root = Path(root)
    torch.manual_seed(seed)
    unet = build_unet(unet_config)
    for model_type in model_types:
        unet.save_pretrained(root / model_type)
    DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
        prediction_type="epsilon", clip_sample=False,
    ).save_pretrained(root / "scheduler")
    tiny_clip_text_model(hidden_size=text_hidden_size, seed=seed).save_pretrained(root / "text_encoder")
    write_tiny_clip_tokenizer(root / "tokenizer")
    index = {
        "_class_name": "MRIPipeline",
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
    }
    atomic_write_text(root / "model_index.json", to_json(index))
    return root
