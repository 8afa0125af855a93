"""Backend options: the ``key=value`` words after the backend name on the command line.

A backend's :meth:`from_options` reads each option it knows through one typed
getter (:meth:`BackendOptions.string`, :meth:`~BackendOptions.size`,
:meth:`~BackendOptions.boolean`, :meth:`~BackendOptions.choice`) and then calls
:meth:`~BackendOptions.finish`, which rejects whatever the user gave that no
getter asked for. Every error is a :class:`~pyvduse.errors.ConfigError` whose
message is one line naming the backend, the key and the offending value.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Iterable, Sequence

from pyvduse.errors import ConfigError


class _Required(enum.Enum):
    """Sentinel type: a getter called without a default makes its option required."""

    REQUIRED = enum.auto()


REQUIRED = _Required.REQUIRED

_UNITS = {
    "": 1,
    "k": 1 << 10,
    "m": 1 << 20,
    "g": 1 << 30,
    "t": 1 << 40,
    "p": 1 << 50,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
    "pib": 1 << 50,
}
_SIZE_RE = re.compile(r"([0-9]+)([a-z]*)", re.IGNORECASE)
_TRUE = frozenset({"on", "yes", "true", "1"})
_FALSE = frozenset({"off", "no", "false", "0"})


def parse_size(text: str) -> int:
    """Return the byte count ``text`` spells, or raise :class:`ValueError`.

    Accepts a non-negative integer with an optional binary unit: ``k``, ``m``,
    ``g``, ``t``, ``p`` (either case) or ``KiB``, ``MiB``, ``GiB``, ``TiB``,
    ``PiB`` (any case); all units are powers of 1024. ``KB``-style units are
    refused because they are ambiguous.
    """
    match = _SIZE_RE.fullmatch(text.strip())
    if match is None:
        raise ValueError(text)
    number, unit = match.groups()
    factor = _UNITS.get(unit.lower())
    if factor is None:
        raise ValueError(text)
    return int(number) * factor


def check_disk_size(backend: str, size: int) -> int:
    """Return ``size`` if it is a positive multiple of 512 bytes, else raise :class:`ConfigError`.

    For backends whose size is configured rather than found (``null``, ``memory``).
    """
    if size <= 0 or size % 512:
        raise ConfigError(f"backend {backend!r}: size {size} must be a positive multiple of 512")
    return size


class BackendOptions:
    """The ``key=value`` options of one backend, consumed by typed getters.

    Build it with :meth:`parse`. Each getter marks its key as known (whether or
    not the user gave it), so :meth:`finish` can list the known keys when it
    rejects unknown ones. A getter called without ``default`` makes the option
    required.
    """

    def __init__(self, values: dict[str, str], backend: str = "") -> None:
        self._values = dict(values)
        self._backend = backend
        self._known: list[str] = []

    @classmethod
    def parse(cls, args: Iterable[str], backend: str = "") -> BackendOptions:
        """Parse ``["key=value", ...]``; ``backend`` names the backend in error messages.

        Raises :class:`ConfigError` for a word without ``=``, an empty key or a
        key given twice. Values may be empty and may contain ``=``.
        """
        options = cls({}, backend)
        for arg in args:
            key, sep, value = arg.partition("=")
            if not sep:
                raise options._error(f"option {arg!r} is not of the form key=value")
            if not key:
                raise options._error(f"option {arg!r} has an empty key")
            if key in options._values:
                raise options._error(f"option {key}= given twice")
            options._values[key] = value
        return options

    @property
    def backend(self) -> str:
        """The backend name used in error messages ("" if none was given)."""
        return self._backend

    def __contains__(self, key: object) -> bool:
        """True if the user gave ``key`` (does not mark it known)."""
        return key in self._values

    # -- getters ------------------------------------------------------------------------

    def string(self, key: str, default: str | _Required = REQUIRED) -> str:
        """Return the value of ``key``; an empty value is an error."""
        raw = self._get(key, default)
        if raw is None:
            assert not isinstance(default, _Required)
            return default
        return raw

    def size(self, key: str, default: int | _Required = REQUIRED) -> int:
        """Return ``key`` as a byte count (see :func:`parse_size`)."""
        raw = self._get(key, default)
        if raw is None:
            assert not isinstance(default, _Required)
            return default
        try:
            return parse_size(raw)
        except ValueError:
            raise self._error(
                f"option {key}={raw}: not a size (use e.g. 512, 4k, 1M, 1G or 1GiB)"
            ) from None

    def seconds(self, key: str, default: float, *, zero_ok: bool = False) -> float:
        """Return ``key`` as a finite number of seconds, above 0 (or 0 too with ``zero_ok``)."""
        raw = self.string(key, "")
        if not raw:
            return default
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
            bound = "0 or more" if zero_ok else "more than 0"
            raise self._error(f"option {key}={raw}: not a number of seconds ({bound})")
        return value

    def boolean(self, key: str, default: bool | _Required = REQUIRED) -> bool:
        """Return ``key`` as a flag: on/off, yes/no, true/false or 1/0 (any case)."""
        raw = self._get(key, default)
        if raw is None:
            assert not isinstance(default, _Required)
            return default
        word = raw.lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
        raise self._error(f"option {key}={raw}: not a boolean (use on or off)")

    def choice(self, key: str, choices: Sequence[str], default: str | _Required = REQUIRED) -> str:
        """Return ``key``, which must be one of ``choices`` (compared exactly)."""
        raw = self._get(key, default)
        if raw is None:
            assert not isinstance(default, _Required)
            return default
        if raw not in choices:
            raise self._error(f"option {key}={raw}: must be one of {', '.join(choices)}")
        return raw

    def remaining(self) -> dict[str, str]:
        """Return the options no getter has asked for so far, and mark them known.

        For backends that pass options on to something else (the ``python``
        backend hands them to a user's class): after this, :meth:`finish`
        accepts everything.
        """
        rest = {key: value for key, value in self._values.items() if key not in self._known}
        self._known.extend(rest)
        return rest

    def finish(self) -> None:
        """Raise :class:`ConfigError` if the user gave a key no getter asked for."""
        unknown = [key for key in self._values if key not in self._known]
        if not unknown:
            return
        noun = "option" if len(unknown) == 1 else "options"
        where = f" for backend {self._backend!r}" if self._backend else ""
        known = ", ".join(self._known) if self._known else "none"
        raise ConfigError(f"unknown {noun}{where}: {', '.join(unknown)} (known: {known})")

    # -- helpers ------------------------------------------------------------------------

    def _get(self, key: str, default: object) -> str | None:
        """Return the raw non-empty value, or None if absent and ``default`` is usable."""
        if key not in self._known:
            self._known.append(key)
        raw = self._values.get(key)
        if raw is None:
            if isinstance(default, _Required):
                raise self._error(f"missing required option {key}=")
            return None
        if not raw:
            raise self._error(f"option {key}= has an empty value")
        return raw

    def _error(self, message: str) -> ConfigError:
        prefix = f"backend {self._backend!r}: " if self._backend else "backend options: "
        return ConfigError(prefix + message)
