// The shared orchestration, with the CUDA kernels (under the CPU emulator) as the backend of CPU tensors.
#define CKD_EMULATED 1
#include "../losses.cpp"
