"""A synthetic retrieval set the zoo's arithmetic models can read (DiffRetriever, decode_methods.md B22).

Relevance is *meaning*, not surface form: passages are additions ``c+d`` (one per value ``0 .. 2·(10^digits - 1)``,
operands drawn at random), queries are subtractions ``e-f`` whose value equals exactly one passage's (values
``0 .. 10^digits - 1``, ``queries_per_value`` each). A query shares no operand structure with its passage, so lexical
overlap of the raw texts is near chance; what links them is the answer the model computes.

Retrieval prompt (``template``): ``restate`` (default) writes ``{expr}={expr}=``, the zoo task's prompt followed by the
restated expression its worked answer starts with, so the first masked position is the answer's first digit (the
analogue of PromptReps' ``... in one word: "`` suffix); ``plain`` writes the task prompt ``{expr}=`` only (the masks
then start with the restatement). Offline, deterministic in ``seed``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

TEMPLATES = ("restate", "plain")


@dataclasses.dataclass(frozen=True)
class RetrievalSet:
    """``queries`` / ``passages`` expression strings, ``relevant[q]`` the index of query q's passage, ``values`` of
    queries and passages (for inspection)."""

    queries: tuple[str, ...]
    passages: tuple[str, ...]
    relevant: np.ndarray  # [Q] int
    query_values: np.ndarray  # [Q]
    passage_values: np.ndarray  # [P]


def arith_equivalence(digits: int = 2, queries_per_value: int = 1, seed: int = 0) -> RetrievalSet:
    """The set described in the module docstring."""
    if not 1 <= digits <= 3:
        raise ValueError(f"digits={digits}: allowed 1..3")
    if queries_per_value < 1:
        raise ValueError(f"queries_per_value={queries_per_value}: allowed >= 1")
    rng = np.random.default_rng(seed)
    top = 10**digits - 1
    passages, pvals = [], []
    for v in range(2 * top + 1):
        c = int(rng.integers(max(0, v - top), min(v, top) + 1))
        passages.append(f"{c}+{v - c}")
        pvals.append(v)
    queries, qvals = [], []
    for v in range(top + 1):
        for e in rng.choice(np.arange(v, top + 1), size=min(queries_per_value, top + 1 - v), replace=False):
            queries.append(f"{int(e)}-{int(e) - v}")
            qvals.append(v)
    qvals = np.asarray(qvals)
    return RetrievalSet(tuple(queries), tuple(passages), qvals.copy(), qvals, np.asarray(pvals))


def retrieval_prompt(expr: str, template: str = "restate") -> str:
    """The text the model reads before the masks (module docstring)."""
    if template == "restate":
        return f"{expr}={expr}="
    if template == "plain":
        return f"{expr}="
    raise ValueError(f"template={template!r}: allowed {list(TEMPLATES)}")


def encode_texts(tok, texts, prompt_len: int) -> tuple[np.ndarray, np.ndarray]:
    """``<bos> text`` LEFT-padded to ``prompt_len``: ``(ids [N, prompt_len], valid [N, prompt_len])``."""
    from jaxtok.tasks.tokenizer import SpecialTokens

    pad = SpecialTokens.of(tok).pad
    ids = np.full((len(texts), prompt_len), pad, np.int32)
    valid = np.zeros((len(texts), prompt_len), bool)
    for i, t in enumerate(texts):
        row = tok.encode_prompt(t)
        if len(row) > prompt_len:
            raise ValueError(f"text {t!r}: {len(row)} tokens > prompt_len={prompt_len}")
        ids[i, prompt_len - len(row):] = row
        valid[i, prompt_len - len(row):] = True
    return ids, valid
