"""Where the CUDA kernels' loops issue their 16-byte loads, read off SASS.

The kernels load several 16-byte pieces per thread before using the first
(kPiecesInFlight), so that a round of loads waits on the memory once. ptxas
may still move later loads below a use of the first (to save registers), and
the round then waits twice or more. Only the machine code says which:

    nvcc -x cu -std=c++17 -O3 -I. --expt-relaxed-constexpr -arch=sm_90 \\
        -cubin -lineinfo tests/gpu/harness.cu -o /tmp/harness.cubin
    python bench/sass_loads.py /tmp/harness.cubin --kernel SparseBackward

For every innermost loop holding two or more 16-byte global loads it prints
how many of them, and of its scalar global loads (dense labels), are issued
before the first one's registers are read, and the lines of the CUDA kernel
headers (xent_gpu_*.cu.h, xent_functor_gpu.cu.h) the loop holds, as
FILE:LINE (which part of a kernel it is). Needs
nvdisasm: a CUDA toolkit has it; without one, Triton's wheel carries one
(triton/backends/nvidia/bin).
"""

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys

_HEADER = re.compile(r"xent_(functor_)?gpu\w*\.cu\.h$")
_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRANCH = re.compile(r"\bBRA\s+`\((\.L_x_\d+)\)")
_WIDE_LOAD = re.compile(r"\bLDG\.\S*128\s+R(\d+)")
_SCALAR_LOAD = re.compile(r"\bLDG(\.E)?(\.U16|\.U8|\.S16)?(\.\w+)*?\s+R\d+,")


def _file_line(location):
    file, line = location.rsplit(":", 1)
    return file, int(line)


@dataclasses.dataclass
class Loop:
    kernel: str
    instructions: int
    wide_loads: int
    issued_before_use: int  # of the wide loads, before the first is read
    scalar_loads: int
    scalar_before_use: int  # of the scalar loads, before that read
    lines: list


def _functions(listing):
    """(name, instructions, labels) per function of an nvdisasm listing;
    instructions are (text, "FILE:LINE" in a _HEADER or None), labels map a label to
    the index of the instruction after it."""
    name, body, labels, line = None, [], {}, None
    for raw in listing.splitlines():
        if raw.startswith(".text."):
            if name:
                yield name, body, labels
            name, body, labels, line = raw[6:].strip().rstrip(":"), [], {}, None
            continue
        if name is None:
            continue
        label = re.match(r"(\.L_x_\d+):", raw)
        if label:
            labels[label.group(1)] = len(body)
            continue
        source = re.search(r'//## File "(.*?)", line (\d+)', raw)
        if source:
            file = os.path.basename(source.group(1))
            line = f"{file}:{source.group(2)}" if _HEADER.search(file) else None
            continue
        instruction = _INSTRUCTION.search(raw)
        if instruction:
            body.append((instruction.group(2), line))
    if name:
        yield name, body, labels


def _registers_read(text):
    """Registers an instruction reads: those after its first operand (the
    destination), or all of a store's or branch's."""
    operands = text.split(None, 1)[1] if " " in text else ""
    if not re.match(r"(@\S+\s+)?(ST|BRA|EXIT|BAR)", text) and "," in operands:
        operands = operands.split(",", 1)[1]
    return set(re.findall(r"\bR(\d+)\b", operands))


def _is_scalar_load(text):
    return bool(_SCALAR_LOAD.search(text)) and not _WIDE_LOAD.search(text)


def _loop(kernel, loop):
    """The Loop of one innermost loop's instructions, or None if it holds
    fewer than two 16-byte loads."""
    wide = []
    for i, (text, _) in enumerate(loop):
        match = _WIDE_LOAD.search(text)
        if match:
            wide.append((i, int(match.group(1))))
    if len(wide) < 2:
        return None
    first, base = wide[0]
    written = {str(base + k) for k in range(4)}
    use = next(
        (i for i in range(first + 1, len(loop)) if _registers_read(loop[i][0]) & written),
        len(loop),
    )
    return Loop(
        kernel=kernel,
        instructions=len(loop),
        wide_loads=len(wide),
        issued_before_use=sum(1 for i, _ in wide if i < use),
        scalar_loads=sum(1 for text, _ in loop if _is_scalar_load(text)),
        scalar_before_use=sum(1 for text, _ in loop[:use] if _is_scalar_load(text)),
        lines=sorted({line for _, line in loop if line}, key=_file_line),
    )


def loops(listing):
    """A Loop for each innermost loop with two or more 16-byte loads."""
    found = []
    for name, body, labels in _functions(listing):
        spans = []
        for end, (text, _) in enumerate(body):
            branch = _BRANCH.search(text)
            if branch and labels.get(branch.group(1), end + 1) <= end:
                spans.append((labels[branch.group(1)], end))
        for start, end in spans:
            if any(start <= s and e <= end and (s, e) != (start, end) for s, e in spans):
                continue  # holds another loop: not innermost
            loop = _loop(name, body[start : end + 1])
            if loop is not None:
                found.append(loop)
    return found


def _demangle(names):
    if not shutil.which("c++filt"):
        return names
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True)
    demangled = out.stdout.splitlines()
    return demangled if out.returncode == 0 and len(demangled) == len(names) else names


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cubin")
    parser.add_argument("--kernel", action="append", default=[], help="name substring")
    parser.add_argument("--nvdisasm", default=shutil.which("nvdisasm") or "nvdisasm")
    args = parser.parse_args()
    listing = subprocess.run(
        [args.nvdisasm, "--print-line-info", args.cubin], capture_output=True, text=True, check=True
    ).stdout
    found = [lp for lp in loops(listing) if all(k in lp.kernel for k in args.kernel)]
    names = _demangle([lp.kernel for lp in found])
    for lp, name in zip(found, names, strict=True):
        name = re.sub(r"\(.*", "", name.replace("tf_xent_ops::gpu::", ""))
        print(
            f"{name:52s} {lp.instructions:5d} instructions: {lp.issued_before_use}/{lp.wide_loads}"
            f" 16-byte loads before the first is used ({lp.scalar_before_use}/{lp.scalar_loads}"
            f" scalar loads), lines {lp.lines}"
        )


if __name__ == "__main__":
    sys.exit(main())
