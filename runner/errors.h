#pragma once

#include <stdexcept>
#include <string>

namespace runner {

// A problem the user can fix (bad flag, missing or malformed file): printed as one line
// "error: ..." and turned into an exit code, never an abort.
class RunnerError : public std::runtime_error {
 public:
  explicit RunnerError(const std::string& msg, int exit_code = 1)
      : std::runtime_error(msg), exit_code(exit_code) {}
  int exit_code;
};

constexpr int kExitUsage = 2;  // bad command line
constexpr int kExitFailure = 1;  // bad file or runtime failure

}  // namespace runner
