"""Test-only transcriptions of the official Kandinsky 4 T2V code on diffusers / transformers objects.

They follow `kandinsky/t2v_pipeline.py` (`diffusion_generate_renoise`, `predict_x_0`, `__call__`) step by step,
so our pipeline is checked against the official composition, not against itself.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import CogVideoXDDIMScheduler

COGVIDEOX_5B_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    rescale_betas_zero_snr=True, snr_shift_scale=1.0, timestep_spacing="trailing", prediction_type="v_prediction",
    set_alpha_to_one=True, steps_offset=0, clip_sample=False,
)  # fmt: skip


def randomize_weights(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial weights: matrices ~ N(0, 1/fan_in), biases ~ N(0, 0.1^2), norm scales ~ 1 + N(0, 0.2^2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=g)
            if param.dim() > 1:
                param.copy_(noise / param[0].numel() ** 0.5)
            elif name.endswith("norm_layer.weight"):
                param.copy_(1.0 + 0.2 * noise)
            else:
                param.copy_(0.1 * noise)


def official_renoise_loop(denoiser, shape, seed, dtype, scheduler=None):
    """`diffusion_generate_renoise` + `predict_x_0`: denoiser(x [1, ...], t [1]) -> velocity [1, ...]."""
    scheduler = scheduler or CogVideoXDDIMScheduler(**COGVIDEOX_5B_SCHEDULER)
    generator = torch.Generator().manual_seed(seed)
    img = torch.randn(*shape, generator=generator).to(dtype)
    scheduler.set_timesteps(4)
    for time in scheduler.timesteps:
        model_time = time.unsqueeze(0)
        noise = torch.randn(img.shape, generator=generator).to(dtype)
        img = scheduler.add_noise(img, noise, time)
        velocity = denoiser(img.to(dtype)[None], model_time)[0]
        alpha = scheduler.alphas_cumprod[model_time][:, None, None, None]
        img = (alpha**0.5) * img - ((1 - alpha) ** 0.5) * velocity
    return img


def official_t2v_frames(tokenizer, text_encoder, dit, vae, scheduler, prompt, height, width, seconds, seed):
    """The official `__call__` on CPU in float32: uint8 frames [F, H, W, 3] as its video writer stores them."""
    num_frames = 1 if seconds == 0 else seconds * 8 // 4 + 1
    ids = tokenizer(
        prompt,
        max_length=224,
        truncation=True,
        add_special_tokens=True,
        padding="max_length",
        return_tensors="pt",
    ).input_ids
    with torch.no_grad():
        text_embed = text_encoder(ids, output_hidden_states=True)[0].squeeze(0)
        shape = (num_frames, height // 8, width // 8, 16)
        images = official_renoise_loop(lambda x, t: dit(x, text_embed[None], t), shape, seed, torch.float32, scheduler)
        vae.num_latent_frames_batch_size = 1 if seconds == 0 else 2
        images = 1 / vae.config.scaling_factor * images.to(dtype=torch.float32)
        images = images.permute(3, 0, 1, 2)
        images = vae.decode(images.unsqueeze(0)).sample.float()
        images = torch.clip((images + 1.0) / 2.0, 0.0, 1.0)
    # torchvision.io.write_video casts the float array to uint8 (truncation)
    return torch.as_tensor(255.0 * images.squeeze(0).permute(1, 2, 3, 0).numpy(), dtype=torch.uint8).numpy()


def frames_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a, b)
