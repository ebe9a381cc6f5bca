"""The DAiD retrieval gate's curve on the miniature: NLL at retrieval positions against searches saved.

For each ``DAiDConfig.gate`` (max-probability and entropy thresholds), the teacher-forced NLL
(``image_nll``: conditional distribution, the evaluation's DAiD settings lam 0.2, tau 0.3, k 256,
the cell val NLL chose) of the val and test splits and the fraction of (image, retrieval position)
pairs whose search the gate skips; plain and ungated DAiD bracket the curve. Writes a JSON file:

    PYTHONPATH=. OMP_NUM_THREADS=2 python scripts/daid_gate_curve.py --out docs/miniature/gate.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from arrag_kernels.config import DAiDConfig
from arrag_kernels.eval.nll import image_nll, paired_sem
from arrag_kernels.miniature.evaluate import MiniatureRun


def gate_curve(run: MiniatureRun, prompts, tokens, daid: DAiDConfig, gates) -> dict:
    """Plain, then DAiD under each gate of ``gates`` (None: ungated) on one split."""
    plain = image_nll(run.model, prompts, tokens)
    r = plain.retrieval
    plain_ret = plain.nll[:, r].mean(1)
    rows = []
    for gate in gates:
        result = image_nll(run.model, prompts, tokens, run.db, DAiDConfig(**{**daid.to_dict(), "gate": gate}))
        ret = result.nll[:, r].mean(1)
        rows.append({"gate": list(gate) if gate else None, "nll_retrieval": float(ret.mean()),
                     "gain_vs_plain": float((plain_ret - ret).mean()), "gain_vs_plain_sem": paired_sem(plain_ret, ret),
                     "searches_saved": result.summary().get("searches_saved", 0.0)})
    return {"images": int(tokens.shape[0]), "retrieval_positions": int(r.sum()),
            "plain_nll_retrieval": float(plain_ret.mean()), "gates": rows}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/miniature/gate.json")
    ap.add_argument("--max-probs", default="0.05,0.1,0.2,0.3,0.5,0.7,0.9,0.95")
    ap.add_argument("--entropies", default="5,4,3,2", help="entropy thresholds in nats")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    daid = DAiDConfig(lam=0.2, tau=0.3, k=256)
    gates = ([None] + [("max_prob", float(t)) for t in args.max_probs.split(",") if t]
             + [("entropy", float(t)) for t in args.entropies.split(",") if t])
    run = MiniatureRun(progress=False)
    splits = {}
    for name in ("val", "test"):
        prompts, _, tokens = run.split(name)
        splits[name] = gate_curve(run, prompts, tokens, daid, gates)
        print(name, json.dumps(splits[name], indent=1), flush=True)
    out = {
        "what": "teacher-forced NLL (nats/token, conditional distribution) of the shipped miniature model at "
                "retrieval positions under DAiD with DAiDConfig.gate, and the fraction of (image, retrieval "
                "position) searches the gate skips (rows left to the model); gain = plain - DAiD per image, "
                "mean and paired standard error over images",
        "daid": {k: v for k, v in daid.to_dict().items() if k != "gate"}, "database_entries": len(run.db),
        "splits": splits, "wall_s": time.perf_counter() - t0, "torch": torch.__version__,
        "command": "PYTHONPATH=. OMP_NUM_THREADS=2 python scripts/daid_gate_curve.py --out docs/miniature/gate.json",
    }
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
