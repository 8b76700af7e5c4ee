"""ReAct (Yao et al., 2022): the model alternates Thought / Action, the agent runs the tool and writes the
Observation back, until the model gives a Final Answer or a budget runs out.

    agent = ReActAgent(ChatModel(open_model("smollm2.gguf")), [calculator(), file_lookup("docs/")])
    agent = ReActAgent(ServerChat("http://127.0.0.1:8000"), [calculator()])     # or a running lmstack serve
    result = agent.run("What is 17% of 2350?")
    result.answer, result.stopped, result.steps[0].tool, result.steps[0].observation

The conversation is the model's own chat template: a system message describing each tool by its JSON schema
and the format, the user's question, then one assistant turn that grows step by step::

    Thought: I need to compute it.
    Action: {"name": "calculator", "arguments": {"expression": "0.17 * 2350"}}
    Observation: 399.5
    Thought: I know the answer.
    Final Answer: 399.5

Generation stops at "Observation:" so the model never writes its own. Calls are parsed leniently (the
first JSON object after "Action:", or LangChain's ``Action: name`` + ``Action Input: ...``); a malformed call,
an unknown tool or bad arguments becomes an "Error: ..." observation the model can correct, never a crash.
"""

import json
from dataclasses import dataclass, field

import regex

from lmstack.agents.tools import Tool, ToolError
from lmstack.errors import ConfigError
from lmstack.rag.chat import LanguageModel, LocalChat

ChatModel = LocalChat  # the name agents have used: a model in this process (ServerChat: a running server)

FORMAT = """Answer the question. You can use these tools:
{tools}

Use exactly this format:
Thought: what to do next
Action: {{"name": "<tool name>", "arguments": {{<the tool's arguments as JSON>}}}}
Observation: the tool's result (written for you)
... (Thought / Action / Observation as many times as needed)
Thought: I know the answer.
Final Answer: the answer"""

_FINAL = regex.compile(r"Final Answer\s*:\s*(.*)", regex.IGNORECASE | regex.DOTALL)
_ACTION = regex.compile(r"Action\s*:\s*(.*)", regex.IGNORECASE | regex.DOTALL)
_ACTION_INPUT = regex.compile(r"^\s*([\w.-]+)\s*\n?\s*Action Input\s*:\s*(.*)$", regex.IGNORECASE | regex.DOTALL)
_THOUGHT = regex.compile(r"^\s*(?:Thought\s*:)?\s*(.*?)\s*(?=Action\s*:|Final Answer\s*:|$)",
                         regex.IGNORECASE | regex.DOTALL)


@dataclass
class Step:
    """One model turn: what it thought, the call it made (or the error in it) and what came back."""

    thought: str
    tool: str | None = None
    arguments: dict | None = None
    observation: str | None = None
    text: str = ""  # the model's raw output for this step


@dataclass
class AgentResult:
    answer: str | None
    stopped: str  # "answer", "max_steps", "max_tokens" or "context"
    steps: list[Step] = field(default_factory=list)
    tokens: int = 0
    transcript: str = ""


def parse_step(text: str) -> tuple[str, str | None, str | None, dict | str | None]:
    """(thought, final answer, tool name, arguments) read from one model turn; a call that cannot be read
    gives tool name None and arguments = the error message."""
    thought = _THOUGHT.match(text).group(1).strip()
    final = _FINAL.search(text)
    action = _ACTION.search(text)
    if final and (not action or final.start() < action.start()):
        return thought, final.group(1).strip(), None, None
    if not action:
        return thought, None, None, "no Action or Final Answer (use the format shown)"
    body = action.group(1).strip()
    classic = _ACTION_INPUT.match(body)
    if classic:
        name, raw = classic.group(1), classic.group(2).strip()
        try:
            arguments = json.loads(raw)
        except json.JSONDecodeError:
            arguments = raw.strip("\"'` \n")
        return thought, None, name, arguments
    start = body.find("{")
    if start < 0:
        return thought, None, None, "the Action must be a JSON object: {\"name\": ..., \"arguments\": {...}}"
    try:
        call, _ = json.JSONDecoder().raw_decode(body[start:])
    except json.JSONDecodeError as error:
        return thought, None, None, f"the Action is not valid JSON ({error.msg} at character {error.pos})"
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return thought, None, None, "the Action needs a \"name\" (the tool) and \"arguments\" (an object)"
    return thought, None, call["name"], call.get("arguments", {})


class ReActAgent:
    """Runs the ReAct loop over ``model`` with ``tools`` (see the module docstring).

    Args:
        max_steps: most model turns; max_tokens: most tokens generated in all; step_tokens: most in one turn.
    """

    def __init__(self, model: LanguageModel, tools: list[Tool], *, max_steps: int = 6, max_tokens: int = 1024,
                 step_tokens: int = 160, system: str = FORMAT) -> None:
        names = [t.name for t in tools]
        if len(set(names)) != len(names):
            raise ConfigError(f"tool names must be unique, got {names}")
        if max_steps < 1 or max_tokens < 1 or step_tokens < 1:
            raise ConfigError("max_steps, max_tokens and step_tokens must be at least 1")
        self.model, self.tools = model, {t.name: t for t in tools}
        self.max_steps, self.max_tokens, self.step_tokens = max_steps, max_tokens, step_tokens
        schemas = "\n".join(json.dumps(t.schema()["function"]) for t in tools) or "(none)"
        self.system = system.format(tools=schemas)

    def run(self, question: str) -> AgentResult:
        messages = [{"role": "system", "content": self.system}, {"role": "user", "content": question}]
        result, transcript = AgentResult(None, "max_steps"), "Thought:"
        for _ in range(self.max_steps):
            budget = min(self.step_tokens, self.max_tokens - result.tokens)
            if budget < 1:
                result.stopped = "max_tokens"
                break
            text, used = self.model.complete(messages, transcript, ["Observation:"], budget)
            result.tokens += used
            if used == 0 and not text:
                result.stopped = "context"
                break
            thought, final, tool, arguments = parse_step("Thought:" + text)
            step = Step(thought, text=text)
            result.steps.append(step)
            transcript += text
            if final is not None:
                result.answer, result.stopped = final, "answer"
                break
            step.tool, step.arguments = tool, arguments if isinstance(arguments, dict) else None
            step.observation = self._observe(tool, arguments)
            transcript = transcript.rstrip() + f"\nObservation: {step.observation}\nThought:"
        result.transcript = transcript
        return result

    def _observe(self, tool: str | None, arguments) -> str:
        if tool is None:
            return f"Error: {arguments}"
        if tool not in self.tools:
            return f"Error: there is no tool {tool!r}; the tools are {', '.join(self.tools) or 'none'}"
        chosen = self.tools[tool]
        if isinstance(arguments, str):  # Action Input: plain text, for a tool of one argument
            required = chosen.parameters.get("required", [])
            arguments = {required[0]: arguments} if len(required) == 1 else arguments
        try:
            return chosen(arguments)
        except ToolError as error:
            return f"Error: {error}"
