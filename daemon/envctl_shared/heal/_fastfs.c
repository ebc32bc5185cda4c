/*
 * envctl_shared.heal._fastfs — the healer's per-directory hot loop, in C.
 *
 * Why C: a walk costs one metadata call per entry, and on a local disk that call takes ~1 µs;
 * a Python loop around it took 8 µs per compliant entry and ~60 µs per fixed one, which made
 * `envctl check` 2× slower than `find` and `envctl heal` 3× slower than `chgrp -R && chmod -R`.
 * Here a whole batch of entries is listed, inspected and fixed with the GIL released, so
 * walk threads on NFS/FUSE really overlap and Python only sees what needs a decision.
 *
 * This module executes rules; it does not make them. What "correct" means stays in
 * envctl_shared.policy, compiled once per root into a Rules object (the tables of wanted
 * permission bits for every st_mode — of an entry and of the root itself —, the group, the
 * protected owners, the members of a members-only root). classify() is the one place their
 * order is applied (another mount, special, compliant, protected, foreign), for the walks,
 * the scans, the poller's stamp check and Python's slow path (judge) alike. Entries never
 * changed come back as skipped with their reason; an entry that changed between inspection
 * and fix is handed back to Python's slow path, which judges it again here.
 *
 * The watcher's per-event work is here too (events: one read batch of inotify events reduced
 * to what Python acts on; the three inotify calls): a Python step per event cost more than
 * the heal it asked for.
 *
 * There is one walk (tree_walk) and it has visit modes: heal/check (judge and heal every
 * entry, the GIL released), the poller's stamp check (known directories against their stamps)
 * and list (the directories the inotify watcher must watch, each handed to Python with an fd
 * on it). It has no recursion, keeps at most WINDOW directory fds whatever the depth, reopens
 * a level on the way back up only as the very directory it was, never leaves the root's mount,
 * and names entries by (directory node, name), never by a path string. The fast path keeps the
 * healer's safety rules:
 *
 *   - entries are inspected with statx(AT_SYMLINK_NOFOLLOW) relative to a directory fd, or
 *     after an entry fixed in the same directory, opened O_PATH|O_NOFOLLOW relative to it and
 *     judged by that fd's own statx (then healed through it: the very inode judged);
 *   - an entry is changed only through an O_PATH|O_NOFOLLOW fd whose own statx shows the very
 *     inode (same ino, type and owner) that was judged;
 *   - "another mount" is another statx mount id (st_dev only without one): on overlayfs a
 *     regular file reports its layer's st_dev;
 *   - a directory reopened on the way back up (through its child's "..") must show the inode,
 *     device and mount it had;
 *   - statx uses AT_STATX_DONT_SYNC: on NFS/FUSE the attributes the lookup just returned are
 *     used instead of a second GETATTR round trip (a local filesystem ignores the flag).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dirent.h>
#include <limits.h>
#include <pthread.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/inotify.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <unistd.h>
#include <linux/openat2.h>

#ifndef AT_STATX_DONT_SYNC
#define AT_STATX_DONT_SYNC 0x4000
#endif
#ifndef STATX_MNT_ID
#define STATX_MNT_ID 0x1000U
#endif
#ifndef SYS_openat2
#define SYS_openat2 437
#endif
#ifndef SYS_fchmodat2
#define SYS_fchmodat2 452 /* the same number on every architecture (Linux >= 6.6) */
#endif

/* STATX_MNT_ID costs nothing (the kernel reads it off the path's mount), so every statx asks
 * for it: the mount id, not st_dev, says whether an entry is on the root's mount. On overlayfs
 * a regular file reports its layer's st_dev while it is on the overlay mount like its parent. */
#define STATX_WANT (STATX_TYPE | STATX_MODE | STATX_UID | STATX_GID | STATX_INO | \
                    STATX_MTIME | STATX_CTIME | STATX_MNT_ID)
#define STATX_MNT_OFFSET 144 /* stx_mnt_id; glibc 2.36's struct statx predates the field */
#define NO_FIX 0xFFFF        /* table value: never fix here (special files: only reported) */
#define TABLE_BYTES (65536 * 2)
/* Directory fds a walk keeps open: the deepest WINDOW levels (and the start). Deeper trees
 * reopen a level on the way back up through its child's "..", its identity checked. */
#define WINDOW 48
#define NO_NODE ((size_t)-1)

typedef union {
    struct statx sx;
    unsigned char raw[256];
} statx_buf;

/* One entry's outcome in a batch. Compliant entries get no record, only a count. */
enum outcome {
    COMPLIANT,      /* no record, only a count */
    SUBDIR,         /* scan: a directory, not inspected (the caller visits it) */
    ATTENTION,      /* changed under us (swapped, re-owned, moved): Python re-judges it */
    ERROR,          /* a syscall failed: err */
    VANISHED,       /* gone since listed */
    FIXED,          /* healed here: set_gid / set_mode */
    WOULD_FIX,      /* wrong, fix off (check, dry run) */
    SKIP_PROTECTED, /* wrong, but owned by a protected uid: left alone (a directory is entered) */
    SKIP_SPECIAL,   /* fifo, socket, device: only reported */
    SKIP_MOUNT,     /* on another mount: neither changed nor entered */
    SKIP_FOREIGN,   /* wrong, owned by a non-member of a members-only root: left alone, entered */
};
static const char *const skip_reason[] = {
    [SKIP_PROTECTED] = "protected", [SKIP_SPECIAL] = "special", [SKIP_MOUNT] = "mount",
    [SKIP_FOREIGN] = "foreign"};

typedef struct {
    size_t node;     /* the directory the entry is in (scan: always 0, the directory scanned) */
    size_t name_off; /* the entry's name, in the batch's output arena */
    enum outcome what;
    int err;
    uint32_t mode, uid, gid;
    int set_gid;  /* FIXED: the group was changed */
    int set_mode; /* FIXED: the new permission bits, or -1 */
} record;

typedef struct {
    char *buf;
    size_t len, cap;
} arena;

/* A directory the walk entered. Records name their directory by node, never by a path string:
 * a path per record would cost depth x entries bytes (quadratic on a deep chain, and gigabytes
 * with long names). Python joins the names up the parents when it reports one. */
typedef struct {
    size_t parent; /* NO_NODE for the start directory */
    size_t name_off; /* in the output arena */
} dnode;

/* A directory on a walk's explicit stack, as the walk and the stamp check both hold it: its fd
 * (-1 once closed: outside the window) and the identity a reopened fd must show (inode,
 * device, mount). One type, one identity test (same_dir), one window (slide_window). */
typedef struct {
    int fd;
    uint64_t ino, mnt;
    unsigned long long dev;
} level;

/* One level of the walk's explicit stack (no C recursion, whatever the depth). */
typedef struct {
    level at;
    int lost; /* could not be reopened as the same directory: abandoned */
    size_t node;
    size_t mark; /* its subdirectory names begin here in b->names (they end at the child's mark) */
    size_t next; /* the next of them to visit */
    PyObject *token; /* list mode: the caller's token for this directory (owned); else NULL */
} frame;

typedef struct batch batch;

/* A walk's visit mode: what the one walk (tree_walk) does with each subdirectory name of the
 * directory on top of its stack, and how it reports a level that could not be reopened as the
 * directory it was (moved mid-walk). Heal/check (judge and heal every entry, GIL released),
 * stamp check (the poller's table, GIL held) and list (the watcher's directories, GIL held).
 * Both return 0, or -1: out of memory, or a Python exception set (a mode holding the GIL). */
typedef struct {
    /* Visit subdirectory `name` of `parent` (the top frame's fd; b->cur is its node); to enter
     * it, push_frame() and push its subdirectory names on b->names. */
    int (*visit)(batch *b, int parent, const char *name);
    int (*lost)(batch *b, size_t node);
} visit_mode;

/* A root's rules, compiled once by envctl_shared.policy.Rules (see fsops.Engine) and shared,
 * read only, by every walk, scan, stamp check and single-entry judgement of that root. */
typedef struct {
    PyObject_HEAD
    uint32_t gid;
    uint16_t *table;      /* the wanted permission bits of an entry, by st_mode; NO_FIX: never */
    uint16_t *root_table; /* the same for the root directory itself (its own rule: sticky) */
    uint32_t *protected_uids;
    Py_ssize_t n_protected;
    uint32_t *member_uids; /* members_only: the owners that may be healed, sorted */
    Py_ssize_t n_members;
    int members_only;
} rules_obj;

struct batch {
    const visit_mode *mode; /* a walk's (tree_walk) */
    const rules_obj *rules;
    int fix;
    int tally; /* fixed entries are only counted (in tallies), not recorded one by one */
    int walk;  /* descend into subdirectories (walk) instead of reporting them (scan) */
    int dirs;  /* scan: judge (and heal) a directory entry like any other, not as a subdir */
    int open_first; /* the last entry judged in this directory was fixed: see judge_open */
    unsigned long long root_dev;
    long long root_mnt; /* -1: the kernel gives no mount ids, st_dev decides */
    arena out;          /* record and node names, NUL-terminated */
    arena names;        /* walk: the subdirectory names still to visit, a stack */
    char *dents;        /* getdents64 buffer */
    record *recs;
    size_t n_recs, cap_recs;
    dnode *nodes;
    size_t n_nodes, cap_nodes;
    frame *frames;
    size_t depth, cap_frames;
    size_t cur; /* the node of the directory being listed */
    Py_ssize_t n_scanned, n_dirs;
    /* tally: by file type (S_IFMT >> 12): entries fixed (or wrong), groups set, modes set,
     * entries changed */
    Py_ssize_t tallies[16][4];
    Py_ssize_t n_reopened; /* walk: levels reopened on the way back up */
    PyObject *stamps;      /* stamp mode: inode number -> stamp (borrowed) */
    PyObject *visit;       /* list mode: the caller's visit (borrowed) */
    PyObject *found;       /* stamp mode: stale paths; list mode: (token, empty) below the start */
};

#define DENTS_SIZE 32768

static int fd_statx(int dirfd, const char *name, int flags, unsigned int mask, statx_buf *buf)
{
    return statx(dirfd, name, flags | AT_SYMLINK_NOFOLLOW | AT_STATX_DONT_SYNC, mask, &buf->sx);
}

static uint64_t statx_mnt_id(const statx_buf *buf)
{
    uint64_t id;
    memcpy(&id, buf->raw + STATX_MNT_OFFSET, sizeof id);
    return id;
}

static int chmod_path_fd(int fd, unsigned int mode)
{
    /* fchmodat2(AT_EMPTY_PATH) changes the inode behind an O_PATH fd; before Linux 6.6 the
     * /proc/self/fd magic link does the same (the kernel refuses it for a symlink's fd). */
    if (syscall(SYS_fchmodat2, fd, "", mode, AT_EMPTY_PATH) == 0)
        return 0;
    if (errno != ENOSYS && errno != EINVAL)
        return -1;
    char path[64];
    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    return chmod(path, mode);
}

/* Make room for `need` elements of `size` bytes in *buf (capacity *cap, doubling). */
static int grow(void **buf, size_t *cap, size_t need, size_t size)
{
    if (need <= *cap)
        return 0;
    size_t n = *cap ? *cap * 2 : 64;
    while (n < need)
        n *= 2;
    void *grown = realloc(*buf, n * size);
    if (!grown)
        return -1;
    *buf = grown;
    *cap = n;
    return 0;
}

/* Append `len` bytes and a NUL; the offset of the copy goes to *off. */
static int arena_put(arena *a, const char *s, size_t len, size_t *off)
{
    if (grow((void **)&a->buf, &a->cap, a->len + len + 1, 1) != 0)
        return -1;
    memcpy(a->buf + a->len, s, len);
    a->buf[a->len + len] = '\0';
    if (off)
        *off = a->len;
    a->len += len + 1;
    return 0;
}

/* A record for `name` in directory node `node`. */
static record *add_record_in(batch *b, size_t node, const char *name, enum outcome what)
{
    size_t off;
    if (grow((void **)&b->recs, &b->cap_recs, b->n_recs + 1, sizeof *b->recs) != 0 ||
        arena_put(&b->out, name, strlen(name), &off) != 0)
        return NULL;
    record *r = &b->recs[b->n_recs++];
    memset(r, 0, sizeof *r);
    r->node = node;
    r->name_off = off;
    r->what = what;
    r->set_mode = -1;
    return r;
}

/* A record for `name` in the directory being listed. */
static record *add_record(batch *b, const char *name, enum outcome what)
{
    return add_record_in(b, b->cur, name, what);
}

static int add_node(batch *b, size_t parent, const char *name, size_t *node)
{
    size_t off;
    if (grow((void **)&b->nodes, &b->cap_nodes, b->n_nodes + 1, sizeof *b->nodes) != 0 ||
        arena_put(&b->out, name, strlen(name), &off) != 0)
        return -1;
    b->nodes[b->n_nodes] = (dnode){.parent = parent, .name_off = off};
    *node = b->n_nodes++;
    return 0;
}

static int in_uids(const uint32_t *uids, Py_ssize_t n, uint32_t uid)
{
    for (Py_ssize_t i = 0; i < n; i++)
        if (uids[i] == uid)
            return 1;
    return 0;
}

/* Binary search of a sorted uid array: a members-only root may list thousands of members, and
 * every wrong entry is looked up. */
static int in_sorted_uids(const uint32_t *uids, Py_ssize_t n, uint32_t uid)
{
    Py_ssize_t lo = 0, hi = n;
    while (lo < hi) {
        Py_ssize_t mid = lo + (hi - lo) / 2;
        if (uids[mid] < uid)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < n && uids[lo] == uid;
}

/* On the root's very mount (bind mounts on the same device included). Only a kernel that
 * gives no mount id (before Linux 5.8) is judged by st_dev. */
static int same_fs(unsigned long long root_dev, long long root_mnt, const statx_buf *st)
{
    if (root_mnt >= 0 && (st->sx.stx_mask & STATX_MNT_ID))
        return statx_mnt_id(st) == (uint64_t)root_mnt;
    return makedev(st->sx.stx_dev_major, st->sx.stx_dev_minor) == root_dev;
}

/* Set group and permission bits on the inode behind fd (an O_PATH or a directory fd), as
 * judged from `now`; fills r->set_gid/set_mode. Returns 0 or -1 with r->err set. */
static int apply_fix(const rules_obj *rules, const uint16_t *table, int fd, statx_buf *now,
                     record *r)
{
    uint16_t want = table[now->sx.stx_mode];
    if (now->sx.stx_gid != rules->gid) {
        if (fchownat(fd, "", (uid_t)-1, rules->gid, AT_EMPTY_PATH) != 0)
            goto fail;
        r->set_gid = 1;
    }
    if (want != NO_FIX && want != (now->sx.stx_mode & 07777)) {
        if (chmod_path_fd(fd, want) != 0)
            goto fail;
        r->set_mode = want;
    }
    return 0;
fail:
    r->err = errno;
    return -1;
}

/* Change the entry judged as `seen` through an O_PATH fd proven to be that inode.
 * Returns the outcome; ATTENTION when it changed in between (Python's slow path decides). */
static enum outcome fix_entry(const batch *b, int dirfd, const char *name,
                              const statx_buf *seen, record *r)
{
    int fd = openat(dirfd, name, O_PATH | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) {
        r->err = errno;
        return errno == ENOENT ? VANISHED : ERROR;
    }
    statx_buf now;
    enum outcome out = FIXED;
    if (fd_statx(fd, "", AT_EMPTY_PATH, STATX_WANT, &now) != 0) {
        r->err = errno;
        out = ERROR;
    } else if (now.sx.stx_ino != seen->sx.stx_ino || now.sx.stx_uid != seen->sx.stx_uid ||
               (now.sx.stx_mode & S_IFMT) != (seen->sx.stx_mode & S_IFMT) ||
               !same_fs(b->root_dev, b->root_mnt, &now)) {
        out = ATTENTION; /* swapped, re-owned or another mount: the slow path re-judges it */
    } else if (b->rules->table[now.sx.stx_mode] == NO_FIX) {
        out = ATTENTION; /* became special (a chmod u+s): never touched, the slow path reports it */
    } else if (apply_fix(b->rules, b->rules->table, fd, &now, r) != 0) {
        out = ERROR;
    }
    close(fd);
    return out;
}

/* What to do with an entry judged by `st`: COMPLIANT, WOULD_FIX, FIXED (call apply_fix), or
 * one of the SKIP_ outcomes. THE one place the owner rules are ordered, for the fast path and
 * Python's slow path alike (py_judge): another mount first, then specials, then compliance,
 * then owners. The root directory itself (`is_root`) is the mount everything is compared to,
 * has its own table, and is healed whoever owns it: the admin named it. */
static enum outcome classify(const rules_obj *rules, const statx_buf *st,
                             unsigned long long root_dev, long long root_mnt, int is_root,
                             int fix)
{
    uint16_t mode = st->sx.stx_mode, want = (is_root ? rules->root_table : rules->table)[mode];
    if (!is_root && !same_fs(root_dev, root_mnt, st))
        return SKIP_MOUNT;
    if (want == NO_FIX)
        return SKIP_SPECIAL;
    if (st->sx.stx_gid == rules->gid && want == (mode & 07777))
        return COMPLIANT;
    if (is_root)
        return fix ? FIXED : WOULD_FIX;
    if (in_uids(rules->protected_uids, rules->n_protected, st->sx.stx_uid))
        return SKIP_PROTECTED;
    if (rules->members_only &&
        !in_sorted_uids(rules->member_uids, rules->n_members, st->sx.stx_uid))
        return SKIP_FOREIGN;
    return fix ? FIXED : WOULD_FIX;
}

/* classify() an entry of the walk's root's tree (never the root itself). */
static enum outcome classify_entry(const batch *b, const statx_buf *st)
{
    return classify(b->rules, st, b->root_dev, b->root_mnt, 0, b->fix);
}

static void fill_seen(record *r, const statx_buf *st)
{
    r->mode = st->sx.stx_mode;
    r->uid = st->sx.stx_uid;
    r->gid = st->sx.stx_gid;
}

/* Keep the outcome `tmp` of `name`: a record, or with b->tally only counts for a FIXED or
 * WOULD_FIX one (nobody reads a heal's 60k fixed entries one by one: building them cost ~8%
 * of the walk's CPU). COMPLIANT gets nothing. Returns -1 only when out of memory. */
static int put_outcome(batch *b, const char *name, record *tmp)
{
    if (tmp->what == COMPLIANT)
        return 0;
    if ((tmp->what == FIXED || tmp->what == WOULD_FIX) && b->tally) {
        Py_ssize_t *t = b->tallies[(tmp->mode & S_IFMT) >> 12];
        t[0]++;
        t[1] += tmp->set_gid;
        t[2] += tmp->set_mode >= 0;
        t[3] += tmp->set_gid || tmp->set_mode >= 0;
        return 0;
    }
    record *r = add_record(b, name, tmp->what);
    if (!r)
        return -1;
    tmp->node = r->node;
    tmp->name_off = r->name_off;
    *r = *tmp;
    return 0;
}

/* Judge and heal an entry through an O_PATH|O_NOFOLLOW fd opened first, by that fd's own
 * statx: what is judged is then the very inode changed, with no identity check to make, and
 * the name's statx is saved (five calls per wrong entry instead of six). Used after a fixed
 * entry in the same directory: in a broken tree nearly every entry is wrong, and a compliant
 * one costs an open and a close more than a statx. Returns -1 only when out of memory. */
static int judge_open(batch *b, int dirfd, const char *name, int *is_dir)
{
    record tmp = {.set_mode = -1};
    statx_buf st;
    int fd = openat(dirfd, name, O_PATH | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0 || fd_statx(fd, "", AT_EMPTY_PATH, STATX_WANT, &st) != 0) {
        tmp.err = errno;
        tmp.what = tmp.err == ENOENT ? VANISHED : ERROR;
    } else if (S_ISDIR(st.sx.stx_mode) && !b->dirs) {
        *is_dir = 1; /* not judged here: the caller visits it */
        close(fd);
        return 0;
    } else {
        b->n_scanned++;
        fill_seen(&tmp, &st);
        tmp.what = classify_entry(b, &st);
        if (tmp.what == FIXED && apply_fix(b->rules, b->rules->table, fd, &st, &tmp) != 0)
            tmp.what = ERROR;
    }
    if (fd >= 0)
        close(fd);
    b->open_first = tmp.what == FIXED;
    return put_outcome(b, name, &tmp);
}

/* Inspect (and with b->fix, heal) one entry of dirfd; the GIL is not held. A directory is
 * not inspected: *is_dir is set and the caller decides. Returns -1 only when out of memory. */
static int do_entry(batch *b, int dirfd, const char *name, int known_dir, int *is_dir)
{
    *is_dir = known_dir;
    if (known_dir)
        return 0;
    if (b->fix && b->open_first)
        return judge_open(b, dirfd, name, is_dir);
    statx_buf seen;
    record tmp = {.set_mode = -1};
    if (fd_statx(dirfd, name, 0, STATX_WANT, &seen) != 0) {
        tmp.err = errno;
        tmp.what = tmp.err == ENOENT ? VANISHED : ERROR;
        return put_outcome(b, name, &tmp);
    }
    if (S_ISDIR(seen.sx.stx_mode) && !b->dirs) {
        *is_dir = 1;
        return 0;
    }
    tmp.what = classify_entry(b, &seen);
    if (tmp.what != COMPLIANT)
        fill_seen(&tmp, &seen);
    if (tmp.what == FIXED)
        tmp.what = fix_entry(b, dirfd, name, &seen, &tmp);
    if (tmp.what != ATTENTION && tmp.what != VANISHED)
        b->n_scanned++;
    b->open_first = tmp.what == FIXED;
    return put_outcome(b, name, &tmp);
}

/* Where a listing is in b->dents: the bytes the last getdents64 gave, and the next record. */
typedef struct {
    long n, pos;
} dents_cursor;

/* The next entry of the directory fd (read from the fd's own offset), "." and ".." skipped:
 * 1 with *out set (valid until the next call), 0 at the end, -1 with errno set. The one
 * getdents64 loop of every listing (the walk's, the scan's and the watcher's).
 *
 * A directory removed since it was opened (a member's rmdir racing the walk) fails its
 * listing with ENOENT: it is listed as empty, which it is, as glibc's readdir does. It is not
 * an error: a member could otherwise make every walk report one, and end the watch. */
static int next_dent(batch *b, int fd, dents_cursor *c, struct dirent64 **out)
{
    for (;;) {
        if (c->pos >= c->n) {
            c->n = syscall(SYS_getdents64, fd, b->dents, DENTS_SIZE);
            c->pos = 0;
            if (c->n < 0 && errno == ENOENT)
                c->n = 0;
            if (c->n <= 0)
                return c->n < 0 ? -1 : 0;
        }
        struct dirent64 *d = (struct dirent64 *)(b->dents + c->pos);
        c->pos += d->d_reclen;
        const char *nm = d->d_name;
        if (nm[0] == '.' && (nm[1] == '\0' || (nm[1] == '.' && nm[2] == '\0')))
            continue;
        *out = d;
        return 1;
    }
}

/* List dirfd with getdents64 and inspect every entry. Subdirectories are reported (scan) or
 * pushed on b->names for the walk to visit. The fd's own offset is used, rewound first when
 * `rewind` (a caller's fd; one the walk just opened is at 0). Returns 0, an errno from the
 * listing, or -1 (no memory). */
static int list_dir(batch *b, int dirfd, int rewind)
{
    if (rewind && lseek(dirfd, 0, SEEK_SET) < 0)
        return errno;
    b->open_first = 0;
    dents_cursor c = {0, 0};
    struct dirent64 *d;
    int got;
    while ((got = next_dent(b, dirfd, &c, &d)) > 0) {
        const char *nm = d->d_name;
        int is_dir;
        if (do_entry(b, dirfd, nm, d->d_type == DT_DIR, &is_dir) != 0)
            return -1;
        if (is_dir && (b->walk ? arena_put(&b->names, nm, strlen(nm), NULL)
                               : (add_record(b, nm, SUBDIR) ? 0 : -1)) != 0)
            return -1;
    }
    return got < 0 ? errno : 0;
}

/* The level of the directory fd, whose statx is st. */
static level level_of(int fd, const statx_buf *st)
{
    return (level){.fd = fd, .ino = st->sx.stx_ino,
                   .mnt = (st->sx.stx_mask & STATX_MNT_ID) ? statx_mnt_id(st) : 0,
                   .dev = makedev(st->sx.stx_dev_major, st->sx.stx_dev_minor)};
}

/* Whether the directory behind fd is the one level l entered (same inode, device, mount). */
static int same_dir(int fd, const level *l)
{
    statx_buf st;
    return fd_statx(fd, "", AT_EMPTY_PATH, STATX_WANT, &st) == 0 && S_ISDIR(st.sx.stx_mode) &&
           st.sx.stx_ino == l->ino &&
           makedev(st.sx.stx_dev_major, st.sx.stx_dev_minor) == l->dev &&
           (!(st.sx.stx_mask & STATX_MNT_ID) || statx_mnt_id(&st) == l->mnt);
}

/* A level WINDOW below the one just pushed leaves the window: its fd is closed. */
static void slide_window(level *old)
{
    if (old->fd >= 0) {
        close(old->fd);
        old->fd = -1;
    }
}

/* Reopen the closed level `up` through its open child's "..": -1 unless it is that very
 * directory (moved or swapped since: the caller decides). */
static int reopen_through_child(const level *up, const level *child)
{
    int fd = openat(child->fd, "..", O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (fd >= 0 && !same_dir(fd, up)) {
        close(fd);
        fd = -1;
    }
    return fd;
}

/* Open frame i again, proven to be the directory it was: through its child's ".." (one
 * openat: the way back up a deep chain), else down by name from the nearest open ancestor.
 * A level that is no longer where it was (moved or swapped mid-walk) and everything below it
 * are marked lost; the first lost level goes to the visit mode's `lost` (the heal walk hands
 * it back as ATTENTION, the stamp check as stale; the watcher's pending events place it).
 * Returns -1 on error (no memory, or a Python exception in a mode that holds the GIL). */
static int reopen_frame(batch *b, size_t i)
{
    frame *f = &b->frames[i];
    int fd = -1;
    if (i + 1 < b->depth && b->frames[i + 1].at.fd >= 0)
        fd = reopen_through_child(&f->at, &b->frames[i + 1].at);
    if (fd < 0 && !f->lost) {
        size_t j = i;
        while (b->frames[j].at.fd < 0) /* frame 0, the caller's fd, is always open */
            j--;
        int cur = b->frames[j].at.fd;
        for (size_t k = j + 1; k <= i; k++) {
            const char *name = b->out.buf + b->nodes[b->frames[k].node].name_off;
            int next = openat(cur, name, O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
            if (next >= 0 && !same_dir(next, &b->frames[k].at)) {
                close(next);
                next = -1;
            }
            if (cur != b->frames[j].at.fd)
                close(cur);
            if (next < 0) {
                for (size_t m = k; m <= i; m++)
                    b->frames[m].lost = 1;
                if (b->mode->lost(b, b->frames[k].node) != 0)
                    return -1;
                break;
            }
            cur = next;
        }
        if (!f->lost)
            fd = cur;
    }
    f->at.fd = fd;
    if (fd < 0)
        f->next = b->names.len; /* its remaining subdirectories are not visited from here */
    else
        b->n_reopened++;
    return 0;
}

/* Enter the directory behind fd (its statx: st), entry `name` of the directory node b->cur:
 * a new node and top frame (b->cur becomes it), whose subdirectory names the caller pushes
 * next on b->names; the level WINDOW above leaves the window. fd and token are taken (closed
 * and released when this fails: -1, out of memory). */
static int push_frame(batch *b, int fd, const statx_buf *st, const char *name, PyObject *token)
{
    size_t node;
    if (add_node(b, b->cur, name, &node) != 0 ||
        grow((void **)&b->frames, &b->cap_frames, b->depth + 1, sizeof *b->frames) != 0) {
        close(fd);
        Py_XDECREF(token);
        return -1;
    }
    size_t d = b->depth++;
    b->frames[d] = (frame){.at = level_of(fd, st), .node = node, .mark = b->names.len,
                           .next = b->names.len, .token = token};
    if (d > WINDOW)
        slide_window(&b->frames[d - WINDOW].at);
    b->cur = node;
    return 0;
}

/* The walk's start: the caller's dirfd (never closed or reopened here) as frame 0, node 0;
 * token is taken. Its subdirectory names are pushed next by the caller. */
static int start_frame(batch *b, int dirfd, PyObject *token)
{
    size_t root_node;
    if (add_node(b, NO_NODE, "", &root_node) != 0 ||
        grow((void **)&b->frames, &b->cap_frames, 1, sizeof *b->frames) != 0) {
        Py_XDECREF(token);
        return -1;
    }
    b->frames[0] = (frame){.at = {.fd = dirfd}, .node = root_node, .token = token};
    b->depth = 1;
    b->cur = root_node;
    return 0;
}

/* Leave the top frame: drop its names, reopen its parent if the window had closed it. */
static int pop_frame(batch *b)
{
    size_t i = b->depth - 1;
    frame *f = &b->frames[i];
    b->names.len = f->mark;
    int rc = 0;
    if (i > 0 && b->frames[i - 1].at.fd < 0 && !b->frames[i - 1].lost)
        rc = reopen_frame(b, i - 1);
    f = &b->frames[i];
    if (i > 0 && f->at.fd >= 0)
        close(f->at.fd); /* frame 0's fd is the caller's */
    Py_XDECREF(f->token); /* NULL (no Python object) in the heal walk, which runs GIL-free */
    f->token = NULL;
    b->depth--;
    return rc;
}

/* THE walk: every directory below the start frame, depth first on an explicit stack, each
 * subdirectory name of the top frame handed to the visit mode, which enters it (push_frame)
 * or not. Memory and open fds are bounded whatever the depth (WINDOW levels keep their fd; a
 * level is reopened on the way back up, its identity proven, or reported lost), and each
 * entry costs the same at any depth. Returns 0 or -1 (see visit_mode). */
static int tree_walk(batch *b)
{
    while (b->depth > 0) {
        frame *f = &b->frames[b->depth - 1];
        if (f->at.fd < 0 || f->next >= b->names.len) { /* done, or lost */
            if (pop_frame(b) != 0)
                return -1;
            continue;
        }
        char name[NAME_MAX + 1];
        size_t nlen = strlen(b->names.buf + f->next);
        if (nlen > NAME_MAX) { /* no directory entry has such a name */
            f->next += nlen + 1;
            continue;
        }
        memcpy(name, b->names.buf + f->next, nlen + 1); /* the arena may move below */
        f->next += nlen + 1;
        b->cur = f->node;
        if (b->mode->visit(b, f->at.fd, name) != 0) /* f may move: not used after */
            return -1;
    }
    return 0;
}

/* Heal/check mode: open a subdirectory no-follow, judge it and heal it through its own fd;
 * when it is on the root's mount and could be opened, enter it and list (judge, heal) its
 * entries. The GIL is not held. */
static int heal_visit(batch *b, int parent, const char *name)
{
    int fd = openat(parent, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) {
        int err = errno;
        int swapped = err == ELOOP || err == ENOTDIR; /* a symlink or a file since listed */
        record *r = add_record(b, name, err == ENOENT ? VANISHED : swapped ? ATTENTION : ERROR);
        if (!r)
            return -1;
        r->err = swapped ? 0 : err;
        r->mode = S_IFDIR; /* as it was listed */
        return 0;
    }
    statx_buf st;
    record tmp = {.set_mode = -1, .mode = S_IFDIR};
    enum outcome what;
    if (fd_statx(fd, "", AT_EMPTY_PATH, STATX_WANT, &st) != 0) {
        tmp.err = errno;
        what = ERROR;
    } else {
        b->n_scanned++;
        b->n_dirs++;
        fill_seen(&tmp, &st);
        what = classify_entry(b, &st);
        if (what == FIXED) {
            statx_buf now = st;
            if (apply_fix(b->rules, b->rules->table, fd, &now, &tmp) != 0)
                what = ERROR;
        }
    }
    tmp.what = what;
    if (put_outcome(b, name, &tmp) != 0) {
        close(fd);
        return -1;
    }
    if (what == ERROR || what == SKIP_MOUNT) {
        close(fd);
        return 0;
    }
    size_t up = b->cur;
    if (push_frame(b, fd, &st, name, NULL) != 0)
        return -1;
    int rc = list_dir(b, fd, 0);
    if (rc < 0)
        return -1;
    if (rc > 0) { /* listing it failed: report the directory, go on */
        b->frames[b->depth - 1].next = b->names.len;
        record *r = add_record_in(b, up, name, ERROR);
        if (!r)
            return -1;
        r->err = rc;
        r->mode = S_IFDIR;
    }
    return 0;
}

/* Heal/check mode: a level moved mid-walk is handed back to Python (ATTENTION) by its path. */
static int heal_lost(batch *b, size_t node)
{
    char name[NAME_MAX + 1]; /* copied: the record's name goes to the same arena */
    snprintf(name, sizeof name, "%s", b->out.buf + b->nodes[node].name_off);
    record *r = add_record_in(b, b->nodes[node].parent, name, ATTENTION);
    if (!r)
        return -1;
    r->mode = S_IFDIR;
    return 0;
}

static const visit_mode heal_mode = {heal_visit, heal_lost};

/* The whole subtree below dirfd in heal/check mode. The GIL is not held. Returns 0, an errno
 * from listing dirfd itself, or -1. */
static int walk_tree(batch *b, int dirfd)
{
    b->mode = &heal_mode;
    if (start_frame(b, dirfd, NULL) != 0)
        return -1;
    int rc = list_dir(b, dirfd, 1);
    return rc != 0 ? rc : tree_walk(b);
}

/* Python's view of b's records, appended to lists[] = {subdirs, attention, fixed, skipped}
 * (see scan_doc). Returns -1 on a Python error. */
static int append_records(const batch *b, PyObject *const lists[4])
{
    for (size_t i = 0; i < b->n_recs; i++) {
        const record *r = &b->recs[i];
        PyObject *name = PyUnicode_DecodeFSDefault(b->out.buf + r->name_off);
        if (!name)
            return -1;
        Py_ssize_t node = (Py_ssize_t)r->node;
        PyObject *item = NULL, *target = NULL;
        switch (r->what) {
        case SUBDIR:
            target = lists[0];
            item = name;
            Py_INCREF(name);
            break;
        case FIXED:
        case WOULD_FIX:
            target = lists[2];
            item = Py_BuildValue("(nOIIii)", node, name, r->mode, r->gid, r->set_gid,
                                 r->set_mode);
            break;
        case SKIP_PROTECTED:
        case SKIP_SPECIAL:
        case SKIP_MOUNT:
        case SKIP_FOREIGN:
            target = lists[3];
            item = Py_BuildValue("(nOsIII)", node, name, skip_reason[r->what], r->mode,
                                 r->uid, r->gid);
            break;
        default: /* ATTENTION, ERROR, VANISHED: (node, name, errno, mode, uid, gid) */
            target = lists[1];
            item = Py_BuildValue("(nOiIII)", node, name, r->what == ATTENTION ? 0 : r->err,
                                 r->mode, r->uid, r->gid);
            break;
        }
        Py_DECREF(name);
        if (!item || PyList_Append(target, item) != 0) {
            Py_XDECREF(item);
            return -1;
        }
        Py_DECREF(item);
    }
    return 0;
}

/* The directories records refer to, as [(parent index or -1, name)]; empty without records
 * (a compliant tree builds nothing). */
static PyObject *build_nodes(batch *b)
{
    Py_ssize_t n = b->n_recs ? (Py_ssize_t)b->n_nodes : 0;
    PyObject *nodes = PyList_New(n);
    for (Py_ssize_t i = 0; nodes && i < n; i++) {
        dnode *d = &b->nodes[i];
        PyObject *name = PyUnicode_DecodeFSDefault(b->out.buf + d->name_off);
        PyObject *item = name ? Py_BuildValue("(nN)", d->parent == NO_NODE
                                                          ? (Py_ssize_t)-1
                                                          : (Py_ssize_t)d->parent, name)
                              : NULL;
        if (!item) {
            Py_CLEAR(nodes);
            break;
        }
        PyList_SET_ITEM(nodes, i, item);
    }
    return nodes;
}

/* A Python sequence of uids as a C array (PyMem, freed by the caller); -1 with an exception. */
static int uid_array(PyObject *seq, const char *what, uint32_t **out, Py_ssize_t *n)
{
    PyObject *fast = PySequence_Fast(seq, what);
    if (!fast)
        return -1;
    *n = PySequence_Fast_GET_SIZE(fast);
    *out = PyMem_Calloc(*n + 1, sizeof **out);
    for (Py_ssize_t i = 0; *out && i < *n; i++)
        (*out)[i] = (uint32_t)PyLong_AsUnsignedLong(PySequence_Fast_GET_ITEM(fast, i));
    Py_DECREF(fast);
    if (!*out) {
        PyErr_NoMemory();
        return -1;
    }
    return PyErr_Occurred() ? -1 : 0;
}

static int cmp_uid(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}

/* A copy of a 65536-entry uint16 table (PyMem); NULL with an exception. */
static uint16_t *table_copy(Py_buffer *buf)
{
    if (buf->len != TABLE_BYTES) {
        PyErr_SetString(PyExc_ValueError, "table must hold 65536 uint16 values");
        return NULL;
    }
    uint16_t *t = PyMem_Malloc(TABLE_BYTES);
    if (!t)
        return (uint16_t *)PyErr_NoMemory();
    memcpy(t, buf->buf, TABLE_BYTES);
    return t;
}

static void rules_dealloc(rules_obj *self)
{
    PyMem_Free(self->table);
    PyMem_Free(self->root_table);
    PyMem_Free(self->protected_uids);
    PyMem_Free(self->member_uids);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *rules_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    unsigned int gid;
    Py_buffer table, root_table;
    PyObject *protected_seq, *members;
    static char *kwlist[] = {"gid", "table", "root_table", "protected", "members", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "Iy*y*OO", kwlist, &gid, &table, &root_table,
                                     &protected_seq, &members))
        return NULL;
    rules_obj *self = (rules_obj *)type->tp_alloc(type, 0);
    int ok = self != NULL;
    if (ok) {
        self->gid = gid;
        ok = (self->table = table_copy(&table)) != NULL &&
             (self->root_table = table_copy(&root_table)) != NULL &&
             uid_array(protected_seq, "protected must be a sequence of uids",
                       &self->protected_uids, &self->n_protected) == 0;
    }
    if (ok && members != Py_None) {
        ok = uid_array(members, "members must be a sequence of uids", &self->member_uids,
                       &self->n_members) == 0;
        if (ok) { /* looked up by binary search: every wrong entry is */
            qsort(self->member_uids, (size_t)self->n_members, sizeof *self->member_uids,
                  cmp_uid);
            self->members_only = 1;
        }
    }
    PyBuffer_Release(&table);
    PyBuffer_Release(&root_table);
    if (!ok) {
        Py_XDECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

PyDoc_STRVAR(rules_doc,
"Rules(gid, table, root_table, protected, members)\n\n"
"A root's rules compiled for C (built by envctl_shared.heal.fsops.Engine from a\n"
"policy.Rules): the root's gid, the wanted permission bits for every st_mode of an entry\n"
"(``table``) and of the root directory itself (``root_table``), as 65536 native uint16\n"
"(0xFFFF: never fixed), the protected owners, and ``members`` (None: any owner; else the\n"
"only owners whose entries may be changed).");

static PyTypeObject RulesType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "envctl_shared.heal._fastfs.Rules",
    .tp_basicsize = sizeof(rules_obj),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = rules_doc,
    .tp_new = rules_new,
    .tp_dealloc = (destructor)rules_dealloc,
};

/* Set up a batch for `rules` (a Rules object, checked). */
static int setup_batch(batch *b, PyObject *rules)
{
    if (!PyObject_TypeCheck(rules, &RulesType)) {
        PyErr_SetString(PyExc_TypeError, "rules must be a _fastfs.Rules");
        return -1;
    }
    b->rules = (const rules_obj *)rules;
    b->dents = malloc(DENTS_SIZE);
    if (!b->dents) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

static void free_batch(batch *b)
{
    for (size_t i = 0; i < b->depth; i++) { /* left only when the walk stopped early */
        if (i > 0 && b->frames[i].at.fd >= 0)
            close(b->frames[i].at.fd);
        Py_XDECREF(b->frames[i].token);
    }
    free(b->out.buf);
    free(b->names.buf);
    free(b->dents);
    free(b->recs);
    free(b->nodes);
    free(b->frames);
}

/* The result of a scan (n_scanned, subdirs, attention, fixed, skipped, tallied) or of a walk
 * (n_scanned, n_dirs, nodes, attention, fixed, skipped, tallied) over the `n` batches of its
 * lanes (a walk has one), or the exception for `err` (an errno, or -1: out of memory). */
static PyObject *batch_result(batch *bs, int n, int err)
{
    if (err) {
        errno = err == -1 ? ENOMEM : err;
        return PyErr_SetFromErrno(err == -1 ? PyExc_MemoryError : PyExc_OSError);
    }
    PyObject *lists[4] = {PyList_New(0), PyList_New(0), PyList_New(0), PyList_New(0)};
    PyObject *tallied = PyList_New(0), *nodes = NULL, *result = NULL;
    Py_ssize_t scanned = 0, tallies[16][4] = {{0}};
    int ok = lists[0] && lists[1] && lists[2] && lists[3] && tallied;
    for (int i = 0; ok && i < n; i++) {
        ok = append_records(&bs[i], lists) == 0;
        scanned += bs[i].n_scanned;
        for (int t = 0; t < 16; t++)
            for (int k = 0; k < 4; k++)
                tallies[t][k] += bs[i].tallies[t][k];
    }
    for (int t = 0; ok && t < 16; t++) {
        if (!tallies[t][0])
            continue;
        PyObject *item = Py_BuildValue("(innnn)", t << 12, tallies[t][0], tallies[t][1],
                                       tallies[t][2], tallies[t][3]);
        ok = item && PyList_Append(tallied, item) == 0;
        Py_XDECREF(item);
    }
    if (ok && !bs[0].walk)
        result = Py_BuildValue("(nOOOOO)", scanned, lists[0], lists[1], lists[2], lists[3],
                               tallied);
    else if (ok && (nodes = build_nodes(&bs[0])) != NULL) /* subdirs: always empty */
        result = Py_BuildValue("(nnOOOOO)", scanned, bs[0].n_dirs, nodes, lists[1], lists[2],
                               lists[3], tallied);
    for (int i = 0; i < 4; i++)
        Py_XDECREF(lists[i]);
    Py_XDECREF(tallied);
    Py_XDECREF(nodes);
    return result;
}

PyDoc_STRVAR(scan_doc,
"scan(dirfd, names, rules, fix, root_dev, root_mnt, tally=False, lanes=1, dirs=False)\n"
"    -> (n_scanned, subdirs, attention, fixed, skipped, tallied)\n\n"
"Inspect the entries ``names`` of the directory ``dirfd`` (None: list it), and with ``fix``\n"
"heal them by ``rules`` (a Rules). ``root_mnt`` is the root's mount id (-1:\n"
"unknown, st_dev decides). n_scanned counts the entries judged here; subdirs are\n"
"directory names (not inspected). Entries are (node, name, ...) with node 0: attention holds\n"
"(node, name, errno, mode, uid, gid) for what changed under us (errno 0) or failed (ENOENT:\n"
"vanished); fixed holds (node, name, old_mode, old_gid, set_gid, set_mode), entries fixed or,\n"
"with fix off, that would be; skipped holds (node, name, reason, mode, uid, gid), reason\n"
"'protected', 'special', 'mount' or 'foreign' (a members-only root: the owner is not a\n"
"member). With ``tally``, the entries of ``fixed`` are not listed\n"
"but counted in tallied, as (S_IFMT type, entries, groups set, modes set, entries changed).\n"
"``names`` are inspected by up to ``lanes`` threads at once, each its own share (on\n"
"NFS/FUSE: that many lookups in flight). With ``dirs``, a directory is judged (and healed)\n"
"like any other entry, through an O_PATH fd, and not reported in subdirs: the entry itself,\n"
"never what is below it.");

/* One share of a scan's names, inspected by its own thread (GIL not held) into its own batch. */
typedef struct {
    batch *b;
    int dirfd;
    const char *names; /* the arena holding them (shared, read only) */
    const size_t *offs;
    Py_ssize_t n;
    int err; /* -1: out of memory */
} lane;

static void *run_lane(void *arg)
{
    lane *l = arg;
    for (Py_ssize_t i = 0; i < l->n && !l->err; i++) {
        const char *nm = l->names + l->offs[i];
        int is_dir;
        if (do_entry(l->b, l->dirfd, nm, 0, &is_dir) != 0 ||
            (is_dir && !add_record(l->b, nm, SUBDIR)))
            l->err = -1;
    }
    return NULL;
}

#define MAX_LANES 8
#define LANE_STACK (256 * 1024)

/* Inspect n names over up to `lanes` threads: lane i fills bs[i] (bs[0] already set up, the
 * others get its settings). The calling thread runs lane 0; a lane whose thread cannot be
 * started runs there too. Returns the number of batches used, *err as run_lane's. */
static int scan_names(batch *bs, int lanes, int dirfd, const size_t *offs, Py_ssize_t n,
                      int *err)
{
    lane ls[MAX_LANES];
    pthread_t th[MAX_LANES];
    int started[MAX_LANES] = {0};
    if (lanes > n)
        lanes = n > 0 ? (int)n : 1;
    pthread_attr_t attr;
    int have_attr = lanes > 1 && pthread_attr_init(&attr) == 0;
    if (have_attr)
        pthread_attr_setstacksize(&attr, LANE_STACK);
    for (int i = 0; i < lanes; i++) {
        if (i > 0)
            bs[i] = (batch){.rules = bs[0].rules, .fix = bs[0].fix, .tally = bs[0].tally,
                            .dirs = bs[0].dirs, .root_dev = bs[0].root_dev,
                            .root_mnt = bs[0].root_mnt};
        Py_ssize_t lo = n * i / lanes, hi = n * (i + 1) / lanes;
        ls[i] = (lane){.b = &bs[i], .dirfd = dirfd, .names = bs[0].names.buf,
                       .offs = offs + lo, .n = hi - lo};
        if (i > 0 && have_attr)
            started[i] = pthread_create(&th[i], &attr, run_lane, &ls[i]) == 0;
    }
    if (have_attr)
        pthread_attr_destroy(&attr);
    run_lane(&ls[0]);
    *err = ls[0].err;
    for (int i = 1; i < lanes; i++) {
        if (started[i])
            pthread_join(th[i], NULL);
        else
            run_lane(&ls[i]);
        if (ls[i].err)
            *err = ls[i].err;
    }
    return lanes;
}

static PyObject *py_scan(PyObject *self, PyObject *args)
{
    int dirfd, fix, tally = 0, lanes = 1, dirs = 0;
    PyObject *names, *rules;
    unsigned long long root_dev;
    long long root_mnt;
    if (!PyArg_ParseTuple(args, "iOOpKL|pip", &dirfd, &names, &rules, &fix, &root_dev,
                          &root_mnt, &tally, &lanes, &dirs))
        return NULL;
    batch bs[MAX_LANES] = {{.fix = fix, .tally = tally, .dirs = dirs, .root_dev = root_dev,
                            .root_mnt = root_mnt}};
    int used = 1;
    lanes = lanes < 1 ? 1 : lanes > MAX_LANES ? MAX_LANES : lanes;
    PyObject *result = NULL;
    size_t *offs = NULL;
    if (setup_batch(&bs[0], rules) != 0)
        goto out;
    int err = 0;
    if (names == Py_None) {
        Py_BEGIN_ALLOW_THREADS
        err = list_dir(&bs[0], dirfd, 1);
        Py_END_ALLOW_THREADS
    } else {
        /* Copy the names first: the loop below runs without the GIL. */
        PyObject *nseq = PySequence_Fast(names, "names must be a sequence of str");
        if (!nseq)
            goto out;
        Py_ssize_t n = PySequence_Fast_GET_SIZE(nseq);
        offs = PyMem_Malloc((n + 1) * sizeof *offs);
        for (Py_ssize_t i = 0; offs && i < n; i++) {
            PyObject *enc = PyUnicode_EncodeFSDefault(PySequence_Fast_GET_ITEM(nseq, i));
            if (!enc) {
                Py_DECREF(nseq);
                goto out;
            }
            int bad = arena_put(&bs[0].names, PyBytes_AS_STRING(enc),
                                (size_t)PyBytes_GET_SIZE(enc), &offs[i]);
            Py_DECREF(enc);
            if (bad) {
                Py_DECREF(nseq);
                PyErr_NoMemory();
                goto out;
            }
        }
        Py_DECREF(nseq);
        if (!offs) {
            PyErr_NoMemory();
            goto out;
        }
        Py_BEGIN_ALLOW_THREADS
        used = scan_names(bs, lanes, dirfd, offs, n, &err);
        Py_END_ALLOW_THREADS
    }
    result = batch_result(bs, used, err);
out:
    PyMem_Free(offs);
    for (int i = 0; i < used; i++)
        free_batch(&bs[i]);
    return result;
}

PyDoc_STRVAR(walk_doc,
"walk(dirfd, rules, fix, root_dev, root_mnt, tally=False)\n"
"    -> (n_scanned, n_dirs, nodes, attention, fixed, skipped, tallied)\n\n"
"scan() for the whole subtree below ``dirfd`` (not dirfd itself), on an explicit stack:\n"
"no recursion and a bounded number of open fds whatever the depth. Each subdirectory is\n"
"opened O_NOFOLLOW, judged and healed through its own fd, and entered unless it is on\n"
"another mount (skipped) or could not be opened or fixed. n_dirs counts the subdirectories\n"
"judged. ``nodes`` lists the directories entered as (parent index, name), index 0 being\n"
"dirfd itself (parent -1); every record names its directory by such an index (paths are\n"
"never built here: they can be far longer than PATH_MAX). ``nodes`` is empty when there\n"
"are no records. attention also holds directories that were moved mid-walk (errno 0).");

static PyObject *py_walk(PyObject *self, PyObject *args)
{
    int dirfd, fix;
    PyObject *rules;
    unsigned long long root_dev;
    long long root_mnt;
    int tally = 0;
    if (!PyArg_ParseTuple(args, "iOpKL|p", &dirfd, &rules, &fix, &root_dev, &root_mnt, &tally))
        return NULL;
    batch b = {.fix = fix, .tally = tally, .walk = 1, .root_dev = root_dev,
               .root_mnt = root_mnt};
    PyObject *result = NULL;
    if (setup_batch(&b, rules) != 0)
        goto out;
    int err;
    Py_BEGIN_ALLOW_THREADS
    err = walk_tree(&b, dirfd);
    Py_END_ALLOW_THREADS
    result = batch_result(&b, 1, err);
out:
    free_batch(&b);
    return result;
}

/* -- stamp check mode: the poller's incremental pass ------------------------------------- */

/* A stamp is a tuple (fsops.Stamp, a NamedTuple): (ino, mtime_ns, ctime_ns, subdirs). */
enum { STAMP_INO, STAMP_MTIME, STAMP_CTIME, STAMP_SUBDIRS, STAMP_FIELDS };

/* statx of the directory behind fd (counted in n_dirs) and its stamp, looked up by its inode
 * number: NULL (no Python error set) when it has none or cannot be statx'ed. Borrowed. */
static PyObject *dir_stamp(batch *b, int fd, statx_buf *st)
{
    if (fd_statx(fd, "", AT_EMPTY_PATH, STATX_WANT, st) != 0)
        return NULL;
    b->n_dirs++;
    PyObject *key = PyLong_FromUnsignedLongLong(st->sx.stx_ino);
    if (!key)
        return NULL;
    PyObject *stamp = PyDict_GetItemWithError(b->stamps, key);
    Py_DECREF(key);
    if (stamp && (!PyTuple_Check(stamp) || PyTuple_GET_SIZE(stamp) != STAMP_FIELDS)) {
        PyErr_SetString(PyExc_TypeError, "a stamp is a tuple (ino, mtime, ctime, subdirs)");
        return NULL;
    }
    return stamp;
}

/* Whether the directory statx'ed in *st is correct and exactly as `stamp` recorded it. */
static int dir_unchanged(const batch *b, PyObject *stamp, const statx_buf *st, int is_root)
{
    uint16_t mode = st->sx.stx_mode;
    if (!S_ISDIR(mode) ||
        classify(b->rules, st, b->root_dev, b->root_mnt, is_root, 0) != COMPLIANT)
        return 0;
    long long mtime = (long long)st->sx.stx_mtime.tv_sec * 1000000000LL + st->sx.stx_mtime.tv_nsec;
    long long ctime = (long long)st->sx.stx_ctime.tv_sec * 1000000000LL + st->sx.stx_ctime.tv_nsec;
    PyObject *ino = PyTuple_GET_ITEM(stamp, STAMP_INO), *mt = PyTuple_GET_ITEM(stamp, STAMP_MTIME),
             *ct = PyTuple_GET_ITEM(stamp, STAMP_CTIME);
    int same = PyLong_AsUnsignedLongLong(ino) == st->sx.stx_ino &&
               PyLong_AsLongLong(mt) == mtime && PyLong_AsLongLong(ct) == ctime;
    if (PyErr_Occurred())
        PyErr_Clear(); /* a stamp that is no ints is no match: the poller lists it */
    return same;
}

/* Push the names of stamp's subdirs (a tuple of str; anything else: nothing known below) on
 * b->names, for the top frame. A name that no directory entry can have is left out. */
static int stamp_names(batch *b, PyObject *stamp)
{
    PyObject *subdirs = PyTuple_GET_ITEM(stamp, STAMP_SUBDIRS);
    if (!PyTuple_Check(subdirs))
        return 0;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(subdirs); i++) {
        PyObject *enc = PyUnicode_Check(PyTuple_GET_ITEM(subdirs, i))
                            ? PyUnicode_EncodeFSDefault(PyTuple_GET_ITEM(subdirs, i)) : NULL;
        if (!enc) {
            if (PyErr_Occurred())
                return -1;
            continue;
        }
        const char *s = PyBytes_AS_STRING(enc);
        size_t len = (size_t)PyBytes_GET_SIZE(enc);
        int ok = len > 0 && !memchr(s, '/', len) && strlen(s) == len && strcmp(s, ".") != 0 &&
                 strcmp(s, "..") != 0;
        int rc = ok ? arena_put(&b->names, s, len, NULL) : 0;
        Py_DECREF(enc);
        if (rc != 0) {
            PyErr_NoMemory();
            return -1;
        }
    }
    return 0;
}

/* Append the path of `name` in directory node `node` (relative to the start) to b->found. */
static int found_path(batch *b, size_t node, const char *name)
{
    size_t len = strlen(name), total = len;
    for (size_t d = node; b->nodes[d].parent != NO_NODE; d = b->nodes[d].parent)
        total += strlen(b->out.buf + b->nodes[d].name_off) + 1;
    char *buf = malloc(total + 1);
    if (!buf) {
        PyErr_NoMemory();
        return -1;
    }
    size_t end = total - len;
    memcpy(buf + end, name, len + 1);
    for (size_t d = node; b->nodes[d].parent != NO_NODE; d = b->nodes[d].parent) {
        const char *part = b->out.buf + b->nodes[d].name_off;
        size_t n = strlen(part);
        if (end < total)
            buf[--end] = '/';
        end -= n;
        memcpy(buf + end, part, n);
    }
    PyObject *path = PyUnicode_DecodeFSDefaultAndSize(buf + end, (Py_ssize_t)(total - end));
    free(buf);
    int rc = path ? PyList_Append(b->found, path) : -1;
    Py_XDECREF(path);
    return rc;
}

/* Stamp mode: a known subdirectory opened O_PATH|O_NOFOLLOW, statx'ed and looked up by its
 * inode number; entered (its stamp's subdirs as names) when unchanged, else reported stale and
 * not entered. Holds the GIL (it reads the dict). */
static int stamp_visit(batch *b, int parent, const char *name)
{
    int fd = openat(parent, name, O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    statx_buf st;
    PyObject *stamp = fd < 0 ? NULL : dir_stamp(b, fd, &st); /* borrowed */
    if (PyErr_Occurred() || !stamp || !dir_unchanged(b, stamp, &st, 0)) {
        if (fd >= 0)
            close(fd);
        return PyErr_Occurred() ? -1 : found_path(b, b->cur, name);
    }
    if (push_frame(b, fd, &st, name, NULL) != 0)
        return -1;
    return stamp_names(b, stamp);
}

/* Stamp mode: a level moved mid-check is stale (the poller walks it). */
static int stamp_lost(batch *b, size_t node)
{
    return found_path(b, b->nodes[node].parent, b->out.buf + b->nodes[node].name_off);
}

static const visit_mode stamp_mode = {stamp_visit, stamp_lost};

PyDoc_STRVAR(check_stamps_doc,
"check_stamps(root_fd, stamps, rules, root_dev, root_mnt) -> (visited, stale)\n\n"
"The incremental poll pass of a serial (local disk) walk: the walk's stamp check mode.\n"
"``stamps`` maps directories' inode numbers to stamps, tuples (ino, mtime_ns, ctime_ns,\n"
"subdirs: a tuple of names). From the root, every known subdirectory is opened\n"
"O_PATH|O_NOFOLLOW relative to its parent, statx'ed and looked up by its inode number; one\n"
"that is unknown, changed, not compliant by ``rules`` or on another mount is returned in\n"
"``stale`` and not entered, as is a level moved mid-check. Iterative, with a bounded number\n"
"of open fds whatever the depth. Runs with the GIL held (it reads the dict): meant for local\n"
"disks, where the whole pass takes a fraction of a second.");

static PyObject *py_check_stamps(PyObject *self, PyObject *args)
{
    int root_fd;
    PyObject *stamps, *rules;
    unsigned long long root_dev;
    long long root_mnt;
    if (!PyArg_ParseTuple(args, "iO!O!KL", &root_fd, &PyDict_Type, &stamps, &RulesType, &rules,
                          &root_dev, &root_mnt))
        return NULL;
    batch b = {.rules = (const rules_obj *)rules, .root_dev = root_dev, .root_mnt = root_mnt,
               .mode = &stamp_mode, .stamps = stamps, .found = PyList_New(0)};
    PyObject *result = NULL;
    if (!b.found)
        goto out;
    statx_buf st;
    PyObject *stamp = dir_stamp(&b, root_fd, &st); /* borrowed */
    if (PyErr_Occurred())
        goto out;
    int rc;
    if (start_frame(&b, root_fd, NULL) != 0)
        rc = -1;
    else if (!stamp || !dir_unchanged(&b, stamp, &st, 1))
        rc = found_path(&b, 0, "");
    else
        rc = stamp_names(&b, stamp) != 0 ? -1 : tree_walk(&b);
    if (rc != 0 && !PyErr_Occurred())
        PyErr_NoMemory();
    if (rc == 0)
        result = Py_BuildValue("(nO)", b.n_dirs, b.found);
out:
    Py_XDECREF(b.found);
    free_batch(&b);
    return result;
}

/* -- list mode: the directories the inotify watcher must watch ---------------------------- */

/* The subdirectories of the directory fd (its own offset; rewound first when `rewind`) pushed
 * on b->names, and whether it had no entry at all (so one removed since it was opened, see
 * next_dent). 0, or -1 with a Python error set. */
static int list_subdirs(batch *b, int fd, int rewind, int *empty)
{
    *empty = 1;
    if (rewind && lseek(fd, 0, SEEK_SET) < 0)
        goto fail;
    dents_cursor c = {0, 0};
    struct dirent64 *d;
    int got;
    while ((got = next_dent(b, fd, &c, &d)) > 0) {
        const char *nm = d->d_name;
        *empty = 0;
        statx_buf st;
        int is_dir = d->d_type == DT_DIR ||
                     (d->d_type == DT_UNKNOWN &&
                      fd_statx(fd, nm, 0, STATX_TYPE, &st) == 0 && S_ISDIR(st.sx.stx_mode));
        if (is_dir && arena_put(&b->names, nm, strlen(nm), NULL) != 0) {
            PyErr_NoMemory();
            return -1;
        }
    }
    if (got == 0)
        return 0;
fail:
    PyErr_SetFromErrno(PyExc_OSError);
    return -1;
}

/* List mode: open a subdirectory O_RDONLY|O_NOFOLLOW relative to its parent (gone, or not a
 * directory any more: skipped); on the root's mount, ask visit(parent token, name, fd, dev,
 * ino) for its token (None: not entered), then list its subdirectories. The fd is valid only
 * during the call (the watch is added through /proc/self/fd/N). Holds the GIL. */
static int list_visit(batch *b, int parent, const char *name)
{
    int fd = openat(parent, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) {
        if (errno == ENOENT || errno == ENOTDIR || errno == ELOOP)
            return 0;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    statx_buf st;
    if (fd_statx(fd, "", AT_EMPTY_PATH, STATX_WANT, &st) != 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        close(fd);
        return -1;
    }
    if (!same_fs(b->root_dev, b->root_mnt, &st)) { /* the healer never enters one either */
        close(fd);
        return 0;
    }
    b->n_dirs++;
    PyObject *token = PyObject_CallFunction(
        b->visit, "ONiKK", b->frames[b->depth - 1].token, PyUnicode_DecodeFSDefault(name), fd,
        (unsigned long long)makedev(st.sx.stx_dev_major, st.sx.stx_dev_minor),
        (unsigned long long)st.sx.stx_ino);
    if (!token || token == Py_None) {
        Py_XDECREF(token);
        close(fd);
        return token ? 0 : -1;
    }
    int first = b->depth == 1, empty;
    if (push_frame(b, fd, &st, name, token) != 0 || list_subdirs(b, fd, 0, &empty) != 0)
        return -1;
    if (!first)
        return 0;
    PyObject *item = Py_BuildValue("(OO)", token, empty ? Py_True : Py_False);
    int rc = item ? PyList_Append(b->found, item) : -1;
    Py_XDECREF(item);
    return rc;
}

/* List mode: a level moved mid-walk is not reported (the watcher's events will place it). */
static int list_lost(batch *b, size_t node)
{
    (void)b;
    (void)node;
    return 0;
}

static const visit_mode list_mode = {list_visit, list_lost};

PyDoc_STRVAR(list_dirs_doc,
"list_dirs(dirfd, token, names, root_dev, root_mnt, visit) -> (entered, visited, reopened)\n\n"
"The walk's list mode, for the inotify watcher: every directory below ``dirfd`` (only the\n"
"entries ``names`` of it when not None) on the root's mount, depth first. Each is opened\n"
"O_RDONLY|O_DIRECTORY|O_NOFOLLOW relative to its parent's fd and handed to\n"
"``visit(parent_token, name, fd, st_dev, st_ino)``, ``token`` being the start's: it returns\n"
"the directory's token, or None to not enter it. ``fd`` is valid during the call only.\n"
"Gone or swapped entries are skipped; a level moved mid-walk is abandoned (its events place\n"
"it). Iterative, at most WINDOW levels' fds open whatever the depth, levels reopened through\n"
"a child's '..' with their identity proven. ``entered``: (token, empty) of the directories\n"
"entered right below ``dirfd``, ``empty`` when it had no entry at all; ``visited``: the\n"
"directories handed to ``visit``; ``reopened``: levels reopened. Holds the GIL.");

static PyObject *py_list_dirs(PyObject *self, PyObject *args)
{
    int dirfd;
    PyObject *token, *names, *visit;
    unsigned long long root_dev;
    long long root_mnt;
    if (!PyArg_ParseTuple(args, "iOOKLO", &dirfd, &token, &names, &root_dev, &root_mnt, &visit))
        return NULL;
    batch b = {.root_dev = root_dev, .root_mnt = root_mnt, .mode = &list_mode, .visit = visit,
               .found = PyList_New(0), .dents = malloc(DENTS_SIZE)};
    PyObject *result = NULL;
    int rc = -1, empty;
    if (!b.found || !b.dents) {
        if (!PyErr_Occurred())
            PyErr_NoMemory();
        goto out;
    }
    Py_INCREF(token);
    if (start_frame(&b, dirfd, token) != 0)
        goto out;
    if (names == Py_None) {
        if (list_subdirs(&b, dirfd, 1, &empty) != 0)
            goto out;
    } else {
        PyObject *tuple = PyTuple_Pack(4, Py_None, Py_None, Py_None, names);
        rc = tuple ? stamp_names(&b, tuple) : -1; /* the same checks on each name */
        Py_XDECREF(tuple);
        if (rc != 0)
            goto out;
    }
    rc = tree_walk(&b);
out:
    if (rc != 0 && !PyErr_Occurred())
        PyErr_NoMemory();
    if (rc == 0)
        result = Py_BuildValue("(Onn)", b.found, b.n_dirs, b.n_reopened);
    Py_XDECREF(b.found);
    free_batch(&b);
    return result;
}

/* Open the directory at `path` (shorter than PATH_MAX) below dirfd as O_PATH, resolved by the
 * kernel with no symlink, no mount crossing and no escape: one syscall for the whole path.
 * Before Linux 5.6 (no openat2): component by component, O_NOFOLLOW, the mount id checked. */
static int open_beneath(int dirfd, char *path)
{
    struct open_how how = {.flags = O_PATH | O_DIRECTORY | O_CLOEXEC,
                           .resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_XDEV |
                                      RESOLVE_NO_MAGICLINKS};
    int fd = (int)syscall(SYS_openat2, dirfd, path, &how, sizeof how);
    if (fd >= 0 || errno != ENOSYS)
        return fd;
    statx_buf top, st;
    if (fd_statx(dirfd, "", AT_EMPTY_PATH, STATX_WANT, &top) != 0)
        return -1;
    long long mnt = (top.sx.stx_mask & STATX_MNT_ID) ? (long long)statx_mnt_id(&top) : -1;
    unsigned long long dev = makedev(top.sx.stx_dev_major, top.sx.stx_dev_minor);
    int cur = dirfd;
    char *save = NULL;
    for (char *part = strtok_r(path, "/", &save); part; part = strtok_r(NULL, "/", &save)) {
        fd = openat(cur, part, O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        if (cur != dirfd)
            close(cur);
        if (fd < 0)
            return -1;
        int bad = fd_statx(fd, "", AT_EMPTY_PATH, STATX_WANT, &st) != 0 ? errno
                  : !same_fs(dev, mnt, &st)                             ? EXDEV
                                                                        : 0;
        if (bad) {
            close(fd);
            errno = bad;
            return -1;
        }
        cur = fd;
    }
    return cur == dirfd ? fcntl(dirfd, F_DUPFD_CLOEXEC, 0) : cur;
}

PyDoc_STRVAR(open_dir_doc,
"open_dir(dirfd, rel) -> fd\n\n"
"Open the directory at the clean relative path ``rel`` below ``dirfd`` as an O_PATH fd,\n"
"never through a symlink, never across a mount (EXDEV), never outside ``dirfd``: openat2\n"
"with RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS|RESOLVE_NO_XDEV, the kernel walking the path in\n"
"one call, chunk by chunk when ``rel`` is longer than PATH_MAX. Raises OSError.");

static PyObject *py_open_dir(PyObject *self, PyObject *args)
{
    int dirfd;
    PyObject *rel_obj;
    if (!PyArg_ParseTuple(args, "iO&", &dirfd, PyUnicode_FSConverter, &rel_obj))
        return NULL;
    const char *rel = PyBytes_AS_STRING(rel_obj);
    size_t len = (size_t)PyBytes_GET_SIZE(rel_obj);
    int cur = dirfd, err = 0;
    char *chunk = malloc(PATH_MAX);
    if (!chunk) {
        Py_DECREF(rel_obj);
        return PyErr_NoMemory();
    }
    Py_BEGIN_ALLOW_THREADS
    for (size_t pos = 0; pos < len;) {
        size_t n = len - pos;
        if (n >= PATH_MAX) { /* cut at the last '/' that fits */
            n = PATH_MAX - 1;
            while (n > 0 && rel[pos + n] != '/')
                n--;
        }
        if (n == 0) {
            err = ENAMETOOLONG;
            break;
        }
        memcpy(chunk, rel + pos, n);
        chunk[n] = '\0';
        int fd = open_beneath(cur, chunk);
        if (fd < 0)
            err = errno;
        if (cur != dirfd)
            close(cur);
        if (fd < 0)
            break;
        cur = fd;
        pos += n + 1; /* and the '/' */
    }
    if (!err && cur == dirfd && (cur = fcntl(dirfd, F_DUPFD_CLOEXEC, 0)) < 0)
        err = errno;
    Py_END_ALLOW_THREADS
    free(chunk);
    if (err) {
        errno = err;
        PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, rel_obj);
        Py_DECREF(rel_obj);
        return NULL;
    }
    Py_DECREF(rel_obj);
    return PyLong_FromLong(cur);
}

PyDoc_STRVAR(stat_doc,
"stat(dirfd, name) -> (mode, uid, gid, ino, dev, mtime_ns, ctime_ns, mnt_id)\n\n"
"statx of ``name`` relative to ``dirfd`` (\"\": the fd itself), never following a symlink,\n"
"with cached attributes allowed (AT_STATX_DONT_SYNC: no extra NFS/FUSE round trip).\n"
"mnt_id is -1 when the kernel does not report it. Raises OSError.");

static PyObject *py_stat(PyObject *self, PyObject *args)
{
    int dirfd;
    PyObject *name_obj;
    if (!PyArg_ParseTuple(args, "iO&", &dirfd, PyUnicode_FSConverter, &name_obj))
        return NULL;
    const char *name = PyBytes_AS_STRING(name_obj);
    statx_buf buf;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = fd_statx(dirfd, name, name[0] ? 0 : AT_EMPTY_PATH, STATX_WANT | STATX_MNT_ID, &buf);
    Py_END_ALLOW_THREADS
    if (rc != 0) {
        PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, name_obj);
        Py_DECREF(name_obj);
        return NULL;
    }
    Py_DECREF(name_obj);
    const struct statx *s = &buf.sx;
    long long mnt = (s->stx_mask & STATX_MNT_ID) ? (long long)statx_mnt_id(&buf) : -1;
    return Py_BuildValue("(IIIKKLLL)", (unsigned int)s->stx_mode, s->stx_uid, s->stx_gid,
                         (unsigned long long)s->stx_ino,
                         (unsigned long long)makedev(s->stx_dev_major, s->stx_dev_minor),
                         (long long)s->stx_mtime.tv_sec * 1000000000LL + s->stx_mtime.tv_nsec,
                         (long long)s->stx_ctime.tv_sec * 1000000000LL + s->stx_ctime.tv_nsec,
                         mnt);
}

static const char *const outcome_name[] = {
    [COMPLIANT] = "compliant", [FIXED] = "fixed", [WOULD_FIX] = "would-fix",
    [SKIP_PROTECTED] = "protected", [SKIP_SPECIAL] = "special", [SKIP_MOUNT] = "mount",
    [SKIP_FOREIGN] = "foreign"};

PyDoc_STRVAR(judge_doc,
"judge(fd, rules, fix, root_dev, root_mnt, is_root) -> (outcome, mode, uid, gid, set_gid,\n"
"                                                     set_mode)\n\n"
"The slow path's one entry: judge the inode behind ``fd`` (an O_PATH or a directory fd) by\n"
"its own statx and ``rules`` (the same classify() as every walk: mount, special,\n"
"compliant, protected, foreign), and with ``fix`` heal it right after, in one call without\n"
"the GIL. ``is_root``: ``fd`` is the root directory itself (its own table; owners not asked).\n"
"outcome: 'compliant', 'fixed', 'would-fix', 'protected', 'special', 'mount' or 'foreign';\n"
"mode/uid/gid as judged; ``set_gid``: the group was changed; ``set_mode``: the bits set, or\n"
"-1. Why in one call: a chmod computed from a mode read earlier undoes a chmod its writer\n"
"made in between (tar and pip create, then chmod at once). Raises OSError.");

static PyObject *py_judge(PyObject *self, PyObject *args)
{
    int fd, fix, is_root, rc = 0;
    PyObject *rules_arg;
    unsigned long long root_dev;
    long long root_mnt;
    if (!PyArg_ParseTuple(args, "iO!pKLp", &fd, &RulesType, &rules_arg, &fix, &root_dev,
                          &root_mnt, &is_root))
        return NULL;
    const rules_obj *rules = (const rules_obj *)rules_arg;
    record r = {.set_mode = -1};
    statx_buf now;
    enum outcome what = COMPLIANT;
    Py_BEGIN_ALLOW_THREADS
    if (fd_statx(fd, "", AT_EMPTY_PATH, STATX_WANT, &now) != 0) {
        r.err = errno;
        rc = -1;
    } else {
        what = classify(rules, &now, root_dev, root_mnt, is_root, fix);
        if (what == FIXED)
            rc = apply_fix(rules, is_root ? rules->root_table : rules->table, fd, &now, &r);
    }
    Py_END_ALLOW_THREADS
    if (rc != 0) {
        errno = r.err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    if (what == FIXED && !r.set_gid && r.set_mode < 0)
        what = COMPLIANT; /* (cannot happen: classify saw something to change) */
    return Py_BuildValue("(sIIIOi)", outcome_name[what], (unsigned int)now.sx.stx_mode,
                         now.sx.stx_uid, now.sx.stx_gid, r.set_gid ? Py_True : Py_False,
                         r.set_mode);
}

/* -- inotify events: one read batch reduced to what the watcher acts on ------------------- */

/* Named events that change the watcher's table when about a directory (see watch/inotify.py);
 * any other named event only asks for its entry to be healed. */
#define EV_ARRIVED (IN_CREATE | IN_MOVED_TO)
#define EV_PLACE (IN_CREATE | IN_MOVED_TO | IN_MOVED_FROM)
#define EV_SELF (IN_IGNORED | IN_MOVE_SELF | IN_DELETE_SELF | IN_UNMOUNT)

PyDoc_STRVAR(events_doc,
"events(data, wds, root_wd) -> (counted, overflow, ordered, entries)\n\n"
"One read batch of inotify events (``data``: struct inotify_event records) reduced to what\n"
"the watcher must act on, in one call instead of a Python step per event. Events of a watch\n"
"descriptor not in the dict ``wds`` (removed since), and of one after its IN_IGNORED, are\n"
"dropped; ``counted`` is how many were not. ``overflow``: an IN_Q_OVERFLOW was read (the\n"
"rest is then empty). ``ordered``: (wd, mask, cookie, name or None), in order, for the\n"
"events that change the table: a directory created, moved in or moved away (IN_ISDIR), and\n"
"the events of a watch on itself (IN_IGNORED, IN_MOVE_SELF, IN_DELETE_SELF, IN_UNMOUNT;\n"
"IN_ATTRIB only for ``root_wd``, the one directory whose parent is not watched).\n"
"``entries``: (wd, urgent, later) for each watch with entry events, in first-seen order:\n"
"the set of names created or moved in (urgent), and of names whose attributes changed and\n"
"not also in urgent (later); a name of a watch dropped by its IN_IGNORED is not in them.\n"
"A non-directory moved away is dropped (nothing to heal). Holds the GIL (no system call).");

/* The group of `wd` in `groups` (wd -> [urgent, later]), made and appended to `order` when
 * new. Borrowed; NULL with a Python error set. */
static PyObject *event_group(PyObject *groups, PyObject *order, PyObject *wd)
{
    PyObject *group = PyDict_GetItemWithError(groups, wd);
    if (group || PyErr_Occurred())
        return group;
    PyObject *urgent = PySet_New(NULL), *later = PySet_New(NULL);
    group = urgent && later ? PyTuple_Pack(3, wd, urgent, later) : NULL;
    Py_XDECREF(urgent);
    Py_XDECREF(later);
    int bad = !group || PyDict_SetItem(groups, wd, group) != 0 || PyList_Append(order, group);
    Py_XDECREF(group); /* the dict holds it */
    return bad ? NULL : group;
}

/* The (wd, urgent, later) groups of `order` that still hold a name, later minus urgent. */
static PyObject *event_entries(PyObject *order)
{
    PyObject *out = PyList_New(0);
    for (Py_ssize_t i = 0; out && i < PyList_GET_SIZE(order); i++) {
        PyObject *g = PyList_GET_ITEM(order, i), *urgent = PyTuple_GET_ITEM(g, 1);
        PyObject *later = PyNumber_Subtract(PyTuple_GET_ITEM(g, 2), urgent), *item = NULL;
        int keep = later && (PySet_GET_SIZE(urgent) || PySet_GET_SIZE(later));
        if (keep)
            item = PyTuple_Pack(3, PyTuple_GET_ITEM(g, 0), urgent, later);
        if (!later || (keep && (!item || PyList_Append(out, item) != 0)))
            Py_CLEAR(out);
        Py_XDECREF(item);
        Py_XDECREF(later);
    }
    return out;
}

/* One event of a known watch `wd`: into ordered, or its name into its group's sets, or
 * dropped; an IN_IGNORED empties the watch's group and marks it gone. 0, or -1 (Python
 * error set). */
static int take_event(const struct inotify_event *ev, const char *raw, PyObject *wd,
                      int root_wd, PyObject *groups, PyObject *order, PyObject *gone,
                      PyObject *ordered)
{
    size_t nlen = strnlen(raw, ev->len);
    uint32_t mask = ev->mask;
    if (mask & IN_IGNORED) {
        PyObject *group = PyDict_GetItemWithError(groups, wd);
        if ((!group && PyErr_Occurred()) || PySet_Add(gone, wd) != 0 ||
            (group && (PySet_Clear(PyTuple_GET_ITEM(group, 1)) != 0 ||
                       PySet_Clear(PyTuple_GET_ITEM(group, 2)) != 0)))
            return -1;
    }
    if (nlen && !((mask & IN_ISDIR) && (mask & EV_PLACE))) { /* an entry to heal */
        if (mask & IN_MOVED_FROM)
            return 0;
        PyObject *group = event_group(groups, order, wd);
        PyObject *name = group ? PyUnicode_DecodeFSDefaultAndSize(raw, nlen) : NULL;
        int rc = name ? PySet_Add(PyTuple_GET_ITEM(group, mask & EV_ARRIVED ? 1 : 2), name) : -1;
        Py_XDECREF(name);
        return rc;
    }
    if (!nlen && !(mask & EV_SELF) && ev->wd != root_wd)
        return 0; /* an attribute of a directory, also reported by name in its parent */
    PyObject *name = nlen ? PyUnicode_DecodeFSDefaultAndSize(raw, nlen) : Py_NewRef(Py_None);
    PyObject *item = name ? Py_BuildValue("(OIIO)", wd, mask, ev->cookie, name) : NULL;
    int rc = item ? PyList_Append(ordered, item) : -1;
    Py_XDECREF(item);
    Py_XDECREF(name);
    return rc;
}

static PyObject *py_events(PyObject *self, PyObject *args)
{
    Py_buffer data;
    PyObject *wds;
    int root_wd;
    if (!PyArg_ParseTuple(args, "y*O!i", &data, &PyDict_Type, &wds, &root_wd))
        return NULL;
    PyObject *ordered = PyList_New(0), *order = PyList_New(0), *groups = PyDict_New();
    PyObject *gone = PySet_New(NULL), *entries = NULL, *result = NULL;
    Py_ssize_t counted = 0;
    int overflow = 0, ok = ordered && order && groups && gone;
    const char *buf = data.buf;
    size_t off = 0, end = (size_t)data.len, head = sizeof(struct inotify_event);
    while (ok && off + head <= end) {
        struct inotify_event ev; /* copied: the records are not aligned in a joined buffer */
        memcpy(&ev, buf + off, head);
        if (ev.len > end - off - head)
            break; /* a truncated record: a read never returns one */
        const char *name = buf + off + head;
        off += head + ev.len;
        if (ev.mask & IN_Q_OVERFLOW) {
            overflow = 1;
            break;
        }
        PyObject *wd = PyLong_FromLong(ev.wd);
        int known = wd ? PyDict_Contains(wds, wd) : -1, dead = 0;
        if (known > 0)
            dead = PySet_Contains(gone, wd);
        ok = known >= 0 && dead >= 0;
        if (ok && known && !dead) {
            counted++;
            ok = take_event(&ev, name, wd, root_wd, groups, order, gone, ordered) == 0;
        }
        Py_XDECREF(wd);
    }
    if (ok && overflow)
        result = Py_BuildValue("(nONN)", counted, Py_True, PyList_New(0), PyList_New(0));
    else if (ok && (entries = event_entries(order)) != NULL)
        result = Py_BuildValue("(nOOO)", counted, Py_False, ordered, entries);
    PyBuffer_Release(&data);
    Py_XDECREF(ordered);
    Py_XDECREF(order);
    Py_XDECREF(groups);
    Py_XDECREF(gone);
    Py_XDECREF(entries);
    return result;
}

/* The three inotify calls the watcher makes. Adding a watch is made once per directory walked
 * (160k on a big root): through ctypes it cost ~7 us of the ~20 us the reader spends on a new
 * directory, and it let the interpreter go to another thread on every one. */
PyDoc_STRVAR(inotify_init_doc,
"inotify_init() -> fd\n\n"
"A new inotify instance, non-blocking and close-on-exec; raises OSError.");

static PyObject *py_inotify_init(PyObject *self, PyObject *args)
{
    int fd = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
    return fd < 0 ? PyErr_SetFromErrno(PyExc_OSError) : PyLong_FromLong(fd);
}

PyDoc_STRVAR(add_watch_doc,
"add_watch(ifd, fd, mask) -> wd\n\n"
"The watch descriptor of the directory open on ``fd``, added through /proc/self/fd/N (no\n"
"path is resolved: the very directory opened; the kernel's existing descriptor for an inode\n"
"already watched); raises OSError (ENOSPC: out of max_user_watches). Holds the GIL: one\n"
"system call.");

static PyObject *py_add_watch(PyObject *self, PyObject *args)
{
    int ifd, fd;
    unsigned int mask;
    if (!PyArg_ParseTuple(args, "iiI", &ifd, &fd, &mask))
        return NULL;
    char path[64];
    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    int wd = inotify_add_watch(ifd, path, mask);
    return wd < 0 ? PyErr_SetFromErrno(PyExc_OSError) : PyLong_FromLong(wd);
}

PyDoc_STRVAR(rm_watch_doc,
"rm_watch(ifd, wd)\n\n"
"Remove a watch (EINVAL, when the kernel already did, is ignored: so is every error).");

static PyObject *py_rm_watch(PyObject *self, PyObject *args)
{
    int ifd, wd;
    if (!PyArg_ParseTuple(args, "ii", &ifd, &wd))
        return NULL;
    inotify_rm_watch(ifd, wd);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"scan", py_scan, METH_VARARGS, scan_doc},
    {"walk", py_walk, METH_VARARGS, walk_doc},
    {"check_stamps", py_check_stamps, METH_VARARGS, check_stamps_doc},
    {"list_dirs", py_list_dirs, METH_VARARGS, list_dirs_doc},
    {"open_dir", py_open_dir, METH_VARARGS, open_dir_doc},
    {"stat", py_stat, METH_VARARGS, stat_doc},
    {"judge", py_judge, METH_VARARGS, judge_doc},
    {"events", py_events, METH_VARARGS, events_doc},
    {"inotify_init", py_inotify_init, METH_NOARGS, inotify_init_doc},
    {"add_watch", py_add_watch, METH_VARARGS, add_watch_doc},
    {"rm_watch", py_rm_watch, METH_VARARGS, rm_watch_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "envctl_shared.heal._fastfs",
    "The healer's per-directory hot loop and fd primitives (see _fastfs.c).", -1, methods,
};

PyMODINIT_FUNC PyInit__fastfs(void)
{
    if (PyType_Ready(&RulesType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m && (PyModule_AddObjectRef(m, "Rules", (PyObject *)&RulesType) < 0 ||
              PyModule_AddIntConstant(m, "WINDOW", WINDOW) < 0))
        Py_CLEAR(m);
    return m;
}
