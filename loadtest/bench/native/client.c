/* The benchmark's native load client: loadtest/bench/client.py in C.
 *
 * Why it exists: the Python client drains about 1M frames/s on its core, so
 * against a server that delivers more it measures itself.  This one does the
 * same job in one thread with epoll and reads several MB/s per syscall.
 *
 * It speaks the harness's line protocol of client.py, so that ClientPool can
 * run either (see client.py's docstring for the events):
 *   stdout: {"ev":"ready",...} once every connection is joined or failed, then
 *           {"ev":"n","n":COUNT,"a":ACTIVE} every 20 ms while the count moves,
 *           {"ev":"reset"}, {"ev":"sample"}, {"ev":"stats",...} on command;
 *   stdin:  reset | sample K | stats | quit (or end of file).
 *
 * The spec (written by loadgen.ClientPool, one item per line, fields split by
 * single spaces) replaces client.py's JSON:
 *   sample K | concurrency K | join_timeout SECONDS
 *   target IDX PROTO HOST PORT URL     (PROTO: phx, or plain, also called raw)
 *   conn IDX PATH ROOM TOKEN           (PATH already holds room and token; TOKEN "-": none)
 *
 * Protocols:
 *   phx   Supabase Realtime vsn 2.0.0: after the upgrade, a masked phx_join text
 *         frame for ROOM with TOKEN as access_token; the ok reply (ref "1") makes
 *         the connection ready; from then on binary frames (the kind 4 broadcasts)
 *         are counted, text frames (replies, presence, heartbeats) are not.  A
 *         Phoenix heartbeat every 25 s keeps idle sockets open.
 *   plain the small peers (Bun, the C floor, the Python probes): the room is in the
 *   (raw) URL; the server's first frame is its join ack; every later text frame
 *         is counted.
 * Every SAMPLE-th counted frame (over the process) is searched for "t":<ns> in its
 * first SCAN payload bytes, and now - t is one latency sample in ms.
 *
 * build: cc -O2 -o client client.c   (the harness does it: loadtest/bench/build.py)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* A hub kind 4 frame has topic, event and meta (about 90 bytes) before the
 * payload JSON, whose first key is "t". */
#define SCAN 200
/* One read takes up to this much: at ~200 bytes a frame, thousands of frames
 * per syscall, which is what makes the drain rate. */
#define SCRATCH (4u << 20)
#define HEARTBEAT_S 25.0
#define PROGRESS_S 0.020
#define MAX_EVENTS 512

enum { S_QUEUED, S_CONNECTING, S_UPGRADING, S_JOINING, S_READY, S_CLOSED, S_FAILED };

struct target {
    char *url;
    int phx;
    struct sockaddr_in addr;
    char hostport[96];
    long count; /* counted frames since reset, for per_url */
};

struct conn {
    int fd;
    uint8_t state, attempts, joined;
    int target;
    char *path, *room, *token;
    long count;
    double not_before, deadline;
    unsigned char *carry; /* bytes of a frame that has not fully arrived */
    uint32_t carry_len, carry_cap;
    unsigned char *out;   /* bytes the socket did not take yet (rare: the client writes little) */
    uint32_t out_len, out_cap;
};

static struct target *targets;
static int ntargets;
static struct conn *conns;
static int nconns;
static int sample_every = 16, concurrency = 100;
static double join_timeout = 60.0;
static int ep;
static unsigned char *scratch;

/* counters since the last reset */
static long total, active, seen;
static double *lat;
static size_t nlat, caplat;
static long closed;
static int codes[64][2];
static int ncodes;
static double base_cpu;

/* failure reasons while connecting */
static char *why[32];
static int why_n[32];
static int nwhy;

static double mono(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static long long wall_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_REALTIME, &t);
    return t.tv_sec * 1000000000LL + t.tv_nsec;
}

static double cpu_s(void) {
    struct rusage r;
    getrusage(RUSAGE_SELF, &r);
    return r.ru_utime.tv_sec + r.ru_utime.tv_usec / 1e6 + r.ru_stime.tv_sec +
           r.ru_stime.tv_usec / 1e6;
}

static void *xrealloc(void *p, size_t n) {
    void *q = realloc(p, n);
    if (!q) {
        perror("realloc");
        exit(2);
    }
    return q;
}

static uint64_t rng = 0x9E3779B97F4A7C15ull;
static uint32_t rnd(void) { /* xorshift64: mask keys need not be strong here */
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (uint32_t)(rng >> 16);
}

/* -- output: JSON lines to the harness ------------------------------------------- */

static void json_str(FILE *f, const char *s) {
    fputc('"', f);
    for (; *s; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\')
            fprintf(f, "\\%c", ch);
        else if (ch < 0x20)
            fprintf(f, "\\u%04x", ch);
        else
            fputc(ch, f);
    }
    fputc('"', f);
}

static void note_failure(const char *reason) {
    for (int i = 0; i < nwhy; i++)
        if (!strcmp(why[i], reason)) {
            why_n[i]++;
            return;
        }
    if (nwhy < 31) {
        why[nwhy] = strdup(reason);
        why_n[nwhy++] = 1;
    } else { /* every failure is counted, past 31 distinct reasons under one */
        if (nwhy == 31) {
            why[nwhy] = strdup("other reasons");
            why_n[nwhy++] = 0;
        }
        why_n[31]++;
    }
}

/* -- writing (handshake, join, pongs, heartbeats) ----------------------------------- */

static void want_out(struct conn *c, int on) {
    struct epoll_event ev = {.events = EPOLLIN | (on ? EPOLLOUT : 0), .data.u32 = (uint32_t)(c - conns)};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
}

static void send_bytes(struct conn *c, const void *buf, size_t n) {
    if (!c->out_len) {
        ssize_t w = write(c->fd, buf, n);
        if (w == (ssize_t)n) return;
        if (w < 0) {
            if (errno != EAGAIN) return; /* the read side sees the error */
            w = 0;
        }
        buf = (const char *)buf + w;
        n -= (size_t)w;
        want_out(c, 1);
    }
    if (c->out_len + n > c->out_cap) {
        c->out_cap = (uint32_t)(c->out_len + n) * 2;
        c->out = xrealloc(c->out, c->out_cap);
    }
    memcpy(c->out + c->out_len, buf, n);
    c->out_len += (uint32_t)n;
}

static void flush_out(struct conn *c) {
    ssize_t w = write(c->fd, c->out, c->out_len);
    if (w <= 0) return;
    memmove(c->out, c->out + w, c->out_len - (size_t)w);
    c->out_len -= (uint32_t)w;
    if (!c->out_len) want_out(c, 0);
}

/* A client frame (FIN, opcode) masked with a fresh key, as RFC 6455 requires. */
static void send_frame(struct conn *c, int opcode, const unsigned char *p, size_t n) {
    unsigned char stack[1024];
    unsigned char *f = n + 14 <= sizeof stack ? stack : malloc(n + 14);
    size_t h = 2;
    f[0] = (unsigned char)(0x80 | opcode);
    if (n < 126) {
        f[1] = (unsigned char)(0x80 | n);
    } else if (n < 65536) {
        f[1] = 0x80 | 126;
        f[2] = (unsigned char)(n >> 8);
        f[3] = (unsigned char)n;
        h = 4;
    } else {
        f[1] = 0x80 | 127;
        for (int i = 0; i < 8; i++) f[2 + i] = (unsigned char)((uint64_t)n >> (56 - 8 * i));
        h = 10;
    }
    uint32_t key = rnd();
    memcpy(f + h, &key, 4);
    const unsigned char *k = f + h;
    for (size_t i = 0; i < n; i++) f[h + 4 + i] = p[i] ^ k[i & 3];
    send_bytes(c, f, h + 4 + n);
    if (f != stack) free(f);
}

static void send_upgrade(struct conn *c) {
    static const char b64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    unsigned char raw[18] = {0};
    char key[25];
    for (int i = 0; i < 16; i++) raw[i] = (unsigned char)rnd();
    for (int i = 0, o = 0; i < 18; i += 3) { /* 16 bytes -> 22 chars + "==" */
        uint32_t v = (uint32_t)raw[i] << 16 | (uint32_t)raw[i + 1] << 8 | raw[i + 2];
        for (int j = 0; j < 4 && o < 24; j++) key[o++] = b64[(v >> (18 - 6 * j)) & 63];
    }
    key[22] = key[23] = '=';
    key[24] = 0;
    char req[4096];
    int n = snprintf(req, sizeof req,
                     "GET %s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n",
                     c->path, targets[c->target].hostport, key);
    send_bytes(c, req, (size_t)n);
}

static void send_join(struct conn *c) {
    char buf[4096];
    int n;
    if (c->token)
        n = snprintf(buf, sizeof buf,
                     "[\"1\",\"1\",\"%s\",\"phx_join\",{\"config\":{\"broadcast\":{\"ack\":false,"
                     "\"self\":false},\"presence\":{\"key\":\"\",\"enabled\":false},"
                     "\"postgres_changes\":[],\"private\":false},\"access_token\":\"%s\"}]",
                     c->room, c->token);
    else
        n = snprintf(buf, sizeof buf,
                     "[\"1\",\"1\",\"%s\",\"phx_join\",{\"config\":{\"broadcast\":{\"ack\":false,"
                     "\"self\":false},\"presence\":{\"key\":\"\",\"enabled\":false},"
                     "\"postgres_changes\":[],\"private\":false}}]",
                     c->room);
    send_frame(c, 0x1, (unsigned char *)buf, (size_t)n);
}

/* -- connection life -------------------------------------------------------------- */

static int inflight, resolved, ready_emitted;
static int next_conn; /* the first connection not yet started (retries move it back) */

static void drop(struct conn *c) {
    if (c->fd >= 0) {
        epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
        close(c->fd);
        c->fd = -1;
    }
    c->carry_len = c->out_len = 0;
}

/* Before it is ready: retry a connection the network lost (as client.py does
 * for OSError), up to 3 attempts; a refusal by the server is final. */
static void fail(struct conn *c, const char *reason, int retry) {
    int was_inflight = c->state >= S_CONNECTING && c->state <= S_JOINING;
    drop(c);
    if (was_inflight) inflight--;
    if (retry && c->attempts < 3) {
        c->state = S_QUEUED;
        c->not_before = mono() + 0.2 * c->attempts;
        if (c - conns < next_conn) next_conn = (int)(c - conns);
        return;
    }
    c->state = S_FAILED;
    resolved++;
    note_failure(reason);
}

static void start(struct conn *c) {
    c->attempts++;
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd < 0) {
        c->state = S_CONNECTING;
        inflight++;
        fail(c, "OSError: socket", 1);
        return;
    }
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.u32 = (uint32_t)(c - conns)};
    epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev);
    c->state = S_CONNECTING;
    c->deadline = mono() + join_timeout;
    inflight++;
    struct target *t = &targets[c->target];
    if (connect(c->fd, (struct sockaddr *)&t->addr, sizeof t->addr) < 0 && errno != EINPROGRESS) {
        char r[96];
        snprintf(r, sizeof r, "ConnectionError: connect: %s", strerror(errno));
        fail(c, r, 1);
    }
}

static void become_ready(struct conn *c) {
    c->state = S_READY;
    c->joined = 1;
    inflight--;
    resolved++;
}

static void record_close(const unsigned char *p, uint64_t len) {
    int code = len >= 2 ? (p[0] << 8 | p[1]) : 1005;
    for (int i = 0; i < ncodes; i++)
        if (codes[i][0] == code) {
            codes[i][1]++;
            return;
        }
    if (ncodes < 64) {
        codes[ncodes][0] = code;
        codes[ncodes++][1] = 1;
    }
}

/* A latency sample from "t":<ns> near the start of the payload. */
static void sample_latency(const unsigned char *p, uint64_t len) {
    size_t n = len < SCAN ? (size_t)len : SCAN;
    const unsigned char *m = memmem(p, n, "\"t\":", 4);
    if (!m) return;
    const unsigned char *e = p + n;
    m += 4;
    while (m < e && *m == ' ') m++;
    long long t = 0;
    int digits = 0;
    while (m < e && *m >= '0' && *m <= '9' && digits < 20) {
        t = t * 10 + (*m++ - '0');
        digits++;
    }
    if (!digits) return;
    if (nlat == caplat) {
        caplat = caplat ? caplat * 2 : 65536;
        lat = xrealloc(lat, caplat * sizeof *lat);
    }
    lat[nlat++] = (double)(wall_ns() - t) / 1e6;
}

/* A frame while joining: the join's reply (phx) or the server's ack (plain). */
static void joining_frame(struct conn *c, int op, const unsigned char *p, uint64_t len) {
    if (op == 0x8) {
        char r[160];
        int code = len >= 2 ? (p[0] << 8 | p[1]) : 1005;
        snprintf(r, sizeof r, "ConnectionError: closed while joining: %d", code);
        fail(c, r, 0);
        return;
    }
    if (!targets[c->target].phx) {
        become_ready(c);
        return;
    }
    /* ["1","1",TOPIC,"phx_reply",{"status":"ok",...}]: our join's reply. */
    if (op != 0x1 || len < 9 || memcmp(p, "[\"1\",\"1\",", 9)) return;
    if (!memmem(p, len, "\"phx_reply\"", 11)) return;
    if (memmem(p, len, "\"status\":\"ok\"", 13)) {
        become_ready(c);
    } else {
        char r[200];
        snprintf(r, sizeof r, "ConnectionError: join refused: %.*s", (int)(len < 120 ? len : 120),
                 (const char *)p);
        fail(c, r, 0);
    }
}

/* Parse whole frames in p[0..n); returns the bytes consumed.  The hot loop. */
static size_t frames(struct conn *c, const unsigned char *p, size_t n) {
    size_t pos = 0;
    const unsigned char want = targets[c->target].phx ? 0x82 : 0x81;
    long k = 0;
    while (n - pos >= 2) {
        const unsigned char *f = p + pos;
        uint64_t len = f[1] & 0x7F;
        size_t h = 2;
        if (len == 126) {
            if (n - pos < 4) break;
            len = (uint64_t)f[2] << 8 | f[3];
            h = 4;
        } else if (len == 127) {
            if (n - pos < 10) break;
            len = 0;
            for (int i = 0; i < 8; i++) len = len << 8 | f[2 + i];
            h = 10;
        }
        if (len > n - pos - h) break;
        const unsigned char *payload = f + h;
        pos += h + (size_t)len;
        if (c->state == S_READY) {
            if (f[0] == want && len > 1) {
                k++;
                if (++seen % sample_every == 0) sample_latency(payload, len);
            } else if (f[0] == 0x88) {
                record_close(payload, len);
            } else if (f[0] == 0x89) {
                send_frame(c, 0xA, payload, (size_t)len);
            }
        } else if (c->state == S_JOINING) {
            joining_frame(c, f[0] & 0x0F, payload, len);
            if (c->state == S_QUEUED || c->state == S_FAILED) return n;
        }
    }
    if (k) {
        if (!c->count) active++;
        c->count += k;
        total += k;
        targets[c->target].count += k;
    }
    return pos;
}

static void on_readable(struct conn *c) {
    size_t have = c->carry_len;
    if (have) memcpy(scratch, c->carry, have);
    ssize_t r = read(c->fd, scratch + have, SCRATCH - have);
    if (r <= 0) {
        if (r < 0 && (errno == EAGAIN || errno == EINTR)) return;
        if (c->state == S_READY) {
            drop(c);
            c->state = S_CLOSED;
            closed++;
        } else {
            fail(c, "ConnectionError: lost while joining", 1);
        }
        return;
    }
    size_t n = have + (size_t)r, pos = 0;
    if (c->state == S_UPGRADING) {
        unsigned char *e = memmem(scratch, n, "\r\n\r\n", 4);
        if (!e) {
            pos = 0;
            goto keep;
        }
        if (n < 12 || memcmp(scratch, "HTTP/1.1 101", 12)) {
            char rs[200];
            snprintf(rs, sizeof rs, "ConnectionError: upgrade refused: %.*s",
                     (int)(n < 100 ? n : 100), (const char *)scratch);
            for (char *q = rs; *q; q++)
                if (*q == '\r' || *q == '\n') *q = ' ';
            fail(c, rs, 0);
            return;
        }
        pos = (size_t)(e + 4 - scratch);
        c->state = S_JOINING;
        if (targets[c->target].phx) send_join(c);
    }
    if (c->state == S_JOINING || c->state == S_READY) {
        pos += frames(c, scratch + pos, n - pos);
        if (c->state != S_JOINING && c->state != S_READY) return;
    }
keep:
    if (n - pos > SCRATCH / 2) {
        fail(c, "ConnectionError: frame too large", 0);
        return;
    }
    c->carry_len = (uint32_t)(n - pos);
    if (c->carry_len > c->carry_cap) {
        c->carry_cap = c->carry_len < 4096 ? 4096 : c->carry_len * 2;
        c->carry = xrealloc(c->carry, c->carry_cap);
    }
    if (c->carry_len) memcpy(c->carry, scratch + pos, c->carry_len);
}

static void on_writable(struct conn *c) {
    if (c->state == S_CONNECTING) {
        int err = 0;
        socklen_t l = sizeof err;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &l);
        if (err) {
            char r[96];
            snprintf(r, sizeof r, "ConnectionError: connect: %s", strerror(err));
            fail(c, r, 1);
            return;
        }
        c->state = S_UPGRADING;
        want_out(c, 0);
        send_upgrade(c);
        return;
    }
    if (c->out_len) flush_out(c);
}

/* -- the harness's commands ------------------------------------------------------- */

static void emit_ready(double secs, double cpu) {
    long joined = 0;
    for (int i = 0; i < nconns; i++) joined += conns[i].joined;
    printf("{\"ev\":\"ready\",\"joined\":%ld,\"failed\":{", joined);
    for (int i = 0; i < nwhy; i++) {
        if (i) putchar(',');
        json_str(stdout, why[i]);
        printf(":%d", why_n[i]);
    }
    printf("},\"secs\":%.6f,\"cpu\":%.6f,\"join_ms\":[]}\n", secs, cpu);
    fflush(stdout);
}

static void emit_stats(void) {
    /* Read before printing: a million latency samples take a good part of a
     * second to format, which is not the measured phase's. */
    double cpu = cpu_s() - base_cpu;
    long open = 0, mn = -1, mx = 0, zero = 0, joined = 0;
    for (int i = 0; i < nconns; i++) {
        struct conn *c = &conns[i];
        if (!c->joined) continue;
        joined++;
        open += c->state == S_READY;
        if (mn < 0 || c->count < mn) mn = c->count;
        if (c->count > mx) mx = c->count;
        zero += c->count == 0;
    }
    printf("{\"ev\":\"stats\",\"count\":%ld,\"lat\":[", total);
    for (size_t i = 0; i < nlat; i++) printf(i ? ",%.4f" : "%.4f", lat[i]);
    printf("],\"cpu\":%.6f,\"conns\":%ld,\"open\":%ld,\"closed\":%ld,\"close_codes\":{",
           cpu, joined, open, closed);
    for (int i = 0; i < ncodes; i++) printf(i ? ",\"%d\":%d" : "\"%d\":%d", codes[i][0], codes[i][1]);
    printf("},\"min_per_conn\":%ld,\"max_per_conn\":%ld,\"zero_conns\":%ld,\"per_url\":{",
           mn < 0 ? 0 : mn, mx, zero);
    for (int i = 0; i < ntargets; i++) {
        if (i) putchar(',');
        json_str(stdout, targets[i].url);
        printf(":%ld", targets[i].count);
    }
    printf("}}\n");
    fflush(stdout);
}

static void quit(void) {
    /* Reset every socket (SO_LINGER 0): no TIME_WAIT left to eat ephemeral ports. */
    struct linger lg = {1, 0};
    for (int i = 0; i < nconns; i++)
        if (conns[i].fd >= 0) {
            setsockopt(conns[i].fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
            close(conns[i].fd);
        }
    exit(0);
}

static char line[256];
static size_t line_len;

static void on_stdin(void) {
    char buf[256];
    ssize_t r = read(0, buf, sizeof buf);
    if (r <= 0) {
        if (r < 0 && errno == EINTR) return;
        quit();
    }
    for (ssize_t i = 0; i < r; i++) {
        if (buf[i] != '\n') {
            if (line_len < sizeof line - 1) line[line_len++] = buf[i];
            continue;
        }
        line[line_len] = 0;
        line_len = 0;
        if (!strcmp(line, "quit")) {
            quit();
        } else if (!strcmp(line, "reset")) {
            total = active = seen = 0;
            nlat = 0;
            for (int j = 0; j < nconns; j++) conns[j].count = 0;
            for (int j = 0; j < ntargets; j++) targets[j].count = 0;
            base_cpu = cpu_s();
            puts("{\"ev\":\"reset\"}");
            fflush(stdout);
        } else if (!strncmp(line, "sample ", 7)) {
            sample_every = atoi(line + 7);
            if (sample_every < 1) sample_every = 1;
            puts("{\"ev\":\"sample\"}");
            fflush(stdout);
        } else if (!strcmp(line, "stats")) {
            emit_stats();
        }
    }
}

/* -- the spec ------------------------------------------------------------------------ */

static void read_spec(const char *path) {
    FILE *f = fopen(path, "r");
    if (!f) {
        perror(path);
        exit(2);
    }
    char *buf = NULL;
    size_t cap = 0;
    int capc = 0, capt = 0;
    while (getline(&buf, &cap, f) > 0) {
        buf[strcspn(buf, "\n")] = 0;
        char *save, *kind = strtok_r(buf, " ", &save);
        if (!kind) continue;
        if (!strcmp(kind, "sample")) {
            sample_every = atoi(strtok_r(NULL, " ", &save));
        } else if (!strcmp(kind, "concurrency")) {
            concurrency = atoi(strtok_r(NULL, " ", &save));
        } else if (!strcmp(kind, "join_timeout")) {
            join_timeout = atof(strtok_r(NULL, " ", &save));
        } else if (!strcmp(kind, "target")) {
            if (ntargets == capt) targets = xrealloc(targets, (capt = capt * 2 + 4) * sizeof *targets);
            struct target *t = &targets[ntargets++];
            memset(t, 0, sizeof *t);
            strtok_r(NULL, " ", &save); /* IDX: targets come in order */
            const char *proto = strtok_r(NULL, " ", &save);
            const char *host = strtok_r(NULL, " ", &save);
            int port = atoi(strtok_r(NULL, " ", &save));
            t->url = strdup(strtok_r(NULL, " ", &save));
            if (!strcmp(proto, "phx")) {
                t->phx = 1;
            } else if (strcmp(proto, "plain") && strcmp(proto, "raw")) {
                fprintf(stderr, "unsupported protocol %s\n", proto);
                exit(2);
            }
            t->addr.sin_family = AF_INET;
            t->addr.sin_port = htons((uint16_t)port);
            if (inet_pton(AF_INET, host, &t->addr.sin_addr) != 1) {
                fprintf(stderr, "not an IPv4 address: %s\n", host);
                exit(2);
            }
            snprintf(t->hostport, sizeof t->hostport, "%s:%d", host, port);
        } else if (!strcmp(kind, "conn")) {
            if (nconns == capc) conns = xrealloc(conns, (capc = capc * 2 + 64) * sizeof *conns);
            struct conn *c = &conns[nconns++];
            memset(c, 0, sizeof *c);
            c->fd = -1;
            c->target = atoi(strtok_r(NULL, " ", &save));
            c->path = strdup(strtok_r(NULL, " ", &save));
            c->room = strdup(strtok_r(NULL, " ", &save));
            const char *tok = strtok_r(NULL, " ", &save);
            c->token = tok && strcmp(tok, "-") ? strdup(tok) : NULL;
        }
    }
    free(buf);
    fclose(f);
    if (sample_every < 1) sample_every = 1;
    if (concurrency < 1) concurrency = 1;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s SPEC\n", argv[0]);
        return 2;
    }
    read_spec(argv[1]);
    rng ^= (uint64_t)wall_ns() ^ ((uint64_t)getpid() << 32);
    scratch = malloc(SCRATCH);
    ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event sev = {.events = EPOLLIN, .data.u32 = UINT32_MAX};
    epoll_ctl(ep, EPOLL_CTL_ADD, 0, &sev);
    fcntl(0, F_SETFL, fcntl(0, F_GETFL) | O_NONBLOCK);

    double cpu0 = cpu_s(), t0 = mono(), next_progress = t0, next_heartbeat = t0 + HEARTBEAT_S;
    long last_total = -1;
    static const char hb[] = "[null,\"hb\",\"phoenix\",\"heartbeat\",{}]";
    struct epoll_event evs[MAX_EVENTS];
    for (;;) {
        double now = mono();
        if (!ready_emitted) {
            /* Start connections, at most `concurrency` in flight; retries come back queued. */
            for (int i = next_conn; i < nconns && inflight < concurrency; i++) {
                struct conn *c = &conns[i];
                if (c->state == S_QUEUED && c->not_before <= now) start(c);
                if (i == next_conn && c->state != S_QUEUED) next_conn++;
            }
            for (int i = 0; i < nconns; i++) {
                struct conn *c = &conns[i];
                if (c->state >= S_CONNECTING && c->state <= S_JOINING && now > c->deadline)
                    fail(c, "TimeoutError", 0);
            }
            if (resolved == nconns) {
                ready_emitted = 1;
                emit_ready(now - t0, cpu_s() - cpu0);
                base_cpu = cpu_s();
            }
        } else {
            if (now >= next_progress) {
                next_progress = now + PROGRESS_S;
                if (total != last_total) {
                    last_total = total;
                    printf("{\"ev\":\"n\",\"n\":%ld,\"a\":%ld}\n", total, active);
                    fflush(stdout);
                }
            }
            if (now >= next_heartbeat) {
                next_heartbeat = now + HEARTBEAT_S;
                for (int i = 0; i < nconns; i++)
                    if (conns[i].state == S_READY && targets[conns[i].target].phx)
                        send_frame(&conns[i], 0x1, (const unsigned char *)hb, sizeof hb - 1);
            }
        }
        int wait_ms = ready_emitted ? (int)((next_progress - mono()) * 1000) + 1 : 10;
        if (wait_ms < 0) wait_ms = 0;
        int n = epoll_wait(ep, evs, MAX_EVENTS, wait_ms);
        for (int i = 0; i < n; i++) {
            uint32_t id = evs[i].data.u32;
            if (id == UINT32_MAX) {
                on_stdin();
                continue;
            }
            struct conn *c = &conns[id];
            if (c->fd < 0) continue;
            if (evs[i].events & EPOLLOUT) on_writable(c);
            if (c->fd >= 0 && evs[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP)) {
                if (c->state == S_CONNECTING) {
                    on_writable(c); /* an error shows as writable too: SO_ERROR says which */
                    if (c->fd < 0 || c->state == S_CONNECTING) continue;
                }
                on_readable(c);
            }
        }
    }
}
