"""File datasets as researchers keep them: train/eval files, field mapping, no synthetic-task format, the configured
reward in held-out eval, over-long eval prompts counted."""

import json
import logging

import jax.numpy as jnp
import numpy as np
import pytest

from jaxtok.config import DataSection, from_dict, validate_names
from jaxtok.data import (FileTask, Fields, encode_prompt, eval_examples, examples_of, from_config, pad_sft_batch,
                         record_example, sft_dataset)
from jaxtok.registry import ConfigError
from jaxtok.tasks import build_tokenizer
from jaxtok.tasks.tokenizer import _SYNTHETIC_CONFIG, TextTokenizer, decode

TOK = build_tokenizer()


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def files(tmp_path):
    train = _jsonl(tmp_path / "train.jsonl", [{"q": f"{i}+{i}=", "a": 2 * i} for i in range(10)])
    evals = _jsonl(tmp_path / "eval.jsonl", [{"q": f"{i}*{i}=", "a": i * i} for i in range(3)])
    return train, evals


def _section(train, evals, **kw):
    return DataSection(task="files", train_files=[train], eval_files=[evals] if evals else [], prompt_field="q",
                       answer_field="a", seq_len=16, prompt_len=8, batch_size=4, num_eval=256, **kw)


def _texts(batch):
    return [decode(TOK, r[v]) for r, v in zip(batch["prompt"], batch["prompt_valid"])]


def test_train_and_eval_files_end_to_end(files):
    section = _section(*files)
    task, ds, _ = from_config(section, TOK, "train", kind="prompt")
    b = next(iter(ds))
    assert b["prompt"].shape == (4, 8) and all(t.endswith("=") and "+" in t for t in _texts(b))
    # eval: each of the 3 eval rows exactly once, although num_eval=256 > 3 and batch_size=4 (no wrapping)
    task, ds, counter = from_config(section, TOK, "eval", kind="prompt")
    batches = list(ds)
    assert [x["prompt"].shape[0] for x in batches] == [3]
    assert _texts(batches[0]) == ["0*0=", "1*1=", "2*2="] and counter.count == 0
    assert [ex.answer for ex in examples_of(task, "eval", batches[0])] == ["0", "1", "4"]
    assert len(eval_examples(task, "eval", 256)) == 3
    # SFT: the target is the answer as written (no '>' mark); train epochs cover the 10 rows, not num_train
    task, ds, _ = from_config(section, TOK, "train")
    it = iter(ds)
    got = [next(it) for _ in range(5)]  # 20 rows = 2 epochs of the 10 records
    rows, masks = np.concatenate([b["tokens"] for b in got]), np.concatenate([b["loss_mask"] for b in got])
    assert sorted(decode(TOK, r[m]) for r, m in zip(rows[:10], masks[:10])) == sorted(str(2 * i) for i in range(10))
    assert sorted(decode(TOK, r) for r in rows[:10]) == sorted(f"{i}+{i}={2 * i}" for i in range(10))
    # the eval SFT pipeline keeps the short last batch; padding rows add no loss tokens
    ds, _ = sft_dataset(task, "eval", TOK, seq_len=16, batch_size=4, num_examples=256, shuffle=False, num_epochs=1,
                        drop_remainder=False)
    (short,) = list(ds)
    padded = pad_sft_batch(short, 4)
    assert padded["tokens"].shape == (4, 16) and padded["loss_mask"][3:].sum() == 0
    assert padded["loss_mask"][:3].sum() == short["loss_mask"].sum()


def test_no_eval_file_is_said_clearly_or_held_out(files, tmp_path):
    train, _ = files
    task = from_config(_section(train, None), TOK, "train")[0]
    with pytest.raises(ConfigError, match="data.eval_files is empty.*data.eval_fraction"):
        from_config(_section(train, None), TOK, "eval", kind="prompt")
    big = _jsonl(tmp_path / "big.jsonl", [{"q": f"{i}+{j}=", "a": i + j} for i in range(10) for j in range(10)])
    held = from_config(_section(big, None, eval_fraction=0.2), TOK, "train")[0]
    again = from_config(_section(big, None, eval_fraction=0.2), TOK, "train")[0]
    n_train, n_eval = held.split_size("train"), held.split_size("eval")
    assert n_train + n_eval == 100 and 5 < n_eval < 40 and again.eval == held.eval  # deterministic
    assert not {ex.prompt for ex in held.train} & {ex.prompt for ex in held.eval}
    assert task.split_size("train") == 10
    with pytest.raises(ConfigError, match="data.eval_fraction"):
        DataSection(task="files", train_files=[train], eval_files=[train], eval_fraction=0.1)
    with pytest.raises(ConfigError, match="data.task='files'"):
        DataSection(task="arith", train_files=[train])


def test_boxed_answer_scores_with_math_verify_not_after_the_last_mark():
    pytest.importorskip("math_verify")
    from jaxtok.train.rewards import score

    ex = record_example({"prompt": "p", "answer": "6"}, Fields(), "f.jsonl: record 0")
    task = FileTask((ex,), None)
    text = r"\boxed{6}, since 6 > 3"
    assert task.extract_answer(text) == text
    assert score(task, [text, r"\boxed{7}"], [ex, ex], {"math_verify": 1.0}).tolist() == [1.0, 0.0]
    assert score(task, [text, " 6 "], [ex, ex], {"exact_match": 1.0}).tolist() == [0.0, 1.0]
    # a configurable extractor: the last match of answer_regex (group 1); format_ok is then that match
    rx = FileTask((ex,), None, answer_regex=r"answer: *(\S+)")
    assert rx.extract_answer("answer: 5 ... answer: 6") == "6" and rx.reward("so answer: 6", ex) == 1.0
    assert rx.has_format and rx.format_ok("answer: 6") and not rx.format_ok("6")
    assert not task.has_format  # no regex: no answer format to check


def test_messages_stay_messages_and_render_with_the_chat_template(tmp_path):
    msgs = [{"role": "system", "content": "add"}, {"role": "user", "content": "1+2="}]
    path = _jsonl(tmp_path / "chat.jsonl", [{"messages": msgs + [{"role": "assistant", "content": "3"}], "answer": 3}])
    task = FileTask.from_files([path], fields=Fields(messages="messages"), eval_files=[path])
    ex = task.example("train", 0)
    assert ex.prompt == msgs and isinstance(ex.prompt, list) and ex.target == "3"  # trailing assistant = target
    assert task.example("eval", 0) == ex
    mixed = _jsonl(tmp_path / "mixed.jsonl", [{"messages": msgs, "answer": 3}, {"prompt": msgs, "answer": 4}])
    with pytest.raises(ConfigError, match=r"mixed.jsonl: record 1 has no field 'messages'"):
        FileTask.from_files([mixed], fields=Fields(messages="messages"))
    ex = record_example({"prompt": msgs, "answer": "4"}, Fields(), "x")  # a prompt field holding messages
    assert ex.prompt == msgs and ex.target == "4"
    chat_tok = TextTokenizer(TOK.hf, _SYNTHETIC_CONFIG,
                             chat_template="{% for m in messages %}{{ m['content'] }};{% endfor %}")
    row = encode_prompt(chat_tok, task.example("train", 0), 12)
    assert decode(chat_tok, row["prompt"][row["prompt_valid"]]) == "add;1+2=;"


def test_missing_field_names_file_record_and_field(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"prompt": "1=", "answer": 1}, {"prompt": "2="}])
    with pytest.raises(ConfigError, match=r"d.jsonl: record 1 has no field 'answer' \(fields: \['prompt'\]\); "
                                          r"set data.answer_field"):
        FileTask.from_files([path])
    with pytest.raises(ConfigError, match=r"d.jsonl: record 0 has no field 'sol'.*data.target_field"):
        FileTask.from_files([path], fields=Fields(target="sol"))
    bad = _jsonl(tmp_path / "m.jsonl", [{"messages": "hi", "answer": 1}])
    with pytest.raises(ConfigError, match=r"m.jsonl: record 0: field 'messages' is not a non-empty list"):
        FileTask.from_files([bad], fields=Fields(messages="messages"))
    with pytest.raises(ConfigError, match="unknown data file type"):
        FileTask.from_files([_jsonl(tmp_path / "d.txt", [])])
    with pytest.raises(ConfigError, match="pattern .* matches no file"):
        FileTask.from_files([str(tmp_path / "nothing-*.jsonl")])


def test_hf_datasets_directory(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2=", "answer": "4"}])
    ds.save_to_disk(str(tmp_path / "hf"))
    task = FileTask.from_files([str(tmp_path / "hf")])
    assert [task.example("train", i).answer for i in range(2)] == ["2", "4"]
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ConfigError, match=r"DatasetDict with splits \['test', 'train'\].*dd/test"):
        FileTask.from_files([str(tmp_path / "dd")])
    assert FileTask.from_files([str(tmp_path / "dd" / "train")]).split_size("train") == 2


def test_config_validation_of_file_data(files):
    train, evals = files
    base = {"data": {"task": "files", "train_files": [train], "eval_files": [evals]}}
    validate_names(from_dict(base))
    with pytest.raises(ConfigError, match="rollout.rewards.format: .*data.answer_regex"):
        validate_names(from_dict({**base, "rollout": {"rewards": {"format": 1.0}}}))
    with pytest.raises(ConfigError, match="data.answer_regex='\\(': not a valid regex"):
        from_dict({"data": {**base["data"], "answer_regex": "("}})
    with pytest.raises(ConfigError, match="data.train_files=\\[\\]"):
        validate_names(from_dict({"data": {"task": "files"}}))


def test_held_out_eval_uses_the_configured_reward_and_counts_overlong_prompts(tmp_path, monkeypatch, caplog):
    pytest.importorskip("math_verify")
    import importlib

    import jaxtok.tasks.tokenizer as tok_mod

    gen_mod = importlib.import_module("jaxtok.decode.generate")  # the module (jaxtok.decode.generate is the function)
    from jaxtok.train import loop

    train = _jsonl(tmp_path / "t.jsonl", [{"q": "1=", "a": 1}])
    evals = _jsonl(tmp_path / "e.jsonl", [{"q": "1+5=", "a": 6}, {"q": "1+1+1+1+1+1=", "a": 6}, {"q": "3+4=", "a": 7}])
    cfg = from_dict({"data": {"task": "files", "train_files": [train], "eval_files": [evals], "prompt_len": 6,
                              "prompt_field": "q", "answer_field": "a", "num_eval": 100},
                     "decode": {"batch_size": 4, "max_new_tokens": 2},
                     "rollout": {"rewards": {"math_verify": 1.0}}})
    task = from_config(cfg.data, TOK, "eval", kind="prompt")[0]

    class Out:
        tokens = jnp.zeros((4, 2), jnp.int32)
        valid = jnp.ones((4, 2), bool)
        num_forwards = jnp.int32(2)

    monkeypatch.setattr(gen_mod, "generate", lambda *a, **k: Out())
    monkeypatch.setattr(tok_mod, "decode", lambda tok, ids, **k: r"\boxed{6}, since 6 > 3")
    with caplog.at_level(logging.WARNING):
        ev = loop.generation_eval(None, task, TOK, cfg)
    # 3 eval rows: the over-long one (13 tokens > 6) scores 0 and stays in the denominator
    assert ev["num_examples"] == 3 and ev["overlong_prompts"] == 1
    assert ev["reward"] == pytest.approx(1 / 3) and ev["exact_match"] == 0.0 and "format_ok" not in ev
    assert any("1 of 3 prompts exceed data.prompt_len=6" in r.getMessage() for r in caplog.records)
    # no eval file: training skips held-out eval with a warning; `jaxtok eval` refuses before loading anything
    no_eval = from_dict({"data": {"task": "files", "train_files": [train], "prompt_field": "q", "answer_field": "a"}})
    assert loop._evaluate_model(None, from_config(no_eval.data, TOK, "train")[0], TOK, no_eval, None) == {}
    with pytest.raises(ConfigError, match="jaxtok eval: no held-out eval data"):
        loop.evaluate(no_eval, tmp_path / "run")
