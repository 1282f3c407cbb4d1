"""Every code block of the README and ``docs/`` runs, as a reader would run it.

Python blocks run page by page in a subprocess (``tests/docs_examples.py``:
one namespace per page, literal comments checked). Bash blocks run with
``bash -euo pipefail`` in a copy of the repository's tracked files, so the
install commands create a fresh ``.venv`` there and install from the registry,
as on a new machine; pages without one get the suite's venv as ``.venv``.

What the pages take for granted is real here: Modal is the control-plane double
(its certificate trusted through ``SSL_CERT_FILE``, its named secrets created),
"a running gateway" is the suite's gateway (behind a TLS proxy where the page
uses ``https``), ``my-mcp-server`` is a small stdio MCP server on ``PATH``, and
FastAPI apps are served by uvicorn on the port the page names and called over
HTTP. The one block not run is the README's test command: it is the command
that runs this suite, and ``.ci/run`` runs it verbatim (checked below).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest

from async_modal_exec.backends.base import GatewayEndpoint

from .docs_examples import NOT_CODE, ROOT, RUNNABLE, Block, blocks, pages
from .helpers import wait_gone
from .modal_double import ModalDouble
from .modal_double.tls import TlsProxy

RUNNER = str(ROOT / "tests" / "docs_examples.py")
SERVED = "docs/fastapi.md"  # its blocks serve on a port: driven by their own tests below
PORT = 8000  # the port the FastAPI page and the example server listen on


def _is_test_command(block: Block) -> bool:
    return block.page == "README.md" and "-m pytest" in block.source


PYTHON_PAGES = [page for page in pages() if blocks(page, "python") and page != SERVED]
SHELL_PAGES = [
    page
    for page in pages()
    if page != SERVED and any(not _is_test_command(block) for block in blocks(page, "bash"))
]


def test_every_block_says_whether_it_is_code() -> None:
    unlabelled = [
        f"{block.name} ({block.lang or 'no language'})"
        for page in pages()
        for block in blocks(page)
        if block.lang not in RUNNABLE + NOT_CODE
    ]
    assert unlabelled == [], f"label these fences {RUNNABLE} (run) or {NOT_CODE} (not code)"
    assert len(PYTHON_PAGES) >= 8 and len(SHELL_PAGES) >= 4


def test_the_readme_test_command_is_what_ci_runs() -> None:
    (command,) = [block for block in blocks("README.md", "bash") if _is_test_command(block)]
    assert command.source.strip() in (ROOT / ".ci" / "run").read_text()


@pytest.fixture
async def docs_env(
    modal_sandboxes_checked: ModalDouble, gateway: GatewayEndpoint, tmp_path: Path
) -> AsyncIterator[dict[str, str]]:
    """The environment a page's reader has, made of real parts; checks nothing is left after."""
    double = modal_sandboxes_checked
    double.named_secrets.setdefault("aws", {"AWS_PROFILE": "docs"})
    double.named_secrets.setdefault("aws-credentials", {"AWS_PROFILE": "docs"})
    gateway_port = urlsplit(gateway.base_url).port
    assert gateway_port is not None
    tls_gateway = TlsProxy(double.server_tls, gateway_port)
    await tls_gateway.start()
    shims = tmp_path / "bin"
    shims.mkdir()
    mcp_server = shims / "my-mcp-server"
    mcp_server.write_text(
        f'#!/bin/sh\nexec "{sys.executable}" "{ROOT / "tests" / "mcp_docs_server.py"}" "$@"\n'
    )
    mcp_server.chmod(0o755)
    marker = uuid.uuid4().hex
    env = dict(os.environ)  # with the double's MODAL_SERVER_URL and credentials
    env.update(
        PATH=f"{shims}:{Path(sys.executable).parent}:{env['PATH']}",
        SSL_CERT_FILE=str(double.cert),
        KG_URL=f"https://127.0.0.1:{tls_gateway.port}",
        KG_TOKEN=gateway.token or "",
        KG_CA_FILE=str(double.cert),
        GATEWAY_URL=gateway.base_url,
        ASYNC_MODAL_EXEC_GATEWAY_TOKEN=gateway.token or "",
        PYTHONUNBUFFERED="1",
        DOCS_EXAMPLE_RUN=marker,  # inherited by whatever the page starts, detached or not
    )
    try:
        yield env
    finally:
        await tls_gateway.close()
    assert await wait_gone(_marked(marker)) == [], "a page's code left processes running"


def _marked(marker: str) -> list[int]:
    """Live processes whose environment carries ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                if f"DOCS_EXAMPLE_RUN={marker}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
    return found


async def _run(argv: Sequence[str], env: dict[str, str], cwd: Path, timeout: float) -> str:
    process = await asyncio.create_subprocess_exec(
        *argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        out, _ = await asyncio.wait_for(process.communicate(), timeout)
    finally:
        _stop(process, signal.SIGKILL)
    text = out.decode(errors="replace")
    assert process.returncode == 0, f"{' '.join(argv)[:200]} exited {process.returncode}:\n{text[-4000:]}"
    return text


def _stop(process: asyncio.subprocess.Process, how: signal.Signals) -> None:
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, how)


def _project_copy(destination: Path) -> Path:
    """The repository's tracked files (as they are in the working tree), without any venv."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in listed.decode().split("\0"):
        if name and (ROOT / name).is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, destination / name)
    return destination


async def _wait_for_port(process: asyncio.subprocess.Process, port: int, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        assert process.returncode is None, f"the server exited ({process.returncode}) before listening"
        with contextlib.suppress(OSError):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"nothing listened on {port} within {timeout} s")


@pytest.mark.slow
@pytest.mark.parametrize("page", PYTHON_PAGES)
async def test_python_blocks_run(page: str, docs_env: dict[str, str]) -> None:
    out = await _run([sys.executable, RUNNER, page], docs_env, ROOT, timeout=300)
    assert re.findall(r"^ran (\S+)$", out, re.M) == [block.name for block in blocks(page, "python")], out


@pytest.mark.slow
@pytest.mark.parametrize("page", SHELL_PAGES)
async def test_shell_blocks_run(page: str, docs_env: dict[str, str], tmp_path: Path) -> None:
    project = _project_copy(tmp_path / "project")
    page_blocks = [block for block in blocks(page, "bash") if not _is_test_command(block)]
    if not any("-m venv .venv" in block.source for block in page_blocks):
        (project / ".venv").symlink_to(sys.prefix)
    outputs = [
        await _run(["bash", "-euo", "pipefail", "-c", block.source], docs_env, project, timeout=600)
        for block in page_blocks
    ]
    if page == "README.md":
        assert "hello from 3." in outputs[0] and "42" in outputs[0], outputs[0][-2000:]


@pytest.mark.slow
async def test_the_fastapi_page_serves_what_it_says(docs_env: dict[str, str]) -> None:
    # The page's app, served by the page's own uvicorn.run on its port; Ctrl-C stops it.
    python_blocks = blocks(SERVED, "python")
    server = await asyncio.create_subprocess_exec(
        sys.executable, RUNNER, SERVED, cwd=ROOT, env=docs_env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        await _wait_for_port(server, PORT, timeout=120)
        auth = {"authorization": "Bearer docs-example-token"}
        async with aiohttp.ClientSession(f"http://127.0.0.1:{PORT}") as http:
            async with http.post("/run", params={"code": "print('hi')\n6 * 7"}) as response:
                ran = await response.json()
            assert (ran["stdout"], ran["value"]["data"]["text/plain"]) == ("hi\n", "42"), ran
            async with http.post("/agent", params={"task": "Sum 1 to 10"}) as response:
                assert await response.json() == {"answer": "done"}
            async with http.post("/v1/sessions") as response:
                assert response.status == 401  # the sessions router wants the page's token
            async with http.post("/v1/sessions", headers=auth) as response:
                assert response.status == 201
                session = (await response.json())["id"]
            async with http.post(
                f"/v1/sessions/{session}/run", json={"code": "1 + 1"}, headers=auth
            ) as response:
                assert (await response.json())["value"]["data"]["text/plain"] == "2"
        server.send_signal(signal.SIGINT)
        out, _ = await asyncio.wait_for(server.communicate(), 30)
    finally:
        _stop(server, signal.SIGKILL)
    text = out.decode(errors="replace")
    assert server.returncode == 0, text[-4000:]
    assert re.findall(r"^ran (\S+)$", text, re.M) == [block.name for block in python_blocks], text


@pytest.mark.slow
async def test_the_fastapi_example_installs_serves_and_answers_curl(
    docs_env: dict[str, str], tmp_path: Path
) -> None:
    # The page's two shell blocks: install and start the example server; curl it from "another shell".
    install_and_serve, curl = blocks(SERVED, "bash")
    project = _project_copy(tmp_path / "project")
    server = await asyncio.create_subprocess_exec(
        "bash", "-euo", "pipefail", "-c", install_and_serve.source, cwd=project, env=docs_env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        await _wait_for_port(server, PORT, timeout=540)  # a fresh venv installs first
        answer = json.loads(
            await _run(["bash", "-euo", "pipefail", "-c", curl.source], docs_env, project, 60)
        )
        assert answer["answer"] == {"total": 55}, answer  # what the page says the scripted model answers
        _stop(server, signal.SIGINT)  # Ctrl-C in that shell
        out, _ = await asyncio.wait_for(server.communicate(), 30)
    finally:
        _stop(server, signal.SIGKILL)
    assert server.returncode in (0, -signal.SIGINT, 128 + signal.SIGINT), out.decode(errors="replace")[-4000:]
