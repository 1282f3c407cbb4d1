"""The kernel-side modules, called in-process (no kernel), and the code that ships them.

Each module is also loaded here from its source text, as the kernel loads it
(:mod:`async_modal_exec.kernel_side.loader`), so what is tested is what ships.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import io
import json
import os
import sys
import types
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from async_modal_exec import environment, files, kernel_side, packages
from async_modal_exec.kernel_side import env as kernel_env
from async_modal_exec.kernel_side import files as kernel_files
from async_modal_exec.kernel_side import loader
from async_modal_exec.kernel_side import packages as kernel_packages
from async_modal_exec.kernel_side import values as kernel_values

# -- fakes of what IPython gives the kernel side ---------------------------------------------


class FakeDisplayPub:
    def __init__(self) -> None:
        self.published: list[dict[str, Any]] = []

    def publish(self, data: dict[str, Any], metadata: Any = None) -> None:
        self.published.append(data)


class FakeKernel:
    def __init__(self) -> None:
        self.metadata: dict[str, Any] = {}
        self.prompts: list[str] = []
        self.reply = ""

    def get_parent(self) -> dict[str, Any]:
        return {"metadata": self.metadata}

    def raw_input(self, prompt: str = "") -> str:
        self.prompts.append(prompt)
        return self.reply


class FakeDisplayHook:
    def compute_format_data(self, result: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        return {"text/plain": repr(result)}, {}


class FakeShell:
    def __init__(self) -> None:
        self.kernel = FakeKernel()
        self.display_pub = FakeDisplayPub()
        self.displayhook = FakeDisplayHook()


@pytest.fixture
def shell() -> FakeShell:
    return FakeShell()


@pytest.fixture
def user_ns(shell: FakeShell) -> dict[str, Any]:
    """A stand-in for the kernel's user namespace."""
    return {"get_ipython": lambda: shell}


@pytest.fixture
def kernel_modules() -> Iterator[None]:
    """Drop the modules shipped code defined in this process's ``sys.modules``."""
    names = (files.MODULE, environment.MODULE, "async_modal_exec_host_tools")
    for name in names:
        assert name not in sys.modules
    yield
    for name in names:
        sys.modules.pop(name, None)


def run_in_kernel(code: str, user_ns: dict[str, Any]) -> None:
    """Run shipped code as a cell would, and check it left no name in the user's namespace."""
    before = set(user_ns)
    exec(compile(code, "<cell>", "exec"), user_ns)
    assert set(user_ns) - before <= {"__builtins__"}


def loaded(name: str) -> types.ModuleType:
    """Kernel-side module ``name`` made from its source text under a fresh name, as shipped."""
    module = f"_test_kernel_side_{name}_{uuid.uuid4().hex}"
    loader.define(module, [(kernel_side.source(name), f"<{name}>")])
    return sys.modules.pop(module)


# -- shipping ---------------------------------------------------------------------------------


def test_the_loader_defines_a_module_once_and_leaves_nothing_when_its_code_fails() -> None:
    name = f"_test_loader_{uuid.uuid4().hex}"
    try:
        loader.define(name, [("x = 1", "<a>"), ("y = x + 1", "<b>")])
        module = sys.modules[name]
        assert (module.x, module.y) == (1, 2)
        loader.define(name, [("x = 2", "<a>")])  # exists: nothing happens
        assert sys.modules[name] is module and module.x == 1
    finally:
        sys.modules.pop(name, None)
    with pytest.raises(ZeroDivisionError):
        loader.define(name, [("import sys\nassert __name__ in sys.modules\n1 / 0", "<c>")])
    assert name not in sys.modules


def test_every_kernel_side_module_ships_and_imports_only_the_standard_library() -> None:
    package = Path(kernel_side.__file__).parent
    names = sorted(p.stem for p in package.glob("*.py") if p.stem != "__init__")
    assert names == ["env", "files", "host_tools", "loader", "packages", "values"]
    for name in names:
        text = kernel_side.source(name)
        assert text == (package / f"{name}.py").read_text(encoding="utf-8")
        assert "async_modal_exec" not in "\n".join(
            line for line in text.splitlines() if line.startswith(("import ", "from "))
        ), name
        loaded(name)  # its source runs on its own


def test_run_code_binds_no_name_in_the_users_namespace(user_ns: dict[str, Any]) -> None:
    out = io.StringIO()
    user_ns["out"] = out
    code = kernel_side.run_code("packages", "answer('m=', probe([]))\nprint('x', file=stream)", stream="out")
    assert "\n" not in code  # one line: IPython's line transforms never see the module's lines
    sys.stdout, saved = out, sys.stdout
    try:
        run_in_kernel(code, user_ns)
    finally:
        sys.stdout = saved
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("m=") and json.loads(lines[0][2:])["satisfied"] == {}
    assert lines[1] == "x"


# -- files ------------------------------------------------------------------------------------


@pytest.fixture
def work(tmp_path: Path) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    return work


class Helper:
    """A :class:`kernel_files.Files` on ``work`` that records its answers."""

    def __init__(self, work: Path) -> None:
        self.answers: list[dict[str, Any]] = []
        self.chunk = ""
        self.files = kernel_files.Files(str(work), self.answers.append, lambda: self.chunk)

    def __call__(self, operation: str, *args: Any, chunk: bytes | None = None) -> dict[str, Any]:
        if chunk is not None:
            self.chunk = base64.b64encode(chunk).decode("ascii")
        getattr(self.files, operation)(*args)
        return self.answers[-1]

    def upload(self, path: str, data: bytes, *, pieces: int = 3, sha256: str | None = None) -> dict[str, Any]:
        self("begin_upload", "t", path)
        size = max(1, len(data) // pieces)
        for start in range(0, len(data), size):
            self("put", "t", chunk=data[start : start + size])
        return self("finish_upload", "t", sha256 or hashlib.sha256(data).hexdigest())


def test_files_upload_and_download_in_chunks(work: Path) -> None:
    helper = Helper(work)
    data = os.urandom(10_000)
    answer = helper.upload("sub/dir/data.bin", data)
    assert (work / "sub/dir/data.bin").read_bytes() == data
    assert answer["path"] == str(work / "sub/dir/data.bin") and answer["size"] == 10_000
    assert (answer["name"], answer["is_dir"], answer["is_link"]) == ("data.bin", False, False)
    assert [p.name for p in (work / "sub/dir").iterdir()] == ["data.bin"]  # no .part left

    begun = helper("begin_download", "d", "sub/dir/data.bin")
    assert begun["token"] == "d" and begun["file"]["size"] == 10_000
    received = b""
    while True:
        piece = helper("get", "d", 4096)
        received += base64.b64decode(piece["chunk"])
        if piece["eof"]:
            break
    assert received == data and piece["sha256"] == hashlib.sha256(data).hexdigest()
    assert helper.files.transfers == {}


def test_files_a_checksum_mismatch_or_an_abort_leaves_nothing(work: Path) -> None:
    helper = Helper(work)
    with pytest.raises(ValueError, match=r"^checksum mismatch"):
        helper.upload("f.bin", b"abc", sha256="0" * 64)
    assert list(work.iterdir()) == []
    helper("begin_upload", "t", "g.bin")
    helper("put", "t", chunk=b"partial")
    assert helper("abort", "t") == {"aborted": True}
    assert list(work.iterdir()) == [] and helper.files.transfers == {}
    assert helper("abort", "t") == {"aborted": False}


def test_files_paths_outside_the_work_directory_are_refused(work: Path, tmp_path: Path) -> None:
    helper = Helper(work)
    (tmp_path / "secret").write_text("s")
    (work / "link").symlink_to(tmp_path / "secret")
    (work / "loop").symlink_to(work / "loop")
    for path in ("../secret", "/etc/passwd", "link", "loop/../../secret"):
        with pytest.raises(kernel_files.PathRefused):
            helper("stat_path", path)
    with pytest.raises((ValueError, kernel_files.PathRefused)):  # realpath itself refuses a NUL
        helper("stat_path", "a\0b")
    with pytest.raises(kernel_files.PathRefused):
        helper("remove", ".", False)
    assert issubclass(kernel_files.PathRefused, PermissionError)
    with pytest.raises(ValueError, match="root"):
        kernel_files.Files(os.sep, print, str)


def test_files_list_stat_and_remove(work: Path) -> None:
    helper = Helper(work)
    (work / "d" / "e").mkdir(parents=True)
    (work / "d" / "f.txt").write_text("hello")
    (work / "ln").symlink_to(work / "d")
    entries = helper("listdir", ".")["entries"]
    assert [(e["name"], e["is_dir"], e["is_link"]) for e in entries] == [
        ("d", True, False),
        ("ln", False, True),
    ]
    assert helper("stat_path", "d/f.txt")["size"] == 5
    with pytest.raises(FileNotFoundError):
        helper("listdir", "missing")
    with pytest.raises(NotADirectoryError):
        helper("listdir", "d/f.txt")
    assert helper("remove", "ln", False) == {"removed": str(work / "ln")}  # the link, not its target
    assert (work / "d" / "f.txt").exists()
    with pytest.raises(OSError):
        helper("remove", "d", False)
    helper("remove", "d", True)
    assert list(work.iterdir()) == []


def test_files_a_fifo_or_a_directory_is_not_downloaded(work: Path) -> None:
    helper = Helper(work)
    os.mkfifo(work / "pipe")
    (work / "dir").mkdir()
    with pytest.raises(ValueError, match="not a regular file"):
        helper("begin_download", "t", "pipe")
    with pytest.raises(IsADirectoryError):
        helper("begin_download", "t", "dir")
    with pytest.raises(IsADirectoryError):
        helper("begin_upload", "t", "dir/")
    assert helper.files.transfers == {}


def test_files_helper_code_installs_the_module_once(
    work: Path, tmp_path: Path, shell: FakeShell, user_ns: dict[str, Any], kernel_modules: None
) -> None:
    run_in_kernel(files.helper_code(str(work)), user_ns)
    run_in_kernel(files.helper_code(str(tmp_path)), user_ns)  # the first work directory stays
    module = sys.modules[files.MODULE]
    assert module.root == str(work)
    run_in_kernel(files.call_code("begin_upload", "t", "x.txt"), user_ns)
    shell.kernel.metadata[files.CHUNK_KEY] = base64.b64encode(b"hi").decode()
    run_in_kernel(files.call_code("put", "t"), user_ns)
    assert len(module.transfers) == 1
    run_in_kernel(files.call_code("finish_upload", "t", hashlib.sha256(b"hi").hexdigest()), user_ns)
    assert (work / "x.txt").read_bytes() == b"hi" and module.transfers == {}
    answers = [data[files.FILES_MIME] for data in shell.display_pub.published]
    assert answers[:2] == [{"token": "t"}, {"written": 2}] and answers[2]["name"] == "x.txt"


# -- environment ------------------------------------------------------------------------------


def test_env_apply_and_restore_on_a_copy_of_the_environment() -> None:
    module = loaded("env")
    environ = dict(os.environ, KEEP="before")
    environ.pop("NEW", None)
    original = dict(environ)
    module.apply({"BASE": "executor"}, save=False, environ=environ)  # an executor's env: kept
    original["BASE"] = "executor"
    module.apply({"KEEP": "during", "NEW": "x"}, save=True, environ=environ)
    assert (environ["KEEP"], environ["NEW"]) == ("during", "x")
    assert module.saved == {"KEEP": "before", "NEW": None}
    module.restore(environ)
    assert environ == original and module.saved == {}
    module.restore(environ)  # nothing saved: nothing changes
    assert environ == original


def test_env_code_reads_the_values_from_the_requests_metadata(
    shell: FakeShell, user_ns: dict[str, Any], kernel_modules: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(KeyError):  # no module yet (a new kernel): the executor replaces the kernel
        run_in_kernel(environment.restore_code(), user_ns)
    monkeypatch.setenv("AME_TEST_KEEP", "before")
    monkeypatch.delenv("AME_TEST_NEW", raising=False)
    shell.kernel.metadata[environment.METADATA_KEY] = {"AME_TEST_KEEP": "during", "AME_TEST_NEW": "x"}
    code = environment.apply_code(save=True)
    assert "during" not in code
    run_in_kernel(code, user_ns)
    assert (os.environ["AME_TEST_KEEP"], os.environ["AME_TEST_NEW"]) == ("during", "x")
    run_in_kernel(environment.restore_code(), user_ns)
    assert os.environ["AME_TEST_KEEP"] == "before" and "AME_TEST_NEW" not in os.environ
    assert isinstance(kernel_env.saved, dict)  # the host's copy of the module is untouched
    assert sys.modules[environment.MODULE] is not kernel_env


# -- packages ---------------------------------------------------------------------------------


def test_probe_on_installed_distributions() -> None:
    module = loaded("packages")
    version = importlib.metadata.version("pytest")
    wanted = [
        ["pytest", "pytest", "pytest"],
        [f"pytest=={version}", "pytest", None],
        ["pytest<1", "pytest", None],  # installed, at a version the spec refuses
        ["no-such-dist-ame", "no-such-dist-ame", "no_such_dist_ame"],
        ["json", None, "json"],  # a bare import name, no distribution
        ["pytest @ https://example.invalid/x.whl", "pytest", None],  # a spec packaging may not judge
        ["no.such.module", None, "no.such.module"],
    ]
    answer = module.probe(wanted)
    assert answer["satisfied"] == {
        "pytest": True,
        f"pytest=={version}": True,
        "pytest<1": False,
        "no-such-dist-ame": False,
        "json": True,
        "pytest @ https://example.invalid/x.whl": True,
        "no.such.module": False,
    }
    assert answer["uv"] is (module.shutil.which("uv") is not None)
    # Without packaging, an installed distribution is enough.
    assert module.satisfied("pytest<1", "pytest", None, requirement=None) is True


def test_probe_code_answers_in_the_marked_line(
    capsys: pytest.CaptureFixture[str], user_ns: dict[str, Any]
) -> None:
    wanted = [packages.requirement_from_spec("pytest>=1"), packages.requirement_for_import("no_such_mod_ame")]
    run_in_kernel(packages.probe_code(wanted), user_ns)
    answer = packages._marked_json(capsys.readouterr().out)
    assert answer["satisfied"] == {"pytest>=1": True, "no-such-mod-ame": False}


def test_the_installer_command_and_its_output(capsys: pytest.CaptureFixture[str]) -> None:
    assert kernel_packages.installer_command(False, "/py") == [
        "/py",
        "-m",
        "pip",
        "install",
        "--disable-pip-version-check",
        "--no-input",
    ]
    assert kernel_packages.installer_command(True, "/py")[1:] == ["pip", "install", "--python", "/py"]
    out = io.StringIO()
    script = "import sys\nfor i in range(300): print(i)\nprint('bad', file=sys.stderr)\nsys.exit(3)"
    outcome = kernel_packages.run_installer([sys.executable, "-c", script], out)
    assert outcome["returncode"] == 3
    assert out.getvalue().splitlines()[0] == "0" and "bad" in out.getvalue()
    assert outcome["output"].splitlines()[0] == "101"  # the last 200 lines
    assert outcome["output"].endswith("299\nbad\n")
    kernel_packages.answer("m=", outcome)
    assert json.loads(capsys.readouterr().out.removeprefix("m=")) == outcome


# -- values -----------------------------------------------------------------------------------


def test_values_are_encoded_exactly_or_not_at_all() -> None:
    encode = kernel_values.encode
    assert encode([1, "a", None, 2.5, True]) == [1, "a", None, 2.5, True]
    assert encode((1, {2})) == {"__type__": "tuple", "data": [1, {"__type__": "set", "data": [2]}]}
    assert encode({1: b"x"}) == {
        "__type__": "dict_with_complex_keys",
        "data": [[1, {"__type__": "bytes", "data": "eA=="}]],
    }
    assert encode(1j) == {"__type__": "complex", "real": 0.0, "imag": 1.0}
    nested: list[Any] = []
    for _ in range(60):
        nested = [nested]
    for inexact in ({"__type__": 1}, __import__("collections").OrderedDict(), nested, object()):
        with pytest.raises(ValueError):
            encode(inexact)
    assert kernel_values.serialize(object(), allow_pickle=False) is None
    assert kernel_values.serialize(3, allow_pickle=False) == "safe:3"
    pickled = kernel_values.serialize(Path("p"), allow_pickle=True)
    assert pickled is not None and pickled.startswith("pickle:")


def test_the_value_hook_adds_the_value_and_installs_once(shell: FakeShell, user_ns: dict[str, Any]) -> None:
    from async_modal_exec.agent.values import VALUE_MIME, value_hook_code

    run_in_kernel(value_hook_code(False), user_ns)
    hook = shell.displayhook
    data, _ = hook.compute_format_data((1, 2))
    assert data == {"text/plain": "(1, 2)", VALUE_MIME: 'safe:{"__type__": "tuple", "data": [1, 2]}'}
    assert VALUE_MIME not in hook.compute_format_data(Path("p"))[0]
    wrapped = hook.compute_format_data
    run_in_kernel(value_hook_code(True), user_ns)  # updates the setting, wraps nothing twice
    assert hook.compute_format_data is wrapped
    assert hook.compute_format_data(Path("p"))[0][VALUE_MIME].startswith("pickle:")


# -- host tools -------------------------------------------------------------------------------


def test_host_tool_stubs_ask_the_host_and_plain_input_is_refused() -> None:
    module = loaded("host_tools")
    kernel = FakeKernel()
    module._deserialize = lambda body: json.loads(body.removeprefix("safe:"))
    stub = module.make_stub("lookup", "Looks up.")
    with pytest.raises(module.HostToolError, match="not installed"):
        stub(1)
    module.install(kernel)
    assert (stub.__name__, stub.__doc__) == ("lookup", "Looks up.")
    kernel.reply = "ok:safe:[1, 2]"
    assert stub("a", (1, 2), key={3}) == [1, 2]
    request = json.loads(kernel.prompts[-1].removeprefix(module.MARKER))
    assert request == {
        "tool": "lookup",
        "args": ["a", {"__type__": "tuple", "data": [1, 2]}],
        "kwargs": {"key": {"__type__": "set", "data": [3]}},
    }
    kernel.reply = "error:ValueError: nope"
    with pytest.raises(module.HostToolError, match="failed: ValueError: nope"):
        stub()
    kernel.reply = "\x04"
    with pytest.raises(module.HostToolError, match="no answer"):
        stub()
    with pytest.raises(module.HostToolError, match="cannot be sent"):
        stub(object())
    with pytest.raises(RuntimeError, match=r"input\(\) is not available"):
        kernel.raw_input("name? ")


def test_host_tools_setup_code_defines_the_bridge_and_stubs(
    shell: FakeShell, user_ns: dict[str, Any], kernel_modules: None
) -> None:
    pytest.importorskip("smolagents")
    from async_modal_exec import HostTools

    def lookup(key: str) -> str:
        """Looks up."""
        return key

    tools = HostTools([lookup])
    exec(tools.setup_code(["lookup"], install_bridge=True), user_ns)
    assert set(user_ns) - {"__builtins__"} == {"get_ipython", "HostToolError", "lookup"}
    shell.kernel.reply = 'ok:safe:{"__type__": "tuple", "data": [1]}'
    assert user_ns["lookup"]("k") == (1,)  # smolagents' decoder is in the module
    assert user_ns["HostToolError"] is sys.modules["async_modal_exec_host_tools"].HostToolError
