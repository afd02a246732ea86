"""Replaying the whole model as CUDA graphs: one captured graph per batch size.

Why: a frame of the 3-scale model is a few hundred kernel launches (convolutions, slices, maxima,
the scoring head). At batch 1 on a fast GPU the kernels are short enough that launching them from
Python costs a large share of the latency; a graph replays all of them with one launch. The
capture records fixed addresses, so each batch size gets its own graph over a static input buffer,
captured at that size's first call; the graphs share one memory pool (they never run at once: one
stream, one call at a time), and each call copies its outputs out of the graph's buffers, so a
later replay cannot overwrite what a caller holds.
"""
from __future__ import annotations

from typing import Callable

import torch

Outputs = tuple[torch.Tensor, ...]


class GraphedRunner:
    """`fn` (a float (B, ...) CUDA tensor -> a tuple of tensors) replayed as one CUDA graph per B."""

    def __init__(self, fn: Callable[[torch.Tensor], Outputs]):
        self.fn = fn
        self.graphs: dict[tuple[int, ...], tuple[torch.cuda.CUDAGraph, torch.Tensor, Outputs]] = {}
        self.pool = torch.cuda.graph_pool_handle()

    def capture(self, x: torch.Tensor) -> None:
        # Eager first: whatever the model measures on its first call (the dense forms, cuDNN's
        # algorithms) happens outside the capture. Then a warm-up on a side stream, as capture requires.
        self.fn(x)
        static_in = x.clone()
        side = torch.cuda.Stream(x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            self.fn(static_in)
        torch.cuda.current_stream(x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            static_out = self.fn(static_in)
        self.graphs[tuple(x.shape)] = (graph, static_in, static_out)

    def __call__(self, x: torch.Tensor) -> Outputs:
        if tuple(x.shape) not in self.graphs:
            self.capture(x)
        graph, static_in, static_out = self.graphs[tuple(x.shape)]
        static_in.copy_(x)
        graph.replay()
        return tuple(t.clone() for t in static_out)
