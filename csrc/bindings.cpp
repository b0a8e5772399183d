// The extension's module. Each op's binding file, bindings/<op>_binding.cpp (the suffix because
// torch names object files by basename), registers a function that adds its entry points; the module
// runs them all. Shapes, dtypes and devices are validated in Python before dispatch; the checks in the
// binding files only guard the pointer arithmetic.
#include <vector>

#include "bindings/registry.h"

namespace skd {
namespace {
std::vector<Binder>& binders() {
  static std::vector<Binder> all;  // function-local: safe to use from other files' static initialisers
  return all;
}
}  // namespace

void register_binding(Binder binder) { binders().push_back(binder); }

}  // namespace skd

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  for (skd::Binder bind : skd::binders()) bind(m);
}
