"""The smolagents facade where smolagents' own tests and prompts expect smolagents' behaviour (issue 28).

A real CodeAgent with a scripted model, a real gateway, and smolagents' own
``LocalPythonExecutor`` as the reference for the wording of errors.
"""

from __future__ import annotations

import pytest
from smolagents import CodeAgent
from smolagents.local_python_executor import ExecutionTimeoutError, InterpreterError, LocalPythonExecutor
from smolagents.monitoring import AgentLogger, LogLevel
from smolagents.utils import AgentError

from async_modal_exec import GatewayBackend, create_gateway_executor, create_local_executor
from async_modal_exec.agent import Executor, StepTimeoutError
from async_modal_exec.backends import GatewayEndpoint

from .agent_helpers import QUIET, ScriptedModel, steps


def test_a_value_smolagents_cannot_serialize_comes_back_as_its_repr(agent_executor: Executor) -> None:
    # From smolagents' own tests: a function as the last value or as the final
    # answer failed the step with "SerializationError: Cannot safely serialize
    # object of type function" (the final-answer tool's serializer, in the kernel).
    model = ScriptedModel(
        [
            "def double(x):\n    return 2 * x\ndouble",
            "class Point:\n    pass\nfinal_answer([double, Point()])",
        ]
    )
    agent = CodeAgent(tools=[], model=model, executor=agent_executor, max_steps=4, verbosity_level=0)
    answer = agent.run("return the function")
    defining, final = steps(agent)
    # The last value: IPython's repr of it (the kernel's text/plain).
    assert defining.error is None and str(defining.action_output).startswith("<function __main__.double")
    assert final.error is None and final.is_final_answer
    assert isinstance(answer, str) and answer.startswith("[<function double at 0x"), answer
    assert "<__main__.Point object at 0x" in answer
    # A value the serializer takes still comes back as the object, and the tool
    # stays patched the same way for a second run.
    model.actions = ["final_answer({'n': double(21), 'pair': (1, 2)})"]
    assert agent.run("again") == {"n": 42, "pair": (1, 2)}


def test_timeout_seconds_is_smolagents_name_for_the_step_timeout(gateway: GatewayEndpoint) -> None:
    def backend() -> GatewayBackend:
        return GatewayBackend(gateway.base_url, gateway.token)

    # As smolagents' test_local_executor_disabled_timeout: None means no limit.
    unlimited = Executor(backend(), logger=QUIET, timeout_seconds=None)
    try:
        assert unlimited.core.default_timeout is None
        assert unlimited("import time\ntime.sleep(0.5)\n'completed'").output == "completed"
    finally:
        unlimited.cleanup()
    # The factories pass it on; giving both names with different values is refused.
    for executor in (
        create_local_executor(logger=QUIET, timeout_seconds=None),
        create_gateway_executor(gateway.base_url, gateway.token, logger=QUIET, timeout_seconds=None),
    ):
        assert executor.core.default_timeout is None
        executor.cleanup()
    assert Executor(backend(), logger=QUIET, timeout_seconds=5).core.default_timeout == 5
    with pytest.raises(ValueError, match="not both"):
        Executor(backend(), logger=QUIET, timeout=10, timeout_seconds=5)


def test_timeout_message_is_smolagents_own(gateway: GatewayEndpoint) -> None:
    code = "import time\ntime.sleep(2)"
    local = LocalPythonExecutor(additional_authorized_imports=["time"], timeout_seconds=1)
    local.send_tools({})
    with pytest.raises(ExecutionTimeoutError) as theirs:
        local(code)
    expected = "Code execution exceeded the maximum execution time of 1 seconds"
    assert str(theirs.value) == expected  # the wording is smolagents' own
    executor = Executor(GatewayBackend(gateway.base_url, gateway.token), logger=QUIET, timeout=1)
    try:
        with pytest.raises(StepTimeoutError) as ours:
            executor(code)
        message = str(ours.value)
        assert message.startswith(f"{expected}; the kernel was interrupted (its state is kept)"), message
        assert isinstance(ours.value, ExecutionTimeoutError) and isinstance(ours.value, AgentError)
        assert executor("1 + 1").output == 2
    finally:
        executor.cleanup()


@pytest.mark.parametrize(
    "code",
    [
        "x = 1\nraise ValueError('bad value')",
        "def divide(a, b):\n    return a / b\n\ntotal = 0\nfor n in [1, 2]:\n    total += divide(n, 0)\nprint(total)",
        "text = 'x'\nvalue = int(\n    text\n)",
        "import math\nmath.sqrt(-1)",
        'x = 1\nprint("Missing Parenthesis',
    ],
    ids=["raise", "in-a-function-called-from-a-loop", "statement-over-lines", "in-a-library", "syntax-error"],
)
def test_failing_line_message_is_smolagents_own(agent_executor: Executor, code: str) -> None:
    local = LocalPythonExecutor(additional_authorized_imports=["math"])
    local.send_tools({})
    with pytest.raises(InterpreterError) as theirs:
        local(code)
    with pytest.raises(AgentError) as ours:
        agent_executor(code)
    message = str(ours.value)
    # smolagents' sentence first (the same statement, name and value), then the kernel's traceback.
    assert message.startswith(str(theirs.value) + "\n"), (message, str(theirs.value))
    assert "Cell In[" in message[len(str(theirs.value)) :], message


def test_verbosity_off_prints_nothing(gateway: GatewayEndpoint, capsys: pytest.CaptureFixture[str]) -> None:
    executor = Executor(GatewayBackend(gateway.base_url, gateway.token))  # no logger of its own
    model = ScriptedModel(["print('step output')\nx = 2", "final_answer(x * 21)"])
    agent = CodeAgent(tools=[], model=model, executor=executor, max_steps=4, verbosity_level=LogLevel.OFF)
    try:
        assert agent.run("compute") == 42
        assert executor.logger is agent.logger  # the agent's level rules what the executor logs
    finally:
        executor.cleanup()
    printed = capsys.readouterr().out
    assert printed == "", printed
    # An executor given a logger keeps it, and logs at its level.
    loud = Executor(GatewayBackend(gateway.base_url, gateway.token), logger=AgentLogger(level=LogLevel.INFO))
    try:
        loud.start()
    finally:
        loud.cleanup()
    printed = capsys.readouterr().out
    assert "Initializing executor, hold on..." in printed and "Starting the sandbox..." in printed
