"""The ``python`` backend: user backends from scripts and modules, and every way loading fails."""

from __future__ import annotations

import importlib.machinery
import logging
import re
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import EXAMPLES

from pyvduse import cli
from pyvduse.backends import BACKENDS, load_backend, open_backend
from pyvduse.backends.python import PythonBackendLoader, backend_classes
from pyvduse.errors import ConfigError
from pyvduse.testing import FakeVduse
from pyvduse.testing.conformance import check_backend

HEADER = "from pyvduse.backends import Backend, BackendOptions\n"

RAM = HEADER + textwrap.dedent("""
    class Ram(Backend):
        def __init__(self, size="1M", fill="0"):
            self.args = {"size": size, "fill": fill}
            self.data = bytearray([int(fill)]) * (1 << 20)
        def size(self):
            return len(self.data)
        def read(self, offset, buf):
            buf[:] = self.data[offset:offset + len(buf)]
""")


@pytest.fixture
def write_script(tmp_path: Path) -> Iterator[Any]:
    """Write ``text`` to ``tmp_path/name``; the modules loaded are forgotten afterwards."""
    before = set(sys.modules)

    def write(text: str, name: str = "user_backend.py") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    yield write
    for name in set(sys.modules) - before:
        if name.startswith(("pyvduse_script_", "userpkg")):
            del sys.modules[name]


def one_line(excinfo: pytest.ExceptionInfo[ConfigError]) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


def fails(**kwargs: Any) -> str:
    with pytest.raises(ConfigError) as excinfo:
        load_backend(**kwargs)
    return one_line(excinfo)


# -- finding and building ---------------------------------------------------------------


def test_registered_as_python() -> None:
    assert BACKENDS["python"] is PythonBackendLoader
    assert PythonBackendLoader.name == "python"


def test_single_class_gets_the_options_as_strings(write_script: Any) -> None:
    script = write_script(RAM)
    backend = open_backend("python", [f"script={script}", "size=2M", "fill=7"])
    try:
        assert type(backend).__name__ == "Ram"
        assert backend.args == {"size": "2M", "fill": "7"}  # type: ignore[attr-defined]
        assert backend.size() == 1 << 20 and not backend.can_write
        buf = bytearray(4)
        backend.read(10, memoryview(buf))
        assert buf == b"\x07" * 4
    finally:
        backend.close()
    assert load_backend(script=str(script)).args == {  # type: ignore[attr-defined]
        "size": "1M", "fill": "0"}


def test_script_module_is_registered_and_has_a_file(write_script: Any) -> None:
    script = write_script(RAM + textwrap.dedent("""
        import dataclasses, sys
        @dataclasses.dataclass
        class Geometry:  # dataclasses need the module in sys.modules while it runs
            blocks: int
        here = __file__
        name = __name__
    """), name="my-disk.v2.py")
    backend = load_backend(script=script)
    module = sys.modules[type(backend).__module__]
    assert module.name == "pyvduse_script_my_disk_v2"
    assert module.here == str(script)


def test_from_options_gets_backend_options(write_script: Any) -> None:
    script = write_script(HEADER + textwrap.dedent("""
        class Sized(Backend):
            def __init__(self, size):
                self._size = size
            @classmethod
            def from_options(cls, options: BackendOptions):
                size = options.size("size")
                options.finish()
                return cls(size)
            def size(self):
                return self._size
            def read(self, offset, buf):
                buf[:] = bytes(len(buf))
    """))
    assert load_backend(script=script, options={"size": "64k"}).size() == 65536
    label = re.escape(str(script))
    with pytest.raises(ConfigError, match=rf"^backend '{label}': missing required option size=$"):
        load_backend(script=script)
    with pytest.raises(ConfigError, match=rf"^unknown option for backend '{label}': colour "
                       r"\(known: size\)$"):
        load_backend(script=script, options={"size": "1M", "colour": "red"})
    with pytest.raises(ConfigError, match=r"option size=big: not a size"):
        open_backend("python", [f"script={script}", "size=big"])


def test_create_factory_wins_over_classes(write_script: Any) -> None:
    script = write_script(RAM + textwrap.dedent("""
        class Other(Ram):
            pass
        def create(fill="0", **extra):
            backend = Ram(fill=fill)
            backend.extra = extra
            return backend
    """))
    backend = load_backend(script=script, options={"fill": "3", "anything": "goes"})
    assert backend.extra == {"anything": "goes"}  # type: ignore[attr-defined]
    assert backend.args["fill"] == "3"  # type: ignore[attr-defined]


def test_class_option_picks_one_of_several(write_script: Any) -> None:
    script = write_script(RAM + "class Other(Ram):\n    pass\n")
    message = fails(script=script)
    assert message == (f"backend 'python': {script} defines 2 Backend subclasses (Ram, Other); "
                       "choose one with class=NAME")
    backend = open_backend("python", [f"script={script}", "class=Other", "fill=1"])
    assert type(backend).__name__ == "Other"
    assert fails(script=script, class_name="Nope") == (
        f"backend 'python': {script} has no class 'Nope' (backend classes: Ram, Other)")
    for name in ("BackendOptions", "Backend"):
        assert fails(script=script, class_name=name) == (
            f"backend 'python': {name} in {script} is not a subclass of pyvduse.backends.Backend")


def test_imported_private_and_abstract_classes_do_not_count(write_script: Any) -> None:
    script = write_script(RAM + textwrap.dedent("""
        import abc
        from pyvduse.backends import MemoryBackend, NullBackend
        class _Helper(Ram):
            pass
        class Abstract(Ram, metaclass=abc.ABCMeta):
            @abc.abstractmethod
            def more(self): ...
        Alias = Ram
    """))
    backend = load_backend(script=script)
    module = sys.modules[type(backend).__module__]
    assert [cls.__name__ for cls in backend_classes(module)] == ["Ram"]


def test_no_backend_in_script(write_script: Any) -> None:
    script = write_script("X = 1\n")
    assert fails(script=script) == (
        f"backend 'python': {script} defines no Backend subclass and no create() function")
    script = write_script("create = 42\n", name="noncallable.py")
    assert fails(script=script) == f"backend 'python': create in {script} is not a function"


def test_constructor_signature_errors_are_one_line(write_script: Any) -> None:
    script = write_script(HEADER + textwrap.dedent("""
        class Disk(Backend):
            def __init__(self, url, *, size, cache="1M"):
                pass
            def size(self):
                return 512
            def read(self, offset, buf):
                pass
    """))
    label = str(script)
    assert fails(script=script, options={"url": "x", "size": "1", "colour": "red"}) == (
        f"unknown option for backend '{label}': colour (known: url, size, cache)")
    assert fails(script=script, options={"cache": "2M"}) == (
        f"backend '{label}': missing required options url= size=")
    positional = write_script(HEADER + "def create(path, /):\n    pass\n", name="pos.py")
    assert "required positional-only parameters (path)" in fails(script=positional)
    no_init = write_script(HEADER + textwrap.dedent("""
        class Bare(Backend):
            def size(self):
                return 512
            def read(self, offset, buf):
                pass
    """), name="bare.py")
    assert fails(script=no_init, options={"size": "1"}) == (
        f"unknown option for backend '{no_init}': size (known: none)")


def test_exceptions_while_building_name_the_line(write_script: Any) -> None:
    script = write_script(HEADER + textwrap.dedent("""
        class Disk(Backend):
            def __init__(self, size="x"):
                self._size = int(size)
            def size(self):
                return self._size
            def read(self, offset, buf):
                pass
    """))
    assert fails(script=script) == (
        f"backend 'python': Disk() in {script} failed: ValueError: invalid literal for int() "
        f"with base 10: 'x' (at {script}:5)")
    config = write_script(HEADER + textwrap.dedent("""
        from pyvduse.errors import ConfigError
        def create():
            raise ConfigError("disk: cannot reach the server")
    """), name="config.py")
    assert fails(script=config) == "disk: cannot reach the server"  # passed on unchanged
    wrong = write_script("def create():\n    return 'not a backend'\n", name="wrong.py")
    assert fails(script=wrong) == (
        f"backend 'python': create() in {wrong} returned str, not a pyvduse.backends.Backend")


# -- loading failures -------------------------------------------------------------------


def test_missing_script_and_directory(tmp_path: Path) -> None:
    missing = tmp_path / "nope.py"
    assert fails(script=missing) == f"backend 'python': no such script: {missing}"
    assert fails(script=tmp_path) == f"backend 'python': script is a directory: {tmp_path}"


def test_syntax_error_gives_file_and_line(write_script: Any) -> None:
    script = write_script(HEADER + "\nclass Broken(Backend:\n    pass\n")
    message = fails(script=script)
    assert message.startswith(f"backend 'python': syntax error in {script}:3: ")
    indent = write_script("def f():\nreturn 1\n", name="indent.py")
    assert fails(script=indent).startswith(f"backend 'python': syntax error in {indent}:2: ")


def test_import_error_in_script_gives_the_line(write_script: Any) -> None:
    script = write_script("import os\n\nimport no_such_module_xyz\n")
    assert fails(script=script) == (
        f"backend 'python': loading {script} failed: ModuleNotFoundError: No module named "
        f"'no_such_module_xyz' (at {script}:3)")


def test_error_while_running_the_module(write_script: Any) -> None:
    script = write_script("X = 1\nY = X / 0\n")
    assert fails(script=script) == (
        f"backend 'python': loading {script} failed: ZeroDivisionError: division by zero "
        f"(at {script}:2)")
    assert not any(name.startswith("pyvduse_script_user_backend") for name in sys.modules)


def test_unreadable_script(write_script: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    script = write_script(RAM)

    def denied(self: Any, path: str) -> bytes:  # root would read a chmod 0 file anyway
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(importlib.machinery.SourceFileLoader, "get_data", denied)
    assert fails(script=script) == (
        f"backend 'python': cannot read script {script}: Permission denied")


def test_script_with_another_suffix(write_script: Any) -> None:
    script = write_script(RAM, name="disk.backend")
    assert type(load_backend(script=script)).__name__ == "Ram"


def test_module_option(write_script: Any, tmp_path: Path,
                       monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "userpkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "disks.py").write_text(RAM)
    (package / "broken.py").write_text("import userpkg.nothing_here\n")
    (package / "bad_syntax.py").write_text("def (:\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    backend = open_backend("python", ["module=userpkg.disks", "fill=2"])
    assert type(backend).__name__ == "Ram"
    assert fails(module="userpkg.nope") == (
        "backend 'python': no module named 'userpkg.nope' (module= needs an importable "
        "module; use script=FILE for a file)")
    assert fails(module="nopkg_xyz.disks").startswith("backend 'python': no module named "
                                                      "'nopkg_xyz'")
    broken = fails(module="userpkg.broken")
    assert broken.startswith("backend 'python': loading userpkg.broken failed: "
                             "ModuleNotFoundError: No module named 'userpkg.nothing_here' (at ")
    assert broken.endswith("broken.py:1)")
    assert fails(module="userpkg.bad_syntax").startswith(
        f"backend 'python': syntax error in {package / 'bad_syntax.py'}:1: ")


@pytest.mark.parametrize(("args", "message"), [
    ([], "backend 'python': missing required option script= (or module=)"),
    (["script=a.py", "module=b"], "backend 'python': give only one of script= and module="),
    (["script="], "backend 'python': option script= has an empty value"),
    (["class=X"], "backend 'python': missing required option script= (or module=)"),
])
def test_loader_options(args: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        open_backend("python", args)
    assert one_line(excinfo) == message


def test_traceback_is_logged_at_debug(write_script: Any, caplog: pytest.LogCaptureFixture) -> None:
    script = write_script("def helper():\n    raise KeyError('k')\nhelper()\n")
    with caplog.at_level(logging.DEBUG, logger="pyvduse.backends.python"):
        message = fails(script=script)
    assert message.endswith(f"KeyError: 'k' (at {script}:2)")
    assert caplog.records[-1].exc_info is not None


def test_examples_load_by_path() -> None:
    ram = load_backend(script=EXAMPLES / "ramdisk.py", options={"size": "1M"})
    try:
        assert (ram.size(), ram.can_write, ram.can_discard, ram.can_flush) == (
            1 << 20, True, True, True)
    finally:
        ram.close()


# -- the command line -------------------------------------------------------------------


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    try:
        status = cli.main(list(argv))
    except SystemExit as exit_:
        status = int(exit_.code or 0)
    return status, capsys.readouterr().err


@pytest.mark.parametrize(("script", "needle"), [
    ("missing.py", "no such script: "),
    ("syntax.py", "syntax error in "),
])
def test_cli_errors_are_one_line(capsys: pytest.CaptureFixture[str], write_script: Any,
                                 tmp_path: Path, script: str, needle: str) -> None:
    write_script("x = (\n", name="syntax.py")
    status, err = run_cli(capsys, "serve", "python", f"script={tmp_path / script}")
    assert status == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"pyvduse: error: backend 'python': {needle}")


def test_cli_serves_the_ramdisk_example(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                        fake_kernel: FakeVduse,
        wait_for_file: Callable[[Path], None]) -> None:
    fake = fake_kernel
    pidfile = tmp_path / "pid"
    seen: dict[str, Any] = {}

    def drive() -> None:
        wait_for_file(pidfile)
        seen["spec"] = fake.devices["user0"]
        seen["driver_ok"] = fake.channels["user0"].start()
        cli.signal.raise_signal(cli.signal.SIGTERM)

    thread = threading.Thread(target=drive)
    thread.start()
    status, err = run_cli(capsys, "serve", "--name", "user0", "--attach", "none",
                          "--pidfile", str(pidfile), "python",
                          f"script={EXAMPLES / 'ramdisk.py'}", "size=2M")
    thread.join()
    assert status == 0, err
    assert seen["driver_ok"] == 0
    assert "serving python backend on user0 (not attached): 2097152 bytes" in err
    assert fake.destroyed == ["user0"]


# -- the documentation's examples -------------------------------------------------------


def python_blocks(text: str, after: str) -> list[str]:
    """The ```python blocks of ``text`` that follow the heading ``after``."""
    return re.findall(r"```python\n(.*?)```", text.split(after, 1)[1], re.DOTALL)


@pytest.mark.parametrize(("document", "heading", "options"), [
    ("README.md", "## Writing a backend", {"size": "1M"}),
    ("docs/backends.md", "## The smallest useful backend", {}),
])
def test_documented_backends_work(write_script: Any, document: str, heading: str,
                                  options: dict[str, str]) -> None:
    text = (EXAMPLES.parent / document).read_text()
    script = write_script(python_blocks(text, heading)[0], name="documented.py")
    assert check_backend(lambda: load_backend(script=script, options=options),
                         initial=lambda offset, length: bytes(length)) == [
        "geometry", "capabilities", "reads", "round_trip", "vectored", "write_zeroes",
        "concurrency"]


# -- what every backend needs, checked at load -----------------------------------------

READER = "    def read(self, offset, buf):\n        buf[:] = bytes(len(buf))\n"


@pytest.mark.parametrize(("body", "message"), [
    (READER, "B in {script} has no size() method (it returns the disk's size in bytes)"),
    ("    def size(self):\n        return 1 << 20\n",
     "B in {script} has no read() method (define read or readv, or submit_readv for an "
     "AsynchronousBackend)"),
    ("    def size(self):\n        raise RuntimeError('no disk')\n" + READER,
     "B.size() in {script} failed: RuntimeError: no disk (at {script}:6)"),
    ("    def size(self):\n        return 'big'\n" + READER,
     "B.size() in {script} returned 'big' (str), not an integer number of bytes"),
    ("    def size(self):\n        return 1048576.0\n" + READER,
     "B.size() in {script} returned 1048576.0 (float), not an integer number of bytes"),
    ("    def size(self):\n        return None\n" + READER,
     "B.size() in {script} returned None (NoneType), not an integer number of bytes"),
])
def test_a_backend_without_a_usable_size_or_read_is_refused_at_load(
        write_script: Any, body: str, message: str) -> None:
    closed = write_script("", "closed.flag")
    closed.unlink()
    script = write_script(HEADER + "from pathlib import Path\n\nclass B(Backend):\n" + body
                          + f"    def close(self):\n        Path({str(closed)!r}).touch()\n")
    assert fails(script=script) == "backend 'python': " + message.format(script=script)
    assert closed.exists()  # built, refused, and closed again


@pytest.mark.parametrize(("code", "message"), [
    ("import sys\nsys.exit(3)\n", "{script} called sys.exit(3) while loading"),
    ("raise SystemExit\n", "{script} called sys.exit(None) while loading"),
    ("raise KeyboardInterrupt\n", "{script} raised KeyboardInterrupt while loading"),
])
def test_a_module_that_exits_while_loading_is_an_error(write_script: Any, code: str,
                                                       message: str) -> None:
    script = write_script(code)
    assert fails(script=script) == "backend 'python': " + message.format(script=script)
    module_dir = script.parent
    sys.path.insert(0, str(module_dir))
    try:
        assert fails(module="user_backend") == (
            "backend 'python': " + message.format(script="user_backend"))
    finally:
        sys.path.remove(str(module_dir))
        sys.modules.pop("user_backend", None)
