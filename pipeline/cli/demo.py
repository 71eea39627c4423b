"""``tsdfm-pipeline demo``: the whole loop on the bundled teacher and compass, on this CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tsdfm.pipeline.cli.common import JsonOption, app, user_errors, write_json


@app.command("demo")
@user_errors
def demo(
    out: Annotated[Path, typer.Option(help="Folder for everything the demo writes.")] = Path(
        "tsdfm-out/demo"
    ),
    trajectories_per_shard: Annotated[
        int, typer.Option(help="Rows per shard (2 shards per dataset).")
    ] = 32,
    distill_steps: Annotated[int, typer.Option(help="Training steps of each student.")] = 100,
    eval_samples: Annotated[int, typer.Option(help="Samples per evaluated arm.")] = 400,
    json_out: JsonOption = None,
) -> None:
    """The whole loop on the bundled teacher and compass, on this machine's CPU, in minutes.

    Builds a blind (K=1) and a shaped (K=8) dataset on a local Ray cluster, verifies both,
    distils a student from each with the same budget, evaluates teacher and students under the
    synthetic language's exact likelihood (the blind student also at the temperature whose
    entropy matches the shaped student's), and prints a results table. Rerun to resume.
    """
    from tsdfm.pipeline.demo import DemoConfig, format_results, run_demo
    from tsdfm.pipeline.executor import import_ray

    import_ray()  # the demo builds: needs the build side's extra
    cfg = DemoConfig(
        trajectories_per_shard=trajectories_per_shard,
        distill_steps=distill_steps,
        eval_samples=eval_samples,
    )
    result = run_demo(out, cfg, log=typer.echo)
    typer.echo("")
    typer.echo(format_results(result))
    typer.echo("")
    typer.echo(f"all output in {out.resolve()}  ({result.seconds:.0f}s)")
    write_json(json_out, result)
