/* The native floor: the least work a websocket fan-out server can do on this
 * machine, the "what the kernel allows" column of the benchmark.
 *
 * One thread, epoll.  Each message's frame is built once, into an arena that
 * lives for one loop turn; every subscriber of the room gets a reference to it
 * (adjacent frames merge into one span), and at the end of the turn each
 * connection with something due gets one writev.  A socket that does not take
 * it all keeps the rest in its own backlog until it is writable.  No auth, no
 * protocol: it bounds what is possible, it is not a competitor.
 *
 * Same contract as the other peers of loadtest/bench (peers/_control.py):
 *   floor PORT CONTROL_PORT
 *   ws://127.0.0.1:PORT/ws/ROOM   upgrade, subscribe to ROOM, one text frame as the
 *                                 join ack, then every message of ROOM as a text frame;
 *   CONTROL_PORT, one line per command:
 *     P COUNT START NROOMS BODY [T]  message j goes to room o{(START+j) % NROOMS} and is
 *                                    {"t":T,"i":START+j,"body":"x"*BODY}; answers K
 *     C                              answers {"joined": N}
 *
 * build: cc -O2 -o floor floor.c   (the harness does it: loadtest/bench/build.py)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define MAX_EVENTS 1024
#define IOV_BATCH 1024
#define HEAD_MAX 8192

/* -- SHA-1 (RFC 3174), for Sec-WebSocket-Accept only ------------------------------ */

static uint32_t rol(uint32_t x, int n) { return x << n | x >> (32 - n); }

static void sha1(const unsigned char *msg, size_t len, unsigned char out[20]) {
    uint32_t h[5] = {0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0};
    size_t total = ((len + 8) / 64 + 1) * 64;
    unsigned char *m = calloc(total, 1);
    memcpy(m, msg, len);
    m[len] = 0x80;
    uint64_t bits = (uint64_t)len * 8;
    for (int i = 0; i < 8; i++) m[total - 1 - i] = (unsigned char)(bits >> (8 * i));
    for (size_t off = 0; off < total; off += 64) {
        uint32_t w[80];
        for (int i = 0; i < 16; i++)
            w[i] = (uint32_t)m[off + 4 * i] << 24 | (uint32_t)m[off + 4 * i + 1] << 16 |
                   (uint32_t)m[off + 4 * i + 2] << 8 | m[off + 4 * i + 3];
        for (int i = 16; i < 80; i++) w[i] = rol(w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16], 1);
        uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4];
        for (int i = 0; i < 80; i++) {
            uint32_t f, k;
            if (i < 20) {
                f = (b & c) | (~b & d);
                k = 0x5A827999;
            } else if (i < 40) {
                f = b ^ c ^ d;
                k = 0x6ED9EBA1;
            } else if (i < 60) {
                f = (b & c) | (b & d) | (c & d);
                k = 0x8F1BBCDC;
            } else {
                f = b ^ c ^ d;
                k = 0xCA62C1D6;
            }
            uint32_t t = rol(a, 5) + f + e + k + w[i];
            e = d;
            d = c;
            c = rol(b, 30);
            b = a;
            a = t;
        }
        h[0] += a;
        h[1] += b;
        h[2] += c;
        h[3] += d;
        h[4] += e;
    }
    free(m);
    for (int i = 0; i < 5; i++)
        for (int j = 0; j < 4; j++) out[4 * i + j] = (unsigned char)(h[i] >> (24 - 8 * j));
}

static void base64(const unsigned char *in, size_t n, char *out) {
    static const char t[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t o = 0;
    for (size_t i = 0; i < n; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16 | (i + 1 < n ? (uint32_t)in[i + 1] << 8 : 0) |
                     (i + 2 < n ? in[i + 2] : 0);
        out[o++] = t[v >> 18 & 63];
        out[o++] = t[v >> 12 & 63];
        out[o++] = i + 1 < n ? t[v >> 6 & 63] : '=';
        out[o++] = i + 2 < n ? t[v & 63] : '=';
    }
    out[o] = 0;
}

/* -- state ------------------------------------------------------------------------ */

struct span {
    uint32_t off, len;
};

enum { K_LISTEN, K_CONTROL_LISTEN, K_WS, K_CONTROL };

struct conn {
    int fd, kind, open, room, slot, dirty;
    char *head; /* the request until the upgrade; control: a partial line */
    size_t head_len;
    struct span *spans; /* this turn's frames, offsets into the arena */
    int nspans, cap_spans;
    char *backlog; /* bytes the socket did not take */
    size_t back_len, back_cap, back_off;
};

struct room {
    char *name;
    int *members, n, cap;
};

static int ep;
static struct conn **by_fd;
static int fd_cap;
static struct room *rooms;
static int nrooms, cap_rooms;
static int *room_index; /* open addressing over room names, -1 = empty */
static int index_cap = 4096;
static int joined;
static char *arena;
static size_t arena_len, arena_cap;
static int *dirty;
static int ndirty, cap_dirty;
static char body[65536];

static void *xrealloc(void *p, size_t n) {
    void *q = realloc(p, n);
    if (!q) {
        perror("realloc");
        exit(2);
    }
    return q;
}

static uint32_t hash(const char *s) {
    uint32_t h = 2166136261u;
    for (; *s; s++) h = (h ^ (unsigned char)*s) * 16777619u;
    return h;
}

static int room_of(const char *name, int create) {
    uint32_t i = hash(name) & (uint32_t)(index_cap - 1);
    for (;; i = (i + 1) & (uint32_t)(index_cap - 1)) {
        int r = room_index[i];
        if (r < 0) break;
        if (!strcmp(rooms[r].name, name)) return r;
    }
    if (!create || nrooms >= index_cap / 2) return -1;
    if (nrooms == cap_rooms) rooms = xrealloc(rooms, (cap_rooms = cap_rooms * 2 + 16) * sizeof *rooms);
    rooms[nrooms] = (struct room){.name = strdup(name)};
    room_index[i] = nrooms;
    return nrooms++;
}

static void watch(int fd, int kind) {
    if (fd >= fd_cap) {
        int old = fd_cap;
        fd_cap = fd * 2 + 64;
        by_fd = xrealloc(by_fd, (size_t)fd_cap * sizeof *by_fd);
        memset(by_fd + old, 0, (size_t)(fd_cap - old) * sizeof *by_fd);
    }
    struct conn *c = calloc(1, sizeof *c);
    c->fd = fd;
    c->kind = kind;
    c->room = -1;
    by_fd[fd] = c;
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = fd};
    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
}

static void forget(struct conn *c) {
    if (c->room >= 0) { /* swap-remove from the room */
        struct room *r = &rooms[c->room];
        int last = r->members[--r->n];
        r->members[c->slot] = last;
        by_fd[last]->slot = c->slot;
        joined--;
    }
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    by_fd[c->fd] = NULL;
    c->nspans = 0;
    if (c->dirty) { /* leave it out of this turn's flush */
        for (int i = 0; i < ndirty; i++)
            if (dirty[i] == c->fd) dirty[i] = -1;
    }
    free(c->head);
    free(c->spans);
    free(c->backlog);
    free(c);
}

static void want_out(struct conn *c, int on) {
    struct epoll_event ev = {.events = EPOLLIN | (on ? EPOLLOUT : 0), .data.fd = c->fd};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
}

static void keep(struct conn *c, const char *p, size_t n) {
    if (c->back_off && c->back_off == c->back_len) c->back_off = c->back_len = 0;
    if (c->back_len + n > c->back_cap) {
        c->back_cap = (c->back_len + n) * 2;
        c->backlog = xrealloc(c->backlog, c->back_cap);
    }
    memcpy(c->backlog + c->back_len, p, n);
    c->back_len += n;
}

/* -- publishing ---------------------------------------------------------------------- */

static uint32_t arena_frame(const char *payload, size_t n) {
    if (arena_len + n + 10 > arena_cap) {
        arena_cap = (arena_len + n + 10) * 2;
        arena = xrealloc(arena, arena_cap);
    }
    uint32_t off = (uint32_t)arena_len;
    char *f = arena + arena_len;
    size_t h = 2;
    f[0] = (char)0x81;
    if (n < 126) {
        f[1] = (char)n;
    } else {
        f[1] = 126;
        f[2] = (char)(n >> 8);
        f[3] = (char)n;
        h = 4;
    }
    memcpy(f + h, payload, n);
    arena_len += h + n;
    return off;
}

static void publish(int room, const char *payload, size_t n) {
    uint32_t off = arena_frame(payload, n), len = (uint32_t)(arena_len - off);
    struct room *r = &rooms[room];
    for (int i = 0; i < r->n; i++) {
        struct conn *c = by_fd[r->members[i]];
        if (c->nspans && c->spans[c->nspans - 1].off + c->spans[c->nspans - 1].len == off) {
            c->spans[c->nspans - 1].len += len; /* the frame before it is its neighbour */
            continue;
        }
        if (c->nspans == c->cap_spans)
            c->spans = xrealloc(c->spans, (size_t)(c->cap_spans = c->cap_spans * 2 + 8) * sizeof *c->spans);
        c->spans[c->nspans++] = (struct span){off, len};
        if (!c->dirty) {
            c->dirty = 1;
            if (ndirty == cap_dirty) dirty = xrealloc(dirty, (size_t)(cap_dirty = cap_dirty * 2 + 256) * sizeof *dirty);
            dirty[ndirty++] = c->fd;
        }
    }
}

/* One writev per connection with something due; what it does not take, it keeps. */
static void flush(void) {
    struct iovec iov[IOV_BATCH];
    for (int d = 0; d < ndirty; d++) {
        if (dirty[d] < 0) continue;
        struct conn *c = by_fd[dirty[d]];
        c->dirty = 0;
        if (c->back_len > c->back_off) { /* already behind: queue after what waits */
            for (int i = 0; i < c->nspans; i++) keep(c, arena + c->spans[i].off, c->spans[i].len);
            c->nspans = 0;
            continue;
        }
        int i = 0;
        while (i < c->nspans) {
            int k = 0;
            size_t want = 0;
            for (; k < IOV_BATCH && i + k < c->nspans; k++) {
                iov[k].iov_base = arena + c->spans[i + k].off;
                iov[k].iov_len = c->spans[i + k].len;
                want += iov[k].iov_len;
            }
            ssize_t w = writev(c->fd, iov, k);
            if (w == (ssize_t)want) {
                i += k;
                continue;
            }
            size_t done = w > 0 ? (size_t)w : 0;
            for (; i < c->nspans; i++) { /* keep the rest, from the first byte not taken */
                struct span s = c->spans[i];
                if (done >= s.len) {
                    done -= s.len;
                    continue;
                }
                keep(c, arena + s.off + done, s.len - done);
                done = 0;
            }
            want_out(c, 1);
        }
        c->nspans = 0;
    }
    ndirty = 0;
    arena_len = 0;
}

static void on_writable(struct conn *c) {
    ssize_t w = write(c->fd, c->backlog + c->back_off, c->back_len - c->back_off);
    if (w > 0) c->back_off += (size_t)w;
    if (c->back_off == c->back_len) {
        c->back_off = c->back_len = 0;
        want_out(c, 0);
    }
}

/* -- the control socket ------------------------------------------------------------- */

static void command(struct conn *c, char *line) {
    if (line[0] == 'P') {
        long count = 0, start = 0, nr = 1, size = 0;
        char stamp[32] = "";
        sscanf(line + 1, "%ld %ld %ld %ld %31s", &count, &start, &nr, &size, stamp);
        if (size < 0 || size >= (long)sizeof body) size = 0;
        if (!stamp[0]) { /* no stamp: the server's clock at publish time */
            struct timespec t;
            clock_gettime(CLOCK_REALTIME, &t);
            snprintf(stamp, sizeof stamp, "%lld", t.tv_sec * 1000000000LL + t.tv_nsec);
        }
        if (nr < 1) nr = 1;
        char *msg = malloc((size_t)size + 128);
        for (long j = 0; j < count; j++) {
            char name[32];
            snprintf(name, sizeof name, "o%ld", (start + j) % nr);
            int r = room_of(name, 0);
            int n = snprintf(msg, (size_t)size + 128, "{\"t\":%s,\"i\":%ld,\"body\":\"%.*s\"}", stamp,
                             start + j, (int)size, body);
            if (r >= 0) publish(r, msg, (size_t)n);
        }
        free(msg);
        (void)!write(c->fd, "K\n", 2);
    } else if (line[0] == 'C') {
        char out[64];
        int n = snprintf(out, sizeof out, "{\"joined\": %d}\n", joined);
        (void)!write(c->fd, out, (size_t)n);
    }
}

static void on_control(struct conn *c) {
    char buf[65536];
    ssize_t r = read(c->fd, buf, sizeof buf);
    if (r <= 0) {
        if (r < 0 && errno == EAGAIN) return;
        forget(c);
        return;
    }
    c->head = xrealloc(c->head, c->head_len + (size_t)r + 1);
    memcpy(c->head + c->head_len, buf, (size_t)r);
    c->head_len += (size_t)r;
    size_t start = 0;
    for (size_t i = 0; i < c->head_len; i++)
        if (c->head[i] == '\n') {
            c->head[i] = 0;
            command(c, c->head + start);
            start = i + 1;
        }
    memmove(c->head, c->head + start, c->head_len - start);
    c->head_len -= start;
}

/* -- websocket connections -------------------------------------------------------- */

static void on_ws(struct conn *c) {
    char buf[65536];
    ssize_t r = read(c->fd, buf, sizeof buf);
    if (r <= 0) {
        if (r < 0 && errno == EAGAIN) return;
        forget(c);
        return;
    }
    if (c->open) return; /* what clients send after the upgrade is not read */
    if (c->head_len + (size_t)r > HEAD_MAX) {
        forget(c);
        return;
    }
    c->head = xrealloc(c->head, c->head_len + (size_t)r + 1);
    memcpy(c->head + c->head_len, buf, (size_t)r);
    c->head_len += (size_t)r;
    c->head[c->head_len] = 0;
    if (!strstr(c->head, "\r\n\r\n")) return;
    /* GET /ws/ROOM HTTP/1.1: the room is the path's last segment. */
    char *sp = strchr(c->head, ' '), *end = sp ? strchr(sp + 1, ' ') : NULL;
    char *key = strcasestr(c->head, "\r\nSec-WebSocket-Key:");
    if (!sp || !end || !key) {
        forget(c);
        return;
    }
    *end = 0;
    char *slash = strrchr(sp + 1, '/');
    const char *name = slash ? slash + 1 : sp + 1;
    key += 20;
    while (*key == ' ') key++;
    size_t klen = strcspn(key, "\r");
    unsigned char src[128], digest[20];
    if (klen > 64) {
        forget(c);
        return;
    }
    memcpy(src, key, klen);
    memcpy(src + klen, "258EAFA5-E914-47DA-95CA-C5AB0DC85B11", 36);
    sha1(src, klen + 36, digest);
    char accept_key[32], resp[256];
    base64(digest, 20, accept_key);
    int n = snprintf(resp, sizeof resp,
                     "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                     "Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n"
                     "\x81\x0b{\"ok\":true}",
                     accept_key);
    int room = room_of(name, 1);
    if (room < 0 || write(c->fd, resp, (size_t)n) != n) {
        forget(c);
        return;
    }
    struct room *rm = &rooms[room];
    if (rm->n == rm->cap) rm->members = xrealloc(rm->members, (size_t)(rm->cap = rm->cap * 2 + 64) * sizeof *rm->members);
    c->room = room;
    c->slot = rm->n;
    rm->members[rm->n++] = c->fd;
    c->open = 1;
    joined++;
    free(c->head);
    c->head = NULL;
    c->head_len = 0;
}

static void on_accept(int lfd, int kind) {
    for (;;) {
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) return;
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        watch(fd, kind);
    }
}

static int listen_on(int port) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0), one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(fd, (struct sockaddr *)&a, sizeof a) || listen(fd, 4096)) {
        perror("listen");
        exit(1);
    }
    return fd;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s PORT CONTROL_PORT\n", argv[0]);
        return 2;
    }
    memset(body, 'x', sizeof body);
    room_index = malloc(sizeof *room_index * (size_t)index_cap);
    memset(room_index, 0xff, sizeof *room_index * (size_t)index_cap);
    ep = epoll_create1(EPOLL_CLOEXEC);
    watch(listen_on(atoi(argv[1])), K_LISTEN);
    watch(listen_on(atoi(argv[2])), K_CONTROL_LISTEN);
    printf("ready\n");
    fflush(stdout);
    struct epoll_event evs[MAX_EVENTS];
    for (;;) {
        int n = epoll_wait(ep, evs, MAX_EVENTS, -1);
        for (int i = 0; i < n; i++) {
            struct conn *c = by_fd[evs[i].data.fd];
            if (!c) continue;
            if (c->kind == K_LISTEN) {
                on_accept(c->fd, K_WS);
            } else if (c->kind == K_CONTROL_LISTEN) {
                on_accept(c->fd, K_CONTROL);
            } else {
                if (evs[i].events & EPOLLOUT) on_writable(c);
                if (by_fd[evs[i].data.fd] != c) continue;
                if (evs[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP))
                    (c->kind == K_WS ? on_ws : on_control)(c);
            }
        }
        flush();
    }
}
