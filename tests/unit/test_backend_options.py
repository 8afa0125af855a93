"""BackendOptions: parsing key=value words and the typed getters."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyvduse.backends.options import BackendOptions, check_disk_size, parse_size
from pyvduse.errors import ConfigError


def opts(*args: str) -> BackendOptions:
    return BackendOptions.parse(list(args), backend="file")


def one_line_error(excinfo: pytest.ExceptionInfo[ConfigError]) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# -- parse ------------------------------------------------------------------------------


def test_parse_values() -> None:
    options = opts("path=/x", "size=1G", "expr=a=b")
    assert options.string("path") == "/x"
    assert options.size("size") == 1 << 30
    assert options.string("expr") == "a=b"
    assert "path" in options and "nope" not in options
    options.finish()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["path"], "'path' is not of the form key=value"),
        (["=x"], "'=x' has an empty key"),
        (["path=/a", "path=/b"], "path= given twice"),
    ],
)
def test_parse_errors(args: list[str], needle: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        BackendOptions.parse(args, backend="file")
    message = one_line_error(excinfo)
    assert needle in message
    assert message.startswith("backend 'file': ")


def test_parse_without_backend_name() -> None:
    with pytest.raises(ConfigError, match=r"^backend options: "):
        BackendOptions.parse(["x"])


# -- size -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0", 0),
        ("512", 512),
        ("4k", 4096),
        ("4K", 4096),
        ("1M", 1 << 20),
        ("1m", 1 << 20),
        ("1G", 1 << 30),
        ("1T", 1 << 40),
        ("1KiB", 1024),
        ("1MiB", 1 << 20),
        ("1GiB", 1 << 30),
        ("3gib", 3 << 30),
        ("2TiB", 2 << 40),
    ],
)
def test_size_forms(text: str, value: int) -> None:
    assert opts(f"size={text}").size("size") == value


@pytest.mark.parametrize("text", ["-1", "-4k", "1.5G", "abc", "1KB", "1 G x", "G", "1Gi", "0x10"])
def test_size_rejects_garbage(text: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        opts(f"size={text}").size("size")
    message = one_line_error(excinfo)
    assert f"size={text}" in message
    assert "not a size" in message


@given(st.integers(min_value=0, max_value=1 << 40),
       st.sampled_from([("", 1), ("k", 1024), ("M", 1 << 20), ("GiB", 1 << 30), ("t", 1 << 40)]))
def test_parse_size_property(number: int, unit: tuple[str, int]) -> None:
    suffix, factor = unit
    assert parse_size(f"{number}{suffix}") == number * factor


def test_size_default_and_required() -> None:
    assert opts().size("size", 123) == 123
    with pytest.raises(ConfigError) as excinfo:
        opts().size("size")
    assert one_line_error(excinfo) == "backend 'file': missing required option size="


def test_check_disk_size() -> None:
    assert check_disk_size("memory", 4096) == 4096
    for bad in (0, -512, 1000):
        with pytest.raises(ConfigError, match="positive multiple of 512"):
            check_disk_size("memory", bad)


# -- boolean, choice, string ------------------------------------------------------------


@pytest.mark.parametrize("word", ["on", "yes", "true", "1", "ON", "True"])
def test_boolean_true(word: str) -> None:
    assert opts(f"direct={word}").boolean("direct", False) is True


@pytest.mark.parametrize("word", ["off", "no", "false", "0", "OFF", "No"])
def test_boolean_false(word: str) -> None:
    assert opts(f"direct={word}").boolean("direct", True) is False


def test_boolean_default_and_garbage() -> None:
    assert opts().boolean("direct", True) is True
    with pytest.raises(ConfigError) as excinfo:
        opts("direct=maybe").boolean("direct", False)
    assert "direct=maybe" in one_line_error(excinfo)


def test_choice() -> None:
    assert opts("cache=none").choice("cache", ["none", "writeback"], "writeback") == "none"
    assert opts().choice("cache", ["none", "writeback"], "writeback") == "writeback"
    with pytest.raises(ConfigError) as excinfo:
        opts("cache=bogus").choice("cache", ["none", "writeback"], "none")
    assert one_line_error(excinfo) == (
        "backend 'file': option cache=bogus: must be one of none, writeback")


def test_string_default_required_and_empty() -> None:
    assert opts().string("path", "/dev/null") == "/dev/null"
    with pytest.raises(ConfigError, match="missing required option path="):
        opts().string("path")
    with pytest.raises(ConfigError, match="option path= has an empty value"):
        opts("path=").string("path")


# -- finish -----------------------------------------------------------------------------


def test_finish_lists_unknown_and_known_keys() -> None:
    options = opts("path=/x", "colour=red")
    options.string("path")
    options.boolean("readonly", False)
    options.boolean("direct", False)
    with pytest.raises(ConfigError) as excinfo:
        options.finish()
    assert one_line_error(excinfo) == (
        "unknown option for backend 'file': colour (known: path, readonly, direct)")


def test_finish_plural_and_no_known_keys() -> None:
    options = opts("a=1", "b=2")
    with pytest.raises(ConfigError) as excinfo:
        options.finish()
    assert one_line_error(excinfo) == "unknown options for backend 'file': a, b (known: none)"


def test_finish_accepts_defaults_not_given() -> None:
    options = opts("path=/x")
    options.string("path")
    options.boolean("direct", False)
    options.finish()


def test_remaining_takes_what_no_getter_asked_for() -> None:
    options = opts("script=./x.py", "size=1M", "expr=a=b", "empty=")
    assert options.string("script") == "./x.py"
    options.string("class", "")
    assert options.remaining() == {"size": "1M", "expr": "a=b", "empty": ""}
    options.finish()  # the remaining options count as known now
    assert options.remaining() == {}
