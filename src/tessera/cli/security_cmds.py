"""``tessera security checklist``: audit a server deployment and print the seed's checklist.

Exit codes: 0 printed; 1 with ``--strict`` when a measure is not executed (``no``, or
``unchecked``: what cannot be seen is not proven); 2 bad input (no data directory, an
unreadable comments file).
"""

from __future__ import annotations

import html
import json
import sys
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import typer

from tessera.cli._common import (
    EXIT_DENIED,
    FORCE,
    check_writable,
    cli_path,
    console,
    fail,
    read_input_file,
    write_file_atomic,
)
from tessera.cli.apps import app

__all__ = ["render", "security_app"]

security_app = typer.Typer(
    help="Audit the security of this server deployment.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(security_app, name="security")

FORMATS = ("markdown", "html", "json")
_COLUMNS = (
    "#",
    "Measure",
    "References",
    "Needed access rights",
    "Executed",
    "Finding",
    "Customer comments and reasons",
)


@security_app.command("checklist")
def checklist(
    data_dir: Path = typer.Option(
        Path("./var"), "--data-dir", help="The server's data directory.", parser=cli_path
    ),
    url: str | None = typer.Option(
        None, "--url", envvar="TESSERA_URL", help="The running server to probe, e.g. https://host:7790."
    ),
    ca: Path | None = typer.Option(
        None,
        "--ca",
        envvar="TESSERA_CA",
        help="CA to trust for the probe (default: the data directory's).",
        parser=cli_path,
    ),
    output_format: str = typer.Option("markdown", "--format", help="markdown, html or json."),
    output: Path | None = typer.Option(
        None, "-o", "--output", help="Write to FILE instead of stdout.", parser=cli_path
    ),
    comments_file: Path | None = typer.Option(
        None,
        "--comments",
        help='TOML file: [comments] MEASURE-ID = "why" (the customer\'s column).',
        parser=cli_path,
    ),
    strict: bool = typer.Option(False, "--strict", help="Exit 1 when a measure is not executed."),
    force: bool = FORCE,
    as_json: bool = typer.Option(False, "--json", help="Same as --format json."),
) -> None:
    """Check each hardening measure of this deployment and print the checklist: measure,
    references, needed access rights, executed (yes, no, n/a, unchecked), what was found,
    and the customer's comments."""
    from tessera.server.checklist import MEASURE_IDS, Check, audit, read_comments, trust, with_comments
    from tessera.server.config import ConfigError, load_config

    if output_format not in FORMATS:
        fail(f"--format must be one of {', '.join(FORMATS)} (got {output_format!r})")
    if as_json:  # every verb that prints data takes --json (SPEC); --format json stays
        if output_format not in ("markdown", "json"):
            fail(f"--json and --format {output_format} contradict each other")
        output_format = "json"
    if output is not None:
        check_writable(output, "-o", force=force)  # before the audit and its probe run
    if url is not None:
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 (raises for a port out of range)
        except ValueError as exc:
            fail(f"--url: {exc}")
        if parts.scheme not in ("https", "http") or not parts.hostname:
            fail(f"--url must be an http(s):// URL with a host (got {url!r})")
    try:
        config = load_config(data_dir)
    except ConfigError as exc:
        fail(str(exc))
    comments: dict[str, str] = {}
    if comments_file is not None:
        text = read_input_file(comments_file, "comments file")
        try:
            comments = read_comments(text.decode("utf-8"), MEASURE_IDS)
        except (UnicodeDecodeError, ValueError) as exc:
            fail(f"comments file {comments_file}: {exc}")
    check = Check(config, url, ca)
    if url is not None:
        try:
            trust(check)
        except ValueError as exc:
            fail(f"--ca: {exc}")
    measures = with_comments(audit(check), comments)
    document = render(
        output_format,
        [asdict(m) for m in measures],
        {
            "deployment": str(config.data_dir),
            "server": url,
            "audited_at": datetime.now(UTC).replace(microsecond=0).isoformat(),
        },
    )
    if output is None:
        sys.stdout.write(document)
        sys.stdout.flush()
    else:
        write_file_atomic(output, document.encode("utf-8"), force=force)
        console.print(f"checklist written to {output}")
    open_items = [m.id for m in measures if m.executed in ("no", "unchecked")]
    if strict and open_items:
        fail(f"{len(open_items)} measures not executed: {', '.join(open_items)}", EXIT_DENIED)


def render(output_format: str, measures: list[dict[str, str]], about: dict[str, str | None]) -> str:
    """The checklist as ``markdown``, ``html`` or ``json``."""
    from tessera.server.checklist import EXECUTED

    counts = {state: sum(1 for m in measures if m["executed"] == state) for state in EXECUTED}
    summary = (
        f"{counts['yes']} of {len(measures)} executed; {counts['no']} not executed, "
        f"{counts['unchecked']} unchecked, {counts['n/a']} not applicable"
    )
    server = about["server"] or "not probed (give --url)"
    if output_format == "json":
        return json.dumps({**about, "summary": counts, "measures": measures}, indent=2) + "\n"
    rows = [
        (
            str(i),
            f"{m['title']} ({m['id']}): {m['measure']}",
            m["references"],
            m["access_rights"],
            m["executed"],
            m["finding"],
            m["comment"],
        )
        for i, m in enumerate(measures, 1)
    ]
    if output_format == "html":
        head = "".join(f"<th>{html.escape(c)}</th>" for c in _COLUMNS)
        body = "\n".join(
            f'<tr class="{html.escape(row[4])}">'
            + "".join(f"<td>{html.escape(c)}</td>" for c in row)
            + "</tr>"
            for row in rows
        )
        return (
            '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            "<title>Tessera security checklist</title>"
            "<style>table{border-collapse:collapse}td,th{border:1px solid #888;padding:4px;"
            "vertical-align:top}tr.no td,tr.unchecked td{background:#fde}</style></head><body>\n"
            "<h1>Security checklist: Tessera license server</h1>\n<ul>"
            f"<li>deployment: {html.escape(str(about['deployment']))}</li>"
            f"<li>server: {html.escape(server)}</li>"
            f"<li>audited: {html.escape(str(about['audited_at']))}</li>"
            f"<li>{html.escape(summary)}</li></ul>\n"
            f"<table>\n<tr>{head}</tr>\n{body}\n</table>\n</body></html>\n"
        )
    lines = [
        "# Security checklist: Tessera license server",
        "",
        f"- deployment: {about['deployment']}",
        f"- server: {server}",
        f"- audited: {about['audited_at']}",
        f"- {summary}",
        "",
        "| " + " | ".join(_COLUMNS) + " |",
        "|" + "---|" * len(_COLUMNS),
    ]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", " ")
