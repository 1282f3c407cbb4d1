"""The smolagents facade with a real CodeAgent, a scripted model and a real gateway."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import signal
import subprocess
import sys
import textwrap
import threading
import time
import zipfile
from pathlib import Path

import PIL.Image
import pytest
from anyio.from_thread import BlockingPortal
from smolagents import CodeAgent, Tool
from smolagents.utils import AgentError

from async_modal_exec import GatewayBackend, LocalBackend
from async_modal_exec.agent import Executor, run_agent
from async_modal_exec.agent.requirements import guard_imports, optional_imports, requirements_of_tool
from async_modal_exec.backends import GatewayEndpoint
from async_modal_exec.errors import ExecutorStateError

from .agent_helpers import QUIET, KeyedTool, ScriptedModel, YamlTool, steps
from .helpers import measure_loop_lag, wait_gone


def test_code_agent_multi_step_task(agent_executor: Executor) -> None:
    model = ScriptedModel(
        [
            "print('numbers are', numbers)\ntotal = sum(numbers)\nprint(to_yaml({'total': total}))",
            "print('about to fail')\nprint(undefined_name)",
            "import matplotlib.pyplot as plt\nplt.plot(numbers)\nplt.show()",
            "final_answer({'total': total, 'count': len(numbers)})",
        ]
    )
    agent = CodeAgent(
        tools=[YamlTool()], model=model, executor=agent_executor, max_steps=6, verbosity_level=0
    )
    answer = agent.run("Sum the numbers.", additional_args={"numbers": [1, 2, 3]})
    assert answer == {"total": 6, "count": 3}
    first, failing, plotting, final = steps(agent)
    # Variables sent with send_variables and a custom tool with a third-party import.
    assert "numbers are [1, 2, 3]" in first.observations
    assert "total: 6" in first.observations
    # The failing step: its printed output is its observation (as with smolagents'
    # local executor), the error follows, and the agent saw both.
    assert failing.error is not None
    message = str(failing.error)
    assert "NameError" in message and "undefined_name" in message
    assert failing.observations is not None and "about to fail" in failing.observations
    assert "about to fail" in model.histories[2] and "NameError" in model.seen[2]
    # The step that plotted returns the figure as a PIL image.
    assert isinstance(plotting.action_output, PIL.Image.Image)
    assert final.is_final_answer


def test_tools_that_cannot_be_shipped_do_not_crash_the_agent(agent_executor: Executor) -> None:
    from smolagents import tool

    def make_closure_tool():  # type: ignore[no-untyped-def]
        suffix = "!"

        @tool
        def shout(text: str) -> str:
            """Shout a text.

            Args:
                text: what to shout
            """
            return text.upper() + suffix

        return shout

    model = ScriptedModel(["print(keyed('x'))", "print(shout('hi'))", "final_answer('done')"])
    agent = CodeAgent(
        tools=[KeyedTool("secret-key"), make_closure_tool()],
        model=model,
        executor=agent_executor,
        max_steps=5,
        verbosity_level=0,
    )
    assert agent.run("use the tools") == "done"
    # Neither can be sent as source; by default both run on the host instead.
    assert set(agent_executor.host_tool_reasons) == {"keyed", "shout"}
    assert "__init__" in agent_executor.host_tool_reasons["keyed"]
    assert agent_executor.unshippable_tools == {}
    keyed_step, shout_step, _ = steps(agent)
    assert keyed_step.error is None and "x:secret-key" in keyed_step.observations
    assert shout_step.error is None and "HI!" in shout_step.observations


def test_packages_already_present_are_never_reinstalled(gateway: GatewayEndpoint) -> None:
    executor = Executor(
        GatewayBackend(gateway.base_url, gateway.token),
        logger=QUIET,
        additional_imports=["json", "PIL", "yaml"],
    )
    try:
        executor.start()
        assert executor.installer.installed == []
        assert executor.installed_packages == []
        assert {"pillow", "pyyaml", "json"} <= set(executor.installer.already_present)
        executor.send_tools({"to_yaml": YamlTool()})
        assert executor.installer.installed == []
        # Asking again probes nothing: the answer is remembered.
        assert executor.install_packages(["PIL"]) == []
    finally:
        executor.cleanup()


class GuardedImportTool(Tool):
    """Uses a package when it is there, and does without it otherwise."""

    name = "guarded"
    description = "Says whether an optional package is there."
    inputs = {"x": {"type": "string", "description": "anything"}}
    output_type = "string"

    def forward(self, x: str) -> str:
        try:
            import ame_optional_absent_pkg  # type: ignore[import-not-found]  # noqa: F401

            return "with"
        except ImportError:
            return "without"


def test_imports_the_code_guards_are_not_installed(agent_executor: Executor) -> None:
    # smolagents' own patched final_answer guards PIL and numpy with
    # try/except ImportError; a fresh [local,smolagents] venv has no numpy, and
    # every agent's first step pip-installed it (offline: the run failed).
    model = ScriptedModel(["result = guarded('x')\nprint(result)", "final_answer(result)"])
    agent = CodeAgent(tools=[GuardedImportTool()], model=model, executor=agent_executor, verbosity_level=0)
    assert agent.run("check") == "without"
    assert agent_executor.installer.installed == []
    final_answer = agent.tools["final_answer"]
    assert type(final_answer).__name__ == "_FinalAnswerTool"  # smolagents' patch, as sent
    assert {"PIL", "numpy"} <= set(final_answer.to_dict()["requirements"])  # what smolagents would install
    assert requirements_of_tool(final_answer)[:2] == ([], "to_dict")
    source = (
        "import hoisted\n"
        "def f():\n    try:\n        import a.b, c, hoisted\n    except (ValueError, ModuleNotFoundError):\n"
        "        import d\n    try:\n        import e\n    except KeyError:\n        pass\n"
        "    import c\n    from .f import g\n"
    )
    assert optional_imports(source) == {"a", "hoisted"}
    assert guard_imports(source, {"hoisted"}).startswith("try:\n    import hoisted\nexcept ImportError:\n")


def _dummy_wheel(directory: Path) -> Path:
    """A minimal pure-Python wheel, so installing needs no network."""
    name, version = "ame_dummy_pkg", "0.1.0"
    files = {
        f"{name}/__init__.py": b"VALUE = 42\n",
        f"{name}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{name}-{version}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = [
        f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},{len(data)}"
        for path, data in files.items()
    ]
    record.append(f"{name}-{version}.dist-info/RECORD,,")
    files[f"{name}-{version}.dist-info/RECORD"] = "\n".join(record).encode()
    wheel = directory / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, data in files.items():
            archive.writestr(path, data)
    return wheel


def test_missing_packages_are_installed_once(gateway: GatewayEndpoint, tmp_path: Path) -> None:
    wheel = _dummy_wheel(tmp_path)
    spec = f"ame_dummy_pkg @ {wheel.as_uri()}"
    executor = Executor(GatewayBackend(gateway.base_url, gateway.token), logger=QUIET, install_timeout=120)
    try:
        assert executor.install_packages([spec]) == [spec]
        assert executor("import ame_dummy_pkg\name_dummy_pkg.VALUE").output == 42
        assert executor.install_packages([spec]) == []
    finally:
        executor(
            "import subprocess, sys\nsubprocess.run([sys.executable, '-m', 'pip', 'uninstall', '-y', '-q', 'ame_dummy_pkg'])"
        )
        executor.cleanup()


def test_jailed_local_kernels_get_packages_in_their_own_directory(tmp_path: Path) -> None:
    import importlib.util

    from async_modal_exec import create_local_executor

    wheel = _dummy_wheel(tmp_path)
    spec = f"ame_dummy_pkg @ {wheel.as_uri()}"
    executor = create_local_executor(logger=QUIET, install_timeout=120)  # jailed: no network in the kernel
    try:
        assert executor.install_packages([spec]) == [spec]
        backend = executor.core.backend
        assert isinstance(backend, LocalBackend) and backend.isolated
        where = executor("import ame_dummy_pkg\name_dummy_pkg.__file__").output
        assert str(where).startswith(str(backend.packages_dir)), where
        assert importlib.util.find_spec("ame_dummy_pkg") is None, "installed into the host's environment"
        assert executor.install_packages([spec]) == []
    finally:
        executor.cleanup()


def test_failed_install_names_the_package(agent_executor: Executor, tmp_path: Path) -> None:
    from async_modal_exec.errors import PackageInstallError

    missing = tmp_path / "no_such_pkg-1.0-py3-none-any.whl"
    with pytest.raises(PackageInstallError) as caught:
        agent_executor.install_packages([f"no_such_pkg @ {missing.as_uri()}"])
    assert "no_such_pkg" in str(caught.value)


def test_agent_grade_defaults_like_smolagents_own_executor(gateway: GatewayEndpoint) -> None:
    from smolagents.local_python_executor import DEFAULT_MAX_LEN_OUTPUT

    from async_modal_exec import ModalBackend, create_local_executor, create_modal_executor
    from async_modal_exec.cli import _build_parser

    executor = Executor(GatewayBackend(gateway.base_url, gateway.token), logger=QUIET)
    try:
        assert executor.core.default_timeout == 30  # smolagents stops a step after 30 s
        output = executor("print('x' * 2_000_052)\n'done'")
        assert output.output == "done"
        assert len(output.logs) <= DEFAULT_MAX_LEN_OUTPUT + 200, len(output.logs)
        assert "truncated to stay below 50000 characters" in output.logs
        with pytest.raises(AgentError) as caught:
            executor("print('y' * 2_000_052)\nraise ValueError('late')")
        assert len(str(caught.value)) <= DEFAULT_MAX_LEN_OUTPUT + 200 and "ValueError" in str(caught.value)
    finally:
        executor.cleanup()
    # One Modal app name everywhere, so `reap` finds what the factory made; the
    # factories take the same defaults.
    modal_executor = create_modal_executor()
    local_executor = create_local_executor()
    try:
        backend = modal_executor.core.backend
        assert isinstance(backend, ModalBackend)
        parser = _build_parser()
        names = {
            backend.app_name,
            ModalBackend().app_name,
            parser.parse_args(["run", "-c", "1"]).app,
            parser.parse_args(["reap"]).app,
        }
        assert names == {"smolagent-executor"}
        assert modal_executor.core.default_timeout == local_executor.core.default_timeout == 30
    finally:
        modal_executor.cleanup()
        local_executor.cleanup()


def test_timeout_and_dead_kernel_become_agent_errors(gateway: GatewayEndpoint) -> None:
    executor = Executor(GatewayBackend(gateway.base_url, gateway.token), logger=QUIET, timeout=1)
    try:
        with pytest.raises(AgentError, match="exceeded the maximum execution time of 1 seconds") as caught:
            executor("print('working', flush=True)\nwhile True: pass")
        assert "interrupted" in str(caught.value) and "working" in executor.state["_print_outputs"]
        assert executor("1 + 1").output == 2
    finally:
        executor.cleanup()


def test_ctrl_c_interrupts_the_kernel_and_keeps_the_executor_usable(agent_executor: Executor) -> None:
    agent_executor("kept = 'still here'")
    main = threading.main_thread().ident
    assert main == threading.get_ident()
    timer = threading.Timer(0.5, signal.pthread_kill, args=(main, signal.SIGINT))
    timer.start()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        agent_executor("import time\ntime.sleep(30)")
    assert time.monotonic() - started < 10
    started = time.monotonic()
    assert agent_executor("kept").output == "still here"
    assert time.monotonic() - started < 2


async def test_constructor_does_not_block_and_loop_thread_calls_fail_clearly(
    gateway: GatewayEndpoint,
) -> None:
    started = time.perf_counter()
    executor = Executor(GatewayBackend(gateway.base_url, gateway.token), logger=QUIET)
    assert time.perf_counter() - started < 0.05
    assert executor.bridge.loop is None and not executor.bridge.owns_portal  # nothing started yet
    async with BlockingPortal() as portal:
        bound = Executor(GatewayBackend(gateway.base_url, gateway.token), logger=QUIET, portal=portal)
        with pytest.raises(ExecutorStateError, match="event loop"):
            bound("1")
    executor.cleanup()


async def test_run_agent_keeps_the_loop_free(gateway: GatewayEndpoint) -> None:
    executor = Executor(GatewayBackend(gateway.base_url, gateway.token), logger=QUIET)
    model = ScriptedModel(["import time\ntime.sleep(0.3)\nx = 21", "final_answer(x * 2)"])
    agent = CodeAgent(tools=[], model=model, executor=executor, max_steps=4, verbosity_level=0)
    try:
        async with measure_loop_lag() as probe:
            answer = await run_agent(agent, "compute")
        assert answer == 42
        # The sandbox lives on this loop: it was started through run_agent's portal.
        assert executor.bridge.loop is asyncio.get_running_loop()
        # A full GC in the agent's thread can hold the GIL for tens of ms: the
        # bound is on what the loop itself runs.
        assert probe.max_callback < 0.05, probe.summary()
    finally:
        await executor.aclose()


def test_process_exit_without_cleanup_stops_everything() -> None:
    script = textwrap.dedent(
        """
        from smolagents.monitoring import AgentLogger, LogLevel
        from async_modal_exec import create_local_executor
        from async_modal_exec.backends.local import _process_tree
        executor = create_local_executor(logger=AgentLogger(level=LogLevel.OFF))
        executor("import os\\nos.getpid()")
        gateway = executor.core.backend.pid
        print(gateway, *(pid for pid, _ in _process_tree(gateway)), flush=True)
        # no cleanup(): the interpreter exits with the portal thread still running
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    pids = [int(x) for x in done.stdout.split()]
    assert len(pids) > 1, "the gateway and its kernel"
    assert asyncio.run(wait_gone(pids, timeout=10)) == []


async def test_a_sync_call_inside_a_running_loop_warns(agent_executor: Executor) -> None:
    # The sandbox lives on the facade's own loop thread; calling the facade from
    # this (running) loop blocks it for as long as the sandbox takes.
    import warnings

    from async_modal_exec.errors import BlockingCallWarning

    # From a worker thread no loop runs there: nothing to warn about.
    assert await asyncio.to_thread(lambda: agent_executor("1 + 1").output) == 2
    with pytest.warns(BlockingCallWarning, match=r"await run_agent\(agent, task\)") as caught:
        assert agent_executor("2 + 2").output == 4
    assert len(caught) == 1 and caught[0].filename == __file__  # points at the call above
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert await asyncio.to_thread(lambda: agent_executor("3 + 3").output) == 6
        await asyncio.to_thread(agent_executor.cleanup)
