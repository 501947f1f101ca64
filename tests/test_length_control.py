"""LenVM length control (decode/length_control.py): the ``siblings`` attention scoring K candidates in one cached
forward, the bonus formulas by hand, s = 0 is the top-K policy, and guided greedy decoding picks exactly the
candidate a brute-force full forward says it should, step after step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxtok.decode import generate
from jaxtok.sampling import GREEDY, SamplingParams
from jaxtok.decode.length_control import LengthGuide, LengthGuideArgs, guided_logits, length_bonus, predict_length
from jaxtok.models import Decoder, KVCache, LengthValueModel, presets
from jaxtok.registry import ConfigError

V, EOS, PAD = 16, 2, 0


@pytest.fixture(scope="module")
def models():
    cfg = presets.get("tiny_draft", vocab_size=V)
    policy = Decoder(cfg, rngs=nnx.Rngs(0))
    vm = LengthValueModel(cfg, gamma=0.8, rngs=nnx.Rngs(1))  # random: predicted lengths ~1.5-10 tokens, all distinct
    return policy, vm


def _jitted(vm):
    """Jitted ``(raw_values, remaining_length)`` of ``vm`` on (tokens, valid) (eager forwards are slow)."""
    graphdef, state = nnx.split(vm)
    raw = jax.jit(lambda t, v: nnx.merge(graphdef, state).raw_values(t, valid=v))
    rem = jax.jit(lambda t, v: nnx.merge(graphdef, state).remaining_length(t, valid=v))
    return raw, rem


def _prompts():
    prompt = np.array([[0, 0, 5, 6], [7, 8, 9, 10], [0, 4, 11, 12]], np.int32)
    return prompt, prompt != 0


@pytest.mark.slow
def test_siblings_attention_equals_separate_forwards(models):
    """K candidates appended at one position through a cache see the prefix and themselves only: their hidden
    states equal K separate full forwards of prefix + candidate."""
    _, vm = models
    prompt, valid = _prompts()
    cand = np.array([[3, 4, 5], [6, 7, 8], [9, 10, 11]], np.int32)
    cache = KVCache.init(vm.cfg, 3, 16)
    cache = vm(prompt, valid=valid, cache=cache, return_logits=False).cache
    pos = cache.next_positions()
    out = vm(jnp.asarray(cand), positions=jnp.broadcast_to(pos[:, None], (3, 3)), cache=cache,
             attention="siblings", return_logits=False, return_hidden=True)
    got = np.asarray(vm.value_head(out.hidden))
    raw, _ = _jitted(vm)
    for j in range(3):
        full = np.concatenate([prompt, cand[:, j:j + 1]], 1)
        want = np.asarray(raw(full, np.concatenate([valid, np.ones((3, 1), bool)], 1)))[:, -1]
        np.testing.assert_allclose(got[:, j], want, rtol=2e-4, atol=2e-5)


def test_bonus_by_hand():
    n = jnp.array([[0.0, 3.0, 10.0]])
    np.testing.assert_allclose(length_bonus(n, 4, "tilt", 0.5, 0), [[0.0, -1.5, -5.0]])
    # step 4: completion lengths 5, 8, 15 against target 8
    np.testing.assert_allclose(length_bonus(n, 4, "target", 2.0, jnp.array([8.0])), [[-6.0, 0.0, -14.0]])
    np.testing.assert_allclose(length_bonus(n, 4, "budget", 1.0, 8), [[0.0, 0.0, -7.0]])
    logits = jnp.array([[1.0, 2.0, 3.0, 4.0]])
    g = guided_logits(logits, jnp.array([[3, 1]]), jnp.array([[-1.0, 0.5]]))
    np.testing.assert_allclose(g[0, [3, 1]], [3.0, 2.5])
    assert float(g[0, 0]) < -1e29 and float(g[0, 2]) < -1e29


def test_zero_scale_is_the_top_k_policy(models):
    policy, vm = models
    prompt, valid = _prompts()
    key = jax.random.key(3)
    base = generate(policy, prompt, valid, max_new_tokens=6, sampling=SamplingParams(temperature=1.0, top_k=4), rng=key)
    guided = generate(policy, prompt, valid, max_new_tokens=6, sampling=SamplingParams(temperature=1.0), rng=key,
                      guide=LengthGuide.of(vm, mode="tilt", scale=0.0, candidates=4))
    np.testing.assert_array_equal(guided.tokens, base.tokens)
    np.testing.assert_allclose(guided.logprobs, base.logprobs, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["target", "tilt"])
def test_guided_greedy_matches_brute_force(models, mode):
    """With a dominant scale, every emitted token is the candidate whose brute-force predicted length best fits
    the mode; targets differ per row."""
    policy, vm = models
    prompt, valid = _prompts()
    K, N = 4, 4
    target = np.array([2, 4, 6])
    out = generate(policy, prompt, valid, max_new_tokens=N, sampling=GREEDY, rng=jax.random.key(0), stop_tokens=(),
                   guide=LengthGuide.of(vm, mode=mode, scale=1e4, target=target, candidates=K))
    toks = np.asarray(out.tokens)
    seq, seq_valid = prompt, valid
    _, rem = _jitted(vm)
    pgraph, pstate = nnx.split(policy)
    last_logits = jax.jit(lambda t, v: nnx.merge(pgraph, pstate)(t, valid=v).logits[:, -1])
    for t in range(N):
        logits = np.asarray(last_logits(seq, seq_valid))
        cand = np.argsort(-logits, axis=1, kind="stable")[:, :K]
        ones = np.ones((3, 1), bool)
        n = np.stack([np.asarray(rem(np.concatenate([seq, cand[:, j:j + 1]], 1),
                                     np.concatenate([seq_valid, ones], 1)))[:, -1] for j in range(K)], 1)
        score = -n if mode == "tilt" else -np.abs(t + 1 + n - target[:, None])
        best = cand[np.arange(3), np.argmax(score, axis=1)]
        margin = np.sort(score, axis=1)[:, -1] - np.sort(score, axis=1)[:, -2]
        sure = margin > 1e-2  # rows whose best candidate is not a float tie
        np.testing.assert_array_equal(toks[sure, t], best[sure])
        seq = np.concatenate([seq, toks[:, t:t + 1]], 1)
        seq_valid = np.concatenate([seq_valid, np.ones((3, 1), bool)], 1)


def test_predict_length_is_the_last_prompt_readout(models):
    _, vm = models
    prompt, valid = _prompts()
    np.testing.assert_allclose(predict_length(vm, prompt, valid),
                               np.asarray(vm.remaining_length(prompt, valid=valid))[:, -1])


def test_checkpoint_rebuilds_the_value_model(models, tmp_path):
    """A LenVM checkpoint loads back as a LengthValueModel (gamma, head and all) without the training package;
    a plain decoder's checkpoint is refused as a length guide; an unknown module name is a clear error."""
    from jaxtok.decode.length_control import length_guide
    from jaxtok.models import load_checkpoint, save_checkpoint
    from jaxtok.models.hf import load_checkpoint_with_meta

    policy, vm = models
    save_checkpoint(vm, str(tmp_path / "vm"), meta=vm.checkpoint_meta())
    back, _ = load_checkpoint(str(tmp_path / "vm"))
    assert isinstance(back, LengthValueModel) and back.gamma == 0.8
    prompt, valid = _prompts()
    np.testing.assert_allclose(predict_length(back, prompt, valid), predict_length(vm, prompt, valid), rtol=1e-6)
    assert length_guide(LengthGuideArgs(value_init_from=str(tmp_path / "vm"))).spec.candidates == 8
    with pytest.raises(ConfigError, match="value_init_from=.*no such run directory"):
        length_guide(LengthGuideArgs(value_init_from=str(tmp_path / "missing")))
    save_checkpoint(policy, str(tmp_path / "policy"))
    with pytest.raises(ConfigError, match="not a LenVM run"):
        length_guide(LengthGuideArgs(value_init_from=str(tmp_path / "policy")))
    save_checkpoint(policy, str(tmp_path / "odd"), meta={"module": "Critic"})
    with pytest.raises(ValueError, match="module='Critic'"):
        load_checkpoint_with_meta(str(tmp_path / "odd"))


def test_bad_input(models, tmp_path):
    policy, vm = models
    with pytest.raises(ValueError, match="LengthValueModel"):
        LengthGuide.of(policy)
    with pytest.raises(ValueError, match="target lengths"):
        LengthGuide.of(vm, mode="budget", target=0)
    with pytest.raises(ConfigError, match="mode"):
        LengthGuideArgs(mode="exact")
    with pytest.raises(ConfigError, match="target_length"):
        LengthGuideArgs(mode="target", target_length=0)
    prompt, valid = _prompts()
    other = LengthValueModel(presets.get("tiny_draft", vocab_size=V + 4), gamma=0.8, rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="vocabulary"):
        generate(policy, prompt, valid, max_new_tokens=2, rng=jax.random.key(0), guide=LengthGuide.of(other))
    with pytest.raises(ValueError, match="target: shape"):
        generate(policy, prompt, valid, max_new_tokens=2, rng=jax.random.key(0),
                 guide=LengthGuide.of(vm, mode="target", target=np.array([3, 4])))


@pytest.mark.slow
def test_length_control_bench_smoke(tmp_path):
    """`jaxtok bench configs/bench/length_control.yaml` end to end on random tiny models: every arm is a row,
    the prediction block and the plots are written, and the s = 0 tilt arm reproduces the top-K arm."""
    import json
    from pathlib import Path

    from jaxtok import cli
    from jaxtok.models import save_checkpoint

    cfg = presets.get("tiny_draft", vocab_size=64)  # the task tokenizer's vocabulary fits in 64
    save_checkpoint(Decoder(cfg, rngs=nnx.Rngs(0)), str(tmp_path / "policy"))
    lvm = LengthValueModel(cfg, gamma=0.8, rngs=nnx.Rngs(1))
    save_checkpoint(lvm, str(tmp_path / "vm"), meta=lvm.checkpoint_meta())
    root = Path(__file__).resolve().parents[1]
    rc = cli.main(["bench", str(root / "configs" / "bench" / "length_control.yaml"), f"run.out_dir={tmp_path}",
                   f"model.init_from={tmp_path / 'policy'}", "model.preset=tiny_draft",
                   f"bench.args.value_init_from={tmp_path / 'vm'}", "bench.args.num_prompts=4",
                   "bench.args.batch_size=4", "bench.args.max_new_tokens=4", "bench.args.candidates=3",
                   "bench.args.targets=[3]", "bench.args.target_scales=[1.0]", "bench.args.tilt_scales=[0.0]",
                   "bench.args.budgets=[2]", "bench.args.budget_scales=[1.0]"])
    assert rc == 0
    out = tmp_path / "bench_length_control"
    res = json.loads((out / "results.json").read_text())
    assert [r["arm"] for r in res["rows"]] == ["policy", "top-K", "top-K @ 3", "target 3 s=1", "tilt 0",
                                               "truncate @ 2", "budget 2 s=1"]
    assert res["prediction"]["mae"] >= 0 and (out / "length_error.png").is_file()
    assert all(r["mean_length"] <= 2 for r in res["rows"] if r["max_new_tokens"] == 2)
    rows = {r["arm"]: r for r in res["rows"]}
    for key in ("exact_match", "mean_length", "finished_share"):
        assert rows["tilt 0"][key] == rows["top-K"][key]
    for arm in ("truncate @ 2", "budget 2 s=1"):  # only rows finished within the budget can score
        assert rows[arm]["scored"] == "right and finished within B"
        assert rows[arm]["exact_match"] <= rows[arm]["finished_share"]


def test_budget_accounting_scores_only_rows_finished_within_the_budget():
    """bench/length.py budget arms (truncation and guidance alike): a row cut before its EOS scores 0 even when its
    text already holds the right answer (before the fix truncation credited it: answers of B + 1 tokens)."""
    from jaxtok.bench.length import finished_only
    from jaxtok.tasks import Example, build_tokenizer
    from jaxtok.tasks.arith import ArithArgs, ArithTask
    from jaxtok.tasks.tokenizer import SpecialTokens, decode, encode

    tok, task = build_tokenizer(), ArithTask(ArithArgs(steps=2))
    sp = SpecialTokens.of(tok)
    exs = [Example(prompt="12+7-3=", target="12+7=19;19-3=16>16", answer="16"),
           Example(prompt="2-7-11=", target="2-7=-5;-5-11=-16>-16", answer="-16")]
    done_row = encode(tok, ">16") + [sp.eos]  # budget 4: EOS within it
    cut_row = encode(tok, ">-16")  # budget 4: the whole answer text, cut just before its EOS
    tokens = jnp.asarray([done_row, cut_row], jnp.int32)  # [2, 4]
    done = jnp.asarray([True, False])
    assert [task.reward(decode(tok, r), e) for r, e in zip(np.asarray(tokens), exs)] == [1.0, 1.0]  # old accounting
    kept = np.asarray(finished_only(tokens, done, sp.pad))
    assert [task.reward(decode(tok, r), e) for r, e in zip(kept, exs)] == [1.0, 0.0]
    assert (kept[0] == done_row).all() and (kept[1] == sp.pad).all()
