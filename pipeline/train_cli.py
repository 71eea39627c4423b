"""``tsdfm-pipeline distill`` and ``sample``: registered on the app of tsdfm.pipeline.cli.

Neither imports Ray, and neither needs a GPU: other teams run them with a dataset id and a
checkpoint only. Heavy imports happen inside the commands.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

ORDER_HELP = (
    "Reveal order: random or dilated (default: the checkpoint's own; a student samples in its "
    "dataset's order)."
)


def register(app: typer.Typer, user_errors, progress_factory, default_teacher) -> None:
    """Add the distill and sample commands to ``app``."""

    @app.command("distill")
    @user_errors
    def distill(
        data: Annotated[
            str, typer.Option(help="Trajectory dataset: folder or Hub id org/name[@revision].")
        ],
        init: Annotated[
            str,
            typer.Option(help="Teacher checkpoint to start from (or a student to continue)."),
        ],
        out: Annotated[Path, typer.Option(help="Run directory; rerun the command to resume.")],
        steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 2000,
        batch_size: Annotated[int, typer.Option(help="Examples (segments) per micro-batch.")] = 64,
        grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimizer step.")] = 1,
        lr: float = 3e-4,
        warmup: int = 100,
        weight_decay: float = 0.03,
        grad_clip: float = 1.0,
        ema: Annotated[float, typer.Option(help="EMA decay; 0 switches EMA off.")] = 0.9995,
        final_weight: Annotated[
            float,
            typer.Option(help="λ of an extra cross-entropy toward the final sequence x_1."),
        ] = 0.0,
        student_steps: Annotated[
            int | None,
            typer.Option(help="Student step count S; default: the dataset's grid."),
        ] = None,
        allow_step_mismatch: Annotated[
            bool,
            typer.Option(help="Accept a --student-steps that differs from the dataset (warns)."),
        ] = False,
        shuffle_buffer: Annotated[
            int, typer.Option(help="Trajectories per shuffled window of a shard stream.")
        ] = 256,
        streams: Annotated[int, typer.Option(help="Shard streams read in parallel.")] = 4,
        num_workers: Annotated[
            int, typer.Option(help="Loader processes (0: in the trainer's process).")
        ] = 2,
        heldout_fraction: Annotated[
            float, typer.Option(help="Share of trajectory ids held out of training.")
        ] = 0.02,
        heldout_trajectories: Annotated[
            int, typer.Option(help="Held-out trajectories scored at each evaluation.")
        ] = 64,
        checkpoint_every: int = 500,
        eval_every: int = 250,
        log_every: int = 10,
        seed: int = 0,
        precision: Annotated[str, typer.Option(help="bf16 (autocast on CUDA) or fp32")] = "bf16",
        device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N")] = "auto",
        eval_samples: Annotated[
            int,
            typer.Option(help="Samples of the final S-step evaluation (synthetic data; 0: off)."),
        ] = 256,
        verify: Annotated[
            bool,
            typer.Option(
                "--verify/--no-verify",
                help="Check each shard's sha256 against the dataset's manifest.json before "
                "reading it, and every row read against the dataset contract (token ranges, "
                "reveal-once, ids, shapes). --no-verify trains on the bytes as they are; the "
                "student's provenance records which.",
            ),
        ] = True,
    ) -> None:
        """Distil a few-step student from a trajectory dataset (resumable; no Ray, no GPU needed).

        The student is the teacher's backbone with step-size conditioning, initialised from the
        teacher; its step count S is the dataset's time grid. The loss is the NLL of each
        recorded segment under the student's own jump rule (docs/distill.md).
        """
        from tsdfm.models.train.distill import DistillConfig, prepare_run, train_student

        cfg = DistillConfig(
            data=data,
            init=init,
            out=str(out),
            steps=steps,
            batch_size=batch_size,
            grad_accum=grad_accum,
            lr=lr,
            warmup=warmup,
            weight_decay=weight_decay,
            grad_clip=grad_clip,
            ema=ema,
            final_weight=final_weight,
            student_steps=student_steps,
            allow_step_mismatch=allow_step_mismatch,
            shuffle_buffer=shuffle_buffer,
            streams=streams,
            heldout_fraction=heldout_fraction,
            heldout_trajectories=heldout_trajectories,
            checkpoint_every=checkpoint_every,
            eval_every=eval_every,
            log_every=log_every,
            seed=seed,
            precision=precision,
            device=device,
            num_workers=num_workers,
            verify=verify,
        )

        def warn(msg: str) -> None:
            typer.echo(f"warning: {msg}", err=True)

        run = prepare_run(cfg, warn)
        typer.echo(
            f"dataset {run.source.ref}: {len(run.source.files)} shard(s), S={run.source.num_steps}"
            f", L={run.source.seq_len}, fingerprint {str(run.source.fingerprint)[:23]}…; "
            f"sha256 {run.source.verification()['sha256']}"
        )
        with progress_factory() as bar:
            task = bar.add_task("distilling", total=steps, info="")

            def report(step: int, total: int, m: dict) -> None:
                info = f"loss {m['loss']:.4f}  {m['examples_per_second']:.0f} ex/s"
                if m.get("heldout_loss") is not None:
                    info += f"  held-out {m['heldout_loss']:.4f}"
                bar.update(task, completed=step, info=info)

            def warn_live(msg: str) -> None:
                bar.console.print(f"warning: {msg}", markup=False, highlight=False)

            result = train_student(run, report, warn_live)
        typer.echo(f"final checkpoint: {result.final_dir}  ({result.identity})")
        held = "n/a" if result.heldout_loss is None else f"{result.heldout_loss:.4f}"
        typer.echo(
            f"student steps S={result.student_steps}; held-out segment NLL {held} "
            f"nats/revealed token"
        )
        if eval_samples > 0:
            from tsdfm.models.eval.final import final_eval, format_final_eval

            final = final_eval(
                result.final_dir, result.student_steps, eval_samples, out / "eval.json"
            )
            if final is not None:
                typer.echo(format_final_eval(final, out / "eval.json"))

    @app.command("sample")
    @user_errors
    def sample(
        model: Annotated[
            str | None,
            typer.Option(help="Student or teacher checkpoint; default: the bundled teacher."),
        ] = None,
        steps: Annotated[
            int | None,
            typer.Option(help="Sampler steps; default: a student's S, a teacher's 1024."),
        ] = None,
        num_samples: Annotated[int, typer.Option("--num-samples", "-n")] = 8,
        temperature: Annotated[
            float,
            typer.Option(help="T > 0 of every draw, softmax(logits / T); 1 is the model itself."),
        ] = 1.0,
        order: Annotated[
            str | None,
            typer.Option(help=ORDER_HELP),
        ] = None,
        seed: Annotated[int, typer.Option(help="Sample i has seed seed·2^32 + i.")] = 0,
        batch_size: int = 64,
        device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N")] = "cpu",
        precision: Annotated[str, typer.Option(help="fp32 or bf16 (CUDA only)")] = "fp32",
        out: Annotated[
            Path | None, typer.Option(help="Also write the samples as JSON lines here.")
        ] = None,
    ) -> None:
        """Unconditional samples with the step-size-aware sampler, decoded to text."""
        from tsdfm.models.checkpoint import load_checkpoint
        from tsdfm.models.devices import resolve_device
        from tsdfm.models.eval.sampling import default_steps, sample_checkpoint

        device = resolve_device(device)
        ckpt = load_checkpoint(model or default_teacher(), device, role=("teacher", "student"))
        ckpt.model.set_precision(precision)
        own = default_steps(ckpt)
        if ckpt.config.role == "student" and steps is not None and steps != own:
            typer.echo(
                f"note: this student was distilled for S={own} steps; sampling with {steps}",
                err=True,
            )
        res = sample_checkpoint(
            ckpt, num_samples, steps, seed, batch_size, device, temperature, order
        )
        typer.echo(
            f"{ckpt.config.role} {ckpt.identity[:19]}: {num_samples} samples, {res.steps} steps, "
            f"T={res.temperature:g}, {res.order} order, {res.seconds / num_samples:.4f} s/sample"
        )
        for i, row in enumerate(res.tokens):
            text = res.texts[i] if res.texts is not None else " ".join(map(str, row.tolist()))
            typer.echo(f"[{i}] {text}")
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            with out.open("w") as f:
                for i, row in enumerate(res.tokens):
                    record = {
                        "seed": int(res.seeds[i]),
                        "steps": res.steps,
                        "temperature": res.temperature,
                        "order": res.order,
                        "tokens": row.tolist(),
                        "text": None if res.texts is None else res.texts[i],
                    }
                    f.write(json.dumps(record) + "\n")
            typer.echo(f"wrote {out}")
