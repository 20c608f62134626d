// Keepalive and PING policy of one HTTP/2 connection, with grpc-core's server semantics and
// Triton's flag names (--grpc-keepalive-time, ...; https://github.com/grpc/grpc/blob/master/doc/
// keepalive.md). Free of nghttp2 and of Python: the I/O thread asks it what to do and sends.
//
// Sending: keepalive-time after the client was last heard from, a PING; no acknowledgement (nor
// any other byte) within keepalive-timeout closes the connection. Without calls in flight no
// PING is sent unless permit-without-calls; after max-pings-without-data PINGs with no HEADERS
// or DATA sent in between, none either (0: no such limit).
//
// Receiving: a client PING sooner than min-recv-ping-interval-without-data after the previous
// one (2 hours on a connection without calls unless permit-without-calls) is a strike; more than
// max-ping-strikes strikes (0: any number) earn GOAWAY(ENHANCE_YOUR_CALM, "too_many_pings").
// Sending HEADERS or DATA forgives every strike.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>

namespace tachyon::grpc {

struct KeepaliveOptions {
  std::chrono::milliseconds time{7'200'000};  // Triton's defaults, which are grpc-core's
  std::chrono::milliseconds timeout{20'000};
  bool permit_without_calls = false;
  int max_pings_without_data = 2;
  std::chrono::milliseconds min_recv_ping_interval_without_data{300'000};
  int max_ping_strikes = 2;

  // How often the I/O thread looks for due PINGs and missed acknowledgements.
  std::chrono::milliseconds sweep_period() const {
    const auto shortest = std::min(time, timeout) / 4;
    return std::clamp(shortest, std::chrono::milliseconds(10), std::chrono::milliseconds(1000));
  }
};

class Keepalive {
 public:
  using Clock = std::chrono::steady_clock;
  enum class Due { kNothing, kPing, kDead };

  Keepalive(const KeepaliveOptions& options, Clock::time_point now)
      : options_(&options), next_ping_(now + options.time) {}

  // The client sent something: it is alive (an outstanding PING counts as answered).
  void heard(Clock::time_point now) {
    outstanding_ = false;
    next_ping_ = now + options_->time;
  }

  // What the connection needs now; `has_calls`: streams are open on it.
  Due due(Clock::time_point now, bool has_calls) {
    if (outstanding_) {
      return now >= ack_deadline_ ? Due::kDead : Due::kNothing;
    }
    if (now < next_ping_) {
      return Due::kNothing;
    }
    const bool allowed = has_calls || options_->permit_without_calls;
    const int most = options_->max_pings_without_data;
    if (!allowed || (most > 0 && pings_without_data_ >= most)) {
      next_ping_ = now + options_->time;  // asked again later
      return Due::kNothing;
    }
    return Due::kPing;
  }

  void ping_sent(Clock::time_point now) {
    outstanding_ = true;
    ack_deadline_ = now + options_->timeout;
    ++pings_without_data_;
  }

  // HEADERS or DATA went to the client.
  void sent_data() {
    pings_without_data_ = 0;
    strikes_ = 0;
    heard_ping_ = false;
  }

  // A PING from the client; true when it is one strike too many.
  bool received_ping(Clock::time_point now, bool has_calls) {
    const bool idle = !has_calls && !options_->permit_without_calls;
    const auto interval =
        idle ? std::chrono::milliseconds(std::chrono::hours(2)) :
               options_->min_recv_ping_interval_without_data;
    const bool too_soon = heard_ping_ && now < last_ping_ + interval;
    heard_ping_ = true;
    last_ping_ = now;
    if (!too_soon) {
      return false;
    }
    ++strikes_;
    return options_->max_ping_strikes != 0 && strikes_ > options_->max_ping_strikes;
  }

 private:
  const KeepaliveOptions* options_;
  Clock::time_point next_ping_;
  Clock::time_point ack_deadline_{};
  bool outstanding_ = false;
  int pings_without_data_ = 0;
  bool heard_ping_ = false;
  Clock::time_point last_ping_{};
  int strikes_ = 0;
};

}  // namespace tachyon::grpc
