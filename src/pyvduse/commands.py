"""The daemon's control commands: the registry's operations behind the control socket.

:func:`daemon_commands` maps each command name to a handler for
:class:`pyvduse.control.ControlServer`. Every failure a client can cause (a
bad argument, an unknown id, a backend that refuses) is a
:class:`~pyvduse.control.CommandError` reply; the exports are never harmed
by a command that fails.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pyvduse.control import CommandError, Handler, check_arguments
from pyvduse.errors import PyvduseError
from pyvduse.registry import ExportRegistry
from pyvduse.spec import size, spec_from_arguments


def _size_argument(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise CommandError("'size' must be positive")
        return value
    try:
        return size(str(value))
    except ValueError as exc:
        raise CommandError(f"'size': {exc}") from None


def daemon_commands(registry: ExportRegistry, quit_daemon: Callable[[], None]
                    ) -> dict[str, Handler]:
    """The commands of ``pyvduse serve --control``; ``quit_daemon`` stops the daemon."""

    def call(operation: Callable[[], Any]) -> Any:
        try:
            return operation()
        except CommandError:
            raise
        except (PyvduseError, OSError) as exc:
            raise CommandError(str(exc)) from None

    def query_exports(arguments: dict[str, Any]) -> Any:
        check_arguments(arguments, optional={"id": str})
        if "id" in arguments:
            return [call(lambda: registry.describe(arguments["id"]))]
        return registry.query()

    def export_add(arguments: dict[str, Any]) -> Any:
        spec = call(lambda: spec_from_arguments(arguments))
        call(lambda: registry.add(spec))
        registry.emit("EXPORT_ADDED", {"id": spec.id})
        return registry.describe(spec.id)

    def export_del(arguments: dict[str, Any]) -> Any:
        check_arguments(arguments, required={"id": str})
        call(lambda: registry.remove(arguments["id"]))
        registry.emit("EXPORT_DELETED", {"id": arguments["id"]})
        return {}

    def export_resize(arguments: dict[str, Any]) -> Any:
        check_arguments(arguments, required={"id": str, "size": (int, str)},
                        optional={"shrink": bool})
        new_size = _size_argument(arguments["size"])
        capacity = call(lambda: registry.resize(arguments["id"], new_size,
                                                shrink=arguments.get("shrink", False)))
        return {"id": arguments["id"], "size": capacity}

    def query_stats(arguments: dict[str, Any]) -> Any:
        check_arguments(arguments)
        return registry.stats()

    def quit_command(arguments: dict[str, Any]) -> Any:
        check_arguments(arguments)
        quit_daemon()
        return {}

    return {"query-exports": query_exports, "export-add": export_add,
            "export-del": export_del, "export-resize": export_resize,
            "query-stats": query_stats, "quit": quit_command}
