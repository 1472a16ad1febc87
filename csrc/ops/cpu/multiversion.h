// Hot CPU loops are compiled for AVX-512, AVX2+FMA and a baseline; the loader
// picks the best for the running CPU (GCC function multi-versioning).
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(AUDITKIT_NO_TARGET_CLONES)
#define AUDITKIT_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define AUDITKIT_MULTIVERSION
#endif
