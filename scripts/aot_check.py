"""Ahead-of-time compile check: every Triton kernel the library launches, and every CUDA kernel,
compiled for the H100/H200 (sm_90a / sm_90) on a machine without a GPU.

    python scripts/aot_check.py [--out DIR] [--quick]

Triton: `JITFunction.run` is replaced by a recorder that binds the launch's arguments exactly as the
JIT would on an sm_90 device (Triton's own binder: argument types, the int == 1 and divisible-by-16
specialisations, constexprs, num_warps/num_stages) and launches nothing. The public ops then run with
backend='triton' on CPU tensors (float32 and float64, shapes that reach each kernel and each of its
specialisations, first, second and double backward), so whatever kernels the Triton passes launch
today are found without naming them here (an autotuned kernel: each of its configs). Each distinct launch is compiled with `triton.compile` for
GPUTarget("cuda", 90, 32) and its PTX is read for tensor-core instructions (wgmma, mma.sync) and
vector global loads, then `ptxas -arch=sm_90a -v` gives registers and spills.
CUDA: `nvcc -arch=sm_90 -Xptxas -v -c` on every csrc/cuda/*.cu, registers and spills per kernel.

Writes aot.csv and aot.md to --out (default bench/results/aot/), prints the table, and exits non-zero
when a compile fails, a kernel spills (ALLOWED_SPILLS is empty), or a `*_kernel` in
skd_kernels/triton is never launched by the cases below (add a case that reaches it).
--quick compiles one launch per Triton kernel (the first recorded, float32).
Relies on Triton 3.x internals (`create_function_from_signature`, `JITFunction._pack_args`).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import importlib
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

# (kernel name, config substring) -> why its spills are accepted. Empty: no kernel may spill.
ALLOWED_SPILLS: dict[tuple[str, str], str] = {}

COLUMNS = ("source", "op", "kernel", "input", "config", "num_warps", "num_stages", "wgmma", "mma_sync", "ld_global",
           "ld_global_vector", "cp_async", "registers", "spill_stores", "spill_loads", "stack_bytes",
           "compile_s", "status")


@dataclass
class Launch:
    """One distinct Triton launch as the JIT would compile it."""
    fn: object
    op: str
    input: str  # the dtype of the op's inputs when this launch was first seen
    signature: dict
    constexprs: dict
    attrs: dict
    options: object

    @property
    def kernel(self) -> str:
        return self.fn.__name__

    def config(self) -> str:
        """The constexprs, those the JIT made of arguments equal to 1 included (a unit stride)."""
        names = [p.name for p in self.fn.params]
        return " ".join(f"{names[path[0]]}={value}" for path, value in self.constexprs.items())


# --- recording the launches -----------------------------------------------------------------------

@contextlib.contextmanager
def recording(target):
    """Within: every Triton launch is bound as on `target` and recorded, not run. Yields the list."""
    from triton.compiler import make_backend
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction, create_function_from_signature

    import skd_kernels.backends as backends

    backend = make_backend(target)
    values = torch.Generator().manual_seed(0)
    launches: list[Launch] = []
    seen = set()
    current = ["?", "?"]  # the op and the input dtype being driven

    def record(self, *args, grid, warmup, **kwargs):
        binder = create_function_from_signature(self.signature, self.params, backend)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound, specialization, options)
        key = (self.module, self.__name__, str(signature), str(constexprs), str(attrs), str(options))
        if key not in seen:
            seen.add(key)
            launches.append(Launch(self, *current, signature, constexprs, attrs, options))
        # Nothing ran, so what the kernel should have written is whatever memory held, and the ops
        # choose paths by values (the low-rank core keeps its result only when its error estimate is
        # small): seeded values in every floating-point argument make the recorded launches the same
        # from run to run. (Through .data: autograd's version counters must not see the writes.)
        for value in bound.values():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                value.data.copy_(torch.randn(value.shape, generator=values, dtype=value.dtype))

    def every_config(self, *args, grid=None, warmup=False, **kwargs):
        # An autotuned kernel would time its configs on the GPU: record each of them instead.
        for config in self.configs:
            self.fn.run(*args, **kwargs, **config.all_kwargs(), grid=grid, warmup=warmup)

    saved_run, saved_interpreting = JITFunction.run, backends.triton_interpreting
    saved_autotune = Autotuner.run
    JITFunction.run, Autotuner.run = record, every_config
    # The triton backend takes CPU tensors only when it may interpret; nothing runs here.
    backends.triton_interpreting = lambda: True
    backends.reset()
    try:
        yield launches, current
    finally:
        JITFunction.run, backends.triton_interpreting = saved_run, saved_interpreting
        Autotuner.run = saved_autotune
        backends.reset()


# Two images: a batch of one would make the JIT specialise a batch-size argument to the constant 1.
BATCH = 2


def _leaf(*shape, dtype, grad=True):
    return torch.randn(*shape, dtype=dtype).requires_grad_(grad)


def drive_pixelwise(dtype):
    from skd_kernels import pixelwise_distill_loss

    # 19 classes (Cityscapes) and 150 (ADE20K) give different class tiles; 64 x 64 logits (a 512 x 512
    # crop at stride 8) are several pixel tiles and have the JIT's divisible-by-16 sizes, as on real maps.
    for classes in (19, 150):
        labels = torch.randint(0, classes, (BATCH, 64, 64))
        for form, with_labels, teacher_grad in (("official", False, False), ("kl", True, True), ("kl", False, False)):
            student = _leaf(BATCH, classes, 64, 64, dtype=dtype)
            teacher = _leaf(BATCH, classes, 64, 64, dtype=dtype, grad=teacher_grad)
            loss = pixelwise_distill_loss(student, teacher, labels if with_labels else None, form=form,
                                          backend="triton")
            loss.backward()
        with torch.no_grad():  # no gradient buffers: the loss-only specialisation
            pixelwise_distill_loss(student, teacher, backend="triton")


def drive_pairwise(dtype):
    from skd_kernels import pairwise_distill_loss

    # 65 x 65 maps (the official feature size): scale 0.5 gives 3 x 3 nodes of 32 x 32 pixels (the
    # window kernels), node_size 2 small windows (the tile kernels), node_size 1 65 x 65 nodes.
    geometries = [dict(scale=0.5), dict(node_size=2), dict(node_size=1)]
    for geometry in geometries:
        for pooling in ("max", "avg"):
            for normalization in ("official", "paper"):
                for algorithm in ("lowrank", "tiled"):
                    if geometry.get("node_size") == 1 and pooling == "avg":
                        continue  # 1 x 1 windows pool nothing
                    student = _leaf(BATCH, 32, 65, 65, dtype=dtype)
                    teacher = _leaf(BATCH, 64, 65, 65, dtype=dtype, grad=False)
                    loss = pairwise_distill_loss(student, teacher, pooling=pooling, normalization=normalization,
                                                 algorithm=algorithm, backend="triton", **geometry)
                    loss.backward()


def drive_attention(dtype):
    from skd_kernels import fused_attention

    # The SAGAN blocks' widths: C = 256 (dk 32, dv 256) and C = 512 (dk 64, dv 512), N = 32 x 32.
    for dk, dv in ((32, 256), (64, 512)):
        q, k, v = _leaf(BATCH, 1024, dk, dtype=dtype), _leaf(BATCH, 1024, dk, dtype=dtype), _leaf(BATCH, 1024, dv, dtype=dtype)
        out = fused_attention(q, k, v, backend="triton")
        grads = torch.autograd.grad(out.square().sum(), (q, k, v), create_graph=True)
        sum(g.square().sum() for g in grads).backward()  # the double backward (a gradient penalty)


DRIVERS = {"pixelwise": drive_pixelwise, "pairwise": drive_pairwise, "attention": drive_attention}


def record_launches(target) -> list[Launch]:
    with recording(target) as (launches, current):
        for op, drive in DRIVERS.items():
            for dtype in (torch.float32, torch.float64):
                current[:] = op, str(dtype).removeprefix("torch.")
                torch.manual_seed(0)
                drive(dtype)
    return launches


def kernels_defined() -> set[tuple[str, str]]:
    """(module, name) of every JIT function named *_kernel under skd_kernels/triton."""
    import triton

    import skd_kernels.triton as package

    found = set()
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for name, value in vars(module).items():
            while isinstance(value, triton.runtime.KernelInterface) and not isinstance(value, triton.runtime.JITFunction):
                value = value.fn  # under @triton.autotune / @triton.heuristics
            if isinstance(value, triton.runtime.JITFunction) and name.endswith("_kernel"):
                found.add((value.module, value.__name__))
    return found


# --- compiling and reading the result -------------------------------------------------------------

_PTXAS_FUNCTION = re.compile(r"Compiling entry function '([^']+)'")
_PTXAS_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")


def ptxas_report(text: str) -> dict[str, dict]:
    """Per entry function of `ptxas -v` output: registers, spill stores/loads and stack bytes."""
    report, name = {}, None
    for line in text.splitlines():
        if match := _PTXAS_FUNCTION.search(line):
            name = match.group(1)
            report.setdefault(name, {})
        elif name and (match := _PTXAS_STACK.search(line)):
            report[name].update(stack_bytes=int(match.group(1)), spill_stores=int(match.group(2)),
                                spill_loads=int(match.group(3)))
        elif name and (match := _PTXAS_REGISTERS.search(line)):
            report[name]["registers"] = int(match.group(1))
    return report


def ptx_counts(ptx: str) -> dict[str, int]:
    """Instruction counts in PTX text: tensor-core MMAs and how global memory is read."""
    loads = re.findall(r"\bld\.global[\w.]*", ptx)
    return dict(wgmma=len(re.findall(r"\bwgmma\.mma_async", ptx)),
                mma_sync=len(re.findall(r"\bmma\.sync", ptx)),
                ld_global=len(loads),
                ld_global_vector=sum(1 for load in loads if re.search(r"\.v[248]\b", load)),
                cp_async=len(re.findall(r"\bcp\.async(?:\.bulk)?\.(?:ca|cg|shared|tensor)", ptx)))


def ptxas_path() -> str:
    """The ptxas Triton compiles with (the one the JIT would use), else the toolkit's."""
    try:
        from triton import knobs

        return knobs.nvidia.ptxas.path
    except Exception:  # older Triton layouts
        return shutil.which("ptxas") or ""


def compile_triton(launch: Launch, target, workdir: Path) -> dict:
    import triton
    from triton.compiler import ASTSource

    row = dict(source="triton", op=launch.op, kernel=launch.kernel, input=launch.input, config=launch.config(),
               num_warps=launch.options.num_warps, num_stages=launch.options.num_stages)
    start = time.time()
    try:
        compiled = triton.compile(ASTSource(launch.fn, launch.signature, launch.constexprs, launch.attrs),
                                  target=target, options=launch.options.__dict__)
    except Exception as error:  # a failed compile is a row of the report, and a failure of the check
        return {**row, "compile_s": f"{time.time() - start:.1f}", "status": f"compile failed: {error}"[:300]}
    row["compile_s"] = f"{time.time() - start:.1f}"
    ptx = compiled.asm["ptx"]
    row.update(ptx_counts(ptx))
    path = workdir / f"{launch.kernel}_{abs(hash(row['config']))}.ptx"
    path.write_text(ptx)
    result = subprocess.run([ptxas_path(), "-arch=sm_90a", "-v", str(path), "-o", os.devnull],
                            capture_output=True, text=True)
    if result.returncode != 0:
        return {**row, "status": f"ptxas failed: {result.stderr.strip()}"[:300]}
    (info,) = ptxas_report(result.stdout + result.stderr).values()
    return {**row, **info, "status": "ok"}


def _short_name(mangled: str) -> str:
    """`void skd::cuda::(anonymous namespace)::rows<float>(skd::P)` -> `rows<float>`."""
    name = subprocess.run(["c++filt", mangled], capture_output=True, text=True).stdout.strip() or mangled
    name = re.sub(r"^void ", "", name)
    depth, cut = 0, len(name)
    for i in range(len(name) - 1, -1, -1):  # drop the parameter list: the last top-level (...)
        depth += {")": 1, "(": -1}.get(name[i], 0)
        if depth == 0 and name[i] == "(":
            cut = i
            break
    name = name[:cut]
    head, _, template = name.partition("<")
    return head.split("::")[-1] + ("<" + template if template else "")


def ptx_entries(ptx: str) -> dict[str, str]:
    """The PTX text of each entry function, by its (mangled) name."""
    starts = [(match.start(), match.group(1)) for match in re.finditer(r"\.entry\s+([\w$]+)\s*\(", ptx)]
    ends = [start for start, _ in starts[1:]] + [len(ptx)]
    return {name: ptx[start:end] for (start, name), end in zip(starts, ends)}


def compile_cuda(workdir: Path) -> list[dict]:
    from torch.utils import cpp_extension

    flags = ["-arch=sm_90", "-O3", "-DSKD_WITH_CUDA", "-Xptxas", "-v", f"-I{ROOT / 'csrc'}",
             *(f"-I{path}" for path in cpp_extension.include_paths()),
             *getattr(cpp_extension, "COMMON_NVCC_FLAGS", []),  # as the extension's build compiles them
             "-keep", f"-keep-dir={workdir}"]  # the PTX too, for the instruction counts
    rows = []
    for source in sorted((ROOT / "csrc" / "cuda").glob("*.cu")):
        start = time.time()
        result = subprocess.run(["nvcc", *flags, "-c", str(source), "-o", str(workdir / f"{source.stem}.o")],
                                capture_output=True, text=True)
        elapsed = f"{time.time() - start:.1f}"
        base = dict(source="cuda", op=source.stem, num_warps="", num_stages="", compile_s=elapsed)
        if result.returncode != 0:
            rows.append({**base, "kernel": source.name, "config": "",
                         "status": f"nvcc failed: {result.stderr.strip()[-300:]}"})
            continue
        ptx_file = workdir / f"{source.stem}.ptx"
        entries = ptx_entries(ptx_file.read_text()) if ptx_file.exists() else {}
        for mangled, info in ptxas_report(result.stdout + result.stderr).items():
            head, _, template = _short_name(mangled).partition("<")
            template = template.removesuffix(">")
            counts = ptx_counts(entries[mangled]) if mangled in entries else {}
            rows.append({**base, "kernel": head, "input": template.split(",")[0], "config": f"<{template}>",
                         **counts, **info, "status": "ok"})
    return rows


# --- the report -----------------------------------------------------------------------------------

def problems(rows: list[dict], missing: set) -> list[str]:
    found = [f"{row['kernel']} [{row['config']}]: {row['status']}" for row in rows if row["status"] != "ok"]
    for row in rows:
        spilled = int(row.get("spill_stores") or 0) + int(row.get("spill_loads") or 0)
        allowed = any(name == row["kernel"] and part in row["config"] for name, part in ALLOWED_SPILLS)
        if spilled and not allowed:
            found.append(f"{row['kernel']} [{row['config']}] spills {row['spill_stores']} B stored, "
                         f"{row['spill_loads']} B loaded")
    found += [f"{module}.{name} is never launched by the cases in scripts/aot_check.py" for module, name in
              sorted(missing)]
    return found


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, ""]
    for source in ("triton", "cuda"):
        part = [row for row in rows if row["source"] == source]
        if not part:
            continue
        shown = [c for c in COLUMNS if c not in ("source", "compile_s") and any(row.get(c, "") != "" for row in part)]
        lines += [f"### {source}", "", "| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
        lines += ["| " + " | ".join(str(row.get(c, "")) for c in shown) + " |" for row in part]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "aot")
    parser.add_argument("--quick", action="store_true", help="compile one launch per Triton kernel")
    parser.add_argument("--no-cuda", action="store_true", help="skip the nvcc pass over csrc/cuda")
    args = parser.parse_args(argv)

    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", 90, 32)
    start = time.time()
    launches = record_launches(target)
    missing = kernels_defined() - {(launch.fn.module, launch.kernel) for launch in launches}
    if args.quick:
        firsts = {}
        for launch in launches:
            firsts.setdefault(launch.kernel, launch)
        launches = list(firsts.values())
    print(f"recorded in {time.time() - start:.0f} s; compiling {len(launches)} Triton launches", flush=True)

    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for launch in launches:
            rows.append(compile_triton(launch, target, Path(workdir)))
            print(f"  {rows[-1]['kernel']} [{rows[-1]['config']}]: {rows[-1]['status']}", flush=True)
        if not args.no_cuda:
            rows += compile_cuda(Path(workdir))

    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "aot.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    import triton

    header = (f"## Ahead-of-time compile for sm_90a ({'--quick, ' if args.quick else ''}Triton {triton.__version__}, "
              f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')})\n\n"
              "Generated by `python scripts/aot_check.py`. Triton: every distinct launch the ops make "
              "(input: the op's input dtype; config: the constexprs, those the JIT made of arguments equal to 1 "
              "included); registers, spills (bytes) and stack from `ptxas -arch=sm_90a -v`. CUDA: "
              "`nvcc -arch=sm_90 -Xptxas -v` per kernel instantiation (config: its template arguments). "
              "wgmma, mma_sync (tensor-core MMAs), ld_global (all global loads), ld_global_vector "
              "(.v2/.v4 among them) and cp_async (asynchronous global-to-shared copies) count PTX "
              "instructions in the code, not executions.")
    table = markdown(rows, header)
    found = problems(rows, missing)
    if found:
        table += "\n### Problems\n\n" + "\n".join(f"- {line}" for line in found) + "\n"
    (args.out / "aot.md").write_text(table)
    print(table)
    print(f"{len(rows)} kernels in {time.time() - start:.0f} s; {len(found)} problems; written to {args.out}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
