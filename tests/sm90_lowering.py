"""Lower the DiT's 8-bit Triton kernels for sm_90 (test helper, run with TRITON_INTERPRET=0; no GPU needed: Triton's
bundled LLVM and ptxas compile them).

`python sm90_lowering.py` (the fp64 cases): the kernels as AOTInductor calls them. Inductor types a Python float
argument of a user-defined Triton kernel as fp64 (the JIT types it fp32). Triton cannot lower an fp64 -> e4m3
conversion, so a kernel whose float argument reaches an fp8 store stops AOTI's compile ("PassManager::run failed").
`python sm90_lowering.py gelu-quant`: the GELU / quantize pass at the DiT's widths as `gelu_quant._launch` tiles them,
with the counts of its special-function instructions in the PTX (erf's polynomial and exponential for 8-bit outputs)
and of its SASS instructions (a straight-line kernel: divided by the values a thread holds, its cost per value).
`python sm90_lowering.py int8-gemm`: both int8 GEMMs (pointer and TMA-descriptor loads) at their Hopper tilings, typed
as the JIT specialises the DiT's calls (16-byte aligned pointers, K and N multiples of 16), to show their tensor-core
instructions and whether the main loop is pipelined (cp.async or TMA stages in shared memory).
Prints, per kernel, a JSON line: whether it lowered to a cubin, the TTIR lines that compute in fp64, the PTX's
wgmma instruction kinds, its cp.async and TMA-copy counts and the kernel's shared memory.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from k4serve.kernels.attention import _attention_kernel
from k4serve.kernels.gelu_quant import _gelu_quant_kernel, row_chunks, row_warps
from k4serve.kernels.int8_gemm import _int8_gemm_kernel, _int8_gemm_tma_kernel
from k4serve.kernels.norm_modulate import _norm_modulate_kernel
from k4serve.kernels.qk_norm_rope import _qk_norm_rope_kernel

BF16, F32, FP8, I8 = "*bf16", "*fp32", "*fp8e4nv", "*i8"


def norm_modulate_case(quant: str, y_type: str) -> tuple:
    """The norm + modulate pass writing the next GEMM's `quant` operand (`y_type`) at the full DiT's width."""
    types = dict(x_ptr=BF16, delta_ptr=BF16, gate_ptr=BF16, w_ptr=BF16, b_ptr=BF16, shift_ptr=F32, scale_ptr=F32,
                 y_ptr=y_type, y_scale_ptr=F32, seq_len="i32", rows="i32", n_visual="i32", eps="fp64", gate_sb="i32",
                 gate_ss="i32", mod_sb="i32", mod_ss="i32")  # fmt: skip
    return _norm_modulate_kernel, types, dict(D=3072, BLOCK_D=4096, HAS_DELTA=True, QUANT=quant), 16


# (kernel, non-constexpr argument types as Inductor passes them, constexprs, warps) at the full DiT's head_dim 64
CASES = {
    "norm_modulate fp8": norm_modulate_case("fp8", FP8),
    "norm_modulate int8": norm_modulate_case("int8", I8),
    "qk_norm_rope fp8": (
        _qk_norm_rope_kernel,
        dict(qkv_ptr=BF16, cos_ptr=F32, sin_ptr=F32, qw_ptr=BF16, qb_ptr=BF16, kw_ptr=BF16, kb_ptr=BF16, eps="fp64",
             q8_ptr=FP8, k8_ptr=FP8, vt_ptr=FP8, q_scale_ptr=F32, k_scale_ptr=F32, v_scale_ptr=F32, seq_len="i32",
             n_visual="i32", num_heads="i32", seq_pad="i32"),
        dict(D=64, BLOCK=128, FP8=True), 4,
    ),
    "attention fp8": (
        _attention_kernel,
        dict(desc_q="tensordesc<fp8e4nv[128, 64]>", desc_k="tensordesc<fp8e4nv[128, 64]>",
             desc_v="tensordesc<fp8e4nv[64, 128]>", out_ptr=BF16, q_scale_ptr=F32, k_scale_ptr=F32,
             v_scale_ptr=F32, seq_len="i32", num_heads="i32", out_row_stride="i32", n_kv_blocks="i32",
             qk_scale="fp64"),
        dict(HEAD_DIM=64, BLOCK_M=128, BLOCK_N=128, KV_BLOCK=128, RECIPE="fp8"), 8,
    ),
}  # fmt: skip


def int8_gemm_cases() -> dict[str, tuple]:
    """Both int8 GEMMs at their GPU tilings (the autotune configs, read in a process without the interpreter)."""
    scalars = dict(x_scale_ptr=F32, w_scale_ptr=F32, bias_ptr=BF16, y_ptr=BF16, M="i32", N="i32", K="i32")
    cases = {}
    for loads, kernel in (("pointers", _int8_gemm_kernel), ("tma", _int8_gemm_tma_kernel)):
        jit = kernel.fn.fn if loads == "pointers" else kernel.fn  # autotune (-> heuristics) -> the JIT function
        for c in kernel.configs:
            m, n, k = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
            if loads == "pointers":
                types = dict(x_ptr="*i8", w_ptr="*i8", **scalars)
                constexprs = dict(HAS_BIAS=True, EVEN_K=True, **c.kwargs)
                aligned = ("x_ptr", "w_ptr", "x_scale_ptr", "w_scale_ptr", "bias_ptr", "y_ptr", "N", "K")
            else:  # a descriptor's box is its config's tile
                types = dict(x_desc=f"tensordesc<i8[{m}, {k}]>", w_desc=f"tensordesc<i8[{n}, {k}]>", **scalars)
                constexprs = dict(HAS_BIAS=True, **c.kwargs)
                aligned = ("x_scale_ptr", "w_scale_ptr", "bias_ptr", "y_ptr", "N", "K")
            name = f"int8 gemm {loads} {m}x{n}x{k} w{c.num_warps} s{c.num_stages}"
            cases[name] = (jit, types, constexprs, c.num_warps, c.num_stages, aligned)
    return cases


def gelu_quant_cases() -> dict[str, tuple]:
    """The FF GELU into each output format at the FF width, and the attention output's int8 quantize at the model's."""
    cases = {}
    for d, gelu, quant, y_type in ((12288, True, "int8", I8), (12288, True, "fp8", FP8), (12288, True, "", BF16),
                                   (3072, False, "int8", I8)):  # fmt: skip
        block, chunks = row_chunks(d)
        constexprs = dict(D=d, BLOCK=block, CHUNKS=chunks, GELU=gelu, QUANT=quant)
        types = dict(x_ptr=BF16, y_ptr=y_type, y_scale_ptr=F32)
        name = f"gelu_quant D={d} gelu={gelu} quant={quant or 'bf16'}"
        cases[name] = (_gelu_quant_kernel, types, constexprs, row_warps(d), 3, tuple(types))  # all 16-byte aligned
    return cases


def sass_instructions(cubin: bytes) -> int | None:
    """The number of SASS instructions in a cubin (Triton's bundled cuobjdump; None where it is missing)."""
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not cuobjdump.exists():
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        sass = subprocess.run([str(cuobjdump), "--dump-sass", file.name], capture_output=True, text=True).stdout
    return len(re.findall(r"^\s+/\*[0-9a-f]{4,}\*/\s", sass, flags=re.MULTILINE))


def lower(kernel: triton.runtime.JITFunction, types: dict, constexprs: dict, warps: int, stages: int = 3,
          aligned: tuple[str, ...] = ()) -> dict:  # fmt: skip
    names = list(inspect.signature(kernel.fn).parameters)
    signature = {name: "constexpr" if name in constexprs else types[name] for name in names}
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    try:
        compiled = triton.compile(ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs),
                                  target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": warps, "num_stages": stages})  # fmt: skip
    except Exception as error:  # noqa: BLE001 - reported to the test, which names the kernel
        return {"cubin": False, "error": f"{type(error).__name__}: {str(error)[:300]}", "fp64": []}
    fp64 = [line.split(" loc(")[0].strip() for line in compiled.asm["ttir"].splitlines()
            if "f64" in line and "tt.func" not in line]  # fmt: skip
    ptx = compiled.asm["ptx"]
    return {"cubin": bool(compiled.asm.get("cubin")), "error": "", "fp64": fp64,
            "wgmma": sorted(set(re.findall(r"wgmma\.mma_async\.[\w.]+", ptx))),
            "cp_async": len(re.findall(r"cp\.async\.c[ag]", ptx)),
            "tma": len(re.findall(r"cp\.async\.bulk\.tensor", ptx)), "shared": compiled.metadata.shared,
            "special": dict(Counter(re.findall(r"\b(ex2|rsqrt|erf|rcp|div)\.[\w.]+", ptx))),
            "sass_instructions": sass_instructions(compiled.asm["cubin"])}  # fmt: skip


def lower_in_subprocess(*args: str) -> tuple[list[dict], str]:
    """Run this helper with `args` in a process without Triton's interpreter: (its JSON reports, its stderr)."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(Path(__file__).parents[1])}
    run = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env, timeout=600)
    return [json.loads(line) for line in run.stdout.splitlines()], run.stderr[-2000:]


if __name__ == "__main__":
    modes = {"int8-gemm": int8_gemm_cases, "gelu-quant": gelu_quant_cases}
    for name, case in (modes[sys.argv[1]]() if sys.argv[1:] else CASES).items():
        print(json.dumps({"kernel": name, **lower(*case)}))
