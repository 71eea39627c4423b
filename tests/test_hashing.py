"""tsdfm.models.hashing: the one canonical JSON and the one file digest of the project."""

import hashlib
import math

import fsspec
import pytest

from tsdfm.models.errors import ConfigError, ShardError
from tsdfm.models.hashing import canonical_json, file_sha256, sha256_json


def test_canonical_json_sorts_keys_without_whitespace():
    a = canonical_json({"b": [1, 2.5, None], "a": {"y": True, "x": "é"}})
    assert a == b'{"a":{"x":"\\u00e9","y":true},"b":[1,2.5,null]}'
    assert canonical_json({"a": {"x": "é", "y": True}, "b": [1, 2.5, None]}) == a
    assert sha256_json({"k": 1}) == "sha256:" + hashlib.sha256(b'{"k":1}').hexdigest()


@pytest.mark.parametrize("bad", [math.nan, math.inf, object()])
def test_canonical_json_refuses_what_is_not_plain_json(bad):
    with pytest.raises(ShardError, match="the plan is not plain JSON"):
        canonical_json({"x": bad}, "the plan")
    with pytest.raises(ConfigError, match="the build config is not plain JSON"):
        sha256_json([bad], "the build config", ConfigError)


def test_file_sha256_local_and_fsspec_agree_across_chunks(tmp_path):
    data = bytes(range(256)) * 9000  # > 2 MiB: several 1 MiB chunks
    path = tmp_path / "blob"
    path.write_bytes(data)
    want = hashlib.sha256(data).hexdigest()
    assert file_sha256(path) == want
    assert file_sha256(str(path), fsspec.filesystem("file")) == want
    mem = fsspec.filesystem("memory")
    mem.pipe("/blob", data)
    assert file_sha256("/blob", mem) == want
