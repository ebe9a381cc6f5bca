"""Memory accounting for measurements (tests and benchmarks): bytes autograd saves for backward, what
the allocator of a device retains and peaks at while a function runs, and a process's peak resident memory."""

from __future__ import annotations

import gc

import torch


def saved_activation_bytes(fn, exclude=()) -> tuple[object, int]:
    """Run ``fn()`` and count the bytes autograd saves for backward (activation memory).

    Each storage counts once, whole (a saved view keeps its base alive); storages of the tensors in
    ``exclude`` do not count (pass the model's and the blenders' parameters: ops save weights by
    reference, which costs no memory).
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen = set()
    total = 0

    def pack(t):
        nonlocal total
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in skip and key not in seen:
            seen.add(key)
            total += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total


def allocated_bytes(fn, device="cpu") -> tuple[object, int, int]:
    """Run ``fn()`` and account the allocator of ``device``: ``(out, retained, peak)`` with ``retained``
    the bytes allocated during ``fn`` and still alive after it (for a forward: everything the graph
    keeps, checkpoint inputs included) and ``peak`` the highest allocation above the start.

    CUDA reads the caching allocator's statistics; CPU replays the profiler's allocation events
    (slow for many small ops; meant for measurements, not training). The profiler cannot see the
    release of a block allocated while no profile ran: such a release counts as still allocated
    (an overestimate), so garbage is collected first.
    """
    device = torch.device(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        return out, torch.cuda.memory_allocated(device) - start, torch.cuda.max_memory_allocated(device) - start
    if device.type != "cpu":
        raise ValueError(f"allocated_bytes: expected a cpu or cuda device, got {device}")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    current = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        current += e.nbytes()
        peak = max(peak, current)
    return out, current, peak


def process_memory() -> dict[str, int]:
    """This process's memory in bytes: ``peak_rss_bytes`` (``VmHWM``, the kernel's high-water mark of its
    resident pages), ``rss_anon_bytes`` / ``rss_file_bytes`` (resident now: its own memory / mapped files,
    page cache the kernel can take back) and ``ru_maxrss_bytes`` from ``getrusage``, which on Linux can carry
    the launcher's peak over fork + exec (a torchrun worker then reports at least its agent's). Off Linux
    the /proc fields fall back to ``ru_maxrss`` (peak) and 0."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    try:
        with open("/proc/self/status") as status:
            fields = dict(line.split(":", 1) for line in status if ":" in line)
        kib = {name: int(fields[name].split()[0]) * 1024 for name in ("VmHWM", "RssAnon", "RssFile")}
    except (OSError, KeyError, ValueError):
        kib = {"VmHWM": ru, "RssAnon": 0, "RssFile": 0}
    return {"peak_rss_bytes": kib["VmHWM"], "rss_anon_bytes": kib["RssAnon"], "rss_file_bytes": kib["RssFile"],
            "ru_maxrss_bytes": ru}


def peak_memory_mib() -> dict[str, float]:
    """:func:`process_memory`'s two peaks in MiB: ``peak_rss_mib`` (``VmHWM``) and ``ru_maxrss_mib``."""
    memory = process_memory()
    return {"peak_rss_mib": memory["peak_rss_bytes"] / 2**20, "ru_maxrss_mib": memory["ru_maxrss_bytes"] / 2**20}
