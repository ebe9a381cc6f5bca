"""IVF-PQ compiled on CUDA, without faiss (the GPU machine has none): synthetic index arrays with
unbalanced and empty lists; the fused Triton scan + top-k against the reference for each selection
method, sharded search, and no host synchronisation in a search."""

import pytest
import torch

from arrag_kernels.ops import use_backend
from arrag_kernels.ops._triton.ivfpq import ivfpq_scan_packed
from arrag_kernels.ops.ivfpq import finish, ivfpq_probe, ivfpq_scan_ref
from arrag_kernels.retrieval.search import DeviceIVFPQSearch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled Triton IVF-PQ needs CUDA")

NLIST, DIM, M = 64, 32, 8


@pytest.fixture(scope="module")
def arrays():
    """CPU arrays laid out like ``ivfpq_arrays``: 200k entries in lists of very unequal sizes, every
    7th list empty, random codebooks and codes, an orthogonal rotation."""
    g = torch.Generator().manual_seed(0)
    centroids = torch.randn(NLIST, DIM, generator=g)
    codebooks = torch.randn(M, 256, DIM // M, generator=g) * 0.3
    term1 = (codebooks * codebooks).sum(-1) + 2.0 * torch.einsum("lmd,mjd->lmj", centroids.view(NLIST, M, -1),
                                                                   codebooks)
    weights = torch.rand(NLIST, generator=g) ** 3
    weights[::7] = 0
    n = 200_000
    sizes = torch.bincount(torch.multinomial(weights, n, replacement=True, generator=g), minlength=NLIST)
    return {"rotation": torch.linalg.qr(torch.randn(DIM, DIM, generator=g))[0], "centroids": centroids,
            "codebooks": codebooks, "term1": term1.contiguous(),
            "codes": torch.randint(0, 256, (n, M), generator=g, dtype=torch.uint8),
            "ids": torch.randperm(n, generator=g),
            "offsets": torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(sizes, 0)])}


@pytest.fixture(scope="module")
def queries(arrays):
    g = torch.Generator().manual_seed(1)
    near = arrays["centroids"][torch.randint(0, NLIST, (9,), generator=g)] @ arrays["rotation"]  # y = x A^T
    return (near + 0.5 * torch.randn(9, DIM, generator=g)).cuda()


def assert_matches(out, ref, atol=1e-4):
    """Distances close; ids equal wherever the reference distance has no neighbour within ``atol``
    (summation order differs, so near-ties may swap); the last position may tie with the (k+1)-th."""
    (dist, ids), (ref_dist, ref_ids) = out, ref
    torch.testing.assert_close(dist, ref_dist, atol=atol, rtol=0)
    gap = (ref_dist[:, 1:] - ref_dist[:, :-1]) > atol
    alone = torch.ones_like(ref_ids, dtype=torch.bool)
    alone[:, 1:] &= gap
    alone[:, :-1] &= gap
    alone[:, -1] = False
    assert torch.equal(ids[alone], ref_ids[alone]), f"{(ids[alone] != ref_ids[alone]).sum()} ids differ"


@pytest.mark.parametrize("nprobe,k", [(1, 10), (8, 97), (32, 2048), (NLIST, 64), (4, 1000)], ids=lambda v: str(v))
def test_triton_search_equals_reference(arrays, queries, nprobe, k):
    search = DeviceIVFPQSearch(arrays, nprobe, "cuda")
    with use_backend("reference"):
        ref = search.search(queries, k)
    with use_backend("triton"):
        out = search.search(queries, k)
    assert_matches(out, ref)


@pytest.mark.parametrize("method", ["topk", "scan", "bisect"])
@pytest.mark.parametrize("k", [13, 300])
def test_selection_methods(arrays, queries, method, k):
    a = {n: t.cuda() for n, t in arrays.items()}
    lists, dis0, term2 = ivfpq_probe(queries, a["rotation"], a["centroids"], a["codebooks"], 6)
    sizes = (arrays["offsets"][1:] - arrays["offsets"][:-1]).sort(descending=True).values
    max_candidates = int(sizes[:6].sum())
    packed = ivfpq_scan_packed(lists, dis0, term2, a["term1"], a["codes"], a["offsets"], k, max_candidates, method)
    assert torch.equal(packed, packed.sort(1).values)
    ref = ivfpq_scan_ref(lists, dis0, term2, a["term1"], a["codes"], a["ids"], a["offsets"], k, max_candidates)
    assert_matches(finish(packed, lists, a["offsets"], a["ids"], k), ref)


@pytest.mark.parametrize("shards", [2, 3])
def test_sharded_search_equals_unsharded(arrays, queries, shards):
    single = DeviceIVFPQSearch(arrays, 8, "cuda")
    sharded = DeviceIVFPQSearch(arrays, 8, "cuda", shards=["cuda"] * shards)
    with use_backend("triton"):
        expected = single.search(queries, 500)
        dist, ids = sharded.search(queries, 500)
    assert torch.equal(dist, expected[0]) and torch.equal(ids, expected[1])


@pytest.mark.parametrize("shards", [None, ["cuda", "cuda"]], ids=["single", "sharded"])
def test_search_never_synchronises(arrays, queries, shards):
    search = DeviceIVFPQSearch(arrays, 8, "cuda", shards=shards)
    with use_backend("triton"):
        search.search(queries, 2048)  # compiles the kernels
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            search.search(queries, 2048)
        finally:
            torch.cuda.set_sync_debug_mode("default")
