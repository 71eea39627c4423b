"""Student distillation from a frozen trajectory dataset (no Ray, no teacher at training time).

The student is the teacher's backbone with FS-DFM step-size conditioning, initialised from the
teacher (``student_from_teacher``: the new branches start at zero, so step 0 is the teacher).
Its step count S is the dataset's: the grid t_0 = 0 < … < t_S = 1 of the recorded
trajectories. Every segment k of a trajectory is an example (x_{t_k}, t_k, h_k = t_{k+1} − t_k)
with the targets x_{t_{k+1}} (the trajectory's own next midpoint) and x_1 (its final sequence).

Loss (``tsdfm.models.losses.segment_loss``): the negative log-likelihood of the recorded segment
x_t → x_{t+h} under the student's own S-step jump rule,

    ℓ(θ) = −Σ_i log[ (1 − q) · δ(x_{t+h}^i, x_t^i) + q · p_θ(x_{t+h}^i | x_t, t, h) ],
    q = (κ(t+h) − κ(t)) / (1 − κ(t)),

which under the mask source is, up to θ-free terms, the cross-entropy toward x_{t+h}^i on the
positions the segment revealed:

    ℓ(θ) = −Σ_{i: x_t^i = [M], x_{t+h}^i ≠ [M]} log p_θ(x_{t+h}^i | x_t, t, h)   (+ const).

Summed over the S segments this is −log P_θ(trajectory) of the S-step sampler, so its
expectation over the dataset is KL(P_shaped ‖ P_θ) between the path measures of the shaped
builder and the student chain (up to the dataset's entropy), and by the data-processing
inequality KL(P_shaped(x_1) ‖ P_θ(x_1)) ≤ KL(P_shaped(path) ‖ P_θ(path)): driving the loss down
makes the S-step sampler with the jump rule reproduce the shaped trajectories, landing in one
step of size h where the shaped trajectory landed. The optimum per position is the shaped
segment's own marginal P(x_{t+h}^i = v | x_t, i revealed), which carries the compass's choice
at that midpoint. (For a perfect blind teacher it equals the posterior p(x_1^i | x_t), which
is the DFM target; with shaping they differ, and the segment target is the one the student's
step samples from.) An optional λ-weighted cross-entropy toward x_1 on the positions a segment
left masked (``--final-weight``) trades that exactness for lower variance; see docs/distill.md.

The loop is the one the other trainers share (``tsdfm.models.train.loop``): AdamW (β = 0.9, 0.95;
no decay on biases, norm gains and embeddings) with linear warmup and cosine decay, gradient
clipping, gradient accumulation, an EMA of the weights, resumable checkpoints (model, optimizer,
EMA, step, data position, the run's generator; pickle-free), metrics.jsonl. This module adds
bf16 autocast on CUDA, a held-out loss on a deterministic split of trajectory ids, throughput
metrics and the trackers of ``report_to`` (TensorBoard, W&B, Trackio). No draw uses torch's
global RNG: the loader's order is a function of (seed, epoch, stream, window), and dropout, if
the backbone has any, runs under the loop's per-micro-batch seed. A resumed run continues
bit-for-bit: the data position seeks straight to the next batch, and the batch sequence does
not depend on the number of loader workers.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath

import torch

from tsdfm.models.checkpoint import Checkpoint, save_checkpoint
from tsdfm.models.data.trajectories import (
    ExampleBatch,
    Examples,
    LoaderConfig,
    TrajectoryLoader,
    TrajectorySource,
    merge_lane_states,
    open_trajectory_dataset,
    table_arrays,
)
from tsdfm.models.devices import check_device, resolve_device
from tsdfm.models.errors import CheckpointError, ConfigError
from tsdfm.models.flow_model import FlowModel, student_from_teacher
from tsdfm.models.losses import segment_loss
from tsdfm.models.train.common import (
    LOCK_FILE,
    METRICS_FILE,
    RUN_CONFIG_FILE,
    STATE_JSON,
    RunLock,
    RunStore,
    check_run_config,
    latest_checkpoint,
    seeded,
)
from tsdfm.models.train.distributed import (
    World,
    barrier,
    broadcast_object,
    check_sharding,
    destroy_process_group,
    device_for,
    gather_objects,
    init_process_group,
    reduce_max,
    reduce_sum,
    shard_model,
    world_from_env,
)
from tsdfm.models.train.loop import (
    Task,
    TrainLoop,
    Updater,
    evaluating,
    loop_config,
    optim_config,
)
from tsdfm.models.train.trackers import check_available, parse_report_to

CONTINUABLE = ("steps", "checkpoint_every", "eval_every", "log_every")  # --resume-from may change


class DistillWarning(UserWarning):
    """Something the user asked for that works but deserves a second look."""


@dataclass(frozen=True)
class DistillConfig:
    """A distillation run.

    Args:
        data: dataset folder, Hub id ``org/name[@revision]``, ``hf://datasets/…`` or any
            fsspec URL (``tsdfm.models.data.trajectories.parse_dataset_spec``).
        init: teacher (or student, to continue) checkpoint: folder or ``org/name[@rev]``.
        out: run folder (checkpoints/, final/, metrics.jsonl, run_config.json), local or an
            fsspec URL (``tsdfm.models.train.common.RunStore``).
        steps: optimizer steps.
        batch_size: examples (segments) per micro-batch.
        grad_accum: micro-batches per optimizer step.
        lr, warmup, weight_decay, grad_clip, ema: optimisation (ema = 0 switches EMA off).
        final_weight: λ of the auxiliary cross-entropy toward x_1 (0 = the exact segment NLL).
        student_steps: the S the student is meant to sample with; None = the dataset's grid.
        allow_step_mismatch: accept a student_steps that differs from the dataset's S (warns).
        shuffle_buffer: trajectories per shuffled window of a shard stream.
        streams: shard streams read in parallel (part of the batch sequence).
        heldout_fraction: share of trajectory ids held out of training.
        heldout_trajectories: held-out trajectories scored at every evaluation.
        checkpoint_every, eval_every, log_every: steps between checkpoints, held-out
            evaluations and metrics lines.
        seed: seed of the data order (and of dropout, if the backbone has any).
        precision: "bf16" (autocast on CUDA; no effect on CPU) or "fp32".
        device: "auto", "cpu" or "cuda[:i]" (not part of the run's identity).
        num_workers: loader worker processes (not part of the run's identity).
        verify: check every shard's sha256 against the dataset's manifest.json before
            reading it and every row against the dataset contract (on by default; recorded
            in the student's provenance; not part of the run's identity).
        report_to: trackers that also get the metrics (``tsdfm.models.train.trackers``;
            a comma string or names; empty: metrics.jsonl only; not part of the identity).
        resume_from: a distill run folder (or its URL) to continue in ``out``: its newest
            checkpoint (weights, optimizer moments, EMA, data position) is this run's start
            while ``out`` has no checkpoint of its own; its config must be this one except
            the run length and the logging intervals (:data:`CONTINUABLE`).
        fsdp: shard the student's weights, gradients, optimizer state and EMA over the
            processes of a ``torchrun`` job (FSDP2) instead of replicating it (DDP); for a
            student that does not fit one device. Checkpoints are written in full, in the
            format of any other run (not part of the identity: a run may resume either way).
        compile: ``torch.compile`` the student's training forward (the held-out loss and the
            saved model are the eager module; not part of the identity, recorded in the
            metrics lines).
        trust_remote_code: allow a remote-code adapter teacher (MDLM, Duo), or its student, to
            run its model's code; the student carries that code, its sha256 recorded (not part
            of the identity: the code's hashes are).
    """

    data: str
    init: str
    out: str
    steps: int = 2000
    batch_size: int = 64
    grad_accum: int = 1
    lr: float = 3e-4
    warmup: int = 100
    weight_decay: float = 0.03
    grad_clip: float = 1.0
    ema: float = 0.9995
    final_weight: float = 0.0
    student_steps: int | None = None
    allow_step_mismatch: bool = False
    shuffle_buffer: int = 256
    streams: int = 4
    heldout_fraction: float = 0.02
    heldout_trajectories: int = 64
    checkpoint_every: int = 500
    eval_every: int = 250
    log_every: int = 10
    seed: int = 0
    precision: str = "bf16"
    device: str = "auto"
    num_workers: int = 2
    verify: bool = True
    report_to: tuple[str, ...] = ()
    resume_from: str | None = None
    fsdp: bool = False
    compile: bool = False
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "report_to", parse_report_to(self.report_to))
        check_available(self.report_to)
        for name in ("steps", "grad_accum", "checkpoint_every", "eval_every", "log_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        if not self.lr > 0 or self.warmup < 0 or not 0 <= self.ema < 1:
            raise ConfigError("lr must be > 0, warmup >= 0 and ema in [0, 1)")
        if self.grad_clip <= 0 or self.weight_decay < 0 or self.final_weight < 0:
            raise ConfigError("grad_clip must be > 0, weight_decay and final_weight >= 0")
        if self.student_steps is not None and self.student_steps < 1:
            raise ConfigError(f"student_steps={self.student_steps} must be a positive integer")
        if self.heldout_trajectories < 0 or self.num_workers < 0:
            raise ConfigError("heldout_trajectories and num_workers must be >= 0")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"precision {self.precision!r}; use 'fp32' or 'bf16'")
        check_device(self.device)
        if self.resume_from is not None and _same_place(self.resume_from, self.out):
            raise ConfigError(
                f"--resume-from {self.resume_from} is --out itself; a run continues in a new "
                "--out (rerunning the same command resumes a stopped run in place)"
            )
        self.loader_config()  # validates the loader's fields

    def loader_config(self) -> LoaderConfig:
        return LoaderConfig(
            batch_size=self.batch_size,
            shuffle_buffer=self.shuffle_buffer,
            streams=self.streams,
            heldout_fraction=self.heldout_fraction,
            seed=self.seed,
        )

    def identity_dict(self) -> dict:
        """The fields that decide the run's result (what a resumed run must share)."""
        d = asdict(self)
        for key in (
            "out",
            "device",
            "num_workers",
            "verify",
            "report_to",
            "resume_from",
            "fsdp",
            "compile",
            "trust_remote_code",
        ):
            d.pop(key)
        return d


def _same_place(a: str, b: str) -> bool:
    if "://" in a or "://" in b:
        return a.rstrip("/") == b.rstrip("/")
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


@dataclass
class DistillResult:
    final_dir: Path
    identity: str
    steps: int
    student_steps: int
    final_loss: float
    heldout_loss: float | None
    history: list[dict]
    warnings: list[str]
    location: str = ""  # where the final model is: final_dir, or its URL in an object store


# --------------------------------------------------------------------------- compatibility
def _tokenizer_identity(ckpt: Checkpoint) -> str | None:
    path = ckpt.directory / "tokenizer.json"
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def check_vocabulary(source: TrajectorySource, ckpt: Checkpoint) -> None:
    """The dataset's tokens must be the checkpoint's: same L, ids in range, same [MASK]."""
    mc = ckpt.config
    if source.seq_len != mc.seq_len:
        raise CheckpointError(
            f"dataset {source.ref} has sequences of L={source.seq_len} tokens, checkpoint "
            f"{ckpt.spec} L={mc.seq_len}; use the teacher that built the dataset as --init"
        )
    first = next(source.iter_tables(0, 16), None)
    rows = table_arrays(first, source.times)
    top = int(rows.states.max())
    if top >= mc.input_vocab:
        raise CheckpointError(
            f"dataset {source.ref} holds token id {top}, but checkpoint {ckpt.spec} has a "
            f"vocabulary of {mc.input_vocab} ids: the vocabularies differ; use the teacher that "
            "built the dataset (or one with its tokenizer) as --init"
        )
    if mc.source == "mask":
        x_0 = rows.states[:, 0]
        if not (x_0 == mc.mask_token_id).all():
            seen = sorted({int(v) for v in x_0.reshape(-1)[:8]})
            raise CheckpointError(
                f"dataset {source.ref} starts its trajectories from token(s) {seen}, but "
                f"checkpoint {ckpt.spec} uses [MASK] = {mc.mask_token_id} (mask source, "
                f"{mc.vocab_size} data tokens): the vocabularies differ; use the teacher that "
                "built the dataset as --init"
            )


def _teacher_warning(source: TrajectorySource, ckpt: Checkpoint) -> str | None:
    want = source.metadata.get("teacher_identity")
    have = ckpt.identity
    if ckpt.config.role == "student":
        have = ckpt.config.provenance.get("teacher_identity", have)
    if want is None or want == have:
        return None
    msg = (
        f"dataset {source.ref} was built with teacher {str(want)[:23]}…, but --init "
        f"{ckpt.spec} is {'a student of ' if ckpt.config.role == 'student' else ''}teacher "
        f"{str(have)[:23]}…; the student starts from another model than the one it imitates"
    )
    tok = source.metadata.get("tokenizer_identity")
    if tok is not None and tok != _tokenizer_identity(ckpt):
        msg += " (its tokenizer file differs too)"
    return msg


def resolve_student_steps(
    source: TrajectorySource, ckpt: Checkpoint, cfg: DistillConfig
) -> tuple[int, str | None]:
    """(S to record in the student, warning) — the dataset's S unless told otherwise."""
    S = source.num_steps
    asked = cfg.student_steps
    origin = "--student-steps"
    if asked is None and ckpt.config.role == "student":
        asked = ckpt.config.provenance.get("student_steps")
        origin = f"the --init student ({ckpt.spec})"
    if asked is None or asked == S:
        return S, None
    msg = (
        f"{origin} asks for S={asked} steps, but dataset {source.ref} has a grid of S={S} "
        f"steps (h = {[round(float(h), 4) for h in (source.times[1:] - source.times[:-1])]})"
    )
    if not cfg.allow_step_mismatch:
        raise ConfigError(
            f"{msg}; pass --allow-step-mismatch to train on this grid anyway, or use a dataset "
            f"built with -S {asked}"
        )
    return int(asked), msg + "; training on the dataset's grid as asked (--allow-step-mismatch)"


def build_student(init: Checkpoint, seed: int = 0) -> FlowModel:
    """A teacher becomes a step-conditioned student; a student continues as it is.

    The new branches' inner layers are initialised under ``seed`` (their output layers start
    at zero), so the same run config gives the same student.
    """
    from tsdfm.models.teachers.adapter import AdaptedDenoiser
    from tsdfm.models.teachers.student import AdapterStudent, student_from_adapter

    with seeded(seed):
        if isinstance(init.model, AdaptedDenoiser):
            return student_from_adapter(init)
        if isinstance(init.model, AdapterStudent):
            return copy.deepcopy(init.model)
        if init.config.role == "teacher":
            return student_from_teacher(init.model)
        student = FlowModel(init.config)
    student.load_state_dict(init.model.state_dict())
    return student


def _saved_tokenizer(init: Checkpoint):
    """The tokenizer file a student of ``init`` carries: an adapter teacher's own (model ids)."""
    from tsdfm.models.teachers.adapter import SolverTokenizer

    tok = init.tokenizer
    return tok.tokenizer if isinstance(tok, SolverTokenizer) else tok


def open_init(spec: str, trust_remote_code: bool = False) -> Checkpoint:
    """The --init checkpoint: this project's teacher or student, an adapter teacher
    (``tsdfm.models.teachers.open_teacher``; a remote-code one only with
    ``trust_remote_code``) or an adapter student (``tsdfm.models.teachers.student``): the
    generators ``sample`` and ``eval`` open, on the CPU."""
    from tsdfm.models.eval.sampling import open_model

    return open_model(spec, "cpu", trust_remote_code)


def _extra_files(init: Checkpoint) -> dict[str, Path | bytes]:
    """Files to copy along into every checkpoint: the data file named in --init's
    config.json (the synthetic language), and a remote-code adapter's model code (its
    bytes as checked against their sha256, ``tsdfm.models.teachers.student.student_code``)."""
    from tsdfm.models.teachers.student import student_code

    files: dict[str, Path | bytes] = dict(student_code(init))
    path = init.data_file()
    if path is None or not path.is_file():
        return files
    name = PurePosixPath(str(init.config.data["language"]).replace("\\", "/"))
    files[name.as_posix()] = path  # the name config.json gives it (in a Hub snapshot a link)
    return files


def _device(device: str) -> torch.device:
    return torch.device(resolve_device(device))


def check_compiler(device: torch.device) -> None:
    """``--compile`` on a CPU needs a C compiler for inductor's kernels: one line without."""
    import shutil

    if device.type == "cpu" and not any(shutil.which(c) for c in ("cc", "gcc", "clang")):
        raise ConfigError(
            "--compile on CPU needs a C compiler (cc, gcc or clang) for torch.compile's "
            "kernels; install one or train without --compile"
        )


# --------------------------------------------------------------------------- the step
class StudentStep:
    """One optimizer step on micro-batches: the segment loss through the loop's
    :class:`tsdfm.models.train.loop.Updater` (accumulation, clipping, AdamW, EMA).

    Shared by the trainer and benchmarks/distill_loader.py (which feeds it from memory).

    Attributes:
        updater: the update rule (``opt`` and ``ema`` are its optimizer and EMA).
        examples, data_wait: examples read, and seconds waited for batches, since the last
            :meth:`take_counts`.
    """

    def __init__(
        self,
        model: FlowModel,
        cfg: DistillConfig,
        device: torch.device,
        world: World | None = None,
    ):
        self.model, self.cfg, self.device = model, cfg, device
        self.world = world if world is not None else World()
        self.path = model.config.path()
        self.net: torch.nn.Module = model  # what the training forward runs (DDP: the replica)
        replica = None
        sharded = bool(getattr(cfg, "fsdp", False)) and self.world.distributed
        if sharded:  # FSDP2: the model itself is sharded in place
            shard_model(model, self.world, device)
        elif self.world.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [device] if device.type == "cuda" else None
            replica = self.net = DistributedDataParallel(model, device_ids=ids)
        if getattr(cfg, "compile", False):
            check_compiler(device)
            self.net = torch.compile(self.net)
        self.updater = Updater(
            model, optim_config(cfg), cfg.seed, self.world, replica, sharded=sharded
        )
        self.opt, self.ema = self.updater.opt, self.updater.ema
        self.examples, self.data_wait = 0, 0.0

    def loss(self, batch: ExampleBatch, net: torch.nn.Module | None = None) -> torch.Tensor:
        logits = (net if net is not None else self.model)(batch.x_t, batch.t, batch.h)
        return segment_loss(
            logits,
            batch.x_t,
            batch.x_next,
            batch.x_1,
            batch.t,
            batch.h,
            self.path,
            self.cfg.final_weight,
        )

    def micro_loss(self, next_batch: Callable[[], ExampleBatch]) -> torch.Tensor:
        """The loss of the next micro-batch (counting its examples and the wait for it)."""
        t0 = time.perf_counter()
        batch = next_batch().to(self.device, non_blocking=True)
        self.data_wait += time.perf_counter() - t0
        self.examples += len(batch)
        return self.loss(batch, self.net)

    def take_counts(self) -> tuple[int, float]:
        """(examples, data_wait) since the last call; resets them."""
        counts = (self.examples, self.data_wait)
        self.examples, self.data_wait = 0, 0.0
        return counts

    def __call__(self, step: int, next_batch: Callable[[], ExampleBatch]) -> dict:
        """Run optimizer step ``step`` (0-based) on ``grad_accum`` batches from next_batch()."""
        self.take_counts()
        m = self.updater(step, lambda: self.micro_loss(next_batch))
        examples, wait = self.take_counts()
        return {**m, "examples": examples, "data_wait": wait}

    def heldout_loss(self, examples: list[ExampleBatch]) -> float | None:
        """Mean segment loss of the held-out batches under the EMA weights."""
        with evaluating(self.model, self.ema):
            return self.mean_loss(examples)

    def mean_loss(self, examples: list[ExampleBatch]) -> float | None:
        """Mean segment loss per example of ``examples`` under the model's current weights
        and mode (None for no batches)."""
        if not examples:
            return None
        total, n = 0.0, 0
        for batch in examples:
            b = batch.to(self.device)
            total += self.loss(b).item() * len(b)
            n += len(b)
        return total / n


class DistillTask(Task):
    """The loop's view of a distillation run: micro-batches from the trajectory loader,
    throughput over each metrics line's window, the held-out segment loss, the loader's
    position as resumable state.

    Args:
        trainer: the step (model, loss, counters).
        loader: the training batches.
        held_batches: the held-out batches (empty: no held-out loss).
        init: the --init checkpoint (its tokenizer travels with every checkpoint).
        extra_files: data files copied into every checkpoint.
    """

    name = "distill"

    def __init__(
        self,
        trainer: StudentStep,
        loader: TrajectoryLoader,
        held_batches: list[ExampleBatch],
        init: Checkpoint,
        extra_files: dict[str, Path],
    ):
        self.trainer, self.model, self.loader = trainer, trainer.model, loader
        self.held_batches, self.init, self.extra_files = held_batches, init, extra_files
        self.batches: Iterator[ExampleBatch] | None = None
        self.notes: list[str] = []  # what a resume could not keep exact
        self.window = {"examples": 0, "wait": 0.0, "t0": time.perf_counter()}

    def loss(self, step: int, gen: torch.Generator) -> torch.Tensor:
        if self.batches is None:  # after a resume has set the loader's position
            self.batches = iter(self.loader)
            self.window["t0"] = time.perf_counter()
        return self.trainer.micro_loss(lambda: next(self.batches))

    def describe(self) -> dict:
        examples, wait = self.trainer.take_counts()
        world, device = self.trainer.world, self.trainer.device
        if world.distributed:  # the job's examples; the wait of the rank that waited most
            examples = int(reduce_sum(world, [examples], device)[0])
            wait = reduce_max(world, [wait], device)[0]
        self.window["examples"] += examples
        self.window["wait"] += wait
        elapsed = max(time.perf_counter() - self.window["t0"], 1e-9)
        how = {}  # how the job ran, when not the default (not numbers: trackers skip them)
        if self.trainer.updater.sharded:
            how["sharding"] = "fsdp"
        if getattr(self.trainer.cfg, "compile", False):
            how["compiled"] = True
        return {
            "examples_per_second": self.window["examples"] / elapsed,
            "data_wait_share": self.window["wait"] / elapsed,
            "epoch": self.loader.state.epoch,
            **how,
        }

    def evaluate(self) -> dict:
        return {"heldout_loss": self.trainer.mean_loss(self.held_batches)}

    def logged(self, line: dict) -> None:
        self.window = {"examples": 0, "wait": 0.0, "t0": time.perf_counter()}

    def save(self, directory: Path) -> None:
        model = self.trainer.updater.saved_model()  # FSDP: the full weights gathered
        save_checkpoint(directory, model, _saved_tokenizer(self.init), self.extra_files)

    def state_dict(self) -> dict:
        """The job's data position (every rank's lane, gathered) and its number of processes."""
        world = self.trainer.world
        lanes = gather_objects(world, self.loader.state_dict())
        return {"data": merge_lane_states(lanes), "world_size": world.size}

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state["data"])
        saved, now = int(state.get("world_size", 1)), self.trainer.world.size
        if saved != now:
            self.notes.append(
                f"resuming on {now} process(es) a run checkpointed by {saved}: the global batch "
                "and every shard stream's position are kept (no trajectory of the epoch is "
                "read twice or skipped), but from here on the streams' batches are dealt in "
                f"{now} lane(s) instead of {saved} and gradients are summed in another order, "
                f"so the weights are not those of an uninterrupted {saved}-process run"
            )

    def close(self) -> None:
        if self.batches is not None:
            self.batches.close()


# --------------------------------------------------------------------------- the run
@dataclass
class PreparedRun:
    """A checked run: the dataset, the --init checkpoint (and the data files it names, to
    copy into every student checkpoint) and the student's S."""

    cfg: DistillConfig
    source: TrajectorySource
    init: Checkpoint
    student_steps: int
    device: torch.device
    warnings: list[str]
    extra_files: dict[str, Path]


def prepare_run(cfg: DistillConfig, warn: Callable[[str], None] | None = None) -> PreparedRun:
    """Open the dataset and the checkpoint and check that they fit (fails before training).

    Args:
        cfg: the run.
        warn: called with each warning (default: ``warnings.warn`` with DistillWarning).
    """
    issued: list[str] = []
    check_sharding(world_from_env(), cfg.fsdp)
    if cfg.compile:
        check_compiler(_device(cfg.device))
    device = _device(cfg.device)
    source = open_trajectory_dataset(cfg.data, verify=cfg.verify)
    init = open_init(cfg.init, cfg.trust_remote_code)
    check_vocabulary(source, init)
    mc = init.config
    source = source.with_vocabulary(
        mc.vocab_size, mc.mask_token_id if mc.source == "mask" else None
    )
    S, step_msg = resolve_student_steps(source, init, cfg)
    for msg in (_teacher_warning(source, init), step_msg):
        if msg:
            issued.append(msg)
            if warn is not None:
                warn(msg)
            else:
                warnings.warn(msg, DistillWarning, stacklevel=2)
    return PreparedRun(cfg, source, init, S, device, issued, _extra_files(init))


def train_student(
    cfg: DistillConfig | PreparedRun,
    progress: Callable[[int, int, dict], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> DistillResult:
    """Distil (or resume distilling) a student from a trajectory dataset.

    Under ``torchrun`` every process calls this (``tsdfm.models.train.distributed``): rank r
    reads lane r of the shard streams and computes A/W of each step's micro-batches; rank 0
    alone writes the run folder, which it locks for the job (:class:`RunLock`).

    Args:
        cfg: the run, or a run already checked by :func:`prepare_run`.
        progress: called as progress(step, total, metrics) after every optimizer step.
        warn: called with each warning (default: ``warnings.warn`` with DistillWarning).
    """
    world = world_from_env()
    run = cfg if isinstance(cfg, PreparedRun) else prepare_run(cfg, warn)
    cfg, source, init = run.cfg, run.source, run.init
    device = device_for(world, run.device)
    init_process_group(world, device)
    say = warn or (lambda m: warnings.warn(m, DistillWarning, stacklevel=3))
    issued = list(run.warnings)
    store = RunStore(cfg.out)  # --out in an object store: a staging folder, uploaded
    out = store.local
    data_info = source.provenance()
    lock = RunLock(out, world.job)
    origin = None if cfg.resume_from is None else RunStore(cfg.resume_from)
    if world.local_rank == 0:  # one copy of the store's run per machine
        store.pull()
        if origin is not None:
            origin.pull()
    barrier(world)
    record = {"run": cfg.identity_dict(), "data": data_info, "init_identity": init.identity}
    if origin is not None:
        record["resume_from"] = origin.where()

    def claim() -> str | None:
        note = lock.acquire()
        try:
            if origin is not None and latest_checkpoint(out) is None:
                check_continuable(origin, record)
            check_run_config(
                out,
                record,
                names={"data": "dataset", "init_identity": "init", "resume_from": "--resume-from"},
            )
            store.push(LOCK_FILE)
            store.push(RUN_CONFIG_FILE)
        except BaseException:
            lock.release()  # a refused run leaves no lock behind
            raise
        return note

    note = on_main(world, claim)
    try:
        for msg in [note] if note else []:
            issued.append(msg)
            say(msg)
        return _train(run, world, device, data_info, issued, say, progress, store, origin)
    finally:
        if world.main:
            lock.release()
            store.remove(LOCK_FILE)
        destroy_process_group(world)


def on_main(world: World, fn: Callable[[], object]) -> object:
    """``fn()`` on rank 0, its result (or its user error, raised again) on every rank."""
    from tsdfm.models.errors import TsdfmError

    outcome: tuple[str, object] = ("ok", None)
    if world.main:
        try:
            outcome = ("ok", fn())
        except TsdfmError as e:
            if not world.distributed:
                raise
            outcome = (type(e).__name__, str(e))
    outcome = broadcast_object(world, outcome)
    kind, payload = outcome
    if kind != "ok":
        from tsdfm.models import errors

        raise getattr(errors, kind, ConfigError)(payload)
    return payload


def check_continuable(origin: RunStore, record: dict) -> None:
    """The run at ``origin`` can be continued by a run of ``record``: the same dataset, init
    and config, except the fields of :data:`CONTINUABLE`; else a ConfigError naming them."""
    path = origin.local / RUN_CONFIG_FILE
    if not path.exists():
        raise CheckpointError(
            f"--resume-from {origin.where()} is not a distill run folder (no {RUN_CONFIG_FILE})"
        )
    old = json.loads(path.read_text())
    run, old_run = record["run"], old.get("run", {})
    changed = sorted(
        k for k in set(run) | set(old_run) if k not in CONTINUABLE and run.get(k) != old_run.get(k)
    )
    changed += [
        name
        for key, name in (("data", "dataset"), ("init_identity", "init"))
        if old.get(key) != record.get(key)
    ]
    if changed:
        raise ConfigError(
            f"--resume-from {origin.where()}: that run differs in {', '.join(changed)}; a run "
            f"continues with the same dataset, init and config (only {', '.join(CONTINUABLE)} "
            "may change)"
        )
    last = latest_checkpoint(origin.local)
    if last is None:
        raise CheckpointError(
            f"--resume-from {origin.where()} holds no complete checkpoint to continue from"
        )
    step = int(json.loads((last / STATE_JSON).read_text())["step"])
    if step >= run["steps"]:
        raise ConfigError(
            f"--resume-from {origin.where()} is at step {step}; continuing it needs more steps "
            f"than that (--train-steps > {step}, the new total)"
        )


def _train(run, world, device, data_info, issued, say, progress, store, origin) -> DistillResult:
    cfg, source, init, S = run.cfg, run.source, run.init, run.student_steps
    out = store.local
    model = build_student(init, cfg.seed)
    model.config = model.config.replace(
        provenance={
            "trainer": "distill",
            "student_steps": S,
            "times": data_info["times"],
            "reveal_order": data_info["reveal_order"],
            "dataset": data_info,
            "verification": source.verification(),
            "teacher_identity": data_info["teacher_identity"],
            "compass_identity": data_info["compass_identity"],
            "init": {"spec": cfg.init, "identity": init.identity, "role": init.config.role},
            "loss": "segment_nll" + (f"+{cfg.final_weight}*ce_x1" if cfg.final_weight else ""),
            "run_config": cfg.identity_dict(),
            **({} if origin is None else {"continues": origin.where()}),
        }
    )
    model.to(device).set_precision(cfg.precision)
    trainer = StudentStep(model, cfg, device, world)
    loader = TrajectoryLoader(
        source,
        cfg.loader_config(),
        cfg.num_workers,
        max_token_id=model.config.input_vocab - 1,
        pin_memory=device.type == "cuda",
        lane=world.rank,
        lanes=world.size,
    )
    held = loader.heldout(cfg.heldout_trajectories)
    held_batches = _batches(held, cfg.batch_size)
    if not held_batches and cfg.heldout_fraction > 0:
        msg = (
            f"dataset {source.ref} has no held-out trajectory at "
            f"heldout_fraction={cfg.heldout_fraction}; the held-out loss is not reported"
        )
        issued.append(msg)
        if world.main:
            say(msg)
    task = DistillTask(trainer, loader, held_batches, init, run.extra_files)
    loop = TrainLoop(
        loop_config(cfg),
        task,
        out,
        trainer.updater,
        store=store,
        resume_from=None if origin is None else origin.local,
    )
    try:
        # on resume, lines written after the checkpoint we resume from are dropped
        result = loop.run(_noting(task, issued, say if world.main else None, progress))
    finally:
        task.close()
    final = out / "final"
    ident = ""
    with loop.averaged():
        model.config = model.config.replace(
            provenance={**model.config.provenance, "steps": cfg.steps}
        )
        model.eval()
        with trainer.updater.gathered(optimizer=False):  # FSDP: the EMA weights, in full
            if world.main:
                saved = trainer.updater.saved_model()
                ident = save_checkpoint(final, saved, _saved_tokenizer(init), run.extra_files)
                for rel in ("final", METRICS_FILE, "tensorboard"):
                    store.push(rel)
    ident = broadcast_object(world, ident)
    barrier(world)
    heldout = trainer.heldout_loss(held_batches)
    return DistillResult(
        final,
        ident,
        cfg.steps,
        S,
        result.last["loss"],
        heldout,
        result.history,
        issued,
        store.where("final"),
    )


def _noting(task, issued, say, progress):
    """The loop's progress callback, first passing on what a resume noted (once)."""

    def report(step: int, total: int, metrics: dict) -> None:
        while task.notes:
            msg = task.notes.pop(0)
            issued.append(msg)
            if say is not None:
                say(msg)
        if progress is not None:
            progress(step, total, metrics)

    return report


def _batches(examples: Examples | None, size: int) -> list[ExampleBatch]:
    if examples is None:
        return []
    return [examples.take(slice(i, i + size)).tensors() for i in range(0, len(examples), size)]
