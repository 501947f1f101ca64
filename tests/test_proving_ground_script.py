"""scripts/proving_ground.py --keep: an earlier json's arms are carried over, named arms recomputed in place (issue 14)."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "proving_ground.py"


def _module():
    spec = importlib.util.spec_from_file_location("_proving_ground", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _arm(final: float, start: float = 0.3) -> dict:
    return {"start_acc": start, "final_acc_mean": final, "final_acc_ci95": [final - 0.01, final + 0.01],
            "final_acc_per_seed": [final], "gain_pp": 100 * (final - start), "seeds": 1, "steps": 10,
            "train_flops": 1e9, "wall_s_per_seed": [1.0], "step_s_mean": 0.1, "train_metrics": {},
            "curves": [{"10": final}], "run_dirs": ["gone"], "command": "old"}


@pytest.fixture
def setup(tmp_path, monkeypatch):
    mod = _module()
    start = tmp_path / "start"
    start.mkdir()
    (start / "summary.json").write_text(json.dumps({"eval/exact_match": 0.31, "eval/num_examples": 1200}))
    prev = tmp_path / "prev.json"
    prev.write_text(json.dumps({"start_acc": 0.3, "arms": {"grpo": _arm(0.42), "trl_grpo": _arm(0.35), "opd": _arm(0.44)}}))
    calls = []

    def fake_summary(dirs, start_acc, n_eval, teacher, at, tm, mirror_src):
        calls.append((dirs, mirror_src))
        return _arm(0.40, start_acc)

    monkeypatch.setattr(mod, "arm_summary", fake_summary)
    return mod, start, prev, calls, tmp_path


def test_keep_carries_unnamed_arms_and_recomputes_named_in_place(setup):
    mod, start, prev, calls, tmp = setup
    cfg = tmp / "grpo.yaml"
    cfg.write_text("train: {steps: 10}\n")
    mod.main(["--start", str(start), "--keep", str(prev), "--arm", f"trl_grpo={tmp}/trl_s0", "--cmd", "trl_grpo=new",
              "--mirror", f"trl_grpo=grpo:{cfg}", "--out", str(tmp / "pg")])
    out = json.loads((tmp / "pg.json").read_text())
    assert list(out["arms"]) == ["grpo", "trl_grpo", "opd"]  # the earlier order, the named arm in its old place
    assert out["arms"]["grpo"]["final_acc_mean"] == 0.42 and out["arms"]["grpo"]["kept_from"] == str(prev)
    assert out["arms"]["opd"]["command"] == "old"
    new = out["arms"]["trl_grpo"]
    assert new["final_acc_mean"] == 0.40 and new["start_acc"] == 0.31 and new["command"] == "new"
    assert new["mirrors"] == "grpo" and "kept_from" not in new
    assert calls == [([tmp / "trl_s0"], cfg)]  # the FLOPs formula comes from the named config


def test_mirror_of_a_kept_arm_needs_its_config(setup, capsys):
    mod, start, prev, calls, tmp = setup
    with pytest.raises(SystemExit) as e:
        mod.main(["--start", str(start), "--keep", str(prev), "--arm", f"trl_grpo={tmp}/trl_s0",
                  "--mirror", "trl_grpo=grpo", "--out", str(tmp / "pg")])
    assert e.value.code == 2 and "grpo:CONFIG.yaml" in capsys.readouterr().err
    assert calls == []
