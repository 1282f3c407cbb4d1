"""The control-plane double: grpclib servicers for ModalClient and TaskCommandRouter."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import inspect
import json
import shutil
import ssl
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from grpclib import GRPCError, Status
from grpclib.server import Server, Stream
from modal_proto import api_pb2, task_command_router_pb2
from modal_proto.api_grpc import ModalClientBase
from modal_proto.task_command_router_grpc import TaskCommandRouterBase

from .sandboxes import FakeSandbox
from .tls import make_certificate

try:
    from modal._image import LATEST_IMAGE_BUILDER_VERSION
except ImportError:  # modal < 1.6 names no latest version; 2025.06 is the newest it knows
    LATEST_IMAGE_BUILDER_VERSION = "2025.06"

T = TypeVar("T")
LIST_PAGE_SIZE = 2  # small, so list paging (before_timestamp) is exercised


class _ClosingServer(Server):
    """grpclib's ``Server.close()`` stops listening but leaves accepted
    connections open (the ``modal`` client keeps its channels): this one closes
    them too, so the double's loop ends with no socket left behind."""

    def __init__(self, handlers: list[Any]) -> None:
        super().__init__(handlers)
        self.transports: set[asyncio.BaseTransport] = set()

    def _protocol_factory(self) -> Any:
        protocol = super()._protocol_factory()
        made = protocol.connection_made

        def connection_made(transport: asyncio.BaseTransport) -> None:
            self.transports.add(transport)
            made(transport)

        protocol.connection_made = connection_made
        return protocol

    async def shutdown(self) -> None:
        self.close()
        # Before waiting: from Python 3.12 on, wait_closed() waits for every
        # accepted connection to end.
        for transport in self.transports:
            transport.close()
        await self.wait_closed()
        await asyncio.sleep(0.05)  # let each transport run its connection_lost and close its socket


def fake_jwt(lifetime: float = 3600) -> str:
    """An unsigned JWT with an ``exp`` claim: what the client decodes."""

    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part({'exp': int(time.time() + lifetime)})}.sig"


def _recording_servicer(base: type[T], implemented: type[Any], unimplemented: list[str]) -> type[T]:
    """A concrete servicer: methods of ``implemented``, and every other RPC answering UNIMPLEMENTED."""

    def make_stub(name: str) -> Callable[..., Coroutine[Any, Any, None]]:
        async def unimplemented_rpc(self: Any, stream: Stream[Any, Any]) -> None:
            unimplemented.append(name)
            raise GRPCError(Status.UNIMPLEMENTED, f"the Modal double does not implement {name}")

        return unimplemented_rpc

    methods = {
        name: make_stub(name)
        for name in getattr(base, "__abstractmethods__", ())
        if not hasattr(implemented, name)
    }
    return type(f"Double{base.__name__}", (implemented, base), methods)


class _ControlPlane:
    """The ModalClient RPCs this package uses (V2 sandboxes, and V1 ones for GPUs)."""

    def __init__(self, double: ModalDouble) -> None:
        self.double = double

    async def ClientHello(self, stream: Stream[Any, Any]) -> None:
        await self.double.checkpoint("ClientHello")
        await stream.recv_message()
        await stream.send_message(
            api_pb2.ClientHelloResponse(image_builder_version=LATEST_IMAGE_BUILDER_VERSION)
        )

    async def AuthTokenGet(self, stream: Stream[Any, Any]) -> None:
        await self.double.checkpoint("AuthTokenGet")
        await stream.recv_message()
        await stream.send_message(api_pb2.AuthTokenGetResponse(token=fake_jwt()))

    async def EnvironmentGetOrCreate(self, stream: Stream[Any, Any]) -> None:
        await self.double.checkpoint("EnvironmentGetOrCreate")
        await stream.recv_message()
        settings = api_pb2.EnvironmentSettings(image_builder_version=LATEST_IMAGE_BUILDER_VERSION)
        metadata = api_pb2.EnvironmentMetadata(name="main", settings=settings)
        await stream.send_message(
            api_pb2.EnvironmentGetOrCreateResponse(environment_id="en-double", metadata=metadata)
        )

    async def AppGetOrCreate(self, stream: Stream[Any, Any]) -> None:
        await self.double.checkpoint("AppGetOrCreate")
        request = await stream.recv_message()
        apps = self.double.apps
        if request.app_name not in apps:
            if request.object_creation_type == api_pb2.OBJECT_CREATION_TYPE_UNSPECIFIED:
                raise GRPCError(Status.NOT_FOUND, f"App '{request.app_name}' not found")
            apps[request.app_name] = f"ap-{uuid.uuid4().hex[:22]}"
        await stream.send_message(api_pb2.AppGetOrCreateResponse(app_id=apps[request.app_name]))

    async def ImageGetOrCreate(self, stream: Stream[Any, Any]) -> None:
        await self.double.checkpoint("ImageGetOrCreate")
        request = await stream.recv_message()
        self.double.images.append(request.image)
        # Like Modal: the same definition is the same image (its id names its content).
        digest = hashlib.sha256(request.image.SerializeToString(deterministic=True)).hexdigest()
        image_id = f"im-{digest[:24]}"
        if self.double.image_build_log:  # not built yet: the client joins the build's log stream
            await stream.send_message(api_pb2.ImageGetOrCreateResponse(image_id=image_id))
            return
        done = api_pb2.GenericResult(status=api_pb2.GenericResult.GENERIC_STATUS_SUCCESS)
        await stream.send_message(api_pb2.ImageGetOrCreateResponse(image_id=image_id, result=done))

    async def ImageJoinStreaming(self, stream: Stream[Any, Any]) -> None:
        await self.double.checkpoint("ImageJoinStreaming")
        await stream.recv_message()
        for number, line in enumerate(self.double.image_build_log, 1):
            log = api_pb2.TaskLogs(data=line + "\n", file_descriptor=api_pb2.FILE_DESCRIPTOR_STDOUT)
            await stream.send_message(
                api_pb2.ImageJoinStreamingResponse(task_logs=[log], entry_id=str(number))
            )
            await asyncio.sleep(0.05)  # a build writes over time
        done = api_pb2.GenericResult(status=api_pb2.GenericResult.GENERIC_STATUS_SUCCESS)
        await stream.send_message(api_pb2.ImageJoinStreamingResponse(result=done, eof=True))

    async def ImageFromId(self, stream: Stream[Any, Any]) -> None:
        """Known: the filesystem snapshots the double made; any other id is NOT_FOUND."""
        await self.double.checkpoint("ImageFromId")
        request = await stream.recv_message()
        if request.image_id not in self.double.snapshots:
            raise GRPCError(Status.NOT_FOUND, f"Image {request.image_id} not found")
        await stream.send_message(api_pb2.ImageFromIdResponse(image_id=request.image_id))

    # -- modal.Dict: one store per name; keys and values are the client's serialized bytes.

    async def DictGetOrCreate(self, stream: Stream[Any, Any]) -> None:
        await self.double.checkpoint("DictGetOrCreate")
        request = await stream.recv_message()
        name = request.deployment_name
        if name not in self.double.dict_ids:
            if request.object_creation_type == api_pb2.OBJECT_CREATION_TYPE_UNSPECIFIED:
                raise GRPCError(Status.NOT_FOUND, f"Dict '{name}' not found")
            dict_id = f"di-{uuid.uuid4().hex[:22]}"
            self.double.dict_ids[name] = dict_id
            self.double.dicts[dict_id] = {}
        dict_id = self.double.dict_ids[name]
        await stream.send_message(
            api_pb2.DictGetOrCreateResponse(dict_id=dict_id, metadata=api_pb2.DictMetadata(name=name))
        )

    def _dict(self, dict_id: str) -> dict[bytes, bytes]:
        store = self.double.dicts.get(dict_id)
        if store is None:
            raise GRPCError(Status.NOT_FOUND, f"Dict {dict_id} not found")
        return store

    async def DictGet(self, stream: Stream[Any, Any]) -> None:
        await self.double.checkpoint("DictGet")
        request = await stream.recv_message()
        store = self._dict(request.dict_id)
        found = request.key in store
        await stream.send_message(api_pb2.DictGetResponse(found=found, value=store.get(request.key, b"")))

    async def DictContains(self, stream: Stream[Any, Any]) -> None:
        await self.double.checkpoint("DictContains")
        request = await stream.recv_message()
        found = request.key in self._dict(request.dict_id)
        await stream.send_message(api_pb2.DictContainsResponse(found=found))

    async def DictUpdate(self, stream: Stream[Any, Any]) -> None:
        await self.double.checkpoint("DictUpdate")
        request = await stream.recv_message()
        store = self._dict(request.dict_id)
        created = True
        for entry in request.updates:
            if request.if_not_exists and entry.key in store:
                created = False
                continue
            store[entry.key] = entry.value
        await stream.send_message(api_pb2.DictUpdateResponse(created=created))

    async def DictPop(self, stream: Stream[Any, Any]) -> None:
        await self.double.checkpoint("DictPop")
        request = await stream.recv_message()
        store = self._dict(request.dict_id)
        found = request.key in store
        await stream.send_message(api_pb2.DictPopResponse(found=found, value=store.pop(request.key, b"")))

    async def DictLen(self, stream: Stream[Any, Any]) -> None:
        await self.double.checkpoint("DictLen")
        request = await stream.recv_message()
        await stream.send_message(api_pb2.DictLenResponse(len=len(self._dict(request.dict_id))))

    async def DictContents(self, stream: Stream[Any, Any]) -> None:
        await self.double.checkpoint("DictContents")
        request = await stream.recv_message()
        for key, value in list(self._dict(request.dict_id).items()):
            await stream.send_message(
                api_pb2.DictEntry(key=key if request.keys else b"", value=value if request.values else b"")
            )

    async def SecretGetOrCreate(self, stream: Stream[Any, Any]) -> None:
        await self.double.checkpoint("SecretGetOrCreate")
        request = await stream.recv_message()
        if request.deployment_name:
            if request.deployment_name not in self.double.named_secrets:
                raise GRPCError(Status.NOT_FOUND, f"Secret '{request.deployment_name}' not found")
            env = self.double.named_secrets[request.deployment_name]
        else:
            env = dict(request.env_dict)
        secret_id = f"st-{uuid.uuid4().hex[:22]}"
        self.double.secret_values[secret_id] = dict(env)
        await stream.send_message(api_pb2.SecretGetOrCreateResponse(secret_id=secret_id))

    async def SandboxCreate(self, stream: Stream[Any, Any]) -> None:
        """V1 sandboxes: the client uses them for GPUs (V2 has none), whatever its setting."""
        await self.double.checkpoint("SandboxCreate")
        request: api_pb2.SandboxCreateRequest = await stream.recv_message()
        sandbox = await self._start_sandbox(request, "sb-v1-")
        metadata = api_pb2.SandboxHandleMetadata(app_id=sandbox.app_id)
        await stream.send_message(
            api_pb2.SandboxCreateResponse(sandbox_id=sandbox.sandbox_id, metadata=metadata)
        )

    async def TaskGetCommandRouterAccess(self, stream: Stream[Any, Any]) -> None:
        await self.double.checkpoint("TaskGetCommandRouterAccess")
        await stream.recv_message()
        await stream.send_message(
            api_pb2.TaskGetCommandRouterAccessResponse(url=self.double.url, jwt=fake_jwt())
        )

    async def SandboxCreateV2(self, stream: Stream[Any, Any]) -> None:
        await self.double.checkpoint("SandboxCreateV2")
        request: api_pb2.SandboxCreateV2Request = await stream.recv_message()
        sandbox = await self._start_sandbox(request, "sb-v2-")
        access = api_pb2.CommandRouterAccess(url=self.double.url, jwt=fake_jwt())
        await stream.send_message(
            api_pb2.SandboxCreateV2Response(
                sandbox_id=sandbox.sandbox_id,
                task_id=sandbox.task_id,
                command_router_access=access,
                metadata=api_pb2.SandboxHandleMetadata(app_id=sandbox.app_id),
            )
        )

    async def _start_sandbox(self, request: Any, prefix: str) -> FakeSandbox:
        env: dict[str, str] = dict(request.definition.environment_variables.contents)
        # secret_sources is newer than modal 1.6.0's protocol.
        for source in getattr(request, "secret_sources", ()):
            if source.secret_id:
                env.update(self.double.secret_values.get(source.secret_id, {}))
            env.update(source.env.contents)
        for secret_id in request.definition.secret_ids:
            env.update(self.double.secret_values.get(secret_id, {}))
        sandbox_id = f"{prefix}{uuid.uuid4().hex}"
        sandbox = FakeSandbox(
            sandbox_id=sandbox_id,
            task_id=f"ta-{uuid.uuid4().hex[:22]}",
            app_id=request.app_id,
            request=request,
            env=env,
            tags={tag.tag_name: tag.tag_value for tag in request.tags},
            home=Path(self.double.directory, "sandboxes", sandbox_id),
        )
        await asyncio.to_thread(
            sandbox.make_filesystem, self.double.snapshots.get(request.definition.image_id)
        )
        self.double.sandboxes[sandbox.sandbox_id] = sandbox
        await sandbox.start(self.double.server_tls)
        return sandbox

    def _sandbox(self, sandbox_id: str) -> FakeSandbox:
        sandbox = self.double.sandboxes.get(sandbox_id)
        if sandbox is None:
            raise GRPCError(Status.NOT_FOUND, f"Sandbox {sandbox_id} not found")
        return sandbox

    async def SandboxGetTaskIdV2(self, stream: Stream[Any, Any]) -> None:
        await self._get_task_id(stream, "SandboxGetTaskIdV2")

    async def SandboxGetTaskId(self, stream: Stream[Any, Any]) -> None:  # V1 sandboxes (GPU ones)
        await self._get_task_id(stream, "SandboxGetTaskId")

    async def _get_task_id(self, stream: Stream[Any, Any], rpc: str) -> None:
        await self.double.checkpoint(rpc)
        sandbox = self._sandbox((await stream.recv_message()).sandbox_id)
        await stream.send_message(api_pb2.SandboxGetTaskIdResponse(task_id=sandbox.task_id))

    async def SandboxGetCommandRouterAccess(self, stream: Stream[Any, Any]) -> None:
        await self.double.checkpoint("SandboxGetCommandRouterAccess")
        await stream.recv_message()
        await stream.send_message(
            api_pb2.SandboxGetCommandRouterAccessResponse(url=self.double.url, jwt=fake_jwt())
        )

    async def SandboxWaitV2(self, stream: Stream[Any, Any]) -> None:
        await self._wait(stream, "SandboxWaitV2")

    async def SandboxWait(self, stream: Stream[Any, Any]) -> None:  # V1 sandboxes (GPU ones)
        await self._wait(stream, "SandboxWait")

    async def _wait(self, stream: Stream[Any, Any], rpc: str) -> None:
        await self.double.checkpoint(rpc)
        request = await stream.recv_message()
        sandbox = self._sandbox(request.sandbox_id)
        deadline = time.monotonic() + max(request.timeout, 0)
        while not sandbox.result().status and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        metadata = api_pb2.SandboxHandleMetadata(app_id=sandbox.app_id, result=sandbox.result())
        await stream.send_message(api_pb2.SandboxWaitResponse(result=sandbox.result(), metadata=metadata))

    async def SandboxGetTunnelsV2(self, stream: Stream[Any, Any]) -> None:
        await self._get_tunnels(stream, "SandboxGetTunnelsV2")

    async def SandboxGetTunnels(self, stream: Stream[Any, Any]) -> None:  # V1 sandboxes (GPU ones)
        await self._get_tunnels(stream, "SandboxGetTunnels")

    async def _get_tunnels(self, stream: Stream[Any, Any], rpc: str) -> None:
        await self.double.checkpoint(rpc)
        sandbox = self._sandbox((await stream.recv_message()).sandbox_id)
        tunnels = [
            api_pb2.TunnelData(host="127.0.0.1", port=proxy.port, container_port=container)
            for container, proxy in sandbox.proxies.items()
        ]
        await stream.send_message(
            api_pb2.SandboxGetTunnelsResponse(result=api_pb2.GenericResult(), tunnels=tunnels)
        )

    async def SandboxTerminateV2(self, stream: Stream[Any, Any]) -> None:
        await self._terminate(stream, "SandboxTerminateV2")

    async def SandboxTerminate(self, stream: Stream[Any, Any]) -> None:  # V1 sandboxes (GPU ones)
        await self._terminate(stream, "SandboxTerminate")

    async def _terminate(self, stream: Stream[Any, Any], rpc: str) -> None:
        await self.double.checkpoint(rpc)
        sandbox = self._sandbox((await stream.recv_message()).sandbox_id)
        await sandbox.terminate()
        await stream.send_message(api_pb2.SandboxTerminateResponse(existing_result=sandbox.result()))

    async def SandboxTagsGetV2(self, stream: Stream[Any, Any]) -> None:
        await self._get_tags(stream, "SandboxTagsGetV2")

    async def SandboxTagsGet(self, stream: Stream[Any, Any]) -> None:  # V1 sandboxes (GPU ones)
        await self._get_tags(stream, "SandboxTagsGet")

    async def _get_tags(self, stream: Stream[Any, Any], rpc: str) -> None:
        await self.double.checkpoint(rpc)
        sandbox = self._sandbox((await stream.recv_message()).sandbox_id)
        tags = [api_pb2.SandboxTag(tag_name=k, tag_value=v) for k, v in sandbox.tags.items()]
        await stream.send_message(api_pb2.SandboxTagsGetResponse(tags=tags))

    async def SandboxListV2(self, stream: Stream[Any, Any]) -> None:
        await self._list(stream, "SandboxListV2")

    async def SandboxList(self, stream: Stream[Any, Any]) -> None:  # V1 sandboxes (GPU ones)
        await self._list(stream, "SandboxList")

    async def _list(self, stream: Stream[Any, Any], rpc: str) -> None:
        await self.double.checkpoint(rpc)
        request: api_pb2.SandboxListRequest = await stream.recv_message()
        self.double.list_requests.append(request)
        wanted = {tag.tag_name: tag.tag_value for tag in request.tags}
        matches = [
            sandbox
            for sandbox in self.double.sandboxes.values()
            if (not request.app_id or sandbox.app_id == request.app_id)
            and all(sandbox.tags.get(k) == v for k, v in wanted.items())
            and (request.include_finished or sandbox.alive())
            and (not request.before_timestamp or sandbox.created_at < request.before_timestamp)
        ]
        matches.sort(key=lambda sandbox: sandbox.created_at, reverse=True)
        infos = [
            api_pb2.SandboxInfo(
                id=sandbox.sandbox_id,
                created_at=sandbox.created_at,
                app_id=sandbox.app_id,
                tags=[api_pb2.SandboxTag(tag_name=k, tag_value=v) for k, v in sandbox.tags.items()],
                metadata=api_pb2.SandboxHandleMetadata(app_id=sandbox.app_id, result=sandbox.result()),
            )
            for sandbox in matches[:LIST_PAGE_SIZE]
        ]
        await stream.send_message(api_pb2.SandboxListResponse(sandboxes=infos))


class _Router:
    """The task command router RPCs this package uses."""

    def __init__(self, double: ModalDouble) -> None:
        self.double = double

    async def SandboxWaitUntilReady(self, stream: Stream[Any, Any]) -> None:
        await self.double.checkpoint("SandboxWaitUntilReady")
        request = await stream.recv_message()
        sandbox = next((s for s in self.double.sandboxes.values() if s.task_id == request.task_id), None)
        if sandbox is None:
            raise GRPCError(Status.NOT_FOUND, f"task {request.task_id} not found")
        deadline = time.monotonic() + (request.timeout or 300)
        while not await sandbox.ready():
            if not sandbox.alive():
                raise GRPCError(Status.FAILED_PRECONDITION, "the sandbox exited before it was ready")
            if time.monotonic() > deadline:
                raise GRPCError(Status.DEADLINE_EXCEEDED, "the sandbox did not become ready in time")
            await asyncio.sleep(0.05)
        await stream.send_message(
            task_command_router_pb2.SandboxWaitUntilReadyTcrResponse(ready_at=time.time())
        )

    async def TaskSnapshotFilesystem(self, stream: Stream[Any, Any]) -> None:
        """A snapshot is a copy of the sandbox's filesystem (its ``root``), an image id for it."""
        await self.double.checkpoint("TaskSnapshotFilesystem")
        request = await stream.recv_message()
        sandbox = next((s for s in self.double.sandboxes.values() if s.task_id == request.task_id), None)
        if sandbox is None:
            raise GRPCError(Status.NOT_FOUND, f"task {request.task_id} not found")
        image_id = f"im-snap-{uuid.uuid4().hex[:20]}"
        target = Path(self.double.directory, "snapshots", image_id)
        await asyncio.to_thread(shutil.copytree, sandbox.root, target, symlinks=True)
        self.double.snapshots[image_id] = target
        await stream.send_message(task_command_router_pb2.TaskSnapshotFilesystemResponse(image_id=image_id))


class ModalDouble:
    """Serves the double on 127.0.0.1 from its own thread and event loop.

    Attributes:
        url: ``http://127.0.0.1:<port>``, for ``MODAL_SERVER_URL``.
        sandboxes: every sandbox created, by id.
        apps: app name -> app id.
        named_secrets: name -> env dict, for ``modal.Secret.from_name``.
        unimplemented: names of RPCs the client called that the double does not implement.
        calls: names of the RPCs called, in order.
        pauses: RPC name -> seconds each call of it is held before it is served.
        image_build_log: lines an image build writes; when set, every image is
            built (not found ready), its log streamed to the client.
        snapshots: image id -> the directory a filesystem snapshot copied (a
            sandbox created from that image starts with a copy of it as its
            ``root``); delete an entry to make the snapshot "expire".
        dicts: dict id -> its entries (serialized key -> serialized value);
            ``dict_ids``: name -> dict id.
        failures: RPC name -> a ``GRPCError`` that every call of it answers (a
            fresh copy each time) until the entry is removed, e.g.
            ``failures["AppGetOrCreate"] = GRPCError(Status.UNAUTHENTICATED, "bad token")``.
            The client retries some statuses (UNAVAILABLE, INTERNAL, ...) a few
            times first; it does not retry UNAUTHENTICATED, NOT_FOUND, INVALID_ARGUMENT.
    """

    def __init__(self) -> None:
        self.sandboxes: dict[str, FakeSandbox] = {}
        self.apps: dict[str, str] = {}
        self.named_secrets: dict[str, dict[str, str]] = {}
        self.secret_values: dict[str, dict[str, str]] = {}
        self.images: list[api_pb2.Image] = []
        self.image_build_log: list[str] = []
        self.list_requests: list[api_pb2.SandboxListRequest] = []
        self.unimplemented: list[str] = []
        self.calls: list[str] = []
        self.pauses: dict[str, float] = {}
        self.failures: dict[str, GRPCError] = {}
        self.snapshots: dict[str, Path] = {}
        self.dicts: dict[str, dict[bytes, bytes]] = {}
        self.dict_ids: dict[str, str] = {}
        self._directory = tempfile.TemporaryDirectory(prefix="modal-double-")
        self.directory = Path(self._directory.name)
        self.cert, key = make_certificate(Path(self._directory.name))
        self.server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.server_tls.load_cert_chain(self.cert, key)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="modal-double", daemon=True)
        self._server: _ClosingServer | None = None
        self.url = ""

    async def checkpoint(self, rpc: str) -> None:
        """Record an RPC; hold it for ``pauses[rpc]`` seconds, then fail it with ``failures[rpc]``.

        Raises:
            GRPCError: a copy of ``failures[rpc]``, if a test set one.
        """
        self.calls.append(rpc)
        pause = self.pauses.get(rpc)
        if pause:
            await asyncio.sleep(pause)
        failure = self.failures.get(rpc)
        if failure is not None:
            raise GRPCError(failure.status, failure.message, failure.details)

    @contextmanager
    def failing(self, rpc: str, status: Status, message: str) -> Iterator[None]:
        """Within the block, every call of ``rpc`` answers ``status`` (see ``failures``)."""
        self.failures[rpc] = GRPCError(status, message)
        try:
            yield
        finally:
            del self.failures[rpc]

    def ssl_context(self) -> ssl.SSLContext:
        """A client TLS context that trusts the tunnels' certificate."""
        return ssl.create_default_context(cafile=str(self.cert))

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        """Run ``coro`` on the double's loop (from another thread) and wait."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> ModalDouble:
        self._thread.start()
        self.call(self._serve())
        return self

    async def _serve(self) -> None:
        control = _recording_servicer(ModalClientBase, _ControlPlane, self.unimplemented)(self)
        router = _recording_servicer(TaskCommandRouterBase, _Router, self.unimplemented)(self)
        self._server = _ClosingServer([control, router])
        await self._server.start("127.0.0.1", 0)
        port = self._server._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"

    def live_sandboxes(self) -> list[str]:
        return [sandbox_id for sandbox_id, sandbox in self.sandboxes.items() if sandbox.alive()]

    async def _terminate_all(self) -> list[str]:
        alive = self.live_sandboxes()
        await asyncio.gather(*(sandbox.terminate() for sandbox in self.sandboxes.values()))
        return alive

    def stop(self) -> list[str]:
        """Terminate every sandbox, stop serving; return the ids that were still alive."""
        alive = self.call(self._terminate_all())
        if self._server is not None:
            self.call(self._server.shutdown())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()
        self._directory.cleanup()
        return alive


def implemented_rpcs() -> list[str]:
    """Names of the RPCs the double implements (for documentation and tests)."""
    return sorted(
        name
        for cls in (_ControlPlane, _Router)
        for name, _ in inspect.getmembers(cls, inspect.iscoroutinefunction)
        if name[0].isupper()
    )
