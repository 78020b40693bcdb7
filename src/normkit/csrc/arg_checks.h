// The checks every normkit._C entry point makes on its arguments before a kernel reads a byte.
// The compiled kernels trust raw pointers and sizes, so the boundary trusts nothing: each check
// names the argument and says what was expected and what was given, so a wrong call from Python
// is a TypeError / ValueError / RuntimeError (never a crash, never a SystemError).
//
// Scalars come in as Python objects (py::handle) and are converted here: pybind11's own casts
// answer a huge int or a str with a TypeError that lists every overload and prints the tensors.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/extension.h>

#include <cmath>
#include <limits>

namespace normkit {

// A tensor's data as the kernels read it: the negative / conjugate bits resolved (a copy only
// when a bit is set; views from torch._neg_view or .conj() otherwise hand over the raw data).
inline at::Tensor resolved(const at::Tensor& t) {
  if (!t.defined()) return t;
  at::Tensor r = t.is_neg() ? t.resolve_neg() : t;
  return r.is_conj() ? r.resolve_conj() : r;
}

inline c10::optional<at::Tensor> resolved(const c10::optional<at::Tensor>& t) {
  if (!t.has_value() || !t->defined()) return c10::nullopt;
  return resolved(*t);
}

inline bool requires_grad(const c10::optional<at::Tensor>& t) { return t.has_value() && t->requires_grad(); }

// Whether autograd records a call on x and the optional tensors `others`: grad mode is on and
// one of them requires grad (the entry points then build their autograd node).
template <typename... Opt>
inline bool grad_needed(const at::Tensor& x, const Opt&... others) {
  return at::GradMode::is_enabled() && (x.requires_grad() || ... || requires_grad(others));
}

inline bool is_kernel_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

// A defined CPU tensor, of dim `dim` (any when < 0), contiguous if asked.
inline void check_tensor(const at::Tensor& t, const char* name, int64_t dim, bool contiguous) {
  TORCH_CHECK_TYPE(t.defined(), name, ": expected a tensor, got None");
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got one on ", t.device());
  TORCH_CHECK(!t.is_sparse() && t.layout() == at::kStrided, name, ": expected a dense (strided) tensor, got layout ",
              t.layout());
  TORCH_CHECK(dim < 0 || t.dim() == dim, name, ": expected a ", dim, "-D tensor, got sizes ", t.sizes());
  TORCH_CHECK(!contiguous || t.is_contiguous(), name, ": expected a contiguous tensor, got sizes ", t.sizes(),
              " strides ", t.strides());
}

// A floating dtype the kernels compute in (float32, float64, bfloat16, float16).
inline void check_kernel_dtype(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(is_kernel_dtype(t.scalar_type()), name,
                   ": expected float32, float64, bfloat16 or float16, got ", t.scalar_type());
}

inline void check_dtype(const at::Tensor& t, const char* name, at::ScalarType want) {
  TORCH_CHECK_TYPE(t.scalar_type() == want, name, ": expected dtype ", want, ", got ", t.scalar_type());
}

inline void check_sizes(const at::Tensor& t, const char* name, at::IntArrayRef want) {
  TORCH_CHECK(t.sizes() == want, name, ": expected sizes ", want, ", got ", t.sizes());
}

// A gain / bias of n elements (any floating dtype; read as (n,) after as_param).
inline void check_param(const c10::optional<at::Tensor>& p, const char* name, int64_t n) {
  if (!p.has_value() || !p->defined()) return;
  check_tensor(*p, name, -1, false);
  check_kernel_dtype(*p, name);
  TORCH_CHECK(p->numel() == n, name, ": expected ", n, " elements (the normalized size), got sizes ", p->sizes());
}

// eps is added to a variance: a finite number >= 0 (NaN fails both tests).
inline void check_eps(double eps) {
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0.0, "eps: expected a finite number >= 0, got ", eps);
}

// A buffer the kernel writes must not share memory with what it reads (nor carry a negative /
// conjugate bit the raw write would ignore), as ATen's at::assert_no_overlap for out= arguments.
inline void check_no_overlap(const at::Tensor& written, const char* wname, const at::Tensor& read, const char* rname) {
  if (!written.defined() || !read.defined()) return;
  const auto status = at::get_overlap_status(written, read);
  TORCH_CHECK(status != at::MemOverlapStatus::Full && status != at::MemOverlapStatus::Partial, wname,
              ": expected a buffer that shares no memory with ", rname, ", got one that overlaps it");
}

inline void check_writable(const at::Tensor& t, const char* name) {
  TORCH_CHECK(!t.is_neg() && !t.is_conj(), name, ": expected a tensor without the negative / conjugate bit, got a view "
              "that has one (call .resolve_neg() / .resolve_conj() first)");
  TORCH_CHECK(at::has_internal_overlap(t) != at::MemOverlap::Yes, name,
              ": expected a buffer whose elements do not share memory (an expanded tensor cannot be written)");
}

// --- Python scalars -----------------------------------------------------------------------------

inline const char* type_name(py::handle h) { return Py_TYPE(h.ptr())->tp_name; }

// A Python int (or an object with __index__, not a bool) that fits int64.
inline int64_t arg_int(py::handle h, const char* name) {
  PyObject* o = h.ptr();
  TORCH_CHECK_TYPE(!PyBool_Check(o) && PyIndex_Check(o), name, ": expected an int, got ", type_name(h));
  PyObject* idx = PyNumber_Index(o);
  if (idx == nullptr) {
    PyErr_Clear();
    TORCH_CHECK_TYPE(false, name, ": expected an int, got ", type_name(h));
  }
  int overflow = 0;
  const long long v = PyLong_AsLongLongAndOverflow(idx, &overflow);
  Py_DECREF(idx);
  if (v == -1 && PyErr_Occurred()) {
    PyErr_Clear();
    TORCH_CHECK_TYPE(false, name, ": expected an int, got ", type_name(h));
  }
  TORCH_CHECK_VALUE(overflow == 0, name, ": expected an int that fits in 64 bits, got one ",
                    overflow > 0 ? "above 2**63 - 1" : "below -2**63");
  return static_cast<int64_t>(v);
}

// A Python float or int (not a bool); NaN / Inf are returned as they are (the caller checks).
inline double arg_float(py::handle h, const char* name) {
  PyObject* o = h.ptr();
  TORCH_CHECK_TYPE(!PyBool_Check(o) && (PyFloat_Check(o) || PyLong_Check(o)), name, ": expected a float, got ",
                   type_name(h));
  const double v = PyFloat_Check(o) ? PyFloat_AS_DOUBLE(o) : PyLong_AsDouble(o);
  if (v == -1.0 && PyErr_Occurred()) {  // an int too large for a double
    PyErr_Clear();
    TORCH_CHECK_VALUE(false, name, ": expected a float, got an int too large for float64");
  }
  return v;
}

// Exactly True or False, as torch's bool arguments (1, None, 0.0 and "no" are refused).
inline bool arg_bool(py::handle h, const char* name) {
  TORCH_CHECK_TYPE(PyBool_Check(h.ptr()), name, ": expected a bool, got ", type_name(h));
  return h.ptr() == Py_True;
}

// A tensor argument that may be None.
inline c10::optional<at::Tensor> arg_optional_tensor(py::handle h, const char* name) {
  if (h.is_none()) return c10::nullopt;
  TORCH_CHECK_TYPE(THPVariable_Check(h.ptr()), name, ": expected a tensor or None, got ", type_name(h));
  return THPVariable_Unpack(h.ptr());
}

inline at::Tensor arg_tensor(py::handle h, const char* name) {
  TORCH_CHECK_TYPE(THPVariable_Check(h.ptr()), name, ": expected a tensor, got ", type_name(h));
  return THPVariable_Unpack(h.ptr());
}

}  // namespace normkit
