// The single TORCH_LIBRARY registration file of pyencoder._C.
//
// The Python package defines its public custom ops (pyencoder::causal_conv1d, ...) with
// torch.library.custom_op, which registers them through FRAGMENT libraries. The compiled ops
// here use distinct names (*_cuda) in a FRAGMENT as well: TORCH_LIBRARY(pyencoder, m) would
// claim the namespace and would fail if any Python code declared torch.library.Library(
// "pyencoder", "DEF"); a fragment never conflicts with either side.
#include <Python.h>
#include <torch/library.h>

#include "causal_conv1d/causal_conv1d_ops.h"

TORCH_LIBRARY_FRAGMENT(pyencoder, m) {
  m.def("causal_conv1d_fwd_cuda(Tensor x, Tensor weight, Tensor? bias, Tensor? initial_state, "
        "int activation) -> (Tensor, Tensor)");
  m.def("causal_conv1d_fwd_y_cuda(Tensor x, Tensor weight, Tensor? bias, Tensor? initial_state, "
        "int activation) -> Tensor");
  m.def("causal_conv1d_bwd_cuda(Tensor grad_y, Tensor? grad_final_state, Tensor x, "
        "Tensor weight, Tensor? bias, Tensor? initial_state, int activation) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("causal_conv1d_update_cuda(Tensor x, Tensor(a!) state, Tensor weight, Tensor? bias, "
        "Tensor? state_indices, int activation) -> Tensor");
}

TORCH_LIBRARY_IMPL(pyencoder, CUDA, m) {
  m.impl("causal_conv1d_fwd_cuda", &pyencoder::causal_conv1d_fwd_cuda);
  m.impl("causal_conv1d_fwd_y_cuda", &pyencoder::causal_conv1d_fwd_y_cuda);
  m.impl("causal_conv1d_bwd_cuda", &pyencoder::causal_conv1d_bwd_cuda);
  m.impl("causal_conv1d_update_cuda", &pyencoder::causal_conv1d_update_cuda);
}

// pyencoder._C is imported as a Python module only to run the registrations above.
static struct PyModuleDef pyencoder_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&pyencoder_c_module); }
