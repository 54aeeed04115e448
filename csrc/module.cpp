// Limited-API stub: the kernels register themselves with the dispatcher through
// STABLE_TORCH_LIBRARY_IMPL in csrc/cpu/register.cpp and csrc/cuda/register.cu. This PyInit exists only
// so that `from concept_ext import _C` can load the shared object (no pybind11: design.md section 3.8).
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "concept_ext compiled kernels (registered via torch.library)", -1, nullptr,
  };
  return PyModule_Create(&module_def);
}
}
