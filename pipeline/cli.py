"""The ``tsdfm-pipeline`` command line: parse flags, build configs, call the library.

Heavy imports (torch, Ray, datasets) happen inside the commands, so ``--help`` is instant and
``eval`` never imports Ray. Every user error is one line on stderr and exit code 2.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from tsdfm.models.devices import resolve_device
from tsdfm.pipeline.build_cli import register as register_build_commands
from tsdfm.pipeline.cli_style import typer_app
from tsdfm.pipeline.hub_cli import register as register_hub_commands
from tsdfm.pipeline.lm_cli import register as register_lm_commands
from tsdfm.pipeline.train_cli import ORDER_HELP
from tsdfm.pipeline.train_cli import register as register_train_commands

app = typer_app(
    "Trajectory-shaped discrete flow matching: shaped teacher trajectories in, "
    "few-step students out.",
    name="tsdfm-pipeline",
    pretty_exceptions_enable=False,
    add_completion=False,
)
teacher_app = typer_app("Teacher models.")
data_app = typer_app("Data sources (synthetic language, corpora).")
compass_app = typer_app("Energy compass: train by generation-aware NCE, evaluate.")
app.add_typer(teacher_app, name="teacher")
app.add_typer(compass_app, name="compass")
app.add_typer(data_app, name="data")


def _print_version(value: bool) -> None:
    if value:
        from tsdfm.models import __version__

        typer.echo(f"tsdfm-pipeline {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_print_version,
            is_eager=True,
            help="Print the version and exit.",
        ),
    ] = False,
) -> None:
    """Top-level options (the app's help text is the one given to typer_app above)."""


EXIT_USER_ERROR = 2


def fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(EXIT_USER_ERROR)


class Terminated(KeyboardInterrupt):
    """SIGTERM (what Kubernetes and most supervisors send), raised in the main thread.

    A KeyboardInterrupt, so every ``finally`` that runs on Ctrl-C (stop the Ray actors, keep
    the manifest's last atomic write) runs on SIGTERM too.
    """


def _on_sigterm(signum, frame):
    raise Terminated


def user_errors(fn):
    """Turn the library's user errors into one line on stderr and exit code 2.

    Ctrl-C and SIGTERM stop the command cleanly with one line and exit 130 / 143.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import signal
        import threading

        from tsdfm.models.errors import TsdfmError

        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _on_sigterm) if main else None
        try:
            return fn(*args, **kwargs)
        except TsdfmError as e:
            raise fail(str(e)) from None
        except Terminated:
            typer.echo("terminated (SIGTERM); rerun the same command to resume", err=True)
            raise typer.Exit(128 + signal.SIGTERM) from None
        except KeyboardInterrupt:
            typer.echo("interrupted; rerun the same command to resume", err=True)
            raise typer.Exit(130) from None
        finally:
            if main:
                signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)

    return wrapper


def _progress():
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        transient=False,
    )


def _default_teacher() -> str:
    from tsdfm.models.checkpoint import bundled_path

    return str(bundled_path("teacher"))


@app.command("eval")
@user_errors
def eval_cmd(
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "--teacher",
            help="Checkpoint dir or org/name[@rev]; default: the bundled tiny teacher.",
        ),
    ] = None,
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
    order: Annotated[
        str | None,
        typer.Option(help=ORDER_HELP),
    ] = None,
    samples: Annotated[int, typer.Option(help="Samples per arm.")] = 1000,
    batch_size: Annotated[int, typer.Option(help="Samples per batched rollout.")] = 250,
    score_batch_size: Annotated[
        int, typer.Option(help="Sequences per evaluator LM forward pass.")
    ] = 16,
    seed: Annotated[int, typer.Option(help="Seed of the samples.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N")] = "cpu",
    precision: Annotated[str, typer.Option(help="fp32 or bf16 (CUDA only)")] = "fp32",
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the report as JSON here.")
    ] = None,
) -> None:
    """Sample unconditionally; report generative perplexity, entropy, distinct-n, NFE, speed.

    Several --temperature values trace each step count's gen-PPL / entropy frontier; compare
    generators at matched entropy with --match-entropy (docs/evaluation.md).
    """
    from rich.console import Console
    from rich.table import Table

    from tsdfm.models.checkpoint import load_checkpoint
    from tsdfm.models.eval.evaluate import (
        EvalConfig,
        evaluate_checkpoint,
        format_matches,
        format_table,
        reference_windows,
        table_header,
    )
    from tsdfm.models.eval.evaluators import evaluator_for

    cfg = EvalConfig(
        tuple(steps or (1024, 8)),
        samples,
        batch_size,
        seed,
        temperatures=tuple(temperature or (1.0,)),
        match_entropy=tuple(match_entropy or ()),
        order=order,
    )
    device = resolve_device(device)
    ckpt = load_checkpoint(model or _default_teacher(), device, role=("teacher", "student"))
    ckpt.model.set_precision(precision)
    scorer = evaluator_for(evaluator, ckpt, device, score_batch_size)
    real = None if reference is None else reference_windows(reference, ckpt, samples, seed)
    with _progress() as bar:
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
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=2) + "\n")
        typer.echo(f"wrote {json_out}")


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
    source: Annotated[str, typer.Option(help="mask or uniform")] = "mask",
    scheduler: Annotated[str, typer.Option(help="linear or polynomial:N")] = "linear",
    d_model: int = 128,
    n_layers: int = 4,
    n_heads: int = 4,
    loss: Annotated[str, typer.Option(help="ce or gkl")] = "ce",
    steps: int = 3000,
    batch_size: int = 128,
    lr: float = 1.5e-3,
    warmup: int = 200,
    ema: float = 0.999,
    checkpoint_every: int = 250,
    eval_every: int = 250,
    seed: int = 0,
    eval_steps: Annotated[int, typer.Option(help="Steps of the final sampling evaluation.")] = 256,
    eval_samples: Annotated[int, typer.Option(help="Samples of the final evaluation.")] = 256,
) -> None:
    """Pretrain a discrete-flow teacher (resumable: rerun the same command)."""
    from tsdfm.models.data.sources import CorpusSource, SyntheticSource
    from tsdfm.models.train.teacher import TeacherTrainConfig, train_teacher

    data = None
    if corpus is not None:
        data = CorpusSource.from_path(corpus, seq_len, tokenizer_vocab, seed)
    elif language is not None:
        from tsdfm.models.data.synthetic import SyntheticLanguage

        data = SyntheticSource(SyntheticLanguage.load(language))
    cfg = TeacherTrainConfig(
        out=str(out),
        source=source,
        scheduler=scheduler,
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        loss=loss,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        warmup=warmup,
        ema=ema,
        checkpoint_every=checkpoint_every,
        eval_every=eval_every,
        seed=seed,
    )
    with _progress() as bar:
        task = bar.add_task("training teacher", total=steps, info="")

        def report(step: int, total: int, m: dict) -> None:
            info = f"loss {m['loss']:.4f}"
            if "heldout_loss" in m:
                info += f"  held-out {m['heldout_loss']:.4f}"
            bar.update(task, completed=step, info=info)

        result = train_teacher(cfg, data, report)
    typer.echo(f"final checkpoint: {result.final_dir}  ({result.identity})")
    typer.echo(f"held-out loss: {result.heldout_loss:.4f}")
    _final_eval(result.final_dir, eval_steps, eval_samples, out / "eval.json")


def _final_eval(final_dir: Path, steps: int, samples: int, json_path: Path) -> None:
    from tsdfm.models.checkpoint import load_checkpoint
    from tsdfm.models.eval.evaluate import EvalConfig, evaluate_checkpoint

    ckpt = load_checkpoint(final_dir)
    if ckpt.config.data.get("kind") != "synthetic":
        return
    report = evaluate_checkpoint(ckpt, EvalConfig((steps,), samples, min(samples, 256), 0))
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    arm = report["arms"][0]
    typer.echo(
        f"final eval ({samples} samples, {steps} steps): gen-PPL {arm['gen_ppl']:.3f} "
        f"(true {report['true_perplexity']:.3f}), entropy {arm['entropy_mean']:.3f} "
        f"(real {report['real_data']['entropy_mean']:.3f}) -> {json_path}"
    )


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
        typer.Option(help="A text teacher's training text (.txt file or folder)."),
    ] = None,
    d_model: int = 64,
    n_layers: int = 2,
    n_heads: int = 2,
    steps: int = 2000,
    batch_size: Annotated[int, typer.Option(help="Positives (= negatives) per step.")] = 64,
    lr: float = 1e-3,
    warmup: int = 200,
    ema: Annotated[float, typer.Option(help="EMA decay; 0 switches EMA off.")] = 0.999,
    teacher_steps: Annotated[int, typer.Option(help="N of the teacher sampler.")] = 1024,
    negative_temperature: Annotated[
        float, typer.Option(help="Temperature T >= 1 of the teacher's draws for negatives.")
    ] = 2.0,
    reveal_order: Annotated[
        str,
        typer.Option(
            help="random (the path's rule) or dilated: train on the reveal patterns of a "
            "dataset built with --reveal-order dilated."
        ),
    ] = "random",
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
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N")] = "cpu",
) -> None:
    """Train an energy compass on the teacher's own states (resumable: rerun the command)."""
    from tsdfm.models.checkpoint import load_checkpoint
    from tsdfm.models.data.sources import default_data_source
    from tsdfm.models.train.compass import CompassTrainConfig, train_compass

    cfg = CompassTrainConfig(
        out=str(out),
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        warmup=warmup,
        ema=ema,
        teacher_steps=teacher_steps,
        negative_temperature=negative_temperature,
        reveal_order=reveal_order,
        student_steps=student_steps,
        bank_trajectories=bank_trajectories,
        records_per_trajectory=records_per_trajectory,
        refresh_every=refresh_every,
        heldout_trajectories=heldout_trajectories,
        checkpoint_every=checkpoint_every,
        eval_every=eval_every,
        seed=seed,
    )
    device = resolve_device(device)
    with _progress() as bar:
        task = bar.add_task("training compass", total=steps, info="")

        def report(step: int, total: int, m: dict) -> None:
            info = f"loss {m['loss']:.4f}  acc {m['accuracy']:.3f}"
            if "heldout_auc" in m:
                info += f"  held-out AUC {m['heldout_auc']:.3f}"
            bar.update(task, completed=step, info=info)

        ckpt = load_checkpoint(teacher or _default_teacher(), device, role="teacher")
        data = default_data_source(ckpt, corpus)
        result = train_compass(cfg, ckpt, data, report, device=device)
    typer.echo(f"final checkpoint: {result.final_dir}  ({result.identity})")
    typer.echo(
        f"held-out ROC AUC (real vs teacher states): {result.heldout_auc:.4f}  "
        f"(NCE loss {result.heldout_loss:.4f}; chance: AUC 0.5, loss ln 2 = 0.6931)"
    )


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
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N")] = "cpu",
    allow_teacher_mismatch: Annotated[
        bool,
        typer.Option(help="Warn instead of refusing a compass trained on another teacher."),
    ] = False,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the report as JSON here.")
    ] = None,
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
    teacher_ckpt = load_checkpoint(teacher or _default_teacher(), device, "teacher")
    with _progress() as bar:
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
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=2) + "\n")
        typer.echo(f"wrote {json_out}")


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


register_build_commands(app, user_errors, _progress, _default_teacher)
register_hub_commands(app, user_errors)  # publish, verify
register_train_commands(app, user_errors, _progress, _default_teacher)  # distill, sample
register_lm_commands(app, user_errors, _progress, resolve_device)  # lm train


def main() -> None:
    try:
        app()
    except BrokenPipeError:  # `tsdfm-pipeline ... | head`
        sys.exit(0)


if __name__ == "__main__":
    main()
