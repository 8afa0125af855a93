"""Storage backends and the registry the command line picks them from.

``pyvduse serve NAME key=value ...`` becomes ``open_backend(NAME, [...])``:
the name selects an entry of :data:`BACKENDS`, whose ``from_options`` reads
the options and rejects unknown ones. ``python`` loads a backend the user
wrote (:mod:`pyvduse.backends.python`); ``nbd`` is a client of an NBD server
(:mod:`pyvduse.backends.nbd`); ``rbd`` opens a Ceph RBD image
(:mod:`pyvduse.backends.rbd`), whose Python binding is only imported when an
``rbd`` backend is built, so pyvduse imports without it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from importlib import import_module
from typing import TYPE_CHECKING, Any, Protocol

from pyvduse.backends.base import AsynchronousBackend, Backend
from pyvduse.backends.options import BackendOptions
from pyvduse.errors import ConfigError

if TYPE_CHECKING:  # imported on first use: a daemon loads only the backend it serves
    from pyvduse.backends.file import FileBackend
    from pyvduse.backends.memory import MemoryBackend
    from pyvduse.backends.nbd import NbdBackend
    from pyvduse.backends.null import NullBackend
    from pyvduse.backends.python import PythonBackendLoader, load_backend
    from pyvduse.backends.rbd import RbdBackend

__all__ = [
    "BACKENDS",
    "AsynchronousBackend",
    "Backend",
    "BackendFactory",
    "BackendOptions",
    "FileBackend",
    "MemoryBackend",
    "NbdBackend",
    "NullBackend",
    "PythonBackendLoader",
    "RbdBackend",
    "backend_help",
    "backend_summary",
    "load_backend",
    "open_backend",
]

#: Where each lazily imported name of this package lives.
_LAZY = {
    "FileBackend": "file", "MemoryBackend": "memory", "NbdBackend": "nbd",
    "NullBackend": "null", "PythonBackendLoader": "python", "load_backend": "python",
    "RbdBackend": "rbd",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{module}"), name)


class BackendFactory(Protocol):
    """What the registry holds: a backend class (or anything) with ``from_options``."""

    def from_options(self, options: BackendOptions) -> Backend:
        """Build a backend from ``options``, calling ``options.finish()``; may raise ConfigError."""
        ...


class _Registry(Mapping[str, BackendFactory]):
    """Backend name -> factory, each module imported when its backend is first asked for
    (starting the daemon is quicker: it loads one backend, not all of them)."""

    def __init__(self, classes: Mapping[str, str]) -> None:
        self._classes = dict(classes)

    def __getitem__(self, name: str) -> BackendFactory:
        factory: BackendFactory = __getattr__(self._classes[name])
        return factory

    def __iter__(self) -> Iterator[str]:
        return iter(self._classes)

    def __len__(self) -> int:
        return len(self._classes)


#: Backends by command-line name: the built-in backend classes, and the loader of user backends.
BACKENDS: Mapping[str, BackendFactory] = _Registry({
    "file": "FileBackend", "memory": "MemoryBackend", "nbd": "NbdBackend",
    "null": "NullBackend", "python": "PythonBackendLoader", "rbd": "RbdBackend",
})


def open_backend(name: str, args: Sequence[str]) -> Backend:
    """Build backend ``name`` from its ``key=value`` ``args``; any bad input is a ConfigError."""
    if name not in BACKENDS:
        raise ConfigError(f"unknown backend {name!r} (known: {', '.join(sorted(BACKENDS))})")
    return BACKENDS[name].from_options(BackendOptions.parse(args, backend=name))


def backend_summary(name: str) -> str:
    """The first line of backend ``name``'s documentation."""
    factory = BACKENDS[name]
    module = import_module(getattr(factory, "__module__", f"{__name__}.{name}"))
    return (module.__doc__ or name).strip().splitlines()[0].replace("``", "")


def backend_help(name: str) -> str:
    """What ``pyvduse serve NAME --help`` prints: the backend module's documentation
    (its options first), with reST's double backquotes dropped. Raises
    :class:`ConfigError` for an unknown backend."""
    if name not in BACKENDS:
        raise ConfigError(f"unknown backend {name!r} (known: {', '.join(sorted(BACKENDS))})")
    factory = BACKENDS[name]
    module = import_module(getattr(factory, "__module__", f"{__name__}.{name}"))
    text = (module.__doc__ or "").strip().replace("``", "")
    return (f"usage: pyvduse serve [OPTIONS] {name} [key=value ...]\n\n{text}\n\n"
            f"The serve options: pyvduse serve --help.\n")
