"""Registers, spills and shared memory of Pallas Triton kernels on an H100, from a CPU machine.

    JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 /work/venvs/cuda/bin/python experiments/kernel_ptx.py \
        --target=quipjax.kernels.pallas_e8p:export_targets \
        [--target_kwargs='{"batches": [1]}'] [--filter=E8P12_4096] \
        [--out_dir=/tmp/kernel_ptx] [--json_out=/tmp/kernel_ptx/summary.json] \
        [--arch=9.0] [--ptxas=/usr/local/bin/ptxas] [--num_warps=N] [--num_stages=N]

    # the toy kernels of this file (vector add, tiled matmul):
    JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 /work/venvs/cuda/bin/python experiments/kernel_ptx.py \
        --target=experiments/kernel_ptx.py:example_targets

No GPU needed. `--target=module:function` (or `path/to/file.py:function`) names a callable
returning a list of (name, jitted_fn, example_args[, meta]) with the args as
`jax.ShapeDtypeStruct`s (pytrees allowed); meta {"weights_per_iter": N} (weights one CTA
decodes per iteration of its main loop) turns loop counts into instructions per weight. For each:

  1. `jax.export.export(fn, platforms=["cuda"], disabled_checks=[custom_call(
     "__gpu$xla.gpu.triton")])(*args)`: the StableHLO holds one `stablehlo.custom_call
     @__gpu$xla.gpu.triton` per `pallas_call` (jaxlib <= 0.10.2 defers Triton compilation to
     XLA). Its `mhlo.backend_config` is a dictionary attribute: `ir` (a string attribute whose
     bytes are the Triton IR (TTIR) as MLIR bytecode), `name`, `num_warps`, `num_stages`,
     `grid_x/y/z`.
  2. `jax._src.lib.triton.compile("cuda", ttir, arch, num_warps=, num_ctas=1, num_stages=)`
     (the handler the jax-cuda12-plugin registers; it runs Triton's own pass pipeline, as XLA
     would) gives PTX and the kernel's dynamic shared memory.
  3. `ptxas -arch=sm_90a -v` assembles the PTX: registers per thread, spill stores / loads,
     stack frame.
  4. The kernel's main loop (the largest one: a label and the later branch back to it) is
     counted in the PTX and, when `cuobjdump` + `nvdisasm` are found (pip nvidia-cuda-cuobjdump
     and nvidia-cuda-nvdisasm, any 13.x), in the SASS: instructions per iteration, per opcode
     in the JSON, and per weight with the target's meta (per thread: weights_per_iter / (32 x
     num_warps)).

Prints a table, writes <out_dir>/<target>__<kernel>.ptx (and .ttir, the IR as text) and a
JSON summary. "ptxas notes" counts ptxas's coded messages (C7514: "Potential Performance Loss:
wgmma.mma_async instructions are serialized"; C7517 / C7519: warpgroup.wait / .arrive
injected around a wgmma; C7511: wgmma serialized for lack of registers; the JSON has the
full lines). "CTAs/SM" is an estimate from H100 limits (64K registers, 64 warps, 32 CTAs,
228 KiB shared memory with 1 KiB reserved per CTA per SM); it assumes nothing else limits.

Needs a venv with jax-cuda12-plugin of the same version as jax; stops with a message
anywhere else. Built with (pip resolves jax-cuda12-pjrt itself; no nvidia-* wheels needed,
the CUDA 13 `ptxas` of /usr/local/cuda-13.0 assembles the PTX 8.8 that Triton emits):

    python -m venv /work/venvs/cuda
    /work/venvs/cuda/bin/pip install jax==0.10.2 jaxlib==0.10.2 jax-cuda12-plugin==0.10.2 \
        flatbuffers numpy absl-py "flax==0.12.8" "orbax-checkpoint==0.12.8" optax tqdm safetensors gguf
    /work/venvs/cuda/bin/pip install --no-deps -e .      # quipjax itself, from this checkout
    /work/venvs/cuda/bin/pip install nvidia-cuda-cuobjdump==13.2.51 nvidia-cuda-nvdisasm==13.2.51
                                                         # optional: SASS loop counts

Exit status 1 if any target or kernel failed.
"""
from __future__ import annotations

import glob
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import traceback

os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")  # no CUDA driver here
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # hide "Could not find cuda drivers"

from absl import flags  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402
from jax.experimental.pallas import triton as pltriton  # noqa: E402
from quipjax.pipeline import cli  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("target", "experiments/kernel_ptx.py:example_targets",
                    "module:function or path/to/file.py:function returning a list of "
                    "(name, jitted_fn, example_args[, meta]).")
flags.DEFINE_string("target_kwargs", "{}", "JSON object of keyword arguments for the target "
                    "function, e.g. '{\"batches\": [1]}'.")
flags.DEFINE_string("filter", "", "Regex (re.search) on target names: keep only those.")
flags.DEFINE_string("out_dir", "/tmp/kernel_ptx", "Where the .ptx / .ttir files go.")
flags.DEFINE_string("json_out", "", "JSON summary path (default <out_dir>/summary.json).")
flags.DEFINE_string("arch", "9.0", "Compute capability for Triton (9.0 = H100, sm_90a).")
flags.DEFINE_string("ptxas_arch", "", "ptxas -arch (default from --arch: 9.0 -> sm_90a).")
flags.DEFINE_string("ptxas", "", "ptxas binary (default: $PTXAS, PATH, nvidia pip packages, "
                    "/usr/local/cuda*/bin).")
flags.DEFINE_integer("num_warps", None, "Override every kernel's num_warps (default: the "
                     "value in its pallas_call's CompilerParams).")
flags.DEFINE_integer("num_stages", None, "Override every kernel's num_stages.")

TRITON_TARGET = "__gpu$xla.gpu.triton"
H100 = dict(regs_per_sm=65536, max_warps=64, max_ctas=32, smem_per_sm=228 * 1024,
            smem_reserved_per_cta=1024)


# ----------------------------------------------------------------------------------- environment

def check_environment() -> dict:
    """Fail with a clear message unless jax-cuda12-plugin (same version as jax) is installed."""
    try:
        plugin_version = importlib.metadata.version("jax-cuda12-plugin")
    except importlib.metadata.PackageNotFoundError:
        sys.exit(
            "kernel_ptx.py: jax-cuda12-plugin is not installed in this Python "
            f"({sys.executable}).\nIt provides the Triton -> PTX compiler. Run this script with "
            "the CUDA venv, e.g.\n  JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 /work/venvs/cuda/bin/python "
            "experiments/kernel_ptx.py ...\nor build one:\n  python -m venv /work/venvs/cuda && "
            f"/work/venvs/cuda/bin/pip install jax=={jax.__version__} jaxlib=={jax.__version__} "
            f"jax-cuda12-plugin=={jax.__version__} flatbuffers numpy absl-py")
    import jaxlib
    if plugin_version != jax.__version__ or jaxlib.__version__ != jax.__version__:
        sys.exit(f"kernel_ptx.py: version mismatch: jax {jax.__version__}, jaxlib "
                 f"{jaxlib.__version__}, jax-cuda12-plugin {plugin_version}; they must agree.")
    from jax._src.lib import triton
    jax.devices()  # initializes the plugins; the CUDA one registers the Triton handler
    if not triton.has_compilation_handler("cuda"):
        sys.exit("kernel_ptx.py: jax-cuda12-plugin is installed but registered no Triton "
                 "compilation handler (did the plugin fail to load? set "
                 "JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 and look at the log above).")
    return {"jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "jax_cuda12_plugin": plugin_version}


def find_ptxas(explicit: str) -> str:
    cands = [explicit, os.environ.get("PTXAS", ""), shutil.which("ptxas") or ""]
    try:
        import nvidia.cuda_nvcc  # type: ignore  # pip nvidia-cuda-nvcc-cu12
        for p in nvidia.cuda_nvcc.__path__:
            cands.append(os.path.join(p, "bin", "ptxas"))
    except ImportError:
        pass
    cands += sorted(glob.glob("/usr/local/cuda*/bin/ptxas"), reverse=True)
    for c in cands:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    sys.exit("kernel_ptx.py: no ptxas found (tried --ptxas, $PTXAS, PATH, nvidia-cuda-nvcc-cu12, "
             "/usr/local/cuda*/bin). pip install nvidia-cuda-nvcc-cu12 gives one.")


def ptxas_version(ptxas: str) -> str:
    out = subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release ([\d.]+), (V[\d.]+)", out)
    return f"{m.group(1)} ({m.group(2)})" if m else out.strip().splitlines()[-1]


# ------------------------------------------------------------------------------------ targets

def load_target(spec: str):
    """'pkg.mod:fn' or 'path/file.py:fn' -> the callable (this file's own functions directly)."""
    mod_part, sep, fn_name = spec.rpartition(":")
    if not sep or not mod_part or not fn_name:
        raise cli.UserError(f"--target must be module:function, got {spec!r}")
    if mod_part.endswith(".py") or os.sep in mod_part:
        path = os.path.abspath(mod_part)
    else:
        found = importlib.util.find_spec(mod_part)
        if found is None:
            raise cli.UserError(f"--target: no module {mod_part!r} (sys.path starts {sys.path[:3]})")
        path = os.path.abspath(found.origin or "")
    if path == os.path.abspath(__file__):  # don't import this file twice (absl flags clash)
        return globals()[fn_name]
    if mod_part.endswith(".py") or os.sep in mod_part:
        s = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
        mod = importlib.util.module_from_spec(s)
        s.loader.exec_module(mod)
    else:
        mod = importlib.import_module(mod_part)
    return getattr(mod, fn_name)


# ------------------------------------------------------------------------------ TTIR extraction

def _ir():
    from jax._src.interpreters import mlir
    from jax._src.lib.mlir import ir
    return mlir, ir


def export_cuda(fn, args):
    return jax.export.export(
        fn, platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON_TARGET)])(*args)


def triton_kernels(exported) -> list[dict]:
    """Every `__gpu$xla.gpu.triton` custom call of an export: TTIR bytes and launch parameters.

    The custom call (api_version 4) carries `mhlo.backend_config` as a dictionary attribute;
    its `ir` entry is a string attribute holding the TTIR as MLIR bytecode (`value_bytes`).
    """
    mlir, ir = _ir()
    ctx = mlir.make_ir_context()
    kernels, others = [], set()
    with ctx:
        module = ir.Module.parse(exported.mlir_module())

        def visit(op):
            for region in op.regions:
                for block in region.blocks:
                    for o in block.operations:
                        o = o.operation
                        if o.name == "stablehlo.custom_call":
                            tgt = ir.StringAttr(o.attributes["call_target_name"]).value
                            if tgt == TRITON_TARGET:
                                kernels.append(_kernel_info(ir, o))
                            else:
                                others.add(tgt)
                        visit(o)
        visit(module.operation)
    if not kernels and "triton_kernel_call_ffi" in others:
        raise RuntimeError("this jaxlib compiles Triton kernels at lowering time "
                           "(triton_kernel_call_ffi); kernel_ptx.py reads the deferred "
                           f"{TRITON_TARGET} calls of jaxlib <= 0.10.2")
    return kernels


def _kernel_info(ir, op) -> dict:
    cfg = op.attributes["mhlo.backend_config"]
    if not isinstance(cfg, ir.DictAttr):
        cfg = ir.DictAttr(cfg)
    get_i = lambda k: ir.IntegerAttr(cfg[k]).value  # noqa: E731
    return {"kernel": ir.StringAttr(cfg["name"]).value,
            "ttir": ir.StringAttr(cfg["ir"]).value_bytes,
            "num_warps": get_i("num_warps"), "num_stages": get_i("num_stages"),
            "grid": [get_i("grid_x"), get_i("grid_y"), get_i("grid_z")]}


def ttir_text(ttir: bytes) -> str:
    mlir, ir = _ir()
    from jax._src.lib.triton import dialect as tt_dialect
    ctx = mlir.make_ir_context()
    tt_dialect.register_dialect(ctx)
    ctx.load_all_available_dialects()
    with ctx:
        return ir.Module.parse(ttir).operation.get_asm(enable_debug_info=False)


# ------------------------------------------------------------------------------- PTX and ptxas

_PTX_LABEL = re.compile(r"^\s*(\$L__BB\d+_\d+):")
_PTX_BRA = re.compile(r"\bbra(?:\.uni)?\s+(\$L__BB\d+_\d+)\s*;")
_SASS_BRA = re.compile(r"\bBRA\s+(0x[0-9a-f]+)")
_SASS_INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.+?)\s*;")


def _ptx_opcode(line: str):
    """The opcode of one PTX instruction line ('mad.lo.s32', 'ld.global.u16', ...), or None."""
    s = line.split("//")[0].strip()
    if not s.endswith(";") or s.startswith((".", "{", "}")) or _PTX_LABEL.match(s):
        return None
    s = re.sub(r"^@!?%\w+\s+", "", s)           # predicate guard
    return s.split()[0].rstrip(";")


def _sass_opcode(line: str):
    m = _SASS_INSTR.match(line)
    if not m:
        return None
    s = re.sub(r"^@!?U?P\w+\s+", "", m.group(2))
    return s.split()[0]


def loop_instructions(text: str, sass: bool = False) -> dict:
    """The largest loop of a kernel (a branch back to an earlier instruction): number of
    instructions from the branch target to the branch, and the count per opcode.

    PTX: labels `$L__BB0_3:`, branches `bra $L__BB0_3;`. SASS (`cuobjdump -sass`):
    instructions `/*0a30*/  IADD3 ... ;` with their addresses, branches `BRA 0x2020`; NOPs
    are not counted. {} when the kernel has no loop.
    """
    if sass:
        instrs = []                                   # (address, opcode, line)
        for ln in text.splitlines():
            m = _SASS_INSTR.match(ln)
            if m:
                instrs.append((int(m.group(1), 16), _sass_opcode(ln), ln))
        spans = []
        for i, (addr, _, ln) in enumerate(instrs):
            b = _SASS_BRA.search(ln)
            if b and int(b.group(1), 16) < addr:
                t = int(b.group(1), 16)
                spans.append([o for a, o, _ in instrs[:i + 1] if a >= t and o != "NOP"])
    else:
        lines, labels, spans = text.splitlines(), {}, []
        for i, ln in enumerate(lines):
            m = _PTX_LABEL.match(ln)
            if m:
                labels[m.group(1)] = i
            b = _PTX_BRA.search(ln)
            if b and b.group(1) in labels:                    # a backward branch
                ops = [_ptx_opcode(x) for x in lines[labels[b.group(1)] + 1:i + 1]]
                spans.append([o for o in ops if o])
    if not spans:
        return {}
    ops = max(spans, key=len)
    hist = {}
    for o in ops:
        hist[o] = hist.get(o, 0) + 1
    return {"instructions": len(ops), "opcodes": hist}


def find_cuobjdump(ptxas: str) -> str:
    """cuobjdump (needs nvdisasm beside it or on PATH) for SASS counts, or "" (then skipped)."""
    cands = [os.environ.get("CUOBJDUMP", ""), shutil.which("cuobjdump") or "",
             os.path.join(os.path.dirname(ptxas), "cuobjdump")]
    cands += glob.glob(os.path.join(sys.prefix, "lib", "python*", "site-packages", "nvidia",
                                    "*", "bin", "cuobjdump"))
    for c in cands:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return ""


def sass_text(cuobjdump: str, cubin: str) -> str:
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(cuobjdump) + os.pathsep + env.get("PATH", "")
    p = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"cuobjdump failed ({p.returncode}): {p.stderr.strip()}")
    return p.stdout

_RE_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_RE_USED = re.compile(r"Used (\d+) registers(?:, used (\d+) barriers)?(?:, (\d+) bytes smem)?")


def run_ptxas(ptxas: str, ptx_path: str, arch: str) -> dict:
    cubin = ptx_path[:-4] + ".cubin"
    p = subprocess.run([ptxas, f"-arch={arch}", "-v", ptx_path, "-o", cubin],
                       capture_output=True, text=True)
    log = p.stdout + p.stderr
    if p.returncode != 0:
        raise RuntimeError(f"ptxas failed ({p.returncode}):\n{log}")
    props, used = _RE_PROPS.search(log), _RE_USED.search(log)
    if not (props and used):
        raise RuntimeError(f"could not parse ptxas output:\n{log}")
    return {"registers": int(used.group(1)), "barriers": int(used.group(2) or 0),
            "static_smem": int(used.group(3) or 0), "stack_frame": int(props.group(1)),
            "spill_stores": int(props.group(2)), "spill_loads": int(props.group(3)),
            "ptxas_warnings": [ln for ln in log.splitlines() if "warning" in ln.lower()],
            "ptxas_notes": _note_codes(log),
            "ptxas_log": log, "cubin": cubin}


def _note_codes(log: str) -> dict:
    """Counts of ptxas message codes, e.g. {"C7519": 12} (warpgroup.arrive injected for wgmma)."""
    counts = {}
    for code in re.findall(r"\((C\d+)\)", log):
        counts[code] = counts.get(code, 0) + 1
    return counts


def ctas_per_sm(regs: int, num_warps: int, smem: int, lim=H100) -> int:
    """Theoretical resident CTAs per SM (register allocation: 256 per warp granule)."""
    regs_per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    by_regs = lim["regs_per_sm"] // (regs_per_warp * num_warps)
    by_warps = lim["max_warps"] // num_warps
    by_smem = lim["smem_per_sm"] // (smem + lim["smem_reserved_per_cta"])
    return min(by_regs, by_warps, by_smem, lim["max_ctas"])


def _safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s)


def analyse(targets, ptxas: str) -> list[dict]:
    from jax._src.lib import triton
    arch = FLAGS.ptxas_arch or ("sm_%sa" if FLAGS.arch == "9.0" else "sm_%s") % FLAGS.arch.replace(".", "")
    cuobjdump = find_cuobjdump(ptxas)
    rows = []
    for tname, fn, args, *meta in targets:
        meta = meta[0] if meta else {}
        try:
            kernels = triton_kernels(export_cuda(fn, args))
        except Exception as e:  # noqa: BLE001
            rows.append({"target": tname, "error": f"export: {type(e).__name__}: {e}"})
            print(f"[{tname}] export failed:\n{traceback.format_exc()}", file=sys.stderr)
            continue
        if not kernels:
            rows.append({"target": tname, "error": f"no {TRITON_TARGET} custom call"})
            continue
        seen = {}  # identical (ttir, warps, stages) compile once
        names = [k["kernel"] for k in kernels]
        for i, k in enumerate(kernels):
            nw = FLAGS.num_warps or k["num_warps"]
            ns = FLAGS.num_stages or k["num_stages"]
            kname = k["kernel"] if names.count(k["kernel"]) == 1 else f"{k['kernel']}#{i}"
            key = (k["ttir"], nw, ns)
            row = {"target": tname, "kernel": kname, "num_warps": nw, "num_stages": ns,
                   "grid": k["grid"], "ttir_bytes": len(k["ttir"])}
            if key in seen:
                rows.append({**seen[key], **row, "duplicate_of": seen[key]["kernel"]})
                continue
            stem = os.path.join(FLAGS.out_dir, _safe(f"{tname}__{kname}"))
            try:
                with open(stem + ".ttir", "w") as f:
                    f.write(ttir_text(k["ttir"]))
                res = triton.compile("cuda", k["ttir"], FLAGS.arch, num_warps=nw, num_ctas=1,
                                     num_stages=ns)
                with open(stem + ".ptx", "w") as f:
                    f.write(res.asm)
                row.update(smem=int(res.smem_bytes), ptx=stem + ".ptx", ttir=stem + ".ttir")
                row.update(run_ptxas(ptxas, stem + ".ptx", arch))
                _loop_counts(row, res.asm, cuobjdump, meta, nw)
                row["ctas_per_sm_est"] = ctas_per_sm(row["registers"], nw,
                                                     row["smem"] + row["static_smem"])
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {e}"
                print(f"[{tname}/{kname}] failed:\n{traceback.format_exc()}", file=sys.stderr)
            seen[key] = row
            rows.append(row)
    return rows


def _loop_counts(row, ptx, cuobjdump, meta, num_warps):
    """Instructions of the kernel's main loop (PTX, and SASS when cuobjdump is there), per
    weight when the target states `weights_per_iter` (weights one CTA decodes per iteration)."""
    row["loop_ptx"] = loop_instructions(ptx)
    if cuobjdump:
        sass = sass_text(cuobjdump, row["cubin"])
        with open(row["cubin"][:-6] + ".sass", "w") as f:
            f.write(sass)
        row["loop_sass"] = loop_instructions(sass, sass=True)
    wpi = meta.get("weights_per_iter")
    if wpi:
        per_thread = wpi / (32 * num_warps)
        row["weights_per_thread_iter"] = per_thread
        for k in ("loop_ptx", "loop_sass"):
            if row.get(k):
                row[k]["per_weight"] = row[k]["instructions"] / per_thread


def _loop_cell(r, key):
    d = r.get(key) or {}
    if not d:
        return "-"
    return str(d["instructions"]) + (f" ({d['per_weight']:.2f}/w)" if "per_weight" in d else "")


def print_table(rows):
    hdr = ["target", "kernel", "warps", "stages", "grid", "regs", "spill st B", "spill ld B",
           "stack B", "smem B", "CTAs/SM", "loop PTX", "loop SASS", "ptxas notes"]
    print("| " + " | ".join(hdr) + " |")
    print("|" + "---|" * len(hdr))
    for r in rows:
        if "error" in r:
            print(f"| {r['target']} | {r.get('kernel', '-')} | ERROR: {r['error'].splitlines()[0][:120]} |")
            continue
        print("| " + " | ".join(str(x) for x in [
            r["target"], r["kernel"] + (f" (= {r['duplicate_of']})" if "duplicate_of" in r else ""),
            r["num_warps"], r["num_stages"], "x".join(map(str, r["grid"])), r["registers"],
            r["spill_stores"], r["spill_loads"], r["stack_frame"],
            r["smem"] + r["static_smem"], r["ctas_per_sm_est"], _loop_cell(r, "loop_ptx"),
            _loop_cell(r, "loop_sass"),
            " ".join(f"{c}x{n}" for c, n in sorted(r["ptxas_notes"].items())) or "-"]) + " |")


# ------------------------------------------------------------------------- example (toy) targets

def _add_kernel(x_ref, y_ref, o_ref):
    o_ref[...] = x_ref[...] + y_ref[...]


def vector_add(x, y, *, block=1024, interpret=False):
    """x + y, 1-D, len a multiple of `block` (a power of two)."""
    spec = pl.BlockSpec((block,), lambda i: (i,))
    return pl.pallas_call(
        _add_kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), grid=(x.shape[0] // block,),
        in_specs=[spec, spec], out_specs=spec, interpret=interpret,
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1))(x, y)


def tiled_matmul(x, y, *, bm=64, bn=64, bk=32, num_warps=4, num_stages=3, interpret=False):
    """x (M, K) @ y (K, N) -> (M, N) float32; (bm, bn) output tile per program, K loop in-kernel."""
    (m, k), (_, n) = x.shape, y.shape

    def kernel(x_ref, y_ref, o_ref):
        def body(i, acc):
            xs = x_ref[:, pl.ds(i * bk, bk)]
            ys = y_ref[pl.ds(i * bk, bk), :]
            return acc + jnp.dot(xs, ys, preferred_element_type=jnp.float32)
        o_ref[...] = jax.lax.fori_loop(0, k // bk, body, jnp.zeros((bm, bn), jnp.float32))

    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((m, n), jnp.float32), grid=(m // bm, n // bn),
        in_specs=[pl.BlockSpec((bm, k), lambda i, j: (i, 0)),
                  pl.BlockSpec((k, bn), lambda i, j: (0, j))],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)), interpret=interpret,
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages))(x, y)


def example_targets():
    """Toy targets: a vector add and bf16 tiled matmuls (two tilings, the second one large)."""
    S = jax.ShapeDtypeStruct
    v = S((1 << 20,), jnp.float32)
    a, b = S((1024, 1024), jnp.bfloat16), S((1024, 1024), jnp.bfloat16)
    return [
        ("vector_add_f32_1M", jax.jit(vector_add), (v, v)),
        ("matmul_bf16_1024_64x64x32", jax.jit(tiled_matmul), (a, b)),
        ("matmul_bf16_1024_128x128x64_w8",
         jax.jit(lambda x, y: tiled_matmul(x, y, bm=128, bn=128, bk=64, num_warps=8)), (a, b)),
        ("matmul_bf16_1024_256x256x64_w4",
         jax.jit(lambda x, y: tiled_matmul(x, y, bm=256, bn=256, bk=64, num_warps=4)), (a, b)),
    ]


# -------------------------------------------------------------------------------------- main

def main(argv):
    del argv
    import logging
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)  # "no libtpu" noise
    versions = check_environment()
    ptxas = find_ptxas(FLAGS.ptxas)
    versions["ptxas"] = f"{ptxas}: {ptxas_version(ptxas)}"
    os.makedirs(FLAGS.out_dir, exist_ok=True)
    targets = load_target(FLAGS.target)(**json.loads(FLAGS.target_kwargs))
    if FLAGS.filter:
        targets = [t for t in targets if re.search(FLAGS.filter, t[0])]
    print(f"# {len(targets)} targets from {FLAGS.target}; Triton arch {FLAGS.arch}; "
          + "; ".join(f"{k} {v}" for k, v in versions.items()), flush=True)
    rows = analyse(targets, ptxas)
    print_table(rows)
    json_out = FLAGS.json_out or os.path.join(FLAGS.out_dir, "summary.json")
    with open(json_out, "w") as f:
        json.dump({"target": FLAGS.target, "target_kwargs": json.loads(FLAGS.target_kwargs),
                   "arch": FLAGS.arch, "versions": versions,
                   "kernels": [{k: v for k, v in r.items() if k != "ptxas_log"} | (
                       {"ptxas_info": [ln for ln in r["ptxas_log"].splitlines()
                                       if "info" in ln or "warning" in ln]}
                       if "ptxas_log" in r else {}) for r in rows]}, f, indent=1)
    print(f"# PTX / TTIR in {FLAGS.out_dir}; summary {json_out}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    cli.run(main)
