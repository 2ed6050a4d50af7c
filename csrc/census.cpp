// The Python module of the extension: `addresses`, the per-step identity checks of many tensors
// (fused_adam/flat.py `addresses`). Before each step the optimizer checks that no param, grad or
// state was re-pointed (`p.data = t`, `p.grad = g`, `state[p]["exp_avg"].data = t`): one address
// per tensor. After the previous step streamed its operands through the cache, each C++ object
// those reads reach is a miss (~5 lines a param); a Python loop takes them one at a time, 0.17-0.33
// ms per list of 1000 tensors on the 2-core VM, where this loop keeps several in flight: 0.05-0.10
// ms (bench/NOTES.md 21).
#include <ATen/record_function.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/object_ptr.h>

#include <cstdint>

namespace {

// What `addresses` reads of each item (fused_adam/flat.py names them).
enum Kind : long { kObjects = 0, kData = 1, kGrads = 2, kGradsAsTheyAre = 3, kStep = 4 };

// Whether `obj` is a tensor: by its type, not by `__class__` (which any object may claim).
bool is_tensor(PyObject* obj) {
  return PyObject_TypeCheck(obj, reinterpret_cast<PyTypeObject*>(THPVariableClass));
}

// The tensor's data address, or false where this loop does not read one: a tensor with no
// strided storage (sparse, a wrapper subclass), or one whose sizes or storage access go through
// Python (a subclass with __torch_dispatch__): the caller then asks Python, as before.
bool data_address(const at::Tensor& t, uint64_t& out) {
  if (!t.defined()) {
    out = 0;
    return true;
  }
  const c10::TensorImpl* impl = t.unsafeGetTensorImpl();
  if (impl->key_set().has(c10::DispatchKey::Python) || !impl->has_storage() ||
      impl->layout() != c10::kStrided) {
    return false;
  }
  try {
    out = reinterpret_cast<uintptr_t>(impl->data());
  } catch (const c10::Error&) {  // storage that refuses access (fake, functional tensors)
    return false;
  }
  return true;
}

// Whether a kernel reads the grad of tensor `t` as it is (flat.py `_readable`, and no error to
// raise: `_check_grad`): 1, or 0 for no grad; false where Python must look at it.
bool grad_as_it_is(const at::Tensor& t, uint64_t& out) {
  const c10::TensorImpl* impl = t.unsafeGetTensorImpl();
  const at::Tensor& grad = impl->grad();
  out = grad.defined();
  if (!grad.defined()) {
    return true;
  }
  const c10::TensorImpl* g = grad.unsafeGetTensorImpl();
  for (const c10::TensorImpl* x : {impl, g}) {
    if (x->key_set().has(c10::DispatchKey::Python) || x->layout() != c10::kStrided) {
      return false;
    }
  }
  try {
    return g->dtype() == impl->dtype() && g->sizes().equals(impl->sizes()) && g->is_contiguous();
  } catch (const c10::Error&) {  // symbolic sizes (a fake tensor)
    return false;
  }
}

// Its grad's TensorImpl address (Tensor._cdata) and data address into out[0], out[1]: (0, 0) for
// None; false where this loop does not read the data address (data_address). The TensorImpl's
// grad: Tensor.grad's getter without its non-leaf warning.
bool grad_addresses(const at::Tensor& t, uint64_t* out) {
  const at::Tensor& grad = t.unsafeGetTensorImpl()->grad();
  out[0] = reinterpret_cast<uintptr_t>(grad.defined() ? grad.unsafeGetTensorImpl() : nullptr);
  return data_address(grad, out[1]);
}

// addresses(items, kind) -> bytes | None: per item, as native uint64 values,
//   kObjects: the object's address (Python's id);
//   kData: the tensor's data address (Tensor.data_ptr);
//   kGrads: its .grad's TensorImpl address (Tensor._cdata) and data address, (0, 0) for None;
//   kGradsAsTheyAre: 1 where its grad is read as it is, 0 where it has none (grad_as_it_is).
//   kStep: all of what a step is planned from, five values: the object's and its data's address,
//     its grad's TensorImpl and data addresses, and flags: 1 requires_grad, 2 a grad read as it
//     is (the optimizer's kept plan, fused_adam/optimizer.py `Replay`).
// None when some item is not a tensor, has no data address of its own, or (kGradsAsTheyAre) has a
// grad Python must look at.
PyObject* addresses(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject* items = nullptr;
  long kind = 0;
  if (!PyArg_ParseTuple(args, "Ol", &items, &kind)) {
    return nullptr;
  }
  if (kind < kObjects || kind > kStep) {
    PyErr_SetString(PyExc_ValueError, "addresses: unknown kind");
    return nullptr;
  }
  THPObjectPtr seq(PySequence_Fast(items, "addresses: a list or tuple of tensors"));
  if (!seq) {
    return nullptr;
  }
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq.get());
  const Py_ssize_t width = kind == kGrads ? 2 : kind == kStep ? 5 : 1;
  THPObjectPtr out(PyBytes_FromStringAndSize(nullptr, n * width * sizeof(uint64_t)));
  if (!out) {
    return nullptr;
  }
  auto* o = reinterpret_cast<uint64_t*>(PyBytes_AS_STRING(out.get()));
  PyObject** item = PySequence_Fast_ITEMS(seq.get());  // (no Python code runs in the loop)
  for (Py_ssize_t i = 0; i < n; ++i) {
    bool known = true;
    if (kind == kObjects) {
      o[i] = reinterpret_cast<uintptr_t>(item[i]);
    } else if (!is_tensor(item[i])) {
      known = false;
    } else if (kind == kData) {
      known = data_address(THPVariable_Unpack(item[i]), o[i]);
    } else if (kind == kGradsAsTheyAre) {
      known = grad_as_it_is(THPVariable_Unpack(item[i]), o[i]);
    } else if (kind == kGrads) {
      known = grad_addresses(THPVariable_Unpack(item[i]), o + 2 * i);
    } else {
      const at::Tensor& t = THPVariable_Unpack(item[i]);
      uint64_t* x = o + 5 * i;
      uint64_t as_it_is = 0;
      x[0] = reinterpret_cast<uintptr_t>(item[i]);
      known = data_address(t, x[1]) && grad_addresses(t, x + 2);
      x[4] = t.requires_grad() | (known && grad_as_it_is(t, as_it_is) && as_it_is) << 1;
    }
    if (!known) {
      Py_RETURN_NONE;
    }
  }
  return out.release();
  END_HANDLE_TH_ERRORS
}

// observed() -> bool: whether a RecordFunction range would reach anyone now (a profiler, legacy or
// Kineto, an execution-trace observer, any global or thread-local callback): the step's range
// is then opened (fused_adam/optimizer.py `_hooked`).
PyObject* observed(PyObject*, PyObject*) {
  HANDLE_TH_ERRORS
  return PyBool_FromLong(at::isRecordFunctionEnabled() && at::hasCallbacks());
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"addresses", addresses, METH_VARARGS, "addresses(items, kind) -> bytes | None"},
    {"observed", observed, METH_NOARGS, "observed() -> bool"},
    {nullptr, nullptr, 0, nullptr}};

#define FA_STRING2(x) #x
#define FA_STRING(x) FA_STRING2(x)
#define FA_JOIN2(a, b) a##b
#define FA_JOIN(a, b) FA_JOIN2(a, b)

PyModuleDef module = {PyModuleDef_HEAD_INIT, FA_STRING(TORCH_EXTENSION_NAME),
                      "fused_adam's compiled extension: its ops register on import", -1, methods};

}  // namespace

// (TORCH_EXTENSION_NAME: `_C` from setup.py, the JIT build's own name from _ext.py)
PyMODINIT_FUNC FA_JOIN(PyInit_, TORCH_EXTENSION_NAME)() { return PyModule_Create(&module); }
