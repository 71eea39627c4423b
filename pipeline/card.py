"""The dataset card: ``README.md`` at the dataset root, generated from the manifest.

The card is what a consumer sees first on the Hub, months after the build. Its YAML front
matter lets ``datasets.load_dataset(path_or_repo)`` read the shards with the right features
(``configs`` / ``data_files`` and ``dataset_info`` with ``num_bytes`` and ``num_examples``), and
carries a ``tsdfm`` block (fingerprint, checkpoint identities, schema version, the teacher's
vocabulary and source) that ``tsdfm-pipeline verify`` checks against the manifest and shards.
The prose says how the data was made, by what, with which settings, and how to use it.

The card is a pure function of (manifest, shard footers, teacher facts, build date, repo id,
version): :func:`card_facts` gathers the inputs, :func:`render_card` renders them, and the same
inputs give the same bytes. The manifest records no creation time, so the build date is taken,
in this order, from the manifest (``created``, when a future manifest records it), from the
card already at the root (regenerating keeps the date), or from today's UTC date.

``num_bytes`` of the split is the uncompressed size of the data as recorded in the Parquet
footers (read from the footers only, never by reading the data); ``download_size`` is the sum
of the shard files' sizes. ``features`` is written by ``datasets``' own serializer, and a card
is read back through ``huggingface_hub.DatasetCard``.

The license is a parameter: by default the teacher's (its model card or config.json records
one), else ``unknown``; never assumed. The card names checkpoints by Hub id, or a local
checkpoint by its folder name only: no path of the builder's machine is published.

The model card (``README.md`` of a model repo, :func:`render_model_card`) is the same kind of
pure function, of a checkpoint (role, architecture, identity, the provenance its config.json
records: dataset id, revision and fingerprint, teacher and compass identities) and of its run's
``eval.json``; its metadata is ``huggingface_hub.ModelCardData`` (the evaluation as
``model-index``, plus a ``tsdfm`` block) and it reads back through ``ModelCard``.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import yaml

from tsdfm.models.data.schema import SCHEMA_VERSION, shard_schema, trajectory_schema
from tsdfm.models.errors import DataError
from tsdfm.models.refs import parse_hub_ref
from tsdfm.pipeline.manifest import Manifest
from tsdfm.pipeline.shards import atomic_write, open_root, read_footer, shard_name

CARD_FILE = "README.md"
DATA_FILES = "data/train-*.parquet"
UNKNOWN_LICENSE = "unknown"
LICENSE: str | None = None  # the default: the teacher's license, else UNKNOWN_LICENSE
TAGS = ("tsdfm", "discrete-flow-matching", "distillation", "trajectories", "synthetic")
REPO_PLACEHOLDER = "ORG/NAME"
VERSION_PLACEHOLDER = "vN"

#: What each column of the trajectory schema means (the card's schema table).
COLUMN_MEANINGS = {
    "trajectory_id": "global index: shard · rows_per_shard + row",
    "shard": "shard index",
    "seed": "seed of this trajectory's randomness (dataset seed · 2^32 + trajectory_id)",
    "times": "student grid t_0 = 0 < … < t_S = 1 (S+1 values)",
    "states": "x_{t_k} for k = 0 … S (S+1 rows of L token ids); states[0] is the source "
    "sample, states[S] the final sequence",
    "energies": "compass energies of the K candidates of each segment (S lists; empty where "
    "the segment was not shaped)",
    "chosen": "index of the kept candidate per segment (S values; 0 where not shaped)",
    "text": "decoded final sequence (null without a tokenizer)",
    # schema v2 (docs/schema.md, "Rebuilding a state")
    "tokens": "the final sequence x_1 (L token ids)",
    "mask_token": "the [MASK] id of a row stored by reveal segments (mask source); else null",
    "reveal": "per position, the segment k in which it was revealed: [MASK] in states 0..k, "
    "tokens[i] from state k+1 on (L values; null under the uniform source)",
    "changed_positions": "per segment k, the positions whose token changes from state k to "
    "k+1, ascending (S lists; null under the mask source)",
    "previous_tokens": "per segment k, the tokens those positions held in state k (S lists; "
    "null under the mask source)",
}

# features ------------------------------------------------------------------------------------


def _type_name(t: pa.DataType) -> str:
    """``int64``, ``float32``, ``list<list<int32>>`` …"""
    if pa.types.is_list(t):
        return f"list<{_type_name(t.value_type)}>"
    names = {pa.string(): "string", pa.float32(): "float32", pa.float16(): "float16"}
    return names.get(t, str(t))


def features_yaml(version: int = SCHEMA_VERSION, text: bool = True) -> list[dict[str, Any]]:
    """``dataset_info.features`` of the trajectory schema (``version``, with or without v2's
    optional text column), written by ``datasets``' own serializer (``Features._to_yaml_list``),
    so ``datasets.load_dataset`` reads back exactly the contract's features."""
    from datasets import Features

    return Features.from_arrow_schema(trajectory_schema(version, text))._to_yaml_list()


def _manifest_schema(m: dict[str, Any]) -> pa.Schema:
    """The shards' Arrow schema, from a manifest (its version and its config's ``text``)."""
    config = m["plan"].get("config") or {}
    return shard_schema({"schema_version": m["schema_version"], "config": config})


# facts ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelFacts:
    """What a reader must know about the teacher to check the token ids.

    Attributes:
        vocab_size: V data tokens (ids 0 … V−1).
        seq_len: L.
        source: "mask" or "uniform".
        mask_token_id: the [MASK] id (= V) under the mask source, else None.
    """

    vocab_size: int
    seq_len: int
    source: str
    mask_token_id: int | None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _teacher_file(teacher: str, name: str) -> Path | None:
    """File ``name`` of the teacher checkpoint, if it is reachable without a download: a
    local checkpoint directory, else the local Hub cache of a Hub id. None when neither."""
    path = Path(str(teacher)).expanduser() / name
    if path.is_file():
        return path
    try:
        from huggingface_hub import snapshot_download

        repo_id, _, revision = str(teacher).partition("@")
        folder = snapshot_download(
            repo_id, revision=revision or None, allow_patterns=[name], local_files_only=True
        )
    except Exception:  # not a Hub id, or not in the cache: the facts are optional
        return None
    path = Path(folder) / name
    return path if path.is_file() else None


def teacher_facts(teacher: str) -> ModelFacts | None:
    """The teacher's vocabulary and source from its config.json, if it is reachable.

    A local checkpoint directory is read; a Hub id is looked up in the local Hub cache only
    (never downloaded here). None when neither works.
    """
    from tsdfm.models.flow_model import ModelConfig

    path = _teacher_file(teacher, "config.json")
    if path is None:
        return None
    try:
        cfg = ModelConfig.from_dict(json.loads(path.read_text()))
    except Exception:
        return None
    return ModelFacts(cfg.vocab_size, cfg.seq_len, cfg.source, cfg.mask_token_id)


def _solver_facts(record: Any) -> ModelFacts | None:
    """The vocabulary an adapter teacher gives the solver, as ``manifest.json`` records it
    (``teacher.solver``); None for this project's own teachers (no record)."""
    solver = record.get("solver") if isinstance(record, dict) else None
    try:
        return ModelFacts(
            int(solver["vocab_size"]),
            int(solver["seq_len"]),
            str(solver["source"]),
            solver.get("mask_token_id"),
        )
    except (TypeError, KeyError, ValueError):
        return None


def teacher_license(teacher: str) -> str | None:
    """The license the teacher checkpoint records, if it is reachable and records one: the
    ``license`` of its model card (README.md metadata, read by ``huggingface_hub.ModelCard``),
    else a ``license`` string in its config.json. None otherwise."""
    readme = _teacher_file(teacher, CARD_FILE)
    if readme is not None:
        from huggingface_hub import ModelCard

        try:
            found = ModelCard(readme.read_text(encoding="utf-8")).data.get("license")
        except Exception:  # a malformed model card records nothing we can use
            found = None
        if isinstance(found, str) and found.strip():
            return found.strip()
    config = _teacher_file(teacher, "config.json")
    if config is not None:
        try:
            found = json.loads(config.read_text()).get("license")
        except Exception:
            found = None
        if isinstance(found, str) and found.strip():
            return found.strip()
    return None


@dataclass(frozen=True)
class CardFacts:
    """Everything the card says, gathered from the dataset root.

    Attributes:
        manifest: the manifest's JSON object.
        identities: teacher/compass/tokenizer identities from the shard metadata.
        uncompressed_bytes: sum of the shards' uncompressed sizes (Parquet footers).
        model: teacher facts, when the teacher checkpoint was reachable.
        build_date: ISO date (YYYY-MM-DD).
        teacher_license: the license the teacher records (:func:`teacher_license`), or None.
    """

    manifest: dict[str, Any]
    identities: dict[str, str | None]
    uncompressed_bytes: int
    model: ModelFacts | None
    build_date: str
    teacher_license: str | None = None

    @property
    def license(self) -> str:
        """The card's default license: the teacher's, else ``unknown``."""
        return self.teacher_license or UNKNOWN_LICENSE


def read_card(root: str) -> tuple[dict[str, Any], str] | None:
    """(YAML metadata, body) of ``root/README.md``; None if there is no card.

    DataError when the card exists but its front matter is missing or not a YAML mapping.
    """
    fs, base = open_root(root)
    path = f"{base.rstrip('/')}/{CARD_FILE}"
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as f:
        text = f.read().decode("utf-8", errors="replace")
    return parse_card(text, path)


def parse_card(text: str, where: str = CARD_FILE) -> tuple[dict[str, Any], str]:
    """(YAML metadata, body) of a card, parsed by ``huggingface_hub.DatasetCard``; DataError
    if it has no front matter or the front matter is not a YAML mapping."""
    from huggingface_hub import DatasetCard

    missing = f"{where} has no YAML front matter (--- … ---); regenerate the card"
    if not text.lstrip().startswith("---"):
        raise DataError(missing)
    try:
        card = DatasetCard(text)
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0]
        raise DataError(f"{where}: the YAML front matter does not parse ({first})") from None
    except ValueError:  # "repo card metadata block should be a dict"
        raise DataError(f"{where}: the YAML front matter is not a mapping") from None
    if card.text == card.content:  # an opening --- that is never closed
        raise DataError(missing)
    return card.data.to_dict(), card.text


def _existing_build_date(root: str) -> str | None:
    try:
        card = read_card(root)
    except DataError:
        return None
    if card is None:
        return None
    date = (card[0].get("tsdfm") or {}).get("build_date")
    return str(date) if date else None


def card_facts(
    root: str, build_date: str | None = None, manifest: Manifest | None = None
) -> CardFacts:
    """Gather the card's inputs at ``root``: manifest, shard footers, teacher facts, date.

    Every planned shard must be committed (the card describes a finished dataset). A build
    passes the ``manifest`` it holds in memory, so manifest.json is not read again.
    """
    manifest = Manifest.load(root) if manifest is None else manifest
    missing = manifest.missing()
    if missing:
        raise DataError(
            f"{root} is not finished: shards {missing[:5]}{'…' if len(missing) > 5 else ''} "
            "are not committed; rerun the build before writing the card"
        )
    footers = [read_footer(root, shard_name(i, manifest.num_shards)) for i in manifest.committed()]
    meta = footers[0].metadata or {}
    identities = {
        k: meta.get(k) for k in ("teacher_identity", "compass_identity", "tokenizer_identity")
    }
    data = manifest.to_dict()
    created = data.get("created")
    date = build_date or (str(created)[:10] if created else None) or _existing_build_date(root)
    date = date or _dt.datetime.now(_dt.timezone.utc).date().isoformat()
    teacher = data["plan"].get("config", {}).get("teacher")
    return CardFacts(
        manifest=data,
        identities=identities,
        uncompressed_bytes=sum(f.uncompressed_bytes for f in footers),
        model=_solver_facts(data.get("teacher")) or (teacher_facts(teacher) if teacher else None),
        build_date=str(date),
        teacher_license=teacher_license(teacher) if teacher else None,
    )


# rendering -----------------------------------------------------------------------------------


def _size_category(n: int) -> str:
    """The Hub's ``size_categories`` bucket of n rows."""
    buckets = ["n<1K", "1K<n<10K", "10K<n<100K", "100K<n<1M", "1M<n<10M", "10M<n<100M"]
    buckets += ["100M<n<1B", "1B<n<10B", "10B<n<100B", "100B<n<1T"]
    for power, name in enumerate(buckets, start=3):
        if n < 10**power:
            return name
    return "n>1T"


def _weighted(stats: list[tuple[dict, int]], key: str, weight_key: str | None) -> float | None:
    """Mean of ``key`` over shards, weighted by rows (or by ``stats[weight_key]``)."""
    num = den = 0.0
    for s, rows in stats:
        if key not in s:
            continue
        w = s.get(weight_key, 0) if weight_key else rows
        num += s[key] * w
        den += w
    return num / den if den else None


def statistics(manifest: dict[str, Any]) -> dict[str, Any]:
    """Dataset statistics from the manifest: rows, bytes, energies, entropy, work counters."""
    shards = [manifest["shards"][k] for k in sorted(manifest["shards"])]
    pairs = [(e.get("stats", {}), e["rows"]) for e in shards]
    rows = sum(e["rows"] for e in shards)
    size = sum(e["bytes"] for e in shards)
    counters: dict[str, float] = {}
    for e in shards:
        for k, v in e.get("counters", {}).items():
            counters[k] = counters.get(k, 0) + v
    return {
        "shards": len(shards),
        "rows": rows,
        "bytes": size,
        "bytes_per_trajectory": size / rows if rows else 0.0,
        "energy_gain": _weighted(pairs, "energy_gain", "shaped_segments"),
        "mean_chosen_energy": _weighted(pairs, "mean_chosen_energy", "shaped_segments"),
        "mean_candidate_energy": _weighted(pairs, "mean_candidate_energy", "shaped_segments"),
        "shaped_segments": sum(int(s.get("shaped_segments", 0)) for s, _ in pairs),
        "mean_final_unigram_entropy": _weighted(pairs, "mean_final_unigram_entropy", None),
        "candidates": counters.get("candidates"),
        "energy_calls": counters.get("energy_calls"),
        "teacher_forward_calls": counters.get("teacher_forward_calls"),
    }


def _flatten(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k in sorted(d):
        v = d[k]
        if isinstance(v, dict):
            out += _flatten(v, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", v))
    return out


def _num(x: float | None, fmt: str = ".4f") -> str:
    return "–" if x is None else format(x, fmt)


def _is_hub_id(spec: Any) -> bool:
    """A Hub id (org/name[@rev]) rather than a local path."""
    return isinstance(spec, str) and parse_hub_ref(spec) is not None and not Path(spec).exists()


def public_name(spec: Any) -> str | None:
    """A checkpoint as the card names it: a Hub id as given, a local path by its folder name
    only (the builder's local paths never reach a published card)."""
    if spec is None or _is_hub_id(spec):
        return spec
    return Path(str(spec).rstrip("/")).name or None


def public_config(config: dict[str, Any]) -> dict[str, Any]:
    """The build config as the card shows it: checkpoints by :func:`public_name`."""
    out = dict(config)
    for key in ("teacher", "compass"):
        if key in out:
            out[key] = public_name(out[key])
    return out


def _teacher_temperature(nav: dict[str, Any]) -> float:
    """The teacher's T (recorded only away from 1, see tsdfm.pipeline.config)."""
    return float(nav.get("teacher_temperature", 1.0))


def pretty_name(manifest: dict[str, Any]) -> str:
    nav = manifest["plan"]["config"]["navigator"]
    kind = f"shaped, K={nav['candidates']}" if nav["candidates"] > 1 else "blind, K=1"
    T = _teacher_temperature(nav)
    tempered = "" if T == 1.0 else f", teacher T={T:g}"
    return (
        f"TS-DFM teacher trajectories ({kind}, S={nav['student_steps']}, "
        f"N={nav['teacher_steps']}{tempered})"
    )


def front_matter(facts: CardFacts, license: str | None = LICENSE) -> dict[str, Any]:
    """The card's YAML front matter as a dict (key order is the rendering order).

    Args:
        facts: from :func:`card_facts`.
        license: the Hub license id; None: the teacher's (``facts.license``), else unknown.
    """
    m = facts.manifest
    stats = statistics(m)
    tsdfm: dict[str, Any] = {
        "format": m.get("format"),
        "schema_version": m["schema_version"],
        "fingerprint": m["fingerprint"],
        **facts.identities,
        "package_version": m.get("package_version"),
        "build_date": facts.build_date,
        "num_shards": m["plan"]["num_shards"],
        "rows_per_shard": m["plan"]["rows_per_shard"],
    }
    if facts.model is not None:
        tsdfm["model"] = facts.model.to_dict()
    return {
        "pretty_name": pretty_name(m),
        "license": license or facts.license,
        "tags": list(TAGS),
        "task_categories": ["text-generation"],
        "size_categories": [_size_category(stats["rows"])],
        "configs": [
            {"config_name": "default", "data_files": [{"split": "train", "path": DATA_FILES}]}
        ],
        "dataset_info": {
            "features": features_yaml(m["schema_version"], "text" in _manifest_schema(m).names),
            "splits": [
                {
                    "name": "train",
                    "num_bytes": facts.uncompressed_bytes,
                    "num_examples": stats["rows"],
                }
            ],
            "download_size": stats["bytes"],
            "dataset_size": facts.uncompressed_bytes,
        },
        "tsdfm": tsdfm,
    }


def _how_it_was_made(m: dict[str, Any], model: ModelFacts | None) -> list[str]:
    cfg = m["plan"]["config"]
    nav = cfg["navigator"]
    S, N, K, tau = nav["student_steps"], nav["teacher_steps"], nav["candidates"], nav["tau"]
    source = model.source if model else "the teacher's"
    first = (
        "A discrete flow matching (DFM) teacher generates a sequence by starting from noise at "
        f"t = 0 ({source} source"
        + (": every position is [MASK]" if model and model.source == "mask" else "")
        + ") and moving tokens toward data until t = 1. Each step draws x̂ ~ p(x_1 | x_t) and "
        "moves a position to x̂ with probability (κ(t+h) − κ(t)) / (1 − κ(t)), the exact rate "
        f"of the mixture path over a finite step. The teacher here takes N = {N} such steps. "
        f"Each row records one trajectory on the student's grid of S = {S} segments: the "
        "state at every grid time t_k, so a student that takes S steps can imitate it."
    )
    if nav["selection"] == "tilt":
        second = (
            "The trajectories are shaped by a tilted teacher (TS-DFM with per-token density "
            f"ratios). At every grid time t_k ≥ τ = {tau}, the segment is one teacher step whose "
            "logits are the teacher's plus a token-ratio energy compass's log-ratios "
            "r(x)[i, v] ≈ log p_data(v | x, i) − log q_teacher(v | x, i) at the current state: "
            "the limit of many candidates resampled position by position, for one teacher "
            "pass. The compass energy of each kept segment is stored. Shaping costs "
            "compute only while building the data; a student trained on it samples in S steps "
            "like any other."
        )
    elif K > 1:
        sel = nav["selection"]
        how = {
            "argmin": "keeps the lowest-energy candidate",
            "softmax": f"samples a candidate with probability ∝ exp(−e / {nav['temperature']})",
            "token-softmax": "takes each position's token from a candidate sampled with "
            f"probability ∝ exp(−e_i / {nav['temperature']}), e_i that position's energy "
            "(the stored index is the candidate that gave most of the positions)",
        }[sel]
        second = (
            "The trajectories are shaped by an energy-guided midpoint search (TS-DFM). At every "
            f"grid time t_k ≥ τ = {tau}, the teacher rolls the current state forward N/S = "
            f"{N // S} sub-steps in K = {K} independent candidates; a small time-conditioned "
            "energy compass scores each candidate state (lower is more coherent) and the "
            f"search {how}. The energies of all candidates and the chosen index are stored, so "
            "the selection can be audited. Shaping costs compute only while building the data; "
            "a student trained on it samples in S steps like any other."
        )
    else:
        second = (
            "This is the blind baseline (K = 1): every segment is the teacher's own rollout of "
            f"N/S = {N // S} sub-steps, with no energy-guided selection. Energies are empty and "
            "the chosen index is 0 in every segment. Train a student on it to measure what "
            "shaping adds."
        )
    T = _teacher_temperature(nav)
    if T == 1.0:
        return [first, second]
    third = (
        f"The teacher's draws are tempered: every x̂ is drawn from softmax(logits / T) with "
        f"T = {T:g} in place of the teacher's own p(x_1 | x_t)"
        + (
            ", which sharpens them and lowers the samples' entropy"
            if T < 1
            else ", which flattens them and raises the samples' entropy"
        )
        + ". "
        + (
            "A blind dataset at T < 1 is the control arm for shaping: it buys lower perplexity "
            "with lower entropy alone, so compare students trained on it and on shaped data at "
            "matched entropy."
            if K == 1 and T < 1
            else "Compare students trained on it with others at matched entropy."
        )
    )
    return [first, second, third]


def render_card(
    facts: CardFacts,
    repo_id: str | None = None,
    version: str | None = None,
    license: str | None = LICENSE,
) -> str:
    """The card as Markdown with YAML front matter; the same inputs give the same bytes.

    Args:
        facts: from :func:`card_facts`.
        repo_id: the Hub dataset repo for the snippets (a placeholder when None).
        version: the tag consumers pin (``vN`` placeholder when None).
        license: the Hub license id of the metadata (``mit``, ``cc-by-4.0``, …); None: the
            teacher's when its checkpoint records one, else ``unknown``.
    """
    m = facts.manifest
    cfg = m["plan"]["config"]
    stats = statistics(m)
    repo = repo_id or REPO_PLACEHOLDER
    tag = version or VERSION_PLACEHOLDER
    meta = front_matter(facts, license)
    head = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, width=100)
    teacher_spec = cfg.get("teacher")
    init = teacher_spec if _is_hub_id(teacher_spec) else "TEACHER_CKPT"
    shown = public_config(cfg)
    lines = ["---", head.rstrip("\n"), "---", "", f"# {meta['pretty_name']}", ""]
    lines += [
        f"{stats['rows']:,} teacher trajectories for distilling few-step discrete-flow students, "
        f"in {stats['shards']} Parquet shards ({stats['bytes']:,} bytes). One row is one "
        f"trajectory; built with tsdfm-pipeline {m.get('package_version')}.",
        "",
        "## How it was made",
        "",
    ]
    for para in _how_it_was_made(m, facts.model):
        lines += [para, ""]
    lines += [
        "## Use it",
        "",
        "Train an S-step student on it (no Ray needed):",
        "",
        "```bash",
        f"tsdfm-pipeline distill --data {repo}@{tag} --teacher {init} --out DIR",
        "```",
        "",
        "Read it with `datasets` (pin the version tag; tags are never moved):",
        "",
        "```python",
        "from datasets import load_dataset",
        "",
        f'ds = load_dataset("{repo}", revision="{tag}", split="train", streaming=True)',
        "row = next(iter(ds))  # row['states'][k] is x at t = row['times'][k]",
        "```",
        "",
        f"Check it: `tsdfm-pipeline verify {repo}@{tag}` (checksums, schema, provenance, "
        "per-row invariants; add `--replay 2` to rebuild two shards and compare bytes).",
        "",
        "## Statistics",
        "",
        "| statistic | value |",
        "|---|---|",
        f"| trajectories (rows) | {stats['rows']:,} |",
        f"| shards | {stats['shards']} × {m['plan']['rows_per_shard']} rows |",
        f"| bytes (Parquet, zstd) | {stats['bytes']:,} |",
        f"| bytes per trajectory | {stats['bytes_per_trajectory']:,.1f} |",
        f"| uncompressed bytes | {facts.uncompressed_bytes:,} |",
        f"| mean energy gain (mean candidate − chosen) | {_num(stats['energy_gain'])} |",
        f"| mean chosen energy | {_num(stats['mean_chosen_energy'])} |",
        f"| mean candidate energy | {_num(stats['mean_candidate_energy'])} |",
        f"| shaped segments | {stats['shaped_segments']:,} |",
        f"| mean unigram entropy of final sequences (nats) | "
        f"{_num(stats['mean_final_unigram_entropy'])} |",
        f"| candidates rolled out | {_num(stats['candidates'], ',.0f')} |",
        f"| compass calls | {_num(stats['energy_calls'], ',.0f')} |",
        f"| teacher forward calls | {_num(stats['teacher_forward_calls'], ',.0f')} |",
        "",
        "## Provenance",
        "",
        "| item | value |",
        "|---|---|",
        f"| teacher checkpoint | `{shown.get('teacher')}` |",
        f"| teacher identity | `{facts.identities.get('teacher_identity')}` |",
        f"| compass checkpoint | `{shown.get('compass')}` |",
        f"| compass identity | `{facts.identities.get('compass_identity')}` |",
        f"| tokenizer identity | `{facts.identities.get('tokenizer_identity')}` |",
    ]
    if facts.model is not None:
        md = facts.model
        lines += [
            f"| teacher vocabulary / source | V = {md.vocab_size}, {md.source} source"
            + (f", [MASK] = {md.mask_token_id}" if md.mask_token_id is not None else "")
            + f", L = {md.seq_len} |"
        ]
    lines += [
        f"| fingerprint | `{m['fingerprint']}` |",
        f"| dataset schema | v{m['schema_version']} |",
        f"| tsdfm-pipeline version | {m.get('package_version')} |",
        f"| build date | {facts.build_date} |",
    ]
    for key, value in _flatten(shown):
        lines.append(f"| config `{key}` | `{json.dumps(value)}` |")
    lines += [
        "",
        "Identities are sha256 over a checkpoint's config and weights; the fingerprint is the "
        "sha256 of every value that decides a shard's bytes. Every shard carries the same record "
        "in its Parquet key-value metadata `tsdfm`, and `manifest.json` lists each shard's rows, "
        "bytes and sha256.",
        "",
        "## Schema",
        "",
        f"Dataset schema v{m['schema_version']}; one row per trajectory.",
        "",
        "| column | type | meaning |",
        "|---|---|---|",
    ]
    for f in _manifest_schema(m):
        lines.append(f"| `{f.name}` | `{_type_name(f.type)}` | {COLUMN_MEANINGS[f.name]} |")
    lines += [
        "",
        "## Files",
        "",
        f"- `data/train-XXXXX-of-{m['plan']['num_shards']:05d}.parquet`: the shards (zstd, "
        "content-defined chunking, page index).",
        "- `manifest.json`: the build plan, the fingerprint and each shard's rows, bytes, "
        "sha256, counters and statistics.",
        "",
    ]
    return "\n".join(lines)


def write_card(
    root: str,
    build_date: str | None = None,
    repo_id: str | None = None,
    version: str | None = None,
    license: str | None = LICENSE,
    manifest: Manifest | None = None,
) -> str:
    """Render the card of the finished dataset at ``root`` and write ``root/README.md``.

    Written by temp file + rename. Returns the card's text. ``license``: see
    :func:`render_card`; ``manifest``: see :func:`card_facts`.
    """
    text = render_card(card_facts(root, build_date, manifest), repo_id, version, license)
    fs, base = open_root(root)
    atomic_write(fs, f"{base.rstrip('/')}/{CARD_FILE}", lambda f: f.write(text.encode()))
    return text


# the model card ------------------------------------------------------------------------------

MODEL_TAGS = ("tsdfm", "discrete-flow-matching", "text-generation")
EVAL_FILE = "eval.json"
_ROLE_PROSE = {
    "teacher": "the teacher: a discrete flow matching denoiser p_θ(x_1 | x_t, t) that samples "
    "in many small steps and generates the trajectory datasets",
    "student": "a few-step student: a denoiser p_θ(x_1 | x_t, t, h) that also sees the step "
    "size h, distilled from frozen teacher trajectories so that it samples in S steps",
    "compass": "an energy compass E_θ(x_t, t) that scores intermediate states (lower is more "
    "coherent) for the energy-guided midpoint search that shapes teacher trajectories",
}


@dataclass(frozen=True)
class ModelCardFacts:
    """Everything the model card says, gathered from a loaded checkpoint and its run folder.

    Attributes:
        role: teacher | student | compass | a registered role.
        identity: sha256 of config and weights.
        parameters: number of weights.
        architecture: V, L, source, scheduler and the backbone's size.
        provenance: what the checkpoint records about how it was made, with checkpoints and
            datasets named by :func:`public_name` (no local path).
        evaluation: the run's final evaluation (:func:`eval_summary`), or None.
        teacher_license: the license the teacher (or the checkpoint itself) records, or None.
    """

    role: str
    identity: str
    parameters: int
    architecture: dict[str, Any]
    provenance: dict[str, Any]
    evaluation: dict[str, Any] | None = None
    teacher_license: str | None = None

    @property
    def license(self) -> str:
        return self.teacher_license or UNKNOWN_LICENSE


def _public_dataset(record: Any) -> dict[str, Any] | None:
    """The dataset a student was distilled from, as the card names it."""
    if not isinstance(record, dict):
        return None
    out = {
        k: record.get(k)
        for k in ("revision", "resolved_revision", "fingerprint", "schema_version", "num_shards")
    }
    return {"id": public_name(record.get("id")), "local": bool(record.get("local")), **out}


def eval_summary(report: Any, identity: str, where: str) -> dict[str, Any]:
    """The numbers of a final evaluation (``eval.json`` of ``distill`` / ``teacher train``):
    per arm its steps, gen-PPL and entropy, with the true values; a DataError when the report
    is malformed or evaluates another checkpoint than ``identity``."""
    try:
        evaluated = report["model"]["identity"]
        arms = [
            {
                "name": str(a["name"]),
                "steps": a.get("steps"),
                "samples": int(a["samples"]),
                "gen_ppl": float(a["gen_ppl"]),
                "entropy_mean": float(a["entropy_mean"]),
            }
            for a in report["arms"]
        ]
        real = report.get("real_data") or {}
        out = {
            "evaluator": str(report.get("evaluator")),
            "true_perplexity": report.get("true_perplexity"),
            "real_entropy_mean": real.get("entropy_mean"),
            "arms": arms,
        }
    except (KeyError, TypeError, ValueError):
        raise DataError(
            f"{where} is not an evaluation report (tsdfm-pipeline eval / distill's eval.json); "
            "rerun the evaluation or remove the file"
        ) from None
    if evaluated != identity:
        raise DataError(
            f"{where} evaluates another checkpoint ({str(evaluated)[:23]}…, this one is "
            f"{identity[:23]}…); rerun the evaluation or remove the file"
        )
    return out


def model_card_facts(ckpt: Any, eval_file: str | Path | None = None) -> ModelCardFacts:
    """Gather the model card's inputs from a loaded checkpoint (``models.checkpoint``) and the
    run's ``eval.json`` (None: no evaluation)."""
    cfg = ckpt.config
    b = cfg.backbone
    architecture = {
        "vocab_size": cfg.vocab_size,
        "seq_len": cfg.seq_len,
        "source": cfg.source,
        "mask_token_id": cfg.mask_token_id,
        "scheduler": cfg.scheduler,
        "d_model": b.d_model,
        "n_layers": b.n_layers,
        "n_heads": b.n_heads,
        "mlp_ratio": b.mlp_ratio,
        "head": b.head,
        "step_conditioning": b.step_conditioning,
    }
    prov = cfg.provenance or {}
    init = prov.get("init") if isinstance(prov.get("init"), dict) else {}
    provenance = {
        "trainer": prov.get("trainer"),
        "steps": prov.get("steps"),
        "student_steps": prov.get("student_steps"),
        "dataset": _public_dataset(prov.get("dataset")),
        "teacher_identity": prov.get("teacher_identity"),
        "compass_identity": prov.get("compass_identity"),
        "init": {
            "name": public_name(init.get("spec")),
            "identity": init.get("identity"),
            "role": init.get("role"),
        }
        if init
        else None,
        "loss": prov.get("loss"),
        "heldout_auc": prov.get("heldout_auc"),
        "data": cfg.data.get("kind"),
    }
    evaluation = None
    if eval_file is not None:
        where = Path(eval_file).name
        try:
            report = json.loads(Path(eval_file).read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{where} beside the checkpoint does not read ({e})") from None
        evaluation = eval_summary(report, ckpt.identity, where)
    license = teacher_license(init["spec"]) if init.get("spec") else None
    return ModelCardFacts(
        role=cfg.role,
        identity=ckpt.identity,
        parameters=sum(p.numel() for p in ckpt.model.parameters()),
        architecture=architecture,
        provenance={k: v for k, v in provenance.items() if v is not None},
        evaluation=evaluation,
        teacher_license=license or teacher_license(str(ckpt.directory)),
    )


def _repo_of(name: Any) -> str | None:
    """``org/name`` of a Hub id ``org/name[@rev]`` (None for anything else)."""
    ref = parse_hub_ref(name) if isinstance(name, str) else None
    return ref.repo_id if ref is not None else None


def model_front_matter(
    facts: ModelCardFacts, repo_id: str | None = None, license: str | None = LICENSE
):
    """The card's metadata as ``huggingface_hub.ModelCardData``: license, library, tags, the
    dataset and base model when they are Hub ids, the evaluation as ``model-index``, and a
    ``tsdfm`` block (role, identity, architecture, provenance)."""
    from huggingface_hub import EvalResult, ModelCardData

    prov = facts.provenance
    dataset = prov.get("dataset") or {}
    init = prov.get("init") or {}
    results = []
    for arm in (facts.evaluation or {}).get("arms", []):
        common = {
            "task_type": "text-generation",
            "dataset_type": "tsdfm-synthetic-language",
            "dataset_name": "synthetic language (exact likelihood)",
        }
        results += [
            EvalResult(
                **common,
                metric_type="perplexity",
                metric_value=round(arm["gen_ppl"], 6),
                metric_name=f"gen-PPL, {arm['name']}",
            ),
            EvalResult(
                **common,
                metric_type="entropy",
                metric_value=round(arm["entropy_mean"], 6),
                metric_name=f"mean unigram entropy (nats), {arm['name']}",
            ),
        ]
    tsdfm = {
        "role": facts.role,
        "identity": facts.identity,
        "parameters": facts.parameters,
        "architecture": facts.architecture,
        **prov,
    }
    if facts.evaluation is not None:
        tsdfm["evaluation"] = facts.evaluation
    return ModelCardData(
        license=license or facts.license,
        library_name="tsdfm",
        pipeline_tag="text-generation",
        tags=[*MODEL_TAGS, facts.role],
        datasets=[_repo_of(dataset.get("id"))] if _repo_of(dataset.get("id")) else None,
        base_model=_repo_of(init.get("name")),
        model_name=(repo_id or REPO_PLACEHOLDER) if results else None,
        eval_results=results or None,
        tsdfm=tsdfm,
    )


def render_model_card(
    facts: ModelCardFacts,
    repo_id: str | None = None,
    version: str | None = None,
    license: str | None = LICENSE,
) -> str:
    """The model card (README.md of the model repo); the same inputs give the same bytes.

    Args:
        facts: from :func:`model_card_facts`.
        repo_id: the Hub model repo for the snippets (a placeholder when None).
        version: the tag consumers pin (``vN`` placeholder when None).
        license: the Hub license id; None: the teacher's when it records one, else unknown.
    """
    repo = repo_id or REPO_PLACEHOLDER
    tag = version or VERSION_PLACEHOLDER
    meta = model_front_matter(facts, repo_id, license)
    a, prov = facts.architecture, facts.provenance
    dataset = prov.get("dataset")
    init = prov.get("init") or {}
    what = _ROLE_PROSE.get(facts.role, f"a {facts.role} checkpoint")
    lines = ["---", meta.to_yaml(), "---", "", f"# {repo.split('/')[-1]}", ""]
    intro = f"A tsdfm-pipeline checkpoint: {what}. {facts.parameters:,} parameters."
    if facts.role == "student" and prov.get("student_steps"):
        intro += f" It samples in S = {prov['student_steps']} steps."
    lines += [intro, "", "## Use it", "", "```bash"]
    steps = f" --steps {prov['student_steps']}" if prov.get("student_steps") else ""
    if facts.role == "compass":
        lines += [
            f"tsdfm-pipeline build --teacher TEACHER --compass {repo}@{tag} --out DIR",
        ]
    else:
        lines += [f"tsdfm-pipeline sample --model {repo}@{tag}{steps} -n 8"]
    lines += [
        "```",
        "",
        "```python",
        "from tsdfm.models.checkpoint import load_checkpoint",
        "",
        f'ckpt = load_checkpoint("{repo}@{tag}")  # pin the tag; tags are never moved',
        "```",
        "",
        "## Architecture",
        "",
        "| item | value |",
        "|---|---|",
        f"| role | {facts.role} |",
        f"| vocabulary V (data tokens) | {a['vocab_size']} |",
        f"| sequence length L | {a['seq_len']} |",
        f"| source | {a['source']}"
        + (f" ([MASK] = {a['mask_token_id']})" if a["mask_token_id"] is not None else "")
        + " |",
        f"| scheduler | `{json.dumps(a['scheduler'], sort_keys=True)}` |",
        f"| transformer | d_model {a['d_model']}, {a['n_layers']} layers, {a['n_heads']} heads, "
        f"MLP ratio {a['mlp_ratio']} |",
        f"| head | {a['head']}{', step-size conditioned' if a['step_conditioning'] else ''} |",
        f"| parameters | {facts.parameters:,} |",
        "",
        "## Provenance",
        "",
        "| item | value |",
        "|---|---|",
        f"| identity | `{facts.identity}` |",
    ]
    if prov.get("trainer"):
        lines.append(f"| trainer | {prov['trainer']}, {prov.get('steps', '–')} steps |")
    if dataset:
        where = " (a local folder)" if dataset.get("local") else ""
        lines += [
            f"| dataset | `{dataset['id']}`{where} |",
            f"| dataset revision | {dataset.get('revision') or '–'}"
            + (
                f" (commit `{dataset['resolved_revision']}`)"
                if dataset.get("resolved_revision")
                else ""
            )
            + " |",
            f"| dataset fingerprint | `{dataset.get('fingerprint')}` |",
        ]
    for key, label in (("teacher_identity", "teacher"), ("compass_identity", "compass")):
        if key in prov:
            lines.append(f"| {label} identity | `{prov[key]}` |")
    if init:
        lines.append(f"| initialised from | `{init.get('name')}` ({init.get('role')}) |")
    for key, label in (("loss", "loss"), ("heldout_auc", "held-out AUC")):
        if key in prov:
            lines.append(f"| {label} | {prov[key]} |")
    lines.append(f"| license | {meta.license} |")
    ev = facts.evaluation
    if ev is not None:
        lines += [
            "",
            "## Evaluation",
            "",
            f"Generative perplexity under the synthetic language's exact likelihood "
            f"(evaluator {ev['evaluator']}; true perplexity {_num(ev['true_perplexity'])}, "
            f"real-data entropy {_num(ev['real_entropy_mean'])} nats).",
            "",
            "| arm | steps | samples | gen-PPL | entropy (nats) |",
            "|---|---|---|---|---|",
        ]
        for arm in ev["arms"]:
            lines.append(
                f"| {arm['name']} | {arm['steps']} | {arm['samples']} | {arm['gen_ppl']:.4f} | "
                f"{arm['entropy_mean']:.4f} |"
            )
    lines += [
        "",
        "## Files",
        "",
        "- `config.json`: role, vocabulary, source, scheduler, backbone, and the provenance "
        "above (part of the identity).",
        "- `model.safetensors`: the weights (no pickle).",
        "- `tokenizer.json`: the tokenizer it was trained with.",
        "",
        "The identity is the sha256 of the config and every tensor; datasets record the "
        "identities of the teacher and compass that made them.",
        "",
    ]
    return "\n".join(lines)


def parse_model_card(text: str, where: str = CARD_FILE) -> tuple[dict[str, Any], str]:
    """(metadata, body) of a model card, parsed by ``huggingface_hub.ModelCard``; DataError if
    it has no front matter or it is not a YAML mapping."""
    from huggingface_hub import ModelCard

    if not text.lstrip().startswith("---"):
        raise DataError(f"{where} has no YAML front matter (--- … ---); regenerate the card")
    try:
        card = ModelCard(text)
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0]
        raise DataError(f"{where}: the YAML front matter does not parse ({first})") from None
    except ValueError:
        raise DataError(f"{where}: the YAML front matter is not a mapping") from None
    return card.data.to_dict(), card.text
