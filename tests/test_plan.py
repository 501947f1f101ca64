"""The run plan (issue 16 item 2): a config is parsed once, by :func:`jaxtok.config.validate_names`, and the train
path reads the plan — ``plan.spec.<field>`` and ``plan.objective_args`` — never ``entry.meta`` or ``cfg.objective.args``
again."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from jaxtok.config import as_plan, from_dict, validate_names
from jaxtok.plan import RunPlan
from jaxtok.registry import OBJECTIVES, TASKS, Registry, Selection

ROOT = Path(__file__).resolve().parents[1]
# The train path: the loop, its collectors and hooks, the objectives, the config checks it relies on, the train bench.
TRAIN_PATH = ["jaxtok/config.py", "jaxtok/plan.py", "bench/train.py",
              *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "train").glob("**/*.py"))]


def _cfg(objective, args=None, **sections):
    base = {
        "model": {"preset": "tiny_student"},
        "data": {"task": "arith", "task_args": {"digits": 1}, "prompt_len": 12, "seq_len": 24, "batch_size": 8,
                 "num_eval": 8},
        "objective": {"name": objective, "args": args or {}},
        "train": {"steps": 2, "log_every": 1, "eval_batches": 1},
        "rollout": {"num_generations": 4, "max_new_tokens": 6},
        "decode": {"max_new_tokens": 6, "batch_size": 8},
        "run": {"progress": False},
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return from_dict(base)


@pytest.fixture
def parses(monkeypatch):
    """``{registry kind: [names parsed]}`` of every ``Registry.parse_args`` call of the objective and task
    registries while the test runs."""
    seen = {OBJECTIVES.kind: [], TASKS.kind: []}
    parse = Registry.parse_args

    def counting(self, name, mapping, key="args"):
        if self.kind in seen:
            seen[self.kind].append(name)
        return parse(self, name, mapping, key)

    monkeypatch.setattr(Registry, "parse_args", counting)
    return seen


# Objectives that exercise every hook the train path binds the parsed arguments into: the objective's own collector
# (cj_grpo), the trajectory collector (tad), prepare with args and the self-teacher (trace), host-side group
# advantages and top-K rollout statistics (policy_gradient/cppo with micro-batches), the model wrapper (lenvm), the
# diffusion evaluation settings (mdlm), the typed selection (opd).
CASES = {
    "sft": lambda: _cfg("sft"),
    "opd": lambda: _cfg("opd", {"selection": {"rule": "entropy_sample", "rho": 0.5}},
                        rollout={"teacher_init_from": "teacher"}),
    "trace": lambda: _cfg("trace", rollout={"rewards": {"exact_match": 1.0}}),
    "policy_gradient": lambda: _cfg("policy_gradient", {"loss_mode": "cppo", "cppo_divergence": "topk_tv"},
                                    train={"micro_batches": 2}),
    "cj_grpo": lambda: _cfg("cj_grpo"),
    "tad": lambda: _cfg("tad", rollout={"teacher_init_from": "teacher"}),
    "lenvm": lambda: _cfg("lenvm", rollout={"teacher_init_from": "teacher"}),
    "mdlm": lambda: _cfg("mdlm"),
    "refine": lambda: _cfg("refine"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_objective_args_are_parsed_once_on_the_train_path(name, parses):
    """Validation parses ``objective.args`` and ``data.task_args`` once; the loop's builders (objective, wrapped
    model, self-teacher, collectors and hooks, diffusion eval settings) take them from the plan."""
    from jaxtok.tasks.tokenizer import load_tokenizer_for
    from jaxtok.train import loop
    from jaxtok.train.self_teacher import SelfTeacher

    plan = validate_names(CASES[name]())
    assert parses == {OBJECTIVES.kind: [name], TASKS.kind: ["arith"]}
    assert as_plan(plan) is plan
    tok = load_tokenizer_for(plan.cfg)
    inputs = loop._Inputs(tok=tok, task=plan.make_task(), mesh=None)
    loop.build_objective(plan)
    SelfTeacher.of(plan)
    feed = loop._build_feed(plan, inputs, SimpleNamespace(model_cfg=None))
    assert (feed.collect is None) == (plan.spec.data == "sft")
    if loop.is_diffusion_run(plan):
        loop.diffusion_eval_settings(plan)
    if plan.spec.wrap_model is not None:
        loop.build_train_model(plan, tok.get_vocab_size())
    assert parses == {OBJECTIVES.kind: [name], TASKS.kind: ["arith"]}


def test_plan_holds_the_parsed_sections():
    plan = validate_names(CASES["opd"]())
    assert isinstance(plan, RunPlan) and plan.objective is OBJECTIVES.entry("opd")
    assert plan.spec is plan.objective.spec and plan.spec.models == ("teacher",)
    assert plan.objective_args.selection == Selection.parse({"rule": "entropy_sample", "rho": 0.5}, "selection")
    assert plan.task is TASKS.entry("arith") and plan.task_args.digits == 1
    assert plan.rewards == tuple(plan.cfg.rollout.rewards)
    assert dataclasses.is_dataclass(plan) and plan.__dataclass_params__.frozen
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.objective_args = None


def test_typed_selection_keeps_the_config_syntax():
    """``objective.args.selection`` stays a ``{rule: ..., ...}`` mapping in YAML and in ``config.yaml``; the parsed
    arguments hold a :class:`Selection` built by the registry (errors name the dotted key)."""
    from jaxtok.config import ConfigError, load_config, to_yaml

    cfg = load_config(ROOT / "configs" / "distill" / "tip_entropy50.yaml")
    sel = validate_names(cfg).objective_args.selection
    assert sel.rule == "entropy_sample" and sel.args.rho == 0.5 and sel.args.normalize_by == "selected"
    assert "rule: entropy_sample" in to_yaml(cfg)
    with pytest.raises(ConfigError, match=r"objective\.args\.selection\.rule='nope'"):
        validate_names(dataclasses.replace(cfg, objective=dataclasses.replace(
            cfg.objective, args={"selection": {"rule": "nope"}})))
    with pytest.raises(ConfigError, match=r"objective\.args\.selection=.*'rule' key"):
        validate_names(dataclasses.replace(cfg, objective=dataclasses.replace(cfg.objective, args={"selection": 3})))


def test_no_meta_reads_or_repeated_parsing_on_the_train_path():
    """The train path reads specs by attribute (no ``.meta`` of a registry entry) and parses ``objective.args``
    nowhere but in :func:`jaxtok.config.validate_names`."""
    meta, parses = [], []
    for rel in TRAIN_PATH:
        for i, line in enumerate((ROOT / rel).read_text().splitlines(), 1):
            if re.search(r"\.meta\b(?!data)", line):
                meta.append(f"{rel}:{i}: {line.strip()}")
            if "cfg.objective.args" in line and "parse_args" in line or "OBJECTIVES.parse_args(" in line:
                parses.append(f"{rel}:{i}: {line.strip()}")
    assert not meta, "entry.meta read on the train path:\n" + "\n".join(meta)
    allowed = ["bench/train.py"]  # the train bench parses each benchmarked objective arm's own args
    assert [p for p in parses if not p.startswith(tuple(allowed))] == [], "\n".join(parses)


@pytest.mark.slow
def test_a_tiny_run_parses_its_config_once(tmp_path, parses):
    """``train(cfg)`` resolves the config once and every phase (build, steps, periodic and final evaluation) and
    a later ``evaluate(plan)`` use that plan."""
    from jaxtok.train.loop import evaluate, train

    plan = validate_names(_cfg("sft", model={"overrides": {"num_layers": 1}}, train={"eval_every": 1}))
    summary = train(plan, tmp_path / "run")
    assert summary["step"] == 2 and "eval/exact_match" in summary
    evaluate(plan, tmp_path / "run")
    assert parses == {OBJECTIVES.kind: ["sft"], TASKS.kind: ["arith"]}
