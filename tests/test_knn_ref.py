"""The reference exact k-NN against an independent brute force and against faiss."""

import importlib

import pytest
import torch

from arrag_kernels.ops import knn, knn_ref
from tests.utils import assert_close


def _brute_force(q, keys, k):
    """Direct sum of squared differences, ordered by (distance, id) in Python."""
    out_d, out_i = [], []
    for row in q.double():
        d = ((keys.double() - row) ** 2).sum(1)
        order = sorted(range(len(d)), key=lambda i: (float(d[i]), i))[:k]
        out_d.append([float(d[i]) for i in order])
        out_i.append(order)
    return torch.tensor(out_d), torch.tensor(out_i)


@pytest.mark.parametrize("n,dim,k", [(97, 32, 7), (1025, 32, 64), (3001, 96, 1), (63, 12, 63)])
def test_knn_matches_brute_force(n, dim, k):
    g = torch.Generator().manual_seed(n)
    keys = torch.randn(n, dim, generator=g)
    q = torch.randn(5, dim, generator=g)
    d, i = knn(q, keys, k)
    bd, bi = _brute_force(q, keys, k)
    assert_close(d, bd, torch.float32, "distances")
    assert torch.equal(i, bi)


def test_knn_spans_blocks_and_ties_by_id(monkeypatch):
    # Duplicated keys in different reference blocks: equal distances must come back in id order.
    mod = importlib.import_module("arrag_kernels.ops.knn")  # the package attribute `knn` is the function
    monkeypatch.setattr(mod, "_REF_BLOCK", 16)
    monkeypatch.setattr(mod, "_REF_CANDIDATES", 32)  # 2 queries: blocks of 16 keys
    g = torch.Generator().manual_seed(0)
    base = torch.randn(10, 8, generator=g)
    keys = base.repeat(7, 1)  # ids i, i+10, i+20, ... share a key
    q = base[[3, 8]] + 0.01
    d, i = knn_ref(q, keys, 21)
    assert i[0, :7].tolist() == [3 + 10 * j for j in range(7)]
    assert i[1, :7].tolist() == [8 + 10 * j for j in range(7)]
    assert torch.all(d[:, 1:] >= d[:, :-1])


def test_knn_ref_key_norms_follow_in_place_changes():
    """knn_ref keeps each keys tensor's norms; an in-place change must not leave them stale."""
    g = torch.Generator().manual_seed(4)
    keys, q = torch.randn(300, 8, generator=g), torch.randn(2, 8, generator=g)
    knn_ref(q, keys, 5)
    keys.mul_(3.0).add_(1.0)
    d, i = knn_ref(q, keys, 5)
    bd, bi = _brute_force(q, keys, 5)
    assert_close(d, bd, torch.float32, "distances after the in-place change")
    assert torch.equal(i, bi)


def test_knn_low_precision_keys_accumulate_in_fp32():
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(501, 32, generator=g)
    q = torch.randn(3, 32, generator=g)
    d16, i16 = knn(q.half(), keys.half(), 10)
    d32, _ = knn(q.half().float(), keys.half().float(), 10)
    assert d16.dtype == torch.float32
    assert_close(d16, d32, torch.float32, "fp16 keys vs the same values in fp32")


def test_knn_agrees_with_faiss():
    faiss = pytest.importorskip("faiss")
    g = torch.Generator().manual_seed(2)
    keys = torch.randn(2000, 32, generator=g)
    q = torch.randn(4, 32, generator=g)
    index = faiss.IndexFlatL2(32)
    index.add(keys.numpy())
    fd, fi = index.search(q.numpy(), 50)
    d, i = knn(q, keys, 50)
    assert_close(d, torch.from_numpy(fd), torch.float16, "distances vs faiss")  # different summation order
    assert torch.equal(i, torch.from_numpy(fi))


def test_knn_bad_inputs():
    keys = torch.randn(10, 4)
    with pytest.raises(ValueError, match="k must be in"):
        knn(torch.randn(1, 4), keys, 11)
    with pytest.raises(ValueError, match="k must be in"):
        knn(torch.randn(1, 4), keys, 0)
    with pytest.raises(ValueError, match="does not match key dimension"):
        knn(torch.randn(1, 5), keys, 3)
    with pytest.raises(TypeError, match="floating point"):
        knn(torch.ones(1, 4, dtype=torch.long), keys, 3)
