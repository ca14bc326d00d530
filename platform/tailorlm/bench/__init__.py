"""Benchmark scripts; each prints ratios against a baseline measured in the same run."""


def rotated(items: list, round_index: int) -> list:
    """items starting at position round_index (mod len): each round of a benchmark starts with a
    different contender, so that this machine's drift does not always fall on the same one."""
    k = round_index % len(items)
    return items[k:] + items[:k]
