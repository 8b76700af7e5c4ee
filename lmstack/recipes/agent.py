"""`lmstack agent`: a ReAct agent over a chat model (loaded here, or a running `lmstack serve`) with safe tools.

    lmstack agent "What is 17% of 2350?" --model smollm2-135m-instruct
    lmstack agent "Which file explains resuming?" --files docs/ --index runs/docs-index --server http://127.0.0.1:8000

Each turn is printed as it is parsed: the thought, the tool call (or the error the model is shown instead)
and the observation; then the answer, or why the agent stopped (max_steps, max_tokens, context).
"""

import dataclasses
import json

from lmstack.agents import AgentResult, ReActAgent, calculator, file_lookup, retrieval
from lmstack.recipes.configs.agent import AgentConfig
from lmstack.recipes.rag import open_index
from lmstack.recipes.sampling import open_chat_model


def run(cfg: AgentConfig) -> AgentResult:
    tools = [calculator()] if cfg.calculator else []
    if cfg.files is not None:
        tools.append(file_lookup(cfg.files))
    if cfg.index is not None:
        tools.append(retrieval(open_index(cfg.index, cfg.encoder), k=cfg.k))
    agent = ReActAgent(open_chat_model(cfg), tools, max_steps=cfg.max_steps, max_tokens=cfg.max_tokens,
                       step_tokens=cfg.max_new_tokens)
    result = agent.run(cfg.question)
    if cfg.json:
        print(json.dumps({"answer": result.answer, "stopped": result.stopped, "tokens": result.tokens,
                          "steps": [dataclasses.asdict(s) for s in result.steps]}, ensure_ascii=False))
        return result
    for number, step in enumerate(result.steps, 1):
        print(f"[{number}] Thought: {step.thought}")
        if step.observation is not None:
            call = json.dumps({"name": step.tool, "arguments": step.arguments}) if step.tool else "(unreadable call)"
            print(f"    Action: {call}\n    Observation: {step.observation}")
    print(f"\nanswer: {result.answer}" if result.answer is not None
          else f"\nno answer: stopped at {result.stopped} ({result.tokens} tokens generated)")
    return result
