"""Agents: prompting techniques (templates, few-shot, chain of thought, self-consistency), safe tools and the
ReAct loop.

    from lmstack.agents import ReActAgent, ChatModel, calculator, file_lookup, retrieval
    result = ReActAgent(ChatModel(files), [calculator()]).run("What is 12 * 7?")
    result = ReActAgent(ServerChat("http://127.0.0.1:8000"), [calculator()]).run("What is 12 * 7?")
"""

from lmstack.agents.prompts import (COT_TRIGGER, FixedExamples, NearestExamples, PromptTemplate, RandomExamples,
                                    Vote, chain_of_thought, extract_answer, few_shot_prompt, self_consistency)
from lmstack.agents.react import AgentResult, ChatModel, LanguageModel, ReActAgent, Step, parse_step
from lmstack.agents.tools import Tool, ToolError, calculator, check_arguments, evaluate_arithmetic, file_lookup, retrieval
from lmstack.rag.chat import ServerChat

__all__ = ["AgentResult", "COT_TRIGGER", "ChatModel", "FixedExamples", "LanguageModel", "NearestExamples",
           "PromptTemplate", "RandomExamples", "ReActAgent", "ServerChat", "Step", "Tool", "ToolError",
           "Vote", "calculator", "chain_of_thought", "check_arguments", "evaluate_arithmetic",
           "extract_answer", "few_shot_prompt", "file_lookup", "parse_step", "retrieval", "self_consistency"]
