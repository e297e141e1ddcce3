// AMX-BF16 path for batches above the decode kernels' few rows (bf16 activations). The weights are
// decoded with the AVX-512 bf16 tables (avx512_bf16_arith.h) into 1 KiB tiles of 16 columns x 32 k
// and multiplied with tdpbf16ps: C[16 n x 16 m] += W[16 n x 32 k] . x^T[32 k x 16 m], x packed once
// per call into the pair-interleaved (VNNI) tiles tdpbf16ps reads. Up to 64 rows, one sweep streams
// the weights chunk by chunk; beyond, a panel of 128 columns x ~2048 k is decoded once into L2 and
// swept by every 64 rows, its fp32 sums waiting in a small buffer between k segments. Either way
// each weight is decoded once per call.
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

// Tiles 0..3 accumulate, 4 holds weights, 5 activations, all 16 rows x 64 bytes. GCC's tile
// intrinsics paste the tile number into the instruction text, so the calls spell them as literals.
void configure_tiles() {
  TileConfig config;
  for (int t = 0; t < 6; ++t) {
    config.colsb[t] = 64;
    config.rows[t] = kTile;
  }
  _tile_loadconfig(&config);
}

// Not std::min: a standard-library template instantiated under this file's target could be the copy
// the linker keeps for a generic caller (cpu_kernels.h).
int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

int64_t row_blocks(const GemmProblem& p) { return (p.m + kTile - 1) / kTile; }

int64_t panel_depth(const GemmProblem& p) {
  return max64(p.group_size, kPanelDepth / p.group_size * p.group_size);
}

// The packed tile of x^T for k block kb and row block mb: 16 rows of k pairs x 16 rows of x.
const uint16_t* act_tile(const GemmProblem& p, int64_t kb, int64_t mb) {
  return static_cast<const uint16_t*>(p.x) + (kb * row_blocks(p) + mb) * kTileElems;
}

// Columns n0 .. n0 + columns, k0 .. k1 -> panel[column tile][k block][16][32]; columns past the end
// of the last tile are zero.
template <int kChunk>
void decode_panel(const GemmProblem& p, int64_t n0, int64_t columns, int64_t k0, int64_t k1, uint16_t* panel) {
  const int64_t k_blocks = (k1 - k0) / kTileK;
  const int64_t padded = (columns + kTile - 1) / kTile * kTile;
  for (int64_t c = columns; c < padded; ++c)
    for (int64_t kb = 0; kb < k_blocks; ++kb)
      std::memset(panel + ((c / kTile) * k_blocks + kb) * kTileElems + (c % kTile) * kTileK, 0, kTileK * 2);
  for (int64_t c = 0; c < columns; ++c) {
    ColumnStream col;
    col.open(p, n0 + c);
    uint16_t* tiles = panel + (c / kTile) * k_blocks * kTileElems + (c % kTile) * kTileK;
    for (int64_t g0 = k0 / p.group_size; g0 < k1 / p.group_size; g0 += kScaleBatch) {
      const int64_t batch = min64(k1 / p.group_size - g0, kScaleBatch);
      col.load_scales(g0, batch);
      for (int j = 0; j < batch; ++j) {
        const __m512i table = Bf16::table(col.scaled(j));
        for (int64_t k = (g0 + j) * p.group_size; k < (g0 + j + 1) * p.group_size; k += kChunk) {
          _mm_prefetch(reinterpret_cast<const char*>(col.qbytes + p.k / 2 + k / 2), _MM_HINT_T0);
          const Bf16::Weights<kChunk> w(col.qbytes + k / 2, table);
          for (int t = 0; t < kChunk / kTileK; ++t)
            _mm512_store_si512(tiles + ((k - k0) / kTileK + t) * kTileElems, w.w[t]);
        }
      }
    }
  }
}

// sums[row block][column tile][16 n][16 m] += panel x x^T over the panel's k blocks, for kBlocks row
// blocks from mb0: each weight tile loaded once feeds kBlocks products.
template <int kBlocks>
void multiply_panel(const GemmProblem& p, const uint16_t* panel, int64_t column_tiles, int64_t k_blocks,
                    int64_t kb0, int64_t mb0, float* sums) {
  for (int64_t ct = 0; ct < column_tiles; ++ct) {
    float* c = sums + (mb0 * column_tiles + ct) * kTile * kTile;
    const int64_t block_stride = column_tiles * kTile * kTile;
    if constexpr (kBlocks > 0) _tile_loadd(0, c, 64);
    if constexpr (kBlocks > 1) _tile_loadd(1, c + block_stride, 64);
    if constexpr (kBlocks > 2) _tile_loadd(2, c + 2 * block_stride, 64);
    if constexpr (kBlocks > 3) _tile_loadd(3, c + 3 * block_stride, 64);
    for (int64_t kb = 0; kb < k_blocks; ++kb) {
      _tile_loadd(4, panel + (ct * k_blocks + kb) * kTileElems, 64);
      if constexpr (kBlocks > 0) { _tile_loadd(5, act_tile(p, kb0 + kb, mb0 + 0), 64); _tile_dpbf16ps(0, 4, 5); }
      if constexpr (kBlocks > 1) { _tile_loadd(5, act_tile(p, kb0 + kb, mb0 + 1), 64); _tile_dpbf16ps(1, 4, 5); }
      if constexpr (kBlocks > 2) { _tile_loadd(5, act_tile(p, kb0 + kb, mb0 + 2), 64); _tile_dpbf16ps(2, 4, 5); }
      if constexpr (kBlocks > 3) { _tile_loadd(5, act_tile(p, kb0 + kb, mb0 + 3), 64); _tile_dpbf16ps(3, 4, 5); }
    }
    if constexpr (kBlocks > 0) _tile_stored(0, c, 64);
    if constexpr (kBlocks > 1) _tile_stored(1, c + block_stride, 64);
    if constexpr (kBlocks > 2) _tile_stored(2, c + 2 * block_stride, 64);
    if constexpr (kBlocks > 3) _tile_stored(3, c + 3 * block_stride, 64);
  }
}

// Up to 64 rows (one sweep): 16 columns at a time, each chunk decoded into one or two weight tiles
// that the AMX unit consumes while the next chunk decodes; the sums stay in tiles 0..3.
template <int kBlocks, int kChunk>
void stream_columns(const GemmProblem& p, int64_t n0, int64_t columns) {
  ColumnStream col[kTile];
  for (int c = 0; c < columns; ++c) col[c].open(p, n0 + c);
  alignas(64) uint16_t weights[kChunk / kTileK][kTile][kTileK] = {};
  if constexpr (kBlocks > 0) _tile_zero(0);
  if constexpr (kBlocks > 1) _tile_zero(1);
  if constexpr (kBlocks > 2) _tile_zero(2);
  if constexpr (kBlocks > 3) _tile_zero(3);
  const int64_t groups = p.k / p.group_size;
  for (int64_t g0 = 0; g0 < groups; g0 += kScaleBatch) {
    const int64_t batch = min64(groups - g0, kScaleBatch);
    for (int c = 0; c < columns; ++c) col[c].load_scales(g0, batch);
    for (int j = 0; j < batch; ++j) {
      __m512i table[kTile];
      for (int c = 0; c < columns; ++c) table[c] = Bf16::table(col[c].scaled(j));
      for (int64_t k = (g0 + j) * p.group_size; k < (g0 + j + 1) * p.group_size; k += kChunk) {
        for (int c = 0; c < columns; ++c) {
          _mm_prefetch(reinterpret_cast<const char*>(col[c].qbytes + kTile * p.k / 2 + k / 2), _MM_HINT_T0);
          const Bf16::Weights<kChunk> w(col[c].qbytes + k / 2, table[c]);
          for (int t = 0; t < kChunk / kTileK; ++t) _mm512_store_si512(weights[t][c], w.w[t]);
        }
        for (int t = 0; t < kChunk / kTileK; ++t) {
          const int64_t kb = k / kTileK + t;
          _tile_loadd(4, &weights[t][0][0], 64);
          if constexpr (kBlocks > 0) { _tile_loadd(5, act_tile(p, kb, 0), 64); _tile_dpbf16ps(0, 4, 5); }
          if constexpr (kBlocks > 1) { _tile_loadd(5, act_tile(p, kb, 1), 64); _tile_dpbf16ps(1, 4, 5); }
          if constexpr (kBlocks > 2) { _tile_loadd(5, act_tile(p, kb, 2), 64); _tile_dpbf16ps(2, 4, 5); }
          if constexpr (kBlocks > 3) { _tile_loadd(5, act_tile(p, kb, 3), 64); _tile_dpbf16ps(3, 4, 5); }
        }
      }
    }
  }
  alignas(64) float sums[kRowBlocks][kTile][kTile];  // [row block][n][m]
  if constexpr (kBlocks > 0) _tile_stored(0, sums[0], 64);
  if constexpr (kBlocks > 1) _tile_stored(1, sums[1], 64);
  if constexpr (kBlocks > 2) _tile_stored(2, sums[2], 64);
  if constexpr (kBlocks > 3) _tile_stored(3, sums[3], 64);
  for (int64_t m = 0; m < p.m; ++m)
    for (int64_t n = 0; n < columns; ++n) store_output(p, m, n0 + n, sums[m / kTile][n][m % kTile]);
}

template <int kChunk>
void stream_chunked(const GemmProblem& p, int64_t n_begin, int64_t n_end) {
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kTile) {
    const int64_t columns = min64(kTile, n_end - n0);
    switch (row_blocks(p)) {
      case 1: stream_columns<1, kChunk>(p, n0, columns); break;
      case 2: stream_columns<2, kChunk>(p, n0, columns); break;
      case 3: stream_columns<3, kChunk>(p, n0, columns); break;
      default: stream_columns<4, kChunk>(p, n0, columns); break;
    }
  }
}

// More rows: panels decoded once into L2, swept by every 64 rows of x.
template <int kChunk>
void gemm_chunked(const GemmProblem& p, int64_t n_begin, int64_t n_end, uint16_t* panel, float* sums) {
  const int64_t m_blocks = row_blocks(p), depth = panel_depth(p);
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kPanelColumns) {
    const int64_t columns = min64(kPanelColumns, n_end - n0), column_tiles = (columns + kTile - 1) / kTile;
    std::memset(sums, 0, m_blocks * column_tiles * kTile * kTile * sizeof(float));
    for (int64_t k0 = 0; k0 < p.k; k0 += depth) {
      const int64_t k1 = min64(p.k, k0 + depth), k_blocks = (k1 - k0) / kTileK;
      decode_panel<kChunk>(p, n0, columns, k0, k1, panel);
      for (int64_t mb0 = 0; mb0 < m_blocks; mb0 += kRowBlocks) {
        switch (min64(kRowBlocks, m_blocks - mb0)) {
          case 1: multiply_panel<1>(p, panel, column_tiles, k_blocks, k0 / kTileK, mb0, sums); break;
          case 2: multiply_panel<2>(p, panel, column_tiles, k_blocks, k0 / kTileK, mb0, sums); break;
          case 3: multiply_panel<3>(p, panel, column_tiles, k_blocks, k0 / kTileK, mb0, sums); break;
          default: multiply_panel<4>(p, panel, column_tiles, k_blocks, k0 / kTileK, mb0, sums); break;
        }
      }
    }
    for (int64_t m = 0; m < p.m; ++m)
      for (int64_t n = 0; n < columns; ++n)
        store_output(p, m, n0 + n, sums[((m / kTile) * column_tiles + n / kTile) * kTile * kTile + (n % kTile) * kTile + m % kTile]);
  }
}

}  // namespace

int64_t amx_packed_elements(int64_t m, int64_t k) { return (m + kTile - 1) / kTile * kTile * k; }

int64_t amx_workspace_bytes(const GemmProblem& p) {
  return kPanelColumns * panel_depth(p) * 2 + row_blocks(p) * kPanelColumns * kTile * 4 + 64;
}

void pack_amx_activations(const uint16_t* x, int64_t m, int64_t k, int64_t stride, uint16_t* out) {
  const int64_t m_blocks = (m + kTile - 1) / kTile;
  for (int64_t kb = 0; kb < k / kTileK; ++kb)
    for (int64_t mb = 0; mb < m_blocks; ++mb) {
      uint16_t* tile = out + (kb * m_blocks + mb) * kTileElems;
      for (int r = 0; r < kTile; ++r)        // pair of k: 2r, 2r + 1
        for (int i = 0; i < kTile; ++i) {    // row of x
          const int64_t row = mb * kTile + i, col = kb * kTileK + 2 * r;
          tile[r * kTileK + 2 * i] = row < m ? x[row * stride + col] : 0;
          tile[r * kTileK + 2 * i + 1] = row < m ? x[row * stride + col + 1] : 0;
        }
    }
}

void gemm_amx(const GemmProblem& p, int64_t n_begin, int64_t n_end, void* workspace) {
  auto* panel = reinterpret_cast<uint16_t*>((reinterpret_cast<uintptr_t>(workspace) + 63) & ~uintptr_t{63});
  float* sums = reinterpret_cast<float*>(panel + kPanelColumns * panel_depth(p));
  configure_tiles();
  const bool one_sweep = row_blocks(p) <= kRowBlocks;
  if (p.chunk == 64) {
    one_sweep ? stream_chunked<64>(p, n_begin, n_end) : gemm_chunked<64>(p, n_begin, n_end, panel, sums);
  } else {
    one_sweep ? stream_chunked<32>(p, n_begin, n_end) : gemm_chunked<32>(p, n_begin, n_end, panel, sums);
  }
  _tile_release();
}

}  // namespace aaac

#pragma GCC pop_options
