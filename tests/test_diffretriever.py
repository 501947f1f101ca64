"""DiffRetriever (decode/retrieval.py): scores by hand on toys, limiting cases of the readers (K = 1 is the single
mask read; the sequential and AR readers' first vector is the one-pass read; an identical text retrieves itself),
the AR reader against an uncached causal forward, and the synthetic arithmetic-equivalence set."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxtok.decode import retrieval as R
from jaxtok.models import Decoder, presets
from jaxtok.tasks.retrieval import arith_equivalence, encode_texts, retrieval_prompt
from jaxtok.tasks.tokenizer import build_tokenizer

MASK = 3
EXCLUDE = (0, 1, 2, 3)


@pytest.fixture(scope="module")
def model():
    return Decoder(presets.get("tiny_diffusion", vocab_size=61), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def texts():
    tok = build_tokenizer()
    s = arith_equivalence(seed=1)
    prompts = [retrieval_prompt(q) for q in s.queries[:6]]
    return encode_texts(tok, prompts, 14)


# ----------------------------------------------------------------------------------------------------------------
# Scores by hand
# ----------------------------------------------------------------------------------------------------------------


def test_maxsim_and_mean_by_hand():
    q = jnp.asarray([[[1.0, 0.0], [0.0, 1.0]]])  # one query, two unit vectors
    p = jnp.asarray([[[1.0, 0.0], [1.0, 0.0]],  # matches q_0 only: (1 + 0) / 2
                     [[0.6, 0.8], [0.0, 1.0]]])  # q_0 best 0.6, q_1 best 1.0: 0.8
    np.testing.assert_allclose(R.maxsim_scores(q, p), [[0.5, 0.8]], atol=1e-6)
    # mean pooling: q -> (0.5, 0.5)/|.| = (1,1)/√2; p_0 -> (1,0); p_1 -> (0.3, 0.9)/|.|
    m1 = (0.3 + 0.9) / np.sqrt(2) / np.sqrt(0.09 + 0.81)
    np.testing.assert_allclose(R.mean_dense_scores(q, p), [[1 / np.sqrt(2), m1]], atol=1e-6)


def test_sparse_weights_and_scores_by_hand():
    logits = jnp.asarray([[[2.0, -1.0, 0.5, 9.0], [1.0, 3.0, -2.0, 9.0]]])  # [B=1, K=2, V=4]
    w = R.sparse_weights(logits, exclude_ids=(3,))
    np.testing.assert_allclose(w, [[np.log(3.0), np.log(4.0), np.log(1.5), 0.0]], atol=1e-6)
    q = jnp.asarray([[1.0, 0.0, 2.0]])
    p = jnp.asarray([[3.0, 5.0, 0.5], [0.0, 1.0, 0.0]])
    np.testing.assert_allclose(R.sparse_scores(q, p), [[4.0, 0.0]])
    np.testing.assert_allclose(R.minmax_rows(jnp.asarray([[1.0, 3.0, 2.0], [5.0, 5.0, 5.0]])),
                               [[0.0, 1.0, 0.5], [0.0, 0.0, 0.0]])


def test_recall_ranks_ties_against_the_query():
    s = np.array([[0.9, 0.1, 0.5], [0.2, 0.2, 0.2], [0.3, 0.8, 0.1]])
    r = R.recall_at(s, [0, 1, 0], ks=(1, 2))
    # q0 rank 1; q1 ties with everything -> rank 3; q2 rank 2
    assert r == {"recall@1": 1 / 3, "recall@2": 2 / 3, "mrr": pytest.approx((1 + 1 / 3 + 1 / 2) / 3)}


# ----------------------------------------------------------------------------------------------------------------
# Readers: limiting cases
# ----------------------------------------------------------------------------------------------------------------


def test_k1_is_the_single_mask_read(model, texts):
    ids, valid = texts
    reps = R.encode_parallel(model, ids, valid, k=1, tail=0, exclude_ids=EXCLUDE)
    tokens, v = R.append_masks(ids, valid, 1, MASK)
    out = model(tokens, valid=v, attention="bidirectional", return_hidden=True)
    h = out.hidden[:, -1]
    np.testing.assert_allclose(reps.dense[:, 0], h / np.linalg.norm(h, axis=-1, keepdims=True), atol=1e-5)
    lg = np.asarray(out.logits[:, -1]).copy()
    want = np.log1p(np.maximum(lg, 0.0))
    want[:, list(EXCLUDE)] = 0.0
    np.testing.assert_allclose(reps.sparse, want, atol=1e-5)
    lg[:, MASK] = -np.inf
    np.testing.assert_array_equal(reps.tokens[:, 0], lg.argmax(-1))


@pytest.mark.slow
def test_sequential_reader_starts_with_the_one_pass_read(model, texts):
    ids, valid = texts
    par = R.encode_parallel(model, ids, valid, k=3, tail=2, exclude_ids=EXCLUDE)
    seq = R.encode_sequential(model, ids, valid, k=3, tail=2, exclude_ids=EXCLUDE)
    np.testing.assert_allclose(seq.dense[:, 0], par.dense[:, 0], atol=1e-5)
    np.testing.assert_array_equal(seq.tokens[:, 0], par.tokens[:, 0])
    # with K = 1 the two readers are the same forward
    p1 = R.encode_parallel(model, ids, valid, k=1, tail=2, exclude_ids=EXCLUDE)
    s1 = R.encode_sequential(model, ids, valid, k=1, tail=2, exclude_ids=EXCLUDE)
    np.testing.assert_allclose(s1.dense, p1.dense, atol=1e-5)
    np.testing.assert_allclose(s1.sparse, p1.sparse, atol=1e-5)
    # later sequential reads see the committed tokens: position 1 is read with position 0 = its argmax
    x, v = R.append_masks(ids, valid, 5, MASK)
    x = x.at[:, ids.shape[1]].set(seq.tokens[:, 0])
    h = model(x, valid=v, attention="bidirectional", return_hidden=True).hidden[:, ids.shape[1] + 1]
    np.testing.assert_allclose(seq.dense[:, 1], h / np.linalg.norm(h, axis=-1, keepdims=True), atol=1e-5)


def test_identical_texts_retrieve_themselves(model, texts):
    ids, valid = texts
    reps = R.encode_parallel(model, ids, valid, k=4, tail=1, exclude_ids=EXCLUDE)
    res = R.score_all(reps, reps, np.arange(ids.shape[0]), ks=(1,))
    assert res["dense"]["recall@1"] == 1.0 and res["dense_mean"]["recall@1"] == 1.0
    assert res["sparse_cos"]["recall@1"] == 1.0  # (the raw sparse dot product need not peak at itself)
    np.testing.assert_allclose(np.diag(R.maxsim_scores(reps.dense, reps.dense)), 1.0, atol=1e-5)


@pytest.mark.slow
def test_autoregressive_reader_matches_uncached_causal_forwards(texts):
    ids, valid = texts
    ar = Decoder(presets.get("tiny_draft", vocab_size=61), rngs=nnx.Rngs(1))
    reps = R.encode_autoregressive(ar, ids, valid, k=3, exclude_ids=EXCLUDE)
    seq = jnp.asarray(ids)
    v = jnp.asarray(valid)
    for j in range(3):  # representative j is read at the last column of prompt + j greedy tokens
        out = ar(seq, valid=v, attention="causal", return_hidden=True)
        h = out.hidden[:, -1]
        np.testing.assert_allclose(reps.dense[:, j], h / np.linalg.norm(h, axis=-1, keepdims=True), atol=1e-4)
        nxt = jnp.argmax(out.logits[:, -1], -1).astype(jnp.int32)
        np.testing.assert_array_equal(reps.tokens[:, j], nxt)
        seq = jnp.concatenate([seq, nxt[:, None]], 1)
        v = jnp.concatenate([v, jnp.ones((v.shape[0], 1), bool)], 1)


def test_bad_k_is_refused(model, texts):
    with pytest.raises(ValueError, match="k=0"):
        R.encode_parallel(model, *texts, k=0)
    with pytest.raises(ValueError, match="tail=-1"):
        R.encode_sequential(model, *texts, k=2, tail=-1)


# ----------------------------------------------------------------------------------------------------------------
# The synthetic set
# ----------------------------------------------------------------------------------------------------------------


def test_arith_equivalence_relevance_is_the_value():
    s = arith_equivalence(digits=2, queries_per_value=2, seed=3)
    assert len(s.passages) == 199 and len(s.queries) == 199  # value 99 has one subtraction (99-0)
    for q, r in zip(s.queries, s.relevant):
        assert eval(q) == eval(s.passages[r])  # noqa: S307 (our own digit strings)
    assert sorted(eval(p) for p in s.passages) == list(range(199))  # noqa: S307
    assert retrieval_prompt("12-3") == "12-3=12-3=" and retrieval_prompt("12-3", "plain") == "12-3="
