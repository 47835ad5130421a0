// Integer kernels for SQ8 (8-bit scalar-quantized) key codes, with runtime
// ISA dispatch like kernels.h: one translation unit per ISA
// (scan_sq8_scalar.cc, scan_sq8_avx2.cc, scan_sq8_avx512vnni.cc), the
// scalar table the test oracle. Every table returns bit-identical results
// (exact int32 arithmetic; no saturation: d <= kMaxSq8Dim keeps every sum of
// |u8 * s8| products below 2^31). KVR_SIMD=scalar|avx2|avx512 forces a
// table as for kernels.h (avx512 selects the VNNI table when the CPU has it).
//
// Codes are unsigned bytes (0..255), queries signed bytes. scan_sq8 reads a
// blocked layout (kSq8Block keys per block, interleaved in groups of 4
// dimensions) so that one 512-bit VNNI instruction scores 16 keys on 4
// dimensions with no horizontal reduction:
//   byte of key i, dim j (j < dpad, dpad a multiple of 4) is at
//   (i / 16) * (16 * dpad) + (j / 4) * 64 + (i % 16) * 4 + (j % 4).
// Sq8BlockOffset() computes it. Thread-safe and allocation-free.
//
// scan_sq8_multi scores up to kSq8MaxMultiQueries queries per read of the
// codes (the VNNI table keeps one accumulator per query in registers, so a
// 64-byte code load feeds nq products instead of one: a single query's scan
// is bound by its code loads, from L2 or memory, not by vpdpbusd; the VNNI
// table also prefetches the codes a few blocks ahead), and select_ge finds
// the keys a collector's threshold lets through with vector compares.
#pragma once

#include <cstddef>
#include <cstdint>

namespace kvr::simd {

inline constexpr size_t kSq8Block = 16;      // keys per block
inline constexpr size_t kMaxSq8Dim = 16384;  // 16384 * 255 * 128 < 2^31
inline constexpr size_t kSq8MaxMultiQueries = 8;  // queries per scan_sq8_multi call

// Dimensions rounded up to the 4-dimension group of the blocked layout.
inline constexpr size_t Sq8PaddedDim(size_t d) { return (d + 3) / 4 * 4; }
// Bytes of one block of kSq8Block keys.
inline constexpr size_t Sq8BlockBytes(size_t dpad) { return kSq8Block * dpad; }
// Offset of key i's dimension j in the blocked layout (see the file comment).
inline constexpr size_t Sq8BlockOffset(size_t i, size_t j, size_t dpad) {
  return (i / kSq8Block) * Sq8BlockBytes(dpad) + (j / 4) * 64 + (i % kSq8Block) * 4 + (j % 4);
}

struct Sq8Kernels {
  const char* name;  // "scalar", "avx2", "avx512vnni"
  // sum_j a[j] * b[j] over j < d: row-major codes against a query.
  int32_t (*dot_i8)(const uint8_t* a, const int8_t* b, size_t d);
  // For every key of `nblocks` blocks (blocked layout, dpad dims, dpad a
  // multiple of 4 and <= kMaxSq8Dim): out[i] = sum_j code(i, j) * q[j] for
  // i < nblocks * kSq8Block. q has dpad entries.
  void (*scan_sq8)(const int8_t* q, const uint8_t* blocks, size_t nblocks, size_t dpad,
                   int32_t* out);
  // scan_sq8 for nq queries at once (the VNNI table keeps up to
  // kSq8MaxMultiQueries in registers per pass and does more in groups of
  // that many; nq 0 does nothing): query t is the dpad bytes at
  // q + t * q_stride, its results go to out + t * out_stride (out_stride >=
  // nblocks * kSq8Block). Bit-identical to nq scan_sq8 calls.
  void (*scan_sq8_multi)(const int8_t* q, size_t q_stride, size_t nq, const uint8_t* blocks,
                         size_t nblocks, size_t dpad, int32_t* out, size_t out_stride);
  // Writes the positions i < n with v[i] >= t to idx in ascending order and
  // returns their count (idx holds n entries).
  size_t (*select_ge)(const int32_t* v, size_t n, int32_t t, uint32_t* idx);
};

// The table for the best ISA this CPU supports (or KVR_SIMD's choice).
const Sq8Kernels& ActiveSq8();
// Every table this CPU can run (scalar first), for tests; at most 3.
size_t AvailableSq8(const Sq8Kernels** out, size_t max);

// Writes the positions i in [begin, n) with v[i] >= t to idx (ascending) and
// returns their count: the scalar select_ge, and the SIMD ones' tail
// (defined in scan_sq8_scalar.cc, compiled for any x86-64).
size_t SelectGeFrom(const int32_t* v, size_t begin, size_t n, int32_t t, uint32_t* idx);

// Per-ISA tables (their own translation units); the AVX ones return null
// when not compiled in. Only call a table on a CPU that supports it.
const Sq8Kernels& ScalarSq8Kernels();
const Sq8Kernels* Avx2Sq8KernelsOrNull();
const Sq8Kernels* Avx512VnniSq8KernelsOrNull();

}  // namespace kvr::simd
