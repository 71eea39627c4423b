"""Consumer-side integrity: what a reader checks before it trains on a dataset's bytes.

``tsdfm-pipeline verify`` checks a whole dataset once; a trainer reads it many times, maybe
after a copy, a download or a disk fault. So every reader of a trajectory dataset
(``tsdfm.models.data.trajectories``: the distill loader, its held-out split, the vocabulary check)
runs two cheap checks by default (``distill --no-verify`` switches both off):

* **Digests.** When the dataset folder holds ``manifest.json``, it must record every planned
  shard, every file of the train split must be one of them (and no recorded one may be
  missing), and every shard file must have the recorded size and sha256: all are hashed when
  the dataset is opened (before the first training step), and a file is hashed again before
  it is decoded only if its size or mtime changed since.
* **Row invariants** of the dataset contract (docs/schema.md), on every row read:
  trajectory_id = shard · rows_per_shard + row; the time grid, S and L (checked while
  decoding); token ids ≥ 0 and, once the model's vocabulary is known, in [0, V) — under the
  mask source x_0 = [MASK]^L, ids ≤ [MASK] before t = 1, no [MASK] at t = 1, and a revealed
  position keeps its token (revealed once, never re-masked).

Either check that fails raises a ShardError of one line that names the shard and the fix.

The invariants themselves are the named predicates of ``tsdfm.models.data.schema``;
:class:`RowRules` says which of them a reader checks and against what, and is the one
composition used alike by the build's shard writer (``tsdfm.pipeline.shards``), ``verify``,
this trainer-side reader and ``inspect``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tsdfm.models.data import schema
from tsdfm.models.data.schema import TrajectoryRows
from tsdfm.models.errors import ShardError, TsdfmError
from tsdfm.models.hashing import file_sha256
from tsdfm.models.paths import confined

MANIFEST_FILE = "manifest.json"
_HASHED: dict[tuple[str, str], tuple[int, int]] = {}  # (path, sha256) → (size, mtime_ns) seen


def fix_hint(root: str) -> str:
    """What to do about a shard that fails a check."""
    return (
        f"the file is corrupt or was altered: run `tsdfm-pipeline verify {root}` and rebuild the "
        "shard (rerun the build; it rebuilds shards whose checksum fails) or download it again"
    )


# --------------------------------------------------------------------------- digests
@dataclass(frozen=True)
class ShardDigest:
    """What ``manifest.json`` records about one shard file."""

    name: str  # the path relative to the dataset root, as recorded
    bytes: int
    sha256: str


def read_manifest_digests(root: Path) -> dict[Path, ShardDigest] | None:
    """The recorded shards of the dataset folder ``root`` by resolved file path, or None when
    it has no manifest.json. Every recorded path must lie inside ``root`` (PathError)."""
    path = root / MANIFEST_FILE
    if not path.exists():
        return None
    where = f"{path} is unusable"
    try:
        data = json.loads(path.read_bytes())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ShardError(f"{where} ({type(e).__name__}); {_manifest_fix(root)}") from None
    plan = data.get("plan") if isinstance(data, dict) else None
    shards = data.get("shards") if isinstance(data, dict) else None
    planned = plan.get("num_shards") if isinstance(plan, dict) else None
    if not isinstance(shards, dict) or not isinstance(planned, int):
        raise ShardError(f"{where} (no plan.num_shards or shards); {_manifest_fix(root)}")
    digests: dict[Path, ShardDigest] = {}
    for key, entry in sorted(shards.items()):
        ok = (
            isinstance(entry, dict)
            and isinstance(entry.get("path"), str)
            and isinstance(entry.get("bytes"), int)
            and isinstance(entry.get("sha256"), str)
        )
        if not ok:
            raise ShardError(
                f"{where}: shard {key} lacks path, bytes or sha256; {_manifest_fix(root)}"
            )
        file = confined(root, entry["path"], f"{MANIFEST_FILE} shard {key} path")
        digests[file] = ShardDigest(entry["path"], entry["bytes"], entry["sha256"])
    if len(digests) < planned:
        raise ShardError(
            f"dataset {root} is incomplete: {MANIFEST_FILE} records {len(digests)} of "
            f"{planned} planned shards; finish the build (rerun it with the same --out), or "
            "pass --no-verify to train on the shards present"
        )
    return digests


def _manifest_fix(root: Path) -> str:
    return (
        f"run `tsdfm-pipeline verify {root}`, then restore manifest.json or rebuild the dataset "
        "(or pass --no-verify to train without checksums)"
    )


def check_split_files(root: Path, files: list[Path], digests: dict[Path, ShardDigest]) -> None:
    """The train split must be exactly the recorded shards."""
    for f in files:
        if f not in digests:
            raise ShardError(
                f"shard {f.relative_to(root)} is read as part of the train split but "
                f"{MANIFEST_FILE} does not record it: remove the stray file, or rebuild; "
                f"`tsdfm-pipeline verify {root}` lists every problem"
            )
    listed = set(files)
    for f, d in digests.items():
        if f not in listed:
            raise ShardError(
                f"shard {d.name} is recorded in {MANIFEST_FILE} but not in the train split "
                "(deleted, or the card's data_files miss it): rerun the build to restore it; "
                f"`tsdfm-pipeline verify {root}` lists every problem"
            )


def clear_digest_cache() -> None:
    """Forget which files this process hashed (the next check hashes them again)."""
    _HASHED.clear()


def check_digest(path: Path, digest: ShardDigest, root: Path) -> None:
    """The file has the recorded size and sha256, or a ShardError naming it and the fix."""
    st = os.stat(path)
    seen = (st.st_size, st.st_mtime_ns)
    if _HASHED.get((str(path), digest.sha256)) == seen:
        return
    if st.st_size != digest.bytes:
        raise ShardError(
            f"shard {digest.name} has {st.st_size} bytes, {MANIFEST_FILE} records "
            f"{digest.bytes}: {fix_hint(str(root))}"
        )
    sha256 = file_sha256(path)
    if sha256 != digest.sha256:
        raise ShardError(
            f"shard {digest.name} has sha256 {sha256[:16]}…, {MANIFEST_FILE} records "
            f"{digest.sha256[:16]}…: {fix_hint(str(root))}"
        )
    _HASHED[(str(path), digest.sha256)] = seen


# --------------------------------------------------------------------------- row invariants
@dataclass(frozen=True)
class RowRules:
    """Which of the contract's row invariants (``tsdfm.models.data.schema``) a reader checks,
    and against what. A field left None is not known to the reader, and what depends on it is
    not checked.

    Args:
        vocab_size: V data tokens (None: only ids ≥ 0 are checked).
        mask_token_id: the [MASK] id under the mask source; None under the uniform source.
        shard: the shard index every row carries.
        rows_per_shard: R (with ``shard``, messages name trajectory_id = i·R + row).
        dataset_seed: the build's seed (seed = dataset seed · 2^32 + trajectory_id).
        grid: (S+1,) the time grid every row carries (a trainer: the first shard's); without
            it, the grid must rise strictly from 0 to 1.
        shaped: (S,) which segments store energies; None: not checked.
        candidates: K (0 ≤ chosen < K).
    """

    vocab_size: int | None = None
    mask_token_id: int | None = None
    shard: int | None = None
    rows_per_shard: int | None = None
    dataset_seed: int | None = None
    grid: tuple[float, ...] | None = None
    shaped: tuple[bool, ...] | None = None
    candidates: int | None = None

    @staticmethod
    def from_config(
        config: dict[str, Any],
        shard: int | None = None,
        vocab_size: int | None = None,
        mask_token_id: int | None = None,
    ) -> RowRules:
        """The rules a build config (as recorded in a manifest or a shard's metadata) fixes
        for the rows of shard ``shard``."""
        from tsdfm.models.navigator import NavigatorConfig

        def integer(v: Any) -> int | None:
            return v if isinstance(v, int) and not isinstance(v, bool) else None

        nav = config.get("navigator") if isinstance(config.get("navigator"), dict) else {}
        try:
            shaped = tuple(NavigatorConfig(**nav).shaped_segments()) if nav else None
        except (TsdfmError, TypeError):
            shaped = None
        return RowRules(
            vocab_size=vocab_size,
            mask_token_id=mask_token_id,
            shard=shard,
            rows_per_shard=integer(config.get("trajectories_per_shard")),
            dataset_seed=integer(config.get("seed")),
            shaped=shaped,
            candidates=integer(nav.get("candidates")),
        )

    def first_id(self) -> int | None:
        """shard · R, the id of the shard's row 0, when both are known."""
        if self.shard is None or self.rows_per_shard is None:
            return None
        return self.shard * self.rows_per_shard

    def violations(
        self, rows: TrajectoryRows, first_id: int | None = None, start: int = 0
    ) -> list[tuple[str, np.ndarray]]:
        """Every invariant the rows break, in a fixed order, with the rows that break it.

        Args:
            rows: consecutive decoded rows of one shard.
            first_id: the id the first of them must have, when the caller knows it (not
                necessarily i and R).
            start: else, the shard row of the first of them (its id is then i·R + start).

        Returns:
            [(invariant as messages quote it, (n,) bool rows that break it)], only the broken.
        """
        x, ids = rows.states, rows.ids
        out: list[tuple[str, np.ndarray]] = []
        if first_id is not None:  # the caller knows the first id, not necessarily i and R
            out.append(("trajectory_id = shard·R + row", schema.ids_follow_rows(ids, first_id)))
        elif self.first_id() is not None:
            what = f"trajectory_id = {self.shard}·{self.rows_per_shard} + row"
            out.append((what, schema.ids_follow_rows(ids, self.first_id() + start)))
        if self.shard is not None and rows.shard is not None:
            out.append((f"shard = {self.shard}", schema.shard_is(rows.shard, self.shard)))
        if self.dataset_seed is not None and rows.seed is not None:
            bad = schema.seeds_follow_ids(rows.seed, ids, self.dataset_seed)
            out.append(("seed = dataset seed·2^32 + id", bad))
        if self.grid is not None:
            grid = [float(t) for t in self.grid]
            out.append((f"times = the dataset's grid {grid}", schema.grid_is(rows.times, grid)))
        else:
            bad = schema.grid_rises_from_0_to_1(rows.times)
            out.append(("times increase strictly from 0 to 1", bad))
        K = self.candidates
        if rows.chosen is not None and K is not None:
            out.append((f"0 ≤ chosen < K = {K}", schema.chosen_below_k(rows.chosen, K)))
        if rows.shaped is not None and rows.energies is not None:
            if self.shaped is not None:
                where = np.flatnonzero(self.shaped).tolist()
                out.append(
                    (
                        f"energies hold K = {K} values exactly in the shaped segments {where}",
                        schema.energies_where_shaped(rows.shaped, np.array(self.shaped)),
                    )
                )
            out.append(("energies are finite", schema.energies_finite(rows.energies, rows.shaped)))
            if rows.chosen is not None:
                bad = schema.chosen_zero_where_unshaped(rows.chosen, rows.shaped)
                out.append(("chosen = 0 where not shaped", bad))
        out += self._token_checks(x)
        return [(what, bad) for what, bad in out if bad.any()]

    def _token_checks(self, x: np.ndarray) -> list[tuple[str, np.ndarray]]:
        out = [("token ids ≥ 0", schema.token_ids_nonnegative(x))]
        V, M = self.vocab_size, self.mask_token_id
        if M is not None:
            below_mask = schema.ids_at_most_mask_before_one(x, M)
            out += [
                (f"x_0 is all [MASK] = {M}", schema.x0_all_mask(x, M)),
                (f"token ids ≤ [MASK] = {M} before t = 1", below_mask),
                ("no [MASK] left at t = 1", schema.no_mask_at_one(x, M)),
                (
                    "a revealed position keeps its token (revealed once, never re-masked)",
                    schema.revealed_once(x, M),
                ),
            ]
            if V is not None:
                out.append((f"final token ids < V = {V}", schema.final_ids_below(x, V)))
        elif V is not None:
            out.append((f"token ids < V = {V}", schema.token_ids_below(x, V)))
        return out

    def broken(
        self, rows: TrajectoryRows, first_id: int | None = None, start: int = 0
    ) -> tuple[int, str] | None:
        """The first row that breaks an invariant and the invariant, or None (the first
        invariant in :meth:`violations` order that any row breaks)."""
        found = self.violations(rows, first_id, start)
        if not found:
            return None
        what, bad = found[0]
        return int(np.flatnonzero(bad)[0]), what
