"""Streams of an overlapped decode: the DAiD search's side stream below the forward's priority, on CPU
(the creation logic, CUDA's stream class replaced by a recorder) and on CUDA (the priorities the
device gives, and that a captured CUDA graph keeps them per kernel)."""

import re

import pytest
import torch

from arrag_kernels.decoding import step as step_module
from arrag_kernels.decoding.step import overlap_streams

CUDA = torch.cuda.is_available()


class _RecordedStream:
    """Stands in for ``torch.cuda.Stream``: remembers how it was made."""

    def __init__(self, device=None, priority=0):
        self.device, self.priority = device, priority


def test_side_stream_below_the_forward_priority(monkeypatch):
    """The search's stream is asked for a strictly lower priority (a larger number) than the forward's,
    the forward's for a higher one than the default stream's 0, so it is above every other stream."""
    monkeypatch.setattr(step_module.torch.cuda, "Stream", _RecordedStream)
    forward, side = overlap_streams("cuda:0")
    assert isinstance(forward, _RecordedStream) and isinstance(side, _RecordedStream) and forward is not side
    assert forward.device == side.device == "cuda:0"
    assert forward.priority < side.priority
    assert forward.priority < 0  # above the default stream, which the caller's other work runs on
    assert side.priority >= 0  # CUDA's lowest priority is 0: never above the default stream


@pytest.mark.skipif(not CUDA, reason="stream priorities and CUDA graphs need a CUDA device")
def test_device_priorities_differ():
    """The device clamps the asked priorities into its range; they must stay apart."""
    forward, side = overlap_streams(torch.device("cuda"))
    assert forward.priority < side.priority, (forward.priority, side.priority)


@pytest.mark.skipif(not CUDA, reason="stream priorities and CUDA graphs need a CUDA device")
def test_priorities_survive_graph_capture(tmp_path):
    """A graph captured on the forward stream with a fork to the side stream keeps each kernel's
    priority: the verbose DOT dump of the graph lists the kernel nodes' priority attributes."""
    forward, side = overlap_streams(torch.device("cuda"))
    a = torch.zeros(1 << 20, device="cuda")
    b = torch.zeros(1 << 20, device="cuda")
    graph = torch.cuda.CUDAGraph()
    graph.enable_debug_mode()
    forward.wait_stream(torch.cuda.current_stream())
    with torch.cuda.graph(graph, stream=forward):
        side.wait_stream(forward)
        with torch.cuda.stream(side):
            b.mul_(3.0)
        a.add_(1.0)
        forward.wait_stream(side)
    path = tmp_path / "graph.dot"
    graph.debug_dump(str(path))
    graph.replay()
    torch.cuda.synchronize()
    assert float(a[0]) == 1.0
    text = path.read_text()
    found = {int(p) for p in re.findall(r"priority\D{0,8}?(-?\d+)", text, flags=re.IGNORECASE)}
    assert found, f"the graph dump names no kernel priorities (CUDA {torch.version.cuda}):\n{text[:2000]}"
    assert {forward.priority, side.priority} <= found, (found, forward.priority, side.priority)
