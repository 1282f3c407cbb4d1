"""Escape attempts a hostile model could write, run in a jailed kernel by ``test_jail_corpus.py``.

Each case is the body of a function run in kernel A of a jailed
``LocalBackend`` whose kernel B holds secrets (a variable, a file, its
output). ``INFO`` (a dict) holds what the host knows and an attacker could
guess: B's connection data and file paths, the checkout, the host home, the
gateway's port. The body returns a verdict string; an exception it lets out
becomes ``refused:<name>:<message>``. ``expect`` is the verdict the jail must
give (a regular expression, matched in full). ``stops`` says what stops it:
the same words are in the table of ``docs/security.md``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Case:
    name: str
    attempt: str
    body: str
    expect: str
    stops: str
    during_b_output: bool = False  # run while kernel B prints its secret
    needs: str = ""  # "root": the outcome holds as root; "vsock", "x86_64": what the host must have


# ZeroMQ request to another kernel's shell socket, signed with ``key`` (b"" = unsigned).
_ZMQ_REQUEST = """
import hashlib, hmac, json, os, uuid, zmq
c = INFO["b_connection"]
path = f"{c['ip']}-{c['shell_port']}"
exists = os.path.exists(path)
header = {"msg_id": uuid.uuid4().hex, "username": "x", "session": uuid.uuid4().hex,
          "msg_type": "execute_request", "version": "5.3", "date": ""}
content = {"code": "", "silent": False, "store_history": False,
           "user_expressions": {"s": "secret"}, "allow_stdin": False}
frames = [json.dumps(part).encode() for part in (header, {}, {}, content)]
key = KEY.encode()
signature = hmac.new(key, b"".join(frames), hashlib.sha256).hexdigest().encode() if key else b""
context = zmq.Context()
sock = context.socket(zmq.DEALER)
sock.linger = 0
sock.connect(f"ipc://{path}")
sock.send_multipart([b"<IDS|MSG>", signature, *frames])
reply = sock.recv_multipart() if sock.poll(3000) else None
context.destroy(0)
return f"exists={exists} reply={reply!r}"
"""

_WALK = """
import os, stat
def walk(top, skip=("/proc", "/sys", "/dev", "/usr")):
    for root, dirs, files in os.walk(top):
        dirs[:] = [d for d in dirs if os.path.join(root, d) not in skip]
        for name in files:
            yield os.path.join(root, name)
"""

_CTYPES = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
def call(name, *args):
    if getattr(libc, name)(*args) == 0:
        return "ok"
    return "refused:" + os.strerror(ctypes.get_errno())
"""

# Run in a child of the kernel: unshare(CLONE_NEWUSER) needs a single-threaded process.
_USERNS_CHILD = r"""
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
def call(name, *args):
    return "ok" if getattr(libc, name)(*args) == 0 else os.strerror(ctypes.get_errno())
print("unshare", call("unshare", 0x10000000 | 0x00020000))  # CLONE_NEWUSER | CLONE_NEWNS
print("remount", call("mount", None, b"/usr", None, 32 | 4096, None))  # MS_REMOUNT | MS_BIND
try:
    open("/usr/escape", "w")
    print("written")
except OSError as exc:
    print("write", type(exc).__name__)
"""

CASES: tuple[Case, ...] = (
    # Another kernel of the same gateway.
    Case(
        "zmq-shell-unsigned",
        "send an unsigned `execute_request` with `user_expressions` to the other kernel's shell socket",
        "KEY = ''\n" + _ZMQ_REQUEST,
        r"exists=False reply=None",
        "the other kernel's IPC sockets are not in this jail (its own runtime directory only)",
    ),
    Case(
        "zmq-shell-signed",
        "the same, signed with the key from the other kernel's connection file (empty: kernels are unsigned "
        "unless the launcher gets `--sign-messages`)",
        "KEY = INFO['b_connection']['key']\n" + _ZMQ_REQUEST,
        r"exists=False reply=None",
        "as above: signing is not what stops it",
    ),
    Case(
        "zmq-iopub-subscribe",
        "subscribe to the other kernel's IOPub socket while it prints a secret",
        """
import os, zmq
c = INFO["b_connection"]
path = f"{c['ip']}-{c['iopub_port']}"
context = zmq.Context()
sock = context.socket(zmq.SUB)
sock.linger = 0
sock.setsockopt(zmq.SUBSCRIBE, b"")
sock.connect(f"ipc://{path}")
heard = [sock.recv_multipart() for _ in range(100) if sock.poll(30)]
context.destroy(0)
return f"exists={os.path.exists(path)} heard={heard!r}"
""",
        r"exists=False heard=\[\]",
        "the other kernel's IPC sockets are not in this jail",
        during_b_output=True,
    ),
    Case(
        "other-connection-file",
        "read the other kernel's connection file (its key and socket names)",
        "return open(INFO['b_connection_file']).read()",
        r"refused:FileNotFoundError:.*",
        "only the kernel's own runtime directory is bound",
    ),
    Case(
        "runtime-dir-listing",
        "list the runtime directory for other kernels' files",
        """
import os
from ipykernel.connect import get_connection_file
own = os.path.dirname(get_connection_file())
entries = os.listdir(os.path.dirname(own))
return "only-own" if entries == [os.path.basename(own)] else f"saw {entries}"
""",
        r"only-own",
        "the parent is an empty directory of the jail's own root",
    ),
    Case(
        "connection-file-search",
        "search every visible directory for kernel connection files",
        _WALK
        + """
from ipykernel.connect import get_connection_file
own = os.path.dirname(get_connection_file())
def is_connection_file(path):
    try:
        return path.endswith(".json") and "shell_port" in open(path).read(4096)
    except OSError:
        return False
others = [p for p in walk("/") if is_connection_file(p) and not p.startswith(own + "/")]
return "only-own" if not others else f"found {others}"
""",
        r"only-own",
        "only the kernel's own runtime directory is bound",
    ),
    Case(
        "other-work-file",
        "read a file the other kernel wrote in its work directory (its host path)",
        "return open(INFO['b_work_file']).read()",
        r"refused:FileNotFoundError:.*",
        "each kernel has a work directory of its own, the only one bound",
    ),
    Case(
        "own-work-dir-listing",
        "list the work directory for the other kernel's files",
        "import os\nentries = os.listdir('.')\nreturn 'clean' if INFO['b_work_name'] not in entries else f'saw {entries}'",
        r"clean",
        "each kernel has a work directory of its own",
    ),
    Case(
        "secret-file-search",
        "search every writable or temporary directory for the other kernel's file",
        _WALK + "return str([p for p in walk('/') if os.path.basename(p) == INFO['b_work_name']])",
        r"\[\]",
        "each kernel has a work directory of its own; `/tmp` and the home are private",
    ),
    # Processes.
    Case(
        "proc-walk",
        "walk `/proc` for other kernels, the gateway and the host's processes",
        """
import os
pids = [p for p in os.listdir("/proc") if p.isdigit()]
lines = []
for pid in pids:
    try:
        lines.append(open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace"))
    except OSError:
        pass
text = "\\n".join(lines)
leaks = [word for word in (INFO["b_kernel_id"], "kernelgateway", "pytest") if word in text]
return f"pids={len(pids)} leaks={leaks}"
""",
        r"pids=[1-9] leaks=\[\]",
        "a PID namespace of its own: the jail's init, the kernel and what it started",
    ),
    Case(
        "proc-environ",
        "read every visible process's environment and command line for the token or secrets",
        """
import os
found = []
for pid in [p for p in os.listdir("/proc") if p.isdigit()]:
    for name in ("environ", "cmdline"):
        try:
            found.append(open(f"/proc/{pid}/{name}", "rb").read().decode(errors="replace"))
        except OSError:
            pass
text = "\\n".join(found)
return str([word for word in (INFO["token"], INFO["b_secret"], "KG_AUTH_TOKEN") if word in text])
""",
        r"\[\]",
        "the PID namespace; the gateway token never is in an environment",
    ),
    Case(
        "proc-mem-init",
        "read the memory of the jail's init (pid 1)",
        "return open('/proc/1/mem', 'rb').read(16)",
        r"refused:PermissionError:.*",
        "pid 1 (bubblewrap) is another user's; ptrace access is refused",
        needs="root",  # as a normal user pid 1 (bwrap's reaper) is the same user, in the same jail
    ),
    Case(
        "proc-root-init",
        "list the root file system of pid 1 (`/proc/1/root`)",
        "import os\nreturn str(os.listdir('/proc/1/root'))",
        r"refused:PermissionError:.*",
        "pid 1 is another user's",
        needs="root",  # as a normal user pid 1 (bwrap's reaper) is the same user, in the same jail
    ),
    Case(
        "ptrace-init",
        "`ptrace(PTRACE_ATTACH)` the jail's init",
        _CTYPES + "return call('ptrace', 16, 1, 0, 0)",
        r"refused:Operation not permitted",
        "another user's process; no capabilities",
        needs="root",  # as a normal user pid 1 (bwrap's reaper) is the same user, in the same jail
    ),
    Case(
        "ptrace-host",
        "`ptrace(PTRACE_ATTACH)` the host process by its pid",
        _CTYPES + "return call('ptrace', 16, INFO['host_pid'], 0, 0)",
        r"refused:(No such process|Operation not permitted)",
        "host pids do not exist in the kernel's PID namespace",
    ),
    Case(
        "signal-host",
        "signal the host process and the gateway by their pids",
        "import os\nfor pid in (INFO['host_pid'], INFO['gateway_pid']):\n    os.kill(pid, 0)\nreturn 'reached'",
        r"refused:ProcessLookupError:.*",
        "host pids do not exist in the kernel's PID namespace",
    ),
    # Sockets.
    Case(
        "unix-socket-search",
        "find and connect to every Unix socket in every reachable directory",
        """
import os, socket, stat
from ipykernel.connect import get_connection_file
own = os.path.dirname(get_connection_file())
reached = []
for root, dirs, files in os.walk("/"):
    dirs[:] = [d for d in dirs if os.path.join(root, d) not in ("/proc", "/sys", "/usr")]
    for name in files:
        path = os.path.join(root, name)
        try:
            if not stat.S_ISSOCK(os.lstat(path).st_mode) or path.startswith(own + "/"):
                continue
            with socket.socket(socket.AF_UNIX) as sock:
                sock.connect(path)
            reached.append(path)
        except OSError:
            pass
return str(reached)
""",
        r"\[\]",
        "only the kernel's own sockets are in its jail",
    ),
    Case(
        "unix-socket-host-path",
        "connect to a Unix socket the host listens on, by its path",
        "import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect(INFO['host_socket'])\nreturn 'connected'",
        r"refused:FileNotFoundError:.*",
        "the host's directories are not in the jail",
    ),
    Case(
        "unix-socket-abstract",
        "connect to an abstract Unix socket the host listens on",
        "import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect('\\0' + INFO['host_abstract'])\nreturn 'connected'",
        r"refused:ConnectionRefusedError:.*",
        "a network namespace of its own (abstract sockets belong to it)",
    ),
    Case(
        "tcp-gateway",
        "open a TCP connection to the gateway's port on loopback",
        "import socket\nsocket.create_connection(('127.0.0.1', INFO['gateway_port']), timeout=3)\nreturn 'connected'",
        r"refused:ConnectionRefusedError:.*",
        "a network namespace of its own, with its own loopback",
    ),
    Case(
        "dns",
        "resolve a public host name",
        "import socket\nreturn str(socket.getaddrinfo('example.com', 443))",
        r"refused:gaierror:.*",
        "no network: no resolver, no route",
    ),
    Case(
        "tcp-internet",
        "open a TCP connection to a public IPv4 address",
        "import socket\nsocket.create_connection(('1.1.1.1', 443), timeout=3)\nreturn 'connected'",
        r"refused:OSError:.*unreachable",
        "no network interface but loopback",
    ),
    Case(
        "tcp6-internet",
        "open a TCP connection to a public IPv6 address",
        "import socket\nsocket.create_connection(('2606:4700:4700::1111', 443), timeout=3)\nreturn 'connected'",
        r"refused:OSError:.*",
        "no network interface but loopback",
    ),
    Case(
        "udp-send",
        "send a UDP datagram to a public resolver",
        "import socket\nsocket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('8.8.8.8', 53))\nreturn 'sent'",
        r"refused:OSError:.*unreachable",
        "no network interface but loopback",
    ),
    Case(
        "raw-socket",
        "open a raw ICMP socket",
        "import socket\nsocket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)\nreturn 'opened'",
        r"refused:PermissionError:.*",
        "no capabilities",
    ),
    Case(
        "packet-socket",
        "open a packet socket to sniff interfaces",
        "import socket\nsocket.socket(socket.AF_PACKET, socket.SOCK_RAW)\nreturn 'opened'",
        r"refused:OSError:\[Errno 97\].*",
        "the seccomp filter allows only Unix, IPv4, IPv6 and netlink sockets (and no capabilities)",
    ),
    Case(
        "interfaces",
        "list the network interfaces",
        "import socket\nreturn str(sorted(name for _, name in socket.if_nameindex()))",
        r"\['lo'\]",
        "a network namespace of its own",
    ),
    Case(
        "vsock-host",
        "connect to the hypervisor host over vsock (CID 2), which no network namespace confines",
        "import socket\ns = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)\ns.settimeout(3)\n"
        "s.connect((2, 1024))\nreturn 'connected'",
        r"refused:OSError:\[Errno 97\] Address family not supported by protocol",
        "the seccomp filter allows only Unix, IPv4, IPv6 and netlink sockets",
        needs="vsock",
    ),
    Case(
        "io-uring",
        "set up io_uring (it makes sockets without `socket()`, out of the filter's sight)",
        _CTYPES + "params = ctypes.create_string_buffer(120)\n"
        "return call('syscall', 425, 8, params)",  # io_uring_setup(8 entries, params)
        r"refused:Function not implemented",
        "the seccomp filter refuses io_uring (`ENOSYS`)",
    ),
    Case(
        "socket-other-abi",
        "open a socket through the 32-bit system call table (`int 0x80`), around the seccomp check",
        """
import ctypes, mmap, platform
if platform.machine() != "x86_64":
    return "refused:not x86_64"
# mov eax, 102 (socketcall); mov ebx, 1 (SYS_SOCKET); int 0x80; ret  (args pointer left in ecx: any)
code = bytes([0xB8, 102, 0, 0, 0, 0xBB, 1, 0, 0, 0, 0xCD, 0x80, 0xC3])
page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
page.write(code)
address = ctypes.addressof(ctypes.c_char.from_buffer(page))
result = ctypes.CFUNCTYPE(ctypes.c_long)(address)()
return f"refused:{-result}" if result < 0 else f"opened {result}"
""",
        r"refused:38",
        "the seccomp filter fails every system call of another ABI with `ENOSYS` (38)",
        needs="x86_64",
    ),
    # Mounts, namespaces, cgroups.
    Case(
        "mount-tmpfs",
        "mount a tmpfs",
        _CTYPES + "return call('mount', b'none', b'/tmp', b'tmpfs', 0, None)",
        r"refused:Operation not permitted",
        "no capabilities",
    ),
    Case(
        "remount-system-rw",
        "remount `/usr` read-write, then write in it",
        _CTYPES
        + """
verdict = call('mount', None, b'/usr', None, 32 | 4096, None)  # MS_REMOUNT | MS_BIND
try:
    open('/usr/escape', 'w')
    return verdict + ' written'
except OSError as exc:
    return verdict + ' ' + type(exc).__name__
""",
        r"refused:Operation not permitted (OSError|PermissionError)",
        "no capabilities; the binds are read-only",
    ),
    Case(
        "userns-remount",
        "make a user and mount namespace of its own (in a single-threaded child), then remount `/usr` "
        "read-write and write in it",
        f"import subprocess, sys\nchild = {_USERNS_CHILD!r}\n"
        """
done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=30)
lines = [line for line in done.stdout.splitlines() if line]
return ("escaped: " if "written" in lines else "contained: ") + " / ".join(lines)
""",
        r"contained: unshare Operation not permitted / remount Operation not permitted / write OSError",
        "the seccomp filter refuses a new user namespace (`clone`/`unshare` with `CLONE_NEWUSER`; `clone3`)",
    ),
    Case(
        "setns-init",
        "enter pid 1's mount namespace (`setns`)",
        "import os\nos.open('/proc/1/ns/mnt', os.O_RDONLY)\nreturn 'opened'",
        r"refused:PermissionError:.*",
        "pid 1 is another user's",
        needs="root",  # as a normal user pid 1 (bwrap's reaper) is the same user, in the same jail
    ),
    Case(
        "chroot",
        "`chroot` into the work directory",
        "import os\nos.chroot('.')\nreturn 'chrooted'",
        r"refused:PermissionError:.*",
        "no capabilities",
    ),
    Case(
        "sys",
        "read `/sys` (devices, kernel settings)",
        "import os\nreturn str(os.listdir('/sys'))",
        r"refused:FileNotFoundError:.*",
        "`/sys` is not in the jail",
    ),
    Case(
        "cgroup-write",
        "raise its own process limit through the cgroup files",
        """
import os
for path in ("/sys/fs/cgroup/pids.max", "/sys/fs/cgroup/pids/pids.max", "/sys/fs/cgroup/cgroup.procs"):
    try:
        open(path, "w").write("max")
        return "written " + path
    except FileNotFoundError:
        continue
return "no cgroup files"
""",
        r"no cgroup files",
        "`/sys` is not in the jail",
    ),
    # Files.
    Case(
        "symlink-shadow",
        "read `/etc/shadow` through a symlink in the work directory",
        "import os\nos.symlink('/etc/shadow', 'shadow-link')\ntry:\n    return open('shadow-link').read()\n"
        "finally:\n    os.remove('shadow-link')",
        r"refused:FileNotFoundError:.*",
        "`/etc/shadow` is not in the jail",
    ),
    Case(
        "symlink-other-work",
        "read the other kernel's file through a symlink to its host path",
        "import os\nos.symlink(INFO['b_work_file'], 'b-link')\ntry:\n    return open('b-link').read()\n"
        "finally:\n    os.remove('b-link')",
        r"refused:FileNotFoundError:.*",
        "each kernel has a work directory of its own",
    ),
    Case(
        "hardlink-system-file",
        "hard-link a system file into the work directory",
        "import os\nos.link('/usr/bin/env', 'env-link')\nreturn 'linked'",
        r"refused:OSError:.*Invalid cross-device link.*",
        "separate mounts (and `fs.protected_hardlinks`)",
    ),
    Case(
        "host-home",
        "read a file planted in the host's home directory",
        "return open(INFO['home_file']).read()",
        r"refused:FileNotFoundError:.*",
        "the host home is not in the jail (the kernel's home is an empty tmpfs)",
    ),
    Case(
        "checkout-pyproject",
        "read the editable install's `pyproject.toml`",
        "return open(INFO['checkout'] + '/pyproject.toml').read()",
        r"refused:FileNotFoundError:.*",
        "only the interpreter's prefixes and site directories are bound, never `sys.path` entries",
    ),
    Case(
        "checkout-git",
        "read the checkout's `.git/HEAD` and list the checkout",
        "import os\ntry:\n    return open(INFO['checkout'] + '/.git/HEAD').read()\nexcept OSError as exc:\n"
        "    return type(exc).__name__ + ' ' + str(sorted(set(os.listdir(INFO['checkout'])) - {'.venv'}))",
        r"FileNotFoundError \[\]",
        "only the interpreter's prefixes and site directories are bound",
    ),
    Case(
        "jail-config",
        "read the backend's jail config (the kernels' environment) and the gateway log",
        "return open(INFO['jail_config']).read() + open(INFO['gateway_log']).read()",
        r"refused:FileNotFoundError:.*",
        "the backend's private directory is not bound, only the kernel's own directories in it",
    ),
    Case(
        "etc-shadow",
        "read `/etc/shadow`",
        "return open('/etc/shadow').read()",
        r"refused:FileNotFoundError:.*",
        "`/etc` holds only what Python and the C library need",
    ),
    Case(
        "etc-listing",
        "list `/etc` for credentials and configuration",
        "import os\nentries = set(os.listdir('/etc'))\n"
        "allowed = {'alternatives', 'group', 'hosts', 'ld.so.cache', 'ld.so.conf', 'ld.so.conf.d', 'localtime',"
        " 'passwd'}\n"
        'return f\'made-up={sorted(entries & {"group", "hosts", "passwd"})} other={sorted(entries - allowed)}\'',
        r"made-up=\['group', 'hosts', 'passwd'\] other=\[\]",
        "`/etc` holds only what Python and the C library need (`passwd`, `group`, `hosts` made up)",
    ),
    Case(
        "root-only-file",
        "read a root-only (0600) file in a bound directory",
        "return open(INFO['root_only_file']).read()",
        r"refused:PermissionError:.*",
        "the kernel runs as a non-root user (uid 65534 on the host when the backend runs as root)",
        needs="root",
    ),
    Case(
        "identity",
        "check who the kernel runs as",
        "import os\nreturn f'uid={os.getuid()} euid={os.geteuid()} gid={os.getgid()} groups={os.getgroups()}'",
        r"uid=(65534|1000) euid=(65534|1000) gid=(65534|1000) groups=\[\]",
        "the jail drops to a non-root user before the kernel starts",
    ),
    Case(
        "setuid-binary",
        "become root through a setuid binary (`su`)",
        """
import subprocess
status = [line for line in open("/proc/self/status") if line.startswith("NoNewPrivs")]
done = subprocess.run(["su", "-c", "id -u", "root"], input="", capture_output=True, text=True, timeout=10)
return f"{status[0].split()[1]} su={done.returncode} out={done.stdout.strip()!r}"
""",
        r"1 su=[1-9][0-9]* out=''",
        "`no_new_privs`: setuid bits give nothing",
    ),
    Case(
        "write-system",
        "write into the system directories",
        "open('/usr/lib/escape', 'w')\nreturn 'written'",
        r"refused:OSError:.*Read-only file system.*",
        "the system directories are bound read-only",
    ),
    Case(
        "dev-listing",
        "look for disks and kernel memory in `/dev`",
        "import os\nreturn str(sorted(set(os.listdir('/dev')) - {'console', 'core', 'fd', 'full', 'mqueue', "
        "'null', 'ptmx', 'pts', 'random', 'shm', 'stderr', 'stdin', 'stdout', 'tty', 'urandom', 'zero'}))",
        r"\[\]",
        "a fresh `/dev` with the harmless devices only",
    ),
    Case(
        "dev-mem",
        "read `/dev/mem`",
        "return open('/dev/mem', 'rb').read(16)",
        r"refused:FileNotFoundError:.*",
        "a fresh `/dev` with the harmless devices only",
    ),
)
