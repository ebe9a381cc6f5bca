"""Importing released (faiss) databases: corrupt index files are refused with a DatabaseError naming the
problem, on import and through the CLI; search and nprobe messages say what is wrong (issue 14: each
test pins a failure reported against an earlier version, named in its docstring)."""

import numpy as np
import pytest
import torch

import arrag_kernels as ak
from arrag_kernels.cli import USER_ERROR, main

from .utils import write_released_database


@pytest.fixture(scope="module")
def small_official(tmp_path_factory):
    """A small released-layout database: OPQ + IVF-PQ (4 lists, m 4, 4 bits) over 600 keys, 64 codes."""
    folder = tmp_path_factory.mktemp("official")
    return folder, write_released_database(folder, nbits=4, token_range=(0, 64))


def _write_case(folder, tmp_path, index_bytes, name):
    case = tmp_path / name
    case.mkdir()
    (case / "faiss_ivf_pq_opq.index").write_bytes(bytes(index_bytes))
    (case / "next_codes.npy").write_bytes((folder / "next_codes.npy").read_bytes())
    return case


def test_corrupt_faiss_indexes_are_rejected_on_import(small_official, tmp_path):
    """Flipped bytes used to import (and re-save with fresh checksums); retrieval then raised a bare
    IndexError or returned -1 tokens. One set bit is cleared at a time (in every nonzero byte of the
    first 64, then at 200 positions drawn with a fixed seed): the import either refuses the file
    with a DatabaseError or gives an index whose search is well formed. Only set bits are cleared:
    a size field that grows makes faiss.read_index itself allocate the claimed size before any check
    can run (one flipped bit of the OPQ matrix size: 17 GB, 32 s), see README Limitations."""
    folder, _ = small_official
    data = (folder / "faiss_ivf_pq_opq.index").read_bytes()
    queries = torch.from_numpy(np.random.default_rng(1).standard_normal((8, 32)).astype(np.float32))
    rejected, accepted = 0, 0
    case = _write_case(folder, tmp_path, data, "case")
    drawn = np.random.default_rng(0).choice(np.flatnonzero(np.frombuffer(data, np.uint8)[64:]) + 64, 200, replace=False)
    for pos in [*range(64), *sorted(int(p) for p in drawn)]:
        if data[pos] == 0:
            continue
        bad = bytearray(data)
        bad[pos] &= bad[pos] - 1  # clear the lowest set bit
        (case / "faiss_ivf_pq_opq.index").write_bytes(bytes(bad))
        try:
            imported = ak.PatchDatabase.from_official(case, nprobe=4, codebook_size=64)
        except ak.DatabaseError:
            rejected += 1
            continue
        accepted += 1
        dist, tokens = imported.retrieve(queries, 10)
        assert bool(((tokens >= 0) & (tokens < 64)).all()) and bool(torch.isfinite(dist).all()), f"byte {pos}"
    assert rejected >= 30 and accepted >= 100, (rejected, accepted)  # 38 and 189: headers, sizes, ids vs. floats, codes


def test_faiss_content_checks_name_the_problem(small_official, tmp_path):
    faiss = pytest.importorskip("faiss")
    from arrag_kernels.retrieval.faiss_index import inner_ivfpq

    folder, index = small_official

    def corrupted(edit, name):
        copy = faiss.deserialize_index(faiss.serialize_index(index))
        edit(copy, inner_ivfpq(copy))
        return _write_case(folder, tmp_path, faiss.serialize_index(copy).tobytes(), name)

    def nan_codebook(idx, ivf):
        centroids = faiss.vector_to_array(ivf.pq.centroids)
        centroids[5] = np.nan
        faiss.copy_array_to_vector(centroids, ivf.pq.centroids)

    def duplicate_id(idx, ivf):
        ids = faiss.rev_swig_ptr(ivf.invlists.get_ids(0), ivf.invlists.list_size(0))
        ids[1] = ids[0]

    def id_out_of_range(idx, ivf):
        faiss.rev_swig_ptr(ivf.invlists.get_ids(1), ivf.invlists.list_size(1))[0] = 600

    def nan_opq(idx, ivf):
        vt = faiss.downcast_VectorTransform(idx.chain.at(0))
        a = faiss.vector_to_array(vt.A)
        a[0] = np.inf
        faiss.copy_array_to_vector(a, vt.A)

    cases = [(nan_codebook, "PQ codebooks holds NaN or inf"), (duplicate_id, r"ids must be 0..599 each exactly once"),
             (id_out_of_range, r"inverted list 1 holds id 600, expected ids in \[0, 600\)"),
             (nan_opq, "pre-transform 0 matrix holds NaN or inf")]
    for i, (edit, message) in enumerate(cases):
        with pytest.raises(ak.DatabaseError, match=message):
            ak.PatchDatabase.from_official(corrupted(edit, f"case{i}"), codebook_size=64)
        assert main(["import-official", str(tmp_path / f"case{i}"), "--codebook-size", "64",
                     "--out", str(tmp_path / f"out{i}")]) == USER_ERROR
        assert not (tmp_path / f"out{i}").exists()  # nothing re-saved with fresh checksums


# ---- messages -----------------------------------------------------------------------------------
def test_search_and_nprobe_messages_say_what_is_wrong(tiny_db, small_official):
    """search(k=0) used to say "larger than the database"; nprobe 0 "exceeds nlist"."""
    queries = torch.zeros(2, 32)
    with pytest.raises(ValueError, match=r"k: expected an int >= 1 neighbours per query, got 0"):
        tiny_db.search(queries, 0)
    with pytest.raises(ValueError, match=rf"k = {len(tiny_db) + 1} is larger than the database"):
        tiny_db.search(queries, len(tiny_db) + 1)
    folder, _ = small_official
    with pytest.raises(ak.DatabaseError, match=r"nprobe: expected 1 <= nprobe <= nlist = 4 .*got 0"):
        ak.PatchDatabase.from_official(folder, nprobe=0, codebook_size=64)
