"""Shell completion and the manual page, both built from the argument parser.

``pyvduse completion bash`` prints a bash completion script (``source`` it, or
install it as ``/usr/share/bash-completion/completions/pyvduse``);
``pyvduse man`` prints the manual page in roff (``pyvduse man > pyvduse.1``,
``man ./pyvduse.1``). Both are generated from the same parser as the command
line itself, so they cannot drift from it.
"""

from __future__ import annotations

import argparse
import datetime
import shlex
from collections.abc import Iterator

from pyvduse import __version__

__all__ = ["bash_completion", "manpage"]


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> Iterator[argparse.Action]:
    for action in parser._actions:
        if action.option_strings and action.help != argparse.SUPPRESS:
            yield action


def bash_completion(parser: argparse.ArgumentParser, backends: list[str]) -> str:
    """A bash completion script for ``parser``'s command: subcommands, each one's
    options (and their fixed choices), backend names after ``serve``'s options."""
    commands = _subcommands(parser)
    cases = []
    for name, sub in commands.items():
        words = " ".join(o for action in _options(sub) for o in action.option_strings)
        choices = []
        for action in _options(sub):
            if action.choices:
                values = " ".join(map(str, action.choices))
                choices.append(f"            {'|'.join(action.option_strings)}) "
                               f"COMPREPLY=($(compgen -W {shlex.quote(values)} -- \"$cur\"));"
                               " return;;")
        positional = (f"COMPREPLY=($(compgen -W {shlex.quote(' '.join(backends))} -- \"$cur\"))"
                      if name == "serve" else "COMPREPLY=($(compgen -f -- \"$cur\"))")
        prev = ("            case \"$prev\" in\n" + "\n".join(choices) + "\n            esac\n"
                if choices else "")
        cases.append(f"""        {name})
{prev}            if [[ "$cur" == -* ]]; then
                COMPREPLY=($(compgen -W {shlex.quote(words)} -- "$cur"))
            else
                {positional}
            fi;;""")
    top = " ".join([*commands, "-h", "--help", "-V", "--version"])
    return f"""# bash completion for pyvduse {__version__} (generated: pyvduse completion bash)
_pyvduse() {{
    local cur=${{COMP_WORDS[COMP_CWORD]}} prev=${{COMP_WORDS[COMP_CWORD-1]}} cmd="" i
    for ((i = 1; i < COMP_CWORD; i++)); do
        [[ ${{COMP_WORDS[i]}} != -* ]] && {{ cmd=${{COMP_WORDS[i]}}; break; }}
    done
    case "$cmd" in
        "") COMPREPLY=($(compgen -W {shlex.quote(top)} -- "$cur"));;
{chr(10).join(cases)}
    esac
}}
complete -F _pyvduse pyvduse
"""


def _roff(text: str) -> str:
    """Text safe in a roff line (backslashes and leading dots or quotes escaped)."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\\&" + text if text.startswith((".", "'")) else text


def _help_text(action: argparse.Action) -> str:
    """The action's help with ``%(default)s`` and the like filled in, as --help shows it."""
    text = action.help or ""
    try:
        return text % {**vars(action), "prog": "pyvduse"}
    except (KeyError, TypeError, ValueError):
        return text


def _usage_of(action: argparse.Action) -> str:
    names = ", ".join(f"\\fB{_roff(o)}\\fR" for o in action.option_strings)
    if action.nargs == 0:
        return names
    metavar = action.metavar or (action.dest.upper() if not action.choices
                                 else "|".join(map(str, action.choices)))
    return f"{names} \\fI{_roff(str(metavar))}\\fR"


def manpage(parser: argparse.ArgumentParser, backends: dict[str, str]) -> str:
    """``pyvduse(1)`` in roff: every subcommand with its options (their help text),
    the backends (``backends``: name -> one-line description), exit status."""
    today = datetime.date.today().isoformat()
    out = [f'.TH PYVDUSE 1 "{today}" "pyvduse {__version__}" "User Commands"',
           ".SH NAME", "pyvduse \\- virtio devices in userspace through VDUSE",
           ".SH SYNOPSIS"]
    commands = _subcommands(parser)
    for sub in commands.values():
        usage = " ".join(sub.format_usage().split()[1:])
        out += [".PP", f"\\fBpyvduse\\fR {_roff(usage[len('pyvduse '):])}"]
    out += [".SH DESCRIPTION", _roff(parser.description or "")]
    for name, sub in commands.items():
        out += [f".SH {name.upper()}", _roff(sub.description or "")]
        for action in _options(sub):
            if isinstance(action, argparse._HelpAction):
                continue
            out += [".TP", _usage_of(action), _roff(_help_text(action))]
    out += [".SH BACKENDS", _roff("pyvduse serve BACKEND --help describes each one.")]
    for name, summary in backends.items():
        out += [".TP", f"\\fB{name}\\fR", _roff(summary)]
    out += [".SH EXIT STATUS",
            _roff("0 after a clean stop (SIGINT, SIGTERM, quit on the control socket); "
                  "1 with one 'pyvduse: error:' line for anything that prevents serving; "
                  "2 for bad command-line syntax."),
            ".SH SIGNALS",
            _roff("SIGINT and SIGTERM stop cleanly. SIGUSR1 logs each export's request "
                  "counts. SIGHUP and SIGUSR2 are logged and ignored."),
            ".SH SEE ALSO", "\\fBvdpa\\fR(8), \\fBsystemd.service\\fR(5)", ""]
    return "\n".join(out)
