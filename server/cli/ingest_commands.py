"""``lakegate ingest PATH``: files into a Lance dataset of documents, through the gate.

The command calls the add_documents tool in process as the configured principal, so an ingest is
authorised and audited exactly like an agent's call: the same decisions (write on the dataset, read
on each classification used), one audit record per batch of at most MAX_DOCUMENTS files.
Exit codes: 0 written; 1 refused or failed (nothing of the refused batch was written); 2 usage.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from lakegate.catalog.chunking import DEFAULT_CHUNK_SIZE, DEFAULT_OVERLAP, chunk_text
from lakegate.catalog.document_search import CLASSIFICATIONS
from lakegate.catalog.ingest import MAX_DOCUMENT_CHARS, MAX_DOCUMENTS, SUPPORTED_SUFFIXES, parse_file
from lakegate.errors import LakegateError
from lakegate.server.cli.context import command_settings as _settings
from lakegate.server.settings import Settings

__all__ = ["ingest"]

DEFAULT_ROLES = "role:support_agent,role:data_steward,role:admin"


@dataclass(frozen=True)
class _File:
    path: Path
    doc_id: str


def _files(path: Path) -> list[_File]:
    if path.is_file():
        if path.suffix.lower() not in SUPPORTED_SUFFIXES:
            raise click.ClickException(
                f"{path}: unsupported file type {path.suffix or '(none)'!r}; ingest {', '.join(SUPPORTED_SUFFIXES)}."
            )
        return [_File(path, path.name)]
    found = [
        _File(p, p.relative_to(path).as_posix())
        for p in sorted(path.rglob("*"))
        if p.is_file()
        and p.suffix.lower() in SUPPORTED_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    ]
    if not found:
        raise click.ClickException(f"{path} holds no {', '.join(SUPPORTED_SUFFIXES)} files.")
    return found


@click.command("ingest")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--dataset", default="kb.articles", show_default=True, help="Lance dataset of documents.")
@click.option(
    "--classification",
    type=click.Choice(CLASSIFICATIONS),
    default="internal",
    show_default=True,
    help="Classification of every document ingested.",
)
@click.option("--roles", default=DEFAULT_ROLES, show_default=True, help="Comma-separated roles that may read them.")
@click.option("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, show_default=True, help="Passage size (chars).")
@click.option("--overlap", type=int, default=DEFAULT_OVERLAP, show_default=True, help="Overlap between passages.")
@click.option("--principal", default=None, help="Who ingests. Default: $LAKEGATE_PRINCIPAL or lakegate.toml.")
@click.pass_context
def ingest(
    ctx: click.Context,
    /,
    path: Path,
    dataset: str,
    classification: str,
    roles: str,
    chunk_size: int,
    overlap: int,
    principal: str | None,
) -> None:
    """Ingest PATH (a .md/.txt/.html/.pdf file, or a folder of them, recursively) into a dataset.

    \b
    Each file is one document; its doc_id is its path relative to PATH (a file: its name), so
    ingesting the folder again replaces every document that changed. Runs as the principal through
    the gate: it needs add_documents, write on the dataset and read on the classification.
      lakegate ingest docs/ --principal kate --classification internal
    """
    settings = _settings(ctx, principal=principal)
    if not settings.principal:
        raise click.UsageError("no principal: pass --principal NAME (or set LAKEGATE_PRINCIPAL).")
    allowed_roles = [r.strip() for r in roles.split(",") if r.strip()]
    if not allowed_roles:
        raise click.UsageError("--roles names no role: nobody could read the documents.")
    files = _files(path)
    console = Console(highlight=False, soft_wrap=True)
    err = Console(stderr=True)
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err
    ) as progress:
        reading = progress.add_task("reading files", total=len(files))
        documents: list[dict[str, Any]] = []
        passages = 0
        for file in files:
            try:
                parsed = parse_file(file.path)
                if len(parsed.text) > MAX_DOCUMENT_CHARS:
                    raise click.ClickException(
                        f"{file.path}: {len(parsed.text):,} characters, more than {MAX_DOCUMENT_CHARS:,}; split it. "
                        "Nothing was written."
                    )
                passages += len(chunk_text(parsed.text, size=chunk_size, overlap=overlap))
            except LakegateError as exc:
                raise click.ClickException(f"{exc} Nothing was written.") from exc
            documents.append(
                {
                    "doc_id": file.doc_id,
                    "title": parsed.title,
                    "text": parsed.text,
                    "source": file.path.as_posix(),
                    "classification": classification,
                    "allowed_roles": allowed_roles,
                }
            )
            progress.advance(reading)
        results = _run(settings, dataset, documents, chunk_size, overlap, progress, passages)
    chunks = sum(sum(r["chunks"].values()) for r in results)
    console.print(
        f"ingested {len(documents)} document(s), {chunks} passage(s) into {dataset}: "
        f"version {results[-1]['version']} (was {results[0]['previous_version']}), as {settings.principal}"
    )


def _run(
    settings: Settings,
    dataset: str,
    documents: list[dict[str, Any]],
    chunk_size: int,
    overlap: int,
    progress: Progress,
    passages: int,
) -> list[dict[str, Any]]:
    from lakegate.server.app import open_runtime
    from lakegate.server.gate.identity import CallOrigin, stdio_principal

    embedding = progress.add_task("embedding passages", total=passages)
    runtime = open_runtime(settings)
    results: list[dict[str, Any]] = []
    try:
        who = stdio_principal(settings.principal, runtime.enforcer)
        session = uuid.uuid4().hex
        embedded_before = 0
        for start in range(0, len(documents), MAX_DOCUMENTS):
            batch = documents[start : start + MAX_DOCUMENTS]
            arguments = {"dataset": dataset, "documents": batch, "chunk_size": chunk_size, "overlap": overlap}

            def report(done: float, total: float | None, message: str | None, base: int = embedded_before) -> None:
                progress.update(embedding, completed=base + int(done))

            outcome = anyio.run(
                runtime.gate.call,
                "add_documents",
                arguments,
                who,
                CallOrigin(transport="cli", session_id=session, client_name="lakegate ingest"),
                report,
            )
            if outcome.error is not None or outcome.result is None:
                written = f" Batches before this one were written ({start} documents)." if start else ""
                raise click.ClickException(f"{outcome.error}{written}")
            result = outcome.result.model_dump()
            embedded_before += sum(result["chunks"].values())
            progress.update(embedding, completed=embedded_before)
            results.append(result)
    finally:
        runtime.close()
    return results
