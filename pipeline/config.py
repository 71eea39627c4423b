"""The build config and its fingerprint.

Everything that decides the bytes of a shard is in :class:`BuildConfig` (together with the
identities of the teacher and compass checkpoints); where the output goes and how many workers
run it are not. The fingerprint is the sha256 of the canonical JSON of those content-defining
values, and it identifies the dataset: a rerun into the same folder resumes only if it matches.

Navigator settings added after datasets were first published (:data:`LATER_NAVIGATOR_FIELDS`)
are recorded only when they differ from their default: a dataset built before they existed
keeps its recorded config, the bytes of its shards (their metadata holds the config) and its
fingerprint, and a build at the default reproduces it exactly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from tsdfm.models.data.schema import SCHEMA_VERSION, SCHEMA_VERSIONS
from tsdfm.models.errors import ConfigError
from tsdfm.models.hashing import sha256_json
from tsdfm.models.navigator import NavigatorConfig
from tsdfm.models.rng import trajectory_seed

PRECISIONS = ("fp32", "bf16")
# teacher fields newer than the first published datasets → their defaults (left out at these)
LATER_FIELDS = {
    "teacher_format": None,
    "trust_remote_code": False,
    "compile": False,
    "max_memory": None,
}
# recorded, but not content: the trajectories do not depend on them (the build is batch-invariant)
EXECUTION_FIELDS = ("max_memory",)
# navigator fields newer than the first published datasets → their defaults (left out at these)
LATER_NAVIGATOR_FIELDS = {
    f.name: f.default
    for f in fields(NavigatorConfig)
    if f.name in ("teacher_temperature", "reveal_order", "shared_reveals")
}


@dataclass(frozen=True)
class BuildConfig:
    """A trajectory dataset build.

    Args:
        teacher: teacher checkpoint (directory or org/name[@rev]).
        compass: compass checkpoint, or None for a blind (K = 1) dataset.
        shards: number of Parquet shards.
        trajectories_per_shard: rows per shard.
        batch_size: trajectories navigated together (the B of B·K rows per forward pass).
        navigator: S, N, K, τ, selection, selection temperature, teacher temperature.
        seed: dataset seed; trajectory i has seed ``seed · 2^32 + i``.
        precision: fp32, or bf16 autocast on CUDA.
        allow_teacher_mismatch: accept a compass trained on another teacher's states (warns).
        teacher_format: the teacher's family (``tsdfm.models.teachers.families``), None to
            detect it from its config.json; recorded only when given.
        trust_remote_code: allow a remote-code teacher (MDLM, Duo) to run its own code;
            recorded only when on (the code's hash is part of the teacher's identity).
        schema_version: the dataset schema the shards are written in (docs/schema.md): 2, the
            information-minimal layout (default), or 1, full states (what older releases read).
        text: store the decoded final text; None: the version's default (v1 stores it when the
            teacher has a tokenizer, v2 has no text column). False under v1 writes null text.
        compile: run the teacher and compass forwards through ``torch.compile``. Compiled
            kernels round differently (logits differ by ~1e-5 on CPU), so the shards are not
            bit-identical to an uncompiled build's: it is part of the fingerprint, recorded
            only when on.
        max_memory: GiB of activation memory per worker; each worker then navigates the
            largest batch (at most ``batch_size``) whose peak activations fit, measured on
            CUDA by a probe forward, estimated from the model's shape on CPU
            (:func:`tsdfm.pipeline.worker.fit_batch`). A shard's bytes do not depend on the
            batch, so it is recorded only when set and is not part of the fingerprint.
    """

    teacher: str
    compass: str | None = None
    shards: int = 4
    trajectories_per_shard: int = 32
    batch_size: int = 32
    navigator: NavigatorConfig = field(default_factory=NavigatorConfig)
    seed: int = 0
    precision: str = "fp32"
    allow_teacher_mismatch: bool = False
    teacher_format: str | None = None
    trust_remote_code: bool = False
    schema_version: int = SCHEMA_VERSION
    text: bool | None = None
    compile: bool = False
    max_memory: float | None = None

    def __post_init__(self) -> None:
        if self.teacher_format is not None:
            from tsdfm.models.teachers.families import family

            family(self.teacher_format)  # a one-line error naming the families
        for name in ("shards", "trajectories_per_shard", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        if self.shards > 99999:
            raise ConfigError(f"shards={self.shards} exceeds the 5-digit shard names (99999)")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision {self.precision!r}; use fp32 or bf16")
        if self.navigator.candidates > 1 and self.compass is None:
            raise ConfigError(
                f"K={self.navigator.candidates} candidates need a compass to choose between "
                "them; pass --compass CKPT or use --k 1 for a blind dataset"
            )
        if self.navigator.selection == "tilt" and self.compass is None:
            raise ConfigError(
                "--selection tilt adds a token-ratio compass's log-ratios to the teacher's; pass "
                "--compass CKPT (compass train --head tokens)"
            )
        if self.seed < 0 or self.seed >= 2**30:
            raise ConfigError(f"seed={self.seed} must lie in [0, 2^30)")
        if isinstance(self.schema_version, bool) or self.schema_version not in SCHEMA_VERSIONS:
            raise ConfigError(
                f"schema_version={self.schema_version!r}; use "
                f"{' or '.join(map(str, SCHEMA_VERSIONS))} (docs/schema.md)"
            )
        if not isinstance(self.compile, bool):
            raise ConfigError(f"compile={self.compile!r} must be true or false")
        if self.max_memory is not None and (
            isinstance(self.max_memory, bool)
            or not isinstance(self.max_memory, int | float)
            or not self.max_memory > 0
        ):
            raise ConfigError(
                f"max_memory={self.max_memory!r} must be a positive number of GiB (or omitted "
                "for a fixed --batch-size)"
            )
        if self.text is not None and not isinstance(self.text, bool):
            raise ConfigError(f"text={self.text!r} must be true, false or null (the default)")

    @property
    def stores_text(self) -> bool:
        """Whether shards store the decoded final text (see ``text``)."""
        return self.text if self.text is not None else self.schema_version == 1

    @property
    def total_trajectories(self) -> int:
        return self.shards * self.trajectories_per_shard

    def trajectory_seed(self, trajectory_id: int) -> int:
        return trajectory_seed(self.seed, trajectory_id)

    def to_dict(self) -> dict:
        """The config as recorded in the manifest and every shard (see the module docstring)."""
        d = asdict(self)
        for name, default in LATER_FIELDS.items():  # recorded only when set
            if d[name] == default:
                del d[name]
        # absent means v1 and the version's text default: datasets built before these fields
        # existed keep their recorded config and fingerprint
        if d["schema_version"] == 1:
            del d["schema_version"]
        if d["text"] is None:
            del d["text"]
        nav = d["navigator"]
        for name, default in LATER_NAVIGATOR_FIELDS.items():
            if nav[name] == default:
                del nav[name]
        return d

    @staticmethod
    def from_dict(d: dict) -> BuildConfig:
        d = dict(d)
        d.setdefault("schema_version", 1)  # a recorded config without it is a v1 dataset's
        d["navigator"] = NavigatorConfig(**d.get("navigator", {}))
        return BuildConfig(**d)

    def content(self, teacher_identity: str, compass_identity: str | None) -> dict:
        """The values that decide a shard's bytes (checkpoint specs replaced by identities)."""
        d = self.to_dict()
        for key in (
            "teacher",
            "compass",
            "allow_teacher_mismatch",
            "teacher_format",
            "trust_remote_code",
            *EXECUTION_FIELDS,
        ):
            d.pop(key, None)  # the teacher identity covers its family and its code
        d["teacher_identity"] = teacher_identity
        d["compass_identity"] = compass_identity
        return d

    def fingerprint(self, teacher_identity: str, compass_identity: str | None) -> str:
        content = self.content(teacher_identity, compass_identity)
        return sha256_json(content, "the build config", ConfigError)
