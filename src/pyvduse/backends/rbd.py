"""The ``rbd`` backend: a Ceph RBD image through librbd (Python binding, or C on the native path).

Options (``pyvduse serve rbd key=value ...``):

``pool=POOL`` and ``image=NAME`` (required), ``namespace=NS``
    The image ``NAME`` (optionally ``NAME@SNAPSHOT``: a snapshot is always
    read-only) in pool ``POOL`` (and namespace ``NS``). ``image=`` alone may
    also spell the whole path, ``POOL/IMAGE`` or ``POOL/NAMESPACE/IMAGE``; a
    bare ``image=NAME`` without ``pool=`` is in pool ``rbd``, as for the
    ``rbd`` tool.
``conf=PATH``
    The Ceph configuration file. Without it librados searches its usual
    places (``$CEPH_CONF``, ``/etc/ceph/ceph.conf``, ``~/.ceph/config``,
    ``./ceph.conf``); finding none is fine when ``mon-host=`` is given.
``id=NAME`` (default ``admin``)
    The client's name without ``client.`` (its key comes from the keyring).
``keyring=PATH``
    The keyring file, overriding the configuration's.
``mon-host=ADDRESSES``
    The monitors (``mon host`` syntax, e.g. ``10.0.0.1,10.0.0.2:6789``),
    overriding the configuration's.
``readonly=on|off`` (default off)
    Open the image read-only.
``timeout=SECONDS`` (default 10)
    Limit for reaching the monitors, and for each operation of opening the
    pool and the image (librados' ``client_mount_timeout``,
    ``rados_mon_op_timeout``, and ``rados_osd_op_timeout`` while opening,
    which take whole seconds: a fraction is rounded up).
``cache=on|off`` (default: librbd's, normally on)
    librbd's client-side cache (``rbd_cache``). With it on, writes may sit
    in this process's memory until the driver flushes.

The constructor connects to the cluster and opens the image; a bad option,
an unreachable cluster (after ``timeout`` seconds), a missing pool, image or
snapshot, or a refusal by the cluster is a :class:`ConfigError` with one line
naming the image. The disk's size is the image's: the backend is
:attr:`~pyvduse.backends.base.Backend.resizable`, so when the image is
resized in the cluster (``rbd resize``) the daemon notices within seconds
and announces the new capacity to the driver with a config interrupt (a
shrink first fails requests beyond the new end with ``EINVAL``). The daemon
can also resize the image itself (:meth:`RbdBackend.resize`, librbd's
``rbd_resize``); as with ``rbd resize``, every shrink must be allowed
explicitly, whether or not data lies beyond the new end.
:attr:`RbdBackend.preferred_block_size` is 512. A
writable image offers flush (``rbd_aio_flush``), discard
(``rbd_aio_discard``) and write-zeroes, native when librbd has
``rbd_aio_write_zeroes`` (thick, without deallocating, unless the driver
allows unmapping) and written as zero data otherwise.

Every request is asynchronous (:attr:`RbdBackend.submit_min_bytes` is 0):
each ``submit_*`` call starts one librbd AIO operation and returns, so the
queue depth the driver uses reaches the cluster. librbd calls back on its
own threads, which copy read data into the request's buffers and call
``done``. The binding works on ``bytes``, which costs one copy per request:
a read arrives as a new ``bytes`` object that the callback copies into the
request's buffers; a write's buffers are joined into one ``bytes`` object
before it is submitted. A negative return value fails the request with the
matching :class:`OSError` (e.g. ``EIO``, ``EINVAL`` for a range beyond an
image that shrank, ``ESHUTDOWN`` once the cluster has blocklisted the
client); an error the binding raises while submitting is raised by the
``submit_*`` method as an :class:`OSError` with its errno. A callback never
lets an exception escape into the binding (it is logged, and given to
``done`` if ``done`` was not called yet). The synchronous methods submit and
wait. No request is retried here: librados already resends operations to
OSDs that come back, and a request waits as long as the cluster needs
(there is no per-request timeout). :meth:`RbdBackend.close` waits for the
requests in flight (librbd finishes them) before it closes the image.

The binding is Debian's ``python3-rbd`` (it is not on PyPI). It is imported
when the first backend is built; if a plain ``import rbd`` fails,
``/usr/lib/python3/dist-packages`` is searched too (the binding is built for
the system's Python 3 and also loads into other CPython builds of the same
version), and only for that import.

On the compiled data path (:meth:`RbdBackend.native_target`) the queues' reads,
writes and flushes go to a second handle of the image instead, opened by the
compiled module with librbd's C API and no cache; this object then serves
discard, write-zeroes and the requests that failed there, keeping both handles
coherent (its writes are flushed before they complete, its cache dropped before
each read). ``cache=on`` keeps the Python path.

Not supported: ``rbd_cache`` tuning beyond on/off
(other settings go in the configuration file), encryption, FUA (flush is
used instead).
"""

from __future__ import annotations

import errno
import functools
import importlib
import logging
import math
import os
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Self

from pyvduse.backends.base import (
    ZERO_CHUNK,
    AsynchronousBackend,
    Done,
    DoneGroup,
    check_new_size,
    shrink_refused,
)
from pyvduse.backends.options import BackendOptions
from pyvduse.errors import ConfigError
from pyvduse.native import NativeTarget, native_module

log = logging.getLogger(__name__)

__all__ = ["ImageSpec", "RbdBackend", "import_librbd", "parse_image_spec"]

#: Where Debian installs python3-rbd and python3-rados.
DEBIAN_DIST_PACKAGES = "/usr/lib/python3/dist-packages"
INSTALL_HINT = "the rbd backend needs Debian's python3-rbd (apt-get install python3-rbd)"
#: librbd's flag for a write-zeroes that allocates (does not leave holes).
WRITE_ZEROES_FLAG_THICK_PROVISION = 1
#: Zero data per write when write-zeroes is emulated.
ZERO_WRITE_CHUNK = 4 << 20

_ZERO_BYTES = bytes(ZERO_WRITE_CHUNK)
assert len(ZERO_CHUNK) <= ZERO_WRITE_CHUNK


# -- the binding ------------------------------------------------------------------------


def import_librbd() -> tuple[ModuleType, ModuleType]:
    """Import and return the ``rados`` and ``rbd`` modules of Ceph's Python binding.

    A plain import first; if that fails, once more with
    :data:`DEBIAN_DIST_PACKAGES` appended to ``sys.path`` (removed again
    afterwards). Raises :class:`ConfigError` saying what to install if the
    binding is still missing or cannot load.
    """
    try:
        return importlib.import_module("rados"), importlib.import_module("rbd")
    except ImportError:
        pass
    added = DEBIAN_DIST_PACKAGES not in sys.path
    if added:
        sys.path.append(DEBIAN_DIST_PACKAGES)
    try:
        return importlib.import_module("rados"), importlib.import_module("rbd")
    except ImportError as exc:
        raise ConfigError(f"backend 'rbd': {INSTALL_HINT}: {exc}") from None
    finally:
        if added:
            try:
                sys.path.remove(DEBIAN_DIST_PACKAGES)
            except ValueError:
                pass


# -- image names ------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageSpec:
    """An image's place: pool, namespace ("" for the default one), name, snapshot or None."""

    pool: str
    namespace: str
    image: str
    snapshot: str | None = None

    def __str__(self) -> str:
        where = f"{self.pool}/{self.namespace}/" if self.namespace else f"{self.pool}/"
        return where + self.image + (f"@{self.snapshot}" if self.snapshot is not None else "")


@dataclass(frozen=True)
class NativeOpen:
    """How the backend reached the cluster, for the native path's own handle: the
    configuration file (None: librados' search, ``optional`` when ``mon-host=`` makes
    finding none fine), the client id, the options set before connecting and the
    ones set back after opening."""

    conf: str | None
    optional: bool
    client_id: str
    before: tuple[tuple[str, str], ...]
    after: tuple[tuple[str, str], ...]


DEFAULT_POOL = "rbd"
"""The pool of an image named without one, as for the ``rbd`` command."""


def parse_image_spec(text: str) -> ImageSpec:
    """Parse ``POOL/IMAGE``, ``POOL/NAMESPACE/IMAGE``, each optionally ``@SNAPSHOT``.

    Raises :class:`ConfigError` (one line) for an empty part, too many or
    too few ``/``, or a second ``@``.
    """

    def bad(why: str) -> ConfigError:
        return ConfigError(f"backend 'rbd': bad image={text}: {why} (use POOL/IMAGE, "
                           "POOL/NAMESPACE/IMAGE, optionally followed by @SNAPSHOT)")

    path, at, snapshot = text.partition("@")
    if at and (not snapshot or "@" in snapshot):
        raise bad("one non-empty snapshot name may follow @")
    parts = path.split("/")
    if len(parts) not in (2, 3):
        raise bad("no pool" if len(parts) == 1 else "too many /")
    if not all(parts):
        raise bad("empty pool, namespace or image name")
    if any(c.isspace() or not c.isprintable() for c in text):
        raise bad("blanks or control characters")
    namespace = parts[1] if len(parts) == 3 else ""
    return ImageSpec(parts[0], namespace, parts[-1], snapshot if at else None)


def image_option(pool: str, namespace: str, image: str) -> str:
    """The ``POOL[/NAMESPACE]/IMAGE[@SNAP]`` text that ``pool=``, ``namespace=``, ``image=`` mean.

    With ``pool=`` the image is a bare name; without it ``image=`` may name the
    pool itself, and a bare name is in pool ``rbd``, as for the ``rbd`` tool.
    """
    if pool:
        if "/" in image:
            raise ConfigError(f"backend 'rbd': image={image} names a pool while pool={pool} "
                              "is given: use pool=POOL image=NAME, or image=POOL/NAME alone")
        return f"{pool}/{namespace}/{image}" if namespace else f"{pool}/{image}"
    if namespace:
        raise ConfigError("backend 'rbd': namespace= needs pool=")
    if "/" not in image.partition("@")[0]:
        return f"{DEFAULT_POOL}/{image}"
    return image


# -- completions ------------------------------------------------------------------------


def _call_done(done: Done, error: BaseException | None) -> None:
    """Report an outcome from a librbd thread: nothing may escape into the binding."""
    try:
        done(error)
    except Exception:
        log.exception("rbd: a request's completion failed")


def _reason(exc: BaseException) -> str:
    """One line about a failure of the binding (its messages may span lines)."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _os_error(exc: BaseException, what: str) -> OSError:
    """The :class:`OSError` for an exception the binding raised while submitting."""
    code = getattr(exc, "errno", None)
    if not isinstance(code, int) or code <= 0:
        code = errno.EIO
    return OSError(code, f"{what}: {_reason(exc)}")


# -- the backend ------------------------------------------------------------------------


class RbdBackend(AsynchronousBackend):
    """An RBD image (see the module docstring for options and behaviour).

    The constructor connects and opens the image, raising :class:`ConfigError`
    on any failure (nothing stays open then). Every request goes through the
    ``submit_*`` methods; the synchronous methods submit and wait.
    Thread-safe: any number of threads may submit, and :meth:`close` waits
    for submissions under way before it closes the image.
    """

    name = "rbd"
    contacts_servers = True

    def __init__(self, image: str, *, conf: str | None = None, client_id: str = "admin",
                 keyring: str | None = None, mon_host: str | None = None,
                 readonly: bool = False, timeout: float = 10.0,
                 cache: bool | None = None) -> None:
        if not (math.isfinite(timeout) and timeout > 0):
            raise ConfigError(f"backend 'rbd': timeout={timeout} must be a positive number")
        if not client_id:
            raise ConfigError("backend 'rbd': the client id must not be empty")
        self.spec = parse_image_spec(image)
        self.timeout = timeout
        #: The timeout as librados takes it: whole seconds, rounded up.
        self.timeout_seconds = max(1, math.ceil(timeout))
        self.readonly = readonly or self.spec.snapshot is not None
        self._lock = threading.Condition()
        self._closed = False
        self._submitting = 0  # submit_* calls inside the binding right now
        self._cache = cache
        #: The native path's image handle (see native_target()), once opened.
        self._native_image: object | None = None
        #: Why there is no native target ('' until native_target() was refused).
        self.native_refusal = ""
        rados, rbd = import_librbd()
        self._rbd_error: type[BaseException] = rbd.Error
        self._cluster, self._ioctx, self._image = self._open(
            rados, rbd, conf, client_id, keyring, mon_host, cache)
        try:
            self._size: int = int(self._image.size())
            self.object_size: int = int(self._image.stat()["obj_size"])
        except Exception as exc:
            self._release()
            raise self._config_error(_reason(exc)) from None
        if self._size < 512:
            self._release()
            raise self._config_error(f"the image has {self._size} bytes, less than one "
                                     "512-byte block")
        #: True if write-zeroes goes to librbd as ``rbd_aio_write_zeroes``.
        self.native_write_zeroes: bool = hasattr(self._image, "aio_write_zeroes")
        log.debug("rbd %s: %d bytes, objects of %d bytes, %s", self.spec, self._size,
                 self.object_size, "read-only" if self.readonly else "read-write")

    @classmethod
    def from_options(cls, options: BackendOptions) -> Self:
        """Build from ``pool=``, ``namespace=``, ``image=``, ``conf=``, ``id=``,
        ``keyring=``, ``mon-host=``, ``readonly=``, ``timeout=``, ``cache=``; any bad or
        unknown option is a :class:`ConfigError`."""
        image = image_option(options.string("pool", ""), options.string("namespace", ""),
                             options.string("image"))
        conf = options.string("conf", "") or None
        client_id = options.string("id", "admin")
        keyring = options.string("keyring", "") or None
        mon_host = options.string("mon-host", "") or None
        readonly = options.boolean("readonly", False)
        timeout = options.seconds("timeout", 10.0)
        cache: bool | None = None
        if "cache" in options:
            cache = options.boolean("cache")
        else:
            options.string("cache", "")  # librbd's default; known to finish() all the same
        options.finish()
        return cls(image, conf=conf, client_id=client_id, keyring=keyring, mon_host=mon_host,
                   readonly=readonly, timeout=timeout, cache=cache)

    # -- connecting -------------------------------------------------------------------

    def _config_error(self, why: str) -> ConfigError:
        return ConfigError(f"backend 'rbd': cannot open {self.spec}: {why}")

    def _open(self, rados: ModuleType, rbd: ModuleType, conf: str | None, client_id: str,
              keyring: str | None, mon_host: str | None, cache: bool | None,
              ) -> tuple[Any, Any, Any]:
        """Connect, open the pool (and namespace) and the image; ConfigError on failure."""
        if conf is not None and not os.path.isfile(conf):
            raise self._config_error(f"no configuration file {conf}")
        if keyring is not None and not os.path.isfile(keyring):
            raise self._config_error(f"no keyring file {keyring}")
        spec = self.spec
        try:
            cluster = rados.Rados(rados_id=client_id)
        except Exception as exc:
            raise self._config_error(f"client id {client_id!r}: {_reason(exc)}") from None
        ioctx: Any = None
        stage = "reading the configuration"
        try:
            try:
                cluster.conf_read_file(conf)
            except rados.ObjectNotFound:
                if conf is not None or mon_host is None:
                    raise self._config_error(
                        "no Ceph configuration file found (give conf= or mon-host=)") from None
            seconds = str(self.timeout_seconds)
            # While opening, monitor and OSD operations fail after the timeout too; the
            # configuration's values (normally none) are back before the first request.
            opening = {key: cluster.conf_get(key)
                       for key in ("rados_mon_op_timeout", "rados_osd_op_timeout")}
            settings = {"client_mount_timeout": seconds, "rados_mon_op_timeout": seconds,
                        "rados_osd_op_timeout": seconds}
            if keyring is not None:
                settings["keyring"] = keyring
            if mon_host is not None:
                settings["mon_host"] = mon_host
            if cache is not None:
                settings["rbd_cache"] = "true" if cache else "false"
            for key, value in settings.items():
                stage = f"setting {key}={value}"
                cluster.conf_set(key, value)
            self._native_open = NativeOpen(conf, conf is None and mon_host is not None,
                                           client_id, tuple(settings.items()),
                                           tuple(opening.items()))
            stage = "connecting"
            cluster.connect()
            stage = f"opening pool {spec.pool!r}"
            try:
                ioctx = cluster.open_ioctx(spec.pool)
            except rados.ObjectNotFound:
                raise self._config_error(f"no pool {spec.pool!r}") from None
            if spec.namespace:
                ioctx.set_namespace(spec.namespace)
            stage = "opening the image"
            image = self._open_image(rbd, ioctx)
            try:
                for key, value in opening.items():
                    stage = f"setting {key}={value}"
                    cluster.conf_set(key, value)
            except BaseException:
                image.close()
                raise
        except ConfigError:
            _close_quietly(ioctx, cluster)
            raise
        except Exception as exc:
            _close_quietly(ioctx, cluster)
            what = _reason(exc)
            code = getattr(exc, "errno", None)
            if isinstance(exc, rados.TimedOut) or code == errno.ETIMEDOUT:
                what = f"no answer within {self.timeout_seconds} s ({what})"
            raise self._config_error(f"{stage}: {what}") from None
        return cluster, ioctx, image

    def _open_image(self, rbd: ModuleType, ioctx: Any) -> Any:
        spec = self.spec
        try:
            return rbd.Image(ioctx, spec.image, snapshot=spec.snapshot, read_only=self.readonly)
        except rbd.ImageNotFound:
            pass
        if spec.snapshot is not None:
            try:
                rbd.Image(ioctx, spec.image, read_only=True).close()
            except rbd.ImageNotFound:
                pass
            else:
                raise self._config_error(f"the image has no snapshot {spec.snapshot!r}")
        where = f"pool {spec.pool!r}" + (f", namespace {spec.namespace!r}" if spec.namespace
                                          else "")
        raise self._config_error(f"no image {spec.image!r} in {where}")

    # -- geometry and capabilities ----------------------------------------------------

    #: An image can be resized in the cluster while it is served: the daemon
    #: follows :meth:`size` and tells the driver.
    resizable = True

    def size(self) -> int:
        """The image's current size in bytes (librbd keeps it up to date when the
        image is resized elsewhere); the last one seen once the backend is closed."""
        with self._lock:
            if not self._closed:
                self._size = int(self._image.size())
        return self._size

    @property
    def can_write(self) -> bool:
        """False for ``readonly=on`` and snapshots."""
        return not self.readonly

    @property
    def can_flush(self) -> bool:
        """True when writable."""
        return not self.readonly

    @property
    def can_discard(self) -> bool:
        """True when writable."""
        return not self.readonly

    @property
    def can_write_zeroes(self) -> bool:
        """True when writable (natively or as zero data, see :attr:`native_write_zeroes`)."""
        return not self.readonly

    @property
    def can_resize(self) -> bool:
        """True when writable."""
        return not self.readonly

    def resize(self, size: int, *, shrink: bool = False) -> None:
        """Resize the image to ``size`` bytes (a positive multiple of 512) with ``rbd_resize``.

        Growing adds space that reads as zeroes. Every shrink needs
        ``shrink`` (``EINVAL`` otherwise, nothing changes), as ``rbd resize``
        needs ``--allow-shrink``: whether data lies beyond the new end is not
        looked up. A read-only image or snapshot refuses with ``EROFS``, a
        closed backend with ``EIO``; librbd's failures are :class:`OSError`
        with its errno. Blocks until librbd has resized the image (other
        clients of the image hear of it as of an ``rbd resize``).
        """
        self._check_writable()
        check_new_size(f"rbd {self.spec}", size)
        current = self.size()
        if size < current and not shrink:
            raise shrink_refused(f"rbd {self.spec}", size,
                                 f"the image has {current} bytes; whether any of those "
                                 f"beyond {size} hold data is not looked up")
        if size != current:
            self._submit(f"resize to {size} bytes", "resize", size)
            self.size()  # also what size() reports once the backend is closed

    # -- the native path --------------------------------------------------------------

    def native_target(self) -> NativeTarget | None:
        """An image handle of the native path's own (see
        :meth:`pyvduse.native.NativeTarget.rbd_image`), opened on first call with this
        backend's options and librbd's cache off, when the compiled module and librbd
        are there, ``cache=on`` was not asked for and the data methods are this class's.
        Otherwise None, with :attr:`native_refusal` saying why.

        From then on the two handles stay coherent: each write, discard and
        write-zeroes of this object's is flushed to the cluster before it completes,
        and each read first drops what this handle's cache holds, so that what one
        handle wrote the other reads.
        """
        if self._native_image is not None:
            return NativeTarget.rbd_image(self._native_image)
        if self.native_refusal:
            return None
        self.native_refusal = self._open_native()
        if self.native_refusal:
            log.info("rbd %s: no native target: %s", self.spec, self.native_refusal)
            return None
        return NativeTarget.rbd_image(self._native_image)

    def _open_native(self) -> str:
        """Open the native path's handle; '' or why not."""
        module = native_module()
        if module is None or not hasattr(module, "rbd_open"):
            return "the compiled data path is not built"
        if self._cache:
            return "cache=on keeps the Python path (the native path's handle has no cache)"
        if not self._own_data_methods(RbdBackend, "submit_readv", "submit_writev",
                                      "submit_flush"):
            return "a subclass serves the data itself"
        opened = self._native_open
        spec = self.spec
        try:
            image = module.rbd_open(
                opened.conf, opened.optional, opened.client_id,
                (*opened.before, ("rbd_cache", "false")), opened.after, spec.pool,
                spec.namespace, spec.image, spec.snapshot, readonly=self.readonly)
        except OSError as exc:
            return f"cannot open a handle of its own: {exc.strerror}"
        with self._lock:
            if self._closed:
                return "the backend is closed"
            self._native_image = image
        return ""

    def _flushed(self, what: str, done: Done) -> Done:
        """``done``, called only once a successful request is also flushed to the
        cluster, while the native path has a handle of its own (else ``done`` itself)."""
        if self._native_image is None:
            return done

        def after_request(error: BaseException | None) -> None:
            if error is not None:
                _call_done(done, error)
                return
            try:
                self._submit(f"{what} (flush)", "aio_flush",
                             self._completion(f"{what} (flush)", done))
            except OSError as exc:
                _call_done(done, exc)

        return after_request

    # -- asynchronous requests ----------------------------------------------------------

    def _submit(self, what: str, method: str, *args: Any, **kwargs: Any) -> None:
        """Call the image's ``method`` (an ``aio_*`` one, or ``invalidate_cache``) unless
        the backend is closed.

        Errors the binding raises at once become :class:`OSError`.
        """
        with self._lock:
            if self._closed:
                raise OSError(errno.EIO, f"rbd {self.spec}: the backend is closed")
            self._submitting += 1
        try:
            getattr(self._image, method)(*args, **kwargs)
        except self._rbd_error as exc:
            raise _os_error(exc, f"rbd {self.spec}: {what}") from None
        finally:
            with self._lock:
                self._submitting -= 1
                if not self._submitting:
                    self._lock.notify_all()

    def _done_now(self, done: Done) -> None:
        """Finish a request that needs no I/O (unless the backend is closed)."""
        with self._lock:
            if self._closed:
                raise OSError(errno.EIO, f"rbd {self.spec}: the backend is closed")
        done(None)

    def _completion(self, what: str, done: Done) -> Callable[..., None]:
        """The librbd callback of a flush, discard or write: reports the return value."""
        spec = self.spec

        def oncomplete(completion: Any) -> None:
            error: BaseException | None
            try:
                ret = completion.get_return_value()
                error = None if ret >= 0 else OSError(-ret, f"rbd {spec}: {what}: "
                                                            f"{os.strerror(-ret)}")
            except Exception as exc:
                log.exception("rbd %s: %s: reading the result failed", spec, what)
                error = exc
            _call_done(done, error)

        return oncomplete

    def _check_writable(self) -> None:
        if self.readonly:
            raise OSError(errno.EROFS, f"rbd {self.spec}: the image is read-only")

    def submit_readv(self, offset: int, bufs: Sequence[memoryview], done: Done) -> None:
        """``rbd_aio_read`` of the whole range; the callback copies the data into ``bufs``."""
        views = [buf for buf in bufs if len(buf)]
        total = sum(len(view) for view in views)
        what = f"read {offset}+{total}"
        spec = self.spec

        def oncomplete(completion: Any, data: bytes | None) -> None:
            error: BaseException | None = None
            try:
                ret = completion.get_return_value()
                if ret < 0:
                    error = OSError(-ret, f"rbd {spec}: {what}: {os.strerror(-ret)}")
                elif data is None or len(data) != total:
                    got = 0 if data is None else len(data)
                    error = OSError(errno.EIO, f"rbd {spec}: {what}: short read of {got} bytes")
                else:
                    source = memoryview(data)
                    pos = 0
                    for view in views:
                        end = pos + len(view)
                        view[:] = source[pos:end]
                        pos = end
            except Exception as exc:
                log.exception("rbd %s: %s: completing the read failed", spec, what)
                error = exc
            _call_done(done, error)

        if not total:
            self._done_now(done)
            return
        if self._native_image is not None:  # what the native path wrote is in the cluster
            self._submit(what, "invalidate_cache")
        self._submit(what, "aio_read", offset, total, oncomplete)

    def submit_writev(self, offset: int, bufs: Sequence[memoryview], done: Done) -> None:
        """``rbd_aio_write`` of ``bufs`` joined into one ``bytes`` object (one copy)."""
        self._check_writable()
        data = b"".join(bufs)
        what = f"write {offset}+{len(data)}"
        if not data:
            self._done_now(done)
            return
        oncomplete = self._completion(what, self._flushed(what, done))
        self._submit(what, "aio_write", data, offset, oncomplete)

    def submit_flush(self, done: Done) -> None:
        """``rbd_aio_flush``: every write completed before it reaches the OSDs."""
        what = "flush"
        if self.readonly:
            self._done_now(done)
            return
        oncomplete = self._completion(what, done)
        self._submit(what, "aio_flush", oncomplete)

    def submit_discard(self, offset: int, length: int, done: Done) -> None:
        """``rbd_aio_discard`` of the range."""
        self._check_writable()
        what = f"discard {offset}+{length}"
        if not length:
            self._done_now(done)
            return
        oncomplete = self._completion(what, self._flushed(what, done))
        self._submit(what, "aio_discard", offset, length, oncomplete)

    def submit_write_zeroes(self, offset: int, length: int, may_unmap: bool,
                            done: Done) -> None:
        """``rbd_aio_write_zeroes`` (thick unless ``may_unmap``), or zero data in 4 MiB writes."""
        self._check_writable()
        what = f"write-zeroes {offset}+{length}"
        if not length:
            self._done_now(done)
            return
        done = self._flushed(what, done)
        if self.native_write_zeroes:
            flags = 0 if may_unmap else WRITE_ZEROES_FLAG_THICK_PROVISION
            oncomplete = self._completion(what, done)
            self._submit(what, "aio_write_zeroes", offset, length, oncomplete,
                         zero_flags=flags)
            return
        parts = range(0, length, ZERO_WRITE_CHUNK)
        group = DoneGroup(functools.partial(_call_done, done), len(parts))
        for n, pos in enumerate(parts):
            step = min(ZERO_WRITE_CHUNK, length - pos)
            data = _ZERO_BYTES if step == ZERO_WRITE_CHUNK else bytes(step)
            part_what = f"{what} (zero data at {offset + pos})"
            oncomplete = self._completion(part_what, group.part_done)
            try:
                self._submit(part_what, "aio_write", data, offset + pos, oncomplete)
            except OSError as exc:
                if n == 0:
                    raise
                # Earlier parts are under way: the request ends when they do.
                for _ in parts[n:]:
                    group.part_done(exc)
                return

    # -- closing ----------------------------------------------------------------------

    def close(self) -> None:
        """Close the image (librbd waits for the requests in flight), the pool and the
        connection. Idempotent; afterwards every ``submit_*`` raises ``EIO``."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._lock.wait_for(lambda: not self._submitting)
        self._release()
        image, self._native_image = self._native_image, None
        if image is not None:  # now, or when the last queue serving it stops
            native_module().rbd_close(image)

    def _release(self) -> None:
        image, self._image = self._image, None
        try:
            if image is not None:
                image.close()
        except Exception as exc:
            log.warning("rbd %s: closing the image: %s", self.spec, _reason(exc))
        finally:
            _close_quietly(self._ioctx, self._cluster)
            self._ioctx = self._cluster = None


def _close_quietly(ioctx: Any, cluster: Any) -> None:
    """Close a pool context and shut a cluster handle down, ignoring failures."""
    for what, action in (("pool", getattr(ioctx, "close", None)),
                         ("connection", getattr(cluster, "shutdown", None))):
        if action is None:
            continue
        try:
            action()
        except Exception as exc:
            log.warning("rbd: closing the %s: %s", what, _reason(exc))
