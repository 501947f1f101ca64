"""Tokenizer and synthetic tasks: fixed special ids, exact round trips, determinism, disjoint splits, extractors and
rewards on hand cases, countdown reference solutions."""

import re

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from jaxtok.registry import ConfigError
from jaxtok.tasks import Example, SpecialTokens, build_tokenizer, load_tokenizer, make_task, save_tokenizer, split_of
from jaxtok.tasks.arith import ArithArgs, ArithTask
from jaxtok.tasks.countdown import CountdownArgs, CountdownTask, evaluate_expression
from jaxtok.tasks.sorting import SortArgs, SortTask
from jaxtok.tasks.tokenizer import VOCAB_SIZE, decode, encode

TASK_SETTINGS = [("arith", {"digits": 2, "steps": 3, "ops": "+-*"}), ("countdown", {"numbers": 4}),
                 ("sort", {"length": 6}), ("sort", {"alphabet": "letters"})]


# --------------------------------------------------------------------------------------------------- tokenizer


def test_special_ids_fixed_and_vocab_small():
    tok = build_tokenizer()
    sp = SpecialTokens.of(tok)
    assert (sp.pad, sp.bos, sp.eos, sp.mask) == (0, 1, 2, 3)
    assert sp.rainbow_pads == tuple(range(4, 11))
    assert [tok.token_to_id(f"<pad_{i}>") for i in range(1, 8)] == list(range(4, 11))
    assert tok.get_vocab_size() == VOCAB_SIZE == 61 <= 64


@pytest.mark.parametrize("name,args", TASK_SETTINGS)
def test_tokenizer_round_trips_task_text(name, args):
    tok = build_tokenizer()
    task = make_task(name, args, seed=3)
    for i in range(50):
        ex = task.example("train", i)
        for text in (ex.prompt, ex.target, ex.prompt + ex.target + "\n"):
            ids = encode(tok, text)
            assert len(ids) == len(text)  # one token per character
            assert decode(tok, ids) == text


def test_round_trip_spaces_newlines_and_every_character():
    tok = build_tokenizer()
    text = "0123456789 +-*/=(),;:>|\nabcdefghijklmnopqrstuvwxyz  x\n\n"
    assert decode(tok, encode(tok, text)) == text


def test_unknown_character_raises_naming_it():
    with pytest.raises(ValueError, match=r"\['\.', 'Q'\]"):
        encode(build_tokenizer(), "aQ.1")


def test_decode_stops_at_eos_and_drops_specials():
    tok = build_tokenizer()
    ids = [1] + encode(tok, "12>3") + [2] + encode(tok, "99") + [0, 0]
    assert decode(tok, ids) == "12>3"
    assert decode(tok, ids, stop_at_eos=False) == "12>399"


def test_save_load_round_trip(tmp_path):
    tok = build_tokenizer()
    path = save_tokenizer(tok, tmp_path / "run")
    assert path.name == "tokenizer.json"
    for src in (tmp_path / "run", path):
        loaded = load_tokenizer(src)
        assert loaded.get_vocab() == tok.get_vocab()
        assert encode(loaded, "3*(4+5)=27>27") == encode(tok, "3*(4+5)=27>27")
        assert SpecialTokens.of(loaded) == SpecialTokens.of(tok)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path / "missing")


def test_special_tokens_come_from_config_files_never_from_names(tmp_path):
    """A non-synthetic tokenizer.json needs its config: `<s>`/`</s>` are not guessed as bos/eos; the config names
    them, generation_config.json adds stop ids, and overrides replace both."""
    import json

    vocab = {"hello": 0, "[PAD]": 1, "<s>": 2, "</s>": 3, "[UNK]": 4, "<end>": 5}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<end>", "bos_token": None,
                                                                "pad_token": {"content": "[PAD]"}}))
    sp = SpecialTokens.of(load_tokenizer(tmp_path))
    assert (sp.pad, sp.bos, sp.eos, sp.eos_ids, sp.mask, sp.rainbow_pads) == (1, None, 5, (5,), None, ())
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [3, 5]}))
    assert load_tokenizer(tmp_path).eos_ids == (5, 3)
    over = load_tokenizer(tmp_path, {"eos": ["</s>"], "bos": "<s>", "pad": 0})
    assert (over.eos_ids, over.bos_id, over.pad_id) == ((3,), 2, 0)
    with pytest.raises(ValueError, match="tokenizer.eos='<nope>'"):
        load_tokenizer(tmp_path, {"eos": "<nope>"})
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<missing>"}))
    with pytest.raises(ValueError, match="eos_token='<missing>': not a token"):
        load_tokenizer(tmp_path)


# --------------------------------------------------------------------------------------------------- all tasks


@pytest.mark.parametrize("name,args", TASK_SETTINGS)
def test_deterministic_in_seed_split_index(name, args):
    a, b, c = make_task(name, args, seed=7), make_task(name, args, seed=7), make_task(name, args, seed=8)
    ea = [a.example("train", i) for i in range(30)]
    assert ea == [b.example("train", i) for i in range(30)]
    assert ea != [c.example("train", i) for i in range(30)]
    assert [a.example("eval", i) for i in range(30)] == [b.example("eval", i) for i in range(30)]


@pytest.mark.parametrize("name,args", [("arith", {"digits": 1, "steps": 1}), ("arith", {"digits": 2, "steps": 1}),
                                       ("countdown", {"numbers": 3, "max_number": 6}),
                                       ("sort", {"length": 3, "max_number": 9})])
def test_splits_disjoint(name, args):
    """Small problem spaces (so repeats within a split are frequent) and still no eval problem in train."""
    task = make_task(name, args, seed=0)
    train = {task.example("train", i).prompt for i in range(3000)}
    held = {task.example("eval", i).prompt for i in range(600)}
    assert train and held and not train & held


def test_split_is_a_hash_of_the_canonical_problem():
    task = ArithTask(ArithArgs(digits=2, steps=2))
    assert all(split_of(task.example("eval", i).prompt[:-1]) == "eval" for i in range(100))
    assert all(split_of(task.example("train", i).prompt[:-1]) == "train" for i in range(100))
    assert split_of("12+7", 0.1) == split_of("12+7", 0.1)


@pytest.mark.parametrize("name,args", TASK_SETTINGS)
def test_reference_target_earns_full_reward(name, args):
    task = make_task(name, args, seed=1)
    for i in range(100):
        ex = task.example("eval", i)
        assert task.extract_answer(ex.target) == ex.answer
        assert task.reward(ex.target, ex) == 1.0
        assert task.format_ok(ex.target)


@pytest.mark.parametrize("name,args", TASK_SETTINGS)
def test_malformed_completions(name, args):
    task = make_task(name, args, seed=1)
    ex = task.example("train", 0)
    for bad in ("", "no marker here", ex.answer, "12+3=15>", ">\n5"):  # no '>' or nothing after it
        assert task.extract_answer(bad) is None
        assert task.reward(bad, ex) == 0.0
        assert not task.format_ok(bad)


def test_unknown_task_and_bad_args_rejected():
    with pytest.raises(ConfigError, match="arith"):
        make_task("arithmetic")
    with pytest.raises(ConfigError, match="digits=0"):
        make_task("arith", {"digits": 0})
    with pytest.raises(ConfigError, match="bogus"):
        make_task("sort", {"bogus": 1})
    with pytest.raises(ValueError, match="alphabet"):
        SortArgs(alphabet="greek")


# --------------------------------------------------------------------------------------------------- arith


def test_arith_hand_format_and_steps():
    task = ArithTask(ArithArgs(digits=2, steps=2, ops="+-*"))
    ex = task.example("train", 5)
    # prompt "a op b op c =", target "a op b=r1;r1 op c=r2>r2", evaluated left to right
    m = re.fullmatch(r"(\d+)([-+*])(\d+)([-+*])(\d+)=", ex.prompt)
    assert m
    a, o1, b, o2, c = m.groups()
    r1 = eval(a + o1 + b)
    r2 = eval(f"({r1}){o2}{c}")
    assert ex.target == f"{a}{o1}{b}={r1};{r1}{o2}{c}={r2}>{r2}"
    assert ex.answer == str(r2)
    spans = task.steps(ex)
    assert [ex.target[s:e] for s, e in spans] == [f"{a}{o1}{b}={r1}", f"{r1}{o2}{c}={r2}"]
    assert ex.target[spans[0][1]] == ";" and ex.target[spans[1][1]] == ">"


def test_arith_extract_reward_hand_cases():
    task = ArithTask(ArithArgs())
    ex = Example(prompt="12+7-3=", target="12+7=19;19-3=16>16", answer="16")
    assert task.extract_answer("12+7=19;19-3=16>16") == "16"
    assert task.reward("garbage;19-3=16>16", ex) == 1.0  # only the final answer is graded
    assert task.reward("12+7=19;19-3=16>17", ex) == 0.0
    assert task.reward("12+7=19;19-3=16>16\nmore text", ex) == 1.0  # answer ends at the line
    assert task.reward("12+7=19>19;19-3=16>16", ex) == 1.0  # the last marker counts
    assert task.extract_answer(">-4") == "-4" and task.format_ok(">-4")
    assert not task.format_ok(">1a")


def test_arith_knobs_and_negative_results():
    task = ArithTask(ArithArgs(digits=1, steps=4, ops="-"))
    exs = [task.example("train", i) for i in range(200)]
    assert all(len(task.steps(e)) == 4 for e in exs)
    assert all(set(e.prompt[:-1]) <= set("0123456789-") for e in exs)
    assert any(e.answer.startswith("-") for e in exs)


# --------------------------------------------------------------------------------------------------- countdown


def test_countdown_reference_solutions_valid():
    task = CountdownTask(CountdownArgs(numbers=4, max_number=12))
    for split in ("train", "eval"):
        for i in range(300):
            ex = task.example(split, i)
            value, used = evaluate_expression(ex.answer)
            assert value == ex.meta["target"] and value > 0
            assert sorted(used) == sorted(ex.meta["numbers"])
            assert ex.prompt == "c:" + ",".join(map(str, ex.meta["numbers"])) + f"|{ex.meta['target']}="


def test_countdown_scratchpad_steps_chain_to_the_target():
    task = CountdownTask(CountdownArgs(numbers=4))
    for i in range(100):
        ex = task.example("train", i)
        steps = [ex.target[s:e] for s, e in task.steps(ex)]
        assert len(steps) == 3 and ex.target == ";".join(steps) + ">" + ex.answer
        acc = None
        for step in steps:
            a, op, b, r = re.fullmatch(r"(\d+)([-+*/])(\d+)=(\d+)", step).groups()
            assert acc is None or int(a) == acc  # each step continues from the previous result
            assert evaluate_expression(f"{a}{op}{b}")[0] == int(r)
            acc = int(r)
        assert acc == ex.meta["target"]


def test_every_task_exposes_step_spans():
    for name, args in TASK_SETTINGS:
        task = make_task(name, args)
        ex = task.example("eval", 0)
        spans = task.steps(ex)
        assert spans and spans[-1][1] == ex.target.rindex(">")
        assert all(";" not in ex.target[s:e] for s, e in spans)


def test_countdown_reward_hand_cases():
    task = CountdownTask(CountdownArgs(numbers=3))
    ex = Example(prompt="c:3,5,7|56=", target="3+5=8;8*7=56>(3+5)*7", answer="(3+5)*7",
                 meta={"numbers": [3, 5, 7], "target": 56})
    assert task.reward("3+5=8;8*7=56>(3+5)*7", ex) == 1.0
    assert task.reward("3+5=8;8*7=56>(3+5)*6", ex) == 0.0  # only the final expression is graded
    assert task.reward(">7*(5+3)", ex) == 1.0  # any correct solution, not only the reference
    assert task.reward(">7 * (5 + 3)", ex) == 1.0
    assert task.reward(">3+5*7", ex) == 0.0  # 38
    assert task.reward(">(5+3)*7*1", ex) == 0.0  # 1 is not given
    assert task.reward(">(3+5)*7+3-3", ex) == 0.0  # numbers reused
    assert task.reward(">56", ex) == 0.0  # numbers missing
    assert task.reward(">(3+5)*", ex) == 0.0 and not task.format_ok(">(3+5)*")
    assert task.reward(">__import__('os')", ex) == 0.0 and not task.format_ok(">__import__('os')")
    assert task.reward(">7/(5-5)", ex) == 0.0  # division by zero is malformed, not a crash
    ex2 = Example(prompt="c:2,3,4|6=", target="", answer="", meta={"numbers": [2, 3, 4], "target": 6})
    assert task.reward(">3/2*4", ex2) == 1.0  # exact rational arithmetic
    assert task.reward(">-2+4*2", ex2) == 0.0  # unary minus is not allowed


# --------------------------------------------------------------------------------------------------- sort


def test_sort_hand_cases():
    task = SortTask(SortArgs(length=4, max_number=20))
    ex = task.example("train", 0)
    items = [int(x) for x in ex.prompt[2:-1].split(",")]
    assert ex.answer == ",".join(map(str, sorted(items)))  # numeric, not lexicographic
    assert task.reward(ex.target, ex) == 1.0
    assert task.reward(">" + ",".join(map(str, items)), ex) == float(items == sorted(items))  # the input order
    hand = Example(prompt="s:10,9,2=", target="2,9,10>2,9,10", answer="2,9,10")
    assert task.reward(">2,9,10", hand) == 1.0
    assert task.reward(">10,2,9", hand) == 0.0
    assert task.format_ok(">10,2,9") and not task.format_ok(">1,,2")


def test_sort_letters():
    task = SortTask(SortArgs(length=5, alphabet="letters"))
    ex = task.example("eval", 3)
    items = ex.prompt[2:-1].split(",")
    assert all(len(c) == 1 and c.islower() for c in items)
    assert ex.answer == ",".join(sorted(items))
    assert task.format_ok(">a,b,z") and not task.format_ok(">a,1") and not task.format_ok(">ab,c")


# --------------------------------------------------------------------------------------------------- arith_samples


def test_arith_samples_train_from_file_eval_from_arith(tmp_path):
    import json

    path = tmp_path / "s.jsonl"
    recs = [{"prompt": "12+7=", "target": "12+7=19>19", "answer": "19", "correct": True},
            {"prompt": "3-5=", "target": "3-5=-1>-1", "answer": "-2", "correct": False}]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    task = make_task("arith_samples", {"digits": 2, "samples": str(path)})
    ex = task.example("train", 3)  # index wraps around the records
    assert (ex.prompt, ex.target, ex.answer) == ("3-5=", "3-5=-1>-1", "-2")
    assert task.reward(ex.target, ex) == 0.0  # the record keeps the true answer, so a wrong sample scores 0
    plain = ArithTask(ArithArgs(digits=2))
    assert task.example("eval", 5) == plain.example("eval", 5)  # held-out split = the arith task's
    kept = make_task("arith_samples", {"digits": 2, "samples": str(path), "only_correct": True})
    assert kept.example("train", 1).prompt == "12+7="
    with pytest.raises((ConfigError, ValueError)):
        make_task("arith_samples", {"digits": 2})


# --------------------------------------------------------------------------------------------------- arith direct mix


def test_arith_direct_fraction_zero_is_todays_task_and_one_is_all_direct():
    plain, zero = ArithTask(ArithArgs(steps=2)), ArithTask(ArithArgs(steps=2, direct_fraction=0.0))
    one = ArithTask(ArithArgs(steps=2, direct_fraction=1.0))
    for i in range(200):
        assert zero.example("train", i) == plain.example("train", i)
        ex, d = plain.example("train", i), one.example("train", i)
        assert (d.prompt, d.answer, d.target) == (ex.prompt, ex.answer, ">" + ex.answer)
        assert d.meta["direct"] and one.reward(d.target, ex) == 1.0 and one.format_ok(d.target)
    for i in range(50):  # eval targets never change
        assert one.example("eval", i) == plain.example("eval", i)


def test_arith_direct_fraction_split_is_deterministic_and_near_the_share():
    a, b = ArithTask(ArithArgs(steps=2, direct_fraction=0.3)), ArithTask(ArithArgs(steps=2, direct_fraction=0.3))
    direct = [a.example("train", i).target.startswith(">") for i in range(2000)]
    assert direct == [b.example("train", i).target.startswith(">") for i in range(2000)]
    assert 0.26 < sum(direct) / len(direct) < 0.34
    other_seed = ArithTask(ArithArgs(steps=2, direct_fraction=0.3), seed=1)
    assert direct != [other_seed.example("train", i).target.startswith(">") for i in range(2000)]


def test_arith_direct_completion_reward():
    task = ArithTask(ArithArgs(steps=2, direct_fraction=0.5))
    ex = Example(prompt="12+7-3=", target="12+7=19;19-3=16>16", answer="16")
    assert task.reward(">16", ex) == 1.0 and task.format_ok(">16")
    assert task.reward(">17", ex) == 0.0 and task.format_ok(">17")
    assert task.reward(">-16", ex) == 0.0 and task.format_ok(">-16")
    assert task.reward(">", ex) == 0.0 and not task.format_ok(">")


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_arith_direct_fraction_rejected_naming_the_key(bad):
    with pytest.raises(ValueError, match="direct_fraction="):
        ArithArgs(direct_fraction=bad)
    with pytest.raises(ConfigError, match="direct_fraction="):
        make_task("arith", {"direct_fraction": bad})
