"""The one decode-and-score loop (jaxtok.decode.evaluate) with a scripted step: no model, no compile.

Checked: padding rows of a short last batch never count (scores, tokens, per-row stats), batch totals are summed
as they are, derived metrics come from the sums, and the per-batch keys are ``fold_in(key, i)`` (over-long prompts
in the denominator: tests/test_file_data.py's held-out eval).
"""

import jax
import numpy as np

from jaxtok.decode.evaluate import add_stats, evaluate, summarize
from jaxtok.tasks import build_tokenizer, make_task

TOK = build_tokenizer()
TASK = make_task("arith", {"digits": 1, "steps": 1, "ops": "+"})


def test_add_stats_and_summarize_count_real_rows_only():
    sums: dict = {}
    add_stats(sums, {"nfe": np.array([3, 4, 100]), "forwards": np.int64(7)}, rows=2)
    add_stats(sums, {"nfe": np.array([5, 100, 100]), "forwards": np.int64(7)}, rows=1)
    assert int(sums["nfe"]) == 12 and int(sums["forwards"]) == 14
    out = summarize(sums, n_tok=24, rows=3)
    assert out["mean_nfe"] == 4.0 and out["tokens_per_nfe"] == 2.0 and out["mean_length"] == 8.0
    assert out["forwards"] == 14 and isinstance(out["forwards"], int)
    spec = summarize({"row_forwards": np.int64(4), "rounds": np.int64(2), "accepted": np.int64(3),
                      "drafted": np.int64(4), "accepted_by_position": np.array([2, 1]),
                      "drafted_by_position": np.array([2, 0]), "route_counts": np.array([2])}, n_tok=8, rows=2)
    assert spec["tokens_per_target_forward"] == 2.0 and spec["acceptance_rate"] == 0.75
    assert spec["acceptance_rate_by_position"] == [1.0, None] and spec["route_counts"] == [2]


def test_evaluate_pads_scores_and_sums_real_rows():
    seen = []

    def step(prompt, valid, key):  # every row answers with its own prompt's first token (never correct)
        seen.append((prompt.shape, jax.random.key_data(key).tolist()))
        b = prompt.shape[0]
        return prompt[:, -2:], np.ones((b, 2), bool), {"nfe": np.arange(1, b + 1), "forwards": np.int64(10)}

    key = jax.random.key(3)
    m, rows = evaluate(step, TASK, TOK, prompt_len=64, batch_size=4, num_examples=6, key=key, num_samples=5,
                       sample_stats=("nfe",))
    # 2 batches (4 + 2 real rows, the second padded to 4), the first decoded once more untimed
    assert [s for s, _ in seen] == [(4, 64)] * 3
    assert seen[0][1] == seen[1][1] == jax.random.key_data(jax.random.fold_in(key, 0)).tolist()
    assert seen[2][1] == jax.random.key_data(jax.random.fold_in(key, 1)).tolist()
    assert m["num_examples"] == 6 and m["decoded"] == 6 and m["overlong_prompts"] == 0
    assert m["generated_tokens"] == 12  # 2 per real row; the padding rows' tokens are not counted
    assert m["mean_nfe"] == (1 + 2 + 3 + 4 + 1 + 2) / 6  # per-row stats over the real rows only
    assert m["forwards"] == 20  # batch totals of the 2 timed calls summed as they are (not the untimed one)
    assert m["exact_match"] == 0.0 and m["compile_s"] is not None and m["wall_s"] > 0
    assert len(rows) == 5 and [r["nfe"] for r in rows] == [1, 2, 3, 4, 1]
