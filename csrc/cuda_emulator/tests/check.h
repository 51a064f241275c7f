// Minimal checking for the emulator self-tests (no test framework dependency).
#pragma once

#include <cstdio>
#include <cstdlib>

namespace ckd_check {
inline int& failures() {
  static int n = 0;
  return n;
}
inline int finish(const char* name) {
  if (failures() != 0) {
    std::fprintf(stderr, "%s: %d check(s) failed\n", name, failures());
    return 1;
  }
  std::printf("%s: all checks passed\n", name);
  return 0;
}
}  // namespace ckd_check

// Reports (at most 20 of) the failing checks and keeps going, so one run shows the whole picture.
#define CKD_CHECK(cond, ...)                                                 \
  do {                                                                       \
    if (!(cond)) {                                                           \
      if (++::ckd_check::failures() <= 20) {                                 \
        std::fprintf(stderr, "%s:%d: check failed: %s: ", __FILE__, __LINE__, #cond); \
        std::fprintf(stderr, __VA_ARGS__);                                   \
        std::fprintf(stderr, "\n");                                          \
      }                                                                      \
    }                                                                        \
  } while (0)
