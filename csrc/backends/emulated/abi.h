// The ABI number _C and _emulated compare before sharing a backend (backends.h: EmulatedBackendTable): the digest of
// the kernel interface's headers, which the build (tools/build_config.py) passes to both modules' compilations, so
// that a stale _emulated built from other headers is refused at load; nothing to bump by hand.
#pragma once
#include <cstdint>

#ifndef CKD_KERNEL_INTERFACE_DIGEST
#error "build ckd_ext with tools/build_config.py's flags (setup.py or CMakeLists.txt): CKD_KERNEL_INTERFACE_DIGEST"
#endif

namespace ckd {
constexpr int64_t kEmulatedBackendAbi = CKD_KERNEL_INTERFACE_DIGEST;
static_assert(kEmulatedBackendAbi > 0, "the kernel interface digest is a positive 60-bit number");
}  // namespace ckd
