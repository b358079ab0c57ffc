/* hub._writes: the fan-out's two inner loops in C, and the frame list they
 * share with the socket's outbox.
 *
 * In steady traffic each socket has one frame (or a few) due per loop turn,
 * and the kernel's part of a write is fixed; what is left to save is the
 * work around it.  In Python that is the outbox's flush, the socket's
 * write_frame and uvloop's transport.write, about 2 us per delivery; and
 * even in C, reading a subscriber's state from several Python objects (the
 * subscription, its outbox, a list, the list's items, an int for the
 * descriptor) is a cache miss per object, as the kernel's work between two
 * messages evicts them all.
 *
 * Pending is a socket's frames due, its descriptor and its pushed bytes in
 * one object, and it is the fan-out's sink: the value of the subscription
 * in the topic's dict.  Its first frames are stored inline, so the frame of
 * a delivery, the check and the write touch one object, and appending and
 * clearing allocate nothing.  Items are exact bytes only, so a Pending
 * refers to no container and needs no garbage-collector support.
 *
 * fan_out() appends a frame to every subscriber's sink, as the Python loop
 * in hub/outbox.py does, without a bytecode or a call per subscriber.
 *
 * fan_out_later() does the same for a broadcast without a sender to skip,
 * lazily: consecutive broadcasts to one topic (a REST request of 100, a
 * burst of them) are kept in the one open run, and given to its
 * subscribers together when something else comes: one pass over the
 * subscribers for the run instead of one per message, the run's frames
 * copied into each list at once, and each frame's reference count raised
 * once for all of them.  So the order of every socket's frames stays the
 * order of the calls, the run is settled (given to its subscribers) before
 * anything else reads or writes any Pending, before fan_out() and before
 * a flush; and the registry settles it before a topic's subscribers
 * change (hub/channels/fanout.py), so a subscriber gets exactly the
 * broadcasts published while it was subscribed.
 *
 * flush_subscribers() writes a subscriber's pending frames straight to its
 * socket with one send()/sendmsg(), and hands every other case to the
 * outbox's own flush(), the pure-Python path, unchanged:
 *
 *   - the sink is not a Pending, or it has no descriptor (fd < 0: not a
 *     socket, TLS, a close frame already sent, end of stream, the outbox
 *     closed, the connection lost, or its transport holds unsent bytes,
 *     which a direct write would overtake: HubSocket keeps fd at -1 from
 *     the transport's pause_writing() to its resume_writing() with a
 *     high-water mark of 0), or more than MAX_IOV frames are pending;
 *   - the kernel takes less than everything (the rest stays pending, the
 *     flush gives it to the transport, which waits for the socket) or
 *     fails (the transport's own write meets the error and closes).
 *
 * A descriptor offered is always this connection's: uvloop and asyncio
 * call the protocol's connection_lost(), where HubSocket takes it away,
 * before they close it (uvloop's UVBaseTransport._call_connection_lost,
 * asyncio's _SelectorTransport._call_connection_lost), so the number
 * cannot have been reused by another connection.
 *
 * So the order of bytes on a socket, the slow-consumer bound and the
 * close handling stay the outbox's (hub/transport/outbox.py).  Built at
 * `pip install` when a C compiler is there (setup.py); without it the hub
 * runs the pure-Python loops and list (hub/outbox.py).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include "structmember.h"

#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#ifdef __linux__
#include <sys/syscall.h>
#include <unistd.h>
#endif

/* Frames stored in the object itself: steady traffic has one or a few. */
#define INLINE 4
/* A list grown past this many slots goes back to the inline ones when it
 * empties (a burst is over); smaller ones keep their memory. */
#define SHRINK_ABOVE 64
/* The most frames one sendmsg() takes (Linux's IOV_MAX). */
#define MAX_IOV 1024

static PyObject *s_outbox, *s_flush;

typedef struct {
    PyObject_HEAD
    int fd;
    Py_ssize_t n;
    PyObject **items;
    Py_ssize_t pushed;
    PyObject *inline_items[INLINE];
    Py_ssize_t cap;
    vectorcallfunc vectorcall;
} Pending;

static PyTypeObject PendingType;

#define IS_PENDING(o) Py_IS_TYPE((o), &PendingType)

/* The open run of fan_out_later(): broadcasts to one topic, in order, not
 * given to its subscribers yet.  groups[g] (the topic's v2 and v1 dicts,
 * which live as long as it does, so they name it) get wires[g]. */
typedef struct {
    PyObject *groups[2];  /* groups[0] NULL: no run is open */
    PyObject **wires[2];
    Py_ssize_t n[2], cap[2];
} OpenRun;

static OpenRun open_run;

static int settle_run(void);

/* Give the open run to its subscribers, if there is one: first thing in
 * anything that reads or writes a Pending. */
#define SETTLE() (open_run.groups[0] == NULL ? 0 : settle_run())

static int
pending_grow(Pending *p)
{
    Py_ssize_t cap = p->cap * 2;
    PyObject **items;
    if (p->items == p->inline_items) {
        items = PyMem_Malloc((size_t)cap * sizeof(PyObject *));
        if (items != NULL)
            memcpy(items, p->inline_items, (size_t)p->n * sizeof(PyObject *));
    }
    else {
        items = PyMem_Realloc(p->items, (size_t)cap * sizeof(PyObject *));
    }
    if (items == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    p->items = items;
    p->cap = cap;
    return 0;
}

static inline int
pending_add(Pending *p, PyObject *wire)
{
    if (p->n == p->cap && pending_grow(p) < 0)
        return -1;
    Py_INCREF(wire);
    p->items[p->n++] = wire;
    return 0;
}

/* Forget the first k frames (written), keeping the rest in order; their
 * references are the caller's to release. */
static void
pending_shift(Pending *p, Py_ssize_t k)
{
    p->n -= k;
    if (p->n > 0) {
        memmove(p->items, p->items + k, (size_t)p->n * sizeof(PyObject *));
        return;
    }
    p->pushed = 0;
    if (p->items != p->inline_items && p->cap > SHRINK_ABOVE) {
        PyMem_Free(p->items);
        p->items = p->inline_items;
        p->cap = INLINE;
    }
}

/* Drop the first k frames (written), keeping the rest in order.  Items are
 * bytes: releasing them runs no Python code. */
static void
pending_drop(Pending *p, Py_ssize_t k)
{
    for (Py_ssize_t i = 0; i < k; i++)
        Py_DECREF(p->items[i]);
    pending_shift(p, k);
}

static int
check_wire(PyObject *wire)
{
    if (PyBytes_CheckExact(wire))
        return 0;
    PyErr_Format(PyExc_TypeError, "a frame is bytes, not %.100s", Py_TYPE(wire)->tp_name);
    return -1;
}

static PyObject *pending_vectorcall(PyObject *, PyObject *const *, size_t, PyObject *);

static PyObject *
pending_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    if (PyTuple_GET_SIZE(args) != 0 || (kwds != NULL && PyDict_GET_SIZE(kwds) != 0)) {
        PyErr_SetString(PyExc_TypeError, "Pending() takes no arguments");
        return NULL;
    }
    Pending *p = PyObject_New(Pending, type);
    if (p == NULL)
        return NULL;
    p->fd = -1;
    p->n = 0;
    p->pushed = 0;
    p->items = p->inline_items;
    p->cap = INLINE;
    p->vectorcall = pending_vectorcall;
    return (PyObject *)p;
}

static void
pending_dealloc(Pending *p)
{
    for (Py_ssize_t i = 0; i < p->n; i++)
        Py_DECREF(p->items[i]);
    if (p->items != p->inline_items)
        PyMem_Free(p->items);
    PyObject_Free(p);
}

static PyObject *
pending_append(Pending *p, PyObject *wire)
{
    if (check_wire(wire) < 0 || SETTLE() < 0 || pending_add(p, wire) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
pending_vectorcall(PyObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    if (PyVectorcall_NARGS(nargsf) != 1 || kwnames != NULL) {
        PyErr_SetString(PyExc_TypeError, "Pending(wire) takes one frame");
        return NULL;
    }
    return pending_append((Pending *)self, args[0]);
}

static PyObject *
pending_push(Pending *p, PyObject *wire)
{
    if (check_wire(wire) < 0 || SETTLE() < 0 || pending_add(p, wire) < 0)
        return NULL;
    p->pushed += PyBytes_GET_SIZE(wire);
    return PyLong_FromSsize_t(p->pushed);
}

static PyObject *
pending_clear(Pending *p, PyObject *Py_UNUSED(ignored))
{
    if (SETTLE() < 0)
        return NULL;
    pending_drop(p, p->n); /* pushed goes to 0 with the last frame */
    Py_RETURN_NONE;
}

static Py_ssize_t
pending_length(Pending *p)
{
    if (SETTLE() < 0)
        return -1;
    return p->n;
}

static PyObject *
pending_item(Pending *p, Py_ssize_t i)
{
    if (SETTLE() < 0)
        return NULL;
    if (i < 0 || i >= p->n) {
        PyErr_SetString(PyExc_IndexError, "Pending index out of range");
        return NULL;
    }
    return Py_NewRef(p->items[i]);
}

static PyMethodDef pending_methods[] = {
    {"append", (PyCFunction)pending_append, METH_O, "Add a frame (its wire bytes)."},
    {"push", (PyCFunction)pending_push, METH_O,
     "Add a frame and count its bytes as pushed; returns the bytes pushed since the last clear."},
    {"clear", (PyCFunction)pending_clear, METH_NOARGS, "Drop every frame; pushed goes to 0."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef pending_members[] = {
    {"fd", T_INT, offsetof(Pending, fd), 0,
     "The socket the compiled loop may write to itself, or -1."},
    {"pushed", T_PYSSIZET, offsetof(Pending, pushed), READONLY,
     "Bytes added by push() since the list was last emptied."},
    {"__vectorcalloffset__", T_PYSSIZET, offsetof(Pending, vectorcall), READONLY},
    {NULL, 0, 0, 0, NULL},
};

static PySequenceMethods pending_as_sequence = {
    .sq_length = (lenfunc)pending_length,
    .sq_item = (ssizeargfunc)pending_item,
};

static PyTypeObject PendingType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "hub._writes.Pending",
    .tp_doc = PyDoc_STR(
        "Pending()\n\n"
        "The frames due on one socket, in order, with its descriptor (fd) and\n"
        "the bytes pushed since it was emptied.  Calling it appends a frame:\n"
        "it is the outbox's sink."),
    .tp_basicsize = sizeof(Pending),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_new = pending_new,
    .tp_dealloc = (destructor)pending_dealloc,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(Pending, vectorcall),
    .tp_as_sequence = &pending_as_sequence,
    .tp_methods = pending_methods,
    .tp_members = pending_members,
};

/* The frames a topic's subscribers share in one flush.  In a burst every
 * subscriber of a topic holds the same frames, in the same order, and the
 * kernel takes one contiguous buffer for about half the CPU of a vector
 * of small ones (about 22 against 40 ns per 150-byte frame here); so the
 * first time two subscribers in a row hold the same frames, they are
 * copied once into one buffer, sent whole to every subscriber that holds
 * them.  The frames are referenced while the buffer lives, so no frame
 * freed meanwhile can come back at the same address; and the references
 * of the lists that sent it whole are released with it, a subtraction per
 * frame instead of one release per frame and list. */
typedef struct {
    Py_ssize_t n;         /* frames (0: none remembered) */
    PyObject **items;     /* the frames, referenced */
    char *data;           /* their bytes, joined; NULL until a second match */
    size_t total;
    Py_ssize_t released;  /* lists that sent it whole and left it their references */
} Run;

static void
run_clear(Run *run)
{
    for (Py_ssize_t i = 0; i < run->n; i++) {
        /* At least the run's own reference is left: never 0 here. */
        Py_SET_REFCNT(run->items[i], Py_REFCNT(run->items[i]) - run->released);
        Py_DECREF(run->items[i]);
    }
    PyMem_Free(run->items);
    PyMem_Free(run->data);
    run->n = 0;
    run->items = NULL;
    run->data = NULL;
    run->total = 0;
    run->released = 0;
}

/* Whether p holds exactly the run's frames. */
static int
run_matches(Run *run, Pending *p)
{
    return run->n == p->n && memcmp(run->items, p->items, (size_t)p->n * sizeof(PyObject *)) == 0;
}

/* Remember p's frames (several) as the run; on failure (out of memory)
 * simply none is remembered. */
static void
run_remember(Run *run, Pending *p, size_t total)
{
    run_clear(run);
    PyObject **items = PyMem_Malloc((size_t)p->n * sizeof(PyObject *));
    if (items == NULL)
        return;
    for (Py_ssize_t i = 0; i < p->n; i++)
        items[i] = Py_NewRef(p->items[i]);
    run->items = items;
    run->n = p->n;
    run->total = total;
}

/* The run's frames as one buffer, joined at the first use; NULL when
 * there is no memory for it (the frames then go as a vector). */
static const char *
run_data(Run *run)
{
    if (run->data != NULL)
        return run->data;
    char *data = PyMem_Malloc(run->total);
    if (data == NULL)
        return NULL;
    char *at = data;
    for (Py_ssize_t i = 0; i < run->n; i++) {
        Py_ssize_t size = PyBytes_GET_SIZE(run->items[i]);
        memcpy(at, PyBytes_AS_STRING(run->items[i]), (size_t)size);
        at += size;
    }
    run->data = data;
    return data;
}

/* p's frames as a vector; returns their total size. */
static size_t
fill_iov(Pending *p, struct iovec *iov)
{
    size_t total = 0;
    for (Py_ssize_t i = 0; i < p->n; i++) {
        PyObject *item = p->items[i];
        iov[i].iov_base = PyBytes_AS_STRING(item);
        iov[i].iov_len = (size_t)PyBytes_GET_SIZE(item);
        total += iov[i].iov_len;
    }
    return total;
}

/* The writes are system calls made directly on Linux: glibc's send() and
 * sendmsg() are cancellation points, and in a process with threads (the
 * hub has them: libuv's worker pool, which uvloop starts for its address
 * lookups) each call goes through __pthread_enable_asynccancel() and its
 * disable: about 1% of the hub's CPU at one message per 10 ms in a perf
 * profile, as much as glibc's send() wrapper itself.  No thread of the hub
 * is ever cancelled. */
#ifdef __linux__
#define SEND(fd, data, size, flags) syscall(SYS_sendto, (fd), (data), (size), (flags), NULL, 0)
#define SENDMSG(fd, msg, flags) syscall(SYS_sendmsg, (fd), (msg), (flags))
#else
#define SEND(fd, data, size, flags) send((fd), (data), (size), (flags))
#define SENDMSG(fd, msg, flags) sendmsg((fd), (msg), (flags))
#endif

/* The n buffers of iov to fd, without blocking (one buffer: send()); retried
 * when a signal interrupts it. */
static ssize_t
send_retrying(int fd, struct iovec *iov, Py_ssize_t n)
{
    ssize_t sent;
    if (n == 1) {
        do
            sent = SEND(fd, iov[0].iov_base, iov[0].iov_len, MSG_DONTWAIT | MSG_NOSIGNAL);
        while (sent < 0 && errno == EINTR);
        return sent;
    }
    struct msghdr msg;
    memset(&msg, 0, sizeof(msg));
    msg.msg_iov = iov;
    msg.msg_iovlen = (size_t)n;
    do
        sent = SENDMSG(fd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
    while (sent < 0 && errno == EINTR);
    return sent;
}

/* Write p's frames to its socket if it may be.  Returns 1 when nothing is
 * left pending (adding what it wrote to *frames and *nbytes), 0 when the
 * outbox's own flush must do (the rest of) the work, -1 on a Python error.
 * No Python code runs here. */
static int
try_direct(Pending *p, Run *run, long long *frames, long long *nbytes)
{
    Py_ssize_t n = p->n;
    if (n == 0)
        return 1;
    if (p->fd < 0 || n > MAX_IOV)
        return 0;

    struct iovec iov[MAX_IOV];
    size_t total;
    ssize_t sent;
    int shared = n > 1 && run_matches(run, p);
    const char *joined = shared ? run_data(run) : NULL;
    if (joined != NULL) {
        total = run->total;
        struct iovec whole = {(void *)joined, total};
        sent = send_retrying(p->fd, &whole, 1);
        if (sent > 0 && (size_t)sent == total) {
            /* The run holds the same frames: p's references go with it. */
            run->released++;
            pending_shift(p, n);
            *frames += n;
            *nbytes += (long long)total;
            return 1;
        }
        if (sent <= 0)
            return 0; /* EAGAIN or an error: the transport's write sees to it */
        fill_iov(p, iov); /* where the kernel stopped, for the split below */
    }
    else {
        total = fill_iov(p, iov);
        if (n > 1 && !shared)
            run_remember(run, p, total);
        sent = send_retrying(p->fd, iov, n);
        if (sent <= 0)
            return 0; /* EAGAIN or an error: the transport's write sees to it */
    }
    if ((size_t)sent == total) {
        pending_drop(p, n);
        *frames += n;
        *nbytes += (long long)total;
        return 1;
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
    if (left > 0) {
        PyObject *rest = PyBytes_FromStringAndSize(
            (const char *)iov[k].iov_base + left, (Py_ssize_t)(iov[k].iov_len - left));
        if (rest == NULL) {
            /* Out of memory: what was sent must not be sent again, and
             * what is left cannot be sent whole; this stream is lost. */
            pending_drop(p, n);
            return -1;
        }
        Py_SETREF(p->items[k], rest);
    }
    pending_drop(p, k);
    *frames += k;
    *nbytes += (long long)sent;
    return 0;
}

/* outbox.flush() for the subscriptions whose frames the direct writes left
 * (or could not take): their sinks are not Pendings, or still hold frames. */
static int
slow_flushes(PyObject *group)
{
    PyObject *subs = PyDict_Keys(group); /* a copy: a flush may close */
    if (subs == NULL)
        return -1;
    Py_ssize_t count = PyList_GET_SIZE(subs);
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *sub = PyList_GET_ITEM(subs, i);
        PyObject *sink = PyDict_GetItemWithError(group, sub);
        if (sink == NULL) {
            if (PyErr_Occurred())
                goto error;
            continue; /* it left meanwhile, and scheduled its own flush */
        }
        if (IS_PENDING(sink) && ((Pending *)sink)->n == 0)
            continue;
        PyObject *outbox = PyObject_GetAttr(sub, s_outbox);
        if (outbox == NULL)
            goto error;
        PyObject *args[1] = {outbox};
        PyObject *r = PyObject_VectorcallMethod(
            s_flush, args, 1 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
        Py_DECREF(outbox);
        if (r == NULL)
            goto error;
        Py_DECREF(r);
    }
    Py_DECREF(subs);
    return 0;
error:
    Py_DECREF(subs);
    return -1;
}

PyDoc_STRVAR(flush_subscribers_doc,
"flush_subscribers(group) -> (frames, bytes)\n\n"
"Write the frames of each subscription of group (a dict of subscriptions\n"
"to sinks): directly to its socket where it may be, else with its\n"
"outbox's own flush().  Returns the frames and bytes written directly (the\n"
"rest the outboxes count themselves).");

static PyObject *
flush_subscribers(PyObject *module, PyObject *group)
{
    if (!PyDict_CheckExact(group)) {
        PyErr_SetString(PyExc_TypeError, "flush_subscribers(group: dict)");
        return NULL;
    }
    if (SETTLE() < 0)
        return NULL;
    long long frames = 0, nbytes = 0;
    int slow = 0;
    Py_ssize_t pos = 0;
    PyObject *sub, *sink;
    Run run = {0, NULL, NULL, 0, 0};
    /* No Python code runs in this loop: the dict cannot change under it. */
    while (PyDict_Next(group, &pos, &sub, &sink)) {
        int done = IS_PENDING(sink) ? try_direct((Pending *)sink, &run, &frames, &nbytes) : 0;
        if (done < 0) {
            run_clear(&run);
            return NULL;
        }
        slow |= done == 0;
    }
    run_clear(&run);
    if (slow && slow_flushes(group) < 0)
        return NULL;
    return Py_BuildValue("(LL)", frames, nbytes);
}

PyDoc_STRVAR(fan_out_doc,
"fan_out(group, wire, origin) -> int\n\n"
"Give the frame wire to every sink (the values of the dict group) but the\n"
"sink of the subscription origin: a Pending keeps it, any other sink is\n"
"called with it.  Returns how many got it.");

static PyObject *
fan_out(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !PyDict_CheckExact(args[0]) || !PyBytes_CheckExact(args[1])) {
        PyErr_SetString(PyExc_TypeError, "fan_out(group: dict, wire: bytes, origin)");
        return NULL;
    }
    if (SETTLE() < 0)
        return NULL;
    PyObject *group = args[0], *wire = args[1], *origin = args[2];
    PyObject *call_args[2] = {NULL, wire};
    Py_ssize_t pos = 0, count = 0;
    PyObject *sub, *sink;
    while (PyDict_Next(group, &pos, &sub, &sink)) {
        if (sub == origin)
            continue;
        if (IS_PENDING(sink)) {
            if (pending_add((Pending *)sink, wire) < 0)
                return NULL;
        }
        else {
            /* Another outbox's sink runs Python: it is held while it runs. */
            Py_INCREF(sink);
            PyObject *r = PyObject_Vectorcall(
                sink, call_args + 1, 1 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
            Py_DECREF(sink);
            if (r == NULL)
                return NULL;
            Py_DECREF(r);
        }
        count++;
    }
    return PyLong_FromSsize_t(count);
}

/* The lists filled since the last call hold a reference to each frame:
 * counted here once per frame for all of them. */
static void
take_references(PyObject **wires, Py_ssize_t n, Py_ssize_t *lists)
{
    if (*lists == 0)
        return;
    for (Py_ssize_t i = 0; i < n; i++)
        Py_SET_REFCNT(wires[i], Py_REFCNT(wires[i]) + *lists);
    *lists = 0;
}

/* Give the frames wires[0..n) to every sink of group, in order: a Pending
 * gets them copied in at once (their references are taken together), any
 * other sink is called with each. */
static int
fan_out_many(PyObject *group, PyObject **wires, Py_ssize_t n)
{
    Py_ssize_t pos = 0, lists = 0;
    PyObject *sub, *sink;
    int status = 0;
    while (PyDict_Next(group, &pos, &sub, &sink)) {
        if (IS_PENDING(sink)) {
            Pending *p = (Pending *)sink;
            while (p->cap - p->n < n) {
                if (pending_grow(p) < 0) {
                    status = -1;
                    goto done;
                }
            }
            memcpy(p->items + p->n, wires, (size_t)n * sizeof(PyObject *));
            p->n += n;
            lists++;
            continue;
        }
        /* Another outbox's sink runs Python, which may release what a list
         * holds: the lists' references are taken first.  The sink is held
         * while it runs.  (No PY_VECTORCALL_ARGUMENTS_OFFSET: wires[i - 1]
         * is not ours to lend.) */
        take_references(wires, n, &lists);
        Py_INCREF(sink);
        for (Py_ssize_t i = 0; i < n && status == 0; i++) {
            PyObject *r = PyObject_Vectorcall(sink, wires + i, 1, NULL);
            if (r == NULL)
                status = -1;
            Py_XDECREF(r);
        }
        Py_DECREF(sink);
        if (status < 0)
            goto done;
    }
done:
    take_references(wires, n, &lists);
    return status;
}

static int
settle_run(void)
{
    /* Detached first: a sink that runs Python may use a Pending, which
     * settles, and must find no run open. */
    OpenRun run = open_run;
    open_run.groups[0] = NULL;
    int status = 0;
    for (int g = 0; g < 2; g++) {
        if (status == 0 && run.n[g] > 0)
            status = fan_out_many(run.groups[g], run.wires[g], run.n[g]);
        for (Py_ssize_t i = 0; i < run.n[g]; i++)
            Py_DECREF(run.wires[g][i]);
        PyMem_Free(run.wires[g]);
        Py_DECREF(run.groups[g]);
    }
    return status;
}

static int
run_add(int g, PyObject *wire)
{
    if (open_run.n[g] == open_run.cap[g]) {
        Py_ssize_t cap = open_run.cap[g] ? 2 * open_run.cap[g] : 128;
        PyObject **wires = PyMem_Realloc(open_run.wires[g], (size_t)cap * sizeof(PyObject *));
        if (wires == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        open_run.wires[g] = wires;
        open_run.cap[g] = cap;
    }
    open_run.wires[g][open_run.n[g]++] = Py_NewRef(wire);
    return 0;
}

PyDoc_STRVAR(fan_out_later_doc,
"fan_out_later(v2, wire2, v1, wire1) -> int\n\n"
"Give the frame wire2 to every sink of the dict v2 and wire1 to every\n"
"sink of v1 (a wire of None: that group gets nothing), as fan_out() with\n"
"no sender would, but in the open run of the topic whose groups v2 and\n"
"v1 are: consecutive calls with the same two dicts are given to the\n"
"sinks together, before anything reads or writes a Pending or calls\n"
"another function of this module.  Returns how many sinks get a frame.");

static PyObject *
fan_out_later(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4 || !PyDict_CheckExact(args[0]) || !PyDict_CheckExact(args[2])
        || (args[1] != Py_None && !PyBytes_CheckExact(args[1]))
        || (args[3] != Py_None && !PyBytes_CheckExact(args[3]))) {
        PyErr_SetString(PyExc_TypeError,
                        "fan_out_later(v2: dict, wire2: bytes | None, "
                        "v1: dict, wire1: bytes | None)");
        return NULL;
    }
    PyObject *groups[2] = {args[0], args[2]}, *wires[2] = {args[1], args[3]};
    if (open_run.groups[0] != groups[0] || open_run.groups[1] != groups[1]) {
        if (SETTLE() < 0)
            return NULL;
        open_run.groups[0] = Py_NewRef(groups[0]);
        open_run.groups[1] = Py_NewRef(groups[1]);
        open_run.wires[0] = open_run.wires[1] = NULL;
        open_run.n[0] = open_run.n[1] = open_run.cap[0] = open_run.cap[1] = 0;
    }
    Py_ssize_t count = 0;
    for (int g = 0; g < 2; g++) {
        if (wires[g] == Py_None || PyDict_GET_SIZE(groups[g]) == 0)
            continue;
        if (run_add(g, wires[g]) < 0)
            return NULL;
        count += PyDict_GET_SIZE(groups[g]);
    }
    return PyLong_FromSsize_t(count);
}

PyDoc_STRVAR(settle_doc,
"settle() -> None\n\n"
"Give the open run of fan_out_later() to its sinks now: before a topic's\n"
"subscribers change.");

static PyObject *
settle(PyObject *module, PyObject *Py_UNUSED(ignored))
{
    if (SETTLE() < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"fan_out", (PyCFunction)(void (*)(void))fan_out, METH_FASTCALL, fan_out_doc},
    {"fan_out_later", (PyCFunction)(void (*)(void))fan_out_later, METH_FASTCALL,
     fan_out_later_doc},
    {"settle", settle, METH_NOARGS, settle_doc},
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
    if ((s_outbox = PyUnicode_InternFromString("outbox")) == NULL)
        return NULL;
    if ((s_flush = PyUnicode_InternFromString("flush")) == NULL)
        return NULL;
    if (PyType_Ready(&PendingType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Pending", (PyObject *)&PendingType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
