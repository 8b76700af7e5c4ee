"""Tools an agent may call: each described by a JSON schema, its arguments checked before it runs, and none of
them able to run arbitrary code or reach the network.

    calc = calculator()
    calc.schema()                          # {"type": "function", "function": {"name", "description", "parameters"}}
    calc({"expression": "2 * (3 + 4)"})    # "14"
    files = file_lookup("docs/")           # read-only, confined to docs/
    search = retrieval(index, k=3)         # lmstack.rag.Index

A call with bad arguments, or one the tool refuses, raises ToolError with a message meant for the model: the
agent shows it as the observation, so the model can correct itself.
"""

import ast
import math
import operator
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from lmstack.errors import LmstackError

_JSON_TYPES = {"string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,), "object": (dict,),
               "array": (list,)}


class ToolError(LmstackError, ValueError):
    """A tool call that cannot run: bad arguments, or an input the tool refuses. The message names why."""


@dataclass(frozen=True)
class Tool:
    """A named function with a JSON-schema description of its (object) arguments."""

    name: str
    description: str
    parameters: dict
    function: Callable[..., str]

    def schema(self) -> dict:
        """The OpenAI tool format (what lmstack serve's /v1/chat/completions takes in ``tools``)."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}

    def __call__(self, arguments) -> str:
        check_arguments(self, arguments)
        return self.function(**arguments)


def check_arguments(tool: Tool, arguments) -> None:
    """Raise ToolError unless ``arguments`` is an object with every required property, no unknown one, and each
    of the declared JSON type (and among its ``enum``, if any)."""
    if not isinstance(arguments, dict):
        raise ToolError(f"{tool.name} takes a JSON object of arguments, got {type(arguments).__name__}")
    properties = tool.parameters.get("properties", {})
    for name in tool.parameters.get("required", []):
        if name not in arguments:
            raise ToolError(f"{tool.name} needs the argument {name!r}")
    for name, value in arguments.items():
        if name not in properties:
            raise ToolError(f"{tool.name} has no argument {name!r} (it takes {', '.join(properties) or 'none'})")
        spec = properties[name]
        types = _JSON_TYPES.get(spec.get("type"), (object,))
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise ToolError(f"{tool.name}: {name!r} must be a {spec.get('type')}, got {value!r}")
        if "enum" in spec and value not in spec["enum"]:
            raise ToolError(f"{tool.name}: {name!r} must be one of {spec['enum']}, got {value!r}")


# --- the calculator: arithmetic parsed by an AST whitelist (no eval) ----------------------------------------

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCTIONS = {"sqrt": math.sqrt, "abs": abs, "round": round, "min": min, "max": max, "log": math.log,
              "exp": math.exp, "floor": math.floor, "ceil": math.ceil}
_CONSTANTS = {"pi": math.pi, "e": math.e}
MAX_EXPRESSION = 200
MAX_MAGNITUDE = 1e100


def evaluate_arithmetic(expression: str) -> int | float:
    """The value of an arithmetic expression: numbers, + - * / // % **, parentheses, pi, e and a few functions
    (sqrt, abs, round, min, max, log, exp, floor, ceil). Anything else (names, attributes, calls of other
    functions, strings) is refused; so are huge powers and results beyond 1e100."""
    if not isinstance(expression, str) or not expression.strip():
        raise ToolError("the expression is empty")
    if len(expression) > MAX_EXPRESSION:
        raise ToolError(f"the expression is {len(expression)} characters; at most {MAX_EXPRESSION}")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ToolError(f"not an arithmetic expression: {expression!r}") from None
    try:
        return _value(tree.body)
    except (ZeroDivisionError, OverflowError, ValueError) as error:
        raise ToolError(f"cannot compute {expression!r}: {error}") from None


def _value(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.Name) and node.id in _CONSTANTS:
        return _CONSTANTS[node.id]
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_value(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _value(node.left), _value(node.right)
        if isinstance(node.op, ast.Pow) and (abs(right) > 1000 or (abs(left) > 1 and abs(right) > 300)):
            raise ToolError(f"the power {left} ** {right} is too large")
        return _bounded(_BINARY[type(node.op)](left, right))
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS
            and not node.keywords and 0 < len(node.args) <= 8):
        return _bounded(_FUNCTIONS[node.func.id](*[_value(a) for a in node.args]))
    raise ToolError(f"the calculator does not allow {ast.unparse(node)!r} (numbers, + - * / // % **, "
                    f"parentheses, pi, e and {', '.join(_FUNCTIONS)} only)")


def _bounded(value):
    if isinstance(value, complex) or abs(value) > MAX_MAGNITUDE:
        raise ToolError("the result is out of range")
    return value


def _format_number(value: int | float) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return repr(round(value, 10)) if isinstance(value, float) else str(value)


def calculator() -> Tool:
    return Tool("calculator", "Evaluate an arithmetic expression, e.g. (3 + 4) * 2 / sqrt(16).",
                {"type": "object", "properties": {"expression": {"type": "string", "description":
                                                                 "the arithmetic expression"}},
                 "required": ["expression"], "additionalProperties": False},
                lambda expression: _format_number(evaluate_arithmetic(expression)))


# --- a read-only file lookup confined to one directory -------------------------------------------------------

MAX_FILE_CHARS = 4000


def file_lookup(root: str | Path, max_chars: int = MAX_FILE_CHARS) -> Tool:
    """Read a text file, or list a directory, inside ``root``. Paths are resolved (symbolic links too) and must
    stay inside it; nothing is ever written."""
    base = Path(root).resolve()
    if not base.is_dir():
        raise ToolError(f"{root}: the file tool needs an existing directory")

    def read(path: str = ".") -> str:
        target = (base / path).resolve()
        if target != base and base not in target.parents:
            raise ToolError(f"{path!r} is outside the directory this tool may read")
        if target.is_dir():
            entries = sorted(p.name + ("/" if p.is_dir() else "") for p in target.iterdir())
            return "\n".join(entries) or "(empty directory)"
        if not target.is_file():
            raise ToolError(f"no file {path!r} (list a directory with path '.')")
        try:
            text = target.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ToolError(f"{path!r} is not a UTF-8 text file") from None
        return text if len(text) <= max_chars else text[:max_chars] + f"\n[... {len(text) - max_chars} more characters]"

    return Tool("read_file", "Read a text file, or list a directory, by its path relative to the document folder.",
                {"type": "object", "properties": {"path": {"type": "string", "description": "relative path; "
                                                           "'.' lists the folder"}},
                 "required": ["path"], "additionalProperties": False}, read)


def retrieval(index, k: int = 3, mode: str = "hybrid") -> Tool:
    """Search an lmstack.rag Index; the observation lists the best chunks with their ids."""

    def search(query: str) -> str:
        try:
            hits = index.search(query, k=k, mode=mode)
        except LmstackError as error:
            raise ToolError(str(error)) from None
        return "\n".join(f"[{h.chunk.id}] {' '.join(h.chunk.text.split())}" for h in hits) or "no results"

    return Tool("search", "Search the document index for passages relevant to a query.",
                {"type": "object", "properties": {"query": {"type": "string", "description": "what to look for"}},
                 "required": ["query"], "additionalProperties": False}, search)
