"""Schema-constrained decoding for ``response_format: {"type": "json_schema", ...}``: JSON mode's automaton
(``json_mode.JSONPrefix``) with the schema's expectations on top, so only replies that validate are written.

The subset a strict OpenAI schema uses, with xgrammar's semantics (``strict_mode``, in-order properties):

    type            "object", "array", "string", "number", "integer", "boolean", "null" (or a list of them)
    object          "properties" written in their declared order; each "required" one must appear, the others
                    may be skipped; no other keys ("additionalProperties" false; true is refused)
    array           "items" (one schema for every element)
    string          "enum" / "const" of strings: exactly one of them
    anything else   (pattern, format, minimum, minItems, anyOf, $ref, ...) is refused with a clear error

``check_schema(schema)`` raises ``ValueError`` naming the first unsupported or malformed part; the server
answers it with a 400 naming ``response_format``.
"""

import json

from lmstack.serve.json_mode import JSONPrefix

_TYPES = {"object", "array", "string", "number", "integer", "boolean", "null"}
_ALLOWED_KEYS = {"type", "properties", "required", "additionalProperties", "items", "enum", "const", "title",
                 "description", "default", "$schema"}


def check_schema(schema, path: str = "schema") -> None:
    """Raise ValueError naming the first part of ``schema`` this decoder cannot enforce."""
    if not isinstance(schema, dict):
        raise ValueError(f"{path} must be an object")
    unknown = sorted(set(schema) - _ALLOWED_KEYS)
    if unknown:
        raise ValueError(f"{path}: {unknown[0]!r} is not supported (supported: type, properties, required, "
                         "additionalProperties false, items, string enum / const)")
    types = _types(schema)
    if not types or not types <= _TYPES:
        raise ValueError(f"{path}.type must be one of {sorted(_TYPES)} (or a list of them)")
    choices = _string_choices(schema)
    if choices is not None and (types != {"string"} or not choices or not all(isinstance(c, str) for c in choices)):
        raise ValueError(f"{path}: enum / const must be a non-empty list of strings on a string type")
    if choices and any(ord(ch) < 0x20 or ch in '"\\' for c in choices for ch in c):
        raise ValueError(f"{path}: enum values that need escaping are not supported")
    if "object" in types:
        properties = schema.get("properties", {})
        if not isinstance(properties, dict):
            raise ValueError(f"{path}.properties must be an object")
        required = schema.get("required", [])
        if not isinstance(required, list) or any(r not in properties for r in required):
            raise ValueError(f"{path}.required must list names of {path}.properties")
        if schema.get("additionalProperties", False) is not False:
            raise ValueError(f"{path}.additionalProperties must be false (only declared properties are written)")
        for name, sub in properties.items():
            if any(ord(c) < 0x20 or c in '"\\' for c in name):
                raise ValueError(f"{path}.properties: the name {name!r} needs escaping, which is not supported")
            check_schema(sub, f"{path}.properties.{name}")
    if "array" in types:
        check_schema(schema.get("items", {"type": sorted(_TYPES)}), f"{path}.items")


def _types(schema: dict) -> set[str]:
    kind = schema.get("type")
    if kind is None and _string_choices(schema) is not None:
        return {"string"}
    return set(kind) if isinstance(kind, list) else {kind} if isinstance(kind, str) else set()


def _string_choices(schema: dict) -> list | None:
    if "const" in schema:
        return [schema["const"]]
    return schema.get("enum")


class SchemaPrefix(JSONPrefix):
    """A JSON text read so far that must validate against ``schema`` (checked with ``check_schema``)."""

    __slots__ = ("expect", "frames", "buffer", "choices")

    def __init__(self, schema: dict) -> None:
        super().__init__()
        self.expect = schema  # the schema of the next value
        self.frames: list[list] = []  # per open container: [schema, next property index] / [schema]
        self.buffer = ""  # the characters of the key (or enum string) being read
        self.choices: list[str] | None = None  # what that string may become

    # ---- values ------------------------------------------------------------------------------------
    def _value_start(self, ch: str) -> bool:
        types = _types(self.expect)
        kind = {'"': "string", "{": "object", "[": "array", "t": "boolean", "f": "boolean", "n": "null"}.get(ch)
        if ch == "-" or (ch.isdigit() and ch.isascii()):
            kind = "integer" if "integer" in types and "number" not in types else "number"
        if ch == "]" and self.mode == "first_value":
            return super()._value_start(ch)
        if kind is None or (kind not in types and not (kind == "number" and "integer" in types)):
            return False
        if not super()._value_start(ch):
            return False
        if kind == "object":
            self.frames.append([self.expect, 0])
        elif kind == "array":
            self.frames.append([self.expect])
            self.expect = self.expect.get("items", {"type": sorted(_TYPES)})
        elif kind == "string":
            self.buffer, self.choices = "", _string_choices(self.expect)
        return True  # a literal's letters are checked against the type in _char

    def _char(self, ch: str) -> bool:
        if self.mode == "literal":
            allowed = {"boolean": ("true", "false"), "null": ("null",)}
            words = [w for t in _types(self.expect) for w in allowed.get(t, ())]
            if not any(w.startswith(self.pending + ch) for w in words):
                return False
        if self.mode == "number" and self._integer_only() and (ch in ".eE" or (self.pending == "-" and ch == "0")):
            return False  # integers: -?(0|[1-9][0-9]*) without "-0", as xgrammar writes them
        if self.mode in ("escape", "unicode") and self.choices is not None:
            return False  # enum strings and keys are matched as written: no escapes
        return super()._char(ch)

    def free_string(self) -> bool:
        return self.choices is None

    def _integer_only(self) -> bool:
        types = _types(self.expect)
        return "integer" in types and "number" not in types

    def _in_string(self, ch: str) -> bool:
        if self.choices is not None:
            if ch == '"':
                if self.buffer not in self.choices:
                    return False
                self.choices = None
            else:
                if not any(c.startswith(self.buffer + ch) for c in self.choices):
                    return False
                self.buffer += ch
                return True
        if ch == '"' and self.in_key:
            schema, _ = self.frames[-1]
            self._take_key(schema)
        return super()._in_string(ch)

    # ---- objects -----------------------------------------------------------------------------------
    def _structural(self, ch: str) -> bool:
        mode = self.mode
        if mode == "start":
            if "object" not in _types(self.expect) or not super()._structural(ch):
                return False
            self.frames.append([self.expect, 0])
            return True
        if mode in ("first_key", "key") and ch == '"':
            if not self._key_candidates():
                return False
            super()._structural(ch)
            self.buffer, self.choices = "", self._key_candidates()
            return True
        if mode == "first_key" and ch == "}" and not self._may_close():
            return False
        if mode == "after" and self.stack and self.stack[-1] == "{":
            if ch == "," and not self._key_candidates():
                return False
            if ch == "}" and not self._may_close():
                return False
        if mode == "after" and ch == "," and self.stack and self.stack[-1] == "[":
            ok = super()._structural(ch)
            self.expect = self.frames[-1][0].get("items", {"type": sorted(_TYPES)})
            return ok
        return super()._structural(ch)

    def _key_candidates(self) -> list[str]:
        """The property names that may come next: from the next index on, up to and including the first
        required one (properties are written in order; optional ones may be skipped)."""
        schema, index = self.frames[-1]
        names, required = list(schema.get("properties", {})), set(schema.get("required", []))
        out = []
        for name in names[index:]:
            out.append(name)
            if name in required:
                break
        return out

    def _may_close(self) -> bool:
        schema, index = self.frames[-1]
        required = set(schema.get("required", []))
        return not any(name in required for name in list(schema.get("properties", {}))[index:])

    def _take_key(self, schema: dict) -> None:
        names = list(schema.get("properties", {}))
        position = names.index(self.buffer)
        self.frames[-1][1] = position + 1
        self.expect = schema["properties"][self.buffer]

    def _close(self, opener: str) -> bool:
        if not self.stack or self.stack[-1] != opener:
            return False
        self.frames.pop()  # before the value is done: the parent's frame decides what comes next
        return super()._close(opener)

    def _value_done(self) -> None:
        super()._value_done()
        if self.frames and self.stack and self.stack[-1] == "[":
            self.expect = self.frames[-1][0].get("items", {"type": sorted(_TYPES)})


def schema_from_request(json_schema) -> dict:
    """The schema of a request's ``response_format.json_schema`` (a dict), checked; ValueError otherwise."""
    schema = json_schema.schema_ if json_schema is not None else None
    if schema is None:
        raise ValueError("response_format.json_schema.schema is required")
    check_schema(schema)
    json.dumps(schema)  # it must be plain JSON
    return schema


__all__ = ["SchemaPrefix", "check_schema", "schema_from_request"]
