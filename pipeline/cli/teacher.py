"""``tsdfm-pipeline teacher check`` and ``teacher import``: bring a teacher of another family.

``teacher check`` loads a teacher through its adapter (``tsdfm.models.teachers``) and checks
it; ``teacher import`` converts a pickled state dict into a checkpoint directory the build
loads (``tsdfm.models.teachers.convert``). ``teacher train`` lives in ``models``.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated

import typer

from tsdfm.pipeline.cli.common import (
    DeviceOption,
    JsonOption,
    teacher_app,
    user_errors,
    value,
    write_json,
)


class TeacherFormat(str, enum.Enum):
    tsdfm = "tsdfm"
    masked_lm = "masked-lm"
    mdlm = "mdlm"
    duo = "duo"


class Layout(str, enum.Enum):
    tsdfm = "tsdfm"
    fsdfm = "fsdfm"
    sedd = "sedd"


TeacherFormatOption = Annotated[
    TeacherFormat | None,
    typer.Option(help="The teacher's family; default: detected from its config.json."),
]
TrustOption = Annotated[
    bool,
    typer.Option(
        help="Allow a remote-code teacher (MDLM, Duo) to run the model code in its folder "
        "(read it first). The dataset records it and the code's hash."
    ),
]


@teacher_app.command("check")
@user_errors
def check(
    ckpt: Annotated[str, typer.Argument(help="Teacher: a folder or org/name[@rev].")],
    teacher_format: TeacherFormatOption = None,
    trust_remote_code: TrustOption = False,
    samples: Annotated[int, typer.Option(help="Samples drawn in the float64 preflight.")] = 4,
    steps: Annotated[
        int | None, typer.Option(help="Teacher steps of the preflight; default: seq_len.")
    ] = None,
    evaluator: Annotated[
        str | None,
        typer.Option(help="gen-PPL of the preflight samples under lm:DIR, hf:DIR or smollm2."),
    ] = None,
    device: DeviceOption = "cpu",
    json_out: JsonOption = None,
) -> None:
    """Load a teacher through its adapter; show what was detected; check one denoising step,
    a float64 preflight, and that a K=1 build equals the teacher sampler."""
    from tsdfm.models.devices import resolve_device
    from tsdfm.models.errors import ConfigError
    from tsdfm.models.teachers import open_teacher
    from tsdfm.models.teachers.check import check_teacher

    if samples < 1:
        raise ConfigError(f"--samples {samples} must be at least 1")
    dev = resolve_device(device)
    teacher = open_teacher(ckpt, dev, "teacher", value(teacher_format), trust_remote_code)
    ev = None
    if evaluator is not None:
        from tsdfm.models.eval.evaluators import load_evaluator

        ev = load_evaluator(evaluator, dev)
    report = check_teacher(teacher, samples, steps, ev)
    typer.echo(format_check(report))
    write_json(json_out, report)


def format_check(report: dict) -> str:
    d, s, p, k = report["detected"], report["step"], report["preflight"], report["k1"]
    mask = (
        f"model id {d['mask_id']} → solver id {d['solver_mask_id']}"
        if d["solver_mask_id"] is not None
        else "none (uniform source)"
    )
    lines = [
        f"teacher: {d['spec']}  ({d['identity'][:23]}…)",
        f"family: {d['family']}"
        + (f" (model_type {d['model_type']})" if d.get("model_type") else "")
        + ("  remote code: trusted" if d["trust_remote_code"] else ""),
        f"vocabulary: {d['vocab_size']} data tokens (model {d['model_vocab']}; "
        f"{d['never_drawn']} never drawn)   mask: {mask}",
        f"source: {d['source']}   time input: {d['time_input']}   "
        f"time-invariant: {'yes (exact cache)' if d['time_invariant'] else 'no'}   "
        f"seq_len: {d['seq_len']}   parameters: {d['parameters']:,}",
        f"step: Σp = 1 ± {s['max_sum_error']:.1e}, never-drawn p = "
        f"{s['never_drawn_max_probability']:.0f}"
        + (
            f", network softmax matched to {s['max_difference_from_network']:.1e}"
            if "max_difference_from_network" in s
            else ""
        ),
        f"float64 preflight: max |Δp| {p['float32_vs_float64_max_difference']:.1e}; "
        f"{p['samples']} samples × {p['steps']} steps, {p['non_data_tokens_in_samples']} non-data "
        "tokens" + (f"; gen-PPL {p['gen_ppl']:.2f}" if p.get("gen_ppl") is not None else ""),
    ]
    if p.get("example") is not None:
        lines.append(f"example: {p['example']!r}")
    lines.append(f"K=1 build equals the teacher sampler: {'yes' if k['equal'] else 'NO'}")
    lines.append("ok")
    return "\n".join(lines)


@teacher_app.command("import")
@user_errors
def import_(
    file: Annotated[Path, typer.Argument(help="A pickled state dict: .pth, .pt, .bin or .ckpt.")],
    out: Annotated[Path, typer.Option(help="The checkpoint folder to write.")],
    layout: Annotated[
        Layout, typer.Option(help="Whose state dict: tsdfm (this project's), fsdfm or sedd.")
    ] = Layout.tsdfm,
    vocab_size: Annotated[
        int | None,
        typer.Option(help="Data tokens V (default: read from the embedding's rows)."),
    ] = None,
    seq_len: Annotated[int | None, typer.Option(help="Sequence length L.")] = None,
    source: Annotated[str, typer.Option(help="mask or uniform.")] = "mask",
    n_heads: Annotated[
        int | None, typer.Option(help="Attention heads (not in a state dict).")
    ] = None,
    scheduler: Annotated[str, typer.Option(help="κ(t): linear or polynomial:N.")] = "linear",
    tokenizer: Annotated[
        Path | None, typer.Option(help="A tokenizer.json to store beside the weights.")
    ] = None,
    prefix: Annotated[
        str | None,
        typer.Option(help="Strip this prefix from every tensor name (e.g. 'module.')."),
    ] = None,
    json_out: JsonOption = None,
) -> None:
    """Convert a pickled checkpoint with torch.load(weights_only=True) into safetensors plus a
    config.json (architecture flags where the file lacks them); records the file's sha256."""
    from tsdfm.models.teachers.convert import ImportSpec, import_checkpoint

    spec = ImportSpec(
        layout=value(layout),
        vocab_size=vocab_size,
        seq_len=seq_len,
        source=source,
        n_heads=n_heads,
        scheduler=scheduler,
        prefix=prefix,
    )
    report = import_checkpoint(file, out, spec, tokenizer)
    typer.echo(
        f"imported {file} ({report['source_sha256'][:19]}…, {report['tensors']} tensors) → "
        f"{out}  ({report['identity'][:23]}…)"
    )
    write_json(json_out, report)
