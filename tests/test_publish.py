"""`publish` against an in-process fake Hub, through the real huggingface_hub client.

The fake (tests/fake_hub.py) answers the Hub's HTTP API behind ``set_client_factory`` with an
``httpx2.MockTransport``; Xet is disabled so uploads take the LFS path. Failures are injected
per endpoint, and the retry helper's waits are recorded instead of slept.
"""

import logging
import re
import shutil

import pytest
from fake_hub import FakeHub
from huggingface_hub import constants
from typer.testing import CliRunner

from tsdfm.pipeline.cli import app
from tsdfm.pipeline.hub import HubError, RetryPolicy, check_repo_id, publish, retry_after_seconds
from tsdfm.pipeline.verify import verify

TOKEN = "hf_tsdfmTestSecretToken0123456789"
REPO = "tsdfm-org/tiny-traj"
runner = CliRunner()


@pytest.fixture()
def hub(monkeypatch, tmp_path):
    fake = FakeHub(constants.ENDPOINT, {TOKEN})
    fake.install(monkeypatch)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    yield fake
    FakeHub.uninstall()


@pytest.fixture()
def shaped(tmp_path, tiny_shaped_dataset):
    return shutil.copytree(tiny_shaped_dataset, tmp_path / "shaped")


@pytest.fixture()
def blind(tmp_path, tiny_blind_dataset):
    return shutil.copytree(tiny_blind_dataset, tmp_path / "blind")


class Sleeps(list):
    """A sleep function that records the waits instead of waiting."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def _local_files(root) -> dict[str, bytes]:
    paths = ["manifest.json", *[f"data/{p.name}" for p in sorted((root / "data").iterdir())]]
    return {p: (root / p).read_bytes() for p in paths}


def _order(hub, *patterns) -> list[int]:
    """Index in the request log of the first request matching each (method, path regex)."""
    out = []
    for method, rx in patterns:
        calls = [i for i, c in enumerate(hub.log) if c[0] == method and re.search(rx, c[1])]
        assert calls, (method, rx)
        out.append(calls[0])
    return out


def test_publish_opens_a_pr_uploads_merges_then_tags(hub, shaped):
    lines = []
    result = publish(shaped, REPO, log=lines.append)
    assert (result.version, result.pull_request, result.already_published) == ("v1", 1, False)
    assert sorted(result.uploaded) == sorted([*_local_files(shaped), "README.md"])
    # create repo → open PR → commits to refs/pr/1 → merge → tag, in that order
    idx = _order(
        hub,
        ("POST", r"/api/repos/create$"),
        ("POST", r"/discussions$"),
        ("POST", r"/commit/refs/pr/1$"),
        ("POST", r"/discussions/1/merge$"),
        ("POST", r"/tag/"),
    )
    assert idx == sorted(idx)
    commits = hub.calls("POST", r"/commit/")
    assert commits and all(c[1].endswith("/commit/refs/pr/1") for c in commits)  # never main
    files = hub.files(REPO, "v1")
    assert {p: files[p] for p in _local_files(shaped)} == _local_files(shaped)
    assert set(files) == {*_local_files(shaped), "README.md", ".gitattributes"}
    assert hub.repos[REPO].tags["v1"] == hub.repos[REPO].branches["main"] == result.commit
    assert hub.repos[REPO].prs[1]["status"] == "merged"
    card = files["README.md"].decode()
    assert f'load_dataset("{REPO}", revision="v1"' in card
    assert f"--data {REPO}@v1" in card
    assert result.load_line == f'load_dataset("{REPO}", revision="v1", split="train")'
    assert "merged pull request #1" in lines and any("as v1" in line for line in lines)


def test_published_version_reads_back_through_the_hub_api(hub, shaped, tmp_path):
    from datasets import Features, load_dataset

    from tsdfm.models.data.schema import trajectory_schema

    publish(shaped, REPO)
    report = verify(f"{REPO}@v1")
    assert report.ok, report.format()
    assert report.target == f"{REPO}@v1" and report.rows_checked == 24
    ds = load_dataset(REPO, revision="v1", split="train", streaming=True)
    assert ds.features == Features.from_arrow_schema(trajectory_schema(2, text=False))
    rows = list(ds)
    assert sorted(r["trajectory_id"] for r in rows) == list(range(24))
    assert hub.calls("GET", rf"/datasets/{REPO}/resolve/[0-9a-f]{{40}}/data/")  # read via Hub
    missing = runner.invoke(app, ["verify", f"{REPO}@v9"])
    assert missing.exit_code == 2 and f"{REPO} has no revision 'v9'" in missing.output


def test_republishing_the_same_content_changes_nothing(hub, shaped):
    first = publish(shaped, REPO)
    before = len(hub.log)
    again = publish(shaped, REPO)
    assert again.already_published and again.version == "v1" and again.commit == first.commit
    new = hub.log[before:]
    assert not [c for c in new if c[0] in ("POST", "PUT") and "repos/create" not in c[1]]
    assert set(hub.repos[REPO].tags) == {"v1"}


def test_new_content_is_the_next_version_and_old_tags_do_not_move(hub, blind, shaped):
    v1 = publish(blind, REPO)
    # a shard of an old, differently cut version sits on main: the next version removes it
    repo = hub.repos[REPO]
    stale = dict(repo.commits[repo.branches["main"]])
    stale["data/train-00000-of-00005.parquet"] = stale["data/train-00000-of-00003.parquet"]
    repo.branches["main"] = hub._commit(repo, stale, "someone's old shard")
    v2 = publish(shaped, REPO)
    assert (v1.version, v2.version, v2.pull_request) == ("v1", "v2", 2)
    main = hub.files(REPO, "main")
    assert "data/train-00000-of-00005.parquet" not in main
    assert {p: main[p] for p in _local_files(shaped)} == _local_files(shaped)
    old = hub.files(REPO, "v1")
    assert {p: old[p] for p in _local_files(blind)} == _local_files(blind)
    assert repo.tags["v1"] == v1.commit != v2.commit == repo.tags["v2"]


def test_a_tag_that_exists_with_other_content_is_refused(hub, blind, shaped):
    publish(blind, REPO)
    prs = len(hub.repos[REPO].prs)
    main = hub.repos[REPO].branches["main"]
    with pytest.raises(HubError, match=r"tag v1 already exists .* with different content"):
        publish(shaped, REPO, version=1)
    assert len(hub.repos[REPO].prs) == prs and hub.repos[REPO].branches["main"] == main
    assert not hub.calls("POST", r"/commit/refs/pr/2")
    same = publish(blind, REPO, version=1)  # the same content under the same tag: a no-op
    assert same.already_published and same.version == "v1"


def test_interrupted_upload_resumes_and_main_never_shows_half(hub, shaped):
    sleeps = Sleeps()
    # one shard per commit; the third commit (shard 2) fails with 500 on all 6 attempts ...
    hub.fail("POST", r"/commit/refs/pr/1$", 500, times=6, after=2)
    with pytest.raises(HubError, match=r"still fails after 6 attempts .* rerun the same command"):
        publish(shaped, REPO, files_per_commit=1, sleep=sleeps)
    assert sleeps == [2.0, 4.0, 8.0, 16.0, 32.0]  # exponential, base 2 s, under the 60 s cap
    repo = hub.repos[REPO]
    assert set(hub.files(REPO, "main")) == {".gitattributes"}  # nothing half-published
    assert repo.tags == {} and repo.prs[1]["status"] == "open"
    on_pr = hub.files(REPO, "refs/pr/1")
    assert set(on_pr) == {
        ".gitattributes",
        "data/train-00000-of-00003.parquet",
        "data/train-00001-of-00003.parquet",
    }
    puts_before = len(hub.calls("PUT", r"^/lfs-upload/"))
    # ... and the same command finishes it: same PR, only the missing files
    lines = []
    result = publish(shaped, REPO, files_per_commit=1, log=lines.append)
    assert result.pull_request == 1 and result.version == "v1"
    assert result.uploaded == ["data/train-00002-of-00003.parquet", "manifest.json", "README.md"]
    assert "resuming pull request #1" in lines
    assert len(hub.calls("PUT", r"^/lfs-upload/")) == puts_before  # shard 2's object was stored
    assert puts_before == 3  # every shard's bytes went up exactly once
    files = hub.files(REPO, "v1")
    assert {p: files[p] for p in _local_files(shaped)} == _local_files(shaped)


def test_429_waits_for_retry_after_with_a_cap(hub, shaped):
    sleeps = Sleeps()
    hub.fail("POST", r"/api/repos/create$", 429, times=2, headers={"Retry-After": "7"})
    hub.fail("POST", r"/discussions$", 429, times=1, headers={"Retry-After": "3600"})
    hub.fail("POST", r"/tag/", 503, times=2)
    result = publish(shaped, REPO, sleep=sleeps)
    assert result.version == "v1"
    # Retry-After honoured (7 s twice), capped at 60 s; 503 without it backs off 2 s, 4 s
    assert sleeps == [7.0, 7.0, 60.0, 2.0, 4.0]
    assert len(hub.calls("POST", r"/api/repos/create$")) == 3
    assert len(hub.calls("POST", r"/discussions$")) == 2  # one PR in the end
    assert list(hub.repos[REPO].prs) == [1]


def test_412_concurrent_commit_is_retried(hub, shaped):
    sleeps = Sleeps()
    hub.fail("POST", r"/commit/refs/pr/1$", 412, times=2)
    result = publish(shaped, REPO, sleep=sleeps, policy=RetryPolicy(conflict_delay=0.5))
    assert result.version == "v1" and sleeps == [0.5, 0.5]
    assert [c[2] for c in hub.calls("POST", r"/commit/")][:3] == [412, 412, 200]


@pytest.mark.parametrize(
    ("status", "method", "endpoint", "hint"),
    [
        (403, "POST", r"/discussions$", "use a token with write access to 'tsdfm-org'"),
        (401, "POST", r"/api/repos/create$", "set HF_TOKEN to a valid token"),
        (404, "GET", r"/refs$", "check the repo id, that it is a dataset repo"),
    ],
)
def test_auth_and_not_found_fail_at_once(hub, shaped, status, method, endpoint, hint):
    sleeps = Sleeps()
    hub.fail(method, endpoint, status, times=5)
    with pytest.raises(HubError, match=f"HTTP {status}") as err:
        publish(shaped, REPO, sleep=sleeps)
    assert hint in str(err.value)
    assert sleeps == []  # no retry
    assert len(hub.calls(method, endpoint)) == 1
    if REPO in hub.repos:  # nothing published
        assert hub.repos[REPO].tags == {} and set(hub.files(REPO, "main")) == {".gitattributes"}


@pytest.mark.parametrize("bad", ["no-slash", "a/b/c", "org/na--me", "../x", "org/name.git", ""])
def test_malformed_repo_ids_are_refused_before_any_request(hub, shaped, bad):
    with pytest.raises(HubError, match="is malformed: use org/name"):
        publish(shaped, bad)
    assert hub.log == []


def test_no_token_is_refused_before_any_request(hub, shaped, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))
    with pytest.raises(
        HubError, match="no Hugging Face token: set HF_TOKEN or run `hf auth login`"
    ):
        publish(shaped, REPO)
    assert hub.log == []


def test_a_folder_that_fails_verify_is_not_published(hub, shaped):
    path = shaped / "data" / "train-00001-of-00003.parquet"
    raw = bytearray(path.read_bytes())
    raw[200] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(HubError, match=r"refusing to publish .* verify found \d+ problem.*sha256"):
        publish(shaped, REPO)
    assert hub.log == [] and hub.repos == {}


def test_retry_after_parsing():
    assert retry_after_seconds("12") == 12.0
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past
    assert check_repo_id("my-org/ds_v1.2") == "my-org/ds_v1.2"
    assert RetryPolicy().delay(10, 500, None) == 60.0


def test_token_never_appears_in_output_logs_or_files(hub, shaped, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    hub.fail("POST", r"/api/repos/create$", 429, times=1, headers={"Retry-After": "0"})
    res = runner.invoke(app, ["publish", str(shaped), "--repo", REPO, "--private"])
    assert res.exit_code == 0, res.output
    assert f'ds = load_dataset("{REPO}", revision="v1", split="train")' in res.stdout
    assert hub.repos[REPO].private
    echo = {"X-Error-Message": f"token {TOKEN} may not write here"}  # a server echoing it
    hub.fail("POST", r"/api/repos/create$", 403, times=1, headers=echo)
    denied = runner.invoke(app, ["publish", str(shaped), "--repo", "other-org/x"])
    assert denied.exit_code == 2
    assert "error: creating dataset repo other-org/x: HTTP 403" in denied.output
    assert "token hf_*** may not write here" in denied.output  # scrubbed
    checked = runner.invoke(app, ["verify", f"{REPO}@v1"])
    assert checked.exit_code == 0, checked.output
    for text in (res.output, denied.output, checked.output, caplog.text):
        assert TOKEN not in text
    for path in tmp_path.rglob("*"):  # dataset folder, Hub cache, everything written
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path
    for repo in hub.repos.values():  # nothing uploaded carries it either
        for files in repo.commits.values():
            assert all(TOKEN.encode() not in hub._bytes(e) for e in files.values())
        assert all(TOKEN not in pr["title"] for pr in repo.prs.values())
    assert all(TOKEN.encode() not in blob for blob in hub.lfs.values())


def test_build_push_to_hub_checks_inputs_before_building(hub, tmp_path):
    res = runner.invoke(
        app, ["build", "--k", "1", "--out", str(tmp_path / "ds"), "--push-to-hub", "bad id"]
    )
    assert res.exit_code == 2 and "is malformed" in res.output
    assert not (tmp_path / "ds").exists() and hub.log == []


@pytest.mark.usefixtures("ray_cluster")
@pytest.mark.parametrize("url", [False, True], ids=["folder", "fsspec-url"])
def test_build_push_to_hub_publishes_the_build(hub, tmp_path, saved_tiny_teacher, url):
    out = tmp_path / "ds"
    target = f"file://{out}" if url else out  # a URL is copied locally before the upload
    args = ["build", "--teacher", saved_tiny_teacher, "--out", target, "--shards", 2]
    args += ["--trajectories-per-shard", 4, "--batch-size", 4, "-S", 4, "-N", 16, "--k", 1]
    args += ["--device", "cpu", "--push-to-hub", REPO]
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    assert "shards 2/2  rows 8" in res.output
    assert f'ds = load_dataset("{REPO}", revision="v1", split="train")' in res.stdout
    files = hub.files(REPO, "v1")
    assert files["manifest.json"] == (out / "manifest.json").read_bytes()
    assert "data/train-00001-of-00002.parquet" in files
    assert TOKEN not in res.output


def test_rebuilding_identical_data_is_not_a_new_version(hub, shaped):
    """A rebuild gives the same shards; only the timing counters of manifest.json differ."""
    from tsdfm.pipeline.manifest import Manifest
    from tsdfm.pipeline.shards import ShardInfo

    first = publish(shaped, REPO)
    m = Manifest.load(str(shaped))
    for i in m.committed():
        e = m.shard(i)
        info = ShardInfo(i, e["path"], e["rows"], e["bytes"], e["sha256"])
        timings = {k: v + 1.25 for k, v in e["counters"].items() if k.endswith("_seconds")}
        assert timings, "the built dataset records timing counters"
        m.record_shard(info, {**e["counters"], **timings}, e["stats"])
    assert (shaped / "manifest.json").read_bytes() != hub.files(REPO, "v1")["manifest.json"]
    again = publish(shaped, REPO)
    assert again.already_published and again.version == first.version == "v1"
    assert set(hub.repos[REPO].tags) == {"v1"} and list(hub.repos[REPO].prs) == [1]


def test_a_lost_answer_is_not_repeated_for_open_pr_and_merge(hub, shaped):
    """The Hub acted but the answer was lost (5xx): no second PR, and a done merge is done."""
    sleeps = Sleeps()
    hub.fail("POST", r"/discussions$", 500, performed=True)
    hub.fail("POST", r"/discussions/1/merge$", 502, performed=True)
    lines = []
    result = publish(shaped, REPO, sleep=sleeps, log=lines.append)
    assert result.version == "v1" and result.pull_request == 1
    assert list(hub.repos[REPO].prs) == [1] and hub.repos[REPO].prs[1]["status"] == "merged"
    assert len(hub.calls("POST", r"/discussions$")) == 1
    assert len(hub.calls("POST", r"/merge$")) == 1
    assert sum("took effect before the error; not repeating it" in line for line in lines) == 2


def test_offline_mode_is_refused_at_once_not_retried_as_an_outage(hub, shaped, monkeypatch):
    from huggingface_hub.errors import OfflineModeIsEnabled

    from tsdfm.pipeline.hub import Hub

    sleeps = Sleeps()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match="HF_HUB_OFFLINE is set, so huggingface_hub makes no"):
        publish(shaped, REPO, sleep=sleeps)
    assert sleeps == [] and hub.log == []

    def offline():
        raise OfflineModeIsEnabled("Cannot reach https://huggingface.co: offline mode is enabled")

    with pytest.raises(HubError, match="listing: HF_HUB_OFFLINE is set"):
        Hub(REPO, TOKEN, sleep=sleeps).call("listing", offline)
    assert sleeps == []  # before: retried for a minute as a network outage


def test_distill_reads_a_published_version_only_if_its_shards_are_the_manifests(
    hub, shaped, saved_tiny_teacher, tmp_path
):
    """The trainer's reader checks a Hub dataset's shards by their content hash on the Hub
    (LFS sha256 at the resolved commit) against its manifest.json, without downloading the
    shards; a shard replaced on the Hub after the build is refused in one line."""
    from tsdfm.models.data.trajectories import open_trajectory_dataset
    from tsdfm.models.errors import ShardError
    from tsdfm.pipeline.manifest import MANIFEST_FILE

    publish(shaped, REPO)
    source = open_trajectory_dataset(f"{REPO}@v1")
    assert source.hub_checked and source.resolved_revision == hub.repos[REPO].tags["v1"]
    assert "Hub content hash" in source.verification()["sha256"]
    assert hub.calls("POST", rf"/api/datasets/{REPO}/paths-info/")  # hashes asked, not read
    # someone swaps two shards' bytes on main after the build; the manifest still says v1's
    repo = hub.repos[REPO]
    files = dict(repo.commits[repo.branches["main"]])
    a, b = sorted(p for p in files if p.endswith(".parquet"))[:2]
    files[a], files[b] = files[b], files[a]
    repo.branches["main"] = hub._commit(repo, files, "swap two shards")
    with pytest.raises(ShardError, match=rf"shard {a} has sha256 .* on the Hub, {MANIFEST_FILE}"):
        open_trajectory_dataset(REPO)
    assert open_trajectory_dataset(REPO, verify=False).hub_checked is False
    args = ["distill", "--data", REPO, "--init", str(saved_tiny_teacher), "--steps", "1"]
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "student")])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1, res.output
    assert f"shard {a} has sha256" in res.output and "use the revision" in res.output
