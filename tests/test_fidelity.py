"""smolagents fidelity: the facade behaves like smolagents' own local executor.

Each case of "Why" in the fidelity issue has a test here that failed before
the change; the corpus at the end runs agent-style snippets through
smolagents' ``LocalPythonExecutor`` and through ours side by side.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import PIL.Image
import pytest
from smolagents import CodeAgent, Tool
from smolagents.default_tools import FinalAnswerTool
from smolagents.local_python_executor import ExecutionTimeoutError, LocalPythonExecutor
from smolagents.utils import AgentError

from async_modal_exec import AsyncExecutor, GatewayBackend
from async_modal_exec.agent import Executor, StepTimeoutError
from async_modal_exec.backends import GatewayEndpoint

from .agent_helpers import QUIET, ScriptedModel, steps

DOCS = Path(__file__).resolve().parent.parent / "docs" / "smolagents.md"


# -- stderr reaches the model, in order ------------------------------------------------


def test_stdout_and_stderr_reach_the_logs_in_the_order_they_were_written(agent_executor: Executor) -> None:
    code = (
        "import sys, warnings, logging\n"
        "print('one')\n"
        "print('two', file=sys.stderr)\n"
        "print('three')\n"
        "warnings.warn('careful')\n"
        "logging.warning('logged')\n"
        "print('four')"
    )
    logs = agent_executor(code).logs
    assert [line for line in ("one", "two", "three", "careful", "logged", "four") if line in logs] == [
        "one",
        "two",
        "three",
        "careful",
        "logged",
        "four",
    ], logs
    positions = [logs.index(word) for word in ("one", "two", "three", "careful", "logged", "four")]
    assert positions == sorted(positions), logs


async def test_the_async_result_keeps_the_order_of_stdout_and_stderr(gateway: GatewayEndpoint) -> None:
    code = "import sys\nfor i in range(3):\n    print('out', i)\n    print('err', i, file=sys.stderr)"
    async with AsyncExecutor(GatewayBackend(gateway.base_url, gateway.token)) as executor:
        result = await executor.run(code)
    assert result.logs == "out 0\nerr 0\nout 1\nerr 1\nout 2\nerr 2\n"
    assert (result.stdout, result.stderr) == ("out 0\nout 1\nout 2\n", "err 0\nerr 1\nerr 2\n")
    assert result.stream_order == (("stdout", 6), ("stderr", 6)) * 3


def test_a_failed_steps_output_with_stderr_is_where_code_agent_reads_it(agent_executor: Executor) -> None:
    model = ScriptedModel(
        # Built at run time, so the traceback's source lines do not hold the text.
        [
            "import sys\nprint('to', 'stdout')\nprint('to', 'stderr', file=sys.stderr)\n1 / 0",
            "final_answer('ok')",
        ]
    )
    agent = CodeAgent(tools=[], model=model, executor=agent_executor, max_steps=3, verbosity_level=0)
    assert agent.run("divide") == "ok"
    failing = steps(agent)[0]
    assert failing.error is not None and "ZeroDivisionError" in str(failing.error)
    assert failing.observations is not None
    assert failing.observations.index("to stdout") < failing.observations.index("to stderr")
    assert "to stderr" in model.histories[1]  # the model saw it
    assert "to stdout" not in str(failing.error), "printed once, not twice"


# -- images come back lossless ---------------------------------------------------------


def _one_red_pixel() -> tuple[bytes, bytes]:
    image = PIL.Image.new("RGB", (8, 8), (0, 0, 0))
    image.putpixel((3, 3), (255, 0, 0))
    png, jpeg = io.BytesIO(), io.BytesIO()
    image.save(png, format="PNG")
    image.save(jpeg, format="JPEG")
    return png.getvalue(), jpeg.getvalue()


def test_a_value_offered_as_png_and_jpeg_comes_back_as_the_png(agent_executor: Executor) -> None:
    png, jpeg = _one_red_pixel()
    code = (
        "class Picture:\n"
        f"    def _repr_png_(self): return {png!r}\n"
        f"    def _repr_jpeg_(self): return {jpeg!r}\n"
        "Picture()"
    )
    output = agent_executor(code).output
    assert isinstance(output, PIL.Image.Image)
    assert output.convert("RGB").getpixel((3, 3)) == (255, 0, 0)
    shown = agent_executor(
        code.replace("Picture()", "from IPython.display import display\ndisplay(Picture())")
    )
    assert isinstance(shown.output, PIL.Image.Image)
    assert shown.output.convert("RGB").getpixel((3, 3)) == (255, 0, 0)


# -- a tool's constructor state is never lost ------------------------------------------


class DefaultKeyedTool(Tool):
    """Passes smolagents' validation (its argument has a default) but holds state."""

    name = "keyed"
    description = "Uses a key given at construction."
    inputs = {"x": {"type": "string", "description": "input"}}
    output_type = "string"

    def __init__(self, key: str = "secret-key") -> None:
        super().__init__()
        self.key = key

    def forward(self, x: str) -> str:
        return f"{x}:{self.key}"


class PlainTool(Tool):
    """Its constructor sets state, the same in every fresh instance."""

    name = "plain"
    description = "Uses what its constructor made."
    inputs = {"x": {"type": "string", "description": "input"}}
    output_type = "string"

    def __init__(self, prefix: str = "v") -> None:
        super().__init__()
        self.prefix = prefix
        self.cache: dict[str, str] = {}
        self.marker = object()

    def forward(self, x: str) -> str:
        return f"{x}:<{type(self.marker).__name__}>"


def test_a_tool_whose_state_differs_from_a_fresh_instance_runs_on_the_host(agent_executor: Executor) -> None:
    late = DefaultKeyedTool()
    late.name = "late"
    late.extra = "set after construction"  # type: ignore[attr-defined]
    agent_executor.send_tools({"keyed": DefaultKeyedTool("k1"), "late": late, "plain": PlainTool()})
    assert agent_executor("keyed('v')").output == "v:k1"
    assert "'key'" in agent_executor.host_tool_reasons["keyed"]
    assert "k1" not in agent_executor.host_tool_reasons["keyed"], "values are never reported"
    assert "'extra'" in agent_executor.host_tool_reasons["late"]
    # State equal to a fresh instance's (an object without equality of its own counts by class).
    assert "plain" not in agent_executor.host_tool_reasons
    assert agent_executor("plain('v')").output == "v:<object>"
    assert agent_executor("type(plain).__module__").output == "__main__", "rebuilt in the kernel"


# -- any number of runs of one agent ---------------------------------------------------


def test_a_second_run_of_the_same_agent_still_gets_its_final_answer(agent_executor: Executor) -> None:
    model = ScriptedModel(["final_answer(1 + 1)", "final_answer('again')", "final_answer([3])"])
    agent = CodeAgent(tools=[], model=model, executor=agent_executor, max_steps=2, verbosity_level=0)
    assert agent.run("first") == 2
    assert agent.run("second") == "again"
    assert agent.run("third") == [3]


# -- values come back as objects -------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("1", 1),
        ("True", True),
        ("2.5", 2.5),
        ("'text'", "text"),
        ("[1, 'a', (2, 3)]", [1, "a", (2, 3)]),
        ("{'a': {1, 2}, 'b': None}", {"a": {1, 2}, "b": None}),
        ("{(1, 2): 'pair'}", {(1, 2): "pair"}),
        ("1 + 2j", 1 + 2j),
        ("b'raw'", b"raw"),
        ("None", None),
    ],
)
def test_plain_values_come_back_as_the_objects(agent_executor: Executor, code: str, expected: Any) -> None:
    output = agent_executor(code).output
    assert output == expected and type(output) is type(expected)


def test_other_values_come_back_as_their_repr_and_pickle_only_when_allowed(gateway: GatewayEndpoint) -> None:
    code = "import datetime\ndatetime.date(2020, 1, 2)"
    for allow_pickle, expected in (
        (False, "datetime.date(2020, 1, 2)"),
        (True, __import__("datetime").date(2020, 1, 2)),
    ):
        executor = Executor(
            GatewayBackend(gateway.base_url, gateway.token), logger=QUIET, allow_pickle=allow_pickle
        )
        try:
            assert executor(code).output == expected
            # A class only the kernel knows cannot be rebuilt here: its repr, never an error.
            assert (
                executor("class Local:\n    def __repr__(self): return 'Local!'\nLocal()").output == "Local!"
            )
            # A subclass of a plain type keeps its identity as a repr, not its base's value.
            assert executor("import enum\nclass E(enum.IntEnum):\n    A = 1\nE.A").output == "<E.A: 1>"
        finally:
            executor.cleanup()


# -- the smaller ones ------------------------------------------------------------------


def test_a_timed_out_step_raises_smolagents_timeout_error(gateway: GatewayEndpoint) -> None:
    executor = Executor(GatewayBackend(gateway.base_url, gateway.token), logger=QUIET, timeout=1)
    try:
        with pytest.raises(ExecutionTimeoutError) as caught:
            executor("print('working', flush=True)\nwhile True: pass")
        assert isinstance(caught.value, AgentError) and isinstance(caught.value, StepTimeoutError)
        assert "working" in executor.state["_print_outputs"]
        assert executor("1 + 1").output == 2
    finally:
        executor.cleanup()


def test_send_tools_with_no_tools_defines_the_standard_imports(agent_executor: Executor) -> None:
    agent_executor.send_tools({})
    assert agent_executor("math.sqrt(16) + len(re.findall('a', 'banana'))").output == 7.0


def test_the_agents_print_output_cap_is_honoured(agent_executor: Executor) -> None:
    model = ScriptedModel(["print('x' * 5000)", "final_answer('done')"])
    agent = CodeAgent(
        tools=[],
        model=model,
        executor=agent_executor,
        max_steps=3,
        verbosity_level=0,
        max_print_outputs_length=1000,
    )
    assert agent.run("print a lot") == "done"
    observations = steps(agent)[0].observations
    assert observations is not None and "truncated" in observations
    assert len(observations) < 1500, len(observations)


# -- side by side with LocalPythonExecutor ---------------------------------------------


@dataclass(frozen=True)
class Case:
    """One snippet; ``differs`` names a documented difference (in docs/smolagents.md)."""

    id: str
    code: str
    differs: str | None = None


CORPUS = [
    Case("arithmetic", "x = 2\nx * 21"),
    Case("float", "3 / 2"),
    Case("string", "'-'.join(['a', 'b'])"),
    Case("bool", "1 < 2"),
    Case("assignment-last", "y = 5", differs="assignment-value"),
    Case("list", "[i * i for i in range(5)]"),
    Case("dict", "{'k': [1, 2], 'n': None}"),
    Case("tuple", "(1, 'two')"),
    Case("set", "{3, 1, 2}"),
    Case("nested", "{'a': [{'b': (1, 2)}]}"),
    Case("print", "print('hello', 42)\n'after'"),
    Case("print-sep", "print('a', 'b', sep='-', end='!\\n')", differs="print-keywords"),
    Case("multi-print", "for i in range(3):\n    print(i)"),
    Case("state", "counter = 10", differs="assignment-value"),
    Case("state-used", "counter + 1"),
    Case("function", "def double(v):\n    return v * 2\ndouble(21)"),
    Case("import-math", "import math\nmath.floor(2.7)"),
    Case("f-string", "name = 'world'\nf'hello {name}'"),
    Case("final-answer", "final_answer('the answer')"),
    Case("final-answer-dict", "final_answer({'total': 6, 'items': [1, 2, 3]})"),
    Case("error-name", "undefined_name", differs="interpreter-errors"),
    Case("error-zero", "print('before')\n1 / 0"),
    Case("error-raise", "raise ValueError('bad value')"),
    Case("stderr", "import sys\nprint('out')\nprint('err', file=sys.stderr)"),
    Case("print-last", "print('shown')"),
    Case(
        "object-repr", "class P:\n    def __repr__(self):\n        return 'P()'\nP()", differs="object-value"
    ),
    Case("numpy-scalar", "import numpy\nnumpy.float64(1.5)", differs="object-value"),
]


def _local(executor: LocalPythonExecutor, code: str) -> tuple[str, Any, str, bool]:
    try:
        result = executor(code)
    except Exception as exc:
        return "error", _error_name(str(exc)), str(executor.state.get("_print_outputs", "")), False
    return "ok", result.output, str(result.logs), bool(result.is_final_answer)


def _ours(executor: Executor, code: str) -> tuple[str, Any, str, bool]:
    try:
        result = executor(code)
    except AgentError as exc:
        return "error", _error_name(str(exc)), executor.state["_print_outputs"], False
    return "ok", result.output, result.logs, bool(result.is_final_answer)


def _error_name(message: str) -> str | None:
    found = re.search(r"\b(\w+(?:Error|Exception))\b", message)
    return found.group(1) if found else None


def test_the_corpus_matches_the_local_executor_but_for_documented_differences(
    gateway: GatewayEndpoint,
) -> None:
    local = LocalPythonExecutor(additional_authorized_imports=["math", "sys", "numpy"])
    local.send_tools({"final_answer": FinalAnswerTool()})
    ours = Executor(GatewayBackend(gateway.base_url, gateway.token), logger=QUIET, timeout=60)
    try:
        ours.send_tools({"final_answer": FinalAnswerTool()})
        mismatched: dict[str, tuple[Any, Any]] = {}
        for case in CORPUS:
            theirs, mine = _local(local, case.code), _ours(ours, case.code)
            if case.differs is None and theirs != mine:
                mismatched[case.id] = (theirs, mine)
            if case.differs is not None:
                assert theirs != mine, f"{case.id} no longer differs: drop its entry"
        assert mismatched == {}
    finally:
        ours.cleanup()
    documented = DOCS.read_text()
    for difference in {case.differs for case in CORPUS if case.differs}:
        assert f"`{difference}`" in documented, f"docs/smolagents.md does not explain {difference!r}"
