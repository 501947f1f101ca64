"""Synthetic tasks, tokenizer and data pipelines."""

import json

import numpy as np
import pytest

from jaxtok.data import FileTask, OverlongError, encode_prompt, encode_sft, prompt_dataset, sft_dataset
from jaxtok.registry import ConfigError
from jaxtok.tasks import build_tokenizer, load_tokenizer, make_task, save_tokenizer, split_of
from jaxtok.tasks.arith import ArithTask
from jaxtok.tasks.countdown import evaluate_expression
from jaxtok.tasks.tokenizer import VOCAB_SIZE, SpecialTokens, decode, encode

TOK = build_tokenizer()


def test_tokenizer_round_trip_and_special_ids(tmp_path):
    sp = SpecialTokens.of(TOK)
    assert (sp.pad, sp.bos, sp.eos, sp.mask) == (0, 1, 2, 3) and len(sp.rainbow_pads) == 7
    assert TOK.get_vocab_size() == VOCAB_SIZE <= 64
    text = "c:3,5,7|56=(3+5)*7>(3+5)*7\n s:1,2"
    assert decode(TOK, encode(TOK, text)) == text
    assert len(encode(TOK, text)) == len(text)  # one token per character
    tok2 = load_tokenizer(save_tokenizer(TOK, tmp_path))
    assert encode(tok2, text) == encode(TOK, text)
    assert decode(TOK, encode(TOK, "12") + [2] + encode(TOK, "34")) == "12"  # stops at <eos>


@pytest.mark.parametrize("name, args", [("arith", {"digits": 2, "steps": 3}), ("countdown", {}), ("sort", {})])
def test_tasks_deterministic_disjoint_and_rewarded(name, args):
    task = make_task(name, args, seed=3)
    assert task.example("train", 5) == make_task(name, args, seed=3).example("train", 5)
    train = {task.example("train", i).prompt for i in range(1500)}
    evals = {task.example("eval", i).prompt for i in range(300)}
    assert not train & evals
    for i in range(50):
        ex = task.example("eval", i)
        assert split_of(ex.prompt[:-1].removeprefix("c:").removeprefix("s:")) == "eval" or name != "arith"
        assert task.reward(ex.target, ex) == 1.0
        assert task.format_ok(ex.target)
    ex = task.example("train", 0)
    assert task.reward("", ex) == 0.0 and task.extract_answer("no mark") is None
    assert task.reward(ex.target + "9", ex) == 0.0


def test_arith_scratchpad_hand_case_and_steps():
    task = make_task("arith", {"digits": 2, "steps": 2}, seed=0)
    ex = task.example("train", 0)
    a, rest = ex.target.split(">")
    assert ex.answer == rest and str(eval(ex.prompt[:-1])) == ex.answer
    spans = ArithTask.steps(ex)
    assert len(spans) == 2 and [ex.target[s:e] for s, e in spans] == a.split(";")
    assert task.extract_answer("1+2=3>3") == "3" and task.extract_answer("x>-12\nmore") == "-12"


def test_countdown_reward_verifies_any_solution():
    task = make_task("countdown", {"numbers": 3}, seed=0)
    ex = task.example("train", 1)
    nums, target = ex.meta["numbers"], ex.meta["target"]
    assert evaluate_expression(ex.answer)[0] == target
    assert sorted(evaluate_expression(ex.answer)[1]) == sorted(nums)
    assert task.reward(">" + "+".join(map(str, nums)), ex) == float(sum(nums) == target)
    assert task.reward(">" + str(target), ex) == float(sorted(nums) == [target])  # must use the numbers
    assert task.reward(">1/0", ex) == 0.0 and task.reward(">import os", ex) == 0.0


def test_bad_task_args():
    with pytest.raises(ConfigError, match="digits"):
        make_task("arith", {"digits": 0})
    with pytest.raises(ConfigError, match="allowed"):
        make_task("arith", {"digitz": 2})


def test_encode_sft_hand_case():
    task = make_task("arith", {"digits": 1}, seed=0)
    ex = task.example("train", 0)
    row = encode_sft(TOK, ex, 24)
    n = 1 + len(ex.prompt) + len(ex.target) + 1
    assert row["tokens"][0] == 1 and row["tokens"][n - 1] == 2 and (row["tokens"][n:] == 0).all()
    assert row["valid"].sum() == n
    assert row["loss_mask"].sum() == len(ex.target) + 1 and not row["loss_mask"][: 1 + len(ex.prompt)].any()
    assert decode(TOK, row["tokens"][row["loss_mask"]]) == ex.target
    assert encode_sft(TOK, ex, n - 1) is None
    with pytest.raises(OverlongError, match="seq_len"):
        encode_sft(TOK, ex, n - 1, overlong="error")


def test_encode_prompt_left_pads():
    ex = make_task("sort", {"length": 3}).example("train", 0)
    row = encode_prompt(TOK, ex, 12)
    L = 1 + len(ex.prompt)
    assert (row["prompt_valid"] == (np.arange(12) >= 12 - L)).all()
    assert decode(TOK, row["prompt"][row["prompt_valid"]]) == ex.prompt


def test_pipeline_drops_overlong_and_resumes_exactly():
    task = make_task("arith", {"digits": 2, "steps": 2})
    ds, dropped = sft_dataset(task, "train", TOK, seq_len=30, batch_size=4, num_examples=200, num_epochs=1)
    rows = sum(b["tokens"].shape[0] for b in ds)
    assert dropped.count > 0 and rows + dropped.count >= 200 - 3 and rows % 4 == 0
    ds, _ = sft_dataset(task, "train", TOK, seq_len=40, batch_size=4, num_examples=100, seed=1)
    it = iter(ds)
    for _ in range(5):
        next(it)
    state = it.get_state()
    want = [next(it)["tokens"] for _ in range(3)]
    it2 = iter(ds)
    it2.set_state(state)
    for w in want:
        np.testing.assert_array_equal(next(it2)["tokens"], w)
    with pytest.raises(OverlongError, match="data.seq_len"):
        sft_dataset(task, "train", TOK, seq_len=6, batch_size=4, num_examples=100)


def test_prompt_dataset_indices_recover_examples():
    task = make_task("sort", {})
    ds, _ = prompt_dataset(task, "eval", TOK, prompt_len=16, batch_size=3, num_examples=5)
    batches = list(ds)
    assert [b["prompt"].shape for b in batches] == [(3, 16), (2, 16)]
    idx = np.concatenate([b["index"] for b in batches])
    assert list(idx) == list(range(5))


def test_jsonl_field_mapping(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps({"q": f"{i}+1=", "a": str(i + 1)}) for i in range(4)))
    task = FileTask.load(str(p), "jsonl", prompt_field="q", answer_field="a")
    ex = task.example("train", 2)
    assert (ex.prompt, ex.answer, ex.target) == ("2+1=", "3", ">3")
    assert task.reward(">3", ex) == 1.0
    with pytest.raises(KeyError, match="prompt_field"):
        FileTask.load(str(p), "jsonl", prompt_field="question", answer_field="a")
    with pytest.raises(FileNotFoundError):
        FileTask.load(str(tmp_path / "missing.jsonl"), "jsonl")
