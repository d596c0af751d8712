/*
 * fio external ioengine for iscsi-bypass: the thin C side.
 *
 * It is compiled against the installed fio's own headers (fio.h, after
 * fio's configure has written config-host.h), so the layouts of
 * thread_data, thread_options, fio_file and io_u are the binary's. All it
 * does is read those structures and forward plain values to the Rust side
 * (fib_* in src/ffi.rs), which owns the multipath devices and their
 * IoQueues.
 *
 *   setup          check the engine options (no login)
 *   get_file_size  log in to the file's paths once, read the capacity
 *   init           the per-job engine (in the job's process or thread)
 *   open_file      open the multipath device of the file (one IoQueue)
 *   queue          stage the io_u
 *   commit         submit the staged io_us (sets issue_time, slat)
 *   getevents      wait for completions
 *   event          hand back one completed io_u (read data copied in)
 *   close_file     close the device (logout)
 *   cleanup        free the engine
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fio.h"
#include "optgroup.h"

#if FIO_IOOPS_VERSION != 31
#error "this shim is written for fio's ioengine_ops version 31 (fio 3.33)"
#endif

/* What the Rust side needs from the engine options (src/ffi.rs: FibConfig). */
struct fib_config {
	const char *paths;
	const char *transport;
	const char *policy;
	const char *initiator;
	const char *chap_user;
	const char *chap_secret_file;
	const char *target_user;
	const char *target_secret_file;
	const char *cores;
	unsigned int busy_poll;
	unsigned int no_path_timeout_s;
	unsigned int login_timeout_s;
	unsigned int queue_depth;
	unsigned int nr_files;
};

/* The Rust side (src/ffi.rs). Errors come back as text in err. */
extern int fib_check_config(const struct fib_config *c, char *err, size_t errlen);
extern int fib_probe_size(const struct fib_config *c, const char *url,
			  uint64_t *bytes, char *err, size_t errlen);
extern void *fib_engine_new(const struct fib_config *c, char *err, size_t errlen);
extern void fib_engine_free(void *eng);
extern int fib_open_file(void *eng, const char *url, uint64_t *bytes,
			 uint32_t *block_size, char *err, size_t errlen);
extern void fib_close_file(void *eng, int file);
extern int fib_queue(void *eng, int file, int op, uint64_t offset, void *buf,
		     uint64_t len, void *tag, char *err, size_t errlen);
extern int fib_commit(void *eng, char *err, size_t errlen);
extern int fib_getevents(void *eng, unsigned int min, unsigned int max,
			 int64_t timeout_ns, char *err, size_t errlen);
extern void *fib_event(void *eng, unsigned int idx, int *error);

enum { FIB_READ = 0, FIB_WRITE = 1, FIB_FLUSH = 2, FIB_TRIM = 3 };

/*
 * The engine options, each once: its fib_options member, its fio_option
 * entry and its copy into fib_config (fib_config_from) are generated from
 * these lists.
 *
 * FIB_STR_OPTIONS: X(field, name, lname, help), a string (FIO_OPT_STR_STORE)
 * copied to the fib_config member of the same name.
 * FIB_UINT_OPTIONS: X(field, config_field, type, name, lname, def, help), an
 * unsigned int copied to fib_config's config_field.
 */
#define FIB_STR_OPTIONS(X)						\
	X(paths, "iscsi_paths", "iSCSI extra paths",			\
	  "More iscsi:// URLs of the same LU (comma or space separated), one path each") \
	X(transport, "iscsi_transport", "iSCSI transport",		\
	  "kernel (TCP sockets; the only one the fio engine offers so far)") \
	X(policy, "iscsi_policy", "iSCSI path policy",			\
	  "queue-depth (default), service-time, historical-service-time, round-robin[:N], failover") \
	X(initiator, "iscsi_initiator", "iSCSI initiator name",		\
	  "Our initiator IQN")						\
	X(chap_user, "iscsi_chap_user", "CHAP user",			\
	  "CHAP user name (secret: iscsi_chap_secret_file or ISCSI_CHAP_PASSWORD)") \
	X(chap_secret_file, "iscsi_chap_secret_file", "CHAP secret file", \
	  "File whose first line is the CHAP secret")			\
	X(target_user, "iscsi_target_user", "mutual CHAP user",		\
	  "Target's CHAP name for mutual CHAP")				\
	X(target_secret_file, "iscsi_target_secret_file", "mutual CHAP secret file", \
	  "File whose first line is the target's CHAP secret")		\
	X(cores, "iscsi_cores", "iSCSI worker cores",			\
	  "Cores to pin the path workers to (comma separated)")

#define FIB_UINT_OPTIONS(X)						\
	X(busy_poll, busy_poll, FIO_OPT_BOOL, "iscsi_busy_poll",	\
	  "iSCSI busy poll", "0",					\
	  "Path workers spin instead of blocking when idle (one core each)") \
	X(no_path_timeout, no_path_timeout_s, FIO_OPT_INT,		\
	  "iscsi_no_path_timeout", "iSCSI no-path timeout", "0",	\
	  "Seconds I/O waits for a usable path before failing (0: the library default)") \
	X(login_timeout, login_timeout_s, FIO_OPT_INT,			\
	  "iscsi_login_timeout", "iSCSI login timeout", "0",		\
	  "Seconds per path login (0: the library default)")

#define FIB_STR_MEMBER(field, n, l, h) char *field;
#define FIB_UINT_MEMBER(field, cfield, t, n, l, d, h) unsigned int field;

struct fib_options {
	void *pad;
	FIB_STR_OPTIONS(FIB_STR_MEMBER)
	FIB_UINT_OPTIONS(FIB_UINT_MEMBER)
};

#define FIB_STR_ENTRY(field, n, l, h) {				\
		.name = (n),					\
		.lname = (l),					\
		.type = FIO_OPT_STR_STORE,			\
		.off1 = offsetof(struct fib_options, field),	\
		.help = (h),					\
		.category = FIO_OPT_C_ENGINE,			\
		.group = FIO_OPT_G_ISCSI,			\
	},
#define FIB_UINT_ENTRY(field, cfield, t, n, l, d, h) {		\
		.name = (n),					\
		.lname = (l),					\
		.type = (t),					\
		.off1 = offsetof(struct fib_options, field),	\
		.help = (h),					\
		.def = (d),					\
		.category = FIO_OPT_C_ENGINE,			\
		.group = FIO_OPT_G_ISCSI,			\
	},

static struct fio_option options[] = {
	FIB_STR_OPTIONS(FIB_STR_ENTRY)
	FIB_UINT_OPTIONS(FIB_UINT_ENTRY)
	{
		.name = NULL,
	},
};

struct fib_td {
	void *eng;
	struct io_u **staged;
	unsigned int nr_staged;
	unsigned int max_staged;
};

#define FIB_ERRLEN 512

/*
 * td_verror() needs __td_verror, which the fio binary does not export:
 * record the error the same way, so fio counts the job as failed (its exit
 * status, the JSON "error") and names the reason.
 */
static void fib_set_error(struct thread_data *td, int err, const char *what)
{
	struct thread_data *t;
	int i;

	for (i = 0, t = td; i < 2 && t; i++, t = t->parent) {
		if (t->error)
			continue;
		t->error = err;
		snprintf(t->verror, sizeof(t->verror), "iscsi-bypass: %s: %s",
			 what, strerror(err));
	}
}

static void fib_config_from(struct thread_data *td, struct fib_config *c)
{
	struct fib_options *o = td->eo;

#define FIB_STR_COPY(field, n, l, h) c->field = o->field;
#define FIB_UINT_COPY(field, cfield, t, n, l, d, h) c->cfield = o->field;
	memset(c, 0, sizeof(*c));
	FIB_STR_OPTIONS(FIB_STR_COPY)
	FIB_UINT_OPTIONS(FIB_UINT_COPY)
#undef FIB_STR_COPY
#undef FIB_UINT_COPY
	c->queue_depth = td->o.iodepth ? td->o.iodepth : 1;
	c->nr_files = td->o.nr_files;
}

static int fib_get_file_size(struct thread_data *td, struct fio_file *f)
{
	struct fib_config c;
	char err[FIB_ERRLEN];
	uint64_t bytes = 0;

	if (fio_file_size_known(f))
		return 0;
	fib_config_from(td, &c);
	if (fib_probe_size(&c, f->file_name, &bytes, err, sizeof(err))) {
		log_err("fio: iscsi-bypass: %s: %s\n", f->file_name, err);
		fib_set_error(td, EIO, "get_file_size");
		return 1;
	}
	f->real_file_size = bytes;
	fio_file_set_size_known(f);
	return 0;
}

static int fib_setup(struct thread_data *td)
{
	struct fib_config c;
	char err[FIB_ERRLEN];
	struct fio_file *f;
	unsigned int i;

	if (strcmp(fio_version_string, "fio-3.33") != 0) {
		log_err("fio: iscsi-bypass engine was built against fio-3.33 headers, "
			"but this is %s: rebuild it (scripts/fio-engine.sh)\n",
			fio_version_string);
		fib_set_error(td, EINVAL, "version");
		return 1;
	}
	fib_config_from(td, &c);
	if (fib_check_config(&c, err, sizeof(err))) {
		log_err("fio: iscsi-bypass: %s\n", err);
		fib_set_error(td, EINVAL, "options");
		return 1;
	}
	/* With a setup hook fio leaves the sizing of the files to the engine. */
	for_each_file(td, f, i) {
		if (fib_get_file_size(td, f))
			return 1;
	}
	return 0;
}

static int fib_init(struct thread_data *td)
{
	struct fib_config c;
	struct fib_td *d;
	char err[FIB_ERRLEN];

	d = calloc(1, sizeof(*d));
	if (!d) {
		log_err("fio: iscsi-bypass: out of memory\n");
		return 1;
	}
	d->max_staged = td->o.iodepth ? td->o.iodepth : 1;
	d->staged = calloc(d->max_staged, sizeof(*d->staged));
	if (!d->staged) {
		free(d);
		log_err("fio: iscsi-bypass: out of memory\n");
		return 1;
	}
	fib_config_from(td, &c);
	d->eng = fib_engine_new(&c, err, sizeof(err));
	if (!d->eng) {
		log_err("fio: iscsi-bypass: %s\n", err);
		fib_set_error(td, EINVAL, "init");
		free(d->staged);
		free(d);
		return 1;
	}
	td->io_ops_data = d;
	return 0;
}

static void fib_cleanup(struct thread_data *td)
{
	struct fib_td *d = td->io_ops_data;

	if (!d)
		return;
	fib_engine_free(d->eng);
	free(d->staged);
	free(d);
	td->io_ops_data = NULL;
}

static int fib_open(struct thread_data *td, struct fio_file *f)
{
	struct fib_td *d = td->io_ops_data;
	char err[FIB_ERRLEN];
	uint64_t bytes = 0;
	uint32_t block_size = 0;
	int file;

	file = fib_open_file(d->eng, f->file_name, &bytes, &block_size, err, sizeof(err));
	if (file < 0) {
		log_err("fio: iscsi-bypass: %s: %s\n", f->file_name, err);
		fib_set_error(td, EIO, "open_file");
		return 1;
	}
	f->engine_pos = (uint64_t)file;
	if (!fio_file_size_known(f)) {
		f->real_file_size = bytes;
		fio_file_set_size_known(f);
	}
	return 0;
}

static int fib_close(struct thread_data *td, struct fio_file *f)
{
	struct fib_td *d = td->io_ops_data;

	if (d)
		fib_close_file(d->eng, (int)f->engine_pos);
	return 0;
}

static enum fio_q_status fib_queue_io(struct thread_data *td, struct io_u *io_u)
{
	struct fib_td *d = td->io_ops_data;
	char err[FIB_ERRLEN];
	int op, r;

	fio_ro_check(td, io_u);

	switch (io_u->ddir) {
	case DDIR_READ:
		op = FIB_READ;
		break;
	case DDIR_WRITE:
		op = FIB_WRITE;
		break;
	case DDIR_SYNC:
	case DDIR_DATASYNC:
		op = FIB_FLUSH;
		break;
	case DDIR_TRIM:
		op = FIB_TRIM;
		break;
	default:
		io_u->error = EINVAL;
		return FIO_Q_COMPLETED;
	}
	if (d->nr_staged == d->max_staged)
		return FIO_Q_BUSY;
	r = fib_queue(d->eng, (int)io_u->file->engine_pos, op, io_u->offset,
		      io_u->xfer_buf, io_u->xfer_buflen, io_u, err, sizeof(err));
	if (r == -EBUSY)
		return FIO_Q_BUSY;
	if (r < 0) {
		log_err("fio: iscsi-bypass: %s\n", err);
		io_u->error = -r;
		return FIO_Q_COMPLETED;
	}
	d->staged[d->nr_staged++] = io_u;
	return FIO_Q_QUEUED;
}

static int fib_commit_io(struct thread_data *td)
{
	struct fib_td *d = td->io_ops_data;
	char err[FIB_ERRLEN];
	struct timespec now;
	unsigned int i;
	int r;

	if (!d->nr_staged)
		return 0;
	if (fio_fill_issue_time(td)) {
		fio_gettime(&now, NULL);
		for (i = 0; i < d->nr_staged; i++) {
			memcpy(&d->staged[i]->issue_time, &now, sizeof(now));
			io_u_queued(td, d->staged[i]);
		}
	}
	io_u_mark_submit(td, d->nr_staged);
	d->nr_staged = 0;
	r = fib_commit(d->eng, err, sizeof(err));
	if (r < 0)
		log_err("fio: iscsi-bypass: %s\n", err);
	return r;
}

static int fib_getevents_io(struct thread_data *td, unsigned int min,
			    unsigned int max, const struct timespec *t)
{
	struct fib_td *d = td->io_ops_data;
	char err[FIB_ERRLEN];
	int64_t timeout_ns = -1;
	int r;

	if (t)
		timeout_ns = (int64_t)t->tv_sec * 1000000000LL + t->tv_nsec;
	r = fib_getevents(d->eng, min, max, timeout_ns, err, sizeof(err));
	if (r < 0)
		log_err("fio: iscsi-bypass: %s\n", err);
	return r;
}

static struct io_u *fib_event_io(struct thread_data *td, int event)
{
	struct fib_td *d = td->io_ops_data;
	struct io_u *io_u;
	int error = 0;

	io_u = fib_event(d->eng, (unsigned int)event, &error);
	if (io_u)
		io_u->error = error;
	return io_u;
}

static int fib_invalidate(struct thread_data *td, struct fio_file *f)
{
	return 0;
}

static struct ioengine_ops ioengine = {
	.name			= "iscsi-bypass",
	.version		= FIO_IOOPS_VERSION,
	.flags			= FIO_DISKLESSIO | FIO_NOEXTEND | FIO_NODISKUTIL |
				  FIO_ASYNCIO_SETS_ISSUE_TIME,
	.setup			= fib_setup,
	.init			= fib_init,
	.cleanup		= fib_cleanup,
	.open_file		= fib_open,
	.close_file		= fib_close,
	.invalidate		= fib_invalidate,
	.get_file_size		= fib_get_file_size,
	.queue			= fib_queue_io,
	.commit			= fib_commit_io,
	.getevents		= fib_getevents_io,
	.event			= fib_event_io,
	.options		= options,
	.option_struct_size	= sizeof(struct fib_options),
};

/* The ops, for get_ioengine (exported by the Rust side, src/ffi.rs). */
struct ioengine_ops *fib_shim_ops(void)
{
	return &ioengine;
}
