"""What a backend provides: a running Kernel Gateway, and its end."""

from __future__ import annotations

import abc
import ssl
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["Backend", "GatewayEndpoint", "Sandbox"]


@dataclass(frozen=True)
class GatewayEndpoint:
    """Where a running Kernel Gateway listens and how to authenticate to it.

    Attributes:
        base_url: ``http(s)://host:port[/base]`` of the gateway.
        token: sent as ``Authorization: token <token>``; never put in a URL.
        ssl: TLS context for ``https``/``wss`` (None: the default context).
    """

    base_url: str
    token: str | None = field(default=None, repr=False)
    ssl: ssl.SSLContext | None = None

    @property
    def headers(self) -> dict[str, str]:
        """Headers every request to the gateway carries."""
        return {"Authorization": f"token {self.token}"} if self.token else {}


class Backend(abc.ABC):
    """Provides a running Kernel Gateway (a sandbox) and tears it down.

    A backend owns its sandbox, not its kernels: executors create kernels on the
    gateway it provides. ``start()`` may be called once; ``aclose()`` any number
    of times, also after a failed or cancelled start.

    Attributes:
        idle_disconnect: executors on this backend close their kernel
            websocket after this many idle seconds and reopen it on the next
            run (None: keep it open). Tunnels that bill for open connections
            (Modal) set it.
        timings: seconds each startup phase took, filled by ``start()``.
        installs_on_host: packages for its kernels are installed by
            :meth:`install` from the host, not by an installer in the kernel
            (a jailed local kernel has no network and a read-only system).
        kernel_env: environment variables executors set in each kernel
            (for backends that cannot put them in the kernel's process).
        work_dir: the directory file operations are confined to (None: the
            kernel's working directory).
        requirements: installer specs every executor on this backend
            installs when it starts (see :meth:`AsyncExecutor.install`).
        requirements_ready: the sandbox has ``requirements`` (it started
            from a snapshot, or an executor installed them): executors
            install nothing.
        requirements_timeout: seconds installing ``requirements`` may take
            (None: no limit).
    """

    idle_disconnect: float | None = None
    timings: dict[str, float]
    requirements: tuple[str, ...] = ()
    requirements_ready: bool = False
    requirements_timeout: float | None = 1800.0

    @property
    def kernel_env(self) -> dict[str, str]:
        return {}

    @property
    def isolates(self) -> Literal["kernel", "sandbox"]:
        """What keeps one session's code from another's: each ``"kernel"`` (a jail of its own)
        or only the whole ``"sandbox"`` (its kernels can reach each other)."""
        return "sandbox"

    @property
    def work_dir(self) -> str | None:
        return None

    async def requirements_installed(self, installed: list[str]) -> None:
        """Called by the executor after it installed ``requirements`` (``installed``: what was missing).

        A backend that can keep the result (Modal: a filesystem snapshot) does it here.
        """
        return None

    @property
    def installs_on_host(self) -> bool:
        return False

    async def install(self, specs: list[str], timeout: float) -> tuple[int, str]:
        """Install ``specs`` for the kernels from the host: (exit status, end of output).

        Only backends whose :attr:`installs_on_host` is true implement it.
        """
        raise NotImplementedError(f"{type(self).__name__} installs packages in the kernel")

    @property
    def sandbox_id(self) -> str | None:
        """The provider's id of the sandbox, for re-attaching to it later (Modal); None elsewhere."""
        return None

    async def start(self) -> Sandbox:
        """Start (or attach to) the sandbox and return it as one value (:class:`Sandbox`).

        Raises:
            ExecutorStateError: started before.
            BackendError: the sandbox could not be provided.

        Cancelling the call tears down whatever was started so far.
        """
        return Sandbox(self, await self._start_gateway())

    @abc.abstractmethod
    async def _start_gateway(self) -> GatewayEndpoint:
        """Start (or attach to) the gateway and return where it listens (what :meth:`start` wraps).

        Cancelling the call tears down whatever was started so far.
        """

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Tear the gateway down; safe to call twice. Runs to completion when cancelled."""

    async def __aenter__(self) -> Sandbox:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


@dataclass(frozen=True)
class Sandbox:
    """A started sandbox: what :meth:`Backend.start` returns, and all executors and pools need of it.

    An :class:`~async_modal_exec.AsyncExecutor` made on a sandbox creates its
    own kernel at ``endpoint`` and takes everything else from here (the
    kernel environment, the work directory, the idle policy, the installer);
    closing the executor does not close the sandbox. ``backend`` stays its
    owner: ``await sandbox.backend.aclose()`` (or closing the executor or pool
    that started it) ends it. The token is in ``endpoint`` and kept out of
    the repr.

    Attributes:
        backend: the started backend.
        endpoint: where its gateway listens, and how to authenticate.
    """

    backend: Backend
    endpoint: GatewayEndpoint

    @property
    def env(self) -> dict[str, str]:
        """Variables set in each kernel before any code (for backends that cannot put them in its process)."""
        return self.backend.kernel_env

    @property
    def work_dir(self) -> str | None:
        """The directory file operations are confined to (None: the kernel's working directory)."""
        return self.backend.work_dir

    @property
    def idle_disconnect(self) -> float | None:
        """Seconds an executor's websocket may idle before it is closed (None: kept open)."""
        return self.backend.idle_disconnect

    @property
    def isolates(self) -> Literal["kernel", "sandbox"]:
        """See :attr:`Backend.isolates`."""
        return self.backend.isolates

    @property
    def installs_on_host(self) -> bool:
        """Packages are installed from the host (:meth:`install`), not by an installer in the kernel."""
        return self.backend.installs_on_host

    async def install(self, specs: list[str], timeout: float) -> tuple[int, str]:
        """Install ``specs`` for the kernels from the host: (exit status, end of output)."""
        return await self.backend.install(specs, timeout)

    @property
    def sandbox_id(self) -> str | None:
        """What re-attaches the sandbox later, with ``url`` and the token (Modal: its sandbox id)."""
        return self.backend.sandbox_id

    @property
    def url(self) -> str:
        """The gateway's base URL."""
        return self.endpoint.base_url
