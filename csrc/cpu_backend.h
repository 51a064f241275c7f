#pragma once
#include "kernels/backend.h"

namespace ckd {
template <typename Acc>
KernelBackend<Acc>& cpu_backend();
}
