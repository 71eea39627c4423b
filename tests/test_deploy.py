"""docker/: the cluster launcher config, the KubeRay RayJob, the job script and the image pins.

No Docker engine, cloud or Kubernetes runs here, so these check what can be checked offline:
the launcher config passes Ray's own ``ray up`` validation, every ``tsdfm-pipeline`` command
line in them parses with the real CLI, the GPU and secret wiring is what the pipeline needs,
and the files agree with each other (image, user id, pinned versions).
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml
from cli_args import parse_cli

DOCKER = Path(__file__).resolve().parents[1] / "docker"
TOKEN_LITERAL = re.compile(r"hf_[A-Za-z0-9]{8,}")


def _load(name: str) -> dict:
    return yaml.safe_load((DOCKER / name).read_text())


def _commands(script: str) -> list[list[str]]:
    """Split a ``;``-separated shell command list into argv lists (quotes respected)."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=";")
    lexer.whitespace_split = True
    commands, current = [], []
    for token in lexer:
        if token == ";":
            commands.append(current)
            current = []
        else:
            current.append(token)
    return [c for c in [*commands, current] if c]


def _containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def _dockerfile_uid(name: str) -> int:
    users = re.findall(r"^USER (\d+):(\d+)$", (DOCKER / name).read_text(), re.M)
    assert len(users) == 1, f"{name}: one numeric USER uid:gid expected, found {users}"
    return int(users[0][0])


def test_launcher_config_passes_ray_up_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _load("ray-cluster.yaml")
    cfg = prepare_config(raw)  # what `ray up` does: merge the provider's defaults, then validate
    validate_config(cfg)

    types = cfg["available_node_types"]
    head, workers = types[cfg["head_node_type"]], [t for n, t in types.items() if n != "head"]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"]["CPU"] == 0
    assert len(workers) == 1
    gpu = workers[0]
    assert gpu["resources"]["GPU"] == 1 and gpu["min_workers"] == gpu["max_workers"] >= 1
    assert cfg["max_workers"] >= gpu["max_workers"]

    assert "--entrypoint=''" in cfg["docker"]["run_options"]  # the launcher runs `bash`
    assert re.fullmatch(r"\S+:\S+-cuda\d+\.\d+", cfg["docker"]["image"])
    # everything is in the image: no setup commands that pip-install at start
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert cfg[key] == [], key
    (target, source), *_ = raw["file_mounts"].items()
    assert source == "./docker" and (DOCKER / "build-job.sh").is_file()
    assert target == "~/tsdfm"
    assert not TOKEN_LITERAL.search((DOCKER / "ray-cluster.yaml").read_text())


def test_build_job_script_runs_build_on_the_cluster_then_publishes():
    script = (DOCKER / "build-job.sh").read_text()
    subprocess.run(["bash", "-n", str(DOCKER / "build-job.sh")], check=True)
    assert script.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in script
    build_line = "\ntsdfm-pipeline build --address auto --device cuda"
    assert build_line in script
    assert 'tsdfm-pipeline publish "$local_copy" --repo "$repo"' in script
    # the token check runs before the build, as `build --push-to-hub` does it
    assert script.index("resolve_token") < script.index(build_line)
    assert not TOKEN_LITERAL.search(script)
    # (tests/test_cluster.py runs the script on a simulated multi-node cluster)


def test_rayjob_runs_build_on_gpu_workers_with_the_token_from_a_secret():
    job = _load("rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True

    outer = shlex.split(spec["entrypoint"])
    assert outer[:2] == ["bash", "-c"] and len(outer) == 3
    commands = _commands(outer[2])
    assert commands[0] == ["set", "-euo", "pipefail"]  # publish never runs after a failed build
    build, fetch, publish = commands[1:]

    assert build[:2] == ["tsdfm-pipeline", "build"]
    params = parse_cli(build).params
    assert params["address"] == "auto" and params["device"] == "cuda"
    assert params["out"].startswith("s3://") and params["teacher"] and params["compass"]
    assert fetch[:2] == ["python", "-c"] and fetch[3:] == [params["out"], "/data/tsdfm-publish"]
    compile(fetch[2], "<entrypoint fetch>", "exec")
    assert publish[:2] == ["tsdfm-pipeline", "publish"]
    pub = parse_cli(publish).params
    assert str(pub["path"]) == "/data/tsdfm-publish" and re.fullmatch(
        r"[\w.-]+/[\w.-]+", pub["repo"]
    )

    cluster = spec["rayClusterSpec"]
    assert cluster["authOptions"]["mode"] == "token"
    assert cluster["rayVersion"] == __import__("ray").__version__
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    (workers,) = cluster["workerGroupSpecs"]
    assert workers["rayStartParams"]["num-gpus"] == "1"
    assert workers["replicas"] == workers["minReplicas"] == workers["maxReplicas"] >= 1
    (worker,) = _containers(workers)
    for kind in ("requests", "limits"):
        assert worker["resources"][kind]["nvidia.com/gpu"] == "1"

    uid = _dockerfile_uid("Dockerfile")
    launcher_image = _load("ray-cluster.yaml")["docker"]["image"]
    for group in (head, workers):
        assert group["template"]["spec"]["securityContext"]["runAsUser"] == uid
        for container in _containers(group):
            assert container["image"] == launcher_image
            env = {e["name"]: e for e in container.get("env", [])}
            assert "value" not in env["HF_TOKEN"]
            ref = env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]
            assert ref == {"name": "tsdfm-hf-token", "key": "HF_TOKEN"}
            for e in env.values():
                assert "value" not in e or not TOKEN_LITERAL.search(str(e["value"]))
    assert not TOKEN_LITERAL.search((DOCKER / "rayjob.yaml").read_text())


def _pip_pins(dockerfile: str) -> dict[str, str]:
    text = (DOCKER / dockerfile).read_text().replace("\\\n", " ")
    pins = {}
    for line in text.splitlines():
        if "pip install" in line:
            for name, version in re.findall(r"([A-Za-z0-9_.-]+)(?:\[[\w,]+\])?==([\w.+-]+)", line):
                pins[name.lower()] = version
    return pins


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cpu"])
def test_dockerfile_pins_match_the_lock_and_the_image_is_non_root(dockerfile):
    lock = dict(
        line.split("==")
        for line in (DOCKER / "constraints.txt").read_text().splitlines()
        if line and not line.startswith("#")
    )
    pins = _pip_pins(dockerfile)
    assert pins.pop("torch").startswith("2.13.0")
    assert pins and all(lock[name] == version for name, version in pins.items()), (pins, lock)

    text = (DOCKER / dockerfile).read_text()
    (base,) = re.findall(r"^FROM (\S+)$", text, re.M)
    assert re.fullmatch(r"[\w./-]+:\d[\w.-]*", base), f"unpinned base image {base}"
    assert _dockerfile_uid(dockerfile) != 0
    assert 'ENTRYPOINT ["tsdfm-pipeline"]' in text and "HEALTHCHECK" in text
    assert "COPY docker/constraints.txt" in text and "PIP_CONSTRAINT" in text
