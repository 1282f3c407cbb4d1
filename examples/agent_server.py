"""An agent server: a CodeAgent per request on a pooled sandbox, plus code-execution sessions.

Run it with one command (after ``pip install -e ".[fastapi]"``):

    python examples/agent_server.py

then ``curl -X POST localhost:8000/agent -H 'content-type: application/json' -d '{"task": "sum 1..10"}'``.

Environment:

* ``AGENT_MODEL_ID``: a model id for smolagents' ``LiteLLMModel`` (with its API key in the
  usual variable). Unset: a scripted model answers, so the server runs offline.
* ``SANDBOX_BACKEND``: ``local`` (default) or ``modal``.
* ``API_TOKEN``: bearer token of the ``/sessions`` routes (default: a random one, printed).
* ``PORT``: default 8000.
"""

from __future__ import annotations

import os
import secrets
from typing import Annotated, Any

from fastapi import Depends, FastAPI
from pydantic import BaseModel
from smolagents import CodeAgent
from smolagents.models import ChatMessage, MessageRole, Model

from async_modal_exec import SandboxPool, run_agent
from async_modal_exec.agent import Executor
from async_modal_exec.fastapi import agent_executor, pool_lifespan, sessions_router


class OfflineModel(Model):
    """Answers every task with the same two code steps: compute, then final_answer."""

    def __init__(self) -> None:
        super().__init__(model_id="offline-scripted")

    def generate(
        self, messages: list[Any], stop_sequences: list[str] | None = None, **kwargs: Any
    ) -> ChatMessage:
        step = sum(1 for message in messages if getattr(message, "role", None) == MessageRole.ASSISTANT)
        code = (
            "numbers = list(range(1, 11))\nprint('sum of', numbers)\ntotal = sum(numbers)"
            if step == 0
            else "final_answer({'total': total})"
        )
        return ChatMessage(
            role=MessageRole.ASSISTANT, content=f"Thought: step {step}.\n<code>\n{code}\n</code>"
        )


def make_model() -> Model:
    model_id = os.environ.get("AGENT_MODEL_ID")
    if not model_id:
        return OfflineModel()
    from smolagents import LiteLLMModel

    return LiteLLMModel(model_id=model_id)


def make_pool() -> SandboxPool:
    if os.environ.get("SANDBOX_BACKEND", "local") == "modal":
        from async_modal_exec import ModalBackend

        return SandboxPool(lambda: ModalBackend(app_name="agent-server"), min_idle=2, max_size=8)
    return SandboxPool(min_idle=1, max_size=4)


API_TOKEN = os.environ.get("API_TOKEN") or secrets.token_urlsafe(16)
app = FastAPI(title="async_modal_exec agent server", lifespan=pool_lifespan(make_pool))
app.include_router(sessions_router(token=API_TOKEN))


class AgentRequest(BaseModel):
    task: str


@app.post("/agent")
async def agent(
    request: AgentRequest, executor: Annotated[Executor, Depends(agent_executor)]
) -> dict[str, Any]:
    """Run a CodeAgent for the task on a pooled sandbox; the event loop stays free meanwhile."""
    code_agent = CodeAgent(tools=[], model=make_model(), executor=executor, max_steps=6, verbosity_level=0)
    answer = await run_agent(code_agent, request.task)
    return {"answer": answer, "steps": len(code_agent.memory.steps)}


if __name__ == "__main__":
    import uvicorn

    if not os.environ.get("API_TOKEN"):
        print(f"sessions API token: {API_TOKEN}")
    # uvicorn runs the app's shutdown only once every request has ended: give
    # requests a few seconds, then cancel them (pending creates stop waiting,
    # running code is interrupted) instead of waiting for the longest one.
    uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8000")), timeout_graceful_shutdown=3)
