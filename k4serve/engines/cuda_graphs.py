"""One CUDA graph per static-shape bucket: the capture and replay that the fast engines share."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor


class CapturedGraph:
    """`fn` over static input buffers, warmed up on a side stream, then captured as one CUDA graph.

    A call copies its inputs into the buffers (casting to their dtype), replays, and returns a copy of the
    output, since the next replay overwrites it. Engines pass one `pool` for all their buckets: only one
    replays at a time, so their scratch memory can overlap.
    """

    def __init__(self, fn: Callable[..., Tensor], example_inputs: Sequence[Tensor], pool=None, warmup: int = 2):
        self.inputs = tuple(example_inputs)
        stream = torch.cuda.Stream()  # warm-up off the default stream, as graph capture requires
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.output = fn(*self.inputs)

    def __call__(self, *inputs: Tensor) -> Tensor:
        for static, given in zip(self.inputs, inputs, strict=True):
            static.copy_(given)
        self.graph.replay()
        return self.output.clone()
