"""The one name check (stores/names.py): what it accepts and refuses, plain and nested."""

from __future__ import annotations

import pytest

from voxelflow.pipeline.errors import InputError
from voxelflow.stores.names import MAX_NAME_LENGTH, check_name, name_problem

GOOD = ["clip", "sub-01", "resnet50", "vgg.features.29", "r18_random:0".replace(":", "-"),
        "a+b=c@d,e", "9lives", "Émile", "x" * MAX_NAME_LENGTH]
BAD = {
    "": "is empty",
    ".": "folder reference",
    "..": "folder reference",
    "/abs/path": "absolute path",
    "a/b": "path separator",
    "../../../../x": "path separator",
    "a\\b": "path separator",
    ".hidden": "starts with '.'",
    "-x": "starts with '-'",
    "__meta": "starts with '_'",
    "with space": "holds ' '",
    "a:b": "holds ':'",
    "a*b?": "holds '*' '?'",
    "x" * (MAX_NAME_LENGTH + 1): "characters long",
}


@pytest.mark.parametrize("name", GOOD)
def test_plain_names_are_accepted(name):
    assert name_problem(name) is None
    assert check_name(name, "--name") == name


@pytest.mark.parametrize("name, problem", list(BAD.items()), ids=[repr(n)[:20] for n in BAD])
def test_names_that_would_escape_or_hide_are_refused(name, problem):
    assert problem in name_problem(name)
    with pytest.raises(InputError) as err:
        check_name(name, "--subject")
    message = str(err.value)
    assert message.startswith(f"--subject {name!r}: ") and "\n" not in message
    assert "give a plain name: letters, digits" in message  # the rule, i.e. the fix


@pytest.mark.parametrize("name, problem", [
    ("exp/model", None), ("exp/model/lags-4-4.5", None),
    ("/exp/model", "is an absolute path"), ("exp//model", "part '' is empty"),
    ("exp/../model", "part '..' is a folder reference, not a name"), ("exp/", "part '' is empty"),
    ("..", "is a folder reference, not a name"), ("exp/.x", "part '.x' starts with '.'"),
])
def test_nested_names_check_every_part(name, problem):
    assert name_problem(name, nested=True) == problem
    if problem:
        with pytest.raises(InputError, match="give names joined by '/'"):
            check_name(name, "--name", nested=True)


def test_a_name_that_is_not_text_is_refused():
    assert name_problem(3) == "is an int, not a text name"
