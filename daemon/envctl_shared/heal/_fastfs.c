/*
 * envctl_shared.heal._fastfs — the healer's per-directory hot loop, in C.
 *
 * Why C: a walk costs one metadata call per entry, and on a local disk that call takes ~1 µs;
 * a Python loop around it took 8 µs per compliant entry and ~60 µs per fixed one, which made
 * `envctl check` 2× slower than `find` and `envctl heal` 3× slower than `chgrp -R && chmod -R`.
 * Here a whole batch of entries is listed, inspected and fixed with the GIL released, so
 * walk threads on NFS/FUSE really overlap and Python only sees what needs a decision.
 *
 * This module holds mechanism only. What "correct" means stays in envctl_shared.policy: the caller
 * passes a table of the wanted permission bits for every st_mode (computed by the policy) and
 * the wanted group. Anything unusual (special files, protected owners, an entry that changed
 * between inspection and fix, another mount, a directory) is handed back to Python's slow path,
 * which applies every rule itself. The fast path keeps the healer's safety rules:
 *
 *   - entries are inspected with statx(AT_SYMLINK_NOFOLLOW) relative to a directory fd;
 *   - an entry is changed only through an O_PATH|O_NOFOLLOW fd whose own statx shows the very
 *     inode (same ino, type and owner) that was judged;
 *   - statx uses AT_STATX_DONT_SYNC: on NFS/FUSE the attributes the lookup just returned are
 *     used instead of a second GETATTR round trip (a local filesystem ignores the flag).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dirent.h>
#include <limits.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#ifndef AT_STATX_DONT_SYNC
#define AT_STATX_DONT_SYNC 0x4000
#endif
#ifndef STATX_MNT_ID
#define STATX_MNT_ID 0x1000U
#endif
#ifndef SYS_fchmodat2
#define SYS_fchmodat2 452 /* the same number on every architecture (Linux >= 6.6) */
#endif

#define STATX_WANT (STATX_TYPE | STATX_MODE | STATX_UID | STATX_GID | STATX_INO | \
                    STATX_MTIME | STATX_CTIME)
#define STATX_MNT_OFFSET 144 /* stx_mnt_id; glibc 2.36's struct statx predates the field */
#define NO_FIX 0xFFFF        /* table value: never fix here, always hand to Python */
#define TABLE_BYTES (65536 * 2)

typedef union {
    struct statx sx;
    unsigned char raw[256];
} statx_buf;

/* One entry's outcome in a batch. */
enum outcome { OK, SUBDIR, ATTENTION, ERROR, VANISHED, FIXED };

typedef struct {
    size_t path_off; /* into the batch's output arena: the path relative to the start dir */
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

typedef struct {
    uint32_t gid;
    const uint16_t *table;
    const uint32_t *protected_uids;
    Py_ssize_t n_protected;
    int fix;
    int walk; /* descend into subdirectories (walk) instead of reporting them (scan) */
    unsigned long long root_dev;
    long long root_mnt; /* -1: no mount id check needed */
    arena out;          /* record paths, NUL-terminated */
    arena names;        /* scratch: names listed, used as a stack across the walk */
    arena rel;          /* the current directory relative to the start (walk), NUL-ended */
    char *dents;        /* getdents64 buffer */
    record *recs;
    size_t n_recs, cap_recs;
    Py_ssize_t n_ok, n_dirs;
} batch;

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

/* Append `len` bytes and a NUL; the offset of the copy goes to *off. */
static int arena_put(arena *a, const char *s, size_t len, size_t *off)
{
    if (a->len + len + 1 > a->cap) {
        size_t cap = a->cap ? a->cap * 2 : 4096;
        while (cap < a->len + len + 1)
            cap *= 2;
        char *grown = realloc(a->buf, cap);
        if (!grown)
            return -1;
        a->buf = grown;
        a->cap = cap;
    }
    memcpy(a->buf + a->len, s, len);
    a->buf[a->len + len] = '\0';
    if (off)
        *off = a->len;
    a->len += len + 1;
    return 0;
}

/* A record for `name` in the current directory; its path is b->rel + "/" + name. */
static record *add_record(batch *b, const char *name, enum outcome what)
{
    if (b->n_recs == b->cap_recs) {
        size_t cap = b->cap_recs ? b->cap_recs * 2 : 64;
        record *grown = realloc(b->recs, cap * sizeof *grown);
        if (!grown)
            return NULL;
        b->recs = grown;
        b->cap_recs = cap;
    }
    size_t off = b->out.len;
    if (b->rel.len) {
        if (arena_put(&b->out, b->rel.buf, b->rel.len, NULL) != 0)
            return NULL;
        b->out.buf[b->out.len - 1] = '/'; /* the separator replaces the prefix's NUL */
    }
    if (arena_put(&b->out, name, strlen(name), NULL) != 0)
        return NULL;
    record *r = &b->recs[b->n_recs++];
    memset(r, 0, sizeof *r);
    r->path_off = off;
    r->what = what;
    r->set_mode = -1;
    return r;
}

/* Descend: b->rel becomes "rel/name". Returns the previous length, or -1 when out of memory. */
static long rel_push(batch *b, const char *name)
{
    size_t plen = b->rel.len, nlen = strlen(name), need = plen + nlen + 2;
    if (need > b->rel.cap) {
        size_t cap = b->rel.cap ? b->rel.cap * 2 : 256;
        while (cap < need)
            cap *= 2;
        char *grown = realloc(b->rel.buf, cap);
        if (!grown)
            return -1;
        b->rel.buf = grown;
        b->rel.cap = cap;
    }
    size_t pos = plen;
    if (plen)
        b->rel.buf[pos++] = '/';
    memcpy(b->rel.buf + pos, name, nlen);
    b->rel.len = pos + nlen;
    b->rel.buf[b->rel.len] = '\0';
    return (long)plen;
}

static int is_protected(const batch *b, uint32_t uid)
{
    for (Py_ssize_t i = 0; i < b->n_protected; i++)
        if (b->protected_uids[i] == uid)
            return 1;
    return 0;
}

/* On the root's device and, when root_mnt >= 0, on its very mount (bind mounts included). */
static int same_fs(unsigned long long root_dev, long long root_mnt, const statx_buf *st)
{
    return makedev(st->sx.stx_dev_major, st->sx.stx_dev_minor) == root_dev &&
           (root_mnt < 0 || ((st->sx.stx_mask & STATX_MNT_ID) &&
                             statx_mnt_id(st) == (uint64_t)root_mnt));
}

/* Set group and permission bits on the inode behind fd (an O_PATH or a directory fd), as
 * judged from `now`; fills r->set_gid/set_mode. Returns 0 or -1 with r->err set. */
static int apply_fix(const batch *b, int fd, statx_buf *now, record *r)
{
    uint16_t want = b->table[now->sx.stx_mode];
    if (now->sx.stx_gid != b->gid) {
        if (fchownat(fd, "", (uid_t)-1, b->gid, AT_EMPTY_PATH) != 0)
            goto fail;
        r->set_gid = 1;
        if (!S_ISDIR(now->sx.stx_mode) && (now->sx.stx_mode & (S_ISUID | S_ISGID))) {
            /* chown may clear setuid/setgid on a file: judge the bits afresh */
            if (fd_statx(fd, "", AT_EMPTY_PATH, STATX_WANT, now) != 0)
                goto fail;
            want = b->table[now->sx.stx_mode];
        }
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
 * Returns the outcome; ATTENTION when anything is unusual (Python's slow path decides). */
static enum outcome fix_entry(const batch *b, int dirfd, const char *name,
                              const statx_buf *seen, record *r)
{
    int fd = openat(dirfd, name, O_PATH | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) {
        r->err = errno;
        return errno == ENOENT ? VANISHED : ERROR;
    }
    statx_buf now;
    unsigned int mask = STATX_WANT | (b->root_mnt >= 0 ? STATX_MNT_ID : 0);
    enum outcome out = FIXED;
    if (fd_statx(fd, "", AT_EMPTY_PATH, mask, &now) != 0) {
        r->err = errno;
        out = ERROR;
    } else if (now.sx.stx_ino != seen->sx.stx_ino || now.sx.stx_uid != seen->sx.stx_uid ||
               (now.sx.stx_mode & S_IFMT) != (seen->sx.stx_mode & S_IFMT) ||
               !same_fs(b->root_dev, b->root_mnt, &now)) {
        out = ATTENTION; /* swapped, re-owned or another mount: the slow path re-judges it */
    } else if (apply_fix(b, fd, &now, r) != 0) {
        out = ERROR;
    }
    close(fd);
    return out;
}

/* Inspect (and with b->fix, heal) one entry of dirfd; the GIL is not held. A directory is
 * not inspected: *is_dir is set and the caller decides. Returns -1 only when out of memory. */
static int do_entry(batch *b, int dirfd, const char *name, int known_dir, int *is_dir)
{
    *is_dir = known_dir;
    if (known_dir)
        return 0;
    statx_buf seen;
    if (fd_statx(dirfd, name, 0, STATX_WANT, &seen) != 0) {
        int err = errno;
        record *r = add_record(b, name, err == ENOENT ? VANISHED : ERROR);
        if (!r)
            return -1;
        r->err = err;
        return 0;
    }
    uint16_t mode = seen.sx.stx_mode;
    if (S_ISDIR(mode)) {
        *is_dir = 1;
        return 0;
    }
    uint16_t want = b->table[mode];
    if (want != NO_FIX && seen.sx.stx_gid == b->gid && want == (mode & 07777)) {
        b->n_ok++;
        return 0;
    }
    record tmp = {.set_mode = -1, .mode = mode, .uid = seen.sx.stx_uid,
                  .gid = seen.sx.stx_gid};
    tmp.what = (want == NO_FIX || !b->fix || is_protected(b, seen.sx.stx_uid))
                   ? ATTENTION
                   : fix_entry(b, dirfd, name, &seen, &tmp);
    record *r = add_record(b, name, tmp.what);
    if (!r)
        return -1;
    tmp.path_off = r->path_off;
    *r = tmp;
    return 0;
}

/* A subdirectory met in scan mode is reported; in walk mode it is queued on b->names. */
static int found_dir(batch *b, const char *name)
{
    if (b->walk)
        return arena_put(&b->names, name, strlen(name), NULL);
    return add_record(b, name, SUBDIR) ? 0 : -1;
}

static int walk_dir(batch *b, int dirfd);

/* Walk mode: open a subdirectory no-follow, prove it is on the root's mount, judge and heal
 * it through its own fd, then walk it. Anything else goes back to Python, which visits it
 * and its subtree itself. Returns -1 only when out of memory. */
static int visit_subdir(batch *b, int parent, const char *name)
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
    int rc = 0;
    statx_buf st;
    unsigned int mask = STATX_WANT | (b->root_mnt >= 0 ? STATX_MNT_ID : 0);
    record tmp = {.set_mode = -1};
    enum outcome what = OK;
    if (fd_statx(fd, "", AT_EMPTY_PATH, mask, &st) != 0) {
        tmp.err = errno;
        what = ERROR;
    } else {
        uint16_t want = b->table[st.sx.stx_mode];
        int ok = st.sx.stx_gid == b->gid && want == (st.sx.stx_mode & 07777);
        if (!same_fs(b->root_dev, b->root_mnt, &st) || (!ok && (!b->fix || is_protected(b, st.sx.stx_uid)))) {
            what = ATTENTION;
        } else if (!ok) {
            statx_buf now = st;
            what = apply_fix(b, fd, &now, &tmp) == 0 ? FIXED : ERROR;
        }
        tmp.mode = st.sx.stx_mode;
        tmp.uid = st.sx.stx_uid;
        tmp.gid = st.sx.stx_gid;
    }
    if (what != OK) {
        record *r = add_record(b, name, what);
        if (!r) {
            rc = -1;
            goto done;
        }
        tmp.path_off = r->path_off;
        tmp.what = what;
        if (what != ERROR)
            tmp.err = 0;
        *r = tmp;
        if (what != FIXED)
            goto done;
    }
    b->n_dirs++;
    long plen = rel_push(b, name);
    if (plen < 0) {
        rc = -1;
        goto done;
    }
    rc = walk_dir(b, fd);
    b->rel.len = (size_t)plen;
    b->rel.buf[plen] = '\0';
    if (rc > 0) { /* listing it failed: report the directory, go on */
        record *r = add_record(b, name, ERROR);
        if (r)
            r->err = rc;
        rc = r ? 0 : -1;
    }
done:
    close(fd);
    return rc;
}

/* List dirfd with getdents64 and inspect every entry; in walk mode, then descend into each
 * subdirectory. The walker owns its directory fds and reads them nowhere else, so the fd's
 * own offset is used (rewound first). The GIL is not held. Returns 0, an errno from the
 * listing, or -1 when out of memory. */
static int walk_dir(batch *b, int dirfd)
{
    size_t mark = b->names.len;
    int rc = 0;
    if (lseek(dirfd, 0, SEEK_SET) < 0) {
        rc = errno;
        goto out;
    }
    for (;;) {
        long n = syscall(SYS_getdents64, dirfd, b->dents, DENTS_SIZE);
        if (n < 0) {
            rc = errno;
            goto out;
        }
        if (n == 0)
            break;
        for (long pos = 0; pos < n;) {
            struct dirent64 *d = (struct dirent64 *)(b->dents + pos);
            pos += d->d_reclen;
            const char *nm = d->d_name;
            if (nm[0] == '.' && (nm[1] == '\0' || (nm[1] == '.' && nm[2] == '\0')))
                continue;
            int is_dir;
            if (do_entry(b, dirfd, nm, d->d_type == DT_DIR, &is_dir) != 0 ||
                (is_dir && found_dir(b, nm) != 0)) {
                rc = -1;
                goto out;
            }
        }
    }
    /* Subdirectories after the listing: the getdents buffer is free again for them. */
    for (size_t off = mark; off < b->names.len;) {
        char name[NAME_MAX + 1];
        size_t nlen = strlen(b->names.buf + off);
        memcpy(name, b->names.buf + off, nlen + 1); /* the arena may move below */
        off += nlen + 1;
        if (visit_subdir(b, dirfd, name) != 0) {
            rc = -1;
            goto out;
        }
    }
out:
    b->names.len = mark; /* this directory's names are done with, whatever happened */
    return rc;
}

static PyObject *build_lists(batch *b, PyObject **attention, PyObject **fixed)
{
    PyObject *subdirs = PyList_New(0);
    *attention = PyList_New(0);
    *fixed = PyList_New(0);
    if (!subdirs || !*attention || !*fixed)
        goto fail;
    for (size_t i = 0; i < b->n_recs; i++) {
        record *r = &b->recs[i];
        PyObject *path = PyUnicode_DecodeFSDefault(b->out.buf + r->path_off);
        if (!path)
            goto fail;
        PyObject *item = NULL, *target = NULL;
        switch (r->what) {
        case SUBDIR:
            target = subdirs;
            item = path;
            Py_INCREF(path);
            break;
        case FIXED:
            target = *fixed;
            item = Py_BuildValue("(OIIii)", path, r->mode, r->gid, r->set_gid, r->set_mode);
            break;
        default: /* ATTENTION, ERROR, VANISHED: (path, errno, mode, uid, gid) */
            target = *attention;
            item = Py_BuildValue("(OiIII)", path, r->what == ATTENTION ? 0 : r->err,
                                 r->mode, r->uid, r->gid);
            break;
        }
        Py_DECREF(path);
        if (!item || PyList_Append(target, item) != 0) {
            Py_XDECREF(item);
            goto fail;
        }
        Py_DECREF(item);
    }
    return subdirs;
fail:
    Py_XDECREF(subdirs);
    Py_CLEAR(*attention);
    Py_CLEAR(*fixed);
    return NULL;
}

/* Parse the arguments both entry points share; fills b and the protected uid array. */
static int setup_batch(batch *b, Py_buffer *table, PyObject *protected_seq, uint32_t **prot)
{
    if (table->len != TABLE_BYTES) {
        PyErr_SetString(PyExc_ValueError, "table must hold 65536 uint16 values");
        return -1;
    }
    b->table = table->buf;
    PyObject *pseq = PySequence_Fast(protected_seq, "protected must be a sequence of uids");
    if (!pseq)
        return -1;
    b->n_protected = PySequence_Fast_GET_SIZE(pseq);
    *prot = PyMem_Calloc(b->n_protected + 1, sizeof **prot);
    for (Py_ssize_t i = 0; *prot && i < b->n_protected; i++)
        (*prot)[i] = (uint32_t)PyLong_AsUnsignedLong(PySequence_Fast_GET_ITEM(pseq, i));
    Py_DECREF(pseq);
    if (!*prot) {
        PyErr_NoMemory();
        return -1;
    }
    if (PyErr_Occurred())
        return -1;
    b->protected_uids = *prot;
    b->dents = malloc(DENTS_SIZE);
    if (!b->dents) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

static void free_batch(batch *b)
{
    free(b->out.buf);
    free(b->names.buf);
    free(b->rel.buf);
    free(b->dents);
    free(b->recs);
}

/* The result of a scan (n_ok, subdirs, attention, fixed) or of a walk (n_ok, n_dirs,
 * attention, fixed), or the exception for `err` (an errno, or -1: out of memory). */
static PyObject *batch_result(batch *b, int err)
{
    if (err) {
        errno = err == -1 ? ENOMEM : err;
        return PyErr_SetFromErrno(err == -1 ? PyExc_MemoryError : PyExc_OSError);
    }
    PyObject *attention, *fixed;
    PyObject *subdirs = build_lists(b, &attention, &fixed);
    if (!subdirs)
        return NULL;
    if (!b->walk)
        return Py_BuildValue("(nNNN)", b->n_ok, subdirs, attention, fixed);
    Py_DECREF(subdirs); /* always empty in walk mode */
    return Py_BuildValue("(nnNN)", b->n_ok, b->n_dirs, attention, fixed);
}

PyDoc_STRVAR(scan_doc,
"scan(dirfd, names, gid, table, protected, fix, root_dev, root_mnt)\n"
"    -> (n_ok, subdirs, attention, fixed)\n\n"
"Inspect the entries ``names`` of the directory ``dirfd`` (None: list it), and with ``fix``\n"
"heal the plain cases. ``table`` is 65536 native uint16: the wanted permission bits for\n"
"each st_mode, 0xFFFF for entries never fixed here. ``root_mnt`` -1 skips mount id checks.\n"
"n_ok counts compliant non-directories; subdirs are directory names (not inspected);\n"
"attention holds (name, errno, mode, uid, gid) for what Python must decide (errno 0) or\n"
"what failed (ENOENT: vanished); fixed holds (name, old_mode, old_gid, set_gid, set_mode).");

static PyObject *py_scan(PyObject *self, PyObject *args)
{
    int dirfd, fix;
    unsigned int gid;
    PyObject *names, *protected_seq;
    Py_buffer table;
    unsigned long long root_dev;
    long long root_mnt;
    if (!PyArg_ParseTuple(args, "iOIy*OpKL", &dirfd, &names, &gid, &table, &protected_seq,
                          &fix, &root_dev, &root_mnt))
        return NULL;
    batch b = {.gid = gid, .fix = fix, .root_dev = root_dev, .root_mnt = root_mnt};
    PyObject *result = NULL;
    uint32_t *prot = NULL;
    size_t *offs = NULL;
    if (setup_batch(&b, &table, protected_seq, &prot) != 0)
        goto out;
    int err = 0;
    if (names == Py_None) {
        Py_BEGIN_ALLOW_THREADS
        err = walk_dir(&b, dirfd);
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
            int bad = arena_put(&b.names, PyBytes_AS_STRING(enc),
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
        for (Py_ssize_t i = 0; i < n && !err; i++) {
            const char *nm = b.names.buf + offs[i];
            int is_dir;
            if (do_entry(&b, dirfd, nm, 0, &is_dir) != 0 || (is_dir && found_dir(&b, nm) != 0))
                err = -1;
        }
        Py_END_ALLOW_THREADS
    }
    result = batch_result(&b, err);
out:
    PyBuffer_Release(&table);
    PyMem_Free(prot);
    PyMem_Free(offs);
    free_batch(&b);
    return result;
}

PyDoc_STRVAR(walk_doc,
"walk(dirfd, gid, table, protected, fix, root_dev, root_mnt)\n"
"    -> (n_ok, n_dirs, attention, fixed)\n\n"
"scan() for the whole subtree below ``dirfd`` (not dirfd itself): each subdirectory is\n"
"opened O_NOFOLLOW, must be on the root's mount, is judged by ``table`` and healed through\n"
"its own fd, then walked. A subdirectory that is not plain (another mount, a protected\n"
"owner, wrong with ``fix`` off, swapped) is returned in ``attention`` by its path and not\n"
"entered: the caller visits it and what lies below. Paths are relative to ``dirfd``.\n"
"n_dirs counts the subdirectories walked.");

static PyObject *py_walk(PyObject *self, PyObject *args)
{
    int dirfd, fix;
    unsigned int gid;
    PyObject *protected_seq;
    Py_buffer table;
    unsigned long long root_dev;
    long long root_mnt;
    if (!PyArg_ParseTuple(args, "iIy*OpKL", &dirfd, &gid, &table, &protected_seq, &fix,
                          &root_dev, &root_mnt))
        return NULL;
    batch b = {.gid = gid, .fix = fix, .walk = 1, .root_dev = root_dev, .root_mnt = root_mnt};
    PyObject *result = NULL;
    uint32_t *prot = NULL;
    if (setup_batch(&b, &table, protected_seq, &prot) != 0)
        goto out;
    int err;
    Py_BEGIN_ALLOW_THREADS
    err = walk_dir(&b, dirfd);
    Py_END_ALLOW_THREADS
    result = batch_result(&b, err);
out:
    PyBuffer_Release(&table);
    PyMem_Free(prot);
    free_batch(&b);
    return result;
}

/* The stamp check of a serial poll pass: what the walk needs of the poller's table. */
typedef struct {
    PyObject *stamps; /* dict: rel -> object with ino, mtime, ctime, subdirs */
    PyObject *stale;  /* list of rel */
    uint32_t gid;
    const uint16_t *table;
    unsigned long long root_dev;
    long long root_mnt;
    Py_ssize_t visited;
} stamp_walk;

static PyObject *s_ino, *s_mtime, *s_ctime, *s_subdirs;

/* Whether the directory behind fd is correct and exactly as `stamp` recorded it. */
static int dir_unchanged(stamp_walk *w, int fd, PyObject *stamp)
{
    statx_buf st;
    unsigned int mask = STATX_WANT | (w->root_mnt >= 0 ? STATX_MNT_ID : 0);
    if (fd_statx(fd, "", AT_EMPTY_PATH, mask, &st) != 0)
        return 0;
    w->visited++;
    uint16_t mode = st.sx.stx_mode;
    if (!S_ISDIR(mode) || !same_fs(w->root_dev, w->root_mnt, &st) || st.sx.stx_gid != w->gid ||
        w->table[mode] != (mode & 07777))
        return 0;
    long long mtime = (long long)st.sx.stx_mtime.tv_sec * 1000000000LL + st.sx.stx_mtime.tv_nsec;
    long long ctime = (long long)st.sx.stx_ctime.tv_sec * 1000000000LL + st.sx.stx_ctime.tv_nsec;
    PyObject *ino = PyObject_GetAttr(stamp, s_ino), *mt = PyObject_GetAttr(stamp, s_mtime),
             *ct = PyObject_GetAttr(stamp, s_ctime);
    int same = ino && mt && ct && PyLong_AsUnsignedLongLong(ino) == st.sx.stx_ino &&
               PyLong_AsLongLong(mt) == mtime && PyLong_AsLongLong(ct) == ctime;
    Py_XDECREF(ino);
    Py_XDECREF(mt);
    Py_XDECREF(ct);
    return same;
}

/* Check the known subdirectories of the unchanged directory fd (at `rel`), recursively.
 * Returns -1 on a Python error. */
static int check_subdirs(stamp_walk *w, int fd, PyObject *rel, PyObject *stamp)
{
    PyObject *subdirs = PyObject_GetAttr(stamp, s_subdirs);
    if (!subdirs)
        return -1;
    int rc = 0;
    Py_ssize_t n = PyTuple_Check(subdirs) ? PyTuple_GET_SIZE(subdirs) : 0;
    for (Py_ssize_t i = 0; i < n && rc == 0; i++) {
        PyObject *name = PyTuple_GET_ITEM(subdirs, i);
        PyObject *child = PyUnicode_GET_LENGTH(rel) ? PyUnicode_FromFormat("%U/%U", rel, name)
                                                     : (Py_INCREF(name), name);
        PyObject *enc = child ? PyUnicode_EncodeFSDefault(name) : NULL;
        if (!enc) {
            Py_XDECREF(child);
            rc = -1;
            break;
        }
        PyObject *cstamp = PyDict_GetItemWithError(w->stamps, child); /* borrowed */
        int cfd = -1;
        if (cstamp)
            cfd = openat(fd, PyBytes_AS_STRING(enc),
                         O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        if (PyErr_Occurred()) {
            rc = -1;
        } else if (cfd < 0 || !dir_unchanged(w, cfd, cstamp)) {
            rc = PyList_Append(w->stale, child);
        } else {
            rc = check_subdirs(w, cfd, child, cstamp);
        }
        if (cfd >= 0)
            close(cfd);
        Py_DECREF(enc);
        Py_DECREF(child);
    }
    Py_DECREF(subdirs);
    return rc;
}

PyDoc_STRVAR(check_stamps_doc,
"check_stamps(root_fd, stamps, gid, table, root_dev, root_mnt) -> (visited, stale)\n\n"
"The incremental poll pass of a serial (local disk) walk. ``stamps`` maps root-relative\n"
"directory paths to objects with ``ino``, ``mtime``, ``ctime`` (ns) and ``subdirs`` (a\n"
"tuple of names). From the root, every known subdirectory is opened O_PATH|O_NOFOLLOW\n"
"relative to its parent and statx'ed; one that is unknown, changed, wrong by ``table`` or\n"
"on another mount is returned in ``stale`` and not entered. Runs with the GIL held (it\n"
"reads the dict): meant for local disks, where the whole pass takes a fraction of a second.");

static PyObject *py_check_stamps(PyObject *self, PyObject *args)
{
    int root_fd;
    unsigned int gid;
    PyObject *stamps;
    Py_buffer table;
    unsigned long long root_dev;
    long long root_mnt;
    if (!PyArg_ParseTuple(args, "iO!Iy*KL", &root_fd, &PyDict_Type, &stamps, &gid, &table,
                          &root_dev, &root_mnt))
        return NULL;
    PyObject *result = NULL, *root = PyUnicode_FromString("");
    stamp_walk w = {.stamps = stamps, .stale = PyList_New(0), .gid = gid, .table = table.buf,
                    .root_dev = root_dev, .root_mnt = root_mnt};
    if (!root || !w.stale)
        goto out;
    if (table.len != TABLE_BYTES) {
        PyErr_SetString(PyExc_ValueError, "table must hold 65536 uint16 values");
        goto out;
    }
    PyObject *stamp = PyDict_GetItemWithError(stamps, root);
    if (PyErr_Occurred())
        goto out;
    int rc = (!stamp || !dir_unchanged(&w, root_fd, stamp)) ? PyList_Append(w.stale, root)
                                                             : check_subdirs(&w, root_fd, root,
                                                                             stamp);
    if (rc == 0)
        result = Py_BuildValue("(nO)", w.visited, w.stale);
out:
    Py_XDECREF(root);
    Py_XDECREF(w.stale);
    PyBuffer_Release(&table);
    return result;
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

PyDoc_STRVAR(chgrp_doc,
"chgrp(fd, gid)\n\nSet the group of the inode behind ``fd`` (an O_PATH fd included: a symlink\n"
"stays the link) with fchownat(AT_EMPTY_PATH), which Python's os module cannot express.");

/* chgrp and chmod of the inode behind an fd: parse (fd, value), run without the GIL. */
typedef int (*fd_op)(int fd, unsigned int value);

static PyObject *call_fd_op(PyObject *args, fd_op op)
{
    int fd, rc;
    unsigned int value;
    if (!PyArg_ParseTuple(args, "iI", &fd, &value))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    rc = op(fd, value);
    Py_END_ALLOW_THREADS
    if (rc != 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

static int chgrp_fd(int fd, unsigned int gid)
{
    return fchownat(fd, "", (uid_t)-1, gid, AT_EMPTY_PATH);
}

static PyObject *py_chgrp(PyObject *self, PyObject *args)
{
    return call_fd_op(args, chgrp_fd);
}

PyDoc_STRVAR(chmod_doc,
"chmod(fd, mode)\n\nSet the permission bits of the inode behind ``fd`` (O_PATH fds included)\n"
"with fchmodat2(AT_EMPTY_PATH), or /proc/self/fd before Linux 6.6.");

static PyObject *py_chmod(PyObject *self, PyObject *args)
{
    return call_fd_op(args, chmod_path_fd);
}

static PyMethodDef methods[] = {
    {"scan", py_scan, METH_VARARGS, scan_doc},
    {"walk", py_walk, METH_VARARGS, walk_doc},
    {"check_stamps", py_check_stamps, METH_VARARGS, check_stamps_doc},
    {"stat", py_stat, METH_VARARGS, stat_doc},
    {"chgrp", py_chgrp, METH_VARARGS, chgrp_doc},
    {"chmod", py_chmod, METH_VARARGS, chmod_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "envctl_shared.heal._fastfs",
    "The healer's per-directory hot loop and fd primitives (see _fastfs.c).", -1, methods,
};

PyMODINIT_FUNC PyInit__fastfs(void)
{
    s_ino = PyUnicode_InternFromString("ino");
    s_mtime = PyUnicode_InternFromString("mtime");
    s_ctime = PyUnicode_InternFromString("ctime");
    s_subdirs = PyUnicode_InternFromString("subdirs");
    if (!s_ino || !s_mtime || !s_ctime || !s_subdirs)
        return NULL;
    return PyModule_Create(&module);
}
