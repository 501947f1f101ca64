"""Redraw every committed plot in docs/results from its committed JSON (no experiment is re-run).

    python scripts/replot_results.py            # all of them
    python scripts/replot_results.py rl diffusion

Each PNG is captioned with the command that made its numbers (the one in the matching ``docs/results/*.md``).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "docs/results"

COMMANDS = {
    "diffusion": "jaxtok bench configs/bench/diffusion.yaml model.init_from=runs/zoo/diffusion",
    "length_control": "jaxtok bench configs/bench/length_control.yaml",
    "rl": None,  # rl.json holds its command
    "trl_compare": "python scripts/trl_compare.py report "
                   "--pair 2e-4=runs/trl_compare/jaxtok_lr2e-4+runs/trl_compare/jaxtok_lr2e-4_s1,runs/trl_compare/trl_lr2e-4 "
                   "--pair 1e-3=runs/trl_compare/jaxtok_lr1e-3,runs/trl_compare/trl_lr1e-3 "
                   "--timing runs/trl_compare/jaxtok_lr1e-3,runs/trl_compare/trl_lr2e-4,2:25 --note ... "
                   "--out docs/results/trl_compare",
}


def replot(name: str) -> list:
    if name == "diffusion":
        from jaxtok.bench.diffusion import replot_accuracy_vs_nfe

        return [replot_accuracy_vs_nfe(RESULTS / "diffusion.json", RESULTS / "diffusion_accuracy_vs_nfe.png",
                                       COMMANDS[name])]
    if name == "length_control":
        from jaxtok.bench.length import replot_length_control

        return replot_length_control(RESULTS / "length_control.json", RESULTS / "length_control", COMMANDS[name])
    if name == "rl":
        from jaxtok.bench.rl_report import replot as replot_rl

        return replot_rl(RESULTS / "rl.json", RESULTS / "rl")
    if name == "trl_compare":
        subprocess.run([sys.executable, str(REPO / "scripts/trl_compare.py"), "replot", "--json",
                        "docs/results/trl_compare.json", "--command", COMMANDS[name]], check=True, cwd=REPO)
        return [RESULTS / "trl_compare.png"]
    raise SystemExit(f"unknown plot set {name!r}; known: {sorted(COMMANDS)}")


def main(argv=None) -> int:
    import matplotlib.image

    for name in (argv if argv is not None else sys.argv[1:]) or list(COMMANDS):
        for png in replot(name):
            h, w = matplotlib.image.imread(png).shape[:2]
            print(f"{Path(png).relative_to(REPO)}: {w}x{h} px")
    return 0


if __name__ == "__main__":
    sys.exit(main())
