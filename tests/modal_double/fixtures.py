"""pytest glue: one double per test session, the real client pointed at it."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator

import pytest

from .server import ModalDouble


@pytest.fixture(scope="session")
def modal_double() -> Iterator[ModalDouble]:
    """The control-plane double, with the environment the real ``modal`` client reads.

    Teardown fails the session if the client called an RPC the double does not
    implement, or if a test left a sandbox running.
    """
    double = ModalDouble().start()
    home = tempfile.TemporaryDirectory(prefix="modal-home-")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MODAL_SERVER_URL", double.url)
        patch.setenv("MODAL_TOKEN_ID", "ak-double")
        patch.setenv("MODAL_TOKEN_SECRET", "as-double")
        patch.setenv("HOME", home.name)  # no real ~/.modal.toml
        patch.delenv("MODAL_PROFILE", raising=False)
        patch.delenv("MODAL_ENVIRONMENT", raising=False)
        try:
            yield double
        finally:
            leaked = double.stop()
            home.cleanup()
    assert double.unimplemented == [], (
        f"the client called RPCs the double lacks: {sorted(set(double.unimplemented))}"
    )
    assert leaked == [], f"sandboxes left running by the tests: {leaked}"


@pytest.fixture
def modal_sandboxes_checked(modal_double: ModalDouble) -> Iterator[ModalDouble]:
    """The double, and a check that the test left no sandbox alive."""
    before = set(modal_double.live_sandboxes())
    yield modal_double
    leaked = set(modal_double.live_sandboxes()) - before
    assert not leaked, f"sandboxes left alive: {leaked}"
