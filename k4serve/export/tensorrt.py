"""`k4serve export tensorrt`: TensorRT engines from the ONNX graphs of `k4serve export onnx`, one plan per graph.

Per graph (= per bucket): the ONNX file parsed into a strongly typed network (every tensor keeps the dtype the
graph gives it, so a bf16 graph runs bf16 and the fp8 Q/DQ pairs decide where fp8 GEMMs go; no builder precision
flags), a builder config with the optimization level, an optional workspace limit and weight streaming, and a
timing cache shared by every graph of the run and kept in a file across runs (a later build of the same layers
skips the kernel timing). The graphs have static shapes, so no optimization profile is needed; a contract that
declared dynamic axes would get one profile per bucket from its min/opt/max shapes (`_add_profile`).

TensorRT is not on PyPI's own index (its wheels come from NVIDIA's), so it is imported only here and in
k4serve.engines.tensorrt, and a missing install is an error that names what to install.
"""

from __future__ import annotations

import time
from pathlib import Path

from k4serve.engines.contracts import GraphSpec
from k4serve.engines.manifest import EngineManifest, GraphEntry
from k4serve.engines.tensorrt import INSTALL
from k4serve.export.errors import ExportError


def require_tensorrt():
    """The tensorrt module, or an ExportError naming what to install."""
    try:
        import tensorrt
    except ImportError as error:
        raise ExportError(f"`k4serve export tensorrt` needs TensorRT's Python package: {INSTALL}") from error
    return tensorrt


def _add_profile(builder, network, config, spec: GraphSpec) -> None:
    """One optimization profile from the contract's min/opt/max shapes, for the inputs the network left dynamic."""
    dynamic = [
        network.get_input(i) for i in range(network.num_inputs) if any(d < 0 for d in network.get_input(i).shape)
    ]
    if not dynamic:
        return  # static shapes: TensorRT needs no profile
    profile = builder.create_optimization_profile()
    shapes = spec.profile()
    for tensor in dynamic:
        low, opt, high = shapes[tensor.name]
        profile.set_shape(tensor.name, low, opt, high)
    config.add_optimization_profile(profile)


def build_plan(
    trt,
    logger,
    builder,
    onnx_path: Path,
    spec: GraphSpec,
    cache_bytes: bytes,
    *,
    workspace_gib: float | None,
    optimization_level: int,
    weight_streaming: bool,
) -> tuple[bytes, bytes]:
    """(serialized engine, updated timing cache) of one ONNX graph."""
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # external weights are read from beside the file
        errors = "\n  ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT's ONNX parser rejected {onnx_path}:\n  {errors}")
    config = builder.create_builder_config()
    config.builder_optimization_level = optimization_level
    if workspace_gib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    if weight_streaming:
        config.set_flag(trt.BuilderFlag.WEIGHT_STREAMING)
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    _add_profile(builder, network, config, spec)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ExportError(f"TensorRT could not build an engine from {onnx_path} (its log above says why)")
    return bytes(plan), bytes(config.get_timing_cache().serialize())


def build_engines(
    onnx_dir: str | Path,
    folder: str | Path,
    command: str,
    *,
    timing_cache: str | Path | None = None,
    workspace_gib: float | None = None,
    optimization_level: int = 3,
    weight_streaming: bool = False,
) -> EngineManifest:
    """A TensorRT plan per graph of the ONNX engine folder `onnx_dir`, written into `folder` with a manifest."""
    trt = require_tensorrt()
    onnx_dir, folder = Path(onnx_dir), Path(folder)
    source = EngineManifest.read(onnx_dir)
    folder.mkdir(parents=True, exist_ok=True)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    cache_path = Path(timing_cache) if timing_cache else None
    cache_bytes = cache_path.read_bytes() if cache_path and cache_path.is_file() else b""
    entries, seconds = [], {}
    for entry in source.graphs:
        started = time.perf_counter()
        plan, cache_bytes = build_plan(trt, logger, builder, onnx_dir / entry.file, entry.spec, cache_bytes,
                                       workspace_gib=workspace_gib, optimization_level=optimization_level,
                                       weight_streaming=weight_streaming)  # fmt: skip
        (folder / f"{entry.spec.name}.plan").write_bytes(plan)
        entries.append(GraphEntry(entry.spec, f"{entry.spec.name}.plan"))
        seconds[entry.spec.name] = round(time.perf_counter() - started, 1)
    if cache_path is not None:
        cache_path.write_bytes(cache_bytes)
    manifest = EngineManifest(
        model=source.model,
        preset=source.preset,
        format="tensorrt",
        dtype=source.dtype,
        weights=source.weights,
        buckets=source.buckets,
        graphs=entries,
        command=command,
        tools={**source.tools, "tensorrt": trt.__version__},
        options={
            "onnx": str(onnx_dir),
            "optimization_level": optimization_level,
            "weight_streaming": weight_streaming,
            "build_seconds": seconds,
            "extra": source.options.get("extra", []),
        },  # fmt: skip
    )
    manifest.write(folder)
    return manifest
