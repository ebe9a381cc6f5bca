"""Every Triton kernel of the library compiled for sm_90 (H100 / H200) on a machine without a GPU, at the
launch configurations the GPU check (scripts/gpu_check.sh) runs: what the interpreter cannot show
(the compiler's refusals, register spills, shared memory) is seen before a GPU session is spent on it.

    python -m tests.sm90 [--cases knn-b16,faid-b16] [--json out.json]
    python -m tests.sm90 --warm [--workers 12]   # on the GPU machine: fill the Triton cache in parallel

Each case calls an op's Triton entry point with CPU tensors of the GPU shapes (nothing runs: every
module's ``launch`` is replaced by a recorder), then each distinct kernel specialisation is bound
by Triton's own JIT binder for an sm_90 target (the signature, constexprs and alignment attributes a
GPU launch would get) and compiled. ptxas reports registers and spills of the kernels in ``PTXAS``.
Run without TRITON_INTERPRET (the interpreter is chosen when kernels are defined): tests/test_sm90.py
runs this in a subprocess.

``--warm`` compiles every case in worker processes into the Triton cache (``TRITON_CACHE_DIR``) of this
machine, without reports: the GPU check runs it in the background while its first stage sets up, so the
stages' first launches find their kernels compiled (an sm_90 GPU's launch binds the same source,
signature, constants, attributes and options, hence the same cache key). It only adds cache entries: a
failed or slow warm-up leaves every launch compiling as before.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import torch
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile as triton_compile, make_backend
from triton.runtime.jit import create_function_from_signature

from arrag_kernels.ops._triton import daid, faid, ivfpq, knn, neighborhood

MODULES = (daid, faid, ivfpq, knn, neighborhood)
TARGET = GPUTarget("cuda", 90, 32)
SMEM_LIMIT = 227 * 1024  # sm_90's shared memory per block (opt-in maximum)
# The bandwidth-bound kernels, whose spills would cost key reads: ptxas reports their registers and spills.
PTXAS = ("_knn_filter_kernel", "_ivfpq_filter_kernel", "_knn_sample_kernel", "_ivfpq_sample_kernel")

# The GPU check's shapes (benchmarks/shapes.py, bench_decode_step.py, bench_search_floor.py, bench_ivfpq.py)
KEYS, DIM, K_DAID, K_FAID = 10_000_000, 32, 2048, 10
HIDDEN, CELLS, CODEBOOK, GRID = 2048, 12, 16384, 24  # Janus-Pro-1B; FAiD hops 1+2: 12 causal window cells
IVF_CANDIDATES, NPROBE = 32 * -(-100_000_000 // 800), 32  # 100M entries over 800 lists


def _empty(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype)  # never touched: untouched pages cost no memory


def _knn(batch, k, dtype=torch.float16, values=True, queries=torch.float32, keys=KEYS):
    """fp32 queries: ``knn`` as the search benchmark calls it; ``queries=dtype``: ``PatchDatabase.retrieve`` (its
    exact search casts the queries to the keys' dtype)."""
    table = _empty(keys, DIM, dtype=dtype)
    return lambda: knn.knn_search(_empty(batch, DIM, dtype=queries), table, k,
                                  _empty(keys, dtype=torch.int64) if values else None)


def _ivfpq(batch, values):
    nlist, m = 800, 8
    lists = torch.arange(NPROBE).repeat(batch, 1)
    offsets = torch.arange(nlist + 1) * (IVF_CANDIDATES // NPROBE)  # every list IVF_CANDIDATES / NPROBE long
    n = int(offsets[-1])
    return lambda: ivfpq.ivfpq_scan_search(
        lists, _empty(batch, NPROBE), _empty(batch, m, 256), _empty(nlist, m, 256), _empty(n, m, dtype=torch.uint8),
        _empty(n, dtype=torch.int64), offsets, K_DAID, IVF_CANDIDATES, _empty(n, dtype=torch.int64) if values else None)


def _faid(batch, dtype=torch.bfloat16):
    D = HIDDEN
    return lambda: faid.faid_blend_op(_empty(batch, CELLS, D, dtype=dtype), _empty(batch, K_FAID, D, dtype=dtype),
                                      _empty(CELLS, D, D, dtype=dtype), _empty(D, D, dtype=dtype),
                                      _empty(D, dtype=dtype), _empty(D, D, dtype=dtype), _empty(D, dtype=dtype),
                                      _empty(D, dtype=dtype), _empty(1, dtype=dtype))


def _daid(batch, k, dtype=torch.bfloat16):
    """The decode step's fused CFG + DAiD + sampling (k = 1, lam = 0: the plain step's padding hit)."""
    return lambda: daid.daid_sample_op(_empty(2 * batch, CODEBOOK, dtype=dtype), _empty(batch, k),
                                       torch.zeros(batch, k, dtype=torch.int64), torch.ones(batch, dtype=torch.bool),
                                       _empty(batch), 5.0, 1.0, 0.05 if k > 1 else 0.0, 0.6, False)


def _neighbors(batch, radius):
    return lambda: neighborhood.neighbor_keys_op(torch.zeros(batch, GRID * GRID, dtype=torch.int64),
                                                 _empty(CODEBOOK, 8), torch.zeros(batch, 1, dtype=torch.int64),
                                                 GRID, GRID, radius, True, True)


CASES = {
    "knn-b16": _knn(16, K_DAID), "knn-b1": _knn(1, K_DAID), "knn-b16-1M": _knn(16, K_DAID, keys=KEYS // 10),
    "knn-b16-decode": _knn(16, K_DAID, queries=torch.float16), "knn-b1-decode": _knn(1, K_DAID, queries=torch.float16),
    "knn-b16-1M-decode": _knn(16, K_DAID, queries=torch.float16, keys=KEYS // 10),
    "knn-b16-faid": _knn(16, K_FAID, queries=torch.float16), "knn-b1-faid": _knn(1, K_FAID, queries=torch.float16),
    "knn-b16-plain": _knn(16, K_DAID, values=False),
    "knn-b16-bf16": _knn(16, K_DAID, torch.bfloat16), "knn-b16-fp32": _knn(16, K_DAID, torch.float32),
    "ivfpq-b16": _ivfpq(16, False), "ivfpq-b16-values": _ivfpq(16, True),
    "faid-b16": _faid(16), "faid-b1": _faid(1), "faid-b16-fp16": _faid(16, torch.float16),
    "daid-b16": _daid(16, K_DAID), "daid-b1": _daid(1, K_DAID), "daid-b16-plain": _daid(16, 1),
    "neighbors-hop1": _neighbors(16, 1), "neighbors-hops12": _neighbors(16, 2),
}


def record(case) -> list:
    """(kernel, args, meta) of every launch ``case()`` makes, nothing launched."""
    launches = []
    originals = {m: m.launch for m in MODULES}
    for m in MODULES:
        m.launch = lambda kernel, grid, *args, **meta: launches.append((kernel, args, meta))
    try:
        case()
    finally:
        for m, launch in originals.items():
            m.launch = launch
    return launches


def bind(kernel, args, meta):
    """What a launch on an sm_90 GPU would compile: (cache key, ASTSource, options), by Triton's binder."""
    backend = make_backend(TARGET)
    kwargs = dict(meta, debug=knobs.runtime.debug, instrumentation_mode=knobs.compilation.instrumentation_mode)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    key = (kernel.fn.__name__, repr(signature), repr(sorted(constexprs.items())), repr(sorted(attrs.items())),
           repr(sorted(options.__dict__.items())))
    return key, ASTSource(kernel, signature, constexprs, attrs), options


def ptxas_report(ptx: str) -> dict:
    """Registers and spill bytes of the kernel in ``ptx``, from ``ptxas -v``."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        run = subprocess.run([get_ptxas(TARGET.arch).path, "-v", "--gpu-name=sm_90a", src, "-o", os.path.join(tmp, "k.o")],
                             capture_output=True, text=True, check=True)
    log = run.stdout + run.stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
    return {"registers": int(regs.group(1)) if regs else None, "spill_bytes": sum(spills)}


def compile_cases(names) -> list[dict]:
    """One row per distinct kernel specialisation of the cases ``names``: case, kernel, seconds, shared."""
    rows, seen = [], set()
    for name in names:
        for kernel, args, meta in record(CASES[name]):
            key, src, options = bind(kernel, args, meta)
            if key in seen:
                continue
            seen.add(key)
            t0 = time.perf_counter()
            compiled = triton_compile(src, target=TARGET, options=options.__dict__)
            row = {"case": name, "kernel": kernel.fn.__name__, "seconds": round(time.perf_counter() - t0, 2),
                   "shared_bytes": compiled.metadata.shared, "num_warps": options.num_warps}
            if row["kernel"] in PTXAS:
                row.update(ptxas_report(compiled.asm["ptx"]))
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def warm(name: str) -> tuple[str, float]:
    """Compile case ``name``'s kernels into this process's Triton cache (a worker of ``--warm``)."""
    t0 = time.perf_counter()
    for kernel, args, meta in record(CASES[name]):
        _, src, options = bind(kernel, args, meta)
        triton_compile(src, target=TARGET, options=options.__dict__)
    return name, time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of: {', '.join(CASES)}")
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument("--warm", action="store_true", help="compile into the Triton cache in parallel, no reports")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 4), help="processes of --warm")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        p.error("unset TRITON_INTERPRET: the kernels must be defined for the compiler, not the interpreter")
    names = args.cases.split(",")
    unknown = [n for n in names if n not in CASES]
    if unknown:
        p.error(f"unknown cases {unknown}")
    if args.warm:
        import concurrent.futures
        import multiprocessing

        t0 = time.perf_counter()
        # spawn: the workers must not inherit a process that may have touched the CUDA driver
        with concurrent.futures.ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for name, seconds in pool.map(warm, names):
                print(f"warm: {name} {seconds:.1f} s", flush=True)
        print(f"warm: {len(names)} cases in {time.perf_counter() - t0:.0f} s into {knobs.cache.dir}", flush=True)
        return 0
    knobs.cache.dir = tempfile.mkdtemp(prefix="sm90-cache-")  # cold compiles, nothing reused between runs
    rows = compile_cases(names)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print(f"{len(rows)} kernel specialisations, {sum(r['seconds'] for r in rows):.0f} s of compilation",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
