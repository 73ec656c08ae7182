#!/usr/bin/env python3
"""Fails if dsv4's release binary calls an x86 SIMD intrinsic out of line from dsv4's code.

Why: the CPU kernels are `#[inline(always)]` functions compiled inside `#[target_feature]`
entry points. An intrinsic that is not inlined into such a function (for example inside a
closure, which gets the target features of the function it is written in, not those of the
entry point) becomes a function call per instruction. Every test still passes, only slower:
`DSV4_CPU_ISA=avx2` decode once took 392 ms per token instead of 25. Timed tests are not
how speed is checked here, so this looks at the machine code instead.

Usage: ci/simd-inlined.py BINARY   (needs binutils' nm and objdump)

An out-of-line intrinsic (a symbol `core::core_arch::x86::<set>::_mm*`) is allowed only if
every function that calls it, following callers through generic `core::`/`alloc::`/`std::`
functions, belongs to a third-party crate in ALLOWED (aho-corasick builds its AVX2 tables
that way once, at start-up).
"""

import re
import shutil
import subprocess
import sys

ALLOWED = ("aho_corasick::", "memchr::", "regex_automata::")
INTRINSIC = re.compile(r"core::core_arch::x86::\w+::_mm\w*")
GENERIC = ("core::", "alloc::", "std::", "<core::", "<alloc::", "<std::")


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__)
        return 2
    binary = sys.argv[1]
    for tool in ("nm", "objdump"):
        if shutil.which(tool) is None:
            print(f"simd-inlined: `{tool}` (binutils) is not installed; install binutils to run this check")
            return 2
    symbols = subprocess.run(["nm", "-C", binary], check=True, capture_output=True, text=True).stdout
    intrinsics = {}
    for line in symbols.splitlines():
        parts = line.split(" ", 2)
        if len(parts) == 3 and parts[1] in "tT" and INTRINSIC.search(parts[2]):
            intrinsics[int(parts[0], 16)] = parts[2]
    if not intrinsics:
        print("simd-inlined: no out-of-line x86 intrinsic in", binary)
        return 0

    # Who calls whom, for the functions that call an intrinsic and, transitively, generic ones.
    disasm = subprocess.run(
        ["objdump", "-d", "-C", "--no-show-raw-insn", binary], check=True, capture_output=True, text=True
    ).stdout
    header = re.compile(r"^([0-9a-f]+) <(.*)>:$")
    call = re.compile(r"\bcall\s+([0-9a-f]+) ")
    names, callers = {}, {}
    current = None
    for line in disasm.splitlines():
        m = header.match(line)
        if m:
            current = int(m.group(1), 16)
            names[current] = m.group(2)
            continue
        m = call.search(line)
        if m and current is not None:
            callers.setdefault(int(m.group(1), 16), set()).add(current)

    def owners(addr, depth=0, seen=None):
        """The non-generic functions that reach `addr` through generic ones."""
        seen = seen if seen is not None else set()
        out = set()
        for c in callers.get(addr, ()):
            if c in seen:
                continue
            seen.add(c)
            name = names.get(c, hex(c))
            if name.startswith(GENERIC) and depth < 4:
                out |= owners(c, depth + 1, seen) or {name}
            else:
                out.add(name)
        return out

    bad = []
    for addr, name in sorted(intrinsics.items()):
        for owner in sorted(owners(addr)):
            if not owner.startswith(ALLOWED):
                bad.append(f"  {name}  called out of line from  {owner}")
    if bad:
        print("simd-inlined: SIMD intrinsics left as function calls in", binary)
        print("\n".join(bad))
        print("A kernel's intrinsics must be inlined into its #[target_feature] entry point: write")
        print("the code out or use a named #[inline(always)] helper instead of a closure.")
        return 1
    print(f"simd-inlined: {len(intrinsics)} out-of-line intrinsic(s), all in allowed crates")
    return 0


if __name__ == "__main__":
    sys.exit(main())
