"""The dataset contract: one Arrow schema and the one record type that flows through the build.

One row = one trajectory of the energy-guided midpoint search on the student grid
t_0 = 0 < t_1 < ... < t_S = 1 (docs/schema.md):

=============  =========================  ===================================================
column         type                       meaning
=============  =========================  ===================================================
trajectory_id  int64                      global index: shard * rows_per_shard + row
shard          int32                      shard index
seed           int64                      seed of this trajectory's randomness
times          list<float32> (S+1)        t_0 … t_S
states         list<list<int32>> (S+1×L)  states[0] = source sample x_0, states[S] = final x_1
energies       list<list<float32>> (S×K)  compass energies of the K candidates of segment k;
                                          an empty list where segment k was not shaped
chosen         list<int16> (S)            selected candidate per segment (0 where not shaped)
text           string, nullable           decoded final sequence (null without a tokenizer)
=============  =========================  ===================================================

List children are named ``element`` (the Parquet-compliant nested name), so the schema read
back from a shard equals :func:`trajectory_schema` exactly. Bump :data:`SCHEMA_VERSION` on any
change that a reader would notice.

One way each, for every reader and writer (the build, verify, the trainer, inspect):

* encode: :func:`to_arrow` (a :class:`TrajectoryBatch` → a RecordBatch; an unshaped segment is
  an empty energy list and ``chosen`` 0);
* decode: :func:`decode_rows` (Arrow rows → :class:`TrajectoryRows`, shapes checked; "not
  shaped" reads back as ``shaped`` False and NaN energies), and :func:`from_arrow` on top of it
  for the rows of one shard;
* the footer: :func:`parquet_footer` and :func:`decode_metadata` (the ``tsdfm`` key-value
  metadata, one :class:`MetadataError` for each way it can be unusable);
* the row invariants: one named predicate each (the last section), composed by
  ``tsdfm.models.data.integrity.RowRules``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tsdfm.models.errors import DataError

SCHEMA_VERSION = 2  # what a build writes by default
SCHEMA_VERSIONS = (1, 2)  # what this package reads and writes
METADATA_KEY = b"tsdfm"
# the keys of a shard's tsdfm metadata (docs/schema.md); verify refuses any other
METADATA_KEYS = frozenset(
    {
        "schema_version",
        "package_version",
        "config",
        "fingerprint",
        "teacher_identity",
        "compass_identity",
        "tokenizer_identity",
        "shard",
        "num_shards",
        "shard_seed",
    }
)

_INT32_MAX = np.iinfo(np.int32).max
_INT16_MAX = np.iinfo(np.int16).max


def _list_of(value_type: pa.DataType) -> pa.DataType:
    return pa.list_(pa.field("element", value_type, nullable=False))


def trajectory_schema(version: int = SCHEMA_VERSION, text: bool = True) -> pa.Schema:
    """The Arrow schema of a trajectory shard (without file metadata).

    Args:
        version: the schema version (:data:`SCHEMA_VERSIONS`).
        text: v2 only: whether the optional ``text`` column is present (v1 always has it).
    """
    _check_version(version)
    head = [
        pa.field("trajectory_id", pa.int64(), nullable=False),
        pa.field("shard", pa.int32(), nullable=False),
        pa.field("seed", pa.int64(), nullable=False),
        pa.field("times", _list_of(pa.float32()), nullable=False),
    ]
    if version == 1:
        return pa.schema(
            [
                *head,
                pa.field("states", _list_of(_list_of(pa.int32())), nullable=False),
                pa.field("energies", _list_of(_list_of(pa.float32())), nullable=False),
                pa.field("chosen", _list_of(pa.int16()), nullable=False),
                pa.field("text", pa.string(), nullable=True),
            ]
        )
    fields = [
        *head,
        pa.field("tokens", _list_of(pa.int32()), nullable=False),
        pa.field("mask_token", pa.int32(), nullable=True),
        pa.field("reveal", _list_of(pa.int16()), nullable=True),
        pa.field("changed_positions", _list_of(_list_of(pa.int32())), nullable=True),
        pa.field("previous_tokens", _list_of(_list_of(pa.int32())), nullable=True),
        pa.field("energies", _list_of(_list_of(pa.float16())), nullable=False),
        pa.field("chosen", _list_of(pa.int16()), nullable=False),
    ]
    if text:
        fields.append(pa.field("text", pa.string(), nullable=True))
    return pa.schema(fields)


def _check_version(version: Any) -> None:
    if isinstance(version, bool) or version not in SCHEMA_VERSIONS:
        raise DataError(
            f"trajectory schema v{version} is unknown; this tsdfm-pipeline reads and writes "
            f"v{' and v'.join(map(str, SCHEMA_VERSIONS))}"
        )


def layout_version(names: list[str]) -> int:
    """The schema version a table's columns follow: v1 stores ``states``, v2 ``tokens``."""
    return 2 if "tokens" in names and "states" not in names else 1


# the columns each field of TrajectoryRows is stored in, per schema version ("states" is the
# only field v2 stores differently: the final tokens and what rebuilds the earlier states)
_V2_STATES = ("tokens", "mask_token", "reveal", "changed_positions", "previous_tokens")


def stored_columns(fields: tuple[str, ...], version: int) -> tuple[str, ...]:
    """The Parquet columns that hold ``fields`` (TrajectoryRows / v1 column names) in a file of
    schema ``version``; e.g. what a trainer reads: ``stored_columns(TRAIN_COLUMNS, 2)``."""
    _check_version(version)
    if version == 1:
        return tuple(fields)
    out: list[str] = []
    for f in fields:
        out += _V2_STATES if f == "states" else (f,)
    return tuple(dict.fromkeys(out))


def _numpy(value: Any, name: str) -> np.ndarray:
    """A torch tensor or array-like as a numpy array (floats of any precision allowed)."""
    if hasattr(value, "detach"):  # torch.Tensor; torch is not imported here
        value = value.detach().cpu()
        if value.dtype.is_floating_point:
            value = value.float()  # bfloat16 has no numpy dtype; we store float32 anyway
        value = value.numpy()
    try:
        return np.asarray(value)
    except (TypeError, ValueError) as e:
        raise DataError(f"TrajectoryBatch.{name} is not an array ({e})") from None


def _integers(
    value: Any, name: str, shape: tuple[int | None, ...], dtype: type, low: int, high: int
) -> np.ndarray:
    a = _numpy(value, name)
    _check_shape(a, name, shape)
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise DataError(f"TrajectoryBatch.{name} must hold integers, got dtype {a.dtype}")
    if a.size and (a.min() < low or a.max() > high):
        raise DataError(
            f"TrajectoryBatch.{name} has values in [{a.min()}, {a.max()}], outside the "
            f"{np.dtype(dtype).name} range [{low}, {high}] of the dataset contract"
        )
    return np.ascontiguousarray(a, dtype=dtype)


def _check_shape(a: np.ndarray, name: str, shape: tuple[int | None, ...]) -> None:
    ok = a.ndim == len(shape) and all(
        s is None or s == d for s, d in zip(shape, a.shape, strict=True)
    )
    if not ok:
        want = "(" + ", ".join("?" if s is None else str(s) for s in shape) + ")"
        raise DataError(
            f"TrajectoryBatch.{name} has shape {tuple(a.shape)}, expected {want} "
            "(B trajectories, S segments, L positions, K candidates)"
        )


@dataclass(frozen=True, eq=False)
class TrajectoryBatch:
    """B trajectories of one shard, as numpy arrays in the dtypes of the dataset contract.

    Torch tensors and numpy arrays are both accepted and converted on construction (int64
    states to int32, float64 or bfloat16 energies to float32, ...), after checking that every
    value fits. Energies of unshaped segments are not stored; they read back as NaN, and the
    constructor sets them to NaN so that a batch has a single representation.

    Args:
        trajectory_id: (B,) int64 global trajectory indices.
        shard: shard index of every row.
        seed: (B,) int64 per-trajectory seeds.
        times: (S+1,) increasing grid t_0 … t_S, shared by the batch.
        states: (B, S+1, L) token ids; states[:, 0] = x_0, states[:, S] = final sequence.
        energies: (B, S, K) compass energies of the K candidates of each segment.
        shaped: (S,) bool, True where segment k ran the midpoint search.
        chosen: (B, S) index of the kept candidate; 0 where the segment was not shaped.
        text: B decoded final sequences (str or None), or None when there is no tokenizer.
    """

    trajectory_id: np.ndarray
    shard: int
    seed: np.ndarray
    times: np.ndarray
    states: np.ndarray
    energies: np.ndarray
    shaped: np.ndarray
    chosen: np.ndarray
    text: list[str | None] | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        int64 = np.iinfo(np.int64)
        tid = _integers(self.trajectory_id, "trajectory_id", (None,), np.int64, 0, int64.max)
        B = tid.shape[0]
        if B == 0:
            raise DataError("TrajectoryBatch needs at least one trajectory (B = 0)")
        if isinstance(self.shard, bool) or not isinstance(self.shard, (int, np.integer)):
            raise DataError(f"TrajectoryBatch.shard must be an int, got {self.shard!r}")
        if not 0 <= int(self.shard) <= _INT32_MAX:
            raise DataError(f"TrajectoryBatch.shard {self.shard} is outside [0, 2^31)")
        set_(self, "trajectory_id", tid)
        set_(self, "shard", int(self.shard))
        set_(self, "seed", _integers(self.seed, "seed", (B,), np.int64, int64.min, int64.max))

        times = _numpy(self.times, "times")
        _check_shape(times, "times", (None,))
        if times.shape[0] < 2:
            raise DataError(f"TrajectoryBatch.times has {times.shape[0]} entries; need S+1 ≥ 2")
        times = np.ascontiguousarray(times, dtype=np.float32)
        if not (np.isfinite(times).all() and (np.diff(times) > 0).all()):
            raise DataError(
                f"TrajectoryBatch.times must be finite and strictly increasing, got {times}"
            )
        S = times.shape[0] - 1
        set_(self, "times", times)

        states = _integers(self.states, "states", (B, S + 1, None), np.int32, 0, _INT32_MAX)
        if states.shape[2] == 0:
            raise DataError("TrajectoryBatch.states has sequence length L = 0")
        set_(self, "states", states)

        shaped = _numpy(self.shaped, "shaped")
        _check_shape(shaped, "shaped", (S,))
        if shaped.dtype != np.bool_:
            raise DataError(f"TrajectoryBatch.shaped must be a bool mask, got {shaped.dtype}")
        shaped = np.ascontiguousarray(shaped)
        set_(self, "shaped", shaped)

        energies = _numpy(self.energies, "energies")
        _check_shape(energies, "energies", (B, S, None))
        K = energies.shape[2]
        if K == 0:
            raise DataError("TrajectoryBatch.energies has K = 0 candidates; K ≥ 1")
        energies = np.array(energies, dtype=np.float32, copy=True, order="C")
        energies[:, ~shaped, :] = np.nan
        set_(self, "energies", energies)

        chosen = _integers(self.chosen, "chosen", (B, S), np.int16, 0, min(K - 1, _INT16_MAX))
        if chosen[:, ~shaped].any():
            raise DataError("TrajectoryBatch.chosen must be 0 in segments that were not shaped")
        set_(self, "chosen", chosen)

        if self.text is not None:
            text = list(self.text)
            if len(text) != B:
                raise DataError(f"TrajectoryBatch.text has {len(text)} entries for B = {B} rows")
            if any(t is not None and not isinstance(t, str) for t in text):
                raise DataError("TrajectoryBatch.text entries must be str or None")
            set_(self, "text", None if all(t is None for t in text) else text)

    @property
    def num_rows(self) -> int:
        """B."""
        return int(self.trajectory_id.shape[0])

    @property
    def num_segments(self) -> int:
        """S, the number of student steps."""
        return int(self.times.shape[0] - 1)

    @property
    def seq_len(self) -> int:
        """L."""
        return int(self.states.shape[2])

    @property
    def num_candidates(self) -> int:
        """K."""
        return int(self.energies.shape[2])

    def equals(self, other: TrajectoryBatch) -> bool:
        """Exact equality of every field (NaN energies of unshaped segments compare equal)."""
        return (
            self.shard == other.shard
            and self.text == other.text
            and all(
                np.array_equal(getattr(self, f), getattr(other, f))
                for f in ("trajectory_id", "seed", "times", "states", "shaped", "chosen")
            )
            and self.energies.shape == other.energies.shape
            and np.array_equal(self.energies, other.energies, equal_nan=True)
        )


def _offsets(lengths: np.ndarray, what: str) -> pa.Array:
    """int32 list offsets [0, cumsum(lengths)] for a ListArray."""
    offsets = np.zeros(lengths.shape[0] + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if offsets[-1] > _INT32_MAX:
        raise DataError(
            f"{what} holds {offsets[-1]} values, more than the 2^31 a Parquet list column "
            "chunk takes: convert fewer trajectories per batch"
        )
    return pa.array(offsets.astype(np.int32))


def _list_array(lengths: np.ndarray, values: pa.Array, type_: pa.DataType, what: str) -> pa.Array:
    return pa.ListArray.from_arrays(_offsets(lengths, what), values, type=type_)


def to_arrow(
    batch: TrajectoryBatch, version: int = SCHEMA_VERSION, text: bool = True
) -> pa.RecordBatch:
    """The batch as a RecordBatch of :func:`trajectory_schema` (``version``, ``text``); B rows.

    v2 stores each row's states in the smallest exact form (:func:`encode_states`) and the
    energies as float16; ``text=False`` leaves v2's text column out (v1 always has it).
    The one encoder is :func:`encode_rows`.
    """
    return encode_rows(batch_rows(batch), version, text)


def encode_rows(
    rows: TrajectoryRows, version: int = SCHEMA_VERSION, text: bool = True
) -> pa.RecordBatch:
    """Decoded rows (every field present) as a RecordBatch of :func:`trajectory_schema`
    (``version``, ``text``): the inverse of :func:`decode_rows` (v2 energies rounded to
    float16). Rows may differ in grid and shaping; values are not range-checked (that is
    :class:`TrajectoryBatch`'s and the row invariants' job), so :func:`transcode` can carry
    any decodable rows from one version to another.

    Vectorised: every list column is built from one flat numpy buffer and its offsets.
    """
    assert rows.shard is not None and rows.seed is not None and rows.chosen is not None
    assert rows.energies is not None and rows.shaped is not None
    schema = trajectory_schema(version, text)
    n, S, K = rows.num_rows, rows.num_segments, rows.energies.shape[2]
    typ = {f.name: f.type for f in schema}

    times = _list_array(np.full(n, S + 1), pa.array(rows.times.reshape(-1)), typ["times"], "times")
    shaped = np.asarray(rows.shaped)
    seg_lengths = np.where(shaped, K, 0).reshape(-1)  # (n*S,)
    values = np.asarray(rows.energies, dtype=np.float32)[shaped].reshape(-1)
    if version == 2:
        values = _float16(values)
    segments = _list_array(seg_lengths, pa.array(values), typ["energies"].value_type, "energies")
    energies = _list_array(np.full(n, S), segments, typ["energies"], "energies")
    chosen = np.ascontiguousarray(rows.chosen, dtype=np.int16).reshape(-1)
    columns = [
        pa.array(np.asarray(rows.ids, dtype=np.int64)),
        pa.array(np.asarray(rows.shard, dtype=np.int32)),
        pa.array(np.asarray(rows.seed, dtype=np.int64)),
        times,
        *encode_state_columns(rows.states, version).values(),
        energies,
        _list_array(np.full(n, S), pa.array(chosen), typ["chosen"], "chosen"),
    ]
    if "text" in typ:
        columns.append(pa.array(rows.text or [None] * n, pa.string()))
    return pa.RecordBatch.from_arrays(columns, schema=schema)


def transcode(table: pa.Table | pa.RecordBatch, version: int, text: bool = True) -> pa.Table:
    """Rows of any schema version re-encoded in ``version`` (``decode_rows`` then
    :func:`encode_rows`); the decoded states are the same bit for bit."""
    return pa.Table.from_batches([encode_rows(decode_rows(table), version, text)])


_FLOAT16_MAX = float(np.finfo(np.float16).max)


def _float16(values: np.ndarray) -> np.ndarray:
    """float32 energies as float16 (round to nearest), refusing any that would overflow."""
    big = np.abs(values) > _FLOAT16_MAX
    if big.any():
        raise DataError(
            f"an energy of {values[big][0]:.6g} exceeds the float16 range (±{_FLOAT16_MAX:.0f}) "
            "of trajectory schema v2; build the dataset with schema_version 1 (float32)"
        )
    return values.astype(np.float16)


def encode_state_columns(states: np.ndarray, version: int) -> dict[str, pa.Array]:
    """The columns that store the states (n, S+1, L) in schema ``version``, by name, in schema
    order: v1 ``states``; v2 ``tokens``, ``mask_token``, ``reveal``, ``changed_positions``,
    ``previous_tokens`` (:func:`encode_states`). Values are not range-checked here."""
    typ = {f.name: f.type for f in trajectory_schema(version)}
    states = np.ascontiguousarray(states, dtype=np.int32)
    arrays = _states_v1(states, typ) if version == 1 else _states_v2(states, typ)
    return dict(zip(stored_columns(("states",), version), arrays, strict=True))


def _states_v1(states: np.ndarray, typ: dict) -> list[pa.Array]:
    B, S1, L = states.shape
    rows = _list_array(
        np.full(B * S1, L), pa.array(states.reshape(-1)), typ["states"].value_type, "states"
    )
    return [_list_array(np.full(B, S1), rows, typ["states"], "states")]


@dataclass(frozen=True)
class EncodedStates:
    """The v2 form of n rows of states (n, S+1, L); each row in exactly one of two forms.

    Attributes:
        tokens: (n, L) the final state x_1 = states[S].
        by_reveal: (n,) True where the row is stored by its reveal segments: x_0 = [MASK]^L and
            every position turns from [MASK] to its final token once (the mask source).
        mask_token: (n,) int32 [MASK] id of those rows (0 elsewhere, stored as null).
        reveal: (n, L) int16 segment k in which position i was revealed: states[m][i] =
            [MASK] for m ≤ k and tokens[i] for m > k (0 where not by_reveal, stored as null).
        change_counts: (n, S) the number of positions that change in segment k (rows not
            by_reveal; 0 elsewhere).
        changed_positions: (c,) the positions i with states[k+1][i] ≠ states[k][i], ascending,
            row-major over (row, segment).
        previous_tokens: (c,) states[k][i] at those positions (the token before the change).
    """

    tokens: np.ndarray
    by_reveal: np.ndarray
    mask_token: np.ndarray
    reveal: np.ndarray
    change_counts: np.ndarray
    changed_positions: np.ndarray
    previous_tokens: np.ndarray


def encode_states(states: np.ndarray) -> EncodedStates:
    """The smallest exact v2 form of each row of ``states`` (n, S+1, L).

    A row is stored by its reveal segments when that rebuilds it exactly (the mask source:
    final tokens plus one segment index per position); otherwise (the uniform source) by the
    positions that change in each segment and the tokens they held before. Either way
    :func:`decode_states` gives back ``states`` bit for bit.
    """
    n, S1 = states.shape[:2]
    S = S1 - 1
    tokens = states[:, S]
    M = states[:, 0, 0].astype(np.int32)
    revealed = states != M[:, None, None]  # (n, S+1, L)
    # the reveal segment: the last state index still at [MASK] (argmax finds the first revealed)
    reveal = (revealed.argmax(1) - 1).astype(np.int16)
    by_reveal = (_rebuild_by_reveal(tokens, M, np.clip(reveal, 0, None), S) == states).all((1, 2))
    by_reveal &= (reveal >= 0).all(1) & revealed[:, S].all(1)
    mask_token = np.where(by_reveal, M, 0).astype(np.int32)
    reveal = np.where(by_reveal[:, None], reveal, 0).astype(np.int16)
    other = states[~by_reveal]
    changed = other[:, 1:] != other[:, :-1]  # (n', S, L)
    j, k, i = np.nonzero(changed)
    counts = np.zeros((n, S), dtype=np.int64)
    counts[~by_reveal] = changed.sum(2)
    return EncodedStates(
        tokens=np.ascontiguousarray(tokens, dtype=np.int32),
        by_reveal=by_reveal,
        mask_token=mask_token,
        reveal=reveal,
        change_counts=counts,
        changed_positions=i.astype(np.int32),
        previous_tokens=other[j, k, i].astype(np.int32),
    )


def _rebuild_by_reveal(tokens: np.ndarray, M: np.ndarray, reveal: np.ndarray, S: int) -> np.ndarray:
    """states[j, m, i] = tokens[j, i] if m > reveal[j, i] else M[j]; (n, S+1, L)."""
    m = np.arange(S + 1)[None, :, None]
    return np.where(m > reveal[:, None, :], tokens[:, None, :], M[:, None, None]).astype(np.int32)


def decode_states(enc: EncodedStates) -> np.ndarray:
    """The states (n, S+1, L) of :func:`encode_states`' form (its exact inverse)."""
    n, S = enc.change_counts.shape
    states = np.empty((n, S + 1, enc.tokens.shape[1]), dtype=np.int32)
    r = enc.by_reveal
    states[r] = _rebuild_by_reveal(enc.tokens[r], enc.mask_token[r], enc.reveal[r], S)
    # the other rows backwards from x_1: states[k] = states[k+1] with the changed positions
    # of segment k put back to their previous tokens
    rows = np.flatnonzero(~r)
    counts = enc.change_counts[rows]  # (n', S)
    j = np.repeat(np.repeat(rows, S), counts.reshape(-1))
    k = np.repeat(np.tile(np.arange(S), rows.size), counts.reshape(-1))
    states[rows, S] = enc.tokens[rows]
    for seg in range(S - 1, -1, -1):
        states[rows, seg] = states[rows, seg + 1]
        at = k == seg
        states[j[at], seg, enc.changed_positions[at]] = enc.previous_tokens[at]
    return states


def _states_v2(states: np.ndarray, typ: dict) -> list[pa.Array]:
    B, S1, L = states.shape
    enc = encode_states(states)
    r = enc.by_reveal
    tokens = _list_array(np.full(B, L), pa.array(enc.tokens.reshape(-1)), typ["tokens"], "tokens")
    mask = pa.array(enc.mask_token, mask=~r)
    reveal_values = pa.array(enc.reveal[r].reshape(-1))
    reveal = pa.ListArray.from_arrays(
        _offsets(np.where(r, L, 0), "reveal"), reveal_values, typ["reveal"], mask=pa.array(~r)
    )
    counts = enc.change_counts[~r].reshape(-1)
    seg_offsets = _offsets(np.where(~r, S1 - 1, 0), "changed_positions")
    out = [tokens, mask, reveal]
    for name, values in (
        ("changed_positions", enc.changed_positions),
        ("previous_tokens", enc.previous_tokens),
    ):
        inner = _list_array(counts, pa.array(values), typ[name].value_type, name)
        out.append(pa.ListArray.from_arrays(seg_offsets, inner, typ[name], mask=pa.array(r)))
    return out


# --------------------------------------------------------------------------- the decoder
TRAIN_COLUMNS = ("trajectory_id", "times", "states")  # what a trainer reads of a row


class RowError(DataError):
    """Rows that break one invariant of the dataset contract.

    Attributes:
        what: the invariant, as messages quote it (``'times has S+1 = 5 values'``).
        bad: (n,) bool, True for every row that breaks it.
    """

    def __init__(self, what: str, bad: np.ndarray):
        self.what, self.bad = what, np.asarray(bad, dtype=bool)
        rows = np.flatnonzero(self.bad)
        assert rows.size, "a RowError needs a row that breaks the invariant"
        super().__init__(f"{rows.size} row(s) break '{what}' (the first is row {rows[0]})")

    @property
    def first(self) -> int:
        """The first row that breaks the invariant."""
        return int(np.flatnonzero(self.bad)[0])


@dataclass(frozen=True, eq=False)
class TrajectoryRows:
    """n decoded rows of a shard as numpy arrays; the columns that were not read are None.

    Unlike a :class:`TrajectoryBatch`, rows may disagree on their time grid or shaping pattern
    and their values are not range-checked: the row invariants (``*`` predicates below) say
    which rows keep the contract. "Not shaped" decodes one way: segment k of row j stored no
    energies ⇔ ``shaped[j, k]`` is False ⇔ ``energies[j, k]`` is all NaN.

    Attributes:
        ids: (n,) int64 trajectory ids.
        times: (n, S+1) float32 grids.
        states: (n, S+1, L) int32 token ids.
        shard: (n,) int32 shard indices.
        seed: (n,) int64 per-trajectory seeds.
        energies: (n, S, K) float32 candidate energies, NaN where a segment stores none.
        shaped: (n, S) bool, True where segment k of row j stores K energies.
        chosen: (n, S) int16 kept candidates.
        text: n decoded final sequences (str or None).
    """

    ids: np.ndarray
    times: np.ndarray
    states: np.ndarray
    shard: np.ndarray | None = None
    seed: np.ndarray | None = None
    energies: np.ndarray | None = None
    shaped: np.ndarray | None = None
    chosen: np.ndarray | None = None
    text: list[str | None] | None = None

    @property
    def num_rows(self) -> int:
        return int(self.ids.shape[0])

    @property
    def num_segments(self) -> int:
        """S."""
        return int(self.times.shape[1] - 1)

    @property
    def seq_len(self) -> int:
        """L."""
        return int(self.states.shape[2])


def _flat(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column


def _lengths(arr: pa.Array) -> np.ndarray:
    return pc.list_value_length(arr).fill_null(-1).to_numpy(zero_copy_only=False)


def _depth(t: pa.DataType) -> int:
    return 1 + _depth(t.value_type) if pa.types.is_list(t) or pa.types.is_large_list(t) else 0


def _uniform(lengths: np.ndarray, expected: int | None, what: str, per_row: int = 1) -> int:
    """The common list length (``expected``, else the first list's); RowError naming the
    rows with another (``per_row`` consecutive lists belong to one row)."""
    n = expected if expected is not None else (int(lengths[0]) if lengths.size else 0)
    bad = lengths != n
    if bad.any():
        raise RowError(what.format(n=n, n1=n - 1), bad.reshape(-1, per_row).any(1))
    return n


def decode_rows(
    table: pa.Table | pa.RecordBatch,
    columns: tuple[str, ...] | None = None,
    *,
    steps: int | None = None,
    seq_len: int | None = None,
    num_candidates: int | None = None,
) -> TrajectoryRows:
    """Arrow rows of the trajectory schema, v1 or v2 → :class:`TrajectoryRows` (the one decoder).

    The version is read from the columns (:func:`layout_version`); v2 states are rebuilt
    exactly from their stored form (:func:`decode_states`) and float16 energies widened to
    float32, so every reader sees the same arrays whichever version a file has. The shape is
    checked while decoding (every row has S+1 times and states, L tokens per state, S energy
    lists of 0 or K values, S chosen indices, no nulls; v2: one stored form of the states per
    row, reveal segments in 0..S-1, changed positions ascending in 0..L-1): a row that breaks
    it raises :class:`RowError` naming all such rows.

    Args:
        table: rows of one shard (a datasets-read table with nullable fields is fine).
        columns: the fields to decode, as TrajectoryRows / v1 names (default: all;
            ``TRAIN_COLUMNS`` for a trainer); v2's optional text reads as None when absent.
        steps: S, when known (else read from the first row).
        seq_len: L, when known (else read from the first row).
        num_candidates: K, when known; else read from the data (1 when no segment is shaped).
    """
    version = layout_version(table.schema.names)
    schema = trajectory_schema(version)
    fields = trajectory_schema(1).names if columns is None else list(columns)
    want = list(stored_columns(tuple(dict.fromkeys((*TRAIN_COLUMNS, *fields))), version))
    if version == 2 and "text" not in table.schema.names and "text" in want:
        want.remove("text")  # optional in v2
    missing = [c for c in want if c not in table.schema.names]
    if missing:
        raise DataError(
            f"table lacks the column(s) {sorted(set(missing), key=schema.names.index)} of the "
            f"trajectory schema v{version}: it is not a tsdfm trajectory dataset, or it was "
            "altered"
        )
    col = {c: _flat(table.column(c)) for c in want}
    for c, arr in col.items():
        target = schema.field(c)
        if _depth(arr.type) != _depth(target.type) or (c == "text") != pa.types.is_string(arr.type):
            raise DataError(
                f"column {c} is {arr.type}, the trajectory schema v{version} says "
                f"{target.type}: it was written by another schema version, or altered"
            )
        if not target.nullable and arr.null_count:
            raise RowError(f"{c} is not null", arr.is_null().to_numpy(zero_copy_only=False))
    n = table.num_rows
    what = "times has S+1 = {n} values"
    S1 = _uniform(_lengths(col["times"]), None if steps is None else steps + 1, what)
    times = col["times"].flatten().to_numpy().astype(np.float32).reshape(n, S1)
    if version == 1:
        outer = col["states"]
        _uniform(_lengths(outer), S1, "states has S+1 = {n} rows")
        inner = outer.flatten()
        L = _uniform(_lengths(inner), seq_len, "every state has L = {n} tokens", S1)
        states = inner.flatten().to_numpy().astype(np.int32).reshape(n, S1, L)
    else:
        states = decode_states(_stored_states(col, n, S1 - 1, seq_len))
    rows: dict[str, Any] = {"ids": col["trajectory_id"].to_numpy().astype(np.int64)}
    rows.update(times=times, states=states)
    if "shard" in col:
        rows["shard"] = col["shard"].to_numpy().astype(np.int32)
    if "seed" in col:
        rows["seed"] = col["seed"].to_numpy().astype(np.int64)
    if "energies" in col:
        rows.update(_decode_energies(col["energies"], n, S1 - 1, num_candidates))
    if "chosen" in col:
        _uniform(_lengths(col["chosen"]), S1 - 1, "chosen has S = {n} values")
        rows["chosen"] = col["chosen"].flatten().to_numpy().astype(np.int16).reshape(n, S1 - 1)
    if "text" in col:
        rows["text"] = col["text"].to_pylist()
    elif "text" in fields:
        rows["text"] = [None] * n
    return TrajectoryRows(**rows)


def _stored_states(col: dict[str, pa.Array], n: int, S: int, seq_len: int | None) -> EncodedStates:
    """The v2 columns of n rows as an :class:`EncodedStates`, every row's form checked."""
    L = _uniform(_lengths(col["tokens"]), seq_len, "tokens has L = {n} values")
    tokens = col["tokens"].flatten().to_numpy().astype(np.int32).reshape(n, L)
    r = col["mask_token"].is_valid().to_numpy(zero_copy_only=False)
    lengths = {c: _lengths(col[c]) for c in ("reveal", "changed_positions", "previous_tokens")}
    bad = np.where(
        r,
        (lengths["reveal"] != L)
        | (lengths["changed_positions"] != -1)
        | (lengths["previous_tokens"] != -1),
        (lengths["reveal"] != -1)
        | (lengths["changed_positions"] != S)
        | (lengths["previous_tokens"] != S),
    )
    if bad.any():
        raise RowError(
            f"a row stores either mask_token and L = {L} reveal segments, or S = {S} "
            "changed_positions and previous_tokens lists",
            bad,
        )
    mask_token = col["mask_token"].fill_null(0).to_numpy().astype(np.int32)
    reveal = np.zeros((n, L), dtype=np.int16)
    reveal[r] = col["reveal"].flatten().to_numpy().astype(np.int16).reshape(-1, L)
    bad = r & ((reveal < 0) | (reveal >= S)).any(1)
    if bad.any():
        raise RowError(f"reveal holds segments 0..S-1 = {S - 1}", bad)
    rows = np.flatnonzero(~r)
    segments = {c: col[c].flatten() for c in ("changed_positions", "previous_tokens")}
    counts = _lengths(segments["changed_positions"])  # (n' S,)
    bad = np.zeros(n, dtype=bool)
    bad[rows] = (counts != _lengths(segments["previous_tokens"])).reshape(-1, S).any(1)
    if bad.any():
        raise RowError("previous_tokens has one token per changed position", bad)
    positions = segments["changed_positions"].flatten().to_numpy().astype(np.int64)
    previous = segments["previous_tokens"].flatten().to_numpy().astype(np.int32)
    seg = np.repeat(np.arange(counts.shape[0]), counts)
    out_of_order = (seg[1:] == seg[:-1]) & (positions[1:] <= positions[:-1])
    bad_seg = np.zeros(counts.shape[0], dtype=bool)
    bad_seg[seg[1:][out_of_order]] = True
    bad_seg[seg[(positions < 0) | (positions >= L)]] = True
    bad[rows] = bad_seg.reshape(-1, S).any(1)
    if bad.any():
        raise RowError(f"changed_positions rise strictly within 0..L-1 = {L - 1}", bad)
    return EncodedStates(
        tokens=tokens,
        by_reveal=r,
        mask_token=mask_token,
        reveal=reveal,
        change_counts=_scatter(counts, rows, n, S),
        changed_positions=positions.astype(np.int32),
        previous_tokens=previous,
    )


def _scatter(counts: np.ndarray, rows: np.ndarray, n: int, S: int) -> np.ndarray:
    out = np.zeros((n, S), dtype=np.int64)
    out[rows] = counts.reshape(-1, S)
    return out


def _decode_energies(arr: pa.Array, n: int, S: int, num_candidates: int | None) -> dict:
    """energies (n, S, K) with NaN where a segment stores none, and shaped (n, S)."""
    _uniform(_lengths(arr), S, "energies has S = {n} lists")
    segments = arr.flatten()
    counts = _lengths(segments).reshape(n, S)
    stored = np.unique(counts[counts > 0])
    if num_candidates is not None and stored.size == 1 and stored[0] != num_candidates:
        raise RowError(
            f"energies hold K = {stored[0]} candidates, not {num_candidates}", (counts > 0).any(1)
        )
    K = num_candidates or (int(stored.max()) if stored.size else 1)
    bad = ((counts != 0) & (counts != K)).any(1)
    if bad.any():
        raise RowError(f"a segment holds no energies or K = {K}", bad)
    shaped = counts > 0
    energies = np.full((n, S, K), np.nan, dtype=np.float32)
    energies[shaped] = segments.flatten().to_numpy().astype(np.float32).reshape(-1, K)
    return {"energies": energies, "shaped": shaped}


def from_arrow(
    table: pa.Table | pa.RecordBatch, num_candidates: int | None = None
) -> TrajectoryBatch:
    """Inverse of :func:`to_arrow` (exact round trip), through :func:`decode_rows`.

    Args:
        table: rows of one shard (one shard index, one time grid, one shaping pattern).
        num_candidates: K; needed only when no segment was shaped (every energy list empty),
            otherwise read from the data. Defaults to 1 (the blind baseline) in that case.
    """
    if table.num_rows == 0:
        raise DataError("cannot build a TrajectoryBatch from an empty table")
    rows = decode_rows(table, num_candidates=num_candidates)
    assert rows.shard is not None and rows.shaped is not None
    if not (rows.times == rows.times[:1]).all():
        raise DataError("rows have different time grids; a TrajectoryBatch shares one grid")
    if not (rows.shaped == rows.shaped[:1]).all():
        raise DataError("rows shaped different segments; a TrajectoryBatch shares one pattern")
    shard = np.unique(rows.shard)
    if shard.size != 1:
        raise DataError(f"rows come from several shards {shard.tolist()}; read one at a time")
    text = rows.text or []
    return TrajectoryBatch(
        trajectory_id=rows.ids,
        shard=int(shard[0]),
        seed=rows.seed,
        times=rows.times[0],
        states=rows.states,
        energies=rows.energies,
        shaped=rows.shaped[0],
        chosen=rows.chosen,
        text=None if all(t is None for t in text) else text,
    )


def batch_rows(batch: TrajectoryBatch) -> TrajectoryRows:
    """A batch as the rows it encodes to (``decode_rows(to_arrow(batch))``, without Arrow)."""
    B = batch.num_rows
    return TrajectoryRows(
        ids=batch.trajectory_id,
        times=np.broadcast_to(batch.times, (B, batch.times.shape[0])),
        states=batch.states,
        shard=np.full(B, batch.shard, dtype=np.int32),
        seed=batch.seed,
        energies=batch.energies,
        shaped=np.broadcast_to(batch.shaped, (B, batch.num_segments)),
        chosen=batch.chosen,
        text=[None] * B if batch.text is None else list(batch.text),
    )


# --------------------------------------------------------------------------- the footer
MAX_METADATA_BYTES = 256 * 2**10  # a shard's tsdfm metadata is ~2 KB


class MetadataError(DataError):
    """A shard's ``tsdfm`` key-value metadata is absent or unusable; the message says how.

    Attributes:
        metadata: the parsed object when it is a JSON object whose only fault is keys outside
            :data:`METADATA_KEYS` (a lenient reader may use it); else None.
    """

    def __init__(self, message: str, metadata: dict[str, Any] | None = None):
        super().__init__(message)
        self.metadata = metadata


def decode_metadata(raw: bytes | None, *, strict: bool = True) -> dict[str, Any]:
    """The ``tsdfm`` metadata object of a shard from its raw key-value bytes (the one reader).

    Bounded before it is parsed: a shard's metadata is a few kilobytes (config, identities,
    indices), so anything over :data:`MAX_METADATA_BYTES`, nesting too deep for the parser, or
    not a JSON object is refused, never half-read.

    Args:
        raw: the value under :data:`METADATA_KEY`; None when the file has no such key.
        strict: also refuse keys outside :data:`METADATA_KEYS` (verify); a lenient reader
            (build, trainer, inspect) accepts them.

    Raises:
        MetadataError: one line saying what is wrong (callers add the shard and the fix).
    """
    where = "tsdfm key-value metadata"
    if raw is None:
        raise MetadataError("no 'tsdfm' metadata: the file was not written by tsdfm-pipeline")
    if len(raw) > MAX_METADATA_BYTES:
        raise MetadataError(
            f"{where} is {len(raw):,} bytes, over the {MAX_METADATA_BYTES:,}-byte bound"
        )
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MetadataError(f"{where} is not JSON ({str(e).splitlines()[0]})") from None
    except RecursionError:
        raise MetadataError(f"{where} nests too deeply to be a tsdfm record") from None
    if not isinstance(meta, dict):
        raise MetadataError(f"{where} is a JSON {type(meta).__name__}, not an object")
    unknown = sorted(set(meta) - METADATA_KEYS)
    if strict and unknown:
        raise MetadataError(
            f"tsdfm metadata carries unknown key(s) {unknown[:5]}: not written by this "
            "tsdfm-pipeline (or altered)",
            meta,
        )
    return meta


def check_schema_version(meta: dict[str, Any]) -> int:
    """The metadata's ``schema_version`` when this package reads it (:data:`SCHEMA_VERSIONS`),
    else a DataError."""
    version = meta.get("schema_version")
    if isinstance(version, bool) or version not in SCHEMA_VERSIONS:
        known = " and v".join(map(str, SCHEMA_VERSIONS))
        raise DataError(
            f"uses trajectory schema v{version}, but this tsdfm-pipeline reads v{known}: "
            "install the tsdfm-pipeline version that built the dataset"
        )
    return int(version)


def stores_text(meta: dict[str, Any]) -> bool:
    """Whether a shard with this ``tsdfm`` metadata has a text column: always in v1; in v2
    when its build config asked for it (``text: true``)."""
    config = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    return meta.get("schema_version") == 1 or config.get("text") is True


def shard_schema(meta: dict[str, Any]) -> pa.Schema:
    """The Arrow schema of a shard with this ``tsdfm`` metadata (version and text column)."""
    return trajectory_schema(check_schema_version(meta), stores_text(meta))


@dataclass(frozen=True)
class ShardFooter:
    """What a shard's Parquet footer says, without reading the data.

    Attributes:
        rows: number of rows.
        uncompressed_bytes: sum of the row groups' uncompressed sizes.
        max_row_group_bytes: the largest row group (uncompressed).
        schema: the Arrow schema stored in the file (without metadata).
        metadata: the ``tsdfm`` metadata (None when absent or unusable; with unknown keys it is
            read and ``error`` says so).
        error: what is wrong with the metadata (:func:`decode_metadata`, strict), or None.
    """

    rows: int
    uncompressed_bytes: int
    max_row_group_bytes: int
    schema: pa.Schema
    metadata: dict[str, Any] | None
    error: MetadataError | None = None

    @property
    def metadata_problem(self) -> str | None:
        """The error's message, or None."""
        return None if self.error is None else str(self.error)

    def tsdfm(self, strict: bool = False) -> dict[str, Any]:
        """The metadata, or the MetadataError (unknown keys are an error only when strict)."""
        if self.error is not None and (strict or self.metadata is None):
            raise self.error
        assert self.metadata is not None
        return self.metadata


def parquet_footer(file: Any) -> ShardFooter:
    """The footer of a Parquet file (a path or an open binary file); DataError if it is not
    Parquet. Only the footer is read."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(file)
        md, schema = pf.metadata, pf.schema_arrow
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"is not a readable Parquet file ({e})") from None
    raw = (md.metadata or {}).get(METADATA_KEY)
    meta, error = None, None
    try:
        meta = decode_metadata(raw)
    except MetadataError as e:
        meta, error = e.metadata, e
    sizes = [md.row_group(i).total_byte_size for i in range(md.num_row_groups)]
    return ShardFooter(
        rows=md.num_rows,
        uncompressed_bytes=sum(sizes),
        max_row_group_bytes=max(sizes, default=0),
        schema=schema.remove_metadata(),
        metadata=meta,
        error=error,
    )


# --------------------------------------------------------------------------- row invariants
# The contract's row invariants, one named predicate each. A predicate takes decoded columns
# of n rows (TrajectoryRows fields) and returns bad: (n,) bool, True where row j breaks it.
# tsdfm.models.data.integrity.RowRules composes them for the shard writer, verify, the
# trainer's reader and inspect.


def ids_follow_rows(ids: np.ndarray, first_id: int) -> np.ndarray:
    """trajectory_id = shard · rows_per_shard + row: row r of a read whose first row should
    have the id ``first_id`` has the id first_id + r (ids unique and in range)."""
    return ids != first_id + np.arange(ids.shape[0])


def shard_is(shard: np.ndarray, index: int) -> np.ndarray:
    """Every row of shard i carries shard = i."""
    return shard != index


def seeds_follow_ids(seed: np.ndarray, ids: np.ndarray, dataset_seed: int) -> np.ndarray:
    """seed = dataset seed · 2^32 + trajectory_id (tsdfm.models.rng.trajectory_seed)."""
    from tsdfm.models.rng import trajectory_seed

    return seed != trajectory_seed(dataset_seed, ids)


def grid_rises_from_0_to_1(times: np.ndarray) -> np.ndarray:
    """times (n, S+1) is finite and rises strictly from t_0 = 0 to t_S = 1."""
    bad = ~np.isfinite(times).all(1) | (times[:, 0] != 0) | (times[:, -1] != 1)
    return bad | ~(np.diff(times, axis=1) > 0).all(1)


def grid_is(times: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Every row carries exactly the dataset's grid (S+1,) (one build, one grid)."""
    return (times != np.asarray(grid, dtype=np.float32)).any(1)


def energies_where_shaped(shaped: np.ndarray, pattern: np.ndarray) -> np.ndarray:
    """Energies are stored exactly in the segments the navigator shaped (pattern (S,)): K
    values there, an empty list elsewhere ("not shaped")."""
    return (shaped != np.asarray(pattern, dtype=bool)).any(1)


def energies_finite(energies: np.ndarray, shaped: np.ndarray) -> np.ndarray:
    """Every stored energy (n, S, K) is finite (NaN stands only for "not stored")."""
    return (shaped & ~np.isfinite(energies).all(2)).any(1)


def chosen_below_k(chosen: np.ndarray, K: int) -> np.ndarray:
    """0 ≤ chosen < K in every segment."""
    return ((chosen < 0) | (chosen >= K)).any(1)


def chosen_zero_where_unshaped(chosen: np.ndarray, shaped: np.ndarray) -> np.ndarray:
    """chosen = 0 in every segment that stores no energies."""
    return (~shaped & (chosen != 0)).any(1)


def token_ids_nonnegative(states: np.ndarray) -> np.ndarray:
    """Token ids ≥ 0."""
    return (states < 0).any((1, 2))


def token_ids_below(states: np.ndarray, V: int) -> np.ndarray:
    """Token ids < V (the uniform source: every state is data tokens)."""
    return (states >= V).any((1, 2))


def x0_all_mask(states: np.ndarray, M: int) -> np.ndarray:
    """Mask source: x_0 = [MASK]^L."""
    return (states[:, 0] != M).any(1)


def ids_at_most_mask_before_one(states: np.ndarray, M: int) -> np.ndarray:
    """Mask source: token ids ≤ [MASK] = M in every state before t = 1."""
    return (states[:, :-1] > M).any((1, 2))


def no_mask_at_one(states: np.ndarray, M: int) -> np.ndarray:
    """Mask source: no [MASK] is left in the final state x_1."""
    return (states[:, -1] == M).any(1)


def revealed_once(states: np.ndarray, M: int) -> np.ndarray:
    """Mask source: a revealed position keeps its token (revealed once, never re-masked):
    x_{t_k}^i ≠ [MASK] ⇒ x_{t_{k+1}}^i = x_{t_k}^i."""
    return ((states[:, :-1] != M) & (states[:, 1:] != states[:, :-1])).any((1, 2))


def final_ids_below(states: np.ndarray, V: int) -> np.ndarray:
    """Mask source: the final state holds data tokens only, ids < V."""
    return (states[:, -1] >= V).any(1)


def text_all_or_none(text: list[str | None]) -> np.ndarray:
    """A shard has decoded text in every row or in none (a tokenizer decodes every row)."""
    null = np.array([t is None for t in text], dtype=bool)
    return null if 0 < null.sum() < null.size else np.zeros(null.size, dtype=bool)


def infer_mask_token(states: np.ndarray) -> int | None:
    """The [MASK] id when the rows look like the mask source (x_0 a single repeated id that
    no token exceeds), else None."""
    if states.size == 0:
        return None
    first = states[:, 0]
    M = int(first.flat[0])
    return M if (first == M).all() and (states <= M).all() else None
