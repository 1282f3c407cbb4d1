"""Developer sessions: ``nox -s tests lint typecheck docs bench``."""

from __future__ import annotations

import nox

nox.options.default_venv_backend = "uv|virtualenv"
nox.options.sessions = ["tests", "lint", "typecheck", "docs"]


@nox.session
def tests(session: nox.Session) -> None:
    """The whole suite against a real Kernel Gateway on loopback."""
    session.install("-e", ".[test]")
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff: lint and formatting."""
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy strict on the package."""
    session.install("-e", ".[fastapi]", "mypy")
    session.run("mypy")


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation site; warnings are errors."""
    session.install("mkdocs-material")
    session.run("mkdocs", "build", "--strict", "--site-dir", session.create_tmp() + "/site")


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks: round trip vs the ZMQ floor and smolagents' path; host-tool call; warm pool."""
    session.install("-e", ".[test]")
    session.run("python", "benchmarks/roundtrip.py", *session.posargs)
    session.run("python", "benchmarks/host_tools.py")
    session.run("python", "benchmarks/pool.py")
