"""The registry's versions and promotions: minor bumps for a new training, patch for a re-export,
and promote / rollback behaving as a stack, checked against a model of it on generated sequences."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tailorlm.export.registry import (
    next_version,
    parse_version,
    promote,
    read_registry,
    register,
    rollback,
    served_entry,
)
from tailorlm.runs import RunDir


def entry(version: str, training: str) -> dict:
    return {"version": version, "training": training, "variants": {"bf16": {"status": "published", "uri": version}}}


def test_versions_bump_minor_for_new_training_and_patch_for_a_reexport(tmp_path):
    run = RunDir(str(tmp_path), "r")
    seen = []
    for training in ["t1", "t1", "t2", "t2", "t2", "t3"]:
        v = next_version(run, training)
        register(run, entry(v, training))
        seen.append(parse_version(v))
    assert seen == [(1, 0, 0), (1, 0, 1), (1, 1, 0), (1, 1, 1), (1, 1, 2), (1, 2, 0)]


def test_unknown_version_and_empty_rollback_are_clear_errors(tmp_path):
    run = RunDir(str(tmp_path), "r")
    register(run, entry("1.0.0+1", "t"))
    with pytest.raises(ValueError, match="not in .*registered: 1.0.0"):
        promote(run, "9.9.9")
    with pytest.raises(ValueError, match="nothing to roll back"):
        rollback(run)


@settings(max_examples=40, deadline=None)
@given(ops=st.lists(st.one_of(st.integers(0, 3), st.just("rollback")), max_size=12))
def test_property_promote_and_rollback_follow_a_stack(tmp_path_factory, ops):
    run = RunDir(str(tmp_path_factory.mktemp("reg")), "r")
    versions = [f"1.{i}.0+1" for i in range(4)]
    for i, v in enumerate(versions):
        register(run, entry(v, f"t{i}"))
    stack = [versions[-1]]  # unpromoted: the newest is served
    for op in ops:
        if op == "rollback":
            if len(stack) < 2:
                with pytest.raises(ValueError):
                    rollback(run)
                continue
            stack.pop()
            assert rollback(run)["version"] == stack[-1]
        else:
            promote(run, versions[op].split("+")[0])  # by its number alone
            stack.append(versions[op])
        assert served_entry(run)["version"] == stack[-1]
    assert len(read_registry(run)) == 4  # promotions never touch the registry
