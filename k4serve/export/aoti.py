"""`k4serve export aoti`: AOTInductor packages (.pt2), one per graph of the contract, compiled ahead of time.

Each graph's module is captured with `torch.export` (non-strict) on the contract's sample inputs and compiled by
`torch._inductor.aoti_compile_and_package`: a shared library with every kernel built and tuned, plus the weights,
which `torch._inductor.aoti_load_package` loads without Python model code, Dynamo or a compiler at serve time.

Two DiT paths:
  eager  the reference module (SDPA attention; dtype fp32/fp16/bf16, or fp8: the four block linears as
         k4serve.kernels.quantize.Fp8Linear, i.e. torch._scaled_mm GEMMs Inductor keeps as they are);
  fast   FastDiT's forward (k4serve.engines.torch) with our Triton kernels as user-defined kernels: while it is
         traced, every Triton kernel the kernel modules launch is wrapped with `torch.library.wrap_triton`, so
         the trace records each launch (grid, arguments, and TMA descriptors as their tensors plus metadata, which
         torch's own non-Dynamo tracing drops) and Inductor compiles the kernels into the package next to its own.
         Attention is tuned for the bucket first (FastDiT.load).
The VAE chunk step, the T5 encoder and the V2A UNet export their eager modules.

The C++ compiler is checked before anything compiles (`loadable_cxx`): a package's shared library must use the
process's libstdc++.so. One that links libstdc++ statically (the H200 image's CXX=/opt/gcc/bin/g++ does) holds a
second copy of the C++ locale tables; the model's constructor parses its device string with std::regex, which
then looks a facet up in the wrong copy, and every package segfaults at load (torch 2.11, CPU and CUDA alike).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from k4serve.engines.contracts import Bucket, ExportContract
from k4serve.engines.manifest import EngineManifest, GraphEntry
from k4serve.export.dtypes import compute_dtype
from k4serve.export.errors import ExportError

# The modules whose Triton kernels FastDiT launches (module globals that are JIT functions get wrapped).
KERNEL_MODULES = ("attention", "norm_modulate", "qk_norm_rope", "gelu_quant")


def _launch_with_tma_metadata(hopifier, variable, grids, combined_args, tx) -> None:
    """TracingTritonHOPifier.call_HOP that also takes TMA descriptor arguments.

    torch's non-Dynamo tracing records a launch with no TMA metadata (its call_HOP: "not yet supported"), so a
    TensorDescriptor argument lands among the constants and Inductor's codegen fails on it. This records each
    descriptor as Dynamo does: its tensor (a view with the descriptor's shape and strides) as the argument, and
    ("stable", (block_shape,)) as its metadata, from which the launch rebuilds TensorDescriptor.from_tensor.
    """
    from torch._higher_order_ops.triton_kernel_wrap import triton_kernel_wrapper_mutation
    from triton.tools.tensor_descriptor import TensorDescriptor

    arguments, tma = {}, {}
    for name, value in combined_args.items():
        if isinstance(value, TensorDescriptor):
            # the offset spelt out: Inductor lowers an as_strided without one from the start of the storage, so q, k
            # and v (column slices of one QKV buffer) all read q's columns
            view = value.base.as_strided(list(value.shape), list(value.strides), value.base.storage_offset())
            arguments[name] = view
            tma[name] = ("stable", (list(value.block_shape),))
        else:
            arguments[name] = value
    graphable, constant_args_idx = hopifier.store_non_graphable_args(arguments)
    return triton_kernel_wrapper_mutation(kernel_idx=variable.kernel_idx, constant_args_idx=constant_args_idx,
                                          grid=grids, tma_descriptor_metadata=tma, kwargs=graphable)  # fmt: skip


def launched_kernels(module) -> list[tuple[str, object]]:
    """(name, kernel) of the Triton kernels among `module`'s globals that no other kernel there calls: those that
    are launched. A helper another kernel calls stays as it is (Triton compiles it into them by its global name)."""
    import triton

    kernels = {
        attr: value
        for attr, value in vars(module).items()
        if isinstance(value, triton.runtime.JITFunction | triton.runtime.Autotuner)
    }
    sources = {attr: (k.fn if isinstance(k, triton.runtime.Autotuner) else k).src for attr, k in kernels.items()}
    return [
        (attr, kernel)
        for attr, kernel in kernels.items()
        if not any(re.search(rf"\b{attr}\s*\(", src) for other, src in sources.items() if other != attr)
    ]


@contextlib.contextmanager
def traceable_triton_kernels() -> Iterator[None]:
    """Within the block, the kernel modules launch their Triton kernels through `wrap_triton` (traceable), TMA
    descriptor arguments included."""
    import functools
    import importlib

    from torch._higher_order_ops.triton_kernel_wrap import tracing_triton_hopifier_singleton as hopifier
    from torch.library import wrap_triton

    patched = []
    for name in KERNEL_MODULES:
        module = importlib.import_module(f"k4serve.kernels.{name}")
        patched += [(module, attr, kernel) for attr, kernel in launched_kernels(module)]
    hopifier.call_HOP = functools.partial(_launch_with_tma_metadata, hopifier)
    try:
        for module, attr, kernel in patched:
            setattr(module, attr, wrap_triton(kernel))
        yield
    finally:
        del hopifier.call_HOP  # the class's method again
        for module, attr, kernel in patched:
            setattr(module, attr, kernel)


@contextlib.contextmanager
def autotunable_tma_views() -> Iterator[None]:
    """Within the block, Inductor's compile-time tuning code can build a TMA descriptor over a strided view.

    AOTInductor compiles each Triton kernel by running it once from generated Python; torch 2.11 writes a
    descriptor whose tensor is a view (our q, k and v: column slices of the QKV buffer) with the C++ wrapper's
    reference (`reinterpret_tensor_wrapper(buf, ..., 0L)`), which is no Python. There the descriptor is built over a
    fresh tensor of the view's sizes and strides instead: the run only compiles the kernel, its values do not matter.
    The package's C++ code, which keeps the view, is unchanged.
    """
    from torch._inductor import ir
    from torch._inductor.codegen.wrapper import PythonWrapperCodegen
    from torch._inductor.virtualized import V

    original = PythonWrapperCodegen._generate_tma_descriptor_call_stable

    def tuning_descriptor(self, desc, apply_size_hints=False):
        if not (apply_size_hints and V.graph.cpp_wrapper and isinstance(desc.tensor, ir.ReinterpretView)):
            return original(self, desc, apply_size_hints)
        hints = V.graph.sizevars.optimization_hints
        size, stride = tuple(hints(desc.tensor.get_size())), tuple(hints(desc.tensor.get_stride()))
        example = (f"torch._dynamo.testing.rand_strided({size}, {stride}, device='{desc.tensor.get_device()}', "
                   f"dtype={desc.tensor.get_dtype()})")  # fmt: skip
        block = list(hints(desc.block_shape))
        return f"triton.tools.tensor_descriptor.TensorDescriptor.from_tensor({example}, {block})"

    PythonWrapperCodegen._generate_tma_descriptor_call_stable = tuning_descriptor
    try:
        yield
    finally:
        PythonWrapperCodegen._generate_tma_descriptor_call_stable = original


class FastForward(nn.Module):
    """FastDiT's fused forward as a module for torch.export (its weights are captured as constants)."""

    def __init__(self, fast):
        super().__init__()
        self.fast = fast

    def forward(self, x, text_embed, time):
        return self.fast.forward(x, text_embed, time)


# What an AOTI package's constructor does first (torch/csrc/inductor/aoti_runtime/model_base.h, parse_device_str).
REGEX_PROBE = r"""#include <regex>
extern "C" int k4serve_regex_probe() {
  std::regex device("(cpu|cuda|xpu|mps)(:([0-9]+))?");
  return std::regex_match("cuda:0", device) ? 1 : 0;
}
"""


def runs_std_regex_beside_torch(cxx: str) -> str | None:
    """None when a shared library built by `cxx` runs std::regex in a process that has loaded torch, else why not."""
    with tempfile.TemporaryDirectory(prefix="k4serve-cxx-") as folder:
        source, library = os.path.join(folder, "probe.cpp"), os.path.join(folder, "probe.so")
        with open(source, "w") as f:
            f.write(REGEX_PROBE)
        built = subprocess.run([cxx, "-shared", "-fPIC", "-O1", source, "-o", library], capture_output=True,
                               text=True, timeout=120)  # fmt: skip
        if built.returncode:
            return f"it cannot build a shared library: {built.stderr.strip()[-300:]}"
        call = f"import torch, ctypes; print(ctypes.CDLL({library!r}).k4serve_regex_probe())"
        ran = subprocess.run([sys.executable, "-c", call], capture_output=True, text=True, timeout=120)
    if ran.returncode or ran.stdout.strip() != "1":
        died = f"signal {-ran.returncode}" if ran.returncode < 0 else f"exit {ran.returncode}"
        return (
            f"its shared libraries crash at std::regex beside torch's libstdc++ ({died}): it links libstdc++ statically"
        )
    return None


def loadable_cxx(cxx: str | None = None) -> str:
    """The C++ compiler to build packages with: `cxx` if given, else Inductor's choice (CXX, then g++) or, when that
    one's libraries would crash at load, the first g++ that works (named on stderr). ExportError when none does."""
    from torch._inductor import config

    if cxx:
        candidates = [cxx]
    else:
        configured = [c for c in config.cpp.cxx if c] if isinstance(config.cpp.cxx, tuple | list) else [config.cpp.cxx]
        candidates = list(dict.fromkeys([*configured, "g++", "/usr/bin/g++"]))
    refused = []
    for candidate in candidates:
        path = shutil.which(candidate)
        problem = runs_std_regex_beside_torch(path) if path else "not found"
        if problem is None:
            if refused:
                print(f"k4serve export aoti: compiling with {path}; not {'; not '.join(refused)}", file=sys.stderr)
            return path
        refused.append(f"{candidate}: {problem}")
    raise ExportError(
        "no C++ compiler here builds AOTInductor packages that load (" + "; ".join(refused) + "): pass --cxx a g++ "
        "that links libstdc++ dynamically (the distribution's /usr/bin/g++), or set CXX to one"
    )


@contextlib.contextmanager
def inductor_cxx(cxx: str) -> Iterator[None]:
    """Within the block, Inductor compiles packages with `cxx`."""
    from torch._inductor import config

    with config.patch({"cpp.cxx": (cxx,)}):
        yield


def _eager_fp8(contract: ExportContract, component) -> None:
    from k4serve.kernels.quantize import Fp8Linear

    for parent, name in contract.fp8_linears(component):
        setattr(parent, name, Fp8Linear.from_linear(getattr(parent, name)))


def export_aoti(
    contract: ExportContract,
    component,
    buckets: Sequence[Bucket],
    dtype: str,
    folder: str | Path,
    *,
    preset: str,
    weights: str,
    command: str,
    engine: str = "eager",
    attention: str = "triton",
    linear: str | None = None,
    extra: Sequence[str] = (),
    cxx: str | None = None,
) -> EngineManifest:
    """An AOTInductor package per graph of `contract` for `buckets` into `folder`, with the manifest; `cxx`: the C++
    compiler (checked; default: see loadable_cxx)."""
    cxx = loadable_cxx(cxx)  # seconds, before minutes of compiling
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    carrier = compute_dtype(dtype)
    if dtype == "fp8" and not contract.fp8:
        raise ExportError(f"fp8 is declared for the DiT's block linears only; export {contract.model} as bf16")
    if engine == "fast" and contract.model != "dit":
        raise ExportError(f"--engine fast is the DiT's Triton path; export {contract.model} with --engine eager")
    modules = contract.modules(component).to(carrier)
    device = next(modules.parameters()).device
    fast = None
    if engine == "fast":
        from k4serve.engines.torch import FastDiT

        fast = FastDiT(component, attention=attention, linear=linear or ("fp8" if dtype == "fp8" else "bf16"),
                       cuda_graphs=False)  # fmt: skip
    elif dtype == "fp8":
        _eager_fp8(contract, component)
    entries, seconds = [], {}
    for graph in contract.graphs(component, buckets, carrier):
        started = time.perf_counter()
        inputs = graph.sample_inputs(device)
        with torch.no_grad():
            if fast is not None:
                fast.load([graph.inputs[0].shape])  # tune the attention tiling for this bucket before tracing
                with traceable_triton_kernels():
                    program = torch.export.export(FastForward(fast), inputs, strict=False)
            else:
                program = torch.export.export(contract.module(component, graph).eval(), inputs, strict=False)
            path = folder / f"{graph.name}.pt2"
            with inductor_cxx(cxx), autotunable_tma_views() if fast is not None else contextlib.nullcontext():
                torch._inductor.aoti_compile_and_package(program, package_path=str(path))
        entries.append(GraphEntry(graph, path.name))
        seconds[graph.name] = round(time.perf_counter() - started, 1)
    manifest = EngineManifest(
        model=contract.model,
        preset=preset,
        format="aoti",
        dtype=dtype,
        weights=weights,
        buckets=list(buckets),
        graphs=entries,
        command=command,
        tools={"torch": torch.__version__, "device": str(device), "cxx": cxx},
        options={
            "engine": engine,
            "attention": attention if fast else "sdpa",
            "linear": fast and linear,
            "export_seconds": seconds,
            "extra": list(extra),
        },  # fmt: skip
    )
    manifest.write(folder)
    return manifest
