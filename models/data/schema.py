"""The dataset contract: one Arrow schema and the one record type that flows through the build.

One row = one trajectory of the energy-guided midpoint search on the student grid
t_0 = 0 < t_1 < ... < t_S = 1 (DESIGN §5):

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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tsdfm.models.errors import DataError

SCHEMA_VERSION = 1
METADATA_KEY = b"tsdfm"
# the keys of a shard's tsdfm metadata (DESIGN §5); verify refuses any other
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


def trajectory_schema() -> pa.Schema:
    """The Arrow schema of a trajectory shard (without file metadata)."""
    return pa.schema(
        [
            pa.field("trajectory_id", pa.int64(), nullable=False),
            pa.field("shard", pa.int32(), nullable=False),
            pa.field("seed", pa.int64(), nullable=False),
            pa.field("times", _list_of(pa.float32()), nullable=False),
            pa.field("states", _list_of(_list_of(pa.int32())), nullable=False),
            pa.field("energies", _list_of(_list_of(pa.float32())), nullable=False),
            pa.field("chosen", _list_of(pa.int16()), nullable=False),
            pa.field("text", pa.string(), nullable=True),
        ]
    )


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


def to_arrow(batch: TrajectoryBatch) -> pa.RecordBatch:
    """The batch as a RecordBatch of :func:`trajectory_schema`; B rows.

    Vectorised: every list column is built from one flat numpy buffer and its offsets.
    """
    schema = trajectory_schema()
    B, S, L, K = batch.num_rows, batch.num_segments, batch.seq_len, batch.num_candidates
    typ = {f.name: f.type for f in schema}

    times = _list_array(np.full(B, S + 1), pa.array(np.tile(batch.times, B)), typ["times"], "times")
    tokens = pa.array(batch.states.reshape(-1))
    rows = _list_array(np.full(B * (S + 1), L), tokens, typ["states"].value_type, "states")
    states = _list_array(np.full(B, S + 1), rows, typ["states"], "states")
    seg_lengths = np.tile(np.where(batch.shaped, K, 0), B)  # (B*S,)
    energy_values = pa.array(batch.energies[:, batch.shaped, :].reshape(-1))
    segments = _list_array(seg_lengths, energy_values, typ["energies"].value_type, "energies")
    energies = _list_array(np.full(B, S), segments, typ["energies"], "energies")
    chosen = _list_array(np.full(B, S), pa.array(batch.chosen.reshape(-1)), typ["chosen"], "chosen")
    text = pa.nulls(B, pa.string()) if batch.text is None else pa.array(batch.text, pa.string())
    columns = [
        pa.array(batch.trajectory_id),
        pa.array(np.full(B, batch.shard, dtype=np.int32)),
        pa.array(batch.seed),
        times,
        states,
        energies,
        chosen,
        text,
    ]
    return pa.RecordBatch.from_arrays(columns, schema=schema)


def _conform(table: pa.Table | pa.RecordBatch) -> pa.Table:
    """The table cast to the contract schema, or a DataError naming the difference."""
    if isinstance(table, pa.RecordBatch):
        table = pa.Table.from_batches([table])
    schema = trajectory_schema()
    if table.schema.equals(schema):  # ignores metadata
        return table
    missing = [n for n in schema.names if n not in table.schema.names]
    if missing:
        raise DataError(
            f"table lacks the column(s) {missing} of the trajectory schema v{SCHEMA_VERSION}: "
            "it is not a tsdfm trajectory dataset, or one written by another schema version"
        )
    try:
        return table.select(schema.names).cast(schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise DataError(
            f"table does not fit the trajectory schema v{SCHEMA_VERSION} ({e}); "
            "it was written by another schema version"
        ) from None


def _flat(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column


def _lengths(arr: pa.Array) -> np.ndarray:
    return pc.list_value_length(arr).to_numpy(zero_copy_only=False)


def _fixed(arr: pa.Array, n: int, column: str) -> pa.Array:
    """Flatten a list array whose every list has length n."""
    lengths = _lengths(arr)
    if (lengths != n).any():
        bad = int(np.flatnonzero(lengths != n)[0])
        raise DataError(
            f"column {column}: a list has {lengths[bad]} entries where {n} are expected "
            "(every row of a shard must have the same S and L)"
        )
    return arr.flatten()


def from_arrow(
    table: pa.Table | pa.RecordBatch, num_candidates: int | None = None
) -> TrajectoryBatch:
    """Inverse of :func:`to_arrow` (exact round trip).

    Args:
        table: rows of one shard (one shard index, one time grid, one shaping pattern).
        num_candidates: K; needed only when no segment was shaped (every energy list empty),
            otherwise read from the data. Defaults to 1 (the blind baseline) in that case.
    """
    table = _conform(table)
    B = table.num_rows
    if B == 0:
        raise DataError("cannot build a TrajectoryBatch from an empty table")
    for name in trajectory_schema().names[:-1]:
        if table.column(name).null_count:
            raise DataError(f"column {name} holds nulls; the trajectory schema forbids them")

    times_arr = _flat(table.column("times"))
    S = int(_lengths(times_arr)[0]) - 1
    times = _fixed(times_arr, S + 1, "times").to_numpy().reshape(B, S + 1)
    if not (times == times[:1]).all():
        raise DataError("rows have different time grids; a TrajectoryBatch shares one grid")

    states_rows = _fixed(_flat(table.column("states")), S + 1, "states")
    L = int(_lengths(states_rows)[0])
    states = _fixed(states_rows, L, "states").to_numpy().reshape(B, S + 1, L)

    segments = _fixed(_flat(table.column("energies")), S, "energies")
    seg_lengths = _lengths(segments).reshape(B, S)
    if not (seg_lengths == seg_lengths[:1]).all():
        raise DataError("rows shaped different segments; a TrajectoryBatch shares one pattern")
    shaped = seg_lengths[0] > 0
    Ks = np.unique(seg_lengths[0][shaped])
    if Ks.size > 1:
        raise DataError(f"energy lists have different candidate counts {Ks.tolist()}")
    if Ks.size == 1:
        K = int(Ks[0])
        if num_candidates is not None and num_candidates != K:
            raise DataError(f"energies hold K = {K} candidates, not {num_candidates}")
    else:
        K = 1 if num_candidates is None else int(num_candidates)
    energies = np.full((B, S, K), np.nan, dtype=np.float32)
    energies[:, shaped, :] = segments.flatten().to_numpy().reshape(B, int(shaped.sum()), K)

    shard = pc.unique(table.column("shard")).to_numpy()
    if shard.size != 1:
        raise DataError(f"rows come from several shards {shard.tolist()}; read one at a time")
    text = table.column("text")
    return TrajectoryBatch(
        trajectory_id=table.column("trajectory_id").to_numpy(),
        shard=int(shard[0]),
        seed=table.column("seed").to_numpy(),
        times=times[0],
        states=states,
        energies=energies,
        shaped=shaped,
        chosen=_fixed(_flat(table.column("chosen")), S, "chosen").to_numpy().reshape(B, S),
        text=None if text.null_count == B else text.to_pylist(),
    )
