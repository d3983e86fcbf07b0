// The table of kernels for an instruction-set level, chosen once from the CPU's features.
// A level's folder that was not built (another architecture, or its compiler flags failed)
// leaves its entry point undefined: the weak declarations below are then null.
#include "kernels.h"

namespace torchchat::cpu {

namespace avx512 {
__attribute__((weak)) const Kernels* kernels(bool bf16, bool vnni);
}
namespace avx2 {
__attribute__((weak)) const Kernels* kernels();
}

namespace {

struct CpuFeatures {
  bool avx512 = false;       // F, BW, VL, DQ (+ FMA, F16C)
  bool avx512_bf16 = false;
  bool avx512_vnni = false;  // with VBMI
  bool avx2 = false;         // with FMA and F16C
};

CpuFeatures cpu_features() {
  CpuFeatures f;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  f.avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  f.avx512_bf16 = f.avx512 && __builtin_cpu_supports("avx512bf16");
  f.avx512_vnni = f.avx512 && __builtin_cpu_supports("avx512vnni") &&
                  __builtin_cpu_supports("avx512vbmi");
  f.avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
#endif
  return f;
}

}  // namespace

const Kernels* select_kernels(const std::string& level) {
  static const CpuFeatures cpu = cpu_features();
  if (level == "scalar") return &scalar_kernels();
  if (level == "avx512" && avx512::kernels != nullptr && cpu.avx512)
    return avx512::kernels(cpu.avx512_bf16, cpu.avx512_vnni);
  if (level == "avx2" && avx2::kernels != nullptr && cpu.avx2) return avx2::kernels();
  return nullptr;  // neon: a folder to come
}

std::vector<std::string> levels() {
  std::vector<std::string> out;
  for (const char* level : {"avx512", "avx2", "neon", "scalar"})
    if (select_kernels(level) != nullptr) out.push_back(level);
  return out;
}

}  // namespace torchchat::cpu
