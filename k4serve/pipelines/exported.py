"""The pipelines' components served by exported engines (engine: aoti | tensorrt | onnxruntime, plus engine_dir).

Each component's engine folder `<engine_dir>/<model>-<format>/` is checked against this pipeline's preset and
weights (manifest.json), every graph in it is loaded and run once (so no request pays for loading, tuning or
graph capture), and the engine takes the place of the PyTorch module: the DiT's denoiser call, the VAE's chunk
loop, the T5 encoder under the Python tokenizer, the V2A UNet's call in the sampler. The modules' weights are
never loaded; only their configs are. A request whose shape the engine was not exported for is refused with the
export command that adds its bucket.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from k4serve.engines.contracts import MODEL_OF_COMPONENT, V2A_FRAMES, V2A_PROMPT_TOKENS, Bucket
from k4serve.engines.exported import ExportedEngine, open_engine
from k4serve.engines.manifest import FORMATS, EngineMismatch, engine_path, export_command, weights_id
from k4serve.engines.vae_chunk import ChunkedDecoder
from k4serve.models import dit as dit_model
from k4serve.models.checkpoints import diffusers_folder
from k4serve.models.cogvideox_vae import PRESETS as VAE_PRESETS
from k4serve.models.cogvideox_vae import VAE_LAYOUT, CogVideoXVAEConfig, latent_chunks
from k4serve.models.t5 import T5TextEncoder, load_tokenizer, preset_tokenizer
from k4serve.pipelines.t2v import PIPELINE_PRESETS, PipelineSettings, RequestError, _weights_paths

T5_WEIGHT_PATTERNS = ("*.safetensors", "*.bin")


def component_weight_files(settings: PipelineSettings, component: str) -> list[Path] | None:
    """The checkpoint files a component's weights come from (None: seeded random weights)."""
    if settings.weights is None:
        return None
    paths = _weights_paths(settings.weights)
    if component == "dit":
        return [paths["dit"]]
    if component == "vae":
        return diffusers_folder(paths["vae"], "CogVideoX VAE", VAE_LAYOUT)[1]
    files = sorted(f for pattern in T5_WEIGHT_PATTERNS for f in paths["text_encoder"].glob(pattern))
    if not files:
        raise FileNotFoundError(f"no {' or '.join(T5_WEIGHT_PATTERNS)} weights in {paths['text_encoder']}")
    return files


class ExportedComponent:
    """One component's engine, checked against the settings, with the command that builds a missing bucket.

    `settings` is a pipeline's (T2V's PipelineSettings or V2A's V2ASettings: preset, weights, seed, engine,
    engine_dir); `preset` is the component's model preset and `weight_files` its checkpoint files (None: random
    weights of settings.seed), which the manifest must name."""

    def __init__(self, settings, component: str, device: str, preset: str, weight_files: list[Path] | None):
        self.settings = settings
        self.model = MODEL_OF_COMPONENT[component]
        self.format = FORMATS[settings.engine]
        self.preset = preset
        self.extra: list[str] = []
        folder = engine_path(settings.engine_dir, self.model, self.format)
        if not folder.is_dir():
            raise EngineMismatch(
                f"no {self.model} engine in {folder} (engine {settings.engine}); build it: {self.fix([])}"
            )
        self.engine: ExportedEngine = open_engine(settings.engine, folder, device)
        manifest = self.engine.manifest
        self.extra = manifest.options.get("extra", [])
        own_weights = weights_id(weight_files, settings.seed)
        manifest.check(self.model, self.preset, own_weights, fix=self.fix(manifest.buckets, manifest.dtype))
        self.engine.load()  # every exported bucket, before the first request

    def fix(self, buckets: list[Bucket], dtype: str | None = None) -> str:
        """The export command for this component, these buckets (none: placeholders), this pipeline's preset and
        weights."""
        weights = str(Path(self.settings.weights).resolve()) if self.settings.weights else None
        dtype = dtype or ("fp32" if self.format == "onnx" else "bf16")
        return export_command(self.format, self.model, self.settings.preset, buckets, dtype,
                              self.settings.engine_dir, weights, self.extra, self.settings.seed)  # fmt: skip

    def require(self, shapes: list[tuple[int, ...]], bucket: Bucket) -> None:
        """RequestError naming the export command unless the engine has a graph for these input shapes."""
        if self.engine.graph(shapes) is None:
            manifest = self.engine.manifest
            served = ", ".join(b.name for b in manifest.buckets)
            batch = manifest.graphs[0].spec.inputs[0].shape[0]
            raise RequestError(
                f"the {self.settings.engine} {self.model} engine serves {served} (batch {batch}), not {bucket.name} "
                f"(inputs {[list(shape) for shape in shapes]}); add the bucket: "
                f"{self.fix([*manifest.buckets, bucket], manifest.dtype)}"
            )


def t2v_identity(settings: PipelineSettings, component: str) -> tuple[str, list[Path] | None]:
    """(model preset, checkpoint files) of a T2V component: what its engine's manifest must name."""
    return PIPELINE_PRESETS[settings.preset][component], component_weight_files(settings, component)


class ExportedDiT(ExportedComponent):
    """Stands where the DiT module stands: its config, and (x, text_embed, time) -> velocity through the engine."""

    def __init__(self, settings: PipelineSettings, device: str):
        super().__init__(settings, "dit", device, *t2v_identity(settings, "dit"))
        self.config = dit_model.PRESETS[self.preset]

    def __call__(self, x: Tensor, text_embed: Tensor, time: Tensor) -> Tensor:
        b, t, h, w, _ = x.shape
        seconds = (t - 1) // 2
        shapes = [tuple(x.shape), tuple(text_embed.shape), tuple(time.shape)]
        self.require(shapes, Bucket(8 * h, 8 * w, seconds))
        return self.engine(x, text_embed, time)


class ExportedVae(ExportedComponent):
    """The decoder's `decode_chunks` as a loop over the exported chunk-step graphs."""

    def __init__(self, settings: PipelineSettings, device: str):
        super().__init__(settings, "vae", device, *t2v_identity(settings, "vae"))
        self.chunks = ChunkedDecoder(self.engine)

    def decode_chunks(self, z: Tensor) -> Iterator[Tensor]:
        """z [1, 16, T, h, w] (divided by scaling_factor) -> each chunk's video, after checking every chunk's graph."""
        b, c, t, h, w = z.shape
        bucket = Bucket(8 * h, 8 * w, (t - 1) // 2)
        for index, chunk in enumerate(latent_chunks(t)):
            first = (b, c, chunk.stop - chunk.start, h, w)
            graphs = [
                g for g in self.engine.graphs if g.inputs[0].shape == first and (len(g.inputs) > 1) == (index > 0)
            ]
            if not graphs:
                self.require([first], bucket)  # raises, naming the export command
        return self.chunks.decode_chunks(z)


class _EngineEncoder:
    """An exported T5 encoder in the place of transformers' T5EncoderModel inside T5TextEncoder."""

    def __init__(self, component: ExportedComponent):
        self.component = component
        hidden = component.engine.graphs[0].outputs[0]
        self.config = type("T5EngineConfig", (), {"d_model": hidden.shape[-1]})()
        self.device = component.engine.device

    def eval(self) -> _EngineEncoder:
        return self

    def requires_grad_(self, requires_grad: bool = True) -> _EngineEncoder:
        return self

    def __call__(self, input_ids: Tensor):
        hidden = self.component.engine(input_ids)
        return type("T5EngineOutput", (), {"last_hidden_state": hidden})()


def exported_text_encoder(settings: PipelineSettings, device: str) -> T5TextEncoder:
    """T5TextEncoder: the Python tokenizer in front of the exported encoder."""
    component = ExportedComponent(settings, "text_encoder", device, *t2v_identity(settings, "text_encoder"))
    if settings.weights is not None:
        tokenizer = load_tokenizer(_weights_paths(settings.weights)["tokenizer"])
    else:
        tokenizer = preset_tokenizer(component.preset)
    return T5TextEncoder(tokenizer, _EngineEncoder(component))


def vae_config(settings: PipelineSettings) -> CogVideoXVAEConfig:
    """The decoder config: the weights' vae/config.json, else the preset's."""
    if settings.weights is not None:
        return CogVideoXVAEConfig.from_json(_weights_paths(settings.weights)["vae"] / "config.json")
    return VAE_PRESETS[PIPELINE_PRESETS[settings.preset]["vae"]]


def exported_components(settings: PipelineSettings, components: tuple[str, ...]) -> dict:
    """text_encoder, dit, vae, vae_config for T2VPipeline, each present component from its exported engine."""
    if not settings.engine_dir:
        fmt = FORMATS[settings.engine]
        raise ValueError(
            f"engine {settings.engine} runs exported engines: give engine_dir (--engine-dir, K4SERVE_ENGINE_DIR or "
            f"the engine_dir parameter), a folder written by `k4serve export {fmt} ... -o DIR`"
        )
    devices = settings.device_map()
    with torch.no_grad():
        return {
            "text_encoder": exported_text_encoder(settings, devices["text_encoder"])
            if "text_encoder" in components else None,
            "dit": ExportedDiT(settings, devices["dit"]) if "dit" in components else None,
            "vae": ExportedVae(settings, devices["vae"]) if "vae" in components else None,
            "vae_config": vae_config(settings) if "vae" in components else None,
        }  # fmt: skip


class ExportedUNet(ExportedComponent):
    """Stands where the V2A UNet stands in the sampler: (sample, timestep, prompt, video) -> eps through the engine,
    returned in the sampler's `dtype` (the scheduler steps in the UNet's run dtype, as the official)."""

    def __init__(self, settings, device: str, dtype: torch.dtype, preset: str, weight_files: list[Path] | None):
        super().__init__(settings, "unet", device, preset, weight_files)
        self.dtype = dtype
        sample, _, prompt, _ = self.engine.graphs[0].inputs
        self.latent_channels, self.feature_dim = sample.shape[1], prompt.shape[-1]

    def require_seconds(self, seconds: int, sample_shape: tuple[int, ...]) -> None:
        """RequestError naming the export command unless the engine serves `seconds` of audio."""
        batch, d = sample_shape[0], self.feature_dim
        shapes = [sample_shape, (batch,), (batch, V2A_PROMPT_TOKENS, d), (batch, V2A_FRAMES, d)]
        self.require(shapes, Bucket(0, 0, seconds))

    def __call__(self, sample: Tensor, timestep: Tensor, prompt_embeds: Tensor, video_embeds: Tensor) -> Tensor:
        return self.engine(sample, timestep, prompt_embeds, video_embeds).to(self.dtype)
