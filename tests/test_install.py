"""AsyncExecutor.install: probe, install only what is missing, stream the installer's output.

Packages come from wheels built here (no index, no network): the in-kernel
installer is pointed at them, and at a target directory of the test, by pip's
own environment variables, so nothing is installed into the test's
environment.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from async_modal_exec import AsyncExecutor, InstallReport, LocalBackend
from async_modal_exec.errors import PackageInstallError

from .helpers import make_wheel


@pytest.fixture
def wheels(tmp_path: Path) -> Path:
    directory = tmp_path / "wheels"
    make_wheel(directory, "ame-demo", "1.0", "one")
    make_wheel(directory, "ame-demo", "2.0", "two")
    return directory


def path_without_uv() -> str:
    """PATH minus directories with a ``uv`` (whose installs ignore PIP_TARGET)."""
    dirs = os.environ.get("PATH", "").split(os.pathsep)
    return os.pathsep.join(d for d in dirs if not os.path.exists(os.path.join(d, "uv")))


def offline_pip_env(wheels: Path) -> dict[str, str]:
    return {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheels), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def target_pip_env(site: Path, wheels: Path) -> dict[str, str]:
    """pip installs into ``site`` (``PIP_UPGRADE``: with a target, pip replaces an older version only so)."""
    return {
        "PYTHONPATH": str(site),
        "PIP_TARGET": str(site),
        "PIP_UPGRADE": "1",
        "PATH": path_without_uv(),
        **offline_pip_env(wheels),
    }


@pytest.fixture
async def kernel_installs(tmp_path: Path, wheels: Path) -> AsyncIterator[AsyncExecutor]:
    """An unjailed local kernel whose pip installs into ``tmp_path/site`` (first on its path)."""
    site = tmp_path / "site"
    site.mkdir()
    env = target_pip_env(site, wheels)
    async with AsyncExecutor(LocalBackend(isolation="none", env=env)) as executor:
        assert not executor.backend.installs_on_host
        yield executor


async def imported_value(executor: AsyncExecutor) -> str:
    result = await executor.run("import importlib, ame_demo\nimportlib.reload(ame_demo).VALUE")
    assert result.value is not None, result.error
    return str(eval(result.value.text))


async def test_only_what_is_missing_is_installed_and_the_output_streams(
    kernel_installs: AsyncExecutor,
) -> None:
    executor = kernel_installs
    output: list[str] = []
    report = await executor.install(["ame-demo==1.0", "anyio"], on_output=output.append)
    assert report.installed == ("ame-demo==1.0",)
    assert report.already_present == ("anyio",)
    assert "Successfully installed ame-demo-1.0" in "".join(output)
    assert len(output) > 1, "the installer's output came in one piece, not as it was written"
    assert await imported_value(executor) == "one"

    again: list[str] = []
    report = await executor.install(["ame-demo==1.0"], on_output=again.append)
    assert report == InstallReport(already_present=("ame-demo==1.0",))
    assert again == []


async def test_a_version_the_sandbox_lacks_is_installed_over_an_older_one(
    kernel_installs: AsyncExecutor,
) -> None:
    executor = kernel_installs
    await executor.install(["ame-demo==1.0"])
    report = await executor.install(["ame-demo>=2"])
    assert report.installed == ("ame-demo>=2",)
    assert await imported_value(executor) == "two"


async def test_a_second_executor_probes_and_finds_it_installed(tmp_path: Path, wheels: Path) -> None:
    site = tmp_path / "site"
    env = target_pip_env(site, wheels)
    async with AsyncExecutor(LocalBackend(isolation="none", env=env)) as first:
        assert (await first.install(["ame-demo"])).installed == ("ame-demo",)
    async with AsyncExecutor(LocalBackend(isolation="none", env=env)) as second:
        output: list[str] = []
        report = await second.install(["ame-demo"], on_output=output.append)
        assert report == InstallReport(already_present=("ame-demo",))
        assert output == []


async def test_a_failed_install_names_the_package(kernel_installs: AsyncExecutor) -> None:
    with pytest.raises(PackageInstallError) as caught:
        await kernel_installs.install(["ame-demo==9.9"])
    assert caught.value.packages == ["ame-demo==9.9"]
    assert "ame-demo==9.9" in str(caught.value)
    assert kernel_installs.packages.installed == []


async def test_bad_requirements_are_refused_before_anything_runs(kernel_installs: AsyncExecutor) -> None:
    with pytest.raises(TypeError):
        await kernel_installs.install("ame-demo")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        await kernel_installs.install([" "])


async def test_a_jailed_kernel_gets_its_packages_from_the_host(
    wheels: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in offline_pip_env(wheels).items():
        monkeypatch.setenv(name, value)
    async with AsyncExecutor(LocalBackend()) as executor:
        if not executor.backend.installs_on_host:
            pytest.skip("bubblewrap cannot jail here: the kernel installs for itself")
        output: list[str] = []
        report = await executor.install(["ame-demo==1.0"], on_output=output.append)
        assert report.installed == ("ame-demo==1.0",)
        assert "ame-demo" in "".join(output)
        assert await imported_value(executor) == "one"
        assert (await executor.install(["ame-demo>=2"])).installed == ("ame-demo>=2",)
        assert await imported_value(executor) == "two"
        packages_dir = executor.backend.packages_dir  # type: ignore[attr-defined]
        assert any(name.startswith("ame_demo") for name in os.listdir(packages_dir))


def test_uv_is_not_what_these_tests_use() -> None:
    """The in-kernel tests rely on pip honouring PIP_TARGET; they take uv off the kernel's PATH."""
    assert all(shutil.which("uv", path=d) is None for d in path_without_uv().split(os.pathsep) if d)
