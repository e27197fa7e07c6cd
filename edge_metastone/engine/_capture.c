/* The feature capture's graph callback in C (see capture.py).
 *
 * llama.cpp calls a context's eval callback for every node of every decode graph (hundreds per
 * decode). Answered in Python, each call costs a C -> Python -> C round trip; answered here it
 * costs a strcmp. The layout and the ggml functions come from Python (ctypes), so this file
 * needs no ggml header: it is built with the package as a plain C extension, and the engine
 * falls back to the Python callback when it is missing.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>

typedef const char *(*get_name_fn)(const void *);
typedef void (*tensor_get_fn)(const void *, void *, size_t, size_t);
typedef bool (*is_contiguous_fn)(const void *);

/* The leading fields of struct ggml_tensor (ggml.h): type, buffer, ne[4], nb[4]. */
struct tensor_head {
    int type;
    void *buffer;
    int64_t ne[4];
    size_t nb[4];
};

/* Mirrored by _CaptureState in capture.py. */
struct em_capture {
    get_name_fn get_name;
    tensor_get_fn tensor_get;
    is_contiguous_fn is_contiguous;
    float *buf;        /* [cap_rows, n_embd] */
    int64_t n_embd;
    int64_t cap_rows;
    int64_t rows;      /* rows captured since the last take() */
    int32_t error;     /* 0 ok, 1 wrong type/shape/layout, 2 more rows than the buffer holds */
    char target[64];   /* the graph tensor's name, e.g. "l_out-22" */
};

/* ggml_backend_sched_eval_callback: ask=true "do you want this node?", ask=false "here it is";
 * returning false from the second call would stop the graph, so it always returns true. */
bool em_capture_cb(void *t, bool ask, void *ud) {
    struct em_capture *s = (struct em_capture *)ud;
    if (strcmp(s->get_name(t), s->target) != 0) {
        return !ask;
    }
    if (ask) {
        return true;
    }
    const struct tensor_head *h = (const struct tensor_head *)t;
    if (h->type != 0 /* GGML_TYPE_F32 */ || h->ne[0] != s->n_embd || !s->is_contiguous(t)) {
        s->error = 1;
        return true;
    }
    int64_t rows = h->ne[1] * h->ne[2] * h->ne[3];
    if (s->rows + rows > s->cap_rows) {
        s->error = 2;
        return true;
    }
    s->tensor_get(t, s->buf + s->rows * s->n_embd, 0, (size_t)(rows * s->n_embd) * sizeof(float));
    s->rows += rows;
    return true;
}

static struct PyModuleDef capture_module = {
    PyModuleDef_HEAD_INIT, "_capture",
    "Feature capture's llama.cpp eval callback in C (em_capture_cb, called through ctypes).",
    -1, NULL,
};

PyMODINIT_FUNC PyInit__capture(void) { return PyModule_Create(&capture_module); }
