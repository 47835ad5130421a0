// Runs one kernel grid on the calling host thread: blocks one after another,
// the threads of a block as fibers switched at __syncthreads() and warp
// shuffles (the emulator's execution model; see cuda_emulator.h).
#pragma once

#include <functional>
#include <string>

#include "gpu_worker/backend/cuda/emulator/cuda_emulator.h"

namespace kvr::cuda_emu {

// Runs `body` once per thread of config's grid. Returns an empty string when
// every thread finished, else what went wrong (divergent barrier, shuffle
// with exited lanes, unsupported shuffle mask or width), naming the kernel,
// block and threads; the grid stops at the first such block. The launch
// shape must already be valid (EnqueueLaunch checks it). Not reentrant: one
// grid at a time per process (the caller holds the emulator's lock).
std::string RunGrid(const LaunchConfig& config, const std::function<void()>& body);

}  // namespace kvr::cuda_emu
