// The KServe v2 / Triton BYTES wire format, free of any Python dependency: every element is a
// 4-byte little-endian uint32 length followed by that many bytes, elements back to back.
#pragma once

#include "spans.hpp"

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace tachyon::bytes_wire {

inline constexpr std::size_t kPrefixBytes = 4;
inline constexpr std::size_t kMaxElementBytes = UINT32_MAX;

inline std::uint32_t load_le32(const unsigned char* p) {
  return static_cast<std::uint32_t>(p[0]) | (static_cast<std::uint32_t>(p[1]) << 8) |
         (static_cast<std::uint32_t>(p[2]) << 16) | (static_cast<std::uint32_t>(p[3]) << 24);
}

inline void store_le32(unsigned char* p, std::uint32_t v) {
  p[0] = static_cast<unsigned char>(v);
  p[1] = static_cast<unsigned char>(v >> 8);
  p[2] = static_cast<unsigned char>(v >> 16);
  p[3] = static_cast<unsigned char>(v >> 24);
}

enum class ScanStatus {
  kOk,
  kMissingElements,  // buffer ended on a boundary before `count` elements
  kShortPrefix,      // fewer than 4 bytes left where a length prefix should start
  kOverrun,          // a length prefix declares more bytes than remain
  kTrailing,         // bytes left after `count` elements
};

struct ScanResult {
  ScanStatus status = ScanStatus::kOk;
  std::size_t elements = 0;       // elements parsed successfully
  std::size_t payload_bytes = 0;  // sum of their sizes
  // Details of the failure (meaning depends on status; see describe()).
  std::size_t offset = 0;
  std::size_t declared = 0;
  std::size_t remaining = 0;
};

// Parses `len` bytes at `data` as exactly `count` elements, or, for count < 0, as many elements
// as the buffer holds (it must then end exactly on an element boundary). Every length is checked
// against the bytes that remain before it is used. Appends each element's Span to `spans` when
// it is not null. Touches no Python object, so it may run with the GIL released.
inline ScanResult scan(const unsigned char* data, std::size_t len, std::int64_t count,
                       std::vector<Span>* spans) {
  ScanResult r;
  const bool until_end = count < 0;
  const auto wanted = static_cast<std::uint64_t>(until_end ? 0 : count);
  std::size_t pos = 0;
  while (until_end ? pos < len : r.elements < wanted) {
    const std::size_t left = len - pos;
    if (left < kPrefixBytes) {
      r.status = left == 0 ? ScanStatus::kMissingElements : ScanStatus::kShortPrefix;
      r.offset = pos;
      r.remaining = left;
      return r;
    }
    const std::size_t size = load_le32(data + pos);
    const std::size_t start = pos + kPrefixBytes;
    if (size > len - start) {
      r.status = ScanStatus::kOverrun;
      r.offset = start;
      r.declared = size;
      r.remaining = len - start;
      return r;
    }
    if (spans != nullptr) {
      spans->push_back(Span{start, size});
    }
    r.payload_bytes += size;
    pos = start + size;
    ++r.elements;
  }
  if (pos != len) {
    r.status = ScanStatus::kTrailing;
    r.offset = pos;
    r.remaining = len - pos;
  }
  return r;
}

// The ValueError message for a failed scan of a `len`-byte buffer; mirrored exactly by
// tests/native_reference.py.
inline std::string describe(const ScanResult& r, std::int64_t count, std::size_t len) {
  using std::to_string;
  const std::string index = to_string(r.elements);
  switch (r.status) {
    case ScanStatus::kOk:
      return "ok";
    case ScanStatus::kMissingElements:
      return "expected " + to_string(count) + " elements but only " + index + " fit in " +
             to_string(len) + " bytes";
    case ScanStatus::kShortPrefix:
      return "element " + index + " needs a 4-byte length prefix at offset " +
             to_string(r.offset) + " but only " + to_string(r.remaining) + " bytes remain";
    case ScanStatus::kOverrun:
      return "element " + index + " declares " + to_string(r.declared) + " bytes at offset " +
             to_string(r.offset) + " but only " + to_string(r.remaining) + " remain";
    case ScanStatus::kTrailing:
      return to_string(r.remaining) + " trailing bytes after " + index + " elements";
  }
  return "malformed BYTES buffer";
}

}  // namespace tachyon::bytes_wire
