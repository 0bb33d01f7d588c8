"""`fastnce-bench SUBCOMMAND [options]` (also `python -m fastnce.bench`).

    memory     peak memory and time against batch size, fast backends vs the eager formula
    gradcheck  every available backend against the reference: values, gradients, gradcheck
    gpu        the GPU benchmark (fastnce/bench/gpu.py)

`fastnce-bench SUBCOMMAND --help` lists a subcommand's options.
"""
from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "memory": ("fastnce.bench.memory", "peak memory and time against batch size, fast backends vs eager PyTorch"),
    "gradcheck": ("fastnce.bench.gradcheck", "check every available backend against the reference"),
    "gpu": ("fastnce.bench.gpu", "GPU benchmark of the fused kernels"),
}


def _usage() -> str:
    lines = ["usage: fastnce-bench {" + ",".join(SUBCOMMANDS) + "} [options]", "", "subcommands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "fastnce-bench SUBCOMMAND --help lists its options."]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd not in SUBCOMMANDS:
        print(f"fastnce-bench: unknown subcommand {cmd!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    try:  # imported lazily: `gpu` may need packages the others do not
        module = importlib.import_module(SUBCOMMANDS[cmd][0])
    except ImportError as e:
        print(f"fastnce-bench {cmd}: cannot import {SUBCOMMANDS[cmd][0]} ({e})", file=sys.stderr)
        return 2
    rc = module.main(rest)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
