"""Compare the machine code of two builds of the C++ extension, function by function.

A refactor of the kernels (deduplicating templates, a new vector abstraction) costs no
speed when the ISA units compile to the same instructions. This prints, per object file,
the functions whose instruction sequences differ (addresses, jump targets and symbol
names removed; functions matched by demangled name, templates' arguments dropped),
so that only real code changes show. Build dirs: ``~/.cache/torchq/torchq_cpu_<key>``.

    python benchmarks/dev/compare_codegen.py OLD_BUILD_DIR NEW_BUILD_DIR [isa_avx2 ...]
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from pathlib import Path


def functions(obj: Path) -> dict[str, list[str]]:
    """demangled function name -> normalized instructions."""
    text = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", str(obj)], capture_output=True, text=True,
                          check=True).stdout
    out: dict[str, list[str]] = {}
    name = None
    for line in text.splitlines():
        head = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if head:
            name = re.sub(r"<[^<>]*>", "<>", head.group(1))
            while re.search(r"<[^<>]*<>[^<>]*>", name):
                name = re.sub(r"<[^<>]*<>[^<>]*>", "<>", name)
            base, n = name, 1
            while name in out:
                n += 1
                name = f"{base}#{n}"
            out[name] = []
            continue
        ins = re.match(r"^\s+[0-9a-f]+:\s+(.*)$", line)
        if name and ins:
            s = re.sub(r"<[^>]*>", "", ins.group(1))
            s = re.sub(r"\b(j\w+|call)\s+[0-9a-f]+", r"\1 X", s)
            s = re.sub(r"-?0x[0-9a-f]+\(%rip\)", "C(%rip)", s)  # where a constant sits
            s = re.sub(r"#.*$", "", s)  # the comment naming that address
            out[name].append(s.strip())
    return out


def main(argv: list[str]) -> int:
    old, new, *units = argv
    units = units or ["isa_scalar", "isa_avx2", "isa_avx512", "ops", "decode"]
    changed = 0
    for unit in units:
        a, b = functions(Path(old) / f"{unit}.o"), functions(Path(new) / f"{unit}.o")
        same_multiset = Counter(map(tuple, a.values())) == Counter(map(tuple, b.values()))
        diff = [n for n in sorted(set(a) | set(b)) if a.get(n) != b.get(n)]
        print(f"{unit}: {len(a)} / {len(b)} functions, {sum(map(len, a.values()))} / {sum(map(len, b.values()))} "
              f"instructions; identical code: {same_multiset}")
        if not same_multiset:
            changed += 1
            for n in diff[:20]:
                print(f"  {n}: {len(a.get(n, []))} -> {len(b.get(n, []))} instructions")
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
