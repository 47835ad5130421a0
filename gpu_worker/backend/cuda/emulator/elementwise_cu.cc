// elementwise.cu compiled by the host compiler against the emulator.
#include "gpu_worker/backend/cuda/elementwise.cu"
