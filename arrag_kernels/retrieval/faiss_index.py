"""FAISS OPQ + IVF-PQ indexes in the official AR-RAG layout: creation, validation, nprobe, export.

Official layout (method.md section 1): ``IndexPreTransform(OPQMatrix(D, M), IndexIVFPQ(IndexFlatL2(D),
D, nlist, M, nbits))``, squared L2, sequential ids 0..N-1; ``next_codes.npy`` (N,) int32 maps id ->
token. The official code's bug sets nprobe on the Python wrapper; :func:`set_nprobe` sets it on the
inner IVF.
"""

from __future__ import annotations

import numpy as np
import torch

INDEX_FILE = "faiss_ivf_pq_opq.index"
VALUES_FILE = "next_codes.npy"


class IndexFormatError(ValueError):
    """A FAISS index or its value array does not have the expected type, dimension or contents."""


def import_faiss():
    try:
        import faiss
    except ImportError as e:
        raise ImportError("IVF-PQ databases need faiss: pip install faiss-cpu (or faiss-gpu)") from e
    return faiss


def make_ivfpq_index(dim: int, nlist: int, m: int = 8, nbits: int = 8, opq: bool = True):
    """An untrained ``[OPQMatrix ->] IndexIVFPQ(IndexFlatL2)``, squared L2, residual encoding."""
    faiss = import_faiss()
    if dim % m:
        raise ValueError(f"m = {m} sub-quantizers must divide the key dimension {dim}")
    if nlist < 1 or not 1 <= nbits <= 16:
        raise ValueError(f"nlist must be >= 1 and nbits in [1, 16], got nlist={nlist}, nbits={nbits}")
    ivf = faiss.IndexIVFPQ(faiss.IndexFlatL2(dim), dim, nlist, m, nbits)
    if not opq:
        return ivf
    return faiss.IndexPreTransform(faiss.OPQMatrix(dim, m), ivf)  # the wrapper keeps ivf and OPQ alive


def inner_ivfpq(index):
    """The ``IndexIVFPQ`` inside ``index`` (bare or behind an ``IndexPreTransform``), else IndexFormatError."""
    faiss = import_faiss()
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError as e:
        raise IndexFormatError(
            f"expected an IndexIVFPQ (optionally inside an IndexPreTransform), got {type(index).__name__}"
        ) from e
    ivf = faiss.downcast_index(ivf)
    if not isinstance(ivf, faiss.IndexIVFPQ):
        raise IndexFormatError(f"expected an IndexIVFPQ inside the index, got {type(ivf).__name__}")
    return ivf


def set_nprobe(index, nprobe: int) -> None:
    """Set nprobe on the inner IVF (the official code sets it on the wrapper, where it has no effect)."""
    ivf = inner_ivfpq(index)
    if not 1 <= nprobe <= ivf.nlist:
        raise ValueError(f"nprobe must be in [1, nlist = {ivf.nlist}], got {nprobe}")
    ivf.nprobe = int(nprobe)


def validate_ivfpq(index, values: np.ndarray, dim: int, codebook_size: int, nprobe: int | None = None,
                   check_range: bool = True) -> None:
    """Check an index + value array pair; raise IndexFormatError naming what was expected and received.
    ``check_range=False`` skips reading every value (their range was checked elsewhere)."""
    faiss = import_faiss()
    if index.d != dim:
        raise IndexFormatError(f"index dimension is {index.d}, expected {dim} (the key dimension of the layout)")
    if isinstance(index, faiss.IndexPreTransform):
        for i in range(index.chain.size()):
            vt = faiss.downcast_VectorTransform(index.chain.at(i))
            if not isinstance(vt, faiss.LinearTransform) or vt.d_in != dim or vt.d_out != dim:
                raise IndexFormatError(
                    f"pre-transform {i} is {type(vt).__name__} {vt.d_in}->{vt.d_out}; expected a {dim}x{dim} linear map (OPQ)"
                )
    ivf = inner_ivfpq(index)
    if ivf.metric_type != faiss.METRIC_L2:
        raise IndexFormatError(f"index metric is {ivf.metric_type}, expected METRIC_L2 ({faiss.METRIC_L2})")
    if not index.is_trained:
        raise IndexFormatError("index is not trained")
    values = np.asarray(values)
    if values.ndim != 1 or values.shape[0] != index.ntotal:
        raise IndexFormatError(
            f"{VALUES_FILE} must hold one token id per index entry: expected shape ({index.ntotal},), got {values.shape}"
        )
    if not np.issubdtype(values.dtype, np.integer):
        raise IndexFormatError(f"{VALUES_FILE} must hold integer token ids, got dtype {values.dtype}")
    if check_range and values.size and (int(values.min()) < 0 or int(values.max()) >= codebook_size):
        raise IndexFormatError(
            f"{VALUES_FILE} holds codes outside the codebook: range [{int(values.min())}, {int(values.max())}], "
            f"expected [0, {codebook_size})"
        )
    if nprobe is not None and not 1 <= nprobe <= ivf.nlist:
        raise IndexFormatError(f"nprobe: expected 1 <= nprobe <= nlist = {ivf.nlist} (the index's list count), got {nprobe}")


def check_ivfpq_contents(index) -> None:
    """Deep checks of an (OPQ +) IVF-PQ index read from a file that carries no checksum (a released one).

    Raises IndexFormatError when: a part is marked untrained; a float array (pre-transform matrix
    and bias, coarse centroids, PQ codebooks) has the wrong size or holds NaN / inf; the inverted lists' sizes do not add up to
    ``ntotal``; their code size is not the PQ's; the ids are not 0..N-1, each exactly once. Costs
    one pass over the ids (N bytes of scratch); flipped bits inside PQ codes cannot be detected.
    """
    faiss = import_faiss()
    corrupted = "the index file is corrupted"
    ivf = inner_ivfpq(index)
    n, nlist, d = int(index.ntotal), int(ivf.nlist), int(ivf.d)
    if ivf.ntotal != n:
        raise IndexFormatError(f"the inner IVF holds {ivf.ntotal} entries but the index says ntotal = {n}: {corrupted}")
    floats = {}
    if isinstance(index, faiss.IndexPreTransform):
        for i in range(index.chain.size()):
            vt = faiss.downcast_VectorTransform(index.chain.at(i))
            if not vt.is_trained:
                raise IndexFormatError(f"pre-transform {i} is marked untrained: {corrupted}")
            floats[f"pre-transform {i} matrix"] = (faiss.vector_to_array(vt.A), vt.d_in * vt.d_out)
            if vt.have_bias:
                floats[f"pre-transform {i} bias"] = (faiss.vector_to_array(vt.b), vt.d_out)
    if not (ivf.is_trained and ivf.quantizer.is_trained):
        raise IndexFormatError(f"the IVF or its coarse quantizer is marked untrained: {corrupted}")
    if ivf.quantizer.ntotal != nlist:
        raise IndexFormatError(f"the coarse quantizer holds {ivf.quantizer.ntotal} centroids, expected nlist = {nlist}: {corrupted}")
    try:
        floats["coarse centroids"] = (ivf.quantizer.reconstruct_n(0, nlist).ravel(), nlist * d)
    except RuntimeError as e:
        raise IndexFormatError(f"cannot read the coarse centroids ({str(e).splitlines()[0]}): {corrupted}") from e
    pq = ivf.pq
    floats["PQ codebooks"] = (faiss.vector_to_array(pq.centroids), pq.M * pq.ksub * pq.dsub)
    for name, (array, size) in floats.items():
        if array.size != size:
            raise IndexFormatError(f"{name}: {array.size} values, expected {size}: {corrupted}")
        if not np.isfinite(array).all():
            raise IndexFormatError(f"{name} holds NaN or inf values: {corrupted}")
    invlists = ivf.invlists
    if invlists.nlist != nlist or invlists.code_size != ivf.code_size or ivf.code_size != pq.code_size:
        raise IndexFormatError(
            f"inverted lists of {invlists.nlist} lists with {invlists.code_size}-byte codes do not fit the index "
            f"(nlist = {nlist}, PQ code size {pq.code_size} bytes): {corrupted}"
        )
    sizes = np.array([invlists.list_size(l) for l in range(nlist)], dtype=np.int64)
    if sizes.sum() != n:
        raise IndexFormatError(f"the inverted lists hold {int(sizes.sum())} entries, the index says ntotal = {n}: {corrupted}")
    seen = np.zeros(n, dtype=bool)
    for l in np.flatnonzero(sizes):
        ids = faiss.rev_swig_ptr(invlists.get_ids(int(l)), int(sizes[l]))
        if ids.min() < 0 or ids.max() >= n:
            bad = int(ids[(ids < 0) | (ids >= n)][0])
            raise IndexFormatError(f"inverted list {l} holds id {bad}, expected ids in [0, {n}): {corrupted}")
        seen[ids] = True
    if not seen.all():
        raise IndexFormatError(f"ids must be 0..{n - 1} each exactly once; id {int(np.argmin(seen))} is missing: {corrupted}")


def ivfpq_arrays(index) -> dict[str, torch.Tensor | None]:
    """Export a trained (OPQ +) IVF-PQ index as CPU tensors for :func:`arrag_kernels.ops.ivfpq_search`.

    Returns rotation (D, D) or None, centroids (nlist, D), codebooks (M, ksub, D/M), term1
    (nlist, M, ksub), codes (N, M) uint8, ids (N,) int64, offsets (nlist + 1,) int64.
    """
    faiss = import_faiss()
    ivf = inner_ivfpq(index)
    if ivf.pq.nbits != 8:
        raise IndexFormatError(f"the device IVF-PQ search reads 8-bit PQ codes, this index has nbits = {ivf.pq.nbits}")
    if not ivf.by_residual:
        raise IndexFormatError("the device IVF-PQ search needs residual encoding (by_residual=True, FAISS's default)")
    rotation = None
    if isinstance(index, faiss.IndexPreTransform):
        if index.chain.size() != 1:
            raise IndexFormatError(f"expected one pre-transform (OPQ), got {index.chain.size()}")
        vt = faiss.downcast_VectorTransform(index.chain.at(0))
        if vt.have_bias:
            raise IndexFormatError("the pre-transform has a bias; OPQ matrices have none")
        rotation = torch.from_numpy(faiss.vector_to_array(vt.A).reshape(vt.d_out, vt.d_in).copy())
    d, m, ksub = ivf.d, ivf.pq.M, ivf.pq.ksub
    centroids = torch.from_numpy(ivf.quantizer.reconstruct_n(0, ivf.nlist).copy())
    codebooks = torch.from_numpy(faiss.vector_to_array(ivf.pq.centroids).reshape(m, ksub, d // m).copy())
    cb_norm = (codebooks * codebooks).sum(-1)  # (M, ksub)
    term1 = cb_norm + 2.0 * torch.einsum("lmd,mjd->lmj", centroids.view(-1, m, d // m), codebooks)
    invlists = ivf.invlists
    sizes = np.array([invlists.list_size(l) for l in range(ivf.nlist)], dtype=np.int64)
    offsets = np.zeros(ivf.nlist + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    codes = np.empty((int(offsets[-1]), m), dtype=np.uint8)
    ids = np.empty(int(offsets[-1]), dtype=np.int64)
    for l in np.flatnonzero(sizes):
        n = int(sizes[l])
        codes[offsets[l] : offsets[l + 1]] = faiss.rev_swig_ptr(invlists.get_codes(int(l)), n * m).reshape(n, m)
        ids[offsets[l] : offsets[l + 1]] = faiss.rev_swig_ptr(invlists.get_ids(int(l)), n)
    return {
        "rotation": rotation,
        "centroids": centroids,
        "codebooks": codebooks,
        "term1": term1.contiguous(),
        "codes": torch.from_numpy(codes),
        "ids": torch.from_numpy(ids),
        "offsets": torch.from_numpy(offsets),
    }
