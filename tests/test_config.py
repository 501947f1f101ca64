"""Config schema: base includes, dotted overrides, error messages (key, value, allowed), registries, optimizer."""

import dataclasses
import typing
from pathlib import Path
from typing import Optional

import chex
import jax
import pytest

from jaxtok import recipe
from jaxtok.config import (
    Config,
    ConfigError,
    DataSection,
    DecodeSection,
    MeshSection,
    build_optimizer,
    describe,
    from_dict,
    load_config,
    reference_yaml,
    to_yaml,
    validate_names,
)
from jaxtok.registry import COMMIT_POLICIES, Registry

ROOT = Path(__file__).resolve().parents[1]
SFT = ROOT / "configs" / "sft" / "arith.yaml"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_base_include_and_overrides(tmp_path):
    write(tmp_path / "base.yaml", "data: {batch_size: 8, seq_len: 40}\noptimizer: {lr: 0.01}\n")
    write(tmp_path / "child.yaml", "base: base.yaml\ndata: {batch_size: 16}\n")
    cfg = load_config(tmp_path / "child.yaml", ["optimizer.lr=0.5", "train.steps=7"])
    assert isinstance(cfg, Config)
    assert (cfg.data.batch_size, cfg.data.seq_len, cfg.optimizer.lr, cfg.train.steps) == (16, 40, 0.5, 7)
    assert cfg.model == Config().model  # untouched sections keep their defaults


def test_base_list_recursive_relative_paths(tmp_path):
    # grand.yaml <- (a.yaml, sub/b.yaml) <- leaf.yaml; later bases win over earlier ones, the file over its bases
    write(tmp_path / "grand.yaml", "train: {steps: 5, seed: 1}\n")
    write(tmp_path / "a.yaml", "base: grand.yaml\ntrain: {steps: 6}\ndata: {seed: 3}\n")
    write(tmp_path / "sub" / "b.yaml", "base: ../grand.yaml\ntrain: {log_every: 9}\n")
    write(tmp_path / "leaf.yaml", "base: [a.yaml, sub/b.yaml]\ndata: {seed: 4}\n")
    cfg = load_config(tmp_path / "leaf.yaml")
    # b.yaml re-includes grand.yaml, so grand's steps=5 overrides a.yaml's 6
    assert (cfg.train.steps, cfg.train.seed, cfg.train.log_every, cfg.data.seed) == (5, 1, 9, 4)


def test_include_cycle_and_missing_base(tmp_path):
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    write(tmp_path / "c.yaml", "base: nope.yaml\n")
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "c.yaml")
    write(tmp_path / "d.yaml", "base: {a: 1}\n")
    with pytest.raises(ConfigError, match=r"base=\{'a': 1\}.*list of file names"):
        load_config(tmp_path / "d.yaml")


def test_resolved_yaml_round_trips(tmp_path):
    cfg = load_config(SFT, ["train.steps=300", "data.task_args.digits=1"])
    again = load_config(write(tmp_path / "c.yaml", to_yaml(cfg)))
    assert again == cfg


@pytest.mark.parametrize("override, words", [
    ("optimizer.lr_rate=1", ["optimizer.lr_rate=1", "unknown key", "allowed keys of optimizer", "'lr'", "'b1'"]),
    ("bogus.key=1", ["bogus", "allowed keys of the top level", "'optimizer'"]),
    ("train.steps=abc", ["train.steps='abc'", "Integer"]),
    ("data.batch_size=0", ["data.batch_size=0", ">= 1"]),
    ("data.batch_size=-4", ["data.batch_size=-4", ">= 1"]),
    ("optimizer.lr=0", ["optimizer.lr=0.0", "> 0"]),
    ("optimizer.name=adamx", ["optimizer.name='adamx'", "adamw", "lion"]),
    ("decode.top_p=1.5", ["decode.top_p=1.5", "<= 1"]),
    ("decode.top_p=0", ["decode.top_p=0.0", "> 0"]),
    ("mesh.fsdp=0", ["mesh.fsdp=0", "-1"]),
    ("train.micro_batches=3", ["train.micro_batches=3", "data.batch_size=64"]),
    ("train.steps=100", ["optimizer.warmup_steps=100", "train.steps=100", "warmup_cosine"]),
])
def test_bad_values_name_key_value_and_allowed(override, words):
    with pytest.raises(ConfigError) as e:
        load_config(SFT, [override])
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_bad_value_in_yaml_file_is_named(tmp_path):
    write(tmp_path / "c.yaml", "base: " + str(SFT) + "\noptimizer: {lrr: 3}\n")
    with pytest.raises(ConfigError, match=r"optimizer\.lrr=3: unknown key.*'lr'"):
        load_config(tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="key.subkey=value"):
        load_config(SFT, ["train.steps"])


def test_sections_check_themselves_when_built_in_python():
    with pytest.raises(ConfigError, match=r"data\.batch_size=-1"):
        DataSection(batch_size=-1)
    with pytest.raises(ConfigError, match=r"at most one axis.*\['data', 'fsdp'\]"):
        MeshSection(data=-1, fsdp=-1)
    with pytest.raises(ConfigError, match=r"mesh\.process_id=2.*num_processes=2"):
        MeshSection(num_processes=2, process_id=2)
    with pytest.raises(ConfigError, match=r"decode\.min_p=2"):
        DecodeSection(min_p=2.0)
    with pytest.raises(ConfigError, match=r"micro_batches=4.*batch_size=6"):
        from_dict({"data": {"batch_size": 6}, "train": {"micro_batches": 4}})
    assert Config().data.batch_size == 32  # the defaults are valid


def test_unknown_method_names_and_args():
    with pytest.raises(ConfigError, match=r"objective\.name='nope'.*allowed.*sft"):
        validate_names(load_config(SFT, ["objective.name=nope"]))
    with pytest.raises(ConfigError, match=r"data\.task='nope'.*arith"):
        validate_names(load_config(SFT, ["data.task=nope"]))
    with pytest.raises(ConfigError, match=r"data\.task_args\.digitz=2: unknown key.*digits"):
        validate_names(load_config(SFT, ["data.task_args.digitz=2"]))
    with pytest.raises(ConfigError, match=r"data\.task_args\.digits='two': expected an integer"):
        validate_names(load_config(SFT, ["data.task_args.digits=two"]))
    with pytest.raises(ConfigError, match=r"model\.preset='huge'"):
        validate_names(load_config(SFT, ["model.preset=huge"]))
    with pytest.raises(ConfigError, match=r"data\.path=None: required"):
        validate_names(load_config(SFT, ["data.task=jsonl"]))
    with pytest.raises(ConfigError, match=r"decode\.policy='x': not a known logit guide.*lenvm"):
        validate_names(load_config(SFT, ["decode.policy=x"]))  # greedy: a logit guide
    with pytest.raises(ConfigError, match=r"decode\.policy_args: mode='exact'"):
        validate_names(load_config(SFT, ["decode.policy=lenvm", "decode.policy_args.mode=exact"]))


def test_decode_policy_checked_against_registry(monkeypatch):
    @dataclasses.dataclass(frozen=True)
    class ThresholdArgs:
        threshold: float = 0.9

    from jaxtok.config import import_registering_modules

    import_registering_modules()  # first: run alone, the later import would register 'threshold' into the fake
    reg = Registry("commit policy")
    reg.register("threshold", ThresholdArgs)(lambda: None)
    monkeypatch.setattr(COMMIT_POLICIES, "_entries", reg._entries)
    base = ["decode.method=diffusion"]
    validate_names(load_config(SFT, base + ["decode.policy=threshold", "decode.policy_args.threshold=0.5"]))
    with pytest.raises(ConfigError, match=r"decode\.policy='llada'.*allowed: \['threshold'\]"):
        validate_names(load_config(SFT, base + ["decode.policy=llada"]))
    with pytest.raises(ConfigError, match=r"decode\.policy_args\.tau=1: unknown key.*threshold"):
        validate_names(load_config(SFT, base + ["decode.policy=threshold", "decode.policy_args.tau=1"]))


def test_registry_parse_args_and_errors():
    @dataclasses.dataclass(frozen=True)
    class Args:
        rho: float = 0.5
        k: int = 1
        mode: Optional[str] = None
        ks: tuple[int, ...] = ()

        def __post_init__(self):
            if not 0 < self.rho <= 1:
                raise ValueError(f"rho={self.rho}: must be in (0, 1]")

    reg = Registry("selection rule")
    fn = reg.register("entropy_topk", Args)(lambda x: x)
    reg.register("all")(lambda x: x)
    assert reg.get("entropy_topk") is fn and reg.names() == ["all", "entropy_topk"]
    assert reg.parse_args("entropy_topk", {"rho": 1, "ks": [1, 2]}, "objective.args") == Args(1.0, 1, None, (1, 2))
    assert reg.parse_args("all", None) is None
    cases = [
        ({"rhoo": 1}, r"objective\.args\.rhoo=1: unknown key; allowed keys: \['k', 'ks', 'mode', 'rho'\]"),
        ({"k": 1.5}, r"objective\.args\.k=1\.5: expected an integer"),
        ({"k": True}, r"objective\.args\.k=True: expected an integer"),
        ({"ks": [1, "a"]}, r"objective\.args\.ks\[1\]='a': expected an integer"),
        ({"mode": 3}, r"objective\.args\.mode=3: expected a string"),
        ({"rho": 2.0}, r"objective\.args: rho=2\.0: must be in \(0, 1\]"),
    ]
    for mapping, pattern in cases:
        with pytest.raises(ConfigError, match=pattern):
            reg.parse_args("entropy_topk", mapping, "objective.args")
    with pytest.raises(ConfigError, match=r"selection rule 'all' takes no arguments"):
        reg.parse_args("all", {"x": 1}, "objective.args")
    with pytest.raises(ConfigError, match=r"select='nope' is not a known selection rule; allowed: \['all'"):
        reg.get("nope", "select")
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("all")(lambda x: x + 1)


def test_every_shipped_config_validates():
    paths = sorted((ROOT / "configs").rglob("*.yaml"))
    assert SFT in paths
    for path in paths:
        if path.parent.name == "scripts":  # settings of a scripts/<name>.py measurement, not a jaxtok config
            assert (ROOT / "scripts" / f"{path.stem}.py").is_file(), path
            continue
        if "stages:" in path.read_text():
            recipe.read_recipe(path)
        else:
            validate_names(load_config(path))


def test_base_yaml_is_the_generated_reference():
    # configs/base.yaml lists every key with its default; regenerate with
    # python -c "from jaxtok.config import reference_yaml; print(reference_yaml(), end='')" > configs/base.yaml
    text = (ROOT / "configs" / "base.yaml").read_text()
    assert text == reference_yaml()
    assert load_config(ROOT / "configs" / "base.yaml") == Config()
    keys = {k for k, _, _ in describe()}
    assert {"optimizer.lr", "data.task", "mesh.fsdp", "run.out_dir", "decode.policy_args"} <= keys
    assert all(f"  {k.split('.')[1]}: " in text for k in keys)


def test_optimizer_schedules_and_rules_build_and_step():
    import jax.numpy as jnp
    import optax

    params = {"w": jnp.ones(3)}
    grads = {"w": jnp.full(3, 10.0)}
    for name in ("adamw", "adam", "sgd", "lion", "adafactor"):
        for sched in ("constant", "linear", "cosine", "warmup_cosine"):
            cfg = load_config(SFT, [f"optimizer.name={name}", f"optimizer.schedule={sched}",
                                    "optimizer.warmup_steps=5"])
            opt = build_optimizer(cfg.optimizer, 100)
            assert isinstance(opt, optax.GradientTransformation)
            updates, _ = opt.update(grads, opt.init(params), params)
            # first step is inside the linear warm-up from 0: no movement
            chex.assert_trees_all_equal_shapes_and_dtypes(updates, params)
            chex.assert_trees_all_close(updates, jax.tree.map(jnp.zeros_like, params), atol=0.0, rtol=0.0)


def test_optimizer_clipping_and_constant_lr():
    import jax.numpy as jnp

    params = {"w": jnp.zeros(4)}
    grads = {"w": jnp.full(4, 3.0)}  # global norm 6
    for clip, expected in ((1.0, -0.1 * 3.0 / 6.0), (0.0, -0.1 * 3.0)):
        cfg = load_config(SFT, ["optimizer.name=sgd", "optimizer.b1=0", "optimizer.schedule=constant",
                                "optimizer.warmup_steps=0", "optimizer.lr=0.1", f"optimizer.grad_clip={clip}"])
        opt = build_optimizer(cfg.optimizer, 10)
        updates, _ = opt.update(grads, opt.init(params), params)
        chex.assert_trees_all_close(updates, {"w": jnp.full(4, expected)}, rtol=1e-6)


def test_peer_setting_names_point_at_existing_keys():
    """TRL/verl/Tunix names (beta, epsilon_high, num_iterations, max_completion_length, lmbda, ...) are answered with
    the jaxtok key; every key a hint names exists, so the table cannot rot."""
    import re

    import jaxtok.train.objectives  # noqa: F401  (registration)
    from jaxtok.registry import OBJECTIVES, PEER_NAMES, ConfigError

    sections = {f.name: {g.name for g in dataclasses.fields(f.type if isinstance(f.type, type) else
                                                           typing.get_type_hints(Config)[f.name])}
                for f in dataclasses.fields(Config)}
    args = {f.name for name in ("policy_gradient", "opd") for f in
            dataclasses.fields(OBJECTIVES.entry(name).config_cls)}
    for peer, text in PEER_NAMES.items():
        for sec, key in re.findall(r"\b(objective\.args|rollout|data|optimizer|train)\.([a-z_0-9]+)", text):
            assert key in (args if sec == "objective.args" else sections[sec]), (peer, sec, key)
    with pytest.raises(ConfigError, match=r"rollout.max_completion_length=64: unknown key \('max_completion_length' "
                                          r"is a TRL/verl/Tunix name; in jaxtok: rollout.max_new_tokens\)"):
        load_config(SFT, ["rollout.max_completion_length=64"])
    with pytest.raises(ConfigError, match=r"objective.args.epsilon_high=.*in jaxtok: objective.args.eps_high"):
        validate_names(load_config(ROOT / "configs" / "rl" / "grpo.yaml", ["objective.args.epsilon_high=0.28"]))


def test_peer_values_are_answered_with_the_jaxtok_value():
    import jaxtok.train.objectives  # noqa: F401  (registration)
    from jaxtok.registry import OBJECTIVES, ConfigError

    for args, match in (({"kl_estimator": "low_var_kl"}, "low_var_kl is k3"),
                        ({"loss_mode": "bnpo"}, "aggregation: token-mean")):
        with pytest.raises(ConfigError, match=match):
            OBJECTIVES.parse_args("policy_gradient", args, "objective.args")


def test_override_of_a_name_keeps_the_files_args_and_says_how_to_clear_them(tmp_path):
    # the quickstart's recipe overrides decode.policy=llada and keeps the file's policy_args (block_len,
    # shift_logits) on purpose; arguments that do not fit the new name get a hint, and `args={}` clears them
    path = write(tmp_path / "c.yaml", "objective: {name: mdlm, args: {scope: response}}\n"
                                      "decode: {method: diffusion, policy: threshold, policy_args: {threshold: 0.5}}\n")
    with pytest.raises(ConfigError, match=r"objective\.args\.scope='response': unknown key.*clear them with "
                                          r"objective\.args=\{\} and give those of 'sft' as objective\.args\.KEY"):
        validate_names(load_config(path, ["objective.name=sft"]))
    cfg = load_config(path, ["objective.name=sft", "objective.args={}", "objective.args.chunk_size=64",
                             "decode.policy=llada", "decode.policy_args=null"])
    validate_names(cfg)
    assert dict(cfg.objective.args) == {"chunk_size": 64} and dict(cfg.decode.policy_args) == {}
    kept = load_config(path, ["decode.policy_args.threshold=0.7"])  # a merge into the file's arguments
    assert dict(kept.decode.policy_args) == {"threshold": 0.7}


def test_decode_policy_rules_follow_the_method_spec():
    """Whether ``decode.policy`` is allowed is read from the method's registered spec (``policy`` None: the
    method's own arguments are ``decode.policy_args``), not from a list of method names: ead / lave / lud refuse a
    policy naming the key; a policy family's method refuses ``policy_args`` without ``decode.policy``."""
    from jaxtok.config import from_dict, validate_names
    from jaxtok.registry import ConfigError

    for method in ("ead", "lud"):
        extra = {"draft_init_from": "runs/x"} if method == "ead" else {}
        with pytest.raises(ConfigError, match=rf"decode.policy='fixed': decode.method='{method}' takes no policy"):
            validate_names(from_dict({"decode": {"method": method, "policy": "fixed", **extra}}))
    for method in ("speculative", "greedy", "sample"):  # greedy's arguments were silently dropped before
        with pytest.raises(ConfigError, match=r"decode.policy_args=\{'initial': 2\}: set decode.policy too"):
            validate_names(from_dict({"decode": {"method": method, "policy_args": {"initial": 2}}}))
    assert validate_names(from_dict({"decode": {"method": "lud", "policy_args": {"k": 3}}})).decode.policy_args.k == 3


def test_decode_method_and_drafter_come_from_the_registry(monkeypatch):
    """``decode.method`` / ``decode.drafter`` are names in DECODE_METHODS / DRAFTERS, not a list in the schema: a
    method registered by research code validates with its own arguments; an unknown one names the registered ones;
    a drafter on a method whose spec takes none is refused."""
    from jaxtok.config import from_dict, validate_names
    from jaxtok.registry import DECODE_METHODS, ConfigError

    @dataclasses.dataclass(frozen=True)
    class BeamArgs:
        width: int = 4

    entries = dict(DECODE_METHODS._entries)
    monkeypatch.setattr(DECODE_METHODS, "_entries", entries)
    DECODE_METHODS.register("_test_beam", BeamArgs)(lambda cfg, plan, model, tok, *, mesh, task: None)
    plan = validate_names(from_dict({"decode": {"method": "_test_beam", "policy_args": {"width": 2}}}))
    assert plan.decode.method.name == "_test_beam" and plan.decode.policy_args.width == 2
    with pytest.raises(ConfigError, match=r"decode.method='beam'.*allowed:.*'_test_beam'.*'greedy'"):
        validate_names(from_dict({"decode": {"method": "beam"}}))
    with pytest.raises(ConfigError, match=r"decode.drafter='taps': decode.method='_test_beam' takes no drafter"):
        validate_names(from_dict({"decode": {"method": "_test_beam", "drafter": "taps"}}))
