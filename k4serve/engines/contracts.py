"""What each exportable component promises an exported engine, declared once (TensorRT's diffusion-demo `BaseModel`).

A contract names the component's graphs for a set of buckets (size x seconds), each graph's input and output
tensors (names, static shapes, dtypes), the min/opt/max shapes of a TensorRT profile, a sample input, and the
eager module whose forward takes exactly those inputs. The ONNX exporter, the TensorRT builder, the AOTInductor
packager, the engine manifest and the runtimes all read it, so a name or a shape lives in one place.

No dynamic axes: every graph has static shapes (one per bucket), which is what lets TensorRT and AOTInductor
pick kernels per shape and the runtimes capture CUDA graphs. min = opt = max for each profile.

    dit           one denoiser call per bucket: (x, text_embed, time) -> velocity
    vae-decoder   one temporal chunk step per size (see k4serve.engines.vae_chunk): "first3" (3 latent frames, no
                  cache in, cache out), "step2" (2 frames, cache in and out), "image" (1 frame, seconds = 0)
    text-encoder  the T5 encoder on 224 token ids -> last hidden state (no bucket dependence)
    v2a-unet      one V2A UNet call per duration (buckets are seconds only): the CFG batch [uncond; cond] of
                  latents [2, 4, n_mels / 8, W / 8], its timesteps and conditioning -> noise prediction

Adding a model is one more class here and one entry in CONTRACTS: its `graphs`, its `module` (the forward taking
the graph's inputs positionally), `modules` (what an export casts to its dtype) and `component` (the name the
pipeline and the manifest use). Nothing in the exporters or runtimes changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from k4serve.engines.vae_chunk import VaeChunkStep, cached_convs
from k4serve.models.cogvideox_vae import decoded_frames, latent_chunks

TEXT_TOKENS = 224  # T5 max_length: every prompt is padded or truncated to it
LATENT_CHANNELS = 16


@dataclass(frozen=True)
class Bucket:
    """One request shape the deployment serves: size (height x width) and duration. A model whose shapes do not
    depend on the frame size (the V2A UNet) has buckets of a duration only: height = width = 0."""

    height: int
    width: int
    seconds: int

    @property
    def latent_frames(self) -> int:
        """1 for an image, else 2 * seconds + 1 (the pipeline's T)."""
        return 1 if self.seconds == 0 else self.seconds * 8 // 4 + 1

    @property
    def size(self) -> str:
        return f"{self.height}x{self.width}"

    @property
    def sized(self) -> bool:
        return self.height > 0

    @property
    def name(self) -> str:
        return f"{self.size}-{self.seconds}s" if self.sized else f"{self.seconds}s"


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, static shape, torch dtype name; `high` bounds integer sample values."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    high: int | None = None

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def sample(self, generator: torch.Generator, device: torch.device | str = "cpu") -> Tensor:
        """A seeded random tensor of this spec (integers in [0, high), floats ~ N(0, 1))."""
        if self.high is not None:
            return torch.randint(0, self.high, self.shape, generator=generator).to(device)
        return torch.randn(self.shape, generator=generator).to(device=device, dtype=self.torch_dtype)

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "high": self.high}

    @classmethod
    def from_json(cls, raw: dict) -> TensorSpec:
        return cls(raw["name"], tuple(raw["shape"]), raw["dtype"], raw.get("high"))


@dataclass(frozen=True)
class GraphSpec:
    """One static-shape graph of a component: what the exporters build and a runtime dispatches to."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_shapes(self) -> tuple[tuple[int, ...], ...]:
        return tuple(spec.shape for spec in self.inputs)

    def profile(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """TensorRT min/opt/max per input: all three the static shape (no dynamic axes)."""
        return {spec.name: (spec.shape, spec.shape, spec.shape) for spec in self.inputs}

    def sample_inputs(self, device: torch.device | str = "cpu", seed: int = 0) -> tuple[Tensor, ...]:
        """Seeded random inputs: what export traces with and what warm-up runs."""
        generator = torch.Generator().manual_seed(seed)
        return tuple(spec.sample(generator, device) for spec in self.inputs)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "inputs": [s.to_json() for s in self.inputs],
            "outputs": [s.to_json() for s in self.outputs],
        }

    @classmethod
    def from_json(cls, raw: dict) -> GraphSpec:
        inputs = tuple(TensorSpec.from_json(s) for s in raw["inputs"])
        return cls(raw["name"], inputs, tuple(TensorSpec.from_json(s) for s in raw["outputs"]))


def dtype_name(dtype: torch.dtype) -> str:
    """torch.float32 -> 'float32'."""
    return str(dtype).removeprefix("torch.")


class ExportContract:
    """The declaration one exportable component makes (see the module docstring)."""

    model: str = ""  # the name on the command line and in the manifest
    component: str = ""  # the pipeline component it replaces (PipelineSettings.device_map keys)
    dynamic_axes: dict[str, dict[int, str]] = {}  # none: static shapes per bucket
    fp8 = False  # whether an fp8 export is declared (then `fp8_linears` names the linears it quantizes)
    sized = True  # whether its buckets have a frame size (--size); False: durations only

    def modules(self, component) -> nn.Module:
        """The modules holding the weights, which an export casts to its dtype (the component itself by default)."""
        return component

    def graphs(self, component, buckets: Sequence[Bucket], dtype: torch.dtype) -> list[GraphSpec]:
        """The distinct graphs serving `buckets`, float tensors in `dtype`."""
        raise NotImplementedError

    def module(self, component, graph: GraphSpec) -> nn.Module:
        """The eager module whose forward takes graph.inputs positionally and returns graph.outputs."""
        raise NotImplementedError

    def fp8_linears(self, component) -> list[tuple[nn.Module, str]]:
        """(parent, attribute) of the linears an fp8 export quantizes; empty: fp8 is not declared."""
        return []


class DiTContract(ExportContract):
    """One denoiser call of `DiffusionTransformer3D` per bucket, batch 1."""

    model = "dit"
    component = "dit"
    fp8 = True

    def graphs(self, dit, buckets: Sequence[Bucket], dtype: torch.dtype) -> list[GraphSpec]:
        config, float_name = dit.config, dtype_name(dtype)
        graphs = {}
        for bucket in buckets:
            x = (1, bucket.latent_frames, bucket.height // 8, bucket.width // 8, config.in_visual_dim)
            graphs[bucket.name] = GraphSpec(
                bucket.name,
                (
                    TensorSpec("x", x, float_name),
                    TensorSpec("text_embed", (1, TEXT_TOKENS, config.in_text_dim), float_name),
                    TensorSpec("time", (1,), "int64", high=1000),
                ),
                (TensorSpec("velocity", x[:-1] + (config.out_visual_dim,), float_name),),
            )
        return list(graphs.values())

    def module(self, dit, graph: GraphSpec) -> nn.Module:
        return dit

    def fp8_linears(self, dit) -> list[tuple[nn.Module, str]]:
        # The four block GEMMs the fast engine runs in fp8; embeddings, modulations and the out layer stay.
        pairs = []
        for block in dit.blocks():
            attention, ff = block.self_attention, block.feed_forward
            pairs += [
                (attention, "to_query_key_value"),
                (attention, "output_layer"),
                (ff, "in_layer"),
                (ff, "out_layer"),
            ]
        return pairs


class VaeDecoderContract(ExportContract):
    """The CogVideoX decoder as chunk steps with explicit cache tensors (k4serve.engines.vae_chunk)."""

    model = "vae-decoder"
    component = "vae"

    def graphs(self, decoder, buckets: Sequence[Bucket], dtype: torch.dtype) -> list[GraphSpec]:
        graphs = {}
        for bucket in buckets:
            chunks = latent_chunks(bucket.latent_frames)
            frames = [c.stop - c.start for c in chunks]
            # An image decodes alone; a video's first chunk always hands its cache on (a 1 s video's unused), so
            # one first-chunk graph serves every duration and the input shapes alone pick the graph.
            if frames[0] == 1:
                kinds = [("image", 1, False, False)]
            else:
                kinds = [(f"first{frames[0]}", frames[0], False, True)]
                kinds += [(f"step{frames[1]}", frames[1], True, True)] if len(chunks) > 1 else []
            for kind, t, takes_cache, emits_cache in kinds:
                name = f"{bucket.size}-{kind}"
                if name not in graphs:
                    graphs[name] = self._graph(decoder, name, bucket, t, takes_cache, emits_cache, dtype)
        return list(graphs.values())

    @staticmethod
    def _graph(decoder, name, bucket, t, takes_cache, emits_cache, dtype) -> GraphSpec:
        config, float_name = decoder.config, dtype_name(dtype)
        z = (1, config.latent_channels, t, bucket.height // 8, bucket.width // 8)
        video = (
            1,
            config.out_channels,
            decoded_frames(t, config.temporal_upsample_levels),
            bucket.height,
            bucket.width,
        )
        caches = cache_shapes(decoder, z) if takes_cache or emits_cache else {}
        past = tuple(TensorSpec(f"past.{path}", shape, float_name) for path, shape in caches.items())
        nxt = tuple(TensorSpec(f"next.{path}", shape, float_name) for path, shape in caches.items())
        inputs = (TensorSpec("z", z, float_name), *(past if takes_cache else ()))
        return GraphSpec(name, inputs, (TensorSpec("video", video, float_name), *(nxt if emits_cache else ())))

    def module(self, decoder, graph: GraphSpec) -> nn.Module:
        return VaeChunkStep(decoder, with_cache=len(graph.inputs) > 1, emit_cache=len(graph.outputs) > 1)


def cache_shapes(decoder, z_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """Module path -> cache shape of each cached conv after a chunk of z_shape (computed on fake tensors)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        weight = next(decoder.parameters())  # a GPU decoder's cache shapes are traced on the GPU too
        z = mode.from_tensor(torch.empty(z_shape, dtype=weight.dtype, device=weight.device))
        _, *caches = VaeChunkStep(decoder, with_cache=False, emit_cache=True)(z)
    return {path: tuple(c.shape) for (path, _), c in zip(cached_convs(decoder), caches, strict=True)}


class _LastHiddenState(nn.Module):
    """T5EncoderModel(input_ids) -> last_hidden_state, no attention mask (as the official pipeline calls it)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.encoder(input_ids=input_ids).last_hidden_state


class TextEncoderContract(ExportContract):
    """The T5 encoder on one prompt's 224 token ids (the tokenizer stays in Python)."""

    model = "text-encoder"
    component = "text_encoder"

    def graphs(self, text_encoder, buckets: Sequence[Bucket], dtype: torch.dtype) -> list[GraphSpec]:
        config = text_encoder.encoder.config
        ids = TensorSpec("input_ids", (1, TEXT_TOKENS), "int64", high=config.vocab_size)
        hidden = TensorSpec("last_hidden_state", (1, TEXT_TOKENS, config.d_model), dtype_name(dtype))
        return [GraphSpec(f"tokens{TEXT_TOKENS}", (ids,), (hidden,))]

    def modules(self, text_encoder) -> nn.Module:
        return text_encoder.encoder

    def module(self, text_encoder, graph: GraphSpec) -> nn.Module:
        return _LastHiddenState(text_encoder.encoder)


CFG_BATCH = 2  # the V2A sampler's one batched call on [uncond; cond]
V2A_PROMPT_TOKENS = 100  # prompt features per row (CogVLM2's first 100 tokens, official)
V2A_FRAMES = 96  # video features per row (frames sampled per clip, official)


class V2AUNetContract(ExportContract):
    """One V2A UNet call per duration. The component is the V2A pipeline built with its UNet: its `unet` and its
    `latent_shape(seconds)` (the latent height follows the mel rows of the pipeline's audio preset, not the UNet)."""

    model = "v2a-unet"
    component = "unet"
    sized = False

    def graphs(self, pipeline, buckets: Sequence[Bucket], dtype: torch.dtype) -> list[GraphSpec]:
        d, float_name = pipeline.unet.config.feature_dim, dtype_name(dtype)
        graphs = {}
        for bucket in buckets:
            sample = (CFG_BATCH, *pipeline.latent_shape(bucket.seconds))
            graphs[bucket.name] = GraphSpec(
                bucket.name,
                (
                    TensorSpec("sample", sample, float_name),
                    TensorSpec("timestep", (CFG_BATCH,), "int64", high=1000),
                    TensorSpec("prompt_embeds", (CFG_BATCH, V2A_PROMPT_TOKENS, d), float_name),
                    TensorSpec("video_embeds", (CFG_BATCH, V2A_FRAMES, d), float_name),
                ),
                (TensorSpec("eps", sample, float_name),),
            )
        return list(graphs.values())

    def modules(self, pipeline) -> nn.Module:
        return pipeline.unet

    def module(self, pipeline, graph: GraphSpec) -> nn.Module:
        return pipeline.unet  # forward(sample, timestep, prompt_embeds, video_embeds): the graph's inputs in order


CONTRACTS: dict[str, ExportContract] = {
    c.model: c for c in (DiTContract(), VaeDecoderContract(), TextEncoderContract(), V2AUNetContract())
}
MODEL_OF_COMPONENT = {c.component: c.model for c in CONTRACTS.values()}
UNSIZED_MODELS = frozenset(c.model for c in CONTRACTS.values() if not c.sized)  # buckets without --size


def parameter_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (decides ONNX external data past 2 GB)."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def graph_for(graphs: Sequence[GraphSpec], shapes: Sequence[tuple[int, ...]]) -> GraphSpec | None:
    """The graph whose input shapes are `shapes`, or None."""
    shapes = tuple(tuple(s) for s in shapes)
    return next((g for g in graphs if g.input_shapes == shapes), None)
