// Included first by the files whose float arithmetic must round as written (the GGUF blocks'
// dequantization, bit-equal to ggml's): products rounded before they are added, no fused
// multiply-adds unless written as such (an FMA intrinsic), whatever the compiler's default
// (GCC contracts `a * b - c` in its gnu++ modes, clang by default).
#pragma once

#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif
