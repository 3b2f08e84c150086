"""``--config FILE.toml``: a command's long options from a TOML file, for CI pipelines.

Keys are the command's long option names, with ``-`` or ``_`` (``max-drop``, ``max_drop``);
values are TOML strings, numbers, booleans (flags such as ``quiet``) or arrays (repeatable
options such as ``keep`` or ``shape``, and comma lists such as bench's ``batch``). A table
named after a command (``[prune]``, ``[finetune]``) holds options for that command only and
wins over the top-level keys; tables of other commands are skipped, so one file can serve
a whole pipeline. Options given on the command line override the file. An unknown key is a
one-line error (exit 2), as is a value of the wrong kind.

The file's options become command-line tokens placed before the user's own, so argparse
checks types and choices exactly as for typed options.
"""

from __future__ import annotations

import argparse
import os

from onnxprune.errors import OnnxpruneError

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    tomllib = None

OPTION = "--config"
NOT_IN_FILES = {"--help", "--config", "--version"}


def config_path(argv: list[str]) -> str | None:
    """The last ``--config FILE`` (or ``--config=FILE``) of ``argv``; None without one."""
    path = None
    for i, token in enumerate(argv):
        if token == "--":
            break
        if token == OPTION:
            if i + 1 >= len(argv):
                raise OnnxpruneError("--config needs a file: --config prune.toml")
            path = argv[i + 1]
        elif token.startswith(OPTION + "="):
            path = token[len(OPTION) + 1:]
    return path


def load_config(path: str) -> dict:
    """The TOML file as a dict; one-line errors for a missing or malformed file."""
    if tomllib is None:
        raise OnnxpruneError("--config needs Python 3.11 or later (tomllib)")
    if not os.path.isfile(path):
        raise OnnxpruneError(f"--config {path}: no such file")
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise OnnxpruneError(f"--config {path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise OnnxpruneError(f"--config {path}: cannot read: {exc.strerror}") from None


def command_parser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[command]
    raise KeyError(command)


def _action_of(sub: argparse.ArgumentParser, token: str) -> argparse.Action | None:
    """The option action a command-line token names (``--opt``, ``--opt=v`` or a unique
    prefix, as argparse accepts)."""
    if not token.startswith("--") or token == "--":
        return None
    name = token.split("=", 1)[0]
    actions = sub._option_string_actions
    if name in actions:
        return actions[name]
    matches = {id(a): a for opt, a in actions.items() if opt.startswith(name)}
    return next(iter(matches.values())) if len(matches) == 1 else None


def _exclusive(sub: argparse.ArgumentParser, action: argparse.Action) -> list[argparse.Action]:
    """The actions that exclude ``action`` (its mutually exclusive groups' other members)."""
    return [a for group in sub._mutually_exclusive_groups if action in group._group_actions
            for a in group._group_actions if a is not action]


def _tokens(path: str, key: str, option: str, action: argparse.Action, value) -> list[str]:
    """``value`` as command-line tokens for ``action``."""
    where = f"--config {path}: {key}"
    if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
        if not isinstance(value, bool):
            raise OnnxpruneError(f"{where}: a flag; give true or false")
        return [option] if value == isinstance(action, argparse._StoreTrueAction) else []
    if isinstance(value, dict):
        raise OnnxpruneError(f"{where}: expected a value, not a table")
    if action.nargs == "?" and isinstance(value, bool):   # --json: its const, spelled out
        return [f"{option}={action.const}"] if value else []   # (a bare flag would take
        # the next positional as its value)
    if isinstance(value, bool):
        raise OnnxpruneError(f"{where}: expected a value, not {str(value).lower()}")
    if isinstance(action, argparse._AppendAction):
        items = value if isinstance(value, list) else [value]
        return [f"{option}={_text(where, v)}" for v in items]
    if isinstance(value, list):
        return [f"{option}={','.join(_text(where, v) for v in value)}"]
    return [f"{option}={_text(where, value)}"]


def _text(where: str, value) -> str:
    if isinstance(value, bool | dict | list):
        raise OnnxpruneError(f"{where}: expected a string or a number in the list")
    return str(value)


def apply_config(parser: argparse.ArgumentParser, argv: list[str],
                 commands: tuple[str, ...]) -> list[str]:
    """``argv`` (command first) with the ``--config`` file's options inserted after the
    command, except those the command line gives itself; ``argv`` when there is no file."""
    path = config_path(argv)
    if path is None or not argv or argv[0] not in commands:
        return argv
    command, rest = argv[0], argv[1:]
    sub = command_parser(parser, command)
    data = load_config(path)
    options: dict[str, object] = {}
    for key, value in data.items():
        if isinstance(value, dict) and key in commands:
            if key != command:   # another command's table: checked, not applied
                other = command_parser(parser, key)
                for name, item in value.items():
                    _check_key(path, key, other, name, item)
            continue
        options[key] = value
    section = data.get(command)
    if isinstance(section, dict):
        options.update(section)
    given: set[int] = set()
    for token in rest:
        action = _action_of(sub, token)
        if action is not None:
            given |= {id(action)} | {id(a) for a in _exclusive(sub, action)}
    dests = {id(a): a.dest for a in sub._actions}
    given_dests = {dests[i] for i in given if i in dests}
    tokens: list[str] = []
    for key, value in options.items():
        option, action = _check_key(path, command, sub, key, value)
        if id(action) in given or action.dest in given_dests:
            continue   # the command line wins
        tokens += _tokens(path, key, option, action, value)
    return [command, *tokens, *rest]


def _check_key(path: str, command: str, sub: argparse.ArgumentParser, key: str, value
               ) -> tuple[str, argparse.Action]:
    """The option and action a key names; a one-line error for an unknown key."""
    option = "--" + str(key).replace("_", "-")
    action = sub._option_string_actions.get(option)
    if action is None or option in NOT_IN_FILES or isinstance(
            action, argparse._HelpAction | argparse._VersionAction):
        known = sorted(o[2:] for o, a in sub._option_string_actions.items()
                       if o.startswith("--") and o not in NOT_IN_FILES
                       and a.help != argparse.SUPPRESS)
        raise OnnxpruneError(f"--config {path}: unknown option {key!r} for onnxprune "
                             f"{command} (known: {', '.join(known)})")
    _tokens(path, key, option, action, value)   # the value's kind
    return option, action
