"""``tsdfm-pipeline publish`` and ``verify``: release a dataset or a checkpoint, check a dataset."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from tsdfm.pipeline.cli.common import DEVICE_HELP, JsonOption, app, user_errors, write_json

EXIT_VERIFY_FAILED = 1


class Kind(str, Enum):
    dataset = "dataset"
    model = "model"


def _stderr(line: str) -> None:
    typer.echo(line, err=True)


@app.command("publish")
@user_errors
def publish_cmd(
    path: Annotated[
        Path,
        typer.Argument(
            help="Dataset folder (it must pass verify), checkpoint folder (config.json + "
            "model.safetensors) or run folder (its final/ checkpoint)."
        ),
    ],
    repo: Annotated[str, typer.Option(help="Hub repo, org/name (dataset or model repo).")],
    kind: Annotated[
        Kind | None,
        typer.Option(help="What PATH is; default: detected (manifest.json or config.json)."),
    ] = None,
    private: Annotated[bool, typer.Option(help="Create the repo private.")] = False,
    version: Annotated[
        int | None,
        typer.Option(help="Publish as vN with this N; default: the next free version."),
    ] = None,
    license: Annotated[
        str | None,
        typer.Option(help="Hub license id for the card; default: the teacher's, else unknown."),
    ] = None,
    files_per_commit: Annotated[
        int,
        typer.Option(help="Shards (or weight files) per commit; a rerun resumes after the last."),
    ] = 50,
    json_out: JsonOption = None,
) -> None:
    """Upload a verified dataset or a checkpoint to a Hub pull request, merge it, tag it vN.

    A dataset goes to a dataset repo with its dataset card; a teacher, student or compass
    checkpoint to a model repo with a generated model card (dataset, teacher and compass
    identities, the run's eval.json). The token comes from HF_TOKEN or `hf auth login`.
    Rerun the same command to finish an interrupted upload; publishing content that is
    already tagged changes nothing.
    """
    from tsdfm.pipeline.hub import publish

    result = publish(
        str(path),
        repo,
        kind=None if kind is None else kind.value,
        private=private,
        version=version,
        license=license,
        files_per_commit=files_per_commit,
        log=_stderr,
    )
    _report_published(result)
    write_json(json_out, result)


@app.command("verify")
@user_errors
def verify_cmd(
    target: Annotated[
        str, typer.Argument(help="Dataset folder, fsspec URL, or Hub org/name[@rev].")
    ],
    replay: Annotated[
        int, typer.Option(help="Rebuild this many shards (chosen at random) and compare bytes.")
    ] = 0,
    replay_shard: Annotated[
        list[int] | None,
        typer.Option("--replay-shard", help="Rebuild this shard and compare (repeatable)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the random choice of shards.")] = 0,
    device: Annotated[str, typer.Option(help="Device of the replay: " + DEVICE_HELP)] = "auto",
    teacher: Annotated[
        str | None, typer.Option(help="Teacher to replay with, if the recorded one moved.")
    ] = None,
    compass: Annotated[
        str | None, typer.Option(help="Compass to replay with, if the recorded one moved.")
    ] = None,
    json_out: JsonOption = None,
) -> None:
    """Check a dataset: checksums, schema, provenance, card, per-row invariants, replay.

    Exits 1 and lists every problem found when the dataset fails.
    """
    from tsdfm.models.devices import resolve_device
    from tsdfm.pipeline.verify import verify

    device = resolve_device(device)
    report = verify(
        target,
        replay,
        replay_shard,
        seed=seed,
        device=device,
        teacher=teacher,
        compass=compass,
    )
    typer.echo(report.format())
    if json_out is not None:
        body = {
            "target": report.target,
            "ok": report.ok,
            "problems": [{"where": p.where, "what": p.what} for p in report.problems],
            "notes": report.notes,
            "shards_checked": report.shards_checked,
            "rows_checked": report.rows_checked,
            "replayed": report.replayed,
        }
        write_json(json_out, body)
    if not report.ok:
        raise typer.Exit(EXIT_VERIFY_FAILED)


def _report_published(result) -> None:
    if result.already_published:
        typer.echo(f"{result.repo_id}: already published as {result.version}")
    else:
        typer.echo(
            f"published {result.repo_id} {result.version} (commit {result.commit[:12]}, "
            f"pull request #{result.pull_request}, {len(result.uploaded)} file(s) uploaded)"
            if result.pull_request is not None
            else f"published {result.repo_id} {result.version} (commit {result.commit[:12]})"
        )
    for line in result.usage:
        typer.echo(line)


def push_after_build(out: str, repo_id: str, private: bool) -> None:
    """``build --push-to-hub``: publish the finished build folder.

    A build written to an fsspec URL (``s3://…``, shared by the cluster's nodes) is first
    copied to a local temporary folder, which is what the upload reads.
    """
    import tempfile

    from tsdfm.pipeline.hub import publish

    if "://" not in out:
        _report_published(publish(out, repo_id, private=private, log=_stderr))
        return
    with tempfile.TemporaryDirectory(prefix="tsdfm-publish-") as tmp:
        _stderr(f"copying {out} to a local folder for the upload")
        copy_to_local(out, tmp)
        _report_published(publish(tmp, repo_id, private=private, log=_stderr))


def copy_to_local(url: str, dest: str) -> None:
    """Copy every file under the dataset at ``url`` to the local folder ``dest``."""
    from pathlib import Path

    from tsdfm.pipeline.shards import open_root

    fs, base = open_root(url)
    base = base.rstrip("/")
    for remote in fs.find(base):
        rel = remote[len(base) :].lstrip("/")
        target = Path(dest) / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(remote, str(target))
