"""``tsdfm-pipeline inspect``: what a trajectory dataset holds, as text.

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
    """A human-readable report of the dataset at ``root``."""
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
    c = totals.get("counters", {})
    nav = m.plan["config"]["navigator"]
    lines = [
        f"dataset: {root}",
        f"fingerprint: {m.fingerprint}",
        f"shards: {len(committed)}/{m.num_shards} committed, rows {totals['rows']}, "
        f"bytes {totals['bytes']:,} ({totals['bytes'] / max(totals['rows'], 1):,.0f} per "
        "trajectory)",
        f"navigator: S={nav['student_steps']} N={nav['teacher_steps']} K={nav['candidates']} "
        f"tau={nav['tau']} selection={nav['selection']}"
        + (f" selection_temperature={nav['temperature']}" if nav["selection"] == "softmax" else "")
        + f" teacher_temperature={nav.get('teacher_temperature', 1.0)}",
    ]
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
    lines += [
        f"teacher: {meta.get('teacher_identity')}",
        f"compass: {meta.get('compass_identity')}",
        f"tokenizer: {meta.get('tokenizer_identity')}",
        f"package: {meta.get('package_version')}, schema v{meta.get('schema_version')}",
        "counters: "
        + ", ".join(
            f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in sorted(c.items())
        ),
    ]
    stats = [m.shard(i)["stats"] for i in committed]
    gains = [s["energy_gain"] for s in stats if "energy_gain" in s]
    ent = [s["mean_final_unigram_entropy"] for s in stats if "mean_final_unigram_entropy" in s]
    if gains:
        chosen = sum(s["mean_chosen_energy"] for s in stats if "energy_gain" in s) / len(gains)
        cand = sum(s["mean_candidate_energy"] for s in stats if "energy_gain" in s) / len(gains)
        lines.append(
            f"energy: mean chosen {chosen:.4f}, mean candidate {cand:.4f}, "
            f"gain {sum(gains) / len(gains):.4f}"
        )
    else:
        lines.append("energy: not shaped (K=1 or tau=1)")
    if ent:
        lines.append(f"final unigram entropy: {sum(ent) / len(ent):.4f} nats (mean per sample)")
    lines.append("schema:")
    lines += [f"  {f.name}: {f.type}" for f in table.schema]
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
    lines.append(_invariants(root, shard, batch, meta, mask_id))
    lines.append(f"trajectory {int(batch.trajectory_id[r])} (seed {int(batch.seed[r])}):")
    for k, t in enumerate(batch.times.tolist()):
        label = f"  t={t:.3f}"
        if k > 0 and bool(batch.shaped[k - 1]):
            e = batch.energies[r, k - 1]
            j = int(batch.chosen[r, k - 1])
            label += f" [kept {j}: {e[j]:.3f} of " + ", ".join(f"{x:.3f}" for x in e) + "]"
        lines.append(label)
        lines.append("      " + _render(batch.states[r, k], tokenizer, mask_id))
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
