"""`python -m proxy sessions list --user ID` / `sessions revoke --user ID`: an operator's view of one
user's sessions, in the shared storage (so on every replica at once).

`list` shows when each session was created, last seen and ends, named by the audit log's keyed hash
(`sid_hash`), never by anything that opens it. `revoke` ends them all: a replica refuses the cookies
at their next request, and ends the user's running answers at their next slot renewal. With
`memory://` storage the sessions live inside the running server, out of this command's reach.
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from typing import Any

from proxy.audit import AuditLog
from proxy.settings import Settings
from proxy.storage_cli import run_command, shared_storage


def add_sessions_command(commands: Any) -> None:
    sessions = commands.add_parser("sessions", help="list or end a user's sessions (needs Redis storage)")
    actions = sessions.add_subparsers(dest="action", required=True)
    for action, help_text in (("list", "show a user's sessions"), ("revoke", "end every session of a user")):
        command = actions.add_parser(action, help=help_text, description=help_text)
        command.add_argument("--user", required=True, help="the user id, as GET /auth/session shows it")
    sessions.set_defaults(handler=run_sessions_command)


def run_sessions_command(args: argparse.Namespace) -> None:
    run_command(lambda settings: sessions_command(args.action, args.user, settings))


async def sessions_command(action: str, user_id: str, settings: Settings) -> str:
    out_of_reach = (
        "sessions live inside the running server, out of reach here. "
        "Use Redis storage, or end them from the app (POST /auth/logout-all), or restart the server."
    )
    async with shared_storage(settings, out_of_reach=out_of_reach) as storage:
        if action == "revoke":
            removed = await storage.delete_user_sessions(user_id)
            return f"ended {len(removed)} session(s) of {user_id}"
        records = await storage.user_sessions(user_id)
    if not records:
        return f"{user_id} has no session"
    audit = AuditLog(settings.session_secrets[0].get_secret_value()) if settings.session_secrets else None
    lines = [f"{'sid_hash':16}  {'created':20}  {'last seen':20}  {'ends':20}  kind"]
    for record in records:
        sid = audit.sid_hash(record.key) if audit is not None else "-"
        times = "  ".join(_when(moment) for moment in (record.created_at, record.last_seen, record.expires_at))
        lines.append(f"{sid:16}  {times}  {record.kind}")
    return "\n".join(lines)


def _when(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%SZ")
