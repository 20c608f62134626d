// How many request bytes the gRPC front end may hold for the application: messages still
// arriving plus complete ones the application has not taken yet, per connection and in total.
// A connection over its budget is not refused: it stops being read (its socket leaves EPOLLIN)
// until the application drains, so TCP holds the client back. Free of nghttp2 and of Python.
#pragma once

#include <algorithm>
#include <cstddef>

namespace tachyon::grpc {

struct BudgetLimits {
  std::size_t per_connection = 0;  // one connection holds at most about this much
  std::size_t total = 0;           // every connection together
  // A connection holding no more than this may read even while the total is spent (up to
  // twice the total, a hard ceiling), so small calls keep flowing beside clients that fill the
  // total with large or stalled messages.
  std::size_t floor = 0;
};

// The limits for a server whose messages are at most `max_message` bytes: one connection may
// hold two whole messages, the server four (at least 256 MiB), and every connection 1 MiB.
inline BudgetLimits default_budget(std::size_t max_message) {
  constexpr std::size_t kMiB = std::size_t{1} << 20;
  BudgetLimits limits;
  limits.total = std::max<std::size_t>(256 * kMiB, 4 * max_message);
  limits.per_connection = std::min(limits.total, std::max<std::size_t>(16 * kMiB, 2 * max_message));
  limits.floor = kMiB;
  return limits;
}

// The running total; each connection keeps its own count (`held`) and passes it in. Owned by
// the I/O thread.
class RequestBudget {
 public:
  explicit RequestBudget(BudgetLimits limits) : limits_(limits) {}

  void add(std::size_t& held, std::size_t n) {
    held += n;
    total_ += n;
  }

  // Gives back `n` bytes a connection held (its count is clamped at zero).
  void release(std::size_t& held, std::size_t n) {
    n = std::min(n, held);
    held -= n;
    total_ -= n;
  }

  // Gives back bytes of a connection that is gone (only the total holds them still).
  void release_orphaned(std::size_t n) { total_ -= std::min(n, total_); }

  // Whether a connection holding `held` bytes may read more. Asked before every read, so the
  // total stays under twice limits().total plus one read.
  bool may_read(std::size_t held) const {
    if (held > limits_.per_connection) {
      return false;
    }
    if (total_ <= limits_.total) {
      return true;
    }
    return held <= limits_.floor && total_ <= 2 * limits_.total;
  }

  std::size_t total() const { return total_; }
  const BudgetLimits& limits() const { return limits_; }

 private:
  BudgetLimits limits_;
  std::size_t total_ = 0;
};

}  // namespace tachyon::grpc
