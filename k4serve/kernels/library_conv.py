"""cuDNN frontend convolutions for the fast VAE decoder (`FastVAEDecoder(convs="cudnn")`): every engine
configuration (plan) of a conv shape built and timed once, the fastest kept.

Why: torch reaches cuDNN through its heuristics' first choices. At the decoder's full-resolution convs on an H100
the frontend's fastest plan runs 1.11-1.13x faster than torch's conv3d (bf16, the same error against fp32); at
the smaller shapes they are equal, or torch's is faster (the 512-channel convs: 0.164 against 0.213 ms). A 12 s
decode takes 0.909 s instead of 0.956, but its first decode builds every plan of every shape: 215 s. So each
choice is recorded by plan name in `$K4SERVE_CACHE/cudnn-conv-plans.json`, keyed by the GPU, the cuDNN version and
the conv's shapes: a later process builds only the recorded plan (a deployment can keep the file in its image's
K4SERVE_CACHE). fp8 operands (e4m3, per-tensor scales) ran at 781-942 TFLOP/s with a rel. error of 3.8e-2 against
bf16's 2.9e-3, too lossy for the frames, so the VAE stays bf16. (`benchmarks/vae_convs.py`, `benchmarks/vae.py`;
benchmarks/RESULTS.md, 2026-12-07.)

Contract: `cudnn_conv(x, weight, padding)` is F.conv3d(x, weight, padding=padding) (stride 1, no bias) for NDHWC
(channels_last_3d) x and weight, with an NDHWC output; same dtype in and out, float32 accumulation. The package
(`nvidia-cudnn-frontend`, in the `gpu` extra) is imported on first use; `unavailable_reason` says whether it can
run without importing it. Plans are chosen outside CUDA-graph capture (the engine's warm-up at the same shapes),
since timing them synchronizes; a capture that meets a new shape raises.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from k4serve.kernels import cache_folder, module_found

PACKAGE = "nvidia-cudnn-frontend"
RECORD = "cudnn-conv-plans.json"  # in cache_folder()
TIMED_RUNS = 3  # per plan, after one warm-up run; the median is kept


def unavailable_reason(device: torch.device | str | None = None) -> str | None:
    """Why the cuDNN frontend convs cannot run on `device` (None: they can), without importing the package."""
    device = torch.device(device or "cuda")
    if device.type != "cuda" or not torch.cuda.is_available():
        return "cuDNN frontend convs need a CUDA GPU"
    if not module_found("cudnn"):
        return f"cuDNN frontend convs need `cudnn`: pip install {PACKAGE} (or pip install 'k4serve[gpu]')"
    return None


def fastest_plan(count: int, time_plan: Callable[[int], float]) -> int:
    """The index of the fastest of `count` plans by `time_plan(i)` (ms); a plan that fails to run is skipped."""
    times = {}
    failures = []
    for index in range(count):
        try:
            times[index] = time_plan(index)
        except Exception as error:  # cuDNN declines some plans only when they run (e.g. a launch limit)
            failures.append(f"plan {index}: {type(error).__name__}: {error}")
    if not times:
        raise RuntimeError(f"none of the {count} cuDNN plans ran: " + "; ".join(failures[:3]))
    return min(times, key=times.__getitem__)


def ndhwc_strides(shape: Sequence[int]) -> list[int]:
    """Strides of a [N, C, *spatial] tensor stored channels-last (C innermost), size-1 dims included."""
    _, c, *spatial = shape
    strides = [0] * len(shape)
    step = c
    strides[1] = 1
    for i in range(len(spatial) - 1, -1, -1):
        strides[2 + i] = step
        step *= spatial[i]
    strides[0] = step
    return strides


def median_ms(run: Callable[[], None], runs: int = TIMED_RUNS) -> float:
    """Median milliseconds of `runs` calls of `run` on the current stream (CUDA events), after one untimed call."""
    run()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(runs):
        start.record()
        run()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return sorted(times)[len(times) // 2]


class PlanRecord:
    """Chosen plans by name, in a JSON file shared by the processes of a host (one per Triton instance): a key's
    plan is written once it is timed and read at every later build. Writes merge with what others wrote, then
    replace the file atomically, so a reader never sees half a file; two first writes at once lose one choice,
    which is timed again later, never a wrong one."""

    def __init__(self, path: Path | None = None):
        self._path = path

    @property
    def path(self) -> Path:
        return self._path or cache_folder() / RECORD  # read at each use: K4SERVE_CACHE may be set after import

    def _read(self) -> dict[str, str]:
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):  # none yet, or from a process killed before os.replace
            return {}

    def get(self, key: str) -> str | None:
        return self._read().get(key)

    def put(self, key: str, plan_name: str) -> None:
        plans = self._read() | {key: plan_name}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps(plans, indent=1, sort_keys=True))
        partial.replace(self.path)


@dataclass
class TunedPlan:
    index: int  # of the fastest plan
    name: str  # cuDNN's name of it: the engine and its knobs
    workspace: Tensor  # sized for it
    timed: int  # plans built and timed to choose it (0: the recorded one, built alone)


def tune(cudnn: Any, graph: Any, pack: dict, handle: Any, recorded: str | None = None) -> TunedPlan:
    """Build every plan of a defined cuDNN frontend graph, time each on the buffers of `pack` (graph tensor ->
    torch tensor; on the handle's stream) and keep the fastest; or, where the plan named `recorded` is among
    those the heuristics offer, build only it."""
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    count = graph.get_execution_plan_count()
    device = next(iter(pack.values())).device
    names = [graph.get_plan_name_at_index(i) for i in range(count)]
    if recorded in names:
        index = names.index(recorded)
        graph.build_plan_at_index(index)
        size = graph.get_workspace_size_plan_at_index(index)
        return TunedPlan(index, recorded, torch.empty(max(size, 1), device=device, dtype=torch.uint8), 0)
    graph.build_plans(cudnn.build_plan_policy.ALL)
    sizes = [graph.get_workspace_size_plan_at_index(i) for i in range(count)]
    workspace = torch.empty(max([*sizes, 1]), device=device, dtype=torch.uint8)

    def time_plan(index: int) -> float:
        return median_ms(lambda: graph.execute_plan_at_index(pack, workspace, index=index, handle=handle))

    index = fastest_plan(count, time_plan)
    return TunedPlan(index, names[index], workspace[: max(sizes[index], 1)].clone(), count)  # only what it needs


def record_key(x: Tensor, weight: Tensor, padding: Sequence[int], cudnn_version: int) -> str:
    """What a recorded plan choice holds for: the GPU model, the cuDNN library, the conv's shapes and dtype."""
    gpu = torch.cuda.get_device_name(x.device) if x.is_cuda else x.device.type
    return (f"{gpu} | cudnn {cudnn_version} | x {list(x.shape)} w {list(weight.shape)} pad {list(padding)} "
            f"{str(x.dtype).removeprefix('torch.')}")  # fmt: skip


@dataclass
class _ConvPlan:
    graph: object
    x: object  # the graph's tensor handles
    w: object
    y: object
    index: int  # the plan run
    workspace: Tensor
    out_shape: tuple[int, ...]


class CudnnConv:
    """cuDNN frontend conv_fprop graphs, one per (input and weight shapes, padding, dtype, device), each with its
    fastest plan, built on first use."""

    def __init__(self, record: PlanRecord | None = None):
        self._plans: dict[tuple, _ConvPlan] = {}
        self._handles: dict[int, object] = {}
        self.record = record or PlanRecord()

    def __call__(self, x: Tensor, weight: Tensor, padding: Sequence[int]) -> Tensor:
        if not (x.is_contiguous(memory_format=torch.channels_last_3d) and x.dim() == 5):
            raise ValueError(f"x must be [N, C, T, H, W] channels_last_3d; got {tuple(x.shape)} {x.stride()}")
        weight = weight.contiguous(memory_format=torch.channels_last_3d)
        key = (tuple(x.shape), tuple(weight.shape), tuple(padding), x.dtype, x.device.index)
        plan = self._plans.get(key)
        if plan is None:
            if torch.cuda.is_current_stream_capturing():
                raise RuntimeError(f"cuDNN conv plan for {key} must be chosen before the graph capture (a warm-up)")
            plan = self._plans[key] = self._build(x, weight, list(padding))
        out = torch.empty(plan.out_shape, device=x.device, dtype=x.dtype, memory_format=torch.channels_last_3d)
        cudnn, handle = self._cudnn(), self._handle(x.device)
        cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream(x.device).cuda_stream)
        plan.graph.execute_plan_at_index({plan.x: x, plan.w: weight, plan.y: out}, plan.workspace,
                                         index=plan.index, handle=handle)  # fmt: skip
        return out

    @staticmethod
    def _cudnn():
        try:
            return importlib.import_module("cudnn")
        except ImportError as error:
            raise ImportError(f"cuDNN frontend convs need `cudnn`: pip install {PACKAGE} ({error})") from error

    def _handle(self, device: torch.device):
        if device.index not in self._handles:
            self._handles[device.index] = self._cudnn().create_handle()
        return self._handles[device.index]

    def _build(self, x: Tensor, weight: Tensor, padding: list[int]) -> _ConvPlan:
        cudnn = self._cudnn()
        handle = self._handle(x.device)
        cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream(x.device).cuda_stream)
        dtype = {torch.bfloat16: cudnn.data_type.BFLOAT16, torch.float16: cudnn.data_type.HALF,
                 torch.float32: cudnn.data_type.FLOAT}[x.dtype]  # fmt: skip
        fp32 = cudnn.data_type.FLOAT
        graph = cudnn.pygraph(io_data_type=dtype, intermediate_data_type=fp32, compute_data_type=fp32, handle=handle)
        gx = graph.tensor(name="x", dim=list(x.shape), stride=ndhwc_strides(x.shape), data_type=dtype)
        gw = graph.tensor(name="w", dim=list(weight.shape), stride=ndhwc_strides(weight.shape), data_type=dtype)
        gy = graph.conv_fprop(image=gx, weight=gw, padding=padding, stride=[1, 1, 1], dilation=[1, 1, 1],
                              compute_data_type=fp32, name="conv")  # fmt: skip
        out_shape = (x.shape[0], weight.shape[0],
                     *(x.shape[2 + i] + 2 * padding[i] - weight.shape[2 + i] + 1 for i in range(3)))  # fmt: skip
        gy.set_output(True).set_dim(list(out_shape)).set_stride(ndhwc_strides(out_shape)).set_data_type(dtype)
        out = torch.empty(out_shape, device=x.device, dtype=x.dtype, memory_format=torch.channels_last_3d)
        key = record_key(x, weight, padding, cudnn.backend_version())
        tuned = tune(cudnn, graph, {gx: x, gw: weight, gy: out}, handle, self.record.get(key))
        if tuned.timed:
            self.record.put(key, tuned.name)
        return _ConvPlan(graph, gx, gw, gy, tuned.index, tuned.workspace, out_shape)


cudnn_conv = CudnnConv()
