"""One rank of the sharded-search tests (tests/test_distributed_search.py), started by
``torch.multiprocessing``: joins a gloo group through a file in the run directory, runs the cases
the test wrote into ``<run>/cases.json`` on the databases it saved in the data directory and writes
what it got to ``<run>/rank<r>.pt`` (tensors, or the error message of a case that raised). Generation
cases run unsharded and sharded in the same process, so their tokens compare without cross-process
float noise, and without retrieval (``plain``), which must differ.
"""

from __future__ import annotations

import datetime
import json
import os
import traceback
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # as tests/conftest.py: before any kernel is defined

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import arrag_kernels as ak  # noqa: E402
from arrag_kernels.retrieval import DistributedDatabase  # noqa: E402


def _search(work: Path, case: dict, rank: int, world: int) -> dict:
    """Every rank searches the same queries for each k (case "different_queries": rank r its own),
    reading nothing on the host after a first search (the set-up a decode loop's warm-up step does)."""
    import pytest

    from tests.utils import forbid_host_reads

    if "parts" in case:
        db = DistributedDatabase.from_parts(work / case["parts"])
    elif "own_part" in case:
        db = ak.PatchDatabase.load(work / case["own_part"] / f"part-{rank:05d}").distributed()
    else:
        db = ak.PatchDatabase.load(work / case["db"]).distributed().to("cpu")  # to(): a copy, no collective
    queries = torch.load(work / "queries.pt")
    if case.get("different_queries"):
        queries = queries + rank
    out = {"len": len(db), "shard_len": len(db.shard)}
    db.search(queries, case["ks"][0])
    with pytest.MonkeyPatch.context() as patch:
        forbid_host_reads(patch, "the sharded search")
        for k in case["ks"]:
            dist_, ids = db.search(queries, k)
            dist2, tokens = db.retrieve(queries, k)
            assert torch.equal(dist_, dist2)
            out[k] = (dist_, ids, tokens)
    return out


def _bad_shard(work: Path, case: dict, rank: int, world: int) -> dict:
    """Rank ``case["rank"]`` brings a shard of another database (a codebook or trained index that disagrees)."""
    if "parts" in case:
        DistributedDatabase.from_parts(work / case["parts"])
        return {}
    full = ak.PatchDatabase.load(work / case["db"])
    other = ak.PatchDatabase.load(work / case["other"])
    lo, hi = len(full) * rank // world, len(full) * (rank + 1) // world
    mine = other if rank == case["rank"] else full
    shard = ak.PatchDatabase(mine.keys[lo:hi], mine.values[lo:hi], mine.meta)
    DistributedDatabase(shard, lo, len(full))
    return {}


def _janus_generate(model, do_sample: bool, **kwargs) -> torch.Tensor:
    from arrag_kernels.models import hf_image_generate_kwargs, tiny_prompt_ids

    ids = tiny_prompt_ids(2)
    torch.manual_seed(1)
    return model.generate(ids, attention_mask=torch.ones_like(ids), generation_mode="image", do_sample=do_sample,
                          **hf_image_generate_kwargs(model), **kwargs)


def _janus(work: Path, case: dict, rank: int, world: int) -> dict:
    """patch_model + generate with the tiny Janus, unsharded and sharded: DAiD (greedy, sampled, static
    loop) and FAiD on an exact database, greedy DAiD on an IVF-PQ one."""
    from arrag_kernels.faid import FAiDBlenders, FAiDConfig
    from arrag_kernels.models import tiny_janus

    model = tiny_janus(seed=0)
    faid = FAiDConfig(k=4, hops=(1, 2), blenders=2)
    torch.manual_seed(0)
    blenders = FAiDBlenders.for_model(model, faid)
    with torch.no_grad():
        for p in blenders.parameters():
            p.normal_(0, 0.3)
    daid = ak.DAiDConfig(lam=0.9, k=8)
    runs = {"daid-greedy": (daid, False, "dynamic"), "daid-sampled": (daid, True, "dynamic"),
            "daid-static": (daid, True, "static"), "faid": (faid, False, "dynamic")}
    out = {}
    for db_name in case["dbs"]:
        full = ak.PatchDatabase.load(work / db_name)
        sharded = full.distributed()
        for name, (config, do_sample, loop) in runs.items():
            if db_name != case["dbs"][0] and name != "daid-greedy":
                continue
            for which, db in (("unsharded", full), ("sharded", sharded)):
                weights = blenders if not isinstance(config, ak.DAiDConfig) else None
                with ak.patched(model, db, config, blender_weights=weights):
                    out[f"{db_name}/{name}/{which}"] = _janus_generate(model, do_sample, loop=loop)
        out[f"{db_name}/plain"] = _janus_generate(model, do_sample=False)
    return out


def _masked(work: Path, case: dict, rank: int, world: int) -> dict:
    """Masked (MaskGIT) decoding with DAiD on a token database, unsharded and sharded."""
    from arrag_kernels.masked import MaskedDAiD, MaskedDecodeConfig, masked_decode, tiny_maskgit, token_database

    gen = tiny_maskgit(seed=0)
    full = token_database(torch.randint(0, 512, (8, 8, 8), generator=torch.Generator().manual_seed(3)), gen)
    cfg = MaskedDecodeConfig(steps=6, start_fraction=0.0)
    out = {}
    for which, db in (("unsharded", full), ("sharded", full.distributed()), ("plain", None)):
        daid = None if db is None else MaskedDAiD(db, ak.DAiDConfig(lam=0.9, k=8), gen)
        out[which] = masked_decode(gen, torch.tensor([0, 3]), cfg, daid=daid, rng=torch.Generator().manual_seed(5))
    return out


def _logits(work: Path, case: dict, rank: int, world: int) -> dict:
    """The HF logits-processor path (DAiDLogitsProcessor in a tiny Llama's own generate)."""
    from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessorList

    codes, code0, grid = 64, 8, (3, 4)
    g = torch.Generator().manual_seed(0)
    codebook = torch.nn.functional.normalize(torch.randn(codes, 8, generator=g), dim=-1)
    full = ak.PatchDatabase.from_tokens(torch.randint(0, codes, (10, *grid), generator=g), codebook)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=code0 + codes, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
                                         pad_token_id=0)).eval()
    ids = torch.tensor([[1, 5, 6, 3], [1, 4, 7, 3]])  # prompt ending with the image-start token 3
    out = {}
    for which, db in (("unsharded", full), ("sharded", full.distributed()), ("plain", None)):
        processor = [] if db is None else [
            ak.DAiDLogitsProcessor(db, ak.DAiDConfig(lam=0.9, k=6), codebook, image_start_token_id=3,
                                   image_token_ids=torch.arange(code0, code0 + codes))]
        torch.manual_seed(2)
        out[which] = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=grid[0] * grid[1],
                                    min_new_tokens=grid[0] * grid[1], do_sample=True, top_k=0, pad_token_id=0,
                                    bad_words_ids=[[t] for t in range(code0)],
                                    logits_processor=LogitsProcessorList(processor))[:, ids.shape[1]:]
    return out


CASES = {"search": _search, "bad_shard": _bad_shard, "janus": _janus, "masked": _masked, "logits": _logits}


def main(rank: int, world: int, data: str, run: str) -> None:
    torch.set_num_threads(1)
    work, run = Path(data), Path(run)
    dist.init_process_group("gloo", init_method=f"file://{run / 'rendezvous'}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    results = {}
    try:
        for name, case in json.loads((run / "cases.json").read_text()).items():
            try:
                with ak.use_backend(case.get("backend", "auto")):
                    results[name] = CASES[case["kind"]](work, case, rank, world)
            except Exception as e:  # recorded for the test to check; the next case still runs
                results[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    finally:
        torch.save(results, run / f"rank{rank}.pt")
        dist.destroy_process_group()
