"""``tsdfm-pipeline inspect``: what a trajectory dataset holds, as text or JSON.

The shown shard is read by the one reader (``read_shard``, ``from_arrow``) and its rows are
checked by the same ``RowRules`` as verify and the trainer; a broken invariant is shown in one
line (inspect still shows the trajectory; ``verify`` lists every problem).
"""

from __future__ import annotations

from pathlib import Path

from tsdfm.models.data.integrity import RowRules
from tsdfm.models.data.schema import TrajectoryBatch, batch_rows, from_arrow, infer_mask_token
from tsdfm.models.errors import DataError
from tsdfm.pipeline.manifest import Manifest
from tsdfm.pipeline.shards import read_shard, shard_name


def _tokenizer(config: dict):
    """The teacher's tokenizer, if its checkpoint is reachable locally (else None)."""
    teacher = Path(str(config.get("teacher", "")))
    path = teacher / "tokenizer.json"
    if not path.is_file():
        return None
    from tsdfm.models.checkpoint import read_tokenizer

    return read_tokenizer(path)


def _render(ids, tokenizer, mask_id: int | None, width: int = 24) -> str:
    ids = [int(i) for i in ids[:width]]
    if tokenizer is None:
        words = ["_" if i == mask_id else str(i) for i in ids]
    else:
        words = ["_" if i == mask_id else tokenizer.id_to_token(i) or "?" for i in ids]
    return " ".join(words) + (" …" if len(ids) == width else "")


def inspect_dataset(root: str, example: int = 0) -> str:
    """A human-readable report of the dataset at ``root`` (:func:`format_inspection` of
    :func:`inspection`)."""
    return format_inspection(inspection(root, example))


def inspection(root: str, example: int = 0) -> dict:
    """What ``inspect`` reports on the dataset at ``root``, as JSON-ready data: plan and
    counts, provenance, statistics, schema, the row-invariant check of the shown shard, and
    trajectory ``example`` step by step (tokens, decoded text, energies and the kept
    candidate)."""
    if not Manifest.exists(root):
        raise DataError(
            f"{root} has no manifest.json: not a tsdfm trajectory dataset (build one with "
            "`tsdfm-pipeline build`)"
        )
    m = Manifest.load(root)
    committed = m.committed()
    if not committed:
        raise DataError(f"{root} has no committed shards yet; run or resume the build")
    totals = m.totals()
    nav = m.plan["config"]["navigator"]
    total = m.num_shards * m.rows_per_shard
    if not 0 <= example < total:
        raise DataError(
            f"--example {example} is not a trajectory of {root}: its ids run from 0 to {total - 1}"
        )
    shard = example // m.rows_per_shard
    if shard not in committed:
        raise DataError(
            f"--example {example} lies in shard {shard}, which is not committed yet (committed: "
            f"{committed[:8]}{' …' if len(committed) > 8 else ''}); resume the build or pick "
            f"a trajectory of a committed shard"
        )
    table, meta = read_shard(root, shard_name(shard, m.num_shards))
    stats = [m.shard(i)["stats"] for i in committed]
    shaped = [s for s in stats if "energy_gain" in s]
    ent = [s["mean_final_unigram_entropy"] for s in stats if "mean_final_unigram_entropy" in s]
    energy = None
    if shaped:
        energy = {
            "mean_chosen": sum(s["mean_chosen_energy"] for s in shaped) / len(shaped),
            "mean_candidate": sum(s["mean_candidate_energy"] for s in shaped) / len(shaped),
            "gain": sum(s["energy_gain"] for s in shaped) / len(shaped),
        }
    batch = from_arrow(table, num_candidates=nav["candidates"])
    rows = [i for i, t in enumerate(batch.trajectory_id.tolist()) if t == example]
    if not rows:
        raise DataError(
            f"shard {shard} of {root} does not hold trajectory {example}; run "
            f"`tsdfm-pipeline verify {root}`"
        )
    r = rows[0]
    tokenizer = _tokenizer(meta.get("config", {}))
    mask_id = infer_mask_token(batch.states)
    steps = []
    for k, t in enumerate(batch.times.tolist()):
        step = {"t": t, "tokens": batch.states[r, k].tolist()}
        step["text"] = _render(batch.states[r, k], tokenizer, mask_id)
        if k > 0 and bool(batch.shaped[k - 1]):
            step["energies"] = [float(x) for x in batch.energies[r, k - 1]]
            step["kept"] = int(batch.chosen[r, k - 1])
        steps.append(step)
    return {
        "dataset": root,
        "fingerprint": m.fingerprint,
        "shards_committed": len(committed),
        "num_shards": m.num_shards,
        "rows": totals["rows"],
        "bytes": totals["bytes"],
        "navigator": nav,
        "teacher_identity": meta.get("teacher_identity"),
        "compass_identity": meta.get("compass_identity"),
        "tokenizer_identity": meta.get("tokenizer_identity"),
        "package_version": meta.get("package_version"),
        "schema_version": meta.get("schema_version"),
        "counters": totals.get("counters", {}),
        "energy": energy,
        "final_unigram_entropy": sum(ent) / len(ent) if ent else None,
        "schema": [{"name": f.name, "type": str(f.type)} for f in table.schema],
        "invariants": _invariants(root, shard, batch, meta, mask_id),
        "trajectory": {
            "id": int(batch.trajectory_id[r]),
            "seed": int(batch.seed[r]),
            "shard": shard,
            "steps": steps,
        },
    }


def format_inspection(report: dict) -> str:
    """The lines ``inspect`` prints for an :func:`inspection` report."""
    nav, totals = report["navigator"], report
    lines = [
        f"dataset: {report['dataset']}",
        f"fingerprint: {report['fingerprint']}",
        f"shards: {report['shards_committed']}/{report['num_shards']} committed, rows "
        f"{totals['rows']}, bytes {totals['bytes']:,} "
        f"({totals['bytes'] / max(totals['rows'], 1):,.0f} per trajectory)",
        f"navigator: S={nav['student_steps']} N={nav['teacher_steps']} K={nav['candidates']} "
        f"tau={nav['tau']} selection={nav['selection']}"
        + (f" selection_temperature={nav['temperature']}" if nav["selection"] == "softmax" else "")
        + f" teacher_temperature={nav.get('teacher_temperature', 1.0)}",
        f"teacher: {report['teacher_identity']}",
        f"compass: {report['compass_identity']}",
        f"tokenizer: {report['tokenizer_identity']}",
        f"package: {report['package_version']}, schema v{report['schema_version']}",
        "counters: "
        + ", ".join(
            f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}"
            for k, v in sorted(report["counters"].items())
        ),
    ]
    e = report["energy"]
    if e is not None:
        lines.append(
            f"energy: mean chosen {e['mean_chosen']:.4f}, mean candidate "
            f"{e['mean_candidate']:.4f}, gain {e['gain']:.4f}"
        )
    else:
        lines.append("energy: not shaped (K=1 or tau=1)")
    if report["final_unigram_entropy"] is not None:
        lines.append(
            f"final unigram entropy: {report['final_unigram_entropy']:.4f} nats (mean per sample)"
        )
    lines.append("schema:")
    lines += [f"  {f['name']}: {f['type']}" for f in report["schema"]]
    lines.append(report["invariants"])
    tr = report["trajectory"]
    lines.append(f"trajectory {tr['id']} (seed {tr['seed']}):")
    for step in tr["steps"]:
        label = f"  t={step['t']:.3f}"
        if "kept" in step:
            es, j = step["energies"], step["kept"]
            label += f" [kept {j}: {es[j]:.3f} of " + ", ".join(f"{x:.3f}" for x in es) + "]"
        lines.append(label)
        lines.append("      " + step["text"])
    return "\n".join(lines)


def _invariants(
    root: str, shard: int, batch: TrajectoryBatch, meta: dict, mask_id: int | None
) -> str:
    """One line: whether the shard's rows keep the contract's row invariants (the same
    ``RowRules`` as verify and the trainer; V and [MASK] inferred from the data)."""
    config = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    rules = RowRules.from_config(config, shard=shard, vocab_size=mask_id, mask_token_id=mask_id)
    found = rules.violations(batch_rows(batch))
    if not found:
        return f"row invariants: all {batch.num_rows} rows of shard {shard} keep them"
    what, bad = found[0]
    r = int(bad.nonzero()[0][0])
    return (
        f"row invariants: BROKEN, shard {shard} row {r} (trajectory_id "
        f"{int(batch.trajectory_id[r])}) breaks '{what}'"
        + (f" and {len(found) - 1} more invariant(s)" if len(found) > 1 else "")
        + f": run `tsdfm-pipeline verify {root}`"
    )
