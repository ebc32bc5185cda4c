/*
 * latencyfs: a FUSE passthrough of a backing directory that answers every metadata call after a
 * fixed latency, as an NFS/EFS server does, and counts what it served.
 *
 *   latencyfs BACKING MOUNTPOINT -f -o latency=1.0,stats=FILE[,history=FILE][,stats_interval=S]
 *             [,threads=16] [-o entry_timeout=..,attr_timeout=..]
 *
 * Why it exists: envctl walks network filesystems concurrently because every metadata call there
 * is a round trip. Benchmarks and tests need that cost on a laptop, with requests that overlap
 * like parallel RPCs, and a server fast enough never to be the bottleneck it is meant to model.
 * Hence C on libfuse3's multi-threaded loop (`threads` workers, default 16), and replies held
 * back until their deadline by one reply thread instead of workers asleep: requests in flight
 * are bounded by the callers, not by the server's threads (see "late replies" below).
 *
 * The model:
 * - Metadata calls (getattr, which is also every LOOKUP in libfuse's path API; readlink, mknod,
 *   mkdir, unlink, rmdir, symlink, rename, link, chmod, chown, truncate, utimens, open, create,
 *   opendir, readdir, statfs, lock) are answered `latency` ms after they arrived: the work is done at
 *   once, the reply is what is late. Data and close calls (read, write, flush, release,
 *   releasedir, fsync) are not delayed.
 * - readdir serves a whole directory in one call, without attributes (no READDIRPLUS): each
 *   entry then costs the walker its own LOOKUP, the conservative case.
 * - Inode numbers are the backing ones (use_ino) and st_dev is the mount's, so identity checks
 *   (fstat of an O_PATH fd vs statx of the name) agree; hardlinks share st_ino.
 * - Nothing follows a symlink: every call is an *at() call relative to the backing directory with
 *   AT_SYMLINK_NOFOLLOW / O_NOFOLLOW; chmod of a symlink fails with EOPNOTSUPP, as on a local disk.
 * - Mounted allow_other + default_permissions: the kernel checks permissions from the attributes,
 *   so other uids see what they would on NFS. Entries are created with the caller's fsuid, fsgid
 *   and supplementary groups (per worker thread, as AUTH_SYS carries them), so ownership and
 *   SGID inheritance come out as on a real server, atomically. Everything else runs as root: the
 *   kernel has already said yes.
 *
 * - fcntl record locks pass through to the backing file (`lock`), so mounts of one backing
 *   directory by separate latencyfs processes — hosts sharing an NFS export, in a test — see
 *   each other's locks, as NFS clients do through the server. Without a lock operation the
 *   kernel would keep every mount's locks to itself. A lock is held by the FUSE open it was
 *   taken through: it becomes an open-file-description lock on that open's backing fd, which
 *   the holder's close (or death: the kernel releases its files) drops. That is the owner
 *   model of OFD locks exactly (a close of one descriptor, e.g. by a forked child, keeps it),
 *   and of classic POSIX locks as long as a process locks a file through one open of it and
 *   unlocks or closes it for good (what envctl does). A blocking F_SETLKW holds a worker
 *   until granted.
 *
 * Counters: calls per operation, total, errors, and the most requests in flight at once. A JSON
 * snapshot is written atomically to `stats` on SIGUSR1, every `stats_interval` seconds (if > 0)
 * and at exit ("final": true); each snapshot is also appended as one line to `history` if given
 * (a time series: per-minute rates are differences of consecutive lines).
 */

#define FUSE_USE_VERSION 314
#define _GNU_SOURCE

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <fuse.h>
#include <fuse_lowlevel.h>
#include <linux/fuse.h>
#include <grp.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/fsuid.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/statvfs.h>
#include <time.h>
#include <unistd.h>

/* Every operation served; the order is the order of the names in the JSON. */
#define OPS(X)                                                                                  \
    X(getattr, 1) X(readlink, 1) X(mknod, 1) X(mkdir, 1) X(unlink, 1) X(rmdir, 1)               \
    X(symlink, 1) X(rename, 1) X(link, 1) X(chmod, 1) X(chown, 1) X(truncate, 1) X(utimens, 1)  \
    X(open, 1) X(create, 1) X(opendir, 1) X(readdir, 1) X(statfs, 1) X(lock, 1) X(read, 0)      \
    X(write, 0) X(flush, 0) X(release, 0) X(releasedir, 0) X(fsync, 0)

#define AS_ENUM(name, delayed) OP_##name,
enum op { OPS(AS_ENUM) OP_COUNT };
#define AS_NAME(name, delayed) #name,
static const char *const op_names[OP_COUNT] = {OPS(AS_NAME)};
#define AS_DELAYED(name, delayed) delayed,
static const int op_delayed[OP_COUNT] = {OPS(AS_DELAYED)};

static struct {
    char *backing_path;
    int backing;             /* fd of the backing directory: every call is relative to it */
    long latency_ns;
    gid_t root_groups[NGROUPS_MAX];
    int root_ngroups;
} fs;

static struct {
    atomic_ulong calls[OP_COUNT];
    atomic_ulong errors;
    atomic_long inflight;
    atomic_long inflight_max;
    struct timespec started;
    unsigned long seq;       /* snapshots written; only the stats thread touches it */
} counters;

struct options {
    double latency_ms;
    char *stats;
    char *history;
    double stats_interval;
    int threads;
    int show_help;
};

/* ---- timing and counting ---------------------------------------------------------------- */

static struct timespec ts_add_ns(struct timespec t, long ns)
{
    t.tv_nsec += ns % 1000000000L;
    t.tv_sec += ns / 1000000000L + t.tv_nsec / 1000000000L;
    t.tv_nsec %= 1000000000L;
    return t;
}

/* A call in progress: when it may reply, and which operation it counts as. */
struct call {
    enum op op;
    struct timespec deadline;
};

/* The reply of the request this worker is serving, when a delayed call made it late: finish()
 * sets it, dev_writev (in the same thread, right after) hands the reply to the reply thread. */
static __thread struct {
    int deferred;
    struct timespec deadline;
} pending;

static struct call begin(enum op op)
{
    struct call c = {.op = op};
    clock_gettime(CLOCK_MONOTONIC, &c.deadline);
    c.deadline = ts_add_ns(c.deadline, op_delayed[op] ? fs.latency_ns : 0);
    atomic_fetch_add_explicit(&counters.calls[op], 1, memory_order_relaxed);
    if (pending.deferred) {
        /* A second call for the same request (libfuse's getattr after create/mkdir/...): one
         * reply, one round trip, as an NFS CREATE returns the attributes with it. */
        pending.deferred = 0;
        atomic_fetch_sub_explicit(&counters.inflight, 1, memory_order_relaxed);
    }
    long now = atomic_fetch_add_explicit(&counters.inflight, 1, memory_order_relaxed) + 1;
    long max = atomic_load_explicit(&counters.inflight_max, memory_order_relaxed);
    while (now > max && !atomic_compare_exchange_weak(&counters.inflight_max, &max, now))
        ;
    return c;
}

/* The call is done; its reply leaves at the deadline. `res` is 0/positive or -errno. */
static int finish(const struct call *c, int res)
{
    if (res < 0)
        atomic_fetch_add_explicit(&counters.errors, 1, memory_order_relaxed);
    if (op_delayed[c->op] && fs.latency_ns > 0) {
        pending.deferred = 1;
        pending.deadline = c->deadline;
    } else {
        atomic_fetch_sub_explicit(&counters.inflight, 1, memory_order_relaxed);
    }
    return res;
}

#define SYS(expr) ((expr) < 0 ? -errno : 0)

/* libfuse hands "/a/b"; the backing calls want "a/b" relative to fs.backing ("." for the root). */
static const char *rel(const char *path)
{
    while (*path == '/')
        path++;
    return *path ? path : ".";
}

/* ---- creating as the caller ------------------------------------------------------------- */

/* Take on the caller's fsuid, fsgid and groups in this worker thread only (raw setgroups: the
 * libc wrapper would apply it to every thread). Root callers need nothing. Returns 0 or -errno. */
static int become_caller(int *switched)
{
    struct fuse_context *ctx = fuse_get_context();
    *switched = 0;
    if (ctx->uid == 0)
        return 0;
    gid_t groups[NGROUPS_MAX];
    int n = fuse_getgroups(NGROUPS_MAX, groups);
    if (n < 0 || n > NGROUPS_MAX)
        n = 0;  /* the caller is gone or unreadable: its primary group still applies */
    if (syscall(SYS_setgroups, (size_t)n, groups) < 0)
        return -errno;
    *switched = 1;
    setfsgid(ctx->gid);
    setfsuid(ctx->uid);
    return 0;
}

static void become_root(int switched)
{
    if (!switched)
        return;
    setfsuid(0);
    setfsgid(0);
    syscall(SYS_setgroups, (size_t)fs.root_ngroups, fs.root_groups);
}

/* ---- /dev/fuse traffic: late replies, and the INIT reply ------------------------------------ */

/* Why replies are late rather than workers asleep: a worker that slept through each call's
 * latency cost two extra context switches per call and one thread per request in flight; on
 * two cores that, not the latency, capped what the filesystem could serve (~20k calls/s at
 * 1 ms). Instead a worker does the call, queues the reply with its deadline and takes the next
 * request; one reply thread sends each reply when its deadline has passed (in the order they
 * were queued: deadlines differ only by the calls' own microseconds). The kernel keeps each
 * request pending until its reply arrives, exactly as if the server had been slow. */
struct late_reply {
    struct late_reply *next;
    struct timespec deadline;
    int fd;
    size_t len;
    char data[];
};

static struct {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    struct late_reply *head, *tail;
    int stop;
    pthread_t thread;
} replies = {.lock = PTHREAD_MUTEX_INITIALIZER, .cond = PTHREAD_COND_INITIALIZER};

static int ts_before(const struct timespec *a, const struct timespec *b)
{
    return a->tv_sec < b->tv_sec || (a->tv_sec == b->tv_sec && a->tv_nsec < b->tv_nsec);
}

static void sleep_until(const struct timespec *deadline)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    if (ts_before(&now, deadline))
        while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, deadline, NULL) == EINTR)
            ;
}

static void *reply_main(void *arg)
{
    pthread_mutex_lock(&replies.lock);
    for (;;) {
        while (!replies.head && !replies.stop)
            pthread_cond_wait(&replies.cond, &replies.lock);
        struct late_reply *r = replies.head;
        if (!r)
            break;  /* stopping, and every reply is out */
        pthread_mutex_unlock(&replies.lock);
        sleep_until(&r->deadline);  /* only this thread removes entries: r stays the head */
        pthread_mutex_lock(&replies.lock);
        replies.head = r->next;
        if (!replies.head)
            replies.tail = NULL;
        pthread_mutex_unlock(&replies.lock);
        /* ENOENT: the request was interrupted meanwhile; nothing to do, as in libfuse. */
        if (write(r->fd, r->data, r->len) < 0 && errno != ENOENT && errno != ENODEV)
            fprintf(stderr, "latencyfs: reply: %s\n", strerror(errno));
        atomic_fetch_sub_explicit(&counters.inflight, 1, memory_order_relaxed);
        free(r);
        pthread_mutex_lock(&replies.lock);
    }
    pthread_mutex_unlock(&replies.lock);
    return NULL;
}

/* Queue a reply for its deadline; it counts as written. Without memory, reply late in place. */
static ssize_t queue_reply(int fd, const struct iovec *iov, int count, struct timespec deadline)
{
    size_t len = 0;
    for (int i = 0; i < count; i++)
        len += iov[i].iov_len;
    struct late_reply *r = malloc(sizeof *r + len);
    if (!r) {
        sleep_until(&deadline);
        ssize_t n = writev(fd, iov, count);
        atomic_fetch_sub_explicit(&counters.inflight, 1, memory_order_relaxed);
        return n;
    }
    *r = (struct late_reply){.deadline = deadline, .fd = fd, .len = len};
    for (size_t i = 0, off = 0; i < (size_t)count; off += iov[i].iov_len, i++)
        memcpy(r->data + off, iov[i].iov_base, iov[i].iov_len);
    pthread_mutex_lock(&replies.lock);
    if (replies.tail)
        replies.tail->next = r;
    else
        replies.head = r;
    replies.tail = r;
    pthread_cond_signal(&replies.cond);
    pthread_mutex_unlock(&replies.lock);
    return (ssize_t)len;
}

/* libfuse 3.14 (Debian 12) never sends FUSE_PARALLEL_DIROPS, whatever init() asks: the line that
 * maps it into the INIT reply is missing (later releases have it). Without it the kernel
 * serialises every LOOKUP in one directory, and a walk's parallel stats of a wide directory
 * would queue behind each other as they do not on NFS. So the INIT reply (the first reply
 * sent) gets the flag here when the kernel offered it and init() asked for it. With a libfuse
 * that sends the flag itself this changes nothing. */
static struct {
    atomic_int parallel_dirops;  /* init() wants it and the kernel offered it */
    atomic_int done;             /* the INIT reply has gone out */
} init_patch;

static ssize_t dev_writev(int fd, struct iovec *iov, int count, void *userdata)
{
    if (!atomic_load(&init_patch.done) && count >= 2) {
        atomic_store(&init_patch.done, 1);
        const struct fuse_out_header *hdr = iov[0].iov_base;
        if (hdr->error == 0 && iov[1].iov_len >= offsetof(struct fuse_init_out, flags) +
                                                 sizeof(uint32_t) &&
            atomic_load(&init_patch.parallel_dirops))
            ((struct fuse_init_out *)iov[1].iov_base)->flags |= FUSE_PARALLEL_DIROPS;
    }
    if (pending.deferred) {
        pending.deferred = 0;
        return queue_reply(fd, iov, count, pending.deadline);
    }
    return writev(fd, iov, count);
}

static ssize_t dev_read(int fd, void *buf, size_t len, void *userdata)
{
    return read(fd, buf, len);
}

static const struct fuse_custom_io dev_io = {.writev = dev_writev, .read = dev_read};

/* ---- operations -------------------------------------------------------------------------- */

static void *lfs_init(struct fuse_conn_info *conn, struct fuse_config *cfg)
{
    cfg->use_ino = 1;       /* backing inode numbers: identity checks and hardlinks hold */
    cfg->readdir_ino = 1;
    cfg->hard_remove = 1;   /* no .fuse_hidden files for a walker to find */
    cfg->nullpath_ok = 1;   /* calls on open-but-unlinked files come with their fd only */
    if (conn->capable & FUSE_CAP_PARALLEL_DIROPS) {
        conn->want |= FUSE_CAP_PARALLEL_DIROPS;  /* lookups in one directory overlap */
        atomic_store(&init_patch.parallel_dirops, 1);
    }
    conn->want &= ~FUSE_CAP_READDIRPLUS;
    return NULL;
}

static int lfs_getattr(const char *path, struct stat *st, struct fuse_file_info *fi)
{
    struct call c = begin(OP_getattr);
    int res = fi ? SYS(fstat((int)fi->fh, st))
                 : SYS(fstatat(fs.backing, rel(path), st, AT_SYMLINK_NOFOLLOW));
    return finish(&c, res);
}

static int lfs_readlink(const char *path, char *buf, size_t size)
{
    struct call c = begin(OP_readlink);
    ssize_t n = readlinkat(fs.backing, rel(path), buf, size - 1);
    if (n >= 0)
        buf[n] = '\0';
    return finish(&c, n < 0 ? -errno : 0);
}

static int lfs_mknod(const char *path, mode_t mode, dev_t rdev)
{
    struct call c = begin(OP_mknod);
    int switched, res = become_caller(&switched);
    if (res == 0)
        res = SYS(mknodat(fs.backing, rel(path), mode, rdev));
    become_root(switched);
    return finish(&c, res);
}

static int lfs_mkdir(const char *path, mode_t mode)
{
    struct call c = begin(OP_mkdir);
    int switched, res = become_caller(&switched);
    if (res == 0)
        res = SYS(mkdirat(fs.backing, rel(path), mode));
    become_root(switched);
    return finish(&c, res);
}

static int lfs_unlink(const char *path)
{
    struct call c = begin(OP_unlink);
    return finish(&c, SYS(unlinkat(fs.backing, rel(path), 0)));
}

static int lfs_rmdir(const char *path)
{
    struct call c = begin(OP_rmdir);
    return finish(&c, SYS(unlinkat(fs.backing, rel(path), AT_REMOVEDIR)));
}

static int lfs_symlink(const char *target, const char *path)
{
    struct call c = begin(OP_symlink);
    int switched, res = become_caller(&switched);
    if (res == 0)
        res = SYS(symlinkat(target, fs.backing, rel(path)));
    become_root(switched);
    return finish(&c, res);
}

static int lfs_rename(const char *from, const char *to, unsigned int flags)
{
    struct call c = begin(OP_rename);
    return finish(&c, SYS(renameat2(fs.backing, rel(from), fs.backing, rel(to), flags)));
}

static int lfs_link(const char *from, const char *to)
{
    struct call c = begin(OP_link);
    return finish(&c, SYS(linkat(fs.backing, rel(from), fs.backing, rel(to), 0)));
}

static int lfs_chmod(const char *path, mode_t mode, struct fuse_file_info *fi)
{
    struct call c = begin(OP_chmod);
    /* AT_SYMLINK_NOFOLLOW: a symlink gets EOPNOTSUPP, never its target's mode changed. */
    int res = fi ? SYS(fchmod((int)fi->fh, mode))
                 : SYS(fchmodat(fs.backing, rel(path), mode, AT_SYMLINK_NOFOLLOW));
    return finish(&c, res);
}

static int lfs_chown(const char *path, uid_t uid, gid_t gid, struct fuse_file_info *fi)
{
    struct call c = begin(OP_chown);
    int res = fi ? SYS(fchown((int)fi->fh, uid, gid))
                 : SYS(fchownat(fs.backing, rel(path), uid, gid, AT_SYMLINK_NOFOLLOW));
    return finish(&c, res);
}

static int lfs_truncate(const char *path, off_t size, struct fuse_file_info *fi)
{
    struct call c = begin(OP_truncate);
    int res;
    if (fi) {
        res = SYS(ftruncate((int)fi->fh, size));
    } else {
        int fd = openat(fs.backing, rel(path), O_WRONLY | O_NOFOLLOW | O_CLOEXEC);
        res = fd < 0 ? -errno : SYS(ftruncate(fd, size));
        if (fd >= 0)
            close(fd);
    }
    return finish(&c, res);
}

static int lfs_utimens(const char *path, const struct timespec tv[2], struct fuse_file_info *fi)
{
    struct call c = begin(OP_utimens);
    int res = fi ? SYS(futimens((int)fi->fh, tv))
                 : SYS(utimensat(fs.backing, rel(path), tv, AT_SYMLINK_NOFOLLOW));
    return finish(&c, res);
}

static int lfs_open(const char *path, struct fuse_file_info *fi)
{
    struct call c = begin(OP_open);
    int fd = openat(fs.backing, rel(path), fi->flags | O_NOFOLLOW | O_CLOEXEC);
    if (fd >= 0)
        fi->fh = (uint64_t)fd;
    return finish(&c, fd < 0 ? -errno : 0);
}

static int lfs_create(const char *path, mode_t mode, struct fuse_file_info *fi)
{
    struct call c = begin(OP_create);
    int switched, res = become_caller(&switched);
    if (res == 0) {
        int fd = openat(fs.backing, rel(path), fi->flags | O_CREAT | O_NOFOLLOW | O_CLOEXEC, mode);
        res = fd < 0 ? -errno : 0;
        if (fd >= 0)
            fi->fh = (uint64_t)fd;
    }
    become_root(switched);
    return finish(&c, res);
}

static int lfs_read(const char *path, char *buf, size_t size, off_t off, struct fuse_file_info *fi)
{
    struct call c = begin(OP_read);
    ssize_t n = pread((int)fi->fh, buf, size, off);
    return finish(&c, n < 0 ? -errno : (int)n);
}

static int lfs_write(const char *path, const char *buf, size_t size, off_t off,
                     struct fuse_file_info *fi)
{
    struct call c = begin(OP_write);
    ssize_t n = pwrite((int)fi->fh, buf, size, off);
    return finish(&c, n < 0 ? -errno : (int)n);
}

static int lfs_statfs(const char *path, struct statvfs *sv)
{
    struct call c = begin(OP_statfs);
    return finish(&c, SYS(fstatvfs(fs.backing, sv)));
}

static int lfs_flush(const char *path, struct fuse_file_info *fi)
{
    struct call c = begin(OP_flush);
    /* close() of a dup reports deferred write errors without closing the file itself. */
    int fd = dup((int)fi->fh);
    return finish(&c, fd < 0 ? -errno : SYS(close(fd)));
}

static int lfs_release(const char *path, struct fuse_file_info *fi)
{
    struct call c = begin(OP_release);
    close((int)fi->fh);
    return finish(&c, 0);
}

static int lfs_fsync(const char *path, int datasync, struct fuse_file_info *fi)
{
    struct call c = begin(OP_fsync);
    int res = datasync ? SYS(fdatasync((int)fi->fh)) : SYS(fsync((int)fi->fh));
    return finish(&c, res);
}

static int lfs_opendir(const char *path, struct fuse_file_info *fi)
{
    struct call c = begin(OP_opendir);
    int fd = openat(fs.backing, rel(path), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    DIR *dir = fd < 0 ? NULL : fdopendir(fd);
    int res = dir ? 0 : -errno;
    if (!dir && fd >= 0)
        close(fd);
    if (dir)
        fi->fh = (uint64_t)(uintptr_t)dir;
    return finish(&c, res);
}

/* The whole directory in one call (offsets 0: libfuse buffers it and serves the kernel's
 * follow-up reads itself), each entry with its inode number and type only. */
static int lfs_readdir(const char *path, void *buf, fuse_fill_dir_t fill, off_t off,
                       struct fuse_file_info *fi, enum fuse_readdir_flags flags)
{
    struct call c = begin(OP_readdir);
    DIR *dir = (DIR *)(uintptr_t)fi->fh;
    rewinddir(dir);
    int res = 0;
    for (;;) {
        errno = 0;
        struct dirent *d = readdir(dir);
        if (!d) {
            res = -errno;
            break;
        }
        struct stat st = {.st_ino = d->d_ino, .st_mode = (mode_t)DTTOIF(d->d_type)};
        if (fill(buf, d->d_name, &st, 0, 0))
            break;
    }
    return finish(&c, res);
}

static int lfs_releasedir(const char *path, struct fuse_file_info *fi)
{
    struct call c = begin(OP_releasedir);
    closedir((DIR *)(uintptr_t)fi->fh);
    return finish(&c, 0);
}

/* Record locks, passed through as OFD locks on the backing fd of the open they came through
 * (see the header): the kernel's F_GETLK/F_SETLK/F_SETLKW arrive here once FUSE_POSIX_LOCKS is
 * on, which libfuse asks for because this operation exists. */
static int lfs_lock(const char *path, struct fuse_file_info *fi, int cmd, struct flock *lk)
{
    struct call c = begin(OP_lock);
    /* libfuse unlocks the closing owner's locks on every FLUSH, i.e. on every close() of any
     * descriptor of the open file — a forked child's close-on-exec included. That is POSIX
     * owner bookkeeping; here the lock belongs to the open file (its backing fd), which the
     * RELEASE of the last descriptor closes, dropping the lock. An OFD lock must survive a
     * child's exec, as it does on NFS. */
    if (fi->flush && lk->l_type == F_UNLCK)
        return finish(&c, 0);
    int ofd = cmd == F_GETLK ? F_OFD_GETLK : cmd == F_SETLKW ? F_OFD_SETLKW : F_OFD_SETLK;
    lk->l_pid = 0;  /* OFD locks require it; F_OFD_GETLK reports -1 for the holder */
    return finish(&c, SYS(fcntl((int)fi->fh, ofd, lk)));
}

static const struct fuse_operations lfs_ops = {
    .init = lfs_init,
    .getattr = lfs_getattr,
    .readlink = lfs_readlink,
    .mknod = lfs_mknod,
    .mkdir = lfs_mkdir,
    .unlink = lfs_unlink,
    .rmdir = lfs_rmdir,
    .symlink = lfs_symlink,
    .rename = lfs_rename,
    .link = lfs_link,
    .chmod = lfs_chmod,
    .chown = lfs_chown,
    .truncate = lfs_truncate,
    .utimens = lfs_utimens,
    .open = lfs_open,
    .create = lfs_create,
    .read = lfs_read,
    .write = lfs_write,
    .statfs = lfs_statfs,
    .flush = lfs_flush,
    .release = lfs_release,
    .fsync = lfs_fsync,
    .opendir = lfs_opendir,
    .readdir = lfs_readdir,
    .releasedir = lfs_releasedir,
    .lock = lfs_lock,
};

/* ---- counters out ------------------------------------------------------------------------ */

static double seconds_since(const struct timespec *t0)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)(now.tv_sec - t0->tv_sec) + (double)(now.tv_nsec - t0->tv_nsec) / 1e9;
}

/* One JSON object on one line. */
static int snapshot_json(char *out, size_t cap, int final)
{
    unsigned long total = 0;
    size_t n = (size_t)snprintf(out, cap, "{\"seq\": %lu, \"final\": %s, \"pid\": %d, "
                                "\"uptime_s\": %.6f, \"latency_ms\": %.6g, \"ops\": {",
                                ++counters.seq, final ? "true" : "false", (int)getpid(),
                                seconds_since(&counters.started), (double)fs.latency_ns / 1e6);
    for (int i = 0; i < OP_COUNT && n < cap; i++) {
        unsigned long v = atomic_load(&counters.calls[i]);
        total += v;
        n += (size_t)snprintf(out + n, cap - n, "%s\"%s\": %lu", i ? ", " : "", op_names[i], v);
    }
    if (n < cap)
        n += (size_t)snprintf(out + n, cap - n,
                              "}, \"total\": %lu, \"errors\": %lu, \"inflight_max\": %ld}\n",
                              total, atomic_load(&counters.errors),
                              atomic_load(&counters.inflight_max));
    return n < cap ? (int)n : -1;
}

static void write_snapshot(const struct options *o, int final)
{
    char buf[4096];
    int len = snapshot_json(buf, sizeof buf, final);
    if (len < 0)
        return;
    if (o->stats) {
        char tmp[PATH_MAX];
        snprintf(tmp, sizeof tmp, "%s.tmp", o->stats);
        FILE *f = fopen(tmp, "w");
        if (f) {
            int ok = fwrite(buf, 1, (size_t)len, f) == (size_t)len;
            if (fclose(f) == 0 && ok)
                rename(tmp, o->stats);  /* readers see the old snapshot or the new one */
        }
    }
    if (o->history) {
        FILE *f = fopen(o->history, "a");
        if (f) {
            fwrite(buf, 1, (size_t)len, f);
            fclose(f);
        }
    }
}

static struct {
    pthread_t thread;
    const struct options *opts;
    atomic_int stop;
} stats_thread;

/* Writes a snapshot on SIGUSR1 and every stats_interval seconds; the final one is written by
 * main after the loop ends. */
static void *stats_main(void *arg)
{
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGUSR1);
    double iv = stats_thread.opts->stats_interval;
    struct timespec timeout = {.tv_sec = (time_t)iv, .tv_nsec = (long)((iv - (time_t)iv) * 1e9)};
    for (;;) {
        int sig = iv > 0 ? sigtimedwait(&set, NULL, &timeout) : sigwaitinfo(&set, NULL);
        if (atomic_load(&stats_thread.stop))
            return NULL;
        if (sig == SIGUSR1 || (sig < 0 && errno == EAGAIN))
            write_snapshot(stats_thread.opts, 0);
    }
}

/* ---- command line ------------------------------------------------------------------------ */

#define OPT(t, p) {t, offsetof(struct options, p), 1}
static const struct fuse_opt option_spec[] = {
    OPT("latency=%lf", latency_ms),
    OPT("stats=%s", stats),
    OPT("history=%s", history),
    OPT("stats_interval=%lf", stats_interval),
    OPT("threads=%d", threads),
    OPT("-h", show_help),
    OPT("--help", show_help),
    FUSE_OPT_END,
};

/* The first non-option argument is the backing directory; the mount point stays for libfuse. */
static int opt_proc(void *data, const char *arg, int key, struct fuse_args *outargs)
{
    if (key == FUSE_OPT_KEY_NONOPT && !fs.backing_path) {
        fs.backing_path = realpath(arg, NULL);
        if (!fs.backing_path) {
            fprintf(stderr, "latencyfs: backing directory %s: %s\n", arg, strerror(errno));
            return -1;
        }
        return 0;
    }
    return 1;
}

static void usage(const char *prog)
{
    printf("usage: %s BACKING MOUNTPOINT [-f] -o latency=MS[,stats=FILE][,history=FILE]"
           "[,stats_interval=S][,threads=N]\n\n", prog);
    printf("    -o latency=MS          delay of every metadata call, float ms (default 0)\n"
           "    -o stats=FILE          JSON counters: on SIGUSR1, every stats_interval, at exit\n"
           "    -o history=FILE        append every snapshot as one JSON line\n"
           "    -o stats_interval=S    also snapshot every S seconds (default 0: never)\n"
           "    -o threads=N           worker threads (default 16); requests in flight are not\n"
           "                           bounded by it: replies wait in a queue, not in workers\n\n");
}

int main(int argc, char *argv[])
{
    /* SIGUSR1 asks for a snapshot: blocked from the start (a request arriving as soon as the
     * mount is visible must not kill us), in every thread (all inherit it), and taken by the
     * stats thread with sigtimedwait. */
    sigset_t usr1;
    sigemptyset(&usr1);
    sigaddset(&usr1, SIGUSR1);
    pthread_sigmask(SIG_BLOCK, &usr1, NULL);
    struct fuse_args args = FUSE_ARGS_INIT(argc, argv);
    struct options opts = {.threads = 16};
    if (fuse_opt_parse(&args, &opts, option_spec, opt_proc) == -1)
        return 2;
    if (opts.show_help) {
        usage(argv[0]);
        fuse_lib_help(&args);
        return 0;
    }
    struct fuse_cmdline_opts cl;
    if (fuse_parse_cmdline(&args, &cl) != 0)
        return 2;
    if (!fs.backing_path || !cl.mountpoint || opts.latency_ms < 0 || opts.threads < 1) {
        usage(argv[0]);
        return 2;
    }
    fs.backing = open(fs.backing_path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fs.backing < 0) {
        fprintf(stderr, "latencyfs: %s: %s\n", fs.backing_path, strerror(errno));
        return 1;
    }
    fs.latency_ns = (long)(opts.latency_ms * 1e6);
    fs.root_ngroups = getgroups(NGROUPS_MAX, fs.root_groups);
    if (fs.root_ngroups < 0)
        fs.root_ngroups = 0;
    umask(0);  /* the kernel already applied the caller's umask to every mode it sends */
    /* Sleeps end when asked, not up to 50 us later (the default slack); threads inherit it. */
    prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0);
    clock_gettime(CLOCK_MONOTONIC, &counters.started);

    char mount_opts[PATH_MAX + 128];
    snprintf(mount_opts, sizeof mount_opts,
             "-oallow_other,default_permissions,subtype=latencyfs,fsname=%s", fs.backing_path);
    fuse_opt_add_arg(&args, mount_opts);

    int res = 1;
    struct fuse *fuse = fuse_new(&args, &lfs_ops, sizeof lfs_ops, NULL);
    if (!fuse)
        goto out_args;
    if (fuse_mount(fuse, cl.mountpoint) != 0)
        goto out_fuse;
    struct fuse_session *se = fuse_get_session(fuse);
    if (fuse_session_custom_io(se, &dev_io, fuse_session_fd(se)) != 0)
        goto out_unmount;
    if (fuse_daemonize(cl.foreground) != 0 || fuse_set_signal_handlers(fuse_get_session(fuse)))
        goto out_unmount;
    /* In the foreground (how tests and benchmarks run it), end with the parent: a killed test
     * run must not leave a mount behind. SIGTERM is the clean exit (the loop ends, unmounts). */
    if (cl.foreground && (prctl(PR_SET_PDEATHSIG, SIGTERM) != 0 || getppid() == 1))
        goto out_unmount;

    stats_thread.opts = &opts;
    int stats_running = pthread_create(&stats_thread.thread, NULL, stats_main, NULL) == 0;
    if (pthread_create(&replies.thread, NULL, reply_main, NULL) != 0) {
        fprintf(stderr, "latencyfs: cannot start the reply thread\n");
        res = 1;
        goto out_threads;
    }

    struct fuse_loop_config *loop = fuse_loop_cfg_create();
    fuse_loop_cfg_set_max_threads(loop, (unsigned)opts.threads);
    fuse_loop_cfg_set_idle_threads(loop, (unsigned)opts.threads);  /* no churn of threads */
    res = fuse_loop_mt(fuse, loop) == 0 ? 0 : 1;
    fuse_loop_cfg_destroy(loop);
    pthread_mutex_lock(&replies.lock);
    replies.stop = 1;
    pthread_cond_signal(&replies.cond);
    pthread_mutex_unlock(&replies.lock);
    pthread_join(replies.thread, NULL);

out_threads:

    if (stats_running) {
        atomic_store(&stats_thread.stop, 1);
        pthread_kill(stats_thread.thread, SIGUSR1);
        pthread_join(stats_thread.thread, NULL);
    }
    write_snapshot(&opts, 1);
    fuse_remove_signal_handlers(fuse_get_session(fuse));
out_unmount:
    fuse_unmount(fuse);
out_fuse:
    fuse_destroy(fuse);
out_args:
    fuse_opt_free_args(&args);
    free(cl.mountpoint);
    return res;
}
