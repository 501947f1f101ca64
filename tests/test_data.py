"""Data pipelines: SFT/prompt encoding hand cases, over-long policy, resumable grain iterators, file datasets,
config adapter."""

import dataclasses
import json
import logging

import numpy as np
import pytest

from jaxtok.config import DataSection
from jaxtok.data import (DropCounter, FileTask, OverlongError, encode_prompt, encode_sft, examples_of, from_config,
                         prompt_dataset, sft_dataset)
from jaxtok.registry import ConfigError
from jaxtok.tasks import Example, build_tokenizer, make_task
from jaxtok.tasks.tokenizer import decode, encode

TOK = build_tokenizer()
ID = {c: TOK.token_to_id(c) for c in "0123456789+>="}
PAD, BOS, EOS = 0, 1, 2


def test_encode_sft_hand_case():
    ex = Example(prompt="1+2=", target="3>3", answer="3")
    row = encode_sft(TOK, ex, 11)
    want = [BOS, ID["1"], ID["+"], ID["2"], ID["="], ID["3"], ID[">"], ID["3"], EOS, PAD, PAD]
    assert row["tokens"].dtype == np.int32 and row["tokens"].tolist() == want
    assert row["valid"].tolist() == [True] * 9 + [False] * 2
    # token t is predicted from position t-1: the mask covers the target and <eos>, never <bos>/prompt/padding
    assert row["loss_mask"].tolist() == [False] * 5 + [True] * 4 + [False] * 2
    assert row["positions"].tolist()[:9] == list(range(9))
    assert decode(TOK, row["tokens"][row["loss_mask"]], stop_at_eos=False) == "3>3"


def test_encode_sft_exact_fit_and_overlong_policies():
    ex = Example(prompt="1+2=", target="3>3", answer="3")  # 9 tokens
    assert encode_sft(TOK, ex, 9)["valid"].all()
    counter = DropCounter("SFT", 8)
    assert encode_sft(TOK, ex, 8, index=4, counter=counter) is None
    assert counter.count == 1
    with pytest.raises(OverlongError, match=r"example 17: 9 tokens > data.seq_len=8"):
        encode_sft(TOK, ex, 8, "error", index=17)
    with pytest.raises(ValueError, match="overlong='truncate'"):
        encode_sft(TOK, ex, 8, "truncate")


def test_encode_prompt_left_padded():
    ex = Example(prompt="12=", target="", answer="")
    row = encode_prompt(TOK, ex, 6, index=3)
    assert row["prompt"].tolist() == [PAD, PAD, BOS, ID["1"], ID["2"], ID["="]]
    assert row["prompt_valid"].tolist() == [False, False, True, True, True, True]
    assert int(row["index"]) == 3
    assert encode_prompt(TOK, ex, 4)["prompt_valid"].all()
    assert encode_prompt(TOK, ex, 3) is None
    with pytest.raises(OverlongError, match="prompt 5: 4 tokens > data.prompt_len=3"):
        encode_prompt(TOK, ex, 3, "error", index=5)


def test_unknown_characters_are_rejected_not_padded():
    with pytest.raises(ValueError, match="does not know"):
        encode_sft(TOK, Example(prompt="What is 1+2?", target="3", answer="3"), 32)


def _lengths(task, n):
    return [2 + len(task.example("train", i).prompt) + len(task.example("train", i).target) for i in range(n)]


def test_sft_pipeline_drops_and_counts_overlong(caplog):
    task = make_task("arith", {"digits": 2, "steps": 2})
    lengths = _lengths(task, 120)
    seq_len = int(np.median(lengths))
    n_long = sum(length > seq_len for length in lengths)
    assert 0 < n_long < 120
    with caplog.at_level(logging.WARNING, logger="jaxtok.data"):
        ds, dropped = sft_dataset(task, "train", TOK, seq_len=seq_len, batch_size=4, num_examples=120, num_epochs=1,
                                  shuffle=False)
    warnings = [r.getMessage() for r in caplog.records if "over-long" in r.getMessage()]
    assert len(warnings) == 1 and f"{n_long} of the first 120" in warnings[0]
    batches = list(ds)
    rows = sum(b["tokens"].shape[0] for b in batches)
    assert dropped.count == n_long
    assert rows == (120 - n_long) // 4 * 4  # full batches only
    for b in batches:
        assert b["tokens"].shape == (4, seq_len) and b["valid"][:, 0].all()
        assert (b["valid"].sum(1) <= seq_len).all() and (b["loss_mask"] <= b["valid"]).all()


def test_sft_pipeline_error_policy_and_nothing_fits():
    task = make_task("arith", {"digits": 2, "steps": 2})
    lengths = _lengths(task, 50)
    first_long = next(i for i, length in enumerate(lengths) if length > min(lengths))
    with pytest.raises(OverlongError, match=rf"example {first_long}: {lengths[first_long]} tokens > data.seq_len"):
        sft_dataset(task, "train", TOK, seq_len=min(lengths), batch_size=2, num_examples=50, overlong="error",
                    shuffle=False)
    with pytest.raises(OverlongError, match="none of the first 50"):
        sft_dataset(task, "train", TOK, seq_len=6, batch_size=2, num_examples=50)


def test_sft_iterator_resumes_exactly_across_epochs():
    task = make_task("arith", {"digits": 2, "steps": 1})

    def pipeline():
        return sft_dataset(task, "train", TOK, seq_len=24, batch_size=4, num_examples=22, seed=5)[0]

    it = iter(pipeline())
    first = [next(it)["tokens"] for _ in range(5)]
    state = it.get_state()
    want = [next(it) for _ in range(3)]  # batches 6-8 cross the epoch boundary at 22 examples
    fresh = iter(pipeline())
    fresh.set_state(state)
    for w in want:
        got = next(fresh)
        for k in ("tokens", "positions", "valid", "loss_mask"):
            np.testing.assert_array_equal(got[k], w[k])
    # a different seed gives a different order; the same seed the same one
    other = iter(sft_dataset(task, "train", TOK, seq_len=24, batch_size=4, num_examples=22, seed=6)[0])
    assert not np.array_equal(next(other)["tokens"], first[0])
    np.testing.assert_array_equal(next(iter(pipeline()))["tokens"], first[0])


def test_prompt_dataset_covers_eval_once_and_recovers_examples():
    task = make_task("sort", {"length": 3})
    ds, _ = prompt_dataset(task, "eval", TOK, prompt_len=12, batch_size=3, num_examples=7)
    batches = list(ds)
    assert [b["prompt"].shape for b in batches] == [(3, 12), (3, 12), (1, 12)]
    assert np.concatenate([b["index"] for b in batches]).tolist() == list(range(7))
    b = batches[1]
    for row, ex in enumerate(examples_of(task, "eval", b)):
        assert ex == task.example("eval", 3 + row)
        assert decode(TOK, b["prompt"][row][b["prompt_valid"][row]]) == ex.prompt
        assert b["prompt_valid"][row, -1] and b["prompt"][row, -1] == TOK.token_to_id("=")


def test_prompt_iterator_resumes_exactly():
    task = make_task("countdown", {})

    def pipeline():
        return prompt_dataset(task, "train", TOK, prompt_len=24, batch_size=2, num_examples=9, shuffle=True,
                              num_epochs=None, drop_remainder=True, seed=1)[0]

    it = iter(pipeline())
    for _ in range(5):
        next(it)
    state = it.get_state()
    want = [next(it)["index"] for _ in range(3)]
    fresh = iter(pipeline())
    fresh.set_state(state)
    assert [next(fresh)["index"].tolist() for _ in range(3)] == [w.tolist() for w in want]


def _write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")


def test_jsonl_field_mapping(tmp_path):
    p = tmp_path / "d.jsonl"
    _write_jsonl(p, [{"q": f"{i}+1=", "a": i + 1, "sol": f"{i}+1={i + 1}>{i + 1}"} for i in range(5)])
    task = FileTask.load(str(p), "jsonl", prompt_field="q", answer_field="a")
    assert len(task) == 5
    ex = task.example("train", 2)
    # file data keep no synthetic-task format: the target is the answer as written, the answer the whole completion
    assert (ex.prompt, ex.answer, ex.target) == ("2+1=", "3", "3")
    assert task.reward(" 3\n", ex) == 1.0 and task.reward(">3", ex) == 0.0 and task.reward("4", ex) == 0.0
    with_target = FileTask.load(str(p), "jsonl", prompt_field="q", answer_field="a", target_field="sol")
    row = encode_sft(TOK, with_target.example("train", 2), 16)
    assert decode(TOK, row["tokens"][row["loss_mask"]], stop_at_eos=False) == "2+1=3>3"
    with pytest.raises(ConfigError, match="'question'"):
        FileTask.load(str(p), "jsonl", prompt_field="question", answer_field="a")
    with pytest.raises(ConfigError, match="data.train_files: .*missing.jsonl"):
        FileTask.load(str(tmp_path / "missing.jsonl"), "jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"q": "1=", "a": 1}\n{oops\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        FileTask.load(str(bad), "jsonl", prompt_field="q", answer_field="a")


def test_parquet_needs_pyarrow_or_reads(tmp_path):
    p = tmp_path / "d.parquet"
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        p.write_bytes(b"PAR1")
        with pytest.raises(ImportError, match="pip install pyarrow"):
            FileTask.load(str(p), "parquet")
    else:
        pq.write_table(pa.table({"prompt": ["1+1="], "answer": ["2"]}), str(p))
        assert FileTask.load(str(p), "parquet").example("train", 0).answer == "2"
        assert FileTask.from_files(eval_files=[str(p)]).example("eval", 0).answer == "2"  # format by extension


def test_from_config_synthetic_and_jsonl(tmp_path):
    section = DataSection(task="arith", task_args={"digits": 1, "steps": 1}, seq_len=16, prompt_len=8, batch_size=4,
                          num_train=50, num_eval=6, seed=2)
    task, ds, _ = from_config(section, TOK, "train")
    b = next(iter(ds))
    assert b["tokens"].shape == (4, 16) and b["loss_mask"].any(1).all()
    task, ds, _ = from_config(section, TOK, "eval", kind="prompt")
    batches = list(ds)
    assert [x["prompt"].shape[0] for x in batches] == [4, 2]
    assert examples_of(task, "eval", batches[0])[0] == task.example("eval", 0)

    p = tmp_path / "d.jsonl"
    _write_jsonl(p, [{"question": f"{i}+{i}=", "ans": 2 * i} for i in range(6)])
    section = dataclasses.replace(section, task="jsonl", path=str(p), prompt_field="question", answer_field="ans")
    task, ds, _ = from_config(section, TOK, "train", kind="prompt")  # data.path is the train split
    first = next(iter(ds))
    assert sorted(decode(TOK, r[v]) for r, v in zip(first["prompt"], first["prompt_valid"])) < ["5"]
    with pytest.raises(ConfigError, match="data.eval_files is empty"):  # no eval file: no eval split
        from_config(section, TOK, "eval", kind="prompt")
    with pytest.raises(ValueError, match="split='test'"):
        from_config(section, TOK, "test")


def test_bad_sizes_rejected():
    task = make_task("sort", {})
    with pytest.raises(ValueError, match="batch_size=0"):
        sft_dataset(task, "train", TOK, seq_len=32, batch_size=0, num_examples=10)
    with pytest.raises(ValueError, match="overlong='clip'"):
        prompt_dataset(task, "eval", TOK, prompt_len=16, batch_size=2, num_examples=4, overlong="clip")


def test_encoding_matches_the_tokenizer():
    ex = make_task("countdown", {}).example("train", 0)
    row = encode_sft(TOK, ex, 48)
    n = int(row["valid"].sum())
    assert row["tokens"][:n].tolist() == [BOS] + encode(TOK, ex.prompt) + encode(TOK, ex.target) + [EOS]
