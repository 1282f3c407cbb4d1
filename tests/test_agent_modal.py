"""The smolagents facade on ModalBackend, against the control-plane double."""

from __future__ import annotations

import asyncio
import warnings

import modal
import pytest
from smolagents import CodeAgent
from smolagents.monitoring import AgentLogger, LogLevel

from async_modal_exec import Executor, ModalBackend, create_modal_executor, run_agent

from .agent_helpers import ScriptedModel, YamlTool
from .helpers import measure_loop_lag
from .modal_double import ModalDouble

pytestmark = pytest.mark.usefixtures("modal_sandboxes_checked")

STEPS = [
    "print('numbers are', numbers)\ntotal = sum(numbers)\nprint(to_yaml({'total': total}))",
    "print('before the error')\n1/0",
    "final_answer({'total': total, 'n': len(numbers)})",
]


async def test_run_agent_on_modal_keeps_the_loop_free(modal_double: ModalDouble) -> None:
    executor = Executor(
        ModalBackend(app_name="agent-async", ssl_context=modal_double.ssl_context()),
        logger=AgentLogger(level=LogLevel.OFF),
    )
    agent = CodeAgent(
        tools=[YamlTool()], model=ScriptedModel(STEPS), executor=executor, max_steps=5, verbosity_level=0
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", modal.exception.AsyncUsageWarning)
            async with measure_loop_lag() as probe:
                answer = await run_agent(agent, "Sum the numbers.", additional_args={"numbers": [4, 5, 6]})
        assert answer == {"total": 15, "n": 3}
        error_step = agent.memory.steps[2]
        assert "before the error" in str(error_step.observations)  # type: ignore[attr-defined]
        # Nothing the executor runs on the loop may hold it for 50 ms; a full GC in the
        # agent's own thread can hold the GIL that long, which is why gc.freeze() runs
        # after imports (see conftest).
        assert probe.max_callback < 0.05, probe.summary()
    finally:
        await executor.aclose()


def test_seed_snippet_shape(modal_double: ModalDouble) -> None:
    # The seed's usage, with only the import line changed (plus the double's TLS trust).
    modal_double.named_secrets["aws-secret"] = {"AWS_ACCESS_KEY_ID": "AKIA-double"}
    executor = create_modal_executor(
        additional_imports=["json"],
        logger=AgentLogger(level=LogLevel.OFF),
        app_name="cora-smolagent-execution",
        create_kwargs={
            "secrets": [modal.Secret.from_name("aws-secret")],
            "image": modal.Image.debian_slim().uv_pip_install("boto3", "jupyter", "jupyter_kernel_gateway"),
        },
        ssl_context=modal_double.ssl_context(),
    )
    model = ScriptedModel(
        ["import os\nkey = os.environ['AWS_ACCESS_KEY_ID']\nprint(key)", "final_answer(key)"]
    )
    with CodeAgent(tools=[], model=model, executor=executor, max_steps=4, verbosity_level=0) as agent:
        assert agent.run("read the key") == "AKIA-double"
        backend = executor.core.backend
        assert isinstance(backend, ModalBackend)
        sandbox = modal_double.sandboxes[backend.sandbox.object_id]  # type: ignore[union-attr]
        assert sandbox.env["AWS_ACCESS_KEY_ID"] == "AKIA-double"
        assert any("boto3" in str(image) for image in modal_double.images)
        # json is importable in the sandbox: never "pip install json".
        assert executor.installer.installed == []
    assert not sandbox.alive()


def test_sync_executor_inside_a_running_loop_thread_elsewhere(modal_double: ModalDouble) -> None:
    # The facade's own loop makes every Modal call; a caller thread with a loop of
    # its own running (an async app calling the agent from a worker) sees no warning.
    async def call_from_thread() -> str:
        executor = Executor(
            ModalBackend(app_name="agent-thread", ssl_context=modal_double.ssl_context()),
            logger=AgentLogger(level=LogLevel.OFF),
        )
        try:
            return str(await asyncio.to_thread(lambda: executor("6 * 7").output))
        finally:
            await asyncio.to_thread(executor.cleanup)

    with warnings.catch_warnings():
        warnings.simplefilter("error", modal.exception.AsyncUsageWarning)
        assert asyncio.run(call_from_thread()) == "42"
