"""The fast DiT engine's attention and linear options, what each costs in accuracy, and the default rule.

`auto` (the default of both) is decided by `choose_fast_default` from the measured tables below: the fastest
attention backend whose per-call error is bf16-level (<= 5e-3), with the fastest linears that keep the 4-step
sample's x0 within 3e-2 of bf16 eager (the bf16 noise floor is 1.2e-2). A library backend that is not
installed is skipped (fa4 -> triton). `benchmarks/dit.py` applies the same rule to the tables it measures.
This module imports neither torch nor triton, so CLIs can build their help from it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

AUTO = "auto"
REFERENCE_DEVICE = "H200"
BF16_LEVEL = 5e-3  # per-call rel. error vs fp32: a bf16 kernel measures 2.3-2.4e-3
X0_BUDGET = 3e-2  # x0 rel. error vs bf16 eager that `fast` may cost (eager through another bf16 kernel: 1.2e-2)


@dataclass(frozen=True)
class AttentionOption:
    summary: str
    tflops: float | None  # one call at [1, 25424, 48, 64] (12 s at 384x672) on one `device`; None: not measured
    error: float | None  # that call's rel. L2 error vs fp32
    device: str = "H200"  # the rule ranks only speeds measured on REFERENCE_DEVICE, as the rest of the table


# Per call on one H200, 2026-12-07, all in one run (`benchmarks/attention.py --results`, benchmarks/RESULTS.md:
# medians of the "call TFLOP/s" column, which counts what the engine runs, packing included; random N(0,1) q, k, v;
# error vs float64). cuda (552) and fa4 (541) are within 2 % of each other: the same run's dit.py table had them at
# 550 and 544, and 4 DiT steps at 4.03 and 4.05 s. The int8 kernels' error on the DiT's own LayerNorm'd, rotated q
# and k is 1.8e-3.
ATTENTION_OPTIONS: dict[str, AttentionOption] = {
    "fa4": AttentionOption("FlashAttention-4 (CuTe DSL), bf16; pip install 'k4serve[gpu]'", 541, 2.3e-3),
    "triton": AttentionOption("ours (Triton), bf16", 447, 2.3e-3),
    "sdpa": AttentionOption("torch scaled_dot_product_attention, bf16", 377, 2.3e-3),
    "cuda": AttentionOption(
        "ours (CUDA C++, sm_90a, FA3-style warp-specialized), bf16; nvcc builds it at first use", 552, 2.3e-3
    ),
    "triton-int8": AttentionOption("ours (Triton): int8 Q·Kᵀ with smoothed K, bf16 P·V", 477, 1.1e-2),
    "cuda-int8": AttentionOption("ours (CUDA C++, sm_90a, FA3-style warp-specialized): the same recipe", 550, 1.1e-2),
    "triton-fp8": AttentionOption("ours (Triton): e4m3 Q·Kᵀ and P·V", 548, 5.4e-2),
    "cudnn-fp8": AttentionOption("cuDNN fp8 SDPA, per-tensor scales; pip install 'k4serve[gpu]'", 479, 6.0e-2),
}
LINEAR_OPTIONS: dict[str, str] = {
    "bf16": "bf16 GEMMs",
    "fp8": "e4m3 GEMMs, per-token x per-channel scales",
    "fp8-fast": "fp8 GEMMs with Hopper's fast (unpromoted) accumulation",
    "int8": "int8 GEMMs (ours, Triton), per-token x per-channel scales, exact int32 accumulation",
}
ATTENTION = (AUTO, *ATTENTION_OPTIONS)
LINEAR = (AUTO, *LINEAR_OPTIONS)

# (attention, linear) -> (seconds for 4 DiT steps, x0 rel. error vs bf16 eager) at 12 s 384x672: benchmarks/RESULTS.md,
# one H200 on 2026-12-02 (`benchmarks/dit.py --sizes 384x672x12`), except the rows of fa4, triton and cuda with bf16
# linears: one H200 on 2026-12-07 (`benchmarks/dit.py --attentions cuda,fa4,triton --linears bf16`); the rows of
# triton-fp8 attention and of plain fp8 linears: one H100 on 2026-11-25; of cuda-int8: one H100 on 2026-12-07 with the
# kernel's cp.async build; and of cuda with int8 linears: one H100 on 2026-12-07 (`--attentions cuda --linears
# bf16,int8`), where cuda + bf16 took 4.03 s in the same run, as on the H200 (the x0 errors are the
# device-independent part; the rule compares times within one backend).
DIT_TABLE: dict[tuple[str, str], tuple[float, float]] = {
    ("fa4", "bf16"): (4.05, 1.20e-2),
    ("fa4", "fp8-fast"): (3.47, 5.22e-2),
    ("triton", "bf16"): (4.56, 1.20e-2),
    ("triton", "fp8-fast"): (4.00, 5.21e-2),
    ("triton-int8", "bf16"): (4.42, 1.21e-2),
    ("triton-int8", "fp8-fast"): (3.80, 5.22e-2),
    ("cuda", "bf16"): (4.03, 1.20e-2),
    ("cuda", "int8"): (3.64, 2.28e-2),
    ("cuda-int8", "bf16"): (5.41, 1.21e-2),
    ("cuda-int8", "fp8-fast"): (4.82, 5.22e-2),
    ("triton", "fp8"): (4.21, 5.21e-2),
    ("triton-fp8", "bf16"): (4.15, 1.44e-1),
    ("triton-fp8", "fp8"): (3.77, 1.47e-1),
    ("triton-fp8", "fp8-fast"): (3.55, 1.47e-1),
}


def bf16_level(attention: Mapping[str, tuple[float | None, float | None]]) -> list[str]:
    """Backends whose per-call error is bf16-level. `attention`: name -> (TFLOP/s, per-call error)."""
    return [name for name, (_, error) in attention.items() if error is not None and error <= BF16_LEVEL]


def bf16_level_ranking(attention: Mapping[str, tuple[float | None, float | None]]) -> list[str]:
    """The bf16-level backends with a measured speed, fastest first."""
    return sorted((name for name in bf16_level(attention) if attention[name][0]), key=lambda n: -attention[n][0])


def choose_fast_default(attention: Mapping[str, tuple[float | None, float | None]],
                        dit: Mapping[tuple[str, str], tuple[float, float]],
                        runs_here: Callable[[str], bool] = lambda name: True) -> tuple[str, str]:  # fmt: skip
    """The `fast` default (attention, linear) from measured tables (see the module docstring).

    attention: name -> (TFLOP/s, per-call error); dit: (attention, linear) -> (4-step seconds, x0 error). Linears
    are compared within one attention backend (the fastest bf16-level one with DiT rows), so that their times
    differ only by the linears.
    """
    ranking = bf16_level_ranking(attention)
    runnable = [name for name in ranking if runs_here(name)]
    if not runnable:
        raise ValueError(f"no bf16-level attention backend runs here (measured: {ranking})")
    for backend in ranking:
        rows = [(seconds, linear) for (a, linear), (seconds, x0) in dit.items() if a == backend and x0 <= X0_BUDGET]
        if rows:
            return runnable[0], min(rows)[1]
    raise ValueError(f"no DiT row of a bf16-level attention backend keeps x0 within {X0_BUDGET}")


def recorded_attention_table() -> dict[str, tuple[float | None, float | None]]:
    """ATTENTION_OPTIONS as the (TFLOP/s, error) table `choose_fast_default` reads; a speed measured on another
    device than REFERENCE_DEVICE is left out (None), since the rule compares speeds."""
    return {name: (option.tflops if option.device == REFERENCE_DEVICE else None, option.error)
            for name, option in ATTENTION_OPTIONS.items()}  # fmt: skip


def unavailable_reason(attention: str, device: str, head_dim: int | None = None) -> str | None:
    """Why `attention` cannot run on `device` (None: it can), for a model of `head_dim` when given. Imports the
    kernels package, not the libraries."""
    from k4serve.kernels import attention as triton_attention
    from k4serve.kernels import attention_sm90, library_attention

    if attention in library_attention.LIBRARIES:
        return library_attention.unavailable_reason(attention, device)
    if attention in ("cuda", "cuda-int8"):
        reason = attention_sm90.unavailable_reason(device)
        if reason is None and head_dim not in (None, attention_sm90.HEAD_DIM):
            reason = f"{attention} takes head_dim {attention_sm90.HEAD_DIM}, the model has {head_dim}"
        return reason
    if attention.startswith("triton") and head_dim is not None:
        return triton_attention.head_dim_reason(head_dim)
    return None  # sdpa, and ours in Triton: torch and the kernels extra (the CPU runs them in Triton's interpreter)


def resolve_fast_options(attention: str, linear: str, device: str, head_dim: int | None = None) -> tuple[str, str]:
    """Replace `auto` by the rule's choice for `device` (and a model of `head_dim`: the tiny presets' 8 leaves only
    sdpa; a CPU keeps bf16 linears); refuse unknown names and backends that cannot run here."""
    if attention not in ATTENTION or linear not in LINEAR:
        raise ValueError(
            f"attention must be one of {ATTENTION} and linear one of {LINEAR}; got {attention!r}, {linear!r}"
        )
    default_attention, default_linear = choose_fast_default(
        recorded_attention_table(), DIT_TABLE, lambda name: unavailable_reason(name, device, head_dim) is None
    )
    attention = default_attention if attention == AUTO else attention
    reason = unavailable_reason(attention, device, head_dim)
    if reason is not None:
        from k4serve.kernels.library_attention import BackendUnavailable

        raise BackendUnavailable(f"attention={attention!r}: {reason}")
    if not device.startswith("cuda"):  # the tables time tensor cores; the CPU runs 8-bit GEMMs in Triton's
        default_linear = "bf16"  # interpreter: slower than bf16 there, and lossier for nothing
    return attention, default_linear if linear == AUTO else linear


def option_help(options: Sequence[str], describe: Callable[[str], str]) -> str:
    """`name: description` for each option, '; '-separated (argparse help)."""
    return "; ".join(f"{name}: {describe(name)}" for name in options)


def describe_attention(name: str) -> str:
    """One line for --help: what the backend is and its measured per-call error."""
    if name == AUTO:
        ranking = " > ".join(bf16_level_ranking(recorded_attention_table()))
        return f"the fastest bf16-level (error <= {BF16_LEVEL:g}) backend installed here ({ranking})"
    option = ATTENTION_OPTIONS[name]
    if option.error is None:
        return f"{option.summary} (not yet measured on a GPU)"
    where = "" if option.device == REFERENCE_DEVICE else f" on an {option.device}"
    speed = f"{option.tflops:.0f} TFLOP/s{where}, " if option.tflops else ""
    x0 = f", x0 error {DIT_TABLE[name, 'bf16'][1]:.1e} with bf16 linears" if (name, "bf16") in DIT_TABLE else ""
    return f"{option.summary} ({speed}error {option.error:.1e}{x0})"


def describe_linear(name: str) -> str:
    """One line for --help: the linears' kind and the x0 error measured with a bf16-level attention."""
    if name == AUTO:
        pick = choose_fast_default(recorded_attention_table(), DIT_TABLE)[1]
        return f"the fastest linears keeping x0 within {X0_BUDGET:g} of bf16 eager ({pick} on a GPU, bf16 on the CPU)"
    exact = set(bf16_level(recorded_attention_table()))
    rows = sorted(((a not in exact, x0, a) for (a, linear), (_, x0) in DIT_TABLE.items() if linear == name))
    if not rows:
        return f"{LINEAR_OPTIONS[name]} (not yet measured on a GPU)"
    _, x0, attention = rows[0]  # measured with a bf16-level attention where such a row exists
    return f"{LINEAR_OPTIONS[name]} (x0 error {x0:.1e} with attention {attention})"
