"""Real Qwen3 and Llama-3 vocabularies (built offline from ``quicktok-v1``, tests/real_tokenizers.py): special tokens
from the checkpoint's own files, byte-exact BPE, chat templates token-for-token against ``transformers``, generation
stopping at ``<|im_end|>`` / ``<|eot_id|>``, and tokenizer metadata unchanged through run directories and
``convert`` to-jax -> to-hf."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxtok.data import prompt_ids, sft_ids
from jaxtok.decode import generate
from jaxtok.sampling import GREEDY
from jaxtok.models import Decoder, convert, load_tokenizer, presets, save_hf
from jaxtok.tasks import Example
from jaxtok.tasks.tokenizer import decode

import real_tokenizers as rt

TEXTS = ["Hello world! 12345 apples, don't  stop\n\n  x", "Ünïcödé 漢字 テスト 🙂 \t tabs",
         "def f(x):\n    return x**2  # <s> and </s> are text here"]
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+3? "},
        {"role": "assistant", "content": "<think>\nadd\n</think>\n\n5"}, {"role": "user", "content": "And 4+4?"}]


def test_special_tokens_from_the_checkpoint_files(qwen3_dir, llama3_dir):
    q = load_tokenizer(qwen3_dir)
    assert (q.bos_id, q.eos_ids, q.pad_id, q.add_bos) == (None, (151645, 151643), 151643, False)
    assert q.token_to_id("</s>") not in q.eos_ids  # an ordinary text token in this vocabulary
    assert q.encode_prompt("hi") == q.encode("hi")  # no stray bos
    ll = load_tokenizer(llama3_dir)
    assert (ll.bos_id, ll.eos_ids, ll.add_bos) == (128000, (128001, 128009), True)  # <|eot_id|> from generation_config
    assert ll.encode_prompt("hi") == [128000] + ll.encode("hi")


def test_bpe_matches_the_reference_encoder(qwen3_dir, llama3_dir):
    import quicktok

    for name, path in (("qwen3", qwen3_dir), ("llama3", llama3_dir)):
        tok, ref = load_tokenizer(path), quicktok.get_encoding(name)
        for text in TEXTS:
            ids = tok.encode(text)
            assert ids == list(ref.encode_ordinary(text)), (name, text)
            assert tok.decode(ids) == text


@pytest.mark.parametrize("thinking", [None, False, True])
def test_qwen3_chat_template_token_for_token_with_transformers(qwen3_dir, thinking):
    from transformers import AutoTokenizer

    kw = {} if thinking is None else {"enable_thinking": thinking}
    hf, tok = AutoTokenizer.from_pretrained(str(qwen3_dir)), load_tokenizer(qwen3_dir)
    for messages in (CHAT[:2], CHAT):
        for gen in (True, False):
            want = hf.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False, **kw)
            assert tok.render_chat(messages, add_generation_prompt=gen, **kw) == want
            assert tok.apply_chat_template(messages, add_generation_prompt=gen, **kw) == hf.encode(
                want, add_special_tokens=False)
    if thinking is False:  # the switch really reaches the template
        assert tok.render_chat(CHAT[:2], enable_thinking=False).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_llama3_chat_template_token_for_token_with_transformers(llama3_dir):
    from transformers import AutoTokenizer

    hf, tok = AutoTokenizer.from_pretrained(str(llama3_dir)), load_tokenizer(llama3_dir)
    messages = [m for m in CHAT if m["role"] != "assistant"]
    want = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tok.apply_chat_template(messages)
    assert tok.render_chat(messages) == want and ids[0] == 128000 and ids.count(128000) == 1
    assert ids == hf.encode(want, add_special_tokens=False)


def test_chat_prompts_in_the_data_path_and_completion_mask(qwen3_dir):
    """A messages prompt is rendered with the template (template kwargs from the tokenizer), never its repr; the
    SFT completion starts right after the rendered generation prompt and ends with the config's eos."""
    tok = load_tokenizer(qwen3_dir, template_kwargs={"enable_thinking": False})
    ex = Example(prompt=CHAT[:2], target="5", answer="5")
    want = tok.apply_chat_template(CHAT[:2], add_generation_prompt=True, enable_thinking=False)
    assert prompt_ids(tok, ex) == want
    ids, n_prompt = sft_ids(tok, ex)
    assert n_prompt == len(want) and ids[n_prompt:] == tok.encode("5") + [151645]
    assert "role" not in decode(tok, ids, stop_at_eos=False)
    chat = load_tokenizer(qwen3_dir, template_kwargs={"enable_thinking": False}, use_chat_template=True,
                          system_prompt="You are terse.")  # text prompts (e.g. a JSONL question) as a user turn
    assert prompt_ids(chat, Example(prompt="What is 2+3? ", target="5", answer="5")) == want


def _constant_model(vocab_size: int, emit: int) -> Decoder:
    """A tiny decoder whose next token is always ``emit``: layers add nothing to the residual stream, every token
    embeds to the same vector, and only ``emit``'s LM-head column is non-zero."""
    model = Decoder(presets.get("tiny_draft", vocab_size=vocab_size, hidden_size=16, intermediate_size=32,
                                head_dim=8), rngs=nnx.Rngs(0))
    for layer in model.layers:
        layer.attn.o_weight_hnd[...] = jnp.zeros_like(layer.attn.o_weight_hnd[...])
        layer.mlp.down_weight_fd[...] = jnp.zeros_like(layer.mlp.down_weight_fd[...])
    model.embed_vd[...] = jnp.ones_like(model.embed_vd[...])
    model.lm_head_dv[...] = jnp.zeros_like(model.lm_head_dv[...]).at[:, emit].set(1.0)
    return model


@pytest.mark.slow
@pytest.mark.parametrize("which,stop", [("qwen3", "<|im_end|>"), ("llama3", "<|eot_id|>")])
def test_generation_stops_at_every_eos_id(qwen3_dir, llama3_dir, which, stop):
    tok = load_tokenizer(qwen3_dir if which == "qwen3" else llama3_dir)
    emit = tok.token_to_id(stop)
    assert emit in tok.eos_ids
    model = _constant_model(rt.QWEN3_VOCAB_SIZE, emit)  # one shape for both vocabularies: one compiled program
    prompt = jnp.asarray([tok.encode_prompt("What is 2+3?")[:4]], jnp.int32)
    valid = jnp.ones_like(prompt, bool)
    out = generate(model, prompt, valid, max_new_tokens=3, sampling=GREEDY, rng=jax.random.key(0),
                   stop_tokens=tok.eos_ids, pad_id=tok.pad_id)
    assert np.asarray(out.tokens)[0, 0] == emit and int(np.asarray(out.valid)[0].sum()) == 1
    free = generate(model, prompt, valid, max_new_tokens=3, sampling=GREEDY, rng=jax.random.key(0),
                    stop_tokens=(), pad_id=tok.pad_id)
    assert int(np.asarray(free.valid)[0].sum()) == 3  # without the stop ids it runs to the budget
    assert decode(tok, np.asarray(out.tokens)[0]) == ""


@pytest.mark.slow
def test_tokenizer_files_survive_run_dirs_and_convert_round_trip(qwen3_dir, tmp_path):
    from transformers import AutoTokenizer, GenerationConfig

    hf_src = tmp_path / "hf"
    save_hf(_constant_model(rt.QWEN3_VOCAB_SIZE, 151645), str(hf_src))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (hf_src / name).write_bytes((qwen3_dir / name).read_bytes())
    convert("to-jax", str(hf_src), str(tmp_path / "run"))
    load_tokenizer(tmp_path / "run").save(tmp_path / "stage2")  # what a train run writes into its run directory
    convert("to-hf", str(tmp_path / "run"), str(tmp_path / "back"))
    ref = AutoTokenizer.from_pretrained(str(qwen3_dir))
    for d in (tmp_path / "run", tmp_path / "stage2", tmp_path / "back"):
        got = AutoTokenizer.from_pretrained(str(d))
        assert (got.eos_token_id, got.bos_token_id, got.pad_token_id) == (151645, None, 151643)
        assert got.chat_template == ref.chat_template and got.get_vocab() == ref.get_vocab()
        assert GenerationConfig.from_pretrained(str(d)).eos_token_id == [151645, 151643]
        assert load_tokenizer(d).specials == load_tokenizer(qwen3_dir).specials


def test_overrides_are_written_where_later_stages_and_transformers_read_them(qwen3_dir, tmp_path):
    from transformers import AutoTokenizer, GenerationConfig

    tok = load_tokenizer(qwen3_dir, {"eos": ["<|endoftext|>", 151645], "chat_template": "{{ messages[0].content }}"})
    assert tok.eos_ids == (151643, 151645) and tok.render_chat([{"role": "user", "content": "x"}]) == "x"
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert again.eos_ids == (151643, 151645) and again.chat_template == "{{ messages[0].content }}"
    assert AutoTokenizer.from_pretrained(str(tmp_path)).eos_token == "<|endoftext|>"
    assert GenerationConfig.from_pretrained(str(tmp_path)).eos_token_id == [151643, 151645]
    assert json.loads((qwen3_dir / "tokenizer_config.json").read_text())["eos_token"] == "<|im_end|>"  # source intact
