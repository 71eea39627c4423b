"""``tsdfm-pipeline distill``, ``sample`` and ``eval``: make and use a student.

None imports Ray, and none needs a GPU: other teams run them with a dataset id and a checkpoint
only. Heavy imports happen inside the commands.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from tsdfm.models.devices import resolve_device
from tsdfm.pipeline.cli.common import (
    DeviceOption,
    JsonOption,
    Order,
    Precision,
    PrecisionOption,
    app,
    default_teacher,
    pick,
    progress,
    training_bar,
    user_errors,
    value,
    write_json,
)

ReportToOption = Annotated[
    str,
    typer.Option(
        "--report-to",
        help="Trackers that also get the metrics: none, or a comma list of tensorboard, wandb, "
        "trackio (each an optional install); metrics.jsonl is always written.",
    ),
]

TrustOption = Annotated[
    bool,
    typer.Option(
        help="Allow a remote-code teacher (MDLM, Duo) or its student to run the model code in "
        "its folder (read it first); a student's copy of the code is checked against the "
        "sha256 its config.json records."
    ),
]

ORDER_HELP = (
    "Reveal order: random or dilated (default: the checkpoint's own; a student samples in its "
    "dataset's order)."
)


@app.command("distill")
@user_errors
def distill(
    data: Annotated[
        str,
        typer.Option(
            help="Trajectory dataset: a folder, a Hub id org/name[@revision] (or "
            "hf://datasets/org/name@revision), or a folder at any fsspec URL (file://, s3://, "
            "gs://, ...: copied into the local cache, every shard checked against the manifest)."
        ),
    ],
    out: Annotated[
        str,
        typer.Option(
            help="Run folder, local or an fsspec URL (s3://..., gs://...: written through a "
            "local staging copy, each checkpoint uploaded when complete); rerun the command "
            "to resume."
        ),
    ],
    teacher: Annotated[
        str | None,
        typer.Option(
            help="Teacher checkpoint the student starts from (or a student to continue): a "
            "folder or org/name[@rev]. Required."
        ),
    ] = None,
    teacher_alias: Annotated[str | None, typer.Option("--init", hidden=True)] = None,
    steps: Annotated[int, typer.Option("--train-steps", help="Optimizer steps.")] = 2000,
    steps_alias: Annotated[int | None, typer.Option("--steps", hidden=True)] = None,
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
    precision: Annotated[
        Precision, typer.Option(help="bf16 (autocast on CUDA) or fp32")
    ] = Precision.bf16,
    device: DeviceOption = "auto",
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
    resume_from: Annotated[
        str | None,
        typer.Option(
            help="A distill run folder (or URL) to continue in --out with more --train-steps "
            "(the new total): its newest checkpoint's weights, optimizer moments, EMA and data "
            "position are the start; the learning-rate schedule is recomputed over the new "
            "total. Same dataset, teacher and flags otherwise."
        ),
    ] = None,
    report_to: ReportToOption = "none",
    fsdp: Annotated[
        bool,
        typer.Option(
            help="Under torchrun: shard the student's weights, gradients, optimizer state and "
            "EMA over the processes (FSDP) instead of replicating it (DDP), for a student that "
            "does not fit one GPU. Checkpoints are written in full, as any run's."
        ),
    ] = False,
    compile: Annotated[
        bool,
        typer.Option(
            help="torch.compile the student's training forward (fp32 master weights; not "
            "part of the student's identity; on CPU needs a C compiler)."
        ),
    ] = False,
    trust_remote_code: TrustOption = False,
    json_out: JsonOption = None,
) -> None:
    """Distil a few-step student from a trajectory dataset (resumable; no Ray, no GPU needed).

    The student is the teacher's backbone with step-size conditioning, initialised from the
    teacher; its step count S is the dataset's time grid. The loss is the NLL of each
    recorded segment under the student's own jump rule (docs/distill.md).
    """
    from tsdfm.models.errors import ConfigError
    from tsdfm.models.train.distill import DistillConfig, prepare_run, train_student
    from tsdfm.models.train.distributed import world_from_env

    teacher = pick(teacher, teacher_alias, "--teacher", "--init")
    if teacher is None:
        raise ConfigError("distill needs the teacher the student starts from: --teacher CKPT")
    steps = steps if steps_alias is None else steps_alias  # --steps: the older name
    cfg = DistillConfig(
        data=data,
        init=teacher,
        out=out,
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
        precision=value(precision),
        device=device,
        num_workers=num_workers,
        verify=verify,
        report_to=report_to,
        resume_from=resume_from,
        fsdp=fsdp,
        compile=compile,
        trust_remote_code=trust_remote_code,
    )

    # under torchrun every process runs this command; rank 0 alone prints, evaluates and
    # writes --json (the others train, then exit once rank 0 has the final checkpoint)
    main = world_from_env().main

    def echo(msg: str, err: bool = False) -> None:
        if main:
            typer.echo(msg, err=err)

    def warn(msg: str) -> None:
        echo(f"warning: {msg}", err=True)

    run = prepare_run(cfg, warn)
    echo(
        f"dataset {run.source.ref}: {len(run.source.files)} shard(s), S={run.source.num_steps}"
        f", L={run.source.seq_len}, fingerprint {str(run.source.fingerprint)[:23]}…; "
        f"sha256 {run.source.verification()['sha256']}"
    )
    fields = (
        ("loss", "loss {:.4f}"),
        ("examples_per_second", "{:.0f} ex/s"),
        ("heldout_loss", "held-out {:.4f}"),
    )
    if not main:
        train_student(run, None, warn)
        return
    with training_bar("distilling", steps, *fields) as bar:
        result = train_student(run, bar.report, bar.warn)
    typer.echo(f"final checkpoint: {result.location or result.final_dir}  ({result.identity})")
    held = "n/a" if result.heldout_loss is None else f"{result.heldout_loss:.4f}"
    typer.echo(
        f"student steps S={result.student_steps}; held-out segment NLL {held} nats/revealed token"
    )
    final = None
    if eval_samples > 0:
        from tsdfm.models.eval.final import final_eval, format_final_eval
        from tsdfm.models.train.common import RunStore

        store = RunStore(out)
        report = store.local / "eval.json"
        final = final_eval(result.final_dir, result.student_steps, eval_samples, report)
        if final is not None:
            store.push("eval.json")
            typer.echo(format_final_eval(final, store.where("eval.json")))
    write_json(json_out, {"result": result, "final_eval": final})


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
    order: Annotated[Order | None, typer.Option(help=ORDER_HELP)] = None,
    seed: Annotated[int, typer.Option(help="Sample i has seed seed·2^32 + i.")] = 0,
    batch_size: int = 64,
    device: DeviceOption = "auto",
    precision: PrecisionOption = Precision.fp32,
    trust_remote_code: TrustOption = False,
    out: Annotated[
        Path | None, typer.Option(help="Also write the samples as JSON lines here.")
    ] = None,
    json_out: JsonOption = None,
) -> None:
    """Unconditional samples with the step-size-aware sampler, decoded to text."""
    from tsdfm.models.devices import resolve_device
    from tsdfm.models.eval.sampling import default_steps, open_model, sample_checkpoint

    device = resolve_device(device)
    ckpt = open_model(model or default_teacher(), device, trust_remote_code)
    if hasattr(ckpt.model, "set_precision"):  # an adapter's network keeps its own precision
        ckpt.model.set_precision(value(precision))
    own = default_steps(ckpt)
    if ckpt.config.role == "student" and steps is not None and steps != own:
        typer.echo(
            f"note: this student was distilled for S={own} steps; sampling with {steps}",
            err=True,
        )
    res = sample_checkpoint(
        ckpt, num_samples, steps, seed, batch_size, device, temperature, value(order)
    )
    typer.echo(
        f"{ckpt.config.role} {ckpt.identity[:19]}: {num_samples} samples, {res.steps} steps, "
        f"T={res.temperature:g}, {res.order} order, {res.seconds / num_samples:.4f} s/sample"
    )
    for i, row in enumerate(res.tokens):
        text = res.texts[i] if res.texts is not None else " ".join(map(str, row.tolist()))
        typer.echo(f"[{i}] {text}")
    records = [
        {
            "seed": int(res.seeds[i]),
            "steps": res.steps,
            "temperature": res.temperature,
            "order": res.order,
            "tokens": row.tolist(),
            "text": None if res.texts is None else res.texts[i],
        }
        for i, row in enumerate(res.tokens)
    ]
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(json.dumps(record) + "\n" for record in records))
        typer.echo(f"wrote {out}")
    write_json(
        json_out,
        {
            "model": ckpt.identity,
            "role": ckpt.config.role,
            "steps": res.steps,
            "temperature": res.temperature,
            "order": res.order,
            "seconds_per_sample": res.seconds / num_samples,
            "samples": records,
        },
    )


@app.command("eval")
@user_errors
def eval_cmd(
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            help="Checkpoint dir or org/name[@rev]; default: the bundled tiny teacher.",
        ),
    ] = None,
    model_alias: Annotated[str | None, typer.Option("--teacher", hidden=True)] = None,
    evaluator: Annotated[
        str | None,
        typer.Option(
            help="exact (default for synthetic-language checkpoints), lm:DIR (an LM from "
            "`lm train`), hf:DIR[::FILE.gguf] (any local transformers causal LM), "
            "smollm2[:CACHE_DIR|:nocache]. Text checkpoints need one of the LMs.",
        ),
    ] = None,
    reference: Annotated[
        Path | None,
        typer.Option(help="Held-out text (.txt file or folder) for the real-data row (text only)."),
    ] = None,
    steps: Annotated[
        list[int] | None, typer.Option("--steps", help="Step counts (repeatable).")
    ] = None,
    temperature: Annotated[
        list[float] | None,
        typer.Option(
            "--temperature",
            help="Sampler temperature T > 0, logits / T (repeatable; each T at each step count "
            "is an arm); default 1.0, the model itself.",
        ),
    ] = None,
    match_entropy: Annotated[
        list[float] | None,
        typer.Option(
            "--match-entropy",
            help="Report the gen-PPL interpolated on each step count's temperature frontier at "
            "this unigram entropy (nats; repeatable).",
        ),
    ] = None,
    order: Annotated[Order | None, typer.Option(help=ORDER_HELP)] = None,
    samples: Annotated[int, typer.Option(help="Samples per arm.")] = 1000,
    batch_size: Annotated[int, typer.Option(help="Samples per batched rollout.")] = 250,
    score_batch_size: Annotated[
        int, typer.Option(help="Sequences per evaluator LM forward pass.")
    ] = 16,
    seed: Annotated[int, typer.Option(help="Seed of the samples.")] = 0,
    device: DeviceOption = "auto",
    precision: PrecisionOption = Precision.fp32,
    trust_remote_code: TrustOption = False,
    json_out: JsonOption = None,
) -> None:
    """Sample unconditionally; report generative perplexity, entropy, distinct-n, NFE, speed.

    Several --temperature values trace each step count's gen-PPL / entropy frontier; compare
    generators at matched entropy with --match-entropy (docs/evaluation.md).
    """
    from rich.console import Console
    from rich.table import Table

    from tsdfm.models.eval.evaluate import (
        EvalConfig,
        evaluate_checkpoint,
        format_matches,
        format_table,
        reference_windows,
        table_header,
    )
    from tsdfm.models.eval.evaluators import evaluator_for
    from tsdfm.models.eval.sampling import open_model

    cfg = EvalConfig(
        tuple(steps or (1024, 8)),
        samples,
        batch_size,
        seed,
        temperatures=tuple(temperature or (1.0,)),
        match_entropy=tuple(match_entropy or ()),
        order=value(order),
    )
    model = pick(model, model_alias, "--model", "--teacher")
    device = resolve_device(device)
    ckpt = open_model(model or default_teacher(), device, trust_remote_code)
    if hasattr(ckpt.model, "set_precision"):  # an adapter's network keeps its own precision
        ckpt.model.set_precision(value(precision))
    scorer = evaluator_for(evaluator, ckpt, device, score_batch_size)
    real = None if reference is None else reference_windows(reference, ckpt, samples, seed)
    with progress() as bar:
        tasks: dict[str, int] = {}

        def report(label: str, done: int, total: int) -> None:
            if label not in tasks:
                tasks[label] = bar.add_task(f"sampling {label}", total=total, info="")
            bar.update(tasks[label], completed=done)

        result = evaluate_checkpoint(ckpt, cfg, device, report, scorer, real)
    info = result["evaluator_info"]
    if result["true_perplexity"] is not None:
        judge = f"exact likelihood (true PPL {result['true_perplexity']:.3f})"
    else:
        judge = f"{info['name']} {info['identity'][:19]}, PPL over {info['tokens']} tokens"
    table = Table(title=f"{ckpt.config.role} {ckpt.identity[:19]} — evaluator: {judge}")
    for col in table_header(result):
        table.add_column(col)
    for row in format_table(result):
        table.add_row(*row)
    Console().print(table)
    for line in format_matches(result):
        typer.echo(line)
    write_json(json_out, result)
