"""Requirement snapshots on Modal, files and env through a Modal sandbox: the real client, the double.

Each fake sandbox has its own site-packages (the double's ``root``), where
its pip installs, and a pip log outside it: a sandbox whose log does not
exist never ran pip. Packages come from wheels built here, found offline.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from async_modal_exec import AsyncExecutor, ModalBackend, SandboxPool
from async_modal_exec.backends.modal_snapshots import SnapshotPolicy, SnapshotStore, snapshot_key

from .helpers import make_wheel
from .modal_double import ModalDouble

pytestmark = pytest.mark.usefixtures("modal_sandboxes_checked")


@pytest.fixture
def wheels(tmp_path: Path) -> Path:
    directory = tmp_path / "wheels"
    make_wheel(directory, "ame-snap", "1.0", "from the wheel")
    make_wheel(directory, "ame-other", "1.0", "other")
    return directory


def backend(double: ModalDouble, wheels: Path, app: str, **options: object) -> ModalBackend:
    env = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheels), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    return ModalBackend(app_name=app, ssl_context=double.ssl_context(), env=env, **options)  # type: ignore[arg-type]


def sandbox_of(double: ModalDouble, backend: ModalBackend) -> object:
    assert backend.sandbox is not None
    return double.sandboxes[backend.sandbox.object_id]


async def imported(executor: AsyncExecutor) -> str:
    result = await executor.run("import ame_snap\name_snap.VALUE")
    assert result.value is not None, result.error
    return str(eval(result.value.text))


async def test_the_second_sandbox_for_a_requirement_set_starts_from_the_snapshot(
    modal_double: ModalDouble, wheels: Path
) -> None:
    app = "snapshots-first-second"
    existing = set(modal_double.snapshots)
    first = backend(modal_double, wheels, app, requirements=["ame-snap"])
    async with AsyncExecutor(first) as executor:
        sandbox = sandbox_of(modal_double, first)
        assert sandbox.pip_log.exists(), "the first sandbox did not install"  # type: ignore[attr-defined]
        assert executor.packages.installed == ["ame-snap"]
        assert await imported(executor) == "from the wheel"
        assert "requirements" in executor.startup_timings and "snapshot" in first.timings
    (snapshot_id,) = set(modal_double.snapshots) - existing
    entries = await SnapshotStore(app, SnapshotPolicy()).entries()
    assert [(e.image_id, e.requirements) for e in entries] == [(snapshot_id, ("ame-snap",))]

    calls_before = len(modal_double.calls)
    second = backend(modal_double, wheels, app, requirements=["ame-snap"])
    async with AsyncExecutor(second) as executor:
        sandbox = sandbox_of(modal_double, second)
        calls = modal_double.calls[calls_before:]
        assert second.requirements_ready and second.snapshot_image_id == snapshot_id
        assert sandbox.request.definition.image_id == snapshot_id  # type: ignore[attr-defined]
        assert "ImageFromId" in calls and "TaskSnapshotFilesystem" not in calls
        assert not sandbox.pip_log.exists(), "the second sandbox ran pip"  # type: ignore[attr-defined]
        assert executor.packages.installed == [] and executor.packages.already_present == []
        assert "requirements" not in executor.startup_timings
        assert await imported(executor) == "from the wheel"
    assert set(modal_double.snapshots) - existing == {snapshot_id}


async def test_the_key_is_the_set_not_its_order_and_another_set_installs(
    modal_double: ModalDouble, wheels: Path
) -> None:
    app = "snapshots-sets"
    async with AsyncExecutor(backend(modal_double, wheels, app, requirements=["ame-snap", "ame-other"])):
        pass
    same = backend(modal_double, wheels, app, requirements=["ame-other", "ame-snap"])
    async with AsyncExecutor(same):
        assert same.snapshot_image_id is not None
    other = backend(modal_double, wheels, app, requirements=["ame-snap"])
    async with AsyncExecutor(other) as executor:
        assert other.snapshot_image_id is None
        assert executor.packages.installed == ["ame-snap"]
    assert len(await SnapshotStore(app, SnapshotPolicy()).entries()) == 2


async def test_a_snapshot_modal_no_longer_has_falls_back_to_installing(
    modal_double: ModalDouble, wheels: Path
) -> None:
    app = "snapshots-stale"
    async with AsyncExecutor(backend(modal_double, wheels, app, requirements=["ame-snap"])):
        pass
    (old,) = [e.image_id for e in await SnapshotStore(app, SnapshotPolicy()).entries()]
    del modal_double.snapshots[old]  # expired on Modal's side

    again = backend(modal_double, wheels, app, requirements=["ame-snap"])
    async with AsyncExecutor(again) as executor:
        assert again.snapshot_image_id is None
        assert executor.packages.installed == ["ame-snap"]
        assert await imported(executor) == "from the wheel"
    (new,) = [e.image_id for e in await SnapshotStore(app, SnapshotPolicy()).entries()]
    assert new != old and new in modal_double.snapshots


async def test_an_entry_past_max_age_is_dropped_and_reinstalled(
    modal_double: ModalDouble, wheels: Path
) -> None:
    app = "snapshots-age"
    policy = SnapshotPolicy(max_age=3600)
    async with AsyncExecutor(backend(modal_double, wheels, app, requirements=["ame-snap"], snapshots=policy)):
        pass
    store = SnapshotStore(app, policy)
    (entry,) = await store.entries()
    # Age the entry as if made two hours ago (what the Dict holds is JSON).
    fields = json.loads(entry.to_json())
    fields["created"] = time.time() - 7200
    await store._dict.put.aio(entry.key, json.dumps(fields))

    aged = backend(modal_double, wheels, app, requirements=["ame-snap"], snapshots=policy)
    async with AsyncExecutor(aged) as executor:
        assert aged.snapshot_image_id is None
        assert executor.packages.installed == ["ame-snap"]
    (fresh,) = await store.entries()
    assert fresh.age() < 60 and fresh.image_id != entry.image_id


async def test_max_entries_keeps_the_newest(modal_double: ModalDouble, wheels: Path) -> None:
    app = "snapshots-count"
    policy = SnapshotPolicy(max_entries=1)
    for requirements in (["ame-snap"], ["ame-other"]):
        async with AsyncExecutor(
            backend(modal_double, wheels, app, requirements=requirements, snapshots=policy)
        ):
            pass
    (kept,) = await SnapshotStore(app, policy).entries()
    assert kept.requirements == ("ame-other",)


async def test_snapshots_off_installs_in_every_sandbox(modal_double: ModalDouble, wheels: Path) -> None:
    app = "snapshots-off"
    for _ in range(2):
        off = backend(modal_double, wheels, app, requirements=["ame-snap"], snapshots=False)
        async with AsyncExecutor(off) as executor:
            assert executor.packages.installed == ["ame-snap"]
            assert sandbox_of(modal_double, off).pip_log.exists()  # type: ignore[attr-defined]
    assert await SnapshotStore(app, SnapshotPolicy()).entries() == []


async def test_the_pool_warms_its_sandboxes_from_the_snapshot(
    modal_double: ModalDouble, wheels: Path
) -> None:
    app = "snapshots-pool"
    async with AsyncExecutor(backend(modal_double, wheels, app, requirements=["ame-snap"])):
        pass
    snapshots = set(modal_double.snapshots)
    made: list[ModalBackend] = []

    def factory() -> ModalBackend:
        made.append(backend(modal_double, wheels, app, requirements=["ame-snap"]))
        return made[-1]

    async with (
        SandboxPool(factory, min_idle=2, max_size=2) as pool,
        pool.session() as one,
        pool.session() as two,
    ):
        assert await imported(one) == "from the wheel"
        assert await imported(two) == "from the wheel"
    assert len(made) >= 2 and all(b.snapshot_image_id is not None for b in made[:2])
    assert set(modal_double.snapshots) == snapshots, "a pooled sandbox installed and snapshotted again"


async def test_the_key_changes_with_the_base_image() -> None:
    assert snapshot_key("im-a", ["x", "y"]) == snapshot_key("im-a", ["y", " x"])
    assert snapshot_key("im-a", ["x"]) != snapshot_key("im-b", ["x"])


async def test_files_and_env_go_through_a_modal_sandbox(modal_double: ModalDouble, wheels: Path) -> None:
    modal = backend(modal_double, wheels, "files-env")
    async with AsyncExecutor(modal, env={"STAGE": "test"}) as executor:
        data = os.urandom(5 * 2**20 + 17)
        info = await executor.upload(data, "inputs/blob.bin")
        assert info.size == len(data)
        assert await executor.download("inputs/blob.bin") == data
        assert [e.name for e in await executor.listdir("inputs")] == ["blob.bin"]
        await executor.remove("inputs", recursive=True)
        seen = await executor.run("import os\n(os.environ['STAGE'], os.environ.get('ONE'))", env={"ONE": "1"})
        assert seen.value is not None and eval(seen.value.text) == ("test", "1")
        after = await executor.run("str(os.environ.get('ONE'))")
        assert after.value is not None and after.value.text == "'None'"
        # The sandbox's own env (ModalBackend(env=)) reaches the kernel process.
        pip = await executor.run("os.environ['PIP_NO_INDEX']")
        assert pip.value is not None and pip.value.text == "'1'"
