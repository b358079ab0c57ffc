/* hub._writes: the fan-out's two inner loops, in C.
 *
 * In steady traffic each socket has one frame (or a few) due per loop turn,
 * and the kernel's part of a write (about 6 us here, the same for every
 * server) is fixed; what is left to save is the work around it.  In Python
 * that is about 2 us per delivery (the outbox's flush, the socket's
 * write_frame, uvloop's transport.write), against Bun's 0.5 us.
 *
 * fan_out() gives a frame to every subscriber's sink (the append of its
 * pending list), as the Python loop in hub/outbox.py does, without a
 * bytecode per subscriber.
 *
 * flush_subscribers() writes a subscriber's pending frames straight to its
 * socket with one send()/sendmsg(), and hands every other case to the
 * outbox's own flush(), the pure-Python path, unchanged:
 *
 *   - the outbox offers no file descriptor (fd < 0: not a socket, TLS, a
 *     close frame already sent, the connection lost, or its transport holds
 *     unsent bytes, which a direct write would overtake: HubSocket keeps
 *     fd at -1 from the transport's pause_writing() to its resume_writing()
 *     with a high-water mark of 0), is closed, or has nothing or more than
 *     MAX_IOV frames pending;
 *   - its transport is closing: its descriptor may be closed already, and
 *     the number reused by the next accepted connection;
 *   - the kernel takes less than everything (the rest stays pending, the
 *     flush gives it to the transport, which waits for the socket) or
 *     fails (the transport's own write meets the error and closes).
 *
 * So the order of bytes on a socket, the slow-consumer bound and the
 * close handling stay the outbox's (hub/transport/outbox.py).  Built at
 * `pip install` when a C compiler is there (setup.py); without it the hub
 * runs the pure-Python loops (hub/outbox.py).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>

#define MAX_IOV 64

static PyObject *s_outbox, *s_fd, *s_pending, *s_closed, *s_transport;
static PyObject *s_is_closing, *s_flush, *s_pending_bytes;
static PyObject *zero;

/* Call outbox.flush(); 0, or -1 with an exception set. */
static int
slow_flush(PyObject *outbox)
{
    PyObject *args[1] = {outbox};
    PyObject *r = PyObject_VectorcallMethod(
        s_flush, args, 1 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

/* A no-argument method of obj, its result as a C long; -1 on error (with an
 * exception set) or when the result is -1 itself (never, for these). */
static long
call_long(PyObject *obj, PyObject *name)
{
    PyObject *args[1] = {obj};
    PyObject *r = PyObject_VectorcallMethod(
        name, args, 1 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    if (r == NULL)
        return -1;
    long v = PyLong_AsLong(r);
    Py_DECREF(r);
    return v;
}

/* Write outbox's pending frames directly if it may be.  Returns 1 when it
 * wrote them all (adding to *frames and *nbytes), 0 when the outbox's own
 * flush must do (the rest of) the work, -1 on a Python error.
 *
 * The checks that may run Python code (a Python transport's is_closing())
 * come first; from reading the pending list's size to the send() no Python
 * code runs, so its items stay what was counted. */
static int
try_direct(PyObject *outbox, long long *frames, long long *nbytes)
{
    int result = 0;
    PyObject *fd_obj = NULL, *pending = NULL, *closed = NULL, *transport = NULL;

    fd_obj = PyObject_GetAttr(outbox, s_fd);
    if (fd_obj == NULL)
        goto error;
    long fd = PyLong_AsLong(fd_obj);
    if (fd == -1 && PyErr_Occurred())
        goto error;
    if (fd < 0)
        goto done;
    closed = PyObject_GetAttr(outbox, s_closed);
    if (closed == NULL)
        goto error;
    int is_closed = PyObject_IsTrue(closed);
    if (is_closed < 0)
        goto error;
    if (is_closed)
        goto done;
    transport = PyObject_GetAttr(outbox, s_transport);
    if (transport == NULL)
        goto error;
    long closing = call_long(transport, s_is_closing);
    if (closing == -1 && PyErr_Occurred())
        goto error;
    if (closing)
        goto done;
    pending = PyObject_GetAttr(outbox, s_pending);
    if (pending == NULL)
        goto error;
    if (!PyList_CheckExact(pending))
        goto done;
    Py_ssize_t n = PyList_GET_SIZE(pending);
    if (n == 0 || n > MAX_IOV)
        goto done;

    struct iovec iov[MAX_IOV];
    size_t total = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyList_GET_ITEM(pending, i);
        if (!PyBytes_CheckExact(item))
            goto done;
        iov[i].iov_base = PyBytes_AS_STRING(item);
        iov[i].iov_len = (size_t)PyBytes_GET_SIZE(item);
        total += iov[i].iov_len;
    }
    ssize_t sent;
    do {
        if (n == 1) {
            sent = send((int)fd, iov[0].iov_base, iov[0].iov_len, MSG_DONTWAIT | MSG_NOSIGNAL);
        } else {
            struct msghdr msg;
            memset(&msg, 0, sizeof(msg));
            msg.msg_iov = iov;
            msg.msg_iovlen = (size_t)n;
            sent = sendmsg((int)fd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
        }
    } while (sent < 0 && errno == EINTR);
    if (sent <= 0)
        goto done; /* EAGAIN or an error: the transport's write sees to it */
    if ((size_t)sent == total) {
        /* Emptying a whole list allocates nothing: it cannot fail. */
        (void)PyList_SetSlice(pending, 0, n, NULL);
        if (PyObject_SetAttr(outbox, s_pending_bytes, zero) < 0)
            goto error;
        *frames += n;
        *nbytes += (long long)total;
        result = 1;
        goto done;
    }
    /* Part of it went: what is left of the frame the kernel stopped in
     * (the frame itself when it stopped at a boundary), then the frames
     * after it, stay pending for the transport. */
    size_t left = (size_t)sent;
    Py_ssize_t k = 0;
    while (left >= iov[k].iov_len) {
        left -= iov[k].iov_len;
        k++;
    }
    int failed = 0;
    if (left > 0) {
        PyObject *rest = PyBytes_FromStringAndSize(
            (const char *)iov[k].iov_base + left, (Py_ssize_t)(iov[k].iov_len - left));
        failed = rest == NULL ? -1 : PyList_SetItem(pending, k, rest); /* steals rest */
    }
    if (failed == 0 && k > 0)
        failed = PyList_SetSlice(pending, 0, k, NULL);
    if (failed < 0) {
        /* Out of memory: what was sent must not be sent again, and what
         * is left cannot be sent whole; this stream is lost either way. */
        (void)PyList_SetSlice(pending, 0, PyList_GET_SIZE(pending), NULL);
        goto error;
    }
    *frames += k;
    *nbytes += (long long)sent;
    goto done;

error:
    result = -1;
done:
    Py_XDECREF(fd_obj);
    Py_XDECREF(pending);
    Py_XDECREF(closed);
    Py_XDECREF(transport);
    return result;
}

PyDoc_STRVAR(flush_subscribers_doc,
"flush_subscribers(subscriptions) -> (frames, bytes)\n\n"
"Write each subscription's outbox: directly to its socket where it may be,\n"
"else with the outbox's own flush().  Returns the frames and bytes written\n"
"directly (the rest the outboxes count themselves).");

static PyObject *
flush_subscribers(PyObject *module, PyObject *subscriptions)
{
    PyObject *subs = PySequence_List(subscriptions); /* a copy: flush() may close */
    if (subs == NULL)
        return NULL;
    long long frames = 0, nbytes = 0;
    Py_ssize_t n = PyList_GET_SIZE(subs);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *outbox = PyObject_GetAttr(PyList_GET_ITEM(subs, i), s_outbox);
        if (outbox == NULL)
            goto error;
        int done = try_direct(outbox, &frames, &nbytes);
        if (done == 0)
            done = slow_flush(outbox) == 0 ? 1 : -1;
        Py_DECREF(outbox);
        if (done < 0)
            goto error;
    }
    Py_DECREF(subs);
    return Py_BuildValue("(LL)", frames, nbytes);
error:
    Py_DECREF(subs);
    return NULL;
}

PyDoc_STRVAR(fan_out_doc,
"fan_out(group, wire, origin) -> int\n\n"
"Call every sink (the values of the dict group) with the frame wire, but\n"
"the sink of the subscription origin.  Returns how many were called.");

static PyObject *
fan_out(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !PyDict_CheckExact(args[0]) || !PyBytes_CheckExact(args[1])) {
        PyErr_SetString(PyExc_TypeError, "fan_out(group: dict, wire: bytes, origin)");
        return NULL;
    }
    PyObject *group = args[0], *origin = args[2];
    PyObject *call_args[2] = {NULL, args[1]};
    Py_ssize_t pos = 0, count = 0;
    PyObject *sub, *sink;
    /* A socket's sink only appends to a list; another outbox's sink runs
     * Python and might drop its entry: the sink is held while it runs. */
    while (PyDict_Next(group, &pos, &sub, &sink)) {
        if (sub == origin)
            continue;
        Py_INCREF(sink);
        PyObject *r = PyObject_Vectorcall(
            sink, call_args + 1, 1 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
        Py_DECREF(sink);
        if (r == NULL)
            return NULL;
        Py_DECREF(r);
        count++;
    }
    return PyLong_FromSsize_t(count);
}

static PyMethodDef methods[] = {
    {"fan_out", (PyCFunction)(void (*)(void))fan_out, METH_FASTCALL, fan_out_doc},
    {"flush_subscribers", flush_subscribers, METH_O, flush_subscribers_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "hub._writes",
    "The fan-out's socket writes in C (see hub/_writes.c).", -1, methods,
};

PyMODINIT_FUNC
PyInit__writes(void)
{
#define INTERN(var, text) \
    if ((var = PyUnicode_InternFromString(text)) == NULL) return NULL
    INTERN(s_outbox, "outbox");
    INTERN(s_fd, "fd");
    INTERN(s_pending, "pending");
    INTERN(s_closed, "closed");
    INTERN(s_transport, "transport");
    INTERN(s_is_closing, "is_closing");
    INTERN(s_flush, "flush");
    INTERN(s_pending_bytes, "pending_bytes");
#undef INTERN
    if ((zero = PyLong_FromLong(0)) == NULL)
        return NULL;
    return PyModule_Create(&module);
}
