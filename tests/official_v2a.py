"""Test-only transcriptions of the official Kandinsky 4 V2A code (`kandinsky4_video2audio/`) on diffusers objects.

`OfficialVideoProcessor` / `OfficialPromptProcessor` follow `model/attention_processors.py` line by line (the
video attention written out as softmax(q kᵀ / √d) v, not through SDPA), installed into a diffusers
UNet2DConditionModel exactly as `model/unet.py` does; `official_sampling_loop` follows `video2audio_pipe.py`'s
`__call__` loop on diffusers' PNDMScheduler; `official_v2a_audio` the whole request around it. Our modules are
checked against these, never against themselves.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from diffusers import PNDMScheduler, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.utils.torch_utils import randn_tensor
from official_reference import randomize_weights
from PIL import Image
from torch import nn

from k4serve.models.audio import spectrogram_image_to_audio

# ai-forever/kandinsky-4-v2a `scheduler/scheduler_config.json` as the SD1 / riffusion PNDM defaults.
SD1_PNDM = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    timestep_spacing="leading",
)  # fmt: skip


def official_posemb(x: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """`get_posemb(x, dim)` (computed in `dtype`: fp32 as the official, float64 for the float64 checks)."""
    half_dim = dim // 2
    emb = math.log(10000) / (half_dim - 1)
    emb = torch.exp(torch.arange(half_dim, dtype=dtype) * -emb)
    emb = x.to(dtype)[:, None] * emb[None, :]
    return torch.cat((emb.sin(), emb.cos()), dim=-1)


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[B, H, L, d] x [B, H, S, d] -> [B, H, L, d], written out."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return scores.softmax(dim=-1) @ v


class OfficialVideoProcessor(nn.Module):
    """`VideoAttnProcessor2_0`: standard self-attention, then its output attends to the frame features."""

    def __init__(self, hidden_size: int, feature_dim: int):
        super().__init__()
        self.processor = AttnProcessor2_0()
        self.video_q = nn.Linear(hidden_size, hidden_size)
        self.video_k = nn.Linear(feature_dim, hidden_size)
        self.video_v = nn.Linear(feature_dim, hidden_size)
        self.video_out = nn.Linear(hidden_size, hidden_size)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 image_embeds=None):  # fmt: skip
        hidden_states = self.processor(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        batch_size = hidden_states.shape[0]
        query = self.video_q(hidden_states)
        key = self.video_k(image_embeds)
        value = self.video_v(image_embeds)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        pos_dtype = torch.float64 if key.dtype == torch.float64 else torch.float32
        pos_emb = official_posemb(torch.arange(key.shape[2]), key.shape[-1], pos_dtype)
        key += pos_emb
        value += pos_emb
        video = softmax_attention(query, key, value)
        video = video.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        return hidden_states + self.video_out(video)


class OfficialPromptProcessor(nn.Module):
    """`PromptAttnProcessor2_0`: project the 4096-d prompt features, then the standard cross-attention."""

    def __init__(self, feature_dim: int, hidden_size: int):
        super().__init__()
        self.processor = AttnProcessor2_0()
        self.text_projection = nn.Linear(feature_dim, hidden_size)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 image_embeds=None):  # fmt: skip
        encoder_hidden_states = self.text_projection(encoder_hidden_states)
        return self.processor(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def diffusers_unet(config, official: bool, seed: int = 0) -> UNet2DConditionModel:
    """diffusers' UNet with our config's shape; `official`: with the processors installed as `model/unet.py` does."""
    unet = UNet2DConditionModel(
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        block_out_channels=config.block_out_channels,
        layers_per_block=config.layers_per_block,
        attention_head_dim=config.attention_head_dim,
        cross_attention_dim=config.cross_attention_dim,
        norm_num_groups=config.norm_num_groups,
        norm_eps=config.norm_eps,
        flip_sin_to_cos=config.flip_sin_to_cos,
        freq_shift=config.freq_shift,
    )
    if official:
        processors = {}
        for name in unet.attn_processors:
            if name.startswith("mid_block"):
                hidden_size = config.block_out_channels[-1]
            elif name.startswith("up_blocks"):
                hidden_size = config.block_out_channels[::-1][int(name[len("up_blocks.")])]
            else:
                hidden_size = config.block_out_channels[int(name[len("down_blocks.")])]
            if name.endswith("attn1.processor"):
                processors[name] = OfficialVideoProcessor(hidden_size, config.feature_dim)
            else:
                processors[name] = OfficialPromptProcessor(config.feature_dim, config.cross_attention_dim)
        unet.set_attn_processor(processors)
    randomize_weights(unet, seed)
    return unet.eval().requires_grad_(False)


def official_sampling_loop(unet, latents, prompt_embeds, image_embeds, guidance_scale=8.0, num_steps=50):
    """`Video2AudioPipeline.__call__`'s denoising loop: unet(x, t, prompt_embeds, image_embeds) -> eps."""
    scheduler = PNDMScheduler(**SD1_PNDM)
    scheduler.set_timesteps(num_steps)
    latents = latents * scheduler.init_noise_sigma
    do_classifier_free_guidance = guidance_scale > 1.0
    for t in scheduler.timesteps:
        latent_model_input = torch.cat([latents] * 2) if do_classifier_free_guidance else latents
        latent_model_input = scheduler.scale_model_input(latent_model_input, t)
        noise_pred = unet(latent_model_input, t, prompt_embeds, image_embeds)
        if do_classifier_free_guidance:
            noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
            noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
        latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
    return latents


def official_load_video(video: np.ndarray, fps: float, num_frames: int = 96, max_duration_sec: int = 12):
    """`utils.load_video` on uint8 frames [N, H, W, 3] (channels last, as our encoder takes them): (the sampled
    frames, the kept frames, duration_sec)."""
    duration_sec = int(video.shape[0] / fps)
    if duration_sec > max_duration_sec:
        duration_sec = max_duration_sec
    total_frames = int(duration_sec * fps)
    video = video[:total_frames]
    frame_id_list = np.linspace(0, total_frames - 1, num_frames, dtype=int)
    return video[frame_id_list], video, duration_sec


def official_v2a_audio(encoder, unet, vae, params, video, fps, prompt, negative_prompt, seed):
    """The official V2A composition (`load_video`, `Video2AudioPipeline.__call__` with `_encode_conditions`, then
    `create_video`'s image -> audio), step by step, with our modules in the official models' roles: `encoder` for
    CogVLM2's extract_*_embedding, `unet`, `vae` (forward = diffusers' `decode(z).sample`), diffusers' scheduler
    and image processor. Both random draws come from generators seeded with `seed` (the official leaves them
    unseeded). Returns (latents [1, 4, h, w], the spectrogram as the PIL image, audio float32 [N])."""
    images, _, duration_sec = official_load_video(video, fps)
    dtype = next(unet.parameters()).dtype
    # _encode_conditions, do_classifier_free_guidance: [negative; prompt] and [black video; video]
    prompt_embeds = encoder.text_features(prompt)[None].to(dtype)
    image_embeds = encoder.video_features(images)[None].to(dtype)
    negative_prompt_embeds = encoder.text_features(negative_prompt)[None].to(dtype)
    prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])
    uncond_image_embeds = encoder.video_features(images * 0)[None].to(dtype)
    image_embeds = torch.cat([uncond_image_embeds, image_embeds])
    # __call__: height = the image's (512 mel rows at full size), width from the duration
    width = ((duration_sec * 100) // 32) * 32
    vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    shape = (1, unet.config.in_channels, params.n_mels // vae_scale_factor, width // vae_scale_factor)
    generator = torch.Generator().manual_seed(seed)
    latents = randn_tensor(shape, generator=generator, device=torch.device("cpu"), dtype=dtype)
    latents = official_sampling_loop(unet, latents, prompt_embeds, image_embeds)
    vae_dtype = next(vae.parameters()).dtype
    spectrogram = vae(latents.to(vae_dtype) / vae.config.scaling_factor)
    pil = VaeImageProcessor(vae_scale_factor=8).postprocess(spectrogram, output_type="pil", do_denormalize=[True])[0]
    # create_video: PIL -> numpy -> PIL (no EXIF: riffusion's default parameters), then image_to_audio at -30 dBFS
    image = np.array(Image.fromarray(np.array(pil)))
    audio = spectrogram_image_to_audio(image, params, torch.Generator().manual_seed(seed), target_dbfs=-30.0)
    return latents, pil, audio
