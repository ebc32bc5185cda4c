/*
 * envctl.heal._fastfs — the healer's per-directory hot loop, in C.
 *
 * Why C: a walk costs one metadata call per entry, and on a local disk that call takes ~1 µs;
 * a Python loop around it took 8 µs per compliant entry and ~60 µs per fixed one, which made
 * `envctl check` 2× slower than `find` and `envctl heal` 3× slower than `chgrp -R && chmod -R`.
 * Here a whole batch of entries is listed, inspected and fixed with the GIL released, so
 * walk threads on NFS/FUSE really overlap and Python only sees what needs a decision.
 *
 * This module holds mechanism only. What "correct" means stays in envctl.policy: the caller
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
    size_t name_off; /* into the batch's name arena */
    enum outcome what;
    int err;
    uint32_t mode, uid, gid;
    int set_gid;  /* FIXED: the group was changed */
    int set_mode; /* FIXED: the new permission bits, or -1 */
} record;

typedef struct {
    int dirfd;
    uint32_t gid;
    const uint16_t *table;
    const uint32_t *protected_uids;
    Py_ssize_t n_protected;
    int fix;
    unsigned long long root_dev;
    long long root_mnt; /* -1: no mount id check needed */
    char *arena;        /* NUL-terminated names, back to back */
    size_t arena_len, arena_cap;
    record *recs;
    size_t n_recs, cap_recs;
    Py_ssize_t n_ok;
} batch;

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

static int add_name(batch *b, const char *name, size_t len, size_t *off)
{
    if (b->arena_len + len + 1 > b->arena_cap) {
        size_t cap = b->arena_cap ? b->arena_cap * 2 : 4096;
        while (cap < b->arena_len + len + 1)
            cap *= 2;
        char *grown = realloc(b->arena, cap);
        if (!grown)
            return -1;
        b->arena = grown;
        b->arena_cap = cap;
    }
    memcpy(b->arena + b->arena_len, name, len);
    b->arena[b->arena_len + len] = '\0';
    *off = b->arena_len;
    b->arena_len += len + 1;
    return 0;
}

static record *add_record(batch *b, size_t name_off, enum outcome what)
{
    if (b->n_recs == b->cap_recs) {
        size_t cap = b->cap_recs ? b->cap_recs * 2 : 64;
        record *grown = realloc(b->recs, cap * sizeof *grown);
        if (!grown)
            return NULL;
        b->recs = grown;
        b->cap_recs = cap;
    }
    record *r = &b->recs[b->n_recs++];
    memset(r, 0, sizeof *r);
    r->name_off = name_off;
    r->what = what;
    r->set_mode = -1;
    return r;
}

static int is_protected(const batch *b, uint32_t uid)
{
    for (Py_ssize_t i = 0; i < b->n_protected; i++)
        if (b->protected_uids[i] == uid)
            return 1;
    return 0;
}

/* Change the entry judged as `seen` through an O_PATH fd proven to be that inode.
 * Returns the outcome; ATTENTION when anything is unusual (Python's slow path decides). */
static enum outcome fix_entry(const batch *b, const char *name, const statx_buf *seen,
                              record *r)
{
    int fd = openat(b->dirfd, name, O_PATH | O_NOFOLLOW | O_CLOEXEC);
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
        goto done;
    }
    if (now.sx.stx_ino != seen->sx.stx_ino || now.sx.stx_uid != seen->sx.stx_uid ||
        (now.sx.stx_mode & S_IFMT) != (seen->sx.stx_mode & S_IFMT) ||
        makedev(now.sx.stx_dev_major, now.sx.stx_dev_minor) != b->root_dev ||
        (b->root_mnt >= 0 && (!(now.sx.stx_mask & STATX_MNT_ID) ||
                              statx_mnt_id(&now) != (uint64_t)b->root_mnt))) {
        out = ATTENTION; /* swapped, re-owned or another mount: the slow path re-judges it */
        goto done;
    }
    uint16_t want = b->table[now.sx.stx_mode];
    if (now.sx.stx_gid != b->gid) {
        if (fchownat(fd, "", (uid_t)-1, b->gid, AT_EMPTY_PATH) != 0) {
            r->err = errno;
            out = ERROR;
            goto done;
        }
        r->set_gid = 1;
        if (now.sx.stx_mode & (S_ISUID | S_ISGID)) {
            /* chown may clear setuid/setgid on a file: judge the bits afresh */
            if (fd_statx(fd, "", AT_EMPTY_PATH, STATX_WANT, &now) != 0) {
                r->err = errno;
                out = ERROR;
                goto done;
            }
            want = b->table[now.sx.stx_mode];
        }
    }
    if (want != NO_FIX && want != (now.sx.stx_mode & 07777)) {
        if (chmod_path_fd(fd, want) != 0) {
            r->err = errno;
            out = ERROR;
            goto done;
        }
        r->set_mode = want;
    }
done:
    close(fd);
    return out;
}

/* Inspect (and with b->fix, heal) one entry; the GIL is not held. */
static int do_entry(batch *b, size_t name_off, int known_dir)
{
    const char *name = b->arena + name_off;
    if (known_dir)
        return add_record(b, name_off, SUBDIR) ? 0 : -1;
    statx_buf seen;
    if (fd_statx(b->dirfd, name, 0, STATX_WANT, &seen) != 0) {
        int err = errno;
        record *r = add_record(b, name_off, err == ENOENT ? VANISHED : ERROR);
        if (!r)
            return -1;
        r->err = err;
        return 0;
    }
    uint16_t mode = seen.sx.stx_mode;
    if (S_ISDIR(mode))
        return add_record(b, name_off, SUBDIR) ? 0 : -1;
    uint16_t want = b->table[mode];
    if (want != NO_FIX && seen.sx.stx_gid == b->gid && want == (mode & 07777)) {
        b->n_ok++;
        return 0;
    }
    record tmp = {.name_off = name_off, .set_mode = -1, .mode = mode,
                  .uid = seen.sx.stx_uid, .gid = seen.sx.stx_gid};
    tmp.what = (want == NO_FIX || !b->fix || is_protected(b, seen.sx.stx_uid))
                   ? ATTENTION
                   : fix_entry(b, name, &seen, &tmp);
    record *r = add_record(b, name_off, tmp.what);
    if (!r)
        return -1;
    *r = tmp;
    return 0;
}

/* List b->dirfd with getdents64 and inspect every entry; the GIL is not held. The walker
 * owns its directory fds and reads them nowhere else, so the fd's own offset is used
 * (rewound first) instead of paying an openat/close per directory for a private one. */
static int list_and_inspect(batch *b)
{
    if (lseek(b->dirfd, 0, SEEK_SET) < 0)
        return errno;
    char buf[32768];
    int err = 0;
    for (;;) {
        long n = syscall(SYS_getdents64, b->dirfd, buf, sizeof buf);
        if (n < 0) {
            err = errno;
            break;
        }
        if (n == 0)
            break;
        for (long pos = 0; pos < n;) {
            struct dirent64 *d = (struct dirent64 *)(buf + pos);
            pos += d->d_reclen;
            const char *nm = d->d_name;
            if (nm[0] == '.' && (nm[1] == '\0' || (nm[1] == '.' && nm[2] == '\0')))
                continue;
            size_t off;
            if (add_name(b, nm, strlen(nm), &off) != 0 ||
                do_entry(b, off, d->d_type == DT_DIR) != 0) {
                err = ENOMEM;
                goto out;
            }
        }
    }
out:
    return err;
}

static PyObject *build_result(batch *b)
{
    PyObject *subdirs = PyList_New(0), *attention = PyList_New(0), *fixed = PyList_New(0);
    if (!subdirs || !attention || !fixed)
        goto fail;
    for (size_t i = 0; i < b->n_recs; i++) {
        record *r = &b->recs[i];
        PyObject *name = PyUnicode_DecodeFSDefault(b->arena + r->name_off);
        if (!name)
            goto fail;
        PyObject *item = NULL;
        PyObject *target = NULL;
        switch (r->what) {
        case SUBDIR:
            target = subdirs;
            item = name;
            Py_INCREF(name);
            break;
        case FIXED:
            target = fixed;
            item = Py_BuildValue("(OIIii)", name, r->mode, r->gid, r->set_gid, r->set_mode);
            break;
        default: /* ATTENTION, ERROR, VANISHED: (name, errno, mode, uid, gid) */
            target = attention;
            item = Py_BuildValue("(OiIII)", name, r->what == ATTENTION ? 0 : r->err,
                                 r->mode, r->uid, r->gid);
            break;
        }
        Py_DECREF(name);
        if (!item || PyList_Append(target, item) != 0) {
            Py_XDECREF(item);
            goto fail;
        }
        Py_DECREF(item);
    }
    return Py_BuildValue("(nNNN)", b->n_ok, subdirs, attention, fixed);
fail:
    Py_XDECREF(subdirs);
    Py_XDECREF(attention);
    Py_XDECREF(fixed);
    return NULL;
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
    batch b = {.dirfd = dirfd, .gid = gid, .fix = fix, .root_dev = root_dev,
               .root_mnt = root_mnt};
    PyObject *result = NULL;
    uint32_t *prot = NULL;
    if (table.len != TABLE_BYTES) {
        PyErr_SetString(PyExc_ValueError, "table must hold 65536 uint16 values");
        goto out;
    }
    b.table = table.buf;
    PyObject *pseq = PySequence_Fast(protected_seq, "protected must be a sequence of uids");
    if (!pseq)
        goto out;
    b.n_protected = PySequence_Fast_GET_SIZE(pseq);
    prot = PyMem_Calloc(b.n_protected + 1, sizeof *prot);
    for (Py_ssize_t i = 0; prot && i < b.n_protected; i++)
        prot[i] = (uint32_t)PyLong_AsUnsignedLong(PySequence_Fast_GET_ITEM(pseq, i));
    Py_DECREF(pseq);
    if (!prot || PyErr_Occurred()) {
        if (!prot)
            PyErr_NoMemory();
        goto out;
    }
    b.protected_uids = prot;

    int err = 0;
    if (names == Py_None) {
        Py_BEGIN_ALLOW_THREADS
        err = list_and_inspect(&b);
        Py_END_ALLOW_THREADS
    } else {
        /* Copy the names into the arena first: the loop below runs without the GIL. */
        PyObject *nseq = PySequence_Fast(names, "names must be a sequence of str");
        if (!nseq)
            goto out;
        Py_ssize_t n = PySequence_Fast_GET_SIZE(nseq);
        size_t *offs = PyMem_Malloc((n + 1) * sizeof *offs);
        for (Py_ssize_t i = 0; offs && i < n; i++) {
            PyObject *enc = PyUnicode_EncodeFSDefault(PySequence_Fast_GET_ITEM(nseq, i));
            if (!enc) {
                PyMem_Free(offs);
                Py_DECREF(nseq);
                goto out;
            }
            int bad = add_name(&b, PyBytes_AS_STRING(enc), (size_t)PyBytes_GET_SIZE(enc),
                               &offs[i]);
            Py_DECREF(enc);
            if (bad) {
                PyMem_Free(offs);
                offs = NULL;
            }
        }
        Py_DECREF(nseq);
        if (!offs) {
            PyErr_NoMemory();
            goto out;
        }
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t i = 0; i < n && !err; i++)
            if (do_entry(&b, offs[i], 0) != 0)
                err = ENOMEM;
        Py_END_ALLOW_THREADS
        PyMem_Free(offs);
    }
    if (err) {
        errno = err;
        PyErr_SetFromErrno(err == ENOMEM ? PyExc_MemoryError : PyExc_OSError);
        goto out;
    }
    result = build_result(&b);
out:
    PyBuffer_Release(&table);
    PyMem_Free(prot);
    free(b.arena);
    free(b.recs);
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

static PyObject *py_chgrp(PyObject *self, PyObject *args)
{
    int fd, rc;
    unsigned int gid;
    if (!PyArg_ParseTuple(args, "iI", &fd, &gid))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    rc = fchownat(fd, "", (uid_t)-1, gid, AT_EMPTY_PATH);
    Py_END_ALLOW_THREADS
    if (rc != 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(chmod_doc,
"chmod(fd, mode)\n\nSet the permission bits of the inode behind ``fd`` (O_PATH fds included)\n"
"with fchmodat2(AT_EMPTY_PATH), or /proc/self/fd before Linux 6.6.");

static PyObject *py_chmod(PyObject *self, PyObject *args)
{
    int fd, rc;
    unsigned int mode;
    if (!PyArg_ParseTuple(args, "iI", &fd, &mode))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    rc = chmod_path_fd(fd, mode);
    Py_END_ALLOW_THREADS
    if (rc != 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"scan", py_scan, METH_VARARGS, scan_doc},
    {"stat", py_stat, METH_VARARGS, stat_doc},
    {"chgrp", py_chgrp, METH_VARARGS, chgrp_doc},
    {"chmod", py_chmod, METH_VARARGS, chmod_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "envctl.heal._fastfs",
    "The healer's per-directory hot loop and fd primitives (see _fastfs.c).", -1, methods,
};

PyMODINIT_FUNC PyInit__fastfs(void)
{
    return PyModule_Create(&module);
}
