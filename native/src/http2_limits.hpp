// Limits on what one HTTP/2 client may make the server do, on top of what nghttp2 checks by
// itself, so that they hold whatever nghttp2 version the front end is built with. Free of
// nghttp2 and of Python; the I/O thread keeps one of each per connection (or per stream).
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>

namespace tachyon::grpc {

// Streams a client may reset per second on one connection. HTTP/2 rapid reset
// (CVE-2023-44487) opens and resets streams in a loop: each costs the server work and never
// counts against SETTINGS_MAX_CONCURRENT_STREAMS. Beyond this the connection gets
// GOAWAY(ENHANCE_YOUR_CALM) and is closed. nghttp2 >= 1.57 (and Debian's 1.52.0-1+deb12u1)
// also limits resets by itself, a token bucket of 1000 resets refilled at 33 per second that
// ends with GOAWAY(INTERNAL_ERROR); this one is stricter in bursts and works on every version.
inline constexpr std::uint32_t kMaxResetsPerSecond = 200;

// A request's header list, counted as SETTINGS_MAX_HEADER_LIST_SIZE counts it (RFC 9113 6.5.2:
// name + value + 32 per field), at most this many bytes and fields. A larger one is answered
// RESOURCE_EXHAUSTED without its fields being stored (grpc-core's hard limit is 16 KiB too).
inline constexpr std::size_t kMaxHeaderListBytes = 16 * 1024;
inline constexpr std::size_t kMaxHeaderFields = 100;
// CONTINUATION frames after one HEADERS frame. A CONTINUATION flood (CVE-2024-27316 and
// relatives) sends one endless header block; nghttp2 >= 1.61 stops at 8 by itself. Beyond this
// the connection is closed.
inline constexpr std::uint32_t kMaxContinuations = 8;

// Counts resets in fixed one-second windows.
class ResetRate {
 public:
  using Clock = std::chrono::steady_clock;

  // Records one reset; true when it is one too many.
  bool record(Clock::time_point now) {
    if (now - window_start_ >= std::chrono::seconds(1)) {
      window_start_ = now;
      count_ = 0;
    }
    return ++count_ > kMaxResetsPerSecond;
  }

 private:
  Clock::time_point window_start_{};
  std::uint32_t count_ = 0;
};

// One request's header list.
class HeaderList {
 public:
  // Counts one field; false once the list is over either limit (and from then on).
  bool add(std::size_t name_len, std::size_t value_len) {
    bytes_ += name_len + value_len + 32;
    ++fields_;
    over_ = over_ || bytes_ > kMaxHeaderListBytes || fields_ > kMaxHeaderFields;
    return !over_;
  }

  bool over() const { return over_; }

 private:
  std::size_t bytes_ = 0;
  std::size_t fields_ = 0;
  bool over_ = false;
};

}  // namespace tachyon::grpc
