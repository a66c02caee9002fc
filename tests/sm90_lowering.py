"""Lower the DiT's fp8 Triton kernels for sm_90 as AOTInductor calls them (test helper, run with TRITON_INTERPRET=0).

Inductor types a Python float argument of a user-defined Triton kernel as fp64 (the JIT types it fp32). Triton
cannot lower an fp64 -> e4m3 conversion, so a kernel whose float argument reaches an fp8 store stops AOTI's compile
("PassManager::run failed"). Compilation here needs no GPU (Triton's bundled LLVM and ptxas). Prints, per kernel, a
JSON line: whether it lowered to a cubin, and the TTIR lines that compute in fp64.
"""

from __future__ import annotations

import inspect
import json

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from k4serve.kernels.attention import _attention_kernel
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


def lower(kernel: triton.runtime.JITFunction, types: dict, constexprs: dict, warps: int) -> dict:
    names = inspect.signature(kernel.fn).parameters
    signature = {name: "constexpr" if name in constexprs else types[name] for name in names}
    try:
        compiled = triton.compile(ASTSource(kernel, signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})  # fmt: skip
    except Exception as error:  # noqa: BLE001 - reported to the test, which names the kernel
        return {"cubin": False, "error": f"{type(error).__name__}: {str(error)[:300]}", "fp64": []}
    fp64 = [line.split(" loc(")[0].strip() for line in compiled.asm["ttir"].splitlines()
            if "f64" in line and "tt.func" not in line]  # fmt: skip
    return {"cubin": bool(compiled.asm.get("cubin")), "error": "", "fp64": fp64}


if __name__ == "__main__":
    for name, case in CASES.items():
        print(json.dumps({"kernel": name, **lower(*case)}))
