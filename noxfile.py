"""Developer sessions: ``nox -s tests lint typecheck docs bench compat``."""

from __future__ import annotations

import nox

nox.options.default_venv_backend = "uv|virtualenv"
nox.options.sessions = ["tests", "lint", "typecheck", "docs"]


@nox.session
def tests(session: nox.Session) -> None:
    """The whole suite against a real Kernel Gateway on loopback."""
    session.install("-e", ".[test]")
    session.run("python", "-m", "pytest", *session.posargs)


# The corners of the supported range (pyproject's extras): the oldest modal and
# smolagents on the oldest Python, the newest on the newest Python.
COMPAT_CORNERS = {
    "oldest": ("3.10", "1.6.2", "1.25.0"),
    "newest": ("3.13", "1.6.4", "1.26.0"),
}
# What depends on those versions: the Modal contract (the control-plane
# double), the smolagents facade and host tools, the modal-only install.
COMPAT_TESTS = [
    "tests/test_modal.py",
    "tests/test_modal_snapshots.py",
    "tests/test_agent_modal.py",
    "tests/test_agent.py",
    "tests/test_host_tools.py",
    "tests/test_cleanup.py",
    "tests/test_extras.py",
]


@nox.session
@nox.parametrize(
    "python,corner",
    [(python, corner) for corner, (python, *_) in COMPAT_CORNERS.items()],
    ids=list(COMPAT_CORNERS),
)
def compat(session: nox.Session, corner: str) -> None:
    """The version-sensitive tests at one corner of the supported Python/modal/smolagents range.

    The interpreters are found on ``PATH`` (``python3.10``, ``python3.13``); with
    pyenv, ``PYENV_VERSION`` lists them (``.ci/run`` does). On CI a missing one
    is an error, not a skip.
    """
    _, modal_version, smolagents_version = COMPAT_CORNERS[corner]
    session.install("-e", ".[test]", f"modal=={modal_version}", f"smolagents[mcp]=={smolagents_version}")
    session.run("python", "-m", "pytest", *COMPAT_TESTS, *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff: lint and formatting."""
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy strict on the package."""
    session.install("-e", ".[all]", "mypy")
    session.run("mypy")


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation site; warnings are errors."""
    session.install("mkdocs-material", "mkdocstrings[python]")
    session.run("mkdocs", "build", "--strict", "--site-dir", session.create_tmp() + "/site")


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks: round trip vs the ZMQ floor and smolagents' path; host-tool call; warm pool."""
    session.install("-e", ".[test]")
    session.run("python", "benchmarks/roundtrip.py", *session.posargs)
    session.run("python", "benchmarks/host_tools.py")
    session.run("python", "benchmarks/pool.py")
