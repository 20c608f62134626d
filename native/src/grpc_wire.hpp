// The gRPC-over-HTTP/2 message framing and status encoding, free of any Python or nghttp2
// dependency: every message on a call's DATA frames is a 1-byte compressed flag, a 4-byte
// big-endian length, then that many bytes; the call ends with trailers carrying grpc-status and
// a percent-encoded grpc-message (https://github.com/grpc/grpc/blob/master/doc/PROTOCOL-HTTP2.md).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace tachyon::grpc_wire {

inline constexpr std::size_t kPrefixBytes = 5;

// The gRPC status codes this front end produces by itself.
inline constexpr int kOk = 0;
inline constexpr int kInternal = 13;
inline constexpr int kResourceExhausted = 8;
inline constexpr int kUnimplemented = 12;

// Writes the 5-byte prefix of an uncompressed message of `size` bytes at `out`.
inline void write_prefix(char* out, std::uint32_t size) {
  out[0] = 0;
  out[1] = static_cast<char>(size >> 24);
  out[2] = static_cast<char>(size >> 16);
  out[3] = static_cast<char>(size >> 8);
  out[4] = static_cast<char>(size);
}

// A message with its prefix, ready for the wire.
inline std::string frame(const char* data, std::uint32_t size) {
  char prefix[kPrefixBytes];
  write_prefix(prefix, size);
  std::string out;
  out.reserve(kPrefixBytes + size);
  out.append(prefix, kPrefixBytes);
  out.append(data, size);
  return out;
}

// grpc-message is percent-encoded: bytes outside printable ASCII, and '%' itself, become %XX.
inline std::string percent_encode(const std::string& text) {
  static constexpr char kHex[] = "0123456789ABCDEF";
  std::string out;
  out.reserve(text.size());
  for (const char ch : text) {
    const auto c = static_cast<unsigned char>(ch);
    if (c >= 0x20 && c <= 0x7e && c != '%') {
      out.push_back(ch);
    } else {
      out.push_back('%');
      out.push_back(kHex[c >> 4]);
      out.push_back(kHex[c & 0xf]);
    }
  }
  return out;
}

// A failure found while reading a call's messages: a gRPC status code and its message.
struct ReadError {
  int code = kOk;
  std::string message;
  explicit operator bool() const { return code != kOk; }
};

// Splits the DATA bytes of one call into messages, fed in arbitrary pieces. Every declared length
// is checked against the limit before a byte of the message is buffered, so an oversized or
// hostile length never allocates.
class MessageReader {
 public:
  explicit MessageReader(std::size_t max_message_bytes) : max_(max_message_bytes) {}

  // Consumes `len` bytes; calls on_message(std::string&&) for every message completed. Stops at
  // the first error, which it returns (later calls keep returning it).
  template <class OnMessage>
  ReadError feed(const std::uint8_t* data, std::size_t len, OnMessage&& on_message) {
    while (len > 0 && !error_) {
      if (prefix_have_ < kPrefixBytes) {
        const std::size_t n = len < kPrefixBytes - prefix_have_ ? len : kPrefixBytes - prefix_have_;
        for (std::size_t i = 0; i < n; ++i) {
          prefix_[prefix_have_++] = data[i];
        }
        data += n;
        len -= n;
        if (prefix_have_ == kPrefixBytes) {
          begin_message();
          if (!error_ && need_ == 0) {
            finish_message(on_message);
          }
        }
        continue;
      }
      const std::size_t n = len < need_ ? len : need_;
      message_.append(reinterpret_cast<const char*>(data), n);
      data += n;
      len -= n;
      need_ -= n;
      if (need_ == 0) {
        finish_message(on_message);
      }
    }
    return error_;
  }

  // True between messages: the bytes fed so far end exactly on a message boundary.
  bool at_boundary() const { return prefix_have_ == 0; }

 private:
  void begin_message() {
    const std::uint8_t flag = prefix_[0];
    const std::size_t size = (static_cast<std::size_t>(prefix_[1]) << 24) |
                             (static_cast<std::size_t>(prefix_[2]) << 16) |
                             (static_cast<std::size_t>(prefix_[3]) << 8) |
                             static_cast<std::size_t>(prefix_[4]);
    if (flag == 1) {
      error_ = {kUnimplemented, "compression is not supported: send uncompressed messages"};
      return;
    }
    if (flag != 0) {
      error_ = {kInternal, "malformed gRPC message: compressed flag is " + std::to_string(flag) +
                               ", expected 0 or 1"};
      return;
    }
    if (size > max_) {
      // The wording of grpc-core's own check, which clients and tests already recognise.
      error_ = {kResourceExhausted, "Received message larger than max (" + std::to_string(size) +
                                        " vs. " + std::to_string(max_) + ")"};
      return;
    }
    need_ = size;
    message_.clear();
    message_.reserve(size);
  }

  template <class OnMessage>
  void finish_message(OnMessage& on_message) {
    prefix_have_ = 0;
    on_message(std::move(message_));
    message_ = std::string();
  }

  std::size_t max_;
  std::uint8_t prefix_[kPrefixBytes] = {};
  std::size_t prefix_have_ = 0;
  std::size_t need_ = 0;  // bytes of the current message still to come
  std::string message_;
  ReadError error_;
};

}  // namespace tachyon::grpc_wire
