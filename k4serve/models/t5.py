"""The T5 v1.1 XXL text encoder, called exactly as the official Kandinsky 4 pipeline calls it.

224 tokens, padded to length and truncated, special tokens added (`</s>`); the encoder sees NO attention mask, so
the pad positions are encoded and attended, and all 224 output vectors (pads included) reach the DiT.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from transformers import AutoTokenizer, ByT5Tokenizer, T5Config, T5EncoderModel

MAX_TOKENS = 224


@dataclass(frozen=True)
class T5Preset:
    """A T5 encoder that needs no files: random weights from `seed`, a byte-level tokenizer."""

    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_heads: int
    vocab_size: int | None = None  # None: the byte tokenizer's 384
    seed: int = 0


PRESETS: dict[str, T5Preset] = {
    "tiny": T5Preset(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4),
    # T5 v1.1 XXL's shape with random weights: GPU speed work without the official files.
    "xxl": T5Preset(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, vocab_size=32128),
}


def load_tokenizer(tokenizer_dir: str | Path):
    """The official tokenizer of a CogVideoX-5b-style snapshot's `tokenizer/` folder."""
    return AutoTokenizer.from_pretrained(str(tokenizer_dir), clean_up_tokenization_spaces=False)


def preset_tokenizer(name: str):
    """The tokenizer of a random-weight preset (byte-level: it needs no files)."""
    if name not in PRESETS:
        raise ValueError(f"unknown T5 preset {name!r}; choose one of {sorted(PRESETS)}")
    return ByT5Tokenizer()


class T5TextEncoder:
    """prompt -> last hidden state [224, d_model] (4096 for T5 v1.1 XXL)."""

    def __init__(self, tokenizer, encoder: T5EncoderModel, max_tokens: int = MAX_TOKENS):
        self.tokenizer = tokenizer
        self.encoder = encoder.eval().requires_grad_(False)
        self.max_tokens = max_tokens

    @property
    def device(self) -> torch.device:
        return self.encoder.device

    @property
    def dim(self) -> int:
        return self.encoder.config.d_model

    @classmethod
    def from_pretrained(
        cls, text_encoder_dir: str | Path, tokenizer_dir: str | Path, device: str = "cpu", dtype=torch.float32
    ) -> T5TextEncoder:
        """The official encoder and tokenizer from a CogVideoX-5b-style snapshot (`text_encoder/`, `tokenizer/`)."""
        for path, what in ((text_encoder_dir, "text_encoder"), (tokenizer_dir, "tokenizer")):
            if not Path(path).is_dir():
                raise FileNotFoundError(
                    f"{what} directory not found: {path} (expected the {what}/ folder of THUDM/CogVideoX-5b)"
                )
        tokenizer = load_tokenizer(tokenizer_dir)
        # Official: loaded in fp32, then cast as a whole (the fp32-kept `wo` included) to the run dtype.
        encoder = T5EncoderModel.from_pretrained(str(text_encoder_dir)).to(device=device, dtype=dtype)
        return cls(tokenizer, encoder)

    @classmethod
    def from_preset(cls, name: str, device: str = "cpu", dtype=torch.float32) -> T5TextEncoder:
        """A random T5 of a preset's shape with a byte tokenizer, built directly on `device`."""
        preset = PRESETS[name]
        tokenizer = preset_tokenizer(name)
        config = T5Config(
            vocab_size=preset.vocab_size or len(tokenizer),
            d_model=preset.d_model,
            d_kv=preset.d_kv,
            d_ff=preset.d_ff,
            num_layers=preset.num_layers,
            num_heads=preset.num_heads,
            feed_forward_proj="gated-gelu",
            dropout_rate=0.0,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(preset.seed)
            with torch.device(device):
                encoder = T5EncoderModel(config)
        encoder = encoder.to(dtype=dtype)
        if encoder.device.type == "cuda":
            torch.cuda.empty_cache()  # give back the fp32 build's blocks (19 GB at XXL) to the other stages
        return cls(tokenizer, encoder)

    def tokenize(self, prompt: str) -> Tensor:
        """input_ids [1, 224]: special tokens added, truncated, padded to length."""
        return self.tokenizer(
            prompt,
            max_length=self.max_tokens,
            truncation=True,
            add_special_tokens=True,
            padding="max_length",
            return_tensors="pt",
        ).input_ids

    @torch.no_grad()
    def __call__(self, prompt: str) -> Tensor:
        """Encode one prompt: [224, d_model] in the encoder's dtype, without an attention mask (as official)."""
        input_ids = self.tokenize(prompt).to(self.device)
        return self.encoder(input_ids=input_ids).last_hidden_state[0]
