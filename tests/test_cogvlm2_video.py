"""CogVLM2-Video feature extraction (tiny preset, CPU, float32) against float64 transcriptions of the remote code's
formulas, hand-written token layouts, an independent numpy preprocessing and the official frame sampling."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from k4serve.models.checkpoints import CheckpointError
from k4serve.models.cogvlm2_video import (
    CLIP_MEAN,
    CLIP_STD,
    DEFAULT_NEGATIVE_PROMPT,
    PRESETS,
    PROMPT_TOKENS,
    UNCONDITIONAL_CACHE,
    CogVLM2Video,
    CogVLM2VideoEncoder,
    DecoderLayer,
    build_position_ids,
    conversation_layout,
    preprocess_frames,
    rope_cos_sin,
)
from k4serve.models.dit import init_random_weights
from k4serve.models.eva2_clip import EVA2CLIPConfig, EVA2CLIPModel, TransformerLayer
from k4serve.models.frame_sampling import conditioning_frame_indices, official_trim

CONFIG = PRESETS["tiny"]
BOS, PAD = CONFIG.bos_token_id, CONFIG.pad_token_id


@pytest.fixture(scope="module")
def encoder() -> CogVLM2VideoEncoder:
    return CogVLM2VideoEncoder.from_preset("tiny", seed=0)


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def frames_of(n: int, height: int = 40, width: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, height, width, 3), dtype=np.uint8)


# ---- float64 transcriptions of the remote code's formulas ----


def ref_linear(p: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    bias = p.get(f"{name}.bias")
    return x @ p[f"{name}.weight"].T + (0.0 if bias is None else bias)


def ref_layer_norm(p: dict, name: str, x: torch.Tensor, eps: float) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * p[f"{name}.weight"] + p[f"{name}.bias"]


def ref_gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def ref_silu(x: torch.Tensor) -> torch.Tensor:
    return x / (1.0 + torch.exp(-x))


def ref_softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """q, k, v [L, H, d] (one sample, k/v already one per query head) -> [L, H, d]."""
    scores = torch.einsum("lhd,mhd->hlm", q, k) / math.sqrt(q.shape[-1])
    if causal:
        scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), -math.inf)
    weights = torch.exp(scores - scores.amax(-1, keepdim=True))
    return torch.einsum("hlm,mhd->lhd", weights / weights.sum(-1, keepdim=True), v)


def float64_params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.double() for k, v in module.state_dict().items()}


def test_eva_block_matches_float64_formula():
    config = CONFIG.vision
    layer = init_random_weights(TransformerLayer(config), seed=3)
    x = torch.randn(2, 9, config.hidden_size, generator=torch.Generator().manual_seed(0))
    p, x64 = float64_params(layer), x.double()
    heads, d = config.num_heads, config.hidden_size // config.num_heads
    # post-norm "sandwich": x + LN(attn(x)), then + LN(mlp(.)); qkv rows [q; k; v], each head-major
    out = []
    for sample in x64:
        q, k, v = ref_linear(p, "attention.query_key_value", sample).view(-1, 3, heads, d).unbind(1)
        attn = ref_linear(p, "attention.dense", ref_softmax_attention(q, k, v, causal=False).reshape(-1, heads * d))
        h = sample + ref_layer_norm(p, "input_layernorm", attn, config.layer_norm_eps)
        mlp = ref_linear(p, "mlp.fc2", ref_gelu(ref_linear(p, "mlp.fc1", h)))
        out.append(h + ref_layer_norm(p, "post_attention_layernorm", mlp, config.layer_norm_eps))
    assert rel_error(layer(x), torch.stack(out)) < 1e-5


def test_vision_tokens_match_float64_formula():
    """Patches -> (no layers) -> CLS dropped -> 2x2 stride-2 conv -> GLU -> [BOI ; 64 ; EOI], in raster order."""
    config = EVA2CLIPConfig(hidden_size=8, num_hidden_layers=0, num_heads=2, intermediate_size=16)
    tower = init_random_weights(EVA2CLIPModel(config, llm_hidden_size=12, llm_intermediate_size=20), seed=4)
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    p, grid, patch = float64_params(tower), config.grid, config.patch_size
    out = []
    for image in images.double():
        # patch (r, s) -> token 1 + 16 r + s, after the CLS embedding; plus the learned positions
        blocks = image.reshape(3, grid, patch, grid, patch).permute(1, 3, 0, 2, 4).reshape(grid * grid, -1)
        tokens = blocks @ p["patch_embedding.proj.weight"].reshape(config.hidden_size, -1).T
        tokens = torch.cat([p["patch_embedding.cls_embedding"], tokens + p["patch_embedding.proj.bias"]])
        tokens = tokens + p["patch_embedding.position_embedding.weight"]
        # drop CLS; conv: out[(i, j)] = sum over the 2x2 block of patches (2i + a, 2j + b)
        patches = tokens[1:].reshape(grid // 2, 2, grid // 2, 2, -1).permute(0, 2, 4, 1, 3).reshape(64, -1)
        down = patches @ p["conv.weight"].reshape(config.hidden_size, -1).T + p["conv.bias"]
        h = ref_gelu(ref_layer_norm(p, "linear_proj.norm1", ref_linear(p, "linear_proj.linear_proj", down), 1e-5))
        h = ref_silu(ref_linear(p, "linear_proj.gate_proj", h)) * ref_linear(p, "linear_proj.dense_h_to_4h", h)
        h = ref_linear(p, "linear_proj.dense_4h_to_h", h)
        out.append(torch.cat([p["boi"][0], h, p["eoi"][0]]))
    result = tower(images)
    assert result.shape == (2, 66, 12) and config.tokens_per_frame == 66
    assert rel_error(result, torch.stack(out)) < 1e-5


def test_decoder_layer_matches_float64_formula():
    """A layer on a mixed layout (BOS, a 2-frame vision run, text): every token takes the language weights (the
    video checkpoint has no vision experts); positions from the layout; GQA, causal, rotate-half RoPE."""
    c = CONFIG
    layout = conversation_layout(BOS, PAD, [7, 8, 9], num_frames=2, tokens_per_frame=3)
    assert layout.position_ids.tolist() == [[0, 1, 2, 2, 2, 2, 3, 4, 5, 6]]
    layer = init_random_weights(DecoderLayer(c), seed=5)
    x = torch.randn(1, 10, c.hidden_size, generator=torch.Generator().manual_seed(2))
    out = layer(x, rope_cos_sin(layout.position_ids, c.head_dim, c.rope_theta, torch.float32))

    p, h = float64_params(layer), x[0].double()
    heads, kv_heads, d = c.num_attention_heads, c.num_multi_query_heads, c.head_dim

    def rms(name: str, t: torch.Tensor) -> torch.Tensor:
        return t / torch.sqrt((t**2).mean(-1, keepdim=True) + c.rms_norm_eps) * p[f"{name}.weight"]

    def rope(t: torch.Tensor) -> torch.Tensor:  # [L, H, d]: pairs (i, i + d/2) rotated by pos · 500000^(-2i/d)
        pos = layout.position_ids[0].double()[:, None]
        angle = pos * torch.tensor([500000.0 ** (-2 * i / d) for i in range(d // 2)], dtype=torch.float64)
        cos, sin = angle.cos()[:, None], angle.sin()[:, None]
        a, b = t[..., : d // 2], t[..., d // 2 :]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)

    qkv = ref_linear(p, "self_attn.language_expert_query_key_value", rms("input_layernorm", h))
    q = rope(qkv[:, : heads * d].reshape(-1, heads, d))
    k = rope(qkv[:, heads * d : (heads + kv_heads) * d].reshape(-1, kv_heads, d))
    v = qkv[:, (heads + kv_heads) * d :].reshape(-1, kv_heads, d)
    kv_of = [j // (heads // kv_heads) for j in range(heads)]  # query head j reads kv head j // group
    attn = ref_softmax_attention(q, k[:, kv_of], v[:, kv_of], causal=True).reshape(-1, heads * d)
    h = h + ref_linear(p, "self_attn.language_expert_dense", attn)
    m = rms("post_attention_layernorm", h)
    mlp = ref_silu(ref_linear(p, "mlp.language_mlp.gate_proj", m)) * ref_linear(p, "mlp.language_mlp.up_proj", m)
    expected = h + ref_linear(p, "mlp.language_mlp.down_proj", mlp)
    assert rel_error(out[0], expected) < 1e-5


# ---- token layout ----


def test_position_ids_of_vision_runs():
    """A vision run's first and last tokens (BOI, EOI) advance the position; the tokens between share one."""
    types = torch.tensor([[0, 1, 1, 1, 1, 0, 0, 1, 1, 0]])
    assert build_position_ids(types).tolist() == [[0, 1, 2, 2, 3, 4, 5, 6, 7, 8]]
    assert build_position_ids(torch.zeros(1, 4, dtype=torch.long)).tolist() == [[0, 1, 2, 3]]


def test_token_layout_of_a_two_frame_video_and_a_text_query(encoder, monkeypatch):
    seen = []
    monkeypatch.setattr(encoder, "model", _Recorder(encoder.model, seen))
    encoder.video_features(frames_of(2))
    encoder.text_features("ab")
    (video, images), (text, no_images) = seen
    # template "base", query "": [BOS ; 2 x 66 vision slots], no frame-index text, no query tokens
    assert video.input_ids.tolist() == [[BOS] + [PAD] * 132]
    assert video.token_type_ids.tolist() == [[0] + [1] * 132]
    assert video.position_ids.tolist() == [[0, 1] + [2] * 130 + [3]]
    assert images.shape == (2, 3, 224, 224)
    # text-only query: [BOS ; prompt bytes], all language tokens, positions 0..L-1
    assert text.input_ids.tolist() == [[BOS, ord("a"), ord("b")]]
    assert text.token_type_ids.tolist() == [[0, 0, 0]] and text.position_ids.tolist() == [[0, 1, 2]]
    assert no_images is None


class _Recorder(torch.nn.Module):
    """Wraps the model: records each call's (layout, images) and returns the model's hidden states."""

    def __init__(self, model: torch.nn.Module, seen: list):
        super().__init__()
        self.inner, self.seen = model, seen

    def forward(self, layout, images=None):
        self.seen.append((layout, images))
        out = self.inner(layout, images)
        self.outputs = getattr(self, "outputs", []) + [out]
        return out


# ---- what the pipeline consumes: pooling, padding, truncation ----


def test_video_features_are_hidden_states_pooled_per_frame(encoder, monkeypatch):
    seen = []
    recorder = _Recorder(encoder.model, seen)
    monkeypatch.setattr(encoder, "model", recorder)
    features = encoder.video_features(frames_of(96, seed=1))
    hidden = recorder.outputs[0][0]
    assert hidden.shape == (1 + 96 * 66, CONFIG.hidden_size) and features.shape == (96, CONFIG.hidden_size)
    expected = torch.stack([hidden[1 + 66 * f : 1 + 66 * (f + 1)].mean(0) for f in range(96)])  # BOS excluded
    torch.testing.assert_close(features, expected, rtol=1e-6, atol=1e-6)
    assert len(encoder.model.inner.model.layers) == CONFIG.num_hidden_layers - 1  # output of layer 2 of 3: [-2]


def test_text_features_are_zero_padded_to_100(encoder, monkeypatch):
    seen = []
    recorder = _Recorder(encoder.model, seen)
    monkeypatch.setattr(encoder, "model", recorder)
    features = encoder.text_features("a fox")
    hidden = recorder.outputs[0][0]
    assert features.shape == (PROMPT_TOKENS, CONFIG.hidden_size) and hidden.shape[0] == 6  # BOS + 5 bytes
    torch.testing.assert_close(features[:6], hidden, rtol=0, atol=0)
    assert (features[6:] == 0).all()


def test_long_prompt_is_truncated_to_its_first_100_tokens(encoder):
    prompt = "a long prompt about the sound of rain. " * 8  # 312 bytes
    features = encoder.text_features(prompt)
    full = conversation_layout(BOS, PAD, list(prompt.encode()))
    with torch.no_grad():
        reference = encoder.model(full)[0, :PROMPT_TOKENS]  # the official runs the whole prompt, then keeps 100 rows
    assert features.shape == (PROMPT_TOKENS, CONFIG.hidden_size)
    assert rel_error(features, reference) < 1e-5


def test_unconditional_branch_is_a_black_video_and_the_negative_prompt_computed_once(encoder):
    uncond = encoder.unconditional(num_frames=3)
    assert encoder.unconditional(num_frames=3) is uncond  # kept
    black = np.zeros((3, 224, 224, 3), dtype=np.uint8)
    torch.testing.assert_close(uncond.video, encoder.video_features(black), rtol=0, atol=0)
    torch.testing.assert_close(uncond.prompt, encoder.text_features(DEFAULT_NEGATIVE_PROMPT), rtol=0, atol=0)
    # black frames of any size preprocess to the same per-channel constant -mean/std as the 224x224 ones
    constant = (-torch.tensor(CLIP_MEAN) / torch.tensor(CLIP_STD))[None, :, None, None].expand(1, 3, 224, 224)
    for height, width in [(224, 224), (100, 177), (384, 672), (1080, 1920)]:
        black = preprocess_frames(np.zeros((1, height, width, 3), dtype=np.uint8))
        torch.testing.assert_close(black, constant, rtol=0, atol=0)


def test_unconditional_cache_keeps_one_black_video_and_the_latest_negative_prompts():
    encoder = CogVLM2VideoEncoder.from_preset("tiny", seed=0)
    first = encoder.unconditional("negative 0", num_frames=2)
    for i in range(1, UNCONDITIONAL_CACHE + 1):
        assert encoder.unconditional(f"negative {i}", num_frames=2).video is first.video  # computed once
    assert len(encoder._unconditional) == UNCONDITIONAL_CACHE  # bounded: "negative 0" was dropped
    assert (
        encoder.unconditional(f"negative {UNCONDITIONAL_CACHE}", num_frames=2)
        is encoder._unconditional[(f"negative {UNCONDITIONAL_CACHE}", 2)]
    )
    again = encoder.unconditional("negative 0", num_frames=2)
    assert again is not first
    torch.testing.assert_close(again.prompt, first.prompt, rtol=0, atol=0)


# ---- frames in ----


def numpy_preprocess(frames: np.ndarray, size: int = 224) -> tuple[np.ndarray, tuple[int, int]]:
    """Independent float64 version: bilinear (half-pixel centres, edge clamp) resize of x/255, then mean/std, then
    the centre crop; returns [F, 3, size, size] and the crop offsets."""
    n, h, w, _ = frames.shape
    new_h, new_w = (int(h / w * size), size) if w < h else (size, int(w / h * size))

    def taps(out_len: int, in_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = np.maximum((np.arange(out_len) + 0.5) * in_len / out_len - 0.5, 0.0)  # half-pixel centres, clamp at 0
        lo = np.floor(src).astype(int)
        return lo, np.minimum(lo + 1, in_len - 1), src - lo

    (y0, y1, wy), (x0, x1, wx) = taps(new_h, h), taps(new_w, w)
    x = frames.astype(np.float64) / 255.0
    rows = x[:, y0] * (1 - wy)[None, :, None, None] + x[:, y1] * wy[None, :, None, None]
    resized = rows[:, :, x0] * (1 - wx)[None, None, :, None] + rows[:, :, x1] * wx[None, None, :, None]
    resized = (resized - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    top, left = round((new_h - size) / 2), round((new_w - size) / 2)
    return resized[:, top : top + size, left : left + size].transpose(0, 3, 1, 2), (top, left)


@pytest.mark.parametrize(
    ("height", "width", "offsets"),
    [(100, 177, (0, 86)), (150, 90, (74, 0)), (224, 224, (0, 0)), (30, 61, (0, 116))],
)  # 150x90 -> 373x224: (373 - 224) / 2 = 74.5 rounds to the even 74, as Python's round in torchvision
def test_preprocessing_matches_independent_computation(height, width, offsets):
    frames = frames_of(2, height, width, seed=height)
    expected, crop = numpy_preprocess(frames)
    assert crop == offsets
    out = preprocess_frames(frames)
    assert out.shape == (2, 3, 224, 224) and out.dtype == torch.float32
    # torch forms the source coordinates in fp32: each tap weight is off by up to ulp(coordinate) ~ 1e-5, times a
    # neighbour difference of up to 1/0.26 here; a wrong offset, alignment or order errs by ~1
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=5e-5)


@pytest.mark.parametrize("bad", [np.zeros((2, 8, 8, 3), np.float32), np.zeros((8, 8, 3), np.uint8),
                                 np.zeros((0, 8, 8, 3), np.uint8), np.zeros((2, 8, 8, 4), np.uint8)])  # fmt: skip
def test_bad_frames_are_refused_with_the_expected_layout(bad):
    with pytest.raises(ValueError, match=r"uint8|at least one frame"):
        preprocess_frames(bad)


@pytest.mark.parametrize(("n", "fps"), [(300, 30.0), (360, 29.97), (97, 8.0), (1000, 24.0), (50, 25.0), (30, 30.0)])
def test_sample_frame_indices_equal_the_official_formula(n, fps):
    # kandinsky4_video2audio/utils.py load_video: whole seconds, capped at 12, linspace over the kept frames
    duration = min(int(n / fps), 12)
    total = int(duration * fps)
    official = np.linspace(0, total - 1, 96, dtype=int)
    assert official_trim(n, fps) == (duration, total)
    np.testing.assert_array_equal(conditioning_frame_indices(official_trim(n, fps)[1]), official)


def test_a_clip_under_one_second_keeps_nothing():
    assert official_trim(20, 30.0) == (0, 0)  # trim_video refuses it, naming the length (test_video_io.py)


# ---- checkpoint loading ----


def official_shapes(c) -> dict[str, tuple[int, ...]]:
    """Every key of a CogVLMVideoForCausalLM snapshot and its shape, from the remote code's module tree."""
    v, d, qkv = c.vision, c.hidden_size, (c.num_attention_heads + 2 * c.num_multi_query_heads) * c.head_dim
    shapes = {
        "model.embed_tokens.weight": (c.vocab_size, d), "model.norm.weight": (d,), "lm_head.weight": (c.vocab_size, d),
        "model.vision.patch_embedding.proj.weight": (v.hidden_size, 3, v.patch_size, v.patch_size),
        "model.vision.patch_embedding.proj.bias": (v.hidden_size,),
        "model.vision.patch_embedding.cls_embedding": (1, v.hidden_size),
        "model.vision.patch_embedding.position_embedding.weight": (v.grid**2 + 1, v.hidden_size),
        "model.vision.linear_proj.linear_proj.weight": (d, v.hidden_size),
        "model.vision.linear_proj.norm1.weight": (d,), "model.vision.linear_proj.norm1.bias": (d,),
        "model.vision.linear_proj.gate_proj.weight": (c.intermediate_size, d),
        "model.vision.linear_proj.dense_h_to_4h.weight": (c.intermediate_size, d),
        "model.vision.linear_proj.dense_4h_to_h.weight": (d, c.intermediate_size),
        "model.vision.conv.weight": (v.hidden_size, v.hidden_size, 2, 2), "model.vision.conv.bias": (v.hidden_size,),
        "model.vision.boi": (1, 1, d), "model.vision.eoi": (1, 1, d),
    }  # fmt: skip
    for i in range(v.num_hidden_layers):
        prefix, h = f"model.vision.transformer.layers.{i}", v.hidden_size
        for name, shape in [("attention.query_key_value", (3 * h, h)), ("attention.dense", (h, h)),
                            ("mlp.fc1", (v.intermediate_size, h)), ("mlp.fc2", (h, v.intermediate_size))]:  # fmt: skip
            shapes[f"{prefix}.{name}.weight"], shapes[f"{prefix}.{name}.bias"] = shape, shape[:1]
        for norm in ("input_layernorm", "post_attention_layernorm"):
            shapes[f"{prefix}.{norm}.weight"] = shapes[f"{prefix}.{norm}.bias"] = (h,)
    for i in range(c.num_hidden_layers):
        prefix = f"model.layers.{i}"
        shapes |= {
            f"{prefix}.input_layernorm.weight": (d,), f"{prefix}.post_attention_layernorm.weight": (d,),
            f"{prefix}.self_attn.language_expert_query_key_value.weight": (qkv, d),
            f"{prefix}.self_attn.language_expert_dense.weight": (d, d),
            f"{prefix}.mlp.language_mlp.gate_proj.weight": (c.intermediate_size, d),
            f"{prefix}.mlp.language_mlp.up_proj.weight": (c.intermediate_size, d),
            f"{prefix}.mlp.language_mlp.down_proj.weight": (d, c.intermediate_size),
        }  # fmt: skip
    return shapes


def write_snapshot(folder, state: dict[str, torch.Tensor]) -> None:
    """A snapshot folder as the Hub has it: config.json, two shards + index, a byte-level BPE tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    c, v = CONFIG, CONFIG.vision
    config = {
        "architectures": ["CogVLMVideoForCausalLM"], "bos_token_id": BOS, "eos_token_id": 257, "pad_token_id": PAD,
        "hidden_act": "silu", "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "max_position_embeddings": 2048, "num_attention_heads": c.num_attention_heads,
        "num_hidden_layers": c.num_hidden_layers, "num_multi_query_heads": c.num_multi_query_heads,
        "rms_norm_eps": 1e-05, "template_version": "base", "torch_dtype": "bfloat16", "vocab_size": c.vocab_size,
        "vision_config": {
            "dropout_prob": 0.0, "hidden_act": "gelu", "hidden_size": v.hidden_size, "image_size": 224,
            "in_channels": 3, "intermediate_size": v.intermediate_size, "layer_norm_eps": 1e-06,
            "num_heads": v.num_heads, "num_hidden_layers": v.num_hidden_layers, "num_positions": 257, "patch_size": 14,
        },
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, shard_keys in shards.items():
        save_file({k: state[k].contiguous() for k in shard_keys}, str(folder / name))
    weight_map = {k: name for name, shard_keys in shards.items() for k in shard_keys}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab |= {"<|begin_of_text|>": BOS, "<|end_of_text|>": 257, "<|reserved_special_token_0|>": PAD}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>"})
    )


def synthetic_state(seed: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {key: 0.1 * torch.randn(shape, generator=g) for key, shape in official_shapes(CONFIG).items()}
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(CONFIG.head_dim // 2)  # derived: ignored
    return state


@pytest.mark.parametrize("preset", ["tiny", "cogvlm2-video-llama3-chat"])
def test_model_keys_are_the_official_ones_but_those_after_hidden_states_minus_2(preset):
    config = PRESETS[preset]
    with torch.device("meta"):  # the full size is 11.8 B parameters: shapes only
        model = CogVLM2Video(config)
    shapes = official_shapes(config)
    last = f"model.layers.{config.num_hidden_layers - 1}."
    skipped = {k for k in shapes if k.startswith(last) or k in ("lm_head.weight", "model.norm.weight")}
    model_shapes = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    assert model_shapes == {k: s for k, s in shapes.items() if k not in skipped}


def test_snapshot_round_trips(tmp_path):
    state = synthetic_state()
    write_snapshot(tmp_path, state)
    loaded = CogVLM2VideoEncoder.from_pretrained(tmp_path)
    for key, tensor in loaded.model.state_dict().items():
        torch.testing.assert_close(tensor, state[key], rtol=0, atol=0)
    assert loaded.tokenizer.bos_token_id == BOS
    ids = loaded.tokenizer.encode("ab", add_special_tokens=False)
    assert len(ids) == 2 and max(ids) < 256
    features = loaded.text_features("ab")
    assert features.shape == (PROMPT_TOKENS, CONFIG.hidden_size) and features[:3].abs().sum() > 0
    # the layers after hidden_states[-2] are not read: changing them changes nothing
    state[f"model.layers.{CONFIG.num_hidden_layers - 1}.input_layernorm.weight"] += 1.0
    state["lm_head.weight"] += 1.0
    other = tmp_path / "other"
    other.mkdir()
    write_snapshot(other, state)
    torch.testing.assert_close(CogVLM2VideoEncoder.from_pretrained(other).text_features("ab"), features)


def test_snapshot_with_a_renamed_key_fails_naming_it(tmp_path):
    state = synthetic_state()
    state["model.vision.linear_proj.gate.weight"] = state.pop("model.vision.linear_proj.gate_proj.weight")
    write_snapshot(tmp_path, state)
    with pytest.raises(CheckpointError, match=r"missing keys: model\.vision\.linear_proj\.gate_proj\.weight") as e:
        CogVLM2VideoEncoder.from_pretrained(tmp_path)
    assert "unexpected keys: model.vision.linear_proj.gate.weight" in str(e.value)


def test_snapshot_without_config_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        CogVLM2VideoEncoder.from_pretrained(tmp_path)
