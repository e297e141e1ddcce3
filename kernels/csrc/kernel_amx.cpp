// AMX-BF16 path for bf16 batches of 2 rows or more. The weights are decoded with the AVX-512 bf16
// tables (avx512_bf16_arith.h), a plane of 32 k per tile row, into 1 KiB tiles of 16 columns x 32 k
// and multiplied with tdpbf16ps: C[16 n x 16 m] += W[16 n x 32 k] . x^T[32 k x 16 m], x packed once
// per call into the pair-interleaved (VNNI) tiles tdpbf16ps reads. Up to 64 rows, one sweep streams
// the weights block by block; beyond, a panel of 128 columns x ~2048 k is decoded once into L2 and
// swept in blocks of 2 column tiles x 2 row blocks (4 tiles loaded per 4 products), its fp32 sums
// waiting in a small buffer between k segments. Either way each weight is decoded once per call.
#include <immintrin.h>

#include "scalar_convert.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c,amx-tile,amx-bf16")

#include "avx512_bf16_arith.h"

namespace aaac {
namespace {

constexpr int kTile = 16;                // rows of every tile: columns of W, rows of x
constexpr int kTileK = 32;               // k per tile: 64 bytes of bf16
constexpr int kTileElems = kTile * kTileK;
constexpr int kRowBlocks = kAmxSweepRows / 16;  // C tiles 0..3: 64 rows of x per sweep
constexpr int64_t kPanelColumns = kAmxPanelColumns;  // 8 column tiles
constexpr int64_t kPanelDepth = kAmxPanelDepth;  // k per decoded panel, rounded to whole groups

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0..3 accumulate; the streaming sweep holds weights in 4 and activations in 5, the panel
// blocks weights in 4 and 6 and activations in 5 and 7; all 16 rows x 64 bytes. GCC's tile
// intrinsics paste the tile number into the instruction text, so the calls spell them as literals.
void configure_tiles() {
  TileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.colsb[t] = 64;
    config.rows[t] = kTile;
  }
  _tile_loadconfig(&config);
}

// Not std::min: a standard-library template instantiated under this file's target could be the copy
// the linker keeps for a generic caller (cpu_kernels.h).
int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// Row blocks of the packed activations: beyond one sweep, an even number (a zero block pads an odd
// count) so that the panel path always multiplies pairs of row blocks.
int64_t packed_row_blocks(int64_t m) {
  const int64_t blocks = (m + kTile - 1) / kTile;
  return m > kAmxSweepRows ? (blocks + 1) / 2 * 2 : blocks;
}

int64_t row_blocks(const GemmProblem& p) { return packed_row_blocks(p.m); }

// k per panel: whole groups and whole 128-blocks (a panel starts where a block does).
int64_t panel_depth(const GemmProblem& p) {
  int64_t unit = p.group_size;
  while (unit % 128) unit += p.group_size;
  return max64(unit, kPanelDepth / unit * unit);
}

// The packed tile of x^T for k block kb and row block mb: 16 rows of k pairs x 16 rows of x.
const uint16_t* act_tile(const GemmProblem& p, int64_t kb, int64_t mb) {
  return static_cast<const uint16_t*>(p.x) + (kb * row_blocks(p) + mb) * kTileElems;
}

// Column tiles of a panel of this many columns: an even number, for the 2 x 2 blocks.
int64_t panel_column_tiles(int64_t columns) { return (columns + 2 * kTile - 1) / (2 * kTile) * 2; }

// Columns n0 .. n0 + columns, k0 .. k1 -> panel[column tile][k block][16][32]; columns past the end
// of the last (even) tile are zero.
void decode_panel(const GemmProblem& p, int64_t n0, int64_t columns, int64_t k0, int64_t k1, uint16_t* panel) {
  const int64_t k_blocks = (k1 - k0) / kTileK;
  const int64_t padded = panel_column_tiles(columns) * kTile;
  for (int64_t c = columns; c < padded; ++c)
    for (int64_t kb = 0; kb < k_blocks; ++kb)
      std::memset(panel + ((c / kTile) * k_blocks + kb) * kTileElems + (c % kTile) * kTileK, 0, kTileK * 2);
  for (int64_t c = 0; c < columns; ++c) {
    ColumnStream col;
    col.open(p, n0 + c);
    uint16_t* tiles = panel + (c / kTile) * k_blocks * kTileElems + (c % kTile) * kTileK;
    walk<Bf16>(p, &col, 1, k0 / p.group_size, k1 / p.group_size, [&](int64_t kk, auto size, const auto& block) {
      constexpr int kSize = decltype(size)::value;
      _mm_prefetch(reinterpret_cast<const char*>(col.qbytes + p.k / 2 + kk / 2), _MM_HINT_T0);
      const auto w = block.template weights<kSize>(0, col.qbytes + kk / 2);
      for (int j = 0; j < kSize / kTileK; ++j)
        _mm512_store_si512(tiles + ((kk - k0) / kTileK + j) * kTileElems, w.w[j]);
    });
  }
}

// sums[row block][column tile][16 n][16 m] += panel x x^T over the panel's k blocks, for row blocks
// mb, mb + 1 and column tiles ct, ct + 1: each k block loads 2 weight and 2 activation tiles for 4
// products (a weight tile feeding 4 row blocks measured about 1.35x slower: 5 loads per 4 products,
// and one weight tile register the next load must wait for).
void multiply_block(const GemmProblem& p, const uint16_t* panel, int64_t column_tiles, int64_t k_blocks,
                    int64_t kb0, int64_t mb, int64_t ct, float* sums) {
  float* c00 = sums + (mb * column_tiles + ct) * kTile * kTile;
  float* c01 = c00 + kTile * kTile;                 // the next column tile
  float* c10 = c00 + column_tiles * kTile * kTile;  // the next row block
  float* c11 = c10 + kTile * kTile;
  const uint16_t* w0 = panel + ct * k_blocks * kTileElems;
  const uint16_t* w1 = w0 + k_blocks * kTileElems;
  _tile_loadd(0, c00, 64);
  _tile_loadd(1, c10, 64);
  _tile_loadd(2, c01, 64);
  _tile_loadd(3, c11, 64);
  for (int64_t kb = 0; kb < k_blocks; ++kb) {
    _tile_loadd(4, w0 + kb * kTileElems, 64);
    _tile_loadd(5, act_tile(p, kb0 + kb, mb), 64);
    _tile_dpbf16ps(0, 4, 5);
    _tile_loadd(7, act_tile(p, kb0 + kb, mb + 1), 64);
    _tile_dpbf16ps(1, 4, 7);
    _tile_loadd(6, w1 + kb * kTileElems, 64);
    _tile_dpbf16ps(2, 6, 5);
    _tile_dpbf16ps(3, 6, 7);
  }
  _tile_stored(0, c00, 64);
  _tile_stored(1, c10, 64);
  _tile_stored(2, c01, 64);
  _tile_stored(3, c11, 64);
}

// Up to 64 rows (one sweep): 16 columns at a time, each block decoded into up to four weight tiles
// that the AMX unit consumes while the next block decodes; the sums stay in tiles 0..3.
template <int kBlocks>
void stream_columns(const GemmProblem& p, int64_t n0, int64_t columns) {
  ColumnStream col[kTile];
  for (int c = 0; c < columns; ++c) col[c].open(p, n0 + c);
  alignas(64) uint16_t weights[4][kTile][kTileK] = {};
  if constexpr (kBlocks > 0) _tile_zero(0);
  if constexpr (kBlocks > 1) _tile_zero(1);
  if constexpr (kBlocks > 2) _tile_zero(2);
  if constexpr (kBlocks > 3) _tile_zero(3);
  walk<Bf16>(p, col, columns, 0, p.k / p.group_size, [&](int64_t k0, auto size, const auto& block) {
      constexpr int kSize = decltype(size)::value;
      for (int c = 0; c < columns; ++c) {
        _mm_prefetch(reinterpret_cast<const char*>(col[c].qbytes + kTile * p.k / 2 + k0 / 2), _MM_HINT_T0);
        const auto w = block.template weights<kSize>(c, col[c].qbytes + k0 / 2);
        for (int j = 0; j < kSize / kTileK; ++j) _mm512_store_si512(weights[j][c], w.w[j]);
      }
      for (int j = 0; j < kSize / kTileK; ++j) {
        const int64_t kb = k0 / kTileK + j;
        _tile_loadd(4, &weights[j][0][0], 64);
        if constexpr (kBlocks > 0) { _tile_loadd(5, act_tile(p, kb, 0), 64); _tile_dpbf16ps(0, 4, 5); }
        if constexpr (kBlocks > 1) { _tile_loadd(5, act_tile(p, kb, 1), 64); _tile_dpbf16ps(1, 4, 5); }
        if constexpr (kBlocks > 2) { _tile_loadd(5, act_tile(p, kb, 2), 64); _tile_dpbf16ps(2, 4, 5); }
        if constexpr (kBlocks > 3) { _tile_loadd(5, act_tile(p, kb, 3), 64); _tile_dpbf16ps(3, 4, 5); }
      }
  });
  alignas(64) float sums[kRowBlocks][kTile][kTile];  // [row block][n][m]
  if constexpr (kBlocks > 0) _tile_stored(0, sums[0], 64);
  if constexpr (kBlocks > 1) _tile_stored(1, sums[1], 64);
  if constexpr (kBlocks > 2) _tile_stored(2, sums[2], 64);
  if constexpr (kBlocks > 3) _tile_stored(3, sums[3], 64);
  for (int64_t mb = 0; mb < kBlocks; ++mb)
    store_tile(p, &sums[mb][0][0], mb * kTile, min64(kTile, p.m - mb * kTile), n0, columns);
}

void stream(const GemmProblem& p, int64_t n_begin, int64_t n_end) {
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kTile) {
    const int64_t columns = min64(kTile, n_end - n0);
    switch (row_blocks(p)) {
      case 1: stream_columns<1>(p, n0, columns); break;
      case 2: stream_columns<2>(p, n0, columns); break;
      case 3: stream_columns<3>(p, n0, columns); break;
      default: stream_columns<4>(p, n0, columns); break;
    }
  }
}

// More rows: panels decoded once into L2, swept by every pair of row blocks of x.
void gemm_panels(const GemmProblem& p, int64_t n_begin, int64_t n_end, uint16_t* panel, float* sums) {
  const int64_t m_blocks = row_blocks(p), depth = panel_depth(p);
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kPanelColumns) {
    const int64_t columns = min64(kPanelColumns, n_end - n0), column_tiles = panel_column_tiles(columns);
    std::memset(sums, 0, m_blocks * column_tiles * kTile * kTile * sizeof(float));
    for (int64_t k0 = 0; k0 < p.k; k0 += depth) {
      const int64_t k1 = min64(p.k, k0 + depth), k_blocks = (k1 - k0) / kTileK;
      decode_panel(p, n0, columns, k0, k1, panel);
      for (int64_t mb = 0; mb < m_blocks; mb += 2)
        for (int64_t ct = 0; ct < column_tiles; ct += 2)
          multiply_block(p, panel, column_tiles, k_blocks, k0 / kTileK, mb, ct, sums);
    }
    for (int64_t mb = 0; mb * kTile < p.m; ++mb)
      for (int64_t ct = 0; ct * kTile < columns; ++ct)
        store_tile(p, sums + (mb * column_tiles + ct) * kTile * kTile, mb * kTile, min64(kTile, p.m - mb * kTile),
                   n0 + ct * kTile, min64(kTile, columns - ct * kTile));
  }
}

}  // namespace

int64_t amx_packed_elements(int64_t m, int64_t k) { return packed_row_blocks(m) * kTile * k; }

int64_t amx_workspace_bytes(const GemmProblem& p) {
  return kPanelColumns * panel_depth(p) * 2 + row_blocks(p) * kPanelColumns * kTile * 4 + 64;
}

// Each tile row r holds k pair r of 16 rows of x: viewing x as 32-bit pairs, a tile is the transpose
// of a 16 x 16 block, one gather per tile row (rows past m read as zeros).
void pack_amx_activations(const uint16_t* x, int64_t m, int64_t k, int64_t stride, uint16_t* out) {
  const int64_t m_blocks = packed_row_blocks(m);
  const __m512i row_starts = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                                _mm512_set1_epi32(static_cast<int>(stride / 2)));
  for (int64_t mb = 0; mb < m_blocks; ++mb) {
    const int64_t rows = min64(kTile, max64(0, m - mb * kTile));
    const __mmask16 valid = static_cast<__mmask16>((1u << rows) - 1);
    const uint16_t* block = x + mb * kTile * stride;
    for (int64_t kb = 0; kb < k / kTileK; ++kb) {
      uint16_t* tile = out + (kb * m_blocks + mb) * kTileElems;
      for (int r = 0; r < kTile; ++r) {
        const __m512i pairs = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), valid, row_starts,
                                                          block + kb * kTileK + 2 * r, 4);
        _mm512_storeu_si512(tile + r * kTileK, pairs);
      }
    }
  }
}

void gemm_amx(const GemmProblem& p, int64_t n_begin, int64_t n_end, void* workspace) {
  auto* panel = reinterpret_cast<uint16_t*>((reinterpret_cast<uintptr_t>(workspace) + 63) & ~uintptr_t{63});
  float* sums = reinterpret_cast<float*>(panel + kPanelColumns * panel_depth(p));
  configure_tiles();
  const bool one_sweep = row_blocks(p) <= kRowBlocks;
  one_sweep ? stream(p, n_begin, n_end) : gemm_panels(p, n_begin, n_end, panel, sums);
  _tile_release();
}

}  // namespace aaac

#pragma GCC pop_options
