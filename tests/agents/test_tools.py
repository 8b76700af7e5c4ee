"""Tools: a calculator that cannot run code, a file lookup that cannot leave its folder, argument checking."""

import pytest

from lmstack.agents import Tool, ToolError, calculator, evaluate_arithmetic, file_lookup


@pytest.mark.parametrize("expression, value", [("2 + 3 * 4", 14), ("(2 + 3) * 4", 20), ("7 / 2", 3.5), ("7 // 2", 3),
                                               ("-2 ** 2", -4), ("sqrt(16) + abs(-3)", 7.0), ("max(1, 5, 3)", 5),
                                               ("round(2 * pi, 2)", 6.28), ("10 % 4", 2), ("1e3 + 1", 1001.0)])
def test_arithmetic(expression, value):
    assert evaluate_arithmetic(expression) == value


@pytest.mark.parametrize("expression, message", [
    ("__import__('os').system('ls')", "does not allow"), ("open('x')", "does not allow"), ("x + 1", "does not allow"),
    ("(1).__class__", "does not allow"), ("'a' * 3", "does not allow"), ("[1, 2]", "does not allow"),
    ("lambda: 1", "does not allow"), ("9 ** 9 ** 9", "too large"), ("1 / 0", "cannot compute"), ("2 +", "not an"),
    ("", "empty"), ("1 + " * 100 + "1", "at most 200"), ("10.0 ** 200", "out of range"), ("sqrt(-1)", "cannot compute"),
])
def test_the_calculator_refuses(expression, message):
    with pytest.raises(ToolError, match=message):
        evaluate_arithmetic(expression)


def test_calculator_tool_schema_and_arguments():
    calc = calculator()
    assert calc.schema()["function"]["name"] == "calculator"
    assert calc({"expression": "6 * 7"}) == "42" and calc({"expression": "1 / 4"}) == "0.25"
    for bad, message in [({}, "needs the argument 'expression'"), ({"expression": 3}, "must be a string"),
                         ({"expression": "1", "x": 1}, "no argument 'x'"), ("1 + 1", "JSON object")]:
        with pytest.raises(ToolError, match=message):
            calc(bad)


def test_enum_and_boolean_types():
    tool = Tool("t", "d", {"type": "object", "properties": {"unit": {"type": "string", "enum": ["km", "mi"]},
                                                            "n": {"type": "integer"}}}, lambda **kw: "ok")
    assert tool({"unit": "km", "n": 2}) == "ok"
    with pytest.raises(ToolError, match="one of"):
        tool({"unit": "m"})
    with pytest.raises(ToolError, match="must be a integer"):
        tool({"n": True})


def test_file_lookup_is_confined(tmp_path):
    root = tmp_path / "docs"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("alpha")
    (root / "sub" / "b.md").write_text("beta " * 2000)
    (tmp_path / "secret.txt").write_text("secret")
    (root / "link").symlink_to(tmp_path / "secret.txt")
    read = file_lookup(root)
    assert read({"path": "a.txt"}) == "alpha"
    assert read({"path": "."}).split("\n") == ["a.txt", "link", "sub/"]
    assert read({"path": "sub/b.md"}).endswith("more characters]")
    for path in ("../secret.txt", "/etc/passwd", "link", "sub/../../secret.txt"):
        with pytest.raises(ToolError, match="outside the directory"):
            read({"path": path})
    with pytest.raises(ToolError, match="no file"):
        read({"path": "missing.txt"})
    assert (tmp_path / "secret.txt").read_text() == "secret"
