"""How commands speak: JSON for machines (--json), tables and progress bars for people.

Progress goes to stderr so that stdout stays clean for pipes and --json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any, Awaitable, Callable, Iterable, Sequence, TypeVar

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn, TransferSpeedColumn
from rich.table import Table

from cachefs.admin import AdminClient
from cachefs.config import ClientConfig
from cachefs.common.settings import format_size, load
from cachefs.common.wire import OperationInfo

T = TypeVar("T")


def stdout() -> Console:
    return Console(soft_wrap=True)


def stderr() -> Console:
    return Console(stderr=True)


def print_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n")


def table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    t = Table(title=title, show_edge=False, header_style="bold")
    for c in columns:
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(*(str(x) for x in r))
    stdout().print(t)


def add_client_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoint", help="URL of any cache node (default: CACHEFS_ENDPOINT, or the file `cachefs up` wrote)")
    p.add_argument("--token", help="reader token (default: CACHEFS_TOKEN, or the file `cachefs up` wrote)")
    p.add_argument("--admin-token", help="admin token, for commands that change datasets "
                   "(default: CACHEFS_ADMIN_TOKEN, or the file `cachefs up` wrote)")


def add_json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")


def client_config(args: argparse.Namespace) -> ClientConfig:
    config = load(ClientConfig, {k: getattr(args, k, None) for k in ("endpoint", "token", "admin_token")})
    config.require_endpoint()
    return config


def run_admin(args: argparse.Namespace, action: Callable[[AdminClient], Awaitable[T]]) -> T:
    async def go() -> T:
        async with AdminClient(client_config(args)) as admin:
            return await action(admin)

    return asyncio.run(go())


async def follow(admin: AdminClient, op: OperationInfo, label: str, quiet: bool = False,
                 timeout: float | None = None) -> OperationInfo:
    """Wait for an operation with a progress bar (stderr); Ctrl-C cancels it in the cluster."""
    if quiet or not sys.stderr.isatty():
        return await admin.wait(op, timeout=timeout)
    columns = [TextColumn(f"[bold]{label}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TextColumn("{task.fields[files]}"), TimeElapsedColumn()]
    with Progress(*columns, console=stderr(), transient=True) as bar:
        task = bar.add_task(label, total=None, files="")

        def show(o: OperationInfo) -> None:
            bar.update(task, total=o.total_bytes or None, completed=o.done_bytes,
                       files=f"{o.done_files}/{o.total_files or '?'} files")

        return await admin.wait(op, progress=show, timeout=timeout)


def report(op: OperationInfo, as_json: bool) -> int:
    """Print how an operation ended; exit code 0 only if it succeeded."""
    if as_json:
        print_json(op.to_json())
    else:
        secs = max(op.finished - op.started, 1e-9)
        con = stdout()
        con.print(f"{op.kind} {op.dataset}: [bold]{op.state}[/bold] — {op.done_files}/{op.total_files} files, "
                  f"{format_size(op.done_bytes)} in {secs:.1f} s ({format_size(op.done_bytes / secs)}/s)")
        if op.message:
            con.print(f"  {op.message}")
        for path, why in sorted(op.failures.items())[:50]:
            con.print(f"  [red]failed[/red] {path}: {why}")
        if len(op.failures) > 50:
            con.print(f"  … and {len(op.failures) - 50} more")
    return 0 if op.finished_ok else 1
