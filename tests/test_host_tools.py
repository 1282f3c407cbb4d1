"""Host tools: sandboxed code calls tools that run on the host, over the kernel's stdin channel."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import PIL.Image
import pytest
from smolagents import CodeAgent, Tool
from smolagents.memory import ActionStep
from smolagents.monitoring import AgentLogger, LogLevel

from async_modal_exec import AsyncExecutor, ExecutionTimeout, GatewayBackend, HostTools
from async_modal_exec.agent import Executor, run_agent
from async_modal_exec.backends import GatewayEndpoint
from async_modal_exec.channel import KernelChannel

from .agent_helpers import ScriptedModel, YamlTool
from .helpers import measure_loop_lag

MakeExecutor = Callable[..., Awaitable[AsyncExecutor]]
QUIET = AgentLogger(level=LogLevel.OFF)
SECRET = "sk-host-only-5f1e0c"


@pytest.fixture
def sent_to_kernel(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every message any executor sends to a kernel, as JSON text."""
    sent: list[str] = []
    original = KernelChannel.send

    async def recording_send(self: KernelChannel, message: dict[str, Any]) -> None:
        sent.append(json.dumps(message))
        await original(self, message)

    monkeypatch.setattr(KernelChannel, "send", recording_send)
    return sent


def lookup(key: str) -> dict[str, Any]:
    """Look a key up in a host-side store (the secret never leaves the host)."""
    return {"key": key, "authorised": SECRET.startswith("sk-"), "tags": ("a", "b")}


async def double_later(x: int) -> int:
    await asyncio.sleep(0.05)
    return x * 2


def fails(x: int) -> int:
    raise ValueError(f"no good: {x}")


def red_square(size: int) -> PIL.Image.Image:
    return PIL.Image.new("RGB", (size, size), "red")


async def test_sync_async_failing_and_image_tools(make_executor: MakeExecutor) -> None:
    executor = await make_executor(host_tools=[lookup, double_later, fails, red_square])
    result = await executor.run("print(lookup('k'))\ndouble_later(21)")
    assert result.error is None
    assert result.stdout == "{'key': 'k', 'authorised': True, 'tags': ('a', 'b')}\n"
    assert result.value is not None and result.value.text == "42"
    result = await executor.run(
        "image = red_square(8)\n(type(image).__module__, image.size, image.getpixel((0, 0)))"
    )
    assert result.value is not None and result.value.text == "('PIL.PngImagePlugin', (8, 8), (255, 0, 0))"
    result = await executor.run("print('before')\nfails(3)")
    assert result.stdout == "before\n"
    assert result.error is not None and result.error.ename == "HostToolError"
    assert result.error.evalue == "host tool 'fails' failed: ValueError: no good: 3"
    # The sandbox can catch it by name.
    result = await executor.run("try:\n    fails(1)\nexcept HostToolError as exc:\n    print('caught', exc)")
    assert result.stdout.startswith("caught host tool 'fails' failed")


async def test_bad_calls_get_clear_errors_never_a_hang(make_executor: MakeExecutor) -> None:
    executor = await make_executor(host_tools=HostTools([lookup, YamlTool()], max_bytes=1000))
    cases = {
        "input('your name? ')": ("RuntimeError", "input() is not available here"),
        "lookup(object())": ("HostToolError", "a object cannot be sent to the host"),
        "lookup('x' * 5000)": ("HostToolError", "over the limit of 1000"),
        "lookup('a', 'b')": ("HostToolError", "TypeError: too many positional arguments"),
        "to_yaml(data=[1, 2])": ("HostToolError", "Argument data has type 'array' but should be 'object'"),
        "to_yaml(nope={})": ("HostToolError", "Argument nope is not in the tool's input schema"),
        "import sys\nsys.modules['async_modal_exec_host_tools'].call('missing', (), {})": (
            "HostToolError",
            "no host tool is registered under this name",
        ),
    }
    for code, (ename, text) in cases.items():
        result = await executor.run(code, timeout=30)
        assert result.error is not None, code
        assert (result.error.ename, text in result.error.evalue) == (ename, True), (code, result.error)
    assert (await executor.run("to_yaml({'a': 1})")).value.text == "'a: 1\\n'"  # type: ignore[union-attr]


async def test_timeouts_and_cancellation_reach_the_host_call(make_executor: MakeExecutor) -> None:
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def wait_forever() -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def slow() -> str:
        await asyncio.sleep(5)
        return "late"

    host = HostTools([wait_forever, slow], call_timeout=0.5)
    executor = await make_executor(host_tools=host)
    executor.host_tools.add({"wait_forever": wait_forever})
    # Per-call timeout: the sandbox gets an error it can handle.
    result = await executor.run("slow()", timeout=30)
    assert result.error is not None and "TimeoutError: no answer within 0.5 s" in result.error.evalue
    # The execution's timeout counts the host call, cancels it, and interrupts the kernel.
    host.call_timeout = 60
    began = time.monotonic()
    with pytest.raises(ExecutionTimeout) as caught:
        await executor.run("kept = 1\nwait_forever()", timeout=1)
    assert time.monotonic() - began < 8
    assert not caught.value.restarted
    assert cancelled.is_set()
    # Cancelling the task awaiting run() does the same.
    started.clear()
    cancelled.clear()
    task = asyncio.create_task(executor.run("wait_forever()"))
    await asyncio.wait_for(started.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cancelled.is_set()
    assert (await executor.run("kept", timeout=30)).value.text == "1"  # type: ignore[union-attr]


async def test_stubs_are_sent_again_after_a_restart(
    make_executor: MakeExecutor, sent_to_kernel: list[str]
) -> None:
    executor = await make_executor(host_tools=[lookup])
    await executor.run("lookup('one')")
    await executor.run("lookup('two')")
    assert sum("make_stub" in message for message in sent_to_kernel) == 1
    await executor.restart()
    # A timeout: a lost input_request would otherwise show as a hang (it once did).
    result = await executor.run("lookup('three')['key']", timeout=30)
    assert result.value is not None and result.value.text == "'three'"
    assert sum("make_stub" in message for message in sent_to_kernel) == 2


async def test_a_hundred_calls_in_one_execution(make_executor: MakeExecutor) -> None:
    executor = await make_executor(host_tools=[double_later, lookup])
    async with measure_loop_lag() as probe:
        result = await executor.run("total = sum(lookup(str(i))['key'] == str(i) for i in range(100))\ntotal")
    assert result.value is not None and result.value.text == "100"
    assert executor.host_tools.calls >= 100
    assert probe.max_callback < 0.02, probe.summary()


# -- with a real CodeAgent ---------------------------------------------------------------


def helper_agent() -> CodeAgent:
    """A managed agent (its own scripted model, runs on the host)."""
    model = ScriptedModel(["final_answer('the helper says hi')"])
    return CodeAgent(
        tools=[],
        model=model,
        name="helper",
        description="Answers sub-questions.",
        max_steps=2,
        verbosity_level=0,
    )


class SignTool(Tool):
    """Signs text with an API key held on the host (a constructor argument: cannot be shipped)."""

    name = "sign"
    description = "Sign a text with the service key."
    inputs = {"text": {"type": "string", "description": "text to sign"}}
    output_type = "string"

    def __init__(self, api_key: str) -> None:
        super().__init__()
        self.api_key = api_key

    def forward(self, text: str) -> str:
        return hmac.new(self.api_key.encode(), text.encode(), hashlib.sha256).hexdigest()


def secret_tool() -> SignTool:
    return SignTool(SECRET)


EXPECTED_SIGNATURE = hmac.new(SECRET.encode(), b"hello", hashlib.sha256).hexdigest()


STEPS = [
    "report = helper(task='what is up?')\nprint(report)",
    "print(search_docs(query='kernels'))\nprint(sign(text='hello'))",
    "final_answer({'report': report[-18:], 'docs': search_docs(query='gateways')})",
]


def check_agent_run(agent: CodeAgent, answer: Any, executor: Executor, sent: list[str]) -> None:
    assert answer == {"report": "the helper says hi", "docs": "2 documents about gateways"}
    helper_model = agent.managed_agents["helper"].model
    assert any("what is up?" in seen for seen in helper_model.seen)  # the task reached it
    first, second, _ = (step for step in agent.memory.steps if isinstance(step, ActionStep))
    assert "Here is the final answer from your managed agent 'helper'" in first.observations
    assert "2 documents about kernels" in second.observations
    assert EXPECTED_SIGNATURE in second.observations
    assert set(executor.host_tool_reasons) == {"helper", "search_docs", "sign"}
    assert "managed agent" in executor.host_tool_reasons["helper"]
    assert "MCP" in executor.host_tool_reasons["search_docs"]
    # No tool source and no host secret went to the kernel.
    text = "\n".join(sent)
    assert SECRET not in text
    assert "class SignTool" not in text and "hmac" not in text and "MCPAdaptTool" not in text


@pytest.fixture
def search_docs() -> Iterator[Tool]:
    """A real MCP tool: smolagents' ToolCollection.from_mcp on a small stdio MCP server."""
    from mcp import StdioServerParameters
    from smolagents import ToolCollection

    server = StdioServerParameters(
        command=sys.executable, args=[str(Path(__file__).with_name("mcp_docs_server.py"))]
    )
    with ToolCollection.from_mcp(server, trust_remote_code=True, structured_output=False) as collection:
        (tool,) = collection.tools
        yield tool


@pytest.fixture
def host_agent_executor(gateway: GatewayEndpoint) -> Iterator[Executor]:
    executor = Executor(GatewayBackend(gateway.base_url, gateway.token), logger=QUIET, timeout=60)
    yield executor
    executor.cleanup()


def test_managed_agent_and_mcp_tool_on_the_local_gateway(
    host_agent_executor: Executor, sent_to_kernel: list[str], search_docs: Tool
) -> None:
    agent = CodeAgent(
        tools=[search_docs, secret_tool()],
        managed_agents=[helper_agent()],
        model=ScriptedModel(STEPS),
        executor=host_agent_executor,
        max_steps=5,
        verbosity_level=0,
    )
    answer = agent.run("Ask the helper, then search.")
    check_agent_run(agent, answer, host_agent_executor, sent_to_kernel)


@pytest.mark.usefixtures("modal_sandboxes_checked")
async def test_managed_agent_and_mcp_tool_on_modal(
    modal_double: Any, sent_to_kernel: list[str], search_docs: Tool
) -> None:
    from async_modal_exec import ModalBackend

    executor = Executor(
        ModalBackend(app_name="host-tools", ssl_context=modal_double.ssl_context()), logger=QUIET
    )
    agent = CodeAgent(
        tools=[search_docs, secret_tool(), YamlTool()],
        managed_agents=[helper_agent()],
        model=ScriptedModel(STEPS),
        executor=executor,
        max_steps=5,
        verbosity_level=0,
    )
    try:
        async with measure_loop_lag() as probe:
            answer = await run_agent(agent, "Ask the helper, then search.")
        check_agent_run(agent, answer, executor, sent_to_kernel)
        assert probe.max_callback < 0.05, probe.summary()
    finally:
        await executor.aclose()


def test_host_fallback_off_keeps_clear_stubs(host_agent_executor: Executor) -> None:
    host_agent_executor.host_fallback = False
    model = ScriptedModel(["print(sign(text='x'))", "final_answer('done')"])
    agent = CodeAgent(
        tools=[secret_tool()], model=model, executor=host_agent_executor, max_steps=4, verbosity_level=0
    )
    assert agent.run("use the tool") == "done"
    failing = next(step for step in agent.memory.steps if isinstance(step, ActionStep))
    assert "tool 'sign' could not be sent to the sandbox" in str(failing.error)
    assert host_agent_executor.host_tool_reasons == {}


def test_forced_host_tool_and_a_hundred_calls_in_one_agent_step(
    gateway: GatewayEndpoint, sent_to_kernel: list[str]
) -> None:
    executor = Executor(
        GatewayBackend(gateway.base_url, gateway.token), logger=QUIET, timeout=60, host_tools=["to_yaml"]
    )
    model = ScriptedModel(
        [
            "signatures = [sign(text=str(i)) for i in range(100)]\nprint(len(set(signatures)))",
            "final_answer(to_yaml({'n': len(signatures)}))",
        ]
    )
    agent = CodeAgent(
        tools=[YamlTool(), secret_tool()], model=model, executor=executor, max_steps=4, verbosity_level=0
    )
    try:
        assert agent.run("sign a hundred texts") == "n: 100\n"
        first = next(step for step in agent.memory.steps if isinstance(step, ActionStep))
        assert first.observations is not None and "100" in first.observations
        assert executor.host_tool_reasons["to_yaml"] == "listed in host_tools"
        assert executor.core.host_tools.calls == 101
        assert not any("safe_dump" in message for message in sent_to_kernel)  # its source stayed here
    finally:
        executor.cleanup()
