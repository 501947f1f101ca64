"""scripts/trl_step_time.py: per-repeat TRL / jaxtok ratios, the table, and bad input (issue 14, item 3)."""

import argparse
import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "trl_step_time.py"


@pytest.fixture(scope="module")
def mod():
    spec = importlib.util.spec_from_file_location("_trl_step_time", SCRIPT)
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m


def _run(arm, rep, s, setting="grpo"):
    return {"setting": setting, "arm": arm, "repeat": rep, "steps": 5, "load_before": 1.0 + rep, "started": 0.0,
            "step_s_median": s, "step_seconds": [9.0, s, s, s, s]}


def test_ratios_pair_runs_of_the_same_repeat(mod):
    runs = [_run("jaxtok", 0, 1.0), _run("trl", 0, 1.5), _run("jaxtok_full_width", 0, 1.2),
            _run("jaxtok", 1, 2.0), _run("trl", 1, 2.0), _run("jaxtok_full_width", 1, 2.5),
            _run("jaxtok", 2, 1.0), _run("trl", 2, 1.2), _run("jaxtok_full_width", 2, 1.0)]
    res = mod.summarize(runs, argparse.Namespace(argv=["--repeats", "3"], threads=2))
    s = res["settings"]["grpo"]
    assert s["step_s_median"] == {"jaxtok": 1.0, "jaxtok_full_width": 1.2, "trl": 1.5}
    r = s["ratios"]["trl_over_jaxtok"]
    assert r["per_repeat"] == pytest.approx([1.5, 1.0, 1.2]) and r["median"] == pytest.approx(1.2)
    assert s["ratios"]["trl_over_jaxtok_full_width"]["per_repeat"] == pytest.approx([1.25, 0.8, 1.2])
    text = mod.table(res)
    assert "| grpo | jaxtok | 1.000 | 1.000, 2.000, 1.000 | **1.20x** (1.50, 1.00, 1.20) |" in text
    assert "python scripts/trl_step_time.py --repeats 3" in text


def test_median_skips_the_first_step(mod):
    assert mod._median_after_first([30.0, 1.0, 2.0, 3.0]) == 2.0
    with pytest.raises(RuntimeError, match="too few"):
        mod._median_after_first([1.0, 2.0])


def test_bad_input_exits_2_naming_the_flag(mod, capsys):
    assert mod.main(["--repeats", "0"]) == 2
    assert "--repeats" in capsys.readouterr().err
    assert mod.main(["--trl-python", "/nonexistent/python"]) == 2
    assert "/nonexistent/python" in capsys.readouterr().err
