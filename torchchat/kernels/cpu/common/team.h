// A team of threads that runs a whole decode step as one parallel region. A step of stories110M
// runs ~60 parallel loops (5 a layer); as at::parallel_for calls each paid the thread pool's
// fork and join: ~2 us back to back on an idle 2-core AMD EPYC, 13-42 us with another process
// busy, against 0.2 us (idle) to 1.6 us (busy) for the spin barrier here. The team's members
// all run the step's code: `team_for` (a ParallelFor) gives each its share of a loop and waits
// for the others, and `team_one` runs the small serial parts (norms, RoPE, the cache write,
// residual adds) on member 0 while the others wait. Outside a team both run as serial code.
#pragma once

#include <atomic>
#include <functional>
#include <thread>

#include "kernels.h"

namespace torchchat::cpu {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

class Team {
 public:
  // Every member waits until all `size` have arrived (a generation counter: reusable at once).
  void sync(int size) {
    const int gen = generation_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) == size - 1) {
      arrived_.store(0, std::memory_order_relaxed);
      generation_.store(gen + 1, std::memory_order_release);
      return;
    }
    for (int spins = 0; generation_.load(std::memory_order_acquire) == gen; ++spins) {
      if (spins < (1 << 16)) cpu_relax();
      else std::this_thread::yield();  // a member descheduled: do not burn its core
    }
  }

 private:
  std::atomic<int> arrived_{0}, generation_{0};
};

// The team this thread runs in, as member `id` of `size` (size 1: no team).
struct Membership {
  Team* team = nullptr;
  int id = 0, size = 1;
};
inline thread_local Membership t_member;

// Joins this thread to a team for its lifetime.
class Member {
 public:
  Member(Team& team, int id, int size) : saved_(t_member) { t_member = {&team, id, size}; }
  ~Member() { t_member = saved_; }

 private:
  Membership saved_;
};

// ParallelFor of a team's members (each calls it alike): member i runs its share of [0, n) --
// at::parallel_for's split: min(size, ceil(n / grain)) shares of ceil(n / shares) -- then all
// wait, so the results are there for every member.
inline void team_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& f) {
  const Membership m = t_member;
  if (m.size <= 1) {
    if (n > 0) f(0, n);
    return;
  }
  const int64_t shares = std::min<int64_t>(m.size, (n + grain - 1) / std::max<int64_t>(grain, 1));
  const int64_t chunk = shares > 0 ? (n + shares - 1) / shares : 0;
  if (m.id < shares) {
    const int64_t b = m.id * chunk, e = std::min(n, b + chunk);
    if (b < e) f(b, e);
  }
  m.team->sync(m.size);
}

// f on member 0 of the team, then all wait.
inline void team_one(const std::function<void()>& f) {
  const Membership m = t_member;
  if (m.id == 0) f();
  if (m.size > 1) m.team->sync(m.size);
}

// Runs body(id, size) on `size` threads at once, or fewer (size the number that run).
using RunTeam = void (*)(int size, const std::function<void(int id, int size)>& body);

}  // namespace torchchat::cpu
