"""``tsdfm-pipeline convert``: rewrite a schema v1 dataset as schema v2."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tsdfm.pipeline.cli.common import JsonOption, app, user_errors, write_json


@app.command("convert")
@user_errors
def convert_cmd(
    src: Annotated[Path, typer.Argument(help="A finished schema v1 dataset folder (only read).")],
    out: Annotated[
        Path, typer.Option("--out", help="New or empty folder for the v2 dataset (or resume).")
    ],
    text: Annotated[
        bool | None,
        typer.Option(
            "--text/--no-text",
            help="Keep or drop the text column; default: keep it when the v1 shards hold text.",
        ),
    ] = None,
    json_out: JsonOption = None,
) -> None:
    """Convert a v1 dataset to the information-minimal schema v2 (docs/schema.md).

    Every shard is decoded and re-encoded through the schema's one encoder: the states are
    the same bit for bit, energies become float16, and the manifest, checksums, fingerprint
    and card are those of a v2 build of the same config. Rerun the same command to resume an
    interrupted conversion; `tsdfm-pipeline verify OUT` checks the result.
    """
    from tsdfm.pipeline.convert import convert

    summary = convert(str(src), str(out), text=text, say=lambda line: typer.echo(line, err=True))
    ratio = summary.src_bytes / max(summary.dst_bytes, 1)
    typer.echo(
        f"{summary.dst}: schema v2, {summary.rows} rows in {len(summary.converted)} converted "
        f"and {len(summary.skipped)} already converted shard(s); {summary.src_bytes:,} → "
        f"{summary.dst_bytes:,} bytes ({ratio:.1f}x smaller); fingerprint {summary.fingerprint}"
    )
    write_json(json_out, summary)
