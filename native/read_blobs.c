/* sluicegate.core.engine._native: read and BLAKE3-hash a batch of local blobs with the GIL released once
 * for the whole batch.
 *
 * Why native: in Python each blob releases and retakes the GIL four times (open, read, close, hash), and
 * beside a thread running Python each retake waits for CPython's switch interval (5 ms). One release per
 * batch lets the engine's workers read beside any training loop. Built by hatch_build.py; without a C
 * compiler the engine reads in Python instead (sluicegate/core/engine/upstream.py).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "blake3.h"

typedef struct {
    const char *path;
    char *buf;
    Py_ssize_t want; /* size + 1: one byte more shows a longer file (in its hash) rather than cutting it */
    Py_ssize_t got;
    int err; /* errno of a failed open or read, else 0 */
    uint8_t digest[BLAKE3_OUT_LEN];
    double seconds;
} blob;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void blake3_of(const void *buf, size_t len, uint8_t out[BLAKE3_OUT_LEN]) {
    blake3_hasher h;
    blake3_hasher_init(&h);
    blake3_hasher_update(&h, buf, len);
    blake3_hasher_finalize(&h, out, BLAKE3_OUT_LEN);
}

static void read_one(blob *b, int hash) {
    double started = now();
    int fd = open(b->path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        b->err = errno;
        return;
    }
    while (b->got < b->want) {
        ssize_t n = read(fd, b->buf + b->got, (size_t)(b->want - b->got));
        if (n < 0) {
            if (errno == EINTR) continue;
            b->err = errno;
            break;
        }
        if (n == 0) break;
        b->got += n;
    }
    close(fd);
    if (b->err == 0 && hash) blake3_of(b->buf, (size_t)b->got, b->digest);
    b->seconds = now() - started;
}

static PyObject *hex_of(const uint8_t *d) {
    static const char digits[] = "0123456789abcdef";
    char out[2 * BLAKE3_OUT_LEN];
    for (int i = 0; i < BLAKE3_OUT_LEN; i++) {
        out[2 * i] = digits[d[i] >> 4];
        out[2 * i + 1] = digits[d[i] & 15];
    }
    return PyUnicode_FromStringAndSize(out, sizeof out);
}

/* read_blobs(paths, sizes, hash) -> list of (bytes, blake3 hex | None, seconds) or int errno */
static PyObject *read_blobs(PyObject *self, PyObject *args) {
    PyObject *paths, *sizes;
    int hash;
    if (!PyArg_ParseTuple(args, "O!O!p", &PyList_Type, &paths, &PyList_Type, &sizes, &hash)) return NULL;
    Py_ssize_t n = PyList_GET_SIZE(paths);
    if (PyList_GET_SIZE(sizes) != n) {
        PyErr_SetString(PyExc_ValueError, "paths and sizes differ in length");
        return NULL;
    }
    blob *blobs = PyMem_Calloc((size_t)(n ? n : 1), sizeof(blob));
    PyObject **datas = PyMem_Calloc((size_t)(n ? n : 1), sizeof(PyObject *));
    PyObject *result = NULL;
    if (blobs == NULL || datas == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        blobs[i].path = PyUnicode_AsUTF8(PyList_GET_ITEM(paths, i));
        if (blobs[i].path == NULL) goto done;
        Py_ssize_t size = PyLong_AsSsize_t(PyList_GET_ITEM(sizes, i));
        if (size < 0) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "a blob size is negative");
            goto done;
        }
        blobs[i].want = size + 1;
        datas[i] = PyBytes_FromStringAndSize(NULL, blobs[i].want);
        if (datas[i] == NULL) goto done;
        blobs[i].buf = PyBytes_AS_STRING(datas[i]);
    }
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) read_one(&blobs[i], hash);
    Py_END_ALLOW_THREADS
    result = PyList_New(n);
    if (result == NULL) goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *entry;
        if (blobs[i].err != 0) {
            entry = PyLong_FromLong(blobs[i].err);
        } else {
            if (blobs[i].got != blobs[i].want && _PyBytes_Resize(&datas[i], blobs[i].got) < 0) {
                Py_CLEAR(result);
                goto done;
            }
            PyObject *digest = hash ? hex_of(blobs[i].digest) : Py_NewRef(Py_None);
            entry = digest == NULL ? NULL : Py_BuildValue("(NNd)", datas[i], digest, blobs[i].seconds);
            datas[i] = NULL; /* the tuple owns it now (or it was freed with a failed build) */
        }
        if (entry == NULL) {
            Py_CLEAR(result);
            goto done;
        }
        PyList_SET_ITEM(result, i, entry);
    }
done:
    if (datas != NULL)
        for (Py_ssize_t i = 0; i < n; i++) Py_XDECREF(datas[i]);
    PyMem_Free(datas);
    PyMem_Free(blobs);
    return result;
}

/* hash_blobs(datas) -> [blake3 hex]: bytes already in memory (a remote upstream's), with the GIL released
 * once for the batch. */
static PyObject *hash_blobs(PyObject *self, PyObject *args) {
    PyObject *datas;
    if (!PyArg_ParseTuple(args, "O!", &PyList_Type, &datas)) return NULL;
    Py_ssize_t n = PyList_GET_SIZE(datas), held = 0;
    Py_buffer *views = PyMem_Calloc((size_t)(n ? n : 1), sizeof(Py_buffer));
    uint8_t (*digests)[BLAKE3_OUT_LEN] = PyMem_Calloc((size_t)(n ? n : 1), BLAKE3_OUT_LEN);
    PyObject *result = NULL;
    if (views == NULL || digests == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    /* The list holds a reference to each object, and each view pins its buffer, while the GIL is out. */
    for (; held < n; held++)
        if (PyObject_GetBuffer(PyList_GET_ITEM(datas, held), &views[held], PyBUF_SIMPLE) < 0) goto done;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) blake3_of(views[i].buf, (size_t)views[i].len, digests[i]);
    Py_END_ALLOW_THREADS
    result = PyList_New(n);
    if (result == NULL) goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *hex = hex_of(digests[i]);
        if (hex == NULL) {
            Py_CLEAR(result);
            goto done;
        }
        PyList_SET_ITEM(result, i, hex);
    }
done:
    for (Py_ssize_t i = 0; i < held; i++) PyBuffer_Release(&views[i]);
    PyMem_Free(views);
    PyMem_Free(digests);
    return result;
}

static PyMethodDef methods[] = {
    {"read_blobs", read_blobs, METH_VARARGS,
     "read_blobs(paths, sizes, hash) -> [(bytes, blake3 hex | None, seconds) | errno]\n\n"
     "Each file read whole (up to one byte past its size) and, if hash, BLAKE3-hashed, with the GIL "
     "released once for the batch."},
    {"hash_blobs", hash_blobs, METH_VARARGS,
     "hash_blobs(datas) -> [blake3 hex]\n\nEach buffer's BLAKE3, with the GIL released once for the batch."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", NULL, -1, methods};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
