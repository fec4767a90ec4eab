"""What a turn costs besides its steps, from a Spec-Bench run's own records.

For each method and prompt width (512 for most categories, 2,048 for Summarization and
Retrieval-aug. Generation), a least-squares line seconds = fixed + per_step x steps over the
turns (steps: the accepted list's length, or the tokens for `ar`): `fixed` is the prompt pass and
whatever else a call costs once. Also the mean speedup over `ar` of turns under and over 64
tokens, and the speedup by total time. Usage, from the repository root:

    python3 results/call_cost_h200/fixed_cost.py \
        results/specbench_qwen05b_h200_480q_1024_verify_matmuls/questions.jsonl \
        results/specbench_qwen05b_h200_480q_1024_prompt_pass/questions.jsonl \
        results/specbench_qwen05b_h200_480q_1024_chunked_attention/questions.jsonl \
        > results/call_cost_h200/fixed_cost.json
"""
import collections
import json
import sys

import numpy as np

WIDE = {"Summarization", "Retrieval-aug. Generation"}  # prompts padded to 2,048 in these runs


def analyse(path: str) -> dict:
    rows = [json.loads(line) for line in open(path)]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    turns = collections.defaultdict(dict)
    for r in rows:
        turns[(r["question_id"], r["turn"])][r["method"]] = r
    out = {}
    for m in methods:
        row = {}
        for width, wide in (("512", False), ("2048", True)):
            sel = [r for r in rows if r["method"] == m and (r["category"] in WIDE) == wide]
            steps = np.array([len(r["accepted"]) if r["accepted"] else r["tokens"] for r in sel],
                             float)
            seconds = np.array([r["seconds"] for r in sel])
            (fixed, per_step), *_ = np.linalg.lstsq(
                np.stack([np.ones_like(steps), steps], 1), seconds, rcond=None)
            row[width] = {"turns": len(sel), "fixed_ms": round(1e3 * fixed, 2),
                          "per_step_ms": round(1e3 * per_step, 3)}
        if m != "ar":
            for name, keep in (("under_64_tokens", lambda n: n < 64),
                               ("64_tokens_or_more", lambda n: n >= 64)):
                ratios = [t[m]["tokens_per_s"] / t["ar"]["tokens_per_s"] for t in turns.values()
                          if m in t and keep(t["ar"]["tokens"])]
                row[f"mean_speedup_{name}"] = {"turns": len(ratios),
                                               "speedup": round(float(np.mean(ratios)), 3)}
            speed = lambda k: (sum(r["tokens"] for r in rows if r["method"] == k)
                               / sum(r["seconds"] for r in rows if r["method"] == k))
            row["speedup_by_total_time"] = round(speed(m) / speed("ar"), 3)
        out[m] = row
    return out


if __name__ == "__main__":
    print(json.dumps({path: analyse(path) for path in sys.argv[1:]}, indent=1))
