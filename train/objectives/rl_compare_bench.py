"""Not an objective: importing this package (``jaxtok.config.validate_names`` does, for every command) registers the
``rl_compare`` bench of :mod:`jaxtok.train.rl_report`, which ``jaxtok.train.bench.run_bench`` does not import
itself. Move this import into ``run_bench`` beside the decode/diffusion benches and delete this file."""

from jaxtok.train import rl_report  # noqa: F401  (registers BENCHES["rl_compare"])
