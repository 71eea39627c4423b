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
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tsdfm.models.errors import ShardError
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
    """The token-level invariants a reader checks on every row.

    Args:
        vocab_size: V data tokens (None: unknown, only ids ≥ 0 are checked).
        mask_token_id: the [MASK] id under the mask source; None under the uniform source.
    """

    vocab_size: int | None = None
    mask_token_id: int | None = None

    def broken(
        self, ids: np.ndarray, states: np.ndarray, first_id: int | None
    ) -> tuple[int, str] | None:
        """The first row that breaks an invariant and the invariant, or None.

        Args:
            ids: (n,) trajectory ids of consecutive rows of one shard.
            states: (n, S+1, L) token ids.
            first_id: the id row 0 must have (shard · rows_per_shard + row), None if unknown.
        """
        n = ids.shape[0]
        checks: list[tuple[np.ndarray, str]] = []
        if first_id is not None:
            checks.append((ids != first_id + np.arange(n), "trajectory_id = shard·R + row"))
        x = states
        checks.append(((x < 0).any((1, 2)), "token ids ≥ 0"))
        V, M = self.vocab_size, self.mask_token_id
        if M is not None:
            checks += [
                ((x[:, 0] != M).any(1), f"x_0 is all [MASK] = {M}"),
                ((x[:, :-1] > M).any((1, 2)), f"token ids ≤ [MASK] = {M} before t = 1"),
                ((x[:, -1] == M).any(1), "no [MASK] left at t = 1"),
                (
                    ((x[:, :-1] != M) & (x[:, 1:] != x[:, :-1])).any((1, 2)),
                    "a revealed position keeps its token (revealed once, never re-masked)",
                ),
            ]
            if V is not None:
                checks.append(((x[:, -1] >= V).any(1), f"final token ids < V = {V}"))
        elif V is not None:
            checks.append(((x >= V).any((1, 2)), f"token ids < V = {V}"))
        for bad, what in checks:
            if bad.any():
                return int(np.flatnonzero(bad)[0]), what
        return None
