"""A scripted smolagents model, tools and an executor fixture for agent tests (no network, no LLM)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from smolagents import CodeAgent, Tool
from smolagents.memory import ActionStep
from smolagents.models import ChatMessage, MessageRole, Model
from smolagents.monitoring import AgentLogger, LogLevel

from async_modal_exec import GatewayBackend
from async_modal_exec.agent import Executor
from async_modal_exec.backends import GatewayEndpoint

QUIET = AgentLogger(level=LogLevel.OFF)


@pytest.fixture
def agent_executor(gateway: GatewayEndpoint) -> Iterator[Executor]:
    """An Executor on the session's gateway, cleaned up after the test."""
    executor = Executor(GatewayBackend(gateway.base_url, gateway.token), logger=QUIET, timeout=60)
    yield executor
    executor.cleanup()


def steps(agent: CodeAgent) -> list[ActionStep]:
    """The agent's action steps, in order."""
    return [step for step in agent.memory.steps if isinstance(step, ActionStep)]


class ScriptedModel(Model):
    """Answers each agent step with the next canned code action.

    It records the messages it was shown, so tests can check what the agent
    observed (logs, errors) between steps.
    """

    def __init__(self, actions: Sequence[str]) -> None:
        super().__init__(model_id="scripted")
        self.actions = list(actions)
        self.seen: list[str] = []  # the last message of each call
        self.histories: list[str] = []  # every message of each call, joined

    def generate(
        self, messages: list[Any], stop_sequences: list[str] | None = None, **kwargs: Any
    ) -> ChatMessage:
        texts = [str(m.content if hasattr(m, "content") else m) for m in messages]
        self.seen.append(texts[-1])
        self.histories.append("\n".join(texts))
        if not self.actions:
            raise RuntimeError("the scripted model ran out of actions")
        code = self.actions.pop(0)
        return ChatMessage(
            role=MessageRole.ASSISTANT, content=f"Thought: next step.\n<code>\n{code}\n</code>"
        )


class YamlTool(Tool):
    """A custom tool with a third-party import (pyyaml ships with the test environment)."""

    name = "to_yaml"
    description = "Render a mapping as YAML text."
    inputs = {"data": {"type": "object", "description": "the mapping"}}
    output_type = "string"

    def forward(self, data: dict) -> str:  # type: ignore[type-arg]
        import yaml

        return yaml.safe_dump(data, sort_keys=True)


class KeyedTool(Tool):
    """A tool with a constructor argument: its to_dict() raises, it cannot be shipped as source."""

    name = "keyed"
    description = "Uses a key given at construction."
    inputs = {"x": {"type": "string", "description": "input"}}
    output_type = "string"

    def __init__(self, key: str) -> None:
        super().__init__()
        self.key = key

    def forward(self, x: str) -> str:
        return f"{x}:{self.key}"
