// Prophet optional native code: device-driven expert copies.
//
// copy_slots: one launch copies a list of (src, dst, bytes) regions, e.g. experts from pinned
// host memory (read zero-copy through unified addressing) into slots of the paged GPU buffer, or
// slot to slot. One thread block per region, 16-byte vector loads where both ends are aligned.
// Later issues drive it from the device (page-table misses) so that a decode step stays inside
// one CUDA graph; today it is a building block with a C ABI loaded through ctypes
// (prophet_kernels/native.py). The Python package never requires it.

#include <cuda_runtime.h>
#include <stdint.h>

namespace {

__global__ void copy_slots_kernel(const char* const* __restrict__ src,
                                  char* const* __restrict__ dst,
                                  const int64_t* __restrict__ bytes) {
  const int r = blockIdx.x;
  const char* s = src[r];
  char* d = dst[r];
  const int64_t n = bytes[r];
  const bool vec = ((reinterpret_cast<uintptr_t>(s) | reinterpret_cast<uintptr_t>(d)) & 15) == 0;
  int64_t done = 0;
  if (vec) {
    const int64_t nv = n / 16;
    const int4* s4 = reinterpret_cast<const int4*>(s);
    int4* d4 = reinterpret_cast<int4*>(d);
    for (int64_t i = threadIdx.x; i < nv; i += blockDim.x) d4[i] = s4[i];
    done = nv * 16;
  }
  for (int64_t i = done + threadIdx.x; i < n; i += blockDim.x) d[i] = s[i];
}

}  // namespace

extern "C" {

int prophet_native_abi_version() { return 1; }

// src, dst, bytes: device-accessible arrays of num_regions entries. Returns a cudaError_t.
int prophet_copy_slots(const void* src, const void* dst, const void* bytes, int num_regions,
                       void* stream) {
  if (num_regions <= 0) return 0;
  copy_slots_kernel<<<num_regions, 512, 0, static_cast<cudaStream_t>(stream)>>>(
      static_cast<const char* const*>(src), static_cast<char* const*>(dst),
      static_cast<const int64_t*>(bytes));
  return static_cast<int>(cudaGetLastError());
}

}  // extern "C"
