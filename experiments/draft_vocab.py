"""Ranks the target's tokens by how often they occur in a drafter's training answers and writes
the ranking into the drafter's directory, for drafting from the N most frequent only
(psjax.drafters.draft_vocab: FR-Spec's frequency-ranked draft vocabulary).

From the repository root, after training and export (the data: the drafter's
--config.data.jsonl_dir directories of self-distilled or raw answers):

    PYTHONPATH=. python3 experiments/draft_vocab.py \
        --data /tmp/distilled/qwen05b,/tmp/conversation/qwen05b --drafter /tmp/out/drafter_qwen05b

Then `psjax.load_drafter(dir, target, draft_vocab=32768)`, or Spec-Bench methods with a `_vN`
suffix (`eval_specbench.py --methods ar,parallelspec_lookup,parallelspec_lookup_v32768`). It
prints, and writes to --out, the share of the answers' tokens the N most frequent cover.
"""

from __future__ import annotations

import json
import os

from absl import app, flags, logging

from psjax.convert import drafter_hf
from psjax.data import self_distill
from psjax.drafters import draft_vocab

_DATA = flags.DEFINE_list("data", None, "directories of JSONL answer shards (generate_data.py's)",
                          required=True)
_DRAFTER = flags.DEFINE_string("drafter", None, "the exported drafter's directory: the ranking "
                               f"goes into it as {draft_vocab.FILE}", required=True)
_SIZES = flags.DEFINE_list("sizes", ["4096", "8192", "16384", "32768", "65536"],
                           "vocabulary sizes whose coverage is reported")
_OUT = flags.DEFINE_string("out", "", "JSON file for the coverage ('' = none)")


def main(argv):
    del argv
    config = drafter_hf.config_from_dict(_drafter_config(_DRAFTER.value))
    missing = [d for d in _DATA.value if not self_distill.shard_paths(d)]
    if missing:
        raise FileNotFoundError(f"no answer shards in {missing}: give the directories the "
                                "drafter was trained on (generate_data.py --out_dir)")
    answers = (r["answer_tokens"] for d in _DATA.value for r in self_distill.iter_records(d))
    counts = draft_vocab.count(answers, config.target.vocab_size)
    path = draft_vocab.save(_DRAFTER.value, counts)
    covered = draft_vocab.coverage(counts, [int(n) for n in _SIZES.value])
    summary = {"data": _DATA.value, "answer_tokens": int(counts.sum()),
               "distinct_tokens": int((counts > 0).sum()),
               "vocab_size": config.target.vocab_size,
               "coverage": {str(n): round(c, 5) for n, c in covered.items()}}
    logging.info("wrote %s: %s", path, json.dumps(summary))
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump(summary, f, indent=1)


def _drafter_config(directory: str) -> dict:
    path = os.path.join(directory, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: --drafter is the directory "
                                "experiments/export_hf.py wrote")
    with open(path) as f:
        return json.load(f)


if __name__ == "__main__":
    app.run(main)
