// AVX-512 with BF16 (and VNNI, which every CPU with AVX512-BF16 has), where there is no AMX: bf16 batches
// of 5 to 64 rows on a GEMM of its own (panels of 16 columns x a segment of K decoded to the reference's
// bf16 weights, vdpbf16ps against x packed in row blocks of 8 or 16, the next panel decoded between the
// products), the bf16 dequantizer of the tiles beyond (vpermw on the bf16 tables of avx512_bf16_arith.h;
// fp32 output takes the AVX-512 one), and the int16 decode kernel for bf16 activations with vpdpwssd
// (avx512_int16.h; 2 to 4 rows). fp32 activations and one row decode with the AVX-512 kernel.
#include <immintrin.h>

#include <algorithm>
#include <numeric>
#include <utility>

#include "scalar_convert.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vnni,fma,f16c")

#include "avx512_bf16_arith.h"
#include "avx512_int16.h"

namespace aaac {
namespace {

// The int16 kernel's products: vpdpwssd, 32 products and 16 sums added in one instruction.
struct VnniDot {
  static __m512i add(__m512i sums, __m512i w, __m512i x) { return _mm512_dpwssd_epi32(sums, w, x); }
};

}  // namespace

void gemv_int16_avx512_vnni(const GemmProblem& p, int64_t n_begin, int64_t n_end) {
  gemv_int16<VnniDot>(p, n_begin, n_end);
}

namespace {

constexpr int kGemmColumns = 16;  // a panel: one accumulator per column, its 16 lanes 16 rows of x
constexpr int kBlockK = 128;      // the layout's blocks; the panel holds each column's 128 k side by side
// A panel covers a segment of about this many k (a multiple of 128 and of G), so that the two panels
// stay in L2 whatever K is: against whole-K panels, 8B down (K = 14336) at M = 16 ran 1.15x faster, and
// 4096 or 1024 k were no better on K = 4096 (one thread, Zen 5).
constexpr int64_t kSegmentK = 2048;
constexpr int64_t kNarrowRows = 8;  // batches up to this size run row blocks of 8 (RowBlock)

// The GEMM's work items: panel n0 (16 columns, the last column repeated past n_end) times segment s0 of
// K, in order: a panel's segments, then the next panel's.
struct PanelItem {
  int64_t n0, s0;
};

struct PanelItems {
  const GemmProblem& p;
  int64_t n_end, segment;

  bool next(PanelItem& item) const {
    item.s0 += segment;
    if (item.s0 >= p.k) item = {item.n0 + kGemmColumns, 0};
    return item.n0 < n_end;
  }
  int64_t s_end(const PanelItem& item) const { return item.s0 + segment < p.k ? item.s0 + segment : p.k; }
  int64_t column(const PanelItem& item, int c) const { return item.n0 + c < n_end ? item.n0 + c : n_end - 1; }
};

int64_t segment_k(const GemmProblem& p) {
  const int64_t unit = std::lcm(p.group_size, static_cast<int64_t>(kBlockK));
  return std::max<int64_t>(1, kSegmentK / unit) * unit;
}

// Where block k0 of column c goes in a panel of segment s0: panel[segment / 128][16][128], the reference's
// bf16 weights, so that the 16 columns' k pair j of a block lie in one 64-byte line.
inline uint16_t* panel_slot(uint16_t* panel, int64_t s0, int64_t k0, int c) {
  return panel + (k0 - s0) / kBlockK * kGemmColumns * kBlockK + c * kBlockK + k0 % kBlockK;
}

// An item's weights into panel, a column at a time.
void decode_gemm_panel(const PanelItems& items, const PanelItem& item, uint16_t* panel) {
  const GemmProblem& p = items.p;
  for (int c = 0; c < kGemmColumns; ++c) {
    ColumnStream col;
    col.open(p, items.column(item, c));
    walk<Bf16>(p, &col, 1, item.s0 / p.group_size, items.s_end(item) / p.group_size,
               [&](int64_t k0, auto size, const auto& block) {
                 constexpr int kSize = decltype(size)::value;
                 Bf16::store(block.template weights<kSize>(0, col.qbytes + k0 / 2), panel_slot(panel, item.s0, k0, c));
               });
  }
}

// acc + xv . (the pair at w + kOffset bytes in every lane), the broadcast folded into vdpbf16ps (m32bcst),
// which GCC does not emit from the intrinsics: a product is one instruction instead of two (a vpbroadcastd
// before each). The address goes in as a register and a constant, not as a memory operand: with one, GCC
// kept every accumulator in memory (1.3x the time). So GCC does not see the read: the asm is volatile,
// and gemm_rows orders it after the panel's stores with a compiler barrier.
template <int kOffset>
__attribute__((always_inline)) inline __m512 dot_broadcast(__m512 acc, __m512bh xv, const uint32_t* w) {
  asm volatile("vdpbf16ps %c3(%2)%{1to16%}, %1, %0" : "+v"(acc) : "v"(xv), "r"(w), "i"(kOffset));
  return acc;
}

template <size_t... kColumn>
__attribute__((always_inline)) inline void dot_columns(__m512* acc, __m512bh xv, const uint32_t* w,
                                                       std::index_sequence<kColumn...>) {
  ((acc[kColumn] = dot_broadcast<kColumn * 256>(acc[kColumn], xv, w)), ...);
}

// A row block: kRows rows of x (16, or 8 for batches of up to 8) in a vector's 16 lanes, each lane a k
// pair of its row. A block of 16 rows (x packed as pack_amx_activations packs it: per 32 k and row block,
// 16 k pairs x 16 rows as 32-bit lanes) takes one pair per vector, and a column's pair is broadcast from
// the panel to every lane; a block of 8 rows (pack_avx512_bf16_activations: per 4 k, the 8 rows' two pairs,
// lane l row l / 2's pair l % 2) takes two pairs per vector, and the column's two pairs are broadcast as
// one 64-bit value, so that no lane idles at 8 rows. Lanes l and l + 1 then hold halves of one sum.
template <int kRows>
struct RowBlock {
  static_assert(kRows == 16 || kRows == 8, "row blocks of 16 or 8 rows");
  static constexpr int kPairs = 16 / kRows;  // k pairs per vector of x
  static constexpr int kPairStride = 2 * kRows;  // bf16 values of x per k pair

  // The vector of x holding pair j of the 128-block at k0 (j a multiple of kPairs), row block mb; within
  // a run of 16 pairs from a multiple of 16, pair j0 + i is kPairStride * i further.
  static const uint16_t* x_at(const uint16_t* x, int64_t k0, int j, int64_t mb, int64_t m_blocks) {
    if constexpr (kRows == 16) return x + ((k0 / 32 + j / 16) * m_blocks + mb) * 512 + 32 * (j % 16);
    return x + (k0 / 4 + j / 2) * 32;
  }

  // The products at pairs j .. j + kPairs: w is pair j of column 0 in the panel (column c's is 64 pairs on).
  static void multiply(const uint16_t* x_vector, const uint32_t* w, __m512* acc) {
    const __m512bh xv = (__m512bh)_mm512_loadu_si512(x_vector);
    if constexpr (kRows == 16) {
      dot_columns(acc, xv, w, std::make_index_sequence<kGemmColumns>());
    } else {
      for (int c = 0; c < kGemmColumns; ++c) {
        const __m512i pairs = _mm512_set1_epi64(*reinterpret_cast<const int64_t*>(w + c * 64));
        acc[c] = _mm512_dpbf16_ps(acc[c], xv, (__m512bh)pairs);
      }
    }
  }

  // sums[16 n][16 lanes] -> sums[16 n][16 m] as store_tile reads them: 8-row blocks add their lane pairs.
  static void finish(float* sums) {
    if constexpr (kRows == 8) {
      const __m512i evens = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 0, 2, 4, 6, 8, 10, 12, 14);
      for (int c = 0; c < kGemmColumns; ++c) {
        const __m512 lanes = _mm512_load_ps(sums + 16 * c);
        const __m512 both = _mm512_add_ps(lanes, _mm512_permute_ps(lanes, 0xB1));  // lanes l and l ^ 1
        _mm512_store_ps(sums + 16 * c, _mm512_permutexvar_ps(evens, both));
      }
    }
  }
};

// A row block's sums over the segments so far: zero at the first, then kept in sums[16 n][16 lanes].
inline void load_sums(const PanelItem& item, const float* sums, __m512* acc) {
  for (int c = 0; c < kGemmColumns; ++c)
    acc[c] = item.s0 == 0 ? _mm512_setzero_ps() : _mm512_load_ps(sums + 16 * c);
}

inline void store_sums(const __m512* acc, float* sums) {
  for (int c = 0; c < kGemmColumns; ++c) _mm512_store_ps(sums + 16 * c, acc[c]);
}

// Row block mb's products with a panel of segment s0, blocks k_begin .. s_end. Inlined, so that acc
// stays in registers (called through a pointer it cost each extra row block 2.5x the time).
template <int kRows>
__attribute__((always_inline)) inline void multiply_blocks(const GemmProblem& p, const uint16_t* panel, int64_t s0,
                                                           int64_t k_begin, int64_t s_end, int64_t mb,
                                                           int64_t m_blocks, __m512* acc) {
  using Rows = RowBlock<kRows>;
  const uint16_t* x = static_cast<const uint16_t*>(p.x);
  for (int64_t k0 = k_begin; k0 < s_end; k0 += kBlockK) {
    const uint32_t* w = reinterpret_cast<const uint32_t*>(panel + (k0 - s0) * kGemmColumns);  // [16][64] pairs
    const int pairs = static_cast<int>(s_end - k0 < kBlockK ? s_end - k0 : kBlockK) / 2;
    for (int j0 = 0; j0 < pairs; j0 += 16) {  // 16 k pairs: a packed tile of x for 16 rows
      const uint16_t* run = Rows::x_at(x, k0, j0, mb, m_blocks);
#pragma GCC unroll 16
      for (int i = 0; i < 16; i += Rows::kPairs) Rows::multiply(run + Rows::kPairStride * i, w + j0 + i, acc);
    }
  }
}

// Row block mb's products with the item's panel, added to its sums.
template <int kRows>
void multiply_gemm_panel(const PanelItems& items, const PanelItem& item, const uint16_t* panel, int64_t mb,
                         int64_t m_blocks, float* sums) {
  __m512 acc[kGemmColumns];
  load_sums(item, sums, acc);
  multiply_blocks<kRows>(items.p, panel, item.s0, item.s0, items.s_end(item), mb, m_blocks, acc);
  store_sums(acc, sums);
}

// multiply_gemm_panel for row block 0, with the next item's panel decoded in between: the decode's
// permutes and stores and the products' vdpbf16ps mostly use different units, so interleaved they
// overlap. Each 128-block decoded (16 columns) is paired with a 128-block of products, a column's block
// between two slices of 4 k pairs; what is left of either runs alone. The column loop stays rolled:
// unrolled across the 16 columns the code outgrew the instruction caches (1.7x the time).
template <int kRows>
void multiply_gemm_panel_decoding_next(const PanelItems& items, const PanelItem& item, const uint16_t* panel,
                                       int64_t m_blocks, const PanelItem& next, uint16_t* next_panel, float* sums) {
  using Rows = RowBlock<kRows>;
  const GemmProblem& p = items.p;
  const uint16_t* x = static_cast<const uint16_t*>(p.x);
  __m512 acc[kGemmColumns];
  load_sums(item, sums, acc);
  const int64_t s_end = items.s_end(item);
  int64_t products_k = item.s0;  // the next block of products
  ColumnStream col[kGemmColumns];
  for (int c = 0; c < kGemmColumns; ++c) col[c].open(p, items.column(next, c));
  // The item after the next streams right behind it: each block fetches its counterpart there (a hint:
  // past the tensor's end it does nothing). Without it 8B down at M = 16 took 1.25x the time.
  // (After the last item it fetches the block being decoded: no branch in the loop.)
  PanelItem after = next;
  const int64_t ahead =
      items.next(after) ? (items.column(after, 0) - next.n0) * (p.k / 2) + (after.s0 - next.s0) / 2 : 0;
  walk<Bf16>(p, col, kGemmColumns, next.s0 / p.group_size, items.s_end(next) / p.group_size,
             [&](int64_t k0, auto size, const auto& block) {
               constexpr int kSize = decltype(size)::value;
               const bool paired = kSize == kBlockK && products_k + kBlockK <= s_end;
               const uint32_t* w = reinterpret_cast<const uint32_t*>(panel + (products_k - item.s0) * kGemmColumns);
               // The addresses, made once per block and advanced per column (made per column, with a signed
               // division, a multiply and reloads from the stack, they cost 5% of the time at M = 16).
               const uint16_t* x_runs = Rows::x_at(x, products_k, 0, 0, m_blocks);
               const int64_t x_run_stride = Rows::x_at(x, products_k, 16, 0, m_blocks) - x_runs;
               uint16_t* slot = panel_slot(next_panel, next.s0, k0, 0);
               const int64_t q_offset = k0 / 2;
               const uint16_t* run = x_runs;  // column c's 4 pairs of x: pair 4c of the block
               for (int c = 0; c < kGemmColumns; ++c, slot += kBlockK) {
                 const uint8_t* q = col[c].qbytes + q_offset;
                 _mm_prefetch(reinterpret_cast<const char*>(q + ahead), _MM_HINT_T0);
                 Bf16::store(block.template weights<kSize>(c, q), slot);
                 if (!paired) continue;
#pragma GCC unroll 4
                 for (int i = 0; i < 4; i += Rows::kPairs) Rows::multiply(run + Rows::kPairStride * i, w + 4 * c + i, acc);
                 run += c % 4 == 3 ? x_run_stride - 12 * Rows::kPairStride : 4 * Rows::kPairStride;
               }
               if (paired) products_k += kBlockK;
             });
  multiply_blocks<kRows>(p, panel, item.s0, products_k, s_end, 0, m_blocks, acc);
  store_sums(acc, sums);
}

// Items (panel x segment) software-pipelined: while row block 0 multiplies one item's panel, the next
// item's is decoded into the other half of the workspace.
template <int kRows>
void gemm_rows(const GemmProblem& p, int64_t n_begin, int64_t n_end, void* workspace) {
  const PanelItems items{p, n_end, segment_k(p)};
  const int64_t m_blocks = (p.m + kRows - 1) / kRows;
  uint16_t* panels[2];
  panels[0] = reinterpret_cast<uint16_t*>((reinterpret_cast<uintptr_t>(workspace) + 63) & ~uintptr_t{63});
  panels[1] = panels[0] + items.segment * kGemmColumns;
  float* sums = reinterpret_cast<float*>(panels[1] + items.segment * kGemmColumns);  // [m blocks][16 n][16]
  PanelItem item{n_begin, 0};
  decode_gemm_panel(items, item, panels[0]);
  for (int i = 0;; i ^= 1) {
    asm volatile("" ::: "memory");  // panels[i] is written before dot_broadcast reads it (GCC does not see the read)
    PanelItem next = item;
    const bool more = items.next(next);
    if (more) {
      multiply_gemm_panel_decoding_next<kRows>(items, item, panels[i], m_blocks, next, panels[i ^ 1], sums);
    } else {
      multiply_gemm_panel<kRows>(items, item, panels[i], 0, m_blocks, sums);
    }
    for (int64_t mb = 1; mb < m_blocks; ++mb)
      multiply_gemm_panel<kRows>(items, item, panels[i], mb, m_blocks, sums + mb * kGemmColumns * 16);
    if (items.s_end(item) == p.k) {
      const int64_t columns = n_end - item.n0 < kGemmColumns ? n_end - item.n0 : kGemmColumns;
      for (int64_t mb = 0; mb < m_blocks; ++mb) {
        float* block_sums = sums + mb * kGemmColumns * 16;
        RowBlock<kRows>::finish(block_sums);
        const int64_t rows = p.m - kRows * mb < kRows ? p.m - kRows * mb : kRows;
        store_tile(p, block_sums, kRows * mb, rows, item.n0, columns);
      }
    }
    if (!more) break;
    item = next;
  }
}

}  // namespace

// Two panels, then the sums of up to (M + 7) / 8 row blocks, and room to align the panels.
int64_t avx512_bf16_gemm_workspace_bytes(const GemmProblem& p) {
  return 2 * segment_k(p) * kGemmColumns * 2 + (p.m + 7) / 8 * kGemmColumns * 16 * 4 + 128;
}

void pack_avx512_bf16_activations(const uint16_t* x, int64_t m, int64_t k, int64_t stride, uint16_t* out) {
  if (m > kNarrowRows) return pack_amx_activations(x, m, k, stride, out);
  // Per 4 k, each row's 4 values as one 64-bit lane (rows past m as zeros).
  const __mmask8 valid = static_cast<__mmask8>((1u << m) - 1);
  const __m512i row_offsets =
      _mm512_mullo_epi64(_mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7), _mm512_set1_epi64(stride * 2));  // bytes
  for (int64_t i = 0; i < k / 4; ++i) {
    const __m512i rows = _mm512_mask_i64gather_epi64(_mm512_setzero_si512(), valid, row_offsets, x + 4 * i, 1);
    _mm512_storeu_si512(out + 32 * i, rows);
  }
}

void gemm_avx512_bf16(const GemmProblem& p, int64_t n_begin, int64_t n_end, void* workspace) {
  if (p.m <= kNarrowRows) return gemm_rows<8>(p, n_begin, n_end, workspace);
  gemm_rows<16>(p, n_begin, n_end, workspace);
}

void dequant_avx512_bf16(const GemmProblem& p, int64_t n_begin, int64_t n_end, void* out) {
  if (p.y_dtype == ActDtype::kFloat32) return dequant_avx512(p, n_begin, n_end, out);
  dequant<Bf16>(p, n_begin, n_end, out);
}

}  // namespace aaac

#pragma GCC pop_options
