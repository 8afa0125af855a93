"""The ``python`` backend: a backend written by the user, loaded from a file or a module.

::

    pyvduse serve python script=./my_backend.py [class=NAME] [key=value ...]
    pyvduse serve python module=package.module [class=NAME] [key=value ...]

``script=`` runs a Python file (any name, any directory); ``module=`` imports
a module the interpreter can find (installed, or on ``PYTHONPATH``). Exactly
one of the two is required. In that module the backend is, in this order:

1. the class named by ``class=NAME``, which must subclass
   :class:`~pyvduse.backends.Backend`;
2. else a module-level function ``create(**options)`` returning a backend;
3. else the one public, concrete :class:`~pyvduse.backends.Backend`
   subclass the module defines (classes it imports, and names starting with
   ``_``, do not count). None or several of them is an error.

Every other ``key=value`` option is passed on, with its value as a string:

* a class with a ``from_options(options)`` classmethod gets a
  :class:`~pyvduse.backends.BackendOptions` holding them, and reads them with
  the typed getters (``options.size("size")`` ...) and ``options.finish()``,
  exactly like the built-in backends;
* any other class, and ``create``, is called with them as keyword arguments.
  Unknown and missing keywords are reported, from the signature, before the
  call.

``script``, ``module`` and ``class`` are the loader's own options, so a user
backend cannot receive options by these names.

Any failure to build the backend becomes one :class:`~pyvduse.errors.ConfigError`
line naming the script or module: a missing script, a syntax error (with
``file:line``), an exception while the module runs (``ImportError`` ...,
with the line it came from), no backend or an ambiguous one, bad options, an
exception from the constructor, a result that is not a ``Backend``. The full
traceback, when there is one, is logged at debug level (``--log-level debug``).

Once the device runs, what the backend's methods raise is handled by the
device like for any backend: the request fails with an I/O error and the
daemon carries on (see :mod:`pyvduse.backends.base`).
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import inspect
import logging
import os
import re
import sys
import traceback
from collections.abc import Callable, Mapping
from types import ModuleType, TracebackType

from pyvduse.backends.base import AsynchronousBackend, Backend
from pyvduse.backends.options import BackendOptions
from pyvduse.errors import ConfigError

log = logging.getLogger(__name__)

#: Name of the module-level factory function the loader looks for.
FACTORY_NAME = "create"

_PREFIX = "backend 'python': "
_KEYWORD_KINDS = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


class PythonBackendLoader:
    """Registry entry ``python``: builds a user backend from ``script=``/``module=`` options."""

    name = "python"

    @classmethod
    def from_options(cls, options: BackendOptions) -> Backend:
        """Load the script or module and build its backend from the remaining options."""
        script = options.string("script", "") or None
        module = options.string("module", "") or None
        class_name = options.string("class", "") or None
        rest = options.remaining()
        options.finish()
        return load_backend(script=script, module=module, class_name=class_name, options=rest)


def load_backend(*, script: str | os.PathLike[str] | None = None, module: str | None = None,
                 class_name: str | None = None,
                 options: Mapping[str, str] | None = None) -> Backend:
    """Build the backend defined in ``script`` (a file) or ``module`` (an importable name).

    ``class_name`` and ``options`` act as ``class=`` and the other ``key=value``
    options of ``pyvduse serve python`` (see the module docstring). Raises
    :class:`ConfigError` with a one-line message for anything that prevents
    building the backend.
    """
    if (script is None) == (module is None):
        raise ConfigError(_PREFIX + ("give only one of script= and module=" if script
                                     else "missing required option script= (or module=)"))
    full: str | None = None
    if script is not None:
        label = os.fspath(script)
        full = os.path.abspath(label)
        loaded = _load_script(label)
    else:
        assert module is not None
        label = module
        loaded = _import_module(module)
    target = _find_backend(loaded, label, class_name)
    backend = _construct(target, label, full, dict(options or {}))
    try:
        _check_backend(backend, label, full)
    except BaseException:
        _close_quietly(backend)
        raise
    return backend


_READERS = ("read", "readv", "submit_readv")


def _check_backend(backend: Backend, label: str, full: str | None) -> None:
    """What every backend needs, checked before any device exists: a ``size()`` that
    returns an integer, and a way to read."""
    cls = type(backend)
    name = cls.__name__
    if not any(getattr(cls, method) not in (getattr(Backend, method),
                                            getattr(AsynchronousBackend, method))
               for method in _READERS):
        raise ConfigError(f"{_PREFIX}{name} in {label} has no read() method (define read "
                          "or readv, or submit_readv for an AsynchronousBackend)")
    if cls.size is Backend.size:
        raise ConfigError(f"{_PREFIX}{name} in {label} has no size() method (it returns the "
                          "disk's size in bytes)")
    try:
        size = backend.size()
    except Exception as exc:
        raise ConfigError(f"{_PREFIX}{name}.size() in {label} failed: "
                          f"{_describe(exc, full, label)}") from None
    if type(size) is not int:
        raise ConfigError(f"{_PREFIX}{name}.size() in {label} returned {size!r} "
                          f"({type(size).__name__}), not an integer number of bytes")


def _close_quietly(backend: Backend) -> None:
    """Close a backend that will not be served, ignoring its failure (logged)."""
    try:
        backend.close()
    except Exception:
        log.debug("closing the refused backend failed", exc_info=True)


# -- loading ----------------------------------------------------------------------------


def _module_name(path: str) -> str:
    """The ``sys.modules`` name a script is loaded under (``pyvduse_script_<stem>``)."""
    stem = os.path.splitext(os.path.basename(path))[0]
    return "pyvduse_script_" + (re.sub(r"\W", "_", stem) or "_")


def _load_script(path: str) -> ModuleType:
    """Run the file at ``path`` as a module registered in ``sys.modules``."""
    if not os.path.exists(path):
        raise ConfigError(f"{_PREFIX}no such script: {path}")
    if os.path.isdir(path):
        raise ConfigError(f"{_PREFIX}script is a directory: {path}")
    full = os.path.abspath(path)
    name = _module_name(path)
    # An explicit loader: the file need not end in ".py".
    loader = importlib.machinery.SourceFileLoader(name, full)
    spec = importlib.util.spec_from_file_location(name, full, loader=loader)
    assert spec is not None
    loaded = importlib.util.module_from_spec(spec)
    previous = sys.modules.get(name)
    sys.modules[name] = loaded  # dataclasses, pickle and typing look the module up here
    try:
        loader.exec_module(loaded)
    except BaseException as exc:
        if previous is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = previous
        if isinstance(exc, Exception):
            raise _load_error(exc, path, full) from None
        raise _abort_error(exc, path) from None
    return loaded


def _abort_error(exc: BaseException, label: str) -> BaseException:
    """The error for a module that called ``sys.exit()`` or raised KeyboardInterrupt
    (or another BaseException) while loading (a Ctrl-C then ends the start too)."""
    if isinstance(exc, SystemExit):
        return ConfigError(f"{_PREFIX}{label} called sys.exit({exc.code!r}) while loading")
    return ConfigError(f"{_PREFIX}{label} raised {type(exc).__name__} while loading")


def _import_module(name: str) -> ModuleType:
    """Import module ``name``, turning failures into :class:`ConfigError`."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and (name == missing or name.startswith(missing + ".")):
            raise ConfigError(
                f"{_PREFIX}no module named {missing!r} (module= needs an importable module; "
                "use script=FILE for a file)") from None
        raise _load_error(exc, name, None) from None
    except Exception as exc:
        raise _load_error(exc, name, None) from None
    except BaseException as exc:
        raise _abort_error(exc, name) from None


def _load_error(exc: Exception, label: str, full: str | None) -> ConfigError:
    """The one-line error for ``exc`` raised while loading ``label``."""
    log.debug("loading %s failed", label, exc_info=exc)
    if isinstance(exc, SyntaxError):
        where = _display(exc.filename or label, full, label)
        if exc.lineno:
            where += f":{exc.lineno}"
        return ConfigError(f"{_PREFIX}syntax error in {where}: {exc.msg}")
    if isinstance(exc, OSError) and exc.filename == full and exc.strerror:
        return ConfigError(f"{_PREFIX}cannot read script {label}: {exc.strerror}")
    return ConfigError(f"{_PREFIX}loading {label} failed: {_describe(exc, full, label)}")


def _display(filename: str, full: str | None, label: str) -> str:
    """``filename`` as the user knows it: the script path as given, else as reported."""
    return label if full is not None and filename == full else filename


def _describe(exc: BaseException, full: str | None, label: str) -> str:
    """``Type: message (at file:line)`` on one line; the line is the innermost user frame."""
    text = " ".join(str(exc).split())
    described = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    frame = _innermost_frame(exc.__traceback__, full)
    if frame is not None:
        described += f" (at {_display(frame[0], full, label)}:{frame[1]})"
    return described


def _innermost_frame(tb: TracebackType | None, full: str | None) -> tuple[str, int] | None:
    """The innermost frame in the script ``full`` if any, else outside pyvduse and importlib."""
    frames = traceback.extract_tb(tb)
    if full is not None:
        in_script = [f for f in frames if f.filename == full]
        if in_script:
            return in_script[-1].filename, in_script[-1].lineno or 0
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    user = [f for f in frames
            if not f.filename.startswith(("<frozen ", here + os.sep))]
    if user:
        return user[-1].filename, user[-1].lineno or 0
    return None


# -- finding and building the backend ---------------------------------------------------


def backend_classes(module: ModuleType) -> list[type[Backend]]:
    """The public, concrete :class:`Backend` subclasses ``module`` defines, in definition order."""
    found: dict[int, type[Backend]] = {}
    for obj in vars(module).values():
        if (isinstance(obj, type) and issubclass(obj, Backend) and obj is not Backend
                and obj.__module__ == module.__name__ and not obj.__name__.startswith("_")
                and not inspect.isabstract(obj)):
            found.setdefault(id(obj), obj)
    return list(found.values())


def _find_backend(module: ModuleType, label: str, class_name: str | None) -> Callable[..., object]:
    """Pick the class or factory that builds the backend (see the module docstring)."""
    classes = backend_classes(module)
    names = ", ".join(cls.__name__ for cls in classes) or "none"
    if class_name is not None:
        obj = getattr(module, class_name, None)
        if obj is None:
            raise ConfigError(
                f"{_PREFIX}{label} has no class {class_name!r} (backend classes: {names})")
        if not (isinstance(obj, type) and issubclass(obj, Backend)) or obj is Backend:
            raise ConfigError(
                f"{_PREFIX}{class_name} in {label} is not a subclass of pyvduse.backends.Backend")
        return obj
    factory = getattr(module, FACTORY_NAME, None)
    if factory is not None:
        if not callable(factory):
            raise ConfigError(f"{_PREFIX}{FACTORY_NAME} in {label} is not a function")
        return factory  # type: ignore[no-any-return]
    if len(classes) == 1:
        return classes[0]
    if not classes:
        raise ConfigError(
            f"{_PREFIX}{label} defines no Backend subclass and no {FACTORY_NAME}() function")
    raise ConfigError(
        f"{_PREFIX}{label} defines {len(classes)} Backend subclasses ({names}); "
        "choose one with class=NAME")


def _construct(target: Callable[..., object], label: str, full: str | None,
               options: dict[str, str]) -> Backend:
    """Call ``target`` with ``options`` (through ``from_options`` if it has one).

    ``label`` names the script or module in messages; ``full`` is the
    script's absolute path (None for a module).
    """
    name = getattr(target, "__name__", repr(target))
    from_options = getattr(target, "from_options", None) if isinstance(target, type) else None
    what = f"{name}.from_options()" if from_options is not None else f"{name}()"
    if from_options is None:
        _check_signature(target, what, label, options)
    try:
        if from_options is not None:
            backend = from_options(BackendOptions(options, backend=label))
        else:
            backend = target(**options)
    except ConfigError:
        raise
    except Exception as exc:
        log.debug("%s in %s failed", what, label, exc_info=exc)
        raise ConfigError(f"{_PREFIX}{what} in {label} failed: {_describe(exc, full, label)}"
                          ) from None
    if not isinstance(backend, Backend):
        raise ConfigError(f"{_PREFIX}{what} in {label} returned {type(backend).__name__}, "
                          "not a pyvduse.backends.Backend")
    return backend


def _check_signature(target: Callable[..., object], what: str, label: str,
                     options: Mapping[str, str]) -> None:
    """Raise :class:`ConfigError` if ``target(**options)`` cannot bind (unknown/missing keys)."""
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return  # no signature (some builtins): the call itself will tell
    params = list(signature.parameters.values())
    keywords = [p.name for p in params if p.kind in _KEYWORD_KINDS]
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        unknown = [key for key in options if key not in keywords]
        if unknown:
            noun = "option" if len(unknown) == 1 else "options"
            raise ConfigError(
                f"unknown {noun} for backend {label!r}: {', '.join(unknown)} "
                f"(known: {', '.join(keywords) or 'none'})")
    positional = [p.name for p in params if p.kind is inspect.Parameter.POSITIONAL_ONLY
                  and p.default is p.empty]
    if positional:
        raise ConfigError(f"{_PREFIX}{what} in {label} has required positional-only "
                          f"parameters ({', '.join(positional)}); options are passed by keyword")
    missing = [p.name for p in params
               if p.kind in _KEYWORD_KINDS and p.default is p.empty and p.name not in options]
    if missing:
        noun = "option" if len(missing) == 1 else "options"
        raise ConfigError(f"backend {label!r}: missing required {noun} "
                          f"{' '.join(name + '=' for name in missing)}")
