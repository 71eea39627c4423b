"""``tsdfm-pipeline build`` and ``inspect``: make a dataset, look inside one."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated

import typer

from tsdfm.pipeline.cli.common import (
    DEVICE_HELP,
    JsonOption,
    Order,
    Precision,
    PrecisionOption,
    Selection,
    app,
    default_teacher,
    progress,
    user_errors,
    value,
    write_json,
)
from tsdfm.pipeline.cli.teacher import TeacherFormatOption, TrustOption

DEFAULT_OUT = "tsdfm-out/dataset"


class SchemaVersion(str, enum.Enum):
    v1 = "1"
    v2 = "2"


@app.command("build")
@user_errors
def build(
    teacher: Annotated[
        str | None,
        typer.Option(
            help="Teacher checkpoint (dir or org/name[@rev]) of any supported family "
            "(docs/teachers.md); default: bundled."
        ),
    ] = None,
    teacher_format: TeacherFormatOption = None,
    trust_remote_code: TrustOption = False,
    compass: Annotated[
        str | None,
        typer.Option(
            help="Compass checkpoint; default: bundled when --teacher is not given. "
            "'exact' / 'exact-ratio': the synthetic language's own likelihood (an oracle "
            "control for synthetic teachers)."
        ),
    ] = None,
    out: Annotated[str, typer.Option(help="Output folder or fsspec URL.")] = DEFAULT_OUT,
    shards: Annotated[int, typer.Option(help="Number of Parquet shards.")] = 4,
    trajectories_per_shard: Annotated[int, typer.Option(help="Rows per shard.")] = 16,
    batch_size: Annotated[
        int,
        typer.Option(help="Trajectories navigated together (with --max-memory: at most this)."),
    ] = 16,
    max_memory: Annotated[
        float | None,
        typer.Option(
            help="GiB of activations per worker: navigate the largest batch (≤ --batch-size) "
            "that fits, measured by a probe forward on CUDA, estimated from the model's shape "
            "on CPU; the shards' bytes do not depend on it.",
            show_default=False,
        ),
    ] = None,
    student_steps: Annotated[int, typer.Option("--student-steps", "-S")] = 8,
    teacher_steps: Annotated[int, typer.Option("--teacher-steps", "-N")] = 1024,
    k: Annotated[int, typer.Option("--k", "-K", help="Candidates per midpoint; 1 = blind.")] = 8,
    tau: Annotated[float, typer.Option(help="Shape segments starting at t ≥ tau.")] = 0.0,
    selection: Annotated[
        Selection,
        typer.Option(
            help="argmin; softmax (a candidate ∝ exp(−energy / T)); token-softmax (each "
            "position from a candidate ∝ exp(−its energy / T): needs a token-ratio compass); "
            "tilt (K = 1, -N = -S, dilated: the teacher's logits plus the token-ratio "
            "compass's log-ratios)"
        ),
    ] = Selection.argmin,
    selection_temperature: Annotated[
        float, typer.Option(help="T of the softmax selection, ∝ exp(−energy / T).")
    ] = 1.0,
    teacher_temperature: Annotated[
        float,
        typer.Option(
            help="T of the teacher's draws, softmax(logits / T); 1 is the teacher itself. "
            "With --k 1 and T < 1: a lower-entropy blind control arm."
        ),
    ] = 1.0,
    reveal_order: Annotated[
        Order,
        typer.Option(
            help="random (the path's rule) or dilated (segment k reveals a fixed, evenly "
            "spread group of positions: the group the student's step k reveals)."
        ),
    ] = Order.random,
    shared_reveals: Annotated[
        bool,
        typer.Option(
            help="Candidates share the reveal randomness: the same positions move, only "
            "the token draws differ."
        ),
    ] = False,
    old_temperature: Annotated[
        str | None, typer.Option("--temperature", hidden=True, show_default=False)
    ] = None,
    seed: int = 0,
    schema_version: Annotated[
        SchemaVersion,
        typer.Option(
            help="Dataset schema (docs/schema.md): 2 stores information-minimal states, "
            "1 full states (for readers of older releases)."
        ),
    ] = SchemaVersion.v2,
    text: Annotated[
        bool | None,
        typer.Option(
            "--text/--no-text",
            help="Store the decoded final text; default: with schema 1 when the teacher "
            "has a tokenizer, not with schema 2.",
            show_default=False,
        ),
    ] = None,
    precision: PrecisionOption = Precision.fp32,
    compile_models: Annotated[
        bool,
        typer.Option(
            "--compile",
            help="torch.compile the teacher and compass forwards (minutes of compiling per "
            "worker; not bit-identical to an uncompiled build, so part of the fingerprint).",
        ),
    ] = False,
    device: Annotated[str, typer.Option(help=DEVICE_HELP + "; one worker per GPU")] = "auto",
    num_workers: Annotated[
        int | None, typer.Option(help="Actors; default: one per GPU, else one per CPU.")
    ] = None,
    address: Annotated[
        str | None, typer.Option(help="Join this Ray cluster (host:port or 'auto').")
    ] = None,
    overwrite: Annotated[
        bool, typer.Option(help="Delete a different dataset at --out and start over.")
    ] = False,
    max_retries: Annotated[int, typer.Option(help="Retries of a shard whose worker died.")] = 3,
    allow_teacher_mismatch: Annotated[
        bool, typer.Option(help="Accept a compass trained on another teacher (warns).")
    ] = False,
    push_to_hub: Annotated[
        str | None,
        typer.Option(help="Then publish to this Hub dataset repo (org/name) as the next vN."),
    ] = None,
    private: Annotated[
        bool, typer.Option(help="With --push-to-hub: create the repo private.")
    ] = False,
    json_out: JsonOption = None,
) -> None:
    """Build a trajectory dataset with energy-guided midpoint search on Ray (resumable).

    Ray actors (one per GPU, else CPU actors) run the teacher, K candidates per midpoint are
    scored by the compass, and the trajectories are written as sharded Parquet with a
    manifest. Rerun the same command to resume.
    """
    from tsdfm.models.errors import ConfigError
    from tsdfm.models.navigator import NavigatorConfig
    from tsdfm.pipeline.build import check_arguments, run_build
    from tsdfm.pipeline.config import BuildConfig

    if old_temperature is not None:
        raise ConfigError(
            "--temperature is ambiguous and no longer accepted: use --selection-temperature "
            "for the softmax selection or --teacher-temperature for the teacher's draws"
        )
    check_arguments(out, device, num_workers, max_retries)
    from tsdfm.pipeline.executor import import_ray

    import_ray()  # the build side's extra, before anything is shown or written
    if push_to_hub is not None:  # fail before the build, not after it
        from tsdfm.pipeline.hub import check_repo_id, resolve_token

        resolve_token(None, check_repo_id(push_to_hub))
    if teacher is None:
        from tsdfm.models.checkpoint import bundled_path

        teacher = default_teacher()
        if compass is None and k > 1:
            compass = str(bundled_path("compass"))
            if not Path(compass).is_dir():
                raise ConfigError(
                    f"the bundled compass is missing ({compass}); reinstall tsdfm-pipeline, "
                    "pass --compass CKPT, or --k 1 for a blind dataset"
                )
    nav = NavigatorConfig(
        student_steps,
        teacher_steps,
        k,
        tau,
        value(selection),
        temperature=selection_temperature,
        teacher_temperature=teacher_temperature,
        reveal_order=value(reveal_order),
        shared_reveals=shared_reveals,
    )
    cfg = BuildConfig(
        teacher,
        compass,
        shards,
        trajectories_per_shard,
        batch_size,
        nav,
        seed,
        value(precision),
        allow_teacher_mismatch,
        teacher_format=value(teacher_format),
        trust_remote_code=trust_remote_code,
        schema_version=int(value(schema_version)),
        text=text,
        compile=compile_models,
        max_memory=max_memory,
    )
    with progress() as bar:
        # the bar appears once the checkpoints and the output passed their checks, so a
        # refused build prints its one line alone
        state = {"before": 0, "task": None}

        def on_plan(todo, done, corrupt):
            task = state["task"] = bar.add_task("building", total=cfg.total_trajectories, info="")
            if done:
                bar.console.print(f"resuming: {len(done)} shard(s) already committed")
            if corrupt:
                bar.console.print(f"rebuilding corrupt shard(s): {corrupt}")
            state["before"] = len(done) * cfg.trajectories_per_shard
            bar.update(task, completed=state["before"])

        def on_progress(p):
            rate = (p.trajectories + p.in_flight) / max(p.seconds, 1e-9)
            info = f"{rate:.2f} traj/s"
            if p.energy_gain is not None:
                info += f"  energy gain {p.energy_gain:.3f}"
            if p.retries:
                info += f"  retries {p.retries}"
            done = state["before"] + p.trajectories + p.in_flight
            bar.update(state["task"], completed=done, info=info)

        summary = run_build(
            cfg,
            out,
            overwrite=overwrite,
            address=address,
            device=device,
            num_workers=num_workers,
            max_retries=max_retries,
            progress=on_progress,
            on_plan=on_plan,
            say=bar.console.print,
        )
    t = summary.totals
    c = t.get("counters", {})
    typer.echo(f"dataset: {out}  ({summary.fingerprint[:23]}…)")
    typer.echo(
        f"shards {t['shards']}/{cfg.shards}  rows {t['rows']}  bytes {t['bytes']:,}  "
        f"built {len(summary.built)}  skipped {len(summary.skipped)}"
    )
    if summary.execution is not None:
        ex = summary.execution
        typer.echo(
            f"{summary.trajectories_per_second:.2f} trajectories/s on {ex.workers} "
            f"{ex.device} worker(s); retries {ex.retries}; "
            f"teacher forward {c.get('teacher_forward_seconds', 0):.1f}s, "
            f"compass {c.get('compass_seconds', 0):.1f}s"
        )
    write_json(json_out, summary)
    if push_to_hub is not None:
        from tsdfm.pipeline.cli.hub import push_after_build

        push_after_build(out, push_to_hub, private)


@app.command("inspect")
@user_errors
def inspect(
    path: Annotated[Path, typer.Argument(help="Dataset folder.")],
    example: Annotated[int, typer.Option(help="Trajectory id to show step by step.")] = 0,
    json_out: JsonOption = None,
) -> None:
    """Show a dataset: schema, counts, provenance, statistics, one trajectory step by step."""
    from tsdfm.pipeline.inspect import format_inspection, inspection

    report = inspection(str(path), example)
    typer.echo(format_inspection(report))
    write_json(json_out, report)
