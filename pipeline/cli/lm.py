"""``tsdfm-pipeline lm train``: a causal LM trained on the text corpus, used as an evaluator.

No Ray; heavy imports inside the command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tsdfm.models.devices import resolve_device
from tsdfm.pipeline.cli.common import (
    DeviceOption,
    JsonOption,
    lm_app,
    training_bar,
    user_errors,
    write_json,
)
from tsdfm.pipeline.cli.train import ReportToOption


@lm_app.command("train")
@user_errors
def lm_train(
    corpus: Annotated[Path, typer.Option(help="Text file or folder of .txt files.")],
    tokenizer: Annotated[
        str,
        typer.Option(
            help="A text teacher's checkpoint folder, or a tokenizer.json of this project."
        ),
    ],
    out: Annotated[Path, typer.Option(help="Run directory; rerun to resume.")],
    seq_len: Annotated[int, typer.Option(help="Tokens per training window.")] = 128,
    d_model: int = 128,
    n_layers: int = 4,
    n_heads: int = 4,
    steps: Annotated[int, typer.Option("--train-steps", help="Optimizer steps.")] = 3000,
    steps_alias: Annotated[int | None, typer.Option("--steps", hidden=True)] = None,
    batch_size: int = 32,
    lr: float = 1e-3,
    warmup: int = 100,
    weight_decay: float = 0.1,
    holdout_fraction: Annotated[float, typer.Option(help="Share of windows held out.")] = 0.05,
    checkpoint_every: int = 250,
    eval_every: int = 250,
    seed: int = 0,
    device: DeviceOption = "auto",
    report_to: ReportToOption = "none",
    json_out: JsonOption = None,
) -> None:
    """Train a small causal LM (Llama architecture) on real text (resumable: rerun).

    OUT/final is a transformers directory (safetensors + tokenizer + tsdfm_lm.json) for
    `tsdfm-pipeline eval --evaluator lm:OUT/final`.
    """
    from tsdfm.models.extras import require
    from tsdfm.models.train.lm import LMTrainConfig, train_lm

    require("transformers", "text", "lm train")  # before anything is shown or written

    steps = steps if steps_alias is None else steps_alias  # --steps: the older name
    cfg = LMTrainConfig(
        out=str(out),
        corpus=str(corpus),
        tokenizer=tokenizer,
        seq_len=seq_len,
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        warmup=warmup,
        weight_decay=weight_decay,
        holdout_fraction=holdout_fraction,
        checkpoint_every=checkpoint_every,
        eval_every=eval_every,
        seed=seed,
        report_to=report_to,
    )
    device = resolve_device(device)
    fields = ("loss", "loss {:.4f}"), ("heldout_nll", "held-out {:.4f}")
    with training_bar("training causal LM", steps, *fields) as bar:
        result = train_lm(cfg, bar.report, device)
    typer.echo(f"final LM: {result.final_dir}")
    typer.echo(
        f"held-out NLL {result.heldout_nll:.4f} nats/token (perplexity "
        f"{result.heldout_ppl:.2f}); evaluate with --evaluator lm:{result.final_dir}"
    )
    write_json(json_out, result)
