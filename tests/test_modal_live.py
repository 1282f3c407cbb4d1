"""The ModalBackend contract against real Modal, for people with an account.

Run alone: ``MODAL_TOKEN_ID=... MODAL_TOKEN_SECRET=... pytest -m modal_live``.
(The default run deselects these tests; the rest of the suite points the modal
client at a local double, so they must not share a session with it.)
"""

from __future__ import annotations

import os

import pytest

from async_modal_exec import AsyncExecutor, ModalBackend
from async_modal_exec.backends.modal_sandbox import reap_modal_sandboxes

pytestmark = [
    pytest.mark.modal_live,
    pytest.mark.skipif(
        not os.environ.get("MODAL_TOKEN_ID"), reason="needs MODAL_TOKEN_ID (a real Modal account)"
    ),
]

APP = os.environ.get("ASYNC_MODAL_EXEC_LIVE_APP", "async-modal-exec-live-tests")


async def test_live_create_run_terminate() -> None:
    backend = ModalBackend(app_name=APP, create_kwargs={"timeout": 600, "idle_timeout": 120})
    async with AsyncExecutor(backend, timeout=120) as executor:
        result = await executor.run("import sys\nprint('hello from modal')\nsys.version_info[0]")
        assert result.stdout == "hello from modal\n"
        assert result.value is not None and result.value.text == "3"
        sandbox_id = backend.sandbox.object_id  # type: ignore[union-attr]
    assert sandbox_id not in {found.sandbox_id for found in await reap_modal_sandboxes(APP, dry_run=True)}


async def test_live_reap_leaves_nothing_of_ours() -> None:
    await reap_modal_sandboxes(APP, older_than=3600)
