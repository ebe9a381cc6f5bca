"""Fold studies run on their own (gate, DAiD sweep, paper recipe, RA-CM3 grid, FAiD ablation) into a results.json.

``arrag-kernels eval --paper-recipe 0,1,2 --studies docs/miniature`` writes one results.json with everything;
this is for a results.json whose studies were computed apart (``arrag_kernels.miniature.evaluate.add_studies``:
each file's content under its key, and the command that wrote it under ``provenance``)::

    python scripts/merge_studies.py docs/miniature/results.json paper_recipe=docs/miniature/paper_recipe.json \\
        ra_cm3_own_grid=docs/miniature/ra_cm3_grid.json faid_zero_retrieval=docs/miniature/faid_zero_retrieval.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from arrag_kernels.miniature.evaluate import STUDY_SCRIPTS, add_studies


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path, help="results.json to update in place")
    ap.add_argument("studies", nargs="+", help="KEY=FILE, KEY one of " + ", ".join(STUDY_SCRIPTS))
    args = ap.parse_args(argv)
    studies = {}
    for item in args.studies:
        key, sep, path = item.partition("=")
        if not sep:
            ap.error(f"expected KEY=FILE, got {item!r}")
        studies[key] = path
    args.results.write_text(json.dumps(add_studies(json.loads(args.results.read_text()), studies), indent=2))


if __name__ == "__main__":
    main()
