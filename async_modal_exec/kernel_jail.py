"""Start one kernel inside a bubblewrap sandbox of its own, with resource limits.

Self-contained (standard library only) and run with ``python -I -S``, as the
prefix the gateway launcher puts before an isolated kernel's command::

    python -I -S kernel_jail.py <config file> <kernel argv...>

The config (JSON, keys documented in
:mod:`async_modal_exec.backends.isolation`) is a file in the backend's
private ``0700`` directory, never a command-line argument: it holds the
kernel's environment, and a command line is readable by every user.

Steps, in order:

1. Find the kernel's own runtime directory: the directory of its connection
   file (``-f <dir>/kernel.json``; the launcher gives every kernel one, named
   by its kernel id). Only that directory (its connection file and IPC
   sockets) is bound into the jail, never the one holding the other
   kernels'.
2. Make the kernel's own work directory (``<work root>/<kernel id>``, bound
   at the backend's work path) unless the backend shares one given by its
   user.
3. Choose who the kernel runs as: the calling user, or, when that is root,
   ``kernel_uid``/``kernel_gid`` (65534, nobody): a root kernel would read
   every root-only file it can name. As root the kernel's directories are
   handed to that user first.
4. Set the resource limits and join a ``pids`` cgroup (see
   :func:`apply_limits`).
5. Replace itself with ``bwrap`` (:func:`bwrap_argv`): a new root holding
   only the system directories, this interpreter and its installed
   distributions, a few files of ``/etc`` (``passwd``, ``group`` and
   ``hosts`` made up), the kernel's two directories, fresh ``/dev``,
   ``/proc``, ``/tmp`` and home; no network, its own PID space, the
   kernel's environment only.

As root, bubblewrap runs privileged (no user namespace: one would map the
kernel's user to root outside) and runs this file again inside the jail
(:func:`become`), which drops to the kernel's user before it starts the
kernel; bubblewrap sets ``no_new_privs``, so no setuid binary gives root
back.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import resource
import shutil
import stat
import struct
import sys
import sysconfig

_LIMITS = {
    "memory_bytes": resource.RLIMIT_AS,
    "file_size_bytes": resource.RLIMIT_FSIZE,
    "cpu_seconds": resource.RLIMIT_CPU,
}

# Top-level directories of the system bound read-only (or recreated as the
# symlinks they are, e.g. /lib -> usr/lib on merged-/usr systems).
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# What the C library and Python read from /etc; nothing else of it is bound.
ETC_FILES = (
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/localtime",
    "/etc/alternatives",
)
JAILED_UID = 1000  # the kernel's uid and gid inside a user namespace
HOME = "/home/kernel"
_ROOT_JAIL_FILE = "/run/jail/kernel_jail.py"  # this file, as the jail sees it (root only)


# seccomp (classic BPF), for what the namespaces do not confine. Per
# architecture: its AUDIT_ARCH value and the numbers of socket(2), clone(2)
# and unshare(2); io_uring_setup/enter/register (425-427) and clone3 (435)
# have the same numbers on both.
_SECCOMP_ARCH = {"x86_64": (0xC000003E, 41, 56, 272), "aarch64": (0xC00000B7, 198, 220, 97)}
# Socket families a kernel may open. Others reach past a network namespace
# (AF_VSOCK: the hypervisor's services, from a VM) or are kernel attack surface.
ALLOWED_SOCKET_FAMILIES = (1, 2, 10, 16)  # AF_UNIX, AF_INET, AF_INET6, AF_NETLINK
# Refused with ENOSYS, so callers fall back: io_uring makes sockets without
# socket(2); clone3 passes its flags in memory, where the filter cannot look.
_NO_SUCH_CALLS = (425, 426, 427, 435)
_CLONE_NEWUSER = 0x10000000
_LD_W_ABS, _JEQ_K, _JGE_K, _JSET_K, _RET_K = 0x20, 0x15, 0x35, 0x45, 0x06
_ALLOW, _ERRNO = 0x7FFF0000, 0x00050000
_ARCH, _NR, _ARG0 = 4, 0, 16  # offsets in struct seccomp_data (args[0]: its low 32 bits, little-endian)


def _assemble(program: list[tuple[str, int, int, str | None, str | None]]) -> bytes:
    """BPF from ``(label, code, k, jump if true, jump if false)``: jumps name later labels (None: next)."""
    where = {label: index for index, (label, *_) in enumerate(program) if label}
    encoded = []
    for index, (_, code, k, if_true, if_false) in enumerate(program):
        offsets = [0 if target is None else where[target] - index - 1 for target in (if_true, if_false)]
        encoded.append(struct.pack("=HBBI", code, offsets[0], offsets[1], k))
    return b"".join(encoded)


def seccomp_filter(machine: str) -> bytes | None:
    """The BPF program bubblewrap loads (``--seccomp``); None on an architecture not covered.

    Refused: ``socket()`` of a family not in :data:`ALLOWED_SOCKET_FAMILIES`
    (``EAFNOSUPPORT``); ``clone``/``unshare`` of a new user namespace
    (``EPERM``: as root the jail has none of its own to disable them in);
    io_uring and ``clone3`` (``ENOSYS``); every system call of another ABI
    (32-bit ``int 0x80``, x32: ``ENOSYS``), so none goes around the checks.
    Everything else is allowed.
    """
    if machine not in _SECCOMP_ARCH:
        return None
    arch, socket_call, clone_call, unshare_call = _SECCOMP_ARCH[machine]
    no_such = _ERRNO | errno.ENOSYS

    def ret(label: str, value: int) -> tuple[str, int, int, None, None]:
        return (label, _RET_K, value, None, None)

    program: list[tuple[str, int, int, str | None, str | None]] = [
        ("", _LD_W_ABS, _ARCH, None, None),
        ("", _JEQ_K, arch, "native", None),
        ret("", no_such),
        ("native", _LD_W_ABS, _NR, None, None),
        ("", _JGE_K, 0x40000000, "nosys", None),  # x32 system calls
        *(("", _JEQ_K, call, "nosys", None) for call in _NO_SUCH_CALLS),
        ("", _JEQ_K, socket_call, "socket", None),
        ("", _JEQ_K, clone_call, "flags", None),
        ("", _JEQ_K, unshare_call, "flags", "allow"),
        ("flags", _LD_W_ABS, _ARG0, None, None),
        ("", _JSET_K, _CLONE_NEWUSER, "eperm", "allow"),
        ("socket", _LD_W_ABS, _ARG0, None, None),
        *(("", _JEQ_K, family, "allow", None) for family in ALLOWED_SOCKET_FAMILIES),
        ret("", _ERRNO | errno.EAFNOSUPPORT),
        ret("eperm", _ERRNO | errno.EPERM),
        ret("nosys", no_such),
        ret("allow", _ALLOW),  # last: classic BPF jumps only forward
    ]
    return _assemble(program)


def _own_processes(uid: int) -> int:
    """Processes (threads count too, for RLIMIT_NPROC) of ``uid`` now."""
    count = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as status:
                fields = dict(line.split(":", 1) for line in status if ":" in line)
        except OSError:
            continue
        if int(fields.get("Uid", "-1").split()[0]) == uid:
            count += int(fields.get("Threads", "1"))
    return count


def _own_cgroup(backend_cgroup: str, processes: int) -> str:
    """A pids cgroup for this kernel under the backend's, limited to ``processes``.

    The cgroups of kernels that have ended are removed first, so a
    long-lived backend does not pile them up: only those whose process is
    gone (another kernel's, made but not joined yet, is empty too), and
    removing one still in use fails.
    """
    name = f"kernel-{os.getpid()}"
    for entry in os.listdir(backend_cgroup):
        pid = entry.removeprefix("kernel-")
        if not (entry.startswith("kernel-") and pid.isdigit()):
            continue
        # Also an ended kernel's that had this kernel's pid.
        if entry == name or not os.path.exists(f"/proc/{pid}"):
            with contextlib.suppress(OSError):
                os.rmdir(os.path.join(backend_cgroup, entry))
    own = os.path.join(backend_cgroup, name)
    os.mkdir(own)
    with open(os.path.join(own, "pids.max"), "w") as limit:
        limit.write(str(processes))
    return own


def apply_limits(config: dict, uid: int) -> None:  # type: ignore[type-arg]
    """Resource limits for this process and all it starts; ``uid`` is who the kernel runs as.

    As root the process limit is a pids cgroup (the kernel's own when the
    backend's can have children: a failure here stops the start; else the
    backend's, shared). Otherwise ``RLIMIT_NPROC``, which counts every
    process of ``uid``: the limit is what runs now plus the allowance.
    """
    for key, which in _LIMITS.items():
        value = config.get(key)
        if value:
            resource.setrlimit(which, (int(value), int(value)))
    processes = config.get("max_processes")
    if not processes:
        return
    cgroup = config.get("pids_cgroup")
    if cgroup:
        if config.get("pids_per_kernel"):
            cgroup = _own_cgroup(cgroup, int(processes))
        with open(os.path.join(cgroup, "cgroup.procs"), "w") as procs:
            procs.write(str(os.getpid()))
    else:
        limit = _own_processes(uid) + int(processes)
        resource.setrlimit(resource.RLIMIT_NPROC, (limit, limit))


KERNEL_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def connection_path(kernel: list[str]) -> str:
    """The kernel's connection file (its ``-f`` argument)."""
    for index, arg in enumerate(kernel[:-1]):
        if arg == "-f":
            return os.path.abspath(kernel[index + 1])
    raise SystemExit(f"kernel_jail: no '-f <connection file>' in the kernel command {kernel!r}")


def checked_kernel_dir(connection_file: str, runtime_dir: str) -> str:
    """The kernel's own runtime directory: ``<runtime dir>/<kernel id>``, or refuse to start.

    The kernel id comes from the gateway's client: anything else (``..``, a
    path) would bind, and as root hand over, a directory that is not the
    kernel's.
    """
    kernel_dir = os.path.dirname(connection_file)
    if os.path.dirname(kernel_dir) != os.path.abspath(runtime_dir) or not KERNEL_ID.fullmatch(
        os.path.basename(kernel_dir)
    ):
        raise SystemExit(f"kernel_jail: {connection_file!r} is not in a kernel directory of {runtime_dir!r}")
    return kernel_dir


def clear_kernel_dir(kernel_dir: str, connection_file: str) -> None:
    """Leave only the connection file in the kernel's directory, and make sure it is one.

    A restarted kernel's directory holds what the kernel left there (it can
    write in it): symlinks that root would follow, or that would point the
    gateway at other sockets. They go (removing a link never follows it);
    the connection file must be a plain file with one link.
    """
    for entry in os.listdir(kernel_dir):
        path = os.path.join(kernel_dir, entry)
        if path == connection_file:
            continue
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    info = os.lstat(connection_file)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        raise SystemExit(f"kernel_jail: {connection_file!r} is not a plain file: refusing to start")


def _venv_prefix() -> str | None:
    """The virtual environment this interpreter belongs to, if any.

    Run with ``-S``, ``sys.prefix`` is the base installation's: ``site``
    is what would find the venv (its ``pyvenv.cfg``).
    """
    executable_dir = os.path.dirname(os.path.abspath(sys.executable))
    for candidate in (executable_dir, os.path.dirname(executable_dir)):
        if os.path.isfile(os.path.join(candidate, "pyvenv.cfg")):
            return candidate
    return None


def interpreter_paths() -> list[str]:
    """This interpreter's prefixes and the directories of its installed distributions.

    Never arbitrary ``sys.path`` entries: an editable install puts a whole
    repository there.
    """
    prefixes = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    venv = _venv_prefix()
    if venv is not None:
        prefixes.add(venv)
    paths = set(prefixes)
    for prefix in prefixes:
        for scheme in ("purelib", "platlib"):
            paths.add(sysconfig.get_path(scheme, vars={"base": prefix, "platbase": prefix}))
    return sorted(path for path in paths if os.path.exists(path))


def _identity_files(uid: int, gid: int) -> dict[str, bytes]:
    """The made-up ``/etc`` files: who the kernel is, and a loopback ``localhost``."""
    return {
        "/etc/passwd": f"root:x:0:0::/root:/bin/false\nkernel:x:{uid}:{gid}::{HOME}:/bin/sh\n".encode(),
        "/etc/group": f"root:x:0:\nkernel:x:{gid}:\n".encode(),
        "/etc/hosts": b"127.0.0.1 localhost\n::1 localhost\n",
    }


def _data_fd(data: bytes) -> int:
    """A pipe's read end holding ``data`` (a few hundred bytes: never fills the pipe)."""
    read_end, write_end = os.pipe()
    os.write(write_end, data)
    os.close(write_end)
    os.set_inheritable(read_end, True)
    return read_end


def _under(path: str, roots: set[str]) -> bool:
    """Whether ``path`` is one of ``roots`` or inside one."""
    return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)


def _dirs_for(paths: list[str], bound: set[str], made_already: set[str]) -> list[str]:
    """``--dir`` options (mode 0755) for the parents of ``paths`` that nothing else makes.

    Privileged bubblewrap makes missing parents ``0700``: the kernel's user
    could not reach what is bound below them. Nothing is needed inside a
    ``bound`` directory (it has the host's) or for one in ``made_already``.
    """
    made: list[str] = []
    for path in paths:
        chain: list[str] = []
        parent = os.path.dirname(path)
        while parent not in ("/", "", *made_already) and not _under(parent, bound):
            chain.append(parent)
            parent = os.path.dirname(parent)
        made += [directory for directory in reversed(chain) if directory not in made]
    argv: list[str] = []
    for directory in made:
        argv += ["--perms", "0755", "--dir", directory]
    return argv


def _outermost(paths: list[str], bound: set[str]) -> list[str]:
    """``paths`` that exist and are not inside another of them or of ``bound``."""
    kept: list[str] = []
    for path in sorted(set(paths)):
        if os.path.exists(path) and not _under(path, {*bound, *kept}):
            kept.append(path)
    return kept


def bwrap_argv(
    config: dict,  # type: ignore[type-arg]
    kernel: list[str],
    *,
    kernel_dir: str,
    work: str,
    uid: int,
    gid: int,
    as_root: bool,
) -> list[str]:
    """The ``bwrap`` command that runs ``kernel`` in its jail.

    ``kernel_dir`` (its connection file and sockets) and ``work`` (its work
    directory, bound at ``config["work_dir"]``) are the only writable host
    directories. Writable binds come before read-only ones: an interpreter
    inside the work directory (a project's ``.venv``) stays read-only.
    """
    argv = [config["bwrap"], "--die-with-parent", "--new-session", "--hostname", "kernel"]
    if as_root:
        # No user namespace: it would map the kernel's uid to root outside.
        # become() (this file again, inside) drops to the kernel's user.
        argv += ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try"]
        argv += ["--cap-drop", "ALL"]
        for cap in ("CAP_SETUID", "CAP_SETGID", "CAP_CHOWN"):
            argv += ["--cap-add", cap]
    else:
        argv += ["--unshare-all", "--unshare-user", "--uid", str(uid), "--gid", str(gid), "--disable-userns"]
    system = [path for path in SYSTEM_DIRS if os.path.lexists(path)]
    real_system = {path for path in system if not os.path.islink(path)}
    ro_binds = _outermost([*interpreter_paths(), *config.get("ro_binds", [])], real_system)
    work_dir = config["work_dir"]
    for path in system:
        if os.path.islink(path):
            argv += ["--symlink", os.readlink(path), path]
        else:
            argv += ["--ro-bind", path, path]
    argv += ["--perms", "0755", "--dir", "/etc", "--perms", "0755", "--dir", "/var"]
    argv += ["--dev", "/dev", "--proc", "/proc"]
    # In memory, outside RLIMIT_AS: each holds at most file_size_bytes.
    size = ["--size", str(config["file_size_bytes"])] if config.get("file_size_bytes") else []
    for scratch in ("/tmp", "/var/tmp"):
        argv += ["--perms", "1777", *size, "--tmpfs", scratch]
    argv += ["--perms", "0755", "--dir", "/home", "--perms", "0700", *size, "--tmpfs", HOME]
    made = {"/etc", "/var", "/tmp", "/var/tmp", "/home", HOME}
    argv += _dirs_for([kernel_dir, work_dir, *ro_binds], {*system, *ro_binds}, made)
    argv += ["--bind", kernel_dir, kernel_dir, "--bind", work, work_dir]
    for path in ro_binds:
        argv += ["--ro-bind", path, path]
    for path in ETC_FILES:
        if os.path.islink(path):
            argv += ["--symlink", os.readlink(path), path]
        elif os.path.exists(path):
            argv += ["--ro-bind", path, path]
    for path, data in _identity_files(uid, gid).items():
        argv += ["--perms", "0644", "--ro-bind-data", str(_data_fd(data)), path]
    program = seccomp_filter(os.uname().machine)
    if program is not None:
        argv += ["--seccomp", str(_data_fd(program))]
    else:
        print(f"kernel_jail: no seccomp filter for {os.uname().machine}", file=sys.stderr)
    if as_root:
        argv += ["--perms", "0755", "--dir", "/run", "--perms", "0755", "--dir", "/run/jail"]
        argv += ["--ro-bind", os.path.abspath(__file__), _ROOT_JAIL_FILE]
        # The work directory is the kernel user's alone (0700): root without
        # capabilities cannot enter it, become() does once it is that user.
        become = [_ROOT_JAIL_FILE, "--become", str(uid), str(gid), work_dir]
        return [*argv, "--chdir", "/", "--", sys.executable, "-I", "-S", *become, *kernel]
    return [*argv, "--chdir", work_dir, "--", *kernel]


def become(uid: int, gid: int, work_dir: str, kernel: list[str]) -> None:
    """Inside a root jail: give the home to the kernel's user, become it, start the kernel."""
    os.chown(HOME, uid, gid)
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)  # clears every capability: the kernel runs with none
    os.chdir(work_dir)
    os.execv(kernel[0], kernel)


def main() -> None:
    if sys.argv[1] == "--become":
        become(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5:])
        return
    with open(sys.argv[1]) as file:
        config = json.load(file)
    kernel = sys.argv[2:]
    connection_file = connection_path(kernel)
    kernel_dir = checked_kernel_dir(connection_file, config["runtime_dir"])
    kernel_id = os.path.basename(kernel_dir)
    work = config["work_dir"]
    as_root = os.geteuid() == 0
    uid, gid = (int(config["kernel_uid"]), int(config["kernel_gid"])) if as_root else (JAILED_UID, JAILED_UID)
    clear_kernel_dir(kernel_dir, connection_file)
    if as_root:
        os.chown(kernel_dir, uid, gid, follow_symlinks=False)
        os.chown(connection_file, uid, gid, follow_symlinks=False)
    if config.get("work_root"):  # a work directory of its own, removed with the kernel by the launcher
        work = os.path.join(config["work_root"], kernel_id)
        os.makedirs(work, mode=0o700, exist_ok=True)
        if as_root:
            os.chown(work, uid, gid, follow_symlinks=False)
    apply_limits(config, uid if as_root else os.getuid())
    argv = bwrap_argv(config, kernel, kernel_dir=kernel_dir, work=work, uid=uid, gid=gid, as_root=as_root)
    # bwrap itself gets the kernel's environment, not the host's: its process
    # inside the namespaces (PID 1 there) would show the host's in /proc/1/environ.
    os.execve(argv[0], argv, dict(config.get("env", {})))


if __name__ == "__main__":
    main()
