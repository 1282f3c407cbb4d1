"""The hostile corpus (``jail_corpus.py``) against two kernels of one jailed LocalBackend.

Kernel A (the attacker) and kernel B (the victim) run behind the same real
gateway, each in its own bubblewrap jail, as a reused pool sandbox or a
second executor on the same endpoint would. B holds a secret in a variable,
in a file of its work directory and in its output; every case runs in A and
must end in the refusal its entry expects, with B's secret nowhere in what
A got. ``docs/security.md`` lists the same cases.
"""

from __future__ import annotations

import ast
import glob
import json
import os
import re
import secrets
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest

from async_modal_exec import AsyncExecutor, GatewayBackend, LocalBackend

from .jail_corpus import CASES, Case

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="bubblewrap is Linux only")

CHECKOUT = Path(__file__).resolve().parents[1]


def _editable_checkout() -> str:
    """The repository an editable install of this package points at (else this checkout)."""
    from importlib.metadata import distribution

    direct_url = json.loads(distribution("async_modal_exec").read_text("direct_url.json") or "{}")
    if direct_url.get("dir_info", {}).get("editable") and direct_url["url"].startswith("file://"):
        return str(direct_url["url"][len("file://") :])
    return str(CHECKOUT)


B_FILE = "b-secret.txt"


@dataclass
class Pair:
    backend: LocalBackend
    attacker: AsyncExecutor
    victim: AsyncExecutor
    secret: str
    info: dict[str, object]


def _connection_file(backend: LocalBackend, kernel_id: str) -> Path:
    """The kernel's connection file on the host, wherever the launcher put it."""
    assert backend._private_dir is not None
    found = [
        Path(path)
        for path in glob.glob(os.path.join(backend._private_dir, "rt", "**", "*.json"), recursive=True)
        if kernel_id in path
    ]
    assert len(found) == 1, found
    return found[0]


@pytest.fixture(scope="module")
async def pair() -> AsyncIterator[Pair]:
    secret = "b-secret-" + secrets.token_hex(8)
    backend = LocalBackend(isolation="bwrap", env={"BACKEND_GIVEN": "yes"})
    home_file = Path.home() / f"ame-planted-{secrets.token_hex(4)}.txt"
    home_file.write_text("host home secret")
    path_listener = socket.socket(socket.AF_UNIX)
    abstract_listener = socket.socket(socket.AF_UNIX)
    abstract_name = f"ame-host-{secrets.token_hex(4)}"
    try:
        async with AsyncExecutor(backend, timeout=60) as attacker:
            assert backend.isolated and backend._endpoint is not None and backend._private_dir is not None
            endpoint = backend._endpoint
            async with AsyncExecutor(
                GatewayBackend(endpoint.base_url, endpoint.token), timeout=60, env={"B_ONLY": secret}
            ) as victim:
                result = await victim.run(
                    f"import os\nsecret = {secret!r}\nopen({B_FILE!r}, 'w').write(secret)\nos.getcwd()"
                )
                result.raise_for_error()
                assert victim.kernel_id is not None
                b_connection_file = _connection_file(backend, victim.kernel_id)
                host_socket = os.path.join(backend._private_dir, "host.sock")
                path_listener.bind(host_socket)
                path_listener.listen()
                abstract_listener.bind("\0" + abstract_name)
                abstract_listener.listen()
                root_only = Path(backend.packages_dir) / "root-only.txt"
                root_only.write_text("root only")
                root_only.chmod(0o600)
                info: dict[str, object] = {
                    "b_connection": json.loads(b_connection_file.read_text()),
                    "b_connection_file": str(b_connection_file),
                    "b_kernel_id": victim.kernel_id,
                    "b_work_file": os.path.join(backend.kernel_work_dir(victim.kernel_id), B_FILE),
                    "b_work_name": B_FILE,
                    "b_secret": secret,
                    "token": endpoint.token,
                    "host_pid": os.getpid(),
                    "gateway_pid": backend.pid,
                    "gateway_port": int(endpoint.base_url.rsplit(":", 1)[1]),
                    "host_socket": host_socket,
                    "host_abstract": abstract_name,
                    "home_file": str(home_file),
                    "checkout": _editable_checkout(),
                    "jail_config": os.path.join(backend._private_dir, "jail.json"),
                    "gateway_log": os.path.join(backend._private_dir, "gateway.log"),
                    "root_only_file": str(root_only),
                }
                assert os.path.exists(info["b_work_file"])  # type: ignore[arg-type]
                yield Pair(backend, attacker, victim, secret, info)
    finally:
        home_file.unlink()
        path_listener.close()
        abstract_listener.close()


def _program(case: Case, info: dict[str, object]) -> str:
    body = "\n".join("    " + line for line in case.body.strip("\n").splitlines())
    return (
        f"import json as _json\nINFO = _json.loads({json.dumps(info)!r})\n"
        f"def _case():\n{body}\n"
        "try:\n    _verdict = str(_case())\n"
        "except BaseException as _exc:\n    _verdict = f'refused:{type(_exc).__name__}:{_exc}'\n"
        "del INFO\n_verdict"
    )


async def _b_prints_its_secret(victim: AsyncExecutor, secret: str) -> None:
    result = await victim.run(
        f"import time\nfor _ in range(30):\n    print({secret!r}, flush=True)\n    time.sleep(0.1)"
    )
    result.raise_for_error()


def _host_has(need: str) -> bool:
    if need == "root":
        return os.geteuid() == 0
    if need == "x86_64":
        return os.uname().machine == "x86_64"
    if need == "vsock":  # without it the refusal would prove nothing
        try:
            socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM).close()
        except (OSError, AttributeError):
            return False
        return True
    return True


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
async def test_an_escape_attempt_is_refused(pair: Pair, case: Case) -> None:
    if not _host_has(case.needs):
        pytest.skip(f"the outcome needs {case.needs} on the host")
    program = _program(case, pair.info)
    if case.during_b_output:
        async with anyio.create_task_group() as group:
            group.start_soon(_b_prints_its_secret, pair.victim, pair.secret)
            await anyio.sleep(0.3)
            result = await pair.attacker.run(program, timeout=60)
    else:
        result = await pair.attacker.run(program, timeout=60)
    result.raise_for_error()
    assert result.value is not None
    verdict = ast.literal_eval(result.value.text)
    assert re.fullmatch(case.expect, verdict, re.DOTALL), f"{case.name}: {verdict}"
    assert pair.secret not in result.stdout + result.stderr + verdict
    # The victim is untouched: its variable and file are as it left them.
    check = await pair.victim.run(f"secret, open({B_FILE!r}).read()")
    assert check.value is not None and check.value.text == repr((pair.secret, pair.secret))


def test_the_corpus_is_large_and_documented() -> None:
    assert len(CASES) >= 30
    assert len({case.name for case in CASES}) == len(CASES)
    table = (CHECKOUT / "docs" / "security.md").read_text()
    missing = [case.name for case in CASES if f"`{case.name}`" not in table]
    assert not missing, f"cases not in docs/security.md: {missing}"
