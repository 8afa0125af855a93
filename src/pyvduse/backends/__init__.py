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

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Protocol

from pyvduse.backends.base import AsynchronousBackend, Backend
from pyvduse.backends.file import FileBackend
from pyvduse.backends.memory import MemoryBackend
from pyvduse.backends.nbd import NbdBackend
from pyvduse.backends.null import NullBackend
from pyvduse.backends.options import BackendOptions
from pyvduse.backends.python import PythonBackendLoader, load_backend
from pyvduse.backends.rbd import RbdBackend
from pyvduse.errors import ConfigError

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
    "load_backend",
    "open_backend",
]


class BackendFactory(Protocol):
    """What the registry holds: a backend class (or anything) with ``from_options``."""

    def from_options(self, options: BackendOptions) -> Backend:
        """Build a backend from ``options``, calling ``options.finish()``; may raise ConfigError."""
        ...


#: Backends by command-line name: the built-in backend classes, and the loader of user backends.
BACKENDS: Mapping[str, BackendFactory] = MappingProxyType({
    FileBackend.name: FileBackend,
    MemoryBackend.name: MemoryBackend,
    NbdBackend.name: NbdBackend,
    NullBackend.name: NullBackend,
    PythonBackendLoader.name: PythonBackendLoader,
    RbdBackend.name: RbdBackend,
})


def open_backend(name: str, args: Sequence[str]) -> Backend:
    """Build backend ``name`` from its ``key=value`` ``args``; any bad input is a ConfigError."""
    factory = BACKENDS.get(name)
    if factory is None:
        raise ConfigError(f"unknown backend {name!r} (known: {', '.join(sorted(BACKENDS))})")
    return factory.from_options(BackendOptions.parse(args, backend=name))
