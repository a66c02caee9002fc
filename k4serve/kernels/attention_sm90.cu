// Joint (non-causal) attention for the DiT on Hopper (sm_90a), head_dim 64, scheduled as FlashAttention-3 schedules
// its forward (which Triton cannot express on Hopper), in two recipes of Q·Kᵀ:
//   - bf16 (engine option `cuda`): Q·Kᵀ and P·V in bf16 on the tensor cores, fp32 softmax and accumulation;
//   - int8 (`cuda-int8`): the triton-int8 recipe, int8 Q·Kᵀ with smoothed K and per-row / per-block scales.
// The schedule:
//   - one CTA per 64·kConsumers query rows of one (sample, head): a producer warpgroup (one thread issues the TMA
//     copies of K and V tiles into a 3-stage ring, completion tracked by mbarriers, and keeps few registers:
//     setmaxnreg) and kConsumers consumer warpgroups of 64 query rows each. Three consumers, not FA3's two at
//     head_dim 128: a third warp per SM sub-partition hides the softmax's latency (two: 1.3x slower on an H100,
//     benchmarks/RESULTS.md 2026-12-07); four would leave fewer registers than S, P and O need.
//   - ping-pong: a consumer issues its tensor-core work (S_j = Q·K_jᵀ, then O += P_{j-1}·V_{j-1}) and hands the
//     tensor cores to the next consumer through a named barrier, then runs block j's softmax while the others'
//     MMAs run. (The source waits for S_j alone before the softmax, FA3's intra-warpgroup overlap, but ptxas 13.0
//     schedules the wait for P·V_{j-1} ahead of the softmax anyway.)
//   - int8: S accumulates exactly in int32 (|s| <= 64·127² < 2^22) and becomes fp32 by an integer add of the bits of
//     1.5·2^23 (no I2F); the bias folds into the per-row constant that the softmax subtracts.
//   - the `fast` variant (kFast) also takes two jobs off the issue slots: the row sums come from the tensor cores
//     (V's tile carries an extra 8 columns of ones, so P·V's column 64 is Σ p), and the running max is only moved
//     when a row's max grows by more than 2^8 (FlashAttention-4's lazy rescaling: p <= 256 stays exact enough in
//     bf16 and fp32), so most blocks skip the O rescale and its exp2.
// Shared-memory tiles hold whole token rows (128 bytes of bf16, 64 of int8) in the swizzled canonical wgmma layouts,
// as the Tensor Memory Accelerator writes them: row r at r * row_bytes, its 16-byte chunk c at chunk c ^ (r % 8)
// (128-byte swizzle) or c ^ (r / 2 % 4) (64-byte swizzle), so a box is one full row per token and each tile starts
// on a 1024-byte boundary (the swizzle follows address bits 4-9):
//   Q, K (K-major): bf16 128-byte swizzle, int8 64-byte; SBO = 8 rows; a k-step moves the start by 32 bytes
//   V (N-major):    128-byte swizzle, SBO = 8 tokens (1024 bytes), LBO = the next 64 dims: for the fast variant's
//                   dims 64..71 (constant ones), a ones region after the V stages at that offset
// (A first TMA build mapped each 16-byte unit as a box row of its own, so every 32-byte L2 sector was fetched in two
// halves and L2 stayed 89 % busy; cp.async before it had every sector requested twice and each 16-byte chunk
// written in a wavefront of its own: ncu on an H100, benchmarks/RESULTS.md 2026-12-07.)
// Built at first use by k4serve/kernels/attention_sm90.py (nvcc -gencode=arch=compute_90a,code=sm_90a).

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <type_traits>

namespace {

constexpr int kHeadDim = 64;
constexpr int kConsumers = 3;              // consumer warpgroups, 64 query rows each
constexpr int kBlockM = 64 * kConsumers;   // query rows per CTA
constexpr int kBlockN = 128;               // keys per KV block (= the int8 K scale block of the packing)
constexpr int kStages = 3;
constexpr int kConsumerThreads = 128 * kConsumers;
constexpr int kProducerThreads = 128;
constexpr int kThreads = kProducerThreads + kConsumerThreads;
constexpr int kTurnThreads = 256;  // a turn barrier: the consumer taking the tensor cores and the one handing them
// registers per thread after setmaxnreg: all warpgroups together may hold the SM's 64K
constexpr int kProducerRegs = kConsumers == 2 ? 40 : 32;
constexpr int kConsumerRegs = kConsumers == 2 ? 232 : 160;
static_assert(kProducerThreads * kProducerRegs + kConsumerThreads * kConsumerRegs <= 65536);
constexpr float kScoreBias = 12582912.0f;  // 1.5 * 2^23, whose bits are 0x4B400000
constexpr float kLazyRescale = 8.0f;       // fast variant: keep the max until a row's grows by more than this
constexpr int kVRowBytes = kHeadDim * 2;

template <bool kInt8>
struct __align__(1024) Shared {
  static constexpr int kQKRowBytes = kHeadDim * (kInt8 ? 1 : 2);  // one token's Q / K row: 64 (int8) or 128 (bf16)
  static constexpr int kQTile = 64 * kQKRowBytes;                  // bytes of one consumer's Q tile
  uint8_t q[kConsumers * kQTile];
  uint8_t k[kStages][kBlockN * kQKRowBytes];
  uint8_t v[kStages][kBlockN * kVRowBytes];
  // the fast variant's dims 64..71 of V, all ones: read one LBO (sizeof(v)) past each stage, so the windows of all
  // stages together span an array as large as v (the plain variant leaves it unused)
  uint8_t ones[kStages][kBlockN * kVRowBytes];
  uint64_t q_full;
  uint64_t full[kStages];   // producer -> consumers: the stage's K and V landed
  uint64_t empty[kStages];  // consumers -> producer: the stage may be overwritten
};

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// ---- mbarriers ----

__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(bar)), "r"(count) : "memory");
}

__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_u32(bar)) : "memory");
}

__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "WAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT_%=;\n"
      "}\n" ::"r"(smem_u32(bar)),
      "r"(parity)
      : "memory");
}

// ---- TMA ----

__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(bar)), "r"(bytes) : "memory");
}

// box {64, rows, 1, 1} of a 4-d map (element, token, head, sample) at (token, head, b)
__device__ __forceinline__ void tma_load(uint32_t dst, const CUtensorMap* map, int token, int head, int b,
                                         uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], "
      "[%6];" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(0), "r"(token), "r"(head), "r"(b), "r"(smem_u32(bar))
      : "memory");
}

// ---- named barriers: the consumers take turns on the tensor cores, in a ring (consumer c hands them to c + 1) ----

__device__ __forceinline__ void turn_wait(int consumer) {
  asm volatile("bar.sync %0, %1;" ::"r"(1 + consumer), "n"(kTurnThreads) : "memory");
}

__device__ __forceinline__ void turn_pass(int consumer) {
  asm volatile("bar.arrive %0, %1;" ::"r"(1 + (consumer + 1) % kConsumers), "n"(kTurnThreads) : "memory");
}

// ---- wgmma ----

enum class Swizzle : uint64_t { k128B = 1, k64B = 2 };  // the descriptor's layout-type field (bits 62-63)

__device__ __forceinline__ uint64_t smem_desc(uint32_t addr, uint32_t lbo, uint32_t sbo, Swizzle swizzle) {
  // start address, leading and stride byte offsets in 16-byte units; base offset 0 (tiles are 1024-byte aligned)
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (static_cast<uint64_t>(lbo >> 4) << 16) |
         (static_cast<uint64_t>(sbo >> 4) << 32) | (static_cast<uint64_t>(swizzle) << 62);
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}

// Pin register arrays after a wait: their reads may not move above it, and (for operands of an MMA in flight)
// their registers may not be reused before it.
template <int N>
__device__ __forceinline__ void fence_regs(uint32_t (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+r"(r[i])::"memory");
}
template <int N>
__device__ __forceinline__ void fence_regs(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

// S[64 x 128] (+)= Q[64 x 32] · K[128 x 32]ᵀ, int8 -> int32, both operands K-major in shared memory
__device__ __forceinline__ void wgmma_qk_s8(uint32_t (&s)[64], uint64_t desc_q, uint64_t desc_k, int accumulate) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "%64, %65, p;\n"
      "}\n"
      : "+r"(s[0]), "+r"(s[1]), "+r"(s[2]), "+r"(s[3]), "+r"(s[4]), "+r"(s[5]), "+r"(s[6]), "+r"(s[7]),
        "+r"(s[8]), "+r"(s[9]), "+r"(s[10]), "+r"(s[11]), "+r"(s[12]), "+r"(s[13]), "+r"(s[14]), "+r"(s[15]),
        "+r"(s[16]), "+r"(s[17]), "+r"(s[18]), "+r"(s[19]), "+r"(s[20]), "+r"(s[21]), "+r"(s[22]), "+r"(s[23]),
        "+r"(s[24]), "+r"(s[25]), "+r"(s[26]), "+r"(s[27]), "+r"(s[28]), "+r"(s[29]), "+r"(s[30]), "+r"(s[31]),
        "+r"(s[32]), "+r"(s[33]), "+r"(s[34]), "+r"(s[35]), "+r"(s[36]), "+r"(s[37]), "+r"(s[38]), "+r"(s[39]),
        "+r"(s[40]), "+r"(s[41]), "+r"(s[42]), "+r"(s[43]), "+r"(s[44]), "+r"(s[45]), "+r"(s[46]), "+r"(s[47]),
        "+r"(s[48]), "+r"(s[49]), "+r"(s[50]), "+r"(s[51]), "+r"(s[52]), "+r"(s[53]), "+r"(s[54]), "+r"(s[55]),
        "+r"(s[56]), "+r"(s[57]), "+r"(s[58]), "+r"(s[59]), "+r"(s[60]), "+r"(s[61]), "+r"(s[62]), "+r"(s[63])
      : "l"(desc_q), "l"(desc_k), "r"(accumulate));
}

// S[64 x 128] (+)= Q[64 x 16] · K[128 x 16]ᵀ, bf16 -> fp32, both operands K-major in shared memory
__device__ __forceinline__ void wgmma_qk_bf16(uint32_t (&s)[64], uint64_t desc_q, uint64_t desc_k, int accumulate) {
  float (&f)[64] = reinterpret_cast<float (&)[64]>(s);
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "%64, %65, p, 1, 1, 0, 0;\n"
      "}\n"
      : "+f"(f[0]), "+f"(f[1]), "+f"(f[2]), "+f"(f[3]), "+f"(f[4]), "+f"(f[5]), "+f"(f[6]), "+f"(f[7]), "+f"(f[8]),
        "+f"(f[9]), "+f"(f[10]), "+f"(f[11]), "+f"(f[12]), "+f"(f[13]), "+f"(f[14]), "+f"(f[15]), "+f"(f[16]),
        "+f"(f[17]), "+f"(f[18]), "+f"(f[19]), "+f"(f[20]), "+f"(f[21]), "+f"(f[22]), "+f"(f[23]), "+f"(f[24]),
        "+f"(f[25]), "+f"(f[26]), "+f"(f[27]), "+f"(f[28]), "+f"(f[29]), "+f"(f[30]), "+f"(f[31]), "+f"(f[32]),
        "+f"(f[33]), "+f"(f[34]), "+f"(f[35]), "+f"(f[36]), "+f"(f[37]), "+f"(f[38]), "+f"(f[39]), "+f"(f[40]),
        "+f"(f[41]), "+f"(f[42]), "+f"(f[43]), "+f"(f[44]), "+f"(f[45]), "+f"(f[46]), "+f"(f[47]), "+f"(f[48]),
        "+f"(f[49]), "+f"(f[50]), "+f"(f[51]), "+f"(f[52]), "+f"(f[53]), "+f"(f[54]), "+f"(f[55]), "+f"(f[56]),
        "+f"(f[57]), "+f"(f[58]), "+f"(f[59]), "+f"(f[60]), "+f"(f[61]), "+f"(f[62]), "+f"(f[63])
      : "l"(desc_q), "l"(desc_k), "r"(accumulate));
}

// O[64 x 64] += P[64 x 16] · V[16 x 64], bf16 -> fp32; P from registers, V N-major in shared memory
__device__ __forceinline__ void wgmma_pv(float (&o)[32], const uint32_t (&p)[4], uint64_t desc_v) {
  asm volatile(
      "{\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "{%32, %33, %34, %35}, %36, 1, 1, 1, 1;\n"
      "}\n"
      : "+f"(o[0]), "+f"(o[1]), "+f"(o[2]), "+f"(o[3]), "+f"(o[4]), "+f"(o[5]), "+f"(o[6]), "+f"(o[7]),
        "+f"(o[8]), "+f"(o[9]), "+f"(o[10]), "+f"(o[11]), "+f"(o[12]), "+f"(o[13]), "+f"(o[14]), "+f"(o[15]),
        "+f"(o[16]), "+f"(o[17]), "+f"(o[18]), "+f"(o[19]), "+f"(o[20]), "+f"(o[21]), "+f"(o[22]), "+f"(o[23]),
        "+f"(o[24]), "+f"(o[25]), "+f"(o[26]), "+f"(o[27]), "+f"(o[28]), "+f"(o[29]), "+f"(o[30]), "+f"(o[31])
      : "r"(p[0]), "r"(p[1]), "r"(p[2]), "r"(p[3]), "l"(desc_v));
}

// O[64 x 72] += P[64 x 16] · V[16 x 72]: the fast variant, whose columns 64..71 accumulate the row sums of P
__device__ __forceinline__ void wgmma_pv(float (&o)[36], const uint32_t (&p)[4], uint64_t desc_v) {
  asm volatile(
      "{\n"
      "wgmma.mma_async.sync.aligned.m64n72k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35}, "
      "{%36, %37, %38, %39}, %40, 1, 1, 1, 1;\n"
      "}\n"
      : "+f"(o[0]), "+f"(o[1]), "+f"(o[2]), "+f"(o[3]), "+f"(o[4]), "+f"(o[5]), "+f"(o[6]), "+f"(o[7]),
        "+f"(o[8]), "+f"(o[9]), "+f"(o[10]), "+f"(o[11]), "+f"(o[12]), "+f"(o[13]), "+f"(o[14]), "+f"(o[15]),
        "+f"(o[16]), "+f"(o[17]), "+f"(o[18]), "+f"(o[19]), "+f"(o[20]), "+f"(o[21]), "+f"(o[22]), "+f"(o[23]),
        "+f"(o[24]), "+f"(o[25]), "+f"(o[26]), "+f"(o[27]), "+f"(o[28]), "+f"(o[29]), "+f"(o[30]), "+f"(o[31]),
        "+f"(o[32]), "+f"(o[33]), "+f"(o[34]), "+f"(o[35])
      : "r"(p[0]), "r"(p[1]), "r"(p[2]), "r"(p[3]), "l"(desc_v));
}

__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

struct Params {
  CUtensorMap q_map, k_map, v_map;  // Q, K, V as (element, token, head, sample): boxes land in the layouts above
  const uint8_t* q;       // [B, S, H, 64] rows of qk_row_bytes: int8 (packed: [B*S, H*64]) or a bf16 view
  const uint8_t* k;       // the same layout; int8: smoothed
  const float* q_scale;   // int8: [B, H, S]
  const float* k_scale;   // int8: [B, H, n_blocks]
  const __nv_bfloat16* v; // [B, S, H, 64] view, row stride v_stride elements
  __nv_bfloat16* out;     // [B, S, H*64]
  long long qk_row_bytes;  // bytes from one token's q (k) row to the next
  long long v_stride;
  int seq_len, heads, n_blocks;
  float qk_scale;         // log2(e) / sqrt(64)
};

// ---- the consumer's softmax on one block of scores ----
//
// Accumulator layout of a 64 x N wgmma (CUTLASS's CLayout_64xN): thread t of the warpgroup (warp w, lane l) holds
// rows r = 16w + l/4 and r + 8; register 4j + e is row r + 8*(e/2), column 8j + 2*(l%4) + (e%2). The A-operand
// layout of a 16-bit m64k16 wgmma is the same, so columns 16c..16c+15 of S are registers 8c..8c+7, in order.

struct RowState {
  float m[2];      // running max of the scaled scores (base 2), rows r and r + 8
  float l[2];      // this thread's share of the running sums
  float scale[2];  // q_scale * qk_scale of the two rows
};

// s (int32 scores) -> p (fp32, in place, relative to the running max); alpha = exp2(m_old - m_new) per row, and
// whether any row of this warp moved its max (the fast variant skips the O rescale when none did)
template <bool kFast, bool kInt8, bool kRagged>
__device__ __forceinline__ bool softmax_block(uint32_t (&s)[64], RowState& st, float k_scale, int valid_cols,
                                              int lane, float (&alpha)[2]) {
  float* f = reinterpret_cast<float*>(s);
  constexpr float kBias = kInt8 ? kScoreBias : 0.f;  // int8: the scores arrive as 1.5·2^23 + s
  if (kInt8) {
#pragma unroll
    for (int i = 0; i < 64; ++i) f[i] = __int_as_float(static_cast<int>(s[i]) + 0x4B400000);  // exact
  }
  if (kRagged) {  // the last block, with keys past the sequence
    const int col0 = 2 * (lane % 4);
#pragma unroll
    for (int i = 0; i < 64; ++i)
      if (8 * (i / 4) + col0 + (i % 2) >= valid_cols) f[i] = -INFINITY;
  }
  float rs[2], block_max[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    float mx = -INFINITY;
#pragma unroll
    for (int j = 0; j < 16; ++j) mx = fmaxf(mx, fmaxf(f[4 * j + 2 * half], f[4 * j + 2 * half + 1]));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
    rs[half] = st.scale[half] * k_scale;
    block_max[half] = (mx - kBias) * rs[half];  // every row has a valid column in every block
  }
  bool moved = true;
  if (kFast) {  // move the max only past a growth of 2^kLazyRescale (a fresh row's -inf always moves)
    const bool grow = block_max[0] > st.m[0] + kLazyRescale || block_max[1] > st.m[1] + kLazyRescale;
    moved = __any_sync(0xffffffff, grow);
  }
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const float m_new = moved ? fmaxf(st.m[half], block_max[half]) : st.m[half];
    alpha[half] = moved ? exp2_approx(st.m[half] - m_new) : 1.f;
    st.m[half] = m_new;
    const float shift = m_new + kBias * rs[half];  // p = exp2(biased * rs - (m_new + bias * rs))
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < 16; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float& x = f[4 * j + 2 * half + e];
        x = exp2_approx(__fmaf_rn(x, rs[half], -shift));
        if (!kFast) sum += x;  // the fast variant sums on the tensor cores
      }
    }
    if (!kFast) st.l[half] = st.l[half] * alpha[half] + sum;
  }
  return moved;
}

__device__ __forceinline__ void pack_p(const uint32_t (&s)[64], uint32_t (&p)[32]) {
  const float* f = reinterpret_cast<const float*>(s);
#pragma unroll
  for (int i = 0; i < 32; ++i) p[i] = pack_bf16(f[2 * i], f[2 * i + 1]);
}

template <int N>
__device__ __forceinline__ void rescale(float (&o)[N], const float (&alpha)[2]) {
#pragma unroll
  for (int i = 0; i < N; ++i) o[i] *= alpha[(i / 2) % 2];
}

// Descriptors advance by adding the byte offset / 16 to the start-address field (shared addresses < 256 KB: no
// carry out of its 14 bits), so the loop adds constants instead of rebuilding them.
template <int N>
__device__ __forceinline__ void issue_pv(float (&o)[N], const uint32_t (&p)[32], uint64_t desc_v) {
#pragma unroll
  for (int c = 0; c < kBlockN / 16; ++c) {
    const uint32_t a[4] = {p[4 * c], p[4 * c + 1], p[4 * c + 2], p[4 * c + 3]};
    wgmma_pv(o, a, desc_v + c * (16 * kVRowBytes >> 4));  // tokens 16c..16c+15
  }
}

template <bool kInt8>
__device__ __forceinline__ void issue_qk(uint32_t (&s)[64], uint64_t desc_q, uint64_t desc_k) {
  // 32 bytes of each row per step; inside a swizzled row the start address moves by them (the swizzle is applied
  // to the resulting addresses)
  constexpr int kSteps = Shared<kInt8>::kQKRowBytes / 32;
#pragma unroll
  for (int kstep = 0; kstep < kSteps; ++kstep) {
    const uint64_t q = desc_q + kstep * (32 >> 4);
    const uint64_t k = desc_k + kstep * (32 >> 4);
    if (kInt8) wgmma_qk_s8(s, q, k, kstep);
    else wgmma_qk_bf16(s, q, k, kstep);
  }
}

template <bool kFast, bool kInt8>
__global__ void __launch_bounds__(kThreads, 1) attention_sm90_kernel(const __grid_constant__ Params prm) {
  constexpr int kOut = kFast ? 36 : 32;  // O accumulator registers (fast: + the row-sum columns)
  using Layout = Shared<kInt8>;
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  // the swizzle patterns follow shared-memory address bits: start on a 1024-byte boundary (launch() asks for 1 KB
  // more than the layout, since the dynamic window's alignment is not promised)
  Shared<kInt8>& sh = *reinterpret_cast<Shared<kInt8>*>(smem_raw + ((1024 - smem_u32(smem_raw) % 1024) % 1024));
  const int tid = threadIdx.x;
  const int warpgroup = tid / 128;
  const int lane = tid % 32;
  const int bh = blockIdx.y;
  const int b = bh / prm.heads, h = bh % prm.heads;
  const int q0 = blockIdx.x * kBlockM;
  const int S = prm.seq_len;
  const long long out_row = static_cast<long long>(prm.heads) * kHeadDim;  // elements per output row

  if (tid == 0) {
    mbar_init(&sh.q_full, 1);
    for (int i = 0; i < kStages; ++i) {
      mbar_init(&sh.full[i], 1);
      mbar_init(&sh.empty[i], kConsumerThreads);
    }
  }
  if (kFast) {  // the ones region, read by the tensor cores: a generic write, then the proxy fence
    const uint4 ones = make_uint4(0x3F803F80u, 0x3F803F80u, 0x3F803F80u, 0x3F803F80u);  // bf16 1.0 x 8
    for (int i = tid; i < static_cast<int>(sizeof(sh.ones) / 16); i += kThreads)
      reinterpret_cast<uint4*>(sh.ones)[i] = ones;
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
  }
  __syncthreads();

  if (warpgroup == 0) {
    // ===== producer =====
    // One thread issues every copy: a TMA box per consumer's Q tile, one per K and one per V tile.
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(kProducerRegs));
    if (tid == 0) {
      constexpr uint32_t kKBytes = sizeof(sh.k[0]), kVBytes = sizeof(sh.v[0]);
      mbar_expect_tx(&sh.q_full, sizeof(sh.q));
      for (int c = 0; c < kConsumers; ++c)
        tma_load(smem_u32(sh.q) + c * Layout::kQTile, &prm.q_map, q0 + 64 * c, h, b, &sh.q_full);
      for (int j = 0; j < prm.n_blocks; ++j) {
        const int stage = j % kStages;
        mbar_wait(&sh.empty[stage], ((j / kStages) & 1) ^ 1);  // a fresh barrier passes parity 1
        mbar_expect_tx(&sh.full[stage], kKBytes + kVBytes);
        tma_load(smem_u32(sh.k[stage]), &prm.k_map, j * kBlockN, h, b, &sh.full[stage]);
        tma_load(smem_u32(sh.v[stage]), &prm.v_map, j * kBlockN, h, b, &sh.full[stage]);
      }
      for (int j = prm.n_blocks; j < prm.n_blocks + kStages; ++j)  // stay until the consumers are done
        mbar_wait(&sh.empty[j % kStages], ((j / kStages) & 1) ^ 1);
    }
  } else {
    // ===== consumers =====
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(kConsumerRegs));
    const int consumer = warpgroup - 1;
    const int t = tid % 128;
    const int row0 = 16 * (t / 32) + (t % 32) / 4;  // rows row0 and row0 + 8 of this consumer's 64
    constexpr Swizzle kQKSwizzle = kInt8 ? Swizzle::k64B : Swizzle::k128B;
    constexpr uint32_t kQKGroup = 8 * Layout::kQKRowBytes;  // SBO: 8 rows; K-major swizzled layouts ignore the LBO
    const uint64_t desc_q = smem_desc(smem_u32(sh.q) + consumer * Layout::kQTile, 16, kQKGroup, kQKSwizzle);
    const uint64_t desc_k0 = smem_desc(smem_u32(sh.k[0]), 16, kQKGroup, kQKSwizzle);
    const uint64_t desc_v0 = smem_desc(smem_u32(sh.v[0]), sizeof(sh.v), 8 * kVRowBytes, Swizzle::k128B);
    constexpr uint32_t kStepK = sizeof(sh.k[0]) >> 4, kStepV = sizeof(sh.v[0]) >> 4;  // one stage, in 16 bytes
    const float* k_scale = kInt8 ? prm.k_scale + static_cast<long long>(bh) * prm.n_blocks : nullptr;

    RowState st;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = q0 + 64 * consumer + row0 + 8 * half;
      st.m[half] = -INFINITY;
      st.l[half] = 0.f;
      const float q_scale = kInt8 && row < S ? prm.q_scale[static_cast<long long>(bh) * S + row] : 1.f;
      st.scale[half] = q_scale * prm.qk_scale;
    }
    uint32_t s[64];
    uint32_t p[32];
    float o[kOut];
#pragma unroll
    for (int i = 0; i < kOut; ++i) o[i] = 0.f;
    float alpha[2];

    if (consumer == kConsumers - 1) turn_pass(consumer);  // consumer 0 takes the tensor cores first
    mbar_wait(&sh.q_full, 0);

    // The ragged last block (keys past the sequence) runs its own copy of the step, whose softmax masks them:
    // a mask under a branch inside the loop would make ptxas serialize the wgmmas (C7518) in the bf16 recipe,
    // whose scores are the accumulator registers themselves.
    const bool ragged = S % kBlockN != 0;
    auto first_block = [&](auto masked) {  // block 0: scores and softmax only
      mbar_wait(&sh.full[0], 0);
      turn_wait(consumer);
      wgmma_fence();
      issue_qk<kInt8>(s, desc_q, desc_k0);
      wgmma_commit();
      turn_pass(consumer);
      wgmma_wait<0>();
      fence_regs(s);
      softmax_block<kFast, kInt8, decltype(masked)::value>(s, st, kInt8 ? k_scale[0] : 1.f, S, lane, alpha);
      pack_p(s, p);
    };
    auto step = [&](int j, auto masked) {
      const int stage = j % kStages, prev = (j - 1) % kStages;
      const float block_scale = kInt8 ? k_scale[j] : 1.f;
      mbar_wait(&sh.full[stage], (j / kStages) & 1);
      turn_wait(consumer);
      wgmma_fence();
      issue_qk<kInt8>(s, desc_q, desc_k0 + stage * kStepK);
      wgmma_commit();
      issue_pv(o, p, desc_v0 + prev * kStepV);
      wgmma_commit();
      turn_pass(consumer);
      wgmma_wait<1>();  // S_j is ready; O += P_{j-1} V_{j-1} still runs
      fence_regs(s);
      const bool moved = softmax_block<kFast, kInt8, decltype(masked)::value>(s, st, block_scale, S - j * kBlockN,
                                                                              lane, alpha);
      fence_regs(s);
      wgmma_wait<0>();
      fence_regs(o);
      fence_regs(p);
      mbar_arrive(&sh.empty[prev]);
      if (moved) rescale(o, alpha);
      pack_p(s, p);
    };
    if (ragged && prm.n_blocks == 1) first_block(std::true_type{});
    else first_block(std::false_type{});
    const int last_block = prm.n_blocks - 1;
    for (int j = 1; j < last_block; ++j) step(j, std::false_type{});
    if (last_block > 0) {
      if (ragged) step(last_block, std::true_type{});
      else step(last_block, std::false_type{});
    }

    // the last P·V
    const int last = (prm.n_blocks - 1) % kStages;
    turn_wait(consumer);
    wgmma_fence();
    issue_pv(o, p, desc_v0 + last * kStepV);
    wgmma_commit();
    if (consumer != kConsumers - 1) turn_pass(consumer);  // the last consumer's last hand-over would have no taker
    wgmma_wait<0>();
    fence_regs(o);
    fence_regs(p);
    mbar_arrive(&sh.empty[last]);

    // normalise and store rows row0, row0 + 8: columns 8j + 2*(t%4) + {0, 1}
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float l;
      if (kFast) {
        l = o[kOut - 4 + 2 * half];  // P·V's column 64: the whole row's Σ p, in every thread of the quad
      } else {
        l = st.l[half];
        l += __shfl_xor_sync(0xffffffff, l, 1);
        l += __shfl_xor_sync(0xffffffff, l, 2);
      }
      const float inv = 1.f / l;
      const int row = q0 + 64 * consumer + row0 + 8 * half;
      if (row < S) {
        __nv_bfloat16* dst = prm.out + (static_cast<long long>(b) * S + row) * out_row + h * kHeadDim +
                             2 * (t % 4);
#pragma unroll
        for (int j = 0; j < kHeadDim / 8; ++j)
          *reinterpret_cast<uint32_t*>(dst + 8 * j) =
              pack_bf16(o[4 * j + 2 * half] * inv, o[4 * j + 2 * half + 1] * inv);
      }
    }
  }
}

// Error codes of the entry points beyond CUDA's: kTensorMapError + the CUresult of cuTensorMapEncodeTiled (+ 0: the
// driver has no such entry point)
constexpr int kTensorMapError = 1000;

// (element, token, head, sample) view of [B, S, H, 64] rows of row_bytes, box {64, rows, 1, 1}, swizzled as the
// shared-memory layouts above. Encoded on the host at every launch (microseconds); a CUDA graph keeps the captured
// parameters, maps included.
int encode_map(CUtensorMap* map, const void* base, bool int8, long long row_bytes, int batch, int seq_len,
               int heads, int rows) {
  static PFN_cuTensorMapEncodeTiled_v12000 encode = nullptr;
  if (encode == nullptr) {
    cudaDriverEntryPointQueryResult found;
    cudaError_t err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", reinterpret_cast<void**>(&encode),
                                                       12000, cudaEnableDefault, &found);
    if (err != cudaSuccess) return err;
    if (found != cudaDriverEntryPointSuccess) return kTensorMapError;
  }
  const int elem = int8 ? 1 : 2;
  const cuuint64_t dims[4] = {kHeadDim, static_cast<cuuint64_t>(seq_len), static_cast<cuuint64_t>(heads),
                              static_cast<cuuint64_t>(batch)};
  const cuuint64_t strides[3] = {static_cast<cuuint64_t>(row_bytes), static_cast<cuuint64_t>(kHeadDim * elem),
                                 static_cast<cuuint64_t>(row_bytes) * seq_len};
  const cuuint32_t box[4] = {kHeadDim, static_cast<cuuint32_t>(rows), 1, 1};
  const cuuint32_t ones[4] = {1, 1, 1, 1};
  CUresult r = encode(map, int8 ? CU_TENSOR_MAP_DATA_TYPE_UINT8 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 4,
                      const_cast<void*>(base), dims, strides, box, ones, CU_TENSOR_MAP_INTERLEAVE_NONE,
                      int8 ? CU_TENSOR_MAP_SWIZZLE_64B : CU_TENSOR_MAP_SWIZZLE_128B,
                      CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? 0 : kTensorMapError + static_cast<int>(r);
}

template <bool kFast, bool kInt8>
int launch(Params& prm, int batch, cudaStream_t stream) {
  int err = encode_map(&prm.q_map, prm.q, kInt8, prm.qk_row_bytes, batch, prm.seq_len, prm.heads, 64);
  if (!err) err = encode_map(&prm.k_map, prm.k, kInt8, prm.qk_row_bytes, batch, prm.seq_len, prm.heads, kBlockN);
  if (!err) err = encode_map(&prm.v_map, prm.v, false, 2 * prm.v_stride, batch, prm.seq_len, prm.heads, kBlockN);
  if (err) return err;
  static bool configured = false;  // the first call happens outside any graph capture (the engine warms up)
  constexpr int kBytes = sizeof(Shared<kInt8>) + 1024;  // + the alignment slack of the kernel's first lines
  if (!configured) {
    cudaError_t err = cudaFuncSetAttribute(attention_sm90_kernel<kFast, kInt8>,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize, kBytes);
    if (err != cudaSuccess) return static_cast<int>(err);
    configured = true;
  }
  dim3 grid((prm.seq_len + kBlockM - 1) / kBlockM, batch * prm.heads);
  attention_sm90_kernel<kFast, kInt8><<<grid, kThreads, kBytes, stream>>>(prm);
  return static_cast<int>(cudaGetLastError());
}

constexpr float kQKScale = 1.4426950408889634f / 8.f;  // log2(e) / sqrt(64)

}  // namespace

// variant 0: plain (row sums on the FMA pipe, rescale every block); 1: fast (see the header)
extern "C" int k4serve_attention_int8_sm90(const int8_t* q8, const int8_t* k8, const float* q_scale,
                                            const float* k_scale, const void* v, long long v_stride, void* out,
                                            int batch, int seq_len, int heads, int n_blocks, int variant,
                                            cudaStream_t stream) {
  Params prm{{}, {}, {}, reinterpret_cast<const uint8_t*>(q8), reinterpret_cast<const uint8_t*>(k8), q_scale, k_scale,
                   static_cast<const __nv_bfloat16*>(v), static_cast<__nv_bfloat16*>(out),
                   static_cast<long long>(heads) * kHeadDim, v_stride, seq_len, heads, n_blocks, kQKScale};
  return variant ? launch<true, true>(prm, batch, stream) : launch<false, true>(prm, batch, stream);
}

// bf16 Q·Kᵀ: q, k, v are [B, S, H, 64] views whose rows lie qk_stride (q, k) and v_stride (v) elements apart
extern "C" int k4serve_attention_bf16_sm90(const void* q, const void* k, const void* v, long long qk_stride,
                                            long long v_stride, void* out, int batch, int seq_len, int heads,
                                            int variant, cudaStream_t stream) {
  Params prm{{}, {}, {}, static_cast<const uint8_t*>(q), static_cast<const uint8_t*>(k), nullptr, nullptr,
                   static_cast<const __nv_bfloat16*>(v), static_cast<__nv_bfloat16*>(out), 2 * qk_stride, v_stride,
                   seq_len, heads, (seq_len + kBlockN - 1) / kBlockN, kQKScale};
  return variant ? launch<true, false>(prm, batch, stream) : launch<false, false>(prm, batch, stream);
}
