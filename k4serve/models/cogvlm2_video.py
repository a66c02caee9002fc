"""CogVLM2-Video (THUDM/cogvlm2-video-llama3-chat) as the Kandinsky 4 V2A conditioner: a feature extractor.

What the official pipeline (kandinsky4_video2audio/video2audio_pipe.py) takes from it: one forward with
`output_hidden_states=True` and `hidden_states[-2]`, the output of decoder layer 31 of 32 before the final norm
(`hidden_states[0]` is the embedding output, `[-1]` the normed output of layer 32):
  * video: at the 66·F vision tokens of [BOS ; F frames], mean-pooled per frame -> [F, 4096] (F = 96);
  * text: at every token of [BOS ; prompt] (a text-only query), zero-padded / truncated to 100 -> [100, 4096].
So only 31 decoder layers are built; the 32nd, the final RMSNorm and the LM head are neither built nor loaded.

What the remote code (modeling_cogvlm.py `CogVLMVideoForCausalLM`, util.py, visual.py) does, and so do we:
  * the video checkpoint has no vision experts: every token goes through the `language_expert_*` attention and
    `language_mlp` weights (the vision-expert branches are commented out there; 12.5 B parameters, 25 GB of bf16
    shards), so token types only place the vision features and shape the position ids;
  * template "base" puts no frame-index text between frames (only "chat" does): the F·66 vision tokens are one
    run, and `build_position_ids` gives them 1, 2, 2, ..., 2, 3 (the run's ends count as BOI/EOI);
  * RoPE base 500000 (hard-coded), rotate-half layout, cos/sin from fp32 angles rounded to the activations' dtype,
    the rotation in fp32; GQA 32 query / 8 kv heads, causal SDPA; RMSNorm in fp32 (eps 1e-5); SwiGLU MLP.
Parameter names equal the snapshot's keys. Numerics follow the official bf16 run (no autocast: every op in bf16
but the RMSNorm and the rotation); plain fp32 on the CPU.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoTokenizer

from k4serve.models.checkpoints import CheckpointError, load_state_dict_strict, read_safetensors, safetensors_files
from k4serve.models.dit import AttentionFn, init_random_weights
from k4serve.models.eva2_clip import EVA2CLIPConfig, EVA2CLIPModel
from k4serve.models.frame_sampling import NUM_FRAMES

LANGUAGE_TOKEN, VISION_TOKEN = 0, 1  # token_type_ids
PROMPT_TOKENS = 100  # the official pads / truncates the prompt features to this many rows
DEFAULT_PROMPT = "clean. clear. good quality."
DEFAULT_NEGATIVE_PROMPT = "hissing noise. drumming rythm. saying. poor quality."  # sic, as the official README
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
UNCONDITIONAL_CACHE = 16  # negative prompts whose features are kept (0.8 MB each at full size in bf16)
PREPROCESS_CHUNK = 16  # frames per preprocessing step: bounds the float copy of a long 1080p upload

# q [B, L, H, D], k/v [B, L, H_kv, D] -> [B, L, H, D]; causal, scale 1/sqrt(D), query head j reads kv head j // (H/H_kv)
CausalAttentionFn = Callable[[Tensor, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class CogVLM2VideoConfig:
    """The LLM fields of the snapshot's config.json (defaults: THUDM/cogvlm2-video-llama3-chat) and the vision tower."""

    vocab_size: int = 128256
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_multi_query_heads: int = 8
    rms_norm_eps: float = 1e-5
    bos_token_id: int = 128000
    pad_token_id: int = 128002  # the remote code fills the vision slots with it (their embeddings are replaced)
    rope_theta: float = 500000.0  # hard-coded in the remote code, not read from config.json
    vision: EVA2CLIPConfig = field(default_factory=EVA2CLIPConfig)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def built_layers(self) -> int:
        """Decoder layers up to the one whose output is hidden_states[-2]."""
        return self.num_hidden_layers - 1

    @classmethod
    def from_json(cls, path: str | Path) -> CogVLM2VideoConfig:
        """Read a CogVLMVideoForCausalLM config.json; keys the remote code does not read are ignored."""
        raw = json.loads(Path(path).read_text())
        if raw.get("architectures", ["CogVLMVideoForCausalLM"]) != ["CogVLMVideoForCausalLM"]:
            raise CheckpointError(f"{path} describes {raw['architectures']}, not CogVLMVideoForCausalLM")
        if raw.get("hidden_act", "silu") != "silu" or "vision_config" not in raw:
            raise CheckpointError(f"{path}: expected hidden_act 'silu' and a vision_config (cogvlm2-video-llama3)")
        names = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_multi_query_heads", "rms_norm_eps", "bos_token_id", "pad_token_id")  # fmt: skip
        vision = EVA2CLIPConfig.from_dict(raw["vision_config"], str(path))
        return cls(**{name: raw[name] for name in names if name in raw}, vision=vision)


PRESETS: dict[str, CogVLM2VideoConfig] = {
    "cogvlm2-video-llama3-chat": CogVLM2VideoConfig(),
    # CPU tests and the demo: the same structure at toy widths (224 px frames, so still 66 tokens a frame; 3 decoder
    # layers of which 2 are built; GQA 4 / 2 heads) and the byte tokenizer's vocabulary: 96 frames in about a second.
    "tiny": CogVLM2VideoConfig(
        vocab_size=259,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_multi_query_heads=2,
        bos_token_id=256,
        pad_token_id=258,
        vision=EVA2CLIPConfig(hidden_size=32, num_hidden_layers=2, num_heads=2, intermediate_size=64),
    ),
}


class ByteTokenizer:
    """A tokenizer that needs no files, with the roles the pipeline uses: UTF-8 bytes are ids 0..255, then BOS."""

    def __init__(self, bos_token_id: int = 256):
        self.bos_token_id = bos_token_id

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Byte ids of `text`, BOS first when add_special_tokens."""
        ids = list(text.encode("utf-8"))
        return [self.bos_token_id, *ids] if add_special_tokens else ids


# ---- token layout (build_conversation_input_ids + build_position_ids of the remote code) ----


@dataclass(frozen=True)
class TokenLayout:
    """One sequence: input_ids, token_type_ids and position_ids, each [1, L] int64."""

    input_ids: Tensor
    token_type_ids: Tensor
    position_ids: Tensor

    def to(self, device: torch.device | str) -> TokenLayout:
        return TokenLayout(*(t.to(device) for t in (self.input_ids, self.token_type_ids, self.position_ids)))


def build_position_ids(token_type_ids: Tensor) -> Tensor:
    """[B, L] token types -> position ids as the remote code: a language token advances the position; in a run of
    vision tokens the first and last (BOI, EOI) count as language and the rest share the position after the first."""
    vision = token_type_ids == VISION_TOKEN
    run_start, run_end = vision.clone(), vision.clone()
    run_start[:, 1:] &= ~vision[:, :-1]
    run_end[:, :-1] &= ~vision[:, 1:]
    vision = vision & ~(run_start | run_end)
    step = torch.zeros_like(token_type_ids)
    step[:, 1:] = (~vision[:, 1:] | ~vision[:, :-1]).long()  # language, or the first inner vision token of a run
    return step.cumsum(dim=-1)


def conversation_layout(
    bos_token_id: int, pad_token_id: int, text_ids: Sequence[int] = (), num_frames: int = 0, tokens_per_frame: int = 66
) -> TokenLayout:
    """[BOS ; num_frames · tokens_per_frame vision slots ; text] as template "base" builds it (no frame indices)."""
    n_vision = num_frames * tokens_per_frame
    ids = [bos_token_id, *[pad_token_id] * n_vision, *text_ids]
    types = torch.tensor([[LANGUAGE_TOKEN, *[VISION_TOKEN] * n_vision, *[LANGUAGE_TOKEN] * len(text_ids)]])
    return TokenLayout(torch.tensor([ids]), types, build_position_ids(types))


# ---- decoder ----


def rope_cos_sin(position_ids: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos, sin [B, L, head_dim/2] at `position_ids`: fp32 angles (fp64 for a float64 model), rounded to `dtype`."""
    angle_dtype = torch.promote_types(torch.float32, dtype)
    # inv_freq as the remote code's buffer: built on the CPU at init, then moved
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=angle_dtype) / head_dim))
    angles = position_ids.to(angle_dtype)[..., None] * inv_freq.to(position_ids.device)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the pairs (i, i + D/2) of x [B, L, H, D] in fp32 (as the remote code's kernel); cos/sin [B, L, D/2]."""
    compute = torch.promote_types(x.dtype, torch.float32)
    x1, x2 = x.to(compute).chunk(2, dim=-1)
    c, s = cos[:, :, None].to(compute), sin[:, :, None].to(compute)
    return torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).to(x.dtype)


def sdpa_causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal grouped-query attention through torch SDPA (kv heads repeated as the remote code expands them)."""
    groups = q.shape[2] // k.shape[2]
    k, v = (t.repeat_interleave(groups, dim=2).transpose(1, 2) for t in (k, v))
    return F.scaled_dot_product_attention(q.transpose(1, 2), k, v, is_causal=True).transpose(1, 2)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        h = x.to(torch.promote_types(x.dtype, torch.float32))  # fp32 statistics whatever the activations' dtype
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * h).to(x.dtype)


class LanguageExpertAttention(nn.Module):
    """`self_attn`: fused QKV rows [q (H·D) ; k (H_kv·D) ; v (H_kv·D)], head-major, no biases."""

    def __init__(self, config: CogVLM2VideoConfig):
        super().__init__()
        self.heads, self.kv_heads, d = config.num_attention_heads, config.num_multi_query_heads, config.head_dim
        self.split = (self.heads * d, self.kv_heads * d, self.kv_heads * d)
        self.language_expert_query_key_value = nn.Linear(config.hidden_size, sum(self.split), bias=False)
        self.language_expert_dense = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.attention_fn: CausalAttentionFn = sdpa_causal_attention

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        """x [B, L, D] -> [B, L, D]; RoPE on q and k, causal attention over the whole sequence."""
        b, n, _ = x.shape
        q, k, v = self.language_expert_query_key_value(x).split(self.split, dim=-1)
        q = apply_rope(q.view(b, n, self.heads, -1), *rope)
        k = apply_rope(k.view(b, n, self.kv_heads, -1), *rope)
        out = self.attention_fn(q, k, v.view(b, n, self.kv_heads, -1))
        return self.language_expert_dense(out.reshape(b, n, -1))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: CogVLM2VideoConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LanguageExpertAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # The checkpoint nests the MLP as `mlp.language_mlp` (its vision-expert sibling does not exist here).
        self.mlp = nn.ModuleDict({"language_mlp": SwiGLU(config.hidden_size, config.intermediate_size)})

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope)
        return x + self.mlp["language_mlp"](self.post_attention_layernorm(x))


class CogVLMVideoModel(nn.Module):
    """The checkpoint's `model.` subtree: token embedding, decoder layers up to hidden_states[-2], vision tower."""

    def __init__(self, config: CogVLM2VideoConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.built_layers))
        self.vision = EVA2CLIPModel(config.vision, config.hidden_size, config.intermediate_size)


class CogVLM2Video(nn.Module):
    def __init__(self, config: CogVLM2VideoConfig):
        super().__init__()
        self.config = config
        self.model = CogVLMVideoModel(config)

    def set_attention(self, vision: AttentionFn | None = None, decoder: CausalAttentionFn | None = None) -> None:
        """Swap the vision tower's full attention and/or the decoder's causal attention kernel."""
        if vision is not None:
            self.model.vision.set_attention(vision)
        for layer in self.model.layers if decoder is not None else ():
            layer.self_attn.attention_fn = decoder

    def forward(self, layout: TokenLayout, images: Tensor | None = None) -> Tensor:
        """hidden_states[-2] [1, L, D] of one sequence; `images` [F, 3, 224, 224] fill its F·66 vision tokens."""
        # 1. token embeddings; the vision slots take the vision tower's per-frame outputs       [1, L, D]
        x = self.model.embed_tokens(layout.input_ids)
        if images is not None:
            features = self.model.vision(images).flatten(0, 1)  # [F·66, D], frames in order
            x = x.index_put((layout.token_type_ids == VISION_TOKEN,), features.to(x.dtype))
        # 2. RoPE tables at the layout's positions                                               [1, L, D/2]
        rope = rope_cos_sin(layout.position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)
        # 3. decoder layers 1..31: their output is hidden_states[-2] (no final norm)
        for layer in self.model.layers:
            x = layer(x, rope)
        return x


# ---- frames in ----


def _uint8_frames(frames: np.ndarray | Tensor) -> Tensor:
    if isinstance(frames, np.ndarray):
        frames = torch.from_numpy(np.ascontiguousarray(frames))
    if not isinstance(frames, Tensor) or frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        got = f"{frames.dtype} {list(frames.shape)}" if hasattr(frames, "shape") else type(frames).__name__
        raise ValueError(f"frames must be uint8 RGB [F, H, W, 3], got {got}")
    if frames.shape[0] < 1 or min(frames.shape[1:3]) < 1:
        raise ValueError(f"frames must hold at least one frame of at least 1x1 pixels, got {list(frames.shape)}")
    return frames


def _preprocess_chunk(frames: Tensor, size: int) -> Tensor:
    x = frames.permute(3, 0, 1, 2) / 255.0  # [3, f, H, W] float32, the remote code's Lambda(x / 255)
    mean = torch.tensor(CLIP_MEAN, device=x.device)[:, None, None, None]
    std = torch.tensor(CLIP_STD, device=x.device)[:, None, None, None]
    x = (x - mean) / std  # NormalizeVideo: subtract, then divide
    h, w = x.shape[-2:]
    # pytorchvideo ShortSideScale: the short side to `size`, the long one floor(long/short · size); bilinear,
    # align_corners False, no antialias
    new_h, new_w = (math.floor(h / w * size), size) if w < h else (size, math.floor(w / h * size))
    x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False)
    # torchvision CenterCropVideo: offsets int(round(excess / 2)), Python's round (halves go to the even side)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return x[..., top : top + size, left : left + size].transpose(0, 1)


def preprocess_frames(frames: np.ndarray | Tensor, size: int = 224, device: torch.device | str | None = None) -> Tensor:
    """uint8 frames [F, H, W, 3] -> float32 [F, 3, size, size] on `device`: x/255, CLIP mean/std, short side to
    `size`, centre crop, in the remote code's order (done per chunk of frames; each op is per frame)."""
    frames = _uint8_frames(frames)
    return torch.cat([_preprocess_chunk(chunk.to(device), size) for chunk in frames.split(PREPROCESS_CHUNK)])


# ---- the encoder ----


class Conditioning(NamedTuple):
    """One branch of the V2A conditioning: prompt features [100, D] and per-frame video features [F, D]."""

    prompt: Tensor
    video: Tensor


SNAPSHOT_LAYOUT = (
    "expected a THUDM/cogvlm2-video-llama3-chat snapshot: config.json, model.safetensors.index.json with its "
    "shards (or model.safetensors), and the tokenizer files (tokenizer.json, tokenizer_config.json)"
)


def skipped_checkpoint_key(config: CogVLM2VideoConfig) -> Callable[[str], bool]:
    """Keys of the snapshot that are never read: the last decoder layer, the final norm, the LM head (all after
    hidden_states[-2]) and any stored RoPE inv_freq buffer (derived; recomputed)."""
    last_layer = f"model.layers.{config.num_hidden_layers - 1}."
    after = ("lm_head.weight", "model.norm.weight")
    return lambda key: key in after or key.startswith(last_layer) or key.endswith("rotary_emb.inv_freq")


def empty_model(config: CogVLM2VideoConfig, device: torch.device | str, dtype: torch.dtype) -> CogVLM2Video:
    """The model with uninitialised parameters of `dtype`, allocated directly on `device` (no fp32 copy)."""
    with torch.device("meta"):
        model = CogVLM2Video(config).to(dtype)
    return model.to_empty(device=device)


class CogVLM2VideoEncoder:
    """frames -> per-frame video features [F, 4096], prompt -> prompt features [100, 4096], as the official V2A."""

    def __init__(self, model: CogVLM2Video, tokenizer):
        self.model = model.eval().requires_grad_(False)
        self.config = model.config
        self.tokenizer = tokenizer
        self._black_video: dict[int, Tensor] = {}  # frame count -> the black video's features
        self._unconditional: OrderedDict[tuple[str, int], Conditioning] = OrderedDict()  # least recently used first

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def dim(self) -> int:
        return self.config.hidden_size

    @classmethod
    def from_pretrained(
        cls, snapshot_dir: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> CogVLM2VideoEncoder:
        """The official model and tokenizer from a snapshot folder, strictly loaded, built on `device` in `dtype`."""
        snapshot = Path(snapshot_dir)
        if not (snapshot / "config.json").is_file():
            raise CheckpointError(f"missing {snapshot / 'config.json'}: {SNAPSHOT_LAYOUT}")
        config = CogVLM2VideoConfig.from_json(snapshot / "config.json")
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(snapshot))
        except (OSError, ValueError) as error:
            raise CheckpointError(f"cannot load the tokenizer of {snapshot}: {error}; {SNAPSHOT_LAYOUT}") from error
        model = empty_model(config, device, dtype)
        state_dict = read_safetensors(safetensors_files(snapshot), skip=skipped_checkpoint_key(config))
        load_state_dict_strict(model, state_dict, what=f"CogVLM2-Video snapshot {snapshot}")
        return cls(model, tokenizer)

    @classmethod
    def from_preset(
        cls, name: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0
    ) -> CogVLM2VideoEncoder:
        """A preset's shape with seeded random weights, built directly on `device` in `dtype`, and a byte tokenizer."""
        if name not in PRESETS:
            raise ValueError(f"unknown CogVLM2-Video preset {name!r}; choose one of {sorted(PRESETS)}")
        config = PRESETS[name]
        model = init_random_weights(empty_model(config, device, dtype), seed)
        return cls(model, ByteTokenizer(config.bos_token_id))

    def preprocess(self, frames: np.ndarray | Tensor) -> Tensor:
        """uint8 frames [F, H, W, 3] -> normalised float32 [F, 3, 224, 224] on the model's device."""
        return preprocess_frames(frames, self.config.vision.image_size, self.device)

    @torch.no_grad()
    def video_features(self, frames: np.ndarray | Tensor) -> Tensor:
        """The sampled frames (uint8 [F, H, W, 3]; F = 96 in V2A) -> hidden_states[-2] at the vision tokens,
        mean-pooled per frame: [F, D] in the model's dtype."""
        images = self.preprocess(frames).to(self.dtype)  # official: fp32 preprocessing, then cast to the model
        num_frames, per_frame = images.shape[0], self.config.vision.tokens_per_frame
        layout = conversation_layout(
            self.tokenizer.bos_token_id, self.config.pad_token_id, num_frames=num_frames, tokens_per_frame=per_frame
        ).to(self.device)
        hidden = self.model(layout, images)[0]
        vision = hidden[layout.token_type_ids[0] == VISION_TOKEN]
        return vision.view(num_frames, per_frame, -1).mean(dim=1)

    @torch.no_grad()
    def text_features(self, prompt: str) -> Tensor:
        """hidden_states[-2] at [BOS ; prompt tokens], zero-padded or truncated to [100, D], in the model's dtype."""
        if not isinstance(prompt, str):
            raise ValueError(f"the prompt must be a string, got {type(prompt).__name__}")
        # Causal attention: the 100 rows kept never see a later token, so the input is cut there (exactly equal).
        text_ids = self.tokenizer.encode(prompt, add_special_tokens=False)[: PROMPT_TOKENS - 1]
        layout = conversation_layout(self.tokenizer.bos_token_id, self.config.pad_token_id, text_ids)
        hidden = self.model(layout.to(self.device))[0]
        features = hidden.new_zeros(PROMPT_TOKENS, hidden.shape[-1])
        features[: hidden.shape[0]] = hidden
        return features

    def condition(self, frames: np.ndarray | Tensor, prompt: str = DEFAULT_PROMPT) -> Conditioning:
        """The conditional branch of one request: (prompt features, video features)."""
        return Conditioning(self.text_features(prompt), self.video_features(frames))

    def unconditional(
        self, negative_prompt: str = DEFAULT_NEGATIVE_PROMPT, num_frames: int = NUM_FRAMES
    ) -> Conditioning:
        """The unconditional branch, kept: the official encodes `frames * 0` (an all-black video) with the negative
        prompt. Black frames of any size preprocess to the same constant -mean/std per channel (bitwise on the CPU for
        the sizes tested), so 224x224 ones serve every upload: their features are computed once per frame count.
        The negative prompt's (one short text pass) are kept for the last UNCONDITIONAL_CACHE distinct prompts, so
        clients choosing their own cannot grow the cache without bound."""
        key = (negative_prompt, num_frames)
        if key in self._unconditional:
            self._unconditional.move_to_end(key)
            return self._unconditional[key]
        if num_frames not in self._black_video:
            black = torch.zeros(num_frames, 224, 224, 3, dtype=torch.uint8)
            self._black_video[num_frames] = self.video_features(black)
        branch = Conditioning(self.text_features(negative_prompt), self._black_video[num_frames])
        self._unconditional[key] = branch
        if len(self._unconditional) > UNCONDITIONAL_CACHE:
            self._unconditional.popitem(last=False)
        return branch
