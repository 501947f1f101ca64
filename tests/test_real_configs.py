"""Smoke tests of the real-model examples in configs/real/: each runs as a user would run it (``jaxtok train`` /
``jaxtok decode`` on the YAML file), with the hub checkpoints replaced by tiny random checkpoints of the same
formats (Qwen3ForCausalLM, DreamModel, LLaDAModelLM) that carry the real Qwen3 / Llama-3 tokenizer files, and the
math data by a small JSONL train/eval pair in the same format. Sizes are overridden to keep them fast; the rest of
each file (chat template with its kwargs, file data, math_verify, HF folders as teacher and draft) runs as written."""

import json
from pathlib import Path

import pytest
from flax import nnx

from jaxtok import cli
from jaxtok.models import Decoder, presets, save_hf

import real_tokenizers as rt
from test_hf_diffusion import DREAM_CONFIG, LLADA_CONFIG, write_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TRAIN = [{"question": f"Tom has {a} apples and buys {b} more. How many apples does he have?", "answer": str(a + b)}
         for a, b in [(3, 4), (10, 5), (7, 8), (2, 9), (6, 6), (12, 1), (4, 4), (9, 3)]]
TEST = [{"question": "A box holds 6 pens; 3 are added. How many pens are there?", "answer": "9"},
        {"question": "Ann read 5 pages, then 7 more. How many pages did she read?", "answer": "12"}]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def _tiny_qwen3(path: Path, tok_dir: Path, seed: int) -> Path:
    """A Qwen3ForCausalLM folder with the real 151,936-row vocabulary (hidden 16, one layer) and tokenizer files."""
    cfg = presets.get("tiny_draft", vocab_size=rt.QWEN3_VOCAB_SIZE, hidden_size=16, intermediate_size=32, head_dim=8)
    save_hf(Decoder(cfg, rngs=nnx.Rngs(seed)), str(path))
    for name in TOKENIZER_FILES:
        (path / name).write_bytes((tok_dir / name).read_bytes())
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory, qwen3_dir, llama3_dir):
    root = tmp_path_factory.mktemp("real")
    qwen_tok, llama_tok = qwen3_dir, llama3_dir
    hf = root / "hf"
    _tiny_qwen3(hf / "Qwen3-0.6B", qwen_tok, 0)
    _tiny_qwen3(hf / "Qwen3-1.7B", qwen_tok, 1)
    small = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1,
                 num_hidden_layers=1)
    write_checkpoint(hf / "Dream-7B", "dream", dict(DREAM_CONFIG, vocab_size=rt.QWEN3_VOCAB_SIZE, bos_token_id=151643,
                                                    eos_token_id=151643, pad_token_id=151643, mask_token_id=151666,
                                                    **small))
    write_checkpoint(hf / "LLaDA-8B-Instruct", "llada",
                     dict(LLADA_CONFIG, vocab_size=rt.LLAMA3_VOCAB_SIZE, embedding_size=rt.LLAMA3_VOCAB_SIZE,
                          eos_token_id=128009, pad_token_id=128001, mask_token_id=126336, d_model=16,
                          mlp_hidden_size=32, n_heads=2, n_kv_heads=1, n_layers=1))
    for name in TOKENIZER_FILES:
        (hf / "Dream-7B" / name).write_bytes((qwen_tok / name).read_bytes())
        (hf / "LLaDA-8B-Instruct" / name).write_bytes((llama_tok / name).read_bytes())
    data = root / "data" / "math"
    data.mkdir(parents=True)
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TRAIN))
    (data / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TEST))
    return root


def _run(world, command: str, config: str, *overrides: str) -> dict:
    """``jaxtok COMMAND configs/real/CONFIG`` with the world's paths; returns the run's summary/results."""
    out = world / "runs"
    hf = world / "hf"
    common = [f"data.train_files=[{world}/data/math/train.jsonl]", f"data.eval_files=[{world}/data/math/test.jsonl]",
              f"run.out_dir={out}", "data.prompt_len=56", "data.num_eval=2", "model.dtype=float32",
              "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=-1"]  # the batch unsharded on 8 test devices
    paths = [a.replace("hf/", f"{hf}/") for a in overrides]
    rc = cli.main([command, str(ROOT / "configs" / "real" / config), *common, *paths])
    assert rc == 0
    name = json.loads(json.dumps(config.removesuffix(".yaml")))
    run = out / name
    return json.loads((run / ("summary.json" if command == "train" else "results.json")).read_text())


TRAIN_SMALL = ("train.steps=1", "train.eval_every=0", "train.checkpoint_every=0", "data.batch_size=4",
               "rollout.num_generations=2", "rollout.max_new_tokens=6", "decode.max_new_tokens=6",
               "decode.batch_size=2", "model.hf_path=hf/Qwen3-0.6B")


@pytest.mark.slow
def test_qwen3_grpo_math_from_an_hf_folder(world):
    summary = _run(world, "train", "qwen3_grpo_math.yaml", *TRAIN_SMALL)
    assert summary["eval/num_examples"] == 2 and "eval/reward" in summary  # math_verify on the separate eval file


@pytest.mark.slow
def test_qwen3_opd_tip_with_an_hf_teacher(world):
    summary = _run(world, "train", "qwen3_opd_tip.yaml", *TRAIN_SMALL, "rollout.teacher_init_from=hf/Qwen3-1.7B")
    assert summary["eval/num_examples"] == 2


@pytest.mark.slow
def test_qwen3_speculative_with_an_hf_draft(world):
    results = _run(world, "decode", "qwen3_speculative.yaml", "model.hf_path=hf/Qwen3-1.7B",
                   "decode.draft_init_from=hf/Qwen3-0.6B", "decode.max_new_tokens=6", "decode.batch_size=2")
    assert results["num_examples"] == 2


@pytest.mark.slow
def test_qwen3_ead_and_taps_select_their_loop_and_drafter(world):
    """``decode.method=ead`` (its arguments in decode.policy_args) and ``decode.drafter=taps`` (the inner policy
    stays decode.policy) through the CLI."""
    common = ["model.hf_path=hf/Qwen3-1.7B", "decode.draft_init_from=hf/Qwen3-0.6B", "decode.max_new_tokens=6",
              "decode.batch_size=2"]
    ead = _run(world, "decode", "qwen3_speculative.yaml", *common, "decode.method=ead", "decode.policy=null",
               "decode.policy_args.threshold=0.5")
    assert ead["method"] == "ead" and 0.0 <= ead["large_share"] <= 1.0 and ead["large_forwards"] > 0
    taps = _run(world, "decode", "qwen3_speculative.yaml", *common, "decode.drafter=taps",
                "decode.drafter_args.drafters=[hf/Qwen3-0.6B]", "decode.drafter_args.ngram=false",
                "decode.policy=heuristic")
    assert taps["policy"] == "heuristic" and taps["drafter"] == "taps" and len(taps["route_counts"]) == 2
    assert sum(taps["route_counts"]) == taps["rounds"]


@pytest.mark.parametrize("config,path", [("dream_diffusion.yaml", "hf/Dream-7B"),
                                         ("llada_diffusion.yaml", "hf/LLaDA-8B-Instruct")])
def test_diffusion_decode_of_dream_and_llada_folders(world, config, path):
    results = _run(world, "decode", config, f"model.hf_path={path}", "decode.max_new_tokens=8",
                   "decode.policy_args.block_len=8", "decode.batch_size=2")
    assert results["num_examples"] == 2



def test_json_schema_grammar_decode_on_the_real_vocabulary(world):
    """`decode.policy: grammar` through the CLI (its correctness per token is tests/test_grammar_bpe.py's)."""
    pytest.importorskip("llguidance")
    results = _run(world, "decode", "qwen3_json_answer.yaml", "model.hf_path=hf/Qwen3-0.6B",
                   "decode.max_new_tokens=12", "decode.batch_size=2")
    assert results["num_examples"] == 2 and results["policy"] == "grammar"
    assert 0.0 <= results["grammar_stopped_share"] <= 1.0
