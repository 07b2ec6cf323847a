"""`StructuredOutputsParams`: vLLM's structured-output request, one constraint of
json | regex | choice | grammar (| json_object), checked when built. Whether a
schema, regex or grammar compiles is checked when the request is submitted
(LLM.generate / the server), before it enters the engine."""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclass
class StructuredOutputsParams:
    json: str | dict | None = None          # a JSON schema (a dict, or a string holding one)
    regex: str | None = None                # the whole output matches this regex
    choice: list[str] | None = None         # the output is exactly one of these strings
    grammar: str | None = None              # an EBNF grammar (xgrammar's GBNF dialect, root rule "root")
    json_object: bool | None = None         # any JSON object (OpenAI's response_format json_object)
    disable_any_whitespace: bool = False    # JSON without optional whitespace (vLLM's flag)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        given = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            which = f"got {len(given)}: {', '.join(given)}" if given else "got none"
            raise ValueError(f"StructuredOutputsParams takes exactly one constraint of json=, regex=, choice=, "
                             f"grammar=, json_object=True; {which}")
        if self.json is not None:
            if isinstance(self.json, str):
                try:
                    schema = _json_loads(self.json)
                except ValueError as e:
                    raise ValueError(f"structured_outputs.json is not valid JSON: {e}") from None
            else:
                schema = self.json
            if not isinstance(schema, (dict, bool)):
                raise ValueError(f"structured_outputs.json must be a JSON schema (an object), "
                                 f"got {type(schema).__name__}")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None:
                if not isinstance(value, str):
                    raise TypeError(f"structured_outputs.{name} must be a string, got {type(value).__name__}")
                if not value:
                    raise ValueError(f"structured_outputs.{name} must not be empty")
        if self.choice is not None:
            if isinstance(self.choice, str) or not isinstance(self.choice, (list, tuple)) \
                    or not all(isinstance(c, str) for c in self.choice):
                raise TypeError(f"structured_outputs.choice must be a list of strings, got {self.choice!r}")
            if not self.choice or any(c == "" for c in self.choice):
                raise ValueError("structured_outputs.choice must be a non-empty list of non-empty strings")
            self.choice = list(self.choice)
        if self.json_object is not None and not isinstance(self.json_object, bool):
            raise TypeError(f"structured_outputs.json_object must be true or false, got {self.json_object!r}")
        if not isinstance(self.disable_any_whitespace, bool):
            raise TypeError("structured_outputs.disable_any_whitespace must be true or false")

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    def key(self) -> tuple:
        """What the compiled grammar depends on (the compile cache's key)."""
        kind = self.kind
        value: Any = getattr(self, kind)
        if kind == "json":
            schema = _json_loads(value) if isinstance(value, str) else value
            value = json.dumps(schema, sort_keys=True, separators=(",", ":"))
        elif kind == "choice":
            value = tuple(value)
        return kind, value, self.disable_any_whitespace

    @classmethod
    def from_dict(cls, data: dict) -> "StructuredOutputsParams":
        """vLLM's `structured_outputs` request field ({"json" | "regex" | "choice" | "grammar": ...})."""
        if not isinstance(data, dict):
            raise TypeError(f"structured_outputs must be an object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"structured_outputs has unknown field(s) {unknown}; memgen takes "
                             f"{sorted(known)}")
        return cls(**data)


def _json_loads(text: str):
    def no_constants(name):
        raise ValueError(f"{name} is not a JSON value")
    return json.loads(text, parse_constant=no_constants)
