"""ModalBackend: a Kernel Gateway in a Modal Sandbox, driven only through ``.aio`` calls.

Every Modal call here is the ``.aio`` form, so no ``AsyncUsageWarning`` can fire
and the event loop never stalls on Modal's synchronous wrappers.

Cost safety: each sandbox is tagged (package, app, executor id, creation time),
is terminated if starting fails or is cancelled at any point (including while
``Sandbox.create`` is in flight: the create is allowed to finish and what it
returns is terminated), and is terminated by :meth:`ModalBackend.aclose`.
:func:`reap` finds and terminates tagged sandboxes left by crashed processes.

Modal's exceptions do not leave this module: :func:`_modal_errors` translates
them into :class:`~async_modal_exec.BackendError` and its subclasses, with the
original as ``__cause__``.
"""

from __future__ import annotations

import logging
import secrets
import ssl
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import anyio

from .._extras import require

require("modal", "ModalBackend")

import grpclib
import modal
from grpclib.exceptions import ProtocolError as GrpcProtocolError
from grpclib.exceptions import StreamTerminatedError

from .. import launcher
from .._shield import run_shielded
from .._timing import record_phase
from ..environment import checked_env
from ..errors import (
    BackendAuthError,
    BackendError,
    BackendInvalidArgument,
    BackendNotFound,
    BackendStartError,
    BackendUnreachable,
    ExecutorStateError,
)
from ..packages import requirement_from_spec
from .base import Backend, GatewayEndpoint
from .modal_defaults import DEFAULT_APP_NAME, DEFAULT_SANDBOX_TIMEOUT
from .modal_snapshots import SnapshotEntry, SnapshotPolicy, SnapshotStore, snapshot_key

logger = logging.getLogger("async_modal_exec.startup")

__all__ = [
    "TAG_PACKAGE",
    "ModalBackend",
    "ReapedSandbox",
    "SnapshotPolicy",
    "default_image",
    "reap",
    "reap_modal_sandboxes",
]

TAG_PACKAGE = "ame.package"
TAG_APP = "ame.app"
TAG_EXECUTOR = "ame.executor"
TAG_CREATED = "ame.created"
PACKAGE_TAG_VALUE = "async_modal_exec"


# Checked in order (modal's ConflictError is an InvalidError); what matches no row
# is a BackendError. Each of modal's errors is also a grpclib GRPCError (a
# transitional base in modal 1.x); raw gRPC errors are not expected but handled.
_TRANSLATIONS: tuple[tuple[tuple[type[Exception], ...], type[BackendError], str], ...] = (
    (
        (modal.exception.AuthError, modal.exception.PermissionDeniedError),
        BackendAuthError,
        "Modal refused the credentials (MODAL_TOKEN_ID / MODAL_TOKEN_SECRET, or ~/.modal.toml)",
    ),
    ((modal.exception.NotFoundError,), BackendNotFound, "Modal has no such object"),
    (
        (
            modal.exception.ConnectionError,
            modal.exception.ServiceError,
            StreamTerminatedError,
            GrpcProtocolError,
        ),
        BackendUnreachable,
        "Modal's API could not be reached or did not answer",
    ),
    (
        (modal.exception.SandboxTerminatedError, modal.exception.TimeoutError, modal.exception.ConflictError),
        BackendStartError,  # BackendError outside start()
        "the sandbox stopped, or was not ready in time",
    ),
    ((modal.exception.InvalidError,), BackendInvalidArgument, "Modal rejected an argument"),
)
_FOREIGN = (modal.exception.Error, grpclib.GRPCError, StreamTerminatedError, GrpcProtocolError)


def _translate(exc: Exception, what: str, *, starting: bool) -> BackendError:
    """Our exception for one of Modal's (or its gRPC library's), raised while doing ``what``."""
    ours, meaning = next(
        ((ours, meaning) for kinds, ours, meaning in _TRANSLATIONS if isinstance(exc, kinds)),
        (BackendError, "Modal failed"),
    )
    if ours is BackendStartError and not starting:
        ours = BackendError
    return ours(f"{what}: {meaning}: {type(exc).__name__}: {exc}")


@contextmanager
def _modal_errors(what: str, *, starting: bool = False) -> Iterator[None]:
    """Raise Modal's exceptions from the block as ours, the original as ``__cause__``.

    Cancellation and this package's own exceptions pass through untouched.
    """
    try:
        yield
    except _FOREIGN as exc:
        raise _translate(exc, what, starting=starting) from exc


# ipykernel 7.0-7.3 can leave a shell request unread until the next connection
# (its reply sent raw on the socket a stream reads: ipykernel issue 1554, fixed
# in 7.4, which needs Python 3.11): the kernel sits idle and never answers. On
# Python 3.10 this resolves to 6.x. The `local` extra has the same specifier.
IPYKERNEL_SPEC = "ipykernel>=6.29,!=7.0.*,!=7.1.*,!=7.2.*,!=7.3.*"


def default_image() -> modal.Image:
    """The default sandbox image: Debian slim with Kernel Gateway and ipykernel.

    The launcher needs nothing more: its sources are sent in a ``python -c`` command.
    """
    return modal.Image.debian_slim().uv_pip_install("jupyter_kernel_gateway", IPYKERNEL_SPEC)


class ModalBackend(Backend):
    """Starts a Jupyter Kernel Gateway in a new Modal Sandbox.

    ``create_kwargs`` are merged into the ``Sandbox.create`` call like this:

    * ``image`` defaults to :func:`default_image`; ``timeout`` to
      :data:`DEFAULT_SANDBOX_TIMEOUT` (one hour, where Modal's own default of
      300 s would end a pooled sandbox or a long agent mid-run); ``app``
      to ``await modal.App.lookup.aio(app_name, create_if_missing=True)``;
    * the gateway ``port`` is appended to the ``encrypted_ports`` you give;
    * a ``modal.Secret.from_dict({"KG_AUTH_TOKEN": <fresh token>})`` is appended
      to your ``secrets`` (yours are kept);
    * this package's tags are added to your ``tags``; ``readiness_probe``
      defaults to a TCP probe of the port;
    * everything else (gpu, cpu, memory, volumes, block_network, region,
      idle_timeout, ...) is passed through untouched.

    The sandbox runs this package's gateway launcher (``TCP_NODELAY``, IOPub
    limit lifted, IPC kernels), so executions are as fast as local ones plus
    the network.

    Requirements: with ``requirements``, every executor on the backend
    installs them when it starts (only what the image lacks). With
    ``snapshots`` (the default), the first sandbox that installed a set is
    snapshotted, and the next sandbox for the same image and set starts from
    that snapshot and installs nothing (see
    :mod:`~async_modal_exec.backends.modal_snapshots`).

    Args:
        app_name: Modal app to create sandboxes in.
        port: container port of the gateway.
        create_kwargs: keyword arguments for ``modal.Sandbox.create`` (see above).
        ssl_context: TLS context for the tunnel (None: the system's trust store).
        startup_timeout: seconds for the sandbox's readiness probe.
        idle_disconnect: executors on this backend close their kernel websocket
            after this many idle seconds (Modal counts an open tunnel
            connection as activity, which would defeat ``idle_timeout``).
        env: environment variables of the sandbox (merged into
            ``create_kwargs["env"]``).
        requirements: installer specs the sandbox must have (see above).
        snapshots: a :class:`SnapshotPolicy`, True (the default policy) or
            False (install in every sandbox).
    """

    def __init__(
        self,
        *,
        app_name: str = DEFAULT_APP_NAME,
        port: int = 8888,
        create_kwargs: Mapping[str, Any] | None = None,
        ssl_context: ssl.SSLContext | None = None,
        startup_timeout: int = 300,
        idle_disconnect: float | None = 60.0,
        env: Mapping[str, str] | None = None,
        requirements: Sequence[str] = (),
        snapshots: SnapshotPolicy | bool = True,
    ) -> None:
        if not 0 < port < 65536:
            raise ValueError(f"port must be a TCP port number, got {port}")
        if startup_timeout <= 0:
            raise ValueError("startup_timeout must be a positive number of seconds")
        self.app_name = app_name
        self.port = port
        self.create_kwargs = dict(create_kwargs or {})
        if env:
            self.create_kwargs["env"] = {**dict(self.create_kwargs.get("env") or {}), **checked_env(env)}
        if isinstance(requirements, str):
            raise TypeError("requirements must be a list of specs, not one string")
        self.requirements = tuple(requirement_from_spec(spec).spec for spec in requirements)
        self.snapshot_policy = (
            snapshots if isinstance(snapshots, SnapshotPolicy) else SnapshotPolicy() if snapshots else None
        )
        self.requirements_ready = False
        self.snapshot_image_id: str | None = None  # the snapshot this sandbox started from
        self._snapshot_key: str | None = None
        self._base_image_id: str | None = None
        self.ssl_context = ssl_context
        self.startup_timeout = int(startup_timeout)
        self.idle_disconnect = idle_disconnect
        self.executor_id = uuid.uuid4().hex[:16]
        self.timings: dict[str, float] = {}
        self.sandbox: modal.Sandbox | None = None
        self.token: str | None = None
        self._attach_id: str | None = None
        self._terminate_on_close = True
        self._started = False

    @classmethod
    def attach(
        cls,
        sandbox_id: str,
        token: str,
        *,
        port: int = 8888,
        ssl_context: ssl.SSLContext | None = None,
        terminate_on_close: bool = False,
    ) -> ModalBackend:
        """A backend for a sandbox that already runs (e.g. started by another process).

        Args:
            sandbox_id: the sandbox's id (``backend.sandbox.object_id`` where it was created).
            token: the gateway token of that sandbox (``backend.token`` where it was created).
            terminate_on_close: terminate the sandbox in :meth:`aclose` (default: leave it running).
        """
        backend = cls(port=port, ssl_context=ssl_context)
        backend._attach_id = sandbox_id
        backend.token = token
        backend._terminate_on_close = terminate_on_close
        return backend

    @property
    def sandbox_id(self) -> str | None:
        """The Modal sandbox's id once created or attached (re-attach with :meth:`attach`)."""
        if self.sandbox is not None:
            return str(self.sandbox.object_id)
        return self._attach_id

    async def _start_gateway(self) -> GatewayEndpoint:
        """Create (or attach to) the sandbox and return its gateway endpoint via the tunnel.

        Modal's exceptions are translated (the original is ``__cause__``).

        Raises:
            ExecutorStateError: started before.
            BackendAuthError: Modal refused the credentials.
            BackendNotFound: the sandbox to attach to (or a named secret, ...) does not exist.
            BackendInvalidArgument: Modal rejected an argument (``create_kwargs``, image, ...).
            BackendUnreachable: Modal's API could not be reached.
            BackendStartError: the sandbox stopped, was not ready within ``startup_timeout``,
                or has no tunnel for the port.
            BackendError: any other refusal of Modal (quota, ...).

        Cancelling the call, or any failure, terminates the sandbox created so
        far (shielded); a cancellation that lands during ``Sandbox.create``
        waits for the create to return, then terminates the new sandbox.
        """
        if self._started:
            raise ExecutorStateError("a ModalBackend can be started once")
        self._started = True
        try:
            what = (
                f"attaching to Modal sandbox {self._attach_id}"
                if self._attach_id is not None
                else f"creating a sandbox in Modal app {self.app_name!r}"
            )
            with _modal_errors(what, starting=True):
                if self._attach_id is not None:
                    began = time.monotonic()
                    self.sandbox = await modal.Sandbox.from_id.aio(self._attach_id)
                    record_phase(self.timings, "attach", began, logger, "modal ")
                else:
                    await self._create()
                return await self._endpoint()
        except BaseException:
            await self.aclose()
            raise

    async def _create(self) -> None:
        kwargs = dict(self.create_kwargs)
        self.token = secrets.token_urlsafe(32)
        began = time.monotonic()
        app = kwargs.pop("app", None)
        if app is None:
            app = await modal.App.lookup.aio(self.app_name, create_if_missing=True)
        record_phase(self.timings, "app_lookup", began, logger, "modal ")
        image = kwargs.pop("image", None) or default_image()
        if self.requirements and self.snapshot_policy is not None:
            image = await self._image_with_requirements(app, image)
        ports = list(kwargs.pop("encrypted_ports", None) or [])
        if self.port not in ports:
            ports.append(self.port)
        user_secrets = list(kwargs.pop("secrets", None) or [])
        token_secret = modal.Secret.from_dict({"KG_AUTH_TOKEN": self.token})
        tags = {
            **dict(kwargs.pop("tags", None) or {}),
            TAG_PACKAGE: PACKAGE_TAG_VALUE,
            TAG_APP: self.app_name,
            TAG_EXECUTOR: self.executor_id,
            TAG_CREATED: str(int(time.time())),
        }
        # The gateway side's sources travel in the command: the image need not have this package.
        command = await anyio.to_thread.run_sync(
            launcher.sandbox_command, "python", ("--ip=0.0.0.0", f"--port={self.port}")
        )
        began = time.monotonic()

        timeout = kwargs.pop("timeout", DEFAULT_SANDBOX_TIMEOUT)
        probe = kwargs.pop("readiness_probe", None) or modal.Probe.with_tcp(self.port)

        async def create_from(image: modal.Image) -> None:
            # Stores the sandbox itself, so a cancellation that arrives while the
            # call is in flight still finds it to terminate (start() does, on error).
            self.sandbox = await modal.Sandbox.create.aio(
                *command,
                app=app,
                image=image,
                timeout=timeout,
                encrypted_ports=ports,
                secrets=[*user_secrets, token_secret],
                tags=tags,
                readiness_probe=probe,
                **kwargs,
            )

        # Shielded: the sandbox is created even if we stop waiting for it.
        await run_shielded(create_from(image))
        assert self.sandbox is not None
        record_phase(self.timings, "create", began, logger, "modal ")
        logger.info("modal sandbox %s created", self.sandbox.object_id)
        began = time.monotonic()
        await self.sandbox.wait_until_ready.aio(timeout=self.startup_timeout)
        record_phase(self.timings, "ready", began, logger, "modal ")

    def _snapshot_store(self) -> SnapshotStore:
        assert self.snapshot_policy is not None
        return SnapshotStore(self.app_name, self.snapshot_policy)

    async def _image_with_requirements(self, app: modal.App, image: modal.Image) -> modal.Image:
        """The snapshot for ``image`` + ``requirements`` if one is remembered, else ``image`` (built)."""
        began = time.monotonic()
        await image.build.aio(app)
        self._base_image_id = image.object_id
        self._snapshot_key = snapshot_key(image.object_id, self.requirements)
        entry = await self._snapshot_store().lookup(self._snapshot_key)
        record_phase(self.timings, "snapshot_lookup", began, logger, "modal ")
        if entry is None:
            return image
        snapshot = modal.Image.from_id(entry.image_id)
        try:
            await snapshot.build.aio(app)  # loads it (ImageFromId): does Modal still have it?
        except modal.exception.NotFoundError:
            logger.warning("requirement snapshot %s is gone; starting from the base image", entry.image_id)
            await self._snapshot_store().drop(self._snapshot_key)
            return image
        logger.info(
            "starting from requirement snapshot %s (%s)", entry.image_id, ", ".join(self.requirements)
        )
        self.snapshot_image_id = entry.image_id
        self.requirements_ready = True
        return snapshot

    async def requirements_installed(self, installed: list[str]) -> None:
        """Snapshot the sandbox once it installed what its requirements lacked, and remember it.

        Nothing happens when nothing was installed, snapshots are off, or the
        sandbox already started from a snapshot. A failure is logged, not
        raised: the sandbox works either way, and the next one installs again.
        """
        if not installed or self.snapshot_policy is None or self._snapshot_key is None:
            return
        if self.sandbox is None or self.requirements_ready or self._base_image_id is None:
            return
        began = time.monotonic()
        store = self._snapshot_store()
        try:
            with _modal_errors(f"snapshotting sandbox {self.sandbox.object_id}"):
                if await store.lookup(self._snapshot_key) is not None:
                    logger.info("another sandbox snapshotted these requirements meanwhile: not again")
                    return
                image = await self.sandbox.snapshot_filesystem.aio(ttl=self.snapshot_policy.ttl)
                entry = SnapshotEntry(
                    key=self._snapshot_key,
                    image_id=image.object_id,
                    base_image_id=self._base_image_id,
                    requirements=tuple(sorted(self.requirements)),
                    created=time.time(),
                )
                stored = await store.remember(entry)
        except BackendError as exc:
            logger.warning("the requirement snapshot was not kept: %s", exc)
            return
        record_phase(self.timings, "snapshot", began, logger, "modal ")
        logger.info(
            "requirement snapshot %s %s",
            image.object_id,
            "remembered" if stored else "made (another was first)",
        )

    async def _endpoint(self) -> GatewayEndpoint:
        assert self.sandbox is not None
        began = time.monotonic()
        tunnels = await self.sandbox.tunnels.aio()
        tunnel = tunnels.get(self.port)
        if tunnel is None:
            code = await self.sandbox.poll.aio()
            state = "running" if code is None else f"exited with {code}"
            raise BackendStartError(
                f"sandbox {self.sandbox.object_id} ({state}) has no encrypted tunnel for port {self.port}"
            )
        record_phase(self.timings, "tunnel", began, logger, "modal ")
        return GatewayEndpoint(tunnel.url, self.token, self.ssl_context)

    async def aclose(self) -> None:
        """Terminate the sandbox (unless attached without ``terminate_on_close``) and wait.

        Safe to call twice. A termination that Modal refuses or that cannot
        reach Modal is logged, not raised (the sandbox's own ``timeout`` still
        ends it; :func:`reap` finds it). Runs to completion when cancelled; the
        cancellation is re-raised afterwards.
        """
        sandbox = self.sandbox
        if sandbox is None or not self._terminate_on_close:
            self.sandbox = None
            return
        await run_shielded(self._terminate_and_forget(sandbox))

    async def _terminate_and_forget(self, sandbox: modal.Sandbox) -> None:
        # The sandbox stays known until it is terminated, so a close cut short
        # (its task cancelled, as asyncio.run does when it ends) can run again.
        await self._terminate(sandbox)
        self.sandbox = None

    @staticmethod
    async def _terminate(sandbox: modal.Sandbox) -> None:
        try:
            with _modal_errors(f"terminating sandbox {sandbox.object_id}"):
                await sandbox.terminate.aio(wait=True)
        except BackendError as exc:
            logger.warning("%s", exc)

    def __repr__(self) -> str:
        sandbox_id = self.sandbox.object_id if self.sandbox else self._attach_id
        return f"ModalBackend(app_name={self.app_name!r}, sandbox={sandbox_id!r})"


@dataclass(frozen=True)
class ReapedSandbox:
    """One sandbox found by :func:`reap`."""

    sandbox_id: str
    tags: Mapping[str, str]
    age_seconds: float | None
    terminated: bool


async def reap_modal_sandboxes(
    app_name: str, *, older_than: float | None = None, dry_run: bool = False
) -> list[ReapedSandbox]:
    """Find and terminate sandboxes this package created in ``app_name``.

    Only sandboxes tagged by this package are touched.

    Args:
        app_name: the Modal app.
        older_than: only sandboxes created more than this many seconds ago.
        dry_run: list only; terminate nothing.

    Returns:
        The sandboxes found, and whether each was terminated (an app that does
        not exist has none). A termination Modal refuses is logged, not raised.

    Raises:
        BackendAuthError: Modal refused the credentials.
        BackendUnreachable: Modal's API could not be reached.
        BackendError: any other refusal of Modal; the original is ``__cause__``.

    Cancelling the call lets a termination in progress finish, then stops:
    the sandboxes not reached yet keep running (run it again).
    """
    with _modal_errors(f"reaping the sandboxes of app {app_name!r}"):
        try:
            app = await modal.App.lookup.aio(app_name)
        except modal.exception.NotFoundError:
            return []
        found: list[ReapedSandbox] = []
        now = time.time()
        listing = modal.Sandbox.list.aio(app_id=app.app_id, tags={TAG_PACKAGE: PACKAGE_TAG_VALUE})
        async for sandbox in listing:
            tags = await sandbox.get_tags.aio()
            created = tags.get(TAG_CREATED, "")
            age = now - int(created) if created.isdigit() else None
            if older_than is not None and (age is None or age < older_than):
                continue
            if not dry_run:
                await run_shielded(ModalBackend._terminate(sandbox))
            found.append(ReapedSandbox(sandbox.object_id, tags, age, terminated=not dry_run))
        return found


reap = reap_modal_sandboxes  # the name before 0.2: generic, though it reaps Modal sandboxes only
