"""scripts/spec_membound.py's pure helpers: the acceptance a measured round cost needs, the tables it renders and
the two decode_peers.json keys it writes (with a second drafter timed beside the main one)."""

import importlib.util
import json
from pathlib import Path


def _mod():
    path = Path(__file__).resolve().parents[1] / "scripts" / "spec_membound.py"
    spec = importlib.util.spec_from_file_location("_spec_membound_t", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(b, method, policy, g, ratio, tpf, draft):
    return {"temperature": 0.0, "batch": b, "method": method, "policy": policy, "gamma_max": g, "draft": draft,
            "speed_ratio": ratio, "per_repeat": [ratio], "tokens_per_s": 100.0 * ratio, "ar_tokens_per_s": 100.0,
            "tokens_per_target_forward": tpf, "acceptance_rate": 0.8, "drafts_per_row_round": float(g),
            "identical_to_ar": 1.0}


def _res():
    rows = [_row(1, "fixed γ=6", "fixed", 6, 1.5, 4.0, "d2"), _row(1, "1-layer γ=6", "fixed", 6, 2.1, 4.2, "d1"),
            _row(64, "batch_gamma (γ*=0)", "batch_gamma", 0, 1.0, 1.0, "d2")]
    return {"command": "python scripts/spec_membound.py x", "measured_utc": "2026-12-04 04:00", "wall_minutes": 1.0,
            "machine": "m", "target": "t", "draft": "d2", "config": "c.yaml", "target_params": 25e6,
            "target_mb": 100.0, "draft_params": 1.6e6, "draft_mb": 6.4, "json": "docs/results/x.json",
            "extra_drafts": {"1-layer": {"path": "d1", "params": 1.0e6, "mb": 4.0}}, "max_new_tokens": 32,
            "repeats": 3, "prompts": {"1": 16}, "rows": rows, "calibration": {}, "load_before": [3.0, 2, 1],
            "load_after": [4.0, 2, 1]}


def test_alpha_for_inverts_expected_tokens_per_round():
    mod = _mod()
    for a, g in ((0.5, 4), (0.85, 6), (0.95, 8)):
        t = sum(a ** i for i in range(g + 1))
        assert abs(mod.alpha_for(t, g) - a) < 1e-9
    assert mod.alpha_for(1.0, 4) == 0.0 and mod.alpha_for(9.0, 6) == 1.0


def test_markdown_needs_table_and_peer_keys(tmp_path):
    mod = _mod()
    md = mod.markdown(_res())
    # fixed γ = 6 at 1.5x with 4 tokens per forward: a round costs 4 / 1.5 = 2.67 AR steps; 2x needs 5.33 tokens
    assert "| d2 | 6 | 1.50 | 4.00 | 2.67 | 5.33 |" in md
    assert "Load average (1 min) at start / end: 3.0 / 4.0" in md
    peers = tmp_path / "peers.json"
    peers.write_text(json.dumps({"other": 1}))
    mod.add_peer_keys(_res(), str(peers))
    p = json.loads(peers.read_text())
    assert p["other"] == 1
    assert p["spec_vs_ar_b1"]["ratio"] == 2.1 and p["spec_vs_ar_b1"]["settings"]["draft"].startswith("d1 (1.00M")
    assert p["spec_vs_ar_b1"]["settings"]["details"] == "docs/results/x.json"
    assert p["spec_vs_ar_b64"]["method"] == "batch_gamma (γ*=0)"
