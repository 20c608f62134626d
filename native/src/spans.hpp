// Plain (Python-free) descriptions of byte ranges.
#pragma once

#include <cstddef>

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

}  // namespace tachyon
