"""The vLLM check of :mod:`arrag_kernels.serving.vllm`: runs INSIDE .venv-vllm (scripts/setup_vllm.sh), started
by tests/test_vllm.py, which reads the JSON file it writes (not its output).

    .venv-vllm/bin/python tests/vllm_check.py RESULT.json

A tiny random Llama whose vocabulary holds 64 image tokens (ids 40..103; every request may only sample them,
``allowed_token_ids``) is saved to a temporary directory with a patch database of random 5 x 6 grids and its
codebook, and served by one vLLM engine (CPU, float32) with ``DAiDProcessor``. Every batch holds four requests:
r0 greedy, r1 seeded sampling with temperature / top-k / top-p (the DAiD requests when DAiD is on), r2
greedy and r3 seeded sampling (never DAiD). Checks:

* lam0: with lam = 0, r0 and r1 (their temperature / top-k / top-p in extra_args, vLLM's own neutral) give
  vLLM's own tokens exactly, and r2, r3 are unchanged;
* lam1: with lam = 1 (r0 with k = 6, r1 with k = 3, merged in separate groups), every token at a retrieval
  position is among the brute-force top-k of the database for the tokens generated before it (ties
  tolerated), the outputs differ from vLLM's own, and r2, r3 are unchanged;
* refused: a DAiD request with vLLM's own temperature 0.7 is refused at admission with the processor's message.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache: plenty for 4 requests of 40 tokens
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spin-waiting OpenMP threads crawl on a shared 2-core machine
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

BOS, EOS, BOI, OFFSET, CODES, VOCAB, GRID, D = 1, 2, 3, 40, 64, 128, (5, 6), 8
CELLS = GRID[0] * GRID[1]
K = {"r0": 6, "r1": 3}


def build_files(folder: Path):
    """The tiny model (saved as a HF checkpoint), the database and the codebook file; returns (db, codebook)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    import arrag_kernels as ak

    torch.manual_seed(0)
    # head_dim 64: vLLM's CPU attention kernels refuse small head sizes (16)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128, bos_token_id=BOS,
                         eos_token_id=EOS, pad_token_id=0, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # a wider logit spread than the default init's, so sampling is not near-uniform
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(folder / "model")
    g = torch.Generator().manual_seed(1)
    codebook = torch.nn.functional.normalize(torch.randn(CODES, D, generator=g), dim=-1)
    db = ak.PatchDatabase.from_tokens(torch.randint(0, CODES, (24, *GRID), generator=g), codebook)
    db.save(folder / "db")
    save_file({"codebook": codebook}, str(folder / "codebook.safetensors"))
    return db, codebook


def requests(daid: dict | None):
    """The batch's four (prompt, SamplingParams); ``daid``: r0's and r1's extra settings (None: DAiD off)."""
    from vllm import SamplingParams

    g = torch.Generator().manual_seed(3)
    prompts = [{"prompt_token_ids": [BOS, *torch.randint(4, OFFSET, (5,), generator=g).tolist(), BOI]}
               for _ in range(4)]
    image_tokens = list(range(OFFSET, OFFSET + CODES))
    common = dict(max_tokens=CELLS, ignore_eos=True, detokenize=False, allowed_token_ids=image_tokens)
    filters = dict(temperature=0.9, top_k=20, top_p=0.9)
    if daid is None:
        r0 = SamplingParams(temperature=0.0, **common)
        r1 = SamplingParams(seed=7, **filters, **common)
    else:
        def extra(**settings):  # flat keys, as vLLM's server passes them (vllm_xargs)
            settings = {**daid, "image_token_offset": OFFSET, **settings}
            return {f"arrag_daid_{key}": value for key, value in settings.items()}

        r0 = SamplingParams(temperature=0.0, extra_args=extra(k=K["r0"]), **common)
        r1 = SamplingParams(seed=7, extra_args=extra(k=K["r1"], grid=list(GRID), **filters), **common)
    r2 = SamplingParams(temperature=0.0, **common)
    r3 = SamplingParams(seed=11, temperature=0.8, **common)
    return prompts, [r0, r1, r2, r3]


def generate(llm, daid):
    prompts, params = requests(daid)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return {f"r{i}": list(out.outputs[0].token_ids) for i, out in enumerate(outputs)}


def among_brute_force_top_k(tokens: list[int], db, codebook, k: int) -> tuple[int, list[str]]:
    """(positions checked, failures): each retrieval position's code must be one of the entries whose exact
    distance to the position's query is within 1e-5 of the k-th smallest (ties at the k-th tolerated)."""
    from arrag_kernels.ops import neighbor_keys, retrieval_positions

    from tests.oracles import exact_distances

    cells = torch.tensor(tokens) - OFFSET
    failures, steps = [], retrieval_positions(GRID, db.meta.layout).nonzero().flatten().tolist()
    for step in steps:
        prefix = cells.clone()[None]
        prefix[:, step:] = -1
        query, _ = neighbor_keys(prefix, codebook, torch.tensor([step]), GRID, db.meta.layout)
        dist = exact_distances(query.reshape(1, -1), db.keys)[0]
        kth = dist.sort().values[k - 1]
        allowed = set(db.values[dist <= kth + 1e-5].tolist())
        if int(cells[step]) not in allowed:
            failures.append(f"step {step}: code {int(cells[step])} not among {sorted(allowed)}")
    return len(steps), failures


def main(out_path: str) -> int:
    result = {"checks": {}, "seconds": {}, "versions": {}}
    began = time.perf_counter()

    def check(name, passed, detail):
        result["checks"][name] = {"passed": bool(passed), "detail": detail}

    try:
        import vllm
        from vllm import LLM

        from arrag_kernels.serving.vllm import DAiDProcessor

        result["versions"] = {"vllm": vllm.__version__, "torch": torch.__version__}
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            db, codebook = build_files(folder)
            t = time.perf_counter()
            llm = LLM(model=str(folder / "model"), skip_tokenizer_init=True, dtype="float32", enforce_eager=True,
                      max_model_len=64, max_num_seqs=8, seed=0, logits_processors=[DAiDProcessor],
                      additional_config={"arrag_kernels": {"database": str(folder / "db"),
                                                           "codebook": str(folder / "codebook.safetensors")}})
            result["seconds"]["engine_start"] = round(time.perf_counter() - t, 1)
            t = time.perf_counter()
            plain = generate(llm, None)
            lam0 = generate(llm, {"lam": 0.0})
            lam1 = generate(llm, {"lam": 1.0})
            result["seconds"]["three_batches"] = round(time.perf_counter() - t, 1)
            result["tokens"] = {"plain": plain, "lam0": lam0, "lam1": lam1}

            differ = [r for r in plain if lam0[r] != plain[r]]
            check("lam0", not differ and len(set(map(tuple, plain.values()))) == 4,
                  f"requests differing from vLLM's own tokens: {differ or 'none'}")
            untouched = [r for r in ("r2", "r3") if lam1[r] != plain[r]]
            positions, failures = 0, []
            for r in ("r0", "r1"):
                n, bad = among_brute_force_top_k(lam1[r], db, codebook, K[r])
                positions, failures = positions + n, failures + [f"{r} {b}" for b in bad]
            changed = [r for r in ("r0", "r1") if lam1[r] != plain[r]]
            check("lam1", not untouched and not failures and positions > 0 and len(changed) == 2,
                  f"{positions} retrieval positions checked; failures: {failures or 'none'}; other requests changed: "
                  f"{untouched or 'none'}; DAiD requests changed by lam = 1: {changed}")

            prompts, params = requests({"lam": 0.5})
            params[0].temperature = 0.7
            try:
                llm.generate(prompts[:1], params[:1], use_tqdm=False)
                check("refused", False, "a DAiD request with vLLM temperature 0.7 was accepted")
            except Exception as e:  # vLLM's VLLMValidationError, carrying the processor's ValueError message
                check("refused", "must leave vLLM's temperature" in str(e), f"{type(e).__name__}: {e}")
    except Exception:  # reported in the JSON file: the test shows it
        result["error"] = traceback.format_exc()
    result["seconds"]["total"] = round(time.perf_counter() - began, 1)
    Path(out_path).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
