"""A synthetic database of the official layout built in parts, one process per step, each with bounded memory.

Used by tests/test_scale.py (small in the default suite, >= 50M entries under ``-m scale``) and
benchmarks/bench_scale.py. :func:`run` drives the steps, each a separate process
(``python -m tests.scale_build STEP WORK_DIR``) that writes ``WORK_DIR/stats/<step>.json`` with its
time and its memory: the peak RSS (``VmHWM``, the kernel's high-water mark of the process's own pages,
mapped file pages included) and, at the end, the anonymous and the file-backed resident pages
(``RssAnon``, ``RssFile``). ``getrusage``'s ``ru_maxrss`` is recorded too, but on Linux it starts from
the parent's RSS at the fork (it survives ``exec``), so a small step launched by a big parent (pytest
with torch) reports the parent's size. A search of the on-disk database maps the pages it reads (the
probed lists, the hit tokens: the kernel maps the cached folio around each, here ~180 KB per random
token): clean page cache, which the kernel takes back under memory pressure, but counted in VmHWM:

1. ``train``: OPQ + IVF-PQ (M = 8, 8 bits, 32-d keys) trained on a sample -> ``parts/trained.index``;
2. ``part-<r>``, one process per part: part r's chunks of keys, each generated from (seed, chunk)
   (never all at once), added to the trained index and saved as part r (ids local, meta.part set);
   then ``parts.json`` (:mod:`arrag_kernels.retrieval.parts`);
3. ``merge``: :func:`arrag_kernels.retrieval.ondisk.merge_parts` -> the on-disk database ``merged``;
4. ``search-merged``: ``PatchDatabase.load(merged)``, the queries searched (faiss-cpu, mapped lists);
5. ``shard-<r>``, one process per part: the parts kept as shards, each loaded and searched alone, its
   local ids shifted to global; the caller merges the shards' top-k by distance (shard order breaks ties);
6. ``one-piece``: the reference, every chunk added in id order to one in-memory index (the whole
   index in one process, which the other steps avoid), searched with the same queries.

Hits go to ``WORK_DIR/hits/<step>.npz`` (distances, ids, tokens) and are compared by :func:`check_hits`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from arrag_kernels.profiling import process_memory

DIM, M, NBITS, CODEBOOK = 32, 8, 8, 16384  # the official layout: 4 x 8-d neighbour keys, Janus-Pro's codebook
BYTES_PER_ENTRY = M + 8 + 4  # PQ code + id + int32 token


@dataclass(frozen=True)
class Config:
    entries: int
    parts: int
    nlist: int
    chunk: int = 250_000  # entries generated and added at a time
    train_size: int = 100_000
    queries: int = 32
    k: int = 64
    nprobe: int = 8
    seed: int = 0
    opq_iterations: int = 50  # faiss's default; small tests use fewer (training time, not the comparison, changes)

    def __post_init__(self):
        if not 1 <= self.parts <= self.chunks:
            raise ValueError(f"parts = {self.parts}: expected 1 <= parts <= chunks = {self.chunks} (entries / chunk)")

    @property
    def chunks(self) -> int:
        return -(-self.entries // self.chunk)

    def chunk_range(self, c: int) -> tuple[int, int]:
        return c * self.chunk, min((c + 1) * self.chunk, self.entries)

    def part_chunks(self, r: int) -> range:
        return range(r * self.chunks // self.parts, (r + 1) * self.chunks // self.parts)


# The default suite's version and the >= 50M-entry one (tests/test_scale.py, benchmarks/bench_scale.py).
SMALL = Config(entries=40_000, parts=4, nlist=32, chunk=5_000, train_size=10_000, queries=16, k=32, nprobe=4,
               opq_iterations=4)
LARGE = Config(entries=50_000_000, parts=16, nlist=1024, chunk=250_000, train_size=100_000, queries=16, k=64,
               nprobe=8)


def chunk_keys(cfg: Config, c: int) -> tuple[np.ndarray, np.ndarray]:
    """Chunk c's keys (n, 32) float32 and token ids (n,) int32, from (seed, c) alone."""
    lo, hi = cfg.chunk_range(c)
    rng = np.random.default_rng([cfg.seed, 0, c])
    keys = rng.standard_normal((hi - lo, DIM), dtype=np.float32)
    return keys, rng.integers(0, CODEBOOK, hi - lo, dtype=np.int32)


def queries(cfg: Config) -> np.ndarray:
    return np.random.default_rng([cfg.seed, 2]).standard_normal((cfg.queries, DIM), dtype=np.float32)


def _meta(cfg: Config, part=None, entries=None):
    from arrag_kernels.config import KeyLayout
    from arrag_kernels.retrieval import DatabaseMeta

    return DatabaseMeta(layout=KeyLayout(), codebook_size=CODEBOOK, embed_dim=DIM // 4, grid=(24, 24),
                        key_source="latent", model_fingerprint="synthetic", num_images=entries or cfg.entries,
                        index="ivfpq", part=part)


def _save_hits(work: Path, step: str, dist, ids, tokens) -> None:
    (work / "hits").mkdir(exist_ok=True)
    np.savez(work / "hits" / f"{step}.npz", distances=np.asarray(dist), ids=np.asarray(ids), tokens=np.asarray(tokens))


def step_train(cfg: Config, work: Path) -> dict:
    import faiss

    from arrag_kernels.retrieval.faiss_index import make_ivfpq_index

    sample = np.random.default_rng([cfg.seed, 1]).standard_normal((cfg.train_size, DIM), dtype=np.float32)
    index = make_ivfpq_index(DIM, cfg.nlist, M, NBITS)
    faiss.downcast_VectorTransform(index.chain.at(0)).niter = cfg.opq_iterations
    index.train(sample)
    (work / "parts").mkdir(parents=True, exist_ok=True)
    faiss.write_index(index, str(work / "parts" / "trained.index"))
    return {}


def step_part(cfg: Config, work: Path, r: int) -> dict:
    import faiss
    import torch

    from arrag_kernels import PatchDatabase
    from arrag_kernels.retrieval import parts
    from arrag_kernels.retrieval.meta import PartOf

    index = faiss.read_index(str(work / "parts" / "trained.index"))
    chunks = cfg.part_chunks(r)
    first_id, end = cfg.chunk_range(chunks.start)[0], cfg.chunk_range(chunks.stop - 1)[1]
    values = np.empty(end - first_id, dtype=np.int32)
    for c in chunks:
        keys, tokens = chunk_keys(cfg, c)
        lo, hi = cfg.chunk_range(c)
        index.add(keys)  # local ids 0.. in id order
        values[lo - first_id : hi - first_id] = tokens
        del keys
    part = PartOf(index=r, parts=cfg.parts, first_id=first_id, count=end - first_id, total=cfg.entries,
                  trained_sha256=parts.trained_digest(index))
    PatchDatabase(None, torch.from_numpy(values), _meta(cfg, part, end - first_id), index=index,
                  nprobe=cfg.nprobe).save(work / "parts" / parts.part_dir_name(r))
    return {"entries": end - first_id}


def step_publish(cfg: Config, work: Path) -> dict:
    from arrag_kernels.retrieval import parts

    infos = [parts.part_info(work / "parts" / parts.part_dir_name(r)) for r in range(cfg.parts)]
    parts.write_parts_json(work / "parts", infos[0].meta.part.trained_sha256, infos)
    return {}


def step_merge(cfg: Config, work: Path) -> dict:
    from arrag_kernels.retrieval.ondisk import merge_parts

    merge_parts(work / "parts", work / "merged")
    return {"bytes_on_disk": sum(f.stat().st_size for f in (work / "merged").iterdir())}


def _timed_search(db, q, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    import torch

    start = time.perf_counter()
    dist, ids = db.search(torch.from_numpy(q), k)
    seconds = time.perf_counter() - start
    return dist.numpy(), ids.numpy(), db.values[ids.clamp_min(0)].numpy(), seconds


def step_search_merged(cfg: Config, work: Path) -> dict:
    from arrag_kernels import PatchDatabase

    start = time.perf_counter()
    db = PatchDatabase.load(work / "merged")
    load_seconds = time.perf_counter() - start
    q = queries(cfg)
    _timed_search(db, q[:1], cfg.k)  # first touch of the mapped quantizer tables
    dist, ids, tokens, seconds = _timed_search(db, q, cfg.k)
    _save_hits(work, "search-merged", dist, ids, tokens)
    return {"load_seconds": load_seconds, "search_seconds": seconds, "after_search": process_memory()}  # database open


def step_shard(cfg: Config, work: Path, r: int) -> dict:
    from arrag_kernels import PatchDatabase
    from arrag_kernels.retrieval.parts import check_parts

    part = check_parts(work / "parts")[r]
    db = PatchDatabase.load(part.dir)
    dist, ids, tokens, seconds = _timed_search(db, queries(cfg), cfg.k)
    _save_hits(work, f"shard-{r}", dist, np.where(ids >= 0, ids + part.first_id, -1), np.where(ids >= 0, tokens, -1))
    return {"search_seconds": seconds}


def shard_hits(cfg: Config, work: Path) -> dict:
    """The shards' hits merged: each query's k nearest of all shards' top-k, by distance (shard order on ties)."""
    found = [hits(work, f"shard-{r}") for r in range(cfg.parts)]
    merged = {key: np.concatenate([f[key] for f in found], axis=1) for key in found[0]}
    order = np.argsort(merged["distances"], axis=1, kind="stable")[:, : cfg.k]
    return {key: np.take_along_axis(a, order, 1) for key, a in merged.items()}


def one_piece(cfg: Config, work: Path):
    """(index, values): every chunk added in id order to one in-memory copy of the trained index."""
    import faiss

    index = faiss.read_index(str(work / "parts" / "trained.index"))
    values = np.empty(cfg.entries, dtype=np.int32)
    for c in range(cfg.chunks):
        keys, tokens = chunk_keys(cfg, c)
        index.add(keys)
        lo, hi = cfg.chunk_range(c)
        values[lo:hi] = tokens
    faiss.extract_index_ivf(index).nprobe = cfg.nprobe
    return index, values


def step_one_piece(cfg: Config, work: Path) -> dict:
    index, values = one_piece(cfg, work)
    dist, ids = index.search(queries(cfg), cfg.k)
    _save_hits(work, "one-piece", dist, ids, np.where(ids >= 0, values[np.maximum(ids, 0)], -1))
    return {}


STEPS = {"train": step_train, "publish": step_publish, "merge": step_merge, "search-merged": step_search_merged,
         "one-piece": step_one_piece}


def main(step: str, work: str) -> None:
    import faiss

    faiss.omp_set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    work = Path(work)
    cfg = Config(**json.loads((work / "config.json").read_text()))
    start = time.perf_counter()
    if step.startswith(("part-", "shard-")):
        kind, r = step.split("-")
        info = (step_part if kind == "part" else step_shard)(cfg, work, int(r))
    else:
        info = STEPS[step](cfg, work)
    info.update(step=step, seconds=time.perf_counter() - start, **process_memory())
    (work / "stats").mkdir(exist_ok=True)
    (work / "stats" / f"{step}.json").write_text(json.dumps(info))


def run(cfg: Config, work: Path, one_piece: bool = True, timeout: float | None = None) -> dict:
    """Every step in order, each its own process; returns {step: its stats} (plus "config")."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "config.json").write_text(json.dumps(asdict(cfg)))
    steps = ["train", *(f"part-{r}" for r in range(cfg.parts)), "publish", "merge", "search-merged",
             *(f"shard-{r}" for r in range(cfg.parts))]
    steps += ["one-piece"] if one_piece else []
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    for step in steps:
        done = subprocess.run([sys.executable, "-m", "tests.scale_build", step, str(work)], cwd=root, env=env,
                              capture_output=True, text=True, timeout=timeout)
        if done.returncode:
            raise RuntimeError(f"scale step {step} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    stats = {p.stem: json.loads(p.read_text()) for p in (work / "stats").glob("*.json")}
    return {"config": asdict(cfg), **stats}


def baseline_memory() -> dict:
    """:func:`memory` of a process that only imports what the steps import (arrag_kernels, faiss)."""
    code = "import json, faiss; from arrag_kernels.profiling import process_memory; print(json.dumps(process_memory()))"
    root = Path(__file__).resolve().parent.parent
    return json.loads(subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                                     check=True).stdout)


def hits(work: Path, step: str) -> dict:
    with np.load(work / "hits" / f"{step}.npz") as f:
        return {k: f[k] for k in f.files}


def check_hits(cfg: Config, work: Path) -> None:
    """The merged on-disk database returns the one-piece index's hits exactly; the shards the same distances
    and, where a row's distances are not tied, the same ids and tokens (shards break ties by shard order,
    the one-piece index by list scan order)."""
    want, merged, shards = hits(work, "one-piece"), hits(work, "search-merged"), shard_hits(cfg, work)
    for key in ("distances", "ids", "tokens"):
        np.testing.assert_array_equal(merged[key], want[key])
    np.testing.assert_array_equal(shards["distances"], want["distances"])
    d = want["distances"]
    tied = np.zeros_like(d, dtype=bool)
    tied[:, 1:] |= d[:, 1:] == d[:, :-1]
    tied[:, :-1] |= d[:, :-1] == d[:, 1:]
    for key in ("ids", "tokens"):
        np.testing.assert_array_equal(shards[key][~tied], want[key][~tied])
    assert (want["ids"] >= 0).all()  # every query found k entries: the comparison covers whole rows


def bounded_steps(stats: dict) -> dict:
    """The steps whose memory must stay far below the whole index's (all but training and the one-piece reference)."""
    return {name: s for name, s in stats.items() if name.startswith(("part-", "shard-")) or name in
            ("merge", "search-merged")}


def memory_report(cfg: Config, stats: dict) -> dict:
    """The whole index's size (codes + ids + tokens), a bare process's memory (python, torch, faiss imported)
    and ``over_bounds``: the bounded steps whose peak RSS reaches half the whole index, except the on-disk
    search, whose peak counts the page cache it maps: its peak must stay below the whole index and its
    anonymous memory (the database open, after the search) within an eighth of it over the bare
    process's. Meaningful at scale only: a small index is smaller than python."""
    whole, bare = cfg.entries * BYTES_PER_ENTRY, baseline_memory()
    over = {name: s["peak_rss_bytes"] for name, s in bounded_steps(stats).items() if name != "search-merged"
            and s["peak_rss_bytes"] >= whole / 2}
    search = stats["search-merged"]
    if search["peak_rss_bytes"] >= whole or search["after_search"]["rss_anon_bytes"] - bare["rss_anon_bytes"] >= whole / 8:
        over["search-merged"] = {"peak_rss_bytes": search["peak_rss_bytes"], **search["after_search"]}
    return {"whole_index_bytes": whole, "baseline": bare, "over_bounds": over}


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
