"""Optional stacks: a venv with only the `modal` extra runs Modal executors, and says what else is missing.

The venv is real (``python -m venv`` and ``pip install -e '.[modal]'`` from the
registry); the Modal control plane is the double, whose sandboxes run with
this suite's interpreter (it stands for the sandbox image, which has Jupyter).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from async_modal_exec._extras import require
from async_modal_exec.errors import MissingExtra

from .modal_double import ModalDouble

ROOT = Path(__file__).parents[1]

CLIENT = textwrap.dedent(
    """
    import asyncio, importlib.util, ssl, sys
    for absent in ("kernel_gateway", "ipykernel", "jupyter_server", "smolagents", "fastapi"):
        assert importlib.util.find_spec(absent) is None, absent + " is installed"
    import logging, time
    from async_modal_exec import AsyncExecutor, LocalBackend, ModalBackend, SandboxPool
    from async_modal_exec.errors import MissingExtra

    class Kept(logging.Handler):
        def __init__(self):
            super().__init__()
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    async def main():
        context = ssl.create_default_context(cafile=sys.argv[1])
        async with AsyncExecutor(ModalBackend(ssl_context=context)) as executor:
            print("VALUE", (await executor.run("6 * 7")).value.text)
        try:
            await LocalBackend().start()
        except MissingExtra as exc:
            print("LOCAL", exc)
        try:
            import async_modal_exec.agent
        except MissingExtra as exc:
            print("AGENT", exc)
        try:
            AsyncExecutor(host_tools=[len])
        except MissingExtra as exc:
            print("HOST", exc)
        # A pool of a backend that can never start says so at once, once.
        kept = Kept()
        logging.getLogger("async_modal_exec.pool").addHandler(kept)
        began = time.monotonic()
        async with SandboxPool(LocalBackend, min_idle=2, max_size=2, acquire_timeout=60) as pool:
            try:
                async with pool.session():
                    pass
            except MissingExtra as exc:
                print("POOL", f"{time.monotonic() - began:.1f}", exc)
            await asyncio.sleep(3)  # would hold several retries
            try:
                async with pool.session():
                    pass
            except MissingExtra as exc:
                print("AGAIN", exc)
        print("POOLLOGS", sum("starting a sandbox failed" in m for m in kept.messages))

    asyncio.run(main())
    """
)


@pytest.fixture(scope="module")
def modal_only_python(tmp_path_factory: pytest.TempPathFactory) -> str:
    venv = tmp_path_factory.mktemp("modal-only") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    done = subprocess.run(
        [python, "-m", "pip", "install", "-q", "--disable-pip-version-check", "-e", f"{ROOT}[modal]"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return python


@pytest.mark.slow
@pytest.mark.usefixtures("modal_sandboxes_checked")
async def test_a_modal_only_install_runs_modal_executors_without_jupyter(
    modal_double: ModalDouble, modal_only_python: str
) -> None:
    process = await asyncio.create_subprocess_exec(
        modal_only_python,
        "-c",
        CLIENT,
        str(modal_double.cert),
        env=dict(os.environ),  # the double's MODAL_SERVER_URL and credentials
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 180)
    assert process.returncode == 0, err.decode()[-3000:]
    lines = dict(line.split(" ", 1) for line in out.decode().splitlines() if " " in line)
    assert lines["VALUE"] == "42"
    assert "pip install 'async_modal_exec[local]'" in lines["LOCAL"]
    assert "pip install 'async_modal_exec[smolagents]'" in lines["AGENT"]
    # The core's host tools used to fail with a bare ModuleNotFoundError here.
    assert lines["HOST"].startswith("host tools needs smolagents") and "[smolagents]" in lines["HOST"]
    # It waited its whole acquire_timeout (60 s), said PoolExhausted, and logged every second.
    waited, why = lines["POOL"].split(" ", 1)
    assert float(waited) < 10 and "pip install 'async_modal_exec[local]'" in why
    assert "pip install 'async_modal_exec[local]'" in lines["AGAIN"]
    assert lines["POOLLOGS"] == "1"


def test_missing_extra_names_the_pip_line() -> None:
    from async_modal_exec import _extras

    _extras.EXTRAS["probe"] = ("no_such_module_for_ame",)
    try:
        with pytest.raises(MissingExtra, match=r"pip install 'async_modal_exec\[probe\]'") as caught:
            require("probe", "The probe")
        assert caught.value.extra == "probe" and isinstance(caught.value, ImportError)
    finally:
        del _extras.EXTRAS["probe"]


def test_no_stack_installs_an_ipykernel_that_can_leave_a_request_unanswered() -> None:
    # ipykernel 7.0-7.3 can strand a shell request unread (the kernel idles and
    # never answers): on Python 3.10, whose newest ipykernel is 7.3, the oldest
    # corner of the compatibility matrix saw it in half of its runs.
    from importlib.metadata import requires, version

    from packaging.requirements import Requirement
    from packaging.version import Version

    from async_modal_exec.backends.modal_sandbox import IPYKERNEL_SPEC

    broken = [Version(v) for v in ("7.0.0", "7.1.0", "7.2.0", "7.3.0", "7.3.4")]
    spec = Requirement(IPYKERNEL_SPEC).specifier
    assert not any(spec.contains(v) for v in broken) and spec.contains(Version("7.4.0"))
    assert spec.contains(Version("6.31.0"))
    local_extra = [Requirement(r) for r in requires("async_modal_exec") or [] if r.startswith("ipykernel")]
    assert {str(r.specifier) for r in local_extra} == {str(spec)}, "the local extra and the image agree"
    assert spec.contains(Version(version("ipykernel"))), "this environment's kernel is in the range"
