// Conditional release of the GIL around byte loops.
#pragma once

#include <nanobind/nanobind.h>

#include <cstddef>
#include <optional>

namespace tachyon {

namespace nb = nanobind;

// Byte loops that move at least this many bytes run with the GIL released. Below it the copy
// takes well under a microsecond, less than a release/re-acquire round trip can cost when
// another thread holds the GIL (re-acquiring waits up to the interpreter's switch interval).
inline constexpr std::size_t kGilReleaseBytes = 64 * 1024;

// Releases the GIL for its lifetime when `release` is true; re-acquires it on destruction.
// No Python API may be used while one that released is alive.
class ReleaseGilIf {
 public:
  explicit ReleaseGilIf(bool release) {
    if (release) {
      released_.emplace();
    }
  }

  ReleaseGilIf(const ReleaseGilIf&) = delete;
  ReleaseGilIf& operator=(const ReleaseGilIf&) = delete;

 private:
  std::optional<nb::gil_scoped_release> released_;
};

// Whether a loop over `bytes` bytes should release the GIL.
inline bool worth_releasing_gil(std::size_t bytes) { return bytes >= kGilReleaseBytes; }

}  // namespace tachyon
