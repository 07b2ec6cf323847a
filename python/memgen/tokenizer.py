"""Load a model's tokenizer from its tokenizer.json with the `tokenizers` library
(and the chat template with jinja2), without importing transformers.

transformers' import chain costs about a second of `LLM()`. For the plain
tokenizer.json tokenizers that transformers itself runs unchanged (class
`TokenizersBackend` / `PreTrainedTokenizerFast` of a llama or smollm3 model,
like the packaged SmolLM2's),
`LightTokenizer` gives the part of the HF tokenizer API that memgen and its
callers use, with the same results: `tok(text)["input_ids"]`, `encode`, `decode`
/ `batch_decode` (skip_special_tokens), `apply_chat_template`, the special tokens
and their ids, `len(tok)`, `convert_tokens_to_ids`, `backend_tokenizer`.
Anything the rule in `light_tokenizer_refusal` does not accept (another
tokenizer class, extra special tokens, legacy files, options transformers would
apply on top of tokenizer.json) is loaded by transformers' AutoTokenizer.
tests/test_startup.py compares the two on the test tokenizers and the packaged one.
"""
from __future__ import annotations

from pathlib import Path

from memgen.model_config import read_json_object

# the tokenizer classes transformers builds straight from tokenizer.json, changing nothing
PLAIN_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")
# AutoTokenizer also looks at config.json's model_type and may swap in that family's own class
# (transformers 5.17-5.24 load a qwen2 model's "TokenizersBackend" as Qwen2Tokenizer, with other
# special tokens); these families have no tokenizer class of their own, so it never does
PLAIN_MODEL_TYPES = ("llama", "smollm3")
NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# tokenizer_config.json keys that change nothing here (the named special tokens are checked apart)
HARMLESS_KEYS = {"backend", "tokenizer_class", "model_max_length", "padding_side", "truncation_side",
                 "is_local", "local_files_only", "name_or_path", "model_input_names", "chat_template",
                 "clean_up_tokenization_spaces", "split_special_tokens", "added_tokens_decoder",
                 "transformers_version"}
# files transformers would read on top of tokenizer.json
OVERRIDING_FILES = ("special_tokens_map.json", "added_tokens.json", "chat_template.json", "additional_chat_templates")


def load_tokenizer(model_dir: str | Path):
    """A `LightTokenizer` when the rule allows, else transformers' AutoTokenizer.
    Raises FileNotFoundError when the directory has no usable tokenizer."""
    model_dir = Path(model_dir)
    light = LightTokenizer.from_dir(model_dir)
    if light is not None:
        return light
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"no usable tokenizer in {model_dir}: {e}") from e


def light_tokenizer_refusal(model_dir: Path, config: dict | None, backend) -> str | None:
    """Why this tokenizer needs transformers (None: LightTokenizer loads it exactly).
    `config`: tokenizer_config.json's dict; `backend`: tokenizer.json as a
    `tokenizers.Tokenizer` (None where either is missing or unreadable)."""
    if config is None:
        return "no readable tokenizer_config.json"
    if backend is None:
        return "no readable tokenizer.json"
    if config.get("tokenizer_class") not in PLAIN_CLASSES:
        return f"tokenizer_class {config.get('tokenizer_class')!r} is not one of {PLAIN_CLASSES}"
    model_type = (read_json_object(model_dir / "config.json") or {}).get("model_type")
    if model_type not in PLAIN_MODEL_TYPES:
        return f"config.json's model_type {model_type!r} is not one of {PLAIN_MODEL_TYPES}"
    unknown = set(config) - HARMLESS_KEYS - set(NAMED_SPECIAL_TOKENS)
    if unknown:
        return f"tokenizer_config.json sets {sorted(unknown)}"
    if config.get("clean_up_tokenization_spaces") or config.get("split_special_tokens"):
        return "clean_up_tokenization_spaces or split_special_tokens is set"
    for name in OVERRIDING_FILES:
        if (model_dir / name).exists():
            return f"{name} is present"
    if not (model_dir / "chat_template.jinja").is_file() and not isinstance(config.get("chat_template"), (str, type(None))):
        return "several named chat templates"
    # transformers adds each named special token that tokenizer.json lacks (or marks it special):
    # the light path takes only tokenizers that already hold them as special, unnormalized tokens
    added = {t.content: (i, t) for i, t in backend.get_added_tokens_decoder().items()}
    for name in NAMED_SPECIAL_TOKENS:
        if config.get(name) is None:
            continue
        content = _token_content(config[name])
        _, token = added.get(content, (None, None))
        if content is None or token is None or not token.special or token.normalized:
            return f"{name} {content!r} is not a special added token of tokenizer.json"
    for key, entry in (config.get("added_tokens_decoder") or {}).items():
        index, token = added.get(entry.get("content") if isinstance(entry, dict) else None, (None, None))
        if token is None or str(index) != str(key) or token.special != bool(entry.get("special")):
            return f"added_tokens_decoder entry {key} differs from tokenizer.json"
    return None


class LightTokenizer:
    """The HF tokenizer API memgen uses, on a `tokenizers.Tokenizer`."""

    def __init__(self, backend, special_tokens: dict[str, str], chat_template: str | None, name_or_path: str = ""):
        # transformers encodes one text at a time with neither truncation nor padding
        backend.no_truncation()
        backend.no_padding()
        self._backend = backend
        self._special = {name: special_tokens.get(name) for name in NAMED_SPECIAL_TOKENS}
        self.chat_template = chat_template
        self.name_or_path = name_or_path

    @classmethod
    def from_dir(cls, model_dir: Path) -> "LightTokenizer | None":
        """The tokenizer of `model_dir`, or None where `light_tokenizer_refusal` says
        transformers must load it."""
        from tokenizers import Tokenizer

        config = read_json_object(model_dir / "tokenizer_config.json")
        try:
            backend = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        except Exception:   # missing or unreadable (tokenizers raises its own Exception types)
            backend = None
        if light_tokenizer_refusal(model_dir, config, backend) is not None:
            return None
        template_file = model_dir / "chat_template.jinja"   # transformers prefers it to the config's entry
        template = (template_file.read_text(encoding="utf-8") if template_file.is_file()
                    else config.get("chat_template"))
        special = {name: _token_content(config[name]) for name in NAMED_SPECIAL_TOKENS if config.get(name) is not None}
        return cls(backend, special, template, str(model_dir))

    # ---- special tokens -------------------------------------------------------
    def __getattr__(self, name: str):
        # bos_token ... mask_token, and their *_id
        special = self.__dict__.get("_special")
        if special is not None:
            if name in special:
                return special[name]
            if name.endswith("_id") and name[:-3] in special:
                token = special[name[:-3]]
                return None if token is None else self.convert_tokens_to_ids(token)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value) -> None:
        if name in NAMED_SPECIAL_TOKENS:
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{name} must be a string or None, got {type(value).__name__}")
            self._special[name] = value
        else:
            object.__setattr__(self, name, value)

    @property
    def special_tokens_map(self) -> dict[str, str]:
        return {name: token for name, token in self._special.items() if token is not None}

    @property
    def all_special_tokens(self) -> list[str]:
        return list(dict.fromkeys(self.special_tokens_map.values()))

    @property
    def all_special_ids(self) -> list[int]:
        return self.convert_tokens_to_ids(self.all_special_tokens)

    # ---- vocabulary -----------------------------------------------------------
    @property
    def backend_tokenizer(self):
        return self._backend

    def __len__(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=False)

    def get_vocab(self) -> dict[str, int]:
        return self._backend.get_vocab(with_added_tokens=True)

    def convert_tokens_to_ids(self, tokens: str | list[str]):
        if isinstance(tokens, str):
            index = self._backend.token_to_id(tokens)
            return self.unk_token_id if index is None else index   # as transformers does
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | list[int], skip_special_tokens: bool = False):
        if isinstance(ids, int):
            return self._backend.id_to_token(ids)
        special = set(self.all_special_ids) if skip_special_tokens else set()
        return [self._backend.id_to_token(i) for i in ids if i not in special]

    # ---- text <-> ids ---------------------------------------------------------
    def __call__(self, text: str | list[str], add_special_tokens: bool = True) -> dict:
        if isinstance(text, str):
            ids = self.encode(text, add_special_tokens=add_special_tokens)
            return {"input_ids": ids, "attention_mask": [1] * len(ids)}
        if isinstance(text, (list, tuple)) and all(isinstance(t, str) for t in text):
            batch = [e.ids for e in self._backend.encode_batch(list(text), add_special_tokens=add_special_tokens)]
            return {"input_ids": batch, "attention_mask": [[1] * len(ids) for ids in batch]}
        raise TypeError(f"text must be a str or a list of str, got {type(text).__name__}")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids, skip_special_tokens: bool = False):
        """Ids (a list, an int, or anything with `.tolist()`) to text; a list of
        lists gives a list of texts."""
        if hasattr(token_ids, "tolist"):
            token_ids = token_ids.tolist()
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        if token_ids and isinstance(token_ids[0], (list, tuple)):
            return self.batch_decode(token_ids, skip_special_tokens=skip_special_tokens)
        return self._backend.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences, skip_special_tokens: bool = False) -> list[str]:
        return self._backend.decode_batch([list(s) for s in sequences], skip_special_tokens=skip_special_tokens)

    # ---- chat -----------------------------------------------------------------
    def apply_chat_template(self, conversation, add_generation_prompt: bool = False, tokenize: bool = True,
                            return_dict: bool = True, chat_template: str | None = None, tools=None,
                            documents=None, **template_kwargs):
        """One conversation (a list of message dicts) or a list of them, rendered as
        transformers renders it: the template sees `messages` (keys whose value is
        None dropped), `add_generation_prompt`, `tools`, `documents`, the special
        tokens by name, and `template_kwargs`. tokenize=True encodes the text
        without adding special tokens (a dict with input_ids unless return_dict=False)."""
        from memgen.chat_render import render_chat_template

        template = chat_template if chat_template is not None else self.chat_template
        if template is None:
            raise ValueError("the tokenizer has no chat template (tokenizer.chat_template is not set); "
                             "pass chat_template=... or use raw text")
        if isinstance(conversation, (list, tuple)) and not conversation:
            raise ValueError("cannot apply the chat template to an empty conversation")
        batched = isinstance(conversation, (list, tuple)) and isinstance(conversation[0], (list, tuple))
        conversations = list(conversation) if batched else [conversation]
        variables = {**self.special_tokens_map, **template_kwargs}
        texts = [render_chat_template(template, c, add_generation_prompt=add_generation_prompt, tools=tools,
                                      documents=documents, **variables) for c in conversations]
        if not tokenize:
            return texts if batched else texts[0]
        encoded = self(texts if batched else texts[0], add_special_tokens=False)
        return encoded if return_dict else encoded["input_ids"]

    def __repr__(self) -> str:
        return f"LightTokenizer({self.name_or_path!r}, vocab={len(self)})"


def _token_content(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


