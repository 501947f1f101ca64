"""scripts/rl_testbed.py: the mu = 2 arm's per-inner-step ratio statistics and the seed aggregation (issue 14 item 6)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _module():
    sys.path.insert(0, str(SCRIPTS))  # rl_testbed imports its neighbour proving_ground
    try:
        spec = importlib.util.spec_from_file_location("_rl_testbed", SCRIPTS / "rl_testbed.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(SCRIPTS))
    return mod


def _run(tmp: Path, name: str, final: float, mu: int = 2, steps: int = 50) -> Path:
    run = tmp / name
    run.mkdir()
    (run / "config.yaml").write_text(f"train: {{steps: {steps}}}\nrollout: {{inner_epochs: {mu}}}\n")
    rows = []
    for s in range(1, steps + 1):
        second = (s - 1) % mu == 1  # the reused batch: the ratio has moved
        rows.append({"step": s, "time": 1000.0 + s, "loss": 0.0, "clip_frac": 0.02 if second else 0.0,
                     "ratio_min": 0.5 if second else 1.0, "ratio_max": 2.0 if second else 1.0, "approx_kl": 0.0,
                     "step_time_s": 3.0 if second else 6.0, "entropy": 0.2, "grad_norm": 0.1})
        if s % 25 == 0:
            rows.append({"step": s, "time": 1000.0 + s, "eval/exact_match": final if s == steps else 0.3,
                         "eval/num_examples": 1200})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def test_mechanism_splits_inner_steps_and_arm_gives_t_interval(tmp_path):
    mod = _module()
    runs = [_run(tmp_path, f"s{i}", acc) for i, acc in enumerate((0.40, 0.42, 0.44))]
    a = mod.arm(runs, 0.3, None, "jaxtok train x.yaml train.seed={seed}")
    mech = a["seeds"][0]["mechanism"]
    assert mech["inner1"]["clip_frac_max"] == 0.0 and mech["inner1"]["ratio_min_min"] == 1.0  # k=1: ratio 1
    assert mech["inner2"]["clip_frac_mean"] == pytest.approx(0.02) and mech["inner2"]["ratio_max_max"] == 2.0
    assert mech["inner1"]["step_s_median"] == 6.0 and mech["inner2"]["step_s_median"] == 3.0
    assert mech["clip_frac_inner2_per_25"] == [0.02, 0.02]
    assert a["n_complete"] == 3 and a["final_mean"] == pytest.approx(0.42)
    assert a["final_se"] == pytest.approx(0.02 / 3 ** 0.5, abs=1e-4)
    assert a["final_ci95"] == pytest.approx([0.42 - 4.303 * 0.02 / 3 ** 0.5, 0.42 + 4.303 * 0.02 / 3 ** 0.5], abs=1e-4)
    assert a["gain_pp"] == pytest.approx(12.0) and a["seeds"][1]["command"].endswith("train.seed=1")


def test_one_seed_is_reported_as_one_run_and_uptime_lines_give_the_load(tmp_path):
    mod = _module()
    a = mod.arm([_run(tmp_path, "s0", 0.40)], 0.3, None, None)
    assert a["final_ci95"] is None and a["se_method"].startswith("one run")
    assert a["final_se"] == pytest.approx((0.4 * 0.6 / 1200) ** 0.5, abs=1e-4)
    log = tmp_path / "uptime.log"
    log.write_text("1970-01-01T00:16:50  00:16:50 up 1 day,  0 user,  load average: 4.50, 3.00, 2.00\n"
                   "1970-01-01T00:17:00 2.50 1.0 1.0\n")
    assert mod.mean_load(log, [(1000.0, 1100.0)]) == (3.5, 2)
