"""Every config leaf is read by some code: a key that is accepted, shipped and then ignored is a
lie to the user (train.checkpoint_every and export.merge_lora were). The leaves come from the
config model itself, not a hand list; a leaf counts as read when its name is used as an
attribute (`.name`) or a key (`"name"`) in a module other than config.py."""

import re
from pathlib import Path

from pydantic import BaseModel

from tailorlm.config import PipelineConfig

PACKAGE = Path(__file__).parents[2] / "platform" / "tailorlm"


def leaves(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            out += leaves(sub, f"{prefix}{name}.")
        else:
            out.append(prefix + name)
    return out


def test_every_config_leaf_is_read_outside_config_py():
    source = "\n".join(p.read_text() for p in PACKAGE.rglob("*.py") if p.name != "config.py")
    all_leaves = leaves(PipelineConfig)
    assert len(all_leaves) > 80  # the walk reached the nested sections
    unread = [
        leaf
        for leaf in all_leaves
        if not re.search(
            rf"(\.{re.escape(leaf.rsplit('.', 1)[-1])}\b)|([\"']{re.escape(leaf.rsplit('.', 1)[-1])}[\"'])", source
        )
    ]
    assert unread == [], f"config leaves no code reads: {unread}"


def test_every_leaf_is_in_the_commented_reference_config():
    import yaml

    shipped = yaml.safe_load((PACKAGE.parents[1] / "jobs" / "configs" / "tiny_cpu.yaml").read_text())

    def present(path: str) -> bool:
        node = shipped
        for part in path.split("."):
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return True

    missing = [leaf for leaf in leaves(PipelineConfig) if not present(leaf)]
    assert missing == [], f"tiny_cpu.yaml is the commented reference of every option; add {missing}"


def test_every_leaf_and_section_is_described():
    """`tailorlm config` and the reference config explain every option: each leaf has a description."""

    def undescribed(model: type[BaseModel], prefix: str = "") -> list[str]:
        out = []
        for name, field in model.model_fields.items():
            sub = field.annotation
            if isinstance(sub, type) and issubclass(sub, BaseModel):
                out += undescribed(sub, f"{prefix}{name}.")
            elif not field.description:
                out.append(prefix + name)
        return out

    assert undescribed(PipelineConfig) == []
