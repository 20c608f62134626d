// Plain (Python-free) descriptions of byte ranges and the copy loops over them.
#pragma once

#include <cstddef>
#include <cstring>
#include <vector>

namespace tachyon {

// Bytes somewhere in memory, borrowed from an owner that outlives every use.
struct ByteRange {
  const unsigned char* data;
  std::size_t size;
};

// Bytes at an offset inside one buffer that the caller holds.
struct Span {
  std::size_t offset;
  std::size_t size;
};

// Copies `ranges` back to back into `out`, which must hold at least their total size and must
// not overlap any of them.
inline void copy_ranges(const std::vector<ByteRange>& ranges, unsigned char* out) {
  for (const ByteRange& r : ranges) {
    if (r.size != 0) {
      std::memcpy(out, r.data, r.size);
      out += r.size;
    }
  }
}

// Same as copy_ranges, but well defined when a range overlaps `out`.
inline void move_ranges(const std::vector<ByteRange>& ranges, unsigned char* out) {
  for (const ByteRange& r : ranges) {
    if (r.size != 0) {
      std::memmove(out, r.data, r.size);
      out += r.size;
    }
  }
}

}  // namespace tachyon
