"""A replayable probe suite: bad inputs a careless user gives ``jaxtok``, each run through ``jaxtok.cli.main`` in
this process (no subprocess per case). Every one must exit 2 with a single line naming the key, override or file
and no traceback; nothing may be written for it. Then the run-directory guards: the lock (live and stale owners),
a changed config on resume, ``run.resume=false`` without ``run.overwrite``, a finished run, an interrupted or
failing handler. Handlers are replaced by fakes (no JAX compute): the real loop's side is in test_checkpoint.py."""

import errno
import json
import os
import socket
from pathlib import Path

import pytest

from jaxtok import cli, rundir

ROOT = Path(__file__).resolve().parents[1]
SFT = ROOT / "configs" / "sft" / "arith.yaml"
RECIPE = ROOT / "configs" / "quickstart.yaml"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("probe_files")
    (d / "empty_dir").mkdir()
    (d / "latin1.yaml").write_bytes("# caf\xe9\ntrain: {steps: 3}\n".encode("latin-1"))
    (d / "bad.yaml").write_text("train: {steps: 3\n")
    (d / "list.yaml").write_text("- 1\n- 2\n")
    (d / "cycle_a.yaml").write_text("base: cycle_b.yaml\n")
    (d / "cycle_b.yaml").write_text("base: cycle_a.yaml\n")
    (d / "missing_base.yaml").write_text("base: nowhere.yaml\n")
    (d / "bad_base.yaml").write_text("base: 3\n")
    (d / "section_scalar.yaml").write_text(f"base: {SFT}\noptimizer: 3\n")
    (d / "unknown_section.yaml").write_text(f"base: {SFT}\noptimiser: {{lr: 1.0e-3}}\n")
    (d / "nan_in_file.yaml").write_text(f"base: {SFT}\noptimizer: {{lr: .nan}}\n")
    (d / "bad_stage.yaml").write_text(f"stages:\n  - {{name: a, command: train, config: {SFT}, "
                                      f"overrides: ['optimizer.lr=nan']}}\n")
    (d / "latin1_recipe.yaml").write_bytes("# caf\xe9\nstages: []\n".encode("latin-1"))
    (d / "a_file").write_text("not a directory\n")
    return d


def _out(tmp_path):
    return f"run.out_dir={tmp_path / 'runs'}"


# (id, argv built from (files, out-dir override), words the one-line message must contain)
CASES = [
    # non-finite or out-of-range values
    ("lr_nan", lambda f, o: ["train", SFT, o, "optimizer.lr=nan"], ["optimizer.lr=nan", "finite"]),
    ("lr_inf", lambda f, o: ["train", SFT, o, "optimizer.lr=inf"], ["optimizer.lr=inf", "finite"]),
    ("lr_negative", lambda f, o: ["train", SFT, o, "optimizer.lr=-1"], ["optimizer.lr=-1.0", "> 0"]),
    ("lr_nan_in_file", lambda f, o: ["train", f / "nan_in_file.yaml", o], ["optimizer.lr=nan", "finite"]),
    ("top_p_nan", lambda f, o: ["decode", SFT, o, "decode.top_p=nan"], ["decode.top_p=nan", "finite"]),
    ("temperature_nan", lambda f, o: ["train", SFT, o, "rollout.temperature=nan"], ["rollout.temperature=nan"]),
    ("b1_nan", lambda f, o: ["train", SFT, o, "optimizer.b1=nan"], ["optimizer.b1=nan", "finite"]),
    ("end_lr_ratio_inf", lambda f, o: ["train", SFT, o, "optimizer.end_lr_ratio=inf"], ["optimizer.end_lr_ratio"]),
    ("reward_weight_nan", lambda f, o: ["train", SFT, o, "rollout.rewards.exact_match=nan"],
     ["rollout.rewards.exact_match=nan", "finite"]),
    ("objective_arg_nan", lambda f, o: ["train", SFT, o, "objective.args.label_smoothing=.nan"],
     ["objective.args.label_smoothing=nan", "finite"]),
    ("policy_arg_inf", lambda f, o: ["decode", SFT, o, "decode.method=speculative", "decode.policy=confidence",
                                     "decode.policy_args.threshold=.inf"], ["decode.policy_args.threshold=inf"]),
    ("steps_zero", lambda f, o: ["train", SFT, o, "train.steps=0"], ["train.steps=0", ">= 1"]),
    ("steps_float", lambda f, o: ["train", SFT, o, "train.steps=1.5"], ["train.steps=1.5"]),
    ("lr_text", lambda f, o: ["train", SFT, o, "optimizer.lr=fast"], ["optimizer.lr='fast'"]),
    ("mesh_zero", lambda f, o: ["train", SFT, o, "mesh.data=0"], ["mesh.data=0"]),
    ("micro_batches", lambda f, o: ["train", SFT, o, "train.micro_batches=3"], ["train.micro_batches=3"]),
    ("warmup", lambda f, o: ["train", SFT, o, "optimizer.warmup_steps=5000"], ["optimizer.warmup_steps=5000"]),
    ("choice", lambda f, o: ["train", SFT, o, "optimizer.name=sgdx"], ["optimizer.name='sgdx'", "adamw"]),
    ("block_causal", lambda f, o: ["train", SFT, o, "model.attention=block_causal"], ["model.block_size"]),
    ("eos_empty", lambda f, o: ["train", SFT, o, "tokenizer.eos=[]"], ["tokenizer.eos"]),
    # overrides
    ("empty_key", lambda f, o: ["train", SFT, o, "=3"], ["'=3'", "empty"]),
    ("no_equals", lambda f, o: ["train", SFT, o, "optimizer.lr"], ["'optimizer.lr'", "key.subkey=value"]),
    ("empty_part", lambda f, o: ["train", SFT, o, "optimizer..lr=1"], ["optimizer..lr", "empty part"]),
    ("bad_yaml_value", lambda f, o: ["train", SFT, o, "optimizer.lr=[1,"], ["optimizer.lr=[1,", "YAML"]),
    ("section_value", lambda f, o: ["train", SFT, o, "optimizer=3"], ["optimizer=3", "section"]),
    ("section_list", lambda f, o: ["train", SFT, o, "run=[1]"], ["run=[1]", "section"]),
    ("unknown_key", lambda f, o: ["train", SFT, o, "optimizer.lr_rate=1"], ["optimizer.lr_rate", "allowed keys"]),
    ("peer_name", lambda f, o: ["train", SFT, o, "optimizer.learning_rate=1"], ["learning_rate", "optimizer.lr"]),
    ("unknown_objective", lambda f, o: ["train", SFT, o, "objective.name=nope"], ["objective.name='nope'"]),
    ("unknown_objective_arg", lambda f, o: ["train", SFT, o, "objective.args.nope=1"], ["objective.args.nope"]),
    ("unknown_task", lambda f, o: ["train", SFT, o, "data.task=nope"], ["data.task='nope'"]),
    ("unknown_preset", lambda f, o: ["train", SFT, o, "model.preset=nope"], ["model.preset='nope'"]),
    ("policy_args_alone", lambda f, o: ["decode", SFT, o, "decode.method=sample", "decode.policy_args.x=1"],
     ["decode.policy_args", "decode.policy"]),
    # loop selectors have their own keys: the old decode.policy spelling names them (never silently renamed)
    ("old_policy_ead", lambda f, o: ["decode", SFT, o, "decode.method=speculative", "decode.policy=ead"],
     ["decode.policy='ead'", "decode.method=ead"]),
    ("old_policy_taps", lambda f, o: ["decode", SFT, o, "decode.method=speculative", "decode.policy=taps"],
     ["decode.policy='taps'", "decode.drafter=taps", "decode.drafter_args"]),
    ("old_policy_lave", lambda f, o: ["decode", SFT, o, "decode.method=diffusion", "decode.policy=lave"],
     ["decode.policy='lave'", "decode.method=lave"]),
    ("unknown_decode_method", lambda f, o: ["decode", SFT, o, "decode.method=nope"],
     ["decode.method='nope'", "greedy", "speculative"]),
    ("unknown_drafter", lambda f, o: ["decode", SFT, o, "decode.method=speculative", "decode.drafter=nope"],
     ["decode.drafter='nope'", "taps"]),
    ("drafter_without_speculative", lambda f, o: ["decode", SFT, o, "decode.drafter=taps"],
     ["decode.drafter='taps'", "speculative"]),
    ("taps_drafter_arg", lambda f, o: ["decode", SFT, o, "decode.method=speculative", "decode.drafter=taps",
                                       "decode.drafter_args.policy=fixed"], ["decode.drafter_args.policy"]),
    ("ead_with_policy", lambda f, o: ["decode", SFT, o, "decode.method=ead", "decode.draft_init_from=x",
                                      "decode.policy=fixed"], ["decode.policy='fixed'", "decode.method='ead'"]),
    ("jsonl_without_path", lambda f, o: ["train", SFT, o, "data.task=jsonl"], ["data.path"]),
    ("list_without_brackets", lambda f, o: ["train", SFT, o, "data.task=files", "data.train_files=a.jsonl"],
     ["data.train_files='a.jsonl'", "expects a list", "data.train_files=[a.jsonl]"]),
    # input paths
    ("missing_init_from", lambda f, o: ["train", SFT, o, "model.init_from=/no/such/run"], ["model.init_from"]),
    ("empty_teacher_dir", lambda f, o: ["train", SFT, o, f"rollout.teacher_init_from={f / 'empty_dir'}"],
     ["rollout.teacher_init_from"]),
    ("out_dir_is_a_file", lambda f, o: ["train", SFT, f"run.out_dir={f / 'a_file'}"], ["a_file"]),
    # config files
    ("config_missing", lambda f, o: ["train", f / "nowhere.yaml", o], ["nowhere.yaml", "does not exist"]),
    ("config_is_dir", lambda f, o: ["train", f / "empty_dir", o], ["empty_dir", "is a directory"]),
    ("config_not_utf8", lambda f, o: ["train", f / "latin1.yaml", o], ["latin1.yaml", "not UTF-8"]),
    ("config_bad_yaml", lambda f, o: ["validate", f / "bad.yaml"], ["bad.yaml", "not valid YAML"]),
    ("config_top_list", lambda f, o: ["validate", f / "list.yaml"], ["list.yaml", "mapping"]),
    ("base_cycle", lambda f, o: ["validate", f / "cycle_a.yaml"], ["cycle"]),
    ("base_missing", lambda f, o: ["validate", f / "missing_base.yaml"], ["nowhere.yaml"]),
    ("base_not_a_name", lambda f, o: ["validate", f / "bad_base.yaml"], ["base=", "bad_base.yaml"]),
    ("section_scalar_in_file", lambda f, o: ["validate", f / "section_scalar.yaml"], ["optimizer=3", "section"]),
    ("unknown_section", lambda f, o: ["validate", f / "unknown_section.yaml"], ["optimiser"]),
    # recipes
    ("recipe_to_train", lambda f, o: ["train", RECIPE, o], ["quickstart.yaml", "jaxtok run"]),
    ("config_to_run", lambda f, o: ["run", SFT], ["arith.yaml", "stages"]),
    ("recipe_bad_stage", lambda f, o: ["validate", f / "bad_stage.yaml"], ["stage 'a'", "optimizer.lr=nan"]),
    ("recipe_not_utf8", lambda f, o: ["run", f / "latin1_recipe.yaml"], ["latin1_recipe.yaml", "not UTF-8"]),
    ("recipe_is_dir", lambda f, o: ["run", f / "empty_dir"], ["empty_dir", "is a directory"]),
    ("recipe_bad_override", lambda f, o: ["validate", RECIPE, "decode.top_p=nan"], ["decode.top_p=nan"]),
]


@pytest.mark.parametrize("argv, words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line(argv, words, files, tmp_path, capsys):
    rc = cli.main([str(a) for a in argv(files, _out(tmp_path))])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err and err.count("\n") == 1, err
    for w in words:
        assert w in err, (w, err)
    assert not (tmp_path / "runs").exists()  # nothing written for a bad input


def test_at_least_forty_distinct_probes():
    assert len({c[0] for c in CASES}) == len(CASES) >= 40


def test_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    assert cli.main(["--debug", "validate", str(SFT), "optimizer.lr=nan"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().endswith("optimizer.lr=nan: must be a finite number")
    monkeypatch.setenv("JAXTOK_DEBUG", "1")
    assert cli.main(["validate", str(SFT), "=3"]) == 2
    assert "Traceback" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- run directories


class FakeTrain:
    """A ``train`` handler that writes what the loop would: a checkpoint directory at train.steps, metrics and
    summary.json (``fail`` raises instead)."""

    def __init__(self):
        self.calls = []
        self.fail = None

    def __call__(self, plan, run_dir):
        cfg = plan.cfg  # the run plan validation built
        self.calls.append(cfg)
        assert (run_dir / rundir.LOCK_FILE).is_file()  # the CLI holds the lock while the handler runs
        if self.fail is not None:
            (run_dir / "checkpoints" / "2").mkdir(parents=True, exist_ok=True)
            raise self.fail
        (run_dir / "checkpoints" / str(cfg.train.steps)).mkdir(parents=True, exist_ok=True)
        (run_dir / "summary.json").write_text(json.dumps({"step": cfg.train.steps, "lr": cfg.optimizer.lr}))
        return {}


@pytest.fixture
def fake(monkeypatch):
    handler = FakeTrain()
    monkeypatch.setitem(cli.HANDLERS, "train", handler)
    return handler


def _train(tmp_path, *overrides):
    return cli.main(["train", str(SFT), f"run.out_dir={tmp_path}", "run.name=r", "train.steps=4",
                     "optimizer.warmup_steps=1", *overrides])


def test_live_lock_refuses_a_second_training(tmp_path, fake, capsys):
    run = tmp_path / "r"
    run.mkdir()
    owner = {"pid": 1, "host": socket.gethostname(), "started": "earlier"}  # pid 1 is always alive
    (run / rundir.LOCK_FILE).write_text(json.dumps(owner))
    assert _train(tmp_path) == 2
    err = capsys.readouterr().err
    assert "is in use: process 1" in err and rundir.LOCK_FILE in err and "Traceback" not in err
    assert not fake.calls and not (run / "config.yaml").exists()
    assert json.loads((run / rundir.LOCK_FILE).read_text()) == owner  # not taken over


def test_stale_lock_is_taken_over(tmp_path, fake, capsys):
    run = tmp_path / "r"
    run.mkdir()
    (run / rundir.LOCK_FILE).write_text(json.dumps({"pid": 2 ** 30, "host": socket.gethostname()}))
    assert _train(tmp_path) == 0
    assert "stale lock" in capsys.readouterr().err and len(fake.calls) == 1
    assert not (run / rundir.LOCK_FILE).exists()  # released after the run
    # an unreadable lock file left by a crash (older than a few seconds) is stale too
    (run / rundir.LOCK_FILE).write_text("")
    os.utime(run / rundir.LOCK_FILE, (0, 0))
    assert _train(tmp_path, "train.steps=5") == 0 and len(fake.calls) == 2


def test_lock_in_process_is_reentrant_and_released(tmp_path):
    rundir.acquire(tmp_path)
    rundir.acquire(tmp_path)
    rundir.release(tmp_path)
    assert (tmp_path / rundir.LOCK_FILE).is_file()
    rundir.release(tmp_path)
    assert not (tmp_path / rundir.LOCK_FILE).exists()


def test_changed_config_on_resume_is_refused_naming_keys(tmp_path, fake, capsys):
    assert _train(tmp_path, "train.steps=4") == 0
    stored = (tmp_path / "r" / "config.yaml").read_text()
    assert _train(tmp_path, "train.steps=8", "optimizer.lr=2e-3", "data.seed=5") == 2
    err = capsys.readouterr().err
    assert "optimizer.lr: 0.005 -> 0.002" in err and "data.seed: 0 -> 5" in err and "train.steps:" not in err
    assert "RESUMABLE" not in err and "'train.steps'" in err  # names the allow-list
    assert (tmp_path / "r" / "config.yaml").read_text() == stored and len(fake.calls) == 1
    # resumable keys may change: more steps, other cadence, other output settings
    assert _train(tmp_path, "train.steps=8", "train.log_every=1", "run.progress=false") == 0
    assert len(fake.calls) == 2 and "steps: 8" in (tmp_path / "r" / "config.yaml").read_text()
    # fewer steps than the run already has
    assert _train(tmp_path, "train.steps=6") == 2
    assert "train.steps=6" in capsys.readouterr().err


def test_resume_false_needs_overwrite(tmp_path, fake, capsys):
    assert _train(tmp_path) == 0
    assert _train(tmp_path, "run.resume=false", "train.seed=3") == 2
    err = capsys.readouterr().err
    assert "run.resume=false" in err and "run.overwrite=true" in err and len(fake.calls) == 1
    (tmp_path / "r" / "metrics.jsonl").write_text('{"step": 4}\n')
    assert _train(tmp_path, "run.resume=false", "run.overwrite=true", "train.seed=3", "train.steps=3") == 0
    assert len(fake.calls) == 2
    run = tmp_path / "r"
    assert rundir.committed_steps(run) == [3] and not (run / "metrics.jsonl").exists()
    assert "seed: 3" in (run / "config.yaml").read_text()


def test_finished_run_keeps_config_and_summary(tmp_path, fake):
    assert _train(tmp_path) == 0
    run = tmp_path / "r"
    before = {n: (run / n).read_text() for n in ("config.yaml", "summary.json")}
    assert rundir.finished(run, 4)
    assert _train(tmp_path, "train.log_every=7") == 0  # the handler (the loop) then says it has nothing to do
    assert {n: (run / n).read_text() for n in before} == before


def test_non_train_command_keeps_the_training_config(tmp_path, fake, monkeypatch):
    assert _train(tmp_path) == 0
    seen = []
    monkeypatch.setitem(cli.HANDLERS, "eval", lambda cfg, d: seen.append(d) or {})
    assert cli.main(["eval", str(SFT), f"run.out_dir={tmp_path}", "run.name=r", "decode.max_new_tokens=7"]) == 0
    run = tmp_path / "r"
    assert "max_new_tokens: 7" in (run / "config.eval.yaml").read_text()
    assert "max_new_tokens: 20" in (run / "config.yaml").read_text()


@pytest.mark.parametrize("exc, code, words", [
    (KeyboardInterrupt(), 130, ["interrupted", "step 2", "resume"]),
    (OSError(errno.ENOSPC, "No space left on device", "/x/metrics.jsonl"), 1, ["No space left", "metrics.jsonl"]),
])
def test_interrupt_and_full_disk_are_one_line(tmp_path, fake, capsys, exc, code, words):
    fake.fail = exc
    assert _train(tmp_path) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    for w in words:
        assert w in err, err
    assert not (tmp_path / "r" / rundir.LOCK_FILE).exists()  # released


def test_a_bug_is_not_hidden(tmp_path, fake):
    fake.fail = ZeroDivisionError("bug")
    with pytest.raises(ZeroDivisionError):
        _train(tmp_path)
    assert not (tmp_path / "r" / rundir.LOCK_FILE).exists()


def test_config_changes_allow_list():
    old = {"train": {"steps": 4, "log_every": 1, "seed": 0}, "run": {"out_dir": "a"}, "mesh": {"data": -1},
           "objective": {"args": {"x": 1}}}
    new = {"train": {"steps": 9, "log_every": 2, "seed": 0}, "run": {"out_dir": "b"}, "mesh": {"data": 2},
           "objective": {"args": {"x": 1, "y": 2}}}
    assert rundir.config_changes(old, new) == {"objective.args.y": ("<missing>", 2)}
    assert rundir.resumable("run.name") and rundir.resumable("train.steps") and not rundir.resumable("train.seed")
