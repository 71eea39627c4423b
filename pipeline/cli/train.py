"""``tsdfm-pipeline eval`` (and, in ``tsdfm.pipeline.train_cli``, ``distill`` and ``sample``):
use a student. None imports Ray or needs a GPU. Heavy imports happen inside the commands."""

from __future__ import annotations

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
    user_errors,
    value,
    write_json,
)
from tsdfm.pipeline.train_cli import ORDER_HELP


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
    json_out: JsonOption = None,
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
        order=value(order),
    )
    model = pick(model, model_alias, "--model", "--teacher")
    device = resolve_device(device)
    ckpt = load_checkpoint(model or default_teacher(), device, role=("teacher", "student"))
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
