"""`python -m proxy users add NAME` / `users remove NAME`: manage the `password` users file.

The password is asked twice at a terminal (never echoed, never an argument, so it stays out of shell
history and `ps`), or read as one line from standard input otherwise, so scripts can pipe it in.
The file is `BFF_USERS_FILE` (or `--file`); it is created when missing and always written atomically
with owner-only permissions. A running server picks the change up at the next sign-in.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from proxy.auth.base import AuthConfigError
from proxy.auth.password import (
    MAX_PASSWORD_CHARS,
    MIN_PASSWORD_CHARS,
    USERNAME_PATTERN,
    hash_password,
    load_users,
    save_users,
)
from proxy.settings import Settings, describe_errors


class UsersCommandError(Exception):
    pass


def add_users_command(commands: Any) -> None:
    """Register `users` on the CLI's subparsers."""
    users = commands.add_parser("users", help="manage the users of the password sign-in (BFF_USERS_FILE)")
    users.add_argument("--file", type=Path, help="the users file (default: BFF_USERS_FILE)")
    actions = users.add_subparsers(dest="action", required=True)
    add = actions.add_parser("add", help="add a user; the password is prompted for, or read from stdin")
    add.add_argument("name")
    add.add_argument("--replace", action="store_true", help="set a new password for an existing user")
    remove = actions.add_parser("remove", help="remove a user")
    remove.add_argument("name")
    users.set_defaults(handler=run_users_command)


def run_users_command(args: argparse.Namespace) -> None:
    try:
        print(users_command(args))
    except UsersCommandError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def users_command(args: argparse.Namespace) -> str:
    path = args.file or _configured_path()
    try:
        users = load_users(path) if path.exists() else {}
    except AuthConfigError as exc:
        raise UsersCommandError(str(exc)) from None
    name = args.name
    if args.action == "remove":
        if users.pop(name, None) is None:
            raise UsersCommandError(f"no user {name!r} in {path}")
        save_users(path, users)
        return f"removed {name} from {path}"
    if not USERNAME_PATTERN.fullmatch(name):
        raise UsersCommandError("a username is 1-128 letters, digits and . _ @ + - (starting with a letter or digit)")
    if name in users and not args.replace:
        raise UsersCommandError(f"{name!r} already exists in {path}; add --replace to set a new password")
    users[name] = hash_password(_read_password())
    save_users(path, users)
    return f"{'updated' if args.replace else 'added'} {name} in {path}"


def _configured_path() -> Path:
    try:
        path = Settings().users_file
    except ValidationError as exc:
        raise UsersCommandError("; ".join(describe_errors(exc))) from None
    if path is None:
        raise UsersCommandError("set BFF_USERS_FILE or pass --file")
    return path


def _read_password() -> str:
    if sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            raise UsersCommandError("the passwords differ")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not MIN_PASSWORD_CHARS <= len(password) <= MAX_PASSWORD_CHARS:
        raise UsersCommandError(f"a password is {MIN_PASSWORD_CHARS} to {MAX_PASSWORD_CHARS} characters")
    return password
