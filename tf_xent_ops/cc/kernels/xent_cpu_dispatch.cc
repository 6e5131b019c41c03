/* Copyright 2026 The tf_xent_ops Authors. Licensed under the Apache
License 2.0.

Loads the CPU level's library the op library runs (xent_cpu_dispatch.h).
*/
#include "tf_xent_ops/cc/kernels/xent_cpu_dispatch.h"

#include <dlfcn.h>
#include <sys/stat.h>

#include <atomic>
#include <cstdlib>
#include <mutex>
#include <string>

#include "tf_xent_ops/cc/kernels/xent_cpu_levels.h"

namespace tf_xent_ops {
namespace {

bool CpuSupports(int level) {
  const std::string name = kCpuLevels[level].name;
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (name == "avx512bf16") {
    return __builtin_cpu_supports("x86-64-v4") &&
           __builtin_cpu_supports("avx512bf16");
  }
  if (name == "avx512") return __builtin_cpu_supports("x86-64-v4");
  if (name == "avx2") return __builtin_cpu_supports("x86-64-v3");
#endif
  // A native build runs where it was built; the baseline runs anywhere.
  return name == "native" || name == "baseline";
}

// The directory this library was loaded from, where the levels' libraries
// lie beside it.
std::string LibraryDirectory() {
  Dl_info info;
  if (dladdr(reinterpret_cast<void*>(&LibraryDirectory), &info) == 0 ||
      info.dli_fname == nullptr) {
    return ".";
  }
  const std::string path = info.dli_fname;
  const size_t slash = path.rfind('/');
  return slash == std::string::npos ? "." : path.substr(0, slash);
}

class CpuDispatch {
 public:
  static CpuDispatch& Get() {
    static CpuDispatch* dispatch = new CpuDispatch();  // Never destroyed.
    return *dispatch;
  }

  const CpuKernels* InUse(std::string* error) {
    if (const CpuKernels* kernels = in_use_.load(std::memory_order_acquire)) {
      return kernels;
    }
    std::lock_guard<std::mutex> lock(mu_);
    if (!chosen_) {
      chosen_ = true;
      const char* requested = std::getenv("TFXENT_CPU_ISA");
      std::string reason;
      if (!Use(requested ? requested : "", &reason)) error_ = reason;
    }
    if (error) *error = error_;
    return in_use_.load(std::memory_order_acquire);
  }

  // Switches to the level TFXENT_CPU_ISA=`requested` would choose.
  // A refused switch changes nothing, not even the first choice to come.
  bool Switch(const std::string& requested, std::string* error) {
    std::lock_guard<std::mutex> lock(mu_);
    if (!Use(requested, error)) return false;
    chosen_ = true;
    error_.clear();
    return true;
  }

  std::string Error() {
    std::lock_guard<std::mutex> lock(mu_);
    return error_;
  }

  const std::string& Available() {
    std::lock_guard<std::mutex> lock(mu_);
    if (available_.empty()) {
      available_ = internal::LevelList(
          [this](int i) { return Built(i) && CpuSupports(i); });
    }
    return available_;
  }

 private:
  CpuDispatch() : directory_(LibraryDirectory()) {}

  std::string LibraryOf(int level) const {
    return directory_ + "/_xent_cpu_" + kCpuLevels[level].name + ".so";
  }

  bool Built(int level) const {
    struct stat info;
    return stat(LibraryOf(level).c_str(), &info) == 0;
  }

  bool Use(const std::string& requested, std::string* error) {
    const CpuLevelChoice choice = ChooseCpuLevel(
        requested, [this](int i) { return Built(i); }, CpuSupports);
    if (choice.level < 0) {
      *error = choice.error;
      return false;
    }
    const CpuKernels* kernels = Load(choice.level, error);
    if (kernels == nullptr) return false;
    in_use_.store(kernels, std::memory_order_release);
    return true;
  }

  // Each level's library is loaded once and kept: a switch must not unload
  // code another thread may still be running. RTLD_LOCAL: its symbols
  // resolve nothing else.
  const CpuKernels* Load(int level, std::string* error) {
    if (loaded_[level] != nullptr) return loaded_[level];
    const std::string path = LibraryOf(level);
    void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (handle == nullptr) {
      *error = "could not load " + path + ": " + dlerror();
      return nullptr;
    }
    const auto entry = reinterpret_cast<CpuKernelsEntryPoint>(
        dlsym(handle, TFXENT_CPU_KERNELS_SYMBOL));
    const CpuKernels* kernels = entry ? entry() : nullptr;
    if (kernels == nullptr || !kernels->Matches(kCpuLevels[level].name)) {
      *error = path + " is not from this build of tf_xent_ops: reinstall it";
      return nullptr;
    }
    loaded_[level] = kernels;
    return kernels;
  }

  const std::string directory_;
  std::mutex mu_;
  bool chosen_ = false;
  std::string error_;
  std::string available_;
  std::atomic<const CpuKernels*> in_use_{nullptr};
  const CpuKernels* loaded_[kNumCpuLevels] = {};
};

}  // namespace

const CpuKernels* CpuKernelsInUse(std::string* error) {
  return CpuDispatch::Get().InUse(error);
}

}  // namespace tf_xent_ops

extern "C" {

const char* TfXentCpuIsa() {
  const tf_xent_ops::CpuKernels* kernels =
      tf_xent_ops::CpuKernelsInUse(nullptr);
  return kernels ? kernels->level : nullptr;
}

const char* TfXentCpuIsaError() {
  static thread_local std::string error;
  error = tf_xent_ops::CpuDispatch::Get().Error();
  return error.c_str();
}

const char* TfXentCpuIsasAvailable() {
  return tf_xent_ops::CpuDispatch::Get().Available().c_str();
}

const char* TfXentUseCpuIsa(const char* level) {
  static thread_local std::string error;
  return tf_xent_ops::CpuDispatch::Get().Switch(level ? level : "", &error)
             ? nullptr
             : error.c_str();
}

}  // extern "C"
