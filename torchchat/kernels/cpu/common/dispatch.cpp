// The table of kernels for an instruction-set level, chosen once from the CPU's features.
// A level's folder that was not built (another architecture, or its compiler flags failed)
// leaves its entry point undefined: the weak declarations below are then null.
#include "kernels.h"

#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
// The kernel's AArch64 hwcap bits (a stable ABI), for C libraries whose headers predate them.
#ifndef HWCAP_FPHP
#define HWCAP_FPHP (1 << 9)
#endif
#ifndef HWCAP_ASIMDHP
#define HWCAP_ASIMDHP (1 << 10)
#endif
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif
#ifndef HWCAP2_I8MM
#define HWCAP2_I8MM (1 << 13)
#endif
#ifndef HWCAP2_BF16
#define HWCAP2_BF16 (1 << 14)
#endif
#elif defined(__aarch64__) && defined(__APPLE__)
#include <sys/sysctl.h>
#endif

namespace torchchat::cpu {

namespace avx512 {
__attribute__((weak)) const Kernels* kernels(bool bf16, bool vnni, const Kernels* fill);
}
namespace avx2 {
__attribute__((weak)) const Kernels* kernels();
}
namespace neon {
__attribute__((weak)) const Kernels* kernels(bool i8mm, bool bf16);
}

namespace {

struct CpuFeatures {
  bool avx512 = false;       // F, BW, VL, DQ (+ FMA, F16C)
  bool avx512_bf16 = false;
  bool avx512_vnni = false;  // with VBMI
  bool avx2 = false;         // with FMA and F16C
  bool neon = false;         // AArch64 Advanced SIMD with FEAT_FP16 and FEAT_DotProd
  bool neon_i8mm = false;
  bool neon_bf16 = false;
};

#if defined(__aarch64__) && defined(__APPLE__)
bool sysctl_flag(const char* name) {  // hw.optional.arm.FEAT_*: 1 if present, absent if not
  int value = 0;
  size_t size = sizeof value;
  return sysctlbyname(name, &value, &size, nullptr, 0) == 0 && value != 0;
}
#endif

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
#elif defined(__aarch64__) && defined(__linux__)
  const unsigned long hw = getauxval(AT_HWCAP), hw2 = getauxval(AT_HWCAP2);
  f.neon = (hw & HWCAP_FPHP) && (hw & HWCAP_ASIMDHP) && (hw & HWCAP_ASIMDDP);
  f.neon_i8mm = f.neon && (hw2 & HWCAP2_I8MM);
  f.neon_bf16 = f.neon && (hw2 & HWCAP2_BF16);
#elif defined(__aarch64__) && defined(__APPLE__)  // every Apple M chip has FP16 and DotProd
  f.neon = sysctl_flag("hw.optional.arm.FEAT_FP16") && sysctl_flag("hw.optional.arm.FEAT_DotProd");
  f.neon_i8mm = f.neon && sysctl_flag("hw.optional.arm.FEAT_I8MM");
  f.neon_bf16 = f.neon && sysctl_flag("hw.optional.arm.FEAT_BF16");
#endif
  return f;
}

}  // namespace

const Kernels* select_kernels(const std::string& level) {
  static const CpuFeatures cpu = cpu_features();
  if (level == "scalar") return &scalar_kernels();
  if (level == "avx512" && avx512::kernels != nullptr && cpu.avx512)  // AVX2's fill its gaps
    return avx512::kernels(cpu.avx512_bf16, cpu.avx512_vnni, select_kernels("avx2"));
  if (level == "avx2" && avx2::kernels != nullptr && cpu.avx2) return avx2::kernels();
  if (level == "neon" && neon::kernels != nullptr && cpu.neon)
    return neon::kernels(cpu.neon_i8mm, cpu.neon_bf16);
  return nullptr;
}

std::vector<std::string> levels() {
  std::vector<std::string> out;
  for (const char* level : {"avx512", "avx2", "neon", "scalar"})
    if (select_kernels(level) != nullptr) out.push_back(level);
  return out;
}

}  // namespace torchchat::cpu
