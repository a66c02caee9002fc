"""Reading checkpoints and loading them strictly: every key accounted for, by name."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model it is loaded into; the message names the keys."""


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """A flat state dict from a torch file (`weights_only=True`) or a safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path} (pass the path of an existing .pt or .safetensors file)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # a corrupt file or a pickle that is not a plain state dict
        raise CheckpointError(f"cannot read {path} as a torch state dict (weights_only=True): {error}") from error
    if not isinstance(state_dict, dict) or not all(isinstance(v, Tensor) for v in state_dict.values()):
        raise CheckpointError(f"{path} is not a flat state dict of tensors")
    return state_dict


def safetensors_files(folder: str | Path, weights_name: str = "model.safetensors") -> list[Path]:
    """The safetensors files of a Hugging Face model folder: `weights_name`, or the shards its `.index.json` names."""
    folder = Path(folder)
    index = folder / f"{weights_name}.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as error:
            raise CheckpointError(f"{index} is not a safetensors index (no readable weight_map): {error}") from error
        files = [folder / name for name in sorted(set(weight_map.values()))]
    else:
        files = [folder / weights_name]
    for file in files:
        if not file.is_file():
            raise CheckpointError(f"missing {file} (expected {weights_name} or {index.name} and its shards)")
    return files


def read_safetensors(files: list[Path], skip: Callable[[str], bool] = lambda key: False) -> dict[str, Tensor]:
    """Every tensor of `files` by name, except the keys `skip` accepts (never read)."""
    from safetensors import safe_open

    state_dict = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if not skip(key):
                    state_dict[key] = f.get_tensor(key)
    return state_dict


def _listing(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def load_state_dict_strict(model: nn.Module, state_dict: dict[str, Tensor], what: str) -> None:
    """Copy `state_dict` into `model`'s parameters and persistent buffers; any missing, unexpected or
    mis-shaped key raises CheckpointError naming it, before anything is written."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mis_shaped = [
        f"{key} {tuple(state_dict[key].shape)} != {tuple(expected[key].shape)}"
        for key in sorted(set(expected) & set(state_dict))
        if state_dict[key].shape != expected[key].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if mis_shaped:
        problems.append(f"shape mismatches (checkpoint != model): {_listing(mis_shaped)}")
    if problems:
        raise CheckpointError(
            f"{what} does not match the model ({'; '.join(problems)}). "
            "Check that the file is the right checkpoint for this model and preset."
        )
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(state_dict[key])


# A diffusers model folder (`unet/`, `vae/`): config.json plus one safetensors file or an index and its shards.
DIFFUSERS_CONFIG = "config.json"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"


def diffusers_folder(model_dir: str | Path, what: str, layout: str) -> tuple[Path, list[Path]]:
    """(config.json, the safetensors files) of a diffusers model folder, each checked to exist; errors name
    `what` and say what `layout` is expected."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"{what} folder not found: {model_dir}; {layout}")
    config = model_dir / DIFFUSERS_CONFIG
    if not config.is_file():
        raise CheckpointError(f"missing {config}: {layout}")
    try:
        files = safetensors_files(model_dir, DIFFUSERS_WEIGHTS)
    except CheckpointError as error:
        raise CheckpointError(f"{error}: {layout}") from None
    return config, files
