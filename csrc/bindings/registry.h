// Each op's binding file registers itself here, so adding an op touches no shared file.
#pragma once
#include <torch/extension.h>

namespace skd {

using Binder = void (*)(pybind11::module_&);

// Called from a static initialiser in each binding file; runs at load, before PyInit.
void register_binding(Binder binder);

struct BindingRegistration {
  explicit BindingRegistration(Binder binder) { register_binding(binder); }
};

}  // namespace skd
