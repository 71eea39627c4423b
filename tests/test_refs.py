"""tsdfm.models.refs: one parser of org/name[@revision], on huggingface_hub's validator."""

import pytest

from tsdfm.models.refs import HubRef, is_repo_id, parse_hub_ref


@pytest.mark.parametrize(
    ("text", "ref"),
    [
        ("org/name", HubRef("org/name")),
        ("my-org/ds_v1.2@v3", HubRef("my-org/ds_v1.2", "v3")),
        ("org/name@refs/pr/1", HubRef("org/name", "refs/pr/1")),
        ("Org2/Name-x@0123abcd", HubRef("Org2/Name-x", "0123abcd")),
    ],
)
def test_hub_refs_parse(text, ref):
    assert parse_hub_ref(text) == ref
    assert str(ref) == text


@pytest.mark.parametrize(
    "text",
    [
        "name",  # no namespace: a local path
        "a/b/c",
        "./org/name",
        "../x",
        "/abs/path",
        "~/runs",
        "org/na--me",
        "org/na..me",
        "org/name.git",
        "org/name-",
        "org/name@",  # empty revision
        "org/name@v 1",
        "s3://bucket/ds",
        "org/" + "n" * 96,  # longer than 96 characters
        "",
    ],
)
def test_what_is_not_a_hub_ref(text):
    assert parse_hub_ref(text) is None


def test_non_strings_are_not_refs():
    assert parse_hub_ref(None) is None and not is_repo_id(3)
