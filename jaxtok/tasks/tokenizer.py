"""One tokenizer path: Hugging Face ``tokenizers`` for the vocabulary, the checkpoint's own files for everything else.

A :class:`TextTokenizer` is a ``tokenizers.Tokenizer`` plus what a checkpoint says about it in its side files:

- ``tokenizer_config.json``: ``bos_token`` / ``eos_token`` / ``pad_token`` / ``mask_token`` (strings or AddedToken
  dicts), ``add_bos_token``, ``chat_template``;
- ``generation_config.json``: ``eos_token_id`` (an id or a list: every one of them ends generation),
  ``pad_token_id``;
- ``chat_template.jinja`` (or ``chat_template.json``): the chat template, where newer ``transformers`` keep it.

Special tokens are never guessed from token names: in the Qwen vocabulary ``<s>`` and ``</s>`` are ordinary text
tokens, and Llama-3 Instruct ends a turn with ``<|eot_id|>``, which only ``generation_config.json`` names. The
synthetic tasks' character tokenizer (built here) carries its own config, so nothing downstream special-cases it.

Chat templates render as ``transformers`` renders them (a sandboxed Jinja environment with ``trim_blocks`` and
``lstrip_blocks``, the ``tojson`` filter, ``raise_exception`` and ``strftime_now``, the special-token strings as
variables), then tokenize without adding special tokens: the template writes them itself.

Saving copies the source files verbatim (so ``AutoTokenizer`` / ``GenerationConfig`` load the same values from a
run directory or a converted checkpoint) and patches in any explicit override.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import string
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

NUM_RAINBOW_PADS = 7
SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<mask>"] + [f"<pad_{i}>" for i in range(1, NUM_RAINBOW_PADS + 1)]
CHARACTERS = list(string.digits) + list("+-*/=(),;:>| \n") + list(string.ascii_lowercase)
VOCAB = SPECIAL_TOKENS + CHARACTERS
VOCAB_SIZE = len(VOCAB)  # 61

# files a checkpoint keeps its tokenizer and generation settings in; all travel with a run directory
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja", "chat_template.json")
_SYNTHETIC_CONFIG = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "mask_token": "<mask>",
                     "add_bos_token": True, "tokenizer_class": "PreTrainedTokenizerFast"}
_TOKEN_KEYS = ("bos_token", "eos_token", "pad_token", "mask_token", "unk_token")


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
    """Ids of the special tokens of a tokenizer (``None`` where it has no such token).

    ``eos`` is the tokenizer's own end-of-sequence token (appended to SFT targets); ``eos_ids`` are every id that
    ends generation (``eos`` first, then ``generation_config.json``'s ``eos_token_id`` list)."""

    pad: int
    bos: Optional[int]
    eos: int
    mask: Optional[int]
    rainbow_pads: tuple[int, ...] = ()
    eos_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if not self.eos_ids or self.eos_ids[0] != self.eos:
            raise ValueError(f"eos_ids={self.eos_ids}: must start with eos={self.eos}")

    @classmethod
    def of(cls, tok) -> "SpecialTokens":
        """The special tokens of a :class:`TextTokenizer` (a bare ``tokenizers.Tokenizer`` has no config to read
        them from; load it with :func:`load_tokenizer` or wrap it with :meth:`TextTokenizer.of`)."""
        if isinstance(tok, TextTokenizer):
            return tok.specials
        raise TypeError(f"{type(tok).__name__} carries no special-token config; load the tokenizer with "
                        f"jaxtok.tasks.load_tokenizer(dir) (tokenizer.json + tokenizer_config.json)")


def _token_string(value) -> Optional[str]:
    """A special token as written in ``tokenizer_config.json``: a string, an AddedToken dict, or null."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _as_ids(value) -> tuple[int, ...]:
    """``eos_token_id`` of ``generation_config.json``: an int, a list of ints, or null."""
    if value is None:
        return ()
    return tuple(int(v) for v in (value if isinstance(value, (list, tuple)) else [value]))


class TextTokenizer:
    """A ``tokenizers.Tokenizer`` with its checkpoint's special tokens, generation stop ids and chat template.

    Attributes of the wrapped tokenizer (``token_to_id``, ``id_to_token``, ``get_vocab_size``, ``get_vocab``) are
    available directly. ``source`` is the directory the files came from (``None`` for a tokenizer built in code).
    """

    def __init__(self, hf: Tokenizer, config: Optional[Mapping] = None, generation_config: Optional[Mapping] = None,
                 chat_template: Optional[str] = None, *, source: Optional[Path] = None, where: str = "tokenizer",
                 overrides: Optional[Mapping] = None, template_kwargs: Optional[Mapping] = None,
                 use_chat_template: bool = False, system_prompt: Optional[str] = None):
        self.hf = hf
        self.config = dict(config or {})
        self.generation_config = dict(generation_config or {})
        self.chat_template = chat_template if chat_template is not None else self.config.get("chat_template")
        self.source = source
        self.overrides = {k: v for k, v in dict(overrides or {}).items() if v is not None}
        self.template_kwargs = dict(template_kwargs or {})  # defaults for every chat rendering (tokenizer section)
        self.use_chat_template = bool(use_chat_template)  # text prompts go through the chat template as a user turn
        self.system_prompt = system_prompt
        self.specials = self._resolve(where)
        self.add_bos = self._adds_bos()

    def __getattr__(self, name):  # token_to_id, id_to_token, get_vocab_size, get_vocab, ...
        if name == "hf":
            raise AttributeError(name)
        return getattr(self.hf, name)

    @classmethod
    def of(cls, hf: Tokenizer, **config) -> "TextTokenizer":
        """Wrap a ``tokenizers.Tokenizer`` with a ``tokenizer_config.json``-style mapping (e.g. ``eos_token``)."""
        return cls(hf, config)

    # ---------------------------------------------------------------------------------------------- special tokens

    def _id(self, token, where: str) -> int:
        """Id of a token given as a string (looked up in the vocabulary) or an int (checked against its size)."""
        if isinstance(token, bool) or not isinstance(token, (int, str)):
            raise ValueError(f"{where}={token!r}: a token string or an id")
        if isinstance(token, int):
            if not 0 <= token < self.hf.get_vocab_size():
                raise ValueError(f"{where}={token}: outside the vocabulary [0, {self.hf.get_vocab_size()})")
            return token
        i = self.hf.token_to_id(token)
        if i is None:
            raise ValueError(f"{where}={token!r}: not a token of this vocabulary")
        return i

    def _resolve(self, where: str) -> SpecialTokens:
        cfg, gen, ov = self.config, self.generation_config, self.overrides

        def from_config(key):
            text = _token_string(cfg.get(key))
            return None if text is None else self._id(text, f"{where}: tokenizer_config.json {key}")

        if "eos" in ov:
            eos_list = ov["eos"] if isinstance(ov["eos"], (list, tuple)) else [ov["eos"]]
            if not eos_list:
                raise ValueError("tokenizer.eos=[]: give at least one end-of-sequence token")
            eos_ids = tuple(self._id(t, "tokenizer.eos") for t in eos_list)
        else:
            primary = from_config("eos_token")
            listed = tuple(self._id(i, f"{where}: generation_config.json eos_token_id")
                           for i in _as_ids(gen.get("eos_token_id")))
            if primary is None and not listed:
                raise ValueError(f"{where}: no end-of-sequence token: tokenizer_config.json has no eos_token and "
                                 f"generation_config.json no eos_token_id (set tokenizer.eos)")
            eos_ids = tuple(dict.fromkeys(((primary,) if primary is not None else ()) + listed))
        bos = self._id(ov["bos"], "tokenizer.bos") if "bos" in ov else from_config("bos_token")
        if "pad" in ov:
            pad = self._id(ov["pad"], "tokenizer.pad")
        else:
            pad = from_config("pad_token")
            if pad is None and gen.get("pad_token_id") is not None:
                pad = self._id(int(gen["pad_token_id"]), f"{where}: generation_config.json pad_token_id")
        pads = tuple(i for i in (self.hf.token_to_id(f"<pad_{k}>") for k in range(1, NUM_RAINBOW_PADS + 1))
                     if i is not None)
        return SpecialTokens(pad=eos_ids[0] if pad is None else pad, bos=bos, eos=eos_ids[0],
                             mask=from_config("mask_token"), rainbow_pads=pads, eos_ids=eos_ids)

    @property
    def bos_id(self) -> Optional[int]:
        return self.specials.bos

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Every id that ends generation (the tokenizer's eos first)."""
        return self.specials.eos_ids

    @property
    def pad_id(self) -> int:
        return self.specials.pad

    def _adds_bos(self) -> bool:
        """Whether plain-text prompts start with ``bos`` (:attr:`add_bos`, decided once): ``add_bos_token`` of the
        config, else what the tokenizer's own post-processor does (Llama-3's adds ``<|begin_of_text|>``, Qwen's
        adds nothing)."""
        if self.specials.bos is None:
            return False
        if "add_bos_token" in self.config:
            return bool(self.config["add_bos_token"])
        return self.hf.encode("a", add_special_tokens=True).ids[:1] == [self.specials.bos]

    # ---------------------------------------------------------------------------------------------- text <-> ids

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special-token post-processing (special tokens written in the text are
        recognised). Characters the tokenizer cannot represent raise instead of becoming its unknown token."""
        enc = self.hf.encode(text, add_special_tokens=False)
        unk = getattr(self.hf.model, "unk_token", None)
        unk_id = self.hf.token_to_id(unk) if unk else None
        if unk_id is not None and unk_id in enc.ids:
            bad = sorted({text[s:e] for i, (s, e) in zip(enc.ids, enc.offsets) if i == unk_id and text[s:e] != unk})
            if bad:
                raise ValueError(f"text {text[:60]!r} has characters the tokenizer does not know: {bad} "
                                 f"(unknown token {unk!r})")
        return enc.ids

    def encode_prompt(self, text: str) -> list[int]:
        """Ids of a text prompt: with :attr:`use_chat_template`, the chat template applied to ``[system?, user:
        text]`` with the generation prompt; else ``bos`` where the tokenizer adds one (:attr:`add_bos`), then the
        text."""
        if self.use_chat_template:
            system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
            return self.apply_chat_template(system + [{"role": "user", "content": text}], add_generation_prompt=True)
        return ([self.specials.bos] if self.add_bos else []) + self.encode(text)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # ---------------------------------------------------------------------------------------------- chat template

    def render_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                    **template_kwargs) -> str:
        """The chat template applied to ``messages`` as text, rendered as ``transformers`` renders it (extra keyword
        arguments such as Qwen3's ``enable_thinking`` or ``tools`` reach the template)."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template (tokenizer_config.json chat_template or "
                             "chat_template.jinja); give prompts as text or set tokenizer.chat_template")
        variables = {k: _token_string(self.config.get(k)) for k in _TOKEN_KEYS if _token_string(self.config.get(k))}
        variables.update(self.template_kwargs)
        variables.update(template_kwargs)
        return _compiled_template(self.chat_template).render(
            messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt, **variables)

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                            **template_kwargs) -> list[int]:
        """Token ids of :meth:`render_chat` (tokenized without added special tokens: the template writes them)."""
        return self.encode(self.render_chat(messages, add_generation_prompt, **template_kwargs))

    # ---------------------------------------------------------------------------------------------- saving

    def save(self, directory: str | Path) -> Path:
        """Write the tokenizer files into ``directory``: the source files verbatim (or, built in code,
        ``tokenizer.json`` + ``tokenizer_config.json``), with explicit overrides patched in. Returns the path of
        ``tokenizer.json``."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        if self.source is not None:
            copy_tokenizer_files(self.source, out)
        else:
            self.hf.save(str(out / "tokenizer.json"))
            _write_json(out / "tokenizer_config.json", self.config)
            if self.generation_config:
                _write_json(out / "generation_config.json", self.generation_config)
        if self.overrides:
            self._write_overrides(out)
        return out / "tokenizer.json"

    def _write_overrides(self, out: Path) -> None:
        """Patch overridden special tokens / chat template into the saved files, so later stages and
        ``AutoTokenizer`` see them."""
        cfg_path, gen_path = out / "tokenizer_config.json", out / "generation_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        sp = self.specials
        for key, name, tid in (("bos", "bos_token", sp.bos), ("eos", "eos_token", sp.eos), ("pad", "pad_token", sp.pad)):
            if key in self.overrides and tid is not None:
                cfg[name] = self.hf.id_to_token(tid)
        if "chat_template" in self.overrides:
            cfg.pop("chat_template", None)
            (out / "chat_template.jinja").write_text(self.chat_template)
        _write_json(cfg_path, cfg)
        if "eos" in self.overrides:
            gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
            gen["eos_token_id"] = list(sp.eos_ids) if len(sp.eos_ids) > 1 else sp.eos_ids[0]
            _write_json(gen_path, gen)


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


_TEMPLATES: dict[str, Any] = {}


def _compiled_template(source: str):
    """A chat template compiled in a sandboxed Jinja environment configured as ``transformers`` configures it."""
    if source not in _TEMPLATES:
        import jinja2
        from jinja2.ext import Extension, loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        class _Generation(Extension):
            """``{% generation %}...{% endgeneration %}`` (assistant-mask markers of training templates): the body is
            rendered as is."""

            tags = {"generation"}

            def parse(self, parser):
                lineno = next(parser.stream).lineno
                body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
                return jinja2.nodes.Scope(body, lineno=lineno)

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        _TEMPLATES[source] = env.from_string(source)
    return _TEMPLATES[source]


# -------------------------------------------------------------------------------------------------------------------
# Building, loading, saving
# -------------------------------------------------------------------------------------------------------------------


def build_tokenizer() -> TextTokenizer:
    """The character-level tokenizer of the synthetic tasks: specials at ids 0..10, then one id per character;
    prompts start with ``<bos>``, sequences end with ``<eos>``."""
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return TextTokenizer(tok, _SYNTHETIC_CONFIG)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: must hold a JSON object, got {type(data).__name__}")
    return data


def _chat_template_of(directory: Path, config: Mapping) -> Optional[str]:
    """The chat template: ``chat_template.jinja``, else ``chat_template.json``, else ``tokenizer_config.json``'s.
    A list of named templates (older ``transformers``) gives its ``default``."""
    if (directory / "chat_template.jinja").is_file():
        return (directory / "chat_template.jinja").read_text(encoding="utf-8")
    template = _read_json(directory / "chat_template.json").get("chat_template", config.get("chat_template"))
    if isinstance(template, list):
        template = {t.get("name"): t.get("template") for t in template}.get("default")
    return template if isinstance(template, str) else None


def load_tokenizer(path: str | Path, overrides: Optional[Mapping] = None,
                   template_kwargs: Optional[Mapping] = None, **prompting) -> TextTokenizer:
    """The tokenizer of an HF checkpoint or jaxtok run directory (or a ``tokenizer.json`` path inside one).

    Special tokens come from ``tokenizer_config.json`` / ``generation_config.json`` beside ``tokenizer.json``
    (``special_tokens_map.json`` fills a token the config lacks); ``overrides`` (``bos``/``eos``/``pad`` as token
    strings or ids, ``eos`` may be a list; ``chat_template``) replace them; ``template_kwargs`` and ``prompting``
    (``use_chat_template``, ``system_prompt``) set how prompts are rendered. A bare ``tokenizer.json`` is accepted
    only for the synthetic character vocabulary or with an ``eos`` override."""
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    file = directory / "tokenizer.json"
    if not file.is_file():
        raise FileNotFoundError(f"no tokenizer.json at {str(directory)!r}")
    try:
        hf = Tokenizer.from_file(str(file))
    except Exception as e:  # noqa: BLE001  (tokenizers raises a plain Exception on a malformed file)
        raise ValueError(f"{file}: not a valid tokenizer.json ({str(e).splitlines()[0]})") from None
    config = _read_json(directory / "tokenizer_config.json")
    for key, value in _read_json(directory / "special_tokens_map.json").items():
        config.setdefault(key, value)
    gen = _read_json(directory / "generation_config.json")
    overrides = {k: v for k, v in dict(overrides or {}).items() if v is not None}
    has_eos = _token_string(config.get("eos_token")) or gen.get("eos_token_id") is not None or "eos" in overrides
    if not has_eos:
        synthetic = build_tokenizer()
        if hf.get_vocab() != synthetic.get_vocab():
            raise ValueError(f"{directory}: no tokenizer_config.json / generation_config.json naming the "
                             f"end-of-sequence token; add them beside tokenizer.json or set tokenizer.eos")
        return TextTokenizer(synthetic.hf, _SYNTHETIC_CONFIG, overrides=overrides, where=str(directory),
                             template_kwargs=template_kwargs, **prompting)
    template = overrides.get("chat_template")
    if template is not None and Path(str(template)).is_file():
        template = Path(str(template)).read_text(encoding="utf-8")
    return TextTokenizer(hf, config, gen, template if template is not None else _chat_template_of(directory, config),
                         source=directory, where=str(directory), overrides=overrides, template_kwargs=template_kwargs,
                         **prompting)


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy every tokenizer / generation-config file of directory ``src`` that exists into ``dst`` (verbatim);
    returns the names copied."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file() and (src / name).resolve() != (dst / name).resolve():
            shutil.copy(src / name, dst / name)
            copied.append(name)
    return copied


def save_tokenizer(tok: TextTokenizer, path: str | Path) -> Path:
    """Write ``tok``'s files into directory ``path`` (or the directory of ``path`` if it ends in .json)."""
    path = Path(path)
    return tok.save(path.parent if path.suffix == ".json" else path)


def load_tokenizer_for(cfg) -> TextTokenizer:
    """The run's tokenizer: ``tokenizer.path``, else ``model.init_from``'s (the run directory or the one above a
    checkpoint directory), else ``model.hf_path``'s, else the synthetic tasks' character tokenizer; with the
    ``tokenizer`` section's overrides applied."""
    sec = getattr(cfg, "tokenizer", None)
    overrides = {} if sec is None else {"bos": sec.bos, "eos": list(sec.eos) if sec.eos is not None else None,
                                        "pad": sec.pad, "chat_template": sec.chat_template}
    candidates = []
    if sec is not None and sec.path:
        candidates = [Path(sec.path)]
        if not (Path(sec.path) / "tokenizer.json").is_file() and not Path(sec.path).is_file():
            raise FileNotFoundError(f"tokenizer.path={sec.path!r}: no tokenizer.json there")
    elif cfg.model.init_from:
        src = Path(cfg.model.init_from)
        candidates = [src, src.parent]
    elif cfg.model.hf_path:
        candidates = [Path(cfg.model.hf_path)]
    kwargs = {} if sec is None else dict(sec.chat_template_kwargs)
    prompting = {} if sec is None else {"use_chat_template": sec.use_chat_template, "system_prompt": sec.system_prompt}
    for cand in candidates:
        if (cand / "tokenizer.json").is_file() or (cand.suffix == ".json" and cand.is_file()):
            return load_tokenizer(cand, overrides, kwargs, **prompting)
    tok = build_tokenizer()
    if kwargs or any(prompting.values()) or any(v is not None for v in overrides.values()):
        return TextTokenizer(tok.hf, tok.config, overrides=overrides, template_kwargs=kwargs, **prompting)
    return tok


def encode(tok: TextTokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special-token post-processing (:meth:`TextTokenizer.encode`)."""
    return tok.encode(text)


def decode(tok: TextTokenizer, ids, stop_at_eos: bool = True) -> str:
    """Text of ``ids`` (special tokens removed); stops at the first end-of-sequence id (any of ``eos_ids``)."""
    ids = [int(i) for i in ids]
    if stop_at_eos:
        stops = set(SpecialTokens.of(tok).eos_ids)
        cut = next((k for k, i in enumerate(ids) if i in stops), len(ids))
        ids = ids[:cut]
    return tok.decode(ids, skip_special_tokens=True)
