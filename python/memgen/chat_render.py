"""Render a Jinja chat template the way transformers' `apply_chat_template` does
(for `memgen.tokenizer.LightTokenizer`): a sandboxed environment with
trim_blocks / lstrip_blocks and loop controls, a `tojson` filter that does not
escape HTML, `raise_exception`, `strftime_now`, a `{% generation %}` block that
renders its body, and namespaces that refuse underscore names (templates come
from model repositories and are untrusted code)."""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache


def render_chat_template(template: str, messages, add_generation_prompt: bool = False, **variables) -> str:
    """`messages`: a list of dicts; keys whose value is None are dropped (templates
    test for a key, not for None). The immutable sandbox keeps the caller's data unchanged."""
    if not isinstance(messages, (list, tuple)):
        raise TypeError(f"a conversation must be a list of message dicts, got {type(messages).__name__}")
    chat = []
    for message in messages:
        if not isinstance(message, dict):
            raise TypeError(f"chat messages must be dicts, got {message!r}")
        chat.append({k: v for k, v in message.items() if v is not None})
    return _compile(template).render(messages=chat, add_generation_prompt=add_generation_prompt, **variables)


@lru_cache(maxsize=8)
def _compile(template: str):
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        # transformers marks assistant text with {% generation %}...{% endgeneration %} to
        # build training masks; rendering keeps the body unchanged
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class SafeNamespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):
            self, attrs = args[0], dict(*args[1:], **kwargs)
            for name in attrs:
                _check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            _check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore names on a namespace: {name!r}")

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["namespace"] = SafeNamespace
    return env.from_string(template)
