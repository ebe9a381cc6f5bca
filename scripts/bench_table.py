"""The README's CPU benchmark tables, printed as Markdown from one ``--benchmark-json`` file.

    pytest benchmarks/ --benchmark-only --benchmark-json=cpu.json && python scripts/bench_table.py cpu.json

Every number is a row's median (``extra_info["median_s"]``, see benchmarks/timing.py) or a ratio of
medians from interleaved rounds of the same run; rows that did not run print as "-".
"""

from __future__ import annotations

import json
import sys


def main(path: str) -> None:
    data = json.load(open(path))
    rows = {b["name"]: b["extra_info"] for b in data["benchmarks"]}
    env = data["benchmarks"][0]["extra_info"]

    def get(name: str, key: str = "median_s", scale: float = 1e3, fmt: str = "{:.0f}") -> str:
        value = rows.get(name, {}).get(key)
        return "-" if value is None else fmt.format(value * scale)

    def ratio(name: str, baseline: str) -> str:
        return get(name, f"ratio_to_{baseline}", 1, "{:.2f}")

    print(f"commit {env['git_commit']} (dirty: {env['git_dirty']}), {env['date']}, torch {env['torch']}, "
          f"{env['threads']} threads, CPU {env['cpu']}\n")

    print("| exact search, 1M x 32 keys | C++ | faiss-cpu `IndexFlatL2` | reference | C++ / faiss |")
    print("|---|---|---|---|---|")
    for q in (1, 4, 16):
        names = [f"test_exact_search[float32-q{q}-k{k}]" for k in (64, 2048)]
        cells = [" / ".join(get(n, key) for n in names) + " ms" for key in ("median_s", "faiss_median_s", "reference_median_s")]
        print(f"| fp32, {q} quer{'y' if q == 1 else 'ies'}, k = 64 / 2048 | " + " | ".join(cells)
              + " | " + " / ".join(ratio(n, "faiss") for n in names) + " |")
    names = [f"test_exact_search[float16-q{q}-k2048]" for q in (1, 4, 16)]
    print("| fp16 keys, 1 / 4 / 16 queries, k = 2048 | " + " / ".join(get(n) for n in names) + " ms | "
          + " / ".join(get(n, "faiss_median_s") for n in names) + " ms (fp32) | | "
          + " / ".join(ratio(n, "faiss") for n in names) + " |")

    print("\n| 1M keys, k = 2048, V = 16384 | C++ | reference | official per-step pattern |")
    print("|---|---|---|---|")
    for op, label in (("knn", "exact search"), ("step", "DAiD step (gather + search + merge + sample)")):
        names = {p: [f"test_{op}[cpu-b{b}-db1M-{p}]" for b in (1, 4)] for p in ("cpp", "reference", "official")}
        cells = [" / ".join(get(n) for n in names[p]) + " ms (" + "x / ".join(ratio(n, "official") for n in names[p])
                 + "x official)" for p in ("cpp", "reference")]
        print(f"| {label}, batch 1 / 4 (`bench_retrieval_ops` `{op}`) | " + " | ".join(cells) + " | "
              + " / ".join(get(n) for n in names["official"]) + " ms |")
    names = [f"test_daid_step[{b}]" for b in (1, 4, 16)]
    print("| DAiD step, batch 1 / 4 / 16 (`bench_cpu_ext`) | " + " / ".join(get(n) for n in names) + " ms | "
          + " / ".join(get(n, "reference_median_s") for n in names) + " ms | |")

    print("\n| building from images, 24 x 24 grid, 16384 codes, batch 16 | library | previous path (HF quantizer) | speed-up | peak MiB, library / previous |")
    print("|---|---|---|---|---|")
    for case, label in (("tiny-vq-384px", "tiny VQ encoder (32 channels), 384 px, 16 images"),
                        ("tiny-vq-192px", "tiny VQ encoder, 192 px, 16 images"),
                        ("janus-pro-vq-384px", "Janus-Pro's VQ encoder (128 channels), 384 px, 1 image")):
        n = f"test_build_from_images[{case}]"
        speed = get(n, f"ratio_to_hf_quantizer", 1, "{:.3f}")
        speed = "-" if speed == "-" else f"{1 / float(speed):.2f}x"
        print(f"| {label} | {get(n, 'keys_per_s', 1)} keys/s | {get(n, 'hf_quantizer_keys_per_s', 1)} keys/s | {speed} | "
              f"{get(n, 'peak_mib', 1)} / {get(n, 'hf_quantizer_peak_mib', 1)} |")

    print("\n| case | number |")
    print("|---|---|")
    for case, label in (("tiny-cpu-b1-dynamic-daid-db20k", "batch 1, dynamic loop, DAiD"),
                        ("tiny-cpu-b4-static-daid-db20k", "batch 4, static loop, DAiD"),
                        ("tiny-cpu-b4-static-daid-overlap-db20k", "batch 4, static loop, DAiD with overlapped retrieval"),
                        ("tiny-cpu-b4-static-faid-db20k", "batch 4, static loop, FAiD")):
        n = f"test_decode[{case}]"
        print(f"| tiny random Janus (8 x 8 grid, hidden 64), 20k keys, {label}: time / the same loop without retrieval "
              f"(interleaved) | {get(n)} / {get(n, 'plain_median_s')} ms ({ratio(n, 'plain')}x) |")
    n = "test_faid_blend_step[cpu-small]"
    print(f"| FAiD blend step (D = 64, K = 10, batch 4): affine form vs literal convolutions | {get(n, fmt='{:.1f}')} ms "
          f"vs {get(n, 'literal_median_s', fmt='{:.1f}')} ms |")
    names = [f"test_faid_train_step[cpu-tiny-{p}]" for p in ("literal", "dense", "dense-ckpt")]
    print("| FAiD training step, peak memory above the weights, literal / ours / ours with `activation_checkpointing` "
          "(tiny model D = 64, 2 layers, 24x24, K = 10, B = 2, fp32) | "
          + " / ".join(get(n, "peak_bytes", 2**-20) for n in names) + " MiB |")
    names = [f"test_cpu_ivfpq[N100k-nprobe{p}]" for p in (8, 128)]
    print("| IVF-PQ, 100k keys, nlist 256, batch 16, k = 2048, nprobe 8 / 128: faiss-cpu (every CPU IVF-PQ search) / "
          f"PyTorch scan interleaved / exact C++ | {' / '.join(get(n, fmt='{:.1f}') for n in names)} ms / "
          f"{' / '.join(get(n, 'torch_reference_median_s', fmt='{:.0f}') for n in names)} ms / "
          f"{get('test_cpu_exact[N100k]', fmt='{:.1f}')} ms |")

    n = "test_import_time"
    print(f"\n`import arrag_kernels` (fresh process): {get(n, scale=1, fmt='{:.2f}')} s; `import torch` alone, "
          f"interleaved: {get(n, 'torch_median_s', 1, '{:.2f}')} s; the package's share: "
          f"{get(n, 'package_share_s', 1, '{:.2f}')} s.")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/bench_table.py RESULTS.json  (from pytest benchmarks/ --benchmark-json=...)")
    main(sys.argv[1])
