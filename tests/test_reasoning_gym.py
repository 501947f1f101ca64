"""reasoning-gym generators as a task: deterministic disjoint splits, chat prompts, the generator's scorer as reward."""

import pytest

pytest.importorskip("reasoning_gym")

from jaxtok.config import DataSection  # noqa: E402
from jaxtok.registry import TASKS, ConfigError  # noqa: E402
from jaxtok.tasks import make_task  # noqa: E402

# one-digit sums of two terms: a problem space small enough that train items repeat eval questions
SMALL = {"name": "basic_arithmetic", "size": 60, "eval_size": 20, "seed": 3,
         "config": {"min_terms": 2, "max_terms": 2, "max_digits": 1, "operators": ["+"]}}


def test_deterministic_disjoint_splits():
    task, again = make_task("reasoning_gym", SMALL), make_task("reasoning_gym", SMALL)
    train = [task.example("train", i) for i in range(60)]
    evals = [task.example("eval", i) for i in range(20)]
    assert train == [again.example("train", i) for i in range(60)]
    assert evals == [again.example("eval", i) for i in range(20)]
    questions = lambda xs: {x.meta["question"] for x in xs}  # noqa: E731
    assert not questions(train) & questions(evals)
    assert any(task.item_index("train", i) != i for i in range(60))  # collisions were replaced, not kept
    other = make_task("reasoning_gym", {**SMALL, "seed": 4})
    assert [other.example("eval", i) for i in range(20)] != evals
    assert (task.split_size("train"), task.split_size("eval")) == (60, 20)
    with pytest.raises(IndexError, match="eval split has 20"):
        task.example("eval", 20)


def test_scorer_rewards_the_reference_answer():
    from jaxtok.train.rewards import score

    task = make_task("reasoning_gym", {"name": "gsm_symbolic", "size": 4, "eval_size": 2, "seed": 1})
    ex = task.example("eval", 0)
    assert ex.prompt[0]["role"] == "system" and "<answer>" in ex.prompt[0]["content"]
    assert ex.prompt[-1] == {"role": "user", "content": ex.meta["question"]}
    assert ex.target == f"<answer>{ex.answer}</answer>"
    assert task.reward(f"steps... <answer>{ex.answer}</answer>", ex) == 1.0
    # the generator's own score: gsm_symbolic gives a wrong number 0.01, exact_match counts only a score of 1
    assert task.reward("<answer>-12345</answer>", ex) < 1.0 and task.reward(ex.answer, ex) == 0.0
    assert score(task, ["<answer>-12345</answer>"], [ex], {"exact_match": 1.0}).tolist() == [0.0]
    partial = task.reward("<answer>-12345</answer>", ex)  # task_score keeps the generator's partial credit
    assert score(task, ["<answer>-12345</answer>"], [ex], {"task_score": 1.0}).tolist() == [pytest.approx(partial)]
    assert task.format_ok(ex.target) and not task.format_ok(ex.answer)
    assert score(task, [ex.target, "no tag"], [ex, ex], {"exact_match": 1.0, "format": 0.5}).tolist() == [1.5, 0.0]
    plain = make_task("reasoning_gym", {"name": "gsm_symbolic", "size": 4, "eval_size": 2, "seed": 1, "chat": False,
                                        "system_prompt": ""})
    assert plain.example("eval", 0).prompt == ex.meta["question"]


def test_config_errors_and_data_section():
    with pytest.raises(ConfigError, match=r"name='gsm_symbolc'.*did you mean \['gsm_symbolic'\]"):
        TASKS.parse_args("reasoning_gym", {"name": "gsm_symbolc"}, "data.task_args")
    with pytest.raises(ConfigError, match="config.digits: not an option of generator 'basic_arithmetic'"):
        TASKS.parse_args("reasoning_gym", {"name": "basic_arithmetic", "config": {"digits": 2}}, "data.task_args")
    from jaxtok.data import make_task_from_config

    task = make_task_from_config(DataSection(task="reasoning_gym", task_args={"name": "chain_sum", "size": 5,
                                                                              "eval_size": 3}, seed=7))
    assert task.seed == 7 and task.split_size("eval") == 3  # the generator seed defaults to data.seed
