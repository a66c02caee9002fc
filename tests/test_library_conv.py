"""The cuDNN frontend convs of the fast VAE (k4serve.kernels.library_conv): the plan choice on the CPU, the convs
on a GPU with the package against torch's float32 conv3d."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from k4serve.engines.vae import FastVAEDecoder
from k4serve.kernels import library_conv
from k4serve.kernels.conv_bias import conv3d_channels_last
from k4serve.models.cogvideox_vae import build_cogvideox_decoder

REASON = library_conv.unavailable_reason("cuda")
needs_cudnn = pytest.mark.skipif(REASON is not None, reason=str(REASON))


def test_fastest_plan_skips_plans_that_fail_and_takes_the_smallest_time():
    times = {0: 3.0, 1: None, 2: 1.5, 3: 2.0}

    def time_plan(index: int) -> float:
        if times[index] is None:
            raise RuntimeError("CUDNN_STATUS_NOT_SUPPORTED")
        return times[index]

    assert library_conv.fastest_plan(4, time_plan) == 2
    with pytest.raises(RuntimeError, match="none of the 2 cuDNN plans ran: plan 0: ValueError: no"):
        library_conv.fastest_plan(2, lambda index: (_ for _ in ()).throw(ValueError("no")))


@pytest.mark.parametrize("shape", [(2, 8, 5, 6, 7), (1, 128, 10, 48, 84), (3, 16, 4, 5)])
def test_ndhwc_strides_are_torchs_channels_last_strides(shape):
    layout = torch.channels_last_3d if len(shape) == 5 else torch.channels_last
    assert library_conv.ndhwc_strides(shape) == list(torch.empty(shape, memory_format=layout).stride())


def test_the_cpu_has_no_cudnn_frontend_convs_and_the_engine_says_why():
    if torch.cuda.is_available():
        pytest.skip("a CPU-only check")
    assert "CUDA GPU" in library_conv.unavailable_reason("cpu")
    decoder, _ = build_cogvideox_decoder("tiny")
    assert FastVAEDecoder(decoder).convs == "torch"  # the default
    with pytest.raises(ValueError, match="convs='cudnn': cuDNN frontend convs need a CUDA GPU"):
        FastVAEDecoder(decoder, convs="cudnn")
    with pytest.raises(ValueError, match="choose one of \\('torch', 'cudnn'\\)"):
        FastVAEDecoder(decoder, convs="cudnn-fp8")


def test_an_unknown_conv_backend_is_refused_with_the_choices():
    x = torch.zeros(1, 2, 3, 4, 4).contiguous(memory_format=torch.channels_last_3d)
    with pytest.raises(ValueError, match="conv backend 'cudnn-fp8': choose one of \\('torch', 'cudnn'\\)"):
        conv3d_channels_last(x, torch.zeros(2, 2, 3, 3, 3), None, (0, 1, 1), backend="cudnn-fp8")


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


@needs_cudnn
@pytest.mark.gpu
@pytest.mark.parametrize(
    "x_shape, w_shape, padding",
    [((1, 64, 6, 20, 36), (64, 64, 3, 3, 3), (0, 1, 1)),  # a causal conv: time pre-padded
     ((2, 32, 3, 9, 11), (16, 32, 1, 3, 3), (0, 1, 1)),  # the upsampler's per-frame conv, odd sizes, batch 2
     ((1, 48, 4, 8, 8), (24, 48, 1, 1, 1), (0, 0, 0))],  # a shortcut 1x1x1
)  # fmt: skip
def test_cudnn_convs_equal_torchs_float32_conv_up_to_bf16_rounding(x_shape, w_shape, padding):
    torch.manual_seed(0)
    x = torch.randn(x_shape, device="cuda").contiguous(memory_format=torch.channels_last_3d)
    w = (torch.randn(w_shape, device="cuda") / w_shape[1] ** 0.5).contiguous(memory_format=torch.channels_last_3d)
    torch.backends.cudnn.allow_tf32 = False
    try:
        reference = F.conv3d(x, w, padding=padding)
    finally:
        torch.backends.cudnn.allow_tf32 = True
    xb, wb = x.bfloat16(), w.bfloat16()
    bias = torch.randn(w_shape[0], device="cuda", dtype=torch.bfloat16)
    out = conv3d_channels_last(xb, wb, bias, padding, backend="cudnn")
    expected = conv3d_channels_last(xb, wb, bias, padding, backend="torch")
    assert out.shape == reference.shape and out.is_contiguous(memory_format=torch.channels_last_3d)
    # both round the same bf16 operands' products once to bf16: equal error against float32
    torch_error = relative_error(expected, reference + bias.float().view(1, -1, 1, 1, 1))
    assert relative_error(out, reference + bias.float().view(1, -1, 1, 1, 1)) < max(1.2 * torch_error, 4e-3)
    # the chosen plan is cached: a second call of the same shape reuses it and gives the same values
    assert torch.equal(conv3d_channels_last(xb, wb, bias, padding, backend="cudnn"), out)


@needs_cudnn
@pytest.mark.gpu
def test_a_new_conv_shape_inside_a_graph_capture_is_refused():
    x = torch.randn(1, 8, 3, 5, 5, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last_3d)
    w = torch.randn(8, 8, 3, 3, 3, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last_3d)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream), pytest.raises(RuntimeError, match="before the graph capture"):
        with torch.cuda.graph(torch.cuda.CUDAGraph(), stream=stream):
            library_conv.cudnn_conv(x, w, (0, 1, 1))


@needs_cudnn
@pytest.mark.gpu
def test_the_engine_with_cudnn_convs_matches_torchs_convs_and_replays_exactly():
    decoder, _ = build_cogvideox_decoder("cogvideox-5b", "cuda", torch.bfloat16, seed=4)
    decoder.use_triton_norms()
    z = torch.randn(
        1, 16, 5, 6, 8, device="cuda", dtype=torch.bfloat16, generator=torch.Generator("cuda").manual_seed(5)
    )
    fast = FastVAEDecoder(decoder, convs="cudnn")
    video = fast.decode(z)
    expected = FastVAEDecoder(decoder, convs="torch").decode(z)
    assert relative_error(video, expected) < 2e-2  # two bf16 decodes: different conv kernels and roundings
    assert torch.equal(fast.decode(z), video)
    assert torch.equal(FastVAEDecoder(decoder, cuda_graphs=False, convs="cudnn").decode(z), video)


class FakeGraph:
    """The cuDNN frontend graph calls that `tune` makes, over plans with given names and times (ms)."""

    def __init__(self, plans: dict[str, float], clock: list[float]):
        self.names, self.times, self.clock = list(plans), list(plans.values()), clock
        self.built: list[int] = []

    def validate(self): ...
    def build_operation_graph(self): ...
    def create_execution_plans(self, modes): ...
    def check_support(self): ...

    def get_execution_plan_count(self) -> int:
        return len(self.names)

    def get_plan_name_at_index(self, index: int) -> str:
        return self.names[index]

    def build_plans(self, policy):
        self.built = list(range(len(self.names)))

    def build_plan_at_index(self, index: int):
        self.built.append(index)

    def get_workspace_size_plan_at_index(self, index: int) -> int:
        assert index in self.built, "a workspace size is asked of a plan that was not built"
        return 16 * (index + 1)

    def execute_plan_at_index(self, pack, workspace, index, handle):
        assert index in self.built and workspace.numel() >= 16 * (index + 1)
        self.clock.append(self.times[index])  # what a timed run of it takes


class FakeCudnn:
    class heur_mode:
        A = FALLBACK = None

    class build_plan_policy:
        ALL = None


def test_tune_times_every_plan_then_builds_only_the_recorded_one(monkeypatch):
    plans = {"eng0_k2=1": 3.0, "eng4_k3=2": 1.0, "eng7": 2.0}
    clock = []
    monkeypatch.setattr(library_conv, "median_ms", lambda run: (run(), clock[-1])[1])
    pack = {"x": torch.zeros(2)}
    tuned = library_conv.tune(FakeCudnn, FakeGraph(plans, clock), pack, handle=None)
    assert (tuned.index, tuned.name, tuned.timed, tuned.workspace.numel()) == (1, "eng4_k3=2", 3, 32)

    again = FakeGraph(plans, clock)
    tuned = library_conv.tune(FakeCudnn, again, pack, handle=None, recorded="eng7")
    assert (tuned.index, tuned.name, tuned.timed, again.built, tuned.workspace.numel()) == (2, "eng7", 0, [2], 48)
    # a recorded plan the heuristics no longer offer (another cuDNN): every plan is timed again
    tuned = library_conv.tune(FakeCudnn, FakeGraph(plans, clock), pack, handle=None, recorded="eng9")
    assert (tuned.name, tuned.timed) == ("eng4_k3=2", 3)


def test_plan_records_merge_across_writers_and_survive_a_torn_file(tmp_path, monkeypatch):
    first, second = library_conv.PlanRecord(tmp_path / "plans.json"), library_conv.PlanRecord(tmp_path / "plans.json")
    first.put("H200 | conv a", "eng1")
    second.put("H200 | conv b", "eng2")  # another process: keeps what the first wrote
    assert [first.get(key) for key in ("H200 | conv a", "H200 | conv b", "H100 | conv a")] == ["eng1", "eng2", None]
    (tmp_path / "plans.json").write_text('{"H200 | conv a": "en')
    assert first.get("H200 | conv a") is None  # timed again, never a wrong plan
    monkeypatch.setenv("K4SERVE_CACHE", str(tmp_path / "cache"))
    library_conv.PlanRecord().put("k", "eng3")  # the default path follows K4SERVE_CACHE at use
    assert (tmp_path / "cache" / library_conv.RECORD).is_file()


@needs_cudnn
@pytest.mark.gpu
def test_a_recorded_plan_gives_the_same_conv_in_a_new_process(tmp_path):
    layout = torch.channels_last_3d
    x = torch.randn(1, 32, 5, 12, 20, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=layout)
    w = torch.randn(32, 32, 3, 3, 3, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=layout)
    record = library_conv.PlanRecord(tmp_path / "plans.json")
    out = library_conv.CudnnConv(record)(x, w, (0, 1, 1))
    ((key, name),) = json.loads(record.path.read_text()).items()
    assert torch.cuda.get_device_name() in key and "x [1, 32, 5, 12, 20]" in key and name
    assert torch.equal(library_conv.CudnnConv(record)(x, w, (0, 1, 1)), out)  # a new CudnnConv: as a new process
