"""The data stage's kept rows of one split, as the stages after it read them (train's evaluation,
export's quality gate and calibration): the data stage's public output, read here rather than
through any stage's code.
"""

from __future__ import annotations


def splits_rows(kept_uri: str, split: str = "eval") -> list[dict]:
    """The rows of `split` (train or eval) in the data stage's kept/ Parquet, with text and messages."""
    import pyarrow.dataset as pads
    from fsspec.core import url_to_fs

    fs, path = url_to_fs(kept_uri)
    table = pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=["split", "text", "messages"])
    return [r for r in table.to_pylist() if r["split"] == split]
