"""``tsdfm-pipeline teacher train``, ``compass train`` / ``compass eval`` and ``data synthetic``:
make the models and data the pipeline uses. No Ray; heavy imports inside the commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tsdfm.models.devices import resolve_device
from tsdfm.pipeline.cli.common import (
    DeviceOption,
    Head,
    JsonOption,
    Loss,
    Order,
    Source,
    compass_app,
    data_app,
    default_teacher,
    progress,
    teacher_app,
    training_bar,
    user_errors,
    value,
    write_json,
)
from tsdfm.pipeline.cli.teacher import TeacherFormatOption, TrustOption
from tsdfm.pipeline.cli.train import ReportToOption


@teacher_app.command("train")
@user_errors
def teacher_train(
    out: Annotated[Path, typer.Option(help="Run directory; rerun to resume.")],
    corpus: Annotated[
        Path | None,
        typer.Option(help="Text file or folder of .txt files; default: the synthetic language."),
    ] = None,
    language: Annotated[
        Path | None, typer.Option(help="Synthetic language JSON (from `data synthetic`).")
    ] = None,
    seq_len: Annotated[int, typer.Option(help="Sequence length (corpus only).")] = 128,
    tokenizer_vocab: Annotated[int, typer.Option(help="BPE vocabulary (corpus only).")] = 2048,
    source: Annotated[Source, typer.Option(help="mask or uniform")] = Source.mask,
    scheduler: Annotated[str, typer.Option(help="linear or polynomial:N")] = "linear",
    d_model: int = 128,
    n_layers: int = 4,
    n_heads: int = 4,
    loss: Annotated[Loss, typer.Option(help="ce or gkl")] = Loss.ce,
    steps: Annotated[int, typer.Option("--train-steps", help="Optimizer steps.")] = 3000,
    steps_alias: Annotated[int | None, typer.Option("--steps", hidden=True)] = None,
    batch_size: int = 128,
    lr: float = 1.5e-3,
    warmup: int = 200,
    ema: float = 0.999,
    checkpoint_every: int = 250,
    eval_every: int = 250,
    seed: int = 0,
    eval_steps: Annotated[int, typer.Option(help="Steps of the final sampling evaluation.")] = 256,
    eval_samples: Annotated[int, typer.Option(help="Samples of the final evaluation.")] = 256,
    report_to: ReportToOption = "none",
    json_out: JsonOption = None,
) -> None:
    """Pretrain a discrete-flow teacher (resumable: rerun the same command)."""
    from tsdfm.models.data.sources import CorpusSource, SyntheticSource
    from tsdfm.models.eval.final import final_eval, format_final_eval
    from tsdfm.models.train.teacher import TeacherTrainConfig, train_teacher

    steps = steps if steps_alias is None else steps_alias  # --steps: the older name
    data = None
    if corpus is not None:
        data = CorpusSource.from_path(corpus, seq_len, tokenizer_vocab, seed)
    elif language is not None:
        from tsdfm.models.data.synthetic import SyntheticLanguage

        data = SyntheticSource(SyntheticLanguage.load(language))
    cfg = TeacherTrainConfig(
        out=str(out),
        source=value(source),
        scheduler=scheduler,
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        loss=value(loss),
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        warmup=warmup,
        ema=ema,
        checkpoint_every=checkpoint_every,
        eval_every=eval_every,
        seed=seed,
        report_to=report_to,
    )
    fields = ("loss", "loss {:.4f}"), ("heldout_loss", "held-out {:.4f}")
    with training_bar("training teacher", steps, *fields) as bar:
        result = train_teacher(cfg, data, bar.report)
    typer.echo(f"final checkpoint: {result.final_dir}  ({result.identity})")
    typer.echo(f"held-out loss: {result.heldout_loss:.4f}")
    final = final_eval(result.final_dir, eval_steps, eval_samples, out / "eval.json")
    if final is not None:
        typer.echo(format_final_eval(final, out / "eval.json"))
    write_json(json_out, {"result": result, "final_eval": final})


@compass_app.command("train")
@user_errors
def compass_train(
    out: Annotated[Path, typer.Option(help="Run directory; rerun to resume.")],
    teacher: Annotated[
        str | None,
        typer.Option(help="Teacher checkpoint dir or org/name[@rev]; default: the bundled one."),
    ] = None,
    corpus: Annotated[
        Path | None,
        typer.Option(
            help="A text teacher's training text (.txt file or folder); for a teacher of "
            "another family, text in its language, cut with its own tokenizer."
        ),
    ] = None,
    teacher_format: TeacherFormatOption = None,
    trust_remote_code: TrustOption = False,
    head: Annotated[
        Head,
        typer.Option(
            help="scalar: one pooled energy per state (sequence-level NCE); tokens: per-token "
            "log-ratios of the shared predecessor (the token-ratio compass; at the teacher's size "
            "it starts from its weights, otherwise from scratch; needs --reveal-order dilated)."
        ),
    ] = Head.scalar,
    d_model: Annotated[
        int | None, typer.Option(help="Default: 64; the teacher's for tokens.")
    ] = None,
    n_layers: Annotated[
        int | None, typer.Option(help="Default: 2; the teacher's for tokens.")
    ] = None,
    n_heads: Annotated[
        int | None, typer.Option(help="Default: 2; the teacher's for tokens.")
    ] = None,
    steps: Annotated[int, typer.Option("--train-steps", help="Optimizer steps.")] = 2000,
    steps_alias: Annotated[int | None, typer.Option("--steps", hidden=True)] = None,
    batch_size: Annotated[int, typer.Option(help="Positives (= negatives) per step.")] = 64,
    lr: float = 1e-3,
    warmup: int = 200,
    ema: Annotated[float, typer.Option(help="EMA decay; 0 switches EMA off.")] = 0.999,
    teacher_steps: Annotated[int, typer.Option(help="N of the teacher sampler.")] = 1024,
    negative_temperature: Annotated[
        float | None,
        typer.Option(
            help="Temperature T >= 1 of the teacher's draws for negatives; default 2 (scalar), "
            "1 (tokens: the ratio to the teacher itself)."
        ),
    ] = None,
    reveal_order: Annotated[
        Order,
        typer.Option(
            help="random (the path's rule) or dilated: train on the reveal patterns of a "
            "dataset built with --reveal-order dilated."
        ),
    ] = Order.random,
    student_steps: Annotated[
        int,
        typer.Option(
            help="S, segments of the dilated order (the dataset's --student-steps); "
            "--teacher-steps must be a multiple of it."
        ),
    ] = 8,
    bank_trajectories: Annotated[
        int, typer.Option(help="Fresh teacher trajectories per negative bank.")
    ] = 256,
    records_per_trajectory: Annotated[
        int, typer.Option(help="States recorded per trajectory.")
    ] = 16,
    refresh_every: Annotated[int, typer.Option(help="Steps between bank rebuilds.")] = 64,
    heldout_trajectories: Annotated[
        int, typer.Option(help="Trajectories of the held-out set.")
    ] = 128,
    checkpoint_every: int = 250,
    eval_every: int = 250,
    seed: int = 0,
    device: DeviceOption = "auto",
    report_to: ReportToOption = "none",
    json_out: JsonOption = None,
) -> None:
    """Train an energy compass on the teacher's own states (resumable: rerun the command)."""
    from tsdfm.models.data.sources import default_data_source
    from tsdfm.models.errors import ConfigError
    from tsdfm.models.teachers import open_teacher
    from tsdfm.models.train.compass import CompassTrainConfig, train_compass

    steps = steps if steps_alias is None else steps_alias  # --steps: the older name
    device = resolve_device(device)
    ckpt = open_teacher(
        teacher or default_teacher(),
        device,
        role="teacher",
        teacher_format=value(teacher_format),
        trust_remote_code=trust_remote_code,
    )
    tokens = value(head) == "tokens"
    if tokens and ckpt.config.data.get("kind") == "external":
        raise ConfigError(
            f"the token-ratio compass starts from the teacher's own network, which teacher "
            f"{ckpt.spec} ({ckpt.config.data.get('family')}) is not in this project's format; "
            "use --head scalar"
        )
    size = ckpt.config.backbone if tokens else None
    cfg = CompassTrainConfig(
        out=str(out),
        head=value(head),
        d_model=d_model if d_model is not None else (size.d_model if tokens else 64),
        n_layers=n_layers if n_layers is not None else (size.n_layers if tokens else 2),
        n_heads=n_heads if n_heads is not None else (size.n_heads if tokens else 2),
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        warmup=warmup,
        ema=ema,
        teacher_steps=teacher_steps,
        negative_temperature=(
            negative_temperature if negative_temperature is not None else (1.0 if tokens else 2.0)
        ),
        reveal_order=value(reveal_order),
        student_steps=student_steps,
        bank_trajectories=bank_trajectories,
        records_per_trajectory=records_per_trajectory,
        refresh_every=refresh_every,
        heldout_trajectories=heldout_trajectories,
        checkpoint_every=checkpoint_every,
        eval_every=eval_every,
        seed=seed,
        report_to=report_to,
    )
    fields = (
        ("loss", "loss {:.4f}"),
        ("accuracy", "acc {:.3f}"),
        ("heldout_auc", "held-out AUC {:.3f}"),
    )
    data = default_data_source(ckpt, corpus)  # a missing corpus fails before the bar starts
    with training_bar("training compass", steps, *fields) as bar:
        result = train_compass(cfg, ckpt, data, bar.report, device=device)
    typer.echo(f"final checkpoint: {result.final_dir}  ({result.identity})")
    if tokens:
        typer.echo(
            f"held-out ROC AUC (real vs teacher tokens): {result.heldout_auc:.4f}  "
            f"(loss {result.heldout_loss:.4f}; chance: AUC 0.5)"
        )
    else:
        typer.echo(
            f"held-out ROC AUC (real vs teacher states): {result.heldout_auc:.4f}  "
            f"(NCE loss {result.heldout_loss:.4f}; chance: AUC 0.5, loss ln 2 = 0.6931)"
        )
    write_json(json_out, result)


@compass_app.command("eval")
@user_errors
def compass_eval(
    compass: Annotated[
        str | None,
        typer.Option(help="Compass checkpoint dir or org/name[@rev]; default: the bundled one."),
    ] = None,
    teacher: Annotated[
        str | None,
        typer.Option(help="Teacher checkpoint dir or org/name[@rev]; default: the bundled one."),
    ] = None,
    samples: Annotated[int, typer.Option(help="Trajectories per seed.")] = 512,
    seeds: Annotated[int, typer.Option(help="Number of seeds.")] = 3,
    candidates: Annotated[int, typer.Option(help="K candidates per selection.")] = 8,
    teacher_steps: Annotated[int, typer.Option(help="N of the teacher sampler.")] = 1024,
    student_steps: Annotated[int, typer.Option(help="S of the selection grid.")] = 8,
    midpoint: Annotated[
        list[int] | None,
        typer.Option("--midpoint", help="Segment k (t_k = k/S) to select at (repeatable)."),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Trajectories per batched rollout.")] = 256,
    seed: Annotated[int, typer.Option(help="First seed.")] = 0,
    device: DeviceOption = "auto",
    allow_teacher_mismatch: Annotated[
        bool,
        typer.Option(help="Warn instead of refusing a compass trained on another teacher."),
    ] = False,
    json_out: JsonOption = None,
) -> None:
    """Measure a compass: AUC real vs teacher states, ρ with the exact NLL, selection gain."""
    import warnings

    from rich.console import Console
    from rich.table import Table

    from tsdfm.models.checkpoint import bundled_path, load_checkpoint
    from tsdfm.models.eval.compass_metrics import (
        TABLE_HEADERS,
        CompassEvalConfig,
        evaluate_compass,
        format_tables,
    )

    cfg = CompassEvalConfig(
        samples=samples,
        seeds=seeds,
        teacher_steps=teacher_steps,
        student_steps=student_steps,
        candidates=candidates,
        midpoints=tuple(midpoint or (2, 4, 6)),
        batch_size=batch_size,
        seed=seed,
    )
    device = resolve_device(device)
    compass_ckpt = load_checkpoint(compass or str(bundled_path("compass")), device, "compass")
    teacher_ckpt = load_checkpoint(teacher or default_teacher(), device, "teacher")
    with progress() as bar:
        task = bar.add_task("evaluating compass", total=2 * seeds, info="")

        def report(label: str, done: int, total: int) -> None:
            bar.update(task, completed=done, info=label)

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = evaluate_compass(
                compass_ckpt, teacher_ckpt, cfg, device, report, allow_teacher_mismatch
            )
    for w in caught:
        typer.echo(f"warning: {w.message}", err=True)
    console = Console()
    titles = {
        "separation": f"compass {compass_ckpt.identity[:19]} vs teacher "
        f"{teacher_ckpt.identity[:19]}: real-noised vs teacher states",
        "spearman": "energy at t = 1 vs exact NLL",
        "selection": f"best-of-{candidates} at a midpoint, then blind (S={student_steps}, "
        f"N={teacher_steps}; mean ± sd over {seeds} seeds)",
    }
    for name, rows in format_tables(result).items():
        table = Table(title=titles[name])
        for col in TABLE_HEADERS[name]:
            table.add_column(col)
        for row in rows:
            table.add_row(*row)
        console.print(table)
    write_json(json_out, result)


@data_app.command("synthetic")
@user_errors
def data_synthetic(
    out: Annotated[Path, typer.Option(help="Where to write the language JSON.")],
    vocab_size: int = 128,
    num_states: int = 32,
    branching: int = 6,
    concentration: float = 0.7,
    smoothing: float = 0.01,
    seq_len: int = 64,
    seed: int = 0,
    json_out: JsonOption = None,
) -> None:
    """Generate an exact-likelihood synthetic language and save its parameters as JSON."""
    from tsdfm.models.data.synthetic import LanguageConfig, SyntheticLanguage

    lang = SyntheticLanguage.generate(
        LanguageConfig(vocab_size, num_states, branching, concentration, smoothing, seq_len, seed)
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    lang.save(out)
    typer.echo(
        f"wrote {out}: V={lang.vocab_size}, Q={lang.num_states}, L={lang.seq_len}, "
        f"entropy {lang.entropy_per_token():.4f} nats/token, true PPL {lang.perplexity():.3f}"
    )
    write_json(
        json_out,
        {
            "path": out,
            "vocab_size": lang.vocab_size,
            "num_states": lang.num_states,
            "seq_len": lang.seq_len,
            "entropy_per_token": lang.entropy_per_token(),
            "perplexity": lang.perplexity(),
        },
    )
