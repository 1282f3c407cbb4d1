"""Files in and out of the sandbox: real kernels on a real gateway, real files on both sides."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from async_modal_exec import AsyncExecutor, GatewayBackend, LocalBackend, RemoteFile
from async_modal_exec.backends import GatewayEndpoint
from async_modal_exec.errors import ChecksumMismatch, RemoteFileError, RemoteFileNotFound, RemotePathRefused

from .helpers import peak_rss_bytes, reset_peak_rss, rss_bytes

MB = 2**20


@pytest.fixture
async def make_files_executor(
    gateway: GatewayEndpoint, tmp_path: Path
) -> AsyncIterator[Callable[..., Awaitable[AsyncExecutor]]]:
    """Executors on the session gateway whose work directory is this test's own ``tmp_path/work``."""
    work = tmp_path / "work"
    work.mkdir()
    made: list[AsyncExecutor] = []

    async def make(**options: Any) -> AsyncExecutor:
        backend = GatewayBackend(gateway.base_url, gateway.token, work_dir=str(work))
        executor = await AsyncExecutor(backend, **options).start()
        made.append(executor)
        (await executor.run(f"import os\nos.chdir({str(work)!r})")).raise_for_error()
        return executor

    yield make
    for executor in made:
        await executor.aclose()


@pytest.fixture
async def executor(make_files_executor: Callable[..., Awaitable[AsyncExecutor]]) -> AsyncExecutor:
    return await make_files_executor()


async def work_dir(executor: AsyncExecutor) -> str:
    assert executor.backend.work_dir is not None
    return os.path.realpath(executor.backend.work_dir)


async def test_bytes_round_trip_with_directories_listing_and_removal(executor: AsyncExecutor) -> None:
    info = await executor.upload(b"a,b\n1,2\n", "data/in/table.csv")
    assert isinstance(info, RemoteFile)
    assert (info.name, info.size, info.is_dir) == ("table.csv", 8, False)
    assert info.path == os.path.join(await work_dir(executor), "data/in/table.csv")
    assert await executor.download("data/in/table.csv") == b"a,b\n1,2\n"
    assert await executor.stat("data/in/table.csv") == info
    assert (await executor.stat("data")).is_dir
    seen = (await executor.run("open('data/in/table.csv').read()")).value
    assert seen is not None and seen.text == repr("a,b\n1,2\n")

    await executor.upload(b"", "data/empty")
    assert await executor.download("data/empty") == b""
    listing = await executor.listdir("data")
    assert [(e.name, e.is_dir) for e in listing] == [("empty", False), ("in", True)]

    with pytest.raises(RemoteFileError, match="not empty"):
        await executor.remove("data/in")
    await executor.remove("data/empty")
    await executor.remove("data", recursive=True)
    assert await executor.listdir() == []
    with pytest.raises(RemoteFileNotFound):
        await executor.download("data/in/table.csv")


async def test_an_upload_replaces_a_file_and_an_absolute_path_inside_the_work_dir_works(
    executor: AsyncExecutor,
) -> None:
    root = await work_dir(executor)
    await executor.upload(b"old", "same.txt")
    await executor.upload(b"new contents", os.path.join(root, "same.txt"))
    assert await executor.download(os.path.join(root, "same.txt")) == b"new contents"
    await executor.remove("same.txt")


async def test_a_200_mb_file_round_trips_with_equal_checksum_and_flat_host_memory(
    executor: AsyncExecutor, tmp_path: Path
) -> None:
    source = tmp_path / "big.bin"
    digest = hashlib.sha256()
    with source.open("wb") as handle:
        for _ in range(200):
            block = os.urandom(MB)
            digest.update(block)
            handle.write(block)
    del block

    before = rss_bytes()
    reset_peak_rss()
    info = await executor.upload(source, "big.bin")
    upload_growth = peak_rss_bytes() - before
    assert info.size == 200 * MB

    target = tmp_path / "back.bin"
    before = rss_bytes()
    reset_peak_rss()
    back = await executor.download("big.bin", target)
    download_growth = peak_rss_bytes() - before
    assert back.size == 200 * MB

    received = hashlib.sha256()
    with target.open("rb") as handle:
        while block := handle.read(MB):
            received.update(block)
    assert received.hexdigest() == digest.hexdigest()
    kernel_digest = await executor.run(
        "import hashlib\nh = hashlib.sha256()\nwith open('big.bin', 'rb') as f:\n"
        "    for b in iter(lambda: f.read(1 << 20), b''):\n        h.update(b)\nh.hexdigest()"
    )
    assert kernel_digest.value is not None and kernel_digest.value.text == repr(digest.hexdigest())
    assert upload_growth < 50 * MB, f"upload grew host RSS by {upload_growth / MB:.1f} MB"
    assert download_growth < 50 * MB, f"download grew host RSS by {download_growth / MB:.1f} MB"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".part")] == []
    await executor.remove("big.bin")


@pytest.mark.parametrize(
    "path", ["../escape.txt", "a/../../escape.txt", "/tmp/escape.txt", "/etc/escape.txt"]
)
async def test_a_path_outside_the_work_dir_is_refused(executor: AsyncExecutor, path: str) -> None:
    root = await work_dir(executor)
    outside = os.path.normpath(os.path.join(root, path))
    with pytest.raises(RemotePathRefused, match="outside the work directory"):
        await executor.upload(b"x", path)
    with pytest.raises(RemotePathRefused):
        await executor.download(path)
    with pytest.raises(RemotePathRefused):
        await executor.listdir(os.path.dirname(path) or ".")
    with pytest.raises(RemotePathRefused):
        await executor.remove(path)
    assert not os.path.exists(outside), f"{outside} was written"


async def test_symlinks_out_of_the_work_dir_are_refused(executor: AsyncExecutor, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("host secret")
    await executor.run(
        f"import os\nos.symlink({str(secret)!r}, 'file_link')\nos.symlink({str(tmp_path)!r}, 'dir_link')"
    )
    with pytest.raises(RemotePathRefused):
        await executor.download("file_link")
    with pytest.raises(RemotePathRefused):
        await executor.download("dir_link/secret.txt")
    with pytest.raises(RemotePathRefused):
        await executor.upload(b"overwritten", "file_link")
    with pytest.raises(RemotePathRefused):
        await executor.upload(b"planted", "dir_link/planted.txt")
    with pytest.raises(RemotePathRefused):
        await executor.listdir("dir_link")
    assert secret.read_text() == "host secret"
    assert not (tmp_path / "planted.txt").exists()
    links = {e.name: e.is_link for e in await executor.listdir()}
    assert links == {"file_link": True, "dir_link": True}
    # Removing a link removes the link, never what it points to.
    await executor.remove("file_link")
    await executor.remove("dir_link")
    assert secret.read_text() == "host secret"
    assert [e.name for e in await executor.listdir()] == []


async def test_the_work_dir_itself_cannot_be_removed(executor: AsyncExecutor) -> None:
    for path in (".", "", await work_dir(executor)):
        with pytest.raises(RemotePathRefused):
            await executor.remove(path, recursive=True)


async def test_a_cancelled_upload_leaves_nothing_and_the_old_file_intact(executor: AsyncExecutor) -> None:
    await executor.upload(b"the old version", "model.bin")
    data = os.urandom(60 * MB)
    with anyio.move_on_after(0.3) as scope:
        await executor.upload(data, "model.bin")
    assert scope.cancelled_caught
    assert {e.name for e in await executor.listdir()} == {"model.bin"}, "a partial file was left"
    assert await executor.download("model.bin") == b"the old version"
    assert (await executor.run("1 + 1")).value.text == "2"  # type: ignore[union-attr]
    await executor.remove("model.bin")


async def test_a_checksum_that_does_not_match_writes_nothing(executor: AsyncExecutor) -> None:
    """The kernel's own check: a finish that claims other bytes than those that arrived is refused."""
    await executor.upload(b"kept", "report.txt")
    async with executor._files_turn(None) as call:
        token = (await call("begin_upload", ("a-token", "report.txt"), None))["token"]
        await call("put", (token,), b"these bytes arrived")
        with pytest.raises(ChecksumMismatch, match="checksum mismatch"):
            await call("finish_upload", (token, hashlib.sha256(b"other bytes").hexdigest()), None)
    assert await executor.download("report.txt") == b"kept"
    assert {e.name for e in await executor.listdir()} == {"report.txt"}
    await executor.remove("report.txt")


async def test_errors_name_what_went_wrong(executor: AsyncExecutor, tmp_path: Path) -> None:
    with pytest.raises(RemoteFileNotFound):
        await executor.download("no/such/file")
    with pytest.raises(RemoteFileNotFound):
        await executor.listdir("no-such-dir")
    await executor.upload(b"x", "d/f")
    with pytest.raises(RemoteFileError, match="is a directory"):
        await executor.download("d")
    with pytest.raises(RemoteFileError, match="is a directory"):
        await executor.upload(b"x", "d")
    with pytest.raises(FileNotFoundError):
        await executor.upload(tmp_path / "missing.bin", "m.bin")
    assert {e.name for e in await executor.listdir()} == {"d"}
    await executor.remove("d", recursive=True)


async def test_files_keep_the_users_namespace_and_output_cap_out_of_the_way(
    make_files_executor: Callable[..., Awaitable[AsyncExecutor]],
) -> None:
    executor = await make_files_executor(max_output_chars=100)
    before = (await executor.run("sorted(k for k in globals() if not k.startswith('_'))")).value
    data = os.urandom(3 * MB)
    await executor.upload(data, "blob")
    assert await executor.download("blob") == data  # chunks far above the cap
    after = (await executor.run("sorted(k for k in globals() if not k.startswith('_'))")).value
    assert before == after
    await executor.remove("blob")


async def test_a_jailed_local_kernel_confines_files_to_its_work_dir(tmp_path: Path) -> None:
    work = tmp_path / "work"
    async with AsyncExecutor(LocalBackend(cwd=work)) as executor:
        assert executor.backend.work_dir == str(work)
        await executor.run("import os\nos.makedirs('sub')\nos.chdir('sub')")
        info = await executor.upload(b"payload", "in.txt")  # relative to the work dir, not the cwd
        assert info.path == os.path.join(os.path.realpath(work), "in.txt")
        assert (work / "in.txt").read_bytes() == b"payload"
        with pytest.raises(RemotePathRefused):
            await executor.upload(b"x", "/tmp/x")
        assert await executor.download("in.txt") == b"payload"


def test_the_smolagents_facade_moves_files_around_an_agent_run(
    tmp_path: Path, gateway: GatewayEndpoint
) -> None:
    """Upload a CSV, let a real CodeAgent (scripted model) read it and write a result, download it."""
    from smolagents import CodeAgent

    from async_modal_exec import Executor

    from .agent_helpers import QUIET, ScriptedModel

    work = tmp_path / "work"
    work.mkdir()
    backend = GatewayBackend(gateway.base_url, gateway.token, work_dir=str(work))
    executor = Executor(backend, logger=QUIET, timeout=60, env={"REPORT_TITLE": "totals"})
    try:
        executor.upload(b"x,y\n1,2\n3,4\n", "in/data.csv")
        assert [e.name for e in executor.listdir("in")] == ["data.csv"]
        model = ScriptedModel(
            [
                f"import csv, os\nos.chdir({str(work)!r})\n"
                "rows = list(csv.DictReader(open('in/data.csv')))\n"
                "total = sum(int(r['x']) + int(r['y']) for r in rows)\n"
                "open('out.txt', 'w').write(os.environ['REPORT_TITLE'] + ': ' + str(total))\n"
                "final_answer(total)"
            ]
        )
        agent = CodeAgent(tools=[], model=model, executor=executor, max_steps=2)
        assert agent.run("sum the table") == 10
        assert executor.download("out.txt") == b"totals: 10"
        local = tmp_path / "out.txt"
        info = executor.download("out.txt", local)
        assert isinstance(info, RemoteFile) and info.size == len(b"totals: 10")
        assert local.read_bytes() == b"totals: 10"
        executor.remove("in", recursive=True)
        assert {e.name for e in executor.listdir()} == {"out.txt"}
    finally:
        executor.cleanup()


async def open_transfers(executor: AsyncExecutor) -> int:
    result = await executor.run("len(__import__('sys').modules['_async_modal_exec_files'].transfers)")
    assert result.value is not None
    return int(result.value.text)


async def test_a_symlink_loop_cannot_hide_a_way_out(executor: AsyncExecutor, tmp_path: Path) -> None:
    """realpath gives up at a loop and collapses '..' as text: 'loop/../evil' must still be refused."""
    secret = tmp_path / "secret.txt"
    secret.write_text("host secret")
    await executor.run(
        f"import os\nos.symlink('loop', 'loop')\nos.symlink({str(tmp_path)!r}, 'evil')\n"
        "os.symlink('loop/../evil', 'hidden')"
    )
    for path in ("loop/../evil/secret.txt", "hidden/secret.txt"):
        with pytest.raises(RemotePathRefused):
            await executor.download(path)
        with pytest.raises(RemotePathRefused):
            await executor.upload(b"planted", path)
    with pytest.raises(RemotePathRefused):
        await executor.remove("hidden/secret.txt")
    assert secret.read_text() == "host secret"
    for link in ("loop", "evil", "hidden"):
        await executor.remove(link)


async def test_a_fifo_is_refused_instead_of_waited_for(executor: AsyncExecutor) -> None:
    await executor.run("import os\nos.mkfifo('pipe')")
    with anyio.fail_after(10):
        with pytest.raises(RemoteFileError, match="not a regular file"):
            await executor.download("pipe")
    await executor.remove("pipe")


async def test_no_transfer_stays_open_in_the_kernel(executor: AsyncExecutor, tmp_path: Path) -> None:
    await executor.upload(b"x" * 5000, "f.bin")
    with pytest.raises(FileNotFoundError):
        await executor.download("f.bin", tmp_path / "no" / "such" / "dir" / "f.bin")  # fails before a chunk
    async with executor.reading("f.bin") as (info, _):
        assert info.size == 5000  # left without reading
    with anyio.move_on_after(0.05):
        await executor.upload(os.urandom(20 * MB), "g.bin")
    assert await open_transfers(executor) == 0
    assert {e.name for e in await executor.listdir()} == {"f.bin"}
    await executor.remove("f.bin")


async def test_file_operations_do_not_count_as_runs(executor: AsyncExecutor) -> None:
    first = await executor.run("1")
    await executor.upload(os.urandom(5 * MB), "counted.bin")  # three chunks, and the helper
    await executor.download("counted.bin")
    second = await executor.run("2")
    assert first.execution_count is not None
    assert second.execution_count == first.execution_count + 1
    await executor.remove("counted.bin")
