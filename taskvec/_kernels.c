/*
 * taskvec._kernels: the task-arithmetic sum fused into one pass over memory.
 *
 * The torch path (taskvec.streaming / taskvec.engine) converts each input to
 * float32, subtracts, scales, accumulates, checks and rounds in separate
 * passes: about ten per element. This kernel does the same float32 operations,
 * in the same order, on 256-element slices that stay in L1, and rounds to the
 * output dtype in the same pass, so its results are bit-identical to the torch
 * path's (tests/test_kernels.py checks every dtype combination and special
 * values). Built when a C compiler is present (`pip install` does it); without
 * it taskvec runs the torch path.
 *
 * combine(n, mode, out, out_dtype, base, base_dtype, inputs, dtypes, lambdas)
 *   mode 0 (merge):  acc = (x_0 - b)*l_0;  acc = acc + (x_t - b)*l_t;  out = acc + b
 *   mode 1 (apply):  acc = b;              acc = acc + x_t*l_t;        out = acc
 * Every operation is one IEEE float32 operation, rounded to nearest even
 * (compiled with -ffp-contract=off: no fused multiply-add, whose single
 * rounding would give other bits than torch's separate multiply and add).
 * Returns True when every float32 result is finite and fits the output dtype
 * (rounds to a finite value); on False the caller recomputes the block on the
 * torch path to name the cause.
 * dtype codes: 0 float32, 1 bfloat16, 2 float16. Pointers are addresses
 * (torch's data_ptr()); the GIL is released while the loop runs.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define SLICE 256

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
/* one build runs on any x86-64 and uses AVX-512 / AVX2+F16C where the CPU has them */
#define CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CLONES
#endif

static inline float as_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint32_t as_u32(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

/* float16 bits -> float32 bits, exact (normal, subnormal, zero, Inf, NaN) */
static inline uint32_t f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, em = h & 0x7FFFu;
    uint32_t normal = (em << 13) + (112u << 23);               /* rebias the exponent 15 -> 127 */
    uint32_t sub = as_u32((float)(int32_t)em * 0x1p-24f);      /* em < 0x400: em * 2^-24, exact */
    uint32_t special = (em << 13) | 0x7F800000u;               /* Inf / NaN */
    uint32_t is_sub = 0u - (uint32_t)(em < 0x400u), is_special = 0u - (uint32_t)(em >= 0x7C00u); /* all-ones masks */
    return sign | (is_sub & sub) | (~is_sub & ((is_special & special) | (~is_special & normal)));
}

/* float32 -> float16 bits, IEEE round to nearest even (finite results equal torch's; NaN -> 0x7E00) */
static inline uint16_t f32_to_f16(float x) {
    uint32_t u = as_u32(x), a = u & 0x7FFFFFFFu, sign = (u >> 16) & 0x8000u;
    uint32_t normal = (a - (112u << 23) + 0xFFFu + ((a >> 13) & 1u)) >> 13; /* overflows to 0x7C00 from 65520 */
    uint32_t sub = as_u32(as_f32(a) + 0.5f) - 0x3F000000u;     /* |x| < 2^-14: the add rounds to a multiple of 2^-24 */
    uint32_t big = 0x7C00u | ((uint32_t)(a > 0x7F800000u) << 9); /* |x| >= 65536: Inf, or NaN (0x7E00) */
    uint32_t is_sub = 0u - (uint32_t)(a < 0x38800000u), is_big = 0u - (uint32_t)(a >= 0x47800000u);
    return (uint16_t)(sign | (is_sub & sub) | (~is_sub & ((is_big & big) | (~is_big & normal))));
}

static inline void load_f32(float *restrict dst, const void *restrict src, int dtype, Py_ssize_t at, int m) {
    uint32_t *d = (uint32_t *)dst;
    if (dtype == 0) {
        memcpy(dst, (const float *)src + at, (size_t)m * sizeof(float));
    } else if (dtype == 1) {
        const uint16_t *s = (const uint16_t *)src + at;
        for (int j = 0; j < m; j++) d[j] = (uint32_t)s[j] << 16; /* exact */
    } else {
        const uint16_t *s = (const uint16_t *)src + at;
        for (int j = 0; j < m; j++) d[j] = f16_to_f32(s[j]);
    }
}

static inline void store(void *restrict dst, int dtype, Py_ssize_t at, const float *restrict src, int m) {
    if (dtype == 0) {
        memcpy((float *)dst + at, src, (size_t)m * sizeof(float));
    } else if (dtype == 1) {
        /* round to nearest even, as c10::BFloat16; NaN -> 0x7FC0 (never kept: the caller refuses it) */
        const uint32_t *s = (const uint32_t *)src;
        uint16_t *d = (uint16_t *)dst + at;
        for (int j = 0; j < m; j++) {
            uint32_t u = s[j];
            uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16, is_nan = 0u - (uint32_t)((u & 0x7FFFFFFFu) > 0x7F800000u);
            d[j] = (uint16_t)((is_nan & 0x7FC0u) | (~is_nan & r));
        }
    } else {
        uint16_t *d = (uint16_t *)dst + at;
        for (int j = 0; j < m; j++) d[j] = f32_to_f16(src[j]);
    }
}

/* |x| from which a float32 result is NaN, Inf, or rounds to Inf in the output dtype (as bits of |x|) */
static const uint32_t TOO_BIG[3] = {
    0x7F800000u, /* float32: Inf or NaN */
    0x7F7F8000u, /* bfloat16: (2 - 2^-8) * 2^127 rounds up to Inf */
    0x477FF000u, /* float16: 65520 rounds up to Inf */
};

CLONES
static void combine_loop(Py_ssize_t n, int mode, void *out, int out_dt, const void *base, int base_dt, int k,
                         const void *const *xs, const int *dts, const float *lams, int *bad_out) {
    float b[SLICE], x[SLICE], acc[SLICE];
    const uint32_t limit = TOO_BIG[out_dt];
    uint32_t bad = 0;
    for (Py_ssize_t at = 0; at < n; at += SLICE) {
        int m = (int)(n - at < SLICE ? n - at : SLICE);
        load_f32(b, base, base_dt, at, m);
        if (mode == 0) {
            load_f32(x, xs[0], dts[0], at, m);
            const float l0 = lams[0];
            for (int j = 0; j < m; j++) acc[j] = (x[j] - b[j]) * l0;
            for (int t = 1; t < k; t++) {
                load_f32(x, xs[t], dts[t], at, m);
                const float lt = lams[t];
                for (int j = 0; j < m; j++) acc[j] = acc[j] + (x[j] - b[j]) * lt;
            }
            for (int j = 0; j < m; j++) acc[j] = acc[j] + b[j];
        } else {
            memcpy(acc, b, (size_t)m * sizeof(float));
            for (int t = 0; t < k; t++) {
                load_f32(x, xs[t], dts[t], at, m);
                const float lt = lams[t];
                for (int j = 0; j < m; j++) acc[j] = acc[j] + x[j] * lt;
            }
        }
        const uint32_t *bits = (const uint32_t *)acc;
        for (int j = 0; j < m; j++) bad |= (bits[j] & 0x7FFFFFFFu) >= limit; /* NaN's bits exceed Inf's */
        store(out, out_dt, at, acc, m);
    }
    *bad_out = bad != 0;
}

static int check_dtype(int dt) {
    if (dt == 0 || dt == 1 || dt == 2) return 1;
    PyErr_Format(PyExc_ValueError, "unsupported dtype code %d", dt);
    return 0;
}

static PyObject *combine(PyObject *self, PyObject *args) {
    Py_ssize_t n;
    int mode, out_dt, base_dt;
    unsigned long long out, base;
    PyObject *xs_obj, *dts_obj, *lams_obj;
    if (!PyArg_ParseTuple(args, "niKiKiO!O!O!", &n, &mode, &out, &out_dt, &base, &base_dt, &PyTuple_Type, &xs_obj,
                          &PyTuple_Type, &dts_obj, &PyTuple_Type, &lams_obj))
        return NULL;
    Py_ssize_t k = PyTuple_GET_SIZE(xs_obj);
    if (n < 0 || (mode != 0 && mode != 1) || k < 1 || k > 1 << 20 || PyTuple_GET_SIZE(dts_obj) != k ||
        PyTuple_GET_SIZE(lams_obj) != k || !out || !base) {
        PyErr_SetString(PyExc_ValueError, "combine: bad arguments");
        return NULL;
    }
    if (!check_dtype(out_dt) || !check_dtype(base_dt)) return NULL;
    const void **xs = PyMem_Malloc((size_t)k * sizeof(void *));
    int *dts = PyMem_Malloc((size_t)k * sizeof(int));
    float *lams = PyMem_Malloc((size_t)k * sizeof(float));
    if (!xs || !dts || !lams) {
        PyMem_Free(xs), PyMem_Free(dts), PyMem_Free(lams);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t t = 0; t < k; t++) {
        unsigned long long p = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(xs_obj, t));
        long dt = PyLong_AsLong(PyTuple_GET_ITEM(dts_obj, t));
        double lam = PyFloat_AsDouble(PyTuple_GET_ITEM(lams_obj, t));
        if (PyErr_Occurred() || !p || !check_dtype((int)dt)) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "combine: null input");
            PyMem_Free(xs), PyMem_Free(dts), PyMem_Free(lams);
            return NULL;
        }
        xs[t] = (const void *)(uintptr_t)p;
        dts[t] = (int)dt;
        lams[t] = (float)lam; /* as torch rounds a Python scalar for a float32 tensor */
    }
    int bad;
    Py_BEGIN_ALLOW_THREADS
    combine_loop(n, mode, (void *)(uintptr_t)out, out_dt, (const void *)(uintptr_t)base, base_dt, (int)k, xs, dts, lams, &bad);
    Py_END_ALLOW_THREADS
    PyMem_Free(xs), PyMem_Free(dts), PyMem_Free(lams);
    return PyBool_FromLong(!bad);
}

static PyMethodDef methods[] = {
    {"combine", combine, METH_VARARGS, "Fused task-arithmetic sum over raw buffers; True when every result is finite and fits the output dtype."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", NULL, -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) {
    return PyModule_Create(&module);
}
