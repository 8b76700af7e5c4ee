"""The ReAct loop: tools run and their observations reach the model; malformed calls, unknown tools and bad
arguments come back as errors the model sees; budgets stop the loop; a real checkpoint drives it end to end."""

import json

import pytest

from lmstack.agents import ChatModel, ReActAgent, Tool, calculator, file_lookup, parse_step, retrieval
from lmstack.checkpoints.model_files import open_model
from lmstack.errors import ConfigError
from tests.serve.conftest import chat_model_dir  # noqa: F401


class Scripted:
    """A LanguageModel that replies from a script and records what it was shown."""

    def __init__(self, *replies):
        self.replies, self.seen = list(replies), []

    def complete(self, messages, continuation, stop, max_new_tokens):
        self.seen.append((messages, continuation, stop))
        reply = self.replies.pop(0)
        return reply, len(reply.split())


def call(name, **arguments):
    return f' I will use {name}.\nAction: {json.dumps({"name": name, "arguments": arguments})}\n'


def test_a_tool_call_then_the_answer():
    model = Scripted(call("calculator", expression="17 * 3"), " I know it.\nFinal Answer: 51")
    result = ReActAgent(model, [calculator()]).run("What is 17 times 3?")
    assert result.answer == "51" and result.stopped == "answer" and len(result.steps) == 2
    assert result.steps[0].tool == "calculator" and result.steps[0].observation == "51"
    messages, continuation, stop = model.seen[1]
    assert "Observation: 51\nThought:" in continuation and stop == ["Observation:"]
    assert '"name": "calculator"' in messages[0]["content"] and messages[1]["content"] == "What is 17 times 3?"


def test_errors_are_observations_not_crashes():
    model = Scripted(" hmm\nAction: {not json", " try\nAction: {\"name\": \"weather\", \"arguments\": {}}",
                     call("calculator", expr="1"), call("calculator", expression="open('x')"),
                     " no format at all", "\nFinal Answer: done")
    result = ReActAgent(model, [calculator()], max_steps=6).run("q")
    observations = [s.observation for s in result.steps[:-1]]
    assert observations[0].startswith("Error: the Action is not valid JSON")
    assert observations[1] == "Error: there is no tool 'weather'; the tools are calculator"
    assert "needs the argument 'expression'" in observations[2] and "does not allow" in observations[3]
    assert "no Action or Final Answer" in observations[4]
    assert result.answer == "done"


def test_classic_action_input_format():
    thought, final, tool, arguments = parse_step("Thought: compute\nAction: calculator\nAction Input: 2 + 2")
    assert (thought, final, tool, arguments) == ("compute", None, "calculator", "2 + 2")
    result = ReActAgent(Scripted(" x\nAction: calculator\nAction Input: \"2 + 2\"", "Final Answer: 4"),
                        [calculator()]).run("q")
    assert result.steps[0].observation == "4"


def test_budgets_stop_the_loop():
    looping = lambda: Scripted(*[call("calculator", expression="1 + 1")] * 10)  # noqa: E731
    assert ReActAgent(looping(), [calculator()], max_steps=3).run("q").stopped == "max_steps"
    result = ReActAgent(looping(), [calculator()], max_tokens=12, step_tokens=8).run("q")
    assert result.stopped == "max_tokens" and result.tokens >= 12
    with pytest.raises(ConfigError, match="unique"):
        ReActAgent(Scripted(), [calculator(), calculator()])


def test_retrieval_and_file_tools(tmp_path):
    class Index:
        def search(self, query, k, mode):
            from lmstack.rag import Chunk, Hit
            return [Hit(Chunk("notes.md", 0, "Resume with --resume.", 0, 21), 0.9, 1)]

    (tmp_path / "notes.md").write_text("Resume with --resume.")
    model = Scripted(call("search", query="resume"), call("read_file", path="../etc"), "Final Answer: --resume")
    result = ReActAgent(model, [retrieval(Index()), file_lookup(tmp_path)]).run("How do I resume?")
    assert result.steps[0].observation == "[notes.md#0] Resume with --resume."
    assert "outside the directory" in result.steps[1].observation and result.answer == "--resume"


def test_a_real_checkpoint_runs_the_loop(chat_model_dir):  # noqa: F811
    files = open_model(chat_model_dir)
    files.model.eval()
    tiny = Tool("two", "2.", {"type": "object", "properties": {}}, lambda: "2")  # its 256-token context is small
    agent = ReActAgent(ChatModel(files), [tiny], max_steps=2, step_tokens=12, system="{tools}")
    result = agent.run("2 + 2?")
    assert result.stopped in ("answer", "max_steps", "max_tokens") and 1 <= len(result.steps) <= 2
    assert 0 < result.tokens <= 24 and result.transcript.startswith("Thought:")
    overflowing = ReActAgent(ChatModel(files), [calculator()], system="{tools}" * 20).run("q")
    assert overflowing.stopped == "context" and overflowing.steps == []
