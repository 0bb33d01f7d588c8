#!/usr/bin/env bash
# The SHA-256 of csrc/'s sources (file names and contents), from the repository root: what a
# carried fastnce._C was built from (benchmarks/build_device_ext.sh, benchmarks/gpu_session.sh).
# csrc/emu (the CPU emulation, tests only) is never built into it.
find csrc -path csrc/emu -prune -o -type f \( -name '*.cu' -o -name '*.cuh' -o -name '*.h' -o -name '*.cpp' \) -print |
  LC_ALL=C sort |
  while read -r f; do echo "$f"; cat "$f"; done | sha256sum | cut -d' ' -f1
